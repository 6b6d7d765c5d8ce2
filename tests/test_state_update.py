"""selective_state_update (the Mamba decode step) and the reference scans it must agree with."""
import pytest
import torch

import fastlayers
from fastlayers import reference

from conftest import TRITON_GPU_CASES, assert_rel_err, seed_of

REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _gen(*key):
    return torch.Generator().manual_seed(seed_of(*key))


def _inputs(heads, batch, h, p, n, g, dtype, state_dtype, device, gen, opts=("D", "z", "dt_bias")):
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    if heads:
        state = r(batch, h, p, n)
        x, dt, z = r(batch, h, p), r(batch, h, p) - 1, r(batch, h, p)
        A = -torch.rand(h, p, n, generator=gen) - 0.1
        B, C = r(batch, g, n), r(batch, g, n)
        D, dtb = r(h, p), r(h, p)
    else:
        state = r(batch, p, n)
        x, dt, z = r(batch, p), r(batch, p) - 1, r(batch, p)
        A = -torch.rand(p, n, generator=gen) - 0.1
        B, C = r(batch, n), r(batch, n)
        D, dtb = r(p), r(p)
    t = lambda v, dt_=dtype: v.to(dt_).to(device)  # noqa: E731
    return (t(state, state_dtype), t(x), t(dt), t(A, torch.float32), t(B), t(C),
            t(D, torch.float32) if "D" in opts else None, t(z) if "z" in opts else None,
            t(dtb, torch.float32) if "dt_bias" in opts else None)


def _ref(args, softplus, idx=None):
    """(out, new state) from the reference on float64 copies, and in the input dtypes."""
    hi_args = [None if a is None else a.double().clone() for a in args]
    lo_args = [None if a is None else a.clone() for a in args]
    out_hi = reference.selective_state_update(*hi_args, dt_softplus=softplus, state_batch_indices=idx)
    out_lo = reference.selective_state_update(*lo_args, dt_softplus=softplus, state_batch_indices=idx)
    return (out_hi, hi_args[0]), (out_lo, lo_args[0])


CASES = [  # heads, batch, nheads, headdim, dstate, ngroups
    (False, 3, 1, 37, 16, 1), (True, 2, 4, 16, 32, 1), (True, 3, 8, 8, 64, 2), (True, 1, 6, 5, 7, 3),
]


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "heads{}-b{}h{}p{}n{}g{}".format(*c))
@pytest.mark.parametrize("softplus", [True, False])
def test_state_update(device, backend, dtype, case, softplus):
    heads, batch, h, p, n, g = case
    state_dtype = torch.float32 if dtype == torch.float32 else dtype
    args = _inputs(heads, batch, h, p, n, g, dtype, state_dtype, device, _gen(case, str(dtype), softplus))
    (out_hi, st_hi), (out_lo, st_lo) = _ref(args, softplus)
    state = args[0].clone()
    with torch.no_grad(), fastlayers.use_backend(backend):
        out = fastlayers.selective_state_update(state, *args[1:], dt_softplus=softplus)
    assert out.dtype == dtype and out.shape == args[1].shape
    # A scan step and a reduction over dstate: relative-norm errors (DESIGN.md §4). Elementwise bounds
    # fail legitimately where exp(dt A) s and dt x B nearly cancel (a few ulp of large terms).
    assert_rel_err(out, out_hi, REL_TOL[dtype], "out")
    assert state.dtype == state_dtype
    assert_rel_err(state, st_hi, REL_TOL[dtype], "state")


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
@pytest.mark.parametrize("opts", [(), ("D",), ("z",), ("dt_bias",)], ids=lambda o: "+".join(o) or "none")
def test_state_update_optional_args(device, backend, opts):
    args = _inputs(True, 2, 4, 8, 16, 2, torch.float32, torch.float32, device, _gen("opts", opts), opts)
    (out_hi, st_hi), (out_lo, st_lo) = _ref(args, True)
    state = args[0].clone()
    with torch.no_grad(), fastlayers.use_backend(backend):
        out = fastlayers.selective_state_update(state, *args[1:], dt_softplus=True)
    assert_rel_err(out, out_hi, 1e-5, "out")
    assert_rel_err(state, st_hi, 1e-5, "state")


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
def test_state_update_batch_indices_and_broadcast_views(device, backend):
    """A cache of 5 sequences updated at rows [3, 0]; Mamba-2's stride-0 expanded A, dt, D, dt_bias."""
    gen = _gen("idx")
    batch, h, p, n, g = 2, 4, 6, 16, 1
    cache = torch.randn(5, h, p, n, generator=gen).to(device)
    x = torch.randn(batch, h, p, generator=gen).to(device)
    dt = (torch.randn(batch, h, generator=gen) - 1).to(device)[:, :, None].expand(batch, h, p)
    A = (-torch.rand(h, generator=gen)).to(device)[:, None, None].expand(h, p, n)
    B, C = (torch.randn(batch, g, n, generator=gen).to(device) for _ in range(2))
    D = torch.randn(h, generator=gen).to(device)[:, None].expand(h, p)
    dtb = torch.randn(h, generator=gen).to(device)[:, None].expand(h, p)
    idx = torch.tensor([3, 0], device=device)
    args = (cache, x, dt, A, B, C, D, None, dtb)
    (out_hi, st_hi), (out_lo, st_lo) = _ref(args, True, idx)
    state = cache.clone()
    with torch.no_grad(), fastlayers.use_backend(backend):
        out = fastlayers.selective_state_update(state, *args[1:], dt_softplus=True, state_batch_indices=idx)
    assert_rel_err(out, out_hi, 1e-5, "out")
    assert_rel_err(state, st_hi, 1e-5, "state")
    assert torch.equal(state[[1, 2, 4]], cache[[1, 2, 4]]), "rows outside state_batch_indices changed"


