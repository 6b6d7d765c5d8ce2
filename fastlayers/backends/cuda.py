"""CUDA backend: C++/CUDA kernels in ``fastlayers._cuda`` (see backends/__init__.py for the contract).

The module is torch-free: it takes raw device pointers, row strides, dtype codes and
the current torch stream, and launches on the device made current here. The kernels
take fp32, fp16 and bf16 (an fp64 row tensor raises ValueError; the dispatcher rejects
fp64 x before it gets here); weight and bias may be any floating dtype: others than
those three (fp64) are passed as fp32 copies.
"""
import torch

from .._dtypes import code, ptr, stride0
from . import sm_count

try:
    from .. import _cuda
    IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - reported by available_backends()
    _cuda = None
    IMPORT_ERROR = e

def _stream(device):
    return torch.cuda.current_stream(device).cuda_stream


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _param(t):
    """weight/bias in a dtype the kernels take: fp64 (any other floating dtype) as an fp32 copy."""
    return t if t is None or t.dtype in _KERNEL_DTYPES else t.float()


def _xhat_code(round_xhat, x):
    """dtype code xhat is rounded to before the gain ("llama" casting): x's, when 16-bit; else -1."""
    return code(x) if round_xhat and x.dtype in (torch.float16, torch.bfloat16) else -1


def norm_fwd(x, residual, weight, bias, y, h, mean, rstd, eps, is_rms, offset=0.0, round_xhat=False):
    M, N = x.shape
    weight, bias = _param(weight), _param(bias)
    with torch.cuda.device(x.device):
        _cuda.norm_fwd(ptr(x), stride0(x), code(x), ptr(residual), stride0(residual), code(residual),
                       ptr(weight), code(weight), ptr(bias), code(bias), ptr(y), stride0(y), code(y),
                       ptr(h), stride0(h), code(h), ptr(mean), ptr(rstd), M, N, float(eps), bool(is_rms),
                       _stream(x.device), float(offset), _xhat_code(round_xhat, x))


def norm_bwd_parts(M, N, device):
    return _cuda.norm_bwd_parts(M, N, sm_count(device))


def norm_bwd(dy, x, residual, weight, bias, mean, rstd, dh, dx, dresidual, dw_part, db_part, is_rms, offset=0.0,
             round_xhat=False):
    M, N = x.shape
    parts = dw_part.shape[0]
    weight, bias = _param(weight), _param(bias)  # dw_part/db_part stay fp32 (x is not fp64)
    with torch.cuda.device(x.device):
        _cuda.norm_bwd(ptr(dy), stride0(dy), code(dy), ptr(x), stride0(x), code(x),
                       ptr(residual), stride0(residual), code(residual), ptr(weight), code(weight),
                       ptr(bias), code(bias), ptr(mean), ptr(rstd), ptr(dh), stride0(dh), code(dh),
                       ptr(dx), stride0(dx), code(dx), ptr(dresidual), stride0(dresidual), code(dresidual),
                       ptr(dw_part), ptr(db_part), M, N, bool(is_rms), parts, _stream(x.device), float(offset),
                       _xhat_code(round_xhat, dx))


# ----------------------------------------------------------------------------- MLA decoding
MLA_MAX_D = 768     # csrc/cuda/mla_kernels.cuh kMlaMaxD (shared memory of one CTA)
MLA_MAX_DV = 512    # kMlaMaxDv (accumulators of one thread)
MLA_MIN_SPLIT = 256  # tokens: below this a split's fixed cost (q load, partial write) dominates
MLA_TILE = 32        # tokens a CTA reads per step


