"""Mamba scans: selective_state_update (the decode step) against its eager reference.

Providers: the fastlayers backend (``cpu``; ``triton`` on a GPU), ``eager`` (fastlayers.reference.
selective_state_update, written like mamba_ssm's ``selective_state_update_ref``) and ``compile``
(torch.compile of it). Bytes: the state is read and written once; x, dt, B, C, z, out once each
(A, D and dt_bias broadcast over headdim as Mamba-2 passes them).
"""
import pytest
import torch

import fastlayers
from fastlayers import reference

from conftest import DEVICE, SMOKE, run

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
