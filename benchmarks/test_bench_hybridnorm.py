"""HybridNorm: qkv_norm_rope, swiglu and the whole block against torch eager and torch.compile.

Providers:
  ``cpu``/``triton``   fastlayers (the backend named; on a GPU ``triton``)
  ``eager``            the composition a user writes: ``F.rms_norm`` per head on q, k and v, then
                       rotate-half RoPE on q and k (``silu(gate) * up`` for swiglu)
  ``compile``          ``torch.compile`` of that composition
Block providers: ``fastlayers`` (HybridNormBlock), ``reference`` (fastlayers.reference.HybridNormBlock,
eager, same state_dict) and ``reference-compile`` (torch.compile of it).

Bytes: qkv_norm_rope forward reads q, k, v and writes the three outputs; forward+backward
adds reading the three output grads and q, k, v again and writing dq, dk, dv. swiglu forward
reads gate and up and writes out; backward reads dout, gate, up and writes dgate, dup.
The block reports tokens/s (forward + backward) instead of GB/s.
"""
import pytest
import torch
import torch.nn.functional as F

import fastlayers
from fastlayers import reference

from conftest import DEVICE, SMOKE, run

FAST = "cpu" if DEVICE == "cpu" else "triton"
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.bfloat16, torch.float32]
# (B, T, Hq, Hkv, D): the target shape is B*T = 8192, 32 x 128 heads, 8 KV heads.
QKV_SHAPES = [(1, 16, 4, 2, 32)] if SMOKE else [(4, 2048, 32, 8, 128), (8, 1024, 32, 8, 64)]
SWIGLU_SHAPES = [(16, 64)] if SMOKE else [(8192, 2816), (4096, 11008)]
# The block shape: dim 1024, 16 heads, 4 KV heads, ffn 2816, 4 x 512 tokens.
BLOCK = (dict(dim=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, b=2, t=16) if SMOKE else
         dict(dim=1024, n_heads=16, n_kv_heads=4, ffn_hidden=2816, b=4, t=512))


def eager_qkv_norm_rope(q, k, v, qw, kw, vw, cos, sin, eps=1e-5):
    d = q.shape[-1]
    t = q.shape[1]
    c, s = cos[:t, None, :], sin[:t, None, :]

    def rope(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)

    qn, kn, vn = (F.rms_norm(x, (d,), w, eps) for x, w in ((q, qw), (k, kw), (v, vw)))
    return rope(qn), rope(kn), vn


_compiled = {}


def _qkv_fn(provider):
    if provider == FAST:
        def f(q, k, v, qw, kw, vw, cos, sin):
            with fastlayers.use_backend(provider):
                return fastlayers.qkv_norm_rope(q, k, v, qw, kw, vw, cos, sin)
        return f
    if provider == "eager":
        return eager_qkv_norm_rope
    if "qkv" not in _compiled:
        _compiled["qkv"] = torch.compile(eager_qkv_norm_rope, dynamic=False)
    return _compiled["qkv"]


def _qkv_inputs(b, t, hq, hkv, d, dtype, grad):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d, generator=g, device=DEVICE, dtype=dtype)
    x = qkv.view(b, t, hq + 2 * hkv, d)
    q, k, v = x[:, :, :hq], x[:, :, hq:hq + hkv], x[:, :, hq + hkv:]
    ws = [torch.rand(d, generator=g, device=DEVICE, dtype=dtype) + 0.5 for _ in range(3)]
    cos, sin = reference.rope_tables(d, t, 500000.0, DEVICE)
    if grad:
        qkv.requires_grad_()
        for w in ws:
            w.requires_grad_()
        x = qkv.view(b, t, hq + 2 * hkv, d)
        q, k, v = x[:, :, :hq], x[:, :, hq:hq + hkv], x[:, :, hq + hkv:]
    return qkv, (q, k, v, *ws, cos, sin)


