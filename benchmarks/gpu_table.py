"""GPU summary table for benchmarks/gpu_check.sh: op, shape, dtype, backend, time, GB/s, % of copy.

Timing: triton.testing.do_bench (median), inputs rotated across enough copies that L2 cannot
hold them. Bytes are analytic (each input read once, each output written once). The ceiling is
a device-to-device copy measured the same way in the same run.

    python benchmarks/gpu_table.py [--quick] [--md results.md]
    python benchmarks/gpu_table.py --cpu-smoke     # tiny shapes on the CPU: keeps the script from rotting

The HybridNorm rows (gpu_table_hybridnorm.py) add qkv_norm_rope and swiglu GB/s, the QKV-norm
attention against SDPA alone (target <= 1.15x) and the HybridNormBlock against the compiled reference;
gpu_table_mla.py adds mla_decode (512+64 and Zebra's latent sizes; cuda and triton), selective_state_update
and the selective_scan forward and forward + backward (cuda); gpu_table_ssd.py the ssd_scan (Mamba-2) forward
with TFLOP/s.
"""
import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

import fastlayers


DEVICE = "cuda"


DEADLINE = None  # time.monotonic() after which no more timings start (--budget)


class OutOfTime(RuntimeError):
    """Raised by bench() past --budget: the row is reported as skipped, the table still prints."""


def bench(fn_of_set, sets):
    """Median time (s) of fn over rotating input sets (on the CPU smoke run: best of 3 calls)."""
    import time
    if DEADLINE is not None and time.monotonic() > DEADLINE:
        raise OutOfTime("--budget spent, not run")
    it = itertools.cycle(sets)
    if DEVICE == "cpu":
        fn_of_set(next(it))
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn_of_set(next(it))
            ts.append(time.perf_counter() - t)
        return min(ts)
    from triton.testing import do_bench

    return do_bench(lambda: fn_of_set(next(it)), warmup=25, rep=100, return_mode="median") * 1e-3


def timed_row(rows, label, fn_of_set, sets, nbytes, ceiling, grad=False, flops=None):
    """Time fn over sets (under no_grad, or enable_grad with ``grad``) and append the row ``(*label, us,
    GB/s, % of the copy ceiling[; TFLOP/s])``, or an ERROR row (report, don't hide). Returns the time or None."""
    with torch.enable_grad() if grad else torch.no_grad():
        try:
            t = bench(fn_of_set, sets)
        except Exception as e:
            rows.append((*label, float("nan"), float("nan"), f"ERROR {type(e).__name__}: {e}"[:80]))
            return None
    gbps = nbytes / t / 1e9
    rows.append((*label, t * 1e6, gbps, f"{gbps / ceiling:.0%}" + (f"; {flops / t / 1e12:.1f} TFLOP/s" if flops else "")))
    return t


