"""Fused residual add + RMSNorm / LayerNorm.

    h = x + residual            (or x)
    y = (h - mean(h)) * rstd * weight + bias     LayerNorm
    y = h * rsqrt(mean(h^2) + eps) * weight       RMSNorm

Eager calls go straight to the kernel (through a torch.autograd.Function when a
gradient is needed); while torch.compile traces, the same kernels run through
the registered custom ops ``fastlayers::norm_fwd`` / ``fastlayers::norm_bwd``.
"""
import math
import numbers
import sys
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .._alloc import empty
from .._dtypes import LOW_PRECISION, stat_dtype
from ..backend import resolve
from ..backends import load
from ._common import (_PLAIN_TYPES, GPU_DTYPES, check_positive, check_same_device, check_shape, check_tensor,
                      needs_grad, out_rows, rows)



# ----------------------------------------------------------------------------- kernels
def _fwd(x, residual, weight, bias, eps, is_rms, store_h, h_fp32, backend, out=None, h_out=None, op="norm",
         offset=0.0, round_xhat=False):
    """Allocate outputs and run the forward kernel. Returns y, h (or None), mean (or None), rstd."""
    n, dev = x.shape[-1], x.device
    stat = stat_dtype(x.dtype)
    x2 = rows(x)
    r2 = rows(residual) if residual is not None else None
    y = out if out is not None else empty(x.shape, x.dtype, dev)
    y2 = out_rows(op, "out", y, x.shape, x.dtype, dev) if out is not None else y.view(-1, n)
    h = h2 = None
    if store_h:
        h_dtype = torch.float32 if h_fp32 and x.dtype != torch.float64 else x.dtype
        h = h_out if h_out is not None else empty(x.shape, h_dtype, dev)
        h2 = out_rows(op, "residual_out", h, x.shape, h_dtype, dev) if h_out is not None else h.view(-1, n)
    mean = None if is_rms else torch.empty(x.shape[:-1], dtype=stat, device=dev)
    rstd = torch.empty(x.shape[:-1], dtype=stat, device=dev)
    load(backend).norm_fwd(x2, r2, None if weight is None else weight.contiguous(),
                           None if bias is None else bias.contiguous(), y2, h2,
                           None if mean is None else mean.view(-1), rstd.view(-1), float(eps), bool(is_rms),
                           float(offset), bool(round_xhat))
    return y, h, mean, rstd


def _bwd(dy, x, residual, weight, bias, mean, rstd, dh, is_rms, separate_dr, backend, offset=0.0, round_xhat=False):
    """Run the backward kernel. Returns dx, dresidual (or None), dweight (or None), dbias (or None)."""
    n, dev = x.shape[-1], x.device
    stat = stat_dtype(x.dtype)
    be = load(backend)
    x2 = rows(x)
    m = x2.shape[0]
    dx = empty(x.shape, x.dtype, dev)
    dr = empty(x.shape, residual.dtype, dev) if separate_dr else None
    parts = be.norm_bwd_parts(m, n, dev)
    dw_part = torch.empty(parts, n, dtype=stat, device=dev)  # written with or without a weight
    db_part = torch.empty(parts, n, dtype=stat, device=dev) if bias is not None else None
    be.norm_bwd(rows(dy), x2, None if residual is None else rows(residual),
                None if weight is None else weight.contiguous(),
                None if bias is None else bias.contiguous(), None if is_rms else mean.view(-1), rstd.view(-1),
                None if dh is None else rows(dh), dx.view(-1, n), None if dr is None else dr.view(-1, n),
                dw_part, db_part, bool(is_rms), float(offset), bool(round_xhat))
    dw = None if weight is None else dw_part.sum(0).to(weight.dtype)
    db = None if bias is None else db_part.sum(0).to(bias.dtype)
    return dx, dr, dw, db


def _grads(saved, cfg, dy, dh, bwd):
    """Shared backward of the eager Function and the custom op: maps (dy, dh) to input grads."""
    x, residual, weight, bias, mean, rstd = saved
    is_rms, store_h, backend, offset, round_xhat = cfg
    if dy is None:
        dy = torch.zeros_like(x)
    separate_dr = residual is not None and residual.dtype != x.dtype
    dx, dr, dw, db = bwd(dy, x, residual, weight, bias, mean, rstd, dh if store_h else None, is_rms,
                         separate_dr, backend, offset, round_xhat)
    d_res = None if residual is None else (dr if separate_dr else dx)
    return dx, d_res, (dw if weight is not None else None), (db if bias is not None else None)


