"""MLA decoding: mla_decode against eager PyTorch decoders.

Providers: the fastlayers backend (``cpu``; ``triton`` on a GPU; on the CPU also ``cpu-scalar``, the
scalar kernel the vectorised one replaced where AVX2 + FMA exist), ``eager-absorbed`` (gather the
pages, einsum, softmax, einsum: the absorbed decode in plain PyTorch) and ``decompress-sdpa``
(decompress K and V of every cached token with W_UK / W_UV, then SDPA: what a model without
absorption does each step). Bytes: cache rows read + q + out; GB/s and the fraction of the copy
ceiling are in extra_info.
"""
import pytest
import torch
import torch.nn.functional as F

import fastlayers

from conftest import DEVICE, SMOKE, run

FAST = "cpu" if DEVICE == "cpu" else "triton"
# (batch, cached tokens, heads, kv_lora, rope); the CPU shapes, and batch 1 x 32k for bandwidth
SHAPES = ([(2, 40, 4, 64, 32)] if SMOKE else
          [(8, 4096, 16, 128, 64), (8, 4096, 16, 512, 64), (1, 32768, 16, 128, 64), (1, 32768, 16, 512, 64)])
DTYPES = [torch.float32] if SMOKE else [torch.float32, torch.bfloat16]
PAGE, NOPE, V = 64, 128, 128


def _inputs(b, n, h, lat, rope, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    d = lat + rope
    blocks = -(-n // PAGE)
    # The cache as fastlayers.PagedLatentCache allocates it (on the CPU: advised onto huge pages).
    kv = fastlayers.PagedLatentCache(b * blocks, PAGE, lat, rope, dtype, DEVICE).kv
    kv.copy_(torch.randn(b * blocks, PAGE, 1, d, generator=g, device=DEVICE))
    table = torch.randperm(b * blocks, generator=g, device=DEVICE).view(b, blocks).to(torch.int32)
    lens = torch.full((b,), n, dtype=torch.int32, device=DEVICE)
    q = torch.randn(b, 1, h, d, generator=g, device=DEVICE).to(dtype)
    return q, kv, table, lens


def eager_absorbed(q, kv, table, lens, dv, scale):
    b, n = table.shape[0], int(lens.max())
    rows = kv[table.long()].reshape(b, -1, kv.shape[-1])[:, :n].float()          # gather the pages
    s = torch.einsum("bqhd,bld->bhql", q.float(), rows) * scale
    valid = torch.arange(n, device=q.device)[None, :] < lens[:, None]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.einsum("bhql,blv->bqhv", torch.softmax(s, dim=-1), rows[..., :dv]).to(q.dtype)


def decompress_sdpa(q_nope, q_pe, kv, table, lens, w_uk, w_uv, lat):
    b, n = table.shape[0], int(lens.max())
    rows = kv[table.long()].reshape(b, -1, kv.shape[-1])[:, :n]
    c, k_pe = rows[..., :lat], rows[..., lat:]
    k_nope = torch.einsum("blc,hnc->bhln", c, w_uk)
    v = torch.einsum("blc,hvc->bhlv", c, w_uv)
    k = torch.cat([k_nope, k_pe[:, None].expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v)


PROVIDERS = [FAST] + (["cpu-scalar"] if DEVICE == "cpu" else []) + ["eager-absorbed", "decompress-sdpa"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}xn{}xh{}x{}+{}".format(*s))
def test_mla_decode(benchmark, copy_gbps, monkeypatch, shape, dtype, provider):
    b, n, h, lat, rope = shape
    if provider == "decompress-sdpa" and not SMOKE and (b < 8 or dtype != torch.float32):
        pytest.skip("the decompress-then-SDPA baseline costs seconds a step: measured at batch 8, fp32 only")
    q, kv, table, lens = _inputs(b, n, h, lat, rope, dtype)
    scale = (NOPE + rope) ** -0.5
    nbytes = b * n * kv.shape[-1] * kv.element_size() + q.numel() * q.element_size() + b * h * lat * q.element_size()
    if provider in (FAST, "cpu-scalar"):
        if provider == "cpu-scalar":
            from fastlayers.backends import cpu as cpu_backend
            monkeypatch.setattr(cpu_backend, "MLA_KERNEL", "scalar")

        def fn():
            with fastlayers.use_backend(provider.split("-")[0]):
                return fastlayers.mla_decode(q, kv, table, lens, lat, softmax_scale=scale)
    elif provider == "eager-absorbed":
        def fn():
            return eager_absorbed(q, kv, table, lens, lat, scale)
    else:
        g = torch.Generator(device=DEVICE).manual_seed(1)
        w_uk = (torch.randn(h, NOPE, lat, generator=g, device=DEVICE) * lat ** -0.5).to(dtype)
        w_uv = (torch.randn(h, V, lat, generator=g, device=DEVICE) * lat ** -0.5).to(dtype)
        q_nope, q_pe = torch.randn(b, 1, h, NOPE, device=DEVICE, dtype=dtype), q[..., lat:]

        def fn():
            return decompress_sdpa(q_nope, q_pe, kv, table, lens, w_uk, w_uv, lat)
    with torch.no_grad():
        run(benchmark, fn, nbytes, copy_gbps, rounds=3 if provider == "decompress-sdpa" else 5, op="mla_decode",
            shape=list(shape), dtype=str(dtype), provider=provider)
