// Fused residual-add + RMSNorm / LayerNorm on CUDA: the kernels and their launch
// configuration (device code only; the CUDA runtime calls live in norm.cu).
//
// Semantics are those of NormFwdArgs / NormBwdArgs (fastlayers/common.h) and of the
// CPU kernel (csrc/cpu/norm.cpp): h = x + r formed in fp32 and normalised unrounded,
// statistics and accumulation in fp32, every tensor with its own dtype
// (fp32 / fp16 / bf16), rows `stride` elements apart, last dimension contiguous. The gain
// is offset + w (1 without a weight); with xhat_dt set, xhat is rounded to that 16-bit
// dtype before the gain multiplies it, and dw sums dy times that rounded xhat.
//
// One kernel family, dtypes decided at run time. A row is cut into groups of 8
// elements; a group is loaded as raw bits (one 16-byte load for a 2-byte dtype, two
// for fp32, or 8 scalar loads at a misaligned row or at the ragged end of a row) and
// converted to fp32 afterwards, so the loads of all tensors of a row are in flight
// together and the dtype branches (uniform across a warp) cost a few instructions
// per 8 elements. Templates fix only the shape: threads per row (TPR) and groups per
// thread (G).
//
//   norm_fwd_reg<TPR, G, Ext>
//                          N <= 8192 (8 * TPR * G, G <= 2): the row stays in registers;
//                          R = rows per block (several rows per block for small N).
//                          Ext: the gain options (offset, no weight, xhat rounding) compiled
//                          in; without them the plain weight multiply of the common case
//                          (the options cost the 80-register 256-thread instantiation spills).
//   norm_fwd_loop          any N: statistics pass (Chan/Welford merge for the mean and
//                          variance), then the h/y pass; reads x (and r) twice.
//   norm_bwd_reg<TPR, G, DB, Narrow>
//                          N <= 8192 (x, r, dy 2-byte: "Narrow", G = 2) or N <= 4096
//                          (an fp32 row input, G = 1): each of the P blocks walks a
//                          contiguous range of rows, keeps dw/db column sums in registers
//                          (weight in shared memory) and writes its row of
//                          dw_part/db_part at the end. <= 128 registers, no spills.
//   norm_bwd_loop          any N: per batch of rows (sized at launch so that pass B's
//                          re-read of the batch hits L2; <= 512 rows), pass A computes
//                          the row sums c1 = mean(g*xhat), c2 = mean(g) into shared
//                          memory; pass B walks column tiles, writes dx/dr and
//                          accumulates dw/db in registers, adding them to the block's
//                          dw_part row per tile.
//
// The thread that writes an output element has read every input element at that
// (row, column) before, and no other thread reads them: an output may alias an input
// of the same shape and strides (in place), e.g. h over r or dx over dy.
//
// This header also compiles as plain C++ on top of csrc/cuda/emu/cuda_emu.h, which
// runs the same kernels on CPU threads for testing on machines without a GPU.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastlayers/common.h"

#include "kernel_common.cuh"

namespace fastlayers {
namespace cuda_kernels {

constexpr int kVec = 8;  // elements per group

// ---------------------------------------------------------------------------------
// Loads and stores of one group of 8 elements.

// The raw bits of one group: 8 fp32 words, or 8 16-bit values packed in w[0..3].
struct Raw8 {
  uint32_t w[8];
};

// Load the group starting at column `col` of `row` (a row pointer). `vec`: the row
// pointer is 16-byte aligned. Elements at or past N read as zero bits.
// Narrow: dt is known to be a 2-byte dtype (fewer registers: no fp32 path).
template <bool Narrow = false>
FL_DEV void load_raw(Raw8& r, const void* row, int dt, bool vec, int col, int N) {
  if (vec && col + kVec <= N) {
    if (!Narrow && dt == kF32) {
      const uint4* p = reinterpret_cast<const uint4*>(static_cast<const float*>(row) + col);
      const uint4 a = p[0], b = p[1];
      r.w[0] = a.x; r.w[1] = a.y; r.w[2] = a.z; r.w[3] = a.w;
      r.w[4] = b.x; r.w[5] = b.y; r.w[6] = b.z; r.w[7] = b.w;
    } else {
      const uint4 a = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(row) + col);
      r.w[0] = a.x; r.w[1] = a.y; r.w[2] = a.z; r.w[3] = a.w;
      r.w[4] = r.w[5] = r.w[6] = r.w[7] = 0u;
    }
  } else if (!Narrow && dt == kF32) {
    const uint32_t* p = static_cast<const uint32_t*>(row) + col;
#pragma unroll
    for (int k = 0; k < kVec; ++k) r.w[k] = col + k < N ? p[k] : 0u;
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(row) + col;
#pragma unroll
    for (int k = 0; k < kVec / 2; ++k) {
      const uint32_t lo = col + 2 * k < N ? uint32_t(p[2 * k]) : 0u;
      const uint32_t hi = col + 2 * k + 1 < N ? uint32_t(p[2 * k + 1]) : 0u;
      r.w[k] = lo | (hi << 16);
    }
    r.w[4] = r.w[5] = r.w[6] = r.w[7] = 0u;
  }
}

FL_DEV void zero_raw(Raw8& r) {
#pragma unroll
  for (int k = 0; k < kVec; ++k) r.w[k] = 0u;
}

// xhat as the gain multiplies it: rounded to a 16-bit dtype first when xhat_dt is one
// (Llama's casting), else unchanged. One value, and (one uniform branch) a group of 8.
FL_DEV float round_xhat1(float v, int xhat_dt) {
  if (xhat_dt == kBF16) return bf16_bits_to_f32(f32_to_bf16_bits(v));
  if (xhat_dt == kF16) return f16_bits_to_f32(f32_to_f16_bits(v));
  return v;
}

FL_DEV void round_xhat(float (&v)[kVec], int xhat_dt) {
  if (xhat_dt == kBF16) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = bf16_bits_to_f32(f32_to_bf16_bits(v[k]));
  } else if (xhat_dt == kF16) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = f16_bits_to_f32(f32_to_f16_bits(v[k]));
  }
}

