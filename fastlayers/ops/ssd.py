"""Mamba-2 scan ``ssd_scan`` (``mamba_chunk_scan_combined``'s semantics; forward and backward).

The dt preprocessing (``+ dt_bias``, softplus, ``dt_limit`` clamp) and the fp32 copies of dt, A, B and C
are plain torch ops (differentiated by autograd); the scan itself runs in one kernel call: the ``cpu``
backend (C++/OpenMP recurrence, forward and backward) or ``triton`` (the chunked SSD algorithm, forward
and backward Triton kernels, see ``backends/triton_ssd.py``).

In eager mode the kernels are called directly (through a torch.autograd.Function when a gradient is
needed); while torch.compile traces, they run through the custom ops ``fastlayers::ssd_scan_fwd``/``_bwd``.
"""
import math
import numbers
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .._alloc import empty
from .._dtypes import stat_dtype
from ..backend import BackendUnavailable, resolve
from ..backends import load
from ._common import GPU_DTYPES, check_plain, check_same_device, check_shape, check_tensor, dispatch

_NO_LIMIT = (0.0, float("inf"))


def _check_ssd(op, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_limit):
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        check_tensor(op, name, t)
    for name, t in (("D", D), ("z", z), ("dt_bias", dt_bias), ("initial_states", initial_states)):
        if t is not None:
            check_tensor(op, name, t)
    if x.dim() != 4:
        raise ValueError(f"fastlayers.{op}: x must be (batch, seqlen, nheads, headdim); got shape {tuple(x.shape)}")
    b, L, h, p = x.shape
    check_shape(op, "dt", dt, (b, L, h), " (batch, seqlen, nheads)")
    check_shape(op, "A", A, (h,), " (nheads,): one scalar per head")
    if B.dim() != 4 or tuple(B.shape[:2]) != (b, L) or B.shape[2] == 0 or h % B.shape[2]:
        raise ValueError(f"fastlayers.{op}: B must be (batch, seqlen, ngroups, dstate) = ({b}, {L}, G, N) with G "
                         f"dividing nheads {h}; got {tuple(B.shape)}")
    check_shape(op, "C", C, B.shape, " (the shape of B)")
    n = B.shape[3]
    if D is not None and tuple(D.shape) not in ((h, p), (h,)):
        raise ValueError(f"fastlayers.{op}: D must have shape ({h}, {p}) or ({h},); got {tuple(D.shape)}")
    if z is not None:
        check_shape(op, "z", z, x.shape, " (the shape of x)")
    if dt_bias is not None:
        check_shape(op, "dt_bias", dt_bias, (h,), " (nheads,)")
    if initial_states is not None:
        check_shape(op, "initial_states", initial_states, (b, h, p, n), " (batch, nheads, headdim, dstate)")
    if seq_idx is not None:
        if not isinstance(seq_idx, torch.Tensor) or seq_idx.dtype.is_floating_point or seq_idx.is_complex() \
                or seq_idx.dtype == torch.bool:
            raise TypeError(f"fastlayers.{op}: seq_idx must be an integer tensor; got "
                            f"{getattr(seq_idx, 'dtype', type(seq_idx).__name__)}")
        check_plain(op, "seq_idx", seq_idx)
        check_shape(op, "seq_idx", seq_idx, (b, L), " (batch, seqlen)")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0:
        raise ValueError(f"fastlayers.{op}: chunk_size must be a positive int; got {chunk_size!r}")
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise ValueError(f"fastlayers.{op}: dt_limit must be a pair (min, max) of numbers; got {dt_limit!r}") \
            from None
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"fastlayers.{op}: dt_limit must be (min, max) with min <= max; got {dt_limit!r}")
    check_same_device(op, x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                      seq_idx=seq_idx)


