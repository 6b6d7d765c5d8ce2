"""The kernels benchmarks/gpu_check.sh profiles: one call each of a short list, after a warm-up.

    ncu --profile-from-start off ... python benchmarks/gpu_profile.py     # under ncu: what runs between
                                                                          # cudaProfilerStart/Stop is profiled
    python benchmarks/gpu_profile.py --torch-profiler [--device cpu]      # the fallback: torch.profiler's table

Every case runs twice first (Triton compiles, autotuning, caches), then once more between
``torch.cuda.profiler.start()`` and ``stop()`` inside an NVTX range named after the case, so ncu (run with
``--profile-from-start off``) sees only those launches, in this order:

    rms_norm fwd (fused residual), 8192 x 4096 bf16: triton, cuda
    swiglu fwd, 16384 x 4096 bf16: triton
    qkv_norm_rope fwd, 2 x 8192 x 32/8 x 128 bf16: triton (q, k, v: 3 launches)
    mla_decode, b 64, 4096 tokens, 16 heads, 512+64 bf16: triton, cuda (split + combine)
    selective_state_update, b 16 h 80 p 64 n 128 fp32: triton
    ssd_scan fwd, b 8 l 4096 h 32 p 64 n 128 bf16: triton (its kernels)
    causal_conv1d fwd, 8 x 4096 x 4096 bf16, width 4: triton
    selective_scan fwd, b 8 d 2048 L 2048 n 16 bf16: cuda
    peers where installed: Liger's fused add + RMSNorm (as the first), mamba_ssm's chunk scan (as ssd_scan)

About 25 launches; gpu_check.sh caps ncu with --launch-count. On the CPU (--device cpu) the cases run with
tiny shapes on the cpu backend (peers skipped) and only the torch.profiler table is possible.
"""
import argparse
import os
import sys

import torch

import fastlayers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_peers as peers  # noqa: E402