// out[k] (=, or += when Add) the fp32 value of element k.
template <bool Add, bool Narrow = false>
FL_DEV void raw_to_f32(const Raw8& r, int dt, float* out) {
  if (!Narrow && dt == kF32) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const float v = __uint_as_float(r.w[k]);
      out[k] = Add ? out[k] + v : v;
    }
  } else if (dt == kBF16) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const uint32_t u = r.w[k >> 1];
      const float v = bf16_bits_to_f32((k & 1) ? (u >> 16) : (u & 0xffffu));
      out[k] = Add ? out[k] + v : v;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const uint32_t u = r.w[k >> 1];
      const float v = f16_bits_to_f32((k & 1) ? (u >> 16) : (u & 0xffffu));
      out[k] = Add ? out[k] + v : v;
    }
  }
}

// The gain of a group: offset + w (w: raw bits of the weight), or 1 without a weight.
FL_DEV void gain_f32(const Raw8& r, const void* w, int w_dt, double offset, float* out) {
  if (w) {
    raw_to_f32<false>(r, w_dt, out);
    const float o = float(offset);
    if (o != 0.f) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) out[k] += o;
    }
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = 1.f;
  }
}

// Store the group at column `col` of `row`, rounded to dt; elements past N untouched.
FL_DEV void store_f32(void* row, int dt, bool vec, int64_t col, int64_t N, const float* in) {
  if (dt == kF32) {
    float* p = static_cast<float*>(row) + col;
    if (vec && col + kVec <= N) {
      uint4* q = reinterpret_cast<uint4*>(p);
      q[0] = make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]),
                        __float_as_uint(in[3]));
      q[1] = make_uint4(__float_as_uint(in[4]), __float_as_uint(in[5]), __float_as_uint(in[6]),
                        __float_as_uint(in[7]));
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        if (col + k < N) p[k] = in[k];
    }
  } else {
    uint32_t s[kVec];
    if (dt == kBF16) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) s[k] = f32_to_bf16_bits(in[k]);
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) s[k] = f32_to_f16_bits(in[k]);
    }
    uint16_t* p = static_cast<uint16_t*>(row) + col;
    if (vec && col + kVec <= N) {
      *reinterpret_cast<uint4*>(p) =
          make_uint4(s[0] | (s[1] << 16), s[2] | (s[3] << 16), s[4] | (s[5] << 16), s[6] | (s[7] << 16));
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        if (col + k < N) p[k] = static_cast<uint16_t>(s[k]);
    }
  }
}

// ---------------------------------------------------------------------------------
// Reductions over the TPR threads of a row. blockDim = (TPR, R): a warp never spans
// two rows. Every thread of the block must call these (they may synchronise the
// block), and every thread of a row gets the same, bit-identical value.

template <int TPR>
FL_DEV float row_sum(float v, float* red /* __shared__ [32] */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if constexpr (TPR > 32) {
    constexpr int WPR = TPR > 32 ? TPR / 32 : 1;  // warps per row
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) red[threadIdx.y * WPR + warp] = v;
    __syncthreads();
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < WPR; ++i) t += red[threadIdx.y * WPR + i];
    __syncthreads();  // red may be reused at once
    v = t;
  }
  return v;
}

// Two sums at once (one pass of shuffles and one barrier pair): per component the
// same operations in the same order as row_sum, so the same bit-identical values.
template <int TPR>
FL_DEV void row_sum2(float& a, float& b, float* red /* __shared__ [64] */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  if constexpr (TPR > 32) {
    constexpr int WPR = TPR > 32 ? TPR / 32 : 1;  // warps per row
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) {
      red[threadIdx.y * WPR + warp] = a;
      red[32 + threadIdx.y * WPR + warp] = b;
    }
    __syncthreads();
    float ta = 0.f, tb = 0.f;
#pragma unroll
    for (int i = 0; i < WPR; ++i) {
      ta += red[threadIdx.y * WPR + i];
      tb += red[32 + threadIdx.y * WPR + i];
    }
    __syncthreads();  // red may be reused at once
    a = ta;
    b = tb;
  }
}

// Running mean/variance of a set of values (Chan et al.'s parallel merge).
struct Stats {
  float n, mean, m2;  // count, mean, sum of squared deviations from the mean
};

FL_DEV Stats merge(Stats a, Stats b) {
  if (b.n == 0.f) return a;
  if (a.n == 0.f) return b;
  const float n = a.n + b.n, d = b.mean - a.mean, fb = b.n / n;
  return Stats{n, a.mean + d * fb, a.m2 + b.m2 + d * d * a.n * fb};
}

// Merge the Stats of all TPR threads of a row (R == 1: one row per block).
// Fixed merge order, result broadcast, so every thread sees the same value.
template <int TPR>
FL_DEV Stats row_stats(Stats s, float* red /* __shared__ [3 * 32] */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Stats t{__shfl_down_sync(0xffffffffu, s.n, o), __shfl_down_sync(0xffffffffu, s.mean, o),
            __shfl_down_sync(0xffffffffu, s.m2, o)};
    s = merge(s, t);  // lanes >= 32 - o merge garbage, but only lane 0 is kept
  }
  constexpr int W = TPR / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    red[warp] = s.n;
    red[32 + warp] = s.mean;
    red[64 + warp] = s.m2;
  }
  __syncthreads();
  Stats t{red[0], red[32], red[64]};
#pragma unroll
  for (int i = 1; i < W; ++i) t = merge(t, Stats{red[i], red[32 + i], red[64 + i]});
  __syncthreads();
  return t;
}

// ---------------------------------------------------------------------------------
// Forward.

constexpr int fwd_rows_per_block(int tpr) { return tpr >= 128 ? 1 : 128 / tpr; }

// Blocks per SM asked of the compiler: 3 for the 256-thread instantiation (<= 80
// registers, no spills), else 1 (no register cap: 106 registers, 4 blocks of 128
// threads or 1 of 512 per SM). With the gain options (Ext) the 256-thread kernel
// would spill at 80 registers: 2 blocks (<= 128 registers).
constexpr int fwd_min_blocks(int threads, bool ext = false) { return threads == 256 ? (ext ? 2 : 3) : 1; }
// Weight and bias are loaded with the row, before the reductions, so their latency
// overlaps that of x and r; except in the 256-thread instantiation, which would then
// spill at 80 registers: there they are loaded after the reductions (3 blocks per SM
// hide that latency instead).
constexpr bool fwd_early_wb(int threads) { return fwd_min_blocks(threads) == 1; }

