"""Zebra-Llama's released checkpoint format (AMD-AGI/AMD-Hybrid-Models) <-> :class:`fastlayers.models.ZebraLM`.

A released model directory holds ``config.json`` (the base Llama's transformers config), ``hybrid_config.json``
(the hybrid layout: ``n_layer``, ``mla_layers``, MLA ranks and head sizes, ``d_inner``, ``d_xb``, ``ssm_cfg``, ...)
and the weights of a ``LlamaForCausalLM`` whose decoder layers were replaced (``model.safetensors``, sharded
safetensors with ``model.safetensors.index.json``, or ``pytorch_model.bin``). Tensor names:

    model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent or equal to the embedding when tied)
    model.layers.{i}.input_layernorm.weight / post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate_proj,up_proj,down_proj}.weight
    MLA layer i:     model.layers.{i}.mla.{q_proj | q_a_proj + q_b_proj, kv_a_proj_with_mqa, kv_b_proj, out_proj}.weight
    Mamba-2 layer i: model.layers.{i}.mamba.{in_proj.weight, conv1d.weight, conv1d.bias, dt_bias, A_log, D,
                                              norm.weight, out_proj.weight}

Mapping onto ZebraLM: ``embed``, ``norm``, ``lm_head``; per block ``norm`` (input_layernorm), ``ffn.norm``
(post_attention_layernorm), ``ffn.gate_up`` = [gate_proj; up_proj] (rows concatenated), ``ffn.down``; MLA
``wq`` / ``wq_a``, ``wq_b``, ``wkv_a``, ``wkv_b``, ``wo``; Mamba-2 the same names under ``mixer``. The released
MLA layer (DeepSeek-V3's) de-interleaves its rope channels before a rotate-half RoPE
(``view(..., d/2, 2).transpose``): the rows that produce q_pe (in each head of ``q_proj``/``q_b_proj``) and
k_pe (the last rows of ``kv_a_proj_with_mqa``) are permuted to [even channels, odd channels] on loading (and
back on saving), so fastlayers' rotate-half RoPE computes the same scores.

Supported configurations are those ZebraLM expresses; anything else is a ValueError naming the field:
no latent layer norms (``use_lora_layer_norm``), grouped KV (``use_full_kv_head`` false), one rank for all
MLA layers (``layer_rank_list``), no attention bias, SiLU, RoPE without scaling (``rope_scaling`` None or
a factor of 1, which equals plain RoPE), and the Zebra Mamba-2 layout (expand 1, ``ngroups`` = heads,
``d_state`` = head_dim, ``d_inner`` = hidden size, ``d_xb`` = KV heads x head_dim, no
``repeat_kv_before_conv``, mamba_ssm's defaults otherwise).
"""
import json
import os

import torch

CONFIG = "config.json"
HYBRID_CONFIG = "hybrid_config.json"
WEIGHTS = "model.safetensors"

_SSM_DEFAULTS = {"d_conv": 4, "conv_init": None, "D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False,
                 "repeat_kv_before_conv": False, "bias": False, "conv_bias": True,
                 "dt_limit": (0.0, float("inf")), "d_ssm": None}
_MAMBA = ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight")


def _err(path, msg):
    return ValueError(f"ZebraLM.from_pretrained({str(path)!r}): {msg}")


def _read_json(path, name):
    f = os.path.join(path, name)
    if not os.path.isfile(f):
        raise _err(path, f"no {name} in the directory (a Zebra-Llama checkpoint has {CONFIG}, {HYBRID_CONFIG} and "
                         f"the weights)")
    with open(f) as fh:
        return json.load(fh)


