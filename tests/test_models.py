"""fastlayers.models: ZebraLM (MLA + Mamba-2 hybrid), presets, kv_cache_report."""
import pytest
import torch

import fastlayers
from fastlayers import models

from conftest import TRITON_GPU_CASES, seed_of

try:
    from fastlayers.mamba import Mamba2  # noqa: F401
    HAVE_MAMBA = True
except ImportError:
    HAVE_MAMBA = False
needs_mamba = pytest.mark.skipif(not HAVE_MAMBA, reason="fastlayers.mamba (Mamba2) is not in this tree")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: see tests/conftest.py

# dim 32 = 4 heads x 8; MLA at layers 0 and 2 of 4 (mixed), or every layer (MLA-only).
TINY = dict(vocab_size=61, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, mla_layers=[0, 2],
            kv_lora_rank=12, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, ffn_hidden=40,
            max_seq_len=32)
LAYOUTS = {"mixed": dict(mla_layers=[0, 2]),
           "mla-only": dict(mla_layers=[0, 1, 2, 3], q_lora_rank=20, tie_embeddings=False)}


def _layout(name):
    if name == "mixed" and not HAVE_MAMBA:
        pytest.skip("fastlayers.mamba (Mamba2) is not in this tree")
    return dict(TINY, **LAYOUTS[name])


