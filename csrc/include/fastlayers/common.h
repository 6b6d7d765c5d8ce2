// Shared by the CPU and CUDA modules: dtype codes and small helpers.
// The extensions never include torch headers: Python passes raw pointers,
// sizes, strides and these dtype codes (see fastlayers/_dtypes.py).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastlayers {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

inline const char* dtype_name(int dt) {
  switch (dt) {
    case kF32: return "float32";
    case kF16: return "float16";
    case kBF16: return "bfloat16";
    case kF64: return "float64";
    default: return "unknown";
  }
}

inline void check_dtype(int dt, const char* what, bool allow_f64) {
  if (dt == kF32 || dt == kF16 || dt == kBF16 || (allow_f64 && dt == kF64)) return;
  throw std::invalid_argument(std::string("fastlayers: unsupported dtype code ") + std::to_string(dt) +
                              " for " + what);
}

// Arguments of the fused residual-add + RMSNorm/LayerNorm forward.
// Rows are `stride` elements apart; the last dimension is contiguous.
// Null pointers (0) mean "absent".
//
// The gain is (offset + w) with a weight, 1 without (w null: no affine, offset unused):
//   y = xhat' * gain (+ b),  xhat' = xhat, or xhat rounded to xhat_dt first when xhat_dt is
// kF16/kBF16 (Llama's casting: the normalised row is cast to the input dtype before the
// weight multiply). Everything else is in the accumulation dtype, rounded once on store.
struct NormFwdArgs {
  const void* x; int64_t x_stride; int x_dt;
  const void* r; int64_t r_stride; int r_dt;     // residual, optional
  const void* w; int w_dt;                        // weight (N,), optional
  const void* b; int b_dt;                        // bias (N,), optional (LayerNorm only)
  void* y; int64_t y_stride; int y_dt;            // normalised output
  void* h; int64_t h_stride; int h_dt;            // pre-norm sum x + r, optional
  void* mean;                                     // (M,) stat dtype, LayerNorm only
  void* rstd;                                     // (M,) stat dtype
  int64_t M, N;
  double eps;
  bool is_rms;
  double offset = 0.0;                            // added to the weight
  int xhat_dt = -1;                               // kF16/kBF16: round xhat to it before the gain
};

// Backward. dx/dr receive d(loss)/dh (the same values); dw_part/db_part are
// (P, N) partial sums, one row per part, reduced by the caller. offset, xhat_dt and a
// null w as in the forward: dx uses the gain (offset + w) and the unrounded xhat (the
// rounding is an identity cast for autograd), dw_part sums dy * xhat' (the rounded xhat
// when xhat_dt is set); dw_part is written (and required) with or without a weight.
struct NormBwdArgs {
  const void* dy; int64_t dy_stride; int dy_dt;
  const void* x; int64_t x_stride; int x_dt;
  const void* r; int64_t r_stride; int r_dt;
  const void* w; int w_dt;
  const void* b; int b_dt;                        // only tells whether db is wanted
  const void* mean; const void* rstd;
  const void* dh; int64_t dh_stride; int dh_dt;   // incoming grad of h (prenorm), optional
  void* dx; int64_t dx_stride; int dx_dt;
  void* dr; int64_t dr_stride; int dr_dt;         // optional
  void* dw_part; void* db_part;                   // (P, N) stat dtype; db_part optional
  int64_t M, N;
  bool is_rms;
  double offset = 0.0;
  int xhat_dt = -1;
};


// Per-head RMSNorm + RoPE over (B, T, H, D) tensors with arbitrary strides on the
// first three dims (sb, st, sh, in elements) and a contiguous last dim.
// w == null: no norm; cos == null: no rotation. cos/sin are (S, D/2) tables in the
// accumulation dtype with row stride cs_stride; offsets (B,) int64.
struct HeadNormRopeArgs {
  const void* x; int64_t x_sb, x_st, x_sh; int x_dt;
  const void* w; int w_dt;
  void* out; int64_t o_sb, o_st, o_sh; int o_dt;
  const void* cos; const void* sin; int64_t cs_stride;
  const int64_t* offsets;
  int64_t B, T, H, D;
  double eps;
};

// Backward: dx from dout (strided like x); dw_part (P, D) accumulation dtype, optional.
struct HeadNormRopeBwdArgs {
  const void* dout; int64_t d_sb, d_st, d_sh; int d_dt;
  const void* x; int64_t x_sb, x_st, x_sh; int x_dt;
  const void* w; int w_dt;
  const void* cos; const void* sin; int64_t cs_stride;
  const int64_t* offsets;
  void* dx; int64_t dx_sb, dx_st, dx_sh; int dx_dt;
  void* dw_part;
  int64_t B, T, H, D;
  double eps;
};

