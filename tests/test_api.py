"""Dispatch, errors, modules, torch.library integration (torch.compile, opcheck)."""
import os
import subprocess
import sys

import pytest
import torch

import fastlayers
from fastlayers import reference

from conftest import assert_close_to_ref

# ----------------------------------------------------------------------------- backends
def test_available_backends_reports_every_backend_with_a_reason():
    av = fastlayers.available_backends()
    assert set(av) == {"reference", "cpu", "triton", "cuda"}
    for name, (ok, why) in av.items():
        assert isinstance(ok, bool) and isinstance(why, str) and why, name
    assert av["reference"][0] and av["cpu"][0]
    if not torch.cuda.is_available():
        assert not av["cuda"][0]
        assert "_cuda" in av["cuda"][1] or "CUDA" in av["cuda"][1]


def _spy(monkeypatch, name):
    from fastlayers.backends import load
    mod = load(name)
    calls = []
    real = mod.norm_fwd
    monkeypatch.setattr(mod, "norm_fwd", lambda *a, **k: (calls.append(name), real(*a, **k))[1])
    return calls


def test_default_on_cpu_is_cpu_and_overrides_apply(monkeypatch):
    calls = _spy(monkeypatch, "cpu")
    x, w = torch.randn(2, 8), torch.randn(8)
    fastlayers.rms_norm(x, w)
    assert calls == ["cpu"]
    with fastlayers.use_backend("reference"):
        y = fastlayers.rms_norm(x, w)
    assert calls == ["cpu"]
    torch.testing.assert_close(y, reference.rms_norm(x, w))
    monkeypatch.setenv("FASTLAYERS_BACKEND", "reference")
    fastlayers.rms_norm(x, w)
    assert calls == ["cpu"]
    with fastlayers.use_backend("cpu"):  # the context manager wins over the environment
        fastlayers.rms_norm(x, w)
    assert calls == ["cpu", "cpu"]


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown fastlayers backend 'tpu'"):
        with fastlayers.use_backend("tpu"):
            pass


