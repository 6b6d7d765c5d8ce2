"""mla_decode: every backend against the reference (DESIGN.md §4)."""
import pytest
import torch

import fastlayers
from fastlayers import reference

from conftest import FAST_CASES, assert_close_to_ref, assert_rel_err, is_interpreted, seed_of

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _case(batch, s_q, heads, latent, rope, page, lens, dtype, device, seed, wide_table=True, h_kv=1, poison=False,
          head_pad=0):
    """Random cache and queries; block tables are shuffled pages, read through a column slice of a
    wider table (non-contiguous rows). h_kv KV heads; head_pad > 0: the cache is a view whose KV heads are
    D + head_pad elements apart (a strided head dim). poison: NaN in every cache row no sequence uses
    (the tails of last pages, the spare blocks), which must not reach any output."""
    g = torch.Generator().manual_seed(seed)
    d = latent + rope
    blocks = [-(-n // page) for n in lens]
    nb = sum(blocks) + 3
    kv = torch.randn(nb, page, h_kv, d + head_pad, generator=g)
    if poison:
        kv[:] = float("nan")
    perm = torch.randperm(nb, generator=g)
    width = max(max(blocks), 1) + 2
    table = torch.full((batch, width + (3 if wide_table else 0)), -1, dtype=torch.int32)
    i = 0
    for b, k in enumerate(blocks):
        table[b, :k] = perm[i:i + k].int()
        if poison:  # the rows sequence b uses get values
            for t in range(lens[b]):
                kv[table[b, t // page], t % page, :, :d] = torch.randn(h_kv, d, generator=g)
        i += k
    kv = kv.to(dtype).to(device)[..., :d]
    table = table.to(device)
    bt = table[:, :width] if wide_table else table
    q = torch.randn(batch, s_q, heads, d, generator=g).to(dtype).to(device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, kv, bt, seqlens


def _check(device, backend, q, kv, bt, seqlens, latent, causal, scale=None):
    with torch.no_grad(), fastlayers.use_backend(backend):
        out, lse = fastlayers.mla_decode(q, kv, bt, seqlens, latent, softmax_scale=scale, causal=causal)
    hi = reference.mla_decode(q.double(), kv.double(), bt, seqlens, latent, scale, causal)
    lo = reference.mla_decode(q, kv, bt, seqlens, latent, scale, causal)
    assert out.shape == (*q.shape[:3], latent) and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert_close_to_ref(out, hi[0], lo[0], "out")
    # A query that sees no key: out 0 and lse +inf (FlashMLA's convention), never -inf.
    inf = torch.isinf(hi[1])
    assert not torch.isneginf(hi[1]).any() and not torch.isneginf(lse).any(), "lse: -inf"
    assert torch.equal(torch.isposinf(lse).cpu(), inf.cpu()), "lse: +inf pattern differs"
    if inf.any():
        rows = inf.transpose(1, 2).cpu()  # (B, s_q, H)
        assert torch.equal(out.cpu()[rows], torch.zeros_like(out.cpu()[rows])), "out of a query that sees no key"
    if (~inf).any():
        assert_rel_err(lse[~inf], hi[1][~inf], 1e-5, "lse")


SIZES = [(128, 32), (128, 64), (160, 64), (512, 64), (64, 0)]


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("latent,rope", SIZES, ids=lambda v: str(v))
def test_mla_decode_sizes(device, backend, latent, rope):
    """Every listed latent/rope size; mixed lengths in one batch incl. 0 and mid-page ends."""
    q, kv, bt, lens = _case(4, 1, 8, latent, rope, 16, [37, 0, 16, 161], torch.bfloat16, device, latent + rope)
    _check(device, backend, q, kv, bt, lens, latent, False)


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True), (4, True), (4, False)])
def test_mla_decode_queries(device, backend, dtype, s_q, causal):
    q, kv, bt, lens = _case(3, s_q, 4, 64, 32, 16, [45, 3, 64], dtype, device, 7 * s_q + causal)
    _check(device, backend, q, kv, bt, lens, 64, causal)


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("heads,page", [(1, 16), (16, 64), (128, 16)])
def test_mla_decode_heads_pages(device, backend, heads, page):
    if is_interpreted(device, backend) and heads == 128:
        pytest.skip("interpreter: 128 heads are covered on a GPU")
    q, kv, bt, lens = _case(2, 1, heads, 64, 32, page, [200, 77], torch.float32, device, heads + page)
    _check(device, backend, q, kv, bt, lens, 64, False, scale=0.05)


# ----------------------------------------------------------------------------- several KV heads
# FlashMLA's dense decoding layout: kv_cache (num_blocks, page, h_kv, D), q head h reads KV head
# h // (h_q / h_kv) (contiguous groups). (h_kv, h_q): h_q == h_kv, and multiples of it.
KV_HEADS = [(1, 3), (2, 2), (2, 6), (3, 3), (3, 12), (8, 8), (8, 16)]


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("h_kv,h_q", KV_HEADS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("s_q,causal", [(1, False), (3, True)])
def test_mla_decode_kv_heads(device, backend, h_kv, h_q, dtype, s_q, causal):
    """h_kv KV heads: lengths 0, mid-page, whole pages and several pages in one batch, shuffled block
    tables, NaN in every cache row no sequence uses (it must not leak), causal s_q > 1."""
    lens = [37, 0, 32, 70] if is_interpreted(device, backend) else [37, 0, 32, 161]
    q, kv, bt, seqlens = _case(4, s_q, h_q, 64, 32, 16, lens, dtype, device,
                               seed_of("kvh", h_kv, h_q, str(dtype), s_q), h_kv=h_kv, poison=True)
    _check(device, backend, q, kv, bt, seqlens, 64, causal)


def test_mla_decode_reference_kv_head_groups():
    """The oracle's head mapping: query heads [g * H / h_kv, (g + 1) * H / h_kv) attend over KV head g alone,
    i.e. the result equals h_kv one-KV-head problems (FlashMLA's contiguous groups)."""
    q, kv, bt, lens = _case(3, 2, 6, 64, 32, 16, [40, 0, 17], torch.float64, "cpu", 21, h_kv=3)
    out, lse = reference.mla_decode(q, kv, bt, lens, 64, 0.2, True)
    for g in range(3):
        o_g, l_g = reference.mla_decode(q[:, :, 2 * g:2 * g + 2], kv[:, :, g:g + 1], bt, lens, 64, 0.2, True)
        torch.testing.assert_close(out[:, :, 2 * g:2 * g + 2], o_g, rtol=0, atol=0)
        torch.testing.assert_close(lse[:, 2 * g:2 * g + 2], l_g, rtol=0, atol=0)
    assert not torch.equal(out[:, :, 0], out[:, :, 2]), "different KV heads must give different outputs"


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("h_kv,h_q,page", [(2, 4, 16), (3, 6, 64)])
def test_mla_decode_kv_heads_strided(device, backend, h_kv, h_q, page):
    """A cache whose KV heads are D + 8 elements apart (a view of a wider cache, no copy) and a query
    that is a view too; a sequence longer than one split on the CPU backend."""
    n = 300 if is_interpreted(device, backend) else 700
    q, kv, bt, seqlens = _case(2, 2, h_q, 128, 64, page, [n, 45], torch.bfloat16, device,
                               seed_of("kvs", h_kv, page), h_kv=h_kv, poison=True, head_pad=8)
    assert kv.stride(2) == 200 and kv.stride(-1) == 1
    qw = torch.cat([q, q[..., :8]], -1)[..., :192]
    assert not qw.is_contiguous()
    _check(device, backend, qw, kv, bt, seqlens, 128, True)


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_mla_decode_kv_heads_nan(device, backend):
    """NaN in one query row poisons that row only; NaN in a visible row of KV head 1 poisons exactly the
    heads of group 1 of that sequence (2 KV heads x 3 query heads), nothing else."""
    q, kv, bt, lens = _case(2, 1, 6, 64, 32, 16, [20, 20], torch.float32, device, 16, h_kv=2)
    q[0, 0, 4, 3] = float("nan")                        # sequence 0, head 4 (group 1)
    kv[int(bt[1, 0]), 5, 1, 7] = float("nan")           # sequence 1, token 5, KV head 1
    with torch.no_grad(), fastlayers.use_backend(backend):
        out, lse = fastlayers.mla_decode(q, kv, bt, lens, 64)
    want = torch.zeros(2, 1, 6, dtype=torch.bool)
    want[0, 0, 4] = True
    want[1, 0, 3:] = True
    assert torch.equal(torch.isnan(out).all(-1).cpu(), want)
    assert torch.equal(torch.isnan(lse).cpu(), want.transpose(1, 2))
    assert not torch.isnan(out.cpu()[~want]).any()


TRITON_CASES = [c for c in FAST_CASES if c.values[1] == "triton"]


@pytest.mark.parametrize("device,backend", TRITON_CASES)
@pytest.mark.parametrize("block_r,block_t,num_stages", [(16, None, None), (32, 64, 2), (64, 16, 3)])
def test_mla_decode_triton_configs(device, backend, block_r, block_t, num_stages, monkeypatch):
    """The tuning overrides of the Triton split kernel (block of query rows, pipelining depth) give the
    reference's result: 2 queries x 20 heads = 40 rows, 1-3 row blocks (the last partial), causal."""
    from fastlayers.backends import triton_mla
    monkeypatch.setitem(triton_mla.CONFIG, "block_r", block_r)
    monkeypatch.setitem(triton_mla.CONFIG, "block_t", block_t)
    monkeypatch.setitem(triton_mla.CONFIG, "num_stages", num_stages)
    q, kv, bt, lens = _case(2, 2, 20, 64, 32, 16, [50, 33], torch.float32, device, block_r)
    _check(device, backend, q, kv, bt, lens, 64, True)


@pytest.mark.parametrize("device,backend", TRITON_CASES)
def test_mla_decode_triton_config_errors(device, backend, monkeypatch):
    from fastlayers.backends import triton_mla
    q, kv, bt, lens = _case(1, 1, 2, 64, 32, 16, [5], torch.float32, device, 1)
    for name, bad in (("block_r", 24), ("block_t", 8)):
        monkeypatch.setitem(triton_mla.CONFIG, name, bad)
        with pytest.raises(ValueError, match=f"{name} must be a power of two"), torch.no_grad(), \
                fastlayers.use_backend(backend):
            fastlayers.mla_decode(q, kv, bt, lens, 64)
        monkeypatch.setitem(triton_mla.CONFIG, name, None)


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_mla_decode_long_single_sequence_splits(device, backend):
    """One long sequence at batch 1 is split (flash-decoding); the merge matches the reference."""
    n = 700 if is_interpreted(device, backend) else 5000
    q, kv, bt, lens = _case(1, 1, 4, 64, 32, 16, [n], torch.float32, device, 11)
    _check(device, backend, q, kv, bt, lens, 64, False)
    be = fastlayers.backends.load(backend)
    assert be.mla_decode_splits(1, n, torch.device(device))[0] > 1, "a long sequence at batch 1 must be split"


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_mla_decode_causal_fewer_tokens_than_queries(device, backend):
    """Causal queries that see no cached key give out 0 and lse +inf, as FlashMLA (never NaN)."""
    q, kv, bt, lens = _case(2, 4, 2, 64, 32, 16, [2, 0], torch.float32, device, 5)
    _check(device, backend, q, kv, bt, lens, 64, True)


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_mla_decode_nan(device, backend):
    q, kv, bt, lens = _case(2, 1, 2, 64, 32, 16, [20, 20], torch.float32, device, 6)
    q[1, 0, 1, 3] = float("nan")
    with torch.no_grad(), fastlayers.use_backend(backend):
        out, lse = fastlayers.mla_decode(q, kv, bt, lens, 64)
    assert torch.isnan(out[1, 0, 1]).all() and torch.isnan(lse[1, 1, 0])
    assert not torch.isnan(out[0]).any() and not torch.isnan(out[1, 0, 0]).any()


@pytest.mark.parametrize("h_kv", [1, 2])
def test_mla_decode_opcheck(h_kv):
    q, kv, bt, lens = _case(2, 2, 4, 64, 32, 16, [20, 33], torch.float32, "cpu", 8, wide_table=False, h_kv=h_kv)
    torch.library.opcheck(torch.ops.fastlayers.mla_decode, (q, kv, bt, lens, 64, 0.1, True, "cpu"))


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(block_table=a["block_table"][:, :1]), "block_table holds"),
    (lambda a: a.update(q=a["q"][..., :-16]), "must equal the cache's row size"),
    (lambda a: a.update(kv_cache=a["kv_cache"].to(torch.float16)), "must match"),
    (lambda a: a.update(head_dim_v=200), "head_dim_v must be"),
    (lambda a: a.update(kv_cache=a["kv_cache"][:, :12]), "power of two"),
    (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), "int32"),
    (lambda a: a.update(block_table=a["block_table"] + 1000), "points outside"),
    (lambda a: a.update(softmax_scale=-1.0), "softmax_scale"),
    (lambda a: a.update(kv_cache=a["kv_cache"].expand(-1, -1, 3, -1)), r"n_heads = 4 must be a multiple of kv_cache's h_kv = 3"),
    (lambda a: a.update(kv_cache=a["kv_cache"][:, :, :0]), r"h_kv >= 1"),
    (lambda a: a.update(kv_cache=a["kv_cache"][:, :, 0]), r"kv_cache must be \(num_blocks, page_size, h_kv, D\)"),
    (lambda a: a.update(q=a["q"][0]), r"q must be \(batch, s_q, n_heads, D\)"),
])
def test_mla_decode_bad_input(mutate, match, monkeypatch):
    from fastlayers.backends import cpu as cpu_backend
    monkeypatch.setattr(cpu_backend, "mla_decode", lambda *a: pytest.fail("kernel ran on bad input"))
    q, kv, bt, lens = _case(2, 1, 4, 64, 32, 16, [40, 17], torch.float32, "cpu", 9)
    args = dict(q=q, kv_cache=kv, block_table=bt, cache_seqlens=lens, head_dim_v=64)
    mutate(args)
    with pytest.raises((ValueError, TypeError), match=match):
        fastlayers.mla_decode(**args)


