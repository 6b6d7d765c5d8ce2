"""MLA decoding: attention of new queries over a paged latent KV cache (absorbed weights).

``mla_decode`` takes FlashMLA's arguments and layouts, for any latent size: q
``(B, s_q, H, kv_lora_rank + rope_dim)``, the cache ``(num_blocks, page_size, h_kv, D)``
holding ``[c_kv ; k_pe]`` rows (h_kv = 1 for MLA; h_kv > 1 with H a multiple of it makes this a paged
GQA decode, as FlashMLA's dense decoding), a block table and the cached lengths. Split-KV
(flash-decoding): long sequences are cut into splits processed in parallel and
merged by their log-sum-exp; the split workspace is allocated here.
"""
import math
import weakref
from typing import Tuple

import torch
from torch import Tensor

from .. import reference
from .._dtypes import stat_dtype
from ..backend import resolve
from ..backends import cpu as _cpu_backend, load
from ._common import GPU_DTYPES, check_plain, check_same_device, check_tensor



# GPU cache_seqlens already checked, by tensor: reading them costs a host-device sync (the call waits for
# the GPU to drain), which a decode step would pay in every MLA layer. A tensor is checked again once it
# changes: PyTorch's in-place ops bump its version counter (a write from a raw pointer does not: hand
# such lengths over as a new tensor). Inference tensors keep no version counter and are checked every
# call. The GPU kernels also clamp each length to what the block table holds, so a stale check never
# makes them read past the table.
_GPU_LENS_CHECKED = {}  # id(tensor) -> (weakref to it, (version, table width, page), max length)


def _forget(key):
    return lambda _ref: _GPU_LENS_CHECKED.pop(key, None)


def _lens_version(t):
    try:
        return t._version
    except RuntimeError:  # an inference tensor
        return None