def _check_varlen(op, x, seq_idx, cu_seqlens, return_varlen_states):
    """mamba_ssm's rules: cu_seqlens is used only with return_varlen_states (ignored otherwise), which needs it,
    batch 1 (the sequences packed along seqlen) and seq_idx (without it the packed sequences leak into each
    other and their states mean nothing). Values are checked too (one host sync; skipped under torch.compile)."""
    if not return_varlen_states:
        return
    if cu_seqlens is None:
        raise ValueError(f"fastlayers.{op}: return_varlen_states=True needs cu_seqlens, the (num_seqs + 1,) "
                         f"offsets of the packed sequences; got None")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype.is_floating_point or cu_seqlens.is_complex() \
            or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"fastlayers.{op}: cu_seqlens must be an integer tensor (int32 as in mamba_ssm); got "
                        f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
    check_plain(op, "cu_seqlens", cu_seqlens)
    b, L = x.shape[:2]
    if b != 1:
        raise ValueError(f"fastlayers.{op}: return_varlen_states needs batch == 1 (sequences packed along seqlen, "
                         f"as in mamba_ssm); got x of shape {tuple(x.shape)}")
    if seq_idx is None:
        raise ValueError(f"fastlayers.{op}: return_varlen_states needs seq_idx (batch, seqlen) marking the packed "
                         f"sequences (without it they leak into each other); got None")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"fastlayers.{op}: cu_seqlens must have shape (num_seqs + 1,) with num_seqs >= 1; got "
                         f"{tuple(cu_seqlens.shape)}")
    check_same_device(op, x, cu_seqlens=cu_seqlens)
    if not torch.compiler.is_compiling():
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != L or any(a > c for a, c in zip(cu, cu[1:])):
            raise ValueError(f"fastlayers.{op}: cu_seqlens must be non-decreasing from 0 to seqlen {L}; got "
                             f"{cu if len(cu) <= 16 else cu[:8] + ['...'] + cu[-4:]}")


_VARLEN_CHUNK = 64