def zebra_kwargs(cfg, hyb, path="<config>"):
    """ZebraLM constructor arguments from the two config dicts; ValueError for what ZebraLM cannot express."""
    def need(d, key, name):
        if key not in d or d[key] is None:
            raise _err(path, f"{name} has no {key!r}")
        return d[key]

    dim = int(need(hyb, "hidden_size", HYBRID_CONFIG))
    n_heads = int(need(hyb, "num_attention_heads", HYBRID_CONFIG))
    n_kv = int(need(hyb, "num_key_value_heads", HYBRID_CONFIG))
    head_dim = int(cfg.get("head_dim") or dim // n_heads)
    checks = [
        ("use_lora_layer_norm", bool(hyb.get("use_lora_layer_norm", False)) is False,
         "latent RMSNorms (use_lora_layer_norm=true) are not in ZebraLM's MLA"),
        ("use_full_kv_head", bool(hyb.get("use_full_kv_head", False)) is False,
         "use_full_kv_head=true (one KV group per query head) is not supported"),
        ("attention_bias", bool(hyb.get("attention_bias", False)) is False, "attention biases are not supported"),
        ("hidden_act", hyb.get("hidden_act", "silu") in ("silu", "swish"), "only a SiLU MLP is supported"),
        ("d_model", int(hyb.get("d_model", dim) or dim) == dim, f"d_model must equal hidden_size ({dim})"),
        ("d_inner", int(hyb.get("d_inner") or dim) == n_heads * head_dim,
         f"d_inner must be heads x head_dim = {n_heads * head_dim}"),
        ("d_xb", int(hyb.get("d_xb") or n_kv * head_dim) == n_kv * head_dim,
         f"d_xb must be KV heads x head_dim = {n_kv * head_dim}"),
    ]
    for field, ok, why in checks:
        if not ok:
            raise _err(path, f"{HYBRID_CONFIG} {field}={hyb.get(field)!r}: {why}")
    rs = hyb.get("rope_scaling")
    if rs is not None:
        kind = rs.get("rope_type", rs.get("type"))
        if kind not in ("yarn", "linear", "dynamic") or float(rs.get("factor", 1.0)) != 1.0:
            raise _err(path, f"{HYBRID_CONFIG} rope_scaling={rs!r}: only unscaled RoPE (None, or a factor of 1.0, "
                             f"which equals plain RoPE) is implemented")
    ssm = dict(hyb.get("ssm_cfg") or {})
    expect = {"expand": 1, "ngroups": n_heads, "d_state": head_dim, "headdim": None}
    for k, v in ssm.items():
        if k in ("layer", "chunk_size", "use_mem_eff_path", "dt_min", "dt_max", "dt_init_floor", "A_init_range"):
            continue  # initialisation / kernel choices: no effect on a loaded model's function
        if k == "headdim":
            continue  # overridden by d_state in the Zebra layer
        if k in expect:
            if v != expect[k]:
                raise _err(path, f"{HYBRID_CONFIG} ssm_cfg {k}={v!r}: the Zebra Mamba-2 layer needs {expect[k]!r}")
        elif k in _SSM_DEFAULTS:
            dv = _SSM_DEFAULTS[k]
            same = tuple(v) == tuple(dv) if isinstance(dv, tuple) else v == dv
            if k != "d_conv" and not same:
                raise _err(path, f"{HYBRID_CONFIG} ssm_cfg {k}={v!r} is not supported (only {dv!r})")
        else:
            raise _err(path, f"{HYBRID_CONFIG} ssm_cfg has an unknown key {k!r}")
    kv_rank = int(need(hyb, "kv_lora_rank", HYBRID_CONFIG))
    q_rank = hyb.get("q_lora_rank")
    q_rank = None if q_rank is None else int(q_rank)
    mla_layers = [int(i) for i in hyb.get("mla_layers", [])]
    for layer, ranks in (hyb.get("layer_rank_list") or {}).items():
        if int(layer) in mla_layers and (int(ranks.get("kv_rank", kv_rank)) != kv_rank
                                         or (ranks.get("q_rank", q_rank) != q_rank)):
            raise _err(path, f"{HYBRID_CONFIG} layer_rank_list gives layer {layer} ranks {ranks}: ZebraLM uses one "
                             f"kv_lora_rank ({kv_rank}) and q_lora_rank ({q_rank}) for every MLA layer")
    return dict(vocab_size=int(need(cfg, "vocab_size", CONFIG)), dim=dim, n_layers=int(need(hyb, "n_layer", HYBRID_CONFIG)),
                n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, mla_layers=mla_layers, kv_lora_rank=kv_rank,
                q_lora_rank=q_rank, qk_rope_head_dim=int(hyb.get("qk_rope_head_dim", 64)),
                qk_nope_head_dim=int(hyb.get("qk_nope_head_dim", 128)), v_head_dim=int(hyb.get("v_head_dim", 128)),
                ffn_hidden=int(need(hyb, "intermediate_size", HYBRID_CONFIG)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), d_conv=int(ssm.get("d_conv", 4)),
                max_seq_len=int(hyb.get("max_position_embeddings", cfg.get("max_position_embeddings", 4096))),
                rope_theta=float(hyb.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                eps=float(hyb.get("rms_norm_eps", cfg.get("rms_norm_eps", 1e-5))))


def _rope_perm(r):
    """Row order that turns DeepSeek's interleaved rope channels (pairs 2i, 2i+1) into rotate-half order."""
    return torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2)])


