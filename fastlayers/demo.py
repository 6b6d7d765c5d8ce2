"""The main job for now: print the backends and a speed comparison of the fused norm.

    fastlayers-demo [--tokens 8192] [--hidden 4096] [--compile]

(or ``python -m fastlayers.demo`` from outside the source tree)
"""
import argparse
import time

import torch
import torch.nn.functional as F

import fastlayers


def _time(fn, reps):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the eager composition")
    a = p.parse_args(argv)

    print(f"fastlayers {fastlayers.__version__}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("backends:")
    for name, (ok, why) in fastlayers.available_backends().items():
        print(f"  {name:10s} {'yes' if ok else 'no ':3s}  {why}")

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(a.tokens, a.hidden, device=dev)
    r = torch.randn_like(x)
    w = torch.randn(a.hidden, device=dev)
    out = torch.empty_like(x)
    nbytes = 3 * x.numel() * x.element_size()
    copy_buf = torch.empty_like(x)
    t_copy = _time(lambda: copy_buf.copy_(x), a.reps)
    copy_gbps = 2 * x.numel() * x.element_size() / t_copy / 1e9

    eager = lambda: F.rms_norm(x + r, (a.hidden,), w, 1e-6)  # noqa: E731
    rows = [("torch eager: x + r, F.rms_norm", eager)]
    if a.compile:
        comp = torch.compile(lambda: F.rms_norm(x + r, (a.hidden,), w, 1e-6))
        rows.append(("torch.compile of the same", comp))
    rows += [("fastlayers.rms_norm(x, w, residual=r)", lambda: fastlayers.rms_norm(x, w, residual=r)),
             ("  ... with out= (preallocated)", lambda: fastlayers.rms_norm(x, w, residual=r, out=out))]
    ref = eager()
    torch.testing.assert_close(fastlayers.rms_norm(x, w, residual=r), ref, atol=1e-4, rtol=1e-4)

    print(f"\nresidual add + RMSNorm, {a.tokens} x {a.hidden} float32 on {dev} "
          f"(copy ceiling {copy_gbps:.1f} GB/s, into a preallocated buffer):")
    base = None
    with torch.no_grad():
        for name, fn in rows:
            t = _time(fn, a.reps)
            base = base or t
            gbps = nbytes / t / 1e9
            print(f"  {name:42s} {t * 1e3:8.2f} ms  {gbps:6.1f} GB/s  {gbps / copy_gbps:5.0%} of copy  "
                  f"{base / t:5.2f}x eager")


if __name__ == "__main__":
    main()