def test_unknown_backend_in_environment(monkeypatch):
    monkeypatch.setenv("FASTLAYERS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        fastlayers.rms_norm(torch.randn(2, 4), torch.ones(4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_unavailable_backend_says_why():
    with fastlayers.use_backend("cuda"):
        with pytest.raises(fastlayers.BackendUnavailable, match="backend 'cuda' is not available: .+"):
            fastlayers.rms_norm(torch.randn(2, 4), torch.ones(4))


def test_backend_on_wrong_device():
    x = torch.randn(2, 4, device="meta")
    with fastlayers.use_backend("cpu"):
        with pytest.raises(fastlayers.BackendUnavailable, match="runs on CPU tensors"):
            fastlayers.rms_norm(x, torch.ones(4, device="meta"))


def test_triton_rejected_on_cpu_without_interpreter():
    """Without TRITON_INTERPRET the triton backend refuses CPU tensors, with the reason."""
    code = ("import torch, fastlayers\n"
            "with fastlayers.use_backend('triton'):\n"
            "    try:\n"
            "        fastlayers.rms_norm(torch.randn(2, 4), torch.ones(4))\n"
            "    except fastlayers.BackendUnavailable as e:\n"
            "        print('ERR', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pkg_parent = os.path.dirname(os.path.dirname(fastlayers.__file__))  # the fastlayers under test
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert "ERR" in out.stdout, out.stdout + out.stderr
    assert "triton" in out.stdout


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
def test_bad_input_errors(is_rms):
    op = fastlayers.rms_norm if is_rms else fastlayers.layer_norm
    x, w = torch.randn(3, 16), torch.randn(16)
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\).*got \(15,\)"):
        op(x, torch.randn(15))
    with pytest.raises(TypeError, match="residual dtype torch.float16 does not match x dtype torch.float32"):
        op(x, w, residual=torch.randn(3, 16).half())
    with pytest.raises(ValueError, match=r"residual must have shape \(3, 16\)"):
        op(x, w, residual=torch.randn(3, 17))
    with pytest.raises(TypeError, match="x must be a floating tensor.*got torch.int64"):
        op(torch.ones(3, 16, dtype=torch.long), w)
    with pytest.raises(TypeError, match="weight must be a floating tensor.*got torch.int32"):
        op(x, torch.ones(16, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        op([1.0, 2.0], w)
    for eps in (0, -1e-6, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            op(x, w, eps=eps) if is_rms else op(x, w, None, eps=eps)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        op(x, torch.randn(16, device="meta"))
    with pytest.raises(ValueError, match="non-empty last"):
        op(torch.randn(3, 0), torch.randn(0))
    if not is_rms:
        with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
            op(x, w, torch.randn(4))


def test_bad_input_raises_before_any_kernel(monkeypatch):
    from fastlayers.backends import cpu as cpu_backend
    monkeypatch.setattr(cpu_backend, "norm_fwd", lambda *a, **k: pytest.fail("kernel ran on bad input"))
    with pytest.raises(ValueError):
        fastlayers.rms_norm(torch.randn(3, 16), torch.randn(15))


def test_out_errors():
    x, w = torch.randn(3, 16), torch.randn(16)
    with pytest.raises(ValueError, match="out must be a torch.float32 tensor of shape"):
        fastlayers.rms_norm(x, w, out=torch.empty(3, 15))
    with pytest.raises(ValueError, match="contiguous last dimension"):
        fastlayers.rms_norm(x, w, out=torch.empty(16, 3).t())
    with pytest.raises(RuntimeError, match="do not support automatic differentiation"):
        fastlayers.rms_norm(x.requires_grad_(), w, out=torch.empty(3, 16))
    with pytest.raises(ValueError, match="residual_out is only written with prenorm=True"):
        fastlayers.rms_norm(x.detach(), w, residual_out=torch.empty(3, 16))


def test_float64_rejected_on_gpu_backends_only():
    x, w = torch.randn(2, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    y = fastlayers.rms_norm(x, w)  # cpu backend computes float64 in float64
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, reference.rms_norm(x, w))
    if fastlayers.available_backends()["triton"][0] and os.environ.get("TRITON_INTERPRET") == "1":
        with fastlayers.use_backend("triton"), pytest.raises(TypeError, match="float64"):
            fastlayers.rms_norm(x, w)


# ----------------------------------------------------------------------------- modules
def test_rmsnorm_module_state_dict_compatible_with_torch():
    ours, theirs = fastlayers.RMSNorm(64, eps=1e-6), torch.nn.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(64))
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict()) == ["weight"]
    x = torch.randn(5, 64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    r = torch.randn(5, 64)
    y, h = ours(x, residual=r, prenorm=True)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(y, theirs(x + r), atol=1e-5, rtol=1e-5)
    theirs.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_module_state_dict_compatible_with_torch(bias):
    ours, theirs = fastlayers.LayerNorm(64, bias=bias), torch.nn.LayerNorm(64, bias=bias)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p))
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(5, 64)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    ours(x).sum().backward()
    theirs(x).sum().backward()
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- torch.library
class _Block(torch.nn.Module):
    """Pre-Norm residual chain using both ops with prenorm and a fused residual."""

    def __init__(self, d):
        super().__init__()
        self.n1, self.n2 = fastlayers.RMSNorm(d), fastlayers.LayerNorm(d)
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x):
        y, h = self.n1(x, residual=x * 0.5, prenorm=True)
        return self.n2(self.lin(y), residual=h).square().mean()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_backward(compiler):
    """fullgraph=True traces through the custom ops; loss and every gradient match eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = _Block(32)
    x = torch.randn(4, 7, 32, requires_grad=True)
    loss = m(x)
    loss.backward()
    grads = [p.grad.clone() for p in m.parameters()] + [x.grad.clone()]
    m.zero_grad()
    x.grad = None
    cm = torch.compile(m, fullgraph=True, backend=compiler)
    closs = cm(x)
    closs.backward()
    torch.testing.assert_close(closs, loss)
    for g, p in zip(grads, list(m.parameters()) + [x]):
        torch.testing.assert_close(p.grad, g)


def test_eager_path_skips_the_dispatcher(monkeypatch):
    """Eager calls go to the kernel directly, not through torch.ops (custom-op dispatch costs 10-60 us)."""
    called = []
    op = torch.ops.fastlayers.norm_fwd
    monkeypatch.setattr(torch.ops.fastlayers, "norm_fwd",
                        lambda *a, **k: (called.append(1), op(*a, **k))[1], raising=False)
    x = torch.randn(3, 8, requires_grad=True)
    fastlayers.rms_norm(x, torch.ones(8)).sum().backward()
    assert called == []


@pytest.mark.parametrize("is_rms", [True, False], ids=["rms", "ln"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(is_rms, dtype):
    x = torch.randn(3, 5, 40, dtype=dtype, requires_grad=True)
    r = torch.randn(3, 5, 40, dtype=dtype, requires_grad=True)
    w = torch.randn(40, dtype=dtype, requires_grad=True)
    b = None if is_rms else torch.randn(40, dtype=dtype, requires_grad=True)
    for store_h in (False, True):
        torch.library.opcheck(torch.ops.fastlayers.norm_fwd.default,
                              (x, r, w, b, 1e-5, is_rms, store_h, False, "cpu"))
    with torch.no_grad():
        y, h, mean, rstd = torch.ops.fastlayers.norm_fwd(x, r, w, b, 1e-5, is_rms, True, False, "cpu")
    dy = torch.randn_like(y)
    torch.library.opcheck(torch.ops.fastlayers.norm_bwd.default,
                          (dy, x.detach(), r.detach(), w.detach(), None if b is None else b.detach(), mean, rstd,
                           torch.randn_like(h), is_rms, False, "cpu"))


def test_extension_modules_are_torch_free():
    """_C (and _cuda when built) link neither libtorch nor libc10, nor a shared cudart."""
    import fastlayers._C as C
    paths = [C.__file__]
    try:
        import fastlayers._cuda as cu
        paths.append(cu.__file__)
    except ImportError:
        pass
    for p in paths:
        out = subprocess.run(["ldd", p], capture_output=True, text=True).stdout
        for lib in ("libtorch", "libc10", "libcudart.so"):
            assert lib not in out, f"{p} links {lib}:\n{out}"


def _inplace_cases():
    """(name, backend, fn(leaves) -> outputs, leaves): every op with a backward, on CPU tensors."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k, v, w8 = r(1, 3, 4, 8), r(1, 3, 2, 8), r(1, 3, 2, 8), 1 + 0.1 * r(8)
    cases = [
        ("causal_conv1d_channel_last", lambda x, w: fastlayers.causal_conv1d(x.transpose(1, 2), w, None, "silu",
                                                                               None, True), [r(2, 7, 5), r(5, 4)]),
        ("causal_conv1d", lambda x, w: fastlayers.causal_conv1d(x, w), [r(2, 5, 7), r(5, 3)]),
        ("rms_norm", lambda x, res, w: fastlayers.rms_norm(x, w, residual=res, prenorm=True), [r(3, 8), r(3, 8), w8]),
        ("layer_norm", lambda x, w, b: fastlayers.layer_norm(x, w, b), [r(3, 8), w8, r(8)]),
        ("swiglu", lambda x: fastlayers.swiglu(x), [r(3, 8)]),
        ("qkv_norm_rope_no_v_weight", lambda q, k, v, w: fastlayers.qkv_norm_rope(q, k, v * 1, w, w, None, None, None),
         [q, k, v, w8]),
        ("qkv_norm_rope_packed", lambda x, w: fastlayers.qkv_norm_rope_packed(x, 4, 2, w, w, w, None, None),
         [r(1, 3, 64), w8]),
        ("selective_scan", lambda u, d, A, B: fastlayers.selective_scan(u, d.abs(), -A.abs(), B, B, None, None,
                                                                         None, False, True),
         [r(2, 4, 6), r(2, 4, 6), r(4, 3), r(2, 3, 6)]),
        ("ssd_scan", lambda x, dt, A, B: fastlayers.ssd_scan(x, dt.abs(), -A.abs(), B, B, 16,
                                                             return_final_states=True),
         [r(1, 16, 2, 4), r(1, 16, 2), r(2), r(1, 16, 1, 3)]),
    ]
    return [pytest.param(*c[1:], id=c[0]) for c in cases]


