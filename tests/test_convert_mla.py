"""attention_to_mla: the SVD initialisation reproduces a (partial-RoPE) Llama GQA attention at full rank, and
its error falls as the latent rank grows."""
import pytest
import torch

import fastlayers
from fastlayers import reference
from fastlayers.convert import attention_to_mla, mla_rope_channels

from conftest import seed_of


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: see tests/conftest.py


def llama_attention(x, w_q, w_k, w_v, w_o, n_heads, n_kv_heads, theta, rotated_pairs):
    """Plain-torch causal GQA attention, Llama/HF layout: RoPE rotate-half (channel i with i + hd/2, angle
    p * theta^(-2i/hd)) on the pairs ``rotated_pairs`` only (None: every pair, a real Llama)."""
    b, t, _ = x.shape
    hd = w_q.shape[0] // n_heads
    half = hd // 2
    q = (x @ w_q.T).view(b, t, n_heads, hd)
    k = (x @ w_k.T).view(b, t, n_kv_heads, hd)
    v = (x @ w_v.T).view(b, t, n_kv_heads, hd)
    pairs = torch.arange(half) if rotated_pairs is None else torch.tensor(rotated_pairs, dtype=torch.long)
    inv = theta ** (-2 * pairs.to(torch.float64) / hd)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]             # (t, n_pairs)
    cos, sin = ang.cos().to(x.dtype)[None, :, None], ang.sin().to(x.dtype)[None, :, None]

    def rot(z):
        z = z.clone()
        a, c = z[..., pairs], z[..., pairs + half]
        z[..., pairs], z[..., pairs + half] = a * cos - c * sin, c * cos + a * sin
        return z

    q, k = rot(q), rot(k)
    rep = n_heads // n_kv_heads
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * hd ** -0.5
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(b, t, n_heads * hd)
    return o @ w_o.T


def _weights(dim, H, G, hd, rope_dim, rope_pairs, shared_rope_key=True, dtype=torch.float64):
    w_q = torch.randn(H * hd, dim, dtype=dtype) * dim ** -0.5
    w_k = torch.randn(G * hd, dim, dtype=dtype) * dim ** -0.5
    w_v = torch.randn(G * hd, dim, dtype=dtype) * dim ** -0.5
    w_o = torch.randn(dim, H * hd, dtype=dtype) * (H * hd) ** -0.5
    if shared_rope_key and rope_dim:
        rope, _, _ = mla_rope_channels(hd, rope_dim, rope_pairs)
        k = w_k.view(G, hd, dim)
        k[:, rope] = k[:1, rope]            # one rope key for all groups: what MLA can represent exactly
    return w_q, w_k, w_v, w_o


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


CASES = {  # dim, H, G, hd, rope, rope_pairs
    "gqa-high": (48, 4, 2, 12, 4, "high"),
    "mqa-uniform": (40, 4, 1, 16, 8, "uniform"),
    "mha-high": (32, 2, 2, 16, 6, "high"),
}


