"""HybridNorm modules: fast backends against the pure-PyTorch reference modules with one state_dict."""
import pytest
import torch

import fastlayers
from fastlayers import reference

from conftest import TRITON_GPU_CASES, is_interpreted, seed_of

NORMS = ("hybrid", "hybrid_star_first", "pre", "post")
LM_NORMS = ("hybrid", "hybrid_star", "pre", "post")


def _pair(fast_cls, ref_cls, *args, device="cpu", dtype=torch.float32, **kw):
    torch.manual_seed(seed_of(fast_cls.__name__, args, tuple(kw.items())))
    fast = fast_cls(*args, **kw).to(device=device, dtype=dtype)
    ref = ref_cls(*args, **kw).to(device=device, dtype=torch.float64)
    # Non-trivial gains, so that a norm applied to the wrong tensor shows.
    with torch.no_grad():
        for n, p in fast.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    missing = ref.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
    assert not missing.missing_keys and not missing.unexpected_keys
    return fast, ref


def _compare(fast, ref, inputs, backend, device, dtype, call=None):
    """Outputs and every parameter gradient of ``fast`` (under ``backend``) against ``ref`` in fp64."""
    call = call or (lambda m, x: m(x))
    x = inputs.to(device)
    xf = x.to(dtype).clone().requires_grad_() if x.is_floating_point() else x
    xr = x.double().clone().requires_grad_() if x.is_floating_point() else x
    with fastlayers.use_backend(backend):
        out = call(fast, xf)
    want = call(ref, xr)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    (out.double() * g).sum().backward()
    (want * g).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    rel = lambda a, b: float((a.detach().double() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))  # noqa: E731
    assert rel(out, want) < tol, f"output: relative error {rel(out, want):.3g}"
    if x.is_floating_point():
        assert rel(xf.grad, xr.grad) < tol, f"input grad: {rel(xf.grad, xr.grad):.3g}"
    ref_params = dict(ref.named_parameters())
    for n, p in fast.named_parameters():
        assert p.grad is not None, f"{n}: no gradient"
        assert rel(p.grad, ref_params[n].grad) < tol, f"{n}: relative error {rel(p.grad, ref_params[n].grad):.3g}"


def _small(device, backend):
    """Module sizes: tiny under the Triton interpreter (slow), modest elsewhere."""
    if is_interpreted(device, backend):
        return dict(dim=32, n_heads=4, n_kv_heads=2, head_dim=8, ffn=48, b=2, t=5)
    return dict(dim=96, n_heads=6, n_kv_heads=2, head_dim=16, ffn=160, b=2, t=13)


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("qkv_norm,pre_norm", [(True, False), (True, True), (False, True), (False, False)])
def test_attention(device, backend, qkv_norm, pre_norm):
    s = _small(device, backend)
    fast, ref = _pair(fastlayers.QKVNormAttention, reference.QKVNormAttention, s["dim"], s["n_heads"],
                      s["n_kv_heads"], s["head_dim"], qkv_norm=qkv_norm, pre_norm=pre_norm, max_seq_len=64,
                      device=device)
    _compare(fast, ref, torch.randn(s["b"], s["t"], s["dim"]), backend, device, torch.float32)


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("norm", ["hybrid", "pre", "post"])
def test_feed_forward(device, backend, norm):
    s = _small(device, backend)
    fast, ref = _pair(fastlayers.FeedForward, reference.FeedForward, s["dim"], s["ffn"], norm=norm, device=device)
    _compare(fast, ref, torch.randn(s["b"], s["t"], s["dim"]), backend, device, torch.float32)