@pytest.mark.parametrize("fn,inputs", _inplace_cases())
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_outputs_may_be_modified_in_place(fn, inputs, backend):
    """What an op returns under autograd is an ordinary tensor: ``out += 1`` / ``out.add_(t)`` before the
    backward work (no 'view created inside a custom Function' error) and the gradients still match the
    reference's (modifying by a constant leaves them unchanged)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        pytest.skip("triton on CPU tensors needs TRITON_INTERPRET=1")
    grads = {}
    for be in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        try:
            with fastlayers.use_backend(be):
                outs = fn(*leaves)
        except fastlayers.BackendUnavailable:
            pytest.skip(f"{be} has no kernel for this op")
        outs = outs if isinstance(outs, tuple) else (outs,)
        loss = 0
        for i, o in enumerate(outs):
            if o.requires_grad and not any(o is t for t in leaves):  # (v passed through is the caller's v)
                if i % 2:
                    o += 1
                else:
                    o.add_(1.0)
                loss = loss + (o * o).sum()
        loss.backward()
        grads[be] = [t.grad for t in leaves]
    for i, (a, b) in enumerate(zip(grads[backend], grads["reference"])):
        assert (a is None) == (b is None), i
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- norm variants (issue 18, point 7)
@pytest.mark.parametrize("shape_arg", [64, [64], (64,)], ids=["int", "list", "tuple"])
def test_rmsnorm_module_without_affine_matches_torch(shape_arg):
    ours = fastlayers.RMSNorm(shape_arg, eps=None, elementwise_affine=False)
    theirs = torch.nn.RMSNorm(shape_arg, eps=None, elementwise_affine=False)
    assert ours.weight is None and list(ours.state_dict()) == list(theirs.state_dict()) == []
    ours.load_state_dict(theirs.state_dict())
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 64, dtype=dtype)
        torch.testing.assert_close(ours(x), theirs(x))  # eps=None: finfo(dtype).eps, as torch
    ours = fastlayers.LayerNorm(64, elementwise_affine=False)
    theirs = torch.nn.LayerNorm(64, elementwise_affine=False)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == []
    x = torch.randn(5, 64, requires_grad=True)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_rmsnorm_module_bf16_matches_torch_and_gemma_offset():
    """The default casting ("gemma") is what torch.nn.RMSNorm computes: bf16 outputs equal torch's; with
    offset=1.0 the gain is 1 + weight (Gemma's RMSNorm)."""
    theirs = torch.nn.RMSNorm(96, eps=1e-6, dtype=torch.bfloat16)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(96))
    ours = fastlayers.RMSNorm(96, eps=1e-6, dtype=torch.bfloat16)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 96, dtype=torch.bfloat16)
    assert (ours(x) == theirs(x)).float().mean() > 0.99
    gemma = fastlayers.RMSNorm(96, eps=1e-6, offset=1.0, dtype=torch.bfloat16)
    gemma.load_state_dict(theirs.state_dict())
    got, want = gemma(x), reference.rms_norm(x.double(), ours.weight.double() + 1.0, 1e-6)
    lowp = reference.rms_norm(x, ours.weight, 1e-6, offset=1.0)
    assert_close_to_ref(got, want, lowp, "y (offset=1)")
    assert "offset=1.0" in repr(gemma)


