"""Whole-model decoding: ZebraLM (``zebra-small`` preset: 8 layers, MLA at 0 and 4, Mamba-2 elsewhere) tokens/s.

Each round prefills a fresh cache with a ``PROMPT``-token prompt (not timed), then times ``STEPS`` one-token
decode steps of the whole batch (greedy: the argmax of the last logits is fed back).
Providers:
  ``fastlayers``        ZebraLM on the default backend (CPU: the C++ kernels; MLA decodes with absorbed
                        weights through ``mla_decode``, Mamba-2 with ``selective_state_update``)
  ``reference``         ``ZebraLM(..., reference=True)``: the pure-PyTorch layers (non-absorbed MLA over the
                        gathered latent cache), same weights
  ``reference-backend`` the fast model's code with every op on its reference path
                        (``use_backend("reference")``)
Reported: ``tokens_per_s`` = batch * STEPS / median round time (fp32 on CPU, bf16 on a GPU).
"""
import pytest
import torch

import fastlayers
from fastlayers import models

from conftest import DEVICE, SMOKE, sync

try:
    from fastlayers.mamba import Mamba2  # noqa: F401
    PRESET, OVERRIDES = "zebra-small", {}
except ImportError:  # the Mamba-2 layer is not in this tree: MLA-only
    PRESET, OVERRIDES = "zebra-small", dict(mla_layers=list(range(8)))
if SMOKE:
    OVERRIDES = dict(OVERRIDES, dim=64, n_heads=4, head_dim=16, n_layers=4, ffn_hidden=96,
                     mla_layers=[0, 2] if "mla_layers" not in OVERRIDES else list(range(4)))
PROMPT, STEPS = (8, 2) if SMOKE else (256, 16)
BATCHES = [1, 2] if SMOKE else [1, 16]

_models = {}


def _model(provider):
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    if "fast" not in _models:
        torch.manual_seed(0)
        _models["fast"] = models.build(PRESET, **OVERRIDES).to(DEVICE, dtype).eval()
    if provider == "reference" and "ref" not in _models:
        _models["ref"] = _models["fast"].reference_copy().eval()
    return _models["ref" if provider == "reference" else "fast"]


@pytest.mark.parametrize("provider", ["fastlayers", "reference", "reference-backend"])
@pytest.mark.parametrize("batch", BATCHES)
def test_zebra_decode(benchmark, batch, provider):
    m = _model(provider)
    backend = "reference" if provider == "reference-backend" else None
    g = torch.Generator().manual_seed(batch)
    prompt = torch.randint(0, m.vocab_size, (batch, PROMPT), generator=g).to(DEVICE)

    def setup():
        with torch.no_grad(), fastlayers.use_backend(backend):
            cache = m.new_cache(batch, PROMPT + STEPS)
            logits, _ = m(prompt, cache=cache)
        return (cache, logits[:, -1:].argmax(-1)), {}

    def decode(cache, tok):
        with torch.no_grad(), fastlayers.use_backend(backend):
            for _ in range(STEPS):
                logits, _ = m(tok, cache=cache)
                tok = logits[:, -1:].argmax(-1)
        sync()

    benchmark.pedantic(decode, setup=setup, rounds=1 if SMOKE else 5, iterations=1, warmup_rounds=0 if SMOKE else 1)
    info = dict(op="ZebraLM decode", preset=PRESET, overrides=str(OVERRIDES), batch=batch, prompt=PROMPT,
                steps=STEPS, provider=provider, device=DEVICE, threads=torch.get_num_threads(),
                params=models.count_parameters(m))
    if benchmark.stats is not None:
        info["tokens_per_s"] = round(batch * STEPS / benchmark.stats.stats.median, 1)
    benchmark.extra_info.update(info)
