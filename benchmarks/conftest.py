"""Shared benchmark plumbing: devices, the machine's copy ceiling, GB/s bookkeeping.

Run: ``pytest benchmarks/ --benchmark-only`` (one family: ``-k norm``). ``FASTLAYERS_BENCH_SMOKE=1`` shrinks
every shape so CI can run the files once with ``--benchmark-disable`` (they never rot). The run ends with
benchmarks/summary.py's table: one block per family, one line per case, a column per provider with time,
GB/s, % of the copy ceiling and the speed-ups over torch eager and torch.compile. pytest-benchmark's own
table is cut to the median and rounds, rows sorted by name (``--benchmark-columns`` etc. still override).
"""
import os
import time

import pytest
import torch

SMOKE = os.environ.get("FASTLAYERS_BENCH_SMOKE", "0") not in ("", "0")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_sessionstart(session):
    """pytest-benchmark's own table: median and rounds only, sorted by name, unless asked otherwise."""
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is None:
        return
    args = " ".join(session.config.invocation_params.args)
    if "--benchmark-columns" not in args:
        bs.columns = ["median", "rounds"]
    if "--benchmark-sort" not in args:
        bs.sort = "fullname"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    from summary import lines
    out = lines(bs.benchmarks)
    if out:
        terminalreporter.write_sep("=", "fastlayers benchmark summary (also in --benchmark-json)")
        for line in out:
            terminalreporter.write_line(line)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure_copy_gbps(nbytes=128 << 20):
    """Copy bandwidth into a preallocated buffer (read + write bytes / time), median of 7. On the CPU both
    buffers are advised onto huge pages like the large buffers fastlayers allocates (the MLA cache)."""
    from fastlayers._alloc import empty
    n = max(nbytes // 4, 1024)
    a = empty((n,), torch.float32, DEVICE).normal_()
    b = empty((n,), torch.float32, DEVICE)
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


# A call slower than this (after its warm-up) is timed over 3 rounds with no more warm-up rounds: the median of
# 3 such calls is as steady as of 5, and the eager references of a family would otherwise take minutes.
SLOW_CALL_S = 0.25


def run(benchmark, fn, nbytes, copy_gbps, rounds=5, warmup=3, **info):
    """Benchmark ``fn`` and record analytic GB/s and its fraction of the copy ceiling.
    ``warmup=0``: no warm-up call at all (for references that take seconds a call)."""
    def call():
        fn()
        sync()

    if warmup:
        call()  # warm-up (and compilation for torch.compile providers)
        if not SMOKE:
            t = time.perf_counter()
            call()
            if time.perf_counter() - t > SLOW_CALL_S:  # a slow call (an eager reference): 3 rounds, no more warm-up
                rounds, warmup = min(rounds, 3), 0
    benchmark.pedantic(call, rounds=1 if SMOKE else rounds, iterations=1, warmup_rounds=0 if SMOKE else warmup)
    info.update(bytes=nbytes, copy_gbps=round(copy_gbps, 2), device=DEVICE,
                device_name=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                threads=torch.get_num_threads())
    if benchmark.stats is not None:  # None under --benchmark-disable
        t = benchmark.stats.stats.median
        info["gbps"] = round(nbytes / t / 1e9, 2)
        info["fraction_of_copy"] = round(nbytes / t / 1e9 / copy_gbps, 3)
    benchmark.extra_info.update(info)


def run_scan_pass(benchmark, copy_gbps, fn, ins, dout, nbytes, medians, *, op, shape, pass_, provider, warmup):
    """Time one pass of a scan op against its eager reference (providers "eager" then "cpu").

    ``fn(**ins)`` is the op; with ``dout`` the pass is forward + backward (gradients of ``ins``), else
    forward under no_grad. The eager reference takes tens of seconds a call at the issue's shapes: one
    timed call, no warm-up. ``medians`` (a dict the module keeps) holds the eager times, so the cpu row
    records ``speedup_vs_eager``, or, for a fwd+bwd whose eager run was skipped, the lower bound
    ``eager forward / cpu fwd+bwd``."""
    if dout is not None:
        def step():
            for t in ins.values():
                t.grad = None
            fn(**ins).backward(dout)
    else:
        def step():
            with torch.no_grad():
                fn(**ins)
    slow = provider == "eager"
    run(benchmark, step, nbytes, copy_gbps, rounds=1 if slow else 5, warmup=0 if slow else warmup, op=op,
        pass_=pass_, shape=list(shape), dtype="float32", provider=provider)
    if benchmark.stats is None or provider != "cpu":
        if benchmark.stats is not None:
            medians[(shape, pass_, provider)] = benchmark.stats.stats.median
        return
    t = benchmark.stats.stats.median
    eager, eager_fwd = medians.get((shape, pass_, "eager")), medians.get((shape, "fwd", "eager"))
    if eager is not None:
        benchmark.extra_info["speedup_vs_eager"] = round(eager / t, 1)
        print(f"\n{op} {pass_} {shape}: cpu {t * 1e3:.1f} ms, eager {eager * 1e3:.1f} ms, speedup {eager / t:.1f}x")
    elif dout is not None and eager_fwd is not None:
        # The eager fwd+bwd takes longer than its forward: a lower bound of the speed-up.
        benchmark.extra_info["speedup_vs_eager_fwd_lower_bound"] = round(eager_fwd / t, 1)
        print(f"\n{op} fwd_bwd {shape}: cpu {t * 1e3:.1f} ms; speedup >= {eager_fwd / t:.1f}x "
              f"(eager forward alone {eager_fwd * 1e3:.1f} ms)")
