"""Helpers shared by the ops: argument checks and row views."""
import math
import numbers

import torch

from .._dtypes import FLOATING

FLOAT_NAMES = "float32, float16, bfloat16 or float64"


def check_tensor(op, name, t, *, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastlayers.{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if floating and t.dtype not in FLOATING:
        raise TypeError(f"fastlayers.{op}: {name} must be a floating tensor ({FLOAT_NAMES}); got {t.dtype}")


def check_shape(op, name, t, expected, why=""):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"fastlayers.{op}: {name} must have shape {tuple(expected)}{why}; got {tuple(t.shape)}")


def check_same_device(op, x, **others):
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"fastlayers.{op}: {name} is on {t.device} but x is on {x.device}; "
                             f"all tensors must be on one device")


def check_positive(op, name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"fastlayers.{op}: {name} must be a finite number > 0; got {v!r}")


def rows(t):
    """``t`` as an (M, N) tensor whose last dim is contiguous, viewing when the
    leading dims collapse into one row stride (e.g. a slice of a wider tensor),
    copying once otherwise."""
    n = t.shape[-1]
    if t.dim() >= 1 and (t.stride(-1) == 1 or n == 1):
        try:
            return t.view(-1, n)
        except RuntimeError:
            pass
    return t.contiguous().view(-1, n)


def out_rows(op, name, t, shape, dtype, device):
    """Validate a caller-provided output and return its (M, N) view (never a copy)."""
    check_tensor(op, name, t)
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"fastlayers.{op}: {name} must be a {dtype} tensor of shape {tuple(shape)} on {device}; "
                         f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    v = rows(t) if t.stride(-1) == 1 else None
    if v is None or v.data_ptr() != t.data_ptr() or (v.shape[0] > 1 and v.stride(0) < shape[-1]):
        raise ValueError(f"fastlayers.{op}: {name} must have a contiguous last dimension and rows that "
                         f"collapse to one stride (it is written in place); got strides {t.stride()}")
    return v
