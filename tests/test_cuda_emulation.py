"""The CUDA kernels (norm, MLA decoding, the selective-scan forward and backward), run on CPU threads by a
small emulation of the CUDA execution model (csrc/cuda/emu/), checked against the CPU kernels. It is the only
check of the CUDA kernels' logic that can run on a machine without a GPU; GPU-only hazards (memory ordering,
real alignment faults) still need benchmarks/gpu_check.sh on a GPU."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "csrc" / "cuda" / "emu" / "run_emu_test.sh"


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the CUDA kernels run for real instead")
def test_cuda_kernels_under_cpu_emulation(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    res = subprocess.run(["sh", str(SCRIPT), "1"], capture_output=True, text=True, env=env, timeout=1200)
    tail = (res.stdout + res.stderr)[-4000:]
    assert res.returncode == 0, tail
    last = res.stdout.strip().splitlines()[-1]
    assert last.endswith(" checks, 0 failed") and int(last.split()[0]) > 100, tail


def _run_emu(tmp_path, *args):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    res = subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=1200)
    tail = (res.stdout + res.stderr)[-4000:]
    assert res.returncode == 0, tail
    last = res.stdout.strip().splitlines()[-1]
    assert last.endswith(" checks, 0 failed"), tail
    return int(last.split()[0])


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the CUDA kernels run for real instead")
def test_mla_decode_kernels_under_cpu_emulation(tmp_path):
    """csrc/cuda/emu/emu_mla_test.cpp: 11 shapes (D = 64..576, 1-20 heads, s_q 1-4 causal, pages 16-64,
    lengths incl. 0, several splits, misaligned rows, NaN inputs; fp32/fp16/bf16) on the CUDA-core kernel,
    each again in bf16 and fp16 on the tensor-core kernel (emulated mma.sync / ldmatrix / cp.async), plus
    tensor-core cases at 512+64 with 16 and 128 heads, 128+64, 160+64, 64+32 (s_q 2-4 causal, pages 16-64,
    lengths incl. 0), several KV heads (h_kv 2 and 3: h_q == h_kv, 3 and 20 heads a KV head, strided and
    misaligned KV heads, NaN in one KV head's key), against cpu::mla_decode, outputs and split partials
    compared elementwise; the emulated PTX against plain matrix products, the 16-bit rounding, the entry
    point's argument checks (H not a multiple of h_kv). 494 checks (~60 s at -O0 on 2 cores)."""
    assert _run_emu(tmp_path, "mla") >= 494


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the CUDA kernels run for real instead")
def test_selective_scan_kernels_under_cpu_emulation(tmp_path):
    """csrc/cuda/emu/emu_scan_test.cpp: 13 cases (N = 5..130: 1-8 states a lane; L = 1..300: partial chunks;
    every optional input on and off, grouped and time-invariant B/C, transposed (batch, L, dim) inputs, a
    padded out, a transposed last state, NaN input; fp32/fp16/bf16) against cpu::selective_scan_fwd, then
    the backward of each case against cpu::selective_scan_bwd: du, ddelta, dz elementwise (padded rows left
    untouched), dA, dB, dC, dD, d delta_bias summed over 2 parts, with dlast (transposed) on and off and
    NaN propagation, CTAs that sum dB/dC in shared memory; plus the entry point's argument checks. 166 checks
    (~10 s at -O0)."""
    assert _run_emu(tmp_path, "scan") >= 166