def test_rmsnorm_module_bad_arguments():
    with pytest.raises(ValueError, match="casting_mode"):
        fastlayers.RMSNorm(8, casting_mode="fp32")
    with pytest.raises(TypeError, match="elementwise_affine"):
        fastlayers.RMSNorm(8, 1e-6, "cpu")  # the third positional is elementwise_affine, as torch.nn.RMSNorm
    with pytest.raises(ValueError, match="normalized_shape"):
        fastlayers.RMSNorm((4, 8))


@pytest.mark.parametrize("compiler", ["aot_eager"])
def test_torch_compile_norm_variants(compiler):
    """offset, weight=None and llama casting through the custom ops: fullgraph, gradients as eager."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    w = (0.3 * torch.randn(32)).requires_grad_()

    def f(x, r):
        y, h = fastlayers.rms_norm(x, w, residual=r, prenorm=True, offset=1.0, casting_mode="llama")
        return (fastlayers.rms_norm(y, None) * h).sum()

    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    loss = f(x, r)
    loss.backward()
    grads = [t.grad.clone() for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    closs = torch.compile(f, fullgraph=True, backend=compiler)(x, r)
    closs.backward()
    torch.testing.assert_close(closs, loss)
    for g, t in zip(grads, (x, r, w)):
        torch.testing.assert_close(t.grad, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_norm_variants(dtype):
    x = torch.randn(3, 5, 40, dtype=dtype, requires_grad=True)
    r = torch.randn(3, 5, 40, dtype=dtype, requires_grad=True)
    w = torch.randn(40, dtype=dtype, requires_grad=True)
    for weight, offset, round_xhat in ((w, 1.0, True), (None, 0.0, False)):
        torch.library.opcheck(torch.ops.fastlayers.norm_fwd.default,
                              (x, r, weight, None, 1e-5, True, True, False, "cpu", offset, round_xhat))
        with torch.no_grad():
            y, h, mean, rstd = torch.ops.fastlayers.norm_fwd(x, r, weight, None, 1e-5, True, True, False, "cpu",
                                                             offset, round_xhat)
        torch.library.opcheck(torch.ops.fastlayers.norm_bwd.default,
                              (torch.randn_like(y), x.detach(), r.detach(), None if weight is None else w.detach(),
                               None, mean, rstd, torch.randn_like(h), True, False, "cpu", offset, round_xhat))
