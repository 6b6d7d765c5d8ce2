"""Depthwise causal conv1d (the short convolution of Mamba and Mamba-2) and its decode step.

``causal_conv1d`` is Tri Dao's ``causal_conv1d_fn``: x ``(batch, dim, seqlen)``, weight
``(dim, width)`` with width 2..4, optional bias, silu, initial and final states; forward and
backward. ``causal_conv1d_update`` is ``causal_conv1d_update``: one (or a few) decode steps
that shift the new inputs into ``conv_state`` in place. x may be time-contiguous or
channel-last (a ``(batch, seqlen, dim)`` tensor transposed, as Mamba-2 passes it): both are
read in place and the outputs keep x's layout.

Eager calls go straight to the kernels (through a torch.autograd.Function when a gradient
is needed); while torch.compile traces, the same kernels run through the custom ops
``fastlayers::causal_conv1d_fwd``/``_bwd`` and ``fastlayers::causal_conv1d_update``.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .._alloc import empty
from .._dtypes import stat_dtype
from ..backend import resolve
from ..backends import load
from ._common import check_backend_dtype, check_same_device, check_tensor, needs_grad

MAX_WIDTH = 4


# ----------------------------------------------------------------------------- layouts
def _fits(t, channel_last):
    """Whether the kernels can read ``t`` (B, C, L) in place in the given layout."""
    if channel_last:
        return t.shape[1] <= 1 or t.stride(1) == 1
    return t.shape[2] <= 1 or t.stride(2) == 1


def _is_channel_last(x):
    """The layout the kernels use for x: time-contiguous when they can, else channel-last."""
    return not _fits(x, False)


def _prep(x):
    """x itself when time-contiguous or channel-last, else one explicit copy (time-contiguous)."""
    return x if _fits(x, False) or _fits(x, True) else x.contiguous()


def _to_layout(t, channel_last):
    """``t`` in the layout of x (one copy when it differs: e.g. a time-contiguous gradient of a
    channel-last output)."""
    if _fits(t, channel_last):
        return t
    if channel_last:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.contiguous()


def _new(x, channel_last, alloc=None):
    """A new (B, C, L) tensor in x's dtype and layout (channel-last: (B, L, C) memory). Allocated with
    those strides, not as a transposed view: an output the autograd Function returns must not be a view
    created inside it, or the caller's ``out += ...`` fails (causal-conv1d's own tests do that)."""
    alloc = alloc or empty
    b, c, t = x.shape
    if channel_last:
        return alloc((b, c, t), x.dtype, x.device, (t * c, 1, c))
    return alloc((b, c, t), x.dtype, x.device)


def _fake_alloc(shape, dtype, device, stride=None):
    if stride is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty_strided(shape, stride, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- kernels
def _fwd(x, weight, bias, init, silu, want_final, backend):
    """(out, final_states or None)."""
    x = _prep(x)
    cl = _is_channel_last(x)
    out = _new(x, cl)
    final = empty((x.shape[0], x.shape[1], weight.shape[1] - 1), x.dtype, x.device) if want_final else None
    load(backend).causal_conv1d_fwd(x, weight, bias, init, out, final, silu)
    return out, final


def _bwd(dout, dfinal, x, weight, bias, init, silu, backend, want_dinit=True):
    """(dx, dweight, dbias or None, dinitial_states or None)."""
    be = load(backend)
    x = _prep(x)
    cl = _is_channel_last(x)
    dout = _to_layout(dout, cl)
    b, c, t = x.shape
    dx = _new(x, cl)
    dinit = empty(init.shape, init.dtype, init.device) if (init is not None and want_dinit) else None
    acc = stat_dtype(x.dtype)
    parts = be.causal_conv1d_bwd_parts(b, c, t, x.device)
    dw_part = empty((parts, c, weight.shape[1]), acc, x.device)
    db_part = empty((parts, c), acc, x.device) if bias is not None else None
    be.causal_conv1d_bwd(dout, dfinal, x, weight, bias, init, silu, dx, dinit, dw_part, db_part)
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db, dinit


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, init, silu, want_final, backend):
        x = _prep(x)  # saved as the kernels read it: the backward does not copy it again
        out, final = _fwd(x, weight, bias, init, silu, want_final, backend)
        ctx.save_for_backward(x, weight, bias, init)
        ctx.cfg = (silu, backend)
        ctx.set_materialize_grads(False)
        return (out, final) if want_final else out

    @staticmethod
    def backward(ctx, dout, dfinal=None):
        x, weight, bias, init = ctx.saved_tensors
        silu, backend = ctx.cfg
        if dout is None:
            dout = torch.zeros_like(x)
        dx, dw, db, dinit = _bwd(dout, dfinal, x, weight, bias, init, silu, backend,
                                 want_dinit=ctx.needs_input_grad[3])
        return dx, dw, db, dinit, None, None, None


# ----------------------------------------------------------------------------- custom ops (torch.compile)
@torch.library.custom_op("fastlayers::causal_conv1d_fwd", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_states: Optional[Tensor], silu: bool,
            return_final_states: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """(out, final_states); final_states is empty unless asked for."""
    out, final = _fwd(x, weight, bias, initial_states, silu, return_final_states, backend)
    return out, (x.new_empty(0) if final is None else final)


@_fwd_op.register_fake
def _(x, weight, bias, initial_states, silu, return_final_states, backend):
    x = _prep(x)
    out = _new(x, _is_channel_last(x), _fake_alloc)
    final = x.new_empty((x.shape[0], x.shape[1], weight.shape[1] - 1)) if return_final_states else x.new_empty(0)
    return out, final


@torch.library.custom_op("fastlayers::causal_conv1d_bwd", mutates_args=())
def _bwd_op(dout: Tensor, dfinal_states: Optional[Tensor], x: Tensor, weight: Tensor, bias: Optional[Tensor],
            initial_states: Optional[Tensor], silu: bool, backend: str) -> List[Tensor]:
    """[dx, dweight, dbias, dinitial_states]; entries for absent inputs are empty."""
    res = _bwd(dout, dfinal_states, x, weight, bias, initial_states, silu, backend)
    return [x.new_empty(0) if g is None else g for g in res]


@_bwd_op.register_fake
def _(dout, dfinal_states, x, weight, bias, initial_states, silu, backend):
    x = _prep(x)
    return [_new(x, _is_channel_last(x), _fake_alloc), weight.new_empty(weight.shape),
            x.new_empty(0) if bias is None else bias.new_empty(bias.shape),
            x.new_empty(0) if initial_states is None else initial_states.new_empty(initial_states.shape)]


def _conv_setup(ctx, inputs, output):
    x, weight, bias, init, silu, want_final, backend = inputs
    ctx.save_for_backward(x, weight, bias, init)
    ctx.cfg = (silu, want_final, backend)


def _conv_op_backward(ctx, dout, dfinal):
    x, weight, bias, init = ctx.saved_tensors
    silu, want_final, backend = ctx.cfg
    if dout is None:
        dout = torch.zeros_like(x)
    g = torch.ops.fastlayers.causal_conv1d_bwd(dout, dfinal if want_final else None, x, weight, bias, init,
                                               silu, backend)
    return (g[0], g[1], g[2] if bias is not None else None, g[3] if init is not None else None,
            None, None, None)


torch.library.register_autograd("fastlayers::causal_conv1d_fwd", _conv_op_backward, setup_context=_conv_setup)


def _update(x, conv_state, weight, bias, silu, backend):
    out = empty(x.shape, x.dtype, x.device)
    load(backend).causal_conv1d_update(x, conv_state, weight, bias, out, silu)
    return out


@torch.library.custom_op("fastlayers::causal_conv1d_update", mutates_args=("conv_state",))
def _update_op(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
               backend: str) -> Tensor:
    return _update(x, conv_state, weight, bias, silu, backend)


@_update_op.register_fake
def _(x, conv_state, weight, bias, silu, backend):
    return x.new_empty(x.shape)


# ----------------------------------------------------------------------------- public API
def _check_silu(op, activation):
    if activation is None:
        return False
    if isinstance(activation, str) and activation in ("silu", "swish"):
        return True
    raise ValueError(f"fastlayers.{op}: activation must be None, 'silu' or 'swish'; got {activation!r}")


def _check_weight(op, weight, bias, dim):
    check_tensor(op, "weight", weight)
    if weight.dim() != 2 or weight.shape[0] != dim or not 2 <= weight.shape[1] <= MAX_WIDTH:
        raise ValueError(f"fastlayers.{op}: weight must have shape ({dim}, width) with width 2, 3 or 4 "
                         f"(dim = {dim}); got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias)
        if tuple(bias.shape) != (dim,):
            raise ValueError(f"fastlayers.{op}: bias must have shape ({dim},) (dim); got {tuple(bias.shape)}")


def _unsupported(op, **kw):
    for name, v in kw.items():
        if v is not None:
            raise NotImplementedError(f"fastlayers.{op}: {name} is not supported (pass None)")


def _check_conv(op, x, weight, bias, activation, initial_states, return_final_states):
    check_tensor(op, "x", x)
    if x.dim() != 3:
        raise ValueError(f"fastlayers.{op}: x must be 3-D (batch, dim, seqlen); got shape {tuple(x.shape)}")
    b, d, seqlen = x.shape
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] != d and weight.shape[0] == seqlen:
        raise ValueError(f"fastlayers.{op}: x {tuple(x.shape)} looks like (batch, seqlen, dim) = "
                         f"({b}, {d}, {seqlen}) with dim = {seqlen} from weight {tuple(weight.shape)}; x must be "
                         f"(batch, dim, seqlen): pass x.transpose(1, 2) (read in place, no copy)")
    _check_weight(op, weight, bias, d)
    silu = _check_silu(op, activation)
    if initial_states is not None:
        check_tensor(op, "initial_states", initial_states)
        want = (b, d, weight.shape[1] - 1)
        if tuple(initial_states.shape) != want:
            raise ValueError(f"fastlayers.{op}: initial_states must have shape {want} (batch, dim, width - 1); "
                             f"got {tuple(initial_states.shape)}")
        if initial_states.dtype != x.dtype:
            raise TypeError(f"fastlayers.{op}: initial_states must have the dtype of x ({x.dtype}); "
                            f"got {initial_states.dtype}")
    if not isinstance(return_final_states, bool):
        raise TypeError(f"fastlayers.{op}: return_final_states must be a bool; got "
                        f"{type(return_final_states).__name__}")
    check_same_device(op, x, weight=weight, bias=bias, initial_states=initial_states)
    return silu


def causal_conv1d(x, weight, bias=None, activation=None, initial_states=None, return_final_states=False, *,
                  seq_idx=None):
    """Depthwise causal conv1d, Tri Dao's ``causal_conv1d_fn``:
    ``out[b, c, t] = act(bias[c] + sum_k weight[c, k] * x[b, c, t - (width - 1) + k])``.

    x ``(batch, dim, seqlen)``, time-contiguous or channel-last (a ``(batch, seqlen, dim)``
    tensor transposed; read in place, out keeps its layout); weight ``(dim, width)``, width
    2..4; bias ``(dim,)``; ``activation`` None or ``"silu"``/``"swish"``. x at negative times
    is taken from ``initial_states`` ``(batch, dim, width - 1)`` (zeros when None). With
    ``return_final_states`` returns ``(out, final_states)``: the last ``width - 1`` inputs
    ``(batch, dim, width - 1)`` (reaching into ``initial_states`` when seqlen < width - 1), the
    ``conv_state`` to continue with :func:`causal_conv1d_update`. Math in fp32 (fp64 for fp64
    x), rounded once to x's dtype; differentiable in x, weight, bias and initial_states.
    """
    op = "causal_conv1d"
    _unsupported(op, seq_idx=seq_idx)
    silu = _check_conv(op, x, weight, bias, activation, initial_states, return_final_states)
    backend = resolve(op, x.device)
    if backend == "reference" or x.numel() == 0:
        return reference.causal_conv1d(x, weight, bias, activation, initial_states, return_final_states)
    check_backend_dtype(op, backend, x.dtype)
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    args = (x, weight, bias, initial_states, silu, return_final_states, backend)
    if torch.compiler.is_compiling():
        out, final = torch.ops.fastlayers.causal_conv1d_fwd(*args)
        return (out, final) if return_final_states else out
    if needs_grad(x, weight, bias, initial_states):
        return _CausalConv1d.apply(*args)
    out, final = _fwd(*args)
    return (out, final) if return_final_states else out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, *, cache_seqlens=None,
                         conv_state_indices=None):
    """Decode step of :func:`causal_conv1d` (Tri Dao's ``causal_conv1d_update``).

    x ``(batch, dim)`` or ``(batch, dim, seqlen)`` new inputs; ``conv_state`` ``(batch, dim,
    state_len)`` with ``state_len >= width - 1`` and x's dtype, the latest inputs (e.g. the
    ``final_states`` of a prefill), updated in place: shifted left by seqlen, x appended.
    Returns the conv outputs of the new steps, shaped like x. Everything is validated before
    the state is touched. Forward only: the output carries no gradient.
    """
    op = "causal_conv1d_update"
    _unsupported(op, cache_seqlens=cache_seqlens, conv_state_indices=conv_state_indices)
    check_tensor(op, "x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"fastlayers.{op}: x must be (batch, dim) or (batch, dim, seqlen); got shape "
                         f"{tuple(x.shape)}")
    b, d = x.shape[:2]
    _check_weight(op, weight, bias, d)
    silu = _check_silu(op, activation)
    check_tensor(op, "conv_state", conv_state)
    width = weight.shape[1]
    if conv_state.dim() != 3 or conv_state.shape[:2] != (b, d) or conv_state.shape[2] < width - 1:
        raise ValueError(f"fastlayers.{op}: conv_state must have shape ({b}, {d}, state_len) with state_len >= "
                         f"width - 1 = {width - 1}; got {tuple(conv_state.shape)}")
    if conv_state.dtype != x.dtype:
        raise TypeError(f"fastlayers.{op}: conv_state must have the dtype of x ({x.dtype}) to be updated in "
                        f"place; got {conv_state.dtype}")
    check_same_device(op, x, conv_state=conv_state, weight=weight, bias=bias)
    backend = resolve(op, x.device)
    if backend == "reference":
        return reference.causal_conv1d_update(x, conv_state, weight, bias, activation)
    check_backend_dtype(op, backend, x.dtype)
    squeeze = x.dim() == 2
    x3 = x[..., None] if squeeze else x
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if torch.compiler.is_compiling():
        out = torch.ops.fastlayers.causal_conv1d_update(x3, conv_state, weight, bias, silu, backend)
    else:
        out = _update(x3.detach(), conv_state, weight.detach(), None if bias is None else bias.detach(), silu,
                      backend)
    return out[..., 0] if squeeze else out


__all__ = ["causal_conv1d", "causal_conv1d_update"]