def test_mla_decode_block_table_bounds():
    """Only the blocks a sequence uses are checked: unused entries may hold anything (-1 padding), a bad
    used entry is named by its row."""
    q, kv, bt, lens = _case(2, 1, 4, 64, 32, 16, [40, 17], torch.float32, "cpu", 9)
    with torch.no_grad(), fastlayers.use_backend("reference"):
        want, _ = fastlayers.mla_decode(q, kv, bt, lens, 64)
    padded = torch.cat([bt, torch.full((2, 3), -1, dtype=torch.int32)], 1)
    padded[1, 2:] = 10 ** 6  # row 1 uses 2 blocks of 16 for 17 tokens
    with torch.no_grad():
        out, _ = fastlayers.mla_decode(q, kv, padded, lens, 64)
    torch.testing.assert_close(out, want)
    padded[1, 1] = -3
    with pytest.raises(ValueError, match="block_table row 1 points outside"):
        fastlayers.mla_decode(q, kv, padded, lens, 64)


@pytest.mark.parametrize("path", ["C", "torch"])
def test_mla_decode_checks_both_paths(path, monkeypatch):
    """The argument checks of CPU tensors run in one C++ pass (_C.mla_check_table); without _C the torch
    ops do them. Both give the same errors, on strided (non-contiguous) tables and lengths too."""
    import fastlayers.ops.mla as mla_op
    if path == "torch":
        monkeypatch.setattr(mla_op._cpu_backend, "_C", None)
    elif mla_op._cpu_backend._C is None:
        pytest.skip("fastlayers._C is not built")
    q, kv, bt, lens = _case(3, 1, 4, 64, 32, 16, [40, 0, 17], torch.float32, "cpu", 9)
    wide = torch.full((bt.shape[1] + 2, 3), -7, dtype=torch.int32)
    table = wide.t()[:, 1:bt.shape[1] + 1]  # a strided view holding bt
    table.copy_(bt)
    assert not table.is_contiguous()
    lens2 = torch.stack([lens, lens + 99], 1)[:, 0]  # stride 2
    with torch.no_grad(), fastlayers.use_backend("reference"):
        want, _ = fastlayers.mla_decode(q, kv, bt, lens, 64)
        out, _ = fastlayers.mla_decode(q, kv, table, lens2, 64)
    torch.testing.assert_close(out, want)
    table[2, 1] = kv.shape[0]  # row 2 uses 2 blocks (17 tokens, page 16)
    with pytest.raises(ValueError, match="block_table row 2 points outside"):
        fastlayers.mla_decode(q, kv, table, lens2, 64)
    table[2, 1] = bt[2, 1]
    table[1, 0] = -1  # row 1 has no tokens: its entries are not used
    lens2[0] = 10 ** 4
    with pytest.raises(ValueError, match="sequence 0 has 10000 cached tokens"):
        fastlayers.mla_decode(q, kv, table, lens2, 64)
    lens2[0] = -2
    with pytest.raises(ValueError, match="cache_seqlens must be >= 0; got -2"):
        fastlayers.mla_decode(q, kv, table, lens2, 64)


