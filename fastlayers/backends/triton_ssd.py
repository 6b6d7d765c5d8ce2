"""Triton kernel of the Mamba-2 chunked scan ``ssd_scan`` (the SSD algorithm), and its backward.

Forward, one program per (batch, head, block of BLOCK_P head channels), walking the chunks of CHUNK steps
in order with the BLOCK_P x N state in registers. Per chunk, with cs the cumulative sum of dt A:

  intra-chunk:  y  = (C B^T ∘ exp(cs_i - cs_j) [j <= i] dt_j) x           (two tl.dot)
  carried state: y += exp(cs_i) C S^T                                      (state entering the chunk)
  chunk state:  S  = exp(cs_last) S + (x ∘ exp(cs_last - cs_j) dt_j)^T B   (passed to the next chunk)

then ``y += D x``, ``y *= silu(z)``. ``seq_idx`` restarts: r = running count of restarts in the chunk;
pairs (i, j) with r_i != r_j are masked, the carried state reaches only rows with r_i = 0, and passes
to the next chunk only when the chunk has no restart. CHUNK = ``chunk_size`` rounded down to a power of two
in [16, 64] (registers); dt, A, B, C arrive as fp32 (ops/ssd.py makes the copies); x, z, D,
initial_states any float dtype and strides. Every load is upcast to fp32; matrix products run in IEEE
fp32 for fp32 x, TF32 for fp16/bf16 x (within their tolerance).

Backward (``ssd_scan_bwd``), three Triton launches and two small PyTorch sums:

1. the forward kernel again with ``STORE_STATES``: the state entering each chunk, (b, h, n_chunks, p, n)
   fp32 (O(L / CHUNK) memory), and, with z, the output before the z gate (fp32, for dz); without z the
   output is not computed (``STORE_OUT``);
2. ``_ssd_bwd_dstates_kernel``, one program per (batch, head, block of BLOCK_P channels): the reverse
   inter-chunk recurrence of the state gradient, dS_in = decay dS_out + (exp(cs) dy)^T C (one tl.dot a
   chunk), storing dS_out of every chunk, (b, h, n_chunks, p, n) fp32, and d initial_states;
3. ``_ssd_bwd_chunk_kernel``, one program per (batch, chunk, group), every chunk in parallel, looping over
   the group's heads and blocks of BLOCK_P channels. C B^T once per group; per head, with dy = dout silu(z)
   (dz = dout y silu'(z)), L_ij = [j <= i, same segment] exp(cs_i - cs_j), M = L ∘ C B^T dt_j:

     intra-chunk:   dx = M^T dy,  dM = dy x^T,  dC += (dM ∘ L dt) B,  dB += (dM ∘ L dt)^T C,
                    ddt_j += sum_i dM_ij L_ij C_i.B_j,  d(dt_k a) += sum_{i >= k > j} dM_ij M_ij
     carried state: dC += exp(cs_i) dy S_in,  d cs_i from dy.(C S_in^T)
     chunk state:   dx += exp(cs_last - cs) dt (B dS_out^T),  dB += exp(cs_last - cs) dt (x dS_out),
                    ddt and d(dt_k a) (sum over j < k) from x dS_out B^T; d cs_last = decay <dS_out, S_in>
     then d(dt a) += reverse cumsum of d cs + d cs_last;  ddt += A d(dt a),  dA += sum dt d(dt a);
     plus dx += D dy, dD += sum dy x.

   The sums of d(dt a) are written without cancellation (no "total - prefix"): dA and dt_bias keep
   fp32 accuracy. dB, dC (b, l, g, n) are complete (summed over the heads in registers); dA (b,
   n_chunks, h) and dD (b, n_chunks, h, p) are fp32 partials that PyTorch sums.

   ``seq_idx`` restarts use the forward's masks (no gradient crosses a restart). All fp32 accumulation
   (IEEE tl.dot for fp32 x, TF32 for 16-bit x); CHUNK <= 32 in the backward (register tiles).

The gradients of dt_bias, softplus, the dt_limit clamp, D of shape (h,) and the fp32 copies of dt, A,
B, C are autograd on the torch ops in ops/ssd.py, exactly as for the cpu backend.

Fallback: ``SSD_BWD = "torch"`` differentiates ``chunked_torch``, the same chunked algorithm in pure
PyTorch, with torch.autograd (correct, slow, O(L * CHUNK * nheads) memory); the tests compare the two.
"""
import torch

from ._triton_import import IMPORT_ERROR, tl, triton


