"""nn.Modules built on the fused ops; parameter names and state_dicts match torch.nn."""
import numbers

import torch
from torch import nn

from .ops import layer_norm, rms_norm
from .ops.norm import CASTING_MODES


def _dim(cls, normalized_shape):
    """The normalised size from an int or a one-element shape (torch.nn's ``normalized_shape``)."""
    if isinstance(normalized_shape, numbers.Integral) and not isinstance(normalized_shape, bool):
        return int(normalized_shape)
    shape = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else None
    if shape is None or len(shape) != 1 or not isinstance(shape[0], numbers.Integral):
        raise ValueError(f"fastlayers.{cls}: normalized_shape must be an int or a one-element shape (the last "
                         f"dimension; the fused kernels normalise over one dimension); got {normalized_shape!r}")
    return int(shape[0])


def _check_flag(cls, name, v):
    if not isinstance(v, bool):
        raise TypeError(f"fastlayers.{cls}: {name} must be a bool; got {type(v).__name__}")


class RMSNorm(nn.Module):
    """RMSNorm with an optional fused residual add; state_dict-compatible with ``torch.nn.RMSNorm``
    (``weight``, absent with ``elementwise_affine=False``).

    ``y = x * rsqrt(mean(x^2) + eps) * (offset + weight)``: ``offset=1.0`` is Gemma's ``(1 + weight)``
    gain (Liger's ``offset``). The weight starts at ones, as torch's and Liger's (default) do: for a gain
    of 1 with ``offset=1.0`` load Gemma's weights or zero it. ``casting_mode`` ``"gemma"`` (default; what ``torch.nn.RMSNorm`` computes), ``"llama"`` or
    ``"none"``, see :func:`fastlayers.rms_norm`. ``eps=None`` uses ``torch.finfo(x.dtype).eps`` as torch
    does. ``forward(x, residual=None, prenorm=False)`` returns ``y`` or ``(y, x + residual)``.
    """

    def __init__(self, dim, eps=1e-6, elementwise_affine=True, device=None, dtype=None, *, offset=0.0,
                 casting_mode="gemma"):
        super().__init__()
        n = _dim("RMSNorm", dim)
        _check_flag("RMSNorm", "elementwise_affine", elementwise_affine)
        if casting_mode not in CASTING_MODES:
            raise ValueError(f"fastlayers.RMSNorm: casting_mode must be one of {CASTING_MODES}; got {casting_mode!r}")
        self.normalized_shape = (n,)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.offset = float(offset)
        self.casting_mode = casting_mode
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(n, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x, residual=None, prenorm=False):
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm(x, self.weight, eps, residual=residual, prenorm=prenorm, offset=self.offset,
                        casting_mode=self.casting_mode)

    def extra_repr(self):
        s = f"{self.normalized_shape[0]}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        if self.offset:
            s += f", offset={self.offset}"
        if self.casting_mode != "gemma":
            s += f", casting_mode={self.casting_mode!r}"
        return s


class LayerNorm(nn.Module):
    """LayerNorm with an optional fused residual add; state_dict-compatible with ``torch.nn.LayerNorm``
    (``elementwise_affine=False``: neither weight nor bias)."""

    def __init__(self, dim, eps=1e-5, bias=True, device=None, dtype=None, *, elementwise_affine=True):
        super().__init__()
        n = _dim("LayerNorm", dim)
        _check_flag("LayerNorm", "elementwise_affine", elementwise_affine)
        _check_flag("LayerNorm", "bias", bias)
        self.normalized_shape = (n,)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(n, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(n, device=device, dtype=dtype)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x, residual=None, prenorm=False):
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual, prenorm=prenorm)

    def extra_repr(self):
        return (f"{self.normalized_shape[0]}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")
