"""The build: CMake builds the same modules from csrc/sources.txt; the CUDA module's presence."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _cmake():
    """cmake and pybind11 come with the test extra (``pip install ".[test]"``): the venv's cmake first."""
    here = Path(sys.executable).parent / "cmake"
    return str(here) if here.exists() else shutil.which("cmake")


def test_cmake_builds_the_cpu_module_from_the_shared_source_list(tmp_path):
    """CMake reads csrc/sources.txt and builds a working _C (CUDA skipped to keep CI short)."""
    cmake = _cmake()
    missing = [] if cmake else ["cmake"]
    try:
        import pybind11  # noqa: F401  (CMakeLists.txt asks it for its CMake config)
    except ImportError:
        missing.append("pybind11")
    if missing:
        why = f"{' and '.join(missing)} not installed (the test extra brings both: pip install '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the CMake build test: {why}")
        pytest.skip(why)
    out = tmp_path / "fastlayers"
    out.mkdir()
    cfg = subprocess.run([cmake, "-S", str(ROOT), "-B", str(tmp_path / "build"), "-DFASTLAYERS_NO_CUDA=ON",
                          f"-DFASTLAYERS_OUTPUT_DIR={out}", f"-DPython_EXECUTABLE={sys.executable}"],
                         capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    build = subprocess.run([cmake, "--build", str(tmp_path / "build"), "-j", "2"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    so = list(out.glob("_C*.so"))
    assert so, list(out.iterdir())
    assert "CUDA_BUILT = False" in (out / "_build_info.py").read_text()
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('_C', {str(so[0])!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(sorted(n for n in dir(m) if not n.startswith('_')))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "norm_fwd" in res.stdout and "norm_bwd" in res.stdout, res.stdout + res.stderr


def _nvcc():
    for c in (os.environ.get("NVCC"), shutil.which("nvcc"),
              os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if c and os.path.exists(c):
            return c
    return None


def test_build_info_matches_the_machine():
    from fastlayers import _build_info
    if os.environ.get("FASTLAYERS_NO_CUDA", "0") not in ("", "0"):
        assert not _build_info.CUDA_BUILT and "FASTLAYERS_NO_CUDA" in _build_info.CUDA_REASON
    elif _nvcc() is None:
        assert not _build_info.CUDA_BUILT and "nvcc" in _build_info.CUDA_REASON
    else:
        assert _build_info.CUDA_BUILT, f"nvcc is here but _cuda was not built: {_build_info.CUDA_REASON}"


def test_cuda_module_without_a_gpu_fails_clearly():
    from fastlayers import _build_info
    if not _build_info.CUDA_BUILT:
        pytest.skip(f"_cuda not built here: {_build_info.CUDA_REASON}")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA tests run instead")
    import fastlayers._cuda as cu
    assert cu.device_count() == 0
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cu.sm_count(0)


def test_cuda_mla_and_scan_entry_points_without_a_gpu():
    """The bindings of the new kernels: argument checks raise ValueError before any CUDA call; a valid
    call reaches the launch and fails with the clear no-device error (no pointer is dereferenced on the host)."""
    from fastlayers import _build_info
    if not _build_info.CUDA_BUILT:
        pytest.skip(f"_cuda not built here: {_build_info.CUDA_REASON}")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA tests run instead")
    import fastlayers._cuda as cu
    p = 1 << 20  # a fake device address: never dereferenced without a device

    def mla(q_dt=2, D=576, dv=512):
        cu.mla_decode(p, (0, 0, D), q_dt, p, 64 * D, D, q_dt, p, 4, p, p, p, p, q_dt, p, 2, 1, 16, D, dv, 64, 3,
                      256, 0.1, False, 4 * 64, 0)

    with pytest.raises(ValueError, match="unsupported dtype float64"):
        mla(q_dt=3)
    with pytest.raises(ValueError, match="head_dim_v"):
        mla(dv=600)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        mla()  # above 48 KiB of shared memory: the cudaFuncSetAttribute call fails first
    with pytest.raises(RuntimeError, match="no CUDA device"):
        mla(D=64, dv=64)  # small tile: the launch itself fails

    def view(dt=0, s=(0, 0, 1, 0)):
        return (p, dt, s)

    none = (0, -1, (0, 0, 0, 0))

    def scan(u_dt=0, N=16):
        cu.selective_scan_fwd(view(u_dt), view(), view(0, (N, 1, 0, 0)), view(0, (0, N, 0, 1)),
                              view(0, (0, N, 0, 1)), none, none, none, view(), none, 2, 4, 10, N, 4, 4, True, 0)

    with pytest.raises(ValueError, match="unsupported dtype float64"):
        scan(u_dt=3)
    with pytest.raises(ValueError, match="N = 300"):
        scan(N=300)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        scan()

    def scan_bwd(du_dt=0, N=16, L=10, ckpt=p, dlast_dt=0):
        cu.selective_scan_bwd(view(), view(), view(0, (N, 1, 0, 0)), view(0, (0, N, 0, 1)), view(0, (0, N, 0, 1)),
                              none, none, none, view(), view(dlast_dt), view(du_dt), view(), none, p, p, p, 0, 0,
                              4 * N, 4 * N, 2, 4, L, N, 4, 4, True, ckpt, 1, 0)

    with pytest.raises(ValueError, match="selective_scan_bwd: unsupported dtype float64"):
        scan_bwd(du_dt=3)
    with pytest.raises(ValueError, match="dlast must be float32"):
        scan_bwd(dlast_dt=2)
    with pytest.raises(ValueError, match="null checkpoint"):
        scan_bwd(L=40, ckpt=0)
    assert cu.selective_scan_bwd_ckpt(2, 4, 40, 16) == 2 * 4 * 16 and cu.selective_scan_bwd_ckpt(2, 4, 32, 16) == 0
    with pytest.raises(RuntimeError, match="no CUDA device"):
        scan_bwd()