if IMPORT_ERROR is None:
    @triton.jit
    def _chunk_restarts(RESET, b, L, t, t_ok, qq, causal, HAS_RESET: tl.constexpr):
        """Where packed sequences restart (seq_idx) inside the chunk of steps t: (pair_ok: step j may feed
        step i, carry_in: the incoming state reaches step i, to_last: step i reaches the chunk's end state,
        carry_out: the incoming state passes the whole chunk). Without restarts: causal and all true."""
        if HAS_RESET:
            rs = tl.load(RESET + b * L + t, mask=t_ok, other=0).to(tl.int32)
            r = tl.cumsum(rs, axis=0)
            r_last = tl.sum(rs, axis=0)
            return causal & (r[:, None] == r[None, :]), r == 0, r == r_last, r_last == 0
        else:
            return causal, qq >= 0, qq >= 0, True

    @triton.jit
    def _head_program(A, H, P, N, heads_per_group, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """A program of the per-head kernels: (batch b, head h of group g) on axis 0, a block of BLOCK_P
        channels on axis 1. Returns pid, b, h, g, the channel / state / step index vectors pp, nn, qq, their
        masks p_ok, n_ok, pn_ok, and the head's A."""
        pid = tl.program_id(0).to(tl.int64)
        b = pid // H
        h = pid % H
        g = h // heads_per_group
        pp = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        nn = tl.arange(0, BLOCK_N)
        qq = tl.arange(0, CHUNK)
        p_ok, n_ok = pp < P, nn < N
        return pid, b, h, g, pp, nn, qq, p_ok, n_ok, p_ok[:, None] & n_ok[None, :], tl.load(A + h).to(tl.float32)

    @triton.jit
    def _ssd_fwd_kernel(X, DT, A, B, C, D, Z, INIT, RESET, OUT, FINAL, STATES,
                        x_s0, x_s1, x_s2, x_s3, z_s0, z_s1, z_s2, z_s3, o_s0, o_s1, o_s2, o_s3,
                        d_s0, d_s1, i_s0, i_s1, i_s2, i_s3,
                        L, H, P, N, G, heads_per_group,
                        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_INIT: tl.constexpr, HAS_RESET: tl.constexpr,
                        STORE_STATES: tl.constexpr, STORE_OUT: tl.constexpr, PREC: tl.constexpr,
                        CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        pid, b, h, g, pp, nn, qq, p_ok, n_ok, pn_ok, a_h = _head_program(A, H, P, N, heads_per_group, CHUNK, BLOCK_P,
                                                                        BLOCK_N)
        if HAS_INIT:
            S = tl.load(INIT + b * i_s0 + h * i_s1 + pp[:, None] * i_s2 + nn[None, :] * i_s3, mask=pn_ok,
                        other=0.0).to(tl.float32)
        else:
            S = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        if HAS_D:
            Dv = tl.load(D + h * d_s0 + pp * d_s1, mask=p_ok, other=0.0).to(tl.float32)
        causal = qq[:, None] >= qq[None, :]
        NC = (L + CHUNK - 1) // CHUNK
        for t0 in range(0, L, CHUNK):
            if STORE_STATES:  # the state entering each chunk, (b, h, chunk, p, n) fp32, for the backward
                st_off = ((pid * NC + t0 // CHUNK) * P + pp[:, None]) * N + nn[None, :]
                tl.store(STATES + st_off, S, mask=pn_ok)
            t = t0 + qq
            t_ok = t < L
            dt = tl.load(DT + (b * L + t) * H + h, mask=t_ok, other=0.0).to(tl.float32)
            dA = dt * a_h
            cs = tl.cumsum(dA, axis=0)
            cs_last = tl.sum(dA, axis=0)
            pair_ok, carry_in, to_last, carry_out = _chunk_restarts(RESET, b, L, t, t_ok, qq, causal, HAS_RESET)
            x = tl.load(X + b * x_s0 + t[:, None] * x_s1 + h * x_s2 + pp[None, :] * x_s3,
                        mask=t_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)          # (Q, BP)
            tn_ok = t_ok[:, None] & n_ok[None, :]
            bc_off = ((b * L + t[:, None]) * G + g) * N + nn[None, :]
            Bm = tl.load(B + bc_off, mask=tn_ok, other=0.0).to(tl.float32)                     # (Q, BN)
            if STORE_OUT:  # off in the backward's recompute without z: only the states are needed
                Cm = tl.load(C + bc_off, mask=tn_ok, other=0.0).to(tl.float32)
                CB = tl.dot(Cm, tl.trans(Bm), input_precision=PREC)                            # (Q, Q)
                seg = cs[:, None] - cs[None, :]
                M = tl.where(pair_ok, tl.exp(tl.where(pair_ok, seg, 0.0)), 0.0) * CB * dt[None, :]
                y = tl.dot(M, x, input_precision=PREC)                                        # (Q, BP)
                w_in = tl.where(carry_in, tl.exp(cs), 0.0)
                y += w_in[:, None] * tl.dot(Cm, tl.trans(S), input_precision=PREC)
                if HAS_D:
                    y += Dv[None, :] * x
                tp_ok = t_ok[:, None] & p_ok[None, :]
                if HAS_Z:
                    zv = tl.load(Z + b * z_s0 + t[:, None] * z_s1 + h * z_s2 + pp[None, :] * z_s3, mask=tp_ok,
                                 other=0.0).to(tl.float32)
                    y = y * zv / (1.0 + tl.exp(-zv))
                _store_out(OUT + b * o_s0 + t[:, None] * o_s1 + h * o_s2 + pp[None, :] * o_s3, y, tp_ok)
            w_out = tl.where(to_last, tl.exp(cs_last - cs), 0.0) * dt
            decay = tl.where(carry_out, tl.exp(cs_last), 0.0)
            S = decay * S + tl.dot(tl.trans(x * w_out[:, None]), Bm, input_precision=PREC)    # (BP, BN)
        # FINAL: (b, h, p, n) contiguous, fp32.
        tl.store(FINAL + ((b * H + h) * P + pp[:, None]) * N + nn[None, :], S, mask=pn_ok)


    @triton.jit
    def _ssd_bwd_dstates_kernel(DT, A, C, Z, DOUT, RESET, DFINAL, DSTATES, DINIT,
                                z_s0, z_s1, z_s2, z_s3, g_s0, g_s1, g_s2, g_s3, L, H, P, N, G, heads_per_group,
                                HAS_Z: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr,
                                HAS_RESET: tl.constexpr, PREC: tl.constexpr, CHUNK: tl.constexpr,
                                BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        """The reverse inter-chunk recurrence of the state gradient, one program per (batch, head, block of
        BLOCK_P channels): DSTATES[b, h, c] = the gradient of the state leaving chunk c (b, h, n_chunks, p, n)
        fp32; dS_in = decay dS_out + (exp(cs) dy)^T C; DINIT = the gradient of the initial state."""
        pid, b, h, g, pp, nn, qq, p_ok, n_ok, pn_ok, a_h = _head_program(A, H, P, N, heads_per_group, CHUNK, BLOCK_P,
                                                                        BLOCK_N)
        if HAS_DFINAL:
            dS = tl.load(DFINAL + ((b * H + h) * P + pp[:, None]) * N + nn[None, :], mask=pn_ok,
                         other=0.0).to(tl.float32)
        else:
            dS = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        NC = (L + CHUNK - 1) // CHUNK
        for ci in range(0, NC):
            c = NC - 1 - ci
            tl.store(DSTATES + ((pid * NC + c) * P + pp[:, None]) * N + nn[None, :], dS, mask=pn_ok)
            t = c * CHUNK + qq
            t_ok = t < L
            dt = tl.load(DT + (b * L + t) * H + h, mask=t_ok, other=0.0).to(tl.float32)
            cs = tl.cumsum(dt * a_h, axis=0)
            cs_last = tl.sum(dt * a_h, axis=0)
            _, carry_in, _, carry_out = _chunk_restarts(RESET, b, L, t, t_ok, qq, qq >= 0, HAS_RESET)
            tp_ok = t_ok[:, None] & p_ok[None, :]
            dy = tl.load(DOUT + b * g_s0 + t[:, None] * g_s1 + h * g_s2 + pp[None, :] * g_s3, mask=tp_ok,
                         other=0.0).to(tl.float32)
            if HAS_Z:
                zv = tl.load(Z + b * z_s0 + t[:, None] * z_s1 + h * z_s2 + pp[None, :] * z_s3, mask=tp_ok,
                             other=0.0).to(tl.float32)
                dy = dy * zv / (1.0 + tl.exp(-zv))
            Cm = tl.load(C + ((b * L + t[:, None]) * G + g) * N + nn[None, :], mask=t_ok[:, None] & n_ok[None, :],
                         other=0.0).to(tl.float32)
            w_in = tl.where(carry_in, tl.exp(cs), 0.0)
            decay = tl.where(carry_out, tl.exp(cs_last), 0.0)
            dS = decay * dS + tl.dot(tl.trans(dy * w_in[:, None]), Cm, input_precision=PREC)
        if HAS_INIT:
            tl.store(DINIT + ((b * H + h) * P + pp[:, None]) * N + nn[None, :], dS, mask=pn_ok)

    @triton.jit
    def _ssd_bwd_chunk_kernel(X, DT, A, B, C, D, Z, DOUT, YPRE, STATES, DSTATES, RESET,
                              DX, DZ, DDT, DB, DC, DD, DA,
                              x_s0, x_s1, x_s2, x_s3, z_s0, z_s1, z_s2, z_s3, g_s0, g_s1, g_s2, g_s3, d_s0, d_s1,
                              L, H, P, N, G, heads_per_group,
                              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr,
                              PREC: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_N: tl.constexpr):
        """Every gradient of one chunk, one program per (batch, chunk, group), looping over the group's heads
        and blocks of BLOCK_P channels: C B^T once per group, dB and dC summed over the heads in registers."""
        NC = (L + CHUNK - 1) // CHUNK
        pid = tl.program_id(0).to(tl.int64)
        b = pid // NC
        c = pid % NC
        g = tl.program_id(1).to(tl.int64)
        nn = tl.arange(0, BLOCK_N)
        qq = tl.arange(0, CHUNK)
        n_ok = nn < N
        t = c * CHUNK + qq
        t_ok = t < L
        tn_ok = t_ok[:, None] & n_ok[None, :]
        causal = qq[:, None] >= qq[None, :]
        pair_ok, carry_in, to_last, carry_out = _chunk_restarts(RESET, b, L, t, t_ok, qq, causal, HAS_RESET)
        bc_off = ((b * L + t[:, None]) * G + g) * N + nn[None, :]
        Bm = tl.load(B + bc_off, mask=tn_ok, other=0.0).to(tl.float32)                         # (Q, BN)
        Cm = tl.load(C + bc_off, mask=tn_ok, other=0.0).to(tl.float32)
        CB = tl.dot(Cm, tl.trans(Bm), input_precision=PREC)                                    # (Q, Q)
        dB = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
        dC = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
        for hh in range(0, heads_per_group):
            h = g * heads_per_group + hh
            a_h = tl.load(A + h).to(tl.float32)
            dt = tl.load(DT + (b * L + t) * H + h, mask=t_ok, other=0.0).to(tl.float32)
            cs = tl.cumsum(dt * a_h, axis=0)
            cs_last = tl.sum(dt * a_h, axis=0)
            Lm = tl.where(pair_ok, tl.exp(tl.where(pair_ok, cs[:, None] - cs[None, :], 0.0)), 0.0)
            LCB = Lm * CB
            w_in = tl.where(carry_in, tl.exp(cs), 0.0)
            w_out = tl.where(to_last, tl.exp(cs_last - cs), 0.0)
            decay = tl.where(carry_out, tl.exp(cs_last), 0.0)
            ddt = tl.zeros((CHUNK,), dtype=tl.float32)
            dcs = tl.zeros((CHUNK,), dtype=tl.float32)    # d cs_i: reverse-cumsummed into d(dt a) below
            ddA = tl.zeros((CHUNK,), dtype=tl.float32)    # d(dt_k a) directly (no cancellation)
            dcs_last = tl.sum(tl.zeros((CHUNK,), dtype=tl.float32), axis=0)
            st_base = ((b * H + h) * NC + c) * P
            for p0 in range(0, P, BLOCK_P):
                pp = p0 + tl.arange(0, BLOCK_P)
                p_ok = pp < P
                tp_ok = t_ok[:, None] & p_ok[None, :]
                pn_ok = p_ok[:, None] & n_ok[None, :]
                x = tl.load(X + b * x_s0 + t[:, None] * x_s1 + h * x_s2 + pp[None, :] * x_s3, mask=tp_ok,
                            other=0.0).to(tl.float32)                                          # (Q, BP)
                dy = tl.load(DOUT + b * g_s0 + t[:, None] * g_s1 + h * g_s2 + pp[None, :] * g_s3, mask=tp_ok,
                             other=0.0).to(tl.float32)
                o_off = ((b * L + t[:, None]) * H + h) * P + pp[None, :]   # dx, dz, y_pre: contiguous
                if HAS_Z:
                    zv = tl.load(Z + b * z_s0 + t[:, None] * z_s1 + h * z_s2 + pp[None, :] * z_s3, mask=tp_ok,
                                 other=0.0).to(tl.float32)
                    sig = 1.0 / (1.0 + tl.exp(-zv))
                    yp = tl.load(YPRE + o_off, mask=tp_ok, other=0.0)
                    _store_out(DZ + o_off, dy * yp * sig * (1.0 + zv * (1.0 - sig)), tp_ok)
                    dy = dy * zv * sig
                S = tl.load(STATES + (st_base + pp[:, None]) * N + nn[None, :], mask=pn_ok, other=0.0)  # in
                dS = tl.load(DSTATES + (st_base + pp[:, None]) * N + nn[None, :], mask=pn_ok, other=0.0)  # out
                # intra-chunk: y_i = sum_j L_ij C_i.B_j dt_j x_j
                dM = tl.dot(dy, tl.trans(x), input_precision=PREC)                             # (Q, Q)
                dx = tl.dot(tl.trans(LCB * dt[None, :]), dy, input_precision=PREC)             # (Q, BP)
                dCB = dM * Lm * dt[None, :]
                dC += tl.dot(dCB, Bm, input_precision=PREC)
                dB += tl.dot(tl.trans(dCB), Cm, input_precision=PREC)
                dMLCB = dM * LCB
                ddt += tl.sum(dMLCB, axis=0)
                # seg_ij = cs_i - cs_j = sum_{j < k <= i} dt_k a: d(dt_k a) += sum_{i >= k, j < k} dseg_ij
                dseg = dMLCB * dt[None, :]
                ddA += tl.sum(tl.where(causal, tl.cumsum(dseg, axis=1) - dseg, 0.0), axis=0)
                # carried state: y_i += exp(cs_i) C_i S^T
                dyS = tl.dot(dy, S, input_precision=PREC)                                      # (Q, BN)
                dC += w_in[:, None] * dyS
                dcs += w_in * tl.sum(dyS * Cm, axis=1)
                # chunk state: S_out = decay S + sum_j exp(cs_last - cs_j) dt_j x_j B_j^T
                BdS = tl.dot(Bm, tl.trans(dS), input_precision=PREC)                           # (Q, BP)
                xdS = tl.dot(x, dS, input_precision=PREC)                                      # (Q, BN)
                dx += (w_out * dt)[:, None] * BdS
                dB += (w_out * dt)[:, None] * xdS
                xdSB = tl.sum(xdS * Bm, axis=1)
                ddt += w_out * xdSB
                # cs_last - cs_j = sum_{k > j} dt_k a: d(dt_k a) += sum_{j < k} dwo_j
                dwo = w_out * dt * xdSB
                ddA += tl.cumsum(dwo, axis=0) - dwo
                dcs_last += decay * tl.sum(tl.sum(dS * S, axis=1), axis=0)
                if HAS_D:
                    Dv = tl.load(D + h * d_s0 + pp * d_s1, mask=p_ok, other=0.0).to(tl.float32)
                    dx += Dv[None, :] * dy
                    tl.store(DD + ((b * NC + c) * H + h) * P + pp, tl.sum(dy * x, axis=0), mask=p_ok)
                _store_out(DX + o_off, dx, tp_ok)
            # cs = cumsum(dt a): d(dt_k a) += sum_{i >= k} dcs_i, + dcs_last for every k
            ddA += tl.cumsum(dcs, axis=0, reverse=True) + dcs_last
            tl.store(DDT + (b * L + t) * H + h, ddt + a_h * ddA, mask=t_ok)
            tl.store(DA + (b * NC + c) * H + h, tl.sum(tl.where(t_ok, ddA * dt, 0.0), axis=0))
        tl.store(DB + bc_off, dB, mask=tn_ok)
        tl.store(DC + bc_off, dC, mask=tn_ok)

def _st(t, k):
    return (0,) * k if t is None else tuple(t.stride())[:k]


def _chunk(chunk_size, cap=64):
    c = 16
    while c * 2 <= min(int(chunk_size), cap):
        c *= 2
    return c


def _ssd_config(P, N, chunk_size, dtype):
    block_n = max(16, _next_pow2(N))
    block_p = max(16, min(_next_pow2(P), 32))
    chunk = _chunk(chunk_size, 64 if dtype != torch.float32 else 32)  # fp32 (IEEE dots): shared memory
    num_warps = 4 if block_n * max(block_p, chunk) <= 4096 else 8
    prec = "ieee" if dtype == torch.float32 else "tf32"
    return chunk, block_p, block_n, num_warps, prec


def ssd_scan_fwd(x, dt, A, B, C, D, z, init, reset, out, final, chunk_size, states=None, config=None):
    """Contract as the cpu backend's (ops/ssd.py): dt, A, B, C fp32 contiguous; final (b, h, p, n) fp32
    contiguous (always written). ``states`` (b, h, n_chunks, p, n) fp32 contiguous or None: where given, the
    state entering each chunk is stored there (the backward's recompute; ``config`` is then its tiling);
    ``out`` None: the output is not computed (the backward's recompute without z)."""
    assert x.dtype != torch.float64, "the triton backend does not support float64"
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    if b * H * P == 0:
        return
    chunk, block_p, block_n, num_warps, prec = config or _ssd_config(P, N, chunk_size, x.dtype)
    rst = None if reset is None else reset.to(torch.int64).contiguous()
    args = (x, dt, A, B, C, D, z, init, rst, out, final, states, *_st(x, 4), *_st(z, 4), *_st(out, 4),
            *_st(D, 2), *_st(init, 4), L, H, P, N, G, H // G)
    meta = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_INIT=init is not None, HAS_RESET=rst is not None,
                STORE_STATES=states is not None, STORE_OUT=out is not None, PREC=prec, CHUNK=chunk, BLOCK_P=block_p,
                BLOCK_N=block_n)
    _launch(_ssd_fwd_kernel, (b * H, triton.cdiv(P, block_p)), x.device, args, meta, num_warps)


# ----------------------------------------------------------------------------- backward fallback (PyTorch)
def chunked_torch(x, dt, A, B, C, D, z, init, reset, chunk):
    """The chunked SSD algorithm in PyTorch (fp32), differentiable: (out in fp32, final state).

    dt (b, l, h) processed, A (h,), B, C (b, l, g, n), D (h, p) or None, reset (b, l) or None."""
    f32 = torch.float32
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Q = int(chunk)
    nc = -(-L // Q)
    pad = nc * Q - L

    def padded(t):
        t = t.to(f32)
        if pad:
            t = torch.cat([t, t.new_zeros((b, pad, *t.shape[2:]))], dim=1)
        return t

    X = padded(x).view(b, nc, Q, h, p)
    DT = padded(dt).view(b, nc, Q, h)
    Bh = padded(B).repeat_interleave(h // g, dim=2).view(b, nc, Q, h, n)
    Ch = padded(C).repeat_interleave(h // g, dim=2).view(b, nc, Q, h, n)
    rf = torch.zeros(b, nc * Q, dtype=torch.int64, device=x.device)
    if reset is not None:
        rf[:, :L] = reset.to(torch.int64)
    r = torch.cumsum(rf.view(b, nc, Q), dim=2)                                     # (b, nc, Q)
    r_last = r[:, :, -1]
    cs = torch.cumsum(DT * A.to(f32), dim=2)                                       # (b, nc, Q, h)
    cs_last = cs[:, :, -1]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    mask = (causal & (r[:, :, :, None] == r[:, :, None, :]))[..., None]            # (b, nc, Qi, Qj, 1)
    seg = cs[:, :, :, None, :] - cs[:, :, None, :, :]
    Lm = torch.where(mask, torch.exp(torch.where(mask, seg, torch.zeros_like(seg))), torch.zeros_like(seg))
    CB = torch.einsum("bcihn,bcjhn->bcijh", Ch, Bh)
    y = torch.einsum("bcijh,bcjh,bcjhp->bcihp", CB * Lm, DT, X)
    w = torch.where((r == r_last[..., None])[..., None], torch.exp(cs_last[:, :, None] - cs), torch.zeros_like(cs))
    states = torch.einsum("bcjh,bcjhp,bcjhn->bchpn", w * DT, X, Bh)
    decay = torch.exp(cs_last) * (r_last == 0)[..., None].to(f32)                 # (b, nc, h)
    S = init.to(f32) if init is not None else x.new_zeros((b, h, p, n), dtype=f32)
    prev = []
    for c in range(nc):
        prev.append(S)
        S = decay[:, c, :, None, None] * S + states[:, c]
    Sp = torch.stack(prev, dim=1)                                                  # (b, nc, h, p, n)
    w_in = torch.where((r == 0)[..., None], torch.exp(cs), torch.zeros_like(cs))
    y = y + torch.einsum("bcihn,bchpn->bcihp", Ch, Sp) * w_in[..., None]
    y = y.reshape(b, nc * Q, h, p)[:, :L]
    if D is not None:
        y = y + x.to(f32) * D.to(f32)
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(f32))
    return y, S


def ssd_scan_bwd_torch(dout, dfinal, x, dt, A, B, C, D, z, init, reset, chunk_size):
    """[dx, ddt, dA, dB, dC, dD, dz, dinit] (None for absent inputs), by autograd through chunked_torch (the
    fallback, ``SSD_BWD = "torch"``)."""
    ins = [x, dt, A, B, C, D, z, init]
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in ins]
    with torch.enable_grad():
        y, S = chunked_torch(*leaves, reset, _chunk(chunk_size, 64))
        outs, gouts = [y], [dout.to(y.dtype)]
        if dfinal is not None:
            outs.append(S)
            gouts.append(dfinal.to(S.dtype))
        used = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(outs, used, gouts, allow_unused=True)
    it = iter(grads)
    res = []
    for t in leaves:
        if t is None:
            res.append(None)
        else:
            gr = next(it)
            res.append(torch.zeros_like(t) if gr is None else gr.to(t.dtype))
    return res


# ----------------------------------------------------------------------------- backward (Triton)
# The backward of the triton ssd_scan: "triton" (the kernels below) or "torch" (autograd through
# chunked_torch; tests set this to compare the two).
SSD_BWD = "triton"


_DSTATES_WARPS = 4  # the state-gradient recurrence: one (BLOCK_P x CHUNK) x (CHUNK x BLOCK_N) product a chunk


def _ssd_bwd_config(P, N, chunk_size, dtype):
    """(CHUNK, BLOCK_P, BLOCK_N, num_warps, precision) of the backward: CHUNK <= 32 (it holds six
    CHUNK x CHUNK and six CHUNK x BLOCK_N fp32 tiles)."""
    block_n = max(16, _next_pow2(N))
    block_p = max(16, min(_next_pow2(P), 32))
    chunk = _chunk(chunk_size, 32)
    num_warps = 4 if block_n * max(block_p, chunk) <= 2048 else 8
    prec = "ieee" if dtype == torch.float32 else "tf32"
    return chunk, block_p, block_n, num_warps, prec


def _scratch(shape, dtype, device):
    """Every buffer of the backward (outputs and scratch); the tests poison them (NaN fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


def ssd_scan_bwd(dout, dfinal, x, dt, A, B, C, D, z, init, reset, chunk_size):
    """[dx, ddt, dA, dB, dC, dD, dz, dinit] (None for absent inputs): gradients of the Function's inputs
    (dt the processed fp32 dt; D the (h, p) view; dt_bias / softplus / dt_limit / D (h,) are differentiated
    by autograd outside, in ops/ssd.py).

    Three Triton launches (module docstring): the forward kernel again (``STORE_STATES``), the reverse
    state-gradient recurrence, the chunk-parallel gradients; then PyTorch sums the fp32 per-chunk partials
    of dA (b, n_chunks, h) and dD (b, n_chunks, h, p).
    """
    if SSD_BWD == "torch":
        return ssd_scan_bwd_torch(dout, dfinal, x, dt, A, B, C, D, z, init, reset, chunk_size)
    assert x.dtype != torch.float64, "the triton backend does not support float64"
    f32, dev = torch.float32, x.device
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    cfg = _ssd_bwd_config(P, N, chunk_size, x.dtype)
    chunk, block_p, block_n, num_warps, prec = cfg
    nc, npb = triton.cdiv(L, chunk), triton.cdiv(P, block_p)
    states = _scratch((b, H, nc, P, N), f32, dev)
    ypre = None if z is None else _scratch((b, L, H, P), f32, dev)  # the output before the z gate
    final = _scratch((b, H, P, N), f32, dev)
    ssd_scan_fwd(x, dt, A, B, C, D, None, init, reset, ypre, final, chunk_size, states=states, config=cfg)
    dstates = _scratch((b, H, nc, P, N), f32, dev)
    dinit = None if init is None else _scratch((b, H, P, N), f32, dev)
    dfin = None if dfinal is None else dfinal.to(f32).contiguous()
    rst = None if reset is None else reset.to(torch.int64).contiguous()
    args = (dt, A, C, z, dout, rst, dfin, dstates, dinit, *_st(z, 4), *_st(dout, 4), L, H, P, N, G, H // G)
    meta = dict(HAS_Z=z is not None, HAS_DFINAL=dfin is not None, HAS_INIT=init is not None,
                HAS_RESET=rst is not None, PREC=prec, CHUNK=chunk, BLOCK_P=block_p, BLOCK_N=block_n)
    _launch(_ssd_bwd_dstates_kernel, (b * H, npb), dev, args, meta, _DSTATES_WARPS)
    dx = _scratch((b, L, H, P), x.dtype, dev)
    dz = None if z is None else _scratch((b, L, H, P), z.dtype, dev)
    ddt = _scratch((b, L, H), f32, dev)
    dB = _scratch((b, L, G, N), f32, dev)
    dC = _scratch((b, L, G, N), f32, dev)
    dA_p = _scratch((b, nc, H), f32, dev)
    dD_p = None if D is None else _scratch((b, nc, H, P), f32, dev)
    args = (x, dt, A, B, C, D, z, dout, ypre, states, dstates, rst, dx, dz, ddt, dB, dC, dD_p, dA_p,
            *_st(x, 4), *_st(z, 4), *_st(dout, 4), *_st(D, 2), L, H, P, N, G, H // G)
    meta = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_RESET=rst is not None, PREC=prec, CHUNK=chunk,
                BLOCK_P=block_p, BLOCK_N=block_n)
    _launch(_ssd_bwd_chunk_kernel, (b * nc, G), dev, args, meta, num_warps)
    return [dx, ddt, dA_p.sum((0, 1)).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if D is None else dD_p.sum((0, 1)).to(D.dtype), dz, None if init is None else dinit.to(init.dtype)]


from .triton import _launch, _next_pow2  # noqa: E402,F401
if IMPORT_ERROR is None:
    from .triton import _store_out  # noqa: E402,F401


# ----------------------------------------------------------------------------- ahead-of-time compile
_SSD_ARGS = ("X", "DT", "A", "B", "C", "D", "Z", "INIT", "RESET", "OUT", "FINAL", "STATES",
             "x_s0", "x_s1", "x_s2", "x_s3", "z_s0", "z_s1", "z_s2", "z_s3", "o_s0", "o_s1", "o_s2", "o_s3",
             "d_s0", "d_s1", "i_s0", "i_s1", "i_s2", "i_s3", "L", "H", "P", "N", "G", "heads_per_group")


def _ssd_variant(xdt, batch, L, H, P, N, G, chunk_size=256, opts=True, states=False, out=True):
    """``states``: the backward's recompute (STORE_STATES, no z, the backward's tiling; ``out``: the fp32
    output before the z gate stored, as when the scan has a z)."""
    chunk, bp, bn, nw, prec = (_ssd_bwd_config if states else _ssd_config)(P, N, chunk_size, xdt)
    f32 = torch.float32
    tensors = dict(X=xdt, DT=f32, A=f32, B=f32, C=f32, D=f32 if opts else None,
                   Z=xdt if opts and not states else None, INIT=f32 if opts else None,
                   RESET=torch.int64 if opts else None, OUT=(f32 if states else xdt) if out else None, FINAL=f32,
                   STATES=f32 if states else None)
    xs = dict(zip(("s0", "s1", "s2", "s3"), (L * H * P, H * P, P, 1)))
    ints = {**{f"x_{k}": v for k, v in xs.items()}, **{f"z_{k}": v for k, v in xs.items()},
            **{f"o_{k}": v for k, v in xs.items()}, "d_s0": 1, "d_s1": 0,
            "i_s0": H * P * N, "i_s1": P * N, "i_s2": N, "i_s3": 1, "L": L, "H": H, "P": P, "N": N, "G": G,
            "heads_per_group": H // G}
    meta = dict(HAS_D=opts, HAS_Z=opts and not states, HAS_INIT=opts, HAS_RESET=opts, STORE_STATES=states,
                STORE_OUT=out, PREC=prec, CHUNK=chunk, BLOCK_P=bp, BLOCK_N=bn)
    what = (f"ssd_fwd x={str(xdt)[6:]} batch={batch} L={L} H={H} P={P} N={N} G={G} opts={opts} "
            f"states={states} out={out} CHUNK={chunk} BLOCK={bp}x{bn} {prec} warps={nw}"
            + (" novec" if P * 2 < 16 else ""))
    return "ssd_fwd", _SSD_ARGS, tensors, ints, meta, nw, what


_SSD_DSTATES_ARGS = ("DT", "A", "C", "Z", "DOUT", "RESET", "DFINAL", "DSTATES", "DINIT",
                     "z_s0", "z_s1", "z_s2", "z_s3", "g_s0", "g_s1", "g_s2", "g_s3", "L", "H", "P", "N", "G",
                     "heads_per_group")
_SSD_CHUNK_ARGS = ("X", "DT", "A", "B", "C", "D", "Z", "DOUT", "YPRE", "STATES", "DSTATES", "RESET",
                   "DX", "DZ", "DDT", "DB", "DC", "DD", "DA",
                   "x_s0", "x_s1", "x_s2", "x_s3", "z_s0", "z_s1", "z_s2", "z_s3", "g_s0", "g_s1", "g_s2", "g_s3",
                   "d_s0", "d_s1", "L", "H", "P", "N", "G", "heads_per_group")


def _ssd_bwd_variants(xdt, batch, L, H, P, N, G, chunk_size=256, opts=True):
    """The backward's two kernels (its forward recompute is an ``_ssd_variant(states=True)``)."""
    chunk, bp, bn, nw, prec = _ssd_bwd_config(P, N, chunk_size, xdt)
    f32, o = torch.float32, (lambda d: d if opts else None)  # noqa: E731
    xs = (L * H * P, H * P, P, 1)
    ints = {**{f"{a}_s{i}": v for a in "xzg" for i, v in enumerate(xs)}, "d_s0": 1, "d_s1": 0,
            "L": L, "H": H, "P": P, "N": N, "G": G, "heads_per_group": H // G}
    shape = (f"x={str(xdt)[6:]} batch={batch} L={L} H={H} P={P} N={N} G={G} opts={opts} CHUNK={chunk} "
             f"BLOCK={bp}x{bn} {prec}")
    novec = " novec" if P * 2 < 16 else ""
    t_s = dict(DT=f32, A=f32, C=f32, Z=o(xdt), DOUT=xdt, RESET=o(torch.int64), DFINAL=o(f32), DSTATES=f32,
               DINIT=o(f32))
    m_s = dict(HAS_Z=opts, HAS_DFINAL=opts, HAS_INIT=opts, HAS_RESET=opts, PREC=prec, CHUNK=chunk, BLOCK_P=bp,
               BLOCK_N=bn)
    t_c = dict(X=xdt, DT=f32, A=f32, B=f32, C=f32, D=o(f32), Z=o(xdt), DOUT=xdt, YPRE=o(f32), STATES=f32,
               DSTATES=f32, RESET=o(torch.int64), DX=xdt, DZ=o(xdt), DDT=f32, DB=f32, DC=f32, DD=o(f32), DA=f32)
    m_c = dict(HAS_D=opts, HAS_Z=opts, HAS_RESET=opts, PREC=prec, CHUNK=chunk, BLOCK_P=bp, BLOCK_N=bn)
    return [("ssd_bwd_dstates", _SSD_DSTATES_ARGS, t_s, ints, m_s, _DSTATES_WARPS,
             f"ssd_bwd_dstates {shape} warps={_DSTATES_WARPS}{novec}"),
            ("ssd_bwd_chunk", _SSD_CHUNK_ARGS, t_c, ints, m_c, nw, f"ssd_bwd_chunk {shape} warps={nw}{novec}")]


def aot_variants(full=False):
    """Representative launches of the ssd_scan kernels (format of ``triton._aot_variants``): the forward,
    the backward's recompute of the forward (STORE_STATES) and the backward, each flag on and off."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    return [_ssd_variant(bf16, 8, 4096, 32, 64, 128, 1),           # Mamba-2 2.7B-like, the GPU table row
            _ssd_variant(f32, 2, 2048, 24, 64, 128, 8),                # the cpu benchmark's shape, fp32
            _ssd_variant(f16, 1, 1000, 8, 3, 7, 8, chunk_size=16, opts=False),  # tiny head: flags off
            _ssd_variant(bf16, 8, 4096, 32, 64, 128, 1, states=True),  # the backward's recompute (with z)
            _ssd_variant(f32, 2, 2048, 24, 64, 128, 8, states=True, out=False),  # (without z)
            *_ssd_bwd_variants(bf16, 8, 4096, 32, 64, 128, 1),
            *_ssd_bwd_variants(f32, 2, 2048, 24, 64, 128, 8),
            *_ssd_bwd_variants(f16, 1, 1000, 8, 3, 7, 8, chunk_size=16, opts=False)]


AOT_KERNELS = {} if IMPORT_ERROR is not None else {"ssd_fwd": _ssd_fwd_kernel,
                                                  "ssd_bwd_dstates": _ssd_bwd_dstates_kernel,
                                                  "ssd_bwd_chunk": _ssd_bwd_chunk_kernel}
