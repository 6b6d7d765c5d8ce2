"""causal_conv1d and causal_conv1d_update: every backend against the reference (DESIGN.md §4)."""
import pytest
import torch

import fastlayers
from fastlayers import reference
from fastlayers.ops import conv1d as conv1d_op

from conftest import TRITON_GPU_CASES, assert_close_to_ref, assert_rel_err, is_interpreted, seed_of

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}
LAYOUTS = ("time", "channel_last")


def _gen(*key):
    return torch.Generator().manual_seed(seed_of(*key))


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the op allocates starts as NaN: an element a kernel does not write shows up."""
    def nan_empty(shape, dtype, device, stride=None):
        if stride is None:
            return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
        return torch.empty_strided(tuple(shape), stride, dtype=dtype, device=device).fill_(float("nan"))
    monkeypatch.setattr(conv1d_op, "empty", nan_empty)


def _x(b, d, t, dtype, device, g, layout, scale=1.0):
    """(batch, dim, seqlen) x; channel_last: a (batch, seqlen, dim) tensor transposed (no copy)."""
    if layout == "channel_last":
        x = (scale * torch.randn(b, t, d, generator=g)).to(dtype).to(device).transpose(1, 2)
        assert x.stride(1) == 1
        return x
    return (scale * torch.randn(b, d, t, generator=g)).to(dtype).to(device)


def _params(b, d, w, dtype, device, g, bias=True, init=True):
    weight = (torch.randn(d, w, generator=g) / w ** 0.5).to(dtype).to(device)
    bias_t = torch.randn(d, generator=g).to(dtype).to(device) if bias else None
    init_t = torch.randn(b, d, w - 1, generator=g).to(dtype).to(device) if init else None
    return weight, bias_t, init_t


def _up(t):
    return None if t is None else t.double()


def _interpreter_case(dtype, seqlen, width, layout, backward=False):
    """The cases the (slow) Triton interpreter runs: bf16 at every length with widths 2 and 4 (the longest
    with width 4 only, in one layout for the backward), width 3 at short lengths, fp32 and fp16 at one or
    two shapes; the compiled backends run them all."""
    if dtype == torch.bfloat16:
        if width == 3:
            return seqlen in ((123,) if backward else (3, 123))
        return seqlen != 2049 or (width == 4 and (not backward or layout == "time"))
    if dtype == torch.float32:
        return width == 4 and (seqlen == 123 or (seqlen == 1 and not backward))
    return width == 4 and seqlen == 123 and not backward


def _check_out(res, x, weight, bias, act, init, final):
    hi = reference.causal_conv1d(_up(x), _up(weight), _up(bias), act, _up(init), final)
    lo = reference.causal_conv1d(x, weight, bias, act, init, final)
    if final:
        (out, fin), (hi, hi_fin), (lo, _) = res, hi, lo
        assert fin.dtype == x.dtype and fin.shape == (x.shape[0], x.shape[1], weight.shape[1] - 1)
        assert torch.equal(fin.double().cpu(), hi_fin.cpu()), "final_states must be exact copies of the inputs"
    else:
        out = res
    assert out.dtype == x.dtype and out.shape == x.shape
    if x.shape[2] > 1:  # the output keeps x's layout
        assert (out.stride(1) == 1) == (x.stride(1) == 1 and x.stride(2) != 1), (out.stride(), x.stride())
    assert_close_to_ref(out, hi, lo, "out")


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("seqlen", [1, 3, 123, 2049])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_conv1d_forward(device, backend, dtype, seqlen, width, layout):
    """bias + silu + initial states + final states (the Mamba-2 prefill)."""
    if is_interpreted(device, backend) and not _interpreter_case(dtype, seqlen, width, layout):
        pytest.skip("interpreter: bf16 everywhere, fp32 and fp16 at a few shapes")
    b, d = 2, 5 if is_interpreted(device, backend) else 16
    g = _gen("fwd", dtype, seqlen, width, layout)
    x = _x(b, d, seqlen, dtype, device, g, layout, scale=2.0)
    weight, bias, init = _params(b, d, width, dtype, device, g)
    with fastlayers.use_backend(backend):
        res = fastlayers.causal_conv1d(x, weight, bias, "silu", init, True)
    _check_out(res, x, weight, bias, "silu", init, True)


VARIANTS = {  # name: (bias, activation, initial_states, return_final_states)
    "plain": (False, None, False, False),
    "bias": (True, None, False, False),
    "silu": (False, "silu", False, False),
    "swish_init": (True, "swish", True, False),
    "final_no_init": (False, None, False, True),
}


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seqlen", [2, 50])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal_conv1d_variants(device, backend, variant, seqlen, layout):
    """Each option off and on alone; seqlen 2 < width - 1 pads final states with zeros without initial states."""
    has_bias, act, has_init, final = VARIANTS[variant]
    dtype = torch.float32 if seqlen == 2 else torch.bfloat16
    g = _gen("var", variant, seqlen, layout)
    x = _x(2, 6, seqlen, dtype, device, g, layout)
    weight, bias, init = _params(2, 6, 4, dtype, device, g, has_bias, has_init)
    with fastlayers.use_backend(backend):
        res = fastlayers.causal_conv1d(x, weight, bias, act, init, final)
    _check_out(res, x, weight, bias, act, init, final)


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
def test_causal_conv1d_other_strides(device, backend):
    """x in neither layout (every other time step) is copied once and gives the right answer; mixed dtypes of
    weight/bias (fp32 weights, bf16 x) and a non-contiguous weight view are accepted."""
    g = _gen("strides")
    base = torch.randn(2, 7, 40, generator=g).to(torch.bfloat16).to(device)
    x = base[:, :, ::2]
    weight = torch.randn(4, 7, generator=g).to(device).t()  # (7, 4), not contiguous
    bias = torch.randn(7, generator=g).to(device)
    with fastlayers.use_backend(backend):
        res = fastlayers.causal_conv1d(x, weight, bias, "silu", None, True)
    _check_out(res, x, weight, bias, "silu", None, True)


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_causal_conv1d_many_channels(device, backend, layout):
    """More channels than one block of the kernels (cpu: 512 channel-last, 128 in the decode update; triton:
    128) and several time chunks: forward, every gradient, and a decode step."""
    interp = is_interpreted(device, backend)
    b, d, t, w = (1, 150, 20, 4) if interp else (2, 600, 70, 4)
    g = _gen("many", layout)
    x = _x(b, d, t, torch.float32, device, g, layout)
    weight, bias, init = _params(b, d, w, torch.float32, device, g)
    dout = torch.randn(b, d, t, generator=g).to(device)
    dfinal = torch.randn(b, d, w - 1, generator=g).to(device)

    def fast(*a):
        with fastlayers.use_backend(backend):
            return fastlayers.causal_conv1d(*a[:3], a[4], a[3], True)

    with torch.no_grad():
        _check_out(fast(x, weight, bias, init, "silu"), x, weight, bias, "silu", init, True)
    got = _conv_grads(fast, x, weight, bias, init, dout, dfinal, "silu")
    want = _conv_grads(lambda *a: reference.causal_conv1d(*a[:3], a[4], a[3], True),
                       *(_up(t) for t in (x, weight, bias, init)), dout, dfinal, "silu")
    for name, a, r in zip(("dx", "dweight", "dbias", "dinitial_states"), got, want):
        assert_rel_err(a, r, 1e-5, name)
    state, step = init.clone(), x[:, :, 0]
    want_out = reference.causal_conv1d_update(step, state.clone(), weight, bias, "silu")
    with fastlayers.use_backend(backend):
        out = fastlayers.causal_conv1d_update(step, state, weight, bias, "silu")
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, torch.cat([init[..., 1:], step[..., None]], -1), rtol=0, atol=0)


# ----------------------------------------------------------------------------- backward
def _conv_grads(fn, x, weight, bias, init, dout, dfinal, act):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (x, weight, bias, init)]
    out, fin = fn(*leaves, act)
    ((out.double() * dout.double()).sum() + (fin.double() * dfinal.double()).sum()).backward()
    return [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("seqlen", [1, 3, 123, 2049])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_conv1d_backward(device, backend, dtype, seqlen, width, layout):
    """Gradients of x, weight, bias and initial_states (through out and final_states) against the reference's.
    The output gradient is time-contiguous whatever x's layout (a channel-last x gets it copied once)."""
    interp = is_interpreted(device, backend)
    if interp and not _interpreter_case(dtype, seqlen, width, layout, backward=True):
        pytest.skip("interpreter: bf16 at widths 2 and 4 (3 at one length), fp32 and fp16 at one shape")
    b, d = 2, 4 if interp else 9
    g = _gen("bwd", dtype, seqlen, width, layout)
    x = _x(b, d, seqlen, dtype, device, g, layout)
    weight, bias, init = _params(b, d, width, dtype, device, g)
    dout = torch.randn(b, d, seqlen, generator=g).to(dtype).to(device)
    dfinal = torch.randn(b, d, width - 1, generator=g).to(dtype).to(device)

    def fast(*a):
        with fastlayers.use_backend(backend):
            return fastlayers.causal_conv1d(*a[:3], a[4], a[3], True)

    got = _conv_grads(fast, x, weight, bias, init, dout, dfinal, "silu")
    want = _conv_grads(lambda *a: reference.causal_conv1d(*a[:3], a[4], a[3], True),
                       *(_up(t) for t in (x, weight, bias, init)), dout, dfinal, "silu")
    for name, a, w, t in zip(("dx", "dweight", "dbias", "dinitial_states"), got, want, (x, weight, bias, init)):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        assert_rel_err(a, w, REL_TOL[dtype], name)


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("variant", ["no_bias_no_act", "init_not_returned", "final_only_used"])
def test_causal_conv1d_backward_variants(device, backend, variant):
    """No bias and no activation; initial states without final states; a loss on final_states alone."""
    g = _gen("bwdvar", variant)
    x = _x(2, 5, 9, torch.float32, device, g, "channel_last")
    weight, bias, init = _params(2, 5, 3, torch.float32, device, g, variant != "no_bias_no_act",
                                 variant != "no_bias_no_act")
    act = None if variant == "no_bias_no_act" else "silu"
    final = variant == "final_only_used"
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, weight, bias, init)]
    ref_leaves = [None if t is None else t.double().requires_grad_() for t in (x, weight, bias, init)]
    with fastlayers.use_backend(backend):
        res = fastlayers.causal_conv1d(*leaves[:3], act, leaves[3], final)
    ref = reference.causal_conv1d(*ref_leaves[:3], act, ref_leaves[3], final)
    if final:
        (res[1] * 3).sum().backward()
        (ref[1] * 3).sum().backward()
    else:
        (res * res).sum().backward()
        (ref * ref).sum().backward()
    for a, r in zip(leaves, ref_leaves):
        if r is None:
            continue
        if r.grad is None or not r.grad.any():  # e.g. weight when only final_states is used
            assert a.grad is None or not a.grad.any()
        else:
            assert_rel_err(a.grad, r.grad, 1e-5, "grad")


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("inplace", ["iadd", "add_"])
@pytest.mark.parametrize("final", [False, True])
def test_causal_conv1d_output_modified_in_place(device, backend, layout, inplace, final):
    """The output is an ordinary tensor (not a view made inside the autograd Function): ``out += 1`` and
    ``out.add_(t)`` work, as in causal-conv1d's own tests, in x's layout, and the gradients through the
    modified output still match the reference's."""
    g = _gen("inplace", layout, inplace, final)
    x = _x(2, 5, 9, torch.float32, device, g, layout)
    weight, bias, init = _params(2, 5, 4, torch.float32, device, g)
    extra = torch.randn(2, 5, 9, generator=g).to(device)
    dout = torch.randn(2, 5, 9, generator=g).to(device)

    def run(fn, leaves):
        res = fn(*leaves[:3], "silu", leaves[3], final)
        out = res[0] if final else res
        scale = leaves[1][:, :1]  # a term that itself needs a gradient: (dim, 1) broadcast over time
        if inplace == "iadd":
            out += 1
            out += scale * extra
        else:
            out.add_(1).add_(scale * extra)
        loss = (out * dout).sum() + (res[1].sum() if final else 0)
        loss.backward()
        return out

    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, init)]
    ref_leaves = [t.double().requires_grad_() for t in (x, weight, bias, init)]
    with fastlayers.use_backend(backend):
        out = run(fastlayers.causal_conv1d, leaves)
    ref = run(reference.causal_conv1d, ref_leaves)
    assert not out._is_view()
    assert (out.stride(1) == 1) == (layout == "channel_last"), out.stride()
    assert_rel_err(out.detach(), ref.detach(), 1e-5, "out")
    for name, a, r in zip(("dx", "dweight", "dbias", "dinitial_states"), leaves, ref_leaves):
        assert a.grad is not None and a.grad.shape == a.shape, name
        assert_rel_err(a.grad, r.grad, 1e-5, name)


