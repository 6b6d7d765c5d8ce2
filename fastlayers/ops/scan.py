"""Mamba scans. So far: ``selective_state_update``, the one-token decode step (mamba_ssm's
semantics and shapes), forward only. The reference scans (``fastlayers.reference.selective_scan``,
``ssd_scan``) define the prefill/training semantics the fast scans will follow.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import reference
from ..backend import resolve
from ..backends import load
from ._common import check_same_device, check_shape, check_tensor

_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_state_update(op, state, x, dt, A, B, C, D, z, dt_bias, idx):
    check_tensor(op, "state", state)
    if state.dim() not in (3, 4):
        raise ValueError(f"fastlayers.{op}: state must be (batch, dim, dstate) or (batch, nheads, headdim, dstate); "
                         f"got shape {tuple(state.shape)}")
    heads = state.dim() == 4
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        check_tensor(op, name, t)
    for name, t in (("D", D), ("z", z), ("dt_bias", dt_bias)):
        if t is not None:
            check_tensor(op, name, t)
    n = state.shape[-1]
    if heads:
        if x.dim() != 3:
            raise ValueError(f"fastlayers.{op}: with a 4-D state, x must be (batch, nheads, headdim); "
                             f"got {tuple(x.shape)}")
        batch, h, p = x.shape
        if state.shape[1:3] != (h, p):
            raise ValueError(f"fastlayers.{op}: state {tuple(state.shape)} does not match x {tuple(x.shape)} "
                             f"(expected (*, {h}, {p}, dstate))")
        check_shape(op, "dt", dt, (batch, h, p), " (the shape of x)")
        check_shape(op, "A", A, (h, p, n), " (nheads, headdim, dstate)")
        if B.dim() != 3 or B.shape[0] != batch or B.shape[2] != n or B.shape[1] == 0 or h % B.shape[1]:
            raise ValueError(f"fastlayers.{op}: B must be (batch, ngroups, dstate) = ({batch}, G, {n}) with G "
                             f"dividing nheads {h}; got {tuple(B.shape)}")
        check_shape(op, "C", C, B.shape, " (the shape of B)")
        hp = (h, p)
    else:
        if x.dim() != 2:
            raise ValueError(f"fastlayers.{op}: with a 3-D state, x must be (batch, dim); got {tuple(x.shape)}")
        batch, d = x.shape
        if state.shape[1] != d:
            raise ValueError(f"fastlayers.{op}: state {tuple(state.shape)} does not match x {tuple(x.shape)} "
                             f"(expected (*, {d}, dstate))")
        check_shape(op, "dt", dt, (batch, d), " (the shape of x)")
        check_shape(op, "A", A, (d, n), " (dim, dstate)")
        check_shape(op, "B", B, (batch, n), " (batch, dstate)")
        check_shape(op, "C", C, (batch, n), " (batch, dstate)")
        hp = (d,)
    if D is not None:
        check_shape(op, "D", D, hp, "")
    if dt_bias is not None:
        check_shape(op, "dt_bias", dt_bias, hp, "")
    if z is not None:
        check_shape(op, "z", z, x.shape, " (the shape of x)")
    check_same_device(op, x, state=state, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                      state_batch_indices=idx)
    if idx is not None:
        if not isinstance(idx, torch.Tensor) or idx.dtype.is_floating_point or idx.dtype == torch.bool \
                or tuple(idx.shape) != (batch,):
            raise ValueError(f"fastlayers.{op}: state_batch_indices must be an integer tensor of shape ({batch},); "
                             f"got {getattr(idx, 'dtype', type(idx))} {tuple(getattr(idx, 'shape', ()))}")
        if not torch.compiler.is_compiling() and batch > 0:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= state.shape[0]:
                raise ValueError(f"fastlayers.{op}: state_batch_indices span {lo}..{hi} but state has "
                                 f"{state.shape[0]} rows")
            if torch.unique(idx).numel() != batch:
                raise ValueError(f"fastlayers.{op}: state_batch_indices must not repeat a row")
    elif state.shape[0] != batch:
        raise ValueError(f"fastlayers.{op}: state has {state.shape[0]} rows but the batch is {batch} "
                         f"(pass state_batch_indices to update a subset)")
    return heads


def _run(state, x, dt, A, B, C, D, z, dt_bias, idx, softplus, backend):
    """Head-form views, output allocation and the kernel call; returns out in x's shape."""
    heads = state.dim() == 4
    if not heads:
        state, x, dt, A, B, C = state[:, None], x[:, None], dt[:, None], A[None], B[:, None], C[:, None]
        D = None if D is None else D[None]
        z = None if z is None else z[:, None]
        dt_bias = None if dt_bias is None else dt_bias[None]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    load(backend).selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, out,
                                         None if idx is None else idx.to(torch.int64).contiguous(), softplus)
    return out if heads else out[:, 0]


@torch.library.custom_op("fastlayers::selective_state_update", mutates_args=("state",))
def _state_update_op(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                     z: Optional[Tensor], dt_bias: Optional[Tensor], idx: Optional[Tensor], softplus: bool,
                     backend: str) -> Tensor:
    return _run(state, x, dt, A, B, C, D, z, dt_bias, idx, softplus, backend)


@_state_update_op.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, idx, softplus, backend):
    return x.new_empty(x.shape)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One decode step of the Mamba scan; updates ``state`` in place and returns out (x's shape and dtype).

    mamba_ssm's shapes: without heads state ``(batch, dim, dstate)``, x, dt, z ``(batch, dim)``,
    A ``(dim, dstate)``, B, C ``(batch, dstate)``, D, dt_bias ``(dim,)``; with heads state
    ``(batch, nheads, headdim, dstate)``, x, dt, z ``(batch, nheads, headdim)``, A
    ``(nheads, headdim, dstate)``, B, C ``(batch, ngroups, dstate)``, D, dt_bias ``(nheads, headdim)``
    (broadcast views with stride 0 are read in place). ``state_batch_indices`` ``(batch,)``: row i
    updates ``state[state_batch_indices[i]]`` (a cache of more sequences than the batch).
    Math in fp32 (fp64 for a fp64 state); the state keeps its dtype. Forward only. Every
    argument is checked before the state is touched: on an error the state is unchanged.
    """
    op = "selective_state_update"
    _check_state_update(op, state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    backend = resolve(op, x.device)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias)):
        raise RuntimeError(f"fastlayers.{op} is forward only (a decode step); call it under torch.no_grad()")
    if backend == "reference":
        return reference.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                                state_batch_indices)
    if backend in ("triton", "cuda") and state.dtype not in _GPU_DTYPES:
        raise TypeError(f"fastlayers.{op}: backend {backend!r} updates float32, float16 or bfloat16 states; "
                        f"got a {state.dtype} state")
    if backend == "cuda":
        from ..backend import BackendUnavailable
        raise BackendUnavailable(f"fastlayers.{op}: no 'cuda' kernel for this op; use the 'triton' backend "
                                 f"(the default for CUDA tensors)")
    if torch.compiler.is_compiling():
        return torch.ops.fastlayers.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias,
                                                          state_batch_indices, bool(dt_softplus), backend)
    return _run(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices, bool(dt_softplus), backend)
