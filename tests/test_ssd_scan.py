"""ssd_scan (the Mamba-2 scan, mamba_chunk_scan_combined's semantics): every backend against the reference
recurrence run in fp64 on upcast inputs, gradients, packed sequences, bad input."""
import pytest
import torch

import fastlayers
from fastlayers import reference

from conftest import _case, assert_rel_err, seed_of

REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-10}
# The triton cases run under the interpreter on CPU tensors here, on CUDA tensors where a GPU is present
# (each is skipped, with the reason, where it cannot run). Inputs are made on the CPU; _run moves them.
BACKENDS = [_case("cpu", "cpu"), _case("cpu", "triton"), _case("cuda", "triton"), _case("cpu", "reference")]
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def _gen(*key):
    return torch.Generator().manual_seed(seed_of(*key))


def _inputs(b, L, h, p, n, g, dtype, gen, opts=("D", "z", "dt_bias", "initial_states"), D_shape="hp",
            softplus=True):
    """Fresh random inputs (never zeros): x, dt, B, C, z in dtype; A, D, dt_bias, initial_states in fp32
    (as Mamba-2 keeps them) unless dtype is fp64."""
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    param = torch.float64 if dtype == torch.float64 else torch.float32
    x, z = r(b, L, h, p), r(b, L, h, p)
    dt = r(b, L, h) * 0.5 - 1 if softplus else torch.rand(b, L, h, generator=gen) * 0.5 + 0.05
    A = -(torch.rand(h, generator=gen) * 2 + 0.1)
    B, C = r(b, L, g, n), r(b, L, g, n)
    D = r(h, p) if D_shape == "hp" else r(h)
    dtb, init = r(h) * 0.5, r(b, h, p, n)
    return dict(x=x.to(dtype), dt=dt.to(dtype), A=A.to(param), B=B.to(dtype), C=C.to(dtype),
                D=D.to(param) if "D" in opts else None, z=z.to(dtype) if "z" in opts else None,
                dt_bias=dtb.to(param) if "dt_bias" in opts else None,
                initial_states=init.to(param) if "initial_states" in opts else None)


def _ref64(args, **kw):
    hi = {k: None if v is None else v.double() for k, v in args.items()}
    return reference.ssd_scan(**hi, **kw)


def _run(backend, args, device="cpu", **kw):
    """ssd_scan on `device` (inputs moved there, differentiably; results moved back to the CPU)."""
    to = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    with fastlayers.use_backend(backend):
        res = fastlayers.ssd_scan(**{k: to(v) for k, v in args.items()}, **{k: to(v) for k, v in kw.items()})
    return tuple(r.cpu() for r in res) if isinstance(res, tuple) else res.cpu()


def _small(device, backend):
    """Shapes: the triton interpreter is slow, keep it tiny (on a GPU the full shapes run)."""
    return backend == "triton" and device == "cpu"


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("L", [1, 37, 2049])
def test_forward(device, backend, dtype, L):
    if backend == "reference" and L == 2049:
        pytest.skip("the reference is what we compare with; its long run only costs time")
    h, p, n, g = (2, 3, 5, 1) if _small(device, backend) else (4, 6, 8, 2)
    if _small(device, backend) and L == 2049:
        if dtype != torch.float32:
            pytest.skip("the triton interpreter runs the long case in fp32 only (it is slow)")
        L = 90  # the interpreter walks 6 chunks of 16: still far past one chunk
    args = _inputs(2, L, h, p, n, g, dtype, _gen("fwd", str(dtype), L, backend))
    kw = dict(chunk_size=16, dt_softplus=True, return_final_states=True)
    ref_out, ref_fin = _ref64(args, **kw)
    with torch.no_grad():
        out, fin = _run(backend, args, device, **kw)
    assert out.dtype == dtype and out.shape == args["x"].shape
    assert fin.dtype == torch.float32 and fin.shape == (2, h, p, n)
    assert_rel_err(out, ref_out, REL_TOL[dtype], "out")
    assert_rel_err(fin, ref_fin, REL_TOL[dtype] if dtype != torch.float32 else 1e-5, "final_states")


