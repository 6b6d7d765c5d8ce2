"""The CUDA norm kernels, run on CPU threads by a small emulation of the CUDA execution model
(csrc/cuda/emu/), checked against the CPU kernel. It is the only check of the CUDA kernels'
logic that can run on a machine without a GPU; GPU-only hazards (memory ordering, real
alignment faults) still need benchmarks/gpu_check.sh on a GPU."""
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
