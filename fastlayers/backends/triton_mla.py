"""Triton kernels of MLA decoding (see backends/__init__.py for the contract).

Split kernel: one program per (sequence, KV split, KV head, block of BLOCK_R query rows), where
a query row is one (new token, head) pair of the heads that read that KV head (H / h_kv of them,
contiguous; MLA's latent cache is one KV head, MQA), so a program loads each cached row once for
BLOCK_R rows. Per block of BLOCK_T tokens: scores = q_nope k_nope^T +
q_rope k_rope^T on tensor cores, an online softmax, acc += p v with v = k_nope. The
split writes its normalised output and log-sum-exp; the merge kernel combines the splits.

The grid runs the row blocks of one (sequence, split) next to each other (grid axis 0): with
more query rows than BLOCK_R (many heads) they read the same KV tiles at about the same time,
so all but the first find them in L2 instead of DRAM.
"""
import torch

from ._triton_import import IMPORT_ERROR, tl, triton

BLOCK_T = 32     # cached rows per step
MIN_SPLIT = 256  # tokens per split at least
# Overrides of the split kernel's launch configuration, for tuning sweeps (benchmarks/gpu_table_mla.py):
# "block_r" (query rows a program, a power of two >= 16; auto: 16 up to 16 rows, else 32), "block_t"
# (cached rows a step, a power of two >= 16; auto: BLOCK_T) and "num_stages" (Triton's software
# pipelining depth; auto: Triton's default). None = auto.
CONFIG = {"block_r": None, "block_t": None, "num_stages": None}