def mla_decode_splits(batch, max_len, device, rows=1):
    """(n_splits, split_tokens): batch x splits fills the GPU, each split >= 256 tokens. CTAs aimed at: 4 an
    SM when one CTA covers every query row (rows = s_q x heads <= 16), else 2 (each row group of 16 is a
    CTA already). On an H200 (benchmarks/RESULTS.md, 2026-11-27) 8 splits beat 2 an SM's 5 by 10-25% at
    batch 64, 16 heads; at 128 heads more splits were slower."""
    want = (4 if rows <= 16 else 2) * sm_count(device)
    n_splits = max(1, min(-(-want // max(batch, 1)), -(-max_len // MLA_MIN_SPLIT)))
    split = max(1, -(-max_len // n_splits))
    return n_splits, -(-split // MLA_TILE) * MLA_TILE


def mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal, split_tokens, out, lse, o_part,
               lse_part):
    B, s_q, H, D = q.shape
    n_splits = o_part.shape[1]
    h_kv = kv_cache.shape[2]
    # KV heads as keywords only when there are several (a module built before they existed takes one).
    heads = dict(h_kv=h_kv, kv_shead=kv_cache.stride(2)) if h_kv > 1 else {}
    with torch.cuda.device(q.device):
        _cuda.mla_decode(ptr(q), q.stride()[:3], code(q), ptr(kv_cache), kv_cache.stride(0), kv_cache.stride(1),
                         code(kv_cache), ptr(block_table), block_table.stride(0), ptr(cache_seqlens), ptr(o_part),
                         ptr(lse_part), ptr(out), code(out), ptr(lse), B, s_q, H, D, head_dim_v, kv_cache.shape[1],
                         n_splits, split_tokens, float(scale), bool(causal), block_table.shape[1] * kv_cache.shape[1],
                         _stream(q.device), **heads)


# ----------------------------------------------------------------------------- selective scan (Mamba-1)
SCAN_MAX_N = 256  # csrc/cuda/scan_kernels.cuh kScanMaxN: N / 32 states a lane


def _view4(t):
    """(address, dtype code, 4 strides) of a tensor of up to 4 dims; (0, -1, zeros) for None."""
    if t is None:
        return (0, -1, (0, 0, 0, 0))
    return (ptr(t), code(t), tuple(t.stride()) + (0,) * (4 - t.dim()))


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, out, last, GB, GC, delta_softplus):
    batch, dim, L = u.shape
    A, D, delta_bias = _param(A), _param(D), _param(delta_bias)  # fp64 parameters as fp32 copies
    with torch.cuda.device(u.device):
        _cuda.selective_scan_fwd(_view4(u), _view4(delta), _view4(A), _view4(B), _view4(C), _view4(D), _view4(z),
                                 _view4(delta_bias), _view4(out), _view4(last), batch, dim, L, A.shape[1], GB, GC,
                                 bool(delta_softplus), _stream(u.device))


def selective_scan_bwd_parts(batch, dim, L, N, device):
    """One part: the kernel adds every channel's dA/dB/dC/dD/d delta_bias into fp32 buffers with atomicAdd."""
    return 1


def selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, du, ddelta, dz, dA_part, dB_part, dC_part,
                       dD_part, dbias_part, GB, GC, delta_softplus):
    """du, ddelta, dz written; the zeroed (parts, ...) fp32 partials accumulated. The states are recomputed:
    the kernel keeps only the state every 32 steps (and a segment's chunk starts) in an fp32 scratch buffer
    (O(L / 32) states a channel)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    A, D, delta_bias = _param(A), _param(D), _param(delta_bias)
    with torch.cuda.device(u.device):
        ckpt = torch.empty(max(_cuda.selective_scan_bwd_ckpt(batch, dim, L, N), 1), dtype=torch.float32,
                           device=u.device)
        _cuda.selective_scan_bwd(_view4(u), _view4(delta), _view4(A), _view4(B), _view4(C), _view4(D), _view4(z),
                                 _view4(delta_bias), _view4(dout), _view4(dlast), _view4(du), _view4(ddelta),
                                 _view4(dz), ptr(dA_part), ptr(dB_part), ptr(dC_part), ptr(dD_part),
                                 ptr(dbias_part), dB_part[0].numel(), dC_part[0].numel(), batch, dim, L, N, GB, GC,
                                 bool(delta_softplus), ckpt.data_ptr(), dA_part.shape[0], _stream(u.device))
