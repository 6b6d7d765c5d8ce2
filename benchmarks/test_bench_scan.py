"""Mamba scans against their eager references.

selective_state_update (the decode step). Providers: the fastlayers backend (``cpu``; ``triton`` on a
GPU), ``eager`` (fastlayers.reference.selective_state_update, written like mamba_ssm's
``selective_state_update_ref``) and ``compile`` (torch.compile of it). Bytes: the state is read and
written once; x, dt, B, C, z, out once each (A, D and dt_bias broadcast over headdim as Mamba-2 passes them).

selective_scan (Mamba-1), forward and forward+backward. Providers: ``cpu`` and ``eager``
(:func:`selective_scan_ref` below, written like mamba_ssm's ``selective_scan_ref``: exp(delta A) and
delta B u precomputed for every step, then a Python loop over L). The cpu rows record
``speedup_vs_eager`` (the issue's CPU targets: >= 30x forward, >= 10x forward+backward). Bytes: u,
delta, z, B, C read and out written once (forward); plus dout read and du, ddelta, dz, dB, dC written
(backward; the states are recomputed, never stored).
"""
import os

import pytest
import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import reference

from conftest import DEVICE, SMOKE, run, run_scan_pass

FAST = "cpu" if DEVICE == "cpu" else "triton"
# (batch, nheads, headdim, dstate, ngroups): Mamba-2 2.7B-like, Zebra-Llama 1B-like (nheads = ngroups), Mamba-1 2.8B
SHAPES = [(2, 2, 4, 8, 1)] if SMOKE else [(16, 80, 64, 128, 1), (16, 32, 64, 64, 32), (16, 1, 5120, 16, 1)]

_compiled = {}


def _fn(provider):
    if provider == FAST:
        def f(*a, **k):
            with fastlayers.use_backend(provider):
                return fastlayers.selective_state_update(*a, **k)
        return f
    if provider == "eager":
        return reference.selective_state_update
    if "su" not in _compiled:
        _compiled["su"] = torch.compile(reference.selective_state_update, dynamic=False)
    return _compiled["su"]


@pytest.mark.parametrize("provider", [FAST, "eager", "compile"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}p{}n{}g{}".format(*s))
def test_selective_state_update(benchmark, copy_gbps, shape, provider):
    batch, h, p, n, g = shape
    dev, f32 = DEVICE, torch.float32
    state = torch.randn(batch, h, p, n, device=dev)
    x, z = torch.randn(batch, h, p, device=dev), torch.randn(batch, h, p, device=dev)
    dt = torch.randn(batch, h, device=dev)[:, :, None].expand(batch, h, p)
    A = -torch.rand(h, device=dev)[:, None, None].expand(h, p, n)
    B, C = torch.randn(batch, g, n, device=dev), torch.randn(batch, g, n, device=dev)
    D = torch.randn(h, device=dev, dtype=f32)[:, None].expand(h, p)
    dtb = torch.randn(h, device=dev, dtype=f32)[:, None].expand(h, p)
    fn = _fn(provider)
    nbytes = 4 * (2 * state.numel() + 4 * x.numel() + 2 * B.numel())
    with torch.no_grad():
        run(benchmark, lambda: fn(state, x, dt, A, B, C, D, z, dtb, True), nbytes, copy_gbps,
            op="selective_state_update", shape=list(shape), dtype="float32", provider=provider)



# ----------------------------------------------------------------------------- selective_scan (Mamba-1)
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """mamba_ssm's selective_scan_ref (mamba_ssm/ops/selective_scan_interface.py), real A only."""
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    is_variable_B, is_variable_C = B.dim() >= 3, C.dim() >= 3
    B, C = B.float(), C.float()
    x = A.new_zeros((batch, dim, dstate))
    ys = []
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if not is_variable_B:
        deltaB_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    elif B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)
        deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    if is_variable_C and C.dim() == 4:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    last_state = None
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        if not is_variable_C:
            y = torch.einsum("bdn,dn->bd", x, C)
        elif C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[:, :, :, i])
        if i == u.shape[2] - 1:
            last_state = x
        ys.append(y)
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    out = out.to(dtype=dtype_in)
    return out if not return_last_state else (out, last_state)


# (batch, dim, L, N): Mamba-1 130M-like (d_inner 1536), the CPU target shape
SCAN_SHAPES = [(1, 8, 64, 4)] if SMOKE else [(2, 1536, 2048, 16)]
_scan_medians = {}


def _scan_inputs(batch, dim, L, n, requires_grad):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ins = dict(u=r(batch, dim, L), delta=r(batch, dim, L) * 0.5 - 1, A=-(torch.rand(dim, n, generator=g) + 0.1),
               B=r(batch, n, L), C=r(batch, n, L), D=r(dim), z=r(batch, dim, L), delta_bias=r(dim) * 0.5)
    return {k: v.requires_grad_(requires_grad) for k, v in ins.items()}


@pytest.mark.skipif(DEVICE != "cpu", reason="selective_scan has only the cpu kernel so far")
@pytest.mark.parametrize("provider", ["eager", "cpu"])  # eager first: the cpu row records the ratio
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", SCAN_SHAPES, ids=lambda s: "b{}d{}L{}n{}".format(*s))
def test_selective_scan(benchmark, copy_gbps, shape, pass_, provider):
    batch, dim, L, n = shape
    bwd = pass_ == "fwd_bwd"
    if bwd and provider == "eager" and not SMOKE and os.environ.get("FASTLAYERS_BENCH_SLOW", "0") in ("", "0"):
        # Its backward is O(L^2): autograd's select-backward of deltaA[:, :, i] and deltaB_u[:, :, i]
        # zero-fills a full (batch, dim, L, N) gradient every step. One call ran > 23 min on the shared
        # 2-core machine without finishing (the cpu fwd+bwd: ~0.8 s).
        pytest.skip("eager fwd+bwd takes > 20 min at this shape; FASTLAYERS_BENCH_SLOW=1 runs it")
    ins = _scan_inputs(batch, dim, L, n, bwd)
    if provider == "cpu":
        def fn(**kw):
            with fastlayers.use_backend("cpu"):
                return fastlayers.selective_scan(**kw, delta_softplus=True)
    else:
        def fn(**kw):
            return selective_scan_ref(**kw, delta_softplus=True)
    act = 4 * batch * dim * L  # one (batch, dim, L) fp32 tensor
    nbytes = 4 * act + 2 * 4 * batch * n * L
    dout = torch.randn(batch, dim, L) if bwd else None
    if bwd:
        nbytes += 4 * act + 2 * 4 * batch * n * L
    run_scan_pass(benchmark, copy_gbps, fn, ins, dout, nbytes, _scan_medians, op="selective_scan", shape=shape,
                  pass_=pass_, provider=provider, warmup=2)
