"""fastlayers.transformers.apply: transformers models (tiny, random weights, built from configs: no
downloads) patched in place give the unpatched model's logits, gradients and greedy tokens, with an
unchanged state_dict that saves and reloads."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install "
                                                          "'fastlayers[transformers]'): nothing to patch")

import fastlayers  # noqa: E402
import fastlayers.transformers as flt  # noqa: E402
from conftest import assert_close_to_ref, assert_rel_err, seed_of  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = ["llama", "qwen3", "olmo2", "mamba2"]
VOCAB = 100


def make(arch, seed=0, **over):
    """A tiny random-weight model of the architecture (2 layers, hidden 64, GQA, vocab 100)."""
    torch.manual_seed(seed)
    att = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
               bos_token_id=2, tie_word_embeddings=False)
    att.update(over)
    if arch == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**att))
    elif arch == "qwen3":
        m = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **att))
    elif arch == "olmo2":
        m = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**att))
    elif arch == "mamba2":
        cfg = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16,
                   n_groups=2, expand=2, chunk_size=16, pad_token_id=0, eos_token_id=1, bos_token_id=2)
        cfg.update(over)
        m = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg))
    else:
        raise AssertionError(arch)
    # Random (not identity) norm gains, so a norm that ignored its weight would show.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return m


def _ids(arch, dtype_name, batch=2, seqlen=37):
    g = torch.Generator().manual_seed(seed_of(arch, dtype_name, batch, seqlen))
    return torch.randint(3, VOCAB, (batch, seqlen), generator=g)


def _logits_and_grads(model, ids, upstream):
    model.zero_grad(set_to_none=True)
    logits = model(ids).logits
    (logits.double() * upstream).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


EXPECTED_KINDS = {
    "llama": {"norm": 5, "mlp": 2, "attn": 2},
    "qwen3": {"norm": 9, "mlp": 2, "attn": 2},     # + q_norm, k_norm per layer
    "olmo2": {"norm": 9, "mlp": 2, "attn": 2},     # post-attn, post-ffn, q_norm, k_norm per layer + final
    "mamba2": {"norm": 3, "mixer": 2},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_report_lists_every_module_and_keeps_state_dict(arch):
    model = make(arch)
    before = {k: v for k, v in model.state_dict().items()}
    n_params = len(list(model.parameters()))
    report = flt.apply(model)
    kinds = {}
    for path, old_cls in report:
        mod = model.get_submodule(path)
        assert type(mod).__mro__[1] is old_cls, path
        kinds[type(mod)._fastlayers_kind] = kinds.get(type(mod)._fastlayers_kind, 0) + 1
    assert kinds == EXPECTED_KINDS[arch]
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr(), k
        assert torch.equal(after[k], before[k]), k
    assert len(list(model.parameters())) == n_params
    assert flt.apply(model) == []  # already patched: nothing more
    assert sorted(flt.revert(model)) == sorted(p for p, _ in report)
    assert all(not type(m).__name__.startswith("Fast") for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_forward_runs_fastlayers_ops(arch, monkeypatch):
    """The patched modules really call the kernels (counted through fastlayers.ops)."""
    model = make(arch)
    flt.apply(model)
    calls = {}

    def counting(name):
        fn = getattr(fastlayers.ops, name)

        def wrapped(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **k)
        return wrapped

    names = ["rms_norm", "swiglu", "qkv_norm_rope", "ssd_scan", "causal_conv1d", "causal_conv1d_update",
             "selective_state_update"]
    for n in names:
        monkeypatch.setattr(fastlayers.ops, n, counting(n))
    ids = _ids(arch, "count")
    with torch.no_grad():
        model(ids)
    layers = 2
    if arch == "mamba2":
        assert calls.get("ssd_scan") == layers and calls.get("causal_conv1d") == layers
        assert calls.get("rms_norm") == 3 + layers  # block norms + final norm + the mixers' gated norms
        calls.clear()
        model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
        assert calls.get("selective_state_update") == 2 * layers
        assert calls.get("causal_conv1d_update") == 2 * layers
    else:
        assert calls.get("qkv_norm_rope") == layers
        assert calls.get("swiglu") == layers
        assert calls.get("rms_norm") == EXPECTED_KINDS[arch]["norm"] - (2 * layers if arch == "qwen3" else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_gradients_match(arch, dtype):
    base = make(arch).train()
    ids = _ids(arch, str(dtype))
    g = torch.Generator().manual_seed(seed_of(arch, "upstream"))
    upstream = torch.randn(ids.shape[0], ids.shape[1], VOCAB, generator=g, dtype=torch.float64)
    unpatched = copy.deepcopy(base).to(dtype)
    patched = copy.deepcopy(base).to(dtype)
    assert flt.apply(patched)
    out, grads = _logits_and_grads(patched, ids, upstream)
    ref_out, ref_grads = _logits_and_grads(unpatched, ids, upstream)
    # (Mamba2ForCausalLM upcasts its logits to fp32 itself)
    assert out.dtype == ref_out.dtype == (torch.float32 if arch == "mamba2" else dtype)
    if dtype == torch.float32:
        assert_rel_err(out, ref_out, 1e-5, f"{arch} logits")
        for name, gr in ref_grads.items():
            assert_rel_err(grads[name], gr, 1e-5, f"{arch} grad {name}")
    else:
        hi = copy.deepcopy(base).double()
        hi_out, hi_grads = _logits_and_grads(hi, ids, upstream)
        if arch == "mamba2":  # logits out of a scan: the norm form (DESIGN.md §4, reductions and scans)
            assert_norm_err_within(out, hi_out, ref_out, f"{arch} bf16 logits")
        else:
            assert_close_to_ref(out, hi_out, ref_out, f"{arch} bf16 logits")
        for name, gr in ref_grads.items():  # gradients are reductions over every token: the norm form
            assert_norm_err_within(grads[name], hi_grads[name], gr, f"{arch} bf16 grad {name}")


def assert_norm_err_within(out, hi, lowp, what):
    """||out - hi|| <= 2 ||lowp - hi||: the patched low-precision model's error (vs the fp64 model) is at
    most twice the unpatched low-precision model's, over the whole tensor. Elementwise the two roundings are
    independent (fastlayers rounds once, in fp32; transformers after each op), so the elementwise form of
    the rule does not apply to results of long reductions; in norm it is tighter than that form's
    norm (no atol term)."""
    out, hi, lowp = out.double(), hi.double(), lowp.double()
    e_out, e_ref = float((out - hi).norm()), float((lowp - hi).norm())
    assert e_ref > 0, f"{what}: the unpatched low-precision model is exact: cannot bound"
    assert e_out <= 2 * e_ref, f"{what}: error norm {e_out:.4g} > 2 x the unpatched model's {e_ref:.4g}"


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_greedy_same_tokens(arch):
    base = make(arch).eval()
    patched = copy.deepcopy(base)
    flt.apply(patched)
    ids = _ids(arch, "gen", batch=3, seqlen=9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row: per-row positions (attention) / masked inputs (Mamba-2)
    ids[1, :3] = 0
    kw = dict(max_new_tokens=12, do_sample=False, attention_mask=mask, pad_token_id=0)
    ref = base.generate(ids, **kw)
    out = patched.generate(ids, **kw)
    assert out.shape == ref.shape and out.shape[1] == ids.shape[1] + 12
    assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_with_per_row_positions(arch):
    """Per-row position_ids (B, T) (left padding): each row is rotated at its own positions."""
    base = make(arch).eval()
    patched = copy.deepcopy(base)
    flt.apply(patched)
    ids = _ids(arch, "pad", batch=3, seqlen=11)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    kw = dict(attention_mask=mask)
    if arch != "mamba2":
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out, ref = patched(ids, **kw).logits, base(ids, **kw).logits
    keep = mask.bool()
    assert_rel_err(out[keep], ref[keep], 1e-5, f"{arch} padded logits")


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
], ids=["llama3", "yarn"])
def test_rope_scaling_types(rope):
    """Scaled RoPE (yarn also scales cos/sin by its attention factor): the model's own tables are used."""
    base = make("llama", rope_parameters=rope).eval()
    patched = copy.deepcopy(base)
    flt.apply(patched)
    ids = _ids("llama", rope["rope_type"], seqlen=40)
    with torch.no_grad():
        assert_rel_err(patched(ids).logits, base(ids).logits, 1e-5, f"llama {rope['rope_type']} logits")


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_continuation_prefill_chunk_and_step(arch):
    """A 10-token prefill into the model's cache, then a 3-token chunk (Mamba-2: chunked prefill from the cached
    conv/SSM states), then one token: each step's logits equal the unpatched model's, and together the full
    sequence's."""
    base = make(arch).eval()
    patched = copy.deepcopy(base)
    flt.apply(patched)
    ids = _ids(arch, "cache", batch=2, seqlen=14)
    key = "cache_params" if arch == "mamba2" else "past_key_values"

    def steps(m):
        outs, cache = [], None
        with torch.no_grad():
            for a, b in ((0, 10), (10, 13), (13, 14)):
                o = m(ids[:, a:b], use_cache=True, **({key: cache} if cache is not None else {}))
                outs.append(o.logits)
                cache = getattr(o, key)
            full = m(ids).logits
        return outs, full

    got, full = steps(patched)
    want, _ = steps(base)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_rel_err(g, w, 1e-5, f"{arch} cached step {i}")
    assert_rel_err(torch.cat(got, 1), full, 1e-5, f"{arch} cached steps vs one pass")


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload(arch, tmp_path):
    model = make(arch).eval()
    flt.apply(model)
    ids = _ids(arch, "save")
    with torch.no_grad():
        expect = model(ids).logits
    model.save_pretrained(tmp_path)
    cls = type(model)
    again = cls.from_pretrained(tmp_path).eval()
    assert not any(type(m).__name__.startswith("Fast") for m in again.modules())
    assert set(again.state_dict()) == set(model.state_dict())
    report = flt.apply(again)
    assert len(report) == sum(EXPECTED_KINDS[arch].values())
    with torch.no_grad():
        got = again(ids).logits
    assert torch.equal(got, expect)


