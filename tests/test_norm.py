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


# ----------------------------------------------------------------------------- offset, no weight, casting modes
def _variant_inputs(shape, dtype, device, variant, wdtype=None):
    g = torch.Generator().manual_seed(seed_of("variant", shape, str(dtype), variant))
    n = shape[-1]
    x = (2 * torch.randn(shape, generator=g)).to(dtype).to(device)
    r = torch.randn(shape, generator=g).to(dtype).to(device) if "residual" in variant else None
    # Gemma's weights are centred on 0: the gain offset + w is near 1.
    w = None if "no_weight" in variant else (0.3 * torch.randn(n, generator=g)).to(wdtype or dtype).to(device)
    b = (0.5 * torch.randn(n, generator=g)).to(dtype).to(device) if variant.startswith("ln") else None
    return x, r, w, b


def _variant_call(fn_kind, x, r, w, b, offset, casting_mode, prenorm):
    if fn_kind == "ln":
        return fastlayers.layer_norm(x, w, b, 1e-5, residual=r, prenorm=prenorm)
    return fastlayers.rms_norm(x, w, 1e-6, residual=r, prenorm=prenorm, offset=offset, casting_mode=casting_mode)


def _variant_ref(fn_kind, x, r, w, b, offset, casting_mode, prenorm):
    if fn_kind == "ln":
        return reference.layer_norm(x, w, b, 1e-5, residual=r, prenorm=prenorm)
    return reference.rms_norm(x, w, 1e-6, residual=r, prenorm=prenorm, offset=offset, casting_mode=casting_mode)


VARIANTS = [  # (variant, offset, casting_mode)
    ("rms_offset", 1.0, "gemma"), ("rms_offset_residual", 1.0, "llama"), ("rms_no_weight", 0.0, "gemma"),
    ("rms_no_weight_residual", 1.0, "llama"), ("rms_llama", 0.0, "llama"), ("rms_offset_none", 0.5, "none"),
    ("ln_no_weight", 0.0, "gemma"),
]


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("variant,offset,casting_mode", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 123, 3000])
def test_variants_forward_backward(device, backend, variant, offset, casting_mode, dtype, n):
    """offset (Gemma's 1 + w), no weight and the casting modes against the reference, forward (error
    bounded by the reference's own error in the input dtype) and gradients, at odd sizes."""
    if is_interpreted(device, backend) and n == 3000 and dtype != torch.bfloat16:
        pytest.skip("interpreter: the wide rows in bf16 only")
    kind = variant[:2]
    x, r, w, b = _variant_inputs((3, 7, n), dtype, device, variant)
    prenorm = r is not None
    leaves = [t for t in (x, r, w, b) if t is not None]
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(x.shape, generator=g).to(dtype).to(device)
    dh = torch.randn(x.shape, generator=g).to(dtype).to(device)

    def run(fn, tensors, backend_name):
        ts = [t.detach().clone().requires_grad_() for t in tensors]
        it = iter(ts)
        xx, rr = next(it), (next(it) if r is not None else None)
        ww = next(it) if w is not None else None
        bb = next(it) if b is not None else None
        with fastlayers.use_backend(backend_name):
            out = fn(kind, xx, rr, ww, bb, offset, casting_mode, prenorm)
        outs, grads = (out, (dy, dh)) if prenorm else ((out,), (dy,))
        torch.autograd.backward(outs, [gr.to(o.dtype) for gr, o in zip(grads, outs)])
        return [o.detach() for o in outs], [t.grad for t in ts]

    (got, got_g), (hi, hi_g), (lo, lo_g) = (run(_variant_call, leaves, backend),
                                            run(_variant_ref, [t.double() for t in leaves], "reference"),
                                            run(_variant_ref, leaves, "reference"))
    for name, o, h_, l_ in zip(("y", "h"), got, hi, lo):
        assert o.dtype == dtype and o.shape == x.shape, name
        assert_close_to_ref(o, h_, l_, name)
    names = ["dx"] + (["dresidual"] if r is not None else []) + (["dweight"] if w is not None else []) + \
        (["dbias"] if b is not None else [])
    assert len(got_g) == len(names)
    for name, gg, hh, ll, leaf in zip(names, got_g, hi_g, lo_g, leaves):
        # Every gradient elementwise, dweight/dbias included (at n = 1 dweight is one sum of 21 terms that
        # nearly cancel: a relative-norm bound would measure the cancellation, not the kernel).
        assert gg is not None and gg.dtype == leaf.dtype and gg.shape == leaf.shape, name
        assert_close_to_ref(gg, hh, ll, name)


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_llama_casting_rounds_xhat_before_the_gain(device, backend, dtype):
    """casting_mode="llama" is Llama's ``weight * xhat.to(input_dtype)``: with an fp32 weight (so nothing
    else is rounded in between) y matches the reference in the input dtype element for element, and
    dweight (fp32) sums dy times the rounded xhat; "gemma" differs there (it does not round xhat)."""
    x, _, w, _ = _variant_inputs((64, 200), dtype, device, "rms_llama", wdtype=torch.float32)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(dtype).to(device)

    def run(mode, backend_name):
        ww = w.detach().clone().requires_grad_()
        with fastlayers.use_backend(backend_name):
            y = fastlayers.rms_norm(x, ww, 1e-6, offset=1.0, casting_mode=mode)
        y.backward(dy)
        return y.detach(), ww.grad

    y_llama, dw_llama = run("llama", backend)
    y_gemma, dw_gemma = run("gemma", backend)
    y_ref, dw_ref = run("llama", "reference")  # in the input dtype: xhat rounded to it
    same = (y_llama.cpu() == y_ref.cpu()).double().mean().item()
    assert same > 0.99, f"llama mode: only {same:.3f} of y equals the reference's"
    assert (y_gemma.cpu() != y_ref.cpu()).any(), "the modes should differ in 16 bits"
    rel = lambda a: float((a.double().cpu() - dw_ref.double().cpu()).norm() / dw_ref.double().cpu().norm())  # noqa
    # The unrounded xhat of "gemma" puts dweight ~2^-9 (bf16) / 2^-12 (fp16) off; llama's differs from the
    # reference only where a last-bit difference of rstd flips the rounding of an xhat (a few elements).
    assert rel(dw_gemma) > 1e-4, f"gemma's dweight is {rel(dw_gemma):.2e} off: the test cannot tell the modes apart"
    assert rel(dw_llama) < 0.1 * rel(dw_gemma), f"llama's dweight {rel(dw_llama):.2e} off, gemma's {rel(dw_gemma):.2e}"
    # fp32 x: llama's rounding is a no-op, bit for bit.
    x32 = x.float()
    with fastlayers.use_backend(backend):
        assert torch.equal(fastlayers.rms_norm(x32, w, casting_mode="llama"),
                           fastlayers.rms_norm(x32, w, casting_mode="gemma"))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("variant", ["offset", "no_weight", "no_weight_prenorm", "ln_no_weight"])
