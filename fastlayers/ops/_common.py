"""Helpers shared by the ops: argument checks and row views."""
import math
import numbers

import torch

from .._dtypes import FLOATING

FLOAT_NAMES = "float32, float16, bfloat16 or float64"
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def needs_grad(*ts):
    """Autograd is on and one of ``ts`` (None allowed) requires a gradient."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def dispatch(custom_op, autograd_fn, fwd, args, n_inputs):
    """The three ways an op with a backward runs: its custom op under torch.compile, ``autograd_fn.apply``
    when one of the first ``n_inputs`` args needs a gradient, else the plain forward ``fwd``."""
    if torch.compiler.is_compiling():
        return custom_op(*args)
    if needs_grad(*args[:n_inputs]):
        return autograd_fn.apply(*args)
    return fwd(*args)


def check_backend_dtype(op, backend, dtype):
    """For the ops whose GPU backend is Triton alone: the GPU dtypes, and no 'cuda' kernel."""
    if backend in ("triton", "cuda") and dtype not in GPU_DTYPES:
        raise TypeError(f"fastlayers.{op}: backend {backend!r} supports float32, float16 and bfloat16; "
                        f"got {dtype} (use the cpu or reference backend)")
    if backend == "cuda":
        # No CUDA C++ kernel for this family: Triton is the GPU backend (one pass, memory-bound).
        from ..backend import BackendUnavailable
        raise BackendUnavailable(f"fastlayers.{op}: no 'cuda' kernel for this op; use the 'triton' backend "
                                 f"(the default for CUDA tensors)")


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _kind(t):
    return "a DTensor" if type(t).__name__ == "DTensor" else f"a {type(t).__name__} (a tensor subclass)"


def check_plain(op, name, t):
    """Refuse tensor subclasses whose ``data_ptr()`` is not their data: DTensor and the other wrapper
    subclasses (``__torch_dispatch__``, e.g. ``torch._make_wrapper_subclass``) report 0 or a pointer to
    nothing, and a kernel reading it crashes the process. Plain tensors, Parameters and subclasses that
    only override ``__torch_function__`` (their storage is the data) pass. Every op checks its tensor
    arguments through here (``check_tensor``)."""
    cls = type(t)
    if cls is torch.Tensor or cls is torch.nn.Parameter:
        return
    if torch.compiler.is_compiling():  # traced: the custom ops receive what the tracer hands them
        return
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    if is_traceable_wrapper_subclass(t) or torch._C._dispatch_keys(t).has(torch._C.DispatchKey.Python):
        hint = (f"pass {name}.to_local() (this rank's shard) or {name}.full_tensor()" if _kind(t) == "a DTensor"
                else "pass the plain tensor it wraps")
        raise TypeError(f"fastlayers.{op}: {name} is {_kind(t)} whose data_ptr() is not its data; the kernels "
                        f"take plain torch.Tensors: {hint}")


def check_tensor(op, name, t, *, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastlayers.{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    check_plain(op, name, t)
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