def test_unknown_architecture_is_an_error_naming_the_supported_ones():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2,
                                                                  n_positions=64))
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="gpt2.*llama, qwen3, olmo2, mamba2"):
        flt.apply(model)
    assert [type(m) for m in model.modules()] == classes
    with pytest.raises(ValueError, match="transformers model"):
        flt.apply(torch.nn.Linear(2, 2))


def test_nothing_is_patched_half_way(monkeypatch):
    """An error while the patches are collected leaves every module as it was."""
    model = make("llama")
    classes = [type(m) for m in model.modules()]
    real = flt._patched_class
    seen = []

    def failing(cls, kind, *a):
        seen.append(kind)
        if len(seen) == 4:
            raise RuntimeError("injected")
        return real(cls, kind, *a)

    monkeypatch.setattr(flt, "_patched_class", failing)
    with pytest.raises(RuntimeError, match="injected"):
        flt.apply(model)
    assert len(seen) == 4
    assert [type(m) for m in model.modules()] == classes


def test_kinds_select_what_is_patched():
    model = make("qwen3")
    report = flt.apply(model, kinds=("mlp",))
    assert [p for p, _ in report] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert len(flt.apply(model)) == EXPECTED_KINDS["qwen3"]["norm"] + 2  # the rest, later
    with pytest.raises(ValueError, match="unknown kinds"):
        flt.apply(make("llama"), kinds=("rope",))


def test_non_silu_mlp_is_left_alone():
    model = make("llama", hidden_act="gelu")
    report = flt.apply(model)
    kinds = [type(model.get_submodule(p))._fastlayers_kind for p, _ in report]
    assert "mlp" not in kinds and kinds.count("attn") == 2


def test_import_fastlayers_does_not_import_transformers():
    import subprocess
    import sys
    code = "import sys, fastlayers; assert 'transformers' not in sys.modules, 'imported'; print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
