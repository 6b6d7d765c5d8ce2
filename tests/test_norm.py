"""fused residual + RMSNorm / LayerNorm: every backend against the reference (DESIGN.md §4)."""
import pytest
import torch

import fastlayers
from fastlayers import reference

from conftest import FAST_CASES, assert_close_to_ref, assert_rel_err, is_interpreted, seed_of

LOWP = (torch.float16, torch.bfloat16)
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _op(is_rms):
    return fastlayers.rms_norm if is_rms else fastlayers.layer_norm


def _call(fn, is_rms, x, w, b, **kw):
    return fn(x, w, **kw) if is_rms else fn(x, w, b, **kw)


def _inputs(shape, dtype, device, residual=True, res_dtype=None, bias=True, scale=1.0, wdtype=None):
    g = torch.Generator().manual_seed(seed_of(shape, str(dtype), residual, bias))
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * scale).to(dtype).to(device)
    r = (torch.randn(shape, generator=g) * scale).to(res_dtype or dtype).to(device) if residual else None
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(wdtype or dtype).to(device)
    b = (0.5 * torch.randn(n, generator=g)).to(wdtype or dtype).to(device) if bias else None
    return x, r, w, b


def _refs(is_rms, x, r, w, b, eps, prenorm, residual_in_fp32):
    """(reference on float64-upcast inputs, reference in the input dtype)."""
    f = reference.rms_norm if is_rms else reference.layer_norm
    kw = dict(eps=eps, residual=r, prenorm=prenorm, residual_in_fp32=residual_in_fp32)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    hi = (f(up(x), up(w), **{**kw, "residual": up(r)}) if is_rms else
          f(up(x), up(w), up(b), **{**kw, "residual": up(r)}))
    lo = f(x, w, **kw) if is_rms else f(x, w, b, **kw)
    return hi, lo