def test_post_norm_ffn_is_hybrid_placement():
    m = fastlayers.PostNormFFN(64, 96)
    assert m.placement == "hybrid" and set(m.state_dict()) == {"norm.weight", "gate_up.weight", "down.weight"}
    x = torch.randn(2, 3, 64)
    z = fastlayers.rms_norm(x, m.norm.weight, 1e-5)
    want = z + m.down(fastlayers.swiglu(m.gate_up(z)))
    torch.testing.assert_close(m(x), want)


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("norm", NORMS)
def test_block(device, backend, norm):
    s = _small(device, backend)
    fast, ref = _pair(fastlayers.HybridNormBlock, reference.HybridNormBlock, s["dim"], s["n_heads"],
                      s["n_kv_heads"], s["ffn"], norm, s["head_dim"], max_seq_len=64, device=device)
    _compare(fast, ref, torch.randn(s["b"], s["t"], s["dim"]), backend, device, torch.float32)


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("norm", LM_NORMS)
def test_lm(device, backend, norm):
    s = _small(device, backend)
    fast, ref = _pair(fastlayers.HybridNormLM, reference.HybridNormLM, 61, s["dim"], 2, s["n_heads"],
                      s["n_kv_heads"], s["ffn"], norm, 64, False, s["head_dim"], device=device)
    tokens = torch.randint(0, 61, (s["b"], s["t"]), generator=torch.Generator().manual_seed(1))
    _compare(fast, ref, tokens, backend, device, torch.float32, call=lambda m, t: m(t)[0])


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
def test_block_bf16(device, backend):
    """bf16 parameters and activations (fp32 math inside the kernels) stay close to the fp64 reference."""
    s = _small(device, backend)
    fast, ref = _pair(fastlayers.HybridNormBlock, reference.HybridNormBlock, s["dim"], s["n_heads"],
                      s["n_kv_heads"], s["ffn"], "hybrid", s["head_dim"], max_seq_len=64, device=device,
                      dtype=torch.bfloat16)
    _compare(fast, ref, torch.randn(s["b"], s["t"], s["dim"]), backend, device, torch.bfloat16)


def test_lm_loss_and_labels():
    m = fastlayers.HybridNormLM(50, 32, 1, 4, max_seq_len=16)
    tok = torch.randint(0, 50, (2, 9))
    lab = torch.randint(0, 50, (2, 9))
    lab[0, :3] = -100
    logits, loss = m(tok, lab)
    assert logits.shape == (2, 9, 50)
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), lab.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, want)
    assert m(tok)[1] is None