def _model(name, seed_key, **kw):
    torch.manual_seed(seed_of("models", name, seed_key))
    m = models.ZebraLM(**dict(_layout(name), **kw))
    with torch.no_grad():  # non-trivial gains (ones hide a wrong norm weight)
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_backward(layout):
    m = _model(layout, "fb")
    toks = torch.randint(0, 61, (2, 7))
    labels = torch.randint(0, 61, (2, 7))
    labels[0, :3] = -100
    logits, loss = m(toks, labels=labels)
    assert logits.shape == (2, 7, 61) and torch.isfinite(logits).all()
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 61), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, want)
    loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n
    kinds = [b.kind for b in m.blocks]
    assert kinds == ["mla" if i in m.mla_layers else "mamba" for i in range(4)]


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES + [pytest.param("cpu", "reference", id="cpu-reference-backend")])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fast_matches_reference_model(device, backend, layout):
    """Logits and every parameter's gradient of the fast model (on each backend; and the fast model's code
    under use_backend("reference")) against the independent reference model with the same weights."""
    m = _model(layout, "ref").to(device)
    r = m.reference_copy()
    assert r.reference and all(b.ffn.__class__.__module__ == "fastlayers.reference" for b in r.blocks)
    b, t = (1, 5) if backend == "triton" else (2, 9)
    toks = torch.randint(0, 61, (b, t), device=device)
    labels = torch.randint(0, 61, (b, t), device=device)
    with fastlayers.use_backend(backend):
        logits, loss = m(toks, labels=labels)
        loss.backward()
    want, want_loss = r(toks, labels=labels)
    want_loss.backward()
    torch.testing.assert_close(logits, want, rtol=1e-4, atol=2e-5)
    rp = dict(r.named_parameters())
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, rp[n].grad, rtol=1e-3, atol=2e-5, msg=n)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_decoding_equals_recomputation(layout):
    """Prefill + one-token steps through the caches give the logits of full forwards (fp32), and generate
    (greedy) picks the tokens a cache-free greedy loop picks."""
    m = _model(layout, "gen").eval()
    prompt = torch.randint(0, 61, (3, 5))
    with torch.no_grad():
        seq = torch.cat([prompt, torch.randint(0, 61, (3, 6))], dim=1)
        full, _ = m(seq)
        cache = m.new_cache(3, 16)
        parts = [m(seq[:, :5], cache=cache)[0]] + [m(seq[:, i:i + 1], cache=cache)[0] for i in range(5, 11)]
        assert cache.length == 11
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=2e-5)
        out = m.generate(prompt, 6, temperature=0)
        want = prompt
        for _ in range(6):
            want = torch.cat([want, m(want)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, want)
    g = torch.Generator().manual_seed(1)
    sampled = m.generate(prompt, 4, temperature=0.8, top_k=5, generator=g)
    assert sampled.shape == (3, 9) and torch.equal(sampled[:, :5], prompt)


def test_nan_in_embedding_propagates():
    m = _model("mla-only", "nan")
    with torch.no_grad():
        m.embed.weight[7] = float("nan")
        logits, _ = m(torch.tensor([[1, 7, 2]]))
    assert torch.isnan(logits[0, 1:]).all()  # (position 0 too, through SDPA's additive mask: not asserted)


# ----------------------------------------------------------------------------- presets
BIG = ["zebra-1b", "zebra-1b-4mla", "zebra-1b-6mla", "zebra-1b-8mla", "zebra-3b", "zebra-3b-6mla", "zebra-3b-8mla",
       "zebra-3b-14mla", "zebra-8b", "zebra-8b-8mla", "zebra-8b-16mla"]


def _llama_params(c):
    """A Llama with the preset's shapes (GQA attention instead of MLA / Mamba2)."""
    d, hd = c["dim"], c["head_dim"]
    attn = d * c["n_heads"] * hd * 2 + 2 * d * c["n_kv_heads"] * hd
    layer = attn + 3 * d * c["ffn_hidden"] + 2 * d
    emb = c["vocab_size"] * d * (1 if c["tie_embeddings"] else 2)
    return c["n_layers"] * layer + emb + d


def _zebra_params(c):
    """Parameter count of a Zebra preset, written out from the layer definitions."""
    d, H, G, hd = c["dim"], c["n_heads"], c["n_kv_heads"], c["head_dim"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    q = d * H * qk if c["q_lora_rank"] is None else (d + H * qk) * c["q_lora_rank"]
    mla = (q + d * (c["kv_lora_rank"] + c["qk_rope_head_dim"])
           + c["kv_lora_rank"] * G * (c["qk_nope_head_dim"] + c["v_head_dim"]) + H * c["v_head_dim"] * d)
    d_inner, conv = H * hd, 2 * G * hd + H * hd           # expand 1; conv over [x (d_xb), B (d_xb), C]
    mamba = d * (d_inner + conv + H) + conv * (4 + 1) + 3 * H + d_inner + d_inner * d
    n_mla = len(c["mla_layers"])
    return (c["n_layers"] * (3 * d * c["ffn_hidden"] + 2 * d) + n_mla * mla + (c["n_layers"] - n_mla) * mamba
            + c["vocab_size"] * d * (1 if c["tie_embeddings"] else 2) + d)


@needs_mamba
def test_presets_on_meta_have_the_published_sizes():
    """The big presets build on the meta device (no memory) with the parameter count written out from the
    layer shapes. The paper gives no parameter counts; against the Llama bases (Meta: 1.24B, 3.21B, 8.03B)
    a Zebra model is 2-6% bigger: its Mamba-2 layer is an attention layer plus the gate projection z
    (dim x dim), and MLA is a little smaller than GQA attention."""
    assert _llama_params(models.PRESETS["zebra-1b"]) == 1_235_814_400       # Llama-3.2-1B's exact count
    assert _llama_params(models.PRESETS["zebra-3b"]) == 3_212_749_824       # Llama-3.2-3B
    assert _llama_params(models.PRESETS["zebra-8b"]) == 8_030_261_248       # Llama-3.1-8B
    for name in ("zebra-1b", "zebra-3b-14mla", "zebra-8b"):
        m = models.build(name, device="meta")
        assert all(p.is_meta for p in m.parameters())
        assert models.count_parameters(m) == _zebra_params(models.PRESETS[name]), name
    for name in BIG:
        ratio = _zebra_params(models.PRESETS[name]) / _llama_params(models.PRESETS[name])
        assert 1.01 < ratio < 1.06, (name, ratio)
    assert _zebra_params(models.PRESETS["zebra-1b"]) == 1_285_700_736
    hn = models.build("hybridnorm-1.2b", device="meta")
    assert abs(models.count_parameters(hn) / 1.2e9 - 1) < 0.03


def test_small_presets_sizes_and_training_step():
    sizes = {"zebra-tiny": (1e6, 2e6), "hybridnorm-tiny": (1e6, 2e6), "zebra-small": (10e6, 20e6),
             "hybridnorm-small": (10e6, 20e6)}
    for name, (lo, hi) in sizes.items():
        if name.startswith("zebra") and not HAVE_MAMBA:
            continue
        n = models.count_parameters(models.build(name, device="meta"))
        assert lo <= n <= hi, (name, n)
    torch.manual_seed(seed_of("tiny-train"))
    m = models.build("hybridnorm-tiny") if not HAVE_MAMBA else models.build("zebra-tiny")
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    toks = torch.randint(0, 256, (2, 17))
    losses = []
    for _ in range(6):
        _, loss = m(toks[:, :-1], labels=toks[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses          # memorises one batch


def test_build_overrides_and_errors():
    m = models.build("zebra-tiny", mla_layers=list(range(6)), vocab_size=100)
    assert isinstance(m, models.ZebraLM) and m.vocab_size == 100
    assert isinstance(models.build("hybridnorm-tiny"), models.HybridNormLM)
    assert models.HybridNormLM is fastlayers.HybridNormLM
    with pytest.raises(ValueError, match="unknown preset"):
        models.build("zebra-70b")


# ----------------------------------------------------------------------------- kv_cache_report
@pytest.mark.parametrize("name,fraction,elements", [("zebra-1b-4mla", 0.039, 640), ("zebra-3b-6mla", 0.02, 1152),
                                                    ("zebra-8b-8mla", 0.0273, 1792)])
def test_kv_cache_report_matches_the_paper(name, fraction, elements):
    """Zebra-Llama reports 3.9% (1B), 2% (3B) and 2.73% (8B) of the base Llama's KV cache."""
    if not HAVE_MAMBA:
        pytest.skip("fastlayers.mamba (Mamba2) is not in this tree")
    m = models.build(name, device="meta", dtype=torch.bfloat16)
    r = models.kv_cache_report(m, seq_len=4096, batch=8)
    c = models.PRESETS[name]
    base = 2 * c["n_layers"] * c["n_kv_heads"] * c["head_dim"]
    assert r["per_kind"]["mla"]["elements_per_token"] == elements
    assert r["per_kind"]["mla"]["bytes_per_token"] == 2 * elements
    assert r["baseline"]["elements_per_token"] == base and r["baseline"]["bytes_per_token"] == 2 * base
    assert r["ratio_per_token"] == elements / base
    assert round(r["ratio_per_token"], len(str(fraction)) - 2) == fraction
    assert r["per_kind"]["mla"]["total_bytes"] == 2 * elements * 4096 * 8
    mamba = r["per_kind"]["mamba"]
    assert mamba["layers"] == c["n_layers"] - len(c["mla_layers"])
    per_seq = sum(b.mixer.new_cache(1, device="meta").state_bytes() for b in m.blocks if b.kind == "mamba")
    assert mamba["bytes_per_sequence"] == per_seq > 0 and mamba["total_bytes"] == 8 * per_seq
    assert r["total_bytes"] == r["per_kind"]["mla"]["total_bytes"] + mamba["total_bytes"]
    assert r["ratio_total"] == r["total_bytes"] / r["baseline"]["total_bytes"]
    text = str(r)
    assert "mla" in text and "llama GQA base" in text and f"{elements / base:.2%}" in text


def test_kv_cache_report_mla_only_and_hybridnorm():
    m = models.build("zebra-1b", device="meta", mla_layers=list(range(16)))
    r = models.kv_cache_report(m, 100, 2, dtype=torch.float32)
    assert r["per_kind"].keys() == {"mla"} and r["bytes_per_token"] == 16 * 160 * 4
    assert r["ratio_per_token"] == r["ratio_total"] == 16 * 160 / 16384
    h = models.build("hybridnorm-1.2b", device="meta", dtype=torch.bfloat16)
    rh = models.kv_cache_report(h, 10, 1)
    assert rh["ratio_per_token"] == 1.0 and rh["bytes_per_token"] == 2 * 16 * 8 * 64 * 2
    with pytest.raises(ValueError, match="seq_len"):
        models.kv_cache_report(m, 0, 1)
    with pytest.raises(TypeError, match="ZebraLM or HybridNormLM"):
        models.kv_cache_report(torch.nn.Linear(2, 2), 1, 1)


# ----------------------------------------------------------------------------- bad configurations
@pytest.mark.parametrize("change,match", [
    (dict(mla_layers=[0, 4]), r"mla_layers \[4\] out of range"),
    (dict(mla_layers=[-1]), r"mla_layers \[-1\] out of range"),
    (dict(mla_layers=[1, 1]), "twice"),
    (dict(mla_layers=[0.5]), "mla_layers must be"),
    (dict(mla_layers=3), "mla_layers must be"),
    (dict(head_dim=16), r"n_heads \* head_dim"),
    (dict(n_kv_heads=3), "divisible by n_kv_heads"),
    (dict(qk_rope_head_dim=3), "qk_rope_head_dim"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(vocab_size=True), "vocab_size"),
])
def test_bad_configs_raise(change, match):
    with pytest.raises(ValueError, match=match):
        models.ZebraLM(**dict(dict(TINY, mla_layers=[0, 1, 2, 3]), **change))


def test_bad_inputs_raise():
    m = _model("mla-only", "bad")
    with pytest.raises(ValueError, match="tokens must be an integer"):
        m(torch.randn(2, 3))
    with pytest.raises(ValueError, match="labels must have the shape"):
        m(torch.zeros(2, 3, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 33, dtype=torch.long))
    bad = torch.zeros(2, 3, dtype=torch.long)
    bad[1, 2] = m.vocab_size
    with pytest.raises(ValueError, match=rf"token ids must lie in \[0, vocab_size={m.vocab_size}\); got {m.vocab_size} at \(1, 2\)"):
        m(bad)
    with pytest.raises(ValueError, match=r"got -1 at \(0, 0\)"):
        m.generate(torch.full((1, 2), -1, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="token ids must lie"):
        m.reference_copy()(bad)
    cache = m.new_cache(2, 8)
    with pytest.raises(ValueError, match="made for 2"):
        m(torch.zeros(3, 2, dtype=torch.long), cache=cache)
    with torch.no_grad():
        m(torch.zeros(2, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len 8"):
        m(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len 40 exceeds"):
        m.new_cache(1, 40)