@pytest.mark.parametrize("backend,layout,seqlen", [("cpu", "time", 2), ("cpu", "time", 7), ("cpu", "channel_last", 2),
                                                    ("cpu", "channel_last", 7), ("reference", "channel_last", 7)])
def test_causal_conv1d_gradcheck(backend, layout, seqlen):
    g = _gen("gradcheck", layout, seqlen)
    x = _x(2, 3, seqlen, torch.float64, "cpu", g, layout).requires_grad_()
    weight, bias, init = (t.requires_grad_() for t in _params(2, 3, 4, torch.float64, "cpu", g))

    def f(x, weight, bias, init):
        with fastlayers.use_backend(backend):
            return fastlayers.causal_conv1d(x, weight, bias, "silu", init, True)

    assert torch.autograd.gradcheck(f, (x, weight, bias, init))


def test_causal_conv1d_opcheck():
    g = _gen("opcheck")
    for layout in LAYOUTS:
        x = _x(2, 3, 6, torch.float32, "cpu", g, layout)
        weight, bias, init = _params(2, 3, 4, torch.float32, "cpu", g)
        for args in ((x, weight, bias, init, True, True, "cpu"), (x, weight, None, None, False, False, "cpu")):
            torch.library.opcheck(torch.ops.fastlayers.causal_conv1d_fwd, args)
        dout, dfinal = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 3, generator=g)
        torch.library.opcheck(torch.ops.fastlayers.causal_conv1d_bwd, (dout, dfinal, x, weight, bias, init, True,
                                                                        "cpu"))
        torch.library.opcheck(torch.ops.fastlayers.causal_conv1d_bwd, (dout, None, x, weight, None, None, False,
                                                                        "cpu"))
    state = torch.randn(2, 3, 3, generator=g)
    torch.library.opcheck(torch.ops.fastlayers.causal_conv1d_update,
                          (torch.randn(2, 3, 1, generator=g), state, weight, bias, True, "cpu"))


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
def test_causal_conv1d_compile(device, backend):
    """torch.compile(fullgraph=True) of prefill (channel-last, as Mamba-2) + a decode step matches eager."""
    if is_interpreted(device, backend):
        pytest.skip("torch.compile of interpreted Triton kernels is not supported")
    g = _gen("compile")
    xbc = torch.randn(2, 8, 6, generator=g).to(device)  # (batch, seqlen, dim)
    weight, bias, _ = _params(2, 6, 4, torch.float32, device, g, init=False)
    step = torch.randn(2, 6, generator=g).to(device)

    def f(xbc, weight, bias):
        y, state = fastlayers.causal_conv1d(xbc.transpose(1, 2), weight, bias, "silu", return_final_states=True)
        state = state.detach().clone()
        z = fastlayers.causal_conv1d_update(step, state, weight.detach(), bias.detach(), "silu")
        return (y.transpose(1, 2) * 2).square().sum(), z, state

    res = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (xbc, weight, bias)]
        with fastlayers.use_backend(backend):
            loss, z, state = fn(*leaves)
            loss.backward()
        res.append([loss.detach(), z, state] + [t.grad for t in leaves])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- decode update
