"""selective_scan (the Mamba-1 scan, mamba_ssm's selective_scan_fn) against the reference scan."""
import pytest
import torch

import fastlayers
from fastlayers import reference
from fastlayers.backend import BackendUnavailable

from conftest import _case, assert_rel_err, seed_of

REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = [_case("cpu", "cpu"), _case("cpu", "reference")]
# The forward and the backward also run on CUDA tensors (backend 'cuda'; skipped without a GPU).
FWD_BACKENDS = BACKENDS + [_case("cuda", "cuda")]
LAYOUTS = ("const", "var", "group")  # B, C: (dim, N), (batch, N, L), (batch, G=2, N, L)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _gen(*key):
    return torch.Generator().manual_seed(seed_of(*key))


def _inputs(b, d, L, n, layout, dtype, gen, opts=("D", "z", "delta_bias"), softplus=True, c_layout=None):
    """Fresh random inputs (never zeros): u, delta, z in dtype; A, D, delta_bias in fp32 (as Mamba keeps them)
    unless dtype is fp64; B, C in dtype."""
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    u, z = r(b, d, L), r(b, d, L)
    delta = r(b, d, L) * 0.5 - 1 if softplus else torch.rand(b, d, L, generator=gen) * 0.5 + 0.05
    A = -(torch.rand(d, n, generator=gen) + 0.1)

    def bc(lay):
        return {"const": lambda: r(d, n), "var": lambda: r(b, n, L), "group": lambda: r(b, 2, n, L)}[lay]()

    B, C = bc(layout), bc(c_layout or layout)
    D, dtb = r(d), r(d) * 0.5
    param = torch.float64 if dtype == torch.float64 else torch.float32
    return (u.to(dtype), delta.to(dtype), A.to(param), B.to(dtype), C.to(dtype),
            D.to(param) if "D" in opts else None, z.to(dtype) if "z" in opts else None,
            dtb.to(param) if "delta_bias" in opts else None)


def _ref64(args, softplus, last=True):
    hi = [None if a is None else a.double() for a in args]
    return reference.selective_scan(*hi, delta_softplus=softplus, return_last_state=last)


def _dev(args, device):
    return tuple(None if a is None else a.to(device) for a in args)


def _run(backend, args, softplus, last=True):
    with fastlayers.use_backend(backend):
        return fastlayers.selective_scan(*args, delta_softplus=softplus, return_last_state=last)


@pytest.mark.parametrize("device,backend", FWD_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [1, 3, 123, 2049])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward(device, backend, dtype, L, layout):
    args = _inputs(2, 6, L, 8, layout, dtype, _gen("fwd", str(dtype), L, layout))
    ref_out, ref_last = _ref64(args, True)
    with torch.no_grad():
        out, last = _run(backend, _dev(args, device), True)
    out, last = out.cpu(), last.cpu()
    assert out.dtype == dtype and out.shape == args[0].shape
    assert last.dtype == torch.float32 and last.shape == (2, 6, 8)
    # out = <x_t, C_t> is a reduction over N of a scan over L: relative-norm error (DESIGN.md §4).
    assert_rel_err(out, ref_out, REL_TOL[dtype], "out")
    assert_rel_err(last, ref_last, 1e-5, "last_state")


OPTS = [(), ("D",), ("z",), ("delta_bias",), ("D", "z", "delta_bias")]


@pytest.mark.parametrize("device,backend", FWD_BACKENDS)
@pytest.mark.parametrize("opts", OPTS, ids=lambda o: "+".join(o) or "none")
@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "nosoftplus"])
@pytest.mark.parametrize("last", [True, False], ids=["last", "nolast"])
@pytest.mark.parametrize("bc", [("var", "const"), ("const", "group"), ("group", "var")], ids="-".join)
def test_forward_options(device, backend, opts, softplus, last, bc):
    args = _inputs(3, 4, 57, 5, bc[0], torch.float32, _gen("opts", opts, softplus, last, bc), opts, softplus, bc[1])
    ref = _ref64(args, softplus, last)
    with torch.no_grad():
        res = _run(backend, _dev(args, device), softplus, last)
    res = tuple(r.cpu() for r in res) if last else res.cpu()
    if last:
        assert_rel_err(res[0], ref[0], 1e-5, "out")
        assert_rel_err(res[1], ref[1], 1e-5, "last_state")
    else:
        assert isinstance(res, torch.Tensor)
        assert_rel_err(res, ref, 1e-5, "out")