def _check_fwd(device, backend, is_rms, shape, dtype, residual=True, prenorm=False, residual_in_fp32=False,
               bias=True, scale=1.0, res_dtype=None, eps=1e-5):
    x, r, w, b = _inputs(shape, dtype, device, residual, res_dtype, bias and not is_rms, scale)
    with fastlayers.use_backend(backend):
        out = _call(_op(is_rms), is_rms, x, w, b, eps=eps, residual=r, prenorm=prenorm,
                    residual_in_fp32=residual_in_fp32)
    hi, lo = _refs(is_rms, x, r, w, b, eps, prenorm, residual_in_fp32)
    if prenorm:
        (y, h), (yh, hh), (yl, hl) = out, hi, lo
        assert h.dtype == (torch.float32 if residual_in_fp32 else dtype)
        assert_close_to_ref(h, hh, hl, "h")
    else:
        y, yh, yl = out, hi, lo
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    assert_close_to_ref(y, yh, yl, "y")


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 3, 123, 1000, 3000])
def test_forward_sizes(device, backend, is_rms, dtype, n):
    m = 5 if is_interpreted(device, backend) else 37
    _check_fwd(device, backend, is_rms, (m, n), dtype)


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
@pytest.mark.parametrize("n", [4096, 8192, 65536, 70001])
def test_forward_wide_rows(device, backend, is_rms, n):
    _check_fwd(device, backend, is_rms, (3, n), torch.bfloat16)
    _check_fwd(device, backend, is_rms, (2, n), torch.float32)


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
@pytest.mark.parametrize("residual,prenorm,residual_in_fp32,bias", [
    (False, False, False, False), (True, False, False, True), (True, True, False, True),
    (True, True, True, False), (False, True, True, True),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_options(device, backend, is_rms, residual, prenorm, residual_in_fp32, bias, dtype):
    _check_fwd(device, backend, is_rms, (2, 3, 257), dtype, residual=residual, prenorm=prenorm,
               residual_in_fp32=residual_in_fp32, bias=bias)


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
def test_fp32_residual_stream(device, backend, is_rms):
    """A bf16 block output added to a float32 residual stream (Pre-Norm chain with residual_in_fp32)."""
    _check_fwd(device, backend, is_rms, (4, 300), torch.bfloat16, prenorm=True, residual_in_fp32=True,
               res_dtype=torch.float32)


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
def test_fp16_no_overflow(device, backend, is_rms):
    """fp16 values whose squares overflow fp16 (300**2 > 65504) must still normalise correctly."""
    _check_fwd(device, backend, is_rms, (4, 1024), torch.float16, scale=300.0)
    x = torch.full((2, 64), 60000.0, dtype=torch.float16, device=device)
    with fastlayers.use_backend(backend):
        y = fastlayers.rms_norm(x, torch.ones(64, dtype=torch.float16, device=device))
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float().cpu(), torch.ones(2, 64), atol=1e-3, rtol=0)


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
def test_strided_rows(device, backend, is_rms):
    """Rows of a wider tensor (last dim contiguous) run without a copy; other layouts copy once."""
    n = 300
    g = torch.Generator().manual_seed(1)
    big = torch.randn(4, 6, 2 * n + 7, generator=g).to(device)
    rbig = torch.randn(4, 6, n + 50, generator=g).to(device)
    x, r = big[..., 5:5 + n], rbig[..., :n]
    w = torch.randn(n, generator=g).to(device)
    b = torch.randn(n, generator=g).to(device)
    with fastlayers.use_backend(backend):
        y, h = _call(_op(is_rms), is_rms, x, w, b, residual=r, prenorm=True)
        hi, lo = _refs(is_rms, x, r, w, b, 1e-6 if is_rms else 1e-5, True, False)
        assert_close_to_ref(y, hi[0], lo[0], "y (row-strided)")
        assert_close_to_ref(h, hi[1], lo[1], "h (row-strided)")
        # Not collapsible to one row stride: a transposed view. Must still be right.
        xt = torch.randn(n, 8, generator=g).to(device).t()
        rt = torch.randn(n, 8, generator=g).to(device).t()
        y = _call(_op(is_rms), is_rms, xt, w, b, residual=rt)
        hi, lo = _refs(is_rms, xt, rt, w, b, 1e-6 if is_rms else 1e-5, False, False)
        assert_close_to_ref(y, hi, lo, "y (transposed input)")


def test_strided_rows_are_not_copied(monkeypatch):
    """The cpu kernel receives the caller's memory for a row-strided slice."""
    seen = {}
    from fastlayers.backends import cpu as cpu_backend
    real = cpu_backend.norm_fwd

    def spy(x, residual, *a, **k):
        seen["x"], seen["r"] = x.data_ptr(), residual.data_ptr()
        return real(x, residual, *a, **k)

    monkeypatch.setattr(cpu_backend, "norm_fwd", spy)
    big = torch.randn(8, 100)
    x, r = big[:, 10:50], big[:, 50:90]
    with fastlayers.use_backend("cpu"):
        fastlayers.rms_norm(x, torch.ones(40), residual=r)
    assert seen == {"x": x.data_ptr(), "r": r.data_ptr()}


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
def test_zero_rows(device, backend, is_rms):
    x = torch.randn(0, 3, 64, device=device, requires_grad=True)
    w = torch.randn(64, device=device, requires_grad=True)
    b = torch.randn(64, device=device, requires_grad=True)
    with fastlayers.use_backend(backend):
        y = _call(_op(is_rms), is_rms, x, w, b)
        assert y.shape == x.shape
        y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad.cpu(), torch.zeros(64))


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
def test_nan_propagates(device, backend, is_rms):
    x, r, w, b = _inputs((4, 100), torch.float32, device, bias=not is_rms)
    x[1, 17] = float("nan")
    with fastlayers.use_backend(backend):
        y = _call(_op(is_rms), is_rms, x, w, b, residual=r)
    assert torch.isnan(y[1]).all(), "a NaN in a row must make the whole normalised row NaN"
    assert torch.isfinite(y[[0, 2, 3]]).all()


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
def test_out_buffers(device, backend, is_rms):
    """out=/residual_out= write in place: poisoned buffers come back fully written."""
    x, r, w, b = _inputs((6, 3, 129), torch.bfloat16, device, bias=not is_rms)
    out = torch.full_like(x, float("nan"))
    hout = torch.full(x.shape, float("nan"), dtype=torch.float32, device=device)
    with fastlayers.use_backend(backend):
        y, h = _call(_op(is_rms), is_rms, x, w, b, residual=r, prenorm=True, residual_in_fp32=True, out=out,
                     residual_out=hout)
    assert y is out and h is hout
    hi, lo = _refs(is_rms, x, r, w, b, 1e-6 if is_rms else 1e-5, True, True)
    assert_close_to_ref(out, hi[0], lo[0], "out")
    assert_close_to_ref(hout, hi[1], lo[1], "residual_out")