// Whether a forward needs the Ext kernels: a gain other than the weight itself, or xhat rounding.
inline bool fwd_ext(const NormFwdArgs& a) {
  return !a.w || a.offset != 0.0 || a.xhat_dt == kBF16 || a.xhat_dt == kF16;
}

// Row held in registers: thread tx of a row owns groups g*TPR + tx (g < G).
template <int TPR, int G, bool Ext>
FL_GLOBAL void FL_LAUNCH_BOUNDS(TPR * fwd_rows_per_block(TPR), fwd_min_blocks(TPR * fwd_rows_per_block(TPR), Ext))
    norm_fwd_reg(NormFwdArgs a) {
  constexpr int R = fwd_rows_per_block(TPR);
  constexpr bool kEarlyWB = fwd_early_wb(TPR * R);
  __shared__ float red[32];
  const int tx = threadIdx.x;
  const int N = int(a.N);
  const float inv_n = 1.f / float(N), eps = float(a.eps);
  const bool rms = a.is_rms;
  const bool wv = aligned16(a.w), bv = a.b != nullptr && aligned16(a.b);

  for (int64_t base = int64_t(blockIdx.x) * R; base < a.M; base += int64_t(gridDim.x) * R) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < a.M;
    float h[G][kVec];
    Raw8 rw[G], rb[G];  // weight and bias (raw bits; L1/L2 hits)
    auto load_wb = [&] {
      if (!Ext || a.w) {
#pragma unroll
        for (int g = 0; g < G; ++g) load_raw(rw[g], a.w, a.w_dt, wv, (g * TPR + tx) * kVec, N);
      }
      if (a.b) {
#pragma unroll
        for (int g = 0; g < G; ++g) load_raw(rb[g], a.b, a.b_dt, bv, (g * TPR + tx) * kVec, N);
      }
    };
    if (valid) {
      // Issue every load of the row before converting any of them.
      Raw8 rx[G], rr[G];
      const void* xrow = row_ptr(a.x, a.x_dt, row, a.x_stride);
      const bool xv = aligned16(xrow);
#pragma unroll
      for (int g = 0; g < G; ++g) load_raw(rx[g], xrow, a.x_dt, xv, (g * TPR + tx) * kVec, N);
      if (a.r) {
        const void* rrow = row_ptr(a.r, a.r_dt, row, a.r_stride);
        const bool rv = aligned16(rrow);
#pragma unroll
        for (int g = 0; g < G; ++g) load_raw(rr[g], rrow, a.r_dt, rv, (g * TPR + tx) * kVec, N);
      }
      if constexpr (kEarlyWB) load_wb();
#pragma unroll
      for (int g = 0; g < G; ++g) {
        raw_to_f32<false>(rx[g], a.x_dt, h[g]);
        if (a.r) raw_to_f32<true>(rr[g], a.r_dt, h[g]);
      }
      if (a.h) {
        void* hrow = row_ptr(a.h, a.h_dt, row, a.h_stride);
        const bool hv = aligned16(hrow);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const int col = (g * TPR + tx) * kVec;
          if (col < N) store_f32(hrow, a.h_dt, hv, col, N, h[g]);
        }
      }
    } else {
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int k = 0; k < kVec; ++k) h[g][k] = 0.f;
    }

    // Elements past N are zero in h; they are masked out of the variance.
    float mu = 0.f;
    if (!rms) {
      float s = 0.f;
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int k = 0; k < kVec; ++k) s += h[g][k];
      mu = row_sum<TPR>(s, red) * inv_n;
    }
    float ss = 0.f;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int col = (g * TPR + tx) * kVec;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float d = col + k < N ? h[g][k] - mu : 0.f;
        ss += d * d;
      }
    }
    const float rstd = 1.f / sqrtf(row_sum<TPR>(ss, red) * inv_n + eps);

    if (valid) {
      if (tx == 0) {
        if (!rms) static_cast<float*>(a.mean)[row] = mu;
        static_cast<float*>(a.rstd)[row] = rstd;
      }
      if constexpr (!kEarlyWB) load_wb();
      void* yrow = row_ptr(a.y, a.y_dt, row, a.y_stride);
      const bool yv = aligned16(yrow);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const int col = (g * TPR + tx) * kVec;
        if (col >= N) continue;
        float w[kVec], out[kVec];
        if constexpr (Ext) {
#pragma unroll
          for (int k = 0; k < kVec; ++k) out[k] = (h[g][k] - mu) * rstd;
          round_xhat(out, a.xhat_dt);
          gain_f32(rw[g], a.w, a.w_dt, a.offset, w);
#pragma unroll
          for (int k = 0; k < kVec; ++k) out[k] *= w[k];
        } else {
          raw_to_f32<false>(rw[g], a.w_dt, w);
#pragma unroll
          for (int k = 0; k < kVec; ++k) out[k] = (h[g][k] - mu) * rstd * w[k];
        }
        if (a.b) {
          float b[kVec];
          raw_to_f32<false>(rb[g], a.b_dt, b);
#pragma unroll
          for (int k = 0; k < kVec; ++k) out[k] += b[k];
        }
        store_f32(yrow, a.y_dt, yv, col, N, out);
      }
    }
  }
}

constexpr int kFwdLoopTPR = 256, kFwdLoopU = 2;  // threads per row, groups per thread per tile

