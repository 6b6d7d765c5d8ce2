"""MLA-decoding and Mamba-decode rows of the GPU table (benchmarks/gpu_table.py).

mla_decode, bf16 cache, 4096 cached tokens: 512+64 at batch 64 and 128 with 16 and 128 heads, and
Zebra-Llama's latent sizes 128+32, 128+64, 160+64, where no peer kernel runs. Bytes = cache rows read
+ q + out; the target is >= 80% of the device-to-device copy in the memory-bound cases.
selective_state_update at batch 16 (Mamba-2 2.7B-like and Zebra-like shapes), state read and written.
mla_decode and selective_scan run every fast backend built here: cuda (the CUDA C++ kernels) next to
triton on a GPU (selective_scan has no triton kernel: cuda alone), cpu on the smoke run.
selective_scan (Mamba-1, bf16, B/C (batch, N, L)): forward bytes = u, delta, z, out + B, C + last state;
forward + backward adds u, delta, z, dout, du, ddelta, dz + B, C, dB, dC + dlast (the minimum traffic, none
of the backward's fp32 scratch: the checkpoints, the dB/dC partial sums).
causal_conv1d (width 4, bias, silu; x (batch, dim, L)): forward bytes = x read + out written; forward +
backward adds dout read, x read again and dx written; causal_conv1d_update (one decode step): x, out and
the conv state read and written.
Peers on the same inputs: mamba_ssm's Triton selective_state_update; its CUDA selective_scan_fn and
causal-conv1d (CUDA extensions) where installed, else rows that say why; FlashMLA: a row that says it is not
installed. torch eager: fastlayers.reference's selective_state_update and causal_conv1d (fp32 math).
The public mla_decode, selective_state_update and causal_conv1d_update rows also time the kernel alone.
"""
import torch
import torch.nn.functional as F

import fastlayers
import gpu_peers as peers
from fastlayers import reference
from fastlayers.backends import load

PAGE = 64


