"""Pure-PyTorch reference implementations: the oracle every backend is tested against.

They compute in float32 (float64 for float64 inputs) and round only the outputs.
"""
import torch
from torch.nn import functional as F

from . import _layers, _mamba_layers
from ._mamba_layers import f32
from ._dtypes import stat_dtype


def norm(x, weight, bias=None, eps=1e-6, residual=None, prenorm=False, residual_in_fp32=False, is_rms=True,
         offset=0.0, casting_mode="gemma"):
    """Fused residual add + RMSNorm / LayerNorm, the reference of ``fastlayers.rms_norm``/``layer_norm``.

    ``y = xhat * (offset + weight) (+ bias)``; ``weight=None``: ``y = xhat (+ bias)`` (no gain, offset
    unused). ``casting_mode="llama"`` rounds xhat to x's dtype before the gain multiply (a no-op for
    fp32/fp64 x); ``"gemma"``/``"none"``: everything in the accumulation dtype, one rounding at the end.
    Through autograd the llama rounding is an identity cast (as in Llama's own code): dweight sees the
    rounded xhat, dx the unrounded one."""
    acc = stat_dtype(x.dtype)
    h = x.to(acc)
    if residual is not None:
        h = h + residual.to(acc)
    if is_rms:
        y = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    else:
        mu = h.mean(-1, keepdim=True)
        d = h - mu
        y = d * torch.rsqrt(d.square().mean(-1, keepdim=True) + eps)
    if casting_mode == "llama":
        y = y.to(x.dtype).to(acc)
    if weight is not None:
        y = y * (weight.to(acc) + offset if offset else weight.to(acc))
    if bias is not None:
        y = y + bias.to(acc)
    y = y.to(x.dtype)
    if not prenorm:
        return y
    h_dtype = torch.float32 if residual_in_fp32 and x.dtype != torch.float64 else x.dtype
    return y, h.to(h_dtype, copy=True)  # a copy: h is saved for the backward, callers may modify this one


def rms_norm(x, weight, eps=1e-6, residual=None, prenorm=False, residual_in_fp32=False, offset=0.0,
             casting_mode="gemma"):
    return norm(x, weight, None, eps, residual, prenorm, residual_in_fp32, True, offset, casting_mode)


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None, prenorm=False, residual_in_fp32=False):
    return norm(x, weight, bias, eps, residual, prenorm, residual_in_fp32, is_rms=False)