def n_sets(nbytes_per_set, l2_bytes):
    return max(2, min(16, int(3 * l2_bytes // max(nbytes_per_set, 1)) + 1))


def copy_gbps(l2):
    n = (256 << 20) if DEVICE == "cuda" else (4 << 20)
    sets = [(torch.empty(n // 4, device=DEVICE), torch.empty(n // 4, device=DEVICE)) for _ in range(2)]
    for a, _ in sets:
        a.normal_()
    t = bench(lambda s: s[1].copy_(s[0]), sets)
    return 2 * n / t / 1e9


def providers():
    av = fastlayers.available_backends()
    fast = ("cuda", "triton") if DEVICE == "cuda" else ("cpu",)
    out = [b for b in fast if av[b][0]] + ["eager", "compile"]
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction  # noqa: F401
        out.append("liger")
    except ImportError:
        pass
    return out


_compiled = {}


def make_fn(provider, op, backward):
    is_rms = op == "rms_norm"
    if provider in ("cuda", "triton", "cpu"):
        fl = fastlayers.rms_norm if is_rms else fastlayers.layer_norm

        def f(x, r, w, b):
            with fastlayers.use_backend(provider):
                return fl(x, w, residual=r) if is_rms else fl(x, w, b, residual=r)
    elif provider in ("eager", "compile"):
        def f(x, r, w, b):
            h = x + r
            return F.rms_norm(h, (h.shape[-1],), w, 1e-6) if is_rms else F.layer_norm(h, (h.shape[-1],), w, b, 1e-5)
        if provider == "compile":
            key = (op, backward)
            if key not in _compiled:
                _compiled[key] = torch.compile(f, dynamic=True)
            f = _compiled[key]
    elif provider == "liger":
        if not is_rms:
            return None
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        def f(x, r, w, b):
            return LigerRMSNormFunction.apply(x + r, w, 1e-6)
    else:
        raise ValueError(provider)
    if not backward:
        return lambda s: f(*s[:4])

    def fb(s):
        for t in s[:4]:
            t.grad = None
        f(*s[:4]).backward(s[4])
    return fb


def norm_rows(gt, ceiling, l2, quick=False, smoke=False):
    """rms_norm / layer_norm with a residual, forward and forward + backward, every provider."""
    if smoke:
        shapes = [(64, 256)]
    else:
        shapes = [(8192, 4096)] if quick else [(t, h) for t in (4096, 8192, 16384) for h in (2048, 4096, 8192)]
    rows = []
    for op, backward, (tok, hid), dtype in itertools.product(
            ("rms_norm", "layer_norm"), (False, True), shapes, (torch.bfloat16, torch.float32)):
        if dtype == torch.float32 and (tok, hid) != shapes[0]:
            continue
        if backward and hid == 2048:
            continue
        esz = torch.tensor([], dtype=dtype).element_size()
        per = tok * hid * esz
        nbytes = (3 + (4 if backward else 0)) * per
        sets = []
        for _ in range(n_sets(nbytes, l2)):
            x, r = (torch.randn(tok, hid, device=DEVICE, dtype=dtype, requires_grad=backward) for _ in range(2))
            w, b = (torch.randn(hid, device=DEVICE, dtype=dtype, requires_grad=backward) for _ in range(2))
            sets.append((x, r, w, b, torch.randn(tok, hid, device=DEVICE, dtype=dtype)))
        for prov in providers():
            fn = make_fn(prov, op, backward)
            if fn is None:
                continue
            label = (op + (" fwd+bwd" if backward else " fwd"), f"{tok}x{hid}", str(dtype)[6:], prov)
            timed_row(rows, label, fn, sets, nbytes, ceiling, grad=backward)
        del sets
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def overhead_rows(gt, ceiling, l2, quick=False, smoke=False):
    """What the Python wrapper costs: rms_norm with a residual (fwd, bf16) at a size where the kernel is
    short, through fastlayers.rms_norm, through the backend's launcher alone (buffers made once), and
    F.rms_norm of x + r (eager) for scale."""
    from fastlayers.backends import load
    tok, hid = (64, 256) if smoke else (4096, 2048)
    dtype = torch.float32 if smoke else torch.bfloat16
    x, r, y, h = (torch.randn(tok, hid, device=DEVICE, dtype=dtype) for _ in range(4))
    w = torch.randn(hid, device=DEVICE, dtype=dtype)
    mean, rstd = (torch.empty(tok, device=DEVICE) for _ in range(2))
    nbytes = 4 * tok * hid * x.element_size()
    rows = []
    for prov in providers():
        if prov in ("eager", "compile", "liger"):
            continue
        be = load(prov)

        def api(_s, prov=prov):
            with fastlayers.use_backend(prov):
                fastlayers.rms_norm(x, w, residual=r, prenorm=True)

        def kernel(_s, be=be):
            be.norm_fwd(x, r, w, None, y, h, mean, rstd, 1e-6, True)

        timed_row(rows, ("rms_norm fwd (API)", f"{tok}x{hid}", str(dtype)[6:], prov), api, [None], nbytes, ceiling)
        timed_row(rows, ("rms_norm fwd (kernel alone)", f"{tok}x{hid}", str(dtype)[6:], prov), kernel, [None],
                  nbytes, ceiling)
    timed_row(rows, ("rms_norm fwd (eager)", f"{tok}x{hid}", str(dtype)[6:], "eager"),
              lambda _s: F.rms_norm(x + r, (hid,), w, 1e-6), [None], nbytes, ceiling)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="one shape per op")
    p.add_argument("--md", help="also write the table as markdown to this file")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (CI: the script still runs)")
    p.add_argument("--budget", type=float, help="seconds: rows not started by then are reported as not run")
    p.add_argument("--families", help="comma-separated subset of: mla,ssd,scan,state_update,conv1d,hybridnorm,norm,overhead")
    a = p.parse_args(argv)
    global DEVICE, DEADLINE
    if a.cpu_smoke:
        DEVICE = "cpu"
        l2, name = 1 << 20, "cpu (smoke run: tiny shapes, timings meaningless)"
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_table.py needs a CUDA GPU (or --cpu-smoke)")
        props = torch.cuda.get_device_properties(0)
        l2 = getattr(props, "L2_cache_size", 50 << 20)
        name = torch.cuda.get_device_name()
    ceiling = copy_gbps(l2)
    if a.budget:
        import time
        DEADLINE = time.monotonic() + a.budget
    from gpu_table_hybridnorm import hybridnorm_rows
    from gpu_table_mla import conv1d_rows, mla_rows, scan_rows, state_update_rows
    from gpu_table_ssd import ssd_rows
    head = ("op", "shape", "dtype", "backend", "time_us", "GB/s", "% of copy / ratio")
    lines = [f"device: {name}; device-to-device copy ceiling {ceiling:.0f} GB/s; torch {torch.__version__}",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    print(lines[0], flush=True)
    # The open issues' rows first (MLA, the scans), the norms last: with --budget the table ends early
    # and still prints. Each family's rows print (and the markdown is rewritten) as soon as it finishes.
    families = (mla_rows, ssd_rows, scan_rows, state_update_rows, conv1d_rows, hybridnorm_rows, norm_rows,
                overhead_rows)
    if a.families:
        want = set(a.families.split(","))
        unknown = want - {f.__name__[:-5] for f in families}
        if unknown:
            sys.exit(f"--families: unknown {sorted(unknown)}")
        families = [f for f in families if f.__name__[:-5] in want]
    for family in families:
        for r in family(sys.modules[__name__], ceiling, l2, quick=a.quick, smoke=a.cpu_smoke):
            gb = "-" if r[5] != r[5] else f"{r[5]:.0f}"  # NaN where GB/s does not apply (attention, block)
            lines.append("| " + " | ".join([r[0], r[1], r[2], r[3], f"{r[4]:.1f}", gb, r[6]]) + " |")
            print(lines[-1], flush=True)
        if a.md:
            with open(a.md, "w") as f:
                f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
