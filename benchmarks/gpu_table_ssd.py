"""ssd_scan (Mamba-2 chunked scan) rows of the GPU table (benchmarks/gpu_table.py).

Forward, and forward+backward (gradients of x, dt, B, C, z and the parameters), at b 8, l 4096, h 32, p 64,
n 128, ngroups 1, bf16 x/z/B/C (dt, A, D fp32, softplus, D and z on).
Forward: bytes = x, z, dt, B, C read + out written once; FLOPs = the chunked algorithm's matrix products
with the kernel's chunk Q (64 for 16-bit inputs): per token and head 2 Q (N + P) (C B^T and the masked
product with x) + 4 P N (the carried state's output and the chunk-state update).
Forward+backward: bytes = the forward's + x, z, dout, dt, B, C read and dx, dz, ddt, dB, dC written once
(not the fp32 scratch: chunk states and state gradients); FLOPs = the forward's, the backward's recompute
of it (chunk Q' = 32) and the backward kernels' products: per token and head 4 Q' (N + P) + 8 P N, per
token and group 2 Q' N (C B^T). The last column gives the % of the device-to-device copy and the TFLOP/s.
Peer: mamba_ssm's ``mamba_chunk_scan_combined`` (Triton) on the same inputs (chunk 256, its Mamba2 default),
with the same byte and FLOP counts (its own chunking does other work: the ratio of times is what compares).
"""
import torch

import fastlayers
import gpu_peers as peers


def ssd_rows(gt, ceiling, l2, quick=False, smoke=False):
    dev = gt.DEVICE
    fast = "triton" if dev == "cuda" else "cpu"
    dtype = torch.float32 if smoke else torch.bfloat16
    shapes = [(1, 64, 2, 8, 4, 1)] if smoke else [(8, 4096, 32, 64, 128, 1)]
    rows = []
    mb, why = peers.mamba()
    if mb is None:
        gt.peer_missing_rows(rows, ("ssd_scan fwd", "ssd_scan fwd+bwd"), "mamba_ssm", why)
    for (b, L, h, p, n, g), backward in [(s, bw) for s in shapes for bw in (False, True)]:
        esz = torch.tensor([], dtype=dtype).element_size()
        nbytes = 3 * b * L * h * p * esz + 4 * b * L * h + 2 * b * L * g * n * esz
        q = 64 if dtype != torch.float32 else 32
        flops = b * L * h * (2 * q * (n + p) + 4 * p * n)
        if backward:
            nbytes += 5 * b * L * h * p * esz + 8 * b * L * h + 4 * b * L * g * n * esz
            flops += b * L * h * (2 * 32 * (n + p) + 4 * p * n + 4 * 32 * (n + p) + 8 * p * n) + b * L * g * 2 * 32 * n
        sets = []
        for _ in range(gt.n_sets(nbytes, l2)):
            x, z = (torch.randn(b, L, h, p, device=dev).to(dtype).requires_grad_(backward) for _ in range(2))
            dt = (torch.randn(b, L, h, device=dev) * 0.5 - 1).requires_grad_(backward)
            B, C = (torch.randn(b, L, g, n, device=dev).to(dtype).requires_grad_(backward) for _ in range(2))
            dout = torch.randn(b, L, h, p, device=dev).to(dtype) if backward else None
            sets.append((x, dt, B, C, z, dout))
        A = -(torch.rand(h, device=dev) + 0.1)
        D, dtb = torch.randn(h, device=dev), torch.randn(h, device=dev) * 0.5
        if backward:
            for t in (A, D, dtb):
                t.requires_grad_()

        def call(s, A=A, D=D, dtb=dtb, backward=backward):
            x, dt, B, C, z, dout = s
            with fastlayers.use_backend(fast):
                y = fastlayers.ssd_scan(x, dt, A, B, C, D=D, z=z, dt_bias=dtb, dt_softplus=True)
            if backward:
                y.backward(dout)

        op, shape = ("ssd_scan fwd+bwd" if backward else "ssd_scan fwd"), f"b{b} l{L} h{h} p{p} n{n} g{g}"
        gt.timed_row(rows, (op, shape, dtype, "fastlayers", fast), call, sets, nbytes, ceiling, grad=backward,
                     flops=flops)
        if mb is not None:
            chunk = 32 if smoke else 256

            def peer(s, A=A, D=D, dtb=dtb, backward=backward, chunk=chunk):
                x, dt, B, C, z, dout = s
                y = mb.chunk_scan_combined(x, dt, A, B, C, chunk, D=D, z=z, dt_bias=dtb, dt_softplus=True)
                if backward:
                    y.backward(dout)

            gt.timed_row(rows, (op, shape, dtype, "mamba_ssm", "triton"), peer, sets, nbytes, ceiling, grad=backward,
                         flops=flops, note=f"chunk {chunk}")
        del sets
    return rows
