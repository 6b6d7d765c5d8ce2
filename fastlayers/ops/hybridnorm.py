"""The HybridNorm attention prologue and FFN activation.

``qkv_norm_rope``: per-head RMSNorm (over head_dim) of q, k and v, then RoPE on q
and k, in one pass per tensor. ``swiglu``: ``silu(gate) * up``.

Eager calls go straight to the kernels (through a torch.autograd.Function when a
gradient is needed); while torch.compile traces, the same kernels run through the
custom ops ``fastlayers::qkv_norm_rope_fwd``/``_bwd`` and ``fastlayers::swiglu_fwd``/``_bwd``.
"""
import numbers
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .._alloc import empty
from .._dtypes import stat_dtype
from ..backend import resolve
from ..backends import load
from ._common import (check_backend_dtype, check_plain, check_positive, check_same_device, check_shape, check_tensor,
                      needs_grad, rows)



def _last_contig(t):
    """``t`` itself when its last dim is contiguous, else one explicit copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


# ============================================================================= qkv_norm_rope
def _head_fwd(be, x, w, cos, sin, offsets, eps):
    out = empty(x.shape, x.dtype, x.device)
    be.head_norm_rope_fwd(x, w, out, cos, sin, offsets, eps)
    return out


def _head_bwd(be, dout, x, w, cos, sin, offsets, eps, dx=None):
    if dx is None:
        dx = empty(x.shape, x.dtype, x.device)
    dw = None
    if w is not None:
        b, t, h, d = x.shape
        parts = be.head_norm_rope_bwd_parts(b * t * h, d, x.device)
        dw_part = torch.empty(parts, d, dtype=stat_dtype(x.dtype), device=x.device)
        be.head_norm_rope_bwd(_last_contig(dout), x, w, cos, sin, offsets, eps, dx, dw_part)
        dw = dw_part.sum(0).to(w.dtype)
    else:
        be.head_norm_rope_bwd(_last_contig(dout), x, None, cos, sin, offsets, eps, dx, None)
    return dx, dw


def _qkv_fwd(q, k, v, qw, kw, vw, cos, sin, offsets, eps, backend):
    """(q_out, k_out, v_out or None): v is normalised only when vw is given."""
    be = load(backend)
    qo = _head_fwd(be, q, qw, cos, sin, offsets, eps)
    ko = _head_fwd(be, k, kw, cos, sin, offsets, eps)
    vo = _head_fwd(be, v, vw, None, None, None, eps) if vw is not None else None
    return qo, ko, vo


def _qkv_bwd(dqo, dko, dvo, q, k, v, qw, kw, vw, cos, sin, offsets, eps, backend, dq=None, dk=None, dv=None):
    """(dq, dk, dv, dqw, dkw, dvw); dv/dvw are None without vw. dq/dk/dv may be given (views of one buffer)."""
    be = load(backend)
    dq, dqw = _head_bwd(be, dqo, q, qw, cos, sin, offsets, eps, dq)
    dk, dkw = _head_bwd(be, dko, k, kw, cos, sin, offsets, eps, dk)
    dvw = None
    if vw is not None:
        dv, dvw = _head_bwd(be, dvo, v, vw, None, None, None, eps, dv)
    return dq, dk, dv, dqw, dkw, dvw


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


class _QKVNormRope(torch.autograd.Function):
    """Separate q, k, v inputs (any strided views): separate gradients."""

    @staticmethod
    def forward(ctx, q, k, v, qw, kw, vw, cos, sin, offsets, eps, backend):
        qo, ko, vo = _qkv_fwd(q, k, v, qw, kw, vw, cos, sin, offsets, eps, backend)
        # Without vw, v is returned as it is and its gradient passes straight through: not saving it
        # leaves the caller free to modify that v in place.
        ctx.save_for_backward(q, k, v if vw is not None else None, qw, kw, vw, cos, sin, offsets)
        ctx.cfg = (eps, backend)
        return qo, ko, vo

    @staticmethod
    def backward(ctx, dqo, dko, dvo):
        q, k, v, qw, kw, vw, cos, sin, offsets = ctx.saved_tensors
        eps, backend = ctx.cfg
        dq, dk, dv, dqw, dkw, dvw = _qkv_bwd(_zeros_if_none(dqo, q), _zeros_if_none(dko, k),
                                             None if vw is None else _zeros_if_none(dvo, v),
                                             q, k, v, qw, kw, vw, cos, sin, offsets, eps, backend)
        return dq, dk, dv, dqw, dkw, dvw, None, None, None, None, None


class _QKVNormRopePacked(torch.autograd.Function):
    """One fused projection output ``(B, T, (Hq + 2 Hkv) * D)``: the gradient is one buffer of that shape,
    written by the kernels directly (no zero-filled slices summed by autograd)."""

    @staticmethod
    def forward(ctx, qkv, hq, hkv, qw, kw, vw, cos, sin, offsets, eps, backend):
        q, k, v = _split_packed(qkv, hq, hkv)
        qo, ko, vo = _qkv_fwd(q, k, v, qw, kw, vw, cos, sin, offsets, eps, backend)
        if vo is None:
            vo = v.clone(memory_format=torch.contiguous_format)
        ctx.save_for_backward(qkv, qw, kw, vw, cos, sin, offsets)
        ctx.cfg = (hq, hkv, eps, backend)
        return qo, ko, vo

    @staticmethod
    def backward(ctx, dqo, dko, dvo):
        qkv, qw, kw, vw, cos, sin, offsets = ctx.saved_tensors
        hq, hkv, eps, backend = ctx.cfg
        q, k, v = _split_packed(qkv, hq, hkv)
        dqkv = empty(qkv.shape, qkv.dtype, qkv.device)
        dq, dk, dv = _split_packed(dqkv, hq, hkv)
        _, _, _, dqw, dkw, dvw = _qkv_bwd(_zeros_if_none(dqo, q), _zeros_if_none(dko, k), _zeros_if_none(dvo, v),
                                          q, k, v, qw, kw, vw, cos, sin, offsets, eps, backend, dq, dk, dv)
        if vw is None:
            dv.copy_(_zeros_if_none(dvo, v))
        return dqkv, None, None, dqw, dkw, dvw, None, None, None, None, None


def _packed_base(q, k, v):
    """The fused projection output ``(B, T, (Hq + 2 Hkv) D)`` that q, k, v are the three head ranges of
    (a view of their common base), or None. Lets the backward write one gradient buffer."""
    base = q._base
    if base is None or k._base is not base or v._base is not base or not base.is_contiguous():
        return None
    # Only views that autograd tracks back to a base that needs the gradient (not views taken under
    # no_grad, nor views turned into leaves with requires_grad_()).
    if not base.requires_grad or any(t.grad_fn is None for t in (q, k, v)):
        return None
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if base.numel() != b * t * (hq + 2 * hkv) * d:
        return None
    packed = base.view(b, t, (hq + 2 * hkv) * d)
    for got, want in zip((q, k, v), _split_packed(packed, hq, hkv)):
        if got.storage_offset() != want.storage_offset() or got.stride() != want.stride():
            return None
    return packed


def _split_packed(qkv, hq, hkv):
    b, t, n = qkv.shape
    d = n // (hq + 2 * hkv)
    x = qkv.view(b, t, hq + 2 * hkv, d)
    return x[:, :, :hq], x[:, :, hq:hq + hkv], x[:, :, hq + hkv:]


# ----------------------------------------------------------------------------- custom ops (torch.compile)
def _check_offsets_op(q, cos, offsets):
    """Inside the custom ops (real tensors; the traced wrapper cannot look at tensor values):
    the kernels index cos/sin at offsets[b] + t without bounds checks."""
    if cos is None or q.shape[0] == 0 or q.shape[1] == 0:
        return
    lo, hi = int(offsets.min()), int(offsets.max())
    if lo < 0 or hi + q.shape[1] > cos.shape[0]:
        raise ValueError(f"fastlayers.qkv_norm_rope: positions offset + t reach {hi + q.shape[1] - 1} (offsets "
                         f"{lo}..{hi}) but cos/sin hold {cos.shape[0]} positions")


@torch.library.custom_op("fastlayers::qkv_norm_rope_fwd", mutates_args=())
def _qkv_fwd_op(q: Tensor, k: Tensor, v: Tensor, qw: Optional[Tensor], kw: Optional[Tensor], vw: Optional[Tensor],
                cos: Optional[Tensor], sin: Optional[Tensor], offsets: Optional[Tensor], eps: float,
                backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(q_out, k_out, v_out); v_out is empty when vw is None (v passes through untouched)."""
    _check_offsets_op(q, cos, offsets)
    qo, ko, vo = _qkv_fwd(q, k, v, qw, kw, vw, cos, sin, offsets, eps, backend)
    return qo, ko, (v.new_empty(0) if vo is None else vo)