OPTS = [(), ("D",), ("z",), ("dt_bias",), ("initial_states",), ("D", "z", "dt_bias", "initial_states")]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTS, ids=lambda o: "+".join(o) or "none")
@pytest.mark.parametrize("variant", ["softplus-final-Dhp", "nosoftplus-nofinal-Dh", "limit-final-Dh"])
def test_forward_options(device, backend, opts, variant):
    if _small(device, backend) and not (len(opts) == 4 or (not opts and variant.startswith("nosoftplus"))):
        pytest.skip("the triton interpreter runs the all-on cases and one all-off case (it is slow)")
    softplus = "nosoftplus" not in variant
    final = "nofinal" not in variant
    args = _inputs(2, 41, 4, 3, 5, 2, torch.float32, _gen("opts", opts, variant, backend), opts,
                   "hp" if variant.endswith("Dhp") else "h", softplus)
    kw = dict(chunk_size=16, dt_softplus=softplus, return_final_states=final)
    if variant.startswith("limit"):
        kw["dt_limit"] = (0.2, 0.5)  # softplus(dt) straddles it: both clamps are reached
    ref = _ref64(args, **kw)
    with torch.no_grad():
        res = _run(backend, args, device, **kw)
    if final:
        assert_rel_err(res[0], ref[0], 1e-5, "out")
        assert_rel_err(res[1], ref[1], 1e-5, "final_states")
    else:
        assert isinstance(res, torch.Tensor)
        assert_rel_err(res, ref, 1e-5, "out")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_forward_fp64(device, backend):
    if backend == "triton":
        with pytest.raises(TypeError, match="triton"):
            _run(backend, _inputs(1, 5, 2, 3, 4, 1, torch.float64, _gen("f64t")), device)
        return
    args = _inputs(2, 77, 4, 3, 5, 2, torch.float64, _gen("f64", backend))
    out, fin = _run(backend, args, dt_softplus=True, return_final_states=True)
    ref_out, ref_fin = _ref64(args, dt_softplus=True, return_final_states=True)
    assert out.dtype == torch.float64 and fin.dtype == torch.float64
    assert_rel_err(out, ref_out, 1e-12, "out")
    assert_rel_err(fin, ref_fin, 1e-12, "final_states")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_seq_idx_packed_sequences_do_not_leak(device, backend):
    """Three packed sequences in row 0 (restarts inside a chunk and on a chunk boundary), one in row 1: each
    sequence's outputs equal a separate run of it (the first one with the initial states, the others from 0)."""
    gen = _gen("seq", backend)
    lens = [21, 11, 16]  # restarts at 21 (mid-chunk) and 32 (a chunk boundary of 16)
    L = sum(lens)
    args = _inputs(2, L, 4, 3, 5, 2, torch.float32, gen)
    seq_idx = torch.cat([torch.full((m,), i, dtype=torch.int32) for i, m in enumerate(lens)])
    seq_idx = torch.stack([seq_idx, torch.zeros(L, dtype=torch.int32)])
    kw = dict(chunk_size=16, dt_softplus=True)
    out, fin = _run(backend, args, device, seq_idx=seq_idx, return_final_states=True, **kw)
    ref_out, ref_fin = _ref64(args, seq_idx=seq_idx, return_final_states=True, **kw)
    assert_rel_err(out, ref_out, 1e-5, "out")
    assert_rel_err(fin, ref_fin, 1e-5, "final_states")
    t0 = 0
    for i, m in enumerate(lens):
        part = {k: None if v is None else (v[:1, t0:t0 + m] if k in ("x", "dt", "B", "C", "z") else v)
                for k, v in args.items()}
        part["initial_states"] = args["initial_states"][:1] if i == 0 else None
        alone, alone_fin = _ref64(part, return_final_states=True, **kw)
        assert_rel_err(out[:1, t0:t0 + m], alone, 1e-5, f"sequence {i}")
        t0 += m
    assert_rel_err(fin[:1], alone_fin, 1e-5, "final state of the last sequence")
    # Row 1 is one sequence: same as a run without seq_idx.
    row1 = {k: None if v is None else (v[1:] if k in ("x", "dt", "B", "C", "z", "initial_states") else v)
            for k, v in args.items()}
    assert_rel_err(out[1:], _ref64(row1, **kw), 1e-5, "row 1")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_strided_inputs(device, backend):
    """x, z as (b, h, l, p) memory seen as (b, l, h, p), B as a transposed view, a sliced D and dt."""
    gen = _gen("strided", backend)
    b, L, h, p, n = 2, 19, 4, 3, 5
    x, z = (torch.randn(b, h, L, p, generator=gen).transpose(1, 2) for _ in range(2))
    dt = torch.randn(b, L, 2 * h, generator=gen)[..., ::2]
    A = -(torch.rand(h, generator=gen) + 0.1)
    B = torch.randn(b, L, n, 2, generator=gen).transpose(2, 3)
    C = torch.randn(b, L, 2, n, generator=gen)
    D = torch.randn(h, 2 * p, generator=gen)[:, ::2]
    init = torch.randn(b, h, n, p, generator=gen).transpose(2, 3)
    args = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=None, initial_states=init)
    kw = dict(chunk_size=16, dt_softplus=True, return_final_states=True)
    ref_out, ref_fin = _ref64(args, **kw)
    out, fin = _run(backend, args, device, **kw)
    assert_rel_err(out, ref_out, 1e-5, "out")
    assert_rel_err(fin, ref_fin, 1e-5, "final_states")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_nan_in_nan_out(device, backend):
    """A NaN in x reaches its channel from its step on; a NaN in B (shared by a group's heads) every output
    of the group from its step on."""
    args = _inputs(1, 40, 2, 3, 4, 1, torch.float32, _gen("nan", backend))
    args["x"][0, 25, 1, 2] = float("nan")
    out = _run(backend, args, device, chunk_size=16, dt_softplus=True)
    ref = _ref64(args, chunk_size=16, dt_softplus=True)
    assert torch.isnan(ref[0, 25:, 1, 2]).all()
    assert torch.isnan(out[0, 25:, 1, 2]).all(), "NaN in x must give NaN in its channel at its step and after"
    assert not torch.isnan(out[0, :, :, :2]).any() and not torch.isnan(out[0, :, 0]).any(), \
        "other channels and heads must not see the NaN"
    if backend != "triton":  # the chunked form spreads a NaN inside its chunk (0 * NaN in the matmul)
        assert not torch.isnan(out[0, :25]).any()
    args["x"][0, 25, 1, 2] = 1.0
    args["B"][0, 30, 0, 1] = float("nan")
    out = _run(backend, args, device, chunk_size=16, dt_softplus=True)
    assert torch.isnan(out[0, 30:]).all(), "NaN in B must reach every head of its group from its step on"
    if backend != "triton":
        assert not torch.isnan(out[0, :30]).any()


