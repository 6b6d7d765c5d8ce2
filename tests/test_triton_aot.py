"""Ahead-of-time compile of the Triton kernels (norms, head norm + RoPE, SwiGLU, causal conv1d,
selective state update, ssd_scan) for sm_80 and
sm_90 (DESIGN.md §1, §4).

Catches GPU compile errors on a machine without a GPU: every kernel of the family
(forward and backward; RMS/LN, residual, bias, h, dh, dresidual; fp32/fp16/bf16;
short rows several to a program, one long row in one block, chunked rows) is
compiled with ``triton.compile(..., target=GPUTarget("cuda", cc, 32))`` down to
PTX and cubin. Under TRITON_INTERPRET=1 (set by conftest without a GPU) triton's
own library functions are interpreted, so ``aot_compile`` compiles in a child
process; the first run takes ~30 s per target on 2 cores (triton caches the result).
"""
import re

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be compiled "
                                     "(pip install triton)")

from fastlayers.backends import triton as triton_backend  # noqa: E402


@pytest.mark.parametrize("cc", [80, 90])
def test_aot_compile(cc):
    if triton_backend.IMPORT_ERROR is not None:
        pytest.skip(f"triton is not usable: {triton_backend.IMPORT_ERROR}")
    kernels = triton_backend.aot_compile(cc)
    assert len(kernels) >= 10, f"expected the whole kernel family, got {len(kernels)} kernels"
    kinds = {k.description.split()[0] for k in kernels}
    assert kinds == {"norm_fwd", "norm_bwd", "head_norm_rope_fwd", "head_norm_rope_bwd", "swiglu_fwd",
                     "swiglu_bwd", "selective_state_update", "conv1d_fwd", "conv1d_bwd", "conv1d_update",
                     "conv1d_fwd_seq", "conv1d_bwd_seq", "conv1d_update_ext",
                     "ssd_fwd", "ssd_bwd_dstates", "ssd_bwd_chunk"}, kinds
    for k in kernels:
        ptx = k.asm["ptx"]
        assert ptx.strip(), f"{k.description}: empty PTX"
        targets = re.findall(r"^\.target\s+(\S+)", ptx, re.MULTILINE)
        assert targets and targets[0].startswith(f"sm_{cc}"), f"{k.description}: PTX targets {targets}, " \
                                                              f"expected sm_{cc}"
        entry = (r"^\.visible \.entry _(norm|head_norm_rope|swiglu|conv)_(fwd|bwd|update)(_seq|_ext)?_kernel"
                 r"|^\.visible \.entry _state_update_kernel|^\.visible \.entry _ssd_(fwd|bwd_dstates|bwd_chunk)_kernel")
        assert re.search(entry, ptx, re.MULTILINE), f"{k.description}: no kernel entry in the PTX"
        assert k.asm.get("cubin"), f"{k.description}: ptxas produced no cubin"
        # The divisibility hints must let row loads vectorise (128-bit accesses), except where a tile
        # gives each thread under 16 bytes (decode shapes, tiny head_dim), marked "novec".
        assert "ld.global.v4" in ptx or k.description.endswith("novec"), f"{k.description}: no vectorised loads"


def test_aot_flags_cover_family():
    """The compiled set turns every constexpr flag both on and off, and covers each dtype and tiling."""
    if triton_backend.IMPORT_ERROR is not None:
        pytest.skip(f"triton is not usable: {triton_backend.IMPORT_ERROR}")
    variants = triton_backend._aot_variants()
    for kind, flags in (("norm_fwd", ("IS_RMS", "HAS_RESIDUAL", "HAS_BIAS", "STORE_H", "ONE_BLOCK", "HAS_WEIGHT",
                                      "ROUND_XHAT")),
                        ("norm_bwd", ("IS_RMS", "HAS_RESIDUAL", "HAS_BIAS", "HAS_DH", "STORE_DR", "ONE_BLOCK",
                                      "HAS_WEIGHT", "ROUND_XHAT"))):
        metas = [v[4] for v in variants if v[-1].startswith(kind)]
        for f in flags:
            assert {m[f] for m in metas} == {True, False}, f"{kind}: {f} not compiled both ways"
        assert any(m["BLOCK_M"] > 1 for m in metas), f"{kind}: no multi-row tile"
        dtypes = {v[2]["X"] for v in variants if v[-1].startswith(kind)}
        assert len(dtypes) == 3, f"{kind}: dtypes {dtypes}"
    from fastlayers.backends import triton_conv1d
    variants = triton_conv1d.aot_variants()
    for kind, flags in (("conv1d_update_ext", ("HAS_BIAS", "SILU", "CIRC", "HAS_IDX")),
                        ("conv1d_fwd_seq", ("HAS_BIAS", "SILU")), ("conv1d_bwd_seq", ("HAS_BIAS", "SILU"))):
        metas = [v[4] for v in variants if v[-1].startswith(kind + " ")]
        for f in flags:
            assert {m[f] for m in metas} == {True, False}, f"{kind}: {f} not compiled both ways"
