"""Triton backend: the HybridNorm kernels (see backends/__init__.py for the contract).

``head_norm_rope_*``: per-head RMSNorm over head_dim followed by rotate-half RoPE,
forward and backward, on ``(B, T, H, D)`` tensors with any strides on the first
three dims (q, k, v are views into one fused projection output). Rows are the
``B*T*H`` heads, numbered in (b, t, h) order; a program takes a tile of
``BLOCK_H`` heads and recovers (b, t, h) of each from its row number with the
sizes passed in, so no copy is made for a strided view. Each head is loaded as
its two halves, two ``[BLOCK_H, BLOCK_D2]`` tiles, so the rotation pairs element
i of one tile with element i of the other: no shuffles. The norm and the
rotation are two constexpr flags of one kernel (weight None: no norm; cos None:
no rotation).

The backward runs P = ``head_norm_rope_bwd_parts`` programs; program p owns a
contiguous group of rows and writes row p of dw_part (zeros for an empty group).

``swiglu_*``: elementwise on ``(M, F)`` tiles with row strides (gate and up are
usually the two halves of one fused ``(M, 2F)`` tensor), sigmoid as
``1 / (1 + exp(-g))`` in fp32 (exp overflows to inf for very negative g, giving
the right 0).

As in ``triton.py``: every load is upcast to fp32 at once and every output is
rounded once with ``_store_out``.
"""
import torch

from . import sm_count

from ._triton_import import IMPORT_ERROR, tl, triton

# Target elements (whole heads) per program for head_norm_rope, and its cap on heads per tile.
HEAD_TILE = 2048
MAX_BLOCK_H = 64
# swiglu tiles: target elements per program and the widest column block.
SWIGLU_TILE = 4096
SWIGLU_MAX_BLOCK_F = 1024
SWIGLU_MIN_BLOCK_F = 256