// Any N, one row per block. Tile t covers columns [t*T, (t+1)*T), T = 8*TPR*U.
FL_GLOBAL void FL_LAUNCH_BOUNDS(kFwdLoopTPR, 1) norm_fwd_loop(NormFwdArgs a) {
  constexpr int TPR = kFwdLoopTPR, U = kFwdLoopU;
  constexpr int T = kVec * TPR * U;
  __shared__ float red[3 * 32];
  const int tx = threadIdx.x;
  const int N = int(a.N);
  const float inv_n = 1.f / float(N), eps = float(a.eps);
  const bool rms = a.is_rms;
  const bool wv = aligned16(a.w), bv = a.b != nullptr && aligned16(a.b);

  for (int64_t row = blockIdx.x; row < a.M; row += gridDim.x) {
    const void* xrow = row_ptr(a.x, a.x_dt, row, a.x_stride);
    const void* rrow = a.r ? row_ptr(a.r, a.r_dt, row, a.r_stride) : nullptr;
    void* hrow = a.h ? row_ptr(a.h, a.h_dt, row, a.h_stride) : nullptr;
    void* yrow = row_ptr(a.y, a.y_dt, row, a.y_stride);
    const bool xv = aligned16(xrow), rv = rrow && aligned16(rrow), hv = hrow && aligned16(hrow),
               yv = aligned16(yrow);

    // h of the tile's groups of this thread (zero past N).
    auto load_h = [&](int t0, float (&h)[U][kVec]) {
      Raw8 rx[U], rr[U];
#pragma unroll
      for (int u = 0; u < U; ++u) load_raw(rx[u], xrow, a.x_dt, xv, t0 + (u * TPR + tx) * kVec, N);
      if (rrow) {
#pragma unroll
        for (int u = 0; u < U; ++u) load_raw(rr[u], rrow, a.r_dt, rv, t0 + (u * TPR + tx) * kVec, N);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        raw_to_f32<false>(rx[u], a.x_dt, h[u]);
        if (rrow) raw_to_f32<true>(rr[u], a.r_dt, h[u]);
      }
    };

    // Pass 1: statistics. Read-only, so h (or y) may alias x or r: pass 2 reads each
    // element before it writes it, in the same thread.
    float ss = 0.f;
    Stats st{0.f, 0.f, 0.f};
    for (int t0 = 0; t0 < N; t0 += T) {
      float h[U][kVec];
      load_h(t0, h);
      if (rms) {
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int k = 0; k < kVec; ++k) ss += h[u][k] * h[u][k];
      } else {
        // Exact two-pass statistics of this thread's part of the tile, merged into st.
        const int c0 = t0 + tx * kVec;
        float n = 0.f, s = 0.f;
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int k = 0; k < kVec; ++k) {
            const bool in = c0 + u * TPR * kVec + k < N;
            n += in ? 1.f : 0.f;
            s += h[u][k];
          }
        if (n > 0.f) {
          const float m = s / n;
          float m2 = 0.f;
#pragma unroll
          for (int u = 0; u < U; ++u)
#pragma unroll
            for (int k = 0; k < kVec; ++k) {
              const float d = c0 + u * TPR * kVec + k < N ? h[u][k] - m : 0.f;
              m2 += d * d;
            }
          st = merge(st, Stats{n, m, m2});
        }
      }
    }
    float mu = 0.f, var;
    if (rms) {
      var = row_sum<TPR>(ss, red) * inv_n;
    } else {
      const Stats t = row_stats<TPR>(st, red);
      mu = t.mean;
      var = t.m2 * inv_n;
    }
    const float rstd = 1.f / sqrtf(var + eps);
    if (tx == 0) {
      if (!rms) static_cast<float*>(a.mean)[row] = mu;
      static_cast<float*>(a.rstd)[row] = rstd;
    }

    // Pass 2: h and y.
    for (int t0 = 0; t0 < N; t0 += T) {
      Raw8 rw[U], rb[U];
      if (a.w) {
#pragma unroll
        for (int u = 0; u < U; ++u) load_raw(rw[u], a.w, a.w_dt, wv, t0 + (u * TPR + tx) * kVec, N);
      }
      if (a.b) {
#pragma unroll
        for (int u = 0; u < U; ++u) load_raw(rb[u], a.b, a.b_dt, bv, t0 + (u * TPR + tx) * kVec, N);
      }
      float h[U][kVec];
      load_h(t0, h);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int col = t0 + (u * TPR + tx) * kVec;
        if (col >= N) continue;
        if (hrow) store_f32(hrow, a.h_dt, hv, col, N, h[u]);
        float w[kVec], out[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) out[k] = (h[u][k] - mu) * rstd;
        round_xhat(out, a.xhat_dt);
        gain_f32(rw[u], a.w, a.w_dt, a.offset, w);
#pragma unroll
        for (int k = 0; k < kVec; ++k) out[k] *= w[k];
        if (a.b) {
          float b[kVec];
          raw_to_f32<false>(rb[u], a.b_dt, b);
#pragma unroll
          for (int k = 0; k < kVec; ++k) out[k] += b[k];
        }
        store_f32(yrow, a.y_dt, yv, col, N, out);
      }
    }
  }
}

// ---------------------------------------------------------------------------------
// Backward.

// Rows [r0, r1) of part p when M rows are split into `parts` contiguous ranges.
FL_DEV void split_rows(int64_t M, int64_t parts, int64_t p, int64_t* r0, int64_t* r1) {
  const int64_t base = M / parts, rem = M % parts;
  *r0 = p * base + (p < rem ? p : rem);
  *r1 = *r0 + base + (p < rem ? 1 : 0);
}

constexpr int bwd_rows_per_block(int tpr) { return tpr >= 256 ? 1 : 256 / tpr; }
// Backward blocks resident per SM we ask the compiler for: 512 threads, <= 128 registers.
constexpr int kBwdThreadsPerSM = 512;
constexpr int bwd_min_blocks(int threads) { return threads >= kBwdThreadsPerSM ? 1 : kBwdThreadsPerSM / threads; }

// Per-row backward of one row held in registers (the part shared by both kernels):
// loads x, r, dy of groups at columns col0 + (u*TPR + tx)*8, given w(u, k) (fp32),
// returns xhat and g = dy*w (zero past N) and the thread's sums of g*xhat and g,
// and accumulates dw += dy*xhat, db += dy.
template <int TPR, int U>
struct RowGrad {
  float xh[U][kVec], g[U][kVec];
  Raw8 dh[U];  // incoming dh (raw bits), when loaded
};