def test_empty_and_zero_length():
    for L in (0,):
        args = _inputs(2, L, 4, 3, 5, 2, torch.float32, _gen("empty"))
        out, fin = _run("cpu", args, return_final_states=True)
        assert out.shape == (2, 0, 4, 3)
        torch.testing.assert_close(fin, args["initial_states"])


# ----------------------------------------------------------------------------- gradients
def _grads(backend, args, gen, device="cpu", **kw):
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in args.items()}
    out, fin = _run(backend, leaves, device, return_final_states=True, **kw)
    g_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    g_fin = torch.randn(fin.shape, generator=gen).to(fin.dtype)
    torch.autograd.backward((out, fin), (g_out, g_fin))
    return {k: None if v is None else v.grad for k, v in leaves.items()}, g_out, g_fin


def _ref_grads(args, g_out, g_fin, **kw):
    leaves = {k: None if v is None else v.detach().double().requires_grad_() for k, v in args.items()}
    out, fin = reference.ssd_scan(**leaves, return_final_states=True, **kw)
    torch.autograd.backward((out, fin), (g_out.double(), g_fin.double()))
    return {k: None if v is None else v.grad for k, v in leaves.items()}


GRAD_CASES = [  # L, g, opts, D shape, softplus, dt_limit, packed
    (1, 1, ("D", "z", "dt_bias", "initial_states"), "hp", True, None, False),
    (37, 2, ("D", "z", "dt_bias", "initial_states"), "h", True, None, True),
    (37, 1, (), "hp", False, None, False),
    (70, 4, ("D", "dt_bias"), "hp", True, (0.15, 0.6), True),
    (130, 2, ("z", "initial_states"), "h", False, None, False),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"L{c[0]}-g{c[1]}-{'+'.join(c[2]) or 'none'}-D{c[3]}"
                                                          f"-sp{int(c[4])}-lim{int(bool(c[5]))}-pk{int(c[6])}")