@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [2, 3, 4])
def test_update_is_last_column_of_full_conv(device, backend, dtype, width):
    """One step == the last output of the full conv over [conv_state, x]; the state shifts left by one."""
    g = _gen("upd", dtype, width)
    b, d = 3, 10
    state = torch.randn(b, d, width - 1, generator=g).to(dtype).to(device)
    x = torch.randn(b, d, generator=g).to(dtype).to(device)
    weight, bias, _ = _params(b, d, width, dtype, device, g, init=False)
    full = torch.cat([state, x[..., None]], dim=-1)
    want_state = full[..., 1:].clone()
    with fastlayers.use_backend(backend):
        out = fastlayers.causal_conv1d_update(x, state, weight, bias, "silu")
    hi = reference.causal_conv1d(_up(full), _up(weight), _up(bias), "silu")[..., -1]
    lo = reference.causal_conv1d(full, weight, bias, "silu")[..., -1]
    assert out.shape == x.shape and out.dtype == dtype
    assert_close_to_ref(out, hi, lo, "update")
    assert torch.equal(state, want_state), "conv_state must be shifted left with x appended"


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("state_len,chunk", [(3, 1), (3, 3), (5, 2)], ids=["S3x1", "S3x3", "S5x2"])
def test_prefill_then_update_equals_full_conv(device, backend, state_len, chunk):
    """Prefill k steps (final_states -> conv_state), then decode the rest `chunk` steps at a time (a 2-D x for
    one step): the outputs equal one full causal_conv1d, and the state ends as the last inputs.
    A state longer than width - 1 keeps older inputs; only its last width - 1 enter the conv."""
    g = _gen("prefill", state_len, chunk)
    b, d, t, k, width = 2, 7, 11, 6, 4
    x = _x(b, d, t, torch.float32, device, g, "channel_last")
    weight, bias, _ = _params(b, d, width, torch.float32, device, g, init=False)
    with fastlayers.use_backend(backend):
        full = fastlayers.causal_conv1d(x, weight, bias, "silu")
        y, fin = fastlayers.causal_conv1d(x[:, :, :k], weight, bias, "silu", return_final_states=True)
        state = torch.zeros(b, d, state_len, device=device)
        state[..., -(width - 1):] = fin
        state[..., :state_len - (width - 1)] = x[:, :, k - state_len:k - (width - 1)]
        outs = [y]
        for s in range(k, t, chunk):
            xs = x[:, :, s:s + chunk]
            o = fastlayers.causal_conv1d_update(xs[..., 0] if chunk == 1 else xs, state, weight, bias, "silu")
            outs.append(o[..., None] if chunk == 1 else o)
    torch.testing.assert_close(torch.cat(outs, dim=-1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, x[:, :, t - state_len:], rtol=0, atol=0)


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def no_kernels(monkeypatch):
    from fastlayers.backends import cpu as cpu_backend
    for name in ("causal_conv1d_fwd", "causal_conv1d_bwd", "causal_conv1d_update"):
        monkeypatch.setattr(cpu_backend, name, lambda *a, **k: pytest.fail("kernel ran on bad input"))


@pytest.mark.parametrize("bad,exc,match", [
    (dict(x=torch.randn(3, 4)), ValueError, "x must be 3-D"),
    (dict(x=torch.ones(2, 4, 5, dtype=torch.int32)), TypeError, "x must be a floating tensor"),
    (dict(weight=torch.randn(4, 5)), ValueError, r"weight must have shape \(4, width\)"),
    (dict(weight=torch.randn(4, 1)), ValueError, "width 2, 3 or 4"),
    (dict(x=torch.randn(2, 5, 4)), ValueError, r"looks like \(batch, seqlen, dim\).*pass x.transpose\(1, 2\)"),
    (dict(weight=torch.randn(3, 4)), ValueError, r"weight must have shape \(4, width\)"),
    (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(4,\)"),
    (dict(activation="relu"), ValueError, "activation must be None, 'silu' or 'swish'"),
    (dict(initial_states=torch.randn(2, 4, 2)), ValueError, r"initial_states must have shape \(2, 4, 3\)"),
    (dict(initial_states=torch.randn(2, 4, 3, dtype=torch.float64)), TypeError, "initial_states must have the dtype"),
    (dict(return_final_states=1), TypeError, "return_final_states must be a bool"),
])
def test_causal_conv1d_bad_input(bad, exc, match, no_kernels):
    args = dict(x=torch.randn(2, 4, 5), weight=torch.randn(4, 4), bias=torch.randn(4), activation="silu",
                initial_states=None, return_final_states=False)
    args.update(bad)
    with pytest.raises(exc, match=match):
        fastlayers.causal_conv1d(**args)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(seq_idx=torch.zeros(2, 5, dtype=torch.int64)), TypeError, "seq_idx must be int32"),
    (dict(seq_idx=torch.zeros(2, 4, dtype=torch.int32)), ValueError, r"seq_idx must have shape \(2, 5\)"),
    (dict(seq_idx=torch.zeros(2, 5).numpy()), TypeError, "seq_idx must be a torch.Tensor"),
    (dict(initial_states=torch.randn(2, 4, 3)), ValueError, "initial_states must be None when seq_idx"),
    (dict(return_final_states=True), ValueError, "return_final_states must be False when seq_idx"),
])
def test_causal_conv1d_seq_idx_bad_input(bad, exc, match, no_kernels):
    """causal-conv1d's rules for packed sequences: no initial or final states with seq_idx; int32 ids."""
    args = dict(x=torch.randn(2, 4, 5), weight=torch.randn(4, 4), bias=torch.randn(4), activation="silu",
                seq_idx=torch.zeros(2, 5, dtype=torch.int32))
    args.update(bad)
    with pytest.raises(exc, match=match):
        fastlayers.causal_conv1d(**args)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(conv_state=torch.randn(2, 4, 3, dtype=torch.bfloat16)), TypeError, "conv_state must have the dtype of x"),
    (dict(conv_state=torch.randn(2, 4, 2)), ValueError, "state_len >= width - 1 = 3"),
    (dict(conv_state=torch.randn(3, 4, 3)), ValueError, r"conv_state must have shape \(2, 4, state_len\)"),
    (dict(conv_state=torch.ones(2, 4, 3, dtype=torch.int64)), TypeError, "conv_state must be a floating tensor"),
    (dict(x=torch.randn(2, 4, 1, 1)), ValueError, r"x must be \(batch, dim\)"),
    (dict(x=torch.randn(2, 5)), ValueError, r"weight must have shape \(5, width\)"),
    (dict(weight=torch.randn(4, 5)), ValueError, "width 2, 3 or 4"),
    (dict(bias=torch.randn(4, 1)), ValueError, r"bias must have shape \(4,\)"),
    (dict(activation="gelu"), ValueError, "activation must be"),
])
def test_update_bad_input_leaves_state_untouched(bad, exc, match, no_kernels):
    g = _gen("bad-update")
    args = dict(x=torch.randn(2, 4, generator=g), conv_state=torch.randn(2, 4, 3, generator=g),
                weight=torch.randn(4, 4, generator=g), bias=torch.randn(4, generator=g), activation="silu")
    args.update(bad)
    before = args["conv_state"].clone()
    with pytest.raises(exc, match=match):
        fastlayers.causal_conv1d_update(**args)
    assert torch.equal(args["conv_state"], before), "conv_state was modified by a call that failed"


