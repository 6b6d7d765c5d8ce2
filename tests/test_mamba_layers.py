"""The Mamba / Mamba2 layers (and Zebra-Llama's Mamba2 variant): fast module == reference module (forward and
every parameter's gradient, DESIGN.md §4 bound), cached prefill + decode == one full forward, chunked prefill,
state_dict layout (mamba_ssm's names), argument checks, and convert.attention_to_mamba2."""
import math

import pytest
import torch

import fastlayers
from fastlayers import reference
from fastlayers.convert import attention_to_mamba2

from conftest import assert_close_to_ref, seed_of

D = 24
CONFIGS = {  # name: (class name or "zebra", constructor kwargs), at d_model D
    "mamba": ("Mamba", dict(d_state=5, dt_rank=3)),
    "mamba_w3_bias": ("Mamba", dict(d_state=4, d_conv=3, expand=1, bias=True, conv_bias=False)),
    "mamba2": ("Mamba2", dict(d_state=6, headdim=8, ngroups=2, chunk_size=8)),
    "mamba2_limit": ("Mamba2", dict(d_state=4, d_conv=2, expand=1, headdim=4, chunk_size=5, dt_limit=(0.02, 0.3),
                                    bias=True)),
    "zebra": ("zebra", dict(n_heads=4, n_kv_heads=2, head_dim=6)),
    "zebra_mqa_w3": ("zebra", dict(n_heads=3, n_kv_heads=1, head_dim=5, d_conv=3)),  # d_inner 15 != d_model
}


def _make(mod, name, **extra):
    kind, kw = CONFIGS[name]
    kw = {**kw, **extra}
    if kind == "zebra":
        return mod.Mamba2.zebra(D, kw.pop("n_heads"), kw.pop("n_kv_heads"), kw.pop("head_dim"), **kw)
    return getattr(mod, kind)(D, **kw)