def test_gradients_match_reference(device, backend, dtype, case):
    L, g, opts, dshape, softplus, limit, packed = case
    if _small(device, backend) and dtype != torch.float32 and L > 40:
        pytest.skip("the triton interpreter runs the long cases in fp32 only (it is slow)")
    gen = _gen("grad", str(dtype), case, backend)
    args = _inputs(2, L, 4, 3, 5, g, dtype, gen, opts, dshape, softplus)
    kw = dict(chunk_size=16, dt_softplus=softplus)
    if limit:
        kw["dt_limit"] = limit
    if packed:
        kw["seq_idx"] = (torch.arange(L)[None, :] * torch.tensor([[3], [1]]) // 40).to(torch.int64)
    grads, g_out, g_fin = _grads(backend, args, gen, device, **kw)
    ref = _ref_grads(args, g_out, g_fin, **kw)
    for name in NAMES:
        a = args[name]
        if a is None:
            assert grads[name] is None
            continue
        gr = grads[name]
        assert gr is not None and gr.dtype == a.dtype and gr.shape == a.shape, name
        assert_rel_err(gr, ref[name], REL_TOL[dtype], f"d{name}")


@pytest.mark.parametrize("device,backend", [_case("cpu", "triton"), _case("cuda", "triton")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_backward_kernel(device, backend, dtype, monkeypatch):
    """The Triton backward kernels against the fp64 reference and against their fallback (autograd through
    chunked_torch, ``SSD_BWD = "torch"``): two blocks of head channels (headdim 40 > BLOCK_P 32), dstate 20
    (not a power of two), 3 chunks (one partial), restarts mid-chunk and on a chunk boundary, no final-state
    gradient (return_final_states=False), a non-contiguous dout, every output and scratch buffer poisoned.
    fp16: the 1e-2 of every fp16 case here (x, dt, B, C, z and dout rounded to fp16; fp32 accumulation)."""
    from fastlayers.backends import triton_ssd
    gen = _gen("triton-bwd", str(dtype))
    L, h, p, n, g = 40, 2, 40, 20, 1
    args = _inputs(2, L, h, p, n, g, dtype, gen, D_shape="h")
    seq_idx = torch.zeros(2, L, dtype=torch.int64)
    seq_idx[0, 7:] = 1
    seq_idx[0, 16:] = 2  # a chunk boundary (chunk 16)
    kw = dict(chunk_size=16, dt_softplus=True, dt_limit=(0.05, 0.8), seq_idx=seq_idx)
    g_out = torch.randn(2, h, L, p, generator=gen).to(dtype).transpose(1, 2)  # (b, l, h, p), strided
    dev = {k: None if v is None else v.to(device) for k, v in args.items()}
    grads = {}
    # Every buffer the kernels write starts as NaN: an element left unwritten shows.
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_ssd, "_scratch", poisoned)
    for mode in ("triton", "torch"):
        monkeypatch.setattr(triton_ssd, "SSD_BWD", mode)
        leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in dev.items()}
        out = _run(backend, leaves, device, **kw)
        out.backward(g_out)
        grads[mode] = {k: v.grad for k, v in leaves.items() if v is not None}
    hi = {k: None if v is None else v.detach().double().requires_grad_() for k, v in args.items()}
    reference.ssd_scan(**hi, **kw).backward(g_out.double())
    for name, gr in grads["triton"].items():
        assert gr.dtype == args[name].dtype and gr.shape == args[name].shape, name
        assert_rel_err(gr, hi[name].grad, REL_TOL[dtype], f"d{name}")
        assert_rel_err(gr, grads["torch"][name], REL_TOL[dtype], f"d{name} vs the fallback")


@pytest.mark.parametrize("device,backend", [_case("cpu", "cpu")])
def test_gradcheck(device, backend):
    gen = _gen("gradcheck", backend)
    args = _inputs(2, 7, 4, 2, 3, 2, torch.float64, gen, D_shape="h")
    names = [k for k, v in args.items() if v is not None]
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0] * 7])

    def f(*xs):
        with fastlayers.use_backend(backend):
            return fastlayers.ssd_scan(**dict(zip(names, xs)), chunk_size=4, dt_softplus=True, seq_idx=seq_idx,
                                       dt_limit=(0.0, 0.9), return_final_states=True)

    assert torch.autograd.gradcheck(f, [args[k].detach().clone().requires_grad_() for k in names])


def test_no_grad_path_equals_autograd_path():
    args = _inputs(2, 17, 4, 3, 5, 2, torch.float32, _gen("paths"))
    with torch.no_grad():
        a = fastlayers.ssd_scan(**args, dt_softplus=True)
    b = fastlayers.ssd_scan(**{k: v.clone().requires_grad_() for k, v in args.items()}, dt_softplus=True)
    assert torch.equal(a, b.detach())