def _permute_q(w, n_heads, nope, rope, inverse=False):
    if not rope:
        return w
    perm = _rope_perm(rope)
    if inverse:
        perm = torch.argsort(perm)
    w = w.view(n_heads, nope + rope, -1)
    return torch.cat([w[:, :nope], w[:, nope:][:, perm]], dim=1).reshape(n_heads * (nope + rope), -1)


def _permute_kv_a(w, rank, rope, inverse=False):
    if not rope:
        return w
    perm = _rope_perm(rope)
    if inverse:
        perm = torch.argsort(perm)
    return torch.cat([w[:rank], w[rank:][perm]], dim=0)


def _names(kw):
    """(release name -> ZebraLM name) for every tensor that maps one to one, and the MLP pairs."""
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
    if not kw["tie_embeddings"]:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(kw["n_layers"]):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        names[src + "input_layernorm.weight"] = dst + "norm.weight"
        names[src + "post_attention_layernorm.weight"] = dst + "ffn.norm.weight"
        names[src + "mlp.down_proj.weight"] = dst + "ffn.down.weight"
        if i in kw["mla_layers"]:
            if kw["q_lora_rank"] is None:
                names[src + "mla.q_proj.weight"] = dst + "mixer.wq.weight"
            else:
                names[src + "mla.q_a_proj.weight"] = dst + "mixer.wq_a.weight"
                names[src + "mla.q_b_proj.weight"] = dst + "mixer.wq_b.weight"
            names[src + "mla.kv_a_proj_with_mqa.weight"] = dst + "mixer.wkv_a.weight"
            names[src + "mla.kv_b_proj.weight"] = dst + "mixer.wkv_b.weight"
            names[src + "mla.out_proj.weight"] = dst + "mixer.wo.weight"
        else:
            for p in _MAMBA:
                names[src + "mamba." + p] = dst + "mixer." + p
    return names


def _transform(kw, release_name, t, inverse=False):
    """The rope row permutation of the MLA projections (identity for every other tensor)."""
    nope, rope = kw["qk_nope_head_dim"], kw["qk_rope_head_dim"]
    if release_name.endswith(("mla.q_proj.weight", "mla.q_b_proj.weight")):
        return _permute_q(t, kw["n_heads"], nope, rope, inverse)
    if release_name.endswith("mla.kv_a_proj_with_mqa.weight"):
        return _permute_kv_a(t, kw["kv_lora_rank"], rope, inverse)
    return t


