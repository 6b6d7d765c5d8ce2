"""CUDA backend: C++/CUDA kernels in ``fastlayers._cuda`` (see backends/__init__.py for the contract).

The module is torch-free: it takes raw device pointers, row strides, dtype codes and
the current torch stream, and launches on the device made current here. The kernels
take fp32, fp16 and bf16 (an fp64 row tensor raises ValueError; the dispatcher rejects
fp64 x before it gets here); weight and bias may be any floating dtype: others than
those three (fp64) are passed as fp32 copies.
"""
import torch

from .._dtypes import code, ptr, stride0
from . import sm_count

try:
    from .. import _cuda
    IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - reported by available_backends()
    _cuda = None
    IMPORT_ERROR = e

def _stream(device):
    return torch.cuda.current_stream(device).cuda_stream


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _param(t):
    """weight/bias in a dtype the kernels take: fp64 (any other floating dtype) as an fp32 copy."""
    return t if t is None or t.dtype in _KERNEL_DTYPES else t.float()


def norm_fwd(x, residual, weight, bias, y, h, mean, rstd, eps, is_rms):
    M, N = x.shape
    weight, bias = _param(weight), _param(bias)
    with torch.cuda.device(x.device):
        _cuda.norm_fwd(ptr(x), stride0(x), code(x), ptr(residual), stride0(residual), code(residual),
                       ptr(weight), code(weight), ptr(bias), code(bias), ptr(y), stride0(y), code(y),
                       ptr(h), stride0(h), code(h), ptr(mean), ptr(rstd), M, N, float(eps), bool(is_rms),
                       _stream(x.device))


def norm_bwd_parts(M, N, device):
    return _cuda.norm_bwd_parts(M, N, sm_count(device))


def norm_bwd(dy, x, residual, weight, bias, mean, rstd, dh, dx, dresidual, dw_part, db_part, is_rms):
    M, N = x.shape
    parts = dw_part.shape[0]
    weight, bias = _param(weight), _param(bias)  # dw_part/db_part stay fp32 (x is not fp64)
    with torch.cuda.device(x.device):
        _cuda.norm_bwd(ptr(dy), stride0(dy), code(dy), ptr(x), stride0(x), code(x),
                       ptr(residual), stride0(residual), code(residual), ptr(weight), code(weight),
                       ptr(bias), code(bias), ptr(mean), ptr(rstd), ptr(dh), stride0(dh), code(dh),
                       ptr(dx), stride0(dx), code(dx), ptr(dresidual), stride0(dresidual), code(dresidual),
                       ptr(dw_part), ptr(db_part), M, N, bool(is_rms), parts, _stream(x.device))
