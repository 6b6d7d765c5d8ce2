"""Backend selection.

Default by device: CPU tensors run the ``cpu`` backend; CUDA tensors run the
backend measured fastest for the op (``DEFAULT_CUDA``), or ``triton`` where
``_cuda`` was not built. ``FASTLAYERS_BACKEND=<name>`` or
``with fastlayers.use_backend(name):`` overrides it; an unavailable backend is an
error that says why, never a silent fall-back.
"""
import contextlib
import contextvars
import os

import torch

from .backends import NAMES, load

_override = contextvars.ContextVar("fastlayers_backend", default=None)

# Per-op default on CUDA tensors, from GPU measurements (benchmarks/RESULTS.md).
# Ops not listed default to "cuda" when built, else "triton". The HybridNorm ops have
# no CUDA C++ kernel (one memory-bound pass each: Triton serves them); nor have the Mamba decode
# step and the causal conv1d yet. MLA decoding has one (csrc/cuda/mla.cu); on an H200 (2026-11-27)
# the Triton kernel was faster in every 512+64 case and most Zebra-size rows, so triton stays its
# default. The norms' CUDA kernels beat Triton on most shapes there (cuda stays their default).
# selective_scan has no triton kernel: CUDA tensors run its CUDA forward and backward (csrc/cuda/scan.cu).
DEFAULT_CUDA = {"qkv_norm_rope": "triton", "swiglu": "triton", "selective_state_update": "triton",
                "mla_decode": "triton", "causal_conv1d": "triton", "causal_conv1d_update": "triton", "ssd_scan": "triton"}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not built, missing dependency, wrong device)."""


def _check_name(name):
    if name not in NAMES:
        raise ValueError(f"unknown fastlayers backend {name!r}; expected one of {', '.join(NAMES)}")
    return name


def _interpret():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_cache = {}


def _import_error(name):
    """The ImportError a backend module recorded while loading its kernels (None when they loaded)."""
    try:
        mod = load(name)
    except ImportError as e:
        return e
    err = getattr(mod, "IMPORT_ERROR", f"fastlayers.backends.{name} defines no kernels")
    if err is not None and name in ("cpu", "cuda"):
        pkg = os.path.dirname(os.path.abspath(__file__))
        if os.path.exists(os.path.join(pkg, os.pardir, "setup.py")):
            err = (f"{err} -- this fastlayers is imported from a source tree ({pkg}) with no built "
                   f"extensions: run from another directory to use the installed package, or build in place "
                   f"with `python setup.py build_ext --inplace`")
    return err


def _module_status(name):
    """(usable, reason) for a backend regardless of device; cached."""
    if name in _cache:
        return _cache[name]
    if name == "reference":
        res = (True, "pure PyTorch, runs anywhere")
    elif name == "cpu":
        err = _import_error("cpu")
        res = (True, "C++/OpenMP kernels (fastlayers._C)") if err is None else \
            (False, f"fastlayers._C failed to import: {err}")
    elif name == "triton":
        err = _import_error("triton")
        if err is not None:
            res = (False, f"triton is not usable ({err}); pip install triton")
        else:
            res = (True, "Triton kernels on CUDA tensors" +
                   (" (and CPU tensors: TRITON_INTERPRET=1)" if _interpret() else ""))
    else:  # cuda
        try:
            from . import _build_info
            built, why = _build_info.CUDA_BUILT, _build_info.CUDA_REASON
        except ImportError:
            built, why = False, "_cuda was not built: no build information (package not built with setup.py)"
        if not built:
            res = (False, why)
        else:
            err = _import_error("cuda")
            if err is not None:
                res = (False, f"fastlayers._cuda failed to import: {err}")
            elif not torch.cuda.is_available():
                res = (False, "_cuda is built but no CUDA device is available to torch")
            else:
                res = (True, "CUDA C++ kernels (fastlayers._cuda)")
    _cache[name] = res
    return res


def available_backends():
    """Map every backend name to ``(usable, reason)``: what is usable here and why the others are not."""
    return {n: _module_status(n) for n in NAMES}


@contextlib.contextmanager
def use_backend(name):
    """Run the ops inside the block on backend ``name`` (``None`` restores automatic choice)."""
    token = _override.set(None if name is None else _check_name(name))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend():
    """The override in force (context manager first, then FASTLAYERS_BACKEND), or None."""
    name = _override.get()
    if name is None:
        env = os.environ.get("FASTLAYERS_BACKEND", "").strip()
        name = _check_name(env) if env else None
    return name


def _device_ok(name, device):
    if name == "reference":
        return True, ""
    if name == "cpu":
        return device.type == "cpu", f"backend 'cpu' runs on CPU tensors; got tensors on {device}"
    if name == "cuda":
        return device.type == "cuda", f"backend 'cuda' runs on CUDA tensors; got tensors on {device}"
    ok = device.type == "cuda" or (device.type == "cpu" and _interpret())
    return ok, (f"backend 'triton' runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); "
                f"got tensors on {device}")


@torch.compiler.assume_constant_result
def resolve(op, device):
    """Backend name for running ``op`` on ``device``; raises BackendUnavailable with the reason.

    While torch.compile traces, the choice is made once and baked into the graph."""
    name = requested_backend()
    if name is None:
        if device.type == "cuda":
            name = DEFAULT_CUDA.get(op, "cuda")
            if not _module_status(name)[0]:
                name = "triton" if name == "cuda" else "cuda"
        else:
            name = "cpu"
    usable, why = _module_status(name)
    if not usable:
        raise BackendUnavailable(f"fastlayers.{op}: backend {name!r} is not available: {why}")
    ok, why = _device_ok(name, device)
    if not ok:
        raise BackendUnavailable(f"fastlayers.{op}: {why}")
    return name
