"""Output allocation for the ops (the kernels themselves allocate nothing).

Large fresh CPU outputs are advised onto transparent huge pages before first
touch: with 4 KiB pages, faulting in a fresh 128 MiB output costs more than the
kernel that fills it (DESIGN.md §4: ~4 GB/s into fresh memory vs ~17 GB/s into
touched memory). Set FASTLAYERS_NO_HUGEPAGES=1 to turn this off.
"""
import os

import torch

HUGEPAGE_MIN_BYTES = 8 << 20

try:
    from . import _C
except ImportError:  # reported by available_backends()
    _C = None

_ADVISE = _C is not None and os.environ.get("FASTLAYERS_NO_HUGEPAGES", "0") in ("", "0")


def empty(shape, dtype, device, stride=None):
    """A fresh tensor; with ``stride``, allocated with those strides (``torch.empty_strided``): a base
    tensor, never a view, so an autograd Function may return it and callers may modify it in place."""
    if stride is None:
        t = torch.empty(shape, dtype=dtype, device=device)
    else:
        t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    if _ADVISE and t.device.type == "cpu":
        nbytes = t.numel() * t.element_size()
        if nbytes >= HUGEPAGE_MIN_BYTES:
            _C.advise_hugepages(t.data_ptr(), nbytes)
    return t
