"""qkv_norm_rope and swiglu: every backend against the reference (DESIGN.md §4)."""
import pytest
import torch

import fastlayers
from fastlayers import reference

from conftest import TRITON_GPU_CASES, assert_close_to_ref, assert_rel_err, is_interpreted, seed_of

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def _gen(*key):
    return torch.Generator().manual_seed(seed_of(*key))


def _packed(b, t, hq, hkv, d, dtype, device, g, scale=1.0):
    """q, k, v as strided views into one fused projection output (no copies)."""
    qkv = (torch.randn(b, t, (hq + 2 * hkv) * d, generator=g) * scale).to(dtype).to(device)
    x = qkv.view(b, t, hq + 2 * hkv, d)
    return qkv, x[:, :, :hq], x[:, :, hq:hq + hkv], x[:, :, hq + hkv:]


def _weights(d, dtype, device, g, which="qkv"):
    return [(1 + 0.5 * torch.randn(d, generator=g)).to(dtype).to(device) if c in which else None for c in "qkv"]


def _up(t):
    return None if t is None else (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)


def _qkv_refs(q, k, v, ws, cos, sin, eps, offset):
    hi = reference.qkv_norm_rope(*(_up(t) for t in (q, k, v, *ws)), _up(cos), _up(sin), eps, offset)
    lo = reference.qkv_norm_rope(q, k, v, *ws, cos, sin, eps, offset)
    return hi, lo


QKV_SHAPES = [  # (B, T, Hq, Hkv, D): GQA ratios 1/2/4/8, head_dim 64/128/96 and small even sizes
    (2, 5, 4, 4, 64), (1, 7, 4, 2, 128), (2, 3, 8, 2, 96), (1, 4, 8, 1, 32), (3, 1, 2, 1, 2), (1, 3, 3, 3, 6),
]


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QKV_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_qkv_norm_rope_forward(device, backend, dtype, shape):
    b, t, hq, hkv, d = shape
    g = _gen("fwd", shape, str(dtype))
    _, q, k, v = _packed(b, t, hq, hkv, d, dtype, device, g, scale=3.0)
    ws = _weights(d, dtype, device, g)
    cos, sin = reference.rope_tables(d, 64, 10000.0, device)
    offset = torch.randint(0, 64 - t, (b,), generator=g).to(device)
    with fastlayers.use_backend(backend):
        out = fastlayers.qkv_norm_rope(q, k, v, *ws, cos, sin, 1e-5, offset)
    hi, lo = _qkv_refs(q, k, v, ws, cos, sin, 1e-5, offset)
    for name, o, h, l_, x in zip("qkv", out, hi, lo, (q, k, v)):
        assert o.shape == x.shape and o.dtype == dtype and o.is_contiguous(), name
        assert_close_to_ref(o, h, l_, name)


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("variant", ["qk_only", "rope_only", "norm_only", "int_offset", "hf_tables"])
def test_qkv_norm_rope_variants(device, backend, variant):
    """v_weight=None (QK-norm only; v passes through), no weights (RoPE only), no tables (norm only),
    an int position offset, and HF-style (S, D) tables."""
    b, t, hq, hkv, d = 2, 6, 4, 2, 16
    dtype = torch.bfloat16
    g = _gen("var", variant)
    _, q, k, v = _packed(b, t, hq, hkv, d, dtype, device, g, scale=2.0)
    ws = _weights(d, dtype, device, g, {"qk_only": "qk", "rope_only": ""}.get(variant, "qkv"))
    cos, sin = reference.rope_tables(d, 32, 10000.0, device)
    offset = 9 if variant == "int_offset" else 0
    if variant == "norm_only":
        cos = sin = None
    if variant == "hf_tables":
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    with fastlayers.use_backend(backend):
        out = fastlayers.qkv_norm_rope(q, k, v, *ws, cos, sin, 1e-5, offset)
    hi, lo = _qkv_refs(q, k, v, ws, cos, sin, 1e-5, offset)
    for name, o, h, l_ in zip("qkv", out, hi, lo):
        assert_close_to_ref(o, h, l_, name)
    if ws[2] is None:
        assert out[2] is v, "v must pass through untouched without v_weight"


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
def test_qkv_norm_rope_nan_and_large(device, backend):
    """NaN in one head gives NaN in that head only; fp16 values whose squares overflow stay finite."""
    b, t, hq, hkv, d = 1, 3, 2, 1, 32
    g = _gen("nan")
    _, q, k, v = _packed(b, t, hq, hkv, d, torch.float16, device, g)
    q.mul_(0).add_(300 * torch.randn(q.shape, generator=g).to(q))  # 300^2 * 32 overflows fp16
    k[0, 1, 0, 5] = float("nan")
    ws = _weights(d, torch.float16, device, g)
    cos, sin = reference.rope_tables(d, 8, 10000.0, device)
    with fastlayers.use_backend(backend):
        qo, ko, vo = fastlayers.qkv_norm_rope(q, k, v, *ws, cos, sin)
    hi, lo = _qkv_refs(q, k, v, ws, cos, sin, 1e-5, 0)
    assert torch.isfinite(qo).all()
    assert_close_to_ref(qo, hi[0], lo[0], "q")
    assert torch.isnan(ko[0, 1, 0]).all() and not torch.isnan(ko[0, 0]).any() and not torch.isnan(ko[0, 2]).any()


