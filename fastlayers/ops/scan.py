"""Mamba scans: ``selective_state_update``, the one-token decode step (mamba_ssm's semantics and
shapes), forward only; ``selective_scan``, the Mamba-1 scan over whole sequences (mamba_ssm's
``selective_scan_fn``), forward and backward. The reference scans (``fastlayers.reference.selective_scan``,
``ssd_scan``) define the semantics.

``selective_scan`` in eager mode goes straight to the kernels (through a torch.autograd.Function when
a gradient is needed); while torch.compile traces, the same kernels run through the custom ops
``fastlayers::selective_scan_fwd``/``_bwd``.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .._alloc import empty
from .._dtypes import stat_dtype
from ..backend import BackendUnavailable, resolve
from ..backends import load
from ._common import GPU_DTYPES, check_plain, check_same_device, check_shape, check_tensor, dispatch, needs_grad



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
        check_plain(op, "state_batch_indices", idx)
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
    if needs_grad(x, dt, A, B, C, D, z, dt_bias):
        raise RuntimeError(f"fastlayers.{op} is forward only (a decode step); call it under torch.no_grad()")
    if backend == "reference":
        return reference.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                                state_batch_indices)
    if backend in ("triton", "cuda") and state.dtype not in GPU_DTYPES:
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



# ============================================================================= selective_scan (Mamba-1)
def _check_scan(op, u, delta, A, B, C, D, z, delta_bias):
    for name, t in (("A", A), ("B", B), ("C", C), ("u", u), ("delta", delta), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        if isinstance(t, torch.Tensor) and t.is_complex():
            raise TypeError(f"fastlayers.{op}: complex {name} ({t.dtype}) is not supported: mamba_ssm's "
                            f"selective_scan_fn takes complex A, B, C (S4D-style, a complex state), but every "
                            f"fastlayers backend (reference, cpu, cuda) keeps a real state; pass real tensors "
                            f"(Mamba-1 models use a real A)")
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        check_tensor(op, name, t)
    for name, t in (("D", D), ("z", z), ("delta_bias", delta_bias)):
        if t is not None:
            check_tensor(op, name, t)
    if u.dim() != 3:
        raise ValueError(f"fastlayers.{op}: u must be (batch, dim, seqlen); got shape {tuple(u.shape)}")
    batch, dim, L = u.shape
    check_shape(op, "delta", delta, u.shape, " (the shape of u: batch, dim, seqlen)")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"fastlayers.{op}: A must have shape (dim, dstate) = ({dim}, N); got {tuple(A.shape)}")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 2:
            check_shape(op, name, M, (dim, n), " (dim, dstate): time-invariant")
        elif M.dim() == 3:
            check_shape(op, name, M, (batch, n, L), " (batch, dstate, seqlen)")
        elif M.dim() == 4:
            if M.shape[0] != batch or tuple(M.shape[2:]) != (n, L) or M.shape[1] == 0 or dim % M.shape[1]:
                raise ValueError(f"fastlayers.{op}: {name} must be (batch, ngroups, dstate, seqlen) = ({batch}, G, "
                                 f"{n}, {L}) with G dividing dim {dim}; got {tuple(M.shape)}")
        else:
            raise ValueError(f"fastlayers.{op}: {name} must be (dim, dstate), (batch, dstate, seqlen) or "
                             f"(batch, ngroups, dstate, seqlen); got shape {tuple(M.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            check_shape(op, name, t, (dim,), " (dim,)")
    if z is not None:
        check_shape(op, "z", z, u.shape, " (the shape of u)")
    check_same_device(op, u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def _scan_bc(M, dim, acc):
    """One explicit copy of B or C into the accumulator dtype with dstate contiguous:
    (buffer, (Bb, G, L', N) kernel view of it, G)."""
    if M.dim() == 2:  # (dim, N), time-invariant: no copy when it is already acc and contiguous
        buf = M.to(acc).contiguous()
        return buf, buf.as_strided((1, dim, 1, buf.shape[1]), (0, buf.shape[1], 0, 1)), dim
    if M.dim() == 3:
        M = M[:, None]
    buf = torch.empty(M.shape[0], M.shape[1], M.shape[3], M.shape[2], dtype=acc, device=M.device)
    buf.copy_(M.transpose(2, 3))
    return buf, buf, M.shape[1]


def _scan_grad_bc(part_sum, M):
    """The gradient of B or C, in its layout and dtype, from the summed partials (laid out like _scan_bc's buffer)."""
    if M.dim() == 2:
        return part_sum.to(M.dtype)
    g = part_sum.transpose(-1, -2)
    return torch.empty(M.shape, dtype=M.dtype, device=M.device).copy_(g if M.dim() == 4 else g[:, 0])


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, backend):
    """(out, last_state)."""
    batch, dim, L = u.shape
    acc = stat_dtype(u.dtype)
    out = empty(u.shape, u.dtype, u.device)
    if batch * dim == 0 or L == 0:
        return out, torch.zeros(batch, dim, A.shape[1], dtype=acc, device=u.device)
    last = torch.empty(batch, dim, A.shape[1], dtype=acc, device=u.device)
    _, Bv, GB = _scan_bc(B, dim, acc)
    _, Cv, GC = _scan_bc(C, dim, acc)
    load(backend).selective_scan_fwd(u, delta, A, Bv, Cv, D, z, delta_bias, out, last, GB, GC, softplus)
    return out, last


def _scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, softplus, backend):
    """[du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]; None for absent inputs."""
    batch, dim, L = u.shape
    n = A.shape[1]
    acc = stat_dtype(u.dtype)
    opt = lambda t: None if t is None else torch.zeros_like(t)  # noqa: E731
    if batch * dim == 0 or L == 0:
        return [torch.zeros_like(u), torch.zeros_like(delta), torch.zeros_like(A), torch.zeros_like(B),
                torch.zeros_like(C), opt(D), opt(z), opt(delta_bias)]
    be = load(backend)
    parts = be.selective_scan_bwd_parts(batch, dim, L, n, u.device)
    Bbuf, Bv, GB = _scan_bc(B, dim, acc)
    Cbuf, Cv, GC = _scan_bc(C, dim, acc)
    dB_part = torch.zeros((parts, *Bbuf.shape), dtype=acc, device=u.device)
    dC_part = torch.zeros((parts, *Cbuf.shape), dtype=acc, device=u.device)
    dA_part = torch.zeros(parts, dim, n, dtype=acc, device=u.device)
    dD_part = None if D is None else torch.zeros(parts, dim, dtype=acc, device=u.device)
    dbias_part = None if delta_bias is None else torch.zeros(parts, dim, dtype=acc, device=u.device)
    du = empty(u.shape, u.dtype, u.device)
    ddelta = empty(delta.shape, delta.dtype, delta.device)
    dz = None if z is None else empty(z.shape, z.dtype, z.device)
    be.selective_scan_bwd(dout, dlast, u, delta, A, Bv, Cv, D, z, delta_bias, du, ddelta, dz, dA_part, dB_part,
                          dC_part, dD_part, dbias_part, GB, GC, softplus)
    return [du, ddelta, dA_part.sum(0).to(A.dtype), _scan_grad_bc(dB_part.sum(0), B),
            _scan_grad_bc(dC_part.sum(0), C), None if D is None else dD_part.sum(0).to(D.dtype), dz,
            None if delta_bias is None else dbias_part.sum(0).to(delta_bias.dtype)]


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, backend):
        ctx.set_materialize_grads(False)
        out, last = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, backend)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.cfg = (softplus, backend)
        ctx.mark_non_differentiable()
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
        softplus, backend = ctx.cfg
        if dout is None:
            dout = torch.zeros(u.shape, dtype=u.dtype, device=u.device)
        grads = _scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, softplus, backend)
        return (*grads, None, None)


