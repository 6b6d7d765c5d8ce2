"""Kernel backends.

Each backend module exposes the same kernel-level functions. The public ops in
``fastlayers.ops`` validate arguments, allocate every output and workspace with
torch, then call one of these. Kernel functions never allocate outputs, never
validate user input, and write every element of every output they are given.

Contract for the fused residual + norm family (``norm_*``)
-----------------------------------------------------------
All 2-D tensors are ``(M, N)`` with the last dimension contiguous (stride 1)
and an arbitrary row stride ``t.stride(0)`` (e.g. a slice of a wider tensor).

``norm_fwd(x, residual, weight, bias, y, h, mean, rstd, eps, is_rms)``
    x         (M, N) input; fp32/fp16/bf16 (fp64 on cpu only)
    residual  (M, N) or None; dtype of x, or fp32
    weight    (N,) contiguous, any floating dtype
    bias      (N,) contiguous or None (LayerNorm only)
    y         (M, N) output, dtype of x:  y = norm(h) * weight (+ bias)
    h         (M, N) output or None: h = x + residual (or x), in h.dtype
    mean      (M,) stat dtype output (LayerNorm) or None (RMSNorm)
    rstd      (M,) stat dtype output: 1/sqrt(var(h) + eps) (LN) or 1/sqrt(mean(h^2) + eps) (RMS)
    eps       python float, > 0
    is_rms    bool
  The sum h is formed in fp32 (fp64 for fp64 inputs) and normalised unrounded;
  only the stored copy of h is rounded to h.dtype.

``norm_bwd_parts(M, N, device) -> int``
    number P of partial rows the backward writes into dw_part/db_part.

``norm_bwd(dy, x, residual, weight, bias, mean, rstd, dh, dx, dresidual, dw_part, db_part, is_rms)``
    dy        (M, N) grad of y (dtype of x)
    x, residual, weight, bias, mean, rstd: as saved from the forward (h is recomputed from x + residual)
    dh        (M, N) or None: grad flowing into the h output (prenorm)
    dx        (M, N) output: d loss / d h  (= d loss / d x)
    dresidual (M, N) output or None: the same values in residual's dtype
    dw_part   (P, N) stat dtype output: per-part partial sums of dy * xhat (every row written)
    db_part   (P, N) stat dtype output or None: partial sums of dy
    stat dtype = float64 for float64 inputs, float32 otherwise.
"""
import importlib

import torch

NAMES = ("reference", "cpu", "triton", "cuda")


def load(name):
    """Import the kernel module of a backend (``fastlayers.backends.<name>``)."""
    return importlib.import_module(f"fastlayers.backends.{name}")


_SM_COUNT = {}


def sm_count(device):
    """Multiprocessor count of a CUDA device (cached): sizes the GPU backends' grids."""
    device = torch.device(device)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