def _varlen_states(x, dt, A, B, init, reset, cu_seqlens, chunk=_VARLEN_CHUNK):
    """The state after the last token of each packed sequence, (num_seqs, h, p, n) in dt's dtype (zeros for a
    zero-length sequence), of the recurrence that restarts where ``reset`` is set; batch 1.

    Plain torch ops (differentiated by autograd), the chunked form: per chunk of ``chunk`` steps, with cs the
    in-chunk cumulative sum of dt A, the chunk's own contribution to its end state
    Z_c = sum_j [same segment as the end] exp(cs_last - cs_j) dt_j x_j B_j^T; the states entering the chunks
    by S_c = [no restart in chunk c] exp(cs_last) S_{c-1} + Z_c (a log-depth scan over the chunks); then for a
    sequence ending at e in chunk c the same two terms over the chunk's steps up to e:
    sum_{j <= e, same segment} exp(cs_e - cs_j) dt_j x_j B_j^T + [no restart in c up to e] exp(cs_e) S_{c-1}.
    O(seqlen h p n + num_seqs chunk h (p + n)) work; masked terms are selected away (torch.where), so a NaN
    reaches only the states that depend on it."""
    _, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    acc, dev = dt.dtype, x.device
    T = chunk
    nc = max(1, -(-L // T))
    pad = nc * T - L
    xf, dtf, Bh = x[0].to(acc), dt[0], B[0].repeat_interleave(h // g, dim=1)
    rid = reset[0].to(torch.int64).cumsum(0)                                     # segment of each step
    if pad:
        xf = torch.cat([xf, xf.new_zeros(pad, h, p)])
        dtf = torch.cat([dtf, dtf.new_zeros(pad, h)])                          # dt 0: decay 1, no input
        Bh = torch.cat([Bh, Bh.new_zeros(pad, h, n)])
        rid = torch.cat([rid, rid[-1:].expand(pad)]) if L else rid.new_zeros(pad)
    cs = (dtf * A).view(nc, T, h).cumsum(1).view(nc * T, h)
    ridc = rid.view(nc, T)
    rid_prev = torch.cat([rid.new_zeros(1), ridc[:-1, -1]])                   # segment before each chunk

    def part(idx, last, mask):
        """sum over steps idx (..., T) with mask of exp(cs_last - cs_j) dt_j x_j B_j^T -> (..., h, p, n)."""
        m = mask[..., None]
        w = torch.where(m, torch.exp(torch.where(m, cs[last][..., None, :] - cs[idx], 0)) * dtf[idx], 0)
        xm = torch.where(m[..., None], xf[idx], 0)
        bm = torch.where(m[..., None], Bh[idx], 0)
        return torch.einsum("...th,...thp,...thn->...hpn", w, xm, bm)

    steps = torch.arange(nc * T, device=dev).view(nc, T)
    Z = part(steps, steps[:, -1], ridc == ridc[:, -1:])
    # S_c = a_c S_{c-1} + Z_c (S_{-1} = init) as a log-depth scan over the chunks (no per-chunk launches):
    # after the steps of width 1, 2, 4, ... each entry holds the sum over its last `width` chunks, and
    # (a, keep) the product of their decays / whether none of them restarts. A restart is a where, not a
    # factor 0, so a NaN does not cross it.
    keep = (ridc[:, -1] == rid_prev)[:, None, None, None]                     # no restart in the chunk
    a = torch.exp(cs.view(nc, T, h)[:, -1])[:, :, None, None]
    if init is not None:
        Z = torch.cat([Z[:1] + torch.where(keep[:1], a[:1] * init[0].to(acc), 0), Z[1:]])
    width = 1
    while width < nc:
        Z = torch.cat([Z[:width], Z[width:] + torch.where(keep[width:], a[width:] * Z[:-width], 0)])
        a = torch.cat([a[:width], a[width:] * a[:-width]])
        keep = torch.cat([keep[:width], keep[width:] & keep[:-width]])
        width *= 2
    S0 = init[0].to(acc)[None] if init is not None else xf.new_zeros(1, h, p, n)
    S_in = torch.cat([S0, Z[:-1]])                                             # entering each chunk (nc, h, p, n)

    cu = cu_seqlens.to(device=dev, dtype=torch.int64)
    valid = cu[1:] > cu[:-1]
    e = (cu[1:] - 1).clamp(0, max(L - 1, 0))
    ce = e // T
    idx = ce[:, None] * T + torch.arange(T, device=dev)
    mask = valid[:, None] & (idx <= e[:, None]) & (rid[idx] == rid[e][:, None])
    local = part(idx, e, mask)
    carry = (valid & (rid[e] == rid_prev[ce]))[:, None, None, None]
    return local + torch.where(carry, torch.exp(cs[e])[:, :, None, None] * S_in[ce], 0)


def _reset(seq_idx):
    """(b, l) uint8: 1 where the state restarts (seq_idx changes), never at step 0; None without seq_idx."""
    if seq_idx is None:
        return None
    r = torch.zeros(seq_idx.shape, dtype=torch.uint8, device=seq_idx.device)
    if seq_idx.shape[1] > 1:
        r[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.uint8)
    return r


def _ssd_fwd(x, dt, A, B, C, D, z, init, reset, vslot, nseq, chunk_size, backend):
    """(out, final_states, varlen_states); dt, A, B, C in the accumulator dtype, contiguous; D an (h, p) view or
    None. varlen_states (nseq, h, p, n), written by the cpu kernel at the steps where vslot (b, l) int64 is
    >= 0 (zeros elsewhere); (0, h, p, n) without vslot (the other backends: ``_varlen_states`` after the call)."""
    b, L, h, p = x.shape
    acc = stat_dtype(x.dtype)
    out = empty(x.shape, x.dtype, x.device)
    final = torch.empty(b, h, p, B.shape[-1], dtype=acc, device=x.device)
    varlen = torch.zeros(nseq if vslot is not None else 0, h, p, B.shape[-1], dtype=acc, device=x.device)
    be = load(backend)
    if backend == "cpu":
        be.ssd_scan_fwd(x, dt, A, B, C, D, z, init, reset, out, final, *((varlen, vslot) if vslot is not None else ()))
    else:
        be.ssd_scan_fwd(x, dt, A, B, C, D, z, init, reset, out, final, chunk_size)
    return out, final, varlen


def _ssd_bwd(dout, dfinal, dvarlen, x, dt, A, B, C, D, z, init, reset, vslot, chunk_size, backend):
    """[dx, ddt, dA, dB, dC, dD, dz, dinit]; None for absent inputs. dvarlen (cpu, with vslot) or None."""
    if backend != "cpu":
        return load(backend).ssd_scan_bwd(dout, dfinal, x, dt, A, B, C, D, z, init, reset, chunk_size)
    b, L, h, p = x.shape
    n = B.shape[3]
    acc = stat_dtype(x.dtype)
    be = load(backend)
    parts = be.ssd_scan_bwd_parts(b, h, L, p, n, x.device)
    dB_part = torch.zeros((parts, *B.shape), dtype=acc, device=x.device)
    dC_part = torch.zeros((parts, *C.shape), dtype=acc, device=x.device)
    ddt = torch.empty(dt.shape, dtype=acc, device=x.device)
    dA_bh = torch.empty(b, h, dtype=acc, device=x.device)
    dD_bh = None if D is None else torch.empty(b, h, p, dtype=acc, device=x.device)
    dx = empty(x.shape, x.dtype, x.device)
    dz = None if z is None else empty(z.shape, z.dtype, z.device)
    dinit = None if init is None else torch.empty(init.shape, dtype=init.dtype, device=init.device)
    dvl = () if dvarlen is None or vslot is None or dvarlen.numel() == 0 else (dvarlen, vslot)
    be.ssd_scan_bwd(dout, dfinal, x, dt, A, B, C, D, z, init, reset, dx, dz, dinit, ddt, dA_bh, dD_bh, dB_part,
                    dC_part, *dvl)
    return [dx, ddt, dA_bh.sum(0), dB_part.sum(0), dC_part.sum(0),
            None if D is None else dD_bh.sum(0).to(D.dtype), dz, dinit]


class _SsdScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, init, reset, vslot, nseq, chunk_size, backend):
        ctx.set_materialize_grads(False)
        out, final, varlen = _ssd_fwd(x, dt, A, B, C, D, z, init, reset, vslot, nseq, chunk_size, backend)
        ctx.save_for_backward(x, dt, A, B, C, D, z, init, reset, vslot)
        ctx.cfg = (chunk_size, backend)
        return out, final, varlen

    @staticmethod
    def backward(ctx, dout, dfinal, dvarlen):
        x, dt, A, B, C, D, z, init, reset, vslot = ctx.saved_tensors
        chunk_size, backend = ctx.cfg
        if dout is None:
            dout = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        grads = _ssd_bwd(dout, dfinal, dvarlen, x, dt, A, B, C, D, z, init, reset, vslot, chunk_size, backend)
        return (*grads, None, None, None, None, None)


@torch.library.custom_op("fastlayers::ssd_scan_fwd", mutates_args=())
def _ssd_fwd_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
                init: Optional[Tensor], reset: Optional[Tensor], vslot: Optional[Tensor], nseq: int, chunk_size: int,
                backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _ssd_fwd(x, dt, A, B, C, D, z, init, reset, vslot, nseq, chunk_size, backend)


@_ssd_fwd_op.register_fake
def _(x, dt, A, B, C, D, z, init, reset, vslot, nseq, chunk_size, backend):
    b, L, h, p = x.shape
    acc = stat_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty((b, h, p, B.shape[-1]), dtype=acc),
            x.new_empty((nseq if vslot is not None else 0, h, p, B.shape[-1]), dtype=acc))


@torch.library.custom_op("fastlayers::ssd_scan_bwd", mutates_args=())
def _ssd_bwd_op(dout: Tensor, dfinal: Optional[Tensor], dvarlen: Optional[Tensor], x: Tensor, dt: Tensor, A: Tensor,
                B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor], init: Optional[Tensor],
                reset: Optional[Tensor], vslot: Optional[Tensor], chunk_size: int, backend: str) -> List[Tensor]:
    """[dx, ddt, dA, dB, dC, dD, dz, dinit]; entries for absent inputs are empty."""
    res = _ssd_bwd(dout, dfinal, dvarlen, x, dt, A, B, C, D, z, init, reset, vslot, chunk_size, backend)
    return [x.new_empty(0) if g is None else g.contiguous() for g in res]