def _cdiv(a, b):
    return -(-a // b)


def _head_fwd_config(rows, half, min_programs):
    """(BLOCK_H, BLOCK_D2, num_warps) of the head_norm_rope forward."""
    block_d2 = _next_pow2(half)
    block_h = max(1, min(MAX_BLOCK_H, HEAD_TILE // (2 * block_d2), _next_pow2(rows)))
    while block_h > 1 and _cdiv(rows, block_h) < min_programs:  # keep enough programs to fill the GPU
        block_h //= 2
    return block_h, block_d2, _num_warps(2 * block_h * block_d2)


def _head_bwd_config(rows, half, P):
    """(BLOCK_H, BLOCK_D2, num_warps, rows_per_prog) of the head_norm_rope backward."""
    block_d2 = _next_pow2(half)
    rows_per_prog = _cdiv(rows, P) if rows > 0 else 0
    block_h = max(1, min(MAX_BLOCK_H, HEAD_TILE // (2 * block_d2), _next_pow2(rows_per_prog)))
    # Groups of whole tiles: the same number of tiles per program, and only the last group's last tile is partial.
    rows_per_prog = _cdiv(rows_per_prog, block_h) * block_h
    return block_h, block_d2, _num_warps(2 * block_h * block_d2), rows_per_prog


def _swiglu_config(M, F, min_programs):
    """(BLOCK_M, BLOCK_F, num_warps) of the swiglu kernels."""
    block_f = min(SWIGLU_MAX_BLOCK_F, _next_pow2(F))
    block_m = max(1, min(SWIGLU_TILE // block_f, _next_pow2(M)))
    while block_m > 1 and _cdiv(M, block_m) * _cdiv(F, block_f) < min_programs:
        block_m //= 2
    while block_f > SWIGLU_MIN_BLOCK_F and _cdiv(M, block_m) * _cdiv(F, block_f) < min_programs:
        block_f //= 2
    return block_m, block_f, _num_warps(block_m * block_f)


if IMPORT_ERROR is None:

    @triton.jit
    def _head_offsets(r, T, H, OFF, stride_b, stride_t, stride_h, row_ok, HAS_ROPE: tl.constexpr):
        """Element offset of the heads `r` (row numbers in (b, t, h) order) in a tensor of the given strides,
        and their RoPE positions offsets[b] + t (0 without RoPE)."""
        h = r % H
        bt = r // H
        t = bt % T
        b = bt // T
        off = (tl.cast(b, tl.int64) * stride_b + tl.cast(t, tl.int64) * stride_t
               + tl.cast(h, tl.int64) * stride_h)
        if HAS_ROPE:
            pos = tl.load(OFF + b, mask=row_ok, other=0) + tl.cast(t, tl.int64)
        else:
            pos = tl.cast(t, tl.int64)
        return off, pos

    @triton.jit
    def _head_norm_rope_fwd_kernel(X, W, OUT, COS, SIN, OFF,
                                   stride_xb, stride_xt, stride_xh, stride_ob, stride_ot, stride_oh, stride_cs,
                                   rows, T, H, HALF, eps,
                                   HAS_W: tl.constexpr, HAS_ROPE: tl.constexpr,
                                   BLOCK_H: tl.constexpr, BLOCK_D2: tl.constexpr):
        r = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
        row_ok = r < rows
        cols = tl.arange(0, BLOCK_D2)
        col_ok = cols < HALF
        mask = row_ok[:, None] & col_ok[None, :]
        x_off, pos = _head_offsets(r, T, H, OFF, stride_xb, stride_xt, stride_xh, row_ok, HAS_ROPE)
        x_ptr = X + x_off[:, None] + cols[None, :]
        n1 = tl.cast(tl.load(x_ptr, mask=mask, other=0.0), tl.float32)
        n2 = tl.cast(tl.load(x_ptr + HALF, mask=mask, other=0.0), tl.float32)
        if HAS_W:
            rstd = tl.rsqrt(tl.sum(n1 * n1 + n2 * n2, axis=1) / (2 * HALF) + tl.cast(eps, tl.float32))
            w1 = tl.cast(tl.load(W + cols, mask=col_ok, other=0.0), tl.float32)
            w2 = tl.cast(tl.load(W + HALF + cols, mask=col_ok, other=0.0), tl.float32)
            n1 = n1 * rstd[:, None] * w1[None, :]
            n2 = n2 * rstd[:, None] * w2[None, :]
        if HAS_ROPE:
            cs_off = pos[:, None] * stride_cs + cols[None, :]
            c = tl.load(COS + cs_off, mask=mask, other=0.0)
            s = tl.load(SIN + cs_off, mask=mask, other=0.0)
            o1 = n1 * c - n2 * s
            o2 = n2 * c + n1 * s
        else:
            o1 = n1
            o2 = n2
        o_off, pos = _head_offsets(r, T, H, OFF, stride_ob, stride_ot, stride_oh, row_ok, False)
        o_ptr = OUT + o_off[:, None] + cols[None, :]
        _store_out(o_ptr, o1, mask)
        _store_out(o_ptr + HALF, o2, mask)

    @triton.jit
    def _head_norm_rope_bwd_kernel(DOUT, X, W, COS, SIN, OFF, DX, DW,
                                   stride_gb, stride_gt, stride_gh, stride_xb, stride_xt, stride_xh,
                                   stride_db, stride_dt, stride_dh, stride_cs, stride_dw,
                                   rows, T, H, HALF, rows_per_prog, eps,
                                   HAS_W: tl.constexpr, HAS_ROPE: tl.constexpr,
                                   BLOCK_H: tl.constexpr, BLOCK_D2: tl.constexpr):
        pid = tl.program_id(0)
        row_start = pid * rows_per_prog
        row_end = tl.minimum(row_start + rows_per_prog, rows)
        cols = tl.arange(0, BLOCK_D2)
        col_ok = cols < HALF
        eps32 = tl.cast(eps, tl.float32)
        if HAS_W:
            w1 = tl.cast(tl.load(W + cols, mask=col_ok, other=0.0), tl.float32)
            w2 = tl.cast(tl.load(W + HALF + cols, mask=col_ok, other=0.0), tl.float32)
        dw1 = tl.zeros([BLOCK_D2], dtype=tl.float32)
        dw2 = tl.zeros([BLOCK_D2], dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_H):
            r = r0 + tl.arange(0, BLOCK_H)
            row_ok = r < row_end
            mask = row_ok[:, None] & col_ok[None, :]
            g_off, pos = _head_offsets(r, T, H, OFF, stride_gb, stride_gt, stride_gh, row_ok, HAS_ROPE)
            g_ptr = DOUT + g_off[:, None] + cols[None, :]
            g1 = tl.cast(tl.load(g_ptr, mask=mask, other=0.0), tl.float32)
            g2 = tl.cast(tl.load(g_ptr + HALF, mask=mask, other=0.0), tl.float32)
            if HAS_ROPE:  # rotate the gradient back (the transpose of the rotation)
                cs_off = pos[:, None] * stride_cs + cols[None, :]
                c = tl.load(COS + cs_off, mask=mask, other=0.0)
                s = tl.load(SIN + cs_off, mask=mask, other=0.0)
                d1 = g1 * c + g2 * s
                d2 = g2 * c - g1 * s
                g1 = d1
                g2 = d2
            if HAS_W:
                x_off, pos = _head_offsets(r, T, H, OFF, stride_xb, stride_xt, stride_xh, row_ok, False)
                x_ptr = X + x_off[:, None] + cols[None, :]
                x1 = tl.cast(tl.load(x_ptr, mask=mask, other=0.0), tl.float32)
                x2 = tl.cast(tl.load(x_ptr + HALF, mask=mask, other=0.0), tl.float32)
                rstd = tl.rsqrt(tl.sum(x1 * x1 + x2 * x2, axis=1) / (2 * HALF) + eps32)
                xh1 = x1 * rstd[:, None]
                xh2 = x2 * rstd[:, None]
                dw1 += tl.sum(g1 * xh1, axis=0)
                dw2 += tl.sum(g2 * xh2, axis=0)
                dn1 = g1 * w1[None, :]
                dn2 = g2 * w2[None, :]
                mean_dn_xh = tl.sum(dn1 * xh1 + dn2 * xh2, axis=1) / (2 * HALF)
                g1 = (dn1 - xh1 * mean_dn_xh[:, None]) * rstd[:, None]
                g2 = (dn2 - xh2 * mean_dn_xh[:, None]) * rstd[:, None]
            dx_off, pos = _head_offsets(r, T, H, OFF, stride_db, stride_dt, stride_dh, row_ok, False)
            dx_ptr = DX + dx_off[:, None] + cols[None, :]
            _store_out(dx_ptr, g1, mask)
            _store_out(dx_ptr + HALF, g2, mask)
        if HAS_W:
            dw_row = DW + tl.cast(pid, tl.int64) * stride_dw
            tl.store(dw_row + cols, dw1, mask=col_ok)
            tl.store(dw_row + HALF + cols, dw2, mask=col_ok)

    @triton.jit
    def _swiglu_fwd_kernel(G, U, O, stride_g, stride_u, stride_o, M, F,
                           BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
        rows = tl.cast(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.int64)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (rows < M)[:, None] & (cols < F)[None, :]
        g = tl.cast(tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0), tl.float32)
        u = tl.cast(tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0), tl.float32)
        s = 1.0 / (1.0 + tl.exp(-g))
        _store_out(O + rows[:, None] * stride_o + cols[None, :], g * s * u, mask)

    @triton.jit
    def _swiglu_bwd_kernel(DO, G, U, DG, DU, stride_do, stride_g, stride_u, stride_dg, stride_du, M, F,
                           BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
        rows = tl.cast(tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.int64)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        mask = (rows < M)[:, None] & (cols < F)[None, :]
        do = tl.cast(tl.load(DO + rows[:, None] * stride_do + cols[None, :], mask=mask, other=0.0), tl.float32)
        g = tl.cast(tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0), tl.float32)
        u = tl.cast(tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0), tl.float32)
        s = 1.0 / (1.0 + tl.exp(-g))
        _store_out(DG + rows[:, None] * stride_dg + cols[None, :], do * u * s * (1.0 + g * (1.0 - s)), mask)
        _store_out(DU + rows[:, None] * stride_du + cols[None, :], do * (g * s), mask)


# ----------------------------------------------------------------------------- launches
def _check_dtype(x):
    assert x.dtype != torch.float64, "the triton backend does not support float64"


def head_norm_rope_fwd(x, weight, out, cos, sin, offsets, eps):
    _check_dtype(x)
    B, T, H, D = x.shape
    rows, half = B * T * H, D // 2
    if rows == 0 or D == 0:
        return
    has_rope = cos is not None
    min_programs = 2 * sm_count(x.device) if x.device.type == "cuda" else 1
    block_h, block_d2, num_warps = _head_fwd_config(rows, half, min_programs)
    args = (x, weight, out, cos, sin, offsets if has_rope else None,
            x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
            cos.stride(0) if has_rope else 0, rows, T, H, half, float(eps))
    meta = dict(HAS_W=weight is not None, HAS_ROPE=has_rope, BLOCK_H=block_h, BLOCK_D2=block_d2)
    _launch(_head_norm_rope_fwd_kernel, (triton.cdiv(rows, block_h),), x.device, args, meta, num_warps)


def head_norm_rope_bwd_parts(rows, D, device):
    device = torch.device(device)
    if device.type == "cuda":
        return max(1, min(rows, 4 * sm_count(device)))
    return max(1, min(rows, 4))


def head_norm_rope_bwd(dout, x, weight, cos, sin, offsets, eps, dx, dw_part):
    _check_dtype(x)
    B, T, H, D = x.shape
    rows, half = B * T * H, D // 2
    if D == 0:
        return
    if weight is None:
        if rows == 0:
            return
        P = head_norm_rope_bwd_parts(rows, D, x.device)
    else:
        P = dw_part.shape[0]  # every row is written, zeros where a program has no rows (rows == 0 included)
        if P == 0:
            return
    has_rope = cos is not None
    block_h, block_d2, num_warps, rows_per_prog = _head_bwd_config(rows, half, P)
    args = (dout, x, weight, cos, sin, offsets if has_rope else None, dx, dw_part,
            dout.stride(0), dout.stride(1), dout.stride(2), x.stride(0), x.stride(1), x.stride(2),
            dx.stride(0), dx.stride(1), dx.stride(2), cos.stride(0) if has_rope else 0,
            dw_part.stride(0) if dw_part is not None else 0, rows, T, H, half, rows_per_prog, float(eps))
    meta = dict(HAS_W=weight is not None, HAS_ROPE=has_rope, BLOCK_H=block_h, BLOCK_D2=block_d2)
    _launch(_head_norm_rope_bwd_kernel, (P,), x.device, args, meta, num_warps)


def swiglu_fwd(gate, up, out):
    _check_dtype(gate)
    M, F = gate.shape
    if M == 0 or F == 0:
        return
    min_programs = 2 * sm_count(gate.device) if gate.device.type == "cuda" else 1
    block_m, block_f, num_warps = _swiglu_config(M, F, min_programs)
    grid = (triton.cdiv(M, block_m), triton.cdiv(F, block_f))
    args = (gate, up, out, gate.stride(0), up.stride(0), out.stride(0), M, F)
    _launch(_swiglu_fwd_kernel, grid, gate.device, args, dict(BLOCK_M=block_m, BLOCK_F=block_f), num_warps)


def swiglu_bwd(dout, gate, up, dgate, dup):
    _check_dtype(gate)
    M, F = gate.shape
    if M == 0 or F == 0:
        return
    min_programs = 2 * sm_count(gate.device) if gate.device.type == "cuda" else 1
    block_m, block_f, num_warps = _swiglu_config(M, F, min_programs)
    grid = (triton.cdiv(M, block_m), triton.cdiv(F, block_f))
    args = (dout, gate, up, dgate, dup, dout.stride(0), gate.stride(0), up.stride(0), dgate.stride(0),
            dup.stride(0), M, F)
    _launch(_swiglu_bwd_kernel, grid, gate.device, args, dict(BLOCK_M=block_m, BLOCK_F=block_f), num_warps)


# ----------------------------------------------------------------------------- ahead-of-time compile
_HEAD_FWD_ARGS = ("X", "W", "OUT", "COS", "SIN", "OFF", "stride_xb", "stride_xt", "stride_xh", "stride_ob",
                  "stride_ot", "stride_oh", "stride_cs", "rows", "T", "H", "HALF", "eps")
_HEAD_BWD_ARGS = ("DOUT", "X", "W", "COS", "SIN", "OFF", "DX", "DW", "stride_gb", "stride_gt", "stride_gh",
                  "stride_xb", "stride_xt", "stride_xh", "stride_db", "stride_dt", "stride_dh", "stride_cs",
                  "stride_dw", "rows", "T", "H", "HALF", "rows_per_prog", "eps")
_SWIGLU_FWD_ARGS = ("G", "U", "O", "stride_g", "stride_u", "stride_o", "M", "F")
_SWIGLU_BWD_ARGS = ("DO", "G", "U", "DG", "DU", "stride_do", "stride_g", "stride_u", "stride_dg", "stride_du",
                    "M", "F")
_AOT_SMS = 132  # H100 SXM, for the launch configurations


def _vec(tile_elems, num_warps, dt):
    """' novec' where a thread holds under 16 bytes of a tile row (decode, tiny head_dim): no 128-bit loads."""
    return "" if tile_elems // (32 * num_warps) * dt.itemsize >= 16 else " novec"


def _head_fwd_variant(dt, B, T, H, D, w, rope):
    bh, bd2, nw = _head_fwd_config(B * T * H, D // 2, 2 * _AOT_SMS)
    f32 = torch.float32
    tensors = dict(X=dt, W=w, OUT=dt, COS=f32 if rope else None, SIN=f32 if rope else None,
                   OFF=torch.int64 if rope else None)
    meta = dict(HAS_W=w is not None, HAS_ROPE=rope, BLOCK_H=bh, BLOCK_D2=bd2)
    flags = ",".join(k for k in ("HAS_W", "HAS_ROPE") if meta[k])
    what = (f"head_norm_rope_fwd {str(dt)[6:]} B={B} T={T} H={H} D={D} w={str(w)[6:]} [{flags}] "
            f"BLOCK={bh}x2x{bd2} warps={nw}{_vec(bh * bd2, nw, dt)}")
    return "head_norm_rope_fwd", _HEAD_FWD_ARGS, tensors, dict(rows=B * T * H, T=T, H=H, HALF=D // 2), meta, nw, what


def _head_bwd_variant(dt, B, T, H, D, w, rope):
    rows = B * T * H
    bh, bd2, nw, rows_per_prog = _head_bwd_config(rows, D // 2, min(rows, 4 * _AOT_SMS))
    f32 = torch.float32
    tensors = dict(DOUT=dt, X=dt, W=w, COS=f32 if rope else None, SIN=f32 if rope else None,
                   OFF=torch.int64 if rope else None, DX=dt, DW=f32 if w is not None else None)
    meta = dict(HAS_W=w is not None, HAS_ROPE=rope, BLOCK_H=bh, BLOCK_D2=bd2)
    flags = ",".join(k for k in ("HAS_W", "HAS_ROPE") if meta[k])
    what = (f"head_norm_rope_bwd {str(dt)[6:]} B={B} T={T} H={H} D={D} w={str(w)[6:]} [{flags}] "
            f"BLOCK={bh}x2x{bd2} warps={nw}{_vec(bh * bd2, nw, dt)}")
    ints = dict(rows=rows, T=T, H=H, HALF=D // 2, rows_per_prog=rows_per_prog)
    return "head_norm_rope_bwd", _HEAD_BWD_ARGS, tensors, ints, meta, nw, what


def _swiglu_variant(bwd, dt, M, F):
    bm, bf, nw = _swiglu_config(M, F, 2 * _AOT_SMS)
    if bwd:
        kind, names, tensors = "swiglu_bwd", _SWIGLU_BWD_ARGS, dict(DO=dt, G=dt, U=dt, DG=dt, DU=dt)
    else:
        kind, names, tensors = "swiglu_fwd", _SWIGLU_FWD_ARGS, dict(G=dt, U=dt, O=dt)
    what = f"{kind} {str(dt)[6:]} M={M} F={F} BLOCK={bm}x{bf} warps={nw}{_vec(bm * bf, nw, dt)}"
    return kind, names, tensors, dict(M=M, F=F), dict(BLOCK_M=bm, BLOCK_F=bf), nw, what


def aot_variants(full=False):
    """Representative launches of the HybridNorm kernels, in the format of ``triton._aot_variants``:
    ``(kind, arg_names, tensors, ints, meta, num_warps, description)``; ``kind`` names the kernel in
    ``AOT_KERNELS``. Both flags on and off, every dtype, head_dim 128 / 96 / 64 / 256 / 2, a decode
    shape (T = 1), with the block sizes and warps the launchers would choose on an H100. Descriptions of launches
whose tiles are too small for 128-bit loads end in ``novec``.

    ``full``: every flag combination x dtype x head_dim.
    """
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    if full:
        out = []
        for dt in (f32, f16, bf16):
            for B, T, H, D in ((2, 1024, 32, 128), (2, 1024, 24, 96), (4, 1, 8, 64), (1, 512, 16, 256),
                               (1, 64, 4, 2)):
                for w, rope in ((dt, True), (None, True), (f32, False), (None, False)):
                    out.append(_head_fwd_variant(dt, B, T, H, D, w, rope))
                    out.append(_head_bwd_variant(dt, B, T, H, D, w, rope))
            for M, F in ((4096, 14336), (1, 11008), (37, 96)):
                out.append(_swiglu_variant(False, dt, M, F))
                out.append(_swiglu_variant(True, dt, M, F))
        return out
    return [
        _head_fwd_variant(bf16, 2, 1024, 32, 128, bf16, True),
        _head_fwd_variant(f16, 2, 1024, 24, 96, None, True),
        _head_fwd_variant(f32, 4, 1, 8, 64, f32, False),
        _head_fwd_variant(bf16, 1, 512, 16, 256, f32, True),
        _head_fwd_variant(bf16, 1, 64, 4, 2, bf16, True),
        _head_bwd_variant(bf16, 2, 1024, 32, 128, bf16, True),
        _head_bwd_variant(f16, 2, 1024, 24, 96, None, True),
        _head_bwd_variant(f32, 4, 1, 8, 64, f32, False),
        _head_bwd_variant(bf16, 1, 512, 16, 256, f32, True),
        _swiglu_variant(False, bf16, 4096, 14336),
        _swiglu_variant(False, f16, 1, 11008),
        _swiglu_variant(False, f32, 37, 96),
        _swiglu_variant(True, bf16, 4096, 14336),
        _swiglu_variant(True, f16, 1, 11008),
        _swiglu_variant(True, f32, 37, 96),
    ]


# Kernel of each AOT ``kind`` (empty without triton).
AOT_KERNELS = {} if IMPORT_ERROR is not None else {
    "head_norm_rope_fwd": _head_norm_rope_fwd_kernel,
    "head_norm_rope_bwd": _head_norm_rope_bwd_kernel,
    "swiglu_fwd": _swiglu_fwd_kernel,
    "swiglu_bwd": _swiglu_bwd_kernel,
}


# The shared helpers of the Triton backend, imported last on purpose: ``triton.py`` imports this module at its
# end, so whichever of the two is imported first, each finds the other's names already defined.
# The kernels above look ``_store_out`` up when they are compiled, not when they are defined.
from .triton import _OPTIONS, _launch, _next_pow2, _num_warps  # noqa: E402,F401
if IMPORT_ERROR is None:
    from .triton import _store_out  # noqa: E402,F401
