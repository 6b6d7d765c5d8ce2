"""fastlayers: kernels for the layers of hybrid language models.

Built so far: fused residual + RMSNorm / LayerNorm (``rms_norm``, ``layer_norm``,
``RMSNorm``, ``LayerNorm``); the HybridNorm family (``qkv_norm_rope``, ``swiglu``,
``QKVNormAttention``, ``PostNormFFN``, ``HybridNormBlock``, ``HybridNormLM``); Mamba's
causal depthwise conv1d (``causal_conv1d``, ``causal_conv1d_update``).
Mamba: ``selective_state_update`` (the decode step) and ``selective_scan`` (the
Mamba-1 scan, forward and backward). MLA decoding: ``mla_decode``, ``PagedLatentCache``,
``MLA``. Every op has ``reference`` and ``cpu`` backends, ``triton`` for all but
``selective_scan``, and ``cuda`` for the norms, ``mla_decode`` and ``selective_scan`` (forward and backward). The Mamba layers ``Mamba``, ``Mamba2`` (and Zebra-Llama's ``Mamba2.zebra``) with
their inference cache (``MambaCache``); ``ssd_scan`` (the Mamba-2 chunked scan); hybrid models in
``fastlayers.models`` (``ZebraLM``, presets, ``kv_cache_report``); ``fastlayers.convert`` (attention ->
MLA / Mamba-2). Training: ``python -m fastlayers.train`` (byte-level LM training that checks the
kernels against the reference backend), Chinchilla arithmetic in ``fastlayers.scaling``.
"""
from .backend import BackendUnavailable, available_backends, use_backend  # noqa: F401
from .modules import LayerNorm, RMSNorm  # noqa: F401
from .ops import (causal_conv1d, causal_conv1d_update, layer_norm, mla_decode, qkv_norm_rope,  # noqa: F401
                  qkv_norm_rope_packed, rms_norm, selective_scan, selective_state_update, ssd_scan, swiglu)
from .ops import causal_conv1d_varlen_states  # noqa: F401
from .mla import MLA, PagedLatentCache  # noqa: F401
from .mamba import Mamba, Mamba2, MambaCache  # noqa: F401
from .hybridnorm import (FeedForward, HybridNormBlock, HybridNormLM, KVCache, PostNormFFN,  # noqa: F401
                         QKVNormAttention)
from . import convert, reference  # noqa: F401

__version__ = "0.1.0"
__all__ = ["rms_norm", "layer_norm", "RMSNorm", "LayerNorm", "qkv_norm_rope", "qkv_norm_rope_packed", "swiglu",
           "selective_scan", "selective_state_update", "ssd_scan", "causal_conv1d", "causal_conv1d_update",
           "causal_conv1d_varlen_states", "mla_decode",
           "MLA", "PagedLatentCache", "Mamba", "Mamba2", "MambaCache", "QKVNormAttention", "FeedForward",
           "PostNormFFN", "HybridNormBlock",
           "HybridNormLM", "KVCache", "available_backends", "use_backend", "BackendUnavailable", "reference", "convert"]
