"""Pure-PyTorch reference implementations: the oracle every backend is tested against.

They compute in float32 (float64 for float64 inputs) and round only the outputs.
"""
import torch

from ._dtypes import stat_dtype


def norm(x, weight, bias=None, eps=1e-6, residual=None, prenorm=False, residual_in_fp32=False, is_rms=True):
    """Fused residual add + RMSNorm / LayerNorm, the reference of ``fastlayers.rms_norm``/``layer_norm``."""
    acc = stat_dtype(x.dtype)
    h = x.to(acc)
    if residual is not None:
        h = h + residual.to(acc)
    if is_rms:
        y = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    else:
        mu = h.mean(-1, keepdim=True)
        d = h - mu
        y = d * torch.rsqrt(d.square().mean(-1, keepdim=True) + eps)
    y = y * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    y = y.to(x.dtype)
    if not prenorm:
        return y
    h_dtype = torch.float32 if residual_in_fp32 and x.dtype != torch.float64 else x.dtype
    return y, h.to(h_dtype)


def rms_norm(x, weight, eps=1e-6, residual=None, prenorm=False, residual_in_fp32=False):
    return norm(x, weight, None, eps, residual, prenorm, residual_in_fp32, is_rms=True)


def layer_norm(x, weight, bias=None, eps=1e-5, residual=None, prenorm=False, residual_in_fp32=False):
    return norm(x, weight, bias, eps, residual, prenorm, residual_in_fp32, is_rms=False)
