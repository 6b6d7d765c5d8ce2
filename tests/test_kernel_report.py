"""benchmarks/kernel_report.py, the static GPU kernel report: that it can fail.

- occupancy arithmetic on hand-worked H100/H200 cases;
- Triton toys compiled ahead of time (in a child process: this one runs triton under TRITON_INTERPRET=1):
  a kernel held under maxnreg is reported as spilling and the hot-kernel rule fails on it; a plain copy is
  clean, with 128-bit loads and stores; a tile product uses tensor cores (HGMMA on sm_90, HMMA on sm_80);
  the rule's bookkeeping (a stale exception, HOT out of step with what is launched) fails too;
- CUDA toys through nvcc (skipped without nvcc): -maxrregcount=16 spills, a dynamically indexed local array
  uses local memory; the launch probe replays a recorded call through the real launch code;
- the capture: the GPU table's norm rows on meta tensors launch with the H100's 132-SM configuration, the
  backward included.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import kernel_report as kr  # noqa: E402

NO_NVCC = "nvcc not found: the CUDA half of the kernel report is skipped without it"


def _child(code, timeout=600):
    """Run `code` in a fresh interpreter with compiled (not interpreted) triton and the fastlayers this process
    imported (the installed one, or the source tree's with PYTHONPATH); returns its JSON output."""
    import fastlayers
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(fastlayers.__file__)))
    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([pkg_parent, str(ROOT / "benchmarks"), str(ROOT / "tests"),
                                           os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- occupancy
@pytest.mark.parametrize("threads, regs, smem, expect", [
    (256, 128, 0, (2, 16, "regs")),          # 8 warps x 4096 registers = 32768 a CTA: 2 fit in 65536
    (256, 255, 0, (1, 8, "regs")),           # 255 x 32 = 8160, rounded to 8192 a warp: 65536 a CTA
    (256, 64, 0, (4, 32, "regs")),           # 2048 a warp, 16384 a CTA: 4
    (32, 65, 0, (28, 28, "regs")),           # 65 x 32 = 2080 -> 2304 a warp (units of 256): 28, not 31
    (1024, 16, 0, (2, 64, "threads")),       # 2048 threads an SM (registers would allow 4)
    (1024, 32, 0, (2, 64, "regs+threads")),  # both allow exactly 2
    (32, 16, 0, (32, 32, "ctas")),           # 32 CTAs an SM
    (128, 32, 113 * 1024, (2, 8, "smem")),   # (113 + 1 reserved) KB x 2 = 228 KB: exactly 2
    (128, 32, 114 * 1024, (1, 4, "smem")),   # 115 KB x 2 > 228 KB: the 1 KB reserve decides
    (128, 32, 227 * 1024, (1, 4, "smem")),   # the most one CTA may have
    (128, 32, 227 * 1024 + 1, (0, 0, "does not fit")),
])
def test_occupancy(threads, regs, smem, expect):
    assert kr.occupancy(threads, regs, smem) == expect


# ----------------------------------------------------------------------------- Triton toys
@pytest.fixture(scope="module")
def triton_toys():
    pytest.importorskip("triton", reason="triton is not installed")
    if kr.tool("cuobjdump") is None:
        pytest.skip("cuobjdump not found (neither the CUDA toolkit's nor triton's)")
    return _child("""
        import json, torch
        import kernel_report as kr
        import _kernel_report_toys as toys
        x, y = torch.empty(4096), torch.empty(4096)
        a, b = (torch.empty(64, 64, dtype=torch.bfloat16) for _ in range(2))
        c = torch.empty(64, 64)
        launches = [
            (("copy", "", "", "triton"), toys._toy_copy, (x, y, 4096), dict(BLOCK=1024, num_warps=4), (4,)),
            (("spill", "", "", "triton"), toys._toy_spill, (x, y, 4096), dict(BLOCK=4096, num_warps=1, maxnreg=32),
             (1,)),
            (("dot", "", "", "triton"), toys._toy_dot, (a, b, c), dict(BLOCK=64, num_warps=4), (1,)),
        ]
        jobs = kr.triton_jobs(launches)
        res = {k: kr.compile_triton_job(j) for k, j in jobs.items()}
        rows = kr.assemble(res, jobs, {}, {}, {})
        print(json.dumps(rows, default=str))
    """)


def _row(rows, kernel, arch):
    (r,) = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch]
    return r


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_triton_spilling_toy_is_reported(triton_toys, arch):
    r = _row(triton_toys, "_toy_spill", arch)
    assert r["regs"] <= 32, r
    assert r["spill_st"] > 0 and r["spill_ld"] > 0 and r["stack"] > 0, r
    assert r["sass"]["stl"] > 0 and r["sass"]["ldl"] > 0, r
    assert kr.spills(r) and kr.uses_local(r)


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_triton_clean_toy(triton_toys, arch):
    r = _row(triton_toys, "_toy_copy", arch)
    assert (r["spill_st"], r["spill_ld"], r["stack"], r["sass"]["ldl"], r["sass"]["stl"]) == (0, 0, 0, 0, 0), r
    assert not kr.spills(r) and not kr.uses_local(r)
    # 8 fp32 a thread from 16-byte aligned pointers and N divisible by 16: 128-bit accesses
    assert r["sass"]["ldg128"] > 0 and r["sass"]["stg128"] > 0, r
    assert r["ptx"]["ld_global_v4"] > 0 and r["ptx"]["st_global_v4"] > 0, r
    assert r["threads"] == 128
    assert (r["ctas"], r["warps"]) == kr.occupancy(128, r["regs"], r["smem_static"] + r["smem_dyn"])[:2]
    assert r["sass"]["hgmma"] == r["sass"]["hmma"] == 0


def test_triton_tensor_cores(triton_toys):
    r90, r80 = _row(triton_toys, "_toy_dot", "sm_90"), _row(triton_toys, "_toy_dot", "sm_80")
    assert r90["sass"]["hgmma"] > 0 and r90["ptx"]["wgmma"] > 0, r90
    assert r80["sass"]["hmma"] > 0 and r80["ptx"]["mma_sync"] > 0 and r80["sass"]["hgmma"] == 0, r80


def _hot(rows, *names):
    return {n: "test" for n in names}


def test_hot_rule_fails_on_a_spilling_hot_kernel(triton_toys):
    problems, _ = kr.check_hot(triton_toys, hot=_hot(triton_toys, "_toy_copy", "_toy_spill", "_toy_dot"),
                               exceptions=[], cuda_checked=False)
    assert len(problems) == 2 and all(p.startswith("_toy_spill") for p in problems), problems
    # ... and the script's exit: main() returns 1 on problems (checked through the same function)


def test_hot_rule_exception_and_stale_exception(triton_toys):
    hot = _hot(triton_toys, "_toy_copy", "_toy_spill", "_toy_dot")
    problems, excepted = kr.check_hot(triton_toys, hot=hot, exceptions=[("_toy_spill", "*", "a toy")],
                                      cuda_checked=False)
    assert problems == [] and {r["arch"] for r in excepted} == {"sm_90", "sm_80"}
    # an exception for one arch leaves the other failing
    problems, _ = kr.check_hot(triton_toys, hot=hot, exceptions=[("_toy_spill", "sm_90", "a toy")],
                               cuda_checked=False)
    assert len(problems) == 1 and "sm_80" in problems[0], problems
    # an exception that matches no spilling kernel any more fails the run, so the list stays honest
    problems, _ = kr.check_hot(triton_toys, hot=hot, exceptions=[("_toy_spill", "*", "a toy"),
                                                                 ("_toy_copy", "*", "stale")], cuda_checked=False)
    assert len(problems) == 1 and "_toy_copy" in problems[0] and "no spilling" in problems[0], problems


def test_hot_list_must_match_the_launched_kernels(triton_toys):
    # a launched kernel missing from HOT, and a HOT kernel nothing launches
    problems, _ = kr.check_hot(triton_toys, hot=_hot(triton_toys, "_toy_copy", "_toy_dot", "_toy_gone"),
                               exceptions=[], cuda_checked=False)
    assert any(p.startswith("_toy_spill: timed by") for p in problems), problems
    assert any(p.startswith("_toy_gone: listed in HOT") for p in problems), problems
    # a non-hot spilling kernel is reported but not under the rule
    assert not any("spill stores" in p for p in problems), problems


# ----------------------------------------------------------------------------- CUDA toys
CUDA_TOY = r"""
extern "C" __global__ void toy_local(const float* x, const int* idx, float* y) {
  float a[64];  // written and read at indices from memory: lives in local memory
  for (int i = 0; i < 64; ++i) a[i] = x[threadIdx.x * 64 + i];
  a[idx[threadIdx.x] & 63] += 1.f;
  y[threadIdx.x] = a[idx[threadIdx.x + 1] & 63];
}
extern "C" __global__ void toy_pressure(const float* x, float* y) {
  float v[48];  // all live at once: under -maxrregcount=16 they spill
  #pragma unroll
  for (int i = 0; i < 48; ++i) v[i] = x[threadIdx.x + 128 * i];
  float s = 0.f;
  #pragma unroll
  for (int i = 0; i < 48; ++i) s += v[i] * v[47 - i];
  #pragma unroll
  for (int i = 0; i < 48; ++i) y[threadIdx.x + 128 * i] = v[i] * s;
}
"""


@pytest.fixture(scope="module")
def cuda_toy(tmp_path_factory):
    nvcc = kr.find_nvcc()
    if nvcc is None:
        pytest.skip(NO_NVCC)
    src = tmp_path_factory.mktemp("cuda") / "toy.cu"
    src.write_text(CUDA_TOY)
    res = kr.compile_cuda_file(dict(src=str(src), archs=(90,), nvcc=nvcc, flags=["-maxrregcount=16"]))
    return {fn: u for (arch, fn), u in res["functions"].items() if arch == "sm_90"}


def test_cuda_maxrregcount_spills(cuda_toy):
    u = cuda_toy["toy_pressure"]
    # ptxas raises a -maxrregcount below 24 to 24 on sm_90 (it says so in its log)
    assert u["regs"] <= 24 and u["spill_st"] > 0 and u["spill_ld"] > 0 and u["stack"] > 0, u
    assert u["sass"]["stl"] > 0 and u["sass"]["ldl"] > 0, u


def test_cuda_dynamic_local_array(cuda_toy):
    u = cuda_toy["toy_local"]
    assert u["stack"] >= 64 * 4 and u["sass"]["ldl"] > 0 and u["sass"]["stl"] > 0, u


def test_cuda_launch_probe(tmp_path):
    """A recorded norm_fwd call (4096 x 4096 bf16, as fastlayers.backends.cuda passes it) goes through
    run_norm_fwd; an argument the probe does not know fails it (out of step with bindings.cpp)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler: the CUDA launch probe (the kernel headers on the CPU emulation) needs one")
    exe = kr.build_probe(kr.Cache(tmp_path), cxx)
    base = 1 << 40
    args = dict(x=base, x_stride=4096, x_dt=2, r=base * 2, r_stride=4096, r_dt=2, w=base * 3, w_dt=2, b=0, b_dt=-1,
                y=base * 4, y_stride=4096, y_dt=2, h=0, h_stride=0, h_dt=-1, mean=0, rstd=base * 5, M=4096, N=4096,
                eps=1e-6, is_rms=True, stream=0)
    (launch,) = kr.run_probe(exe, [(("rms_norm fwd", "4096x4096", "bfloat16", "cuda"), "norm_fwd", args)])
    idx, name, grid, block, smem = launch
    assert idx == 0 and kr.short_name(kr.demangle([name])[name]).startswith("norm_fwd_reg<"), name
    assert block[0] * block[1] * block[2] > 0 and grid[0] > 0 and smem == 0
    with pytest.raises(RuntimeError, match="not understood"):
        kr.run_probe(exe, [(None, "norm_fwd", dict(args, bogus=1))])


# ----------------------------------------------------------------------------- capture
def test_capture_norm_rows_use_the_h100_configuration():
    """The GPU table's norm rows on meta tensors: the forward tiles and the backward's part count are the
    wrappers' choices for 132 SMs (a backward run outside the mode would see device 'meta': 4 parts)."""
    pytest.importorskip("triton", reason="triton is not installed")
    out = _child("""
        import json
        import kernel_report as kr
        from fastlayers.backends import triton as tb
        launches, calls, notes = kr.capture(quiet=True, families=("norm_rows",))
        got = []
        for lab, fn, args, kw, grid in launches:
            if str(lab[2]).replace("torch.", "") == "bfloat16" and lab[4] == "triton":
                got.append([lab[0], lab[1], fn.__name__, list(grid), kw.get("BLOCK_M"), kw.get("BLOCK_N"),
                            kw.get("num_warps")])
        exp = {}
        for t in (4096, 8192, 16384):
            for h in (2048, 4096, 8192):
                exp[("fwd", f"{t}x{h}")] = tb._fwd_config(t, h, 2 * 132)
                P = min(t, (4 if h <= 1024 else 2) * 132)
                exp[("bwd", f"{t}x{h}")] = (P,) + tb._bwd_config(t, h, P)
        print(json.dumps(dict(got=got, exp={f"{k[0]} {k[1]}": v for k, v in exp.items()},
                              cuda=sorted({c[1] for c in calls}), notes=notes)))
    """)
    seen = set()
    for op, shape, fn, grid, bm, bn, nw in out["got"]:
        if fn == "_norm_fwd_kernel":
            e_bm, e_bn, _, e_nw = out["exp"][f"fwd {shape}"]
            assert (bm, bn, nw) == (e_bm, e_bn, e_nw), (op, shape)
            assert grid[0] == -(-int(shape.split("x")[0]) // bm)
        else:
            P, e_bm, e_bn, _, e_nw, _ = out["exp"][f"bwd {shape}"]
            assert grid[0] == P and (bm, bn, nw) == (e_bm, e_bn, e_nw), (op, shape, grid, P)
        seen.add((fn, op.split()[0]))
    assert seen == {(k, op) for k in ("_norm_fwd_kernel", "_norm_bwd_kernel") for op in ("rms_norm", "layer_norm")}
    if not out["notes"]:  # fastlayers._cuda imports: its calls are recorded too
        assert out["cuda"] == ["norm_bwd", "norm_fwd"], out["cuda"]
