"""Triton backend: causal depthwise conv1d (see backends/__init__.py for the contract).

A program owns a ``[BLOCK_C, BLOCK_T]`` tile of (channels, time steps) of one sequence and
reads x at the W lags of the tile as W shifted loads (they overlap, so all but the first
come from L1/L2). Both layouts run the same kernel with x's strides: the JIT specialises the
stride that equals 1, so loads are coalesced along time (time-contiguous x) or along
channels (channel-last x, a transposed ``(B, L, C)`` tensor); the tile is wide in the
contiguous direction. Times below zero read ``initial_states`` (or zero).

Taps are held in lag order, ``v_j = weight[:, W - 1 - j]`` (lag j multiplies x[t - j]), so
one kernel unrolls widths 2..4 with ``if W > j`` on the constexpr width.

The backward runs P = B * NSPLIT programs per channel block: program (b, s) walks the
time steps of split s of sequence b, recomputing g = dout * act'(pre) at t .. t + W - 1
for ``dx[t] = sum_j v_j g[t + j]`` from x loaded once per shift (-W+1 .. W-1), and writes
row b * NSPLIT + s of dw_part / db_part (the sums of g * x[t - j] and of g over its steps;
zeros for an empty split). The split s = 0 also writes dinitial_states (the same sum at
times -W+1 .. -1).

``causal_conv1d_update`` gives each program a block of channels of one sequence: it writes
the outputs of the T new steps, then loads the shifted state into registers and, after a
barrier (threads of the program read elements that others overwrite), stores it.

As in ``triton.py``: every load is upcast to fp32 at once and every output rounded once
with ``_store_out``; the state update copies elements in their own dtype.
"""
import torch

from . import sm_count

from ._triton_import import IMPORT_ERROR, tl, triton

# Target elements per tile, and the widest tile along time / along channels.
CONV_TILE = 2048
CONV_MAX_BLOCK_T = 512
CONV_MAX_BLOCK_C = 128
UPDATE_BLOCK_C = 256


