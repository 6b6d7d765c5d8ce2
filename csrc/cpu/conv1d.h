#pragma once
#include "fastlayers/common.h"

namespace fastlayers {

// Depthwise causal conv1d (Mamba's short convolution) over (B, C, L) tensors:
//   out[b, c, t] = act(bias[c] + sum_{k < W} w[c, k] * x[b, c, t - (W - 1) + k]),
// x at negative times read from init (B, C, W - 1) (zeros when init is null).
// Strides in elements for (b, c, t). x, out, dout and dx share one layout:
// time-contiguous (stride of t is 1, or L == 1) or channel-last (stride of c is 1),
// flagged by channel_last. init/final/dinit/dfinal: any strides. weight (C, W)
// contiguous; bias (C,) contiguous. Null pointers mean "absent".
struct Conv1dArgs {
  const void* x; int64_t x_sb, x_sc, x_st; int x_dt;
  const void* w; int w_dt;
  const void* bias; int b_dt;
  const void* init; int64_t i_sb, i_sc, i_st; int i_dt;
  // forward outputs
  void* out; int64_t o_sb, o_sc, o_st; int o_dt;
  void* final; int64_t f_sb, f_sc, f_st; int f_dt;    // (B, C, W - 1): the last W - 1 inputs
  // backward (dout != null): inputs dout (like x) and dfinal; outputs dx, dinit and the
  // weight/bias gradients dw (C, W) and db (C,) in the accumulation dtype.
  const void* dout; int64_t d_sb, d_sc, d_st; int d_dt;
  const void* dfinal; int64_t df_sb, df_sc, df_st; int df_dt;
  void* dx; int64_t dx_sb, dx_sc, dx_st; int dx_dt;
  void* dinit; int64_t di_sb, di_sc, di_st; int di_dt;
  void* dw; void* db;
  int64_t B, C, L, W;
  bool silu, channel_last;
  // Packed sequences (null: one sequence per row): seq (B, L) int32, contiguous. The tap at time s counts for
  // the output at t only when seq[b, s] == seq[b, t]; outputs at seq < 0 are 0. No init/final with it.
  const int32_t* seq;
};

// Decode step: x (B, C, L) new inputs (any strides), state (B, C, S) with S >= W - 1 (any
// strides, same dtype as x) updated in place: state <- last S of [state, x]; out (B, C, L).
struct Conv1dUpdateArgs {
  const void* x; int64_t x_sb, x_sc, x_st; int x_dt;
  void* state; int64_t s_sb, s_sc, s_st; int s_dt;
  const void* w; int w_dt;
  const void* bias; int b_dt;
  void* out; int64_t o_sb, o_sc, o_st; int o_dt;
  int64_t B, C, L, S, W;
  bool silu;
  // cache_seqlens (B,) int32 (null: shift mode): state is a circular buffer, history before position
  // cache_seqlens[b] % S, x written from there. idx (B,) int32 (null: row b is state b): row b uses state
  // idx[b]; idx[b] < 0: out 0, state untouched.
  const int32_t* cache_seqlens;
  const int32_t* idx;
};

namespace cpu {
// Accumulators (float, or double for float64 x) of workspace each part needs.
int64_t conv1d_workspace_per_part(int64_t W);
void causal_conv1d_fwd(const Conv1dArgs& a, void* workspace, int parts);
// dw/db are written whole (each part owns a range of channels).
void causal_conv1d_bwd(const Conv1dArgs& a, void* workspace, int parts);
void causal_conv1d_update(const Conv1dUpdateArgs& a, int parts);
}  // namespace cpu
}  // namespace fastlayers
