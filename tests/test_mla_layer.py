"""PagedLatentCache and the MLA layer: cached decoding (absorbed weights) against the full forward."""
import pytest
import torch

import fastlayers
from fastlayers import reference

from conftest import TRITON_GPU_CASES, seed_of

CONFIGS = {  # (dim, heads, q_lora, kv_lora, nope, rope, v, groups): DeepSeek-like, Zebra-like, no rope
    "deepseek": (64, 4, 48, 32, 16, 16, 24, None),
    "zebra": (64, 4, None, 32, 16, 16, 16, 2),
    "norope": (48, 2, None, 16, 8, 0, 8, None),
}


def _pair(name, device):
    torch.manual_seed(seed_of(name))
    args = CONFIGS[name]
    m = fastlayers.MLA(*args[:7], n_kv_groups=args[7], max_seq_len=64).to(device)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    r = reference.MLA(*args[:7], n_kv_groups=args[7], max_seq_len=64).to(device)
    r.load_state_dict(m.state_dict())
    return m, r


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mla_forward_and_grads_match_reference(device, backend, name):
    m, r = _pair(name, device)
    x = torch.randn(2, 9, CONFIGS[name][0], device=device)
    xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with fastlayers.use_backend(backend):
        out = m(xf)
    want = r(xr)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-4, atol=1e-5)
    rp = dict(r.named_parameters())
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, rp[n].grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("step", [1, 2])
def test_mla_prefill_then_decode_equals_full_forward(device, backend, name, step):
    """Prefill n tokens, then decode m tokens `step` at a time: the same outputs as one forward over n + m,
    through the absorbed path, the decompressed path on the same cache, and the reference."""
    m, r = _pair(name, device)
    x = torch.randn(2, 11, CONFIGS[name][0], device=device)
    n = 5
    with torch.no_grad(), fastlayers.use_backend(backend):
        full = m(x)
        outs = {}
        for label, mod, kw in (("absorbed", m, {}), ("decompressed", m, {"absorb": False}), ("reference", r, {})):
            cache = mod.new_cache(16, 16, dtype=torch.float32)
            ids = [cache.allocate(), cache.allocate()]
            parts = [mod(x[:, :n], cache, ids, **kw)]
            for t in range(n, x.shape[1], step):
                parts.append(mod(x[:, t:t + step], cache, ids, **kw))
            outs[label] = torch.cat(parts, dim=1)
            assert cache.cache_seqlens(ids).tolist() == [x.shape[1]] * 2
    for label, o in outs.items():
        torch.testing.assert_close(o, full, rtol=1e-5, atol=1e-5, msg=label)


def test_mla_decode_ragged_batch():
    """Sequences of different lengths decode together (one block table, per-sequence positions)."""
    m, r = _pair("deepseek", "cpu")
    xa, xb = torch.randn(1, 7, 64), torch.randn(1, 3, 64)
    with torch.no_grad():
        cache = m.new_cache(16, 16, dtype=torch.float32)
        a, b = cache.allocate(), cache.allocate()
        m(xa[:, :6], cache, [a])
        m(xb[:, :2], cache, [b])
        step = m(torch.cat([xa[:, 6:7], xb[:, 2:3]]), cache, [a, b])
        torch.testing.assert_close(step[0, 0], m(xa)[0, 6], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[1, 0], m(xb)[0, 2], rtol=1e-5, atol=1e-5)


def test_paged_cache_allocation_and_errors():
    cache = fastlayers.PagedLatentCache(4, 16, 8, 4, torch.float32)
    a, b = cache.allocate(), cache.allocate()
    cache.append([a], torch.randn(1, 20, 8), torch.randn(1, 20, 4))   # 2 blocks
    cache.append([b], torch.randn(1, 16, 8), torch.randn(1, 16, 4))   # 1 block
    assert cache.num_free_blocks == 1 and cache.cache_seqlens([a, b]).tolist() == [20, 16]
    before = cache.kv.clone()
    with pytest.raises(RuntimeError, match="full"):
        cache.append([a, b], torch.randn(2, 13, 8), torch.randn(2, 13, 4))   # needs 2 more blocks
    assert torch.equal(cache.kv, before) and cache.cache_seqlens([a, b]).tolist() == [20, 16]
    cache.free(a)
    assert cache.num_free_blocks == 3
    with pytest.raises(KeyError):
        cache.length(a)
    with pytest.raises(ValueError, match="latent must be"):
        cache.append([b], torch.randn(1, 2, 7), torch.randn(1, 2, 4))
    rows = torch.randn(1, 5, 12)
    cache.append([b], rows[..., :8], rows[..., 8:])
    torch.testing.assert_close(cache.gather(b)[16:], rows[0])
    table = cache.block_table([b])
    assert table.dtype == torch.int32 and table.shape == (1, 2)


def test_kv_cache_bytes_per_token():
    m = fastlayers.MLA(2048, 16, 1344, 128, 32, 32, 64, n_kv_groups=4, dtype=torch.bfloat16)
    assert m.kv_cache_bytes_per_token() == (128 + 32) * 2
    assert m.kv_cache_bytes_per_token(torch.float32) == (128 + 32) * 4


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_kv_groups=3), "divisible by n_kv_groups"),
    (dict(qk_rope_head_dim=7), "even int"),
    (dict(kv_lora_rank=0), "kv_lora_rank must be a positive int"),
])
def test_mla_bad_config(kwargs, match):
    args = dict(dim=64, n_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
                v_head_dim=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fastlayers.MLA(**args)


@pytest.mark.parametrize("cls", [fastlayers.MLA, reference.MLA], ids=["fast", "reference"])
def test_mla_rope_tables_on_the_construction_device(cls):
    """MLA(..., device=d) builds its RoPE tables on d (they were on the CPU, and a ZebraLM made on a GPU
    then failed in the reference model's RoPE indexing: seen on an H200). The meta device shows it here."""
    args = CONFIGS["deepseek"]
    m = cls(*args[:7], n_kv_groups=args[7], max_seq_len=64, device="meta")
    assert m.rope_cos.device.type == "meta" and m.rope_sin.device.type == "meta"
    assert m.rope_cos.shape[0] == 64 and m.rope_cos.dtype == torch.float32
