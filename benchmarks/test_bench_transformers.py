"""Hugging Face transformers models, patched by ``fastlayers.transformers.apply`` vs as shipped: tokens/s.

Models (random weights, built from configs): a small Llama (``llama``: hidden 256, 4 layers, 8 heads / 4 KV
heads, intermediate 688, vocab 1024) and a small Mamba-2 (``mamba2``: hidden 256, 4 layers, 8 heads of 64,
state 64, chunk 64, vocab 1024). Passes:
  ``train``  one training step: forward + cross-entropy + backward (batch x seqlen tokens)
  ``decode`` greedy ``generate`` of ``NEW`` tokens after a ``PROMPT``-token prompt (KV cache / SSM state;
             the prompt's prefill included)
Providers: ``fastlayers`` (the model after ``fastlayers.transformers.apply``) and ``eager`` (the same weights,
unpatched: transformers' own PyTorch code; on the CPU its Mamba-2 runs the torch fallback path, since
mamba_ssm / causal_conv1d kernels are CUDA-only). ``tokens_per_s`` in extra_info; the summary's ``xE`` is
the speed-up of the patched model. fp32 on the CPU, bf16 on a GPU. Skipped without transformers.
"""
import copy

import pytest
import torch

from conftest import DEVICE, SMOKE, sync

transformers = pytest.importorskip("transformers", reason="transformers is not installed: nothing to patch")
import fastlayers.transformers as flt  # noqa: E402

DTYPE = torch.float32 if DEVICE == "cpu" else torch.bfloat16
VOCAB = 128 if SMOKE else 1024
HIDDEN = 64 if SMOKE else 256
LAYERS = 2 if SMOKE else 4
TRAIN = [(2, 32)] if SMOKE else [(4, 256)]       # (batch, seqlen)
DECODE = [(1, 8, 4)] if SMOKE else [(1, 32, 32), (8, 32, 32)]  # (batch, prompt, new tokens)

_models = {}


def _build(arch):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=HIDDEN * 11 // 4,
                                       num_hidden_layers=LAYERS, num_attention_heads=8, num_key_value_heads=4,
                                       max_position_embeddings=1024, pad_token_id=0, eos_token_id=None)
        cfg._attn_implementation = "sdpa"
        m = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Mamba2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                        num_heads=HIDDEN * 2 // 64, head_dim=64, state_size=16 if SMOKE else 64,
                                        n_groups=1, expand=2, chunk_size=16 if SMOKE else 64, pad_token_id=0,
                                        eos_token_id=None)
        m = transformers.Mamba2ForCausalLM(cfg)
    return m.to(DEVICE, DTYPE)


def _model(arch, provider):
    if arch not in _models:
        base = _build(arch)
        fast = copy.deepcopy(base)
        flt.apply(fast)
        _models[arch] = {"eager": base, "fastlayers": fast}
    return _models[arch][provider]


def _record(benchmark, tokens, **info):
    info.update(device=DEVICE, device_name=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                threads=torch.get_num_threads(), dtype=str(DTYPE))
    if benchmark.stats is not None:
        info["tokens_per_s"] = round(tokens / benchmark.stats.stats.median, 1)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("provider", ["eager", "fastlayers"])
@pytest.mark.parametrize("shape", TRAIN, ids=lambda s: f"b{s[0]}xt{s[1]}")
@pytest.mark.parametrize("arch", ["llama", "mamba2"])
def test_hf_train_step(benchmark, arch, shape, provider):
    m = _model(arch, provider).train()
    b, t = shape
    ids = torch.randint(1, VOCAB, (b, t), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def step():
        m.zero_grad(set_to_none=True)
        m(ids, labels=ids).loss.backward()
        sync()

    step()
    benchmark.pedantic(step, rounds=1 if SMOKE else 5, iterations=1, warmup_rounds=0 if SMOKE else 1)
    _record(benchmark, b * t, op=f"hf {arch} train step", pass_="fwd+bwd", shape=list(shape), provider=provider)


@pytest.mark.parametrize("provider", ["eager", "fastlayers"])
@pytest.mark.parametrize("shape", DECODE, ids=lambda s: f"b{s[0]}xp{s[1]}+{s[2]}")
@pytest.mark.parametrize("arch", ["llama", "mamba2"])
def test_hf_greedy_decode(benchmark, arch, shape, provider):
    m = _model(arch, provider).eval()
    b, prompt, new = shape
    ids = torch.randint(1, VOCAB, (b, prompt), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def gen():
        with torch.no_grad():
            out = m.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        sync()
        return out

    gen()
    benchmark.pedantic(gen, rounds=1 if SMOKE else 3, iterations=1, warmup_rounds=0 if SMOKE else 1)
    _record(benchmark, b * new, op=f"hf {arch} greedy decode", pass_="generate", shape=list(shape),
            provider=provider)