@pytest.mark.parametrize("device,backend", FWD_BACKENDS)
def test_forward_strided_inputs(device, backend):
    """(batch, L, dim) memory seen as (batch, dim, L) views, a sliced A, B as a (batch, L, N) transposed view."""
    gen = _gen("strided")
    b, d, L, n = 2, 5, 33, 6
    u, delta, z = (torch.randn(b, L, d, generator=gen).transpose(1, 2) for _ in range(3))
    A = -(torch.rand(d, 2 * n, generator=gen) + 0.1)[:, ::2]
    B = torch.randn(b, L, n, generator=gen).transpose(1, 2)
    C = torch.randn(b, n, L, generator=gen)
    D, dtb = torch.randn(2 * d, generator=gen)[::2], torch.randn(d, generator=gen)
    args = (u, delta, A, B, C, D, z, dtb)
    ref_out, ref_last = _ref64(args, True)
    out, last = _run(backend, _dev(args, device), True)  # .to() keeps the transposed strides
    out, last = out.cpu(), last.cpu()
    assert_rel_err(out, ref_out, 1e-5, "out")
    assert_rel_err(last, ref_last, 1e-5, "last_state")


def test_forward_empty():
    args = _inputs(2, 4, 0, 3, "var", torch.float32, _gen("empty"))
    out, last = _run("cpu", args, True)
    assert out.shape == (2, 4, 0) and torch.equal(last, torch.zeros(2, 4, 3))


def test_triton_is_refused():
    """No triton kernel: the op is refused before any kernel."""
    args = _inputs(1, 2, 3, 2, "var", torch.float32, _gen("refuse"))
    with pytest.raises(BackendUnavailable, match="selective_scan"):
        _run("triton", args, True)


# ----------------------------------------------------------------------------- gradients
def _grads(backend, args, softplus, gen):
    """Gradients of every given input under random dout and dlast (the last state is differentiable too)."""
    leaves = [None if a is None else a.detach().clone().requires_grad_() for a in args]
    out, last = _run(backend, leaves, softplus)
    g_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    g_last = torch.randn(last.shape, generator=gen).to(last.dtype)
    torch.autograd.backward((out, last), (g_out.to(out.device), g_last.to(last.device)))
    return [None if a is None else a.grad.cpu() for a in leaves], g_out, g_last


def _ref_grads(args, softplus, g_out, g_last):
    leaves = [None if a is None else a.detach().double().requires_grad_() for a in args]
    out, last = reference.selective_scan(*leaves, delta_softplus=softplus, return_last_state=True)
    torch.autograd.backward((out, last), (g_out.double(), g_last.double()))
    return [None if a is None else a.grad for a in leaves]


GRAD_CASES = [  # L, layout, opts, softplus
    (1, "var", ("D", "z", "delta_bias"), True),
    (3, "group", ("D", "z", "delta_bias"), True),
    (123, "const", ("D", "z", "delta_bias"), True),
    (123, "group", (), False),
    (64, "var", ("z",), False),
    (65, "group", ("D", "delta_bias"), True),
]


