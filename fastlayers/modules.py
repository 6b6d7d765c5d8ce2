"""nn.Modules built on the fused ops; parameter names and state_dicts match torch.nn."""
import torch
from torch import nn

from .ops import layer_norm, rms_norm


class RMSNorm(nn.Module):
    """RMSNorm with an optional fused residual add; state_dict-compatible with ``torch.nn.RMSNorm``.

    ``forward(x, residual=None, prenorm=False)`` returns ``y`` or ``(y, x + residual)``.
    """

    def __init__(self, dim, eps=1e-6, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (int(dim),)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(int(dim), device=device, dtype=dtype))

    def forward(self, x, residual=None, prenorm=False):
        return rms_norm(x, self.weight, self.eps, residual=residual, prenorm=prenorm)

    def extra_repr(self):
        return f"{self.normalized_shape[0]}, eps={self.eps}"


class LayerNorm(nn.Module):
    """LayerNorm with an optional fused residual add; state_dict-compatible with ``torch.nn.LayerNorm``."""

    def __init__(self, dim, eps=1e-5, bias=True, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (int(dim),)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(int(dim), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(int(dim), device=device, dtype=dtype)) if bias else None

    def forward(self, x, residual=None, prenorm=False):
        return layer_norm(x, self.weight, self.bias, self.eps, residual=residual, prenorm=prenorm)

    def extra_repr(self):
        return f"{self.normalized_shape[0]}, eps={self.eps}, bias={self.bias is not None}"
