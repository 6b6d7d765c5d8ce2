"""Triton kernel of the Mamba-2 chunked scan ``ssd_scan`` (the SSD algorithm), and its backward.

Forward, one program per (batch, head, block of BLOCK_P head channels), walking the chunks of CHUNK steps
in order with the BLOCK_P x N state in registers. Per chunk, with cs the cumulative sum of dt A:

  intra-chunk:  y  = (C B^T ∘ exp(cs_i - cs_j) [j <= i] dt_j) x           (two tl.dot)
  carried state: y += exp(cs_i) C S^T                                      (state entering the chunk)
  chunk state:  S  = exp(cs_last) S + (x ∘ exp(cs_last - cs_j) dt_j)^T B   (passed to the next chunk)

then ``y += D x``, ``y *= silu(z)``. ``seq_idx`` restarts: r = running count of restarts in the chunk;
pairs (i, j) with r_i != r_j are masked, the carried state reaches only rows with r_i = 0, and passes
to the next chunk only when the chunk has no restart. CHUNK = ``chunk_size`` rounded down to a power of two
in [16, 64] (registers); dt, A, B, C arrive as fp32 (ops/ssd.py makes the copies); x, z, D,
initial_states any float dtype and strides. Every load is upcast to fp32; matrix products run in IEEE
fp32 for fp32 x, TF32 for fp16/bf16 x (within their tolerance).

Backward: **not a Triton kernel**. ``ssd_scan_bwd`` differentiates ``chunked_torch``, the same chunked
algorithm written in pure PyTorch (vectorised over chunks, a Python loop over chunks for the state
passing), with torch.autograd. It is correct (tested against the reference) but slow and memory-hungry
(O(L * CHUNK * nheads) for the decay matrices).
"""
import torch

try:
    import triton
    import triton.language as tl
    IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - reported by available_backends()
    triton = tl = None
    IMPORT_ERROR = e