class _NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms, store_h, h_fp32, backend, offset, round_xhat):
        y, h, mean, rstd = _fwd(x, residual, weight, bias, eps, is_rms, store_h, h_fp32, backend, offset=offset,
                                round_xhat=round_xhat)
        ctx.save_for_backward(x, residual, weight, bias, mean, rstd)
        ctx.cfg = (is_rms, store_h, backend, offset, round_xhat)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        return (*_grads(ctx.saved_tensors, ctx.cfg, dy, dh, _bwd), None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------- custom ops (torch.compile)
@torch.library.custom_op("fastlayers::norm_fwd", mutates_args=())
def norm_fwd_op(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                is_rms: bool, store_h: bool, h_fp32: bool, backend: str, offset: float = 0.0,
                round_xhat: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, h, mean, rstd); h and mean are empty when not produced."""
    y, h, mean, rstd = _fwd(x, residual, weight, bias, eps, is_rms, store_h, h_fp32, backend, offset=offset,
                            round_xhat=round_xhat)
    none = x.new_empty(0)
    return y, (none if h is None else h), (rstd.new_empty(0) if mean is None else mean), rstd


@norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, is_rms, store_h, h_fp32, backend, offset=0.0, round_xhat=False):
    stat = stat_dtype(x.dtype)
    y = x.new_empty(x.shape)
    h_dtype = torch.float32 if h_fp32 and x.dtype != torch.float64 else x.dtype
    h = x.new_empty(x.shape, dtype=h_dtype) if store_h else x.new_empty(0)
    mean = x.new_empty(x.shape[:-1], dtype=stat) if not is_rms else x.new_empty(0, dtype=stat)
    return y, h, mean, x.new_empty(x.shape[:-1], dtype=stat)


def _absent(x, like):
    """The empty tensor a custom op returns for a gradient it does not produce (dtype of ``like`` or x)."""
    return (x if like is None else like).new_empty(0)


@torch.library.custom_op("fastlayers::norm_bwd", mutates_args=())
def norm_bwd_op(dy: Tensor, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                mean: Tensor, rstd: Tensor, dh: Optional[Tensor], is_rms: bool, separate_dr: bool,
                backend: str, offset: float = 0.0, round_xhat: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual, dweight, dbias); dresidual/dweight/dbias are empty when not produced."""
    dx, dr, dw, db = _bwd(dy, x, residual, weight, bias, mean, rstd, dh, is_rms, separate_dr, backend, offset,
                          round_xhat)
    return dx, (x.new_empty(0) if dr is None else dr), (_absent(x, weight) if dw is None else dw), \
        (_absent(x, weight) if db is None else db)


@norm_bwd_op.register_fake
def _(dy, x, residual, weight, bias, mean, rstd, dh, is_rms, separate_dr, backend, offset=0.0, round_xhat=False):
    dr = x.new_empty(x.shape, dtype=residual.dtype) if separate_dr else x.new_empty(0)
    dw = weight.new_empty(weight.shape) if weight is not None else x.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else _absent(x, weight)
    return x.new_empty(x.shape), dr, dw, db


def _bwd_via_op(dy, x, residual, weight, bias, mean, rstd, dh, is_rms, separate_dr, backend, offset, round_xhat):
    dx, dr, dw, db = torch.ops.fastlayers.norm_bwd(dy, x, residual, weight, bias, mean, rstd, dh, is_rms,
                                                   separate_dr, backend, offset, round_xhat)
    return dx, (dr if separate_dr else None), (dw if weight is not None else None), \
        (db if bias is not None else None)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms, store_h, h_fp32, backend, *rest = inputs
    offset, round_xhat = (tuple(rest) + (0.0, False)[len(rest):])[:2]
    _, _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, bias, mean, rstd)
    ctx.cfg = (is_rms, store_h, backend, offset, round_xhat)


def _op_backward(ctx, dy, dh, dmean, drstd):
    return (*_grads(ctx.saved_tensors, ctx.cfg, dy, dh, _bwd_via_op), None, None, None, None, None, None, None)