# ----------------------------------------------------------------------------- gradients
def _grad_check(device, backend, is_rms, shape, dtype, residual=True, prenorm=False, residual_in_fp32=False,
                bias=True, res_dtype=None, wdtype=None):
    x, r, w, b = _inputs(shape, dtype, device, residual, res_dtype, bias and not is_rms, wdtype=wdtype)
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(shape, generator=g).to(dtype).to(device)
    h_dtype = torch.float32 if residual_in_fp32 else dtype
    dh = torch.randn(shape, generator=g).to(h_dtype).to(device)
    leaves = [t for t in (x, r, w, b) if t is not None]

    def run(backend_name, tensors):
        ts = [t.detach().clone().requires_grad_() for t in tensors]
        it = iter(ts)
        xx, rr = next(it), (next(it) if r is not None else None)
        ww, bb = next(it), (next(it) if b is not None else None)
        with fastlayers.use_backend(backend_name):
            out = _call(_op(is_rms), is_rms, xx, ww, bb, residual=rr, prenorm=prenorm,
                        residual_in_fp32=residual_in_fp32)
        outs, grads = (out, (dy, dh)) if prenorm else ((out,), (dy,))
        torch.autograd.backward(outs, grads)
        return [t.grad for t in ts]

    got = run(backend, leaves)
    hi = run("reference", [t.double() for t in leaves])
    lo = run("reference", leaves)
    names = ["dx"] + (["dresidual"] if r is not None else []) + ["dweight"] + (["dbias"] if b is not None else [])
    for name, gg, hh, ll, leaf in zip(names, got, hi, lo, leaves):
        assert gg.dtype == leaf.dtype and gg.shape == leaf.shape, name
        if name in ("dx", "dresidual"):
            assert_close_to_ref(gg, hh, ll, name)
        else:  # reductions over rows
            assert_rel_err(gg, hh, REL_TOL[dtype], name)


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 123, 3000])
def test_backward(device, backend, is_rms, dtype, n):
    _grad_check(device, backend, is_rms, (9, n), dtype)


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
@pytest.mark.parametrize("residual,prenorm,residual_in_fp32,bias,res_fp32", [
    (False, False, False, False, False), (True, True, False, True, False), (True, True, True, True, True),
    (False, True, False, False, False),
])
def test_backward_options(device, backend, is_rms, residual, prenorm, residual_in_fp32, bias, res_fp32):
    _grad_check(device, backend, is_rms, (3, 5, 200), torch.bfloat16, residual, prenorm, residual_in_fp32, bias,
                res_dtype=torch.float32 if res_fp32 else None)


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_backward_fp32_weight_bf16_input(device, backend):
    _grad_check(device, backend, True, (16, 512), torch.bfloat16, wdtype=torch.float32)
    _grad_check(device, backend, False, (16, 512), torch.bfloat16, wdtype=torch.float32)


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_backward_wide_rows(device, backend):
    _grad_check(device, backend, True, (2, 70001), torch.float32)
    _grad_check(device, backend, False, (2, 70001), torch.float32)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
@pytest.mark.parametrize("prenorm", [False, True])
def test_gradcheck_fp64(backend, is_rms, prenorm):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, r, w, b):
        with fastlayers.use_backend(backend):
            return _call(_op(is_rms), is_rms, x, w, b, residual=r, prenorm=prenorm)

    inputs = (x, r, w, b)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    assert torch.autograd.gradgradcheck(f, inputs) if backend == "reference" else True


@pytest.mark.parametrize("device,backend", [c for c in FAST_CASES if c.values[1] == "triton"])
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
def test_triton_chunked_path_small_limits(device, backend, is_rms, monkeypatch):
    """Shrink the one-block limits so short rows take the two-pass chunked kernels (fwd and bwd)."""
    from fastlayers.backends import triton as tb
    for name, v in (("FWD_MAX_BLOCK", 64), ("FWD_CHUNK", 32), ("BWD_MAX_BLOCK", 128), ("BWD_CHUNK", 64)):
        monkeypatch.setattr(tb, name, v)
    _check_fwd(device, backend, is_rms, (5, 200), torch.bfloat16, prenorm=True)
    _grad_check(device, backend, is_rms, (5, 200), torch.float32, prenorm=True)
    _grad_check(device, backend, is_rms, (3, 201), torch.bfloat16, res_dtype=torch.float32, prenorm=True,
                residual_in_fp32=True)