# ----------------------------------------------------------------------------- HybridNorm kernels
def rope_tables(head_dim, max_positions, theta=500000.0, device=None):
    """``(cos, sin)``, each ``(max_positions, head_dim // 2)`` float32: angle ``p * theta^(-2i/head_dim)``.

    The rotation pairs channel ``i`` with ``i + head_dim/2`` (the "rotate half"
    convention of Llama, OLMo and HF transformers)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim; got {head_dim}")
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    ang = torch.arange(max_positions, dtype=torch.float64, device=device)[:, None] * inv[None, :]
    return ang.cos().float(), ang.sin().float()


def positions(batch, seqlen, offset, device):
    """``(batch, seqlen)`` int64 positions ``offset + t``; ``offset`` is an int or a ``(batch,)`` tensor."""
    t = torch.arange(seqlen, device=device)
    if isinstance(offset, torch.Tensor):
        return offset.to(device=device, dtype=torch.int64)[:, None] + t[None, :]
    return (int(offset) + t)[None, :].expand(batch, seqlen)


def rope(x, cos, sin, offset=0):
    """Rotate ``x`` ``(B, T, H, D)`` (computed in the accumulation dtype, not rounded)."""
    b, t, _, d = x.shape
    pos = positions(b, t, offset, x.device)
    c = cos[..., : d // 2][pos].to(x.dtype)[:, :, None, :]  # (B, T, 1, D/2)
    s = sin[..., : d // 2][pos].to(x.dtype)[:, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def qkv_norm_rope(q, k, v, q_weight, k_weight, v_weight, cos, sin, eps=1e-5, offset=0):
    """Reference of ``fastlayers.qkv_norm_rope``: per-head RMSNorm (over head_dim) of q, k, v in fp32,
    then RoPE on q and k; each output rounded once to the input dtype, contiguous ``(B, T, H, D)``.
    A None weight skips that norm (``v_weight=None`` leaves v untouched); ``cos=None`` skips RoPE."""
    acc = stat_dtype(q.dtype)

    def nrm(x, w):
        x = x.to(acc)
        return x if w is None else x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w.to(acc)

    def rot(x):
        return x if cos is None else rope(x, cos.to(acc), sin.to(acc), offset)

    qo = rot(nrm(q, q_weight)).to(q.dtype)
    ko = rot(nrm(k, k_weight)).to(k.dtype)
    vo = v if v_weight is None else nrm(v, v_weight).to(v.dtype)
    return qo, ko, vo


def swiglu(gate, up=None):
    """``silu(gate) * up`` in fp32, rounded once; with ``up=None`` ``gate`` is one fused
    ``(..., 2F)`` tensor whose first half is the gate and second half the up projection."""
    if up is None:
        f = gate.shape[-1] // 2
        gate, up = gate[..., :f], gate[..., f:]
    acc = stat_dtype(gate.dtype)
    g = gate.to(acc)
    return (g * torch.sigmoid(g) * up.to(acc)).to(gate.dtype)


def attention(q, k, v, causal=True, scale=None):
    """Causal GQA attention on ``(B, T, H, D)`` tensors: ``(B, Tq, Hq, D)`` output in q's dtype.

    Keys are positions ``0 .. Tk-1`` and the queries the last ``Tq`` of them, so
    with a KV cache (``Tq < Tk``) the causal mask is aligned bottom-right."""
    acc = stat_dtype(q.dtype)
    tq, tk = q.shape[1], k.shape[1]
    qt, kt, vt = (t.transpose(1, 2).to(acc) for t in (q, k, v))
    mask = None
    if causal and tq > 1:
        i = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
        mask = torch.arange(tk, device=q.device)[None, :] <= i
    o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale,
                                                         enable_gqa=k.shape[2] != q.shape[2])
    return o.transpose(1, 2).to(q.dtype)


# ----------------------------------------------------------------------------- HybridNorm modules
# Same parameters as the fast modules (fastlayers.hybridnorm), independent plain-PyTorch forwards.
class QKVNormAttention(_layers.AttentionBase):
    """Reference of :class:`fastlayers.QKVNormAttention`: returns ``W_o attn(x)`` (no residual)."""

    def forward(self, x, cache=None):
        b, t, _ = x.shape
        offset = cache.length if cache is not None else 0
        self.check_length(offset, t)
        h = rms_norm(x, self.norm.weight, self.eps) if self.pre_norm else x
        qkv = F.linear(h, self.qkv.weight).view(b, t, self.n_heads + 2 * self.n_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        w = (self.q_norm.weight, self.k_norm.weight, self.v_norm.weight) if self.qkv_norm else (None,) * 3
        q, k, v = qkv_norm_rope(q, k, v, *w, self.rope_cos, self.rope_sin, self.eps, offset)
        if cache is not None:
            k, v = cache.append(k, v)
        o = attention(q, k, v, causal=True)
        return F.linear(o.reshape(b, t, -1), self.o.weight)


class FeedForward(_layers.FFNBase):
    """Reference of :class:`fastlayers.FeedForward` (SwiGLU FFN with the residual, see ``norm``)."""

    def mlp(self, x):
        return F.linear(swiglu(F.linear(x, self.gate_up.weight)), self.down.weight)

    def forward(self, y):
        w = self.norm.weight
        if self.placement == "hybrid":
            z = rms_norm(y, w, self.eps)
            return z + self.mlp(z)
        if self.placement == "pre":
            return y + self.mlp(rms_norm(y, w, self.eps))
        return rms_norm(y + self.mlp(y), w, self.eps)


class PostNormFFN(FeedForward):
    """Reference of :class:`fastlayers.PostNormFFN`: ``Z = RMSNorm(Y)``, ``Z + SwiGLU(Z)``."""

    def __init__(self, dim, hidden_dim=None, eps=_layers.EPS, device=None, dtype=None):
        super().__init__(dim, hidden_dim, "hybrid", eps, device, dtype)


class HybridNormBlock(_layers.BlockBase):
    """Reference of :class:`fastlayers.HybridNormBlock`."""

    attention_cls = QKVNormAttention
    ffn_cls = FeedForward

    def forward(self, x, cache=None):
        y = x + self.attn(x, cache)
        if self.norm_placement == "post":
            y = rms_norm(y, self.post_attn_norm.weight, self.eps)
        return self.ffn(y)


class HybridNormLM(_layers.LMBase):
    """Reference of :class:`fastlayers.HybridNormLM`."""

    block_cls = HybridNormBlock

    def forward(self, tokens, labels=None, cache=None):
        """``(logits, loss)``; ``labels[b, t]`` is the target of position t (already shifted), loss None
        without labels. With ``cache`` (from :meth:`new_cache`) the tokens continue the cached ones."""
        self.check_tokens(tokens, labels, cache)
        x = F.embedding(tokens, self.embed.weight)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if cache is None else cache[i])
        logits = F.linear(rms_norm(x, self.norm.weight, self.eps), self.head_weight())
        return logits, (None if labels is None else self.loss(logits, labels))


# ----------------------------------------------------------------------------- selective scans (Mamba)
def _softplus_dt(dt, bias, softplus):
    if bias is not None:
        dt = dt + bias.to(dt.dtype)
    return F.softplus(dt) if softplus else dt


def _expand_groups(t, n_out, dim):
    """Repeat each of G groups along ``dim`` so that it has ``n_out`` entries (G divides n_out)."""
    g = t.shape[dim]
    return t if g == n_out else t.repeat_interleave(n_out // g, dim=dim)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False):
    """Mamba-1 selective scan, mamba_ssm's ``selective_scan_ref`` semantics, computed in fp32
    (fp64 for fp64) step by step:

        delta = softplus(delta + delta_bias)            (each part optional)
        x_t = exp(delta_t A) * x_{t-1} + delta_t B_t u_t,   y_t = <x_t, C_t> + D u_t,   out = y * silu(z)

    u, delta, z ``(batch, dim, L)``; A ``(dim, N)``; B, C ``(dim, N)`` (time-invariant),
    ``(batch, N, L)`` or ``(batch, G, N, L)`` (G groups of dim / G channels); D, delta_bias ``(dim,)``.
    Returns out ``(batch, dim, L)`` in u's dtype, and the last state ``(batch, dim, N)`` (fp32) when asked.
    """
    acc = stat_dtype(u.dtype)
    b, d, L = u.shape
    uf, dt = u.to(acc), _softplus_dt(delta.to(acc), None if delta_bias is None else delta_bias[:, None].to(acc),
                                     delta_softplus)
    Af = A.to(acc)

    def per_step(M):  # -> (batch, dim, N, L) view or (dim, N) constant
        M = M.to(acc)
        if M.dim() == 2:
            return M[None, :, :, None]
        if M.dim() == 3:
            return M[:, None]
        return _expand_groups(M, d, 1)

    Bt, Ct = per_step(B), per_step(C)
    x = torch.zeros(b, d, A.shape[1], dtype=acc, device=u.device)
    ys = []
    for t in range(L):
        bt = Bt[..., t] if Bt.shape[-1] == L and B.dim() > 2 else Bt[..., 0]
        ct = Ct[..., t] if Ct.shape[-1] == L and C.dim() > 2 else Ct[..., 0]
        x = torch.exp(dt[:, :, t, None] * Af) * x + (dt[:, :, t] * uf[:, :, t])[..., None] * bt
        ys.append((x * ct).sum(-1))
    y = torch.stack(ys, dim=-1) if L else uf.new_zeros(b, d, 0)
    if D is not None:
        y = y + uf * D.to(acc)[:, None]
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = y.to(u.dtype)
    return (out, x.clone()) if return_last_state else out  # a copy: x is saved for the backward


def ssd_scan(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
             dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, cu_seqlens=None,
             return_varlen_states=False):
    """Mamba-2 scan, ``mamba_chunk_scan_combined``'s semantics as the plain recurrence in fp32
    (``chunk_size`` does not change the result, only how the fast kernels tile it):

        dt = clamp(softplus(dt + dt_bias), *dt_limit)      (each part optional)
        s_t = exp(dt_t A_h) s_{t-1} + dt_t x_t B_t^T,   y_t = s_t C_t + D x_t,   y *= silu(z)

    x, z ``(b, l, h, p)``; dt ``(b, l, h)``; A ``(h,)``; B, C ``(b, l, g, n)`` (g divides h: head i
    uses group i // (h / g)); D ``(h, p)`` or ``(h,)``; dt_bias ``(h,)``; initial/final states
    ``(b, h, p, n)``. ``seq_idx`` ``(b, l)`` int: where it changes, the state restarts from zero
    (packed sequences do not leak into each other; ``initial_states`` seed position 0).
    Returns y ``(b, l, h, p)`` in x's dtype, and the final states (fp32) when asked.

    ``return_varlen_states`` (b == 1, ``cu_seqlens`` ``(num_seqs + 1,)`` the offsets of the packed
    sequences): also the state after each sequence's last token, ``(num_seqs, h, p, n)`` fp32 (zeros for
    a zero-length sequence). Returned last: ``(y, [final_states,] varlen_states)``.
    """
    ends = None
    if return_varlen_states:
        cu = [int(v) for v in cu_seqlens.tolist()]
        ends = {}
        for k in range(len(cu) - 1):
            if cu[k + 1] > cu[k]:
                ends.setdefault(cu[k + 1] - 1, []).append(k)
        varlen = [None] * (len(cu) - 1)
    acc = stat_dtype(x.dtype)
    b, L, h, p = x.shape
    n = B.shape[-1]
    xf = x.to(acc)
    dtf = _softplus_dt(dt.to(acc), dt_bias, dt_softplus)
    if tuple(dt_limit) != (0.0, float("inf")):
        dtf = dtf.clamp(min=dt_limit[0], max=dt_limit[1])
    Bf, Cf = _expand_groups(B.to(acc), h, 2), _expand_groups(C.to(acc), h, 2)  # (b, l, h, n)
    Af = A.to(acc)
    s = (initial_states.to(acc).clone() if initial_states is not None
         else torch.zeros(b, h, p, n, dtype=acc, device=x.device))
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1])[:, None, None, None]
            s = torch.where(same, s, 0)  # not s * same: a NaN must not cross a restart
        decay = torch.exp(dtf[:, t] * Af)[:, :, None, None]                      # (b, h, 1, 1)
        s = decay * s + (dtf[:, t, :, None] * xf[:, t])[..., None] * Bf[:, t, :, None, :]
        ys.append((s * Cf[:, t, :, None, :]).sum(-1))                            # (b, h, p)
        if ends is not None:
            for k in ends.get(t, ()):
                varlen[k] = s[0]
    y = torch.stack(ys, dim=1) if L else xf.new_zeros(b, 0, h, p)
    if D is not None:
        Df = D.to(acc)
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.to(acc))
    out = y.to(x.dtype)
    res = (out, s.clone()) if return_final_states else (out,)  # a copy: s is saved for the backward
    if return_varlen_states:
        zero = s.new_zeros(h, p, n)
        res = (*res, torch.stack([zero if v is None else v for v in varlen]) if varlen else s.new_zeros(0, h, p, n))
    return res if len(res) > 1 else out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One decode step of the Mamba scan, mamba_ssm's ``selective_state_update_ref`` semantics; updates
    ``state`` in place and returns out.

    Without heads: state ``(batch, dim, N)``, x, dt, z ``(batch, dim)``, A ``(dim, N)``, B, C
    ``(batch, N)``, D, dt_bias ``(dim,)``. With heads: state ``(batch, H, dim, N)``, x, dt, z
    ``(batch, H, dim)``, A ``(H, dim, N)``, B, C ``(batch, G, N)``, D, dt_bias ``(H, dim)``.
    ``state_batch_indices`` ``(batch,)``: row i of the batch uses ``state[state_batch_indices[i]]``.
    """
    heads = state.dim() == 4
    if not heads:
        state_v = state[:, None]
        x, dt, A, B, C = x[:, None], dt[:, None], A[None], B[:, None], C[:, None]
        z = None if z is None else z[:, None]
        D = None if D is None else D[None]
        dt_bias = None if dt_bias is None else dt_bias[None]
    else:
        state_v = state
    acc = torch.float64 if state.dtype == torch.float64 else torch.float32
    idx = state_batch_indices if state_batch_indices is not None else torch.arange(x.shape[0],
                                                                                  device=x.device)
    s = state_v[idx].to(acc)                                                     # (batch, H, dim, N)
    h = x.shape[1]
    dtf = _softplus_dt(dt.to(acc), dt_bias, dt_softplus)                         # (batch, H, dim)
    Bf, Cf = _expand_groups(B.to(acc), h, 1), _expand_groups(C.to(acc), h, 1)  # (batch, H, N)
    s = torch.exp(dtf[..., None] * A.to(acc)) * s + (dtf * x.to(acc))[..., None] * Bf[:, :, None, :]
    out = (s * Cf[:, :, None, :]).sum(-1)
    if D is not None:
        out = out + x.to(acc) * D.to(acc)
    if z is not None:
        out = out * F.silu(z.to(acc))
    state_v[idx] = s.to(state.dtype)
    out = out.to(x.dtype)
    return out if heads else out[:, 0]