def _pair(name, dtype=torch.float32):
    """(fast, reference) with one random state_dict: every parameter perturbed away from its init
    (D, norm weights, biases not 1 / 0), so a wrong index or a missing term shows."""
    torch.manual_seed(seed_of("mamba_layers", name))
    m = _make(fastlayers, name)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n == "A_log":
                p.copy_(torch.log(torch.rand_like(p) * 2 + 0.2))
            elif n.endswith("bias") and n != "dt_proj.bias" and n != "dt_bias":
                p.copy_(0.2 * torch.randn_like(p))
            elif p.dim() == 1 and n not in ("dt_proj.bias", "dt_bias"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif n in ("dt_proj.bias", "dt_bias"):
                p.add_(0.5 * torch.randn_like(p))
    m = m.to(dtype)
    r = _make(reference, name).to(dtype)
    r.load_state_dict(m.state_dict())
    return m, r


def _x(b, t, dtype=torch.float32, *key):
    g = torch.Generator().manual_seed(seed_of("x", b, t, *key))
    return torch.randn(b, t, D, generator=g).to(dtype)


# ----------------------------------------------------------------------------- fast == reference
def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _assert_grad_close(out, ref_hi, ref_lowp, what):
    """A parameter gradient is a reduction over batch and time: relative-norm error against the fp64 reference
    below the §4 tolerance (fp32 1e-5, bf16 1e-2) or at most twice the reference's own error in that dtype
    (some are ill-conditioned: with one norm group per head, the gated RMSNorm's Jacobian is orthogonal to
    y * silu(z), so dD cancels to a small sum: even the bf16 reference is off by ~10 % there); failing that,
    the elementwise §4 bound |out - ref64| <= 2 |ref_lowp - ref64| + atol."""
    tol = 1e-5 if ref_lowp.dtype == torch.float32 else 1e-2
    err, ref_err = _rel(out, ref_hi), _rel(ref_lowp, ref_hi)
    if err < max(tol, 2 * ref_err):
        return
    assert_close_to_ref(out, ref_hi, ref_lowp, f"{what} (relative error {err:.3g} >= max({tol}, 2 x {ref_err:.3g}))")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_and_grads_match_reference(name, dtype):
    """Output and dx of the fast module against the reference in fp64, within 2 |reference(dtype) -
    reference(fp64)| + atol elementwise; every parameter's gradient (a reduction over batch and time) by
    relative-norm error (see _assert_grad_close)."""
    m, r = _pair(name, dtype)
    r64 = _make(reference, name).double()
    r64.load_state_dict(m.state_dict())
    x = _x(3, 13, dtype, name)
    g = _x(3, 13, dtype, name, "grad")
    res = {}
    for label, mod, xx in (("fast", m, x), ("ref", r, x), ("ref64", r64, x.double())):
        xx = xx.clone().requires_grad_()
        out = mod(xx)
        out.backward(g.to(out.dtype))
        res[label] = (out.detach(), xx.grad, {n: p.grad for n, p in mod.named_parameters()})
        mod.zero_grad()
    assert torch.isfinite(res["fast"][0]).all()
    assert_close_to_ref(res["fast"][0], res["ref64"][0], res["ref"][0], f"{name} out")
    assert_close_to_ref(res["fast"][1], res["ref64"][1], res["ref"][1], f"{name} dx")
    for n, gp in res["fast"][2].items():
        assert gp is not None and gp.abs().sum() > 0, f"{name}: no gradient for {n}"
        _assert_grad_close(gp, res["ref64"][2][n], res["ref"][2][n], f"{name} d{n}")


GRADCHECK = {  # tiny fp64 layers: d_model 8
    "mamba": lambda mod: mod.Mamba(8, d_state=3, expand=1, dt_rank=2),
    "mamba2": lambda mod: mod.Mamba2(8, d_state=3, expand=1, headdim=2, ngroups=2, chunk_size=2),
    "zebra": lambda mod: mod.Mamba2.zebra(8, 2, 1, 3, d_conv=3),
}


@pytest.mark.parametrize("chunked", [False, True], ids=["full", "cached-chunk"])
@pytest.mark.parametrize("module", ["fast", "reference"])
@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck_fp64(name, module, chunked):
    """torch.autograd.gradcheck (fast mode) in fp64 with respect to x and every parameter, for a whole sequence
    and for a chunk continuing a filled cache (the cached states are inputs held fixed)."""
    torch.manual_seed(seed_of("gradcheck", name))
    m = GRADCHECK[name](fastlayers if module == "fast" else reference).double()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    with torch.no_grad():
        cache = m.new_cache(2)
        m(x[:, :4], cache)
    names = [n for n, _ in m.named_parameters()]

    def f(xx, *params):
        c = None
        if chunked:
            c = fastlayers.MambaCache(cache.conv_state.clone(), cache.ssm_state.clone())
            c.seqlen = 4
        return torch.func.functional_call(m, dict(zip(names, params)), (xx, c))

    xin = (x[:, 4:] if chunked else x).clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    assert torch.autograd.gradcheck(f, (xin, *params), fast_mode=True)


# ----------------------------------------------------------------------------- caches
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("k", [0, 1, 5])
def test_prefill_then_decode_equals_full_forward(name, k):
    """Prefill k tokens (k = 0: nothing), then decode the rest one token at a time: the outputs of one
    full forward (L = 13: not a multiple of any chunk_size here), for the fast and the reference module;
    both end with the same cache."""
    m, r = _pair(name)
    b, L = 3, 13
    x = _x(b, L, torch.float32, name, "decode")
    with torch.no_grad():
        full = m(x)
        torch.testing.assert_close(r(x), full, rtol=1e-5, atol=1e-5)
        caches = {}
        for label, mod in (("fast", m), ("ref", r)):
            cache = mod.new_cache(b)
            parts = [mod(x[:, :k], cache)] if k else []
            for t in range(k, L):
                parts.append(mod(x[:, t:t + 1], cache))
            torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5, msg=label)
            assert cache.seqlen == L
            caches[label] = cache
    for s in ("conv_state", "ssm_state"):
        torch.testing.assert_close(getattr(caches["fast"], s), getattr(caches["ref"], s), rtol=1e-5, atol=1e-6,
                                   msg=s)
    # the conv state holds the last d_conv conv inputs (mamba_ssm's layout)
    zxbcdt = torch.nn.functional.linear(x[:, -m.d_conv:], m.in_proj.weight, m.in_proj.bias)
    lo = m.d_inner if isinstance(m, fastlayers.Mamba2) else 0
    torch.testing.assert_close(caches["fast"].conv_state, zxbcdt[..., lo:lo + m.conv_channels].transpose(1, 2))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_chunked_prefill(name):
    """T > 1 on a non-empty cache (conv initial states + scan from the cached state; for Mamba-1 the cached
    state's decayed contribution is added): pieces of 4, 1, 2, 6 tokens == one forward, fast and reference."""
    m, r = _pair(name)
    x = _x(2, 13, torch.float32, name, "chunk")
    with torch.no_grad():
        full = m(x)
        for label, mod in (("fast", m), ("ref", r)):
            cache = mod.new_cache(2)
            out, t = [], 0
            for n in (4, 1, 2, 6):
                out.append(mod(x[:, t:t + n], cache))
                t += n
            torch.testing.assert_close(torch.cat(out, dim=1), full, rtol=1e-5, atol=1e-5, msg=label)