@_qkv_fwd_op.register_fake
def _(q, k, v, qw, kw, vw, cos, sin, offsets, eps, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), (v.new_empty(v.shape) if vw is not None else v.new_empty(0))


@torch.library.custom_op("fastlayers::qkv_norm_rope_bwd", mutates_args=())
def _qkv_bwd_op(dqo: Tensor, dko: Tensor, dvo: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                qw: Optional[Tensor], kw: Optional[Tensor], vw: Optional[Tensor], cos: Optional[Tensor],
                sin: Optional[Tensor], offsets: Optional[Tensor], eps: float,
                backend: str) -> List[Tensor]:
    """[dq, dk, dv, dqw, dkw, dvw]; entries for absent inputs are empty."""
    _check_offsets_op(q, cos, offsets)
    res = _qkv_bwd(dqo, dko, dvo, q, k, v, qw, kw, vw, cos, sin, offsets, eps, backend)
    return [q.new_empty(0) if g is None else g for g in res]


@_qkv_bwd_op.register_fake
def _(dqo, dko, dvo, q, k, v, qw, kw, vw, cos, sin, offsets, eps, backend):
    def like(t, present=True):
        return t.new_empty(t.shape) if (t is not None and present) else q.new_empty(0)
    return [like(q), like(k), like(v, vw is not None), like(qw), like(kw), like(vw)]