def to_zebra_state(sd, kw, path="<state_dict>"):
    """A released state dict -> ZebraLM's (for ZebraLM(**kw)); ValueError naming missing / unexpected tensors."""
    names = _names(kw)
    gate_up = {f"model.layers.{i}.mlp.{p}.weight" for i in range(kw["n_layers"]) for p in ("gate_proj", "up_proj")}
    expected = set(names) | gate_up
    optional = {"lm_head.weight"} if kw["tie_embeddings"] else set()
    missing = sorted(expected - set(sd))
    unexpected = sorted(k for k in set(sd) - expected - optional
                        if not k.endswith(("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:20])}"
                         + (" ..." if len(unexpected) > 20 else ""))
        raise _err(path, "the weights do not match the configuration: " + "; ".join(parts))
    if "lm_head.weight" in optional and "lm_head.weight" in sd and not torch.equal(
            sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
        raise _err(path, "config.json ties the embeddings (tie_word_embeddings) but lm_head.weight differs from "
                         "model.embed_tokens.weight")
    out = {dst: _transform(kw, src, sd[src]) for src, dst in names.items()}
    for i in range(kw["n_layers"]):
        src = f"model.layers.{i}.mlp."
        out[f"blocks.{i}.ffn.gate_up.weight"] = torch.cat([sd[src + "gate_proj.weight"], sd[src + "up_proj.weight"]], 0)
    return out


def from_zebra_state(model):
    """ZebraLM's state dict -> the released tensor names and layouts."""
    kw = model.config
    sd = model.state_dict()
    out = {src: _transform(kw, src, sd[dst], inverse=True).contiguous() for src, dst in _names(kw).items()}
    for i in range(kw["n_layers"]):
        g, u = sd[f"blocks.{i}.ffn.gate_up.weight"].chunk(2, dim=0)
        out[f"model.layers.{i}.mlp.gate_proj.weight"] = g.contiguous()
        out[f"model.layers.{i}.mlp.up_proj.weight"] = u.contiguous()
    return out


def read_weights(path):
    """Every tensor of the checkpoint directory (safetensors, sharded safetensors, or pytorch_model.bin)."""
    from safetensors.torch import load_file
    single, index = os.path.join(path, WEIGHTS), os.path.join(path, WEIGHTS + ".index.json")
    binf, binidx = os.path.join(path, "pytorch_model.bin"), os.path.join(path, "pytorch_model.bin.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index) or os.path.isfile(binidx):
        idx = index if os.path.isfile(index) else binidx
        with open(idx) as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        sd = {}
        for s in shards:
            f = os.path.join(path, s)
            sd.update(load_file(f) if s.endswith(".safetensors") else torch.load(f, map_location="cpu",
                                                                                  weights_only=True))
        return sd
    if os.path.isfile(binf):
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise _err(path, f"no weights: expected {WEIGHTS}, {WEIGHTS}.index.json or pytorch_model.bin")


def load(cls, path, device=None, dtype=None):
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise _err(path, "not a directory")
    cfg, hyb = _read_json(path, CONFIG), _read_json(path, HYBRID_CONFIG)
    kw = zebra_kwargs(cfg, hyb, path)
    sd = to_zebra_state(read_weights(path), kw, path)
    model = cls(**kw, device=device, dtype=dtype)
    for name, p in model.state_dict().items():
        if tuple(sd[name].shape) != tuple(p.shape):
            src = next((k for k, v in _names(kw).items() if v == name), name)
            raise _err(path, f"tensor {src} (-> {name}) has shape {tuple(sd[name].shape)}; the configuration needs "
                             f"{tuple(p.shape)}")
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p.copy_(sd[name])
    return model


def save(model, path):
    from safetensors.torch import save_file
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    kw = model.config
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": kw["vocab_size"],
           "hidden_size": kw["dim"], "intermediate_size": kw["ffn_hidden"], "num_hidden_layers": kw["n_layers"],
           "num_attention_heads": kw["n_heads"], "num_key_value_heads": kw["n_kv_heads"],
           "head_dim": kw["head_dim"], "hidden_act": "silu", "rms_norm_eps": kw["eps"], "rope_theta": kw["rope_theta"],
           "max_position_embeddings": kw["max_seq_len"], "tie_word_embeddings": kw["tie_embeddings"],
           "attention_bias": False}
    hyb = {"hidden_size": kw["dim"], "intermediate_size": kw["ffn_hidden"], "hidden_act": "silu",
           "n_layer": kw["n_layers"], "mla_layers": list(kw["mla_layers"]), "rms_norm_eps": kw["eps"],
           "num_attention_heads": kw["n_heads"], "num_key_value_heads": kw["n_kv_heads"],
           "kv_lora_rank": kw["kv_lora_rank"], "q_lora_rank": kw["q_lora_rank"], "use_lora_layer_norm": False,
           "use_full_kv_head": False, "layer_rank_list": {}, "qk_rope_head_dim": kw["qk_rope_head_dim"],
           "v_head_dim": kw["v_head_dim"], "qk_nope_head_dim": kw["qk_nope_head_dim"],
           "max_position_embeddings": kw["max_seq_len"], "rope_theta": kw["rope_theta"], "rope_scaling": None,
           "attention_bias": False, "d_model": kw["dim"],
           "ssm_cfg": {"expand": 1, "ngroups": kw["n_heads"], "d_state": kw["head_dim"], "d_conv": kw["d_conv"],
                       "repeat_kv_before_conv": False},
           "d_inner": kw["n_heads"] * kw["head_dim"], "d_xb": kw["n_kv_heads"] * kw["head_dim"]}
    with open(os.path.join(path, CONFIG), "w") as fh:
        json.dump(cfg, fh, indent=2)
    with open(os.path.join(path, HYBRID_CONFIG), "w") as fh:
        json.dump(hyb, fh, indent=2)
    save_file({k: v.detach().cpu() for k, v in from_zebra_state(model).items()}, os.path.join(path, WEIGHTS),
              metadata={"format": "pt"})