# ----------------------------------------------------------------------------- MLA decoding
def mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, softmax_scale=None, causal=False):
    """Attention of new queries over a paged latent cache (FlashMLA's ``flash_mla_with_kvcache`` layout):
    gather each sequence's pages, scores in fp32, softmax, values = the first ``head_dim_v`` channels.

    q ``(B, s_q, H, D)``; kv_cache ``(num_blocks, page_size, h_kv, D)`` with H a multiple of h_kv: query
    head h reads KV head ``h // (H // h_kv)`` (contiguous groups; h_kv = 1 is MLA's MQA);
    block_table ``(B, max_blocks)`` int32; cache_seqlens ``(B,)`` int32 (the cache already holds the new
    tokens). With ``causal`` the s_q queries are the last s_q positions and query i sees keys
    ``<= L - s_q + i``. Returns ``out`` ``(B, s_q, H, head_dim_v)`` in q's dtype and ``lse`` ``(B, H, s_q)``
    fp32; a sequence of length 0 (or a causal query that sees no key) gives out 0 and lse +inf
    (FlashMLA's convention)."""
    acc = stat_dtype(q.dtype)
    b, sq, h, d = q.shape
    page, hkv = kv_cache.shape[1], kv_cache.shape[2]
    hg = h // hkv
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(b, sq, h, head_dim_v, dtype=acc, device=q.device)
    lse = torch.full((b, h, sq), float("inf"), dtype=acc, device=q.device)
    for i in range(b):
        n = int(cache_seqlens[i])
        if n == 0:
            continue
        pages = block_table[i, : (n + page - 1) // page].long()
        kv = kv_cache[pages].reshape(-1, hkv, d)[:n].to(acc)                       # (n, h_kv, D)
        qg = q[i].to(acc).reshape(sq, hkv, hg, d)                                  # (s_q, h_kv, H / h_kv, D)
        s = torch.einsum("qgjd,ngd->gjqn", qg, kv).reshape(h, sq, n) * scale       # (H, s_q, n)
        if causal and sq > 1:
            pos = torch.arange(sq, device=q.device)[:, None] + (n - sq)
            s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > pos, float("-inf"))
        lse_i = torch.logsumexp(s, dim=-1)
        # A query that sees no key (causal, fewer cached tokens than queries) gets out 0, lse +inf.
        none = lse_i == float("-inf")
        lse[i] = lse_i.masked_fill(none, float("inf"))
        p = torch.where(none[..., None], 0.0, torch.softmax(s, dim=-1)).reshape(hkv, hg, sq, n)
        out[i] = torch.einsum("gjqn,ngv->qgjv", p, kv[..., :head_dim_v]).reshape(sq, h, head_dim_v)
    return out.to(q.dtype), lse.float() if acc != torch.float64 else lse