def cases(dev, tiny):
    """(name, zero-argument call) pairs; a case whose backend or peer is missing is left out with a line on
    stderr."""
    bf = torch.float32 if tiny else torch.bfloat16
    av = fastlayers.available_backends()
    fast = ["cpu"] if dev == "cpu" else [b for b in ("triton", "cuda") if av[b][0]]
    out = []

    def on(backend, fn, *args, **kw):
        def call():
            with fastlayers.use_backend(backend):
                return fn(*args, **kw)
        return call

    tok, hid = (64, 256) if tiny else (8192, 4096)
    x, r = (torch.randn(tok, hid, device=dev, dtype=bf) for _ in range(2))
    w = torch.randn(hid, device=dev, dtype=bf)
    for b in fast:
        out.append((f"rms_norm fwd {tok}x{hid} {b}", on(b, fastlayers.rms_norm, x, w, residual=r)))
    lg, _ = peers.liger()
    if lg is not None and dev != "cpu" and lg.fused_add_rms_norm is not None:
        out.append((f"rms_norm fwd {tok}x{hid} liger", lambda: lg.fused_add_rms_norm.apply(x, r, w, 1e-6)))
    tri = [b for b in fast if b != "cuda"]  # the ops whose GPU backend is Triton alone

    m, f = (16, 64) if tiny else (16384, 4096)
    g = torch.randn(m, 2 * f, device=dev, dtype=bf)
    for b in tri:
        out.append((f"swiglu fwd {m}x{f} {b}", on(b, fastlayers.swiglu, g)))

    from fastlayers import reference
    bb, t, hq, hkv, d = (1, 16, 4, 2, 32) if tiny else (2, 8192, 32, 8, 128)
    qkv = torch.randn(bb, t, hq + 2 * hkv, d, device=dev, dtype=bf)
    cos, sin = reference.rope_tables(d, t, 500000.0, dev)
    ws = [torch.rand(d, device=dev, dtype=bf) + 0.5 for _ in range(3)]
    for b in tri:
        out.append((f"qkv_norm_rope fwd {bb}x{t}x{hq}/{hkv}x{d} {b}",
                    on(b, fastlayers.qkv_norm_rope, qkv[:, :, :hq], qkv[:, :, hq:hq + hkv], qkv[:, :, hq + hkv:], *ws,
                       cos, sin)))

    b_, n, h, lat, rope = (2, 64, 4, 64, 32) if tiny else (64, 4096, 16, 512, 64)
    blocks = -(-n // 64)
    kv = torch.randn(b_ * blocks, 64, 1, lat + rope, device=dev).to(bf)
    table = torch.randperm(b_ * blocks, device=dev).view(b_, blocks).to(torch.int32)
    lens = torch.full((b_,), n, dtype=torch.int32, device=dev)
    q = torch.randn(b_, 1, h, lat + rope, device=dev).to(bf)
    for b in fast:
        out.append((f"mla_decode b{b_} n{n} h{h} {lat}+{rope} {b}", on(b, fastlayers.mla_decode, q, kv, table, lens, lat)))

    bs, hs, ps, ns = (2, 2, 4, 8) if tiny else (16, 80, 64, 128)
    state = torch.randn(bs, hs, ps, ns, device=dev)
    xs, zs = torch.randn(bs, hs, ps, device=dev), torch.randn(bs, hs, ps, device=dev)
    dts = torch.randn(bs, hs, device=dev)[:, :, None].expand(bs, hs, ps)
    As = -torch.rand(hs, device=dev)[:, None, None].expand(hs, ps, ns)
    Bs, Cs = torch.randn(bs, 1, ns, device=dev), torch.randn(bs, 1, ns, device=dev)
    Ds = torch.randn(hs, device=dev)[:, None].expand(hs, ps)
    for b in tri:
        out.append((f"selective_state_update b{bs} h{hs} p{ps} n{ns} {b}",
                    on(b, fastlayers.selective_state_update, state, xs, dts, As, Bs, Cs, Ds, zs, None, True)))

    B, L, H, P, N = (1, 64, 2, 8, 4) if tiny else (8, 4096, 32, 64, 128)
    xq, zq = (torch.randn(B, L, H, P, device=dev).to(bf) for _ in range(2))
    dtq = torch.randn(B, L, H, device=dev) * 0.5 - 1
    Bq, Cq = (torch.randn(B, L, 1, N, device=dev).to(bf) for _ in range(2))
    Aq, Dq, dtbq = -(torch.rand(H, device=dev) + 0.1), torch.randn(H, device=dev), torch.randn(H, device=dev) * 0.5
    for b in tri:
        out.append((f"ssd_scan fwd b{B} l{L} h{H} p{P} n{N} {b}",
                    on(b, fastlayers.ssd_scan, xq, dtq, Aq, Bq, Cq, D=Dq, z=zq, dt_bias=dtbq, dt_softplus=True)))
    mb, _ = peers.mamba()
    if mb is not None and dev != "cpu":
        out.append((f"ssd_scan fwd b{B} l{L} h{H} p{P} n{N} mamba_ssm",
                    lambda: mb.chunk_scan_combined(xq, dtq, Aq, Bq, Cq, 256, D=Dq, z=zq, dt_bias=dtbq, dt_softplus=True)))

    cb, cd, cl = (2, 8, 64) if tiny else (8, 4096, 4096)
    xc = torch.randn(cb, cd, cl, device=dev).to(bf)
    wc, bc = torch.randn(cd, 4, device=dev).to(bf), torch.randn(cd, device=dev).to(bf)
    for b in tri:
        out.append((f"causal_conv1d fwd b{cb} d{cd} L{cl} {b}",
                    on(b, fastlayers.causal_conv1d, xc, wc, bc, activation="silu")))

    sb, sd, sl, sn = (1, 4, 64, 8) if tiny else (8, 2048, 2048, 16)
    u, dl, zz = (torch.randn(sb, sd, sl, device=dev).to(bf) for _ in range(3))
    A = -torch.rand(sd, sn, device=dev) - 0.1
    Bm, Cm = (torch.randn(sb, sn, sl, device=dev).to(bf) for _ in range(2))
    Dm, bias = torch.randn(sd, device=dev), torch.randn(sd, device=dev)
    for b in [b for b in fast if b != "triton"]:  # no Triton selective_scan
        out.append((f"selective_scan fwd b{sb} d{sd} L{sl} n{sn} {b}",
                    on(b, fastlayers.selective_scan, u, dl, A, Bm, Cm, Dm, zz, bias, delta_softplus=True,
                       return_last_state=True)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--torch-profiler", action="store_true", help="print torch.profiler's kernel table (the fallback)")
    p.add_argument("--reason", default="", help="why the fallback runs (printed first)")
    a = p.parse_args(argv)
    dev = a.device
    gpu = dev.startswith("cuda")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    todo = []
    with torch.no_grad():
        for name, fn in cases(dev, tiny=not gpu):
            try:
                fn()
                fn()
                sync()
                todo.append((name, fn))
            except Exception as e:  # noqa: BLE001 - a case that cannot run is left out, with a line
                print(f"gpu_profile: {name}: left out: {type(e).__name__}: {e}"[:300], file=sys.stderr)
        print(f"gpu_profile: {len(todo)} cases on {dev}: " + "; ".join(n for n, _ in todo), file=sys.stderr)
        if a.torch_profiler:
            from torch.profiler import ProfilerActivity, profile, record_function
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
            with profile(activities=acts) as prof:
                for name, fn in todo:
                    with record_function(name):
                        fn()
                    sync()
            print(f"torch.profiler fallback{': ' + a.reason if a.reason else ''} (kernel times only: no DRAM or "
                  f"local-memory bytes, no occupancy or warp-state figures)")
            avg = prof.key_averages()
            for key in (("self_device_time_total", "self_cuda_time_total") if gpu else ("self_cpu_time_total",)):
                try:
                    print(avg.table(sort_by=key, row_limit=60, max_name_column_width=90))
                    break
                except AttributeError:  # an older torch: self_cuda_time_total
                    continue
            return 0
        if gpu:
            torch.cuda.profiler.start()
        for name, fn in todo:
            if gpu:
                torch.cuda.nvtx.range_push(name)
            fn()
            sync()
            if gpu:
                torch.cuda.nvtx.range_pop()
        if gpu:
            torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