// SwiGLU over (M, F) rows with row strides: out = silu(gate) * up.
// Backward (dout != null): dgate, dup.
struct SwigluArgs {
  const void* gate; int64_t g_stride; int g_dt;
  const void* up; int64_t u_stride; int u_dt;
  const void* dout; int64_t d_stride; int d_dt;   // backward only
  void* out; int64_t o_stride; int o_dt;          // forward: out; backward: dgate
  void* dup; int64_t du_stride; int du_dt;        // backward only
  int64_t M, F;
};

// A strided view of up to 4 dims (strides in elements; a stride may be 0 for a broadcast).
struct View4 {
  void* p; int dt; int64_t s[4];
};

// One decode step of the Mamba scan over (batch, H, P) rows of N states:
//   s = exp(dt A) s + dt x B;  out = <s, C> + D x;  out *= silu(z)
// state (S, H, P, N) updated in place at row idx[i] (idx null: i); x, dt, z, out (batch, H, P);
// A (H, P, N); B, C (batch, G, N) with head h using group h / (H / G); D, dt_bias (H, P).
struct StateUpdateArgs {
  View4 state, x, dt, A, B, C, D, z, dt_bias, out;  // D, z, dt_bias: p == null when absent
  const int64_t* idx;
  int64_t batch, H, P, N, G;
  bool softplus;
};

// MLA decoding over a paged latent cache (FlashMLA layout), split-KV.
// q (B, s_q, H, D) strided (last dim contiguous); kv rows (num_blocks, page, h_kv, D): row r of KV
// head g of block blk at kv + blk * kv_sblock + r * kv_srow + g * kv_shead; H is a multiple of h_kv
// and query head h reads KV head h / (H / h_kv) (contiguous groups; h_kv = 1: MLA's single latent
// head). block_table (B, *) int32 with row stride bt_stride; seqlens (B,) int32. Each (sequence,
// KV head) is one problem of R = s_q * (H / h_kv) query rows, row i = qi * (H / h_kv) + (h % (H / h_kv)).
// Phase 1 writes per-split partials o_part (B, S, h_kv, R, dv) (normalised) and lse_part
// (B, S, h_kv, R) (accumulation dtype); phase 2 merges them into out (B, s_q, H, dv)
// contiguous in out_dt and lse (B, H, s_q) in the accumulation dtype. A query row that sees no key
// (a length-0 sequence) gets out 0 and lse +inf, FlashMLA's convention (its partials: lse_part
// -inf, the neutral element of the merge). Each length is clamped to
// max_tokens (the block table's width x page: no entry past the table is read) when max_tokens > 0.
struct MlaDecodeArgs {
  const void* q; int64_t q_sb, q_ss, q_sh; int q_dt;
  const void* kv; int64_t kv_sblock, kv_srow; int kv_dt;
  const int32_t* block_table; int64_t bt_stride;
  const int32_t* seqlens;
  void* o_part; void* lse_part;
  void* out; int out_dt;
  void* lse;
  int64_t B, s_q, H, D, dv, page, n_splits, split_tokens;
  double scale;
  bool causal;
  int64_t max_tokens;
  int64_t h_kv = 1, kv_shead = 0;  // KV heads of the cache and their stride (elements)
};

// Mamba-1 selective scan over (batch, dim) channels of L steps and N states (mamba_ssm's
// selective_scan_fn): dt = softplus(delta + delta_bias) (each part optional);
//   x_t = exp(dt_t A) x_{t-1} + dt_t u_t B_t;  y_t = <x_t, C_t> + D u_t;  out = y * silu(z).
// u, delta, z, out, dout, du, ddelta, dz: (batch, dim, L) views, any strides (s[0], s[1], s[2]).
// A (dim, N) any strides; D, delta_bias (dim,) (s[0]); last, dlast (batch, dim, N) (s[0], s[1], s[2]).
// B, C: accumulator-dtype copies with N contiguous, channel d of batch b at step t reading
//   B.p + b*s[0] + (d / (dim / GB))*s[1] + t*s[2]  (time-invariant B: s[0] = s[2] = 0, GB = dim).
// Backward: dX_part are per-part partial sums in the accumulator dtype, zeroed by the caller:
//   dB_part/dC_part: parts copies laid out like B/C, `dB_part_stride` elements apart;
//   dA_part (parts, dim, N), dD_part (parts, dim), dbias_part (parts, dim) contiguous.
struct SelectiveScanArgs {
  View4 u, delta, A, B, C, D, z, delta_bias, out, last;  // D, z, delta_bias, last: p == null when absent
  View4 dout, dlast, du, ddelta, dz;                      // backward only (dlast, dz optional)
  void *dA_part, *dB_part, *dC_part, *dD_part, *dbias_part;
  int64_t dB_part_stride, dC_part_stride;
  int64_t batch, dim, L, N, GB, GC;
  bool softplus;
};

}  // namespace fastlayers