@pytest.mark.parametrize("provider", [FAST, "eager", "compile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", QKV_SHAPES, ids=lambda s: "B{}xT{}xH{}/{}xD{}".format(*s))
def test_qkv_norm_rope_forward(benchmark, copy_gbps, shape, dtype, provider):
    b, t, hq, hkv, d = shape
    _, args = _qkv_inputs(b, t, hq, hkv, d, dtype, grad=False)
    nbytes = 2 * b * t * (hq + 2 * hkv) * d * args[0].element_size()
    fn = _qkv_fn(provider)
    with torch.no_grad():
        run(benchmark, lambda: fn(*args), nbytes, copy_gbps, op="qkv_norm_rope", pass_="forward",
            shape=list(shape), dtype=str(dtype), provider=provider)


@pytest.mark.parametrize("provider", [FAST, "eager", "compile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", QKV_SHAPES[:1], ids=lambda s: "B{}xT{}xH{}/{}xD{}".format(*s))
def test_qkv_norm_rope_forward_backward(benchmark, copy_gbps, shape, dtype, provider):
    b, t, hq, hkv, d = shape
    qkv, args = _qkv_inputs(b, t, hq, hkv, d, dtype, grad=True)
    fn = _qkv_fn(provider)
    grads = [torch.randn(x.shape, device=DEVICE, dtype=dtype) for x in args[:3]]

    def step():
        qkv.grad = None
        for w in args[3:6]:
            w.grad = None
        torch.autograd.backward(fn(*args), grads)

    nbytes = 5 * b * t * (hq + 2 * hkv) * d * qkv.element_size()
    run(benchmark, step, nbytes, copy_gbps, op="qkv_norm_rope", pass_="forward+backward", shape=list(shape),
        dtype=str(dtype), provider=provider)


def _eager_swiglu(x):
    f = x.shape[-1] // 2
    return F.silu(x[..., :f]) * x[..., f:]


def _swiglu_fn(provider):
    if provider == FAST:
        def f(x):
            with fastlayers.use_backend(provider):
                return fastlayers.swiglu(x)
        return f
    if provider == "eager":
        return _eager_swiglu
    if "swiglu" not in _compiled:
        _compiled["swiglu"] = torch.compile(_eager_swiglu, dynamic=False)
    return _compiled["swiglu"]


@pytest.mark.parametrize("provider", [FAST, "eager", "compile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("tokens,hidden", SWIGLU_SHAPES, ids=[f"{t}x{h}" for t, h in SWIGLU_SHAPES])
def test_swiglu(benchmark, copy_gbps, tokens, hidden, backward, dtype, provider):
    x = torch.randn(tokens, 2 * hidden, device=DEVICE, dtype=dtype, requires_grad=backward)
    dout = torch.randn(tokens, hidden, device=DEVICE, dtype=dtype)
    fn = _swiglu_fn(provider)
    per = tokens * hidden * x.element_size()
    if backward:
        def step():
            x.grad = None
            fn(x).backward(dout)
        run(benchmark, step, 3 * per + 5 * per, copy_gbps, op="swiglu", pass_="forward+backward",
            shape=[tokens, hidden], dtype=str(dtype), provider=provider)
    else:
        with torch.no_grad():
            run(benchmark, lambda: fn(x), 3 * per, copy_gbps, op="swiglu", pass_="forward",
                shape=[tokens, hidden], dtype=str(dtype), provider=provider)


@pytest.mark.parametrize("provider", ["fastlayers", "reference", "reference-compile"])
@pytest.mark.parametrize("norm", ["hybrid"] if not SMOKE else ["hybrid", "post"])
def test_block_forward_backward(benchmark, copy_gbps, norm, provider):
    """HybridNormBlock forward + backward, tokens/s (fp32 on CPU, bf16 on a GPU)."""
    c = BLOCK
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    args = (c["dim"], c["n_heads"], c["n_kv_heads"], c["ffn_hidden"], norm)
    fast = fastlayers.HybridNormBlock(*args, max_seq_len=c["t"]).to(DEVICE, dtype)
    if provider == "fastlayers":
        m = fast
    else:
        m = reference.HybridNormBlock(*args, max_seq_len=c["t"]).to(DEVICE, dtype)
        m.load_state_dict(fast.state_dict())
        if provider == "reference-compile":
            m = torch.compile(m, dynamic=False)
    x = torch.randn(c["b"], c["t"], c["dim"], device=DEVICE, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        x.grad = None
        for p in m.parameters():
            p.grad = None
        m(x).backward(dy)

    tokens = c["b"] * c["t"]
    run(benchmark, step, 0, copy_gbps, op="HybridNormBlock", pass_="forward+backward", norm=norm,
        shape=[c["b"], c["t"], c["dim"]], dtype=str(dtype), provider=provider, tokens=tokens)
    if benchmark.stats is not None:
        benchmark.extra_info["tokens_per_s"] = round(tokens / benchmark.stats.stats.median, 1)
        benchmark.extra_info.pop("gbps", None)
        benchmark.extra_info.pop("fraction_of_copy", None)
