"""Causal depthwise conv1d (Mamba's short convolution) against torch eager and torch.compile.

Providers:
  ``cpu``/``triton``   fastlayers.causal_conv1d / causal_conv1d_update (the backend named; on a GPU ``triton``)
  ``eager``            what a user writes without the kernel (mamba_ssm's fallback): ``F.conv1d`` with
                       ``groups=dim`` and ``padding=width - 1``, sliced to the first seqlen steps, then silu;
                       for the decode step, mamba's roll of the state and a weighted sum
  ``compile``          ``torch.compile`` of that
Layouts: ``time`` (a contiguous ``(B, D, L)`` x, as Mamba-1) and ``channel_last`` (a ``(B, L, D)``
tensor transposed, as Mamba-2 passes it).

Bytes: the forward reads x and writes out; forward+backward adds reading dout and x again and
writing dx (weights and states are negligible). The decode step reads and writes the state
(width entries per channel, mamba's layout) and reads x and writes out.
"""
import pytest
import torch
import torch.nn.functional as F

import fastlayers

from conftest import DEVICE, SMOKE, run

FAST = "cpu" if DEVICE == "cpu" else "triton"
DTYPES = [torch.float32] if DEVICE == "cpu" else [torch.bfloat16, torch.float32]
# (batch, dim, seqlen, width): the shape (Mamba-2 at dim 4096)
SHAPE = (2, 64, 128, 4) if SMOKE else (4, 4096, 2048, 4)
DECODE = (2, 64, 4) if SMOKE else (16, 4096, 4)  # (batch, dim, width)


def eager_causal_conv1d(x, weight, bias):
    width = weight.shape[1]
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=x.shape[1])[..., :x.shape[-1]]
    return F.silu(out)


def eager_update(x, conv_state, weight, bias):
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    return F.silu(torch.sum(conv_state * weight, dim=-1) + bias).to(x.dtype)


_compiled = {}


def _fn(provider, kind):
    if provider == FAST:
        op = fastlayers.causal_conv1d if kind == "conv" else fastlayers.causal_conv1d_update

        def f(*args):
            with fastlayers.use_backend(provider):
                return op(*args, "silu")
        return f
    ref = eager_causal_conv1d if kind == "conv" else eager_update
    if provider == "eager":
        return ref
    if kind not in _compiled:
        _compiled[kind] = torch.compile(ref, dynamic=False)
    return _compiled[kind]


def _inputs(b, d, t, w, dtype, layout, grad):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    if layout == "channel_last":
        base = torch.randn(b, t, d, generator=g, device=DEVICE, dtype=dtype)
        x = base.transpose(1, 2)
    else:
        base = x = torch.randn(b, d, t, generator=g, device=DEVICE, dtype=dtype)
    weight = torch.randn(d, w, generator=g, device=DEVICE, dtype=dtype) / w ** 0.5
    bias = torch.randn(d, generator=g, device=DEVICE, dtype=dtype)
    if grad:
        for p in (base, weight, bias):
            p.requires_grad_()
        x = base.transpose(1, 2) if layout == "channel_last" else base
    return base, x, weight, bias


@pytest.mark.parametrize("provider", [FAST, "eager", "compile"])
@pytest.mark.parametrize("layout", ["time", "channel_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_conv1d_forward(benchmark, copy_gbps, dtype, layout, provider):
    b, d, t, w = SHAPE
    _, x, weight, bias = _inputs(b, d, t, w, dtype, layout, grad=False)
    fn = _fn(provider, "conv")
    nbytes = 2 * x.numel() * x.element_size()
    with torch.no_grad():
        run(benchmark, lambda: fn(x, weight, bias), nbytes, copy_gbps, op="causal_conv1d", pass_="forward",
            shape=list(SHAPE), layout=layout, dtype=str(dtype), provider=provider)


@pytest.mark.parametrize("provider", [FAST, "eager", "compile"])
@pytest.mark.parametrize("layout", ["time", "channel_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_conv1d_forward_backward(benchmark, copy_gbps, dtype, layout, provider):
    b, d, t, w = SHAPE
    base, x, weight, bias = _inputs(b, d, t, w, dtype, layout, grad=True)
    fn = _fn(provider, "conv")
    # the gradient arrives in the layout of the output of the surrounding model (x's)
    dout = torch.randn_like(base)
    dout = dout.transpose(1, 2) if layout == "channel_last" else dout

    def step():
        for p in (base, weight, bias):
            p.grad = None
        fn(x, weight, bias).backward(dout)

    nbytes = 5 * x.numel() * x.element_size()
    run(benchmark, step, nbytes, copy_gbps, op="causal_conv1d", pass_="forward+backward", shape=list(SHAPE),
        layout=layout, dtype=str(dtype), provider=provider)


@pytest.mark.parametrize("provider", [FAST, "eager", "compile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_conv1d_update(benchmark, copy_gbps, dtype, provider):
    b, d, w = DECODE
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(b, d, generator=g, device=DEVICE, dtype=dtype)
    state = torch.randn(b, d, w, generator=g, device=DEVICE, dtype=dtype)
    weight = torch.randn(d, w, generator=g, device=DEVICE, dtype=dtype) / w ** 0.5
    bias = torch.randn(d, generator=g, device=DEVICE, dtype=dtype)
    fn = _fn(provider, "update")
    nbytes = (2 * w + 2) * b * d * x.element_size()
    with torch.no_grad():
        run(benchmark, lambda: fn(x, state, weight, bias), nbytes, copy_gbps, op="causal_conv1d_update",
            pass_="decode", shape=list(DECODE), dtype=str(dtype), provider=provider)


@pytest.mark.parametrize("layout", ["time", "channel_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_conv1d_seq_idx_forward(benchmark, copy_gbps, dtype, layout):
    """Packed sequences (four per row, seq_idx) on the fast backend: compare with the dense forward rows
    (the seq_idx kernels are the plainer masked ones). Bytes: x read, out written, seq_idx read."""
    b, d, t, w = SHAPE
    _, x, weight, bias = _inputs(b, d, t, w, dtype, layout, grad=False)
    seq = (torch.arange(t, device=DEVICE) // max(1, t // 4)).to(torch.int32).expand(b, t).contiguous()

    def f():
        with fastlayers.use_backend(FAST):
            return fastlayers.causal_conv1d(x, weight, bias, "silu", seq_idx=seq)

    nbytes = 2 * x.numel() * x.element_size() + seq.numel() * 4
    with torch.no_grad():
        run(benchmark, f, nbytes, copy_gbps, op="causal_conv1d_seq_idx", pass_="forward", shape=list(SHAPE),
            layout=layout, dtype=str(dtype), provider=FAST)
