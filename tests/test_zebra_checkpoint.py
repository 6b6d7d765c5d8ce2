"""ZebraLM.from_pretrained / save_pretrained in the released Zebra-Llama format (AMD-AGI/AMD-Hybrid-Models):
tensor names, the rope row permutation of the DeepSeek-style MLA, round trips and the errors."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from fastlayers import models, reference
from conftest import assert_rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=97, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, mla_layers=[0, 2],
            kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, ffn_hidden=96,
            max_seq_len=64, rope_theta=10000.0, eps=1e-5)


def _model(q_lora_rank=None, tie=True, seed=0):
    torch.manual_seed(seed)
    m = models.ZebraLM(**TINY, q_lora_rank=q_lora_rank, tie_embeddings=tie).eval()
    with torch.no_grad():  # random gains and mixer parameters: nothing left at an identity value
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m


# --- an independent forward over the released tensors, as the released modules compute it --------------------
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _deepseek_mla(sd, pre, x, cfg):
    """The released MLA layer (DeepSeek-V3 attention, grouped KV, no latent norms, unscaled RoPE)."""
    b, t, _ = x.shape
    h, g = cfg["n_heads"], cfg["n_kv_heads"]
    nope, rope, vd, rank = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    if pre + "q_proj.weight" in sd:
        q = x @ sd[pre + "q_proj.weight"].T
    else:
        q = (x @ sd[pre + "q_a_proj.weight"].T) @ sd[pre + "q_b_proj.weight"].T
    q = q.view(b, t, h, nope + rope).transpose(1, 2)
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    ckv = x @ sd[pre + "kv_a_proj_with_mqa.weight"].T
    c, k_pe = ckv[..., :rank], ckv[..., rank:].view(b, 1, t, rope)
    kv = (c @ sd[pre + "kv_b_proj.weight"].T).view(b, t, g, nope + vd).transpose(1, 2)
    kv = kv.repeat_interleave(h // g, dim=1)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, rope, 2, dtype=torch.float64) / rope))
    freqs = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def rot(z):  # de-interleave (pairs 2i, 2i+1 -> halves), then rotate-half
        z = z.reshape(*z.shape[:-1], rope // 2, 2).transpose(-1, -2).reshape(z.shape)
        z1, z2 = z[..., : rope // 2], z[..., rope // 2:]
        return z * cos + torch.cat([-z2, z1], -1) * sin

    q_pe, k_pe = rot(q_pe), rot(k_pe).expand(b, h, t, rope)
    qq, kk = torch.cat([q_nope, q_pe], -1), torch.cat([k_nope, k_pe], -1)
    s = (qq @ kk.transpose(-1, -2)) * (nope + rope) ** -0.5
    s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h * vd)
    return o @ sd[pre + "out_proj.weight"].T


def _released_forward(sd, cfg, hyb, tokens):
    eps = hyb["rms_norm_eps"]
    x = F.embedding(tokens, sd["model.embed_tokens.weight"])
    for i in range(hyb["n_layer"]):
        pre = f"model.layers.{i}."
        n = _rms(x, sd[pre + "input_layernorm.weight"], eps)
        if i in hyb["mla_layers"]:
            m = _deepseek_mla(sd, pre + "mla.", n, TINY)
        else:  # mamba_ssm's Mamba2 with Zebra's d_xb: fastlayers' reference layer, loaded by the released names
            layer = reference.Mamba2.zebra(TINY["dim"], TINY["n_heads"], TINY["n_kv_heads"], TINY["head_dim"])
            layer.load_state_dict({k[len(pre + "mamba."):]: v for k, v in sd.items() if k.startswith(pre + "mamba.")})
            m = layer(n)
        x = x + m
        n = _rms(x, sd[pre + "post_attention_layernorm.weight"], eps)
        x = x + F.silu(n @ sd[pre + "mlp.gate_proj.weight"].T) * (n @ sd[pre + "mlp.up_proj.weight"].T) @ \
            sd[pre + "mlp.down_proj.weight"].T
    x = _rms(x, sd["model.norm.weight"], eps)
    head = sd["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else sd["lm_head.weight"]
    return x @ head.T


@pytest.mark.parametrize("q_lora_rank,tie", [(None, True), (40, False)], ids=["q-direct-tied", "q-lora-untied"])
def test_saved_checkpoint_is_the_released_format_and_computes_the_same(tmp_path, q_lora_rank, tie):
    from safetensors.torch import load_file
    m = _model(q_lora_rank, tie)
    m.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "hybrid_config.json", "model.safetensors"]
    cfg = json.load(open(tmp_path / "config.json"))
    hyb = json.load(open(tmp_path / "hybrid_config.json"))
    sd = load_file(tmp_path / "model.safetensors")
    assert hyb["mla_layers"] == [0, 2] and hyb["d_xb"] == 32 and hyb["d_inner"] == 64
    assert "model.layers.0.mla.kv_a_proj_with_mqa.weight" in sd and "model.layers.1.mamba.in_proj.weight" in sd
    assert ("model.layers.0.mla.q_proj.weight" in sd) == (q_lora_rank is None)
    assert ("lm_head.weight" in sd) == (not tie)
    assert not any(k.startswith("blocks.") for k in sd)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = m(tokens)[0]
        theirs = _released_forward(sd, cfg, hyb, tokens)
    assert_rel_err(ours, theirs, 1e-5, "ZebraLM vs the released modules' computation")


def test_round_trip(tmp_path):
    m = _model(40)
    m.save_pretrained(tmp_path)
    again = models.ZebraLM.from_pretrained(tmp_path).eval()
    assert again.config == m.config
    sd, sd2 = m.state_dict(), again.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(m(tokens)[0], again(tokens)[0])
    bf = models.ZebraLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf.embed.weight.dtype == torch.bfloat16


def test_pytorch_model_bin_with_tied_head_and_rotary_buffers(tmp_path):
    """A checkpoint saved with torch.save (the released wrapper's pytorch_model.bin): the tied lm_head and the
    DeepSeek rotary caches are present and accepted."""
    from safetensors.torch import load_file
    m = _model(None, tie=True)
    m.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    sd["model.layers.0.mla.rotary_emb.inv_freq"] = torch.ones(4)
    os.remove(tmp_path / "model.safetensors")
    torch.save(sd, tmp_path / "pytorch_model.bin")
    again = models.ZebraLM.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        models.ZebraLM.from_pretrained(tmp_path)


def _rewrite(tmp_path, edit_sd=None, edit_hyb=None):
    from safetensors.torch import load_file, save_file
    if edit_sd:
        sd = load_file(tmp_path / "model.safetensors")
        edit_sd(sd)
        save_file(sd, tmp_path / "model.safetensors")
    if edit_hyb:
        hyb = json.load(open(tmp_path / "hybrid_config.json"))
        edit_hyb(hyb)
        json.dump(hyb, open(tmp_path / "hybrid_config.json", "w"))


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
    _model(40).save_pretrained(tmp_path)
    _rewrite(tmp_path, edit_sd=lambda sd: sd.pop("model.layers.1.mamba.A_log"))
    with pytest.raises(ValueError, match=r"missing tensors \(1\): model\.layers\.1\.mamba\.A_log"):
        models.ZebraLM.from_pretrained(tmp_path)
    _rewrite(tmp_path, edit_sd=lambda sd: sd.update({"model.layers.1.mamba.A_log": torch.zeros(4),
                                                     "model.layers.9.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): model\.layers\.9\.mlp\.extra\.weight"):
        models.ZebraLM.from_pretrained(tmp_path)
    _rewrite(tmp_path, edit_sd=lambda sd: (sd.pop("model.layers.9.mlp.extra.weight"),
                                           sd.update({"model.layers.1.mamba.A_log": torch.zeros(5)})))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mamba\.A_log .*shape \(5,\).*\(4,\)"):
        models.ZebraLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("use_lora_layer_norm", True, "use_lora_layer_norm"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, "rope_scaling"),
    ("layer_rank_list", {"2": {"kv_rank": 16, "q_rank": 40}}, "layer_rank_list"),
    ("ssm_cfg", {"expand": 1, "ngroups": 4, "d_state": 16, "repeat_kv_before_conv": True}, "repeat_kv_before_conv"),
])
def test_unsupported_configuration_is_an_error_naming_the_field(tmp_path, field, value, match):
    _model(40).save_pretrained(tmp_path)
    _rewrite(tmp_path, edit_hyb=lambda h: h.update({field: value}))
    with pytest.raises(ValueError, match=match):
        models.ZebraLM.from_pretrained(tmp_path)


def test_unit_rope_scaling_is_plain_rope(tmp_path):
    """The released training configs write a yarn rope_scaling of factor 1.0: the same as no scaling."""
    m = _model(40)
    m.save_pretrained(tmp_path)
    _rewrite(tmp_path, edit_hyb=lambda h: h.update(
        {"rope_scaling": {"rope_type": "yarn", "factor": 1.0, "original_max_position_embeddings": 2048}}))
    again = models.ZebraLM.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), again.state_dict().values()))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        models.ZebraLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        models.ZebraLM.from_pretrained(tmp_path)
