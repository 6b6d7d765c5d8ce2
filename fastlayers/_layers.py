"""Parameters, validation and initialisation of the HybridNorm modules.

The fast modules (``fastlayers.hybridnorm``) and the pure-PyTorch reference
modules (``fastlayers.reference``) subclass these bases and write their own
``forward``: one set of parameter names, so one state_dict loads into both, and
two independent implementations of the math, so comparing them tests something.
"""
import math

import torch
from torch import nn

from ._alloc import empty

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
        check_token_ids(cls, tokens, self.vocab_size)

    @staticmethod
    def loss(logits, labels):
        """Mean cross-entropy (fp32) of ``logits`` against ``labels`` (same positions; -100 ignored)."""
        return nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100)

    def new_cache(self, batch, max_len=None):
        """One :class:`KVCache` per block."""
        return [b.attn.new_cache(batch, max_len or self.max_seq_len) for b in self.blocks]

    def generate(self, tokens, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Prefill ``tokens`` ``(batch, T)`` into a KV cache, then decode ``max_new_tokens`` one at a time
        (:func:`generate`)."""
        return generate(self, tokens, max_new_tokens, temperature, top_k, generator)


def check_token_ids(cls, tokens, vocab_size):
    """Token ids must lie in ``[0, vocab_size)`` (else the embedding raises a bare IndexError on the CPU and a
    device-side assert on a GPU). Reading the range syncs a CUDA tensor with the host: the check is skipped
    while torch.compile traces or a CUDA graph is being captured."""
    if tokens.numel() == 0 or torch.compiler.is_compiling():
        return
    if tokens.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    lo, hi = (int(v) for v in torch.aminmax(tokens))
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        where = tuple(int(i) for i in (tokens == bad).nonzero()[0])
        raise ValueError(f"{cls}: token ids must lie in [0, vocab_size={vocab_size}); got {bad} at {where}")


# Decode steps whose work (batch x parameters, multiply-adds a token) is below this run on one thread:
# a one-token step of a small model is dozens of tiny ops, and on shared cores each multi-threaded op
# can wait milliseconds at its barrier for a descheduled thread. Measured on the 2-core machine
# (2026-12-04, other processes running, greedy generate of 32 tokens after 8, batch 1):
# hybridnorm-tiny (1.5M parameters) 495 ms at 2 threads vs 120 ms at 1, zebra-tiny (1.6M) 850 vs 187 ms;
# on an idle machine 2 threads gained 12% on hybridnorm-tiny and 27% on hybridnorm-small (13M), so the
# bar sits between the two.
DECODE_PARALLEL_MIN_WORK = 1 << 23


class _decode_threads:
    """Within: torch's CPU thread count is 1 when ``work`` is below DECODE_PARALLEL_MIN_WORK (CPU only)."""

    def __init__(self, device, work):
        self.one = device.type == "cpu" and work < DECODE_PARALLEL_MIN_WORK and torch.get_num_threads() > 1

    def __enter__(self):
        if self.one:
            self.n = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.one:
            torch.set_num_threads(self.n)


@torch.no_grad()
def generate(model, tokens, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    """Prefill ``tokens`` ``(batch, T)`` into ``model.new_cache(batch, T + max_new_tokens)``, then decode
    ``max_new_tokens`` one at a time; ``model(tokens, cache=cache)`` returns ``(logits, loss)``.

    ``temperature`` 0 (or None) is greedy; otherwise sample from softmax(logits / temperature),
    restricted to the ``top_k`` most likely tokens when given. Returns ``(batch, T + max_new_tokens)``."""
    model.check_tokens(tokens)
    if max_new_tokens <= 0:
        return tokens
    total = tokens.shape[1] + max_new_tokens
    if total > model.max_seq_len:
        raise ValueError(f"{type(model).__name__}: {total} tokens exceed max_seq_len {model.max_seq_len}")
    cache = model.new_cache(tokens.shape[0], total)
    logits, _ = model(tokens, cache=cache)
    out = [tokens]
    work = tokens.shape[0] * sum(p.numel() for p in model.parameters())
    with _decode_threads(tokens.device, work):
        for i in range(max_new_tokens):
            nxt = sample(logits[:, -1], temperature, top_k, generator)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits, _ = model(nxt, cache=cache)
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


# ----------------------------------------------------------------------------- MLA
class PagedLatentCache:
    """A paged cache of MLA latents: ``kv`` ``(num_blocks, page_size, 1, latent_dim + rope_dim)``, each row
    ``[c_kv ; k_pe]`` of one token (one layer). Sequences are allocated and freed by id; blocks come from
    a free list, so a sequence's pages need not be contiguous.

    ``allocate()`` -> id; ``free(id)``; ``append(ids, latent, rope)`` writes the rows of T new tokens of
    each sequence with one indexed copy; ``block_table(ids)`` ``(len(ids), max_blocks)`` int32 and
    ``cache_seqlens(ids)`` ``(len(ids),)`` int32 are the arguments of :func:`fastlayers.mla_decode`.
    """

    def __init__(self, num_blocks, page_size, latent_dim, rope_dim, dtype=torch.bfloat16, device=None):
        if num_blocks <= 0 or page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"PagedLatentCache: num_blocks must be > 0 and page_size a power of two; got "
                             f"{num_blocks}, {page_size}")
        if latent_dim <= 0 or rope_dim < 0:
            raise ValueError(f"PagedLatentCache: latent_dim must be > 0 and rope_dim >= 0; got {latent_dim}, {rope_dim}")
        self.page_size, self.latent_dim, self.rope_dim = page_size, latent_dim, rope_dim
        # On the CPU a large cache is advised onto transparent huge pages before it is first touched: the
        # decode kernel reads its pages in block-table order, and with 4 KiB pages every few rows cost a
        # TLB miss (1 x 32k tokens, 128+64 fp32: 5-9% slower measured).
        self.kv = empty((num_blocks, page_size, 1, latent_dim + rope_dim), dtype, device).zero_()
        self._free = list(range(num_blocks - 1, -1, -1))
        self._blocks, self._len, self._next_id = {}, {}, 0

    @property
    def num_free_blocks(self):
        return len(self._free)

    def allocate(self):
        sid = self._next_id
        self._next_id += 1
        self._blocks[sid], self._len[sid] = [], 0
        return sid

    def free(self, sid):
        self._check_ids([sid])
        self._free.extend(reversed(self._blocks.pop(sid)))
        del self._len[sid]

    def length(self, sid):
        self._check_ids([sid])
        return self._len[sid]

    def _check_ids(self, ids):
        for s in ids:
            if s not in self._blocks:
                raise KeyError(f"PagedLatentCache: no sequence {s!r} (allocate() it first; freed ids are gone)")

    def append(self, ids, latent, rope=None):
        """Append ``latent`` ``(len(ids), T, latent_dim)`` and ``rope`` ``(len(ids), T, rope_dim)`` to the
        sequences ``ids``. Raises (writing nothing) when the free blocks do not suffice."""
        ids = list(ids)
        self._check_ids(ids)
        if latent.dim() != 3 or latent.shape[0] != len(ids) or latent.shape[2] != self.latent_dim:
            raise ValueError(f"PagedLatentCache.append: latent must be ({len(ids)}, T, {self.latent_dim}); "
                             f"got {tuple(latent.shape)}")
        b, t = latent.shape[0], latent.shape[1]
        if self.rope_dim and (rope is None or tuple(rope.shape) != (b, t, self.rope_dim)):
            raise ValueError(f"PagedLatentCache.append: rope must be ({b}, {t}, {self.rope_dim}); got "
                             f"{None if rope is None else tuple(rope.shape)}")
        if len(set(ids)) != len(ids):
            raise ValueError("PagedLatentCache.append: a sequence id appears twice")
        p = self.page_size
        need = sum(-(-(self._len[s] + t) // p) - len(self._blocks[s]) for s in ids)
        if need > len(self._free):
            raise RuntimeError(f"PagedLatentCache is full: appending {t} tokens to {b} sequences needs {need} more "
                               f"blocks of {p} tokens, {len(self._free)} are free")
        slots = []
        for s in ids:
            blocks = self._blocks[s]
            while len(blocks) * p < self._len[s] + t:
                blocks.append(self._free.pop())
            pos = torch.arange(self._len[s], self._len[s] + t)
            table = torch.tensor(blocks, dtype=torch.int64)
            slots.append(table[pos // p] * p + pos % p)
            self._len[s] += t
        rows = latent if not self.rope_dim else torch.cat([latent, rope.to(latent.dtype)], dim=-1)
        idx = torch.cat(slots).to(self.kv.device)
        self.kv.view(-1, self.kv.shape[-1]).index_copy_(0, idx, rows.reshape(-1, rows.shape[-1]).to(self.kv.dtype))

    def block_table(self, ids):
        ids = list(ids)
        self._check_ids(ids)
        width = max([len(self._blocks[s]) for s in ids] + [1])
        table = torch.zeros(len(ids), width, dtype=torch.int32)
        for i, s in enumerate(ids):
            table[i, :len(self._blocks[s])] = torch.tensor(self._blocks[s], dtype=torch.int32)
        return table.to(self.kv.device)

    def gather(self, sid):
        """The cached rows of one sequence, ``(length, latent_dim + rope_dim)`` (a copy)."""
        self._check_ids([sid])
        n = self._len[sid]
        blocks = torch.tensor(self._blocks[sid], dtype=torch.int64, device=self.kv.device)
        return self.kv[blocks, :, 0].reshape(-1, self.kv.shape[-1])[:n]

    def cache_seqlens(self, ids):
        ids = list(ids)
        self._check_ids(ids)
        return torch.tensor([self._len[s] for s in ids], dtype=torch.int32, device=self.kv.device)


def check_mla_dims(cls, q_lora_rank, qk_rope_head_dim):
    """MLA's optional sizes: q_lora_rank None (no query compression) or > 0; qk_rope_head_dim an even int >= 0."""
    if q_lora_rank is not None:
        _positive_int(cls, "q_lora_rank", q_lora_rank)
    if isinstance(qk_rope_head_dim, bool) or not isinstance(qk_rope_head_dim, int) or qk_rope_head_dim < 0 \
            or qk_rope_head_dim % 2:
        raise ValueError(f"{cls}: qk_rope_head_dim must be an even int >= 0; got {qk_rope_head_dim!r}")


class MLABase(nn.Module):
    """Multi-head Latent Attention parameters (DeepSeek-V2/V3; Zebra-Llama's grouped variant).

    ``wq`` (or ``wq_a``, ``q_norm``, ``wq_b`` with ``q_lora_rank``), ``wkv_a`` (dim -> kv_lora_rank +
    rope), ``kv_norm``, ``wkv_b`` (kv_lora_rank -> n_kv_groups * (nope + v)), ``wo``. The rope key is one
    head shared by all; group g of ``wkv_b`` serves heads ``g * H/G .. (g+1) * H/G - 1``.
    ``latent_norm=False`` drops the RMSNorms of the latents (``q_norm``, ``kv_norm``): Zebra-Llama's MLA
    (``use_lora_layer_norm: false``), linear in x up to RoPE, which an SVD initialisation reproduces."""

    def __init__(self, dim, n_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
                 n_kv_groups=None, rope_theta=10000.0, max_seq_len=4096, eps=1e-6, latent_norm=True, device=None,
                 dtype=None):
        super().__init__()
        cls = type(self).__name__
        for name, v in (("dim", dim), ("n_heads", n_heads), ("kv_lora_rank", kv_lora_rank),
                        ("qk_nope_head_dim", qk_nope_head_dim), ("v_head_dim", v_head_dim),
                        ("max_seq_len", max_seq_len)):
            _positive_int(cls, name, v)
        check_mla_dims(cls, q_lora_rank, qk_rope_head_dim)
        g = n_heads if n_kv_groups is None else _positive_int(cls, "n_kv_groups", n_kv_groups)
        if n_heads % g:
            raise ValueError(f"{cls}: n_heads ({n_heads}) must be divisible by n_kv_groups ({g})")
        self.dim, self.n_heads, self.n_kv_groups = dim, n_heads, g
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.rope_theta, self.max_seq_len, self.eps = float(rope_theta), max_seq_len, eps
        self.latent_norm = bool(latent_norm)
        self.softmax_scale = (qk_nope_head_dim + qk_rope_head_dim) ** -0.5
        kw = dict(device=device, dtype=dtype)
        qk = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.wq = nn.Linear(dim, n_heads * qk, bias=False, **kw)
        else:
            self.wq_a = nn.Linear(dim, q_lora_rank, bias=False, **kw)
            if self.latent_norm:
                self.q_norm = Gain(q_lora_rank, **kw)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * qk, bias=False, **kw)
        self.wkv_a = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=False, **kw)
        if self.latent_norm:
            self.kv_norm = Gain(kv_lora_rank, **kw)
        self.wkv_b = nn.Linear(kv_lora_rank, g * (qk_nope_head_dim + v_head_dim), bias=False, **kw)
        self.wo = nn.Linear(n_heads * v_head_dim, dim, bias=False, **kw)
        # On `device`: reset_parameters builds the RoPE tables where these placeholders are.
        self.register_buffer("rope_cos", torch.empty(0, device=device), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0, device=device), persistent=False)
        self.reset_parameters()

    def _make_rope(self, device):
        from .reference import rope_tables
        d = max(self.rope_dim, 2)
        self.rope_cos, self.rope_sin = rope_tables(d, self.max_seq_len, self.rope_theta, device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            self._make_rope(self.rope_cos.device)
        return self

    def reset_parameters(self):
        self._make_rope(self.rope_cos.device)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                trunc_normal_(mod.weight, mod.in_features ** -0.5)
            elif isinstance(mod, Gain):
                nn.init.ones_(mod.weight)

    def kv_cache_bytes_per_token(self, dtype=None):
        """Bytes one token costs in this layer's cache: ``(kv_lora_rank + rope_dim) * itemsize``."""
        dtype = dtype or self.wkv_a.weight.dtype
        return (self.kv_lora_rank + self.rope_dim) * torch.tensor([], dtype=dtype).element_size()

    def new_cache(self, num_blocks, page_size=64, dtype=None, device=None):
        w = self.wkv_a.weight
        return PagedLatentCache(num_blocks, page_size, self.kv_lora_rank, self.rope_dim, dtype or w.dtype,
                                device or w.device)

    def absorbed_weights(self):
        """(W_UK ``(H, nope, kv_lora)``, W_UV ``(H, v, kv_lora)``): wkv_b's groups repeated over their heads."""
        w = self.wkv_b.weight.view(self.n_kv_groups, self.nope + self.v_dim, self.kv_lora_rank)
        rep = self.n_heads // self.n_kv_groups
        w = w.repeat_interleave(rep, dim=0) if rep > 1 else w
        return w[:, : self.nope], w[:, self.nope:]

    def extra_repr(self):
        return (f"n_heads={self.n_heads}, n_kv_groups={self.n_kv_groups}, kv_lora_rank={self.kv_lora_rank}, "
                f"rope={self.rope_dim}, nope={self.nope}, v={self.v_dim}, q_lora_rank={self.q_lora_rank}"
                + ("" if self.latent_norm else ", latent_norm=False"))