// Narrow: x, r and dy are 2-byte dtypes. LoadDh: also load the incoming dh (if any)
// into rg.dh, together with x, r and dy, for row_grad_store.
template <int TPR, int U, bool AccW, bool Narrow, bool LoadDh, class WGet>
FL_DEV void row_grad_load(const NormBwdArgs& a, int64_t row, int col0, const WGet& w, float mu,
                          float rstd, bool want_db, RowGrad<TPR, U>& rg, float (&dw)[U][kVec],
                          float (&db)[U][kVec], float& c1, float& c2) {
  const int tx = threadIdx.x;
  const int N = int(a.N);
  Raw8 rx[U], rr[U], rdy[U];
  const void* xrow = row_ptr(a.x, a.x_dt, row, a.x_stride);
  const bool xv = aligned16(xrow);
#pragma unroll
  for (int u = 0; u < U; ++u) load_raw<Narrow>(rx[u], xrow, a.x_dt, xv, col0 + (u * TPR + tx) * kVec, N);
  if (a.r) {
    const void* rrow = row_ptr(a.r, a.r_dt, row, a.r_stride);
    const bool rv = aligned16(rrow);
#pragma unroll
    for (int u = 0; u < U; ++u) load_raw<Narrow>(rr[u], rrow, a.r_dt, rv, col0 + (u * TPR + tx) * kVec, N);
  }
  const void* dyrow = row_ptr(a.dy, a.dy_dt, row, a.dy_stride);
  const bool dyv = aligned16(dyrow);
#pragma unroll
  for (int u = 0; u < U; ++u) load_raw<Narrow>(rdy[u], dyrow, a.dy_dt, dyv, col0 + (u * TPR + tx) * kVec, N);
  if (LoadDh && a.dh) {
    const void* dhrow = row_ptr(a.dh, a.dh_dt, row, a.dh_stride);
    const bool dhv = aligned16(dhrow);
#pragma unroll
    for (int u = 0; u < U; ++u) load_raw(rg.dh[u], dhrow, a.dh_dt, dhv, col0 + (u * TPR + tx) * kVec, N);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int col = col0 + (u * TPR + tx) * kVec;
    float h[kVec], dy[kVec];
    raw_to_f32<false, Narrow>(rx[u], a.x_dt, h);
    if (a.r) raw_to_f32<true, Narrow>(rr[u], a.r_dt, h);
    raw_to_f32<false, Narrow>(rdy[u], a.dy_dt, dy);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const bool in = col + k < N;
      const float xh = in ? (h[k] - mu) * rstd : 0.f;
      const float dyk = in ? dy[k] : 0.f;
      const float g = dyk * w(u, k);
      if (AccW) {
        dw[u][k] += dyk * round_xhat1(xh, a.xhat_dt);
        if (want_db) db[u][k] += dyk;
      }
      c1 += g * xh;
      c2 += g;
      rg.xh[u][k] = xh;
      rg.g[u][k] = g;
    }
  }
}

// dh = rstd * (g - c1*xhat - c2) (+ incoming dh, loaded by row_grad_load<LoadDh>),
// stored to dx and dr.
template <int TPR, int U>
FL_DEV void row_grad_store(const NormBwdArgs& a, int64_t row, int col0, const RowGrad<TPR, U>& rg, float rstd,
                           float c1, float c2) {
  const int tx = threadIdx.x;
  const int N = int(a.N);
  void* dxrow = row_ptr(a.dx, a.dx_dt, row, a.dx_stride);
  void* drrow = a.dr ? row_ptr(a.dr, a.dr_dt, row, a.dr_stride) : nullptr;
  const bool dxv = aligned16(dxrow), drv = drrow && aligned16(drrow);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int col = col0 + (u * TPR + tx) * kVec;
    if (col >= N) continue;
    float out[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = rstd * (rg.g[u][k] - c1 * rg.xh[u][k] - c2);
    if (a.dh) raw_to_f32<true>(rg.dh[u], a.dh_dt, out);
    store_f32(dxrow, a.dx_dt, dxv, col, N, out);
    if (drrow) store_f32(drrow, a.dr_dt, drv, col, N, out);
  }
}

// The gain (offset + w, or 1 without a weight) of this thread's groups.
template <int TPR, int U>
FL_DEV void load_weight(const NormBwdArgs& a, int col0, float (&w)[U][kVec]) {
  const bool wv = aligned16(a.w);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    Raw8 r;
    if (a.w) load_raw(r, a.w, a.w_dt, wv, col0 + (u * TPR + int(threadIdx.x)) * kVec, int(a.N));
    gain_f32(r, a.w, a.w_dt, a.offset, w[u]);
  }
}

// Sum the column sums `acc` of the R row slots of a block and store them at dst.
template <int TPR, int G>
FL_DEV void flush_partial(float (&acc)[G][kVec], float* dst, int N, float* buf /* __shared__ */) {
  constexpr int R = bwd_rows_per_block(TPR);
  const int tx = threadIdx.x, ty = threadIdx.y;
  if constexpr (R > 1) {
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int k = 0; k < kVec; ++k) buf[((ty * G + g) * TPR + tx) * kVec + k] = acc[g][k];
    __syncthreads();
    if (ty == 0) {
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          float s = 0.f;
#pragma unroll
          for (int r = 0; r < R; ++r) s += buf[((r * G + g) * TPR + tx) * kVec + k];
          acc[g][k] = s;
        }
    }
    __syncthreads();  // buf is reused by the next call
  }
  if (ty == 0) {
    const bool dv = aligned16(dst);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int col = (g * TPR + tx) * kVec;
      if (col < N) store_f32(dst, kF32, dv, col, N, acc[g]);
    }
  }
}