class MLA(_layers.MLABase):
    """Reference of :class:`fastlayers.MLA`: the non-absorbed computation (decompress K and V from the
    latents, then causal attention), with or without a :class:`PagedLatentCache`."""

    def project(self, x, offsets):
        """(q ``(B, T, H, nope + rope)`` with RoPE applied, c_kv ``(B, T, kv_lora)``, k_pe ``(B, T, rope)``)."""
        b, t, _ = x.shape
        if self.q_lora_rank is None:
            q = F.linear(x, self.wq.weight)
        else:
            q_lat = F.linear(x, self.wq_a.weight)
            q = F.linear(rms_norm(q_lat, self.q_norm.weight, self.eps) if self.latent_norm else q_lat,
                         self.wq_b.weight)
        q = q.view(b, t, self.n_heads, self.nope + self.rope_dim)
        c_kv, k_pe = F.linear(x, self.wkv_a.weight).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        if self.latent_norm:
            c_kv = rms_norm(c_kv, self.kv_norm.weight, self.eps)
        if self.rope_dim:
            q_pe, k_pe, _ = qkv_norm_rope(q[..., self.nope:], k_pe[:, :, None], k_pe[:, :, None], None, None, None,
                                          self.rope_cos, self.rope_sin, self.eps, offsets)
            q = torch.cat([q[..., : self.nope], q_pe], dim=-1)
            k_pe = k_pe[:, :, 0]
        return q, c_kv, k_pe

    def attend(self, q, c_kv, k_pe):
        """Decompressed causal attention of q ``(T, H, qk)`` over latents ``(L, kv_lora)``, ``(L, rope)``."""
        L = c_kv.shape[0]
        kv = F.linear(c_kv, self.wkv_b.weight).view(L, self.n_kv_groups, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(L, self.n_kv_groups, self.rope_dim)], dim=-1)
        return attention(q[None], k[None], v[None], causal=True, scale=self.softmax_scale)[0]

    def forward(self, x, cache=None, ids=None):
        """``x`` ``(B, T, dim)``; with ``cache`` the T new tokens of sequences ``ids`` are appended first."""
        b, t, _ = x.shape
        offsets = (torch.tensor([cache.length(s) for s in ids], device=x.device) if cache is not None
                   else torch.zeros(b, dtype=torch.int64, device=x.device))
        q, c_kv, k_pe = self.project(x, offsets)
        outs = []
        if cache is not None:
            cache.append(ids, c_kv, k_pe if self.rope_dim else None)
        for i in range(b):
            if cache is not None:
                rows = cache.gather(ids[i]).to(x.dtype)
                ci, ki = rows[:, : self.kv_lora_rank], rows[:, self.kv_lora_rank:]
            else:
                ci, ki = c_kv[i], k_pe[i]
            outs.append(self.attend(q[i], ci, ki))
        o = torch.stack(outs).reshape(b, t, self.n_heads * self.v_dim)
        return F.linear(o, self.wo.weight)
