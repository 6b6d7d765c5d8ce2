"""ssd_scan (Mamba-2 chunked scan) rows of the GPU table (benchmarks/gpu_table.py).

Forward at b 8, l 4096, h 32, p 64, n 128, ngroups 1, bf16 x/z/B/C (dt, A, D fp32, softplus, D and z on).
Bytes = x, z, dt, B, C read + out written once. FLOPs = the chunked algorithm's matrix products with
the kernel's chunk Q (64 for 16-bit inputs): per token and head 2 Q (N + P) (C B^T and the masked
product with x) + 4 P N (the carried state's output and the chunk-state update). The last column gives
the % of the device-to-device copy and the TFLOP/s.
"""
import torch

import fastlayers


def ssd_rows(gt, ceiling, l2, quick=False, smoke=False):
    dev = gt.DEVICE
    fast = "triton" if dev == "cuda" else "cpu"
    dtype = torch.float32 if smoke else torch.bfloat16
    shapes = [(1, 64, 2, 8, 4, 1)] if smoke else [(8, 4096, 32, 64, 128, 1)]
    rows = []
    for b, L, h, p, n, g in shapes:
        esz = torch.tensor([], dtype=dtype).element_size()
        nbytes = 3 * b * L * h * p * esz + 4 * b * L * h + 2 * b * L * g * n * esz
        q = 64 if dtype != torch.float32 else 32
        flops = b * L * h * (2 * q * (n + p) + 4 * p * n)
        sets = []
        for _ in range(gt.n_sets(nbytes, l2)):
            x, z = (torch.randn(b, L, h, p, device=dev).to(dtype) for _ in range(2))
            dt = torch.randn(b, L, h, device=dev) * 0.5 - 1
            B, C = (torch.randn(b, L, g, n, device=dev).to(dtype) for _ in range(2))
            sets.append((x, dt, B, C, z))
        A = -(torch.rand(h, device=dev) + 0.1)
        D, dtb = torch.randn(h, device=dev), torch.randn(h, device=dev) * 0.5

        def call(s, A=A, D=D, dtb=dtb):
            x, dt, B, C, z = s
            with fastlayers.use_backend(fast):
                fastlayers.ssd_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dtb, dt_softplus=True)

        label = ("ssd_scan fwd", f"b{b} l{L} h{h} p{p} n{n} g{g}", str(dtype)[6:], fast)
        with torch.no_grad():
            try:
                t = gt.bench(call, sets)
            except Exception as e:  # report, don't hide
                rows.append((*label, float("nan"), float("nan"), f"ERROR {type(e).__name__}: {e}"[:80]))
                continue
        gbps = nbytes / t / 1e9
        rows.append((*label, t * 1e6, gbps, f"{gbps / ceiling:.0%}; {flops / t / 1e12:.1f} TFLOP/s"))
        del sets
    return rows
