"""Whole models: Zebra-Llama's hybrid decoder (:class:`ZebraLM`), :class:`HybridNormLM` (re-exported),
named presets (:data:`PRESETS`, :func:`build`) and :func:`kv_cache_report`.

ZebraLM (Zebra-Llama, arXiv 2505.17272): a Llama-3 decoder whose attention layers were replaced, layer by
layer, by either Multi-head Latent Attention (the layers listed in ``mla_layers``; grouped: one latent
decompressed into ``n_kv_heads`` KV groups, no latent RMSNorms) or Zebra-Llama's Mamba-2 (every other layer;
:meth:`fastlayers.mamba.Mamba2.zebra`). Every block is Pre-Norm::

    y = x + mixer(RMSNorm(x))            mixer: MLA or Mamba2
    x_next = y + SwiGLU(RMSNorm(y))

then a final RMSNorm and the (tied or untied) LM head. The mixer's residual add is fused into the FFN's
RMSNorm (``rms_norm(..., residual=x, prenorm=True)``), the FFN's into its down-projection GEMM.

Reference model: ``ZebraLM(..., reference=True)`` builds the same parameters (one state_dict loads into
both) with the pure-PyTorch layers of :mod:`fastlayers.reference` (``reference.MLA``, the non-absorbed MLA;
``reference.FeedForward``; ``reference.Mamba2``) and plain-PyTorch norms: an independent implementation to
test against. ``with fastlayers.use_backend("reference"):`` on the fast model is the other check (the
fast model's code, every op on its reference path). :meth:`ZebraLM.reference_copy` gives the
reference twin of a model.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from . import reference as _ref
from . import _layers
from ._layers import FFNBase, Gain, _positive_int, check_mla_dims, trunc_normal_
from .hybridnorm import FeedForward, HybridNormLM  # noqa: F401  (HybridNormLM re-exported)
from .mla import MLA
from .ops import rms_norm

__all__ = ["ZebraLM", "ZebraBlock", "ZebraCache", "HybridNormLM", "PRESETS", "build", "kv_cache_report",
           "KVCacheReport", "count_parameters"]


def _mamba2_classes():
    """(fast Mamba2, reference Mamba2); raises ImportError saying why when the layer is not there."""
    try:
        from .mamba import Mamba2
        from .reference import Mamba2 as RefMamba2
    except ImportError as e:  # the Mamba-2 layer lives on another branch until it is merged
        raise ImportError(f"ZebraLM: Mamba layers need fastlayers.mamba.Mamba2 and fastlayers.reference.Mamba2 "
                          f"({e}); a model with every layer in mla_layers does not") from e
    return Mamba2, RefMamba2


class ZebraBlock(nn.Module):
    """One Pre-Norm block: ``norm`` (gain), ``mixer`` (MLA or Mamba2), ``ffn`` (Pre-Norm SwiGLU with its
    own norm). ``kind`` is ``"mla"`` or ``"mamba"``. ``forward(x, cache=None, ids=None)``."""

    def __init__(self, kind, dim, n_heads, n_kv_heads, head_dim, kv_lora_rank, q_lora_rank, qk_rope_head_dim,
                 qk_nope_head_dim, v_head_dim, ffn_hidden, d_conv=4, max_seq_len=2048, rope_theta=500000.0, eps=1e-5,
                 reference=False, device=None, dtype=None):
        super().__init__()
        self.kind, self.eps, self.reference = kind, eps, bool(reference)
        kw = dict(device=device, dtype=dtype)
        self.norm = Gain(dim, **kw)
        if kind == "mla":
            cls = _ref.MLA if reference else MLA
            self.mixer = cls(dim, n_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
                             n_kv_groups=n_kv_heads, rope_theta=rope_theta, max_seq_len=max_seq_len, eps=eps,
                             latent_norm=False, **kw)
        elif kind == "mamba":
            fast, ref = _mamba2_classes()
            self.mixer = (ref if reference else fast).zebra(dim, n_heads, n_kv_heads, head_dim, d_conv=d_conv, **kw)
        else:
            raise ValueError(f"ZebraBlock: kind must be 'mla' or 'mamba'; got {kind!r}")
        self.ffn = (_ref.FeedForward if reference else FeedForward)(dim, ffn_hidden, norm="pre", eps=eps, **kw)

    def _mix(self, h, cache, ids):
        if cache is None:
            return self.mixer(h)
        if self.kind == "mla":
            return self.mixer(h, cache, ids)
        return self.mixer(h, cache=cache)

    def forward(self, x, cache=None, ids=None):
        if self.reference:
            y = x + self._mix(_ref.rms_norm(x, self.norm.weight, self.eps), cache, ids)
            return self.ffn(y)
        m = self._mix(rms_norm(x, self.norm.weight, self.eps), cache, ids)
        return self.ffn(m, residual=x)  # y = m + x summed inside the FFN's fused RMSNorm

    def extra_repr(self):
        return f"kind={self.kind!r}" + (", reference=True" if self.reference else "")


class ZebraCache:
    """The decoding state of one batch: ``layers[i]`` is layer i's cache (a :class:`PagedLatentCache` holding
    the batch's sequences ``ids`` for an MLA layer, the Mamba2 layer's conv + SSM state otherwise);
    ``length`` tokens are cached. Index it like a list."""

    def __init__(self, layers, ids, batch, max_len):
        self.layers, self.ids, self.batch, self.max_len, self.length = list(layers), list(ids), batch, max_len, 0

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)


class ZebraLM(nn.Module):
    """Zebra-Llama hybrid LM (see the module docstring).

    ``ZebraLM(vocab_size, dim, n_layers, n_heads, n_kv_heads, head_dim, mla_layers, kv_lora_rank, q_lora_rank,
    qk_rope_head_dim, qk_nope_head_dim, v_head_dim, ffn_hidden, tie_embeddings=True, d_conv=4, max_seq_len=2048,
    rope_theta=500000.0, eps=1e-5, reference=False, device=None, dtype=None)``. Layer i is MLA when
    ``i in mla_layers`` (``q_lora_rank=None``: a direct query projection), Mamba2 otherwise.
    ``n_heads * head_dim`` must equal ``dim`` (Llama's shapes; the Mamba-2 layer has expand 1).

    ``forward(tokens, labels=None, cache=None)`` -> ``(logits, loss)``: ``labels[b, t]`` is the target of
    position t (already shifted; -100 ignored); loss None without labels. With a cache (:meth:`new_cache`)
    the tokens continue the cached ones (a prefill, or T=1 decode steps). ``generate(tokens,
    max_new_tokens, temperature=1.0, top_k=None, generator=None)`` prefills then decodes with the caches.
    """

    def __init__(self, vocab_size, dim, n_layers, n_heads, n_kv_heads, head_dim, mla_layers, kv_lora_rank,
                 q_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim, ffn_hidden, tie_embeddings=True, d_conv=4,
                 max_seq_len=2048, rope_theta=500000.0, eps=1e-5, reference=False, device=None, dtype=None):
        super().__init__()
        cls = type(self).__name__
        for name, v in (("vocab_size", vocab_size), ("dim", dim), ("n_layers", n_layers), ("n_heads", n_heads),
                        ("n_kv_heads", n_kv_heads), ("head_dim", head_dim), ("kv_lora_rank", kv_lora_rank),
                        ("qk_nope_head_dim", qk_nope_head_dim), ("v_head_dim", v_head_dim),
                        ("ffn_hidden", ffn_hidden), ("d_conv", d_conv), ("max_seq_len", max_seq_len)):
            _positive_int(cls, name, v)
        check_mla_dims(cls, q_lora_rank, qk_rope_head_dim)
        if n_heads % n_kv_heads:
            raise ValueError(f"{cls}: n_heads ({n_heads}) must be divisible by n_kv_heads ({n_kv_heads})")
        if n_heads * head_dim != dim:
            raise ValueError(f"{cls}: n_heads * head_dim ({n_heads} * {head_dim} = {n_heads * head_dim}) must equal "
                             f"dim ({dim})")
        try:
            mla = [int(i) for i in mla_layers if not isinstance(i, bool) and int(i) == i]
        except (TypeError, ValueError):
            mla = None
        if mla is None or len(mla) != len(list(mla_layers)):
            raise ValueError(f"{cls}: mla_layers must be a sequence of layer indices (ints); got {mla_layers!r}")
        bad = [i for i in mla if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"{cls}: mla_layers {bad} out of range for n_layers={n_layers} (valid: 0..{n_layers - 1})")
        if len(set(mla)) != len(mla):
            raise ValueError(f"{cls}: mla_layers lists a layer twice: {mla_layers!r}")
        if not (isinstance(rope_theta, (int, float)) and not isinstance(rope_theta, bool) and rope_theta > 0):
            raise ValueError(f"{cls}: rope_theta must be > 0; got {rope_theta!r}")
        self.config = dict(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                           head_dim=head_dim, mla_layers=sorted(mla), kv_lora_rank=kv_lora_rank,
                           q_lora_rank=q_lora_rank, qk_rope_head_dim=qk_rope_head_dim,
                           qk_nope_head_dim=qk_nope_head_dim, v_head_dim=v_head_dim, ffn_hidden=ffn_hidden,
                           tie_embeddings=bool(tie_embeddings), d_conv=d_conv, max_seq_len=max_seq_len,
                           rope_theta=float(rope_theta), eps=eps)
        self.vocab_size, self.dim, self.n_layers = vocab_size, dim, n_layers
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.mla_layers = sorted(mla)
        self.tie_embeddings, self.max_seq_len, self.eps = bool(tie_embeddings), max_seq_len, eps
        self.reference = bool(reference)
        kw = dict(device=device, dtype=dtype)
        self.embed = nn.Embedding(vocab_size, dim, **kw)
        self.blocks = nn.ModuleList(
            ZebraBlock("mla" if i in self.mla_layers else "mamba", dim, n_heads, n_kv_heads, head_dim, kv_lora_rank,
                       q_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim, ffn_hidden, d_conv, max_seq_len,
                       rope_theta, eps, reference, **kw) for i in range(n_layers))
        self.norm = Gain(dim, **kw)
        if not tie_embeddings:
            self.lm_head = nn.Linear(dim, vocab_size, bias=False, **kw)
        self.reset_parameters()

    def reset_parameters(self):
        """Embeddings (and an untied head): truncated normal, sigma = sqrt(2 / (5 dim)); the FFNs: the HybridNorm
        initialisation with W_down scaled by 1 / sqrt(2 n_layers); the mixers keep their own initialisation;
        gains 1. (A Zebra-Llama model is meant to be initialised from a Llama: see fastlayers.convert.)"""
        std = math.sqrt(2 / (5 * self.dim))
        trunc_normal_(self.embed.weight, std)
        for b in self.blocks:
            nn.init.ones_(b.norm.weight)
            FFNBase.reset_parameters(b.ffn, self.n_layers)
        nn.init.ones_(self.norm.weight)
        if not self.tie_embeddings:
            trunc_normal_(self.lm_head.weight, std)

    def head_weight(self):
        return self.embed.weight if self.tie_embeddings else self.lm_head.weight

    def reference_copy(self):
        """A ``reference=True`` twin with this model's weights (for checking)."""
        twin = ZebraLM(**self.config, reference=True, device=self.embed.weight.device, dtype=self.embed.weight.dtype)
        twin.load_state_dict(self.state_dict())
        return twin

    def check_tokens(self, tokens, labels=None, cache=None):
        cls = type(self).__name__
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point \
                or tokens.dtype == torch.bool:
            raise ValueError(f"{cls}: tokens must be an integer tensor (batch, seqlen); got "
                             f"{getattr(tokens, 'dtype', type(tokens))} {tuple(getattr(tokens, 'shape', ()))}")
        offset = 0
        if cache is not None:
            if not isinstance(cache, ZebraCache) or len(cache) != self.n_layers:
                raise ValueError(f"{cls}: cache must be a ZebraCache from new_cache(); got {type(cache).__name__}")
            if tokens.shape[0] != cache.batch:
                raise ValueError(f"{cls}: tokens hold {tokens.shape[0]} sequences but the cache was made for "
                                 f"{cache.batch}")
            offset = cache.length
            if offset + tokens.shape[1] > cache.max_len:
                raise ValueError(f"{cls}: {offset + tokens.shape[1]} positions exceed the cache's max_len "
                                 f"{cache.max_len}")
        if offset + tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"{cls}: {offset + tokens.shape[1]} positions exceed max_seq_len {self.max_seq_len}")
        if labels is not None and (not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(tokens.shape)):
            raise ValueError(f"{cls}: labels must have the shape of tokens {tuple(tokens.shape)}; "
                             f"got {tuple(getattr(labels, 'shape', ()))}")
        _layers.check_token_ids(cls, tokens, self.vocab_size)

    @staticmethod
    def loss(logits, labels):
        """Mean cross-entropy (fp32) of ``logits`` against ``labels`` (same positions; -100 ignored)."""
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    def forward(self, tokens, labels=None, cache=None):
        self.check_tokens(tokens, labels, cache)
        x = F.embedding(tokens, self.embed.weight)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if cache is None else cache[i], None if cache is None else cache.ids)
        if cache is not None:
            cache.length += tokens.shape[1]
        norm = _ref.rms_norm if self.reference else rms_norm
        logits = F.linear(norm(x, self.norm.weight, self.eps), self.head_weight())
        return logits, (None if labels is None else self.loss(logits, labels))

    def new_cache(self, batch, max_len=None, page_size=None, dtype=None):
        """A :class:`ZebraCache` for ``batch`` sequences of up to ``max_len`` tokens (default max_seq_len): per
        MLA layer a :class:`PagedLatentCache` with ``batch`` sequences allocated (pages of ``page_size`` tokens,
        default min(64, max_len rounded up to a power of two)); per Mamba layer ``mixer.new_cache(batch)``."""
        cls = type(self).__name__
        _positive_int(cls, "batch", batch)
        max_len = self.max_seq_len if max_len is None else _positive_int(cls, "max_len", max_len)
        if max_len > self.max_seq_len:
            raise ValueError(f"{cls}: max_len {max_len} exceeds max_seq_len {self.max_seq_len}")
        w = self.embed.weight
        dtype = dtype or w.dtype
        page = page_size or min(64, 1 << (max_len - 1).bit_length())
        blocks_per_seq = -(-max_len // page)
        layers, ids = [], None
        for blk in self.blocks:
            if blk.kind == "mla":
                c = blk.mixer.new_cache(batch * blocks_per_seq, page, dtype=dtype, device=w.device)
                got = [c.allocate() for _ in range(batch)]
                ids = got if ids is None else ids
                assert got == ids
                layers.append(c)
            else:
                layers.append(blk.mixer.new_cache(batch, dtype=dtype, device=w.device))
        return ZebraCache(layers, ids if ids is not None else list(range(batch)), batch, max_len)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """A ZebraLM from a released Zebra-Llama checkpoint directory (AMD-AGI/AMD-Hybrid-Models format:
        config.json, hybrid_config.json, model.safetensors / shards / pytorch_model.bin); the tensor name
        mapping and what is supported are in :mod:`fastlayers._zebra_hf`. ValueError naming missing,
        unexpected or misshapen tensors and unsupported configuration fields."""
        from . import _zebra_hf
        return _zebra_hf.load(cls, path, device=device, dtype=dtype)

    def save_pretrained(self, path):
        """Write the model in the released Zebra-Llama format (config.json, hybrid_config.json, model.safetensors),
        which :meth:`from_pretrained` reads back."""
        from . import _zebra_hf
        _zebra_hf.save(self, path)

    def generate(self, tokens, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Prefill ``tokens`` ``(batch, T)`` into the caches (a paged latent cache per MLA layer, a
        :class:`MambaCache` per Mamba layer), then decode ``max_new_tokens`` one at a time (see
        :func:`fastlayers._layers.generate`: ``temperature`` 0 is greedy, ``top_k`` restricts sampling)."""
        return _layers.generate(self, tokens, max_new_tokens, temperature, top_k, generator)


# ============================================================================= presets
def _zebra(base, mla_layers, **kw):
    return dict(base, mla_layers=list(mla_layers), **kw)


# Llama-3.2-1B / 3B and Llama-3.1-8B shapes; MLA sizes and layer choices from Zebra-Llama (arXiv 2505.17272) and
# its released configs (AMD-AGI/AMD-Hybrid-Models, Zebra-Llama/configs/*/zebra_*MLA*M2_8bt_SFT.yaml).
_LLAMA_1B = dict(kind="zebra", vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                 ffn_hidden=8192, tie_embeddings=True, kv_lora_rank=128, qk_rope_head_dim=32, qk_nope_head_dim=32,
                 v_head_dim=64, q_lora_rank=1344, rope_theta=500000.0)
_LLAMA_3B = dict(kind="zebra", vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128,
                 ffn_hidden=8192, tie_embeddings=True, kv_lora_rank=128, qk_rope_head_dim=64, qk_nope_head_dim=64,
                 v_head_dim=128, q_lora_rank=1536, rope_theta=500000.0)
_LLAMA_8B = dict(kind="zebra", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                 ffn_hidden=14336, tie_embeddings=False, kv_lora_rank=160, qk_rope_head_dim=64, qk_nope_head_dim=64,
                 v_head_dim=128, q_lora_rank=2048, rope_theta=500000.0)

PRESETS = {
    # Zebra-Llama 1B: 4 / 6 / 8 MLA layers of 16 (the paper's 3.9% KV cache is the 4-MLA model).
    "zebra-1b": _zebra(_LLAMA_1B, [0, 5, 10, 14]),
    "zebra-1b-4mla": _zebra(_LLAMA_1B, [0, 5, 10, 14]),
    "zebra-1b-6mla": _zebra(_LLAMA_1B, [0, 2, 5, 8, 11, 14]),
    "zebra-1b-8mla": _zebra(_LLAMA_1B, range(0, 16, 2)),
    # Zebra-Llama 3B: 6 / 8 / 14 MLA layers of 28 (the paper's 2% KV cache is the 6-MLA model).
    "zebra-3b": _zebra(_LLAMA_3B, [0, 5, 10, 16, 21, 26]),
    "zebra-3b-6mla": _zebra(_LLAMA_3B, [0, 5, 10, 16, 21, 26]),
    "zebra-3b-8mla": _zebra(_LLAMA_3B, [0, 3, 7, 10, 14, 18, 22, 26]),
    "zebra-3b-14mla": _zebra(_LLAMA_3B, range(0, 28, 2)),
    # Zebra-Llama 8B: 8 / 16 MLA layers of 32 (the paper's 2.73% KV cache is the 8-MLA model).
    "zebra-8b": _zebra(_LLAMA_8B, [0, 4, 8, 12, 16, 20, 25, 30]),
    "zebra-8b-8mla": _zebra(_LLAMA_8B, [0, 4, 8, 12, 16, 20, 25, 30]),
    "zebra-8b-16mla": _zebra(_LLAMA_8B, range(0, 32, 2)),
    # Small hybrids that train on 2 CPU cores (byte vocabulary).
    "zebra-tiny": dict(kind="zebra", vocab_size=256, dim=128, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=32,
                       mla_layers=[0, 3], kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16,
                       v_head_dim=32, ffn_hidden=512, tie_embeddings=True, max_seq_len=1024),
    "zebra-small": dict(kind="zebra", vocab_size=256, dim=384, n_layers=8, n_heads=6, n_kv_heads=2, head_dim=64,
                        mla_layers=[0, 4], kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=32,
                        qk_nope_head_dim=32, v_head_dim=64, ffn_hidden=1024, tie_embeddings=True, max_seq_len=2048),
    # HybridNorm (arXiv 2503.04598): the 1.2B dense model of the official code
    # (BryceZhuo/HybridNorm, dense_model/configs/exps/1.2B-dense-HybriedNorm.yaml: OLMo's mlp_hidden_size 16384
    # is the fused gate+up width, so the SwiGLU hidden size is 8192; vocabulary 100278 padded to 100352).
    # The paper's smaller dense models (151M, 296M, 591M) have no released config: no presets for them.
    "hybridnorm-1.2b": dict(kind="hybridnorm", vocab_size=100352, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                            ffn_hidden=8192, norm="hybrid", tie_embeddings=True, max_seq_len=4096,
                            rope_theta=500000.0),
    "hybridnorm-tiny": dict(kind="hybridnorm", vocab_size=256, dim=128, n_layers=6, n_heads=4, n_kv_heads=2,
                            ffn_hidden=512, norm="hybrid_star", tie_embeddings=True, max_seq_len=1024),
    "hybridnorm-small": dict(kind="hybridnorm", vocab_size=256, dim=384, n_layers=8, n_heads=6, n_kv_heads=2,
                             ffn_hidden=1024, norm="hybrid_star", tie_embeddings=True, max_seq_len=2048),
}

# Published sizes to check the presets against: the paper's KV-cache fractions (of the base Llama's cache)
# and the base models' parameter counts (Meta's model cards: 1.23B, 3.21B, 8.03B).
PUBLISHED = {
    "zebra-1b-4mla": dict(kv_fraction=0.039, base_params=1.23e9),
    "zebra-3b-6mla": dict(kv_fraction=0.02, base_params=3.21e9),
    "zebra-8b-8mla": dict(kv_fraction=0.0273, base_params=8.03e9),
    "hybridnorm-1.2b": dict(params=1.2e9),
}


def build(name, **overrides):
    """The model of preset ``name`` (a :class:`ZebraLM` or :class:`HybridNormLM`), with config ``overrides``
    (also ``device=``, ``dtype=``, ``reference=``). ``build(name, device="meta")`` allocates no memory
    (parameter counts of the big presets)."""
    if name not in PRESETS:
        raise ValueError(f"fastlayers.models.build: unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    cfg = dict(PRESETS[name], **overrides)
    kind = cfg.pop("kind")
    if kind == "zebra":
        return ZebraLM(**cfg)
    if cfg.pop("reference", False):
        return _ref.HybridNormLM(**cfg)
    return HybridNormLM(**cfg)


def count_parameters(model, include_embeddings=True):
    """Number of parameters (a tied embedding counted once; ``include_embeddings=False`` leaves out the
    embedding and an untied LM head)."""
    n = sum(p.numel() for p in model.parameters())
    if not include_embeddings:
        n -= model.embed.weight.numel()
        if hasattr(model, "lm_head"):
            n -= model.lm_head.weight.numel()
    return n


# ============================================================================= KV cache accounting
def _itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()


class KVCacheReport(dict):
    """A dict of cache sizes (see :func:`kv_cache_report`) whose ``str`` is a readable table."""

    def __str__(self):
        r = self
        lines = [f"KV cache, seq_len={r['seq_len']}, batch={r['batch']}, {r['dtype']} ({r['itemsize']} B/element)",
                 f"{'layer kind':<16}{'layers':>7}{'elem/token':>12}{'bytes/token':>13}{'total bytes':>16}"]
        for kind, d in r["per_kind"].items():
            if kind == "mamba":
                lines.append(f"{'mamba (state)':<16}{d['layers']:>7}{'-':>12}{'-':>13}{d['total_bytes']:>16,}"
                             f"   ({d['bytes_per_sequence']:,} B per sequence, any length)")
            else:
                lines.append(f"{kind:<16}{d['layers']:>7}{d['elements_per_token']:>12,}{d['bytes_per_token']:>13,}"
                             f"{d['total_bytes']:>16,}")
        b = r["baseline"]
        lines.append(f"{'llama GQA base':<16}{b['layers']:>7}{b['elements_per_token']:>12,}{b['bytes_per_token']:>13,}"
                     f"{b['total_bytes']:>16,}")
        lines.append(f"per-token cache / baseline: {r['ratio_per_token']:.2%};  total incl. Mamba state / baseline: "
                     f"{r['ratio_total']:.2%}")
        return "\n".join(lines)


def kv_cache_report(model, seq_len, batch, dtype=None):
    """Cache sizes of ``model`` for ``batch`` sequences of ``seq_len`` tokens, against the Llama GQA baseline of
    the same base model (``2 * n_layers * n_kv_heads * head_dim`` elements per token).

    Returns a :class:`KVCacheReport` (a dict; ``str()`` is a table): ``per_kind`` -> ``"mla"``
    (``(kv_lora_rank + rope) * itemsize`` bytes per token per layer, totals for seq_len x batch),
    ``"attention"`` (a HybridNormLM's KV cache) and ``"mamba"`` (the conv + SSM state: constant per sequence,
    ``bytes_per_sequence`` and its total for the batch; no per-token cost); ``bytes_per_token`` (the
    growing part), ``total_bytes``; ``baseline`` (same keys); ``ratio_per_token`` (bytes per token / the
    baseline's) and ``ratio_total`` (total bytes incl. the Mamba state / the baseline's total).
    ``dtype`` (default: the model's) sets the element size. Works on meta-device models."""
    _positive_int("kv_cache_report", "seq_len", seq_len)
    _positive_int("kv_cache_report", "batch", batch)
    if not isinstance(model, (ZebraLM, HybridNormLM, _ref.HybridNormLM)):
        raise TypeError(f"kv_cache_report: expected a ZebraLM or HybridNormLM; got {type(model).__name__}")
    dtype = dtype or model.embed.weight.dtype
    isz = _itemsize(dtype)
    per_kind = {}
    if isinstance(model, ZebraLM):
        mla = [b.mixer for b in model.blocks if b.kind == "mla"]
        mamba = [b.mixer for b in model.blocks if b.kind == "mamba"]
        n_kv, hd = model.n_kv_heads, model.head_dim
        if mla:
            e = sum(m.kv_lora_rank + m.rope_dim for m in mla)
            per_kind["mla"] = dict(layers=len(mla), elements_per_token=e, bytes_per_token=e * isz,
                                   total_bytes=e * isz * seq_len * batch)
        if mamba:
            per_seq = sum(_mamba_state_bytes(m, dtype) for m in mamba)
            per_kind["mamba"] = dict(layers=len(mamba), bytes_per_sequence=per_seq, total_bytes=per_seq * batch)
    elif isinstance(model, (HybridNormLM, _ref.HybridNormLM)):
        attn = [b.attn for b in model.blocks]
        n_kv, hd = attn[0].n_kv_heads, attn[0].head_dim
        e = sum(2 * a.n_kv_heads * a.head_dim for a in attn)
        per_kind["attention"] = dict(layers=len(attn), elements_per_token=e, bytes_per_token=e * isz,
                                     total_bytes=e * isz * seq_len * batch)
    n_layers = len(model.blocks)
    base_e = 2 * n_layers * n_kv * hd
    baseline = dict(layers=n_layers, elements_per_token=base_e, bytes_per_token=base_e * isz,
                    total_bytes=base_e * isz * seq_len * batch)
    per_token = sum(d.get("bytes_per_token", 0) for d in per_kind.values())
    total = sum(d["total_bytes"] for d in per_kind.values())
    return KVCacheReport(seq_len=seq_len, batch=batch, dtype=str(dtype).replace("torch.", ""), itemsize=isz,
                         per_kind=per_kind, bytes_per_token=per_token, total_bytes=total, baseline=baseline,
                         ratio_per_token=per_token / baseline["bytes_per_token"],
                         ratio_total=total / baseline["total_bytes"])


def _mamba_state_bytes(layer, dtype):
    """Bytes of one sequence's decoding state of a Mamba2 layer (conv window + SSM state), as its cache
    object counts them (``state_bytes()``), made on the layer's device (no memory on meta)."""
    dev = next(layer.parameters()).device
    return int(layer.new_cache(1, dtype=dtype, device=dev).state_bytes())