@torch.library.custom_op("fastlayers::selective_scan_fwd", mutates_args=())
def _scan_fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                 delta_bias: Optional[Tensor], softplus: bool, backend: str) -> Tuple[Tensor, Tensor]:
    return _scan_fwd(u, delta, A, B, C, D, z, delta_bias, softplus, backend)


@_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, softplus, backend):
    return u.new_empty(u.shape), u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=stat_dtype(u.dtype))


@torch.library.custom_op("fastlayers::selective_scan_bwd", mutates_args=())
def _scan_bwd_op(dout: Tensor, dlast: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor], softplus: bool,
                 backend: str) -> List[Tensor]:
    """[du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]; entries for absent inputs are empty."""
    res = _scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, softplus, backend)
    return [u.new_empty(0) if g is None else g for g in res]


@_scan_bwd_op.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, softplus, backend):
    return [t.new_empty(t.shape) if t is not None else u.new_empty(0) for t in (u, delta, A, B, C, D, z, delta_bias)]


def _scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, softplus, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
    ctx.cfg = (softplus, backend, D is not None, z is not None, delta_bias is not None)


def _scan_op_backward(ctx, dout, dlast):
    u, delta, A, B, C, D, z, delta_bias = ctx.saved_tensors
    softplus, backend, has_D, has_z, has_bias = ctx.cfg
    if dout is None:
        dout = torch.zeros_like(u)
    g = torch.ops.fastlayers.selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, softplus, backend)
    return (g[0], g[1], g[2], g[3], g[4], g[5] if has_D else None, g[6] if has_z else None,
            g[7] if has_bias else None, None, None)