# ----------------------------------------------------------------------------- causal conv1d (Mamba)
def _conv_silu(activation):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish'; got {activation!r}")
    return activation is not None


def causal_conv1d(x, weight, bias=None, activation=None, initial_states=None, return_final_states=False,
                  seq_idx=None):
    """Reference of ``fastlayers.causal_conv1d`` (Tri Dao's ``causal_conv1d_fn``): depthwise causal conv.

    ``out[b, c, t] = act(bias[c] + sum_k weight[c, k] * x[b, c, t - (width - 1) + k])`` with x at negative
    times taken from ``initial_states`` ``(batch, dim, width - 1)`` (zeros when None); computed in fp32
    (fp64 for fp64 x), rounded once to x's dtype. ``final_states``: the last ``width - 1`` inputs of the
    sequence prefixed by the initial states, ``(batch, dim, width - 1)`` in x's dtype.

    ``seq_idx`` ``(batch, seqlen)`` int (packed sequences; no initial or final states with it): the tap
    at time s counts for the output at t only when ``seq_idx[b, s] == seq_idx[b, t]``; times before 0 never
    count; outputs at ``seq_idx < 0`` (padding) are 0."""
    silu = _conv_silu(activation)
    acc = stat_dtype(x.dtype)
    b, d, t = x.shape
    width = weight.shape[1]
    if initial_states is None:
        xx = F.pad(x.to(acc), (width - 1, 0))
    else:
        xx = torch.cat([initial_states.to(acc), x.to(acc)], dim=-1)
    w = weight.to(acc)
    if seq_idx is None:
        out = sum(w[:, k, None] * xx[..., k:k + t] for k in range(width))
    else:
        sq = seq_idx.long()
        sp = F.pad(sq, (width - 1, 0), value=-1)[:, None, :]  # times before 0: never the same sequence
        cur = sq[:, None, :]
        zero = xx.new_zeros(())
        out = sum(w[:, k, None] * torch.where((sp[..., k:k + t] == cur) & (cur >= 0), xx[..., k:k + t], zero)
                  for k in range(width))
    if bias is not None:
        out = out + bias.to(acc)[:, None]
    if silu:
        out = F.silu(out)
    if seq_idx is not None:
        out = torch.where(seq_idx[:, None, :] >= 0, out, out.new_zeros(()))
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    return out, xx[..., t:].to(x.dtype, copy=True)  # a copy, not a view of xx: callers may modify it