def _check(op, q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale, reuse=False):
    check_tensor(op, "q", q)
    check_tensor(op, "kv_cache", kv_cache)
    if q.dim() != 4:
        raise ValueError(f"fastlayers.{op}: q must be (batch, s_q, n_heads, D); got shape {tuple(q.shape)}")
    b, sq, h, d = q.shape
    if kv_cache.dim() != 4 or kv_cache.shape[2] < 1:
        raise ValueError(f"fastlayers.{op}: kv_cache must be (num_blocks, page_size, h_kv, D) with h_kv >= 1; got "
                         f"{tuple(kv_cache.shape)}")
    if h % kv_cache.shape[2]:
        raise ValueError(f"fastlayers.{op}: q's n_heads = {h} must be a multiple of kv_cache's h_kv = "
                         f"{kv_cache.shape[2]} (q shape {tuple(q.shape)}, kv_cache shape {tuple(kv_cache.shape)})")
    if kv_cache.shape[3] != d:
        raise ValueError(f"fastlayers.{op}: q's last dim D = {d} must equal the cache's row size "
                         f"{kv_cache.shape[3]} (kv_lora_rank + rope_dim)")
    page = kv_cache.shape[1]
    if page < 1 or page & (page - 1):
        raise ValueError(f"fastlayers.{op}: page_size must be a power of two; got {page}")
    if kv_cache.dtype != q.dtype:
        raise TypeError(f"fastlayers.{op}: q is {q.dtype} but kv_cache is {kv_cache.dtype}; they must match")
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) or not 0 < head_dim_v <= d:
        raise ValueError(f"fastlayers.{op}: head_dim_v must be an int in 1..D={d}; got {head_dim_v!r}")
    for name, t, shape in (("block_table", block_table, None), ("cache_seqlens", cache_seqlens, (b,))):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise TypeError(f"fastlayers.{op}: {name} must be an int32 tensor; got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        check_plain(op, name, t)
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"fastlayers.{op}: {name} must have shape {shape}; got {tuple(t.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != b:
        raise ValueError(f"fastlayers.{op}: block_table must be (batch={b}, max_blocks); got "
                         f"{tuple(block_table.shape)}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not math.isfinite(softmax_scale) or softmax_scale <= 0):
        raise ValueError(f"fastlayers.{op}: softmax_scale must be a finite number > 0; got {softmax_scale!r}")
    check_same_device(op, q, kv_cache=kv_cache, block_table=block_table, cache_seqlens=cache_seqlens)
    if torch.compiler.is_compiling() or b == 0:
        return 0
    page_checked = False
    if block_table.device.type == "cpu" and _cpu_backend._C is not None:
        # One C++ pass (a few us) instead of a dozen small torch ops (~150 us a call).
        lo, hi, i, bad = _cpu_backend._C.mla_check_table(
            block_table.data_ptr(), block_table.stride(0), block_table.stride(1), block_table.shape[1],
            cache_seqlens.data_ptr(), cache_seqlens.stride(0), b, page, kv_cache.shape[0])
        page_checked = True
    else:
        key = (_lens_version(cache_seqlens), block_table.shape[1], page) if reuse else (None,)
        seen = _GPU_LENS_CHECKED.get(id(cache_seqlens)) if key[0] is not None else None
        if seen is not None and seen[0]() is cache_seqlens and seen[1] == key:
            return seen[2]
        lens = cache_seqlens.cpu()
        lo, hi = int(lens.min()), int(lens.max())
        i = int(lens.argmax())
    cap = block_table.shape[1] * page
    if lo < 0:
        raise ValueError(f"fastlayers.{op}: cache_seqlens must be >= 0; got {lo}")
    if hi > cap:
        raise ValueError(f"fastlayers.{op}: sequence {i} has {hi} cached tokens but block_table holds "
                         f"{block_table.shape[1]} blocks x {page} = {cap} tokens")
    if page_checked:
        bad_row = bad
    elif block_table.device.type == "cpu":  # on a GPU this would cost a copy per call; the cache checks it
        # The entries each sequence uses (its first ceil(len / page) blocks), all rows at once.
        used = torch.arange(block_table.shape[1])[None, :] < ((lens + page - 1) // page)[:, None]
        bad = used & ((block_table < 0) | (block_table >= kv_cache.shape[0]))
        bad_row = int(bad.any(1).nonzero()[0]) if bad.any() else -1
    else:
        bad_row = -1
    if bad_row >= 0:
        raise ValueError(f"fastlayers.{op}: block_table row {bad_row} points outside "
                         f"the cache's {kv_cache.shape[0]} blocks")
    if not page_checked and key[0] is not None:
        _GPU_LENS_CHECKED[id(cache_seqlens)] = (weakref.ref(cache_seqlens, _forget(id(cache_seqlens))), key, hi)
    return hi


def _run(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal, max_len, backend):
    be = load(backend)
    b, sq, h, d = q.shape
    stat = stat_dtype(q.dtype)
    h_kv = kv_cache.shape[2]
    # (sequence, KV head) pairs are the independent problems, of s_q x H / h_kv query rows each
    # (FlashMLA's get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)).
    n_splits, split_tokens = be.mla_decode_splits(b * h_kv, max_len, q.device, sq * h // h_kv)
    out = torch.empty(b, sq, h, head_dim_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, h, sq, dtype=stat, device=q.device)
    o_part = torch.empty(b, n_splits, sq, h, head_dim_v, dtype=stat, device=q.device)
    lse_part = torch.empty(b, n_splits, sq, h, dtype=stat, device=q.device)
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv = kv_cache if kv_cache.stride(-1) == 1 else kv_cache.contiguous()
    be.mla_decode(q, kv, block_table.contiguous(), cache_seqlens.contiguous(), head_dim_v, scale, causal,
                  split_tokens, out, lse, o_part, lse_part)
    return out, lse


@torch.library.custom_op("fastlayers::mla_decode", mutates_args=())
def _mla_decode_op(q: Tensor, kv_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, head_dim_v: int,
                   scale: float, causal: bool, backend: str) -> Tuple[Tensor, Tensor]:
    max_len = block_table.shape[1] * kv_cache.shape[1]
    return _run(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal, max_len, backend)


@_mla_decode_op.register_fake
def _(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal, backend):
    b, sq, h, _ = q.shape
    return q.new_empty(b, sq, h, head_dim_v), q.new_empty(b, h, sq, dtype=stat_dtype(q.dtype))


def mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale=None, causal=False):
    """MLA decoding over a paged latent cache; returns ``(out, lse)`` (FlashMLA's argument order).

    q ``(batch, s_q, n_heads, D)`` with ``D = kv_lora_rank + rope_dim`` (the absorbed nope part
    first, the rope part last); kv_cache ``(num_blocks, page_size, h_kv, D)``, whose first
    ``head_dim_v`` (= kv_lora_rank) channels are also the values. h_kv = 1 is MLA (every head reads
    one latent row a token); any h_kv >= 1 that divides n_heads is accepted (FlashMLA's layout): query
    head h reads KV head ``h // (n_heads // h_kv)`` (contiguous groups), a paged GQA decode; block_table ``(batch, max_blocks)``
    int32; cache_seqlens ``(batch,)`` int32 (tokens already in the cache, the new ones included).
    out ``(batch, s_q, n_heads, head_dim_v)`` in q's dtype, lse ``(batch, n_heads, s_q)`` fp32;
    softmax_scale defaults to ``D ** -0.5``. With ``causal`` the s_q new tokens attend causally
    among themselves (speculative decoding). A sequence of length 0 (a query that sees no key) gives out 0
    and lse +inf, as FlashMLA does.
    Any kv_lora_rank and rope_dim, any power-of-two page size, fp32/fp16/bf16. Forward only.

    The arguments are checked before any kernel runs. Checking GPU ``cache_seqlens`` means reading
    them on the host, a sync; a GPU tensor already checked is not read again until a PyTorch in-place
    op changes it (every layer of a decode step shares one), so lengths written through a raw pointer
    must come as a new tensor (the kernels clamp them to the block table either way).
    """
    op = "mla_decode"
    check_tensor(op, "q", q)
    backend = resolve(op, q.device)
    max_len = _check(op, q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale,
                     reuse=backend in ("triton", "cuda") and q.device.type == "cuda")
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    if torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError(f"fastlayers.{op} is forward only (decoding); call it under torch.no_grad()")
    if backend == "reference":
        return reference.mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal)
    if backend in ("triton", "cuda") and q.dtype not in GPU_DTYPES:
        raise TypeError(f"fastlayers.{op}: backend {backend!r} supports float32, float16 and bfloat16; got {q.dtype}")
    if backend == "cuda":
        from ..backends.cuda import MLA_MAX_D, MLA_MAX_DV
        if q.shape[-1] > MLA_MAX_D or head_dim_v > MLA_MAX_DV:
            raise ValueError(f"fastlayers.{op}: backend 'cuda' supports D <= {MLA_MAX_D} and head_dim_v <= "
                             f"{MLA_MAX_DV}; got D = {q.shape[-1]}, head_dim_v = {head_dim_v} (use 'triton')")
    if torch.compiler.is_compiling():
        return torch.ops.fastlayers.mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale,
                                               bool(causal), backend)
    return _run(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, bool(causal), max_len, backend)
