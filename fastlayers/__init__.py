"""fastlayers: kernels for the layers of hybrid language models.

Built so far: fused residual + RMSNorm / LayerNorm (``rms_norm``, ``layer_norm``,
``RMSNorm``, ``LayerNorm``) with ``reference``, ``cpu``, ``triton`` and ``cuda``
backends. Planned: QKV-norm attention and HybridNorm blocks, selective scans,
MLA decoding, hybrid models and a reference training loop.
"""
from .backend import BackendUnavailable, available_backends, use_backend  # noqa: F401
from .modules import LayerNorm, RMSNorm  # noqa: F401
from .ops import layer_norm, rms_norm  # noqa: F401
from . import reference  # noqa: F401

__version__ = "0.1.0"
__all__ = ["rms_norm", "layer_norm", "RMSNorm", "LayerNorm", "available_backends", "use_backend",
           "BackendUnavailable", "reference"]
