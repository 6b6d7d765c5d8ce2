"""Depthwise causal conv1d (the short convolution of Mamba and Mamba-2) and its decode step.

``causal_conv1d`` is Tri Dao's ``causal_conv1d_fn``: x ``(batch, dim, seqlen)``, weight
``(dim, width)`` with width 2..4, optional bias, silu, initial and final states; forward and
backward. ``causal_conv1d_update`` is ``causal_conv1d_update``: one (or a few) decode steps
that shift the new inputs into ``conv_state`` in place. x may be time-contiguous or
channel-last (a ``(batch, seqlen, dim)`` tensor transposed, as Mamba-2 passes it): both are
read in place and the outputs keep x's layout. Also causal-conv1d's serving options: ``seq_idx``
(packed sequences, forward and backward), ``cache_seqlens`` (circular conv_state) and
``conv_state_indices`` (continuous batching) of the update, and ``causal_conv1d_varlen_states``.

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
def _fwd(x, weight, bias, init, silu, want_final, backend, seq_idx=None):
    """(out, final_states or None)."""
    x = _prep(x)
    cl = _is_channel_last(x)
    out = _new(x, cl)
    final = empty((x.shape[0], x.shape[1], weight.shape[1] - 1), x.dtype, x.device) if want_final else None
    if seq_idx is None:
        load(backend).causal_conv1d_fwd(x, weight, bias, init, out, final, silu)
    else:
        load(backend).causal_conv1d_fwd(x, weight, bias, init, out, final, silu, seq_idx=seq_idx)
    return out, final


def _bwd(dout, dfinal, x, weight, bias, init, silu, backend, want_dinit=True, seq_idx=None):
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
    if seq_idx is None:
        be.causal_conv1d_bwd(dout, dfinal, x, weight, bias, init, silu, dx, dinit, dw_part, db_part)
    else:
        be.causal_conv1d_bwd(dout, dfinal, x, weight, bias, init, silu, dx, dinit, dw_part, db_part,
                             seq_idx=seq_idx)
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db, dinit


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, init, silu, want_final, backend, seq_idx=None):
        x = _prep(x)  # saved as the kernels read it: the backward does not copy it again
        out, final = _fwd(x, weight, bias, init, silu, want_final, backend, seq_idx)
        ctx.save_for_backward(x, weight, bias, init, seq_idx)
        ctx.cfg = (silu, backend)
        ctx.set_materialize_grads(False)
        return (out, final) if want_final else out

    @staticmethod
    def backward(ctx, dout, dfinal=None):
        x, weight, bias, init, seq_idx = ctx.saved_tensors
        silu, backend = ctx.cfg
        if dout is None:
            dout = torch.zeros_like(x)
        dx, dw, db, dinit = _bwd(dout, dfinal, x, weight, bias, init, silu, backend,
                                 want_dinit=ctx.needs_input_grad[3], seq_idx=seq_idx)
        return dx, dw, db, dinit, None, None, None, None


# ----------------------------------------------------------------------------- custom ops (torch.compile)
@torch.library.custom_op("fastlayers::causal_conv1d_fwd", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_states: Optional[Tensor], silu: bool,
            return_final_states: bool, backend: str, seq_idx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(out, final_states); final_states is empty unless asked for."""
    out, final = _fwd(x, weight, bias, initial_states, silu, return_final_states, backend, seq_idx)
    return out, (x.new_empty(0) if final is None else final)


@_fwd_op.register_fake
def _(x, weight, bias, initial_states, silu, return_final_states, backend, seq_idx=None):
    x = _prep(x)
    out = _new(x, _is_channel_last(x), _fake_alloc)
    final = x.new_empty((x.shape[0], x.shape[1], weight.shape[1] - 1)) if return_final_states else x.new_empty(0)
    return out, final


@torch.library.custom_op("fastlayers::causal_conv1d_bwd", mutates_args=())
def _bwd_op(dout: Tensor, dfinal_states: Optional[Tensor], x: Tensor, weight: Tensor, bias: Optional[Tensor],
            initial_states: Optional[Tensor], silu: bool, backend: str,
            seq_idx: Optional[Tensor] = None) -> List[Tensor]:
    """[dx, dweight, dbias, dinitial_states]; entries for absent inputs are empty."""
    res = _bwd(dout, dfinal_states, x, weight, bias, initial_states, silu, backend, seq_idx=seq_idx)
    return [x.new_empty(0) if g is None else g for g in res]


@_bwd_op.register_fake
def _(dout, dfinal_states, x, weight, bias, initial_states, silu, backend, seq_idx=None):
    x = _prep(x)
    return [_new(x, _is_channel_last(x), _fake_alloc), weight.new_empty(weight.shape),
            x.new_empty(0) if bias is None else bias.new_empty(bias.shape),
            x.new_empty(0) if initial_states is None else initial_states.new_empty(initial_states.shape)]


def _conv_setup(ctx, inputs, output):
    x, weight, bias, init, silu, want_final, backend, seq_idx = inputs
    ctx.save_for_backward(x, weight, bias, init, seq_idx)
    ctx.cfg = (silu, want_final, backend)


