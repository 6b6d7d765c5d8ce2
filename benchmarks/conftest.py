"""Shared benchmark plumbing: devices, the machine's copy ceiling, GB/s bookkeeping.

Run: ``pytest benchmarks/ --benchmark-only``. ``FASTLAYERS_BENCH_SMOKE=1`` shrinks every
shape so CI can run the files once with ``--benchmark-disable`` (they never rot).
"""
import os
import time

import pytest
import torch

SMOKE = os.environ.get("FASTLAYERS_BENCH_SMOKE", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure_copy_gbps(nbytes=128 << 20):
    """Copy bandwidth into a preallocated buffer (read + write bytes / time), median of 7."""
    n = max(nbytes // 4, 1024)
    a = torch.randn(n, device=DEVICE)
    b = torch.empty_like(a)
    b.copy_(a)
    ts = []
    for _ in range(7):
        sync()
        t = time.perf_counter()
        b.copy_(a)
        sync()
        ts.append(time.perf_counter() - t)
    return 2 * n * 4 / sorted(ts)[3] / 1e9


@pytest.fixture(scope="session")
def copy_gbps():
    return measure_copy_gbps(1 << 20 if SMOKE else 128 << 20)


def run(benchmark, fn, nbytes, copy_gbps, rounds=5, warmup=3, **info):
    """Benchmark ``fn`` and record analytic GB/s and its fraction of the copy ceiling.
    ``warmup=0``: no warm-up call at all (for references that take seconds a call)."""
    def call():
        fn()
        sync()

    if warmup:
        call()  # warm-up (and compilation for torch.compile providers)
    benchmark.pedantic(call, rounds=1 if SMOKE else rounds, iterations=1, warmup_rounds=0 if SMOKE else warmup)
    info.update(bytes=nbytes, copy_gbps=round(copy_gbps, 2), device=DEVICE,
                device_name=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                threads=torch.get_num_threads())
    if benchmark.stats is not None:  # None under --benchmark-disable
        t = benchmark.stats.stats.median
        info["gbps"] = round(nbytes / t / 1e9, 2)
        info["fraction_of_copy"] = round(nbytes / t / 1e9 / copy_gbps, 3)
    benchmark.extra_info.update(info)