@pytest.mark.parametrize("name", ["mamba", "mamba2", "zebra"])
def test_cached_forward_is_differentiable(name):
    """With autograd on, a cached forward (T = 1 included) takes the differentiable scan path (for Mamba-1 on a
    non-empty cache: the scan from zero plus the cached state's decayed part). Chunks 5 + 1 + 7 give the full
    forward's outputs; the last chunk's gradient with respect to its own tokens is the full forward's; the cache
    carries detached states, so no gradient reaches earlier chunks."""
    m, _ = _pair(name)
    x = _x(2, 13, torch.float32, name, "grad-cache").requires_grad_()
    full = m(x)
    cache = m.new_cache(2)
    parts = [m(x[:, :5], cache), m(x[:, 5:6], cache), m(x[:, 6:], cache)]
    out = torch.cat(parts, dim=1)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in parts)
    # the last chunk's output depends on its own input through the scan-from-state path
    gx, = torch.autograd.grad(parts[2].sum(), x)
    gfull, = torch.autograd.grad(full[:, 6:].sum(), x)
    torch.testing.assert_close(gx[:, 6:], gfull[:, 6:], rtol=1e-4, atol=1e-5)
    assert gx[:, :6].abs().max() == 0  # the cache is detached: no gradient into earlier chunks


def test_prefill_overwrites_every_state_element():
    """A prompt of >= d_conv tokens on an empty cache writes all of both states: a cache poisoned with NaN
    (seqlen 0) gives the same prefill and decode as a fresh one."""
    for name in ("mamba", "mamba2", "zebra"):
        m, r = _pair(name)
        x = _x(2, 9, torch.float32, name, "poison")
        with torch.no_grad():
            full = m(x)
            for mod in (m, r):
                cache = mod.new_cache(2)
                cache.conv_state.fill_(float("nan"))
                cache.ssm_state.fill_(float("nan"))
                out = torch.cat([mod(x[:, :5], cache)] + [mod(x[:, t:t + 1], cache) for t in range(5, 9)], dim=1)
                torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5, msg=f"{name} {type(mod).__module__}")


def test_cache_layout_and_bytes():
    m = _make(fastlayers, "mamba")
    c = m.new_cache(3)
    assert c.conv_state.shape == (3, m.d_inner, 4) and c.conv_state.dtype == torch.float32
    assert c.ssm_state.shape == (3, m.d_inner, 5) and c.ssm_state.dtype == torch.float32
    assert c.state_bytes() == 4 * 3 * m.d_inner * (4 + 5)
    m2 = _make(fastlayers, "zebra").to(torch.bfloat16)
    c2 = m2.new_cache(2)
    assert c2.conv_state.shape == (2, 4 * 6 + 2 * 2 * 6, 4) and c2.conv_state.dtype == torch.bfloat16
    assert c2.ssm_state.shape == (2, 4, 6, 6) and c2.ssm_state.dtype == torch.float32
    assert c2.state_bytes() == 2 * 2 * 48 * 4 + 4 * 2 * 4 * 6 * 6
    with torch.no_grad():
        m2(_x(2, 3, torch.bfloat16), c2)
    assert c2.seqlen == 3 and c2.ssm_state.abs().sum() > 0
    c2.reset()
    assert c2.seqlen == 0 and c2.ssm_state.abs().sum() == 0 and c2.conv_state.abs().sum() == 0


@pytest.mark.parametrize("name", ["mamba", "mamba2", "zebra"])
def test_bf16_decode_tracks_full_forward(name):
    """bf16 activations, fp32 SSM state: decoding stays within the bf16 error of the full forward (both against
    the fp64 reference, DESIGN.md §4 bound with bf16 atol)."""
    m, _ = _pair(name, torch.bfloat16)
    r64 = _make(reference, name).double()
    r64.load_state_dict(m.state_dict())
    x = _x(2, 9, torch.bfloat16, name, "bf16-decode")
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2)
        dec = torch.cat([m(x[:, :3], cache)] + [m(x[:, t:t + 1], cache) for t in range(3, 9)], dim=1)
        want = r64(x.double())
    assert_close_to_ref(dec, want, full, f"{name} bf16 decode")