@pytest.mark.parametrize("q_lora", [None, "full"])
@pytest.mark.parametrize("name", list(CASES))
def test_full_rank_reproduces_attention(name, q_lora):
    dim, H, G, hd, rope_dim, pairs = CASES[name]
    torch.manual_seed(seed_of("convert", name, q_lora))
    w = _weights(dim, H, G, hd, rope_dim, pairs)
    kv_rank = min(G * (2 * hd - rope_dim), dim)          # rank of [K_nope; V]
    q_rank = None if q_lora is None else min(H * hd, dim)
    sd, cfg = attention_to_mla(*w, H, G, kv_rank, q_rank, rope_dim, rope_theta=10000.0, rope_pairs=pairs,
                               dtype=torch.float32, return_config=True)
    x = torch.randn(2, 13, dim, dtype=torch.float64)
    rope, _, s = mla_rope_channels(hd, rope_dim, pairs)
    want = llama_attention(x, *w, H, G, 10000.0, rope[: rope_dim // 2])
    assert cfg["rope_theta"] == pytest.approx(10000.0 ** (s * rope_dim / hd))
    for label, cls in (("fast", fastlayers.MLA), ("reference", reference.MLA)):
        m = cls(**cfg, max_seq_len=32)
        m.load_state_dict(sd)                          # strict: exactly MLA's parameter names and shapes
        with torch.no_grad():
            out = m(x.float())
        assert _rel(out, want) < 2e-6, (label, _rel(out, want))
    # Cached decoding (absorbed weights) of the converted layer gives the same outputs.
    m = fastlayers.MLA(**cfg, max_seq_len=32)
    m.load_state_dict(sd)
    with torch.no_grad():
        cache = m.new_cache(8, 16, dtype=torch.float32)
        ids = [cache.allocate(), cache.allocate()]
        parts = [m(x[:, :5].float(), cache, ids)] + [m(x[:, t:t + 1].float(), cache, ids) for t in range(5, 13)]
    assert _rel(torch.cat(parts, 1), want) < 2e-6


def test_full_rope_llama_is_approximated_not_reproduced():
    """A real Llama rotates every pair: the conversion keeps only rope_dim/2 pairs, so the outputs differ
    (the documented approximation), yet far less than a zero layer would."""
    dim, H, G, hd, rope_dim, pairs = CASES["gqa-high"]
    torch.manual_seed(seed_of("convert", "full-rope"))
    w = _weights(dim, H, G, hd, rope_dim, pairs)
    sd, cfg = attention_to_mla(*w, H, G, 40, None, rope_dim, rope_theta=10000.0, return_config=True)
    m = fastlayers.MLA(**cfg, max_seq_len=32)
    m.load_state_dict(sd)
    x = torch.randn(1, 20, dim, dtype=torch.float64)
    with torch.no_grad():
        out = m(x.float())
    err = _rel(out, llama_attention(x, *w, H, G, 10000.0, None))
    assert 1e-3 < err < 0.9


def test_error_falls_as_kv_rank_grows():
    dim, H, G, hd, rope_dim, pairs = 64, 4, 2, 16, 4, "high"
    torch.manual_seed(seed_of("convert", "ranks"))
    w = _weights(dim, H, G, hd, rope_dim, pairs)
    x = torch.randn(2, 11, dim, dtype=torch.float64)
    want = llama_attention(x, *w, H, G, 10000.0, list(range(rope_dim // 2)))
    full = G * (2 * hd - rope_dim)                       # 56 < dim
    errs = []
    for r in (4, 12, 24, 40, full):
        sd, cfg = attention_to_mla(*w, H, G, r, None, rope_dim, rope_theta=10000.0, dtype=torch.float64,
                                   return_config=True)
        m = reference.MLA(**cfg, max_seq_len=16).double()
        m.load_state_dict(sd)
        with torch.no_grad():
            errs.append(_rel(m(x), want))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 0.1 and errs[-1] < 1e-6, errs  # fp64 weights, fp32 RoPE tables


def test_q_lora_rank_error_falls():
    dim, H, G, hd, rope_dim = 48, 4, 2, 12, 4
    torch.manual_seed(seed_of("convert", "q-ranks"))
    w = _weights(dim, H, G, hd, rope_dim, "high")
    x = torch.randn(1, 9, dim, dtype=torch.float64)
    want = llama_attention(x, *w, H, G, 10000.0, [0, 1])
    errs = []
    for rq in (6, 16, 32, 48):
        sd, cfg = attention_to_mla(*w, H, G, 40, rq, rope_dim, rope_theta=10000.0, dtype=torch.float64,
                                   return_config=True)
        m = reference.MLA(**cfg, max_seq_len=16).double()
        m.load_state_dict(sd)
        with torch.no_grad():
            errs.append(_rel(m(x), want))
    assert all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-6, errs


def test_shared_rope_key_is_the_mean_over_kv_heads():
    dim, H, G, hd, rope_dim = 24, 4, 2, 8, 4
    torch.manual_seed(seed_of("convert", "mean"))
    w = _weights(dim, H, G, hd, rope_dim, "high", shared_rope_key=False)
    sd = attention_to_mla(*w, H, G, 8, None, rope_dim, dtype=torch.float64)
    rope, _, _ = mla_rope_channels(hd, rope_dim, "high")
    assert rope == [0, 1, 4, 5]
    torch.testing.assert_close(sd["wkv_a.weight"][-rope_dim:], w[1].view(G, hd, dim)[:, rope].mean(0))


def test_bad_arguments():
    w = _weights(24, 4, 2, 8, 4, "high")
    with pytest.raises(ValueError, match="n_kv_heads"):
        attention_to_mla(*w, 4, 3, 8, None, 4)
    with pytest.raises(ValueError, match="rope_dim"):
        attention_to_mla(*w, 4, 2, 8, None, 3)
    with pytest.raises(ValueError, match="w_k"):
        attention_to_mla(w[0], w[1][:-1], w[2], w[3], 4, 2, 8, None, 4)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        attention_to_mla(*w, 4, 2, 0, None, 4)
    with pytest.raises(ValueError, match="rope_pairs"):
        attention_to_mla(*w, 4, 2, 8, None, 4, rope_pairs="low")
    with pytest.raises(TypeError, match="w_q"):
        attention_to_mla(w[0].long(), *w[1:], 4, 2, 8, None, 4)