def test_opcheck_and_torch_compile():
    """The custom ops pass opcheck; torch.compile(fullgraph=True) traces them and gives the eager results."""
    gen = _gen("opcheck")
    args = _inputs(2, 9, 4, 3, 5, 2, torch.float32, gen)
    x, dt, A, B, C, D, z = (args[k] for k in ("x", "dt", "A", "B", "C", "D", "z"))
    init = args["initial_states"]
    reset = torch.zeros(2, 9, dtype=torch.uint8)
    reset[0, 4] = 1
    lv = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, z, init)]
    # aot_dispatch is left to the torch.compile run below (it traces the forward and backward ops too).
    torch.library.opcheck(torch.ops.fastlayers.ssd_scan_fwd, (*lv, reset, None, 0, 16, "cpu"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    vslot = torch.full((2, 9), -1, dtype=torch.int64)
    vslot[0, 3], vslot[0, 8], vslot[1, 8] = 0, 1, 2  # varlen states written by the kernel (slot 3: none)
    torch.library.opcheck(torch.ops.fastlayers.ssd_scan_fwd, (*lv, reset, vslot, 4, 16, "cpu"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    # ssd_scan_bwd runs (traced, with its fake kernel) in the compiled backward below.
    seq_idx = reset.cumsum(1)

    def f(**kw):
        out, fin = fastlayers.ssd_scan(**kw, dt_softplus=True, seq_idx=seq_idx, return_final_states=True)
        return (out * out).sum() + fin.sum()

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
        loss = fn(**leaves)
        loss.backward()
        grads.append([loss.detach()] + [leaves[k].grad for k in NAMES])
    for name, a, b in zip(("loss",) + NAMES, *grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad,match", [
    (dict(dt=torch.randn(2, 6, 4)), "dt must have shape"),
    (dict(x=torch.randn(2, 7, 4)), "x must be"),
    (dict(A=torch.randn(4, 3)), "A must have shape"),
    (dict(A=torch.randn(3)), "A must have shape"),
    (dict(B=torch.randn(2, 6, 2, 5)), "B must be"),
    (dict(B=torch.randn(2, 7, 3, 5)), "G dividing nheads"),
    (dict(C=torch.randn(2, 7, 2, 4)), "C must have shape"),
    (dict(z=torch.randn(2, 7, 4, 2)), "z must have shape"),
    (dict(D=torch.randn(4, 2)), "D must have shape"),
    (dict(dt_bias=torch.randn(4, 1)), "dt_bias must have shape"),
    (dict(initial_states=torch.randn(2, 4, 3, 4)), "initial_states must have shape"),
    (dict(x=torch.ones(2, 7, 4, 3, dtype=torch.int64)), "x must be a floating"),
    (dict(B=torch.ones(2, 7, 2, 5, dtype=torch.int32)), "B must be a floating"),
    (dict(A=[1.0]), "A must be a torch.Tensor"),
    (dict(seq_idx=torch.zeros(2, 7)), "seq_idx must be an integer"),
    (dict(seq_idx=torch.zeros(2, 6, dtype=torch.int32)), "seq_idx must have shape"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(chunk_size=2.5), "chunk_size must be a positive int"),
    (dict(dt_limit=(1.0,)), "dt_limit must be a pair"),
    (dict(dt_limit=(1.0, 0.5)), "dt_limit must be"),
])
def test_bad_input_raises_before_the_kernel(bad, match, monkeypatch):
    from fastlayers.backends import cpu as cpu_backend
    for k in ("ssd_scan_fwd", "ssd_scan_bwd"):
        monkeypatch.setattr(cpu_backend, k, lambda *a: pytest.fail("kernel ran on bad input"))
    args = _inputs(2, 7, 4, 3, 5, 2, torch.float32, _gen("bad"))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fastlayers.ssd_scan(**args, dt_softplus=True)


def test_default_backend_on_cuda_is_triton():
    from fastlayers.backend import DEFAULT_CUDA
    assert DEFAULT_CUDA["ssd_scan"] == "triton"


# ----------------------------------------------------------------------------- cu_seqlens / varlen states
# Packed sequences of awkward lengths around the chunk (16): 1, chunk-1, chunk, chunk+1, a zero-length one
# in the middle, 3, two chunks and more. Restarts fall mid-chunk and on chunk boundaries.
VARLEN_LENS = [1, 15, 16, 17, 0, 3, 37]


def _packed(lens):
    L = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    seq_idx = torch.cat([torch.full((m,), i, dtype=torch.int32) for i, m in enumerate(lens)])[None]
    return L, cu, seq_idx


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("init", [False, True], ids=["noinit", "init"])
def test_varlen_states(device, backend, dtype, init):
    """return_varlen_states: (out, final_states, varlen_states) in mamba_ssm's order, the varlen states
    (num_seqs, h, p, n) fp32 against the fp64 reference; the last sequence's state is the final state, a
    zero-length sequence's is zero; initial_states seed position 0 (the first sequence)."""
    if _small(device, backend) and dtype != torch.float32 and init:
        pytest.skip("the triton interpreter runs bf16 once (it is slow)")
    L, cu, seq_idx = _packed(VARLEN_LENS)
    h, p, n, g = 4, 3, 5, 2
    opts = ("D", "z", "dt_bias") + (("initial_states",) if init else ())
    args = _inputs(1, L, h, p, n, g, dtype, _gen("varlen", str(dtype), init, backend), opts)
    kw = dict(chunk_size=16, dt_softplus=True, seq_idx=seq_idx, cu_seqlens=cu, return_varlen_states=True)
    ref_out, ref_fin, ref_vs = _ref64(args, return_final_states=True, **kw)
    with torch.no_grad():
        out, fin, vs = _run(backend, args, device, return_final_states=True, **kw)
        out2, vs2 = _run(backend, args, device, **kw)   # without final states: (out, varlen_states)
    assert vs.shape == (len(VARLEN_LENS), h, p, n) and vs.dtype == torch.float32
    tol = REL_TOL[dtype]
    assert_rel_err(out, ref_out, tol, "out")
    assert_rel_err(fin, ref_fin, tol, "final_states")
    assert_rel_err(vs, ref_vs, tol, "varlen_states")
    for k in range(len(VARLEN_LENS)):
        if VARLEN_LENS[k]:
            assert_rel_err(vs[k], ref_vs[k], tol, f"varlen_states[{k}] (length {VARLEN_LENS[k]})")
    assert torch.equal(vs[4], torch.zeros(h, p, n)), "a zero-length sequence's state is zero"
    torch.testing.assert_close(vs[-1], fin[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(out2, out) and torch.equal(vs2, vs)


def test_varlen_reference_is_each_sequence_alone():
    """The oracle itself: each varlen state equals the final state of that sequence run alone (the first one
    from initial_states, the others from zero)."""
    L, cu, seq_idx = _packed(VARLEN_LENS)
    args = _inputs(1, L, 2, 3, 4, 1, torch.float64, _gen("varlen-ref"))
    kw = dict(chunk_size=16, dt_softplus=True)
    _, vs = reference.ssd_scan(**args, seq_idx=seq_idx, cu_seqlens=cu, return_varlen_states=True, **kw)
    t0 = 0
    for k, m in enumerate(VARLEN_LENS):
        if m == 0:
            assert torch.equal(vs[k], torch.zeros_like(vs[k]))
            continue
        part = {a: None if v is None else (v[:, t0:t0 + m] if a in ("x", "dt", "B", "C", "z") else v)
                for a, v in args.items()}
        part["initial_states"] = args["initial_states"] if k == 0 else None
        _, fin = reference.ssd_scan(**part, return_final_states=True, **kw)
        torch.testing.assert_close(vs[k], fin[0], rtol=1e-12, atol=1e-12)
        t0 += m


@pytest.mark.parametrize("device,backend", BACKENDS[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_varlen_gradients_match_reference(device, backend, dtype):
    """Gradients through out, final_states and varlen_states together, against the fp64 reference's."""
    if _small(device, backend) and dtype != torch.float32:
        pytest.skip("the triton interpreter runs fp32 only here (it is slow)")
    L, cu, seq_idx = _packed(VARLEN_LENS)
    h, p, n, g = 4, 3, 5, 2
    gen = _gen("varlen-grad", str(dtype), backend)
    args = _inputs(1, L, h, p, n, g, dtype, gen)
    kw = dict(chunk_size=16, dt_softplus=True, seq_idx=seq_idx, cu_seqlens=cu, return_varlen_states=True,
              return_final_states=True)
    g_out = torch.randn(1, L, h, p, generator=gen).to(dtype)
    g_fin = torch.randn(1, h, p, n, generator=gen)
    g_vs = torch.randn(len(VARLEN_LENS), h, p, n, generator=gen)
    leaves = {k: None if v is None else v.detach().to(device).requires_grad_() for k, v in args.items()}
    with fastlayers.use_backend(backend):
        out, fin, vs = fastlayers.ssd_scan(**leaves, **{k: v.to(device) if isinstance(v, torch.Tensor) else v
                                                        for k, v in kw.items()})
    torch.autograd.backward([out, fin, vs], [g_out.to(device), g_fin.to(device), g_vs.to(device)])
    hi = {k: None if v is None else v.detach().double().requires_grad_() for k, v in args.items()}
    r_out, r_fin, r_vs = reference.ssd_scan(**hi, **kw)
    torch.autograd.backward([r_out, r_fin, r_vs], [g_out.double(), g_fin.double(), g_vs.double()])
    for name in NAMES:
        gr = leaves[name].grad.cpu()
        assert gr.dtype == args[name].dtype and gr.shape == args[name].shape, name
        assert_rel_err(gr, hi[name].grad, REL_TOL[dtype], f"d{name}")


def test_varlen_gradcheck():
    """fp64 gradcheck of the cpu path with the varlen states as an output (the kernel writes them and takes
    their gradient): sequences of 1, 3, 0, 4 steps, chunk 4."""
    L, cu, seq_idx = _packed([1, 3, 0, 4])
    args = _inputs(1, L, 2, 2, 3, 1, torch.float64, _gen("varlen-gradcheck"), D_shape="h")
    names = [k for k, v in args.items() if v is not None]

    def f(*xs):
        with fastlayers.use_backend("cpu"):
            return fastlayers.ssd_scan(**dict(zip(names, xs)), chunk_size=4, dt_softplus=True, seq_idx=seq_idx,
                                       cu_seqlens=cu, return_varlen_states=True, return_final_states=True)

    assert torch.autograd.gradcheck(f, [args[k].detach().clone().requires_grad_() for k in names])


@pytest.mark.parametrize("chunk", [2, 4, 64])
def test_varlen_states_torch_form(chunk):
    """_varlen_states (the torch form the triton backend uses) against the fp64 reference recurrence at small
    chunks (sequence ends and restarts on and off chunk boundaries, a padded last chunk, a restart that is not
    a cu_seqlens boundary: the state follows seq_idx), and its fp64 gradcheck."""
    from fastlayers.ops.ssd import _reset, _varlen_states
    lens = [1, 3, 0, 4, 2, 5]
    L, cu, seq_idx = _packed(lens)
    seq_idx[0, 10:] += 7  # a restart inside the last sequence (steps 10..14): its state starts over at 10
    gen = _gen("varlen-torch", chunk)
    args = _inputs(1, L, 2, 2, 3, 1, torch.float64, gen, opts=("initial_states",), softplus=False)
    _, ref = reference.ssd_scan(**args, seq_idx=seq_idx, cu_seqlens=cu, return_varlen_states=True)
    reset = _reset(seq_idx)
    names = ("x", "dt", "A", "B", "initial_states")

    def f(x, dt, A, B, init):
        return _varlen_states(x, dt, A, B, init, reset, cu, chunk)

    torch.testing.assert_close(f(*(args[k] for k in names)), ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(f, [args[k].detach().clone().requires_grad_() for k in names])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_varlen_nan_stays_in_its_sequence(device, backend):
    """A NaN in x of sequence 3 makes that sequence's state NaN (and the ones after it only if they depend on
    it: they do not); the other sequences' states stay finite, in the same chunk too."""
    L, cu, seq_idx = _packed(VARLEN_LENS)
    args = _inputs(1, L, 2, 3, 4, 1, torch.float32, _gen("varlen-nan", backend))
    args["x"][0, 40, 1, 2] = float("nan")  # sequence 3 spans steps 32..48
    _, vs = _run(backend, args, device, chunk_size=16, dt_softplus=True, seq_idx=seq_idx, cu_seqlens=cu,
                 return_varlen_states=True)
    assert torch.isnan(vs[3, 1, 2]).all()
    assert not torch.isnan(vs[[0, 1, 2, 4, 5, 6]]).any() and not torch.isnan(vs[3, 0]).any()


def test_varlen_cu_seqlens_is_ignored_without_return_varlen_states():
    """As in mamba_ssm: cu_seqlens is used only with return_varlen_states (batch 2 and no seq_idx are fine)."""
    args = _inputs(2, 9, 2, 3, 4, 1, torch.float32, _gen("varlen-ignored"))
    out = _run("cpu", args, chunk_size=16)
    assert torch.equal(_run("cpu", args, chunk_size=16, cu_seqlens=torch.tensor([0, 4, 9])), out)


VARLEN_BAD = [
    (dict(cu_seqlens=None), ValueError, "needs cu_seqlens"),
    (dict(batch=2), ValueError, "batch == 1"),
    (dict(seq_idx=None), ValueError, "needs seq_idx"),
    (dict(cu_seqlens=torch.tensor([0.0, 9.0])), TypeError, "cu_seqlens must be an integer"),
    (dict(cu_seqlens=torch.tensor([[0, 9]], dtype=torch.int32)), ValueError, "cu_seqlens must have shape"),
    (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32)), ValueError, "cu_seqlens must have shape"),
    (dict(cu_seqlens=torch.tensor([0, 5, 8], dtype=torch.int32)), ValueError, "from 0 to seqlen 9"),
    (dict(cu_seqlens=torch.tensor([1, 5, 9], dtype=torch.int32)), ValueError, "from 0 to seqlen 9"),
    (dict(cu_seqlens=torch.tensor([0, 6, 5, 9], dtype=torch.int32)), ValueError, "non-decreasing"),
]


@pytest.mark.parametrize("bad,exc,match", VARLEN_BAD, ids=lambda v: str(v)[:40])
def test_varlen_bad_input_raises_before_the_kernel(bad, exc, match, monkeypatch):
    from fastlayers.backends import cpu as cpu_backend
    monkeypatch.setattr(cpu_backend, "ssd_scan_fwd", lambda *a, **k: pytest.fail("the kernel ran"))
    b = bad.pop("batch", 1)
    args = _inputs(b, 9, 2, 3, 4, 1, torch.float32, _gen("varlen-bad"))
    kw = dict(seq_idx=torch.tensor([[0] * 4 + [1] * 5] * b), cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    kw.update(bad)
    with pytest.raises(exc, match=match):
        _run("cpu", args, return_varlen_states=True, **kw)


@pytest.mark.parametrize("device,backend", BACKENDS[:3])
def test_varlen_states_wide_head(device, backend):
    """headdim 40 (the cpu forward walks blocks of 32 channels; triton blocks of BLOCK_P), fp32, with
    gradients through the varlen states alone (out unused)."""
    L, cu, seq_idx = _packed([5, 16, 1, 9])
    args = _inputs(1, L, 2, 40, 6, 1, torch.float32, _gen("varlen-wide", backend), opts=("initial_states",))
    kw = dict(chunk_size=16, dt_softplus=True, seq_idx=seq_idx, cu_seqlens=cu, return_varlen_states=True)
    leaves = {k: None if v is None else v.detach().to(device).requires_grad_() for k, v in args.items()}
    with fastlayers.use_backend(backend):
        _, vs = fastlayers.ssd_scan(**leaves, **{k: v.to(device) if isinstance(v, torch.Tensor) else v
                                                 for k, v in kw.items()})
    g_vs = torch.randn(vs.shape, generator=_gen("varlen-wide-g"))
    vs.backward(g_vs.to(device))
    hi = {k: None if v is None else v.detach().double().requires_grad_() for k, v in args.items()}
    _, r_vs = reference.ssd_scan(**hi, **kw)
    r_vs.backward(g_vs.double())
    assert_rel_err(vs.detach().cpu(), r_vs.detach(), 1e-5, "varlen_states")
    for name in ("x", "dt", "A", "B", "initial_states"):
        assert_rel_err(leaves[name].grad.cpu(), hi[name].grad, 1e-5, f"d{name}")
    gC = leaves["C"].grad  # None where the states do not come from the kernel (triton)
    assert gC is None or float(gC.abs().max()) == 0.0, "C does not reach the states"


def test_varlen_torch_compile():
    """torch.compile(fullgraph=True) of the cpu path with varlen states (the custom op with its vslot, no
    data-dependent shapes) gives the eager loss and gradients."""
    L, cu, seq_idx = _packed([3, 0, 8, 5])
    args = _inputs(1, L, 2, 3, 4, 1, torch.float32, _gen("varlen-compile"))

    def f(**kw):
        out, fin, vs = fastlayers.ssd_scan(**kw, chunk_size=16, dt_softplus=True, seq_idx=seq_idx, cu_seqlens=cu,
                                           return_final_states=True, return_varlen_states=True)
        return (out * out).sum() + fin.sum() + (vs * vs).sum()

    grads = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
        with fastlayers.use_backend("cpu"):
            loss = fn(**leaves)
        loss.backward()
        grads.append([loss.detach()] + [leaves[k].grad for k in NAMES])
    for name, a, b in zip(("loss",) + NAMES, *grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_varlen_empty_sequences_at_the_ends(device, backend):
    """Zero-length sequences first and last (cu_seqlens [0, 0, 5, 12, 12]): their states are zero, and the
    initial states reach the first non-empty sequence (the one holding step 0)."""
    L, cu, seq_idx = _packed([0, 5, 7, 0])
    args = _inputs(1, L, 2, 3, 4, 1, torch.float32, _gen("varlen-ends", backend), opts=("initial_states",))
    kw = dict(chunk_size=16, dt_softplus=True, seq_idx=seq_idx, cu_seqlens=cu, return_varlen_states=True,
              return_final_states=True)
    out, fin, vs = _run(backend, args, device, **kw)
    _, r_fin, r_vs = _ref64(args, **kw)
    assert torch.equal(vs[0], torch.zeros_like(vs[0])) and torch.equal(vs[3], torch.zeros_like(vs[3]))
    assert_rel_err(vs[1:3], r_vs[1:3], 1e-5, "varlen_states")
    part = {k: None if v is None else (v[:, :5] if k in ("x", "dt", "B", "C", "z") else v) for k, v in args.items()}
    _, alone = _ref64(part, chunk_size=16, dt_softplus=True, return_final_states=True)
    assert_rel_err(vs[1], alone[0], 1e-5, "first non-empty sequence, from the initial states")


def test_varlen_seqlen_zero():
    args = _inputs(1, 0, 2, 3, 4, 1, torch.float32, _gen("varlen-L0"))
    out, vs = _run("cpu", args, seq_idx=torch.zeros(1, 0, dtype=torch.int32),
                   cu_seqlens=torch.tensor([0, 0, 0], dtype=torch.int32), return_varlen_states=True)
    assert out.shape == (1, 0, 2, 3) and vs.shape == (2, 2, 3, 4) and not vs.any()