def _conv_op_backward(ctx, dout, dfinal):
    x, weight, bias, init, seq_idx = ctx.saved_tensors
    silu, want_final, backend = ctx.cfg
    if dout is None:
        dout = torch.zeros_like(x)
    g = torch.ops.fastlayers.causal_conv1d_bwd(dout, dfinal if want_final else None, x, weight, bias, init,
                                               silu, backend, seq_idx)
    return (g[0], g[1], g[2] if bias is not None else None, g[3] if init is not None else None,
            None, None, None, None)


torch.library.register_autograd("fastlayers::causal_conv1d_fwd", _conv_op_backward, setup_context=_conv_setup)


def _update(x, conv_state, weight, bias, silu, backend, cache_seqlens=None, conv_state_indices=None):
    out = empty(x.shape, x.dtype, x.device)
    if cache_seqlens is None and conv_state_indices is None:
        load(backend).causal_conv1d_update(x, conv_state, weight, bias, out, silu)
    else:
        load(backend).causal_conv1d_update(x, conv_state, weight, bias, out, silu, cache_seqlens=cache_seqlens,
                                           state_indices=conv_state_indices)
    return out


@torch.library.custom_op("fastlayers::causal_conv1d_update", mutates_args=("conv_state",))
def _update_op(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], silu: bool,
               backend: str, cache_seqlens: Optional[Tensor] = None,
               conv_state_indices: Optional[Tensor] = None) -> Tensor:
    return _update(x, conv_state, weight, bias, silu, backend, cache_seqlens, conv_state_indices)


@_update_op.register_fake
def _(x, conv_state, weight, bias, silu, backend, cache_seqlens=None, conv_state_indices=None):
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


