"""The MLA layer (DeepSeek-V2/V3 Multi-head Latent Attention; Zebra-Llama's grouped variant).

Training and prefill without a cache decompress K and V from the latents and run causal SDPA.
With a :class:`PagedLatentCache` the new tokens' latents ``[c_kv ; k_pe]`` are appended and
decoding runs in the latent space with absorbed weights (DESIGN.md §6):
``q~_h = W_UK,h^T q_nope,h``; ``o_h = mla_decode([q~_h ; q_pe,h], cache)``; ``out_h = W_UV,h o_h``;
then W_o. Both paths read one state_dict; :mod:`fastlayers.reference` has the non-absorbed reference.
"""
import torch
from torch.nn import functional as F

from . import _layers
from ._layers import PagedLatentCache  # noqa: F401
from .hybridnorm import causal_attention
from .ops import mla_decode, qkv_norm_rope, rms_norm


class MLA(_layers.MLABase):
    """``MLA(dim, n_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
    n_kv_groups=None, rope_theta=10000.0, max_seq_len=4096, eps=1e-6, latent_norm=True)``: ``q_lora_rank=None`` is a direct query projection;
    ``n_kv_groups`` < n_heads gives Zebra-Llama's variant where ``wkv_b`` makes fewer KV groups, each
    shared by n_heads / n_kv_groups query heads. RoPE pairs channel i with i + rope/2.

    ``forward(x, cache=None, ids=None, absorb=True)``: without a cache, causal attention over x; with a
    :class:`PagedLatentCache` (:meth:`new_cache`) and sequence ids, x holds the next T tokens of each
    sequence, appended to the cache, and attends to everything cached (``absorb=False``: the
    decompressed computation on the same cache, for checking).
    """

    def project(self, x, offsets):
        b, t, _ = x.shape
        if self.q_lora_rank is None:
            q = F.linear(x, self.wq.weight)
        else:
            q_lat = F.linear(x, self.wq_a.weight)
            if self.latent_norm:
                q_lat = rms_norm(q_lat, self.q_norm.weight, self.eps)
            q = F.linear(q_lat, self.wq_b.weight)
        q = q.view(b, t, self.n_heads, self.nope + self.rope_dim)
        c_kv, k_pe = F.linear(x, self.wkv_a.weight).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        if self.latent_norm:
            c_kv = rms_norm(c_kv, self.kv_norm.weight, self.eps)
        q_nope = q[..., : self.nope]
        if not self.rope_dim:
            return q_nope, q[..., self.nope:], c_kv, k_pe
        k_pe = k_pe[:, :, None]
        q_pe, k_pe, _ = qkv_norm_rope(q[..., self.nope:], k_pe, k_pe, None, None, None, self.rope_cos, self.rope_sin,
                                      self.eps, offsets)
        return q_nope, q_pe, c_kv, k_pe[:, :, 0]

    def _decompress(self, c_kv, k_pe):
        b, L, _ = c_kv.shape
        kv = F.linear(c_kv, self.wkv_b.weight).view(b, L, self.n_kv_groups, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(b, L, self.n_kv_groups, self.rope_dim)], dim=-1)
        return k, v

    def forward(self, x, cache=None, ids=None, absorb=True):
        b, t, _ = x.shape
        if cache is None:
            offsets = 0
        else:
            if ids is None or len(ids) != b:
                raise ValueError(f"MLA: with a cache, give the ids of the {b} sequences of x")
            offsets = torch.tensor([cache.length(s) for s in ids], device=x.device)
            if int(offsets.max()) + t > self.max_seq_len:
                raise ValueError(f"MLA: positions up to {int(offsets.max()) + t} exceed max_seq_len {self.max_seq_len}")
        q_nope, q_pe, c_kv, k_pe = self.project(x, offsets)
        if cache is None:
            k, v = self._decompress(c_kv, k_pe)
            o = causal_attention(torch.cat([q_nope, q_pe], dim=-1), k, v)
        else:
            cache.append(ids, c_kv, k_pe if self.rope_dim else None)
            o = self._absorbed(q_nope, q_pe, cache, ids) if absorb else self._decompressed(q_nope, q_pe, cache, ids)
        return F.linear(o.reshape(b, t, self.n_heads * self.v_dim), self.wo.weight)

    def _absorbed(self, q_nope, q_pe, cache, ids):
        w_uk, w_uv = self.absorbed_weights()
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)
        q = torch.cat([q_lat, q_pe], dim=-1).to(cache.kv.dtype)
        o_lat, _ = mla_decode(q, cache.kv, cache.block_table(ids), cache.cache_seqlens(ids), self.kv_lora_rank,
                              softmax_scale=self.softmax_scale, causal=True)
        return torch.einsum("bthc,hvc->bthv", o_lat.to(q_nope.dtype), w_uv)

    def _decompressed(self, q_nope, q_pe, cache, ids):
        q = torch.cat([q_nope, q_pe], dim=-1)
        outs = []
        for i, s in enumerate(ids):
            rows = cache.gather(s).to(q.dtype)[None]
            k, v = self._decompress(rows[..., : self.kv_lora_rank], rows[..., self.kv_lora_rank:])
            outs.append(causal_attention(q[i:i + 1], k, v))
        return torch.cat(outs)