def causal_conv1d_varlen_states(x, cu_seqlens, state_len):
    """Reference of ``fastlayers.causal_conv1d_varlen_states``: x ``(total_tokens, dim)`` packed sequences,
    ``cu_seqlens`` ``(batch + 1,)``; returns ``(batch, dim, state_len)`` in x's dtype: the last
    ``state_len`` inputs of each sequence, zeros at the left where the sequence is shorter."""
    batch = cu_seqlens.shape[0] - 1
    states = x.new_zeros((batch, state_len, x.shape[1])).transpose(1, 2)  # channel-last, as causal-conv1d
    for i in range(batch):
        start, end = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        n = min(end - start, state_len)
        if n > 0:
            states[i, :, state_len - n:] = x[end - n:end].t()
    return states


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """Reference of ``fastlayers.causal_conv1d_update`` (decode): ``conv_state`` ``(batch, dim, state_len)``,
    ``state_len >= width - 1``, holds the latest inputs; x ``(batch, dim)`` or ``(batch, dim, seqlen)``.
    Returns the conv outputs of the new steps (like x) and shifts x into ``conv_state`` in place.

    ``cache_seqlens`` ``(batch,)``: conv_state is a circular buffer; the history of row b ends just before
    position ``cache_seqlens[b] % state_len`` and x is written from there on (wrapping; cache_seqlens is
    not changed). ``conv_state_indices`` ``(batch,)``: row b uses ``conv_state[conv_state_indices[b]]``; a
    negative index is a padded row: output 0, no state touched."""
    silu = _conv_silu(activation)
    acc = stat_dtype(x.dtype)
    squeeze = x.dim() == 2
    xs = x[..., None] if squeeze else x
    bsz, d, t = xs.shape
    width, state_len = weight.shape[1], conv_state.shape[-1]
    h = width - 1
    w = weight.to(acc)
    if cache_seqlens is None and conv_state_indices is None:  # vectorised (and differentiable, for the models)
        xx = torch.cat([conv_state.to(acc), xs.to(acc)], dim=-1)
        base = state_len - h
        out = sum(w[:, k, None] * xx[..., base + k:base + k + t] for k in range(width))
        if bias is not None:
            out = out + bias.to(acc)[:, None]
        if silu:
            out = F.silu(out)
        conv_state.copy_(xx[..., t:])
        out = out.to(x.dtype)
        return out[..., 0] if squeeze else out
    out = xs.new_zeros((bsz, d, t), dtype=acc)
    for b in range(bsz):
        slot = b if conv_state_indices is None else int(conv_state_indices[b])
        if slot < 0:
            continue
        st = conv_state[slot]
        if cache_seqlens is None:
            hist = st[:, state_len - h:]
        else:
            pos = int(cache_seqlens[b]) % state_len
            hist = st[:, [(pos - h + i) % state_len for i in range(h)]]
        xx = torch.cat([hist.to(acc), xs[b].to(acc)], dim=-1)
        o = sum(w[:, k, None] * xx[:, k:k + t] for k in range(width))
        if bias is not None:
            o = o + bias.to(acc)[:, None]
        out[b] = F.silu(o) if silu else o
        if cache_seqlens is None:
            st.copy_(torch.cat([st, xs[b].to(st.dtype)], dim=-1)[:, t:])
        else:
            for j in range(t):
                st[:, (pos + j) % state_len] = xs[b, :, j]
    out = out.to(x.dtype)
    return out[..., 0] if squeeze else out


