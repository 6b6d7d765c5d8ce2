"""Triton kernels of the Mamba scans (see backends/__init__.py for the contract).

``selective_state_update``: one program per (batch row, head, block of BLOCK_P channels) holds a
BLOCK_P x N tile of the state, updates it and reduces it against C. Launch parameters are fixed
by the shapes (no autotuning: a tuning rerun would apply the in-place update twice).
"""
import torch

from ._triton_import import IMPORT_ERROR, tl, triton


if IMPORT_ERROR is None:
    @triton.jit
    def _state_update_kernel(S, X, DT, A, B, C, D, Z, DTB, OUT, IDX,
                             s_s0, s_s1, s_s2, s_s3, x_s0, x_s1, x_s2, dt_s0, dt_s1, dt_s2,
                             a_s0, a_s1, a_s2, b_s0, b_s1, b_s2, c_s0, c_s1, c_s2,
                             d_s0, d_s1, z_s0, z_s1, z_s2, dtb_s0, dtb_s1, o_s0, o_s1, o_s2,
                             H, P, N, heads_per_group,
                             HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DTB: tl.constexpr,
                             HAS_IDX: tl.constexpr, SOFTPLUS: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        i = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        p_ok, n_ok = p < P, n < N
        tile_ok = p_ok[:, None] & n_ok[None, :]
        g = h // heads_per_group
        if HAS_IDX:
            si = tl.load(IDX + i).to(tl.int64)
        else:
            si = i
        dt = tl.load(DT + i * dt_s0 + h * dt_s1 + p * dt_s2, mask=p_ok, other=0.0).to(tl.float32)
        if HAS_DTB:
            dt += tl.load(DTB + h * dtb_s0 + p * dtb_s1, mask=p_ok, other=0.0).to(tl.float32)
        if SOFTPLUS:
            dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))
        x = tl.load(X + i * x_s0 + h * x_s1 + p * x_s2, mask=p_ok, other=0.0).to(tl.float32)
        a = tl.load(A + h * a_s0 + p[:, None] * a_s1 + n[None, :] * a_s2, mask=tile_ok, other=0.0).to(tl.float32)
        b = tl.load(B + i * b_s0 + g * b_s1 + n * b_s2, mask=n_ok, other=0.0).to(tl.float32)
        c = tl.load(C + i * c_s0 + g * c_s1 + n * c_s2, mask=n_ok, other=0.0).to(tl.float32)
        s_ptrs = S + si * s_s0 + h * s_s1 + p[:, None] * s_s2 + n[None, :] * s_s3
        s = tl.load(s_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        s = tl.exp(dt[:, None] * a) * s + (dt * x)[:, None] * b[None, :]
        _store_out(s_ptrs, s, tile_ok)
        y = tl.sum(tl.where(tile_ok, s * c[None, :], 0.0), axis=1)
        if HAS_D:
            y += tl.load(D + h * d_s0 + p * d_s1, mask=p_ok, other=0.0).to(tl.float32) * x
        if HAS_Z:
            zv = tl.load(Z + i * z_s0 + h * z_s1 + p * z_s2, mask=p_ok, other=0.0).to(tl.float32)
            y = y * zv / (1.0 + tl.exp(-zv))
        _store_out(OUT + i * o_s0 + h * o_s1 + p * o_s2, y, p_ok)


def _st(t, k):
    """First k strides of t (zeros for None, so absent tensors pass harmless ints)."""
    return (0,) * k if t is None else tuple(t.stride())[:k]


def _state_update_config(P, N):
    block_n = _next_pow2(N)
    block_p = max(1, min(_next_pow2(P), 4096 // block_n))
    return block_p, block_n, _num_warps(block_p * block_n)


def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, out, state_batch_indices, dt_softplus):
    assert state.dtype != torch.float64, "the triton backend does not support float64 states"
    batch, H, P = x.shape
    N, G = state.shape[-1], B.shape[1]
    if batch == 0 or H == 0 or P == 0:
        return
    block_p, block_n, num_warps = _state_update_config(P, N)
    args = (state, x, dt, A, B, C, D, z, dt_bias, out, state_batch_indices,
            *_st(state, 4), *_st(x, 3), *_st(dt, 3), *_st(A, 3), *_st(B, 3), *_st(C, 3), *_st(D, 2), *_st(z, 3),
            *_st(dt_bias, 2), *_st(out, 3), H, P, N, H // G)
    meta = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_DTB=dt_bias is not None,
                HAS_IDX=state_batch_indices is not None, SOFTPLUS=bool(dt_softplus), BLOCK_P=block_p,
                BLOCK_N=block_n)
    _launch(_state_update_kernel, (batch, H, triton.cdiv(P, block_p)), x.device, args, meta, num_warps)


# The shared helpers of the Triton backend, imported last: triton.py imports this module at its end
# (see triton_hybridnorm.py). The kernel looks ``_store_out`` up when it is compiled.
from .triton import _launch, _next_pow2, _num_warps  # noqa: E402,F401
from .triton_hybridnorm import _vec  # noqa: E402,F401
if IMPORT_ERROR is None:
    from .triton import _store_out  # noqa: E402,F401


# ----------------------------------------------------------------------------- ahead-of-time compile
_STATE_UPDATE_ARGS = ("S", "X", "DT", "A", "B", "C", "D", "Z", "DTB", "OUT", "IDX",
                      "s_s0", "s_s1", "s_s2", "s_s3", "x_s0", "x_s1", "x_s2", "dt_s0", "dt_s1", "dt_s2",
                      "a_s0", "a_s1", "a_s2", "b_s0", "b_s1", "b_s2", "c_s0", "c_s1", "c_s2",
                      "d_s0", "d_s1", "z_s0", "z_s1", "z_s2", "dtb_s0", "dtb_s1", "o_s0", "o_s1", "o_s2",
                      "H", "P", "N", "heads_per_group")


def _state_update_variant(sdt, xdt, batch, H, P, N, G, mamba2, opts=True):
    """A launch as Mamba-2 (A, dt, D, dt_bias broadcast over headdim: stride 0) or Mamba-1 (H = 1) makes it."""
    bp, bn, nw = _state_update_config(P, N)
    f32 = torch.float32
    tensors = dict(S=sdt, X=xdt, DT=xdt, A=f32, B=xdt, C=xdt, D=f32 if opts else None, Z=xdt if opts else None,
                   DTB=f32 if opts else None, OUT=xdt, IDX=torch.int64 if opts else None)
    ints = dict(s_s0=H * P * N, s_s1=P * N, s_s2=N, s_s3=1, x_s0=H * P, x_s1=P, x_s2=1,
                dt_s0=H * (1 if mamba2 else P), dt_s1=1 if mamba2 else P, dt_s2=0 if mamba2 else 1,
                a_s0=1 if mamba2 else P * N, a_s1=0 if mamba2 else N, a_s2=0 if mamba2 else 1,
                b_s0=G * N, b_s1=N, b_s2=1, c_s0=G * N, c_s1=N, c_s2=1,
                d_s0=1 if mamba2 else P, d_s1=0 if mamba2 else 1, z_s0=H * P, z_s1=P, z_s2=1,
                dtb_s0=1 if mamba2 else P, dtb_s1=0 if mamba2 else 1, o_s0=H * P, o_s1=P, o_s2=1,
                H=H, P=P, N=N, heads_per_group=H // G)
    meta = dict(HAS_D=opts, HAS_Z=opts, HAS_DTB=opts, HAS_IDX=opts, SOFTPLUS=opts, BLOCK_P=bp, BLOCK_N=bn)
    what = (f"selective_state_update state={str(sdt)[6:]} x={str(xdt)[6:]} batch={batch} H={H} P={P} N={N} G={G} "
            f"{'mamba2' if mamba2 else 'mamba1'} opts={opts} BLOCK={bp}x{bn} warps={nw}{_vec(bp * bn, nw, sdt)}")
    return "selective_state_update", _STATE_UPDATE_ARGS, tensors, ints, meta, nw, what


def aot_variants(full=False):
    """Representative launches of the scan kernels (format of ``triton._aot_variants``)."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    out = [_state_update_variant(f32, bf16, 16, 64, 64, 128, 8, True),      # Mamba-2 (2.7B-like), fp32 state
           _state_update_variant(bf16, bf16, 4, 32, 64, 64, 32, True),      # Zebra-style: ngroups = nheads
           _state_update_variant(f32, f16, 8, 1, 5120, 16, 1, False),       # Mamba-1
           _state_update_variant(bf16, bf16, 1, 8, 3, 7, 1, False, opts=False)]
    return out


AOT_KERNELS = {} if IMPORT_ERROR is not None else {"selective_state_update": _state_update_kernel}