def _cdiv(a, b):
    return -(-a // b)


def _conv_config(C, L, channel_last):
    """(BLOCK_C, BLOCK_T, num_warps): wide along the contiguous direction of x."""
    if channel_last:
        block_c = min(CONV_MAX_BLOCK_C, _next_pow2(C))
        block_t = max(1, min(CONV_MAX_BLOCK_T, CONV_TILE // block_c, _next_pow2(L)))
    else:
        block_t = min(CONV_MAX_BLOCK_T, _next_pow2(L))
        block_c = max(1, min(CONV_MAX_BLOCK_C, CONV_TILE // block_t, _next_pow2(C)))
    return block_c, block_t, _num_warps(block_c * block_t)


def _bwd_split(B, C, L, block_c, block_t, min_programs):
    """(NSPLIT, t_per_prog): time splits per sequence, each a whole number of BLOCK_T tiles."""
    tiles = _cdiv(L, block_t)
    nsplit = max(1, min(tiles, _cdiv(min_programs, B * _cdiv(C, block_c))))
    t_per = _cdiv(tiles, nsplit) * block_t
    return _cdiv(L, t_per), t_per


def _channel_last(x):
    return not (x.shape[2] <= 1 or x.stride(2) == 1)


if IMPORT_ERROR is None:

    @triton.jit
    def _x_tile(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, t, L, H: tl.constexpr, HAS_INIT: tl.constexpr):
        """x at times `t` for the channels of `x_row`, fp32 [BLOCK_C, len(t)]: initial states (or zero) at
        times -H .. -1, zero at times >= L."""
        in_x = (t >= 0) & (t < L)
        # Masked lanes may point before x (t < 0): never dereferenced. No clamp: it would hide the contiguity
        # of t from the compiler and cost the vectorised loads.
        v = tl.cast(tl.load(X + x_row[:, None] + tl.cast(t, tl.int64)[None, :] * stride_xt,
                            mask=c_ok[:, None] & in_x[None, :], other=0.0), tl.float32)
        if HAS_INIT:
            in_i = (t < 0) & (t >= -H)
            ti = tl.where(in_i, t + H, 0)
            v += tl.cast(tl.load(INIT + i_row[:, None] + ti[None, :] * stride_it,
                                 mask=c_ok[:, None] & in_i[None, :], other=0.0), tl.float32)
        return v

    @triton.jit
    def _lag_taps(Wt, c, c_ok, W: tl.constexpr):
        """v_j = weight[c, W - 1 - j] for lags j = 0..3 (zero for j >= W), fp32 [BLOCK_C]."""
        base = Wt + tl.cast(c, tl.int64) * W
        v0 = tl.cast(tl.load(base + (W - 1), mask=c_ok, other=0.0), tl.float32)
        v1 = tl.cast(tl.load(base + (W - 2), mask=c_ok, other=0.0), tl.float32)
        v2 = tl.zeros_like(v0)
        v3 = tl.zeros_like(v0)
        if W > 2:
            v2 = tl.cast(tl.load(base + (W - 3), mask=c_ok, other=0.0), tl.float32)
        if W > 3:
            v3 = tl.cast(tl.load(base + (W - 4), mask=c_ok, other=0.0), tl.float32)
        return v0, v1, v2, v3

    @triton.jit
    def _taps_bias(Wt, BIAS, c, c_ok, W: tl.constexpr, HAS_BIAS: tl.constexpr):
        """_lag_taps, then the bias (zero without one): fp32 [BLOCK_C] each."""
        v0, v1, v2, v3 = _lag_taps(Wt, c, c_ok, W)
        if HAS_BIAS:
            bias = tl.cast(tl.load(BIAS + c, mask=c_ok, other=0.0), tl.float32)
        else:
            bias = tl.zeros_like(v0)
        return v0, v1, v2, v3, bias

    @triton.jit
    def _store_dw_db(DW, DB, pid_bs, C, c64, c_ok, dv0, dv1, dv2, dv3, db, W: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Partial row pid_bs of dw_part (P, C, W) / db_part (P, C); weight[:, k] has lag W - 1 - k."""
        dw_row = DW + (tl.cast(pid_bs, tl.int64) * C + c64) * W
        tl.store(dw_row + (W - 1), dv0, mask=c_ok)
        tl.store(dw_row + (W - 2), dv1, mask=c_ok)
        if W > 2:
            tl.store(dw_row + (W - 3), dv2, mask=c_ok)
        if W > 3:
            tl.store(dw_row + (W - 4), dv3, mask=c_ok)
        if HAS_BIAS:
            tl.store(DB + tl.cast(pid_bs, tl.int64) * C + c64, db, mask=c_ok)

    @triton.jit
    def _pre_act(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, t, L, bias, v0, v1, v2, v3,
                 W: tl.constexpr, HAS_INIT: tl.constexpr):
        """bias + sum_j v_j x[t - j], fp32 [BLOCK_C, len(t)]."""
        H: tl.constexpr = W - 1
        acc = bias[:, None] + v0[:, None] * _x_tile(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, t, L, H,
                                                    HAS_INIT)
        acc += v1[:, None] * _x_tile(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, t - 1, L, H, HAS_INIT)
        if W > 2:
            acc += v2[:, None] * _x_tile(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, t - 2, L, H, HAS_INIT)
        if W > 3:
            acc += v3[:, None] * _x_tile(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, t - 3, L, H, HAS_INIT)
        return acc

    @triton.jit
    def _conv_fwd_kernel(X, Wt, BIAS, INIT, OUT, FINAL,
                         stride_xb, stride_xc, stride_xt, stride_ib, stride_ic, stride_it,
                         stride_ob, stride_oc, stride_ot, stride_fb, stride_fc, stride_ft, C, L,
                         W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, HAS_FINAL: tl.constexpr,
                         SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
        H: tl.constexpr = W - 1
        pid_t = tl.program_id(1)
        b = tl.cast(tl.program_id(2), tl.int64)
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        c64 = tl.cast(c, tl.int64)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        x_row = b * stride_xb + c64 * stride_xc
        i_row = b * stride_ib + c64 * stride_ic
        v0, v1, v2, v3, bias = _taps_bias(Wt, BIAS, c, c_ok, W, HAS_BIAS)
        acc = _pre_act(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, t, L, bias, v0, v1, v2, v3, W, HAS_INIT)
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        o_ptr = OUT + (b * stride_ob + c64 * stride_oc)[:, None] + tl.cast(t, tl.int64)[None, :] * stride_ot
        _store_out(o_ptr, acc, c_ok[:, None] & (t < L)[None, :])
        if HAS_FINAL:  # the last time tile copies x at L - H .. L - 1 (from the initial states where negative)
            j = tl.arange(0, 4)
            f_ok = (j < H) & (pid_t + j * 0 == tl.num_programs(1) - 1)  # vector masks only (interpreter)
            v = _x_tile(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, L - H + j, L, H, HAS_INIT)
            f_ptr = FINAL + (b * stride_fb + c64 * stride_fc)[:, None] + j[None, :] * stride_ft
            _store_out(f_ptr, v, c_ok[:, None] & f_ok[None, :])

    @triton.jit
    def _dout_tile(DOUT, g_row, stride_gt, c_ok, s, L):
        """dout at times `s` (zero outside 0 .. L-1), fp32."""
        in_s = (s >= 0) & (s < L)
        return tl.cast(tl.load(DOUT + g_row[:, None] + tl.cast(s, tl.int64)[None, :] * stride_gt,
                               mask=c_ok[:, None] & in_s[None, :], other=0.0), tl.float32)

    @triton.jit
    def _dsilu(g, pre):
        """g * d silu(pre) / d pre."""
        sg = 1.0 / (1.0 + tl.exp(-pre))
        return g * sg * (1.0 + pre * (1.0 - sg))

    @triton.jit
    def _bwd_tile(X, INIT, DOUT, DFINAL, x_row, i_row, g_row, df_row, stride_xt, stride_it, stride_gt, stride_dft,
                  c_ok, t, L, bias, v0, v1, v2, v3,
                  W: tl.constexpr, HAS_INIT: tl.constexpr, HAS_DFINAL: tl.constexpr, SILU: tl.constexpr):
        """(dx, g, x, x[t-1], x[t-2], x[t-3]) at times `t`: dx = sum_j v_j g[t + j] (+ dfinal), g = dout *
        act'(pre). x is loaded once per shift, -W+1 .. W-1, and shared by the W pre-activations."""
        H: tl.constexpr = W - 1
        x0 = _x_tile(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, t, L, H, HAS_INIT)
        xm1 = _x_tile(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, t - 1, L, H, HAS_INIT)
        xm2 = tl.zeros_like(x0)
        xm3 = tl.zeros_like(x0)
        if W > 2:
            xm2 = _x_tile(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, t - 2, L, H, HAS_INIT)
        if W > 3:
            xm3 = _x_tile(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, t - 3, L, H, HAS_INIT)
        w0 = v0[:, None]
        w1 = v1[:, None]
        w2 = v2[:, None]
        w3 = v3[:, None]
        g0 = _dout_tile(DOUT, g_row, stride_gt, c_ok, t, L)
        g1 = _dout_tile(DOUT, g_row, stride_gt, c_ok, t + 1, L)
        g2 = tl.zeros_like(x0)
        g3 = tl.zeros_like(x0)
        if W > 2:
            g2 = _dout_tile(DOUT, g_row, stride_gt, c_ok, t + 2, L)
        if W > 3:
            g3 = _dout_tile(DOUT, g_row, stride_gt, c_ok, t + 3, L)
        if SILU:  # pre[t + j] = bias + sum_i v_i x[t + j - i]; unused taps are left out, not multiplied by 0
            b = bias[:, None]
            xp1 = _x_tile(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, t + 1, L, H, HAS_INIT)
            p0 = b + w0 * x0 + w1 * xm1
            p1 = b + w0 * xp1 + w1 * x0
            if W > 2:
                xp2 = _x_tile(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, t + 2, L, H, HAS_INIT)
                p0 += w2 * xm2
                p1 += w2 * xm1
                p2 = b + w0 * xp2 + w1 * xp1 + w2 * x0
            if W > 3:
                xp3 = _x_tile(X, INIT, x_row, i_row, stride_xt, stride_it, c_ok, t + 3, L, H, HAS_INIT)
                p0 += w3 * xm3
                p1 += w3 * xm2
                p2 += w3 * xm1
                p3 = b + w0 * xp3 + w1 * xp2 + w2 * xp1 + w3 * x0
            g0 = _dsilu(g0, p0)
            g1 = _dsilu(g1, p1)
            if W > 2:
                g2 = _dsilu(g2, p2)
            if W > 3:
                g3 = _dsilu(g3, p3)
        dx = w0 * g0 + w1 * g1
        if W > 2:
            dx += w2 * g2
        if W > 3:
            dx += w3 * g3
        if HAS_DFINAL:  # final_states[j] was x at time L - H + j
            f = t - (L - H)
            f_ok = (f >= 0) & (f < H)
            fj = tl.where(f_ok, f, 0)
            dx += tl.cast(tl.load(DFINAL + df_row[:, None] + fj[None, :] * stride_dft,
                                  mask=c_ok[:, None] & f_ok[None, :], other=0.0), tl.float32)
        return dx, g0, x0, xm1, xm2, xm3

    @triton.jit
    def _conv_bwd_kernel(X, Wt, BIAS, INIT, DOUT, DFINAL, DX, DINIT, DW, DB,
                         stride_xb, stride_xc, stride_xt, stride_ib, stride_ic, stride_it,
                         stride_gb, stride_gc, stride_gt, stride_dfb, stride_dfc, stride_dft,
                         stride_dxb, stride_dxc, stride_dxt, stride_dib, stride_dic, stride_dit,
                         C, L, t_per_prog, NSPLIT,
                         W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr,
                         HAS_DFINAL: tl.constexpr, HAS_DINIT: tl.constexpr, SILU: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
        H: tl.constexpr = W - 1
        pid_bs = tl.program_id(1)
        b = tl.cast(pid_bs // NSPLIT, tl.int64)
        split = pid_bs % NSPLIT
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        c64 = tl.cast(c, tl.int64)
        x_row = b * stride_xb + c64 * stride_xc
        i_row = b * stride_ib + c64 * stride_ic
        g_row = b * stride_gb + c64 * stride_gc
        df_row = b * stride_dfb + c64 * stride_dfc
        dx_row = b * stride_dxb + c64 * stride_dxc
        v0, v1, v2, v3, bias = _taps_bias(Wt, BIAS, c, c_ok, W, HAS_BIAS)
        dv0 = tl.zeros([BLOCK_C], tl.float32)
        dv1 = tl.zeros([BLOCK_C], tl.float32)
        dv2 = tl.zeros([BLOCK_C], tl.float32)
        dv3 = tl.zeros([BLOCK_C], tl.float32)
        db = tl.zeros([BLOCK_C], tl.float32)
        t_start = split * t_per_prog
        t_end = tl.minimum(t_start + t_per_prog, L)
        for t0 in range(t_start, t_end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            dx, g, x0, xm1, xm2, xm3 = _bwd_tile(X, INIT, DOUT, DFINAL, x_row, i_row, g_row, df_row, stride_xt,
                                                 stride_it, stride_gt, stride_dft, c_ok, t, L, bias, v0, v1, v2,
                                                 v3, W, HAS_INIT, HAS_DFINAL, SILU)
            _store_out(DX + dx_row[:, None] + tl.cast(t, tl.int64)[None, :] * stride_dxt, dx,
                       c_ok[:, None] & (t < L)[None, :])
            # g is zero at t >= L, so whole tiles can be summed
            db += tl.sum(g, axis=1)
            dv0 += tl.sum(g * x0, axis=1)
            dv1 += tl.sum(g * xm1, axis=1)
            if W > 2:
                dv2 += tl.sum(g * xm2, axis=1)
            if W > 3:
                dv3 += tl.sum(g * xm3, axis=1)
        if HAS_DINIT:  # split 0 also writes the gradient of the initial states (times -H .. -1)
            j = tl.arange(0, 4)
            di, g, x0, xm1, xm2, xm3 = _bwd_tile(X, INIT, DOUT, DFINAL, x_row, i_row, g_row, df_row, stride_xt,
                                                 stride_it, stride_gt, stride_dft, c_ok, j - H, L, bias, v0, v1,
                                                 v2, v3, W, HAS_INIT, HAS_DFINAL, SILU)
            di_ptr = DINIT + (b * stride_dib + c64 * stride_dic)[:, None] + j[None, :] * stride_dit
            _store_out(di_ptr, di, c_ok[:, None] & ((j < H) & (split + j * 0 == 0))[None, :])
        _store_dw_db(DW, DB, pid_bs, C, c64, c_ok, dv0, dv1, dv2, dv3, db, W, HAS_BIAS)

    @triton.jit
    def _cat_col(X, STATE, x_row, s_row, stride_xt, stride_st, c_ok, i, S, T):
        """Column i of [state, x] along time for the channels of the rows, in the storage dtype."""
        iv = i + tl.zeros_like(c_ok.to(tl.int32))  # a vector, so that the masks below are vectors
        in_s = iv < S
        si = tl.where(in_s, iv, 0)
        xi = tl.where(in_s, 0, iv - S)
        sv = tl.load(STATE + s_row + si * stride_st, mask=c_ok & in_s, other=0.0)
        xv = tl.load(X + x_row + xi * stride_xt, mask=c_ok & (iv >= S) & (iv < S + T), other=0.0)
        return tl.where(in_s, sv, xv)

    @triton.jit
    def _conv_update_kernel(X, STATE, Wt, BIAS, OUT, stride_xb, stride_xc, stride_xt, stride_sb, stride_sc,
                            stride_st, stride_ob, stride_oc, stride_ot, C, S, T,
                            W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.cast(tl.program_id(1), tl.int64)
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        c64 = tl.cast(c, tl.int64)
        x_row = b * stride_xb + c64 * stride_xc
        s_row = b * stride_sb + c64 * stride_sc
        o_row = b * stride_ob + c64 * stride_oc
        v0, v1, v2, v3, bias = _taps_bias(Wt, BIAS, c, c_ok, W, HAS_BIAS)
        for t in range(0, T):  # new step t is column S + t of [state, x]
            i = S + t
            acc = bias + v0 * tl.cast(_cat_col(X, STATE, x_row, s_row, stride_xt, stride_st, c_ok, i, S, T),
                                      tl.float32)
            acc += v1 * tl.cast(_cat_col(X, STATE, x_row, s_row, stride_xt, stride_st, c_ok, i - 1, S, T),
                                tl.float32)
            if W > 2:
                acc += v2 * tl.cast(_cat_col(X, STATE, x_row, s_row, stride_xt, stride_st, c_ok, i - 2, S, T),
                                    tl.float32)
            if W > 3:
                acc += v3 * tl.cast(_cat_col(X, STATE, x_row, s_row, stride_xt, stride_st, c_ok, i - 3, S, T),
                                    tl.float32)
            if SILU:
                acc = acc / (1.0 + tl.exp(-acc))
            _store_out(OUT + o_row + t * stride_ot, acc, c_ok)
        # state[j] <- column j + T of [state, x]: every read before any write
        j = tl.arange(0, BLOCK_S)
        i = j + T
        in_s = i < S
        si = tl.where(in_s, i, 0)
        xi = tl.where(in_s, 0, i - S)
        m = c_ok[:, None] & (j < S)[None, :]
        sv = tl.load(STATE + s_row[:, None] + si[None, :] * stride_st, mask=m & in_s[None, :], other=0.0)
        xv = tl.load(X + x_row[:, None] + xi[None, :] * stride_xt, mask=m & (~in_s)[None, :], other=0.0)
        new = tl.where(in_s[None, :], sv, xv)
        tl.debug_barrier()
        tl.store(STATE + s_row[:, None] + j[None, :] * stride_st, new, mask=m)

    # ------------------------------------------------------------------------- packed sequences (seq_idx)
    @triton.jit
    def _seq_at(SEQ, s_row, t, L):
        """seq_idx at times `t` (int32 [len(t)]), -1 outside 0 .. L-1 (never equal to a valid id)."""
        ok = (t >= 0) & (t < L)
        return tl.load(SEQ + s_row + tl.where(ok, t, 0), mask=ok, other=-1)

    @triton.jit
    def _mx(X, x_row, stride_xt, c_ok, t, L, s_src, s_dst):
        """x at times `t`, zero where seq(t) differs from s_dst (a select: a NaN there does not leak)."""
        v = _x_tile(X, X, x_row, x_row, stride_xt, 0, c_ok, t, L, 1, False)
        return tl.where((s_src == s_dst)[None, :], v, 0.0)

    @triton.jit
    def _pre_seq(X, x_row, stride_xt, c_ok, u, L, su, sm1, sm2, sm3, bias, v0, v1, v2, v3, W: tl.constexpr):
        """bias + sum_j v_j x[u - j] over the taps of u's sequence (sm_j: seq at u - j)."""
        acc = bias[:, None] + v0[:, None] * _mx(X, x_row, stride_xt, c_ok, u, L, su, su)
        acc += v1[:, None] * _mx(X, x_row, stride_xt, c_ok, u - 1, L, sm1, su)
        if W > 2:
            acc += v2[:, None] * _mx(X, x_row, stride_xt, c_ok, u - 2, L, sm2, su)
        if W > 3:
            acc += v3[:, None] * _mx(X, x_row, stride_xt, c_ok, u - 3, L, sm3, su)
        return acc

    @triton.jit
    def _g_seq(X, DOUT, x_row, g_row, stride_xt, stride_gt, c_ok, u, L, su, sm1, sm2, sm3, bias, v0, v1, v2, v3,
               W: tl.constexpr, SILU: tl.constexpr):
        """g = dout * act'(pre) at times u, zero at padding (seq < 0) and outside 0 .. L-1."""
        g = _dout_tile(DOUT, g_row, stride_gt, c_ok, u, L)
        if SILU:
            g = _dsilu(g, _pre_seq(X, x_row, stride_xt, c_ok, u, L, su, sm1, sm2, sm3, bias, v0, v1, v2, v3, W))
        return tl.where((su >= 0)[None, :], g, 0.0)

    @triton.jit
    def _conv_fwd_seq_kernel(X, Wt, BIAS, SEQ, OUT, stride_xb, stride_xc, stride_xt, stride_ob, stride_oc, stride_ot,
                             C, L, W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
        pid_t = tl.program_id(1)
        b = tl.cast(tl.program_id(2), tl.int64)
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        c64 = tl.cast(c, tl.int64)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        x_row = b * stride_xb + c64 * stride_xc
        s_row = b * L
        v0, v1, v2, v3, bias = _taps_bias(Wt, BIAS, c, c_ok, W, HAS_BIAS)
        s0 = _seq_at(SEQ, s_row, t, L)
        acc = _pre_seq(X, x_row, stride_xt, c_ok, t, L, s0, _seq_at(SEQ, s_row, t - 1, L),
                       _seq_at(SEQ, s_row, t - 2, L), _seq_at(SEQ, s_row, t - 3, L), bias, v0, v1, v2, v3, W)
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        acc = tl.where((s0 >= 0)[None, :], acc, 0.0)  # padding: 0
        o_ptr = OUT + (b * stride_ob + c64 * stride_oc)[:, None] + tl.cast(t, tl.int64)[None, :] * stride_ot
        _store_out(o_ptr, acc, c_ok[:, None] & (t < L)[None, :])

    @triton.jit
    def _conv_bwd_seq_kernel(X, Wt, BIAS, SEQ, DOUT, DX, DW, DB, stride_xb, stride_xc, stride_xt,
                             stride_gb, stride_gc, stride_gt, stride_dxb, stride_dxc, stride_dxt,
                             C, L, t_per_prog, NSPLIT, W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
        """As _conv_bwd_kernel (same split and partial rows), the taps masked by the sequence ids:
        dx[t] = sum_j v_j g[t + j] over outputs t + j of t's sequence; dv_j = sum_t g[t] x[t - j] over
        inputs of t's sequence; g = 0 at padding."""
        pid_bs = tl.program_id(1)
        b = tl.cast(pid_bs // NSPLIT, tl.int64)
        split = pid_bs % NSPLIT
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        c64 = tl.cast(c, tl.int64)
        x_row = b * stride_xb + c64 * stride_xc
        g_row = b * stride_gb + c64 * stride_gc
        dx_row = b * stride_dxb + c64 * stride_dxc
        s_row = b * L
        v0, v1, v2, v3, bias = _taps_bias(Wt, BIAS, c, c_ok, W, HAS_BIAS)
        dv0 = tl.zeros([BLOCK_C], tl.float32)
        dv1 = tl.zeros([BLOCK_C], tl.float32)
        dv2 = tl.zeros([BLOCK_C], tl.float32)
        dv3 = tl.zeros([BLOCK_C], tl.float32)
        db = tl.zeros([BLOCK_C], tl.float32)
        t_start = split * t_per_prog
        t_end = tl.minimum(t_start + t_per_prog, L)
        for t0 in range(t_start, t_end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            sm3 = _seq_at(SEQ, s_row, t - 3, L)
            sm2 = _seq_at(SEQ, s_row, t - 2, L)
            sm1 = _seq_at(SEQ, s_row, t - 1, L)
            s0 = _seq_at(SEQ, s_row, t, L)
            sp1 = _seq_at(SEQ, s_row, t + 1, L)
            sp2 = _seq_at(SEQ, s_row, t + 2, L)
            sp3 = _seq_at(SEQ, s_row, t + 3, L)
            g0 = _g_seq(X, DOUT, x_row, g_row, stride_xt, stride_gt, c_ok, t, L, s0, sm1, sm2, sm3, bias,
                        v0, v1, v2, v3, W, SILU)
            g1 = _g_seq(X, DOUT, x_row, g_row, stride_xt, stride_gt, c_ok, t + 1, L, sp1, s0, sm1, sm2, bias,
                        v0, v1, v2, v3, W, SILU)
            dx = v0[:, None] * g0 + v1[:, None] * tl.where((sp1 == s0)[None, :], g1, 0.0)
            if W > 2:
                g2 = _g_seq(X, DOUT, x_row, g_row, stride_xt, stride_gt, c_ok, t + 2, L, sp2, sp1, s0, sm1, bias,
                            v0, v1, v2, v3, W, SILU)
                dx += v2[:, None] * tl.where((sp2 == s0)[None, :], g2, 0.0)
            if W > 3:
                g3 = _g_seq(X, DOUT, x_row, g_row, stride_xt, stride_gt, c_ok, t + 3, L, sp3, sp2, sp1, s0, bias,
                            v0, v1, v2, v3, W, SILU)
                dx += v3[:, None] * tl.where((sp3 == s0)[None, :], g3, 0.0)
            _store_out(DX + dx_row[:, None] + tl.cast(t, tl.int64)[None, :] * stride_dxt, dx,
                       c_ok[:, None] & (t < L)[None, :])
            db += tl.sum(g0, axis=1)  # g0 is zero at t >= L
            dv0 += tl.sum(g0 * _mx(X, x_row, stride_xt, c_ok, t, L, s0, s0), axis=1)
            dv1 += tl.sum(g0 * _mx(X, x_row, stride_xt, c_ok, t - 1, L, sm1, s0), axis=1)
            if W > 2:
                dv2 += tl.sum(g0 * _mx(X, x_row, stride_xt, c_ok, t - 2, L, sm2, s0), axis=1)
            if W > 3:
                dv3 += tl.sum(g0 * _mx(X, x_row, stride_xt, c_ok, t - 3, L, sm3, s0), axis=1)
        _store_dw_db(DW, DB, pid_bs, C, c64, c_ok, dv0, dv1, dv2, dv3, db, W, HAS_BIAS)

    # ------------------------------------------------------------------------- update: circular buffer / slots
    @triton.jit
    def _hist_col(X, STATE, x_row, s_row, stride_xt, stride_st, c_ok, i, S, T, pos, CIRC: tl.constexpr):
        """Element i (-H <= i < T) of the window sequence [history, x] of each channel, storage dtype: i < 0
        is the history (circular: state[(pos + i) mod S]; shift mode: state[S + i]), i >= 0 is x[i]."""
        iv = i + tl.zeros_like(c_ok.to(tl.int32))
        in_s = iv < 0
        if CIRC:
            e = (pos + iv + S) % S
        else:
            e = S + iv
        e = tl.where(in_s, e, 0)
        xi = tl.where(in_s, 0, iv)
        sv = tl.load(STATE + s_row + tl.cast(e, tl.int64) * stride_st, mask=c_ok & in_s, other=0.0)
        xv = tl.load(X + x_row + tl.cast(xi, tl.int64) * stride_xt, mask=c_ok & (iv >= 0) & (iv < T), other=0.0)
        return tl.where(in_s, sv, xv)

    @triton.jit
    def _conv_update_ext_kernel(X, STATE, Wt, BIAS, OUT, CACHE, IDX, stride_xb, stride_xc, stride_xt, stride_sb,
                                stride_sc, stride_st, stride_ob, stride_oc, stride_ot, C, S, T,
                                W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, CIRC: tl.constexpr,
                                HAS_IDX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.cast(tl.program_id(1), tl.int64)
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < C
        c64 = tl.cast(c, tl.int64)
        if HAS_IDX:
            slot = tl.cast(tl.load(IDX + b), tl.int64)
        else:
            slot = b
        valid = (slot + c64 * 0) >= 0  # a vector (interpreter: no scalar masks); negative: a padded row
        cv = c_ok & valid
        x_row = b * stride_xb + c64 * stride_xc
        s_row = tl.where(valid, slot, 0) * stride_sb + c64 * stride_sc
        o_row = b * stride_ob + c64 * stride_oc
        if CIRC:
            pos = tl.load(CACHE + b) % S
        else:
            pos = 0
        v0, v1, v2, v3, bias = _taps_bias(Wt, BIAS, c, c_ok, W, HAS_BIAS)
        for t in range(0, T):
            acc = bias + v0 * tl.cast(_hist_col(X, STATE, x_row, s_row, stride_xt, stride_st, cv, t, S, T, pos, CIRC),
                                      tl.float32)
            acc += v1 * tl.cast(_hist_col(X, STATE, x_row, s_row, stride_xt, stride_st, cv, t - 1, S, T, pos, CIRC),
                                tl.float32)
            if W > 2:
                acc += v2 * tl.cast(_hist_col(X, STATE, x_row, s_row, stride_xt, stride_st, cv, t - 2, S, T, pos,
                                              CIRC), tl.float32)
            if W > 3:
                acc += v3 * tl.cast(_hist_col(X, STATE, x_row, s_row, stride_xt, stride_st, cv, t - 3, S, T, pos,
                                              CIRC), tl.float32)
            if SILU:
                acc = acc / (1.0 + tl.exp(-acc))
            _store_out(OUT + o_row + t * stride_ot, tl.where(valid, acc, 0.0), c_ok)
        j = tl.arange(0, BLOCK_S)
        if CIRC:  # the last min(T, S) inputs land at (pos + t) % S
            n = tl.minimum(T, S)
            tx = T - n + j
            m = cv[:, None] & (j < n)[None, :]
            new = tl.load(X + x_row[:, None] + tl.cast(tx, tl.int64)[None, :] * stride_xt, mask=m, other=0.0)
            dst = tl.cast((pos + tx) % S, tl.int64)
        else:  # state[j] <- column j + T of [state, x]
            i = j + T
            in_s = i < S
            si = tl.where(in_s, i, 0)
            xi = tl.where(in_s, 0, i - S)
            m = cv[:, None] & (j < S)[None, :]
            sv = tl.load(STATE + s_row[:, None] + si[None, :] * stride_st, mask=m & in_s[None, :], other=0.0)
            xv = tl.load(X + x_row[:, None] + xi[None, :] * stride_xt, mask=m & (~in_s)[None, :], other=0.0)
            new = tl.where(in_s[None, :], sv, xv)
            dst = tl.cast(j, tl.int64)
        tl.debug_barrier()  # every read of the state (above) before any write
        tl.store(STATE + s_row[:, None] + dst[None, :] * stride_st, new, mask=m)


# ----------------------------------------------------------------------------- launches
def _check_dtype(x):
    assert x.dtype != torch.float64, "the triton backend does not support float64"


def _min_programs(device):
    return 2 * sm_count(device) if device.type == "cuda" else 1


def _s3(t):
    return (0, 0, 0) if t is None else tuple(t.stride())


def causal_conv1d_fwd(x, weight, bias, initial_states, out, final_states, silu, seq_idx=None):
    _check_dtype(x)
    B, C, L = x.shape
    W = weight.shape[1]
    if B == 0 or C == 0 or L == 0:
        return
    block_c, block_t, num_warps = _conv_config(C, L, _channel_last(x))
    grid = (triton.cdiv(C, block_c), triton.cdiv(L, block_t), B)
    if seq_idx is not None:
        assert initial_states is None and final_states is None
        args = (x, weight, bias, seq_idx, out, *_s3(x), *_s3(out), C, L)
        meta = dict(W=W, HAS_BIAS=bias is not None, SILU=bool(silu), BLOCK_C=block_c, BLOCK_T=block_t)
        _launch(_conv_fwd_seq_kernel, grid, x.device, args, meta, num_warps)
        return
    args = (x, weight, bias, initial_states, out, final_states, *_s3(x), *_s3(initial_states), *_s3(out),
            *_s3(final_states), C, L)
    meta = dict(W=W, HAS_BIAS=bias is not None, HAS_INIT=initial_states is not None,
                HAS_FINAL=final_states is not None, SILU=bool(silu), BLOCK_C=block_c, BLOCK_T=block_t)
    _launch(_conv_fwd_kernel, grid, x.device, args, meta, num_warps)


def _bwd_config(B, C, L, channel_last, device):
    block_c, block_t, num_warps = _conv_config(C, L, channel_last)
    nsplit, t_per = _bwd_split(B, C, L, block_c, block_t, 2 * _min_programs(device))
    return block_c, block_t, num_warps, nsplit, t_per


def causal_conv1d_bwd_parts(B, C, L, device):
    device = torch.device(device)
    # the layout changes BLOCK_C/BLOCK_T, hence the split; size for the larger of the two
    return max(B * _bwd_config(B, C, L, cl, device)[3] for cl in (False, True))


def causal_conv1d_bwd(dout, dfinal_states, x, weight, bias, initial_states, silu, dx, dinitial_states,
                      dw_part, db_part, seq_idx=None):
    _check_dtype(x)
    B, C, L = x.shape
    W = weight.shape[1]
    if C == 0:
        return
    P = dw_part.shape[0]
    block_c, block_t, num_warps, nsplit, t_per = _bwd_config(B, C, L, _channel_last(x), x.device)
    if B * nsplit < P:  # rows past B * nsplit: no program writes them
        dw_part[B * nsplit:].zero_()
        if db_part is not None:
            db_part[B * nsplit:].zero_()
    if B == 0:
        return
    grid = (triton.cdiv(C, block_c), B * nsplit)
    if seq_idx is not None:
        assert initial_states is None and dfinal_states is None
        args = (x, weight, bias, seq_idx, dout, dx, dw_part, db_part, *_s3(x), *_s3(dout), *_s3(dx), C, L, t_per,
                nsplit)
        meta = dict(W=W, HAS_BIAS=bias is not None, SILU=bool(silu), BLOCK_C=block_c, BLOCK_T=block_t)
        _launch(_conv_bwd_seq_kernel, grid, x.device, args, meta, num_warps)
        return
    args = (x, weight, bias, initial_states, dout, dfinal_states, dx, dinitial_states, dw_part, db_part,
            *_s3(x), *_s3(initial_states), *_s3(dout), *_s3(dfinal_states), *_s3(dx), *_s3(dinitial_states),
            C, L, t_per, nsplit)
    meta = dict(W=W, HAS_BIAS=bias is not None, HAS_INIT=initial_states is not None,
                HAS_DFINAL=dfinal_states is not None, HAS_DINIT=dinitial_states is not None, SILU=bool(silu),
                BLOCK_C=block_c, BLOCK_T=block_t)
    _launch(_conv_bwd_kernel, grid, x.device, args, meta, num_warps)


def causal_conv1d_update(x, conv_state, weight, bias, out, silu, cache_seqlens=None, state_indices=None):
    _check_dtype(x)
    B, C, T = x.shape
    S, W = conv_state.shape[2], weight.shape[1]
    if B == 0 or C == 0:
        return
    block_c = min(UPDATE_BLOCK_C, _next_pow2(C))
    block_s = _next_pow2(S)
    grid = (triton.cdiv(C, block_c), B)
    if cache_seqlens is not None or state_indices is not None:
        args = (x, conv_state, weight, bias, out, cache_seqlens, state_indices, *_s3(x), *_s3(conv_state),
                *_s3(out), C, S, T)
        meta = dict(W=W, HAS_BIAS=bias is not None, SILU=bool(silu), CIRC=cache_seqlens is not None,
                    HAS_IDX=state_indices is not None, BLOCK_C=block_c, BLOCK_S=block_s)
        _launch(_conv_update_ext_kernel, grid, x.device, args, meta, _num_warps(block_c * block_s))
        return
    args = (x, conv_state, weight, bias, out, *_s3(x), *_s3(conv_state), *_s3(out), C, S, T)
    meta = dict(W=W, HAS_BIAS=bias is not None, SILU=bool(silu), BLOCK_C=block_c, BLOCK_S=block_s)
    _launch(_conv_update_kernel, grid, x.device, args, meta, _num_warps(block_c * block_s))


# ----------------------------------------------------------------------------- ahead-of-time compile
_FWD_ARGS = ("X", "Wt", "BIAS", "INIT", "OUT", "FINAL", "stride_xb", "stride_xc", "stride_xt", "stride_ib",
             "stride_ic", "stride_it", "stride_ob", "stride_oc", "stride_ot", "stride_fb", "stride_fc", "stride_ft",
             "C", "L")
_BWD_ARGS = ("X", "Wt", "BIAS", "INIT", "DOUT", "DFINAL", "DX", "DINIT", "DW", "DB", "stride_xb", "stride_xc",
             "stride_xt", "stride_ib", "stride_ic", "stride_it", "stride_gb", "stride_gc", "stride_gt", "stride_dfb",
             "stride_dfc", "stride_dft", "stride_dxb", "stride_dxc", "stride_dxt", "stride_dib", "stride_dic",
             "stride_dit", "C", "L", "t_per_prog", "NSPLIT")
_UPDATE_ARGS = ("X", "STATE", "Wt", "BIAS", "OUT", "stride_xb", "stride_xc", "stride_xt", "stride_sb", "stride_sc",
                "stride_st", "stride_ob", "stride_oc", "stride_ot", "C", "S", "T")
_FWD_SEQ_ARGS = ("X", "Wt", "BIAS", "SEQ", "OUT", "stride_xb", "stride_xc", "stride_xt", "stride_ob", "stride_oc",
                 "stride_ot", "C", "L")
_BWD_SEQ_ARGS = ("X", "Wt", "BIAS", "SEQ", "DOUT", "DX", "DW", "DB", "stride_xb", "stride_xc", "stride_xt",
                 "stride_gb", "stride_gc", "stride_gt", "stride_dxb", "stride_dxc", "stride_dxt", "C", "L",
                 "t_per_prog", "NSPLIT")
_UPDATE_EXT_ARGS = ("X", "STATE", "Wt", "BIAS", "OUT", "CACHE", "IDX", "stride_xb", "stride_xc", "stride_xt",
                    "stride_sb", "stride_sc", "stride_st", "stride_ob", "stride_oc", "stride_ot", "C", "S", "T")
_AOT_SMS = 132  # H100 SXM, for the launch configurations


def _flags(meta, names):
    return ",".join(k for k in names if meta[k])


def _unit_strides(prefixes, channel_last):
    """The strides equal to 1 (constexprs for the JIT too) of tensors in x's layout."""
    return {f"stride_{p}{'c' if channel_last else 't'}": 1 for p in prefixes}


def _novec(dt, L, cl, tile, nw):
    """' novec' where loads cannot be 128-bit: a time mask that varies inside a vector (L not a multiple of
    16, time-contiguous x) or under 16 bytes of a tile row per thread."""
    return " novec" if (not cl and L % 16) or tile // (32 * nw) * dt.itemsize < 16 else ""


def _fwd_variant(dt, B, C, L, W, cl, bias, init, final, silu):
    bc, bt, nw = _conv_config(C, L, cl)
    tensors = dict(X=dt, Wt=dt, BIAS=dt if bias else None, INIT=dt if init else None, OUT=dt,
                   FINAL=dt if final else None)
    meta = dict(W=W, HAS_BIAS=bias, HAS_INIT=init, HAS_FINAL=final, SILU=silu, BLOCK_C=bc, BLOCK_T=bt)
    ints = dict(C=C, L=L, **_unit_strides(("x", "o"), cl))
    what = (f"conv1d_fwd {str(dt)[6:]} B={B} C={C} L={L} W={W} {'channel-last' if cl else 'time-contiguous'} "
            f"[{_flags(meta, ('HAS_BIAS', 'HAS_INIT', 'HAS_FINAL', 'SILU'))}] BLOCK={bc}x{bt} warps={nw}"
            f"{_novec(dt, L, cl, bc * bt, nw)}")
    return "conv1d_fwd", _FWD_ARGS, tensors, ints, meta, nw, what


def _bwd_variant(dt, B, C, L, W, cl, bias, init, dfinal, silu):
    bc, bt, nw = _conv_config(C, L, cl)
    nsplit, t_per = _bwd_split(B, C, L, bc, bt, 4 * _AOT_SMS)
    f32 = torch.float32
    tensors = dict(X=dt, Wt=dt, BIAS=dt if bias else None, INIT=dt if init else None, DOUT=dt,
                   DFINAL=dt if dfinal else None, DX=dt, DINIT=dt if init else None, DW=f32,
                   DB=f32 if bias else None)
    meta = dict(W=W, HAS_BIAS=bias, HAS_INIT=init, HAS_DFINAL=dfinal, HAS_DINIT=init, SILU=silu, BLOCK_C=bc,
                BLOCK_T=bt)
    ints = dict(C=C, L=L, t_per_prog=t_per, NSPLIT=nsplit, **_unit_strides(("x", "g", "dx"), cl))
    what = (f"conv1d_bwd {str(dt)[6:]} B={B} C={C} L={L} W={W} {'channel-last' if cl else 'time-contiguous'} "
            f"[{_flags(meta, ('HAS_BIAS', 'HAS_INIT', 'HAS_DFINAL', 'HAS_DINIT', 'SILU'))}] BLOCK={bc}x{bt} "
            f"split={nsplit} warps={nw}{_novec(dt, L, cl, bc * bt, nw)}")
    return "conv1d_bwd", _BWD_ARGS, tensors, ints, meta, nw, what


def _update_variant(dt, B, C, S, W, bias, silu):
    bc, bs = min(UPDATE_BLOCK_C, _next_pow2(C)), _next_pow2(S)
    nw = _num_warps(bc * bs)
    tensors = dict(X=dt, STATE=dt, Wt=dt, BIAS=dt if bias else None, OUT=dt)
    meta = dict(W=W, HAS_BIAS=bias, SILU=silu, BLOCK_C=bc, BLOCK_S=bs)
    ints = dict(C=C, S=S, T=1, stride_xc=1, stride_xt=1, stride_sc=S, stride_st=1, stride_oc=1, stride_ot=1)
    what = (f"conv1d_update {str(dt)[6:]} B={B} C={C} S={S} W={W} [{_flags(meta, ('HAS_BIAS', 'SILU'))}] "
            f"BLOCK={bc}x{bs} warps={nw} novec")
    return "conv1d_update", _UPDATE_ARGS, tensors, ints, meta, nw, what


def _fwd_seq_variant(dt, B, C, L, W, cl, bias, silu):
    bc, bt, nw = _conv_config(C, L, cl)
    tensors = dict(X=dt, Wt=dt, BIAS=dt if bias else None, SEQ=torch.int32, OUT=dt)
    meta = dict(W=W, HAS_BIAS=bias, SILU=silu, BLOCK_C=bc, BLOCK_T=bt)
    ints = dict(C=C, L=L, **_unit_strides(("x", "o"), cl))
    what = (f"conv1d_fwd_seq {str(dt)[6:]} B={B} C={C} L={L} W={W} {'channel-last' if cl else 'time-contiguous'} "
            f"[{_flags(meta, ('HAS_BIAS', 'SILU'))}] BLOCK={bc}x{bt} warps={nw}{_novec(dt, L, cl, bc * bt, nw)}")
    return "conv1d_fwd_seq", _FWD_SEQ_ARGS, tensors, ints, meta, nw, what


def _bwd_seq_variant(dt, B, C, L, W, cl, bias, silu):
    bc, bt, nw = _conv_config(C, L, cl)
    nsplit, t_per = _bwd_split(B, C, L, bc, bt, 4 * _AOT_SMS)
    f32 = torch.float32
    tensors = dict(X=dt, Wt=dt, BIAS=dt if bias else None, SEQ=torch.int32, DOUT=dt, DX=dt, DW=f32,
                   DB=f32 if bias else None)
    meta = dict(W=W, HAS_BIAS=bias, SILU=silu, BLOCK_C=bc, BLOCK_T=bt)
    ints = dict(C=C, L=L, t_per_prog=t_per, NSPLIT=nsplit, **_unit_strides(("x", "g", "dx"), cl))
    what = (f"conv1d_bwd_seq {str(dt)[6:]} B={B} C={C} L={L} W={W} {'channel-last' if cl else 'time-contiguous'} "
            f"[{_flags(meta, ('HAS_BIAS', 'SILU'))}] BLOCK={bc}x{bt} split={nsplit} warps={nw}"
            f"{_novec(dt, L, cl, bc * bt, nw)}")
    return "conv1d_bwd_seq", _BWD_SEQ_ARGS, tensors, ints, meta, nw, what


def _update_ext_variant(dt, B, C, S, W, bias, silu, circ, idx):
    bc, bs = min(UPDATE_BLOCK_C, _next_pow2(C)), _next_pow2(S)
    nw = _num_warps(bc * bs)
    tensors = dict(X=dt, STATE=dt, Wt=dt, BIAS=dt if bias else None, OUT=dt, CACHE=torch.int32 if circ else None,
                   IDX=torch.int32 if idx else None)
    meta = dict(W=W, HAS_BIAS=bias, SILU=silu, CIRC=circ, HAS_IDX=idx, BLOCK_C=bc, BLOCK_S=bs)
    ints = dict(C=C, S=S, T=1, stride_xc=1, stride_xt=1, stride_sc=S, stride_st=1, stride_oc=1, stride_ot=1)
    what = (f"conv1d_update_ext {str(dt)[6:]} B={B} C={C} S={S} W={W} "
            f"[{_flags(meta, ('HAS_BIAS', 'SILU', 'CIRC', 'HAS_IDX'))}] BLOCK={bc}x{bs} warps={nw} novec")
    return "conv1d_update_ext", _UPDATE_EXT_ARGS, tensors, ints, meta, nw, what


def aot_variants(full=False):
    """Representative launches of the conv1d kernels, in the format of ``triton._aot_variants``: both
    layouts, every flag on and off, widths 2..4, every dtype, at Mamba-2 sizes (B 4, C 4096, L 2048) with
    the blocks and splits the launchers would choose on an H100. ``full``: more flag combinations."""
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    out = [
        _fwd_variant(bf16, 4, 4096, 2048, 4, False, True, False, False, True),
        _fwd_variant(bf16, 4, 4096, 2048, 4, True, True, True, True, True),
        _fwd_variant(f32, 2, 1536, 123, 2, False, False, False, True, False),
        _fwd_variant(f16, 1, 4096, 1, 3, True, False, True, False, False),
        _bwd_variant(bf16, 4, 4096, 2048, 4, False, True, False, False, True),
        _bwd_variant(bf16, 4, 4096, 2048, 4, True, True, True, True, True),
        _bwd_variant(f32, 2, 1536, 123, 3, False, False, True, False, False),
        _bwd_variant(f16, 8, 768, 4096, 2, True, False, False, True, True),
        _update_variant(bf16, 16, 8192, 3, 4, True, True),
        _update_variant(f32, 1, 100, 5, 2, False, False),
        # packed sequences (seq_idx), the circular / slotted decode update
        _fwd_seq_variant(bf16, 1, 4096, 8192, 4, True, True, True),
        _fwd_seq_variant(f32, 2, 1536, 123, 2, False, False, False),
        _bwd_seq_variant(bf16, 1, 4096, 8192, 4, True, True, True),
        _bwd_seq_variant(f32, 2, 1536, 123, 3, False, False, False),
        _update_ext_variant(bf16, 16, 8192, 3, 4, True, True, True, True),
        _update_ext_variant(f32, 4, 100, 5, 2, False, False, True, False),
        _update_ext_variant(f16, 4, 100, 3, 4, True, False, False, True),
    ]
    if full:
        for dt in (f32, f16, bf16):
            for cl in (False, True):
                for w in (2, 3, 4):
                    out.append(_fwd_variant(dt, 4, 4096, 2048, w, cl, True, True, True, True))
                    out.append(_bwd_variant(dt, 4, 4096, 2048, w, cl, True, True, True, True))
    return out


# Kernel of each AOT ``kind`` (empty without triton).
AOT_KERNELS = {} if IMPORT_ERROR is not None else {
    "conv1d_fwd": _conv_fwd_kernel,
    "conv1d_bwd": _conv_bwd_kernel,
    "conv1d_update": _conv_update_kernel,
    "conv1d_fwd_seq": _conv_fwd_seq_kernel,
    "conv1d_bwd_seq": _conv_bwd_seq_kernel,
    "conv1d_update_ext": _conv_update_ext_kernel,
}


# The shared helpers of the Triton backend, imported last on purpose (see triton_hybridnorm.py).
from .triton import _launch, _next_pow2, _num_warps  # noqa: E402,F401
if IMPORT_ERROR is None:
    from .triton import _store_out  # noqa: E402,F401
