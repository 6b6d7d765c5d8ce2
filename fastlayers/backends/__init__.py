"""Kernel backends.

Each backend module exposes the same kernel-level functions. The public ops in
``fastlayers.ops`` validate arguments, allocate every output and workspace with
torch, then call one of these. Kernel functions never allocate outputs, never
validate user input, and write every element of every output they are given.

Contract for the fused residual + norm family (``norm_*``)
-----------------------------------------------------------
All 2-D tensors are ``(M, N)`` with the last dimension contiguous (stride 1)
and an arbitrary row stride ``t.stride(0)`` (e.g. a slice of a wider tensor).

``norm_fwd(x, residual, weight, bias, y, h, mean, rstd, eps, is_rms, offset=0.0, round_xhat=False)``
    x         (M, N) input; fp32/fp16/bf16 (fp64 on cpu only)
    residual  (M, N) or None; dtype of x, or fp32
    weight    (N,) contiguous, any floating dtype, or None: no gain (offset unused)
    bias      (N,) contiguous or None (LayerNorm only)
    y         (M, N) output, dtype of x:  y = xhat' * (offset + weight) (+ bias), xhat' = norm(h),
              rounded to x's dtype first when round_xhat and x is fp16/bf16 (Llama's casting)
    h         (M, N) output or None: h = x + residual (or x), in h.dtype
    mean      (M,) stat dtype output (LayerNorm) or None (RMSNorm)
    rstd      (M,) stat dtype output: 1/sqrt(var(h) + eps) (LN) or 1/sqrt(mean(h^2) + eps) (RMS)
    eps       python float, > 0
    is_rms    bool
  The sum h is formed in fp32 (fp64 for fp64 inputs) and normalised unrounded;
  only the stored copy of h is rounded to h.dtype.

``norm_bwd_parts(M, N, device) -> int``
    number P of partial rows the backward writes into dw_part/db_part.

``norm_bwd(dy, x, residual, weight, bias, mean, rstd, dh, dx, dresidual, dw_part, db_part, is_rms, offset=0.0,
round_xhat=False)``
    dy        (M, N) grad of y (dtype of x)
    x, residual, weight, bias, mean, rstd: as saved from the forward (h is recomputed from x + residual)
    dh        (M, N) or None: grad flowing into the h output (prenorm)
    dx        (M, N) output: d loss / d h  (= d loss / d x)
    dresidual (M, N) output or None: the same values in residual's dtype
    dw_part   (P, N) stat dtype output: per-part partial sums of dy * xhat' (every row written, with or
              without a weight); dx uses the gain offset + weight and the unrounded xhat
    db_part   (P, N) stat dtype output or None: partial sums of dy
    stat dtype = float64 for float64 inputs, float32 otherwise.

Contract for the HybridNorm kernels (``head_norm_rope_*``, ``swiglu_*``)
------------------------------------------------------------------------
``head_norm_rope_fwd(x, weight, out, cos, sin, offsets, eps)``
    x         (B, T, H, D) input, any strides with the last dim contiguous (e.g. a
              view into a fused QKV projection output); fp32/fp16/bf16 (fp64 on cpu)
    weight    (D,) contiguous gain, any floating dtype, or None: no norm
    out       (B, T, H, D) output, dtype of x, any strides with the last dim contiguous
    cos, sin  (S, D/2) float32 (float64 for fp64 x) contiguous tables, or both None: no rotation
    offsets   (B,) int64 contiguous: token t of sequence b sits at position offsets[b] + t
              (the caller checks offsets[b] + T <= S); ignored without cos/sin
    eps       python float > 0
  In the accumulation dtype (fp32; fp64 for fp64): n = x * rsqrt(mean(x^2) + eps) * weight,
  then out[..., i] = n_i c_i - n_{i+D/2} s_i and out[..., i+D/2] = n_{i+D/2} c_i + n_i s_i
  for i < D/2 (c, s from row offsets[b] + t); rounded once to out's dtype.

``head_norm_rope_bwd_parts(rows, D, device) -> int``   (rows = B*T*H)
``head_norm_rope_bwd(dout, x, weight, cos, sin, offsets, eps, dx, dw_part)``
    dout      (B, T, H, D) grad of out, any strides with the last dim contiguous
    x, weight, cos, sin, offsets, eps: as in the forward (rstd is recomputed from x)
    dx        (B, T, H, D) output, dtype of x, any strides with the last dim contiguous
    dw_part   (P, D) stat dtype output: per-part partial sums of (rotated-back dout) * x * rstd,
              every row written; None when weight is None

``swiglu_fwd(gate, up, out)``
    gate, up  (M, F), last dim contiguous, any row stride (halves of one fused (M, 2F) tensor)
    out       (M, F) output, dtype of gate: silu(gate) * up computed in fp32, rounded once
``swiglu_bwd(dout, gate, up, dgate, dup)``
    dout      (M, F) grad of out; gate, up as in the forward
    dgate     (M, F) output: dout * up * s * (1 + gate * (1 - s)), s = sigmoid(gate)
    dup       (M, F) output: dout * silu(gate)
              (dgate and dup may be the two halves of one fused (M, 2F) buffer)

Contract for the Mamba decode step (``selective_state_update``)
----------------------------------------------------------------
``selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, out, state_batch_indices, dt_softplus)``
    Head form only (the op adds a head dim of 1 for mamba-1 shapes); every tensor may have any
    strides, including 0 (mamba-2 passes A, dt, D, dt_bias expanded over head_dim).
    state     (S, H, P, N) updated in place; fp32/fp16/bf16 (fp64 on cpu); its dtype sets the
              accumulation (fp64 for fp64, else fp32)
    x, dt, z  (batch, H, P); z may be None
    A         (H, P, N)
    B, C      (batch, G, N); head h uses group h // (H / G)
    D, dt_bias (H, P) or None
    out       (batch, H, P) output, dtype of x
    state_batch_indices (batch,) int64 contiguous or None: row i updates state[indices[i]]
  dt' = softplus(dt + dt_bias) (softplus only with dt_softplus); s = exp(dt' A) s + dt' x B;
  out = sum_n s C + D x; out *= silu(z).

Contract for MLA decoding (``mla_decode*``)
--------------------------------------------
``mla_decode_splits(batch, max_len, device, rows=1) -> (n_splits, split_tokens)``: the KV split the backend
wants for `batch` independent problems of `rows` query rows (called with batch = B x h_kv,
rows = s_q x H / h_kv: one problem per (sequence, KV head)).
``mla_decode(q, kv_cache, block_table, cache_seqlens, head_dim_v, scale, causal, split_tokens, out, lse,
             o_part, lse_part)``
    q          (B, s_q, H, D), any strides with the last dim contiguous; fp32/fp16/bf16 (fp64 on cpu)
    kv_cache   (num_blocks, page_size, h_kv, D), last dim contiguous (the others any strides), dtype of
               q, H a multiple of h_kv: query head h reads KV head h // (H // h_kv); the first head_dim_v
               channels of a row are also its value
    block_table (B, max_blocks) int32, last dim contiguous; cache_seqlens (B,) int32 contiguous
               (the caller checked that every sequence fits its blocks)
    out        (B, s_q, H, head_dim_v) contiguous output, dtype of q
    lse        (B, H, s_q) contiguous output, stat dtype (fp32; fp64 for fp64)
    o_part, lse_part (B, n_splits, s_q, H, head_dim_v) and (B, n_splits, s_q, H) stat-dtype workspaces
               (their rows ordered (KV head, new token, head within its group)):
               split s covers tokens [s * split_tokens, (s + 1) * split_tokens)
  Scores (q . k) * scale in fp32; with ``causal`` query i sees keys <= seqlen - s_q + i. A query that
  sees no key: out 0, lse +inf (FlashMLA's convention; its lse_part is -inf, skipped by the merge).
Contract for the causal depthwise conv1d (``causal_conv1d_*``)
--------------------------------------------------------------
x, out, dout and dx are ``(B, C, L)`` in one of two layouts, chosen by x: time-contiguous
(``x.stride(2) == 1`` or L == 1) or else channel-last (``x.stride(1) == 1`` or C == 1: a
``(B, L, C)`` tensor transposed); any batch stride. The op copies x once when it is in neither
layout and gives out/dout/dx the layout of x. W (width) is 2, 3 or 4; H = W - 1.

``causal_conv1d_fwd(x, weight, bias, initial_states, out, final_states, silu, seq_idx=None)``
    x               (B, C, L) input, L >= 1; fp32/fp16/bf16 (fp64 on cpu only)
    weight          (C, W) contiguous, any floating dtype
    bias            (C,) contiguous or None
    initial_states  (B, C, H), dtype of x, any strides, or None (zeros): x at times -H .. -1
    out             (B, C, L) output, dtype and layout of x:
                    out[b, c, t] = act(bias[c] + sum_k weight[c, k] x[b, c, t - H + k]), act = silu or identity
    final_states    (B, C, H) output (any strides) or None: x at times L - H .. L - 1 (from
                    initial_states, or zero, where negative)
    silu            bool
    seq_idx         (B, L) int32 contiguous, or None (passed by keyword, only when given; then
                    initial_states and final_states are None): the tap at time s counts for the
                    output at t only when seq_idx[b, s] == seq_idx[b, t] (a select, not a product
                    with 0); out is 0 where seq_idx < 0
  Accumulated in fp32 (fp64 for fp64 x), rounded once.

``causal_conv1d_bwd_parts(B, C, L, device) -> int``
    number P of partial rows the backward writes into dw_part/db_part.

``causal_conv1d_bwd(dout, dfinal_states, x, weight, bias, initial_states, silu, dx, dinitial_states, dw_part, db_part, seq_idx=None)``
    dout            (B, C, L) grad of out, layout of x
    dfinal_states   (B, C, H) grad of final_states (any strides) or None
    x, weight, bias, initial_states, silu: as in the forward (the pre-activation is recomputed)
    dx              (B, C, L) output, dtype and layout of x
    dinitial_states (B, C, H) output (any strides) or None
    dw_part         (P, C, W) stat dtype output: partial sums of g * x(shifted) (every row written)
    db_part         (P, C) stat dtype output or None: partial sums of g
  with g = dout * act'(pre); dx and dinitial_states are sum_k weight[c, k] g[t + H - k] plus
  dfinal_states at the positions final_states copied. With seq_idx (keyword; no initial/final states):
  the taps masked as in the forward, g = 0 where seq_idx < 0.

``causal_conv1d_update(x, conv_state, weight, bias, out, silu, cache_seqlens=None, state_indices=None)``
    x           (B, C, T) new inputs, any strides; T >= 0
    conv_state  (B, C, S), S >= H, dtype of x, any strides; updated in place to the last S
                elements of [conv_state, x] along time (read before written)
    weight, bias: as in the forward
    out         (B, C, T) output, contiguous: the conv over [conv_state[..., S - H:], x]
    cache_seqlens (B,) int32 >= 0 contiguous, or None (keyword, only when given): conv_state is a
                circular buffer: history = elements (p - H .. p - 1) mod S with p = cache_seqlens[b] % S,
                x[t] written at (p + t) mod S (the last min(T, S) inputs); nothing shifted
    state_indices (B,) int32 contiguous, or None (keyword): row b uses conv_state[state_indices[b]]
                (conv_state (slots, C, S)); distinct, < slots (checked by the op); negative: out 0,
                no state read or written
Contract for the Mamba-1 scan (``selective_scan_*``)
----------------------------------------------------
``selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, out, last, GB, GC, delta_softplus)``
    u, delta, z (batch, dim, L), any strides; z may be None; fp32/fp16/bf16 (fp64 on cpu)
    A         (dim, N), any strides, any floating dtype
    B, C      (Bb, G, L', N) views of accumulator-dtype tensors with the last dim contiguous: channel d of
              batch b reads step t at [b, d // (dim / G), t]; a time-invariant (dim, N) B is passed as
              a (1, dim, 1, N) view with strides (0, N, 0, 1) and G = dim. GB, GC: their G.
    D, delta_bias (dim,) or None
    out       (batch, dim, L) output, dtype of u
    last      (batch, dim, N) accumulator-dtype output (the state after step L-1)
  Accumulator: float64 for float64 u, else float32. dt = softplus(delta + delta_bias) (softplus only
  with delta_softplus); x_t = exp(dt_t A) x_{t-1} + dt_t u_t B_t (x_{-1} = 0);
  out_t = (<x_t, C_t> + D u_t) * silu(z_t).  Requires L > 0 and batch * dim > 0.

``selective_scan_bwd_parts(batch, dim, L, N, device) -> int``   number P of partial buffers
``selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, du, ddelta, dz, dA_part, dB_part,
                     dC_part, dD_part, dbias_part, GB, GC, delta_softplus)``
    dout      (batch, dim, L) grad of out, any strides; dlast (batch, dim, N) grad of last, or None
    u ... delta_softplus: as in the forward (the states are recomputed)
    du, ddelta, dz  (batch, dim, L) outputs in the dtypes of u, delta, z (dz None without z)
    dA_part   (P, dim, N); dB_part, dC_part (P, *B.shape) / (P, *C.shape) laid out like the contiguous
              tensors B and C are views of; dD_part, dbias_part (P, dim) or None. All accumulator
              dtype, zeroed by the caller, which sums them over P.
  Backends cpu and cuda (the cuda kernel allocates its own fp32 scratch of chunk-end states and uses
  P = 1: it adds into the partials with atomics).

Contract for the Mamba-2 scan (``ssd_scan_*``; backends cpu and triton)
------------------------------------------------------------------------
``ssd_scan_fwd(x, dt, A, B, C, D, z, init, reset, out, final[, chunk_size])`` (chunk_size: triton only)
    x, z      (b, l, h, p), any strides; z may be None; fp32/fp16/bf16 (fp64 on cpu)
    dt        (b, l, h) accumulator dtype, contiguous: already dt_bias-added, softplus-ed and clamped
    A         (h,); B, C (b, l, g, n): accumulator dtype, contiguous (head i reads group i // (h / g))
    D         (h, p) view (any strides, a (h,) D expanded) or None; init (b, h, p, n) or None
    reset     (b, l) uint8 or None: 1 where the state restarts from zero (never at step 0)
    out       (b, l, h, p) output, dtype of x; final (b, h, p, n) accumulator-dtype output (the last state)
  s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T (s_{-1} = init or 0); out_t = (s_t C_t + D x_t) * silu(z_t).
  Requires b * h * p > 0 and l > 0.

``ssd_scan_bwd_parts(b, h, l, p, n, device) -> int`` (cpu)  number P of dB/dC partial buffers
``ssd_scan_bwd(dout, dfinal, x, dt, A, B, C, D, z, init, reset, dx, dz, dinit, ddt, dA_bh, dD_bh, dB_part,
               dC_part)`` (cpu)
    dout (b, l, h, p) any strides; dfinal (b, h, p, n) or None; dx, dz, dinit outputs in the dtypes of
    x, z, init (None when absent); ddt (b, l, h), dA_bh (b, h), dD_bh (b, h, p) accumulator-dtype outputs,
    written complete; dB_part, dC_part (P, b, l, g, n) zeroed by the caller, which sums them over P.
``ssd_scan_bwd(dout, dfinal, x, dt, A, B, C, D, z, init, reset, chunk_size)`` (triton) returns
    [dx, ddt, dA, dB, dC, dD, dz, dinit] (None for absent inputs): Triton kernels (a recompute of the
    chunk states, the state-gradient recurrence, then every gradient chunk-parallel); ``triton_ssd.SSD_BWD = "torch"`` selects the fallback,
    autograd through a chunked pure-PyTorch form.
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