def _qkv_grads(fn, q, k, v, ws, dqo, dko, dvo):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    wl = [None if w is None else w.detach().clone().requires_grad_() for w in ws]
    outs = fn(*leaves, *wl)
    loss = sum((o.double() * d.double()).sum() for o, d in zip(outs, (dqo, dko, dvo)))
    loss.backward()
    return [t.grad for t in leaves] + [None if w is None else w.grad for w in wl]


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["qkv", "qk"])
def test_qkv_norm_rope_backward(device, backend, dtype, which):
    b, t, hq, hkv, d = 2, 5, 4, 2, 32
    g = _gen("bwd", str(dtype), which)
    _, q, k, v = _packed(b, t, hq, hkv, d, dtype, device, g, scale=2.0)
    ws = _weights(d, dtype, device, g, which)
    cos, sin = reference.rope_tables(d, 32, 10000.0, device)
    offset = torch.tensor([3, 11], device=device)
    dqo, dko, dvo = (torch.randn(x.shape, generator=g).to(dtype).to(device) for x in (q, k, v))

    def fast(*a):
        with fastlayers.use_backend(backend):
            return fastlayers.qkv_norm_rope(*a, cos, sin, 1e-5, offset)

    got = _qkv_grads(fast, q, k, v, ws, dqo, dko, dvo)
    want = _qkv_grads(lambda *a: reference.qkv_norm_rope(*a, cos.double(), sin.double(), 1e-5, offset),
                      *(x.double() for x in (q, k, v)), [_up(w) for w in ws], dqo, dko, dvo)
    for name, a, w in zip(("dq", "dk", "dv", "dq_weight", "dk_weight", "dv_weight"), got, want):
        if w is None:
            assert a is None, name
            continue
        assert a.dtype == dtype, name
        assert_rel_err(a, w, REL_TOL[dtype], name)


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("which", ["qkv", "qk"])
def test_qkv_norm_rope_packed_grad(device, backend, which):
    """The packed entry point writes one (B, T, (Hq + 2 Hkv) D) gradient; it equals the per-view one."""
    b, t, hq, hkv, d = 2, 4, 4, 1, 16
    g = _gen("packed", which)
    qkv, *_ = _packed(b, t, hq, hkv, d, torch.float32, device, g)
    ws = _weights(d, torch.float32, device, g, which)
    cos, sin = reference.rope_tables(d, 16, 10000.0, device)
    douts = [torch.randn(b, t, h, d, generator=g).to(device) for h in (hq, hkv, hkv)]

    def run(packed):
        x = qkv.clone().requires_grad_()
        wl = [None if w is None else w.clone().requires_grad_() for w in ws]
        with fastlayers.use_backend(backend):
            if packed:
                outs = fastlayers.qkv_norm_rope_packed(x, hq, hkv, *wl, cos, sin, 1e-5, 2)
            else:  # three separate tensors: the per-tensor path, whose gradients autograd sums into x
                xv = x.view(b, t, hq + 2 * hkv, d)
                outs = fastlayers.qkv_norm_rope(xv[:, :, :hq].clone(), xv[:, :, hq:hq + hkv].clone(),
                                                xv[:, :, hq + hkv:].clone(), *wl, cos, sin, 1e-5, 2)
        sum((o * dd).sum() for o, dd in zip(outs, douts)).backward()
        return [o.detach() for o in outs], [x.grad] + [None if w is None else w.grad for w in wl]

    (o1, g1), (o2, g2) = run(True), run(False)
    for a, b_ in zip(o1, o2):
        torch.testing.assert_close(a, b_, rtol=0, atol=0)
    for a, b_ in zip(g1, g2):
        if b_ is None:
            assert a is None
        else:
            assert_rel_err(a, b_, 1e-6, "packed grad")


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
def test_qkv_norm_rope_view_leaves_and_no_grad_views(device, backend):
    """Views are routed to the one-buffer gradient only when autograd tracks them to a base that needs it:
    views made leaves (requires_grad_) get their own gradients; views taken under no_grad send none back."""
    b, t, hq, hkv, d = 1, 3, 2, 1, 8
    g = _gen("leaves")
    ws = [w.requires_grad_() for w in _weights(d, torch.float32, device, g)]
    cos, sin = reference.rope_tables(d, 8, 100.0, device)
    qkv, q, k, v = _packed(b, t, hq, hkv, d, torch.float32, device, g)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    with fastlayers.use_backend(backend):
        outs = fastlayers.qkv_norm_rope(q, k, v, *ws, cos, sin)
    sum(o.sum() for o in outs).backward()
    refs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    sum(o.sum() for o in reference.qkv_norm_rope(*refs, *[w.detach() for w in ws], cos, sin)).backward()
    for a, r in zip((q, k, v), refs):
        assert a.grad is not None
        assert_rel_err(a.grad, r.grad, 1e-5, "leaf view grad")

    base = torch.randn(b, t, (hq + 2 * hkv) * d, generator=g).to(device).requires_grad_()
    with torch.no_grad():
        x = base.view(b, t, hq + 2 * hkv, d)
        q, k, v = x[:, :, :hq], x[:, :, hq:hq + hkv], x[:, :, hq + hkv:]
    with fastlayers.use_backend(backend):
        outs = fastlayers.qkv_norm_rope(q, k, v, *ws, cos, sin)
    sum(o.sum() for o in outs).backward()
    assert base.grad is None, "views taken under no_grad must not send a gradient to their base"


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
def test_qkv_norm_rope_strided_weights_and_odd_head_dim(device, backend):
    b, t, hq, hkv = 2, 3, 2, 1
    g = _gen("odd")
    _, q, k, v = _packed(b, t, hq, hkv, 8, torch.float32, device, g)
    ws = [torch.randn(16, generator=g).to(device)[::2] for _ in range(3)]  # non-contiguous gains
    cos, sin = reference.rope_tables(8, 8, 100.0, device)
    with fastlayers.use_backend(backend):
        out = fastlayers.qkv_norm_rope(q, k, v, *ws, cos, sin)
    hi, lo = _qkv_refs(q, k, v, ws, cos, sin, 1e-5, 0)
    for name, o, h, l_ in zip("qkv", out, hi, lo):
        assert_close_to_ref(o, h, l_, name)
    _, q, k, v = _packed(b, t, hq, hkv, 7, torch.float32, device, g)
    ws = _weights(7, torch.float32, device, g)
    with fastlayers.use_backend(backend):
        if backend == "triton":
            with pytest.raises(ValueError, match="even head_dim"):
                fastlayers.qkv_norm_rope(q, k, v, *ws, None, None)
            return
        out = fastlayers.qkv_norm_rope(q, k, v, *ws, None, None)  # norm only: any head_dim
    hi, lo = _qkv_refs(q, k, v, ws, None, None, 1e-5, 0)
    for name, o, h, l_ in zip("qkv", out, hi, lo):
        assert_close_to_ref(o, h, l_, name)