# ----------------------------------------------------------------------------- Mamba layers
def gated_rms_norm(y, z, weight, group_size, eps=_mamba_layers.NORM_EPS):
    """mamba_ssm's gated RMSNorm (norm_before_gate=False): ``g = y * silu(z)`` normalised over groups of
    ``group_size`` channels, times weight; fp32, rounded once to y's dtype."""
    acc = stat_dtype(y.dtype)
    g = y.to(acc) * F.silu(z.to(acc))
    gg = g.reshape(*g.shape[:-1], g.shape[-1] // group_size, group_size)
    gg = gg * torch.rsqrt(gg.square().mean(-1, keepdim=True) + eps)
    return (gg.reshape(g.shape) * weight.to(acc)).to(y.dtype)


def _conv_state_after(conv_state, xc):
    """The last d_conv inputs of ``[conv_state, xc]`` (xc ``(b, C, T)``), detached, in the state's dtype."""
    return torch.cat([conv_state, xc.detach().to(conv_state.dtype)], dim=-1)[..., -conv_state.shape[-1]:]


def _conv_step(xc, conv_state, weight, bias):
    """One decode step of the conv on a copy of ``conv_state``: (out, the new state); differentiable."""
    st = conv_state.clone()
    return causal_conv1d_update(xc, st, weight, bias, "silu"), st


def _ssm_step(state, *args):
    """One ``selective_state_update`` on a copy of ``state``: (out, the new state); differentiable."""
    s = state.clone()
    return selective_state_update(s, *args), s


class Mamba(_mamba_layers.MambaBase):
    """Reference of :class:`fastlayers.Mamba`: reference conv and scan for whole sequences (a prompt on an
    empty cache included); on a non-empty cache, token after token of reference decode steps (the states
    carried through autograd within the call, written back detached)."""

    def forward(self, x, cache=None):
        self.check_input(x, cache)
        if cache is not None and cache.seqlen > 0:
            conv, s = cache.conv_state.to(x.dtype), cache.ssm_state
            outs = []
            for t in range(x.shape[1]):
                o, conv, s = self._step(x[:, t], conv, s)
                outs.append(o)
            cache.conv_state.copy_(conv.detach())
            cache.ssm_state.copy_(s.detach())
            out = torch.cat(outs, dim=1)
        else:
            out = self._sequence(x, cache)
        if cache is not None:
            cache.seqlen += x.shape[1]
        return out

    def _sequence(self, x, cache):
        xz = F.linear(x, self.in_proj.weight, self.in_proj.bias).transpose(1, 2)   # (b, 2d, L)
        xc, z = xz.chunk(2, dim=1)
        u = causal_conv1d(xc, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu")
        dt, B, C = F.linear(u.transpose(1, 2), self.x_proj.weight).split(
            [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)
        y, last = selective_scan(u, delta, -torch.exp(f32(self.A_log)), B.transpose(1, 2), C.transpose(1, 2),
                                 f32(self.D), z, f32(self.dt_proj.bias), True, True)
        if cache is not None:
            cache.conv_state.copy_(_conv_state_after(cache.conv_state, xc))
            cache.ssm_state.copy_(last.detach())
        return F.linear(y.transpose(1, 2), self.out_proj.weight, self.out_proj.bias)

    def _step(self, xt, conv, s):
        """One token ``xt`` ``(b, d_model)`` -> (``(b, 1, d_model)``, new conv state, new ssm state)."""
        xc, z = F.linear(xt, self.in_proj.weight, self.in_proj.bias).chunk(2, dim=-1)
        u, conv = _conv_step(xc, conv, self.conv1d.weight.squeeze(1), self.conv1d.bias)
        dt, B, C = F.linear(u, self.x_proj.weight).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        y, s = _ssm_step(s, u, dt @ self.dt_proj.weight.t(), -torch.exp(f32(self.A_log)), B, C, f32(self.D), z,
                         f32(self.dt_proj.bias), True)
        return F.linear(y, self.out_proj.weight, self.out_proj.bias)[:, None], conv, s


class Mamba2(_mamba_layers.Mamba2Base):
    """Reference of :class:`fastlayers.Mamba2`: reference conv (from the cached inputs) and reference SSD
    recurrence (from the cached state); a single token on a non-empty cache is one reference decode step."""

    def forward(self, x, cache=None):
        self.check_input(x, cache)
        if cache is not None and cache.seqlen > 0 and x.shape[1] == 1:
            out = self._step(x[:, 0], cache)
        else:
            out = self._sequence(x, cache)
        if cache is not None:
            cache.seqlen += x.shape[1]
        return out

    def _heads(self, xbc):
        """x ``(..., nheads, headdim)``, B, C ``(..., G, d_state)`` (Zebra: KV groups expanded to the heads)."""
        _, nx, nb, nc, _ = self.split_sizes()
        xs, B, C = xbc.split([nx, nb, nc], dim=-1)
        lead = xbc.shape[:-1]
        if self.d_xb is None:
            g = self.ngroups
            return (xs.reshape(*lead, self.nheads, self.headdim), B.reshape(*lead, g, self.d_state),
                    C.reshape(*lead, g, self.d_state))
        kv, rep = self.n_kv_groups, self.nheads // self.n_kv_groups

        def expand(t):  # (..., kv * D) -> (..., kv, rep, D) -> (..., nheads, D)
            t = t.reshape(*lead, kv, 1, t.shape[-1] // kv)
            return t.expand(*lead, kv, rep, t.shape[-1]).reshape(*lead, kv * rep, t.shape[-1])

        return expand(xs), expand(B), C.reshape(*lead, self.nheads, self.d_state)

    def _sequence(self, x, cache):
        zxbcdt = F.linear(x, self.in_proj.weight, self.in_proj.bias)
        z, xbc, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xbc_t = xbc.transpose(1, 2)
        init = None
        if cache is not None and cache.seqlen > 0:
            init = cache.conv_state[..., 1:].to(x.dtype, copy=True)
        conv = causal_conv1d(xbc_t, self.conv1d.weight.squeeze(1), self.conv1d.bias, "silu", init).transpose(1, 2)
        xs, B, C = self._heads(conv)
        h0 = cache.ssm_state.clone() if cache is not None and cache.seqlen > 0 else None
        y, last = ssd_scan(xs, dt, -torch.exp(f32(self.A_log)), B, C, self.chunk_size, self.D, None,
                           self.dt_bias, h0, None, True, self.dt_limit, True)
        if cache is not None:
            cache.conv_state.copy_(_conv_state_after(cache.conv_state, xbc_t))
            cache.ssm_state.copy_(last.detach())
        y = gated_rms_norm(y.flatten(-2), z, self.norm.weight, self.d_inner // self.ngroups)
        return F.linear(y, self.out_proj.weight, self.out_proj.bias)

    def _step(self, xt, cache):
        zxbcdt = F.linear(xt, self.in_proj.weight, self.in_proj.bias)
        z, xbc, dt = zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        conv, st = _conv_step(xbc, cache.conv_state.to(xt.dtype), self.conv1d.weight.squeeze(1), self.conv1d.bias)
        xs, B, C = self._heads(conv)
        h, p, n = self.nheads, self.headdim, self.d_state
        dtf = F.softplus(f32(dt) + f32(self.dt_bias)).clamp(*self.dt_limit)
        y, s = _ssm_step(cache.ssm_state, xs, dtf[..., None].expand(-1, h, p),
                         (-torch.exp(f32(self.A_log)))[:, None, None].expand(h, p, n), B, C,
                         f32(self.D)[:, None].expand(h, p), None, None, False)
        cache.conv_state.copy_(st.detach())
        cache.ssm_state.copy_(s.detach())
        y = gated_rms_norm(y.flatten(-2), z, self.norm.weight, self.d_inner // self.ngroups)
        return F.linear(y, self.out_proj.weight, self.out_proj.bias)[:, None]