def test_nan_in_nan_out():
    """A NaN input poisons its own sequence from that step on, never the other sequences or earlier steps."""
    for name in ("mamba", "zebra"):
        m, _ = _pair(name)
        x = _x(2, 7, torch.float32, name, "nan")
        x[0, 3, 5] = float("nan")
        with torch.no_grad():
            out = m(x)
            cache = m.new_cache(2)
            dec = torch.cat([m(x[:, :2], cache)] + [m(x[:, t:t + 1], cache) for t in range(2, 7)], dim=1)
        for o in (out, dec):
            assert torch.isnan(o[0, 3:]).all(), name
            assert torch.isfinite(o[0, :3]).all() and torch.isfinite(o[1]).all(), name


# ----------------------------------------------------------------------------- parameters / state_dict
def test_mamba_ssm_state_dict_layout():
    """mamba_ssm's parameter names and shapes, so its checkpoints load (and ours load into the reference)."""
    m = fastlayers.Mamba(64, d_state=16, d_conv=4, expand=2)
    want = {"in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4), "conv1d.bias": (128,),
            "x_proj.weight": (4 + 32, 128), "dt_proj.weight": (128, 4), "dt_proj.bias": (128,),
            "A_log": (128, 16), "D": (128,), "out_proj.weight": (64, 128)}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want
    torch.testing.assert_close(m.A_log[3], torch.log(torch.arange(1, 17, dtype=torch.float32)))
    dt = torch.nn.functional.softplus(m.dt_proj.bias.detach())
    assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
    m2 = fastlayers.Mamba2(64, d_state=16, headdim=32, ngroups=2)  # d_inner 128, nheads 4
    want2 = {"in_proj.weight": (128 + 128 + 2 * 2 * 16 + 4, 64), "conv1d.weight": (128 + 64, 1, 4),
             "conv1d.bias": (192,), "dt_bias": (4,), "A_log": (4,), "D": (4,), "norm.weight": (128,),
             "out_proj.weight": (64, 128)}
    assert {k: tuple(v.shape) for k, v in m2.state_dict().items()} == want2
    a = torch.exp(m2.A_log.detach())
    assert float(a.min()) >= 1 and float(a.max()) <= 16
    z = fastlayers.Mamba2.zebra(64, n_heads=8, n_kv_heads=2, head_dim=8)  # d_xb 16, d_inner 64
    assert (z.nheads, z.headdim, z.d_state, z.ngroups, z.d_xb) == (8, 8, 8, 8, 16)
    assert tuple(z.in_proj.weight.shape) == (64 + 16 + 16 + 64 + 8, 64)
    assert tuple(z.conv1d.weight.shape) == (16 + 16 + 64, 1, 4)
    # a state_dict built from the key list alone (as a mamba_ssm checkpoint would be) loads strictly, both ways
    for cls in (fastlayers.Mamba, reference.Mamba):
        sd = {k: torch.randn(s) for k, s in want.items()}
        mod = cls(64)
        mod.load_state_dict(sd)
        torch.testing.assert_close(mod.A_log, sd["A_log"])
    ref = reference.Mamba2(64, d_state=16, headdim=32, ngroups=2)
    ref.load_state_dict(m2.state_dict())
    m2.load_state_dict(ref.state_dict())


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="headdim"):
        fastlayers.Mamba2(30, expand=2, headdim=16)  # d_inner 60
    with pytest.raises(ValueError, match="ngroups"):
        fastlayers.Mamba2(32, d_state=8, headdim=16, ngroups=3)  # nheads 4
    with pytest.raises(ValueError, match="d_xb"):
        fastlayers.Mamba2(32, d_state=8, expand=1, headdim=8, ngroups=4, d_xb=12)
    with pytest.raises(ValueError, match="d_xb"):
        fastlayers.Mamba2(32, d_state=8, expand=1, headdim=8, ngroups=4, d_xb=24)  # 3 KV groups, 4 heads
    with pytest.raises(ValueError, match="headdim must equal d_state"):
        fastlayers.Mamba2(32, d_state=4, expand=1, headdim=8, ngroups=4, d_xb=16)
    with pytest.raises(ValueError, match="n_kv_heads"):
        fastlayers.Mamba2.zebra(32, 4, 3, 8)
    with pytest.raises(ValueError, match="d_state"):
        fastlayers.Mamba2.zebra(32, 4, 2, 8, d_state=4)
    with pytest.raises(ValueError, match="d_conv"):
        fastlayers.Mamba(16, d_conv=5)
    with pytest.raises(ValueError, match="d_model"):
        fastlayers.Mamba(0)
    with pytest.raises(ValueError, match="dt_rank"):
        fastlayers.Mamba(16, dt_rank=-1)
    with pytest.raises(ValueError, match="dt_min"):
        fastlayers.Mamba2(16, headdim=8, dt_min=0.5, dt_max=0.1)
    m = fastlayers.Mamba2(16, d_state=4, headdim=8)
    with pytest.raises(ValueError, match="d_model"):
        m(torch.randn(2, 3, 15))
    with pytest.raises(ValueError, match="seqlen"):
        m(torch.randn(2, 0, 16))
    with pytest.raises(ValueError, match="new_cache"):
        m(torch.randn(2, 3, 16), m.new_cache(3))
    with pytest.raises(TypeError, match="MambaCache"):
        m(torch.randn(2, 3, 16), object())