@_ssd_bwd_op.register_fake
def _(dout, dfinal, dvarlen, x, dt, A, B, C, D, z, init, reset, vslot, chunk_size, backend):
    return [t.new_empty(t.shape) if t is not None else x.new_empty(0) for t in (x, dt, A, B, C, D, z, init)]


def _ssd_setup(ctx, inputs, output):
    x, dt, A, B, C, D, z, init, reset, vslot, nseq, chunk_size, backend = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, init, reset, vslot)
    ctx.cfg = (chunk_size, backend, D is not None, z is not None, init is not None)


def _ssd_op_backward(ctx, dout, dfinal, dvarlen):
    x, dt, A, B, C, D, z, init, reset, vslot = ctx.saved_tensors
    chunk_size, backend, has_D, has_z, has_init = ctx.cfg
    if dout is None:
        dout = torch.zeros_like(x)
    g = torch.ops.fastlayers.ssd_scan_bwd(dout, dfinal, dvarlen, x, dt, A, B, C, D, z, init, reset, vslot, chunk_size,
                                          backend)
    return (g[0], g[1], g[2], g[3], g[4], g[5] if has_D else None, g[6] if has_z else None,
            g[7] if has_init else None, None, None, None, None, None)


torch.library.register_autograd("fastlayers::ssd_scan_fwd", _ssd_op_backward, setup_context=_ssd_setup)


