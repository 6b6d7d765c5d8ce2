"""ssd_scan (the Mamba-2 scan) against its eager reference, forward and forward+backward.

Providers: ``cpu`` (the fastlayers kernel) and ``eager`` (:func:`fastlayers.reference.ssd_scan`, the
recurrence as a Python loop over L of (batch, nheads, headdim, dstate) tensor ops). The cpu rows record
``speedup_vs_eager`` (the issue's CPU target: forward >= 10x at b 2, l 2048, h 24, p 64, n 128, fp32).
Bytes: x, z, dt, B, C read and out written once (forward); plus dout read and dx, dz, ddt, dB, dC
written (backward; the states are recomputed from checkpoints, never stored).
The eager forward+backward is skipped by default (autograd's select-backward of x[:, t], B[:, t], ...
zero-fills a whole (b, l, ...) gradient every step: O(L^2) memory traffic); FASTLAYERS_BENCH_SLOW=1 runs it.
"""
import os

import pytest
import torch

import fastlayers
from fastlayers import reference

from conftest import DEVICE, SMOKE, run_scan_pass

# (batch, seqlen, nheads, headdim, dstate, ngroups): the CPU target shape
SHAPES = [(1, 64, 2, 8, 4, 1)] if SMOKE else [(2, 2048, 24, 64, 128, 1)]
_medians = {}


def _inputs(b, L, h, p, n, g, requires_grad):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    ins = dict(x=r(b, L, h, p), dt=r(b, L, h) * 0.5 - 1, A=-(torch.rand(h, generator=gen) + 0.1),
               B=r(b, L, g, n), C=r(b, L, g, n), D=r(h), z=r(b, L, h, p), dt_bias=r(h) * 0.5)
    return {k: v.requires_grad_(requires_grad) for k, v in ins.items()}


@pytest.mark.skipif(DEVICE != "cpu", reason="GPU rows: benchmarks/gpu_table.py (ssd_scan)")
@pytest.mark.parametrize("provider", ["eager", "cpu"])  # eager first: the cpu row records the ratio
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}l{}h{}p{}n{}g{}".format(*s))
def test_ssd_scan(benchmark, copy_gbps, shape, pass_, provider):
    b, L, h, p, n, g = shape
    bwd = pass_ == "fwd_bwd"
    if bwd and provider == "eager" and not SMOKE and os.environ.get("FASTLAYERS_BENCH_SLOW", "0") in ("", "0"):
        pytest.skip("eager fwd+bwd is O(L^2) in autograd's select-backward (minutes at this shape); "
                    "FASTLAYERS_BENCH_SLOW=1 runs it")
    ins = _inputs(b, L, h, p, n, g, bwd)
    impl = reference.ssd_scan if provider == "eager" else fastlayers.ssd_scan

    def fn(**kw):
        with fastlayers.use_backend("cpu"):
            return impl(**kw, dt_softplus=True)
    act = 4 * b * L * h * p  # one (b, l, h, p) fp32 tensor
    small = 4 * b * L * h + 2 * 4 * b * L * g * n  # dt, B, C
    nbytes = 3 * act + small
    dout = torch.randn(b, L, h, p) if bwd else None
    if bwd:
        nbytes += 3 * act + small
    run_scan_pass(benchmark, copy_gbps, fn, ins, dout, nbytes, _medians, op="ssd_scan", shape=shape, pass_=pass_,
                  provider=provider, warmup=1)
