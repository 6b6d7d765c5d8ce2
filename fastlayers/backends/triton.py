"""Triton backend: fused residual-add + RMSNorm / LayerNorm (see backends/__init__.py for the contract).

One forward and one backward kernel serve every variant; constexpr flags select
RMS/LN, residual, bias, stored h, incoming dh, a separate dresidual, a weight (the
gain is ``offset + weight``, ``offset`` a float argument; 1 without a weight) and
the rounding of xhat to the output dtype before the gain ("llama" casting).

Rows are processed in 2-D tiles of BLOCK_M rows x BLOCK_N columns (BLOCK_M > 1
only for short rows). A row of up to ``FWD_MAX_BLOCK`` (forward) or
``BWD_MAX_BLOCK`` (backward) elements is held in one block; longer rows are
walked in chunks of ``*_CHUNK`` elements in two passes (statistics, then
output), with LayerNorm statistics merged chunk by chunk (Chan et al.) so that
a large mean does not cancel the variance.

Every load is upcast to fp32 at once: arithmetic is fp32 whatever the storage
dtype (the interpreter also computes bf16 arithmetic wrongly), and outputs are
rounded once, to nearest even (under the interpreter, whose fp32 -> bf16 cast
truncates, by hand: ``_store_out``).

The backward runs P = ``norm_bwd_parts`` programs; program p owns a contiguous
group of rows and writes row p of dw_part / db_part (zeros for an empty group).

Without a GPU: set ``TRITON_INTERPRET=1`` before triton is imported to run the
kernels on CPU tensors, and call ``aot_compile(cc)`` to compile every kernel of
the family for sm_<cc>.
"""
import torch

from . import sm_count

from ._triton_import import IMPORT_ERROR, tl, triton

# Longest row (elements) kept in one block; longer rows are processed in chunks.
# Module attributes, read at every call, so tests can shrink them to reach the chunked path.
FWD_MAX_BLOCK = 16384
FWD_CHUNK = 8192
BWD_MAX_BLOCK = 8192
BWD_CHUNK = 4096
# Target elements per tile when several short rows share a program.
FWD_TILE = 4096
BWD_TILE = 4096
MAX_BLOCK_M = 64

_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
              torch.int64: "i64", torch.int32: "i32"}