def _vslot(cu_seqlens, L):
    """(1, L) int64: k at the last step of packed sequence k (zero-length ones have none), -1 elsewhere."""
    cu = cu_seqlens.to(torch.int64)
    k = torch.arange(cu.numel() - 1, device=cu.device)
    valid = cu[1:] > cu[:-1]
    slot = torch.full((L + 1,), -1, dtype=torch.int64, device=cu.device)  # [L]: where the empty ones go
    slot.scatter_(0, torch.where(valid, cu[1:] - 1, L), torch.where(valid, k, -1))  # no data-dependent shapes
    return slot[None, :L].contiguous()


def ssd_scan(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
             dt_softplus=False, dt_limit=_NO_LIMIT, return_final_states=False, cu_seqlens=None,
             return_varlen_states=False):
    """The Mamba-2 scan, mamba_ssm's ``mamba_chunk_scan_combined`` semantics:

        dt = clamp(softplus(dt + dt_bias), *dt_limit)      (each part optional)
        s_t = exp(dt_t A_h) s_{t-1} + dt_t x_t B_t^T,   y_t = s_t C_t + D x_t,   out = y * silu(z)

    x, z ``(batch, seqlen, nheads, headdim)``; dt ``(batch, seqlen, nheads)``; A ``(nheads,)``;
    B, C ``(batch, seqlen, ngroups, dstate)`` (ngroups divides nheads: head i uses group
    i // (nheads / ngroups)); D ``(nheads, headdim)`` or ``(nheads,)``; dt_bias ``(nheads,)``;
    initial_states ``(batch, nheads, headdim, dstate)``. ``seq_idx`` ``(batch, seqlen)`` integer: where
    it changes the state restarts from zero (packed sequences do not leak into each other;
    ``initial_states`` seed position 0 only). Returns out (x's shape and dtype) and, with
    ``return_final_states``, the state after the last step ``(batch, nheads, headdim, dstate)`` in fp32
    (fp64 for fp64 x). Differentiable in every tensor input (the final state's gradient included).

    ``return_varlen_states`` (mamba_ssm's rules; ``cu_seqlens`` is ignored without it): batch 1, ``seq_idx``
    and ``cu_seqlens`` ``(num_seqs + 1,)`` integer offsets (0 .. seqlen, non-decreasing, the sequences of
    ``seq_idx``) required; also returns the state after each sequence's last token, ``(num_seqs, nheads,
    headdim, dstate)`` in the final states' dtype (zeros for a zero-length sequence; ``initial_states`` reach
    the first sequence), last: ``(out, [final_states,] varlen_states)``. Differentiable (mamba_ssm's is not):
    the cpu kernel writes them at the sequence ends (and takes their gradient in its backward); triton gets
    them from :func:`_varlen_states` (torch ops, autograd) after its kernel.

    Backends: ``cpu`` (the recurrence in C++/OpenMP, fp32/fp64 accumulation, fp32/fp16/bf16/fp64 inputs,
    any strides; the result does not depend on ``chunk_size``), ``triton`` (the chunked SSD algorithm on
    tiles of ``chunk_size`` rounded down to a power of two in [16, 64], [16, 32] in the backward;
    fp32/fp16/bf16; forward and backward are Triton kernels) and ``reference``
    (:func:`fastlayers.reference.ssd_scan`, the plain recurrence). Math in fp32 (fp64 for fp64 x).
    NaN in an input gives NaN out at the positions that depend on it (the chunked triton forward may also
    spread it to earlier positions of the same chunk: a 0 * NaN in its matrix products).
    """
    op = "ssd_scan"
    _check_ssd(op, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_limit)
    return_varlen_states = bool(return_varlen_states)
    _check_varlen(op, x, seq_idx, cu_seqlens, return_varlen_states)
    backend = resolve(op, x.device)
    b, L, h, p = x.shape
    if backend == "reference" or b * L * h * p == 0:
        return reference.ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus,
                                  dt_limit, return_final_states, cu_seqlens, return_varlen_states)
    if backend == "cuda":
        raise BackendUnavailable(f"fastlayers.{op}: no 'cuda' kernel for this op; use the 'triton' backend "
                                 f"(the default for CUDA tensors)")
    if backend == "triton" and x.dtype not in GPU_DTYPES:
        raise TypeError(f"fastlayers.{op}: backend 'triton' takes float32, float16 or bfloat16 x; got {x.dtype}")
    acc = stat_dtype(x.dtype)
    dtp = dt.to(acc)
    if dt_bias is not None:
        dtp = dtp + dt_bias.to(acc)
    if dt_softplus:
        dtp = F.softplus(dtp)
    if tuple(float(v) for v in dt_limit) != _NO_LIMIT:
        dtp = dtp.clamp(min=float(dt_limit[0]), max=float(dt_limit[1]))
    dtp = dtp.contiguous()
    Af, Bf, Cf = A.to(acc).contiguous(), B.to(acc).contiguous(), C.to(acc).contiguous()
    D2 = None if D is None else (D[:, None].expand(h, p) if D.dim() == 1 else D)
    reset = _reset(seq_idx)
    # Varlen states: the cpu kernel writes them at the sequence ends of its recurrence (and takes their
    # gradient in its backward); the triton backend gets them from _varlen_states (torch ops) after the call.
    in_kernel = return_varlen_states and backend == "cpu"
    vslot = _vslot(cu_seqlens, L) if in_kernel else None
    nseq = cu_seqlens.numel() - 1 if in_kernel else 0
    args = (x, dtp, Af, Bf, Cf, D2, z, initial_states, reset, vslot, nseq, int(chunk_size), backend)
    out, final, varlen = dispatch(torch.ops.fastlayers.ssd_scan_fwd, _SsdScan, _ssd_fwd, args, 8)
    res = (out, final) if return_final_states else (out,)
    if return_varlen_states:
        if not in_kernel:
            varlen = _varlen_states(x, dtp, Af, Bf, initial_states, reset, cu_seqlens)
        res = (*res, varlen)
    return res if len(res) > 1 else out