@pytest.mark.parametrize("device,backend", TRITON_GPU_CASES)
def test_state_update_nan(device, backend):
    args = _inputs(True, 2, 2, 4, 8, 1, torch.float32, torch.float32, device, _gen("nan"))
    args[1][1, 0, 2] = float("nan")
    state = args[0].clone()
    with torch.no_grad(), fastlayers.use_backend(backend):
        out = fastlayers.selective_state_update(state, *args[1:], dt_softplus=True)
    assert torch.isnan(out[1, 0, 2]) and torch.isnan(state[1, 0, 2]).all()
    assert not torch.isnan(out[0]).any() and not torch.isnan(state[0]).any()


def test_decode_steps_match_reference_scans():
    """Step-by-step decoding with the cpu kernel equals the reference Mamba-1 and Mamba-2 scans."""
    gen = _gen("scan")
    b, L, d, n = 2, 9, 6, 4
    u, delta, z = (torch.randn(b, d, L, generator=gen) for _ in range(3))
    A = -torch.rand(d, n, generator=gen)
    Bm, Cm = torch.randn(b, n, L, generator=gen), torch.randn(b, n, L, generator=gen)
    D, db = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    out, last = reference.selective_scan(u, delta, A, Bm, Cm, D, z, db, True, True)
    state = torch.zeros(b, d, n)
    steps = [fastlayers.selective_state_update(state, u[..., t], delta[..., t], A, Bm[..., t], Cm[..., t], D,
                                               z[..., t], db, True) for t in range(L)]
    torch.testing.assert_close(torch.stack(steps, -1), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)

    bb, L, h, p, g, n = 2, 7, 4, 3, 2, 5
    x, zz = torch.randn(bb, L, h, p, generator=gen), torch.randn(bb, L, h, p, generator=gen)
    dt, A2 = torch.randn(bb, L, h, generator=gen), -torch.rand(h, generator=gen)
    B2, C2 = torch.randn(bb, L, g, n, generator=gen), torch.randn(bb, L, g, n, generator=gen)
    D2, dtb = torch.randn(h, generator=gen), torch.randn(h, generator=gen)
    init = torch.randn(bb, h, p, n, generator=gen)
    y, fin = reference.ssd_scan(x, dt, A2, B2, C2, D=D2, z=zz, dt_bias=dtb, initial_states=init,
                                dt_softplus=True, return_final_states=True)
    state = init.clone()
    steps = [fastlayers.selective_state_update(
        state, x[:, t], dt[:, t, :, None].expand(bb, h, p), A2[:, None, None].expand(h, p, n), B2[:, t], C2[:, t],
        D2[:, None].expand(h, p), zz[:, t], dtb[:, None].expand(h, p), True) for t in range(L)]
    torch.testing.assert_close(torch.stack(steps, 1), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, fin, rtol=1e-5, atol=1e-5)


def test_ssd_reference_seq_idx_restarts_state():
    """Packed sequences: the reference scan over [a | b] with seq_idx equals scanning a and b apart."""
    gen = _gen("seq_idx")
    L1, L2, h, p, n = 4, 5, 2, 3, 4
    mk = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x, dt, B, C = mk(1, L1 + L2, h, p), mk(1, L1 + L2, h), mk(1, L1 + L2, 1, n), mk(1, L1 + L2, 1, n)
    A = -torch.rand(h, generator=gen)
    seq_idx = torch.tensor([[0] * L1 + [1] * L2])
    y = reference.ssd_scan(x, dt, A, B, C, seq_idx=seq_idx, dt_softplus=True)
    ya = reference.ssd_scan(x[:, :L1], dt[:, :L1], A, B[:, :L1], C[:, :L1], dt_softplus=True)
    yb = reference.ssd_scan(x[:, L1:], dt[:, L1:], A, B[:, L1:], C[:, L1:], dt_softplus=True)
    torch.testing.assert_close(y, torch.cat([ya, yb], 1))


def test_state_update_opcheck():
    args = _inputs(True, 2, 4, 8, 16, 2, torch.float32, torch.float32, "cpu", _gen("opcheck"))
    torch.library.opcheck(torch.ops.fastlayers.selective_state_update,
                          (*args, None, True, "cpu"))


@pytest.mark.parametrize("bad,match", [
    (dict(A=torch.randn(4, 8)), "A must have shape"),
    (dict(dt=torch.randn(2, 4, 7)), "dt must have shape"),
    (dict(B=torch.randn(2, 3, 16)), "ngroups"),
    (dict(x=torch.ones(2, 4, 8, dtype=torch.int64)), "floating"),
    (dict(state=torch.zeros(2, 4, 8, 16, dtype=torch.int32)), "floating"),
    (dict(state_batch_indices=torch.tensor([0, 9])), "state_batch_indices span"),
    (dict(state_batch_indices=torch.tensor([1, 1])), "must not repeat"),
    (dict(D=torch.randn(8)), "D must have shape"),
])
def test_state_update_bad_input_leaves_state(bad, match, monkeypatch):
    from fastlayers.backends import cpu as cpu_backend
    monkeypatch.setattr(cpu_backend, "selective_state_update", lambda *a: pytest.fail("kernel ran on bad input"))
    args = dict(zip(("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias"),
                    _inputs(True, 2, 4, 8, 16, 2, torch.float32, torch.float32, "cpu", _gen("bad"))))
    args.update(bad)
    before = args["state"].clone()
    with pytest.raises((ValueError, TypeError), match=match), torch.no_grad():
        fastlayers.selective_state_update(**args)
    assert torch.equal(args["state"], before)