def _next_pow2(n):
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _num_warps(tile):
    """Warps for a tile of `tile` elements: ~16-32 fp32 elements per thread, 1..16 warps."""
    return max(1, min(16, tile // 512))


def _fwd_config(M, N, min_programs):
    """(BLOCK_M, BLOCK_N, ONE_BLOCK, num_warps) of the forward for an (M, N) problem."""
    if N > FWD_MAX_BLOCK:
        block_n = _next_pow2(min(FWD_CHUNK, FWD_MAX_BLOCK))
        return 1, block_n, False, _num_warps(block_n)
    block_n = _next_pow2(N)
    block_m = max(1, min(MAX_BLOCK_M, FWD_TILE // block_n, _next_pow2(M)))
    # Keep enough programs to fill the GPU.
    while block_m > 1 and -(-M // block_m) < min_programs:
        block_m //= 2
    return block_m, block_n, True, _num_warps(block_m * block_n)


def _bwd_config(M, N, P):
    """(BLOCK_M, BLOCK_N, ONE_BLOCK, num_warps, rows_per_program) of the backward."""
    rows_per_prog = -(-M // P) if M > 0 else 0
    if N > BWD_MAX_BLOCK:
        # Up to 4 rows per tile: the dw/db partial rows are read and written once per tile and chunk.
        chunk = _next_pow2(min(BWD_CHUNK, BWD_MAX_BLOCK))
        block_m = max(1, min(4, chunk // 16, _next_pow2(rows_per_prog)))
        return block_m, chunk // block_m, False, _num_warps(chunk), rows_per_prog
    block_n = _next_pow2(N)
    block_m = max(1, min(MAX_BLOCK_M, BWD_TILE // block_n, _next_pow2(rows_per_prog)))
    return block_m, block_n, True, _num_warps(block_m * block_n), rows_per_prog


if IMPORT_ERROR is None:

    # Set below: True when the kernels run in the interpreter, whose fp32 -> bf16 cast truncates
    # (round toward zero) where the GPU rounds to nearest even.
    _INTERPRETER_BF16_FIX = tl.constexpr(False)

    @triton.jit
    def _store_out(ptrs, v, mask):
        """Store fp32 values `v`, rounded to nearest even in the pointers' dtype."""
        if _INTERPRETER_BF16_FIX:
            if ptrs.dtype.element_ty == tl.bfloat16:
                u = tl.cast(v, tl.uint32, bitcast=True)
                u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
                v = tl.where(v == v, tl.cast(u, tl.float32, bitcast=True), v)  # NaN stays NaN
        tl.store(ptrs, tl.cast(v, ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _round_like(v, ptrs):
        """fp32 values `v` rounded to nearest even in the pointers' dtype (a 16-bit one) and back to fp32:
        xhat as Llama's casting hands it to the gain."""
        dt = ptrs.dtype.element_ty
        if _INTERPRETER_BF16_FIX:
            if dt == tl.bfloat16:
                u = tl.cast(v, tl.uint32, bitcast=True)
                u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
                r = tl.where(v == v, tl.cast(u, tl.float32, bitcast=True), v)
            else:
                r = tl.cast(tl.cast(v, dt), tl.float32)
        else:
            r = tl.cast(tl.cast(v, dt), tl.float32)
        return r

    @triton.jit
    def _gain(W, c, c_ok, offset, HAS_WEIGHT: tl.constexpr):
        """offset + weight at columns c (fp32), or 1 without a weight."""
        if HAS_WEIGHT:
            w = tl.cast(tl.load(W + c, mask=c_ok, other=0.0), tl.float32) + tl.cast(offset, tl.float32)
        else:
            w = tl.full(c.shape, 1.0, tl.float32)
        return w

    @triton.jit
    def _norm_fwd_kernel(X, R, W, B, Y, H, MEAN, RSTD,
                         stride_x, stride_r, stride_y, stride_h, M, N, eps, offset,
                         IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                         STORE_H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         ONE_BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROUND_XHAT: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = tl.cast(rows, tl.int64)
        cols = tl.arange(0, BLOCK_N)
        eps32 = tl.cast(eps, tl.float32)
        x_rows = X + rows64[:, None] * stride_x
        y_rows = Y + rows64[:, None] * stride_y
        if HAS_RESIDUAL:
            r_rows = R + rows64[:, None] * stride_r
        if STORE_H:
            h_rows = H + rows64[:, None] * stride_h
        if ONE_BLOCK:
            col_ok = cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            h = tl.cast(tl.load(x_rows + cols[None, :], mask=mask, other=0.0), tl.float32)
            if HAS_RESIDUAL:
                h += tl.cast(tl.load(r_rows + cols[None, :], mask=mask, other=0.0), tl.float32)
            if STORE_H:
                _store_out(h_rows + cols[None, :], h, mask)
            if IS_RMS:
                xc = h
            else:
                mean = _div(tl.sum(h, axis=1), N)
                xc = tl.where(mask, h - mean[:, None], 0.0)
                tl.store(MEAN + rows, mean, mask=row_ok)
            rstd = tl.rsqrt(_div(tl.sum(xc * xc, axis=1), N) + eps32)
            tl.store(RSTD + rows, rstd, mask=row_ok)
            w = _gain(W, cols, col_ok, offset, HAS_WEIGHT)
            xh = xc * rstd[:, None]
            if ROUND_XHAT:
                xh = _round_like(xh, Y)
            y = xh * w[None, :]
            if HAS_BIAS:
                y += tl.cast(tl.load(B + cols, mask=col_ok, other=0.0), tl.float32)[None, :]
            _store_out(y_rows + cols[None, :], y, mask)
        else:
            # Pass 1: statistics (and h), chunk by chunk.
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            m2 = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum of squares (RMS) / of squared deviations (LN)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_ok[:, None] & (c < N)[None, :]
                h = tl.cast(tl.load(x_rows + c[None, :], mask=mask, other=0.0), tl.float32)
                if HAS_RESIDUAL:
                    h += tl.cast(tl.load(r_rows + c[None, :], mask=mask, other=0.0), tl.float32)
                if STORE_H:
                    _store_out(h_rows + c[None, :], h, mask)
                if IS_RMS:
                    m2 += tl.sum(h * h, axis=1)
                else:
                    n_a = tl.cast(start, tl.float32)
                    n_c = tl.cast(tl.minimum(N - start, BLOCK_N), tl.float32)
                    mean_c = tl.sum(h, axis=1) / n_c
                    d = tl.where(mask, h - mean_c[:, None], 0.0)
                    delta = mean_c - mean
                    frac = n_c / (n_a + n_c)
                    mean += delta * frac
                    m2 += tl.sum(d * d, axis=1) + delta * delta * (n_a * frac)
            rstd = tl.rsqrt(_div(m2, N) + eps32)
            tl.store(RSTD + rows, rstd, mask=row_ok)
            if not IS_RMS:
                tl.store(MEAN + rows, mean, mask=row_ok)
            # Pass 2: recompute h (unrounded) and write y.
            for start in range(0, N, BLOCK_N):
                c = start + cols
                c_ok = c < N
                mask = row_ok[:, None] & c_ok[None, :]
                h = tl.cast(tl.load(x_rows + c[None, :], mask=mask, other=0.0), tl.float32)
                if HAS_RESIDUAL:
                    h += tl.cast(tl.load(r_rows + c[None, :], mask=mask, other=0.0), tl.float32)
                w = _gain(W, c, c_ok, offset, HAS_WEIGHT)
                if IS_RMS:
                    xh = h * rstd[:, None]
                else:
                    xh = (h - mean[:, None]) * rstd[:, None]
                if ROUND_XHAT:
                    xh = _round_like(xh, Y)
                y = xh * w[None, :]
                if HAS_BIAS:
                    y += tl.cast(tl.load(B + c, mask=c_ok, other=0.0), tl.float32)[None, :]
                _store_out(y_rows + c[None, :], y, mask)

    @triton.jit
    def _div(x, N):
        """x / N correctly rounded. With plain ``/`` (which Triton lowers to the approximate div.full on
        NVIDIA GPUs) the width-1 layer-norm backward gave dx = 1.7e-5 instead of 0 on an H200: at N = 1,
        rstd = eps ** -0.5 amplifies an ulp (the cause is inferred; with div_rn that test passes there)."""
        return tl.math.div_rn(x, tl.full(x.shape, 1, tl.float32) * N)

    @triton.jit
    def _bwd_tile(X, R, DY, rows64, c, mask, w, mean, rstd, stride_x, stride_r, stride_dy,
                  IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
        """Recompute xhat of a tile from x (+ r) and load dy: returns (xhat, dy, g = dy * w)."""
        h = tl.cast(tl.load(X + rows64[:, None] * stride_x + c[None, :], mask=mask, other=0.0), tl.float32)
        if HAS_RESIDUAL:
            h += tl.cast(tl.load(R + rows64[:, None] * stride_r + c[None, :], mask=mask, other=0.0), tl.float32)
        dy = tl.cast(tl.load(DY + rows64[:, None] * stride_dy + c[None, :], mask=mask, other=0.0), tl.float32)
        if IS_RMS:
            xhat = h * rstd[:, None]
        else:
            xhat = (h - mean[:, None]) * rstd[:, None]
        xhat = tl.where(mask, xhat, 0.0)
        return xhat, dy, dy * w[None, :]

    @triton.jit
    def _bwd_store_dh(dh, DH, DX, DR, rows64, c, mask, stride_dh, stride_dx, stride_dr,
                      HAS_DH: tl.constexpr, STORE_DR: tl.constexpr):
        """Add the incoming grad of h (prenorm), then write dx (and dresidual when stored separately)."""
        if HAS_DH:
            dh += tl.cast(tl.load(DH + rows64[:, None] * stride_dh + c[None, :], mask=mask, other=0.0), tl.float32)
        _store_out(DX + rows64[:, None] * stride_dx + c[None, :], dh, mask)
        if STORE_DR:
            _store_out(DR + rows64[:, None] * stride_dr + c[None, :], dh, mask)

    @triton.jit
    def _norm_bwd_kernel(DY, X, R, W, MEAN, RSTD, DH, DX, DR, DW, DB,
                         stride_dy, stride_x, stride_r, stride_dh, stride_dx, stride_dr, stride_dw,
                         M, N, rows_per_prog, offset,
                         IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                         HAS_DH: tl.constexpr, STORE_DR: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                         ROUND_XHAT: tl.constexpr):
        pid = tl.program_id(0)
        row_start = pid * rows_per_prog
        row_end = tl.minimum(row_start + rows_per_prog, M)
        cols = tl.arange(0, BLOCK_N)
        dw_row = DW + tl.cast(pid, tl.int64) * stride_dw
        if HAS_BIAS:
            db_row = DB + tl.cast(pid, tl.int64) * stride_dw
        if ONE_BLOCK:
            col_ok = cols < N
            w = _gain(W, cols, col_ok, offset, HAS_WEIGHT)
            dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for r0 in range(row_start, row_end, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                row_ok = rows < row_end
                rows64 = tl.cast(rows, tl.int64)
                mask = row_ok[:, None] & col_ok[None, :]
                rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
                if IS_RMS:
                    mean = rstd  # unused
                else:
                    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
                xhat, dy, g = _bwd_tile(X, R, DY, rows64, cols, mask, w, mean, rstd, stride_x, stride_r, stride_dy,
                                        IS_RMS, HAS_RESIDUAL)
                c1 = _div(tl.sum(g * xhat, axis=1), N)
                if IS_RMS:
                    dh = (g - xhat * c1[:, None]) * rstd[:, None]
                else:
                    c2 = _div(tl.sum(g, axis=1), N)
                    dh = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
                _bwd_store_dh(dh, DH, DX, DR, rows64, cols, mask, stride_dh, stride_dx, stride_dr, HAS_DH, STORE_DR)
                if ROUND_XHAT:  # dweight sees xhat as rounded for the gain; dx the unrounded one
                    xhat = _round_like(xhat, DX)
                dw_acc += tl.sum(dy * xhat, axis=0)
                if HAS_BIAS:
                    db_acc += tl.sum(dy, axis=0)
            tl.store(dw_row + cols, dw_acc, mask=col_ok)
            if HAS_BIAS:
                tl.store(db_row + cols, db_acc, mask=col_ok)
        else:
            # Long rows: this program's dw/db partial rows accumulate in memory (read-modify-write by the
            # program that owns them); barriers order those accesses between the threads of the program.
            zero = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                tl.store(dw_row + c, zero, mask=c < N)
                if HAS_BIAS:
                    tl.store(db_row + c, zero, mask=c < N)
            tl.debug_barrier()
            for r0 in range(row_start, row_end, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                row_ok = rows < row_end
                rows64 = tl.cast(rows, tl.int64)
                rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
                if IS_RMS:
                    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
                else:
                    mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
                # Pass 1: row sums of g * xhat and g.
                c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
                c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
                for start in range(0, N, BLOCK_N):
                    c = start + cols
                    c_ok = c < N
                    mask = row_ok[:, None] & c_ok[None, :]
                    w = _gain(W, c, c_ok, offset, HAS_WEIGHT)
                    xhat, dy, g = _bwd_tile(X, R, DY, rows64, c, mask, w, mean, rstd, stride_x, stride_r,
                                            stride_dy, IS_RMS, HAS_RESIDUAL)
                    c1 += tl.sum(g * xhat, axis=1)
                    if not IS_RMS:
                        c2 += tl.sum(g, axis=1)
                c1 = _div(c1, N)
                c2 = _div(c2, N)
                # Pass 2: dx (= dresidual), and the dw/db partial sums.
                for start in range(0, N, BLOCK_N):
                    c = start + cols
                    c_ok = c < N
                    mask = row_ok[:, None] & c_ok[None, :]
                    w = _gain(W, c, c_ok, offset, HAS_WEIGHT)
                    xhat, dy, g = _bwd_tile(X, R, DY, rows64, c, mask, w, mean, rstd, stride_x, stride_r,
                                            stride_dy, IS_RMS, HAS_RESIDUAL)
                    dh = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
                    _bwd_store_dh(dh, DH, DX, DR, rows64, c, mask, stride_dh, stride_dx, stride_dr, HAS_DH,
                                  STORE_DR)
                    if ROUND_XHAT:
                        xhat = _round_like(xhat, DX)
                    tl.store(dw_row + c, tl.load(dw_row + c, mask=c_ok, other=0.0) + tl.sum(dy * xhat, axis=0),
                             mask=c_ok)
                    if HAS_BIAS:
                        tl.store(db_row + c, tl.load(db_row + c, mask=c_ok, other=0.0) + tl.sum(dy, axis=0),
                                 mask=c_ok)
                tl.debug_barrier()


    from triton.runtime.jit import JITFunction as _JITFunction
    _INTERPRETER_BF16_FIX = tl.constexpr(not isinstance(_norm_fwd_kernel, _JITFunction))


# ----------------------------------------------------------------------------- launches
# FMA contraction on (explicitly: triton 3.9 warns that its default will change).
_OPTIONS = {"enable_fp_fusion": True}


def _launch(kernel, grid, device, args, meta, num_warps):
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta, num_warps=num_warps, **_OPTIONS)
    else:
        kernel[grid](*args, **meta, num_warps=num_warps, **_OPTIONS)


def _stride(t):
    return 0 if t is None else t.stride(0)


def _round_xhat(round_xhat, x):
    """Whether xhat is rounded to x's dtype before the gain ("llama" casting): only for 16-bit x."""
    return bool(round_xhat) and x.dtype in (torch.float16, torch.bfloat16)


def norm_fwd(x, residual, weight, bias, y, h, mean, rstd, eps, is_rms, offset=0.0, round_xhat=False):
    assert x.dtype != torch.float64, "the triton backend does not support float64"
    M, N = x.shape
    if M == 0 or N == 0:
        return
    min_programs = 2 * sm_count(x.device) if x.device.type == "cuda" else 1
    block_m, block_n, one_block, num_warps = _fwd_config(M, N, min_programs)
    grid = (triton.cdiv(M, block_m),)
    args = (x, residual, weight, bias, y, h, mean, rstd,
            x.stride(0), _stride(residual), y.stride(0), _stride(h), M, N, float(eps), float(offset))
    meta = dict(IS_RMS=bool(is_rms), HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
                STORE_H=h is not None, BLOCK_M=block_m, BLOCK_N=block_n, ONE_BLOCK=one_block,
                HAS_WEIGHT=weight is not None, ROUND_XHAT=_round_xhat(round_xhat, x))
    _launch(_norm_fwd_kernel, grid, x.device, args, meta, num_warps)


def norm_bwd_parts(M, N, device):
    device = torch.device(device)
    if device.type == "cuda":
        per_sm = 4 if N <= 1024 else 2
        return max(1, min(M, per_sm * sm_count(device)))
    return max(1, min(M, 4))


def norm_bwd(dy, x, residual, weight, bias, mean, rstd, dh, dx, dresidual, dw_part, db_part, is_rms, offset=0.0,
             round_xhat=False):
    assert x.dtype != torch.float64, "the triton backend does not support float64"
    M, N = x.shape
    P = dw_part.shape[0]
    if N == 0 or P == 0:
        return
    assert db_part is None or db_part.stride(0) == dw_part.stride(0)
    block_m, block_n, one_block, num_warps, rows_per_prog = _bwd_config(M, N, P)
    args = (dy, x, residual, weight, mean, rstd, dh, dx, dresidual, dw_part, db_part,
            dy.stride(0), x.stride(0), _stride(residual), _stride(dh), dx.stride(0), _stride(dresidual),
            dw_part.stride(0), M, N, rows_per_prog, float(offset))
    meta = dict(IS_RMS=bool(is_rms), HAS_RESIDUAL=residual is not None, HAS_BIAS=db_part is not None,
                HAS_DH=dh is not None, STORE_DR=dresidual is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                ONE_BLOCK=one_block, HAS_WEIGHT=weight is not None, ROUND_XHAT=_round_xhat(round_xhat, x))
    _launch(_norm_bwd_kernel, (P,), x.device, args, meta, num_warps)


# ----------------------------------------------------------------------------- ahead-of-time compile
_FWD_ARGS = ("X", "R", "W", "B", "Y", "H", "MEAN", "RSTD", "stride_x", "stride_r", "stride_y", "stride_h",
             "M", "N", "eps", "offset")
_BWD_ARGS = ("DY", "X", "R", "W", "MEAN", "RSTD", "DH", "DX", "DR", "DW", "DB", "stride_dy", "stride_x",
             "stride_r", "stride_dh", "stride_dx", "stride_dr", "stride_dw", "M", "N", "rows_per_prog", "offset")
_AOT_SMS = 132  # H100 SXM, for the launch configurations


def _fwd_variant(dt, M, N, is_rms, res, bias, h, weight=True, round_xhat=False):
    f32 = torch.float32
    bm, bn, one, nw = _fwd_config(M, N, 2 * _AOT_SMS)
    tensors = dict(X=dt, R=res, W=dt if weight else None, B=dt if bias else None, Y=dt, H=h,
                   MEAN=None if is_rms else f32, RSTD=f32)
    meta = dict(IS_RMS=is_rms, HAS_RESIDUAL=res is not None, HAS_BIAS=bias, STORE_H=h is not None,
                BLOCK_M=bm, BLOCK_N=bn, ONE_BLOCK=one, HAS_WEIGHT=weight, ROUND_XHAT=round_xhat)
    flags = ",".join(k for k in ("IS_RMS", "HAS_RESIDUAL", "HAS_BIAS", "STORE_H", "ONE_BLOCK", "HAS_WEIGHT",
                                 "ROUND_XHAT") if meta[k])
    what = (f"norm_fwd {str(dt)[6:]} M={M} N={N} res={str(res)[6:]} h={str(h)[6:]} [{flags}] "
            f"BLOCK={bm}x{bn} warps={nw}")
    return "fwd", _FWD_ARGS, tensors, dict(M=M, N=N), meta, nw, what


def _bwd_variant(dt, M, N, is_rms, res, bias, dh, dr, weight=True, round_xhat=False):
    f32 = torch.float32
    bm, bn, one, nw, rows_per_prog = _bwd_config(M, N, min(M, (4 if N <= 1024 else 2) * _AOT_SMS))
    tensors = dict(DY=dt, X=dt, R=res, W=dt if weight else None, MEAN=None if is_rms else f32, RSTD=f32, DH=dh,
                   DX=dt, DR=dr, DW=f32, DB=f32 if bias else None)
    meta = dict(IS_RMS=is_rms, HAS_RESIDUAL=res is not None, HAS_BIAS=bias, HAS_DH=dh is not None,
                STORE_DR=dr is not None, BLOCK_M=bm, BLOCK_N=bn, ONE_BLOCK=one, HAS_WEIGHT=weight,
                ROUND_XHAT=round_xhat)
    flags = ",".join(k for k in ("IS_RMS", "HAS_RESIDUAL", "HAS_BIAS", "HAS_DH", "STORE_DR", "ONE_BLOCK",
                                 "HAS_WEIGHT", "ROUND_XHAT") if meta[k])
    what = (f"norm_bwd {str(dt)[6:]} M={M} N={N} res={str(res)[6:]} dh={str(dh)[6:]} [{flags}] "
            f"BLOCK={bm}x{bn} warps={nw}")
    return "bwd", _BWD_ARGS, tensors, dict(M=M, N=N, rows_per_prog=rows_per_prog), meta, nw, what


def _aot_variants(full=False):
    """Representative launches: every flag on and off, every dtype, and the three tilings
    (several short rows per program, one long row in one block, chunked rows), with the
    block sizes and warps that norm_fwd / norm_bwd would choose on an H100.

    ``full``: every flag combination x dtype x tiling (slow: ~100 kernels, minutes).
    """
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    fwd_shapes = [(4096, 128), (4096, 4096), (64, FWD_MAX_BLOCK), (64, 4 * FWD_MAX_BLOCK)]
    bwd_shapes = [(4096, 128), (4096, 4096), (64, BWD_MAX_BLOCK), (4096, 4 * BWD_MAX_BLOCK)]
    if full:
        out = []
        for dt in (f32, f16, bf16):
            for M, N in fwd_shapes:
                for is_rms, res, bias, h in ((True, None, False, None), (False, dt, True, dt),
                                             (True, f32, False, f32), (False, f32, False, dt)):
                    out.append(_fwd_variant(dt, M, N, is_rms, res, bias, h))
            for M, N in bwd_shapes:
                for is_rms, res, bias, dh, dr in ((True, None, False, None, None), (False, dt, True, dt, None),
                                                  (True, f32, False, f32, f32), (False, f32, True, None, f32)):
                    out.append(_bwd_variant(dt, M, N, is_rms, res, bias, dh, dr))
        return out
    (sm_f, big_f, one_f, chunk_f), (sm_b, big_b, one_b, chunk_b) = fwd_shapes, bwd_shapes
    return [
        _fwd_variant(f32, *sm_f, True, None, False, None),
        _fwd_variant(bf16, *sm_f, False, bf16, True, bf16),
        _fwd_variant(bf16, *big_f, False, bf16, True, bf16),
        _fwd_variant(f16, *one_f, True, f32, False, f32),
        _fwd_variant(bf16, *chunk_f, False, f32, True, bf16),
        _fwd_variant(f16, *chunk_f, True, f16, False, None),
        _fwd_variant(f32, *chunk_f, False, None, False, f32),
        _fwd_variant(bf16, *sm_f, True, None, False, None, round_xhat=True),    # Llama's casting
        _fwd_variant(f16, *chunk_f, True, f16, False, None, weight=False),      # no weight
        _bwd_variant(f32, *sm_b, True, None, False, None, None),
        _bwd_variant(bf16, *sm_b, False, bf16, True, bf16, None),
        _bwd_variant(bf16, *big_b, False, bf16, True, bf16, None),
        _bwd_variant(f16, *one_b, True, f32, False, f32, f32),
        _bwd_variant(bf16, *chunk_b, False, f32, True, f32, f32),
        _bwd_variant(f16, *chunk_b, True, f16, False, f16, None),
        _bwd_variant(f32, *chunk_b, False, None, True, None, None),
        _bwd_variant(bf16, 8, chunk_b[1], True, None, False, None, None),  # one row per tile
        _bwd_variant(bf16, *sm_b, True, None, False, None, None, round_xhat=True),
        _bwd_variant(f16, *chunk_b, True, None, False, None, None, weight=False, round_xhat=True),
    ]


class AOTKernel:
    """A kernel compiled in a child process: ``asm`` (dict: ttir, ttgir, llir, ptx, cubin), ``metadata`` (dict)."""

    def __init__(self, description, asm, metadata):
        self.description, self.asm, self.metadata = description, asm, metadata

    def __repr__(self):
        return f"AOTKernel({self.description})"


def _interpreted():
    return not isinstance(_norm_fwd_kernel, _JITFunction)


def _aot_in_child(cc, full):
    """Compile in a fresh interpreter without TRITON_INTERPRET: once triton is imported in interpreter
    mode its own library functions (tl.sum, ...) are interpreted and cannot be compiled."""
    import os
    import pickle
    import subprocess
    import sys
    import tempfile
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import pickle, sys\n"
            f"sys.path.insert(0, {pkg_parent!r})  # this same fastlayers, imported as a package\n"
            "import fastlayers.backends.triton as m\n"
            f"ks = m.aot_compile({int(cc)}, full={bool(full)})\n"
            "out = [(k.description, {a: v for a, v in k.asm.items() if isinstance(v, (str, bytes))},\n"
            "        {a: v for a, v in k.metadata._asdict().items() if isinstance(v, (int, float, str, bool))})\n"
            "       for k in ks]\n"
            "pickle.dump(out, open(sys.argv[1], 'wb'))\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernels.pkl")
        proc = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ahead-of-time triton compile for sm_{cc} failed:\n{proc.stderr[-6000:]}")
        with open(path, "rb") as f:
            return [AOTKernel(*k) for k in pickle.load(f)]


def aot_compile(cc, full=False):
    """Compile the kernels of the family for ``GPUTarget("cuda", cc, 32)``; needs no GPU.

    Returns the compiled kernels; each has ``.asm`` (``.asm["ptx"]``: the PTX), ``.metadata`` and
    ``.description`` (dtype, shape, flags, block and warps). If triton was imported under
    TRITON_INTERPRET=1, the compile runs in a child process and returns ``AOTKernel`` records.
    """
    if IMPORT_ERROR is not None:
        raise ImportError(f"triton is not usable: {IMPORT_ERROR}")
    if _interpreted():
        return _aot_in_child(cc, full)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", int(cc), 32)
    kernels = []
    from . import triton_conv1d, triton_hybridnorm, triton_scan, triton_ssd
    families = (triton_hybridnorm, triton_scan, triton_conv1d, triton_ssd)
    kernel_of = {"fwd": _norm_fwd_kernel, "bwd": _norm_bwd_kernel}
    variants = _aot_variants(full)
    for fam in families:
        kernel_of.update(fam.AOT_KERNELS)
        variants += fam.aot_variants(full)
    for kind, arg_names, tensors, ints, meta, num_warps, what in variants:
        fn = kernel_of[kind]
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(arg_names):
            if name in tensors:
                dt = tensors[name]
                if dt is None:  # absent tensor: launched as None, a constexpr
                    signature[name] = "constexpr"
                    constexprs[name] = None
                else:
                    signature[name] = "*" + _TL_DTYPES[dt]
                    attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
            elif name in ("eps", "offset"):
                signature[name] = "fp32"
            elif ints.get(name) == 1:  # the JIT makes an int equal to 1 a constexpr
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                # Like the JIT: sizes divisible by 16 and row strides (assumed divisible by 16) carry the
                # divisibility hint that lets masked loads vectorise.
                signature[name] = "i32"
                if name.startswith("stride") or ints.get(name, 1) % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        for name, value in meta.items():
            signature[name] = "constexpr"
            constexprs[name] = value
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        try:
            kernel = triton.compile(source, target=target, options={"num_warps": num_warps, **_OPTIONS})
        except Exception as e:
            raise RuntimeError(f"triton compile for sm_{cc} failed: {what}: {e}") from e
        kernel.description = what
        kernels.append(kernel)
    return kernels


# ----------------------------------------------------------------------------- HybridNorm kernels
# Defined (without their kernels) even when triton is missing, like the functions above.
from .triton_hybridnorm import (head_norm_rope_fwd, head_norm_rope_bwd_parts, head_norm_rope_bwd,  # noqa: E402,F401
                                swiglu_fwd, swiglu_bwd)
from .triton_scan import selective_state_update  # noqa: E402,F401
from .triton_ssd import ssd_scan_fwd, ssd_scan_bwd  # noqa: E402,F401
from .triton_mla import mla_decode, mla_decode_splits  # noqa: E402,F401

# ----------------------------------------------------------------------------- causal conv1d kernels
from .triton_conv1d import (causal_conv1d_fwd, causal_conv1d_bwd_parts, causal_conv1d_bwd,  # noqa: E402,F401
                            causal_conv1d_update)
