"""Toy Triton kernels for tests/test_kernel_report.py (compiled ahead of time in a child process).

- ``_toy_copy``: y = 2 x over blocks; nothing stays live, 8 fp32 per thread: 128-bit loads and stores, no spill.
- ``_toy_spill``: a BLOCK-wide row held in registers across a reduction, twice over (x, then x * x - mean),
  under ``maxnreg``: must spill.
- ``_toy_dot``: one 64 x 64 x 64 bf16 tile product: tensor cores (wgmma / HGMMA on sm_90, HMMA on sm_80).
"""
import triton
import triton.language as tl


@triton.jit
def _toy_copy(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(Y + offs, tl.load(X + offs, mask=mask) * 2.0, mask=mask)


@triton.jit
def _toy_spill(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N, other=0.0)
    m = tl.sum(x, axis=0) / N
    d = x * x - m
    s = tl.sum(d * x, axis=0)
    tl.store(Y + offs, d * s + x, mask=offs < N)


@triton.jit
def _toy_dot(A, B, C, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    a = tl.load(A + r[:, None] * BLOCK + r[None, :])
    b = tl.load(B + r[:, None] * BLOCK + r[None, :])
    tl.store(C + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))