@pytest.mark.parametrize("norm", LM_NORMS)
@pytest.mark.parametrize("cls", ["fast", "reference"])
def test_generate_matches_full_forward(norm, cls):
    """Greedy decoding with the KV cache gives the tokens and logits of re-running the whole sequence."""
    lm_cls = fastlayers.HybridNormLM if cls == "fast" else reference.HybridNormLM
    torch.manual_seed(3)
    m = lm_cls(67, 48, 2, 4, 2, 96, norm, max_seq_len=40)
    prompt = torch.randint(0, 67, (2, 6))
    out = m.generate(prompt, 9, temperature=0)
    assert out.shape == (2, 15) and torch.equal(out[:, :6], prompt)
    seq = prompt
    cache = m.new_cache(2, 15)
    step_logits, _ = m(prompt, cache=cache)
    for i in range(9):
        full, _ = m(seq)
        torch.testing.assert_close(step_logits[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
        nxt = full[:, -1].argmax(-1, keepdim=True)
        assert torch.equal(nxt, out[:, 6 + i:7 + i]), f"step {i}: cached decoding chose another token"
        seq = torch.cat([seq, nxt], 1)
        step_logits, _ = m(nxt, cache=cache)


def test_chunked_prefill_with_cache():
    """Several new tokens at once on top of a cache (bottom-right causal mask) == the full forward."""
    torch.manual_seed(4)
    m = fastlayers.HybridNormLM(40, 32, 2, 4, 1, 64, "hybrid", max_seq_len=32)
    tok = torch.randint(0, 40, (2, 12))
    full, _ = m(tok)
    cache = m.new_cache(2, 12)
    parts = [m(tok[:, a:b], cache=cache)[0] for a, b in ((0, 5), (5, 6), (6, 12))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_sampling_top_k():
    torch.manual_seed(5)
    m = fastlayers.HybridNormLM(30, 32, 1, 4, max_seq_len=20)
    g = torch.Generator().manual_seed(0)
    out = m.generate(torch.randint(0, 30, (3, 4)), 6, temperature=0.8, top_k=1, generator=g)
    greedy = m.generate(out[:, :4], 6, temperature=0)
    assert torch.equal(out, greedy), "top_k=1 sampling must be greedy"


def test_state_dict_round_trip():
    """One state_dict loads into both implementations, in both directions; RoPE tables are not saved."""
    fast = fastlayers.HybridNormLM(30, 32, 2, 4, 2, norm="hybrid_star", max_seq_len=16)
    ref = reference.HybridNormLM(30, 32, 2, 4, 2, norm="hybrid_star", max_seq_len=16)
    assert set(fast.state_dict()) == set(ref.state_dict())
    assert not any("rope" in k for k in fast.state_dict())
    ref.load_state_dict(fast.state_dict())
    fast2 = fastlayers.HybridNormLM(30, 32, 2, 4, 2, norm="hybrid_star", max_seq_len=16)
    fast2.load_state_dict(ref.state_dict())
    tok = torch.randint(0, 30, (1, 8))
    torch.testing.assert_close(fast2(tok)[0], fast(tok)[0])


def test_rope_tables_stay_fp32():
    m = fastlayers.QKVNormAttention(64, 4).to(torch.bfloat16)
    assert m.rope_cos.dtype == torch.float32 and m.qkv.weight.dtype == torch.bfloat16
    cos, _ = reference.rope_tables(16, m.max_seq_len, m.rope_theta)
    torch.testing.assert_close(m.rope_cos, cos, rtol=0, atol=0)


def test_meta_device_construction():
    """HybridNormLM(device="meta") -> to_empty -> reset_parameters gives real RoPE tables and weights."""
    m = fastlayers.HybridNormLM(30, 32, 2, 4, max_seq_len=16, device="meta")
    m = m.to_empty(device="cpu")
    m.reset_parameters()
    cos, sin = reference.rope_tables(8, 16, 500000.0)
    for blk in m.blocks:
        torch.testing.assert_close(blk.attn.rope_cos, cos, rtol=0, atol=0)
        torch.testing.assert_close(blk.attn.rope_sin, sin, rtol=0, atol=0)
    assert torch.isfinite(m(torch.randint(0, 30, (1, 5)))[0]).all()


def test_initialisation():
    """Truncated normal (±3σ), σ = sqrt(2 / (5 dim)); W_o and W_down scaled by 1/sqrt(2 n_layers); gains 1."""
    dim, n_layers = 256, 8
    torch.manual_seed(0)
    m = fastlayers.HybridNormLM(512, dim, n_layers, 8, 2, 512, max_seq_len=16, tie_embeddings=False)
    std = (2 / (5 * dim)) ** 0.5
    for name, p in m.named_parameters():
        if p.dim() == 1:
            assert torch.all(p == 1), name
            continue
        s = std / (2 * n_layers) ** 0.5 if name.endswith(("o.weight", "down.weight")) else std
        assert abs(float(p.detach().std()) / s - 1) < 0.05, f"{name}: std {float(p.detach().std()):.4g}, expected ~{s:.4g}"
        assert float(p.abs().max()) <= 3 * s + 1e-7, f"{name}: values beyond 3 sigma"


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_heads=6, n_kv_heads=4), "divisible by n_kv_heads"),
    (dict(head_dim=7), "even head_dim"),
    (dict(norm="sandwich"), "unknown norm placement"),
    (dict(n_heads=0), "n_heads must be a positive int"),
])
def test_bad_config(kwargs, match):
    args = dict(dim=48, n_heads=4, n_kv_heads=None, ffn_hidden=64, norm="hybrid")
    args.update(kwargs)
    if "head_dim" in kwargs:
        del args["head_dim"]
        with pytest.raises(ValueError, match=match):
            fastlayers.QKVNormAttention(48, 4, head_dim=kwargs["head_dim"])
        return
    with pytest.raises(ValueError, match=match):
        fastlayers.HybridNormBlock(**args)
    with pytest.raises(ValueError, match=match):
        reference.HybridNormBlock(**args)


def test_bad_lm_config_and_input():
    with pytest.raises(ValueError, match="unknown norm placement"):
        fastlayers.HybridNormLM(10, 32, 1, 4, norm="hybrid_star_first")
    m = fastlayers.HybridNormLM(10, 32, 1, 4, max_seq_len=8)
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        m(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        m(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=10\); got 10 at \(0, 3\)"):
        m(torch.tensor([[0, 1, 9, 10]]))
    with pytest.raises(ValueError, match="got -2"):
        m.generate(torch.tensor([[3, -2]]), 2)
    with pytest.raises(ValueError, match="token ids must lie"):
        fastlayers.reference.HybridNormLM(10, 32, 1, 4, max_seq_len=8)(torch.tensor([[10]]))
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        m.generate(torch.zeros(1, 4, dtype=torch.long), 5)


def test_compile_training_step_matches_eager():
    """torch.compile(fullgraph=True) of HybridNormLM: forward + backward of a training step == eager."""
    torch.manual_seed(6)
    m = fastlayers.HybridNormLM(37, 32, 2, 4, 2, 64, "hybrid_star", max_seq_len=16)
    tok = torch.randint(0, 37, (2, 10))
    lab = torch.randint(0, 37, (2, 10))

    def step(model):
        m.zero_grad(set_to_none=True)
        _, loss = model(tok, lab)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    loss_e, grads_e = step(m)
    compiled = torch.compile(m, fullgraph=True)
    loss_c, grads_c = step(compiled)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-4, atol=1e-6, msg=n)