torch.library.register_autograd("fastlayers::selective_scan_fwd", _scan_op_backward, setup_context=_scan_setup)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """The Mamba-1 selective scan, mamba_ssm's ``selective_scan_fn``:

        dt = softplus(delta + delta_bias)                  (each part optional)
        x_t = exp(dt_t A) x_{t-1} + dt_t B_t u_t,   y_t = <x_t, C_t> + D u_t,   out = y * silu(z)

    u, delta, z ``(batch, dim, L)``; A ``(dim, N)`` (real); B, C ``(dim, N)`` (time-invariant),
    ``(batch, N, L)`` or ``(batch, G, N, L)`` (G groups of dim / G channels); D, delta_bias ``(dim,)``.
    Returns out ``(batch, dim, L)`` in u's dtype and, with ``return_last_state``, the state after the
    last step ``(batch, dim, N)`` in fp32 (fp64 for fp64 u). States and sums in fp32 (fp64 for fp64);
    differentiable in every input (the last state's gradient included). Backends ``cpu``, ``reference``
    and ``cuda`` (forward and backward, float32/float16/bfloat16 u, dstate <= 256; the backward recomputes
    the states from an fp32 checkpoint of the state every 32 steps, no per-step state is kept, and returns
    each gradient in its input's dtype and layout);
    inputs of any strides (B and C are copied once into an fp32 (batch, G, L, N) layout).
    """
    op = "selective_scan"
    _check_scan(op, u, delta, A, B, C, D, z, delta_bias)
    backend = resolve(op, u.device)
    if backend == "reference":
        return reference.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if backend not in ("cpu", "cuda"):
        raise BackendUnavailable(f"fastlayers.{op}: no {backend!r} kernel for this op yet (tensors on {u.device}); "
                                 f"it runs on CPU tensors (backend 'cpu'), on CUDA tensors (backend 'cuda'), "
                                 f"or anywhere with fastlayers.use_backend('reference')")
    args = (u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), backend)
    if backend == "cuda":
        from ..backends.cuda import SCAN_MAX_N
        if u.dtype not in GPU_DTYPES:
            raise TypeError(f"fastlayers.{op}: backend 'cuda' supports float32, float16 and bfloat16 u; got {u.dtype}")
        if A.shape[1] > SCAN_MAX_N:
            raise ValueError(f"fastlayers.{op}: backend 'cuda' supports dstate <= {SCAN_MAX_N}; got A of shape "
                             f"{tuple(A.shape)}")
    out, last = dispatch(torch.ops.fastlayers.selective_scan_fwd, _SelectiveScan, _scan_fwd, args, 8)
    return (out, last) if return_last_state else out