// Register path: block p (of gridDim.x = parts) walks rows split_rows(p), R rows at a
// time, and writes row p of dw_part (and db_part): every row, even with no rows.
template <int TPR, int G, bool DB, bool Narrow>
FL_GLOBAL void FL_LAUNCH_BOUNDS(TPR * bwd_rows_per_block(TPR), bwd_min_blocks(TPR * bwd_rows_per_block(TPR))) norm_bwd_reg(NormBwdArgs a) {
  constexpr int R = bwd_rows_per_block(TPR);
  __shared__ float red[64];
  __shared__ float buf[R > 1 ? R * G * TPR * kVec : 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int N = int(a.N);
  const float inv_n = 1.f / float(N);
  const bool rms = a.is_rms;
  constexpr bool want_db = DB;  // a.db_part != nullptr
  int64_t r0, r1;
  split_rows(a.M, gridDim.x, blockIdx.x, &r0, &r1);

  // The weight, in fp32, in shared memory (fewer registers); thread tx reads its own columns.
  __shared__ FL_ALIGN16 float sw[G * TPR * kVec];
  if (ty == 0) {
    float w[G][kVec];
    load_weight<TPR, G>(a, 0, w);
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int k = 0; k < kVec; ++k) sw[(g * TPR + tx) * kVec + k] = w[g][k];
  }
  __syncthreads();
  auto wget = [&](int g, int k) { return sw[(g * TPR + tx) * kVec + k]; };

  float dw[G][kVec], db[G][kVec];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int k = 0; k < kVec; ++k) dw[g][k] = db[g][k] = 0.f;

  for (int64_t base = r0; base < r1; base += R) {  // uniform over the block
    const int64_t row = base + ty;
    const bool valid = row < r1;
    RowGrad<TPR, G> rg;
    float c1 = 0.f, c2 = 0.f, rstd = 0.f;
    if (valid) {
      const float mu = rms ? 0.f : static_cast<const float*>(a.mean)[row];
      rstd = static_cast<const float*>(a.rstd)[row];
      row_grad_load<TPR, G, true, Narrow, true>(a, row, 0, wget, mu, rstd, want_db, rg, dw, db, c1, c2);
    }
    if (rms) {
      c1 = row_sum<TPR>(c1, red) * inv_n;
      c2 = 0.f;
    } else {
      row_sum2<TPR>(c1, c2, red);
      c1 *= inv_n;
      c2 *= inv_n;
    }
    if (valid) row_grad_store<TPR, G>(a, row, 0, rg, rstd, c1, c2);
  }

  flush_partial<TPR, G>(dw, static_cast<float*>(a.dw_part) + int64_t(blockIdx.x) * N, N, buf);
  if (DB) flush_partial<TPR, G>(db, static_cast<float*>(a.db_part) + int64_t(blockIdx.x) * N, N, buf);
}

constexpr int kBwdLoopTPR = 256, kBwdLoopU = 1, kBwdLoopBatch = 512;

// Any N: block p walks rows split_rows(p) in batches of `batch` rows (1 <= batch <=
// kBwdLoopBatch, from norm_bwd_loop_batch: small enough for pass B to re-read the
// batch from L2).
FL_GLOBAL void FL_LAUNCH_BOUNDS(kBwdLoopTPR, bwd_min_blocks(kBwdLoopTPR)) norm_bwd_loop(NormBwdArgs a, int batch) {
  constexpr int TPR = kBwdLoopTPR, U = kBwdLoopU;
  constexpr int T = kVec * TPR * U;
  const int B = batch < 1 ? 1 : batch > kBwdLoopBatch ? kBwdLoopBatch : batch;
  __shared__ float red[64];
  __shared__ float s_c1[kBwdLoopBatch], s_c2[kBwdLoopBatch], s_mu[kBwdLoopBatch], s_rstd[kBwdLoopBatch];
  const int tx = threadIdx.x;
  const int N = int(a.N);
  const float inv_n = 1.f / float(N);
  const bool rms = a.is_rms, want_db = a.db_part != nullptr;
  int64_t r0, r1;
  split_rows(a.M, gridDim.x, blockIdx.x, &r0, &r1);
  float* dwp = static_cast<float*>(a.dw_part) + int64_t(blockIdx.x) * N;
  float* dbp = want_db ? static_cast<float*>(a.db_part) + int64_t(blockIdx.x) * N : nullptr;
  const bool dwv = aligned16(dwp), dbv = dbp && aligned16(dbp);

  // Zero this block's partial rows, each thread its own columns (the ones it adds to later).
  for (int t0 = 0; t0 < N; t0 += T) {
    const float z[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int col = t0 + (u * TPR + tx) * kVec;
      if (col < N) {
        store_f32(dwp, kF32, dwv, col, N, z);
        if (dbp) store_f32(dbp, kF32, dbv, col, N, z);
      }
    }
  }

  for (int64_t b0 = r0; b0 < r1; b0 += B) {
    const int nb = int(r1 - b0 < B ? r1 - b0 : B);
    // Pass A: row sums c1 = mean(g*xhat), c2 = mean(g) of every row of the batch.
    for (int i = 0; i < nb; ++i) {
      const int64_t row = b0 + i;
      const float mu = rms ? 0.f : static_cast<const float*>(a.mean)[row];
      const float rstd = static_cast<const float*>(a.rstd)[row];
      float c1 = 0.f, c2 = 0.f;
      for (int t0 = 0; t0 < N; t0 += T) {
        float w[U][kVec], dw[U][kVec], db[U][kVec];  // dw/db: not accumulated in this pass
        load_weight<TPR, U>(a, t0, w);
        RowGrad<TPR, U> rg;
        auto wget = [&](int u, int k) { return w[u][k]; };
        row_grad_load<TPR, U, false, false, false>(a, row, t0, wget, mu, rstd, false, rg, dw, db, c1, c2);
      }
      if (rms) {
        c1 = row_sum<TPR>(c1, red) * inv_n;
        c2 = 0.f;
      } else {
        row_sum2<TPR>(c1, c2, red);
        c1 *= inv_n;
        c2 *= inv_n;
      }
      if (tx == 0) {
        s_c1[i] = c1;
        s_c2[i] = c2;
        s_mu[i] = mu;
        s_rstd[i] = rstd;
      }
    }
    __syncthreads();
    // Pass B: dx/dr, and dw/db of the batch per column tile.
    for (int t0 = 0; t0 < N; t0 += T) {
      float w[U][kVec], dw[U][kVec], db[U][kVec];
      load_weight<TPR, U>(a, t0, w);
      auto wget = [&](int u, int k) { return w[u][k]; };
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int k = 0; k < kVec; ++k) dw[u][k] = db[u][k] = 0.f;
      for (int i = 0; i < nb; ++i) {
        const int64_t row = b0 + i;
        RowGrad<TPR, U> rg;
        float c1 = 0.f, c2 = 0.f;  // recomputed partial sums, unused
        row_grad_load<TPR, U, true, false, true>(a, row, t0, wget, s_mu[i], s_rstd[i], want_db, rg, dw, db, c1,
                                                 c2);
        row_grad_store<TPR, U>(a, row, t0, rg, s_rstd[i], s_c1[i], s_c2[i]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int col = t0 + (u * TPR + tx) * kVec;
        if (col >= N) continue;
        Raw8 r;
        float acc[kVec];
        load_raw(r, dwp, kF32, dwv, col, N);
        raw_to_f32<false>(r, kF32, acc);
#pragma unroll
        for (int k = 0; k < kVec; ++k) acc[k] += dw[u][k];
        store_f32(dwp, kF32, dwv, col, N, acc);
        if (dbp) {
          load_raw(r, dbp, kF32, dbv, col, N);
          raw_to_f32<false>(r, kF32, acc);
#pragma unroll
          for (int k = 0; k < kVec; ++k) acc[k] += db[u][k];
          store_f32(dbp, kF32, dbv, col, N, acc);
        }
      }
    }
    __syncthreads();  // s_* are rewritten by the next batch
  }
}