@pytest.mark.parametrize("bad,exc,match", [
    (dict(cache_seqlens=torch.zeros(2)), TypeError, "cache_seqlens must be int32"),
    (dict(cache_seqlens=torch.zeros(3, dtype=torch.int32)), ValueError, r"cache_seqlens must have shape \(2,\)"),
    (dict(cache_seqlens=torch.tensor([0, -1], dtype=torch.int32)), ValueError, "cache_seqlens must be >= 0"),
    (dict(conv_state_indices=torch.tensor([0, 1])), TypeError, "conv_state_indices must be int32"),
    (dict(conv_state_indices=torch.tensor([0, 3], dtype=torch.int32)), ValueError,
     r"conv_state_indices must be < conv_state.shape\[0\] = 3"),
    (dict(conv_state_indices=torch.tensor([1, 1], dtype=torch.int32)), ValueError, "must be distinct"),
    (dict(conv_state_indices=torch.tensor([[0, 1]], dtype=torch.int32)), ValueError,
     r"conv_state_indices must have shape \(2,\)"),
    (dict(conv_state_indices=None), ValueError, r"conv_state must have shape \(2, 4, state_len\)"),
])
def test_update_options_bad_input_leaves_state_untouched(bad, exc, match, no_kernels):
    """cache_seqlens / conv_state_indices checked (types, shapes and values) before the state is touched."""
    g = _gen("bad-update-options")
    args = dict(x=torch.randn(2, 4, generator=g), conv_state=torch.randn(3, 4, 3, generator=g),
                weight=torch.randn(4, 4, generator=g), bias=torch.randn(4, generator=g), activation="silu",
                cache_seqlens=torch.tensor([1, 5], dtype=torch.int32),
                conv_state_indices=torch.tensor([2, 0], dtype=torch.int32))
    args.update(bad)
    before = args["conv_state"].clone()
    with pytest.raises(exc, match=match):
        fastlayers.causal_conv1d_update(**args)
    assert torch.equal(args["conv_state"], before), "conv_state was modified by a call that failed"


