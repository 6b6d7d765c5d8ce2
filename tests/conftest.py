"""Test configuration: which (device, backend) pairs run here, and the error rule of DESIGN.md §4."""
import os

import torch

# On a machine without a GPU, Triton kernels run on CPU tensors through the interpreter.
# It must be set before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastlayers  # noqa: E402

NO_GPU = "no CUDA GPU on this machine: CUDA-tensor tests need one (benchmarks/gpu_check.sh runs them on a GPU)"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def _usable(name):
    return fastlayers.available_backends()[name][0]


def _case(device, backend):
    marks = []
    if device == "cuda" and not torch.cuda.is_available():
        marks.append(pytest.mark.skip(reason=NO_GPU))
    elif device == "cpu" and backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        marks.append(pytest.mark.skip(reason="triton on CPU tensors needs TRITON_INTERPRET=1 (off when a GPU is present)"))
    elif not _usable(backend):
        marks.append(pytest.mark.skip(reason=f"backend {backend} unavailable: "
                                             f"{fastlayers.available_backends()[backend][1]}"))
    return pytest.param(device, backend, id=f"{device}-{backend}", marks=marks)


# Every fast backend on every device it runs on here. CUDA cases are skipped, with the reason, without a GPU.
FAST_CASES = [_case("cpu", "cpu"), _case("cpu", "triton"), _case("cuda", "cuda"), _case("cuda", "triton")]
# For the ops (and the modules built of them) whose GPU backend is Triton alone (causal_conv1d,
# selective_state_update, qkv_norm_rope, swiglu): backend "cuda" raises BackendUnavailable for them by
# design, so that case is listed as skipped with the reason.
NO_CUDA_KERNEL = "no CUDA C++ kernel for these ops (their GPU backend is Triton): the cuda-triton case runs them"
TRITON_GPU_CASES = [c if c.id != "cuda-cuda" else pytest.param(*c.values, id=c.id, marks=[pytest.mark.skip(
    reason=NO_CUDA_KERNEL)]) for c in FAST_CASES]


def seed_of(*key):
    """A seed from a test's parameters that is the same in every process (``hash`` of a str is not)."""
    import zlib
    return zlib.crc32(repr(key).encode()) % (2 ** 31)


def is_interpreted(device, backend):
    return backend == "triton" and device == "cpu"


def assert_close_to_ref(out, ref_hi, ref_lowp, what=""):
    """|out - ref_hi| <= 2 |ref_lowp - ref_hi| + atol, elementwise; NaN must match NaN.

    ref_hi: the reference on upcast (float64) inputs; ref_lowp: the reference in the input dtype.
    """
    assert out.shape == ref_hi.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref_hi.shape)}"
    out64, hi, lo = out.double().cpu(), ref_hi.double().cpu(), ref_lowp.double().cpu()
    nan_out, nan_ref = torch.isnan(out64), torch.isnan(hi)
    assert torch.equal(nan_out, nan_ref), f"{what}: NaN pattern differs ({int(nan_out.sum())} vs {int(nan_ref.sum())})"
    ok = ~nan_ref
    err = (out64 - hi).abs()[ok]
    bound = (2 * (lo - hi).abs() + ATOL[ref_lowp.dtype])[ok]
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{err.numel()} elements out of bound; "
                           f"worst error {float((err - bound).max()):.3g} over bound, max err {float(err.max()):.3g}")


def assert_rel_err(out, ref, tol, what=""):
    """||out - ref|| / ||ref|| < tol (for reductions such as dweight)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    rel = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    assert rel < tol, f"{what}: relative error {rel:.3g} >= {tol}"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: one thread (on a busy 2-core machine, thread hand-offs cost 10-50 ms an op). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