torch.library.register_autograd("fastlayers::norm_fwd", _op_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- DTensor
class _OwnGrad(torch.autograd.Function):
    """Identity whose backward hands on a copy of the gradient. The norm's backward returns one tensor as
    the gradient of both x and residual; DTensor.to_local's backward wraps it twice, and the two DTensor
    grads would share memory (a later accumulation into one would add to the other)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g.clone()


def _dtensor_type():
    """torch's DTensor class once torch.distributed.tensor is imported (no DTensor exists before), else None."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _norm_dtensor(op, DTensor, x, weight, bias, residual, out, residual_out, run):
    """The norm of a DTensor x: each rank normalises the rows of its local shard (rows are never split:
    x must not be sharded on its last dimension), the result is a DTensor with x's placements. weight
    and bias are Replicate DTensors on x's mesh or plain tensors; their gradients are partial sums over
    the mesh dims that shard x (Partial placements, as torch's own rms_norm on DTensors gives; a plain
    tensor gets the all-reduced sum)."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    for name, t in (("out", out), ("residual_out", residual_out)):
        if t is not None:
            raise TypeError(f"fastlayers.{op}: {name}= is not supported with DTensor arguments (call without it)")
    if not isinstance(x, DTensor):
        name = next(n for n, t in (("weight", weight), ("bias", bias), ("residual", residual))
                    if isinstance(t, DTensor))
        raise TypeError(f"fastlayers.{op}: {name} is a DTensor but x is a {type(x).__name__}; pass x as a DTensor "
                        f"on the same mesh, or {name}.to_local() / {name}.full_tensor()")
    mesh, placements, nd = x.device_mesh, tuple(x.placements), x.dim()
    for p in placements:
        if isinstance(p, Shard) and nd and p.dim % nd == nd - 1:
            raise ValueError(f"fastlayers.{op}: x is a DTensor sharded on its last (normalised) dimension "
                             f"(placements {placements}); each rank would normalise part of a row. Shard it on "
                             f"another dimension or redistribute it first, e.g. x.redistribute(placements="
                             f"[Replicate()])")
        if not (isinstance(p, Shard) or p.is_replicate()):
            raise ValueError(f"fastlayers.{op}: x is a DTensor with placements {placements}; supported: Shard on a "
                             f"dimension other than the last, and Replicate (redistribute a Partial one first)")
    for name, t in (("weight", weight), ("bias", bias)):
        if isinstance(t, DTensor):
            if t.device_mesh != mesh:
                raise ValueError(f"fastlayers.{op}: {name} is a DTensor on another device mesh than x")
            if not all(p.is_replicate() for p in t.placements):
                raise ValueError(f"fastlayers.{op}: {name} must be a Replicate DTensor (every rank holds all of "
                                 f"it); got placements {tuple(t.placements)}")
    if residual is not None and (not isinstance(residual, DTensor) or residual.device_mesh != mesh
                                 or tuple(residual.placements) != placements or residual.shape != x.shape):
        raise ValueError(f"fastlayers.{op}: residual must be a DTensor of x's shape, mesh and placements "
                         f"({placements}); got {type(residual).__name__} "
                         f"{tuple(getattr(residual, 'placements', ()))}")
    grad_placements = [Partial() if isinstance(p, Shard) else Replicate() for p in placements]

    def local_param(t):
        if t is None:
            return None
        if not isinstance(t, DTensor):
            if not (torch.is_grad_enabled() and t.requires_grad):
                return t
            t = DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)
        return t.to_local(grad_placements=grad_placements)

    res = run(x.to_local(), local_param(weight), local_param(bias),
              None if residual is None else _OwnGrad.apply(residual.to_local()))
    stride, acc = [], 1
    for d in reversed(x.shape):
        stride.insert(0, acc)
        acc *= max(int(d), 1)

    def wrap(t):
        return DTensor.from_local(t, mesh, placements, run_check=False, shape=x.shape, stride=tuple(stride))
    return tuple(wrap(t) for t in res) if isinstance(res, tuple) else wrap(res)


# ----------------------------------------------------------------------------- public API
CASTING_MODES = ("gemma", "llama", "none")


def _norm(op, x, weight, bias, eps, residual, prenorm, residual_in_fp32, is_rms, out, residual_out, offset=0.0,
          casting_mode="gemma"):
    if type(x) is not torch.Tensor or not (weight is None or type(weight) in _PLAIN_TYPES):
        DTensor = _dtensor_type()
        if DTensor is not None and any(isinstance(t, DTensor) for t in (x, weight, bias, residual)):
            return _norm_dtensor(op, DTensor, x, weight, bias, residual, out, residual_out,
                                 lambda xl, wl, bl, rl: _norm(op, xl, wl, bl, eps, rl, prenorm, residual_in_fp32,
                                                              is_rms, None, None, offset, casting_mode))
    check_tensor(op, "x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"fastlayers.{op}: x must have a non-empty last (normalised) dimension; "
                         f"got shape {tuple(x.shape)}")
    n = x.shape[-1]
    if weight is not None:
        check_tensor(op, "weight", weight)
        check_shape(op, "weight", weight, (n,), " (x's last dimension)")
    if bias is not None:
        check_tensor(op, "bias", bias)
        check_shape(op, "bias", bias, (n,), " (x's last dimension)")
    if residual is not None:
        check_tensor(op, "residual", residual)
        check_shape(op, "residual", residual, x.shape, " (the shape of x)")
        if residual.dtype != x.dtype and not (residual_in_fp32 and residual.dtype == torch.float32):
            raise TypeError(f"fastlayers.{op}: residual dtype {residual.dtype} does not match x dtype {x.dtype} "
                            f"(a float32 residual is accepted with residual_in_fp32=True)")
    check_same_device(op, x, weight=weight, bias=bias, residual=residual, out=out, residual_out=residual_out)
    check_positive(op, "eps", eps)
    if isinstance(offset, bool) or not isinstance(offset, numbers.Real) or not math.isfinite(offset):
        raise ValueError(f"fastlayers.{op}: offset must be a finite number (the gain is offset + weight); "
                         f"got {offset!r}")
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"fastlayers.{op}: casting_mode must be one of {', '.join(map(repr, CASTING_MODES))}; "
                         f"got {casting_mode!r}")
    if residual_out is not None and not prenorm:
        raise ValueError(f"fastlayers.{op}: residual_out is only written with prenorm=True")

    backend = resolve(op, x.device)
    if backend != "reference" and backend != "cpu" and x.dtype not in GPU_DTYPES:
        raise TypeError(f"fastlayers.{op}: backend {backend!r} supports float32, float16 and bfloat16; "
                        f"got {x.dtype} (use the cpu or reference backend)")
    grad = needs_grad(x, residual, weight, bias)
    if (out is not None or residual_out is not None) and grad:
        raise RuntimeError(f"fastlayers.{op}: out=/residual_out= do not support automatic differentiation; "
                           f"call without them or under torch.no_grad()")

    if backend == "reference":
        res = reference.norm(x, weight, bias, eps, residual, prenorm, residual_in_fp32, is_rms, offset, casting_mode)
        if out is None and residual_out is None:
            return res
        y, h = res if prenorm else (res, None)
        if out is not None:
            y = out.copy_(y)
        if residual_out is not None:
            h = residual_out.copy_(h)
        return (y, h) if prenorm else y

    offset = float(offset)
    round_xhat = casting_mode == "llama" and x.dtype in LOW_PRECISION  # a no-op for fp32/fp64 x
    if torch.compiler.is_compiling():
        y, h, _, _ = torch.ops.fastlayers.norm_fwd(x, residual, weight, bias, float(eps), is_rms, prenorm,
                                                    residual_in_fp32, backend, offset, round_xhat)
    elif grad:
        y, h = _NormFunction.apply(x, residual, weight, bias, eps, is_rms, prenorm, residual_in_fp32, backend,
                                   offset, round_xhat)
    else:
        y, h, _, _ = _fwd(x, residual, weight, bias, eps, is_rms, prenorm, residual_in_fp32, backend,
                          out=out, h_out=residual_out, op=op, offset=offset, round_xhat=round_xhat)
    return (y, h) if prenorm else y


def rms_norm(x, weight, eps=1e-6, residual=None, prenorm=False, residual_in_fp32=False, *, out=None,
             residual_out=None, offset=0.0, casting_mode="gemma"):
    """Fused ``h = x + residual``; ``y = h * rsqrt(mean(h^2) + eps) * (offset + weight)``.

    Returns ``y`` (dtype of x), or ``(y, h)`` with ``prenorm=True``; ``h`` is fp32
    with ``residual_in_fp32=True`` (then a fp32 ``residual`` is accepted too).
    Without ``prenorm`` the kernel never writes ``h``. ``out``/``residual_out``
    receive the results in place (no autograd). Statistics are computed in fp32.

    ``weight=None``: no gain (``y = xhat``; offset unused), as ``torch.nn.RMSNorm(elementwise_affine=False)``.
    ``offset``: Gemma's ``(1 + weight)`` gain with ``offset=1.0`` (Liger's ``offset``); the weight's
    gradient is the same as without it. ``casting_mode`` (Liger's): ``"gemma"`` (default, and what
    ``torch.nn.RMSNorm`` computes) keeps everything in fp32 and rounds y once; ``"llama"`` rounds xhat to
    x's dtype before the gain multiplies it (Llama's ``weight * hidden.to(input_dtype)``; dweight then sums
    dy times that rounded xhat); the two differ only for fp16/bf16 x. ``"none"`` is accepted and computed
    as ``"gemma"``: the kernels never do arithmetic in 16 bits.

    x may be a DTensor sharded on any dimension but the last (or replicated), with weight a Replicate
    DTensor or a plain tensor: each rank normalises its local rows and the result is a DTensor with x's
    placements. Other tensor subclasses whose ``data_ptr()`` is not their data are refused (TypeError).
    """
    return _norm("rms_norm", x, weight, None, eps, residual, prenorm, residual_in_fp32, True, out, residual_out,
                 offset, casting_mode)


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None, prenorm=False, residual_in_fp32=False, *, out=None,
               residual_out=None):
    """Fused ``h = x + residual``; ``y = (h - mean(h)) * rsqrt(var(h) + eps) * weight + bias``.

    Same conventions as :func:`rms_norm` (``weight=None``: no gain; DTensors as there).
    """
    return _norm("layer_norm", x, weight, bias, eps, residual, prenorm, residual_in_fp32, False, out,
                 residual_out)