@pytest.mark.parametrize("device,backend", FWD_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"L{c[0]}-{c[1]}-{'+'.join(c[2]) or 'none'}-sp{int(c[3])}")
def test_gradients_match_reference(device, backend, dtype, case):
    L, layout, opts, softplus = case
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the cuda backend takes float32/float16/bfloat16")
    gen = _gen("grad", str(dtype), case)
    args = _inputs(2, 4, L, 6, layout, dtype, gen, opts, softplus)
    grads, g_out, g_last = _grads(backend, _dev(args, device), softplus, gen)
    ref = _ref_grads(args, softplus, g_out, g_last)
    for name, a, g, r in zip(NAMES, args, grads, ref):
        if a is None:
            continue
        assert g is not None and g.dtype == a.dtype and g.shape == a.shape, name
        # Every gradient is a sum over the scan: relative-norm error, bounded by the input dtype
        # (A, D, delta_bias stay fp32 next to bf16 activations but sum bf16-rounded terms).
        tol = REL_TOL[dtype] if dtype != torch.float32 else 1e-5
        assert_rel_err(g, r, tol, f"d{name}")


CUDA_GRAD_SHAPES = [  # N (1, 2, 4, 8 states a lane: chunks of 32, 16, 8, 4 steps), L (partial chunks)
    (5, 300), (16, 1), (16, 31), (16, 33), (33, 64), (64, 33), (100, 300), (130, 33), (256, 300)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,L", CUDA_GRAD_SHAPES, ids=lambda v: str(v))
def test_cuda_backward_matches_cpu(n, L, dtype):
    """The CUDA backward kernel (states recomputed from chunk checkpoints) against the CPU one on the same
    inputs: every gradient, B/C time-varying with groups and time-invariant, dlast included."""
    if not fastlayers.available_backends()["cuda"][0]:
        pytest.skip("fastlayers._cuda not built")
    for layout, c_layout in (("group", "const"), ("var", "group")):
        gen = _gen("cuda-bwd", n, L, str(dtype), layout)
        args = _inputs(3, 8, L, n, layout, dtype, gen, c_layout=c_layout)
        g_cpu, g_out, g_last = _grads("cpu", args, True, _gen("cuda-bwd-g", n, L))
        g_gpu, _, _ = _grads("cuda", _dev(args, "cuda"), True, _gen("cuda-bwd-g", n, L))
        for name, a, g, r in zip(NAMES, args, g_gpu, g_cpu):
            assert g.dtype == a.dtype and g.shape == a.shape, name
            assert_rel_err(g, r, 3e-5 if dtype == torch.float32 else 1e-2, f"d{name} ({layout}/{c_layout})")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layouts", [("group", "const"), ("var", "group")], ids="-".join)
def test_gradcheck(device, backend, layouts):
    gen = _gen("gradcheck", layouts)
    args = _inputs(2, 4, 5, 3, layouts[0], torch.float64, gen, c_layout=layouts[1])
    leaves = [a.detach().clone().requires_grad_() for a in args]

    def f(*xs):
        with fastlayers.use_backend(backend):
            return fastlayers.selective_scan(*xs, delta_softplus=True, return_last_state=True)

    assert torch.autograd.gradcheck(f, leaves)


def test_no_grad_path_equals_autograd_path():
    args = _inputs(2, 4, 17, 5, "group", torch.float32, _gen("paths"))
    with torch.no_grad():
        a = fastlayers.selective_scan(*args, delta_softplus=True)
    b = fastlayers.selective_scan(*[x.clone().requires_grad_() for x in args], delta_softplus=True)
    assert torch.equal(a, b.detach())


def test_opcheck():
    gen = _gen("opcheck")
    args = _inputs(2, 4, 7, 3, "group", torch.float32, gen)
    leaves = [a.clone().requires_grad_() for a in args]
    torch.library.opcheck(torch.ops.fastlayers.selective_scan_fwd, (*leaves, True, "cpu"))
    args2 = _inputs(2, 4, 7, 3, "const", torch.float32, gen, opts=("z",), softplus=False)
    torch.library.opcheck(torch.ops.fastlayers.selective_scan_fwd,
                          (*[None if a is None else a.clone().requires_grad_() for a in args2], False, "cpu"))
    dout, dlast = torch.randn(2, 4, 7, generator=gen), torch.randn(2, 4, 3, generator=gen)
    torch.library.opcheck(torch.ops.fastlayers.selective_scan_bwd, (dout, dlast, *args, True, "cpu"))
    torch.library.opcheck(torch.ops.fastlayers.selective_scan_bwd, (dout, None, *args2, False, "cpu"))


def test_torch_compile_fullgraph():
    """The custom ops (fake kernels, autograd) trace with fullgraph=True and give the eager results."""
    args = _inputs(2, 4, 9, 3, "group", torch.float32, _gen("compile"), c_layout="const")

    def f(*xs):
        out, last = fastlayers.selective_scan(*xs, delta_softplus=True, return_last_state=True)
        return out.sum() + (last * last).sum()

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        leaves = [a.clone().requires_grad_() for a in args]
        loss = fn(*leaves)
        loss.backward()
        grads.append([loss.detach()] + [x.grad for x in leaves])
    for name, a, b in zip(("loss",) + NAMES, *grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad,match", [
    (dict(delta=torch.randn(2, 4, 6)), "delta must have shape"),
    (dict(z=torch.randn(2, 4, 6)), "z must have shape"),
    (dict(B=torch.randn(2, 3, 6)), "B must have shape"),
    (dict(C=torch.randn(2, 2, 3, 6)), "C must be"),
    (dict(C=torch.randn(2, 3, 3, 7)), "G dividing dim"),
    (dict(A=torch.randn(5, 3)), "A must have shape"),
    (dict(A=torch.randn(4)), "A must have shape"),
    (dict(A=torch.randn(4, 3, dtype=torch.complex64)), "complex A \\(torch.complex64\\) is not supported"),
    (dict(u=torch.ones(2, 4, 7, dtype=torch.int64)), "u must be a floating"),
    (dict(B=torch.ones(2, 3, 7, dtype=torch.int32)), "B must be a floating"),
    (dict(u=torch.randn(2, 4)), "u must be"),
    (dict(D=torch.randn(3)), "D must have shape"),
    (dict(delta_bias=torch.randn(4, 1)), "delta_bias must have shape"),
    (dict(B=[[1.0]]), "B must be a torch.Tensor"),
])
def test_bad_input_raises_before_the_kernel(bad, match, monkeypatch):
    from fastlayers.backends import cpu as cpu_backend
    for k in ("selective_scan_fwd", "selective_scan_bwd"):
        monkeypatch.setattr(cpu_backend, k, lambda *a: pytest.fail("kernel ran on bad input"))
    args = dict(zip(NAMES, _inputs(2, 4, 7, 3, "var", torch.float32, _gen("bad"))))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fastlayers.selective_scan(**args, delta_softplus=True)


@pytest.mark.parametrize("backend", ["cpu", "reference", "cuda"])
@pytest.mark.parametrize("which", ["A", "B", "C"])
def test_complex_weights_are_refused(backend, which, monkeypatch):
    """mamba_ssm's selective_scan_fn takes complex A, B, C (S4D-style); no fastlayers backend does: a
    complex tensor is a TypeError that names it and says so, raised before any backend is looked up
    (before, a complex A was refused only as "not a floating tensor")."""
    import fastlayers.ops.scan as scan_mod
    monkeypatch.setattr(scan_mod, "resolve", lambda *a, **k: pytest.fail("dispatch reached"))
    args = list(_inputs(1, 4, 5, 3, "var", torch.float32, _gen("complex", which)))
    i = {"A": 2, "B": 3, "C": 4}[which]
    args[i] = torch.complex(args[i], torch.randn(args[i].shape, generator=_gen("complex-im", which)))
    with pytest.raises(TypeError, match=f"complex {which} \\(torch.complex64\\) is not supported.*reference, cpu, cuda"):
        with fastlayers.use_backend(backend):
            fastlayers.selective_scan(*args)