// ---------------------------------------------------------------------------------
// Launch configuration, shared by norm.cu and the CPU emulation test.
// `launch(kernel, grid, block, args...)` launches one kernel.

constexpr int64_t kMaxGrid = int64_t(1) << 30;


template <class Launch>
void launch_norm_fwd(const NormFwdArgs& a, Launch&& launch) {
  const int64_t groups = (a.N + kVec - 1) / kVec;
  const bool ext = fwd_ext(a);
  auto reg = [&](auto kernel, auto kernel_ext, int tpr) {
    const int R = fwd_rows_per_block(tpr);
    int64_t grid = (a.M + R - 1) / R;
    grid = grid < kMaxGrid ? grid : kMaxGrid;
    launch(ext ? kernel_ext : kernel, dim3(unsigned(grid)), dim3(unsigned(tpr), unsigned(R)), a);
  };
#define FL_FWD_REG(TPR, G) reg(norm_fwd_reg<TPR, G, false>, norm_fwd_reg<TPR, G, true>, TPR)
  if (groups <= 32) FL_FWD_REG(32, 1);
  else if (groups <= 64) FL_FWD_REG(32, 2);
  else if (groups <= 128) FL_FWD_REG(64, 2);
  else if (groups <= 256) FL_FWD_REG(128, 2);
  else if (groups <= 512) FL_FWD_REG(256, 2);
  else if (groups <= 1024) FL_FWD_REG(512, 2);
#undef FL_FWD_REG
  else {
    const int64_t grid = a.M < kMaxGrid ? a.M : kMaxGrid;
    launch(norm_fwd_loop, dim3(unsigned(grid)), dim3(unsigned(kFwdLoopTPR)), a);
  }
}

// Number P of partial rows the backward writes (depends on (M, N) only; the dtypes,
// and so the kernel, are not known here; launch_norm_bwd is correct for any P >= 1).
//
// Every backward kernel keeps 512 threads per SM resident: the 256-thread register
// kernels and the loop kernel 2 blocks per SM, the 512-thread register kernels
// (norm_bwd_reg<512, ...>: the 2-byte dtypes with 512 < groups <= 1024, an fp32 row
// input with 256 < groups <= 512) 1 block. So P is at most 2 per SM: one wave of
// the 2-block kernels, two equal waves of the 1-block ones. Each part gets at least
// kBwdMinRowsPerPart rows (at small M the P x N partial sums, written here and read
// back by the caller's sum, would cost as much as the rows themselves), and P is
// either at most one per SM or exactly two per SM, so a 1-block-per-SM kernel never
// runs a partial second wave.
constexpr int64_t kBwdMinRowsPerPart = 64;

inline int norm_bwd_parts(int64_t M, int64_t N, int sm_count) {
  (void)N;
  const int64_t sm = sm_count > 0 ? sm_count : 1;
  int64_t p = M / kBwdMinRowsPerPart;
  if (p > sm) p = 2 * sm;
  return int(p < 1 ? 1 : p);
}

// Rows per batch of norm_bwd_loop. Pass B re-reads the batch's x, r and dy that pass A
// read; with P blocks at work that is P * batch rows, plus the P dw_part (db_part)
// rows the blocks add to. The batch is sized so this fits in kBwdLoopL2Bytes, well
// inside the L2 (40 MB on A100, 50 MB on H100/H200), so the second read hits L2.
// At least 1 row (for very wide rows even 1 row per block may not fit), at most
// kBwdLoopBatch.
constexpr int64_t kBwdLoopL2Bytes = int64_t(24) << 20;

inline int norm_bwd_loop_batch(const NormBwdArgs& a, int parts) {
  const int64_t N = a.N > 0 ? a.N : 1;
  const int64_t P = parts > 0 ? parts : 1;
  auto bytes = [](int dt) -> int64_t { return dt == kF32 ? 4 : 2; };
  const int64_t row_bytes = N * (bytes(a.x_dt) + (a.r ? bytes(a.r_dt) : 0) + bytes(a.dy_dt));
  const int64_t part_bytes = N * 4 * (a.db_part ? 2 : 1);
  const int64_t per_block = kBwdLoopL2Bytes / P - part_bytes;
  const int64_t b = per_block > 0 ? per_block / row_bytes : 0;
  return int(b < 1 ? 1 : b > kBwdLoopBatch ? kBwdLoopBatch : b);
}