def _mla_case(gt, b, n, h, lat, rope, dtype):
    dev = gt.DEVICE
    d = lat + rope
    blocks = -(-n // PAGE)
    kv = torch.randn(b * blocks, PAGE, 1, d, device=dev).to(dtype)
    table = torch.randperm(b * blocks, device=dev).view(b, blocks).to(torch.int32)
    lens = torch.full((b,), n, dtype=torch.int32, device=dev)
    q = torch.randn(b, 1, h, d, device=dev).to(dtype)
    return q, kv, table, lens


def _fast(gt, names):
    """The backends among `names` usable here (cpu on the CPU smoke run)."""
    if gt.DEVICE != "cuda":
        return ["cpu"]
    av = fastlayers.available_backends()
    return [n for n in names if av[n][0]]


# (heads, latent) of the cases whose Triton kernel is also timed at other launch configurations.
SWEEP = {(16, 512), (128, 512), (16, 128)}


def _triton_sweep(gt, rows, kern, nbytes, ceiling, b, n, h, lat, rope, dtype):
    """The Triton split kernel alone at the wrapper's splits, over its tuning overrides (triton_mla.CONFIG):
    query rows a program (16, 32, and 64 where the accumulator fits: latent <= 256) x cached rows a step
    (32, 64) x pipelining depth."""
    from fastlayers.backends import triton_mla
    saved = dict(triton_mla.CONFIG)
    try:
        for block_r in (16, 32, 64) if lat <= 256 else (16, 32):
            if block_r > max(16, h) * 2:
                continue
            for block_t in (32, 64):
                for stages in (None, 2, 4):
                    triton_mla.CONFIG.update(block_r=block_r, block_t=block_t, num_stages=stages)
                    label = ("mla_decode kernel", f"b{b} n{n} h{h} {lat}+{rope} block_r {block_r} block_t "
                             f"{block_t} stages {stages or 'auto'}", dtype, "fastlayers", "triton")
                    gt.timed_row(rows, label, kern, [None], nbytes, ceiling)
    finally:
        triton_mla.CONFIG.update(saved)


def mla_rows(gt, ceiling, l2, quick=False, smoke=False):
    dtype = torch.float32 if smoke else torch.bfloat16
    if smoke:
        cases = [(2, 64, 4, 64, 32)]
    elif quick:
        cases = [(64, 4096, 16, 512, 64), (64, 4096, 16, 128, 64)]
    else:
        cases = [(b, 4096, h, 512, 64) for b in (64, 128) for h in (16, 128)] + \
                [(64, 4096, 16, lat, rope) for lat, rope in ((128, 32), (128, 64), (160, 64))]
    rows = []
    _, why = peers.flash_mla()
    gt.peer_missing_rows(rows, ("mla_decode",), "flash_mla", why)
    for b, n, h, lat, rope in cases:
        q, kv, table, lens = _mla_case(gt, b, n, h, lat, rope, dtype)
        nbytes = (kv[: b * (-(-n // PAGE))].numel() * kv.element_size() + q.numel() * q.element_size()
                  + b * h * lat * q.element_size())

        for fast in _fast(gt, ("cuda", "triton")):
            def call(_s, q=q, kv=kv, table=table, lens=lens, lat=lat, fast=fast):
                with fastlayers.use_backend(fast):
                    fastlayers.mla_decode(q, kv, table, lens, lat)

            # The kernel alone at the wrapper's splits (no argument checks, no host sync, workspace made once).
            be = load(fast)
            auto, auto_tok = be.mla_decode_splits(b, n, q.device, h)
            ws_auto = (torch.empty(b, 1, h, lat, dtype=dtype, device=q.device), torch.empty(b, h, 1, device=q.device),
                       torch.empty(b, auto, 1, h, lat, device=q.device), torch.empty(b, auto, 1, h, device=q.device))

            def kern_auto(_s, be=be, tok=auto_tok, ws=ws_auto, q=q, kv=kv, table=table, lens=lens, lat=lat):
                be.mla_decode(q, kv, table, lens, lat, q.shape[-1] ** -0.5, False, tok, *ws)

            label = ("mla_decode", f"b{b} n{n} h{h} {lat}+{rope}", dtype, "fastlayers", fast)
            gt.timed_row(rows, label, call, [None], nbytes, ceiling, kernel=kern_auto)
            del ws_auto
            if smoke or quick:
                continue
            # The kernels alone at the wrapper's split count and at more splits: whether more CTAs fill the GPU.
            for n_splits in sorted({auto, 8, 16, 32}):
                tok = -(-(-(-n // n_splits)) // 32) * 32
                ws = (torch.empty(b, 1, h, lat, dtype=dtype, device=q.device),
                      torch.empty(b, h, 1, device=q.device),
                      torch.empty(b, n_splits, 1, h, lat, device=q.device),
                      torch.empty(b, n_splits, 1, h, device=q.device))

                def kern(_s, be=be, tok=tok, ws=ws, q=q, kv=kv, table=table, lens=lens, lat=lat):
                    be.mla_decode(q, kv, table, lens, lat, q.shape[-1] ** -0.5, False, tok, *ws)

                label = ("mla_decode kernel", f"b{b} n{n} h{h} {lat}+{rope} splits {n_splits}"
                         + (" (auto)" if n_splits == auto else ""), dtype, "fastlayers", fast)
                gt.timed_row(rows, label, kern, [None], nbytes, ceiling)
                if fast == "triton" and n_splits == auto and (h, lat) in SWEEP:
                    _triton_sweep(gt, rows, kern, nbytes, ceiling, b, n, h, lat, rope, dtype)
                del ws
        del q, kv
    return rows


def state_update_rows(gt, ceiling, l2, quick=False, smoke=False):
    dev = gt.DEVICE
    fast = "triton" if dev == "cuda" else "cpu"
    shapes = [(2, 2, 4, 8, 1)] if smoke else [(16, 80, 64, 128, 1), (16, 32, 64, 64, 32)]
    rows = []
    mb, why = peers.mamba()
    if mb is None:
        gt.peer_missing_rows(rows, ("selective_state_update",), "mamba_ssm", why)
    for batch, h, p, n, g in shapes:
        state = torch.randn(batch, h, p, n, device=dev)
        x, z = torch.randn(batch, h, p, device=dev), torch.randn(batch, h, p, device=dev)
        dt = torch.randn(batch, h, device=dev)[:, :, None].expand(batch, h, p)
        A = -torch.rand(h, device=dev)[:, None, None].expand(h, p, n)
        B, C = torch.randn(batch, g, n, device=dev), torch.randn(batch, g, n, device=dev)
        D = torch.randn(h, device=dev)[:, None].expand(h, p)
        dt_bias = torch.randn(h, device=dev)[:, None].expand(h, p)  # tied over head_dim, as Mamba-2 passes it
        args = (state, x, dt, A, B, C, D, z, dt_bias, True)
        nbytes = 4 * (2 * state.numel() + 4 * x.numel() + 2 * B.numel())
        label = ("selective_state_update", f"b{batch} h{h} p{p} n{n} g{g}", "float32")

        def call(_s):
            with fastlayers.use_backend(fast):
                fastlayers.selective_state_update(*args)

        be, out = load(fast), torch.empty_like(x)

        def kern(_s, be=be, out=out):
            be.selective_state_update(*args[:9], out, None, True)

        gt.timed_row(rows, (*label, "fastlayers", fast), call, [None], nbytes, ceiling, kernel=kern)
        gt.timed_row(rows, (*label, "torch", "eager (reference)"),
                     lambda _s: reference.selective_state_update(*args), [None], nbytes, ceiling)
        if mb is not None:
            gt.timed_row(rows, (*label, "mamba_ssm", "triton"),
                         lambda _s: mb.selective_state_update(*args[:7], z=z, dt_bias=dt_bias, dt_softplus=True),
                         [None], nbytes, ceiling)
    return rows


def scan_rows(gt, ceiling, l2, quick=False, smoke=False):
    """selective_scan forward, and forward + backward (Mamba-1): (batch, dim, L, N); u, delta, z in the dtype,
    A, D, delta_bias fp32."""
    dev = gt.DEVICE
    dtype = torch.float32 if smoke else torch.bfloat16
    if smoke:
        shapes = [(1, 4, 64, 8)]
    elif quick:
        shapes = [(8, 2048, 2048, 16)]
    else:
        shapes = [(8, 2048, 2048, 16), (4, 5120, 2048, 16), (8, 2048, 2048, 64)]
    rows = []
    ms, why = peers.mamba_scan()
    if ms is None:
        gt.peer_missing_rows(rows, ("selective_scan fwd", "selective_scan fwd+bwd"), "mamba_ssm", why)
    for batch, dim, L, n in shapes:
        u, delta, z = (torch.randn(batch, dim, L, device=dev).to(dtype) for _ in range(3))
        A = -torch.rand(dim, n, device=dev) - 0.1
        B, C = (torch.randn(batch, n, L, device=dev).to(dtype) for _ in range(2))
        D, bias = torch.randn(dim, device=dev), torch.randn(dim, device=dev)
        es = u.element_size()
        nbytes = 4 * u.numel() * es + 2 * B.numel() * es + batch * dim * n * 4
        shape = f"b{batch} d{dim} L{L} n{n}"
        impls = [(fastlayers.selective_scan, "fastlayers", f) for f in _fast(gt, ("cuda",))]
        impls += [(ms.selective_scan_fn, "mamba_ssm", "cuda")] if ms is not None else []
        for scan, prov, fast in impls:
            def call(_s, fast=fast, scan=scan, prov=prov, args=(u, delta, A, B, C, D, z, bias)):
                with fastlayers.use_backend(fast if prov == "fastlayers" else None):
                    scan(*args, delta_softplus=True, return_last_state=True)

            if gt.timed_row(rows, ("selective_scan fwd", shape, dtype, prov, fast), call, [None], nbytes,
                            ceiling) is None:
                continue
            # Forward + backward (the training step's cost): the forward's bytes, then the backward's
            # reads of u, delta, z, dout, B, C, dlast and writes of du, ddelta, dz, dB, dC.
            leaves = [t_.detach().clone().requires_grad_() for t_ in (u, delta, A, B, C, D, z, bias)]
            g_out, g_last = torch.randn_like(u), torch.randn(batch, dim, n, device=dev)
            nbytes_fb = nbytes + 7 * u.numel() * es + 4 * B.numel() * es + batch * dim * n * 4

            def call_fb(_s, fast=fast, scan=scan, prov=prov, leaves=leaves, g_out=g_out, g_last=g_last):
                with fastlayers.use_backend(fast if prov == "fastlayers" else None):
                    out, last = scan(*leaves, delta_softplus=True, return_last_state=True)
                    torch.autograd.grad((out, last), leaves, (g_out, g_last))

            gt.timed_row(rows, ("selective_scan fwd+bwd", shape, dtype, prov, fast), call_fb, [None], nbytes_fb,
                         ceiling, grad=True)
            del leaves, g_out, g_last
        del u, delta, z, B, C
    return rows


def conv1d_rows(gt, ceiling, l2, quick=False, smoke=False):
    dev = gt.DEVICE
    fast = "triton" if dev == "cuda" else "cpu"
    dtype = torch.float32 if smoke else torch.bfloat16
    batch, dim, L, width = (2, 8, 64, 4) if smoke else (8, 4096, 4096, 4)
    es = torch.tensor([], dtype=dtype).element_size()
    per = batch * dim * L * es
    rows = []
    cc, why = peers.causal_conv1d()
    if cc is None:
        gt.peer_missing_rows(rows, ("causal_conv1d fwd", "causal_conv1d fwd+bwd", "causal_conv1d_update"),
                             "causal-conv1d", why)

    def eager(x, w, b):  # what a torch user writes (mamba_ssm's fallback): depthwise conv1d, cut, silu
        return F.silu(F.conv1d(x, w[:, None, :], b, padding=w.shape[1] - 1, groups=x.shape[1])[..., :x.shape[-1]])

    def fl(x, w, b):
        with fastlayers.use_backend(fast):
            return fastlayers.causal_conv1d(x, w, b, activation="silu")

    impls = [("fastlayers", fast, fl), ("torch", "eager", eager)]
    impls += [("causal-conv1d", "cuda", lambda x, w, b: cc.fn(x, w, b, activation="silu"))] if cc is not None else []
    for backward in (False, True):
        nbytes = (5 if backward else 2) * per
        sets = []
        for _ in range(gt.n_sets(nbytes, l2)):
            x = torch.randn(batch, dim, L, device=dev).to(dtype).requires_grad_(backward)
            sets.append((x, torch.randn(batch, dim, L, device=dev).to(dtype) if backward else None))
        w = torch.randn(dim, width, device=dev).to(dtype).requires_grad_(backward)
        b = torch.randn(dim, device=dev).to(dtype).requires_grad_(backward)
        for prov, backend, f in impls:
            def call(s, w=w, b=b, backward=backward, f=f):
                y = f(s[0], w, b)
                if backward:
                    y.backward(s[1])

            label = ("causal_conv1d fwd+bwd" if backward else "causal_conv1d fwd", f"b{batch} d{dim} L{L} w{width}",
                     dtype, prov, backend)
            gt.timed_row(rows, label, call, sets, nbytes, ceiling, grad=backward,
                         note="F.conv1d + silu" if prov == "torch" else "")
        del sets
    ub, ud = (2, 8) if smoke else (64, 8192)
    state = torch.randn(ub, ud, width - 1, device=dev).to(dtype)
    x = torch.randn(ub, ud, device=dev).to(dtype)
    w = torch.randn(ud, width, device=dev).to(dtype)
    b = torch.randn(ud, device=dev).to(dtype)

    def upd(_s):
        with fastlayers.use_backend(fast):
            fastlayers.causal_conv1d_update(x, state, w, b, "silu")

    be, out = load(fast), torch.empty(ub, ud, 1, device=dev, dtype=dtype)

    def kern(_s):
        be.causal_conv1d_update(x[..., None], state, w, b, out, True)

    nbytes = (2 * x.numel() + 2 * state.numel()) * es
    label = ("causal_conv1d_update", f"b{ub} d{ud} w{width}", dtype)
    gt.timed_row(rows, (*label, "fastlayers", fast), upd, [None], nbytes, ceiling, kernel=kern)
    gt.timed_row(rows, (*label, "torch", "eager (reference)"),
                 lambda _s: reference.causal_conv1d_update(x, state, w, b, "silu"), [None], nbytes, ceiling)
    if cc is not None:
        gt.timed_row(rows, (*label, "causal-conv1d", "cuda"), lambda _s: cc.update(x, state, w, b, "silu"), [None],
                     nbytes, ceiling)
    return rows
