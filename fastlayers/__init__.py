"""fastlayers: kernels for the layers of hybrid language models.

Built so far: fused residual + RMSNorm / LayerNorm (``rms_norm``, ``layer_norm``,
``RMSNorm``, ``LayerNorm``); the HybridNorm family (``qkv_norm_rope``, ``swiglu``,
``QKVNormAttention``, ``PostNormFFN``, ``HybridNormBlock``, ``HybridNormLM``).
Every op has ``reference``, ``cpu`` and ``triton`` backends (and ``cuda`` for the
norms). Mamba: ``selective_state_update`` (the decode step) and ``selective_scan``
(the Mamba-1 scan, forward and backward; ``cpu`` and ``reference`` backends so far).
Planned: the other scans, MLA decoding, hybrid models and a reference training loop.
"""
from .backend import BackendUnavailable, available_backends, use_backend  # noqa: F401
from .modules import LayerNorm, RMSNorm  # noqa: F401
from .ops import (layer_norm, qkv_norm_rope, qkv_norm_rope_packed, rms_norm, selective_scan,  # noqa: F401
                  selective_state_update, swiglu)
from .hybridnorm import (FeedForward, HybridNormBlock, HybridNormLM, KVCache, PostNormFFN,  # noqa: F401
                         QKVNormAttention)
from . import reference  # noqa: F401

__version__ = "0.1.0"
__all__ = ["rms_norm", "layer_norm", "RMSNorm", "LayerNorm", "qkv_norm_rope", "qkv_norm_rope_packed", "swiglu",
           "selective_scan", "selective_state_update", "QKVNormAttention", "FeedForward", "PostNormFFN", "HybridNormBlock", "HybridNormLM", "KVCache",
           "available_backends", "use_backend", "BackendUnavailable", "reference"]