def _check_index(op, name, t, shape, device):
    """An int32 index tensor of the given shape on x's device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastlayers.{op}: {name} must be a torch.Tensor or None; got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"fastlayers.{op}: {name} must be int32; got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"fastlayers.{op}: {name} must have shape {tuple(shape)}; got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"fastlayers.{op}: {name} must be on x's device ({device}); got {t.device}")


def _can_read_values(t):
    """Index values are checked on the host unless that would break a trace or a CUDA graph capture."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_seq_idx(op, seq_idx, x, initial_states, return_final_states):
    if seq_idx is None:
        return None
    _check_index(op, "seq_idx", seq_idx, (x.shape[0], x.shape[2]), x.device)
    # causal-conv1d's rules: packed sequences start from zeros and return no final states
    if initial_states is not None:
        raise ValueError(f"fastlayers.{op}: initial_states must be None when seq_idx is given (packed sequences "
                         f"start from zeros, as in causal-conv1d)")
    if return_final_states:
        raise ValueError(f"fastlayers.{op}: return_final_states must be False when seq_idx is given (as in "
                         f"causal-conv1d; use causal_conv1d_varlen_states for the states of packed sequences)")
    return seq_idx.contiguous()


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

    ``seq_idx`` ``(batch, seqlen)`` int32 (causal-conv1d's packed sequences, either layout of x): the
    window of the output at t takes only the inputs whose seq_idx equals ``seq_idx[b, t]`` (the others
    count as zeros), and the output at a negative seq_idx (padding) is 0. Not with ``initial_states`` or
    ``return_final_states`` (ValueError, as in causal-conv1d); see :func:`causal_conv1d_varlen_states`.
    """
    op = "causal_conv1d"
    silu = _check_conv(op, x, weight, bias, activation, initial_states, return_final_states)
    seq_idx = _check_seq_idx(op, seq_idx, x, initial_states, return_final_states)
    backend = resolve(op, x.device)
    if backend == "reference" or x.numel() == 0:
        return reference.causal_conv1d(x, weight, bias, activation, initial_states, return_final_states,
                                       seq_idx=seq_idx)
    check_backend_dtype(op, backend, x.dtype)
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    args = (x, weight, bias, initial_states, silu, return_final_states, backend, seq_idx)
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

    ``cache_seqlens`` ``(batch,)`` int32 >= 0 (causal-conv1d's circular buffer): row b's history is
    the ``width - 1`` elements before position ``cache_seqlens[b] % state_len`` (wrapping) and its new
    inputs are written from that position on, wrapping; nothing is shifted, and ``cache_seqlens`` is
    not changed (the caller advances it). ``conv_state_indices`` ``(batch,)`` int32 (continuous
    batching): row b uses ``conv_state[conv_state_indices[b]]``, ``conv_state`` ``(slots, dim,
    state_len)``; a negative index marks a padded row: its output is 0 and no state is touched.
    Indices must be distinct (apart from negative ones) and below ``slots``.
    """
    op = "causal_conv1d_update"
    check_tensor(op, "x", x)
    if x.dim() not in (2, 3):
        raise ValueError(f"fastlayers.{op}: x must be (batch, dim) or (batch, dim, seqlen); got shape "
                         f"{tuple(x.shape)}")
    b, d = x.shape[:2]
    _check_weight(op, weight, bias, d)
    silu = _check_silu(op, activation)
    check_tensor(op, "conv_state", conv_state)
    width = weight.shape[1]
    slots = "slots" if conv_state_indices is not None else b
    if (conv_state.dim() != 3 or conv_state.shape[1] != d or conv_state.shape[2] < width - 1
            or (conv_state_indices is None and conv_state.shape[0] != b)):
        raise ValueError(f"fastlayers.{op}: conv_state must have shape ({slots}, {d}, state_len) with state_len >= "
                         f"width - 1 = {width - 1}; got {tuple(conv_state.shape)}")
    if conv_state.dtype != x.dtype:
        raise TypeError(f"fastlayers.{op}: conv_state must have the dtype of x ({x.dtype}) to be updated in "
                        f"place; got {conv_state.dtype}")
    check_same_device(op, x, conv_state=conv_state, weight=weight, bias=bias)
    if cache_seqlens is not None:
        _check_index(op, "cache_seqlens", cache_seqlens, (b,), x.device)
        if _can_read_values(cache_seqlens) and b > 0:
            low = int(cache_seqlens.min())  # one read on the host
            if low < 0:
                raise ValueError(f"fastlayers.{op}: cache_seqlens must be >= 0; got min {low}")
        cache_seqlens = cache_seqlens.contiguous()
    if conv_state_indices is not None:
        _check_index(op, "conv_state_indices", conv_state_indices, (b,), x.device)
        if _can_read_values(conv_state_indices) and b > 0:
            idx = conv_state_indices.cpu()
            if int(idx.max()) >= conv_state.shape[0]:
                raise ValueError(f"fastlayers.{op}: conv_state_indices must be < conv_state.shape[0] = "
                                 f"{conv_state.shape[0]} (negative: padded row); got max {int(idx.max())}")
            used = idx[idx >= 0]
            if used.unique().numel() != used.numel():
                raise ValueError(f"fastlayers.{op}: conv_state_indices must be distinct (apart from negative "
                                 f"padding entries); got {idx.tolist()}")
        conv_state_indices = conv_state_indices.contiguous()
    backend = resolve(op, x.device)
    if backend == "reference":
        return reference.causal_conv1d_update(x, conv_state, weight, bias, activation, cache_seqlens,
                                              conv_state_indices)
    check_backend_dtype(op, backend, x.dtype)
    squeeze = x.dim() == 2
    x3 = x[..., None] if squeeze else x
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if torch.compiler.is_compiling():
        out = torch.ops.fastlayers.causal_conv1d_update(x3, conv_state, weight, bias, silu, backend, cache_seqlens,
                                                        conv_state_indices)
    else:
        out = _update(x3.detach(), conv_state, weight.detach(), None if bias is None else bias.detach(), silu,
                      backend, cache_seqlens, conv_state_indices)
    return out[..., 0] if squeeze else out


def causal_conv1d_varlen_states(x, cu_seqlens, state_len):
    """causal-conv1d's ``causal_conv1d_varlen_states``: the conv states of packed sequences.

    x ``(total_tokens, dim)`` (any strides), ``cu_seqlens`` ``(batch + 1,)`` int32, non-decreasing,
    from 0 to at most total_tokens; returns ``(batch, dim, state_len)`` in x's dtype, channel-last in
    memory (a ``(batch, state_len, dim)`` tensor transposed, as causal-conv1d returns it): the last
    ``state_len`` inputs of each sequence, zero-padded at the left for shorter ones. Every backend runs
    one torch gather (no custom kernel); forward only.
    """
    op = "causal_conv1d_varlen_states"
    check_tensor(op, "x", x)
    if x.dim() != 2:
        raise ValueError(f"fastlayers.{op}: x must be 2-D (total_tokens, dim); got shape {tuple(x.shape)}")
    if isinstance(state_len, bool) or not isinstance(state_len, int) or state_len < 0:
        raise ValueError(f"fastlayers.{op}: state_len must be an int >= 0; got {state_len!r}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"fastlayers.{op}: cu_seqlens must be a 1-D tensor (batch + 1,); got "
                         f"{tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens)}")
    _check_index(op, "cu_seqlens", cu_seqlens, cu_seqlens.shape, x.device)
    total, dim = x.shape
    if _can_read_values(cu_seqlens):
        cu = cu_seqlens.cpu()
        if int(cu[0]) < 0 or int(cu[-1]) > total or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"fastlayers.{op}: cu_seqlens must be non-decreasing from >= 0 to <= total_tokens = "
                             f"{total}; got {cu.tolist()}")
    backend = resolve("causal_conv1d", x.device)
    if backend == "reference":
        return reference.causal_conv1d_varlen_states(x, cu_seqlens, state_len)
    batch = cu_seqlens.shape[0] - 1
    cu = cu_seqlens.long()
    start, end = cu[:-1, None], cu[1:, None]
    pos = end - state_len + torch.arange(state_len, device=x.device)      # (batch, state_len)
    ok = (pos >= start)[..., None]
    rows = x[pos.clamp(0, max(total - 1, 0))] if total > 0 else x.new_zeros((batch, state_len, dim))
    return torch.where(ok, rows, rows.new_zeros(())).transpose(1, 2)


__all__ = ["causal_conv1d", "causal_conv1d_update", "causal_conv1d_varlen_states"]