def test_qkv_norm_rope_compiled_offset_out_of_range():
    """Under torch.compile the wrapper cannot read tensor offsets: the custom op checks them."""
    g = _gen("compile-offset")
    _, q, k, v = _packed(2, 4, 2, 1, 8, torch.float32, "cpu", g)
    ws = _weights(8, torch.float32, "cpu", g)
    cos, sin = reference.rope_tables(8, 16, 100.0)

    def f(offset):
        return fastlayers.qkv_norm_rope(q, k, v, *ws, cos, sin, 1e-5, offset)[0]

    fc = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fc(torch.tensor([1, 12])), f(torch.tensor([1, 12])))
    with pytest.raises(Exception, match="positions offset"):
        fc(torch.tensor([1, 13]))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_qkv_norm_rope_gradcheck(backend):
    b, t, hq, hkv, d = 2, 3, 4, 2, 6
    g = _gen("gradcheck")
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d, generator=g, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    cos, sin = (x.double() for x in reference.rope_tables(d, 16, 100.0))
    offset = torch.tensor([1, 7])

    def f(qkv, *w):
        with fastlayers.use_backend(backend):
            return fastlayers.qkv_norm_rope_packed(qkv, hq, hkv, *w, cos, sin, 1e-5, offset)

    assert torch.autograd.gradcheck(f, (qkv, *ws))


