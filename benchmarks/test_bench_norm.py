"""Fused residual + RMSNorm / LayerNorm: fastlayers backends vs torch eager and torch.compile.

Providers: every fastlayers backend usable on the device (``cpu``; ``cuda``/``triton`` on a GPU),
``cpu-out`` (preallocated outputs), ``eager`` (``x + r`` then ``F.rms_norm``/``F.layer_norm``),
``compile`` (torch.compile of the same) and ``liger`` (Liger-Kernel's RMSNorm, when installed).
Bytes: forward reads x, residual, weight and writes y; forward+backward adds reading dy, x,
residual and writing dx (dresidual shares it) — each tensor counted once per pass.
"""
import pytest
import torch
import torch.nn.functional as F

import fastlayers

from conftest import DEVICE, SMOKE, run

if SMOKE:
    SHAPES = [(64, 256)]
elif DEVICE == "cpu":
    SHAPES = [(8192, 4096), (4096, 2048), (4096, 8192), (16384, 2048), (16384, 8192)]
else:
    SHAPES = [(t, h) for t in (4096, 8192, 16384) for h in (2048, 4096, 8192)]
BWD_SHAPES = SHAPES[:1] if DEVICE == "cpu" else SHAPES
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.bfloat16, torch.float32]


def _providers():
    av = fastlayers.available_backends()
    names = []
    if DEVICE == "cpu":
        names += ["cpu", "cpu-out"]
    else:
        names += [b for b in ("cuda", "triton") if av[b][0]]
    names += ["eager", "compile"]
    try:
        import liger_kernel  # noqa: F401
        if DEVICE == "cuda":
            names.append("liger")
    except ImportError:
        pass
    return names


def _eager(is_rms):
    if is_rms:
        return lambda x, r, w, b: F.rms_norm(x + r, (x.shape[-1],), w, 1e-6)
    return lambda x, r, w, b: F.layer_norm(x + r, (x.shape[-1],), w, b, 1e-5)


_compiled = {}


def _fn(provider, is_rms, x, r, w, b):
    if provider in ("cpu", "cuda", "triton"):
        op = fastlayers.rms_norm if is_rms else fastlayers.layer_norm

        def f():
            with fastlayers.use_backend(provider):
                return op(x, w, residual=r) if is_rms else op(x, w, b, residual=r)
        return f
    if provider == "cpu-out":
        out = torch.empty_like(x)
        op = fastlayers.rms_norm if is_rms else fastlayers.layer_norm
        return (lambda: op(x, w, residual=r, out=out)) if is_rms else (lambda: op(x, w, b, residual=r, out=out))
    if provider == "eager":
        f = _eager(is_rms)
        return lambda: f(x, r, w, b)
    if provider == "compile":
        key = is_rms
        if key not in _compiled:
            _compiled[key] = torch.compile(_eager(is_rms), dynamic=False)
        f = _compiled[key]
        return lambda: f(x, r, w, b)
    if provider == "liger":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        if not is_rms:
            pytest.skip("Liger comparison is for RMSNorm")
        return lambda: LigerRMSNormFunction.apply(x + r, w, 1e-6)
    raise ValueError(provider)


def _inputs(tokens, hidden, dtype, grad):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, device=DEVICE, dtype=dtype)  # noqa: E731
    x, r, w, b = mk(tokens, hidden), mk(tokens, hidden), mk(hidden), mk(hidden)
    if grad:
        for t in (x, r, w, b):
            t.requires_grad_()
    return x, r, w, b


@pytest.mark.parametrize("provider", _providers())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", SHAPES, ids=[f"{t}x{h}" for t, h in SHAPES])
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_norm_forward(benchmark, copy_gbps, op, tokens, hidden, dtype, provider):
    is_rms = op == "rms_norm"
    if provider == "cpu-out" and (tokens, hidden) != SHAPES[0] and not SMOKE:
        pytest.skip("out= path measured at the target shape only")
    x, r, w, b = _inputs(tokens, hidden, dtype, grad=False)
    nbytes = 3 * x.numel() * x.element_size()
    with torch.no_grad():
        run(benchmark, _fn(provider, is_rms, x, r, w, b), nbytes, copy_gbps, op=op, pass_="forward",
            shape=[tokens, hidden], dtype=str(dtype), provider=provider)


@pytest.mark.parametrize("provider", [p for p in _providers() if p != "cpu-out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,hidden", BWD_SHAPES, ids=[f"{t}x{h}" for t, h in BWD_SHAPES])
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_norm_forward_backward(benchmark, copy_gbps, op, tokens, hidden, dtype, provider):
    is_rms = op == "rms_norm"
    x, r, w, b = _inputs(tokens, hidden, dtype, grad=True)
    dy = torch.randn_like(x)
    f = _fn(provider, is_rms, x, r, w, b)

    def step():
        for t in (x, r, w, b):
            t.grad = None
        f().backward(dy)

    nbytes = (3 + 4) * x.numel() * x.element_size()
    run(benchmark, step, nbytes, copy_gbps, op=op, pass_="forward+backward", shape=[tokens, hidden],
        dtype=str(dtype), provider=provider)


def test_copy_ceiling(benchmark, copy_gbps):
    """The machine's copy bandwidth into a preallocated buffer, as a benchmark row of its own."""
    n = (1 << 16) if SMOKE else (8192 * 4096)
    a = torch.randn(n, device=DEVICE)
    out = torch.empty_like(a)
    run(benchmark, lambda: out.copy_(a), 2 * a.numel() * 4, copy_gbps, op="copy", provider="torch")