# ----------------------------------------------------------------------------- packed sequences (seq_idx)
def _seq_idx(b, seqlen, g, pad=True):
    """(b, seqlen) int32 sequence ids: runs of random lengths, ids that skip values (zero-length sequences),
    and (pad) a run of -1 padding at the end of row 0 and in the middle of the last row."""
    rows = []
    for i in range(b):
        ids, cur = [], int(torch.randint(0, 3, (1,), generator=g))
        while len(ids) < seqlen:
            ids += [cur] * int(torch.randint(1, 7, (1,), generator=g))
            cur += int(torch.randint(1, 3, (1,), generator=g))  # a step of 2 skips an id: an empty sequence
        rows.append(ids[:seqlen])
    s = torch.tensor(rows, dtype=torch.int32)
    if pad and seqlen > 2:
        s[0, -2:] = -1
        s[-1, seqlen // 2] = -1
    return s


def _split_oracle(x, weight, bias, act, seq_idx):
    """The conv of each run of equal ids on its own (zeros before it), 0 at padding: packed sequences
    computed without masks, in fp64."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for bi in range(x.shape[0]):
        s = seq_idx[bi].tolist()
        t0 = 0
        while t0 < len(s):
            t1 = t0
            while t1 < len(s) and s[t1] == s[t0]:
                t1 += 1
            if s[t0] >= 0:
                seg = x[bi:bi + 1, :, t0:t1].double().cpu()
                out[bi, :, t0:t1] = reference.causal_conv1d(seg, _up(weight).cpu(), None if bias is None else
                                                            _up(bias).cpu(), act)[0]
            t0 = t1
    return out


@pytest.mark.parametrize("width", [2, 3, 4])
def test_seq_idx_reference_is_per_sequence_conv(width):
    """The reference's masks equal convolving each packed sequence on its own (increasing ids, gaps,
    padding)."""
    g = _gen("seq-ref", width)
    x = torch.randn(3, 5, 37, generator=g, dtype=torch.float64)
    weight, bias, _ = _params(3, 5, width, torch.float64, "cpu", g, init=False)
    seq = _seq_idx(3, 37, g)
    got = reference.causal_conv1d(x, weight, bias, "silu", seq_idx=seq)
    torch.testing.assert_close(got, _split_oracle(x, weight, bias, "silu", seq), rtol=1e-12, atol=1e-12)
    assert (got[0, :, -2:] == 0).all(), "padding outputs are 0"


def _seq_case(device, backend, dtype, seqlen, width):
    if not is_interpreted(device, backend):
        return True
    return (dtype == torch.bfloat16 and seqlen == 37) or (dtype == torch.float32 and width == 3)


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("seqlen", [1, 5, 37])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_seq_idx_forward(device, backend, dtype, seqlen, width, layout):
    if not _seq_case(device, backend, dtype, seqlen, width):
        pytest.skip("interpreter: a few shapes")
    d = 3 if is_interpreted(device, backend) else 123
    g = _gen("seq-fwd", dtype, seqlen, width, layout)
    x = _x(2, d, seqlen, dtype, device, g, layout, scale=2.0)
    weight, bias, _ = _params(2, d, width, dtype, device, g, init=False)
    seq = _seq_idx(2, seqlen, g).to(device)
    with fastlayers.use_backend(backend):
        out = fastlayers.causal_conv1d(x, weight, bias, "silu", seq_idx=seq)
    hi = reference.causal_conv1d(_up(x), _up(weight), _up(bias), "silu", seq_idx=seq)
    lo = reference.causal_conv1d(x, weight, bias, "silu", seq_idx=seq)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close_to_ref(out, hi, lo, "out")
    if seqlen > 2:
        assert (out[0, :, -2:] == 0).all(), "padding outputs must be 0"


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("variant", ["plain", "bias_silu"])
def test_seq_idx_forward_variants_and_strides(device, backend, variant):
    """No bias / no activation, a strided x (a slice of a wider channel-last buffer, as Mamba-2's xBC)."""
    g = _gen("seq-var", variant)
    d, seqlen, width = 6, 11, 4
    buf = torch.randn(2, seqlen, 2 * d + 3, generator=g).to(device)
    x = buf[:, :, 1:1 + d].transpose(1, 2)  # channel-last, batch and time strides of the wide buffer
    weight, bias, _ = _params(2, d, width, torch.float32, device, g, bias=variant != "plain", init=False)
    act = None if variant == "plain" else "silu"
    seq = _seq_idx(2, seqlen, g).to(device)
    with fastlayers.use_backend(backend):
        out = fastlayers.causal_conv1d(x, weight, bias, act, seq_idx=seq)
        out_t = fastlayers.causal_conv1d(x.contiguous(), weight, bias, act, seq_idx=seq)
    hi = reference.causal_conv1d(_up(x), _up(weight), _up(bias), act, seq_idx=seq)
    assert_close_to_ref(out, hi, reference.causal_conv1d(x, weight, bias, act, seq_idx=seq), "out")
    assert_close_to_ref(out_t, hi, reference.causal_conv1d(x, weight, bias, act, seq_idx=seq), "out (time)")


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_seq_idx_nan_stays_in_its_sequence(device, backend, layout):
    """A NaN input poisons the outputs of its own sequence within the window, never another sequence's
    and never padding (0); the gradients likewise."""
    g = _gen("seq-nan", layout)
    x = _x(1, 3, 12, torch.float32, device, g, layout)
    weight, bias, _ = _params(1, 3, 4, torch.float32, device, g, init=False)
    seq = torch.tensor([[0, 0, 0, 0, 1, 1, 1, -1, 3, 3, 3, 3]], dtype=torch.int32).to(device)
    x[0, 1, 3] = float("nan")   # last step of sequence 0: seq 1 right after must not see it
    x[0, 2, 7] = float("nan")   # a padding step: nobody sees it
    with fastlayers.use_backend(backend):
        out = fastlayers.causal_conv1d(x, weight, bias, "silu", seq_idx=seq)
    nan = torch.isnan(out.cpu())
    assert nan[0, 1, 3] and nan.sum() == 1, nan
    assert (out[0, :, 7] == 0).all()
    hi = reference.causal_conv1d(_up(x), _up(weight), _up(bias), "silu", seq_idx=seq)
    assert_close_to_ref(out, hi, reference.causal_conv1d(x, weight, bias, "silu", seq_idx=seq), "out")
    # dx: the NaN x only reaches dweight (through its own product); dx stays finite outside
    xl = x.detach().clone().requires_grad_()
    with fastlayers.use_backend(backend):
        o = fastlayers.causal_conv1d(xl, weight, bias, "silu", seq_idx=seq)
    o.backward(torch.ones_like(o).masked_fill(torch.isnan(o), 0.0))
    xr = _up(x).detach().clone().requires_grad_()
    orf = reference.causal_conv1d(xr, _up(weight), _up(bias), "silu", seq_idx=seq)
    orf.backward(torch.ones_like(orf).masked_fill(torch.isnan(orf), 0.0))
    assert torch.equal(torch.isnan(xl.grad.cpu()), torch.isnan(xr.grad.cpu()))


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_seq_idx_backward(device, backend, dtype, width, layout):
    interp = is_interpreted(device, backend)
    if interp and not (dtype == torch.bfloat16 or (dtype == torch.float32 and width == 4)):
        pytest.skip("interpreter: bf16, and fp32 at width 4")
    d, seqlen = (3, 37) if interp else (123, 37)
    g = _gen("seq-bwd", dtype, width, layout)
    x = _x(2, d, seqlen, dtype, device, g, layout)
    weight, bias, _ = _params(2, d, width, dtype, device, g, init=False)
    seq = _seq_idx(2, seqlen, g).to(device)
    dout = torch.randn(2, d, seqlen, generator=g).to(dtype).to(device)

    def grads(fn, x, weight, bias):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
        (fn(*leaves).double() * dout.double()).sum().backward()
        return [t.grad for t in leaves]

    def fast(x, w, b):
        with fastlayers.use_backend(backend):
            return fastlayers.causal_conv1d(x, w, b, "silu", seq_idx=seq)

    got = grads(fast, x, weight, bias)
    want = grads(lambda x, w, b: reference.causal_conv1d(x, w, b, "silu", seq_idx=seq), _up(x), _up(weight),
                 _up(bias))
    for name, a, w, t in zip(("dx", "dweight", "dbias"), got, want, (x, weight, bias)):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        assert_rel_err(a, w, REL_TOL[dtype], name)
    assert (got[0][0, :, -2:] == 0).all(), "no gradient reaches padding inputs"


@pytest.mark.parametrize("backend,layout,act", [("cpu", "time", "silu"), ("cpu", "channel_last", "silu"),
                                                 ("cpu", "time", None), ("reference", "channel_last", "silu")])
def test_seq_idx_gradcheck(backend, layout, act):
    g = _gen("seq-gradcheck", backend, layout, act)
    x = _x(2, 3, 9, torch.float64, "cpu", g, layout).requires_grad_()
    weight, bias, _ = _params(2, 3, 3, torch.float64, "cpu", g, init=False)
    weight.requires_grad_()
    bias.requires_grad_()
    seq = torch.tensor([[0, 0, 0, 1, 1, 3, 3, 3, 3], [5, -1, 6, 6, 6, 6, -1, -1, 7]], dtype=torch.int32)

    def f(x, weight, bias):
        with fastlayers.use_backend(backend):
            return fastlayers.causal_conv1d(x, weight, bias, act, seq_idx=seq)

    assert torch.autograd.gradcheck(f, (x, weight, bias))


# ----------------------------------------------------------------------------- varlen states
@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES + [pytest.param("cpu", "reference", id="reference")])
@pytest.mark.parametrize("state_len", [0, 1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_varlen_states(device, backend, dtype, state_len):
    """Against the final states of each sequence convolved on its own (zero-length and short sequences
    included), for a strided x."""
    g = _gen("varlen", dtype, state_len)
    lens = [5, 0, 1, 12, 2, 0]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    total, d = int(cu[-1]), 123
    buf = torch.randn(total, d + 7, generator=g).to(dtype).to(device)
    x = buf[:, 3:3 + d]
    with fastlayers.use_backend(backend):
        st = fastlayers.causal_conv1d_varlen_states(x, cu.to(device), state_len)
    assert st.shape == (len(lens), d, state_len) and st.dtype == dtype
    if state_len > 1:
        assert st.stride(1) == 1, "channel-last in memory, as causal-conv1d returns it"
    for i, n in enumerate(lens):
        seg = x[int(cu[i]):int(cu[i + 1])].t().cpu()          # (d, n)
        want = torch.cat([torch.zeros(d, state_len, dtype=dtype), seg], dim=1)[:, seg.shape[1]:]
        assert torch.equal(st[i].cpu(), want), i
    assert torch.equal(st.cpu(), reference.causal_conv1d_varlen_states(x.cpu(), cu, state_len))


def test_varlen_states_bad_input():
    x = torch.randn(6, 4)
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        fastlayers.causal_conv1d_varlen_states(x, torch.tensor([0, 6]), 3)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        fastlayers.causal_conv1d_varlen_states(x, torch.tensor([0, 4, 2], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        fastlayers.causal_conv1d_varlen_states(x, torch.tensor([0, 7], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="state_len must be an int"):
        fastlayers.causal_conv1d_varlen_states(x, torch.tensor([0, 6], dtype=torch.int32), -1)
    with pytest.raises(ValueError, match="x must be 2-D"):
        fastlayers.causal_conv1d_varlen_states(x[None], torch.tensor([0, 6], dtype=torch.int32), 3)


# ----------------------------------------------------------------------------- update: circular buffer, slots
def _update_case(device, backend, dtype):
    return not is_interpreted(device, backend) or dtype != torch.float16


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES + [pytest.param("cpu", "reference", id="reference")])
@pytest.mark.parametrize("state_len,seqlen", [(3, 1), (5, 2), (4, 7), (6, 6)])
@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_update_circular_equals_shift(device, backend, dtype, width, state_len, seqlen):
    """A circular buffer at offset p (cache_seqlens, any value, wrapped) holding the rotated shift-mode
    state gives the shift mode's outputs, and afterwards holds the shift mode's new state rotated by
    p + seqlen; cache_seqlens itself is not changed."""
    if state_len < width - 1:
        pytest.skip("state_len < width - 1")
    if not _update_case(device, backend, dtype):
        pytest.skip("interpreter: fp32 and bf16")
    g = _gen("circ", dtype, width, state_len, seqlen)
    b, d = 3, 123
    lin = torch.randn(b, d, state_len, generator=g).to(dtype).to(device)
    x = torch.randn(b, d, seqlen, generator=g).to(dtype).to(device)
    weight, bias, _ = _params(b, d, width, dtype, device, g, init=False)
    p = torch.tensor([0, 7, 2 * state_len + 1], dtype=torch.int32)
    idx = lambda k: (p[:, None].long() + k + torch.arange(state_len)[None, :]) % state_len  # noqa: E731
    circ = torch.empty_like(lin)
    for i in range(b):
        circ[i][:, idx(0)[i]] = lin[i]
    cache = p.to(device)
    lin_ref = lin.clone()
    want = reference.causal_conv1d_update(x, lin_ref, weight, bias, "silu")
    with fastlayers.use_backend(backend):
        out = fastlayers.causal_conv1d_update(x, circ, weight, bias, "silu", cache_seqlens=cache)
    hi = reference.causal_conv1d_update(_up(x), _up(lin), _up(weight), _up(bias), "silu")
    assert_close_to_ref(out, hi, want, "out")
    assert torch.equal(cache.cpu(), p), "cache_seqlens is not updated by the op"
    for i in range(b):
        assert torch.equal(circ[i][:, idx(seqlen)[i]].cpu(), lin_ref[i].cpu()), f"state of row {i}"


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES + [pytest.param("cpu", "reference", id="reference")])
@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("seqlen", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_update_state_indices(device, backend, dtype, seqlen, circular):
    """conv_state_indices: row b updates slot idx[b] exactly as a plain update of that slot would; padded rows
    (negative ids, as causal-conv1d) give 0 and touch nothing; unused slots are untouched."""
    g = _gen("slots", dtype, seqlen, circular)
    b, d, S, width, slots = 4, 123, 5, 4, 7
    pool = torch.randn(slots, d, S, generator=g).to(dtype).to(device)
    x = torch.randn(b, d, seqlen, generator=g).to(dtype).to(device)
    weight, bias, _ = _params(b, d, width, dtype, device, g, init=False)
    ids = torch.tensor([5, -1, 0, 2], dtype=torch.int32)
    cache = torch.tensor([3, 9, 0, 11], dtype=torch.int32) if circular else None
    before = pool.clone()
    with fastlayers.use_backend(backend):
        out = fastlayers.causal_conv1d_update(x, pool, weight, bias, "silu", cache_seqlens=None if cache is None
                                              else cache.to(device), conv_state_indices=ids.to(device))
    assert (out[1] == 0).all(), "a padded row's output is 0"
    for s in set(range(slots)) - {5, 0, 2}:
        assert torch.equal(pool[s], before[s]), f"slot {s} is not used and must not change"
    for r, s in ((0, 5), (2, 0), (3, 2)):
        st = before[s:s + 1].clone()
        lo = reference.causal_conv1d_update(x[r:r + 1], st, weight, bias, "silu",
                                            None if cache is None else cache[r:r + 1])
        hi = reference.causal_conv1d_update(_up(x[r:r + 1]), _up(before[s:s + 1]), _up(weight), _up(bias), "silu",
                                            None if cache is None else cache[r:r + 1])
        assert_close_to_ref(out[r:r + 1], hi, lo, f"row {r}")
        assert torch.equal(pool[s:s + 1].cpu(), st.cpu()), f"slot {s}"


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
def test_update_options_strided_and_nan(device, backend):
    """Strided x / out-of-order state strides, NaN in the history of one row stays in that row."""
    g = _gen("upd-strided")
    b, d, S, width = 3, 5, 4, 3
    pool = torch.randn(4, S, d, generator=g).to(device).transpose(1, 2)  # channel-last state
    xs = torch.randn(b, 2 * d, 2, generator=g).to(device)[:, ::2]        # a strided x
    weight, bias, _ = _params(b, d, width, torch.float32, device, g, init=False)
    pool[3, 1, 1] = float("nan")
    ids = torch.tensor([3, 0, 1], dtype=torch.int32).to(device)
    cache = torch.tensor([3, 1, 4], dtype=torch.int32).to(device)
    ref_pool = pool.clone()
    with fastlayers.use_backend(backend):
        out = fastlayers.causal_conv1d_update(xs, pool, weight, bias, None, cache_seqlens=cache,
                                              conv_state_indices=ids)
    lo = reference.causal_conv1d_update(xs, ref_pool, weight, bias, None, cache, ids)
    assert torch.equal(torch.isnan(out.cpu()), torch.isnan(lo.cpu()))
    assert torch.isnan(out[0, 1]).any() and not torch.isnan(out[1:]).any()
    torch.testing.assert_close(out, lo, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.equal(torch.nan_to_num(pool.cpu(), 7.0), torch.nan_to_num(ref_pool.cpu(), 7.0))


def test_options_opcheck_and_compile():
    """The custom ops with seq_idx / cache_seqlens / conv_state_indices pass opcheck, and torch.compile
    (fullgraph) of a packed-sequence prefill + a slotted circular decode step matches eager (cpu)."""
    g = _gen("opcheck-options")
    seq = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, 3, 3]], dtype=torch.int32)
    for layout in LAYOUTS:
        x = _x(2, 3, 6, torch.float32, "cpu", g, layout)
        weight, bias, _ = _params(2, 3, 4, torch.float32, "cpu", g, init=False)
        torch.library.opcheck(torch.ops.fastlayers.causal_conv1d_fwd,
                              (x, weight, bias, None, True, False, "cpu", seq))
        torch.library.opcheck(torch.ops.fastlayers.causal_conv1d_bwd,
                              (torch.randn(2, 3, 6, generator=g), None, x, weight, bias, None, True, "cpu", seq))
    pool = torch.randn(4, 3, 5, generator=g)
    cache = torch.tensor([7, 2], dtype=torch.int32)
    ids = torch.tensor([3, -1], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastlayers.causal_conv1d_update,
                          (torch.randn(2, 3, 2, generator=g), pool, weight, bias, True, "cpu", cache, ids))

    xbc = torch.randn(2, 6, 3, generator=g)
    step = torch.randn(2, 3, generator=g)

    def f(xbc, weight, bias, pool):
        y = fastlayers.causal_conv1d(xbc.transpose(1, 2), weight, bias, "silu", seq_idx=seq)
        z = fastlayers.causal_conv1d_update(step, pool, weight.detach(), bias.detach(), "silu",
                                            cache_seqlens=cache, conv_state_indices=ids)
        return (y * 2).square().sum(), z

    res = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (xbc, weight, bias)]
        p = pool.clone()
        with fastlayers.use_backend("cpu"):
            loss, z = fn(*leaves, p)
            loss.backward()
        res.append([loss.detach(), z, p] + [t.grad for t in leaves])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b)