def test_qkv_norm_rope_opcheck():
    g = _gen("opcheck")
    _, q, k, v = _packed(2, 3, 4, 2, 8, torch.float32, "cpu", g)
    q, k, v = (x.contiguous() for x in (q, k, v))
    ws = _weights(8, torch.float32, "cpu", g)
    cos, sin = reference.rope_tables(8, 8, 100.0)
    offs = torch.tensor([0, 2])
    args = (q, k, v, *ws, cos[:, :4].contiguous(), sin[:, :4].contiguous(), offs, 1e-5, "cpu")
    torch.library.opcheck(torch.ops.fastlayers.qkv_norm_rope_fwd, args)
    douts = tuple(torch.randn_like(x) for x in (q, k, v))
    torch.library.opcheck(torch.ops.fastlayers.qkv_norm_rope_bwd, (*douts, *args))


@pytest.mark.parametrize("bad,match", [
    (dict(k_heads=3), "multiple of the number of k/v heads"),
    (dict(d=7), "even head_dim"),
    (dict(offset=30), "do not fit"),
    (dict(offset=torch.tensor([0, 40])), "positions offset"),
    (dict(offset=1.5), "offset must be an int"),
    (dict(v_dtype=torch.float16), "one dtype"),
    (dict(weight_len=5), "q_weight must have shape"),
    (dict(no_sin=True), "both cos and sin"),
    (dict(v_3d=True), "must be 4-D"),
    (dict(eps=0.0), "eps must be a finite number"),
])
def test_qkv_norm_rope_bad_input(bad, match, monkeypatch):
    from fastlayers.backends import cpu as cpu_backend
    monkeypatch.setattr(cpu_backend, "head_norm_rope_fwd", lambda *a: pytest.fail("kernel ran on bad input"))
    d = bad.get("d", 8)
    q = torch.randn(2, 5, 4, d)
    k = torch.randn(2, 5, bad.get("k_heads", 2), d)
    v = torch.randn(k.shape, dtype=bad.get("v_dtype", torch.float32))
    if bad.get("v_3d"):
        v = v[:, :, 0]
    w = torch.ones(bad.get("weight_len", d))
    cos, sin = reference.rope_tables(d - d % 2, 32)
    with pytest.raises((ValueError, TypeError), match=match):
        fastlayers.qkv_norm_rope(q, k, v, w, torch.ones(d), None, cos, None if bad.get("no_sin") else sin,
                                 bad.get("eps", 1e-5), bad.get("offset", 0))


