"""Parameters, validation and initialisation of the HybridNorm modules.

The fast modules (``fastlayers.hybridnorm``) and the pure-PyTorch reference
modules (``fastlayers.reference``) subclass these bases and write their own
``forward``: one set of parameter names, so one state_dict loads into both, and
two independent implementations of the math, so comparing them tests something.
"""
import math

import torch
from torch import nn

NORMS = ("hybrid", "hybrid_star_first", "pre", "post")
LM_NORMS = ("hybrid", "hybrid_star", "pre", "post")
EPS = 1e-5


class Gain(nn.Module):
    """The weight of an RMSNorm (``weight``, ones), applied by the owner's forward."""

    def __init__(self, dim, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(int(dim), device=device, dtype=dtype))

    def extra_repr(self):
        return str(self.weight.shape[0])


def default_ffn_hidden(dim, multiple_of=256):
    """SwiGLU hidden size: 8/3 dim rounded up to a multiple of 256 (1024 -> 2816)."""
    h = int(8 * dim / 3)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def trunc_normal_(w, std):
    """Truncated normal at +-3 std (the HybridNorm paper's initialisation)."""
    return nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)


def _positive_int(cls, name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{cls}: {name} must be a positive int; got {v!r}")
    return v


class KVCache:
    """Keys and values of one attention layer, ``(batch, max_len, n_kv_heads, head_dim)``, as the
    attention stores them (after norm and RoPE); ``length`` tokens are filled."""

    def __init__(self, batch, max_len, n_kv_heads, head_dim, dtype=None, device=None):
        self.k = torch.zeros(batch, max_len, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def append(self, k, v):
        """Store ``k``/``v`` ``(batch, T, n_kv_heads, head_dim)`` after the filled part; return all keys/values."""
        t0, t = self.length, k.shape[1]
        if t0 + t > self.k.shape[1]:
            raise ValueError(f"KVCache: {t0} + {t} tokens exceed its capacity of {self.k.shape[1]}")
        self.k[:, t0:t0 + t] = k
        self.v[:, t0:t0 + t] = v
        self.length = t0 + t
        return self.k[:, :t0 + t], self.v[:, :t0 + t]


class AttentionBase(nn.Module):
    """QKV-norm attention parameters: ``qkv`` (one fused projection, q heads then k then v),
    ``o``, per-projection head gains ``q_norm``/``k_norm``/``v_norm`` (with ``qkv_norm``)
    and the input norm ``norm`` (with ``pre_norm``)."""

    def __init__(self, dim, n_heads, n_kv_heads=None, head_dim=None, rope_theta=500000.0, qkv_norm=True,
                 pre_norm=False, max_seq_len=4096, eps=EPS, device=None, dtype=None):
        super().__init__()
        cls = type(self).__name__
        dim = _positive_int(cls, "dim", dim)
        n_heads = _positive_int(cls, "n_heads", n_heads)
        n_kv_heads = n_heads if n_kv_heads is None else _positive_int(cls, "n_kv_heads", n_kv_heads)
        if n_heads % n_kv_heads:
            raise ValueError(f"{cls}: n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        if head_dim is None:
            if dim % n_heads:
                raise ValueError(f"{cls}: dim ({dim}) is not divisible by n_heads ({n_heads}); give head_dim")
            head_dim = dim // n_heads
        head_dim = _positive_int(cls, "head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"{cls}: RoPE needs an even head_dim; got {head_dim}")
        if not (isinstance(rope_theta, (int, float)) and rope_theta > 0):
            raise ValueError(f"{cls}: rope_theta must be > 0; got {rope_theta!r}")
        self.dim, self.n_heads, self.n_kv_heads, self.head_dim = dim, n_heads, n_kv_heads, head_dim
        self.rope_theta, self.qkv_norm, self.pre_norm, self.eps = float(rope_theta), bool(qkv_norm), bool(pre_norm), eps
        self.max_seq_len = _positive_int(cls, "max_seq_len", max_seq_len)
        kw = dict(device=device, dtype=dtype)
        if pre_norm:
            self.norm = Gain(dim, **kw)
        self.qkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=False, **kw)
        if qkv_norm:
            self.q_norm, self.k_norm, self.v_norm = (Gain(head_dim, **kw) for _ in range(3))
        self.o = nn.Linear(n_heads * head_dim, dim, bias=False, **kw)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self._make_rope(device)
        self.reset_parameters()

    def _make_rope(self, device):
        from .reference import rope_tables
        self.rope_cos, self.rope_sin = rope_tables(self.head_dim, self.max_seq_len, self.rope_theta, device)

    def _apply(self, fn, recurse=True):
        # .to(dtype) must not round the RoPE tables: rebuild them in fp32 on the new device.
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32 or self.rope_cos.shape[0] != self.max_seq_len:
            self._make_rope(self.rope_cos.device)
        return self

    def reset_parameters(self, n_layers=1):
        self._make_rope(self.rope_cos.device)  # also after meta-device construction + to_empty()
        std = math.sqrt(2 / (5 * self.dim))
        trunc_normal_(self.qkv.weight, std)
        trunc_normal_(self.o.weight, std / math.sqrt(2 * n_layers))
        for g in ("norm", "q_norm", "k_norm", "v_norm"):
            if hasattr(self, g):
                nn.init.ones_(getattr(self, g).weight)

    def check_length(self, offset, t):
        if offset + t > self.max_seq_len:
            raise ValueError(f"{type(self).__name__}: positions up to {offset + t} exceed max_seq_len "
                             f"{self.max_seq_len}")

    def new_cache(self, batch, max_len=None, dtype=None, device=None):
        w = self.qkv.weight
        return KVCache(batch, max_len or self.max_seq_len, self.n_kv_heads, self.head_dim,
                       dtype or w.dtype, device or w.device)

    def extra_repr(self):
        return (f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"qkv_norm={self.qkv_norm}, pre_norm={self.pre_norm}, rope_theta={self.rope_theta:g}")


FFN_NORMS = ("hybrid", "pre", "post")


class FFNBase(nn.Module):
    """SwiGLU FFN parameters: ``norm``, ``gate_up`` (one fused projection: gate rows then up rows), ``down``.

    ``norm`` placement: ``"hybrid"`` Z = norm(Y), out = Z + SwiGLU(Z) (HybridNorm's Post-Norm FFN);
    ``"pre"`` out = Y + SwiGLU(norm(Y)); ``"post"`` out = norm(Y + SwiGLU(Y))."""

    def __init__(self, dim, hidden_dim=None, norm="hybrid", eps=EPS, device=None, dtype=None):
        super().__init__()
        cls = type(self).__name__
        if norm not in FFN_NORMS:
            raise ValueError(f"{cls}: unknown norm placement {norm!r}; expected one of {', '.join(FFN_NORMS)}")
        self.dim = _positive_int(cls, "dim", dim)
        self.hidden_dim = default_ffn_hidden(dim) if hidden_dim is None else _positive_int(cls, "hidden_dim",
                                                                                            hidden_dim)
        self.placement, self.eps = norm, eps
        kw = dict(device=device, dtype=dtype)
        self.norm = Gain(dim, **kw)
        self.gate_up = nn.Linear(dim, 2 * self.hidden_dim, bias=False, **kw)
        self.down = nn.Linear(self.hidden_dim, dim, bias=False, **kw)
        self.reset_parameters()

    def reset_parameters(self, n_layers=1):
        std = math.sqrt(2 / (5 * self.dim))
        trunc_normal_(self.gate_up.weight, std)
        trunc_normal_(self.down.weight, std / math.sqrt(2 * n_layers))
        nn.init.ones_(self.norm.weight)

    def extra_repr(self):
        return f"norm={self.placement!r}"


def block_layout(cls, norm):
    """(qkv_norm, attention pre-norm, FFN placement, post-attention norm) of a block placement."""
    if norm not in NORMS:
        raise ValueError(f"{cls}: unknown norm placement {norm!r}; expected one of {', '.join(NORMS)}")
    return {"hybrid": (True, False, "hybrid", False),
            "hybrid_star_first": (True, True, "pre", False),
            "pre": (False, True, "pre", False),
            "post": (False, False, "post", True)}[norm]


class BlockBase(nn.Module):
    """One transformer block: ``attn`` and ``ffn`` (and ``post_attn_norm`` for ``norm="post"``).

    ``norm``: ``"hybrid"`` (QKV-norm attention, Post-Norm FFN), ``"hybrid_star_first"``
    (HybridNorm*'s block 0: Pre-Norm with QKV norms), ``"pre"`` and ``"post"`` (classic)."""

    attention_cls = AttentionBase
    ffn_cls = FFNBase

    def __init__(self, dim, n_heads, n_kv_heads=None, ffn_hidden=None, norm="hybrid", head_dim=None,
                 rope_theta=500000.0, max_seq_len=4096, eps=EPS, device=None, dtype=None):
        super().__init__()
        qkv_norm, pre, ffn_norm, post_attn = block_layout(type(self).__name__, norm)
        self.norm_placement = norm
        kw = dict(device=device, dtype=dtype)
        self.attn = self.attention_cls(dim, n_heads, n_kv_heads, head_dim, rope_theta, qkv_norm=qkv_norm,
                                       pre_norm=pre, max_seq_len=max_seq_len, eps=eps, **kw)
        if post_attn:
            self.post_attn_norm = Gain(dim, **kw)
        self.ffn = self.ffn_cls(dim, ffn_hidden, norm=ffn_norm, eps=eps, **kw)
        self.eps = eps

    def reset_parameters(self, n_layers=1):
        self.attn.reset_parameters(n_layers)
        self.ffn.reset_parameters(n_layers)
        if hasattr(self, "post_attn_norm"):
            nn.init.ones_(self.post_attn_norm.weight)

    def extra_repr(self):
        return f"norm={self.norm_placement!r}"


class LMBase(nn.Module):
    """Decoder LM: ``embed``, ``blocks``, final ``norm``, ``lm_head`` (absent when tied)."""

    block_cls = BlockBase

    def __init__(self, vocab_size, dim, n_layers, n_heads, n_kv_heads=None, ffn_hidden=None, norm="hybrid",
                 max_seq_len=2048, tie_embeddings=True, head_dim=None, rope_theta=500000.0, eps=EPS,
                 device=None, dtype=None):
        super().__init__()
        cls = type(self).__name__
        if norm not in LM_NORMS:
            raise ValueError(f"{cls}: unknown norm placement {norm!r}; expected one of {', '.join(LM_NORMS)}")
        self.vocab_size = _positive_int(cls, "vocab_size", vocab_size)
        self.dim = _positive_int(cls, "dim", dim)
        self.n_layers = _positive_int(cls, "n_layers", n_layers)
        self.norm_placement, self.tie_embeddings, self.eps = norm, bool(tie_embeddings), eps
        self.max_seq_len = _positive_int(cls, "max_seq_len", max_seq_len)
        kw = dict(device=device, dtype=dtype)
        self.embed = nn.Embedding(vocab_size, dim, **kw)

        def placement(i):
            if norm == "hybrid_star":
                return "hybrid_star_first" if i == 0 else "hybrid"
            return norm

        self.blocks = nn.ModuleList(
            self.block_cls(dim, n_heads, n_kv_heads, ffn_hidden, placement(i), head_dim, rope_theta, max_seq_len,
                           eps, **kw) for i in range(n_layers))
        self.norm = Gain(dim, **kw)
        if not tie_embeddings:
            self.lm_head = nn.Linear(dim, vocab_size, bias=False, **kw)
        self.reset_parameters()

    def reset_parameters(self):
        """The HybridNorm paper's initialisation: truncated normal (+-3 sigma), sigma = sqrt(2 / (5 dim));
        W_o and W_down scaled by 1 / sqrt(2 n_layers); gains 1."""
        std = math.sqrt(2 / (5 * self.dim))
        trunc_normal_(self.embed.weight, std)
        for b in self.blocks:
            b.reset_parameters(self.n_layers)
        nn.init.ones_(self.norm.weight)
        if not self.tie_embeddings:
            trunc_normal_(self.lm_head.weight, std)

    def head_weight(self):
        return self.embed.weight if self.tie_embeddings else self.lm_head.weight

    def check_tokens(self, tokens, labels=None, cache=None):
        cls = type(self).__name__
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point:
            raise ValueError(f"{cls}: tokens must be an integer tensor (batch, seqlen); got "
                             f"{getattr(tokens, 'dtype', type(tokens))} {tuple(getattr(tokens, 'shape', ()))}")
        offset = cache[0].length if cache else 0
        if offset + tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"{cls}: {offset + tokens.shape[1]} positions exceed max_seq_len {self.max_seq_len}")
        if labels is not None and tuple(labels.shape) != tuple(tokens.shape):
            raise ValueError(f"{cls}: labels must have the shape of tokens {tuple(tokens.shape)}; "
                             f"got {tuple(labels.shape)}")

    @staticmethod
    def loss(logits, labels):
        """Mean cross-entropy (fp32) of ``logits`` against ``labels`` (same positions; -100 ignored)."""
        return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100)

    def new_cache(self, batch, max_len=None):
        """One :class:`KVCache` per block."""
        return [b.attn.new_cache(batch, max_len or self.max_seq_len) for b in self.blocks]

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Prefill ``tokens`` ``(batch, T)`` into a KV cache, then decode ``max_new_tokens`` one at a time.

        ``temperature`` 0 (or None) is greedy; otherwise sample from softmax(logits / temperature),
        restricted to the ``top_k`` most likely tokens when given. Returns ``(batch, T + max_new_tokens)``."""
        self.check_tokens(tokens)
        if max_new_tokens <= 0:
            return tokens
        total = tokens.shape[1] + max_new_tokens
        if total > self.max_seq_len:
            raise ValueError(f"{type(self).__name__}: {total} tokens exceed max_seq_len {self.max_seq_len}")
        cache = self.new_cache(tokens.shape[0], total)
        logits, _ = self(tokens, cache=cache)
        out = [tokens]
        for i in range(max_new_tokens):
            nxt = sample(logits[:, -1], temperature, top_k, generator)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits, _ = self(nxt, cache=cache)
        return torch.cat(out, dim=1)


def sample(logits, temperature=1.0, top_k=None, generator=None):
    """Next tokens ``(batch, 1)`` from the last logits ``(batch, vocab)``."""
    if not temperature:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