# ----------------------------------------------------------------------------- convert.attention_to_mamba2
def test_attention_to_mamba2_places_the_projections():
    d, h, kv, hd = 40, 6, 2, 8  # d_inner 48 != d_model 40, d_xb 16
    g = torch.Generator().manual_seed(seed_of("attention_to_mamba2"))
    w_q, w_k, w_v = (torch.randn(n * hd, d, generator=g) for n in (h, kv, kv))
    w_o = torch.randn(d, h * hd, generator=g)
    rng = torch.get_rng_state()
    sd = attention_to_mamba2(w_q, w_k, w_v, w_o, n_heads=h, n_kv_heads=kv, generator_seed=7)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG must be left untouched"
    m = fastlayers.Mamba2.zebra(d, h, kv, hd)
    m.load_state_dict(sd)  # strict: every key, every shape
    d_inner, d_xb = h * hd, kv * hd
    w_in = m.in_proj.weight.detach()
    assert torch.equal(w_in[d_inner:d_inner + d_xb], w_v)
    assert torch.equal(w_in[d_inner + d_xb:d_inner + 2 * d_xb], w_k)
    assert torch.equal(w_in[d_inner + 2 * d_xb:2 * d_inner + 2 * d_xb], w_q)
    assert torch.equal(m.out_proj.weight.detach(), w_o)
    # the rest is Mamba2's own initialisation, reproducible with the seed
    sd2 = attention_to_mamba2(w_q, w_k, w_v, w_o, h, kv, hd, generator_seed=7)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    torch.manual_seed(7)
    fresh = fastlayers.Mamba2.zebra(d, h, kv, hd).state_dict()
    for k in ("conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight"):
        assert torch.equal(sd[k], fresh[k]), k
    assert torch.equal(sd["in_proj.weight"][:d_inner], fresh["in_proj.weight"][:d_inner])      # z rows
    assert torch.equal(sd["in_proj.weight"][-h:], fresh["in_proj.weight"][-h:])               # dt rows
    # the projections the layer computes are the attention's q, k, v for the same input
    x = torch.randn(2, 5, d, generator=g)
    with torch.no_grad():
        zxbcdt = m.in_proj(x)
        torch.testing.assert_close(zxbcdt[..., d_inner + 2 * d_xb:2 * d_inner + 2 * d_xb], x @ w_q.t())
        assert torch.isfinite(m(x)).all()
    with pytest.raises(ValueError, match="w_k"):
        attention_to_mamba2(w_q, w_k[:-1], w_v, w_o, h, kv)
    with pytest.raises(ValueError, match="w_o"):
        attention_to_mamba2(w_q, w_k, w_v, w_o.t(), h, kv)
    with pytest.raises(ValueError, match="n_kv_heads"):
        attention_to_mamba2(w_q, w_k, w_v, w_o, h, 4)
    bf = attention_to_mamba2(*(w.to(torch.bfloat16) for w in (w_q, w_k, w_v, w_o)), h, kv)
    assert bf["in_proj.weight"].dtype == torch.bfloat16 and math.isfinite(float(bf["out_proj.weight"].sum()))
