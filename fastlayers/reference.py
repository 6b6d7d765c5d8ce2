"""Pure-PyTorch reference implementations: the oracle every backend is tested against.

They compute in float32 (float64 for float64 inputs) and round only the outputs.
"""
import torch
from torch.nn import functional as F

from . import _layers
from ._dtypes import stat_dtype


def norm(x, weight, bias=None, eps=1e-6, residual=None, prenorm=False, residual_in_fp32=False, is_rms=True):
    """Fused residual add + RMSNorm / LayerNorm, the reference of ``fastlayers.rms_norm``/``layer_norm``."""
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
    y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    y = y.to(x.dtype)
    if not prenorm:
        return y
    h_dtype = torch.float32 if residual_in_fp32 and x.dtype != torch.float64 else x.dtype
    return y, h.to(h_dtype)


def rms_norm(x, weight, eps=1e-6, residual=None, prenorm=False, residual_in_fp32=False):
    return norm(x, weight, None, eps, residual, prenorm, residual_in_fp32, is_rms=True)


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


# ----------------------------------------------------------------------------- causal conv1d (Mamba)
def _conv_silu(activation):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish'; got {activation!r}")
    return activation is not None


def causal_conv1d(x, weight, bias=None, activation=None, initial_states=None, return_final_states=False):
    """Reference of ``fastlayers.causal_conv1d`` (Tri Dao's ``causal_conv1d_fn``): depthwise causal conv.

    ``out[b, c, t] = act(bias[c] + sum_k weight[c, k] * x[b, c, t - (width - 1) + k])`` with x at negative
    times taken from ``initial_states`` ``(batch, dim, width - 1)`` (zeros when None); computed in fp32
    (fp64 for fp64 x), rounded once to x's dtype. ``final_states``: the last ``width - 1`` inputs of the
    sequence prefixed by the initial states, ``(batch, dim, width - 1)`` in x's dtype."""
    silu = _conv_silu(activation)
    acc = stat_dtype(x.dtype)
    b, d, t = x.shape
    width = weight.shape[1]
    if initial_states is None:
        xx = F.pad(x.to(acc), (width - 1, 0))
    else:
        xx = torch.cat([initial_states.to(acc), x.to(acc)], dim=-1)
    w = weight.to(acc)
    out = sum(w[:, k, None] * xx[..., k:k + t] for k in range(width))
    if bias is not None:
        out = out + bias.to(acc)[:, None]
    if silu:
        out = F.silu(out)
    out = out.to(x.dtype)
    if not return_final_states:
        return out
    return out, xx[..., t:].to(x.dtype)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """Reference of ``fastlayers.causal_conv1d_update`` (decode): ``conv_state`` ``(batch, dim, state_len)``,
    ``state_len >= width - 1``, holds the latest inputs; x ``(batch, dim)`` or ``(batch, dim, seqlen)``.
    Returns the conv outputs of the new steps (like x) and shifts x into ``conv_state`` in place."""
    silu = _conv_silu(activation)
    acc = stat_dtype(x.dtype)
    squeeze = x.dim() == 2
    xs = x[..., None] if squeeze else x
    t = xs.shape[-1]
    width, state_len = weight.shape[1], conv_state.shape[-1]
    xx = torch.cat([conv_state.to(acc), xs.to(acc)], dim=-1)
    w = weight.to(acc)
    base = state_len - (width - 1)
    out = sum(w[:, k, None] * xx[..., base + k:base + k + t] for k in range(width))
    if bias is not None:
        out = out + bias.to(acc)[:, None]
    if silu:
        out = F.silu(out)
    conv_state.copy_(xx[..., t:])
    out = out.to(x.dtype)
    return out[..., 0] if squeeze else out
