"""CPU backend: C++/OpenMP kernels in ``fastlayers._C`` (see backends/__init__.py for the contract)."""
import torch

from .._dtypes import code, ptr, stat_dtype, stride0

try:
    from .. import _C
    IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - reported by available_backends()
    _C = None
    IMPORT_ERROR = e


# Elements of work per thread below which a kernel does not fork: waking the OpenMP team costs more than
# the work, and on shared cores a thread that is descheduled holds up the barrier for milliseconds (decode
# steps run dozens of these small ops). Measured on the 2-core machine (2026-12-04, rms_norm with residual
# and swiglu, M x N fp32, 1 vs 2 threads, best of 5 x 100 calls, other processes running): 2 threads
# were no faster up to 32K elements (rms_norm 1024 x 32: 48 vs 113 us) and faster from 64K-128K on
# (rms_norm 1024 x 128: 172 vs 106 us; swiglu 1024 x 64: 148 vs 103 us). So 2 threads from 32K elements.
MIN_PER_THREAD = 1 << 14


def _parts(items, elems, per_thread=None):
    """Threads for a kernel of `items` independent rows touching `elems` elements in all."""
    return max(1, min(torch.get_num_threads(), items, elems // (per_thread or MIN_PER_THREAD)))


def _xhat_code(round_xhat, x):
    """dtype code xhat is rounded to before the gain ("llama" casting): x's, when 16-bit; else -1."""
    return code(x) if round_xhat and x.dtype in (torch.float16, torch.bfloat16) else -1


def norm_fwd(x, residual, weight, bias, y, h, mean, rstd, eps, is_rms, offset=0.0, round_xhat=False):
    M, N = x.shape
    parts = _parts(M, M * N)
    ws = torch.empty(parts * 4 * N, dtype=stat_dtype(x.dtype))
    _C.norm_fwd(ptr(x), stride0(x), code(x), ptr(residual), stride0(residual), code(residual),
                ptr(weight), code(weight), ptr(bias), code(bias), ptr(y), stride0(y), code(y),
                ptr(h), stride0(h), code(h), ptr(mean), ptr(rstd), M, N, float(eps), bool(is_rms),
                ws.data_ptr(), parts, float(offset), _xhat_code(round_xhat, x))


def norm_bwd_parts(M, N, device):
    return _parts(M, M * N)


def norm_bwd(dy, x, residual, weight, bias, mean, rstd, dh, dx, dresidual, dw_part, db_part, is_rms, offset=0.0,
             round_xhat=False):
    M, N = x.shape
    parts = dw_part.shape[0]
    ws = torch.empty(parts * 4 * N, dtype=stat_dtype(x.dtype))
    _C.norm_bwd(ptr(dy), stride0(dy), code(dy), ptr(x), stride0(x), code(x),
                ptr(residual), stride0(residual), code(residual), ptr(weight), code(weight),
                ptr(bias), code(bias), ptr(mean), ptr(rstd), ptr(dh), stride0(dh), code(dh),
                ptr(dx), stride0(dx), code(dx), ptr(dresidual), stride0(dresidual), code(dresidual),
                ptr(dw_part), ptr(db_part), M, N, bool(is_rms), ws.data_ptr(), parts, float(offset),
                _xhat_code(round_xhat, dx))


def _s3(t):
    return t.stride()[:3]


def head_norm_rope_fwd(x, weight, out, cos, sin, offsets, eps):
    B, T, H, D = x.shape
    parts = _parts(B * T * H, B * T * H * D)
    ws = torch.empty(parts * 4 * D, dtype=stat_dtype(x.dtype))
    _C.head_norm_rope_fwd(ptr(x), _s3(x), code(x), ptr(weight), code(weight), ptr(out), _s3(out), code(out),
                          ptr(cos), ptr(sin), stride0(cos), ptr(offsets), B, T, H, D, float(eps),
                          ws.data_ptr(), parts)


def head_norm_rope_bwd_parts(rows, D, device):
    return _parts(rows, rows * D)


def head_norm_rope_bwd(dout, x, weight, cos, sin, offsets, eps, dx, dw_part):
    B, T, H, D = x.shape
    parts = dw_part.shape[0] if dw_part is not None else head_norm_rope_bwd_parts(B * T * H, D, None)
    ws = torch.empty(parts * 4 * D, dtype=stat_dtype(x.dtype))
    _C.head_norm_rope_bwd(ptr(dout), _s3(dout), code(dout), ptr(x), _s3(x), code(x), ptr(weight), code(weight),
                          ptr(cos), ptr(sin), stride0(cos), ptr(offsets), ptr(dx), _s3(dx), code(dx), ptr(dw_part),
                          B, T, H, D, float(eps), ws.data_ptr(), parts)


def _swiglu(gate, up, dout, out, dup):
    M, F = gate.shape
    parts = _parts(M, M * F)
    ws = torch.empty(parts * 4 * F, dtype=stat_dtype(gate.dtype))
    _C.swiglu(ptr(gate), stride0(gate), code(gate), ptr(up), stride0(up), code(up), ptr(dout), stride0(dout),
              code(dout), ptr(out), stride0(out), code(out), ptr(dup), stride0(dup), code(dup), M, F,
              ws.data_ptr(), parts)


def swiglu_fwd(gate, up, out):
    _swiglu(gate, up, None, out, None)


def swiglu_bwd(dout, gate, up, dgate, dup):
    _swiglu(gate, up, dout, dgate, dup)


def _view4(t):
    """(address, dtype code, 4 strides) of a tensor of up to 4 dims; (0, -1, zeros) for None."""
    if t is None:
        return (0, -1, (0, 0, 0, 0))
    st = tuple(t.stride()) + (0,) * (4 - t.dim())
    return (ptr(t), code(t), st)


def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, out, state_batch_indices, dt_softplus):
    batch, H, P = x.shape
    N, G = state.shape[-1], B.shape[1]
    parts = _parts(batch * H * P, batch * H * P * N)
    ws = torch.empty(parts * 4 * N, dtype=stat_dtype(state.dtype))
    _C.selective_state_update(_view4(state), _view4(x), _view4(dt), _view4(A), _view4(B), _view4(C), _view4(D),
                              _view4(z), _view4(dt_bias), _view4(out), ptr(state_batch_indices), batch, H, P, N, G,
                              bool(dt_softplus), ws.data_ptr(), parts)


def mla_decode_splits(batch, max_len, device, rows=1):
    """(n_splits, split_tokens): enough (sequence, split) tasks to keep every thread busy, >= 256 tokens each."""
    want = 4 * torch.get_num_threads()
    n_splits = max(1, min(-(-want // max(batch, 1)), -(-max_len // 256)))
    split = max(1, -(-max_len // n_splits))
    return n_splits, -(-split // 32) * 32


# Phase-1 kernel of mla_decode: "auto" (the AVX2/FMA one where the CPU has it, for fp32/fp16/bf16),
# "scalar" or "vector" (tests set this to compare the two).
MLA_KERNEL = "auto"
_MLA_KERNELS = {"auto": 0, "scalar": 1, "vector": 2}


def mla_decode_has_vector():
    return bool(_C.mla_decode_has_avx2())


def mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal, split_tokens, out, lse, o_part,
               lse_part):
    B, s_q, H, D = q.shape
    h_kv = kv_cache.shape[2]
    n_splits = o_part.shape[1]
    parts = _parts(B * h_kv * n_splits, B * n_splits * split_tokens * D * s_q * H)
    per = _C.mla_decode_workspace(s_q * (H // h_kv), D, head_dim_v)
    ws = torch.empty(parts * per, dtype=stat_dtype(q.dtype))
    _C.mla_decode(ptr(q), _s3(q), code(q), ptr(kv_cache), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
                  code(kv_cache), ptr(block_table), block_table.stride(0), ptr(cache_seqlens), ptr(o_part),
                  ptr(lse_part), ptr(out), code(out), ptr(lse), B, s_q, H, h_kv, D, head_dim_v, kv_cache.shape[1],
                  n_splits, split_tokens,
                  float(scale), bool(causal), block_table.shape[1] * kv_cache.shape[1], ws.data_ptr(), parts,
                  _MLA_KERNELS[MLA_KERNEL])
# ----------------------------------------------------------------------------- causal conv1d
def _s(t):
    return (0, 0, 0) if t is None else tuple(t.stride())


def _conv_channel_last(x):
    """The channel-last path walks rows of channels; the default walks rows of time steps."""
    return not (x.shape[2] <= 1 or x.stride(2) == 1)


# Elements per thread below which the conv kernels do not fork: a fork/join costs more than the work.
CONV_MIN_PER_THREAD = 1 << 15


def _conv_parts(elems, items):
    return _parts(items, elems, CONV_MIN_PER_THREAD)


def _conv_workspace(x, W, items):
    parts = _conv_parts(x.numel(), items)  # the kernel runs min(parts, its work items) parts
    ws = torch.empty(parts * _C.conv1d_workspace_per_part(W), dtype=stat_dtype(x.dtype))
    return ws, parts


def causal_conv1d_fwd(x, weight, bias, initial_states, out, final_states, silu, seq_idx=None):
    B, C, L = x.shape
    W = weight.shape[1]
    cl = _conv_channel_last(x)
    ws, parts = _conv_workspace(x, W, B * C * L)
    _C.causal_conv1d(ptr(x), _s(x), code(x), ptr(weight), code(weight), ptr(bias), code(bias),
                     ptr(initial_states), _s(initial_states), code(initial_states), ptr(out), _s(out), code(out),
                     ptr(final_states), _s(final_states), code(final_states), 0, (0, 0, 0), -1, 0, (0, 0, 0), -1,
                     0, (0, 0, 0), -1, 0, (0, 0, 0), -1, 0, 0, B, C, L, W, bool(silu), cl, ws.data_ptr(), parts,
                     ptr(seq_idx))


def causal_conv1d_bwd_parts(B, C, L, device):
    return 1  # each thread owns whole channels: dweight/dbias are written complete


def causal_conv1d_bwd(dout, dfinal_states, x, weight, bias, initial_states, silu, dx, dinitial_states,
                      dw_part, db_part, seq_idx=None):
    B, C, L = x.shape
    W = weight.shape[1]
    cl = _conv_channel_last(x)
    ws, parts = _conv_workspace(x, W, C)
    _C.causal_conv1d(ptr(x), _s(x), code(x), ptr(weight), code(weight), ptr(bias), code(bias),
                     ptr(initial_states), _s(initial_states), code(initial_states), 0, (0, 0, 0), -1, 0, (0, 0, 0),
                     -1, ptr(dout), _s(dout), code(dout), ptr(dfinal_states), _s(dfinal_states),
                     code(dfinal_states), ptr(dx), _s(dx), code(dx), ptr(dinitial_states), _s(dinitial_states),
                     code(dinitial_states), ptr(dw_part), ptr(db_part), B, C, L, W, bool(silu), cl, ws.data_ptr(),
                     parts, ptr(seq_idx))


def causal_conv1d_update(x, conv_state, weight, bias, out, silu, cache_seqlens=None, state_indices=None):
    B, C, L = x.shape
    _C.causal_conv1d_update(ptr(x), _s(x), code(x), ptr(conv_state), _s(conv_state), code(conv_state),
                            ptr(weight), code(weight), ptr(bias), code(bias), ptr(out), _s(out), code(out),
                            B, C, L, conv_state.shape[2], weight.shape[1], bool(silu),
                            _conv_parts(B * C * (conv_state.shape[2] + L), B * C), ptr(cache_seqlens),
                            ptr(state_indices))
def _scan_ws(u, L, N, backward, parts):
    return torch.empty(parts * _C.selective_scan_workspace(L, N, backward), dtype=stat_dtype(u.dtype))


_NONE4 = (0, -1, (0, 0, 0, 0))


def _scan_parts(batch, dim, L, N):
    # Small scans run on one thread: waking the OpenMP team costs more than the work (and milliseconds
    # when the cores are shared).
    return _parts(batch * dim, batch * dim * L * N, 1 << 15)


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, out, last, GB, GC, delta_softplus):
    batch, dim, L = u.shape
    N = A.shape[1]
    parts = _scan_parts(batch, dim, L, N)
    ws = _scan_ws(u, L, N, False, parts)
    _C.selective_scan(_view4(u), _view4(delta), _view4(A), _view4(B), _view4(C), _view4(D), _view4(z),
                      _view4(delta_bias), _view4(out), _view4(last), _NONE4, _NONE4, _NONE4, _NONE4, _NONE4,
                      0, 0, 0, 0, 0, 0, 0, batch, dim, L, N, GB, GC, bool(delta_softplus), ws.data_ptr(), parts)


def selective_scan_bwd_parts(batch, dim, L, N, device):
    return _scan_parts(batch, dim, L, N)


def selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, du, ddelta, dz, dA_part, dB_part, dC_part,
                       dD_part, dbias_part, GB, GC, delta_softplus):
    batch, dim, L = u.shape
    N = A.shape[1]
    parts = dA_part.shape[0]
    ws = _scan_ws(u, L, N, True, parts)
    _C.selective_scan(_view4(u), _view4(delta), _view4(A), _view4(B), _view4(C), _view4(D), _view4(z),
                      _view4(delta_bias), _NONE4, _NONE4, _view4(dout), _view4(dlast), _view4(du), _view4(ddelta),
                      _view4(dz), ptr(dA_part), ptr(dB_part), ptr(dC_part), ptr(dD_part), ptr(dbias_part),
                      dB_part[0].numel(), dC_part[0].numel(), batch, dim, L, N, GB, GC, bool(delta_softplus),
                      ws.data_ptr(), parts)


# ----------------------------------------------------------------------------- ssd_scan (Mamba-2)
def _ssd_parts(batch, H, L, P, N):
    return _parts(batch * H, batch * H * L * P * N, 1 << 15)


def _ssd_ws(x, L, P, N, backward, parts):
    return torch.empty(parts * _C.ssd_scan_workspace(L, P, N, backward), dtype=stat_dtype(x.dtype))


def ssd_scan_fwd(x, dt, A, B, C, D, z, init, reset, out, final, varlen=None, vslot=None):
    """dt (b, l, h), A (h,), B, C (b, l, g, n): accumulator dtype, contiguous; reset (b, l) uint8 or None;
    D (h, p) view (any strides) or None; out, final preallocated (final may be None); varlen
    (num_seqs, h, p, n) written at the steps where vslot (b, l) int64 contiguous is >= 0 (both or neither)."""
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    parts = _ssd_parts(batch, H, L, P, N)
    ws = _ssd_ws(x, L, P, N, False, parts)
    _C.ssd_scan(_view4(x), _view4(D), _view4(z), _view4(init), _view4(out), _view4(final), _NONE4, _NONE4, _NONE4,
                _NONE4, _NONE4, _view4(varlen), _NONE4, ptr(dt), ptr(A), ptr(B), ptr(C), ptr(reset), ptr(vslot),
                0, 0, 0, 0, 0, batch, L, H, P, N, G, ws.data_ptr(), parts)


def ssd_scan_bwd_parts(batch, H, L, P, N, device):
    return _ssd_parts(batch, H, L, P, N)


def ssd_scan_bwd(dout, dfinal, x, dt, A, B, C, D, z, init, reset, dx, dz, dinit, ddt, dA_bh, dD_bh, dB_part,
                 dC_part, dvarlen=None, vslot=None):
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    parts = dB_part.shape[0]
    ws = _ssd_ws(x, L, P, N, True, parts)
    _C.ssd_scan(_view4(x), _view4(D), _view4(z), _view4(init), _NONE4, _NONE4, _view4(dout), _view4(dfinal),
                _view4(dx), _view4(dz), _view4(dinit), _NONE4, _view4(dvarlen), ptr(dt), ptr(A), ptr(B), ptr(C),
                ptr(reset), ptr(vslot), ptr(ddt),
                ptr(dA_bh), ptr(dD_bh), ptr(dB_part), ptr(dC_part), batch, L, H, P, N, G, ws.data_ptr(), parts)
