"""HybridNorm modules on the fused kernels (HybridNorm, NeurIPS 2025; DESIGN.md §6).

    attention  Y = X + W_o attn(RoPE(norm_q(X W_q)), RoPE(norm_k(X W_k)), norm_v(X W_v))
    FFN        Z = RMSNorm(Y),  X_next = Z + SwiGLU(Z)

The same classes build the classic Pre-Norm and Post-Norm blocks (``norm=``), so
the paper's comparison runs with one model class. Pure-PyTorch references with
the same parameter names live in :mod:`fastlayers.reference`.

What runs where: the q/k/v norms and RoPE are one :func:`fastlayers.qkv_norm_rope`
pass over the fused projection output; attention is
``torch.nn.functional.scaled_dot_product_attention`` on the (B, T, H, D) outputs
(flash kernels on CPU and GPU, GQA without repeating k/v); residual adds are
fused into the following RMSNorm (:func:`fastlayers.rms_norm` with ``residual=``)
or into the output projection's GEMM (``addmm``); SwiGLU is one
:func:`fastlayers.swiglu` pass over the fused gate/up projection.
"""
import torch
from torch.nn import functional as F

from . import _layers
from ._layers import KVCache, default_ffn_hidden  # noqa: F401
from .ops import qkv_norm_rope_packed, rms_norm, swiglu


def _linear_residual(x, weight, residual):
    """``residual + x @ weight.T`` as one GEMM (the add is the GEMM's beta term)."""
    if residual is None:
        return F.linear(x, weight)
    shape = residual.shape
    return torch.addmm(residual.reshape(-1, shape[-1]), x.reshape(-1, x.shape[-1]), weight.t()).view(shape)


def causal_attention(q, k, v):
    """SDPA on ``(B, T, H, D)`` tensors with causal GQA; the queries are the last ``Tq`` of the ``Tk``
    key positions (bottom-right aligned mask when a KV cache holds earlier tokens). Returns
    ``(B, Tq, Hq, D)`` (a view of SDPA's (B, T, H, D) output)."""
    tq, tk = q.shape[1], k.shape[1]
    gqa = k.shape[2] != q.shape[2]
    if tq == tk:
        mask, causal = None, True
    elif tq == 1:
        mask, causal = None, False
    else:
        i = torch.arange(tq, device=q.device)[:, None] + (tk - tq)
        mask, causal = torch.arange(tk, device=q.device)[None, :] <= i, False
    if gqa and q.is_cuda and (mask is not None or q.dtype not in (torch.float16, torch.bfloat16)):
        # On CUDA only the flash backend takes enable_gqa (fp16/bf16, no mask); elsewhere it would drop to
        # the math backend, so repeat the k/v heads and let the efficient/cuDNN kernels run.
        rep = q.shape[2] // k.shape[2]
        k, v, gqa = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2), False
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=causal, enable_gqa=gqa)
    return o.transpose(1, 2)


class QKVNormAttention(_layers.AttentionBase):
    """Causal GQA attention with per-head RMSNorm on q, k and v (``qkv_norm``) and RoPE on q and k.

    ``QKVNormAttention(dim, n_heads, n_kv_heads=None, head_dim=None, rope_theta=500000.0,
    qkv_norm=True, pre_norm=False)``; ``pre_norm`` adds an RMSNorm of the input (a classic
    Pre-Norm attention, or HybridNorm*'s first block). ``forward(x, cache=None, residual=None)``
    returns ``W_o attn`` (plus ``residual``, fused into the GEMM, when given); ``cache`` is a
    :class:`KVCache` (:meth:`new_cache`) that the new tokens are appended to.
    """

    def forward(self, x, cache=None, residual=None):
        b, t, _ = x.shape
        offset = cache.length if cache is not None else 0
        self.check_length(offset, t)
        h = rms_norm(x, self.norm.weight, self.eps) if self.pre_norm else x
        qkv = F.linear(h, self.qkv.weight)
        w = (self.q_norm.weight, self.k_norm.weight, self.v_norm.weight) if self.qkv_norm else (None,) * 3
        q, k, v = qkv_norm_rope_packed(qkv, self.n_heads, self.n_kv_heads, *w, self.rope_cos, self.rope_sin,
                                       self.eps, offset)
        if cache is not None:
            k, v = cache.append(k, v)
        o = causal_attention(q, k, v).reshape(b, t, self.n_heads * self.head_dim)
        return _linear_residual(o, self.o.weight, residual)