if IMPORT_ERROR is None:
    @triton.jit
    def _ssd_fwd_kernel(X, DT, A, B, C, D, Z, INIT, RESET, OUT, FINAL,
                        x_s0, x_s1, x_s2, x_s3, z_s0, z_s1, z_s2, z_s3, o_s0, o_s1, o_s2, o_s3,
                        d_s0, d_s1, i_s0, i_s1, i_s2, i_s3,
                        L, H, P, N, G, heads_per_group,
                        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_INIT: tl.constexpr, HAS_RESET: tl.constexpr,
                        PREC: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // H
        h = pid % H
        g = h // heads_per_group
        pp = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        nn = tl.arange(0, BLOCK_N)
        qq = tl.arange(0, CHUNK)
        p_ok, n_ok = pp < P, nn < N
        pn_ok = p_ok[:, None] & n_ok[None, :]
        a_h = tl.load(A + h).to(tl.float32)
        if HAS_INIT:
            S = tl.load(INIT + b * i_s0 + h * i_s1 + pp[:, None] * i_s2 + nn[None, :] * i_s3, mask=pn_ok,
                        other=0.0).to(tl.float32)
        else:
            S = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
        if HAS_D:
            Dv = tl.load(D + h * d_s0 + pp * d_s1, mask=p_ok, other=0.0).to(tl.float32)
        causal = qq[:, None] >= qq[None, :]
        for t0 in range(0, L, CHUNK):
            t = t0 + qq
            t_ok = t < L
            dt = tl.load(DT + (b * L + t) * H + h, mask=t_ok, other=0.0).to(tl.float32)
            dA = dt * a_h
            cs = tl.cumsum(dA, axis=0)
            cs_last = tl.sum(dA, axis=0)
            if HAS_RESET:
                rs = tl.load(RESET + b * L + t, mask=t_ok, other=0).to(tl.int32)
                r = tl.cumsum(rs, axis=0)
                r_last = tl.sum(rs, axis=0)
                pair_ok = causal & (r[:, None] == r[None, :])
                carry_in = r == 0
                to_last = r == r_last
                carry_out = r_last == 0
            else:
                pair_ok = causal
                carry_in = qq >= 0
                to_last = qq >= 0
                carry_out = True
            x = tl.load(X + b * x_s0 + t[:, None] * x_s1 + h * x_s2 + pp[None, :] * x_s3,
                        mask=t_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)          # (Q, BP)
            tn_ok = t_ok[:, None] & n_ok[None, :]
            bc_off = ((b * L + t[:, None]) * G + g) * N + nn[None, :]
            Bm = tl.load(B + bc_off, mask=tn_ok, other=0.0).to(tl.float32)                     # (Q, BN)
            Cm = tl.load(C + bc_off, mask=tn_ok, other=0.0).to(tl.float32)
            CB = tl.dot(Cm, tl.trans(Bm), input_precision=PREC)                                # (Q, Q)
            seg = cs[:, None] - cs[None, :]
            M = tl.where(pair_ok, tl.exp(tl.where(pair_ok, seg, 0.0)), 0.0) * CB * dt[None, :]
            y = tl.dot(M, x, input_precision=PREC)                                            # (Q, BP)
            w_in = tl.where(carry_in, tl.exp(cs), 0.0)
            y += w_in[:, None] * tl.dot(Cm, tl.trans(S), input_precision=PREC)
            w_out = tl.where(to_last, tl.exp(cs_last - cs), 0.0) * dt
            decay = tl.where(carry_out, tl.exp(cs_last), 0.0)
            S = decay * S + tl.dot(tl.trans(x * w_out[:, None]), Bm, input_precision=PREC)    # (BP, BN)
            if HAS_D:
                y += Dv[None, :] * x
            tp_ok = t_ok[:, None] & p_ok[None, :]
            if HAS_Z:
                zv = tl.load(Z + b * z_s0 + t[:, None] * z_s1 + h * z_s2 + pp[None, :] * z_s3, mask=tp_ok,
                             other=0.0).to(tl.float32)
                y = y * zv / (1.0 + tl.exp(-zv))
            _store_out(OUT + b * o_s0 + t[:, None] * o_s1 + h * o_s2 + pp[None, :] * o_s3, y, tp_ok)
        # FINAL: (b, h, p, n) contiguous, fp32.
        tl.store(FINAL + ((b * H + h) * P + pp[:, None]) * N + nn[None, :], S, mask=pn_ok)


def _st(t, k):
    return (0,) * k if t is None else tuple(t.stride())[:k]


def _chunk(chunk_size, cap=64):
    c = 16
    while c * 2 <= min(int(chunk_size), cap):
        c *= 2
    return c


def _ssd_config(P, N, chunk_size, dtype):
    block_n = max(16, _next_pow2(N))
    block_p = max(16, min(_next_pow2(P), 32))
    chunk = _chunk(chunk_size, 64 if dtype != torch.float32 else 32)  # fp32 (IEEE dots): shared memory
    num_warps = 4 if block_n * max(block_p, chunk) <= 4096 else 8
    prec = "ieee" if dtype == torch.float32 else "tf32"
    return chunk, block_p, block_n, num_warps, prec


def ssd_scan_fwd(x, dt, A, B, C, D, z, init, reset, out, final, chunk_size):
    """Contract as the cpu backend's (ops/ssd.py): dt, A, B, C fp32 contiguous; final (b, h, p, n) fp32
    contiguous (always written)."""
    assert x.dtype != torch.float64, "the triton backend does not support float64"
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    if b * H * P == 0:
        return
    chunk, block_p, block_n, num_warps, prec = _ssd_config(P, N, chunk_size, x.dtype)
    rst = None if reset is None else reset.to(torch.int64).contiguous()
    args = (x, dt, A, B, C, D, z, init, rst, out, final, *_st(x, 4), *_st(z, 4), *_st(out, 4), *_st(D, 2),
            *_st(init, 4), L, H, P, N, G, H // G)
    meta = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_INIT=init is not None, HAS_RESET=rst is not None,
                PREC=prec, CHUNK=chunk, BLOCK_P=block_p, BLOCK_N=block_n)
    _launch(_ssd_fwd_kernel, (b * H, triton.cdiv(P, block_p)), x.device, args, meta, num_warps)


# ----------------------------------------------------------------------------- backward (pure PyTorch)
def chunked_torch(x, dt, A, B, C, D, z, init, reset, chunk):
    """The chunked SSD algorithm in PyTorch (fp32), differentiable: (out in fp32, final state).

    dt (b, l, h) processed, A (h,), B, C (b, l, g, n), D (h, p) or None, reset (b, l) or None."""
    f32 = torch.float32
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Q = int(chunk)
    nc = -(-L // Q)
    pad = nc * Q - L

    def padded(t):
        t = t.to(f32)
        if pad:
            t = torch.cat([t, t.new_zeros((b, pad, *t.shape[2:]))], dim=1)
        return t

    X = padded(x).view(b, nc, Q, h, p)
    DT = padded(dt).view(b, nc, Q, h)
    Bh = padded(B).repeat_interleave(h // g, dim=2).view(b, nc, Q, h, n)
    Ch = padded(C).repeat_interleave(h // g, dim=2).view(b, nc, Q, h, n)
    rf = torch.zeros(b, nc * Q, dtype=torch.int64, device=x.device)
    if reset is not None:
        rf[:, :L] = reset.to(torch.int64)
    r = torch.cumsum(rf.view(b, nc, Q), dim=2)                                     # (b, nc, Q)
    r_last = r[:, :, -1]
    cs = torch.cumsum(DT * A.to(f32), dim=2)                                       # (b, nc, Q, h)
    cs_last = cs[:, :, -1]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    mask = (causal & (r[:, :, :, None] == r[:, :, None, :]))[..., None]            # (b, nc, Qi, Qj, 1)
    seg = cs[:, :, :, None, :] - cs[:, :, None, :, :]
    Lm = torch.where(mask, torch.exp(torch.where(mask, seg, torch.zeros_like(seg))), torch.zeros_like(seg))
    CB = torch.einsum("bcihn,bcjhn->bcijh", Ch, Bh)
    y = torch.einsum("bcijh,bcjh,bcjhp->bcihp", CB * Lm, DT, X)
    w = torch.where((r == r_last[..., None])[..., None], torch.exp(cs_last[:, :, None] - cs), torch.zeros_like(cs))
    states = torch.einsum("bcjh,bcjhp,bcjhn->bchpn", w * DT, X, Bh)
    decay = torch.exp(cs_last) * (r_last == 0)[..., None].to(f32)                 # (b, nc, h)
    S = init.to(f32) if init is not None else x.new_zeros((b, h, p, n), dtype=f32)
    prev = []
    for c in range(nc):
        prev.append(S)
        S = decay[:, c, :, None, None] * S + states[:, c]
    Sp = torch.stack(prev, dim=1)                                                  # (b, nc, h, p, n)
    w_in = torch.where((r == 0)[..., None], torch.exp(cs), torch.zeros_like(cs))
    y = y + torch.einsum("bcihn,bchpn->bcihp", Ch, Sp) * w_in[..., None]
    y = y.reshape(b, nc * Q, h, p)[:, :L]
    if D is not None:
        y = y + x.to(f32) * D.to(f32)
    if z is not None:
        y = y * torch.nn.functional.silu(z.to(f32))
    return y, S


def ssd_scan_bwd(dout, dfinal, x, dt, A, B, C, D, z, init, reset, chunk_size):
    """[dx, ddt, dA, dB, dC, dD, dz, dinit] (None for absent inputs), by autograd through chunked_torch."""
    ins = [x, dt, A, B, C, D, z, init]
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in ins]
    with torch.enable_grad():
        y, S = chunked_torch(*leaves, reset, _chunk(chunk_size, 64))
        outs, gouts = [y], [dout.to(y.dtype)]
        if dfinal is not None:
            outs.append(S)
            gouts.append(dfinal.to(S.dtype))
        used = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(outs, used, gouts, allow_unused=True)
    it = iter(grads)
    res = []
    for t in leaves:
        if t is None:
            res.append(None)
        else:
            gr = next(it)
            res.append(torch.zeros_like(t) if gr is None else gr.to(t.dtype))
    return res


from .triton import _launch, _next_pow2  # noqa: E402,F401
if IMPORT_ERROR is None:
    from .triton import _store_out  # noqa: E402,F401


# ----------------------------------------------------------------------------- ahead-of-time compile
_SSD_ARGS = ("X", "DT", "A", "B", "C", "D", "Z", "INIT", "RESET", "OUT", "FINAL",
             "x_s0", "x_s1", "x_s2", "x_s3", "z_s0", "z_s1", "z_s2", "z_s3", "o_s0", "o_s1", "o_s2", "o_s3",
             "d_s0", "d_s1", "i_s0", "i_s1", "i_s2", "i_s3", "L", "H", "P", "N", "G", "heads_per_group")


def _ssd_variant(xdt, batch, L, H, P, N, G, chunk_size=256, opts=True):
    chunk, bp, bn, nw, prec = _ssd_config(P, N, chunk_size, xdt)
    f32 = torch.float32
    tensors = dict(X=xdt, DT=f32, A=f32, B=f32, C=f32, D=f32 if opts else None, Z=xdt if opts else None,
                   INIT=f32 if opts else None, RESET=torch.int64 if opts else None, OUT=xdt, FINAL=f32)
    xs = dict(zip(("s0", "s1", "s2", "s3"), (L * H * P, H * P, P, 1)))
    ints = {**{f"x_{k}": v for k, v in xs.items()}, **{f"z_{k}": v for k, v in xs.items()},
            **{f"o_{k}": v for k, v in xs.items()}, "d_s0": 1, "d_s1": 0,
            "i_s0": H * P * N, "i_s1": P * N, "i_s2": N, "i_s3": 1, "L": L, "H": H, "P": P, "N": N, "G": G,
            "heads_per_group": H // G}
    meta = dict(HAS_D=opts, HAS_Z=opts, HAS_INIT=opts, HAS_RESET=opts, PREC=prec, CHUNK=chunk, BLOCK_P=bp,
                BLOCK_N=bn)
    what = (f"ssd_fwd x={str(xdt)[6:]} batch={batch} L={L} H={H} P={P} N={N} G={G} opts={opts} "
            f"CHUNK={chunk} BLOCK={bp}x{bn} {prec} warps={nw}" + (" novec" if P * 2 < 16 else ""))
    return "ssd_fwd", _SSD_ARGS, tensors, ints, meta, nw, what


def aot_variants(full=False):
    """Representative launches of the ssd_scan kernel (format of ``triton._aot_variants``)."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    return [_ssd_variant(bf16, 8, 4096, 32, 64, 128, 1),           # Mamba-2 2.7B-like, the GPU table row
            _ssd_variant(f32, 2, 2048, 24, 64, 128, 8),                # the cpu benchmark's shape, fp32
            _ssd_variant(f16, 1, 1000, 8, 3, 7, 8, chunk_size=16, opts=False)]  # tiny head: flags off


AOT_KERNELS = {} if IMPORT_ERROR is not None else {"ssd_fwd": _ssd_fwd_kernel}