if IMPORT_ERROR is None:
    @triton.jit
    def _mla_split_kernel(Q, KV, BT, LENS, OP, LP,
                          q_sb, q_ss, q_sh, kv_sb, kv_sr, kv_sh, bt_s, H, HG, NBLK, S_Q, N_SPLITS, split_tokens,
                          PAGE, MAX_T, scale,
                          DV: tl.constexpr, DR: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, CAUSAL: tl.constexpr,
                          IEEE: tl.constexpr, UPCAST: tl.constexpr):
        b = tl.program_id(2).to(tl.int64)
        sp = tl.program_id(1)
        # Axis 0: (KV head g, block of rows of g's problem); its rows are (new token qi, head h of group g).
        g = tl.program_id(0) // NBLK
        r = (tl.program_id(0) % NBLK) * BLOCK_R + tl.arange(0, BLOCK_R)
        rows_g = S_Q * HG
        r_ok = r < rows_g
        qi, h = r // HG, g * HG + r % HG
        cv = tl.arange(0, BLOCK_DV)
        cr = tl.arange(0, BLOCK_DR)
        cv_ok, cr_ok = cv < DV, cr < DR
        q_row = Q + b * q_sb + qi.to(tl.int64) * q_ss + h.to(tl.int64) * q_sh
        qn = tl.load(q_row[:, None] + cv[None, :], mask=r_ok[:, None] & cv_ok[None, :], other=0.0)
        qr = tl.load(q_row[:, None] + DV + cr[None, :], mask=r_ok[:, None] & cr_ok[None, :], other=0.0)
        if UPCAST:
            qn, qr = qn.to(tl.float32), qr.to(tl.float32)
        # Clamped to what the block table holds (the wrapper has checked it, but may reuse that check).
        n = tl.minimum(tl.load(LENS + b).to(tl.int32), MAX_T)
        t0 = tl.minimum(n, sp * split_tokens)
        t1 = tl.minimum(n, t0 + split_tokens)
        if CAUSAL:  # newest key each row sees: query qi is position n - S_Q + qi
            last = n - S_Q + qi
        else:
            last = n - 1 + qi * 0
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
        for tb in range(t0, t1, BLOCK_T):
            t = tb + tl.arange(0, BLOCK_T)
            t_ok = t < t1
            blk = tl.load(BT + b * bt_s + t // PAGE, mask=t_ok, other=0).to(tl.int64)
            k_row = KV + blk * kv_sb + (t % PAGE).to(tl.int64) * kv_sr + g.to(tl.int64) * kv_sh
            kn = tl.load(k_row[:, None] + cv[None, :], mask=t_ok[:, None] & cv_ok[None, :], other=0.0)
            kr = tl.load(k_row[:, None] + DV + cr[None, :], mask=t_ok[:, None] & cr_ok[None, :], other=0.0)
            if UPCAST:
                kn, kr = kn.to(tl.float32), kr.to(tl.float32)
            if IEEE:
                s = tl.dot(qn, tl.trans(kn), input_precision="ieee") + tl.dot(qr, tl.trans(kr),
                                                                              input_precision="ieee")
            else:
                s = tl.dot(qn, tl.trans(kn)) + tl.dot(qr, tl.trans(kr))
            s = s * scale
            visible = t_ok[None, :] & (t[None, :] <= last[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, kn, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(kn.dtype), kn)
            m = m_new
        empty = l == 0.0
        o = acc / tl.where(empty, 1.0, l)[:, None]
        lse = tl.where(empty, float("-inf"), m + tl.log(l))
        base = (b * N_SPLITS + sp) * (S_Q * H) + g * rows_g + r  # partial row g * rows_g + r
        tl.store(OP + base.to(tl.int64)[:, None] * DV + cv[None, :], o, mask=r_ok[:, None] & cv_ok[None, :])
        tl.store(LP + base, lse, mask=r_ok)

    @triton.jit
    def _mla_merge_kernel(OP, LP, OUT, LSE, H, HG, S_Q, N_SPLITS,
                          DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        r = tl.program_id(1)
        rows = S_Q * H
        g, rr = r // (S_Q * HG), r % (S_Q * HG)  # partial row r: row rr of KV head g's problem
        qi, h = rr // HG, g * HG + rr % HG
        sp = tl.arange(0, BLOCK_S)
        sp_ok = sp < N_SPLITS
        lse = tl.load(LP + (b * N_SPLITS + sp) * rows + r, mask=sp_ok, other=float("-inf"))
        mx = tl.max(lse, axis=0)
        mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - mx_safe))
        total = tl.sum(w, axis=0)
        cv = tl.arange(0, BLOCK_DV)
        cv_ok = cv < DV
        o = tl.load(OP + ((b * N_SPLITS + sp) * rows + r)[:, None] * DV + cv[None, :],
                    mask=sp_ok[:, None] & cv_ok[None, :], other=0.0)
        out = tl.sum(w[:, None] * o, axis=0) / tl.where(total == 0.0, 1.0, total)
        _store_out(OUT + ((b * S_Q + qi) * H + h) * DV + cv, out, cv_ok)
        # No key seen: lse +inf, FlashMLA's convention (the partials keep -inf, skipped above).
        tl.store(LSE + (b * H + h) * S_Q + qi, tl.where(total == 0.0, float("inf"), mx + tl.log(total)))


def mla_decode_splits(batch, max_len, device, rows=1):
    """Splits so that batch x splits fills the GPU, each >= MIN_SPLIT tokens: 4 programs an SM when
    rows = s_q x heads <= 16, else 2 (as the CUDA kernel's, from the same H200 measurements)."""
    device = torch.device(device)
    want = (4 if rows <= 16 else 2) * sm_count(device) if device.type == "cuda" else 2
    n_splits = max(1, min(-(-want // max(batch, 1)), -(-max_len // MIN_SPLIT)))
    split = max(1, -(-max_len // n_splits))
    return n_splits, -(-split // BLOCK_T) * BLOCK_T


def mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal, split_tokens, out, lse, o_part,
               lse_part):
    assert q.dtype != torch.float64, "the triton backend does not support float64"
    B, s_q, H, D = q.shape
    h_kv = kv_cache.shape[2]
    hg = H // h_kv
    n_splits = o_part.shape[1]
    rows = s_q * H
    if B == 0 or rows == 0:
        return
    dr = D - head_dim_v
    block_r = CONFIG["block_r"] or (16 if rows // h_kv <= 16 else 32)
    block_t = CONFIG["block_t"] or BLOCK_T
    for name, v in (("block_r", block_r), ("block_t", block_t)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"triton mla_decode: {name} must be a power of two >= 16; got {v}")
    block_dv = _next_pow2(head_dim_v)
    block_dr = max(16, _next_pow2(max(dr, 1)))
    upcast = bool(getattr(_INTERPRETER_BF16_FIX, "value", _INTERPRETER_BF16_FIX))
    meta = dict(DV=head_dim_v, DR=dr, BLOCK_DV=block_dv, BLOCK_DR=block_dr, BLOCK_R=block_r, BLOCK_T=block_t,
                CAUSAL=bool(causal), IEEE=q.dtype == torch.float32, UPCAST=upcast)
    num_warps = 4 if block_dv <= 256 and block_r * block_dv <= 8192 else 8
    args = (q, kv_cache, block_table, cache_seqlens, o_part, lse_part,
            q.stride(0), q.stride(1), q.stride(2), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
            block_table.stride(0), H, hg, triton.cdiv(s_q * hg, block_r), s_q, n_splits, split_tokens, kv_cache.shape[1], block_table.shape[1] * kv_cache.shape[1],
            float(scale))
    if CONFIG["num_stages"]:
        meta["num_stages"] = int(CONFIG["num_stages"])
    grid = (h_kv * triton.cdiv(s_q * hg, block_r), n_splits, B)
    _launch(_mla_split_kernel, grid, q.device, args, meta, num_warps)
    _launch(_mla_merge_kernel, (B, rows), q.device, (o_part, lse_part, out, lse, H, hg, s_q, n_splits),
            dict(DV=head_dim_v, BLOCK_DV=block_dv, BLOCK_S=max(2, _next_pow2(n_splits))), 4)


# The shared helpers of the Triton backend, imported last (see triton_hybridnorm.py).
from . import sm_count  # noqa: E402
from .triton import _launch, _next_pow2  # noqa: E402,F401
if IMPORT_ERROR is None:
    from .triton import _INTERPRETER_BF16_FIX, _store_out  # noqa: E402,F401
else:
    _INTERPRETER_BF16_FIX = False