def _qkv_setup(ctx, inputs, output):
    q, k, v, qw, kw, vw, cos, sin, offsets, eps, backend = inputs
    ctx.save_for_backward(q, k, v, qw, kw, vw, cos, sin, offsets)
    ctx.cfg = (eps, backend, qw is not None, kw is not None, vw is not None)


def _qkv_op_backward(ctx, dqo, dko, dvo):
    q, k, v, qw, kw, vw, cos, sin, offsets = ctx.saved_tensors
    eps, backend, has_qw, has_kw, has_vw = ctx.cfg
    g = torch.ops.fastlayers.qkv_norm_rope_bwd(_zeros_if_none(dqo, q), _zeros_if_none(dko, k),
                                               _zeros_if_none(dvo, v) if has_vw else None,
                                               q, k, v, qw, kw, vw, cos, sin, offsets, eps, backend)
    return (g[0], g[1], g[2] if has_vw else None, g[3] if has_qw else None, g[4] if has_kw else None,
            g[5] if has_vw else None, None, None, None, None, None)


torch.library.register_autograd("fastlayers::qkv_norm_rope_fwd", _qkv_op_backward, setup_context=_qkv_setup)


# ----------------------------------------------------------------------------- public API
def _check_qkv(op, q, k, v, q_weight, k_weight, v_weight, cos, sin, eps, offset):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t)
        if t.dim() != 4:
            raise ValueError(f"fastlayers.{op}: {name} must be 4-D (batch, seqlen, heads, head_dim); "
                             f"got shape {tuple(t.shape)}")
    b, t, hq, d = q.shape
    if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"fastlayers.{op}: k must have shape ({b}, {t}, n_kv_heads, {d}) to match q "
                         f"{tuple(q.shape)}; got {tuple(k.shape)}")
    check_shape(op, "v", v, k.shape, " (the shape of k)")
    hkv = k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"fastlayers.{op}: the number of q heads ({hq}) must be a multiple of the number of "
                         f"k/v heads ({hkv})")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"fastlayers.{op}: q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight), ("v_weight", v_weight)):
        if w is not None:
            check_tensor(op, name, w)
            check_shape(op, name, w, (d,), " (head_dim)")
    if (cos is None) != (sin is None):
        raise ValueError(f"fastlayers.{op}: give both cos and sin, or neither (no rotation)")
    if cos is not None:
        if d % 2:
            raise ValueError(f"fastlayers.{op}: RoPE needs an even head_dim; got {d}")
        for name, c in (("cos", cos), ("sin", sin)):
            check_tensor(op, name, c)
            if c.dim() != 2 or c.shape[1] not in (d // 2, d):
                raise ValueError(f"fastlayers.{op}: {name} must have shape (positions, {d // 2}) (or "
                                 f"(positions, {d}) with both halves equal); got {tuple(c.shape)}")
        if sin.shape != cos.shape:
            raise ValueError(f"fastlayers.{op}: cos and sin must have one shape; got {tuple(cos.shape)} and "
                             f"{tuple(sin.shape)}")
        if isinstance(offset, torch.Tensor):
            if offset.dtype.is_floating_point or offset.dtype == torch.bool or offset.shape != (b,):
                raise ValueError(f"fastlayers.{op}: a tensor offset must be integer with shape ({b},); "
                                 f"got {offset.dtype} {tuple(offset.shape)}")
            check_plain(op, "offset", offset)
            if offset.device != q.device:
                raise ValueError(f"fastlayers.{op}: offset is on {offset.device} but q is on {q.device}")
            if not torch.compiler.is_compiling() and b > 0 and t > 0:
                lo, hi = int(offset.min()), int(offset.max())
                if lo < 0 or hi + t > cos.shape[0]:
                    raise ValueError(f"fastlayers.{op}: positions offset + t reach {hi + t - 1} (offsets "
                                     f"{lo}..{hi}) but cos/sin hold {cos.shape[0]} positions")
        elif isinstance(offset, numbers.Integral) and not isinstance(offset, bool):
            if offset < 0 or offset + t > cos.shape[0]:
                raise ValueError(f"fastlayers.{op}: positions {offset}..{offset + t - 1} do not fit the "
                                 f"{cos.shape[0]} positions of cos/sin")
        else:
            raise TypeError(f"fastlayers.{op}: offset must be an int or an integer tensor; got "
                            f"{type(offset).__name__}")
    check_positive(op, "eps", eps)
    check_same_device(op, q, k=k, v=v, q_weight=q_weight, k_weight=k_weight, v_weight=v_weight, cos=cos, sin=sin)


def _tables(cos, sin, d, acc):
    if cos is None:
        return None, None
    return cos[:, : d // 2].to(acc).contiguous(), sin[:, : d // 2].to(acc).contiguous()


def _offsets(offset, b, device):
    if isinstance(offset, torch.Tensor):
        return offset.to(torch.int64).contiguous()
    return torch.full((b,), int(offset), dtype=torch.int64, device=device)


def qkv_norm_rope(q, k, v, q_weight, k_weight, v_weight, cos, sin, eps=1e-5, offset=0):
    """Per-head RMSNorm of q, k and v over head_dim, then RoPE on q and k, in one pass per tensor.

    q ``(B, T, Hq, D)``, k and v ``(B, T, Hkv, D)`` with Hkv dividing Hq; any strides
    with a contiguous last dim (e.g. views into one fused QKV projection output — no
    copy is made). ``*_weight``: ``(D,)`` gains shared by the heads, or None for no
    norm on that tensor (``v_weight=None``: QK-norm only, v passes through).
    ``cos``/``sin``: ``(S, D/2)`` tables (:func:`fastlayers.reference.rope_tables`;
    ``(S, D)`` HF-style tables are accepted), or both None for no rotation; token t
    of sequence b is at position ``offset + t`` (``offset``: int or ``(B,)`` integer
    tensor, for decoding with a KV cache). RoPE pairs channel i with i + D/2.

    Returns ``(q, k, v)``, each a new contiguous ``(B, T, H, D)`` tensor in the
    input dtype (v itself when ``v_weight`` is None). When q, k and v are the three
    head ranges of one fused projection output, the backward writes that tensor's
    gradient as one buffer (as :func:`qkv_norm_rope_packed` does). This is the layout the
    attention kernels want: pass ``x.transpose(1, 2)`` to
    ``torch.nn.functional.scaled_dot_product_attention``, whose CPU and flash
    kernels work on (B, T, H, D) memory directly. Math in fp32, rounded once.
    """
    op = "qkv_norm_rope"
    _check_qkv(op, q, k, v, q_weight, k_weight, v_weight, cos, sin, eps, offset)
    backend = resolve(op, q.device)
    if backend == "reference":
        return reference.qkv_norm_rope(q, k, v, q_weight, k_weight, v_weight, cos, sin, eps, offset)
    check_backend_dtype(op, backend, q.dtype)
    d = q.shape[-1]
    cos_t, sin_t = _tables(cos, sin, d, stat_dtype(q.dtype))
    offs = _offsets(offset, q.shape[0], q.device) if cos is not None else None
    if backend == "triton" and d % 2:
        raise ValueError(f"fastlayers.{op}: the triton kernels need an even head_dim; got {d} "
                         f"(the cpu and reference backends take any head_dim without RoPE)")
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    q_weight, k_weight, v_weight = (None if w is None else w.contiguous() for w in (q_weight, k_weight, v_weight))
    args = (q, k, v, q_weight, k_weight, v_weight, cos_t, sin_t, offs, float(eps), backend)
    if torch.compiler.is_compiling():
        qo, ko, vo = torch.ops.fastlayers.qkv_norm_rope_fwd(*args)
    elif needs_grad(q, k, v, q_weight, k_weight, v_weight):
        packed = _packed_base(q, k, v) if v_weight is not None else None
        if packed is not None:  # one gradient buffer instead of three summed by autograd
            qo, ko, vo = _QKVNormRopePacked.apply(packed, q.shape[2], k.shape[2], *args[3:])
        else:
            qo, ko, vo = _QKVNormRope.apply(*args)
    else:
        qo, ko, vo = _qkv_fwd(*args)
    return qo, ko, (v if v_weight is None else vo)


def qkv_norm_rope_packed(qkv, n_heads, n_kv_heads, q_weight, k_weight, v_weight, cos, sin, eps=1e-5, offset=0):
    """:func:`qkv_norm_rope` on one fused projection output ``qkv`` ``(B, T, (Hq + 2 Hkv) * D)``
    (q heads first, then k, then v). Same outputs; in eager mode the gradient of
    ``qkv`` is written as one buffer by the kernels. v is always returned as a new
    contiguous tensor."""
    op = "qkv_norm_rope"
    check_tensor(op, "qkv", qkv)
    per = n_heads + 2 * n_kv_heads
    if qkv.dim() != 3 or n_heads <= 0 or n_kv_heads <= 0 or qkv.shape[-1] % per:
        raise ValueError(f"fastlayers.{op}: qkv must be (batch, seqlen, (n_heads + 2 n_kv_heads) * head_dim) with "
                         f"n_heads={n_heads}, n_kv_heads={n_kv_heads}; got shape {tuple(qkv.shape)}")
    qkv = _last_contig(qkv)  # any batch/time strides: the kernels take them as they are
    q, k, v = _split_packed(qkv, n_heads, n_kv_heads)
    backend = resolve(op, qkv.device)
    if (backend == "reference" or torch.compiler.is_compiling()
            or not needs_grad(qkv, q_weight, k_weight, v_weight)):
        qo, ko, vo = qkv_norm_rope(q, k, v, q_weight, k_weight, v_weight, cos, sin, eps, offset)
        return qo, ko, (vo.contiguous() if v_weight is None else vo)
    _check_qkv(op, q, k, v, q_weight, k_weight, v_weight, cos, sin, eps, offset)
    check_backend_dtype(op, backend, qkv.dtype)
    if backend == "triton" and q.shape[-1] % 2:
        raise ValueError(f"fastlayers.{op}: the triton kernels need an even head_dim; got {q.shape[-1]}")
    q_weight, k_weight, v_weight = (None if w is None else w.contiguous() for w in (q_weight, k_weight, v_weight))
    cos_t, sin_t = _tables(cos, sin, q.shape[-1], stat_dtype(qkv.dtype))
    offs = _offsets(offset, q.shape[0], q.device) if cos is not None else None
    return _QKVNormRopePacked.apply(qkv, n_heads, n_kv_heads, q_weight, k_weight, v_weight, cos_t, sin_t, offs,
                                    float(eps), backend)


# ============================================================================= swiglu
def _swiglu_fwd(gate, up, backend):
    out = empty(gate.shape, gate.dtype, gate.device)
    load(backend).swiglu_fwd(rows(gate), rows(up), out.view(-1, gate.shape[-1]))
    return out


def _swiglu_bwd(dout, gate, up, backend, dgate=None, dup=None):
    if dgate is None:
        dgate = empty(gate.shape, gate.dtype, gate.device)
        dup = empty(up.shape, up.dtype, up.device)
    load(backend).swiglu_bwd(rows(dout), rows(gate), rows(up), _rows_view(dgate), _rows_view(dup))
    return dgate, dup


def _rows_view(t):
    """(M, F) view of an output buffer (a whole tensor or one half of a fused one); never a copy."""
    v = rows(t)
    assert v.data_ptr() == t.data_ptr() and (v.shape[0] <= 1 or v.stride(0) >= t.shape[-1]), "not a row view"
    return v


class _Swiglu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, backend):
        ctx.save_for_backward(gate, up)
        ctx.backend = backend
        return _swiglu_fwd(gate, up, backend)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        return (*_swiglu_bwd(dout, gate, up, ctx.backend), None)


class _SwigluFused(torch.autograd.Function):
    """One ``(..., 2F)`` input: the gradient is one buffer of that shape."""

    @staticmethod
    def forward(ctx, x, backend):
        f = x.shape[-1] // 2
        ctx.save_for_backward(x)
        ctx.backend = backend
        return _swiglu_fwd(x[..., :f], x[..., f:], backend)

    @staticmethod
    def backward(ctx, dout):
        (x,) = ctx.saved_tensors
        f = x.shape[-1] // 2
        dx = empty(x.shape, x.dtype, x.device)
        _swiglu_bwd(dout, x[..., :f], x[..., f:], ctx.backend, dx[..., :f], dx[..., f:])
        return dx, None


@torch.library.custom_op("fastlayers::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    return _swiglu_fwd(gate, up, backend)


@_swiglu_fwd_op.register_fake
def _(gate, up, backend):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("fastlayers::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dout: Tensor, gate: Tensor, up: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return _swiglu_bwd(dout, gate, up, backend)


@_swiglu_bwd_op.register_fake
def _(dout, gate, up, backend):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _swiglu_op_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    dgate, dup = torch.ops.fastlayers.swiglu_bwd(dout, gate, up, ctx.backend)
    return dgate, dup, None


torch.library.register_autograd("fastlayers::swiglu_fwd", _swiglu_op_backward, setup_context=_swiglu_setup)


def swiglu(gate, up=None):
    """``silu(gate) * up`` computed in fp32 and rounded once to gate's dtype.

    With ``up=None``, ``gate`` is one fused ``(..., 2F)`` tensor (e.g. the output
    of one ``gate_up`` projection): the first F channels are the gate, the last F
    the up projection; its gradient is then one ``(..., 2F)`` buffer.
    """
    op = "swiglu"
    check_tensor(op, "gate", gate)
    if gate.dim() == 0:
        raise ValueError(f"fastlayers.{op}: gate must have at least one dimension")
    fused = up is None
    if fused:
        if gate.shape[-1] % 2:
            raise ValueError(f"fastlayers.{op}: a fused gate/up tensor needs an even last dimension (2F); "
                             f"got shape {tuple(gate.shape)}")
        gate = _last_contig(gate)
    else:
        check_tensor(op, "up", up)
        check_shape(op, "up", up, gate.shape, " (the shape of gate)")
        if up.dtype != gate.dtype:
            raise TypeError(f"fastlayers.{op}: gate and up must share one dtype; got {gate.dtype} and {up.dtype}")
        check_same_device(op, gate, up=up)
    backend = resolve(op, gate.device)
    if backend == "reference" or gate.numel() == 0:
        return reference.swiglu(gate, up)
    check_backend_dtype(op, backend, gate.dtype)
    if fused:
        f = gate.shape[-1] // 2
        if torch.compiler.is_compiling():
            return torch.ops.fastlayers.swiglu_fwd(gate[..., :f], gate[..., f:], backend)
        if needs_grad(gate):
            return _SwigluFused.apply(gate, backend)
        return _swiglu_fwd(gate[..., :f], gate[..., f:], backend)
    gate, up = _last_contig(gate), _last_contig(up)
    if torch.compiler.is_compiling():
        return torch.ops.fastlayers.swiglu_fwd(gate, up, backend)
    if needs_grad(gate, up):
        return _Swiglu.apply(gate, up, backend)
    return _swiglu_fwd(gate, up, backend)


__all__ = ["qkv_norm_rope", "qkv_norm_rope_packed", "swiglu"]