def test_mla_decode_gpu_lens_check_reuse(monkeypatch):
    """The GPU path's check of cache_seqlens (a host sync) is skipped for a tensor already checked at the same
    version, table width and page, only when asked (the Triton backend on CUDA). Run here on CPU tensors with
    the C++ check off, which takes that path."""
    import fastlayers.ops.mla as mla_op
    monkeypatch.setattr(mla_op._cpu_backend, "_C", None)
    q, kv, bt, lens = _case(2, 1, 4, 64, 32, 16, [40, 17], torch.float32, "cpu", 9)
    args = (q, kv, bt, lens, 64, None)
    assert mla_op._check("t", *args, reuse=True) == 40
    lens.numpy()[0] = 10 ** 4  # a raw write: no version bump, the check is reused
    assert mla_op._check("t", *args, reuse=True) == 40
    with pytest.raises(ValueError, match="sequence 0 has 10000 cached tokens"):
        mla_op._check("t", *args)  # not asked to reuse: checked
    with pytest.raises(ValueError, match="block_table holds"):
        mla_op._check("t", q, kv, bt[:, :1], lens, 64, None, reuse=True)  # another table width
    lens[0] = 10 ** 4  # an in-place op bumps the version
    with pytest.raises(ValueError, match="sequence 0 has 10000 cached tokens"):
        mla_op._check("t", *args, reuse=True)
    with torch.inference_mode():
        ilens = torch.tensor([40, 17], dtype=torch.int32)
        assert mla_op._check("t", q, kv, bt, ilens, 64, None, reuse=True) == 40
        ilens[0] = 10 ** 4  # no version counter: checked every call
        with pytest.raises(ValueError, match="sequence 0 has 10000"):
            mla_op._check("t", q, kv, bt, ilens, 64, None, reuse=True)


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_mla_decode_kernels_clamp_lengths(device, backend):
    """The kernels read no block-table entry past the table's width, even for lengths the wrapper did not
    see (a reused check): they attend over the tokens the table holds."""
    be = fastlayers.backends.load(backend)
    q, kv, bt, lens = _case(2, 1, 4, 64, 32, 16, [40, 17], torch.float32, device, 12, wide_table=False)
    bt = torch.where(bt < 0, torch.zeros_like(bt), bt)  # every entry a valid block: the full table is read
    cap = bt.shape[1] * 16
    want = reference.mla_decode(q, kv, bt, torch.tensor([cap, 17], dtype=torch.int32, device=device), 64, 0.1,
                                False)
    over = torch.tensor([cap + 1000, 17], dtype=torch.int32, device=device)
    out, lse = torch.empty(2, 1, 4, 64, device=device), torch.empty(2, 4, 1, device=device)
    n_splits, tok = be.mla_decode_splits(2, cap, torch.device(device), 4)
    ws = torch.empty(2, n_splits, 1, 4, 64, device=device), torch.empty(2, n_splits, 1, 4, device=device)
    be.mla_decode(q, kv, bt, over, 64, 0.1, False, tok, out, lse, *ws)
    torch.testing.assert_close(out, want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, want[1], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the CPU kernels
def _cpu_kernels():
    from fastlayers.backends import cpu as cpu_backend
    if cpu_backend._C is None:
        return []
    return ["scalar"] + (["vector"] if cpu_backend.mla_decode_has_vector() else [])


@pytest.mark.parametrize("kernel", ["scalar", "vector"])
@pytest.mark.parametrize("heads,s_q,latent,rope,page,lens,dtype", [
    (1, 1, 64, 32, 16, [200, 77], torch.float32),        # one query row (8-lane block mostly padding)
    (3, 1, 61, 7, 16, [131, 1, 0], torch.float32),       # D = 68, dv = 61: neither a multiple of 8
    (3, 2, 125, 3, 16, [300, 2], torch.bfloat16),       # 6 rows; dv % 8 = 5; bf16 rows converted per tile
    (5, 3, 100, 17, 32, [97, 250], torch.float16),      # 15 rows: 2 lane blocks, the second partial
    (128, 1, 64, 32, 16, [70, 33], torch.float32),      # 128 rows: 8 blocks of 16 query rows
    (24, 1, 130, 2, 64, [1000], torch.float32),        # 3 lane blocks (2 + 1); split at batch 1
    (7, 4, 40, 9, 16, [75, 4, 3], torch.float32),       # causal s_q 4: 28 rows; lengths < s_q
])
def test_mla_decode_cpu_kernels(monkeypatch, kernel, heads, s_q, latent, rope, page, lens, dtype):
    """The scalar and the vectorised CPU kernels against the reference at awkward sizes: head counts
    1, 3, 128; D and head_dim_v not multiples of the 8-float register; tiles that cross pages of 16."""
    from fastlayers.backends import cpu as cpu_backend
    if kernel not in _cpu_kernels():
        pytest.skip(f"the {kernel} CPU kernel is not available here")
    monkeypatch.setattr(cpu_backend, "MLA_KERNEL", kernel)
    causal = s_q > 1 and heads != 3
    q, kv, bt, seqlens = _case(len(lens), s_q, heads, latent, rope, page, lens, dtype, "cpu",
                               seed_of(kernel, heads, s_q, latent, rope, page, str(dtype)))
    _check("cpu", "cpu", q, kv, bt, seqlens, latent, causal, scale=0.3)


@pytest.mark.parametrize("kernel", ["scalar", "vector"])
@pytest.mark.parametrize("h_kv,heads,s_q,lens,dtype", [
    (2, 6, 3, [131, 1, 0], torch.float32),      # 9 rows a KV head: 2 lane blocks, causal, lengths < s_q
    (3, 3, 1, [200, 77], torch.bfloat16),       # one row a KV head
    (8, 64, 1, [90], torch.float16),            # 8 rows a KV head; splits at batch 1
])
def test_mla_decode_cpu_kernels_kv_heads(monkeypatch, kernel, h_kv, heads, s_q, lens, dtype):
    """The scalar and the vectorised CPU kernels with several KV heads (one task per sequence, KV head and
    split), NaN in the unused cache rows."""
    from fastlayers.backends import cpu as cpu_backend
    if kernel not in _cpu_kernels():
        pytest.skip(f"the {kernel} CPU kernel is not available here")
    monkeypatch.setattr(cpu_backend, "MLA_KERNEL", kernel)
    q, kv, bt, seqlens = _case(len(lens), s_q, heads, 72, 24, 16, lens, dtype, "cpu",
                               seed_of("cpukvh", kernel, h_kv, heads), h_kv=h_kv, poison=True)
    _check("cpu", "cpu", q, kv, bt, seqlens, 72, s_q > 1, scale=0.3)


@pytest.mark.parametrize("kernel", ["scalar", "vector"])
def test_mla_decode_cpu_kernels_nan_and_empty(monkeypatch, kernel):
    """NaN in q or in a visible cache row gives NaN for exactly the rows that see it; a sequence of
    length 0 and causal queries without a visible key give out 0 and lse +inf (FlashMLA's convention)."""
    from fastlayers.backends import cpu as cpu_backend
    if kernel not in _cpu_kernels():
        pytest.skip(f"the {kernel} CPU kernel is not available here")
    monkeypatch.setattr(cpu_backend, "MLA_KERNEL", kernel)
    q, kv, bt, lens = _case(3, 2, 3, 72, 8, 16, [90, 1, 0], torch.float32, "cpu", seed_of("nan", kernel))
    q[0, 1, 2, 70] = float("nan")                       # one query row of sequence 0
    kv[int(bt[1, 0]), 0, 0, 5] = float("nan")           # the only token of sequence 1
    with torch.no_grad(), fastlayers.use_backend("cpu"):
        out, lse = fastlayers.mla_decode(q, kv, bt, lens, 72, causal=True)
    nan_out = torch.isnan(out).all(-1)
    want = torch.zeros_like(nan_out)
    want[0, 1, 2] = True
    want[1, 1] = True                                   # sequence 1: query 1 sees token 0 (NaN) ...
    assert torch.equal(nan_out, want), nan_out
    assert torch.equal(torch.isnan(lse), want.transpose(1, 2))
    assert not torch.isnan(out[~want]).any()
    assert torch.equal(out[1, 0], torch.zeros_like(out[1, 0]))  # ... query 0 sees nothing
    assert torch.isposinf(lse[1, :, 0]).all() and torch.isposinf(lse[2]).all()
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_mla_decode_cpu_kernels_agree_bf16_long(monkeypatch):
    """Vectorised vs scalar kernel on one long bf16 sequence (splits, 64-row tiles over pages of 16):
    both within the reference's error bound, and close to each other (fp32 accumulation in both)."""
    from fastlayers.backends import cpu as cpu_backend
    if "vector" not in _cpu_kernels():
        pytest.skip("the vectorised CPU kernel is not available here")
    q, kv, bt, lens = _case(1, 1, 16, 128, 64, 16, [3001], torch.bfloat16, "cpu", seed_of("long-bf16"))
    outs = {}
    for kernel in ("scalar", "vector"):
        monkeypatch.setattr(cpu_backend, "MLA_KERNEL", kernel)
        _check("cpu", "cpu", q, kv, bt, lens, 128, False)
        with torch.no_grad(), fastlayers.use_backend("cpu"):
            outs[kernel] = fastlayers.mla_decode(q, kv, bt, lens, 128)
    assert_rel_err(outs["vector"][1], outs["scalar"][1], 1e-6, "lse vector vs scalar")


def test_mla_decode_cpu_kernel_choice_errors(monkeypatch):
    """Asking for the vectorised kernel with fp64 is a clear error, not a silent scalar run."""
    from fastlayers.backends import cpu as cpu_backend
    if "vector" not in _cpu_kernels():
        pytest.skip("the vectorised CPU kernel is not available here")
    monkeypatch.setattr(cpu_backend, "MLA_KERNEL", "vector")
    q, kv, bt, lens = _case(1, 1, 2, 64, 32, 16, [20], torch.float64, "cpu", 3)
    with torch.no_grad(), fastlayers.use_backend("cpu"), pytest.raises(ValueError, match="fp64"):
        fastlayers.mla_decode(q, kv, bt, lens, 64)
