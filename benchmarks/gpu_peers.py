"""Peer libraries timed by the GPU table (benchmarks/gpu_table.py) next to fastlayers, on the same inputs.

- Liger-Kernel (Triton): RMSNorm (and its fused residual-add RMSNorm), LayerNorm, SwiGLU (the fused gate-up
  form where the installed version has it), RoPE.
- mamba_ssm's Triton kernels: ``mamba_chunk_scan_combined`` (Mamba-2 SSD) and ``selective_state_update``.
  A wheel built with ``MAMBA_SKIP_CUDA_BUILD=TRUE`` has no ``selective_scan_cuda``, which the package's
  ``__init__`` imports; the Triton modules need none of it, so they are loaded with the package's own
  ``__init__`` skipped (a bare package module over the installed folder).
- causal-conv1d: every entry point calls its CUDA extension ``causal_conv1d_cuda`` (no Triton path), which
  needs nvcc against the GPU image's torch; benchmarks/fetch_peers.sh does not build it.
- FlashMLA: a CUDA build as well; not fetched.

Each loader returns ``(namespace, None)`` when the peer can be called, else ``(None, (status, reason))``:
status ``"not installed"`` or ``"unavailable"``, the reason one line for the table's row of its own (a
missing peer is a row that says so, never a silent omission). The wheels: benchmarks/fetch_peers.sh.
"""
import importlib
import importlib.metadata
import importlib.util
import sys
import types

FETCH = "benchmarks/fetch_peers.sh, then pip install --no-deps --no-index benchmarks/peers/*.whl"
_cache = {}


def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed(mod):
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def _memo(fn):
    def wrapped():
        if fn.__name__ not in _cache:
            _cache[fn.__name__] = fn()
        return _cache[fn.__name__]
    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


def _failed(e):
    return None, ("unavailable", f"import failed: {type(e).__name__}: {e}"[:160])


@_memo
def liger():
    """Liger-Kernel's autograd Functions (``liger_kernel.ops.*``)."""
    if not _installed("liger_kernel"):
        return None, ("not installed", f"liger-kernel not installed ({FETCH})")
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops import swiglu
    except Exception as e:  # noqa: BLE001 - any import error is the row's reason
        return _failed(e)
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    except ImportError:
        LigerFusedAddRMSNormFunction = None
    return types.SimpleNamespace(
        version=version("liger-kernel"), rms_norm=LigerRMSNormFunction, fused_add_rms_norm=LigerFusedAddRMSNormFunction,
        layer_norm=LigerLayerNormFunction, silu_mul=swiglu.LigerSiLUMulFunction,
        fused_gate_up=getattr(swiglu, "LigerFusedGateUpSiLUMulFunction", None), rope=LigerRopeFunction), None


def _bare_package(name):
    """Register package ``name`` without running its ``__init__`` (its submodules import as usual)."""
    spec = importlib.util.find_spec(name)
    mod = types.ModuleType(name)
    mod.__spec__, mod.__file__, mod.__path__ = spec, spec.origin, list(spec.submodule_search_locations)
    mod.__package__ = name
    sys.modules[name] = mod


@_memo
def mamba():
    """mamba_ssm's Triton kernels: ``chunk_scan_combined`` and ``selective_state_update``."""
    if not _installed("mamba_ssm"):
        return None, ("not installed", f"mamba_ssm not installed ({FETCH})")
    try:
        if "mamba_ssm" not in sys.modules and not _installed("selective_scan_cuda"):
            _bare_package("mamba_ssm")  # its __init__ imports the CUDA extension this wheel lacks
        ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    except Exception as e:  # noqa: BLE001
        return _failed(e)
    return types.SimpleNamespace(version=version("mamba-ssm") or version("mamba_ssm"),
                                 chunk_scan_combined=ssd.mamba_chunk_scan_combined,
                                 selective_state_update=ssu.selective_state_update), None


@_memo
def mamba_scan():
    """mamba_ssm's Mamba-1 ``selective_scan_fn`` (its CUDA extension ``selective_scan_cuda`` only)."""
    if not _installed("mamba_ssm"):
        return None, ("not installed", f"mamba_ssm not installed ({FETCH})")
    if not _installed("selective_scan_cuda"):
        return None, ("unavailable", "mamba_ssm's selective_scan_fn needs its CUDA extension selective_scan_cuda "
                                     "(the MAMBA_SKIP_CUDA_BUILD wheel has none)")
    try:
        ssi = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
    except Exception as e:  # noqa: BLE001
        return _failed(e)
    return types.SimpleNamespace(version=version("mamba-ssm"), selective_scan_fn=ssi.selective_scan_fn), None


@_memo
def causal_conv1d():
    """causal-conv1d's ``causal_conv1d_fn`` / ``causal_conv1d_update`` (CUDA extension only)."""
    why = ("every call goes to its CUDA extension causal_conv1d_cuda (no Triton path), built with nvcc "
           "against the GPU image's torch: not fetched")
    if not _installed("causal_conv1d"):
        return None, ("not installed", f"causal-conv1d not installed: {why}")
    try:
        import causal_conv1d as cc
    except Exception as e:  # noqa: BLE001
        return None, ("unavailable", f"causal-conv1d {version('causal-conv1d')} imports without its CUDA extension "
                                     f"only: {type(e).__name__}: {e}"[:160])
    return types.SimpleNamespace(version=version("causal-conv1d"), fn=cc.causal_conv1d_fn,
                                 update=cc.causal_conv1d_update), None


@_memo
def flash_mla():
    """FlashMLA: a CUDA build; the table has no row that calls it yet."""
    if not _installed("flash_mla"):
        return None, ("not installed", "flash_mla not installed (a CUDA build for sm_90: not fetched)")
    return None, ("unavailable", f"flash_mla {version('flash-mla') or ''} installed, not wired into this table yet")


def versions():
    """Installed versions of the peers (None where absent), for the run's metadata."""
    return {d: version(d) for d in ("liger-kernel", "mamba-ssm", "causal-conv1d", "flash-mla", "einops")}


def smoke_shims():
    """CPU smoke run only: peers enter ``torch.cuda.device(t.device.index)`` around their launches, which fails
    for a CPU tensor (index None); make that a no-op so their Triton kernels run under TRITON_INTERPRET=1
    (fastlayers does the same: it enters the device context for CUDA tensors only)."""
    import contextlib

    import torch
    orig = torch.cuda.device
    if getattr(orig, "_fastlayers_smoke", False):
        return

    class device:  # noqa: N801 - stands in for torch.cuda.device
        _fastlayers_smoke = True

        def __init__(self, idx):
            self._ctx = contextlib.nullcontext() if idx is None else orig(idx)

        def __enter__(self):
            return self._ctx.__enter__()

        def __exit__(self, *a):
            return self._ctx.__exit__(*a)

    torch.cuda.device = device
