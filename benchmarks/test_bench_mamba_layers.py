"""The Mamba / Mamba-2 layers: one decode step with a cache, and a prefill forward.

Providers: ``fastlayers`` (:class:`fastlayers.Mamba` / ``Mamba2``: the fastlayers ops) and ``reference``
(:class:`fastlayers.reference.Mamba` / ``Mamba2``: the same state_dict in plain PyTorch). Bytes: a decode
step reads the weights once and reads + writes the two states (weight-bandwidth bound at batch 8);
the prefill reads the weights and x and writes the output (a lower bound: the activations are not counted).
Mamba2's ``ssd_scan`` is the reference recurrence in both providers until its kernels land.
"""
import pytest
import torch

import fastlayers
from fastlayers import reference

from conftest import DEVICE, SMOKE, run

# name: (constructor, batch, prefill length); Zebra-Llama-1B-like Mamba-2 layer, Mamba-130m-like Mamba-1 layer
LAYERS = {
    "mamba-d768": (lambda mod: mod.Mamba(64 if SMOKE else 768), 2 if SMOKE else 8, 16 if SMOKE else 512),
    "zebra-d2048": (lambda mod: mod.Mamba2.zebra(64, 4, 2, 16) if SMOKE else mod.Mamba2.zebra(2048, 32, 8, 64),
                    2 if SMOKE else 8, 16 if SMOKE else 256),
}
DTYPES = [torch.float32] if SMOKE else [torch.float32, torch.bfloat16]


def _layer(name, provider, dtype):
    torch.manual_seed(0)
    make = LAYERS[name][0]
    m = make(fastlayers).to(device=DEVICE, dtype=dtype)
    if provider == "reference":
        r = make(reference).to(device=DEVICE, dtype=dtype)
        r.load_state_dict(m.state_dict())
        m = r
    return m.eval().requires_grad_(False)


def _weight_bytes(m):
    return sum(p.numel() * p.element_size() for p in m.parameters())


@pytest.mark.parametrize("provider", ["fastlayers", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_mamba_layer_decode_step(benchmark, copy_gbps, name, dtype, provider):
    m = _layer(name, provider, dtype)
    b = LAYERS[name][1]
    cache = m.new_cache(b)
    x = torch.randn(b, 1, m.d_model, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        m(torch.randn(b, 4, m.d_model, device=DEVICE, dtype=dtype), cache)  # a short prompt first
        nbytes = _weight_bytes(m) + 2 * cache.state_bytes() + 2 * x.numel() * x.element_size()
        run(benchmark, lambda: m(x, cache), nbytes, copy_gbps, op="mamba_layer_decode", layer=name, batch=b,
            dtype=str(dtype), provider=provider, state_bytes=cache.state_bytes())


@pytest.mark.parametrize("provider", ["fastlayers", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LAYERS))
def test_mamba_layer_prefill(benchmark, copy_gbps, name, dtype, provider):
    m = _layer(name, provider, dtype)
    _, b, L = LAYERS[name]
    b = min(b, 2)
    x = torch.randn(b, L, m.d_model, device=DEVICE, dtype=dtype)
    nbytes = _weight_bytes(m) + 2 * x.numel() * x.element_size()

    def fn():
        return m(x, m.new_cache(b))

    with torch.no_grad():
        run(benchmark, fn, nbytes, copy_gbps, rounds=3, warmup=1, op="mamba_layer_prefill", layer=name,
            shape=[b, L], dtype=str(dtype), provider=provider)