def test_variants_gradcheck_fp64(backend, variant):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)

    def f(*ts):
        with fastlayers.use_backend(backend):
            if variant == "offset":
                return fastlayers.rms_norm(ts[0], ts[2], residual=ts[1], prenorm=True, offset=1.0,
                                           casting_mode="llama")
            if variant == "no_weight":
                return fastlayers.rms_norm(ts[0], None, offset=1.0)
            if variant == "no_weight_prenorm":
                return fastlayers.rms_norm(ts[0], None, residual=ts[1], prenorm=True)
            return fastlayers.layer_norm(ts[0], None, ts[3], residual=ts[1])

    inputs = {"offset": (x, r, w), "no_weight": (x,), "no_weight_prenorm": (x, r), "ln_no_weight": (x, r, w, b)}
    args = inputs[variant]
    if variant == "ln_no_weight":
        args = (x, r, w.detach(), b)  # weight unused: not a gradcheck input
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_variants_nan_propagates(device, backend):
    x, _, w, _ = _variant_inputs((4, 37), torch.bfloat16, device, "rms_offset")
    x[1, 5] = float("nan")
    with fastlayers.use_backend(backend):
        for kw in (dict(offset=1.0), dict(casting_mode="llama"), dict()):
            y = fastlayers.rms_norm(x, None if not kw else w, **kw)
            assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2, 3]]).any(), kw


@pytest.mark.parametrize("kw,match", [
    (dict(offset=float("nan")), "offset"), (dict(offset="1"), "offset"), (dict(offset=True), "offset"),
    (dict(casting_mode="fp32"), "casting_mode"), (dict(casting_mode=None), "casting_mode"),
])
def test_variants_bad_input(kw, match, monkeypatch):
    from fastlayers.backends import cpu as cpu_backend
    monkeypatch.setattr(cpu_backend, "norm_fwd", lambda *a, **k: pytest.fail("kernel ran on bad input"))
    with pytest.raises(ValueError, match=match):
        fastlayers.rms_norm(torch.randn(3, 8), torch.ones(8), **kw)


@pytest.mark.parametrize("device,backend", [c for c in FAST_CASES if c.values[1] == "triton"])
def test_variants_triton_chunked_path(device, backend, monkeypatch):
    """The offset, no-weight and llama flags on the two-pass (chunked) triton kernels too."""
    from fastlayers.backends import triton as tb
    for name, v in (("FWD_MAX_BLOCK", 64), ("FWD_CHUNK", 32), ("BWD_MAX_BLOCK", 128), ("BWD_CHUNK", 64)):
        monkeypatch.setattr(tb, name, v)
    for variant, offset, mode in (("rms_offset_residual", 1.0, "llama"), ("rms_no_weight", 0.0, "gemma"),
                                  ("ln_no_weight", 0.0, "gemma")):
        test_variants_forward_backward(device, backend, variant, offset, mode, torch.bfloat16, 200)