# ----------------------------------------------------------------------------- swiglu
@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 1), (2, 123), (4, 3000), (2, 3, 37)], ids=str)
@pytest.mark.parametrize("fused", [True, False])
def test_swiglu(device, backend, dtype, shape, fused):
    if is_interpreted(device, backend) and shape[-1] == 3000 and dtype != torch.bfloat16:
        pytest.skip("interpreter: one dtype of the largest shape is enough")
    g = _gen("swiglu", shape, str(dtype), fused)
    x = (4 * torch.randn(*shape[:-1], 2 * shape[-1], generator=g)).to(dtype).to(device)
    f = shape[-1]
    gate, up = x[..., :f], x[..., f:]
    dout = torch.randn(gate.shape, generator=g).to(dtype).to(device)
    leaves = [x.clone().requires_grad_()] if fused else [gate.clone().requires_grad_(), up.clone().requires_grad_()]
    with fastlayers.use_backend(backend):
        out = fastlayers.swiglu(*leaves)
    hi = reference.swiglu(gate.double(), up.double())
    assert out.dtype == dtype and out.shape == gate.shape
    assert_close_to_ref(out, hi, reference.swiglu(gate, up), "out")
    (out.double() * dout.double()).sum().backward()
    ref_leaves = [x.double().requires_grad_()] if fused else [gate.double().requires_grad_(),
                                                               up.double().requires_grad_()]
    (reference.swiglu(*ref_leaves) * dout.double()).sum().backward()
    for a, b_ in zip(leaves, ref_leaves):
        assert a.grad.dtype == dtype and a.grad.shape == a.shape
        assert_rel_err(a.grad, b_.grad, REL_TOL[dtype], "grad")


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
def test_swiglu_special_values(device, backend):
    """Large |gate| (exp overflow paths), inf and NaN follow the reference (NaN in, NaN out)."""
    gate = torch.tensor([[-200.0, -90.0, -20.0, 0.0, 20.0, 90.0, float("nan"), float("inf"), float("-inf")]])
    up = torch.tensor([[1.5, -2.0, 3.0, 4.0, 0.5, -1.0, 1.0, 2.0, 2.0]])
    with fastlayers.use_backend(backend):
        out = fastlayers.swiglu(gate.to(device), up.to(device)).cpu()
    want = reference.swiglu(gate.double(), up.double())
    assert torch.equal(torch.isnan(out), torch.isnan(want.float())), (out, want)
    ok = ~torch.isnan(want)
    torch.testing.assert_close(out[ok].double(), want[ok], rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_swiglu_gradcheck(backend):
    g = _gen("sw-gradcheck")
    x = torch.randn(3, 2, 10, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    with fastlayers.use_backend(backend):
        assert torch.autograd.gradcheck(lambda x: fastlayers.swiglu(x), (x,))
        assert torch.autograd.gradcheck(lambda a, b: fastlayers.swiglu(a, b), (a, b))


def test_swiglu_opcheck():
    g = _gen("sw-opcheck")
    gate, up, dout = (torch.randn(3, 7, generator=g) for _ in range(3))
    torch.library.opcheck(torch.ops.fastlayers.swiglu_fwd, (gate, up, "cpu"))
    torch.library.opcheck(torch.ops.fastlayers.swiglu_bwd, (dout, gate, up, "cpu"))


@pytest.mark.parametrize("args,match", [
    ((torch.randn(3, 5),), "even last dimension"),
    ((torch.randn(3, 4), torch.randn(3, 5)), "up must have shape"),
    ((torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64)), "one dtype"),
    ((torch.ones(3, 4, dtype=torch.int32),), "floating"),
])
def test_swiglu_bad_input(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastlayers.swiglu(*args)


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
def test_hybridnorm_ops_compile(device, backend):
    """torch.compile(fullgraph=True) of both ops, forward and backward, matches eager."""
    if is_interpreted(device, backend):
        pytest.skip("torch.compile of interpreted Triton kernels is not supported")
    g = _gen("compile")
    qkv, q, k, v = _packed(2, 4, 4, 2, 16, torch.float32, device, g)
    ws = _weights(16, torch.float32, device, g)
    cos, sin = reference.rope_tables(16, 16, 100.0, device)

    def f(qkv, w0, w1, w2):
        x = qkv.view(2, 4, 8, 16)
        qo, ko, vo = fastlayers.qkv_norm_rope(x[:, :, :4], x[:, :, 4:6], x[:, :, 6:], w0, w1, w2, cos, sin, 1e-5, 3)
        return (qo.sum(-1) * 2).sum() + (ko * 3).sum() + fastlayers.swiglu(vo).square().sum()

    res = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        leaves = [qkv.clone().requires_grad_()] + [w.clone().requires_grad_() for w in ws]
        with fastlayers.use_backend(backend):
            out = fn(*leaves)
            out.backward()
        res.append([out.detach()] + [t.grad for t in leaves])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b)