// batch > 0: the loop kernel's batch (tests); otherwise norm_bwd_loop_batch.
template <class Launch>
void launch_norm_bwd(const NormBwdArgs& a, int parts, Launch&& launch, int batch = 0) {
  const int64_t groups = (a.N + kVec - 1) / kVec;
  const bool db = a.db_part != nullptr;
  const bool narrow = a.x_dt != kF32 && (!a.r || a.r_dt != kF32) && a.dy_dt != kF32;
  auto reg = [&](auto kernel, auto kernel_db, int tpr) {
    launch(db ? kernel_db : kernel, dim3(unsigned(parts)), dim3(unsigned(tpr), unsigned(bwd_rows_per_block(tpr))),
           a);
  };
  auto loop = [&] {
    launch(norm_bwd_loop, dim3(unsigned(parts)), dim3(unsigned(kBwdLoopTPR)), a,
           batch > 0 ? batch : norm_bwd_loop_batch(a, parts));
  };
#define FL_BWD_REG(TPR, G, NARROW) reg(norm_bwd_reg<TPR, G, false, NARROW>, norm_bwd_reg<TPR, G, true, NARROW>, TPR)
  if (narrow) {  // 16 elements a thread
    if (groups <= 32) FL_BWD_REG(32, 1, true);
    else if (groups <= 64) FL_BWD_REG(32, 2, true);
    else if (groups <= 128) FL_BWD_REG(64, 2, true);
    else if (groups <= 256) FL_BWD_REG(128, 2, true);
    else if (groups <= 512) FL_BWD_REG(256, 2, true);
    else if (groups <= 1024) FL_BWD_REG(512, 2, true);
    else loop();
  } else {  // an fp32 row input: 8 elements a thread
    if (groups <= 32) FL_BWD_REG(32, 1, false);
    else if (groups <= 64) FL_BWD_REG(64, 1, false);
    else if (groups <= 128) FL_BWD_REG(128, 1, false);
    else if (groups <= 256) FL_BWD_REG(256, 1, false);
    else if (groups <= 512) FL_BWD_REG(512, 1, false);
    else loop();
  }
#undef FL_BWD_REG
}

// ---------------------------------------------------------------------------------
// Host entry points: argument checks, then the launch (or nothing, for an empty
// problem). Shared by norm.cu and the CPU emulation test, so the checks run there too.
//
// Zero-element tensors may have a null address (torch gives zero-element CUDA tensors
// data_ptr() == 0): with M == 0 only weight and dw_part (the backward still writes
// every dw_part/db_part row: zeros) are required, with N == 0 nothing.

// fp32 / fp16 / bf16; float64 is not supported by the CUDA kernels.
inline void check_kernel_dtype(int dt, const char* what) {
  if (dt == kF32 || dt == kF16 || dt == kBF16) return;
  throw std::invalid_argument(std::string("fastlayers._cuda: ") + what + " has dtype " + dtype_name(dt) + " (code " +
                              std::to_string(dt) + "); the CUDA kernels support float32, float16 and bfloat16");
}

constexpr int64_t kMaxN = int64_t(1) << 30;  // the kernels index columns with int

// Returns whether to launch (false: nothing to compute).
inline bool check_norm_fwd(const NormFwdArgs& a) {
  check_kernel_dtype(a.x_dt, "x");
  if (a.w) check_kernel_dtype(a.w_dt, "weight");
  check_kernel_dtype(a.y_dt, "y");
  if (a.r) check_kernel_dtype(a.r_dt, "residual");
  if (a.b) check_kernel_dtype(a.b_dt, "bias");
  if (a.h) check_kernel_dtype(a.h_dt, "h");
  if (a.M < 0 || a.N < 0 || a.N > kMaxN)
    throw std::invalid_argument("fastlayers._cuda.norm_fwd: M must be >= 0 and N in [0, 2**30], got M=" +
                                std::to_string(a.M) + ", N=" + std::to_string(a.N));
  if (a.M == 0 || a.N == 0) return false;  // no element to write; zero-element tensors may be null
  if (!a.x || !a.y || !a.rstd || (!a.is_rms && !a.mean))
    throw std::invalid_argument("fastlayers._cuda.norm_fwd: x, y, rstd (and mean for LayerNorm) are required");
  return true;
}

inline bool check_norm_bwd(const NormBwdArgs& a, int parts) {
  check_kernel_dtype(a.dy_dt, "dy");
  check_kernel_dtype(a.x_dt, "x");
  if (a.w) check_kernel_dtype(a.w_dt, "weight");
  check_kernel_dtype(a.dx_dt, "dx");
  if (a.r) check_kernel_dtype(a.r_dt, "residual");
  if (a.b) check_kernel_dtype(a.b_dt, "bias");
  if (a.dh) check_kernel_dtype(a.dh_dt, "dh");
  if (a.dr) check_kernel_dtype(a.dr_dt, "dresidual");
  if (a.M < 0 || a.N < 0 || a.N > kMaxN)
    throw std::invalid_argument("fastlayers._cuda.norm_bwd: M must be >= 0 and N in [0, 2**30], got M=" +
                                std::to_string(a.M) + ", N=" + std::to_string(a.N));
  if (parts < 1) throw std::invalid_argument("fastlayers._cuda.norm_bwd: parts must be >= 1");
  if (a.N == 0) return false;  // every output is empty
  if (a.M == 0) {              // only the partial rows to write (zeros); the kernels read the weight only
    if (!a.dw_part) throw std::invalid_argument("fastlayers._cuda.norm_bwd: dw_part is required");
    return true;
  }
  if (!a.dy || !a.x || !a.rstd || !a.dx || !a.dw_part || (!a.is_rms && !a.mean))
    throw std::invalid_argument(
        "fastlayers._cuda.norm_bwd: dy, x, rstd, dx, dw_part (and mean for LayerNorm) are required");
  return true;
}

// Check, then launch. Returns whether a kernel was launched.
template <class Launch>
bool run_norm_fwd(const NormFwdArgs& a, Launch&& launch) {
  if (!check_norm_fwd(a)) return false;
  launch_norm_fwd(a, launch);
  return true;
}

template <class Launch>
bool run_norm_bwd(const NormBwdArgs& a, int parts, Launch&& launch) {
  if (!check_norm_bwd(a, parts)) return false;
  launch_norm_bwd(a, parts, launch);
  return true;
}

}  // namespace cuda_kernels
}  // namespace fastlayers