def _add_norm(x, w, eps, residual, prenorm=False):
    """rms_norm(x + residual): a float32 residual stream next to a 16-bit sublayer output (bf16 autocast
    with float32 weights) is summed and kept in float32 (``residual_in_fp32``) instead of refused."""
    mixed = residual is not None and residual.dtype == torch.float32 and x.dtype != torch.float32
    return rms_norm(x, w, eps, residual=residual, prenorm=prenorm, residual_in_fp32=mixed)


class FeedForward(_layers.FFNBase):
    """SwiGLU FFN with its RMSNorm and residual: ``FeedForward(dim, hidden_dim=None, norm="hybrid")``.

    ``norm="hybrid"``: Z = RMSNorm(Y), out = Z + SwiGLU(Z) (:class:`PostNormFFN`); ``"pre"``:
    out = Y + SwiGLU(RMSNorm(Y)); ``"post"``: out = RMSNorm(Y + SwiGLU(Y)).
    ``forward(y, residual=None)`` takes Y, or Y = y + residual summed inside the fused norm.
    """

    def forward(self, y, residual=None):
        w = self.norm.weight
        if self.placement == "hybrid":
            z = _add_norm(y, w, self.eps, residual)
            return _linear_residual(swiglu(F.linear(z, self.gate_up.weight)), self.down.weight, z)
        if self.placement == "pre":
            if residual is None:
                n = rms_norm(y, w, self.eps)
            else:
                n, y = _add_norm(y, w, self.eps, residual, prenorm=True)
            return _linear_residual(swiglu(F.linear(n, self.gate_up.weight)), self.down.weight, y)
        if residual is not None:
            y = y + residual
        s = F.linear(swiglu(F.linear(y, self.gate_up.weight)), self.down.weight)
        return _add_norm(s, w, self.eps, y)


class PostNormFFN(FeedForward):
    """HybridNorm's FFN: ``Z = RMSNorm(Y)``, ``X_next = Z + SwiGLU(Z)`` (``PostNormFFN(dim, hidden_dim)``)."""

    def __init__(self, dim, hidden_dim=None, eps=_layers.EPS, device=None, dtype=None):
        super().__init__(dim, hidden_dim, "hybrid", eps, device, dtype)


class HybridNormBlock(_layers.BlockBase):
    """``HybridNormBlock(dim, n_heads, n_kv_heads=None, ffn_hidden=None, norm="hybrid")``.

    ``norm``: ``"hybrid"`` (QKV-norm attention + Post-Norm FFN), ``"hybrid_star_first"``
    (HybridNorm*'s block 0: Pre-Norm, QKV norms kept), ``"pre"``, ``"post"`` (classic blocks).
    ``forward(x, cache=None)``.
    """

    attention_cls = QKVNormAttention
    ffn_cls = FeedForward

    def forward(self, x, cache=None):
        p = self.norm_placement
        if p == "hybrid":
            return self.ffn(self.attn(x, cache), residual=x)
        if p == "post":
            y = _add_norm(self.attn(x, cache), self.post_attn_norm.weight, self.eps, x)
            return self.ffn(y)
        return self.ffn(self.attn(x, cache, residual=x))


class HybridNormLM(_layers.LMBase):
    """Decoder LM of HybridNorm blocks.

    ``HybridNormLM(vocab_size, dim, n_layers, n_heads, n_kv_heads=None, ffn_hidden=None,
    norm="hybrid" | "hybrid_star" | "pre" | "post", max_seq_len=2048, tie_embeddings=True)``;
    ``"hybrid_star"`` makes block 0 Pre-Norm (HybridNorm*). Initialised as in the paper
    (:meth:`reset_parameters`). ``forward(tokens, labels=None, cache=None)`` returns
    ``(logits, loss)`` with ``labels[b, t]`` the target of position t (already shifted; -100
    ignored); ``generate(tokens, max_new_tokens, temperature, top_k)`` decodes with a KV cache.
    """

    block_cls = HybridNormBlock

    def forward(self, tokens, labels=None, cache=None):
        self.check_tokens(tokens, labels, cache)
        x = F.embedding(tokens, self.embed.weight)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if cache is None else cache[i])
        logits = F.linear(rms_norm(x, self.norm.weight, self.eps), self.head_weight())
        return logits, (None if labels is None else self.loss(logits, labels))
