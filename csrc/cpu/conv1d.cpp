// Depthwise causal conv1d on the CPU (Mamba's short convolution, widths 2..4):
// forward, backward and the in-place decode update.
//
// Two layouts of x (and of out, dout, dx), both without a copy:
// * time-contiguous (B, C, L): one (b, c) row is walked in chunks of kRowChunk
//   steps, staged with its W - 1 steps of history in an accumulator buffer, and
//   the taps are vectorised over time;
// * channel-last (a (B, L, C) tensor viewed as (B, C, L), as Mamba-2 does): a
//   block of kClBlock channels is walked one time step (one contiguous row of
//   channels) at a time and the taps are vectorised over channels.
// Every input is read once and every output written once. The backward
// recomputes the pre-activation (silu) from x, and each part owns whole
// channels, so the weight and bias gradients need no cross-thread reduction.
#include "conv1d.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <omp.h>

#include "convert.h"

namespace fastlayers {
namespace cpu {

constexpr int64_t kRowChunk = 1024;  // time steps per chunk (time-contiguous layout)
// Channel-last: rows of kClBlock channels (2 KiB of fp32, so that each row segment is one long contiguous
// read), kClChunk steps at a time (the staged rows stay in L2).
constexpr int64_t kClBlock = 512;    // channels per block (channel-last layout)
constexpr int64_t kClChunk = 32;     // time steps per chunk (channel-last layout)

int64_t conv1d_workspace_per_part(int64_t W) {
  const int64_t h = W - 1;
  // x with history and lookahead, g (= d pre-activation) with lookahead, out/dx row, store stage
  const int64_t row = (kRowChunk + 2 * h) + (kRowChunk + h) + 2 * kRowChunk;
  // the same in rows of kClBlock channels, plus the staged weights/bias and their gradients
  const int64_t cl = ((kClChunk + 2 * h) + (kClChunk + h) + 2 + 2 * (W + 1)) * kClBlock;
  return std::max(row, cl);
}

template <typename Acc>
FL_INLINE Acc load1(const void* p, int dt, int64_t off) {
  switch (dt) {
    case kF32: return Acc(static_cast<const float*>(p)[off]);
    case kF64: return Acc(static_cast<const double*>(p)[off]);
    case kF16: return Acc(f16_to_f32(static_cast<const uint16_t*>(p)[off]));
    default: return Acc(bf16_to_f32(static_cast<const uint16_t*>(p)[off]));
  }
}

template <typename Acc>
FL_INLINE void store1(Acc v, void* p, int dt, int64_t off) {
  switch (dt) {
    case kF32: static_cast<float*>(p)[off] = float(v); break;
    case kF64: static_cast<double*>(p)[off] = double(v); break;
    case kF16: static_cast<uint16_t*>(p)[off] = f32_to_f16(float(v)); break;
    default: static_cast<uint16_t*>(p)[off] = f32_to_bf16(float(v)); break;
  }
}

// x[b, c, t] for t in [-(W-1), L): initial state (or zero) at negative times.
template <typename Acc>
FL_INLINE Acc x_at(const Conv1dArgs& a, int64_t b, int64_t c, int64_t t) {
  if (t >= 0) return load1<Acc>(a.x, a.x_dt, b * a.x_sb + c * a.x_sc + t * a.x_st);
  if (!a.init) return Acc(0);
  return load1<Acc>(a.init, a.i_dt, b * a.i_sb + c * a.i_sc + (t + a.W - 1) * a.i_st);
}

// Channels [c0, c0 + nc) of x at time t (a contiguous row in the channel-last layout).
template <typename Acc>
FL_INLINE void load_time_row(const Conv1dArgs& a, int64_t b, int64_t c0, int64_t nc, int64_t t, Acc* dst) {
  if (t >= 0) return load_row(elem_ptr(a.x, a.x_dt, b * a.x_sb + c0 * a.x_sc + t * a.x_st), a.x_dt, dst, nc);
  for (int64_t j = 0; j < nc; ++j) dst[j] = x_at<Acc>(a, b, c0 + j, t);
}

template <typename Acc>
FL_INLINE Acc silu_acc(Acc v) { return v / (Acc(1) + exp_acc(-v)); }

// d silu(v) / dv
template <typename Acc>
FL_INLINE Acc dsilu_acc(Acc v) {
  const Acc s = Acc(1) / (Acc(1) + exp_acc(-v));
  return s * (Acc(1) + v * (Acc(1) - s));
}

// ----------------------------------------------------------------------------- forward
template <typename Acc, int W>
FL_INLINE void fwd_rows(const Conv1dArgs& a, int64_t i0, int64_t i1, Acc* ws, bool stream) {
  constexpr int H = W - 1;
  const int64_t nch = (a.L + kRowChunk - 1) / kRowChunk;
  Acc* xb = ws;                       // x at t0 - H .. t0 + n - 1
  Acc* ob = xb + kRowChunk + 2 * H;   // out
  Acc* stage = ob + kRowChunk;
  Acc w[W] = {}, bias = 0;
  int64_t cur = -1;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t ch = i % nch, bc = i / nch, c = bc % a.C, b = bc / a.C;
    if (c != cur) {
      for (int k = 0; k < W; ++k) w[k] = load1<Acc>(a.w, a.w_dt, c * W + k);
      bias = a.bias ? load1<Acc>(a.bias, a.b_dt, c) : Acc(0);
      cur = c;
    }
    const int64_t t0 = ch * kRowChunk, n = std::min(kRowChunk, a.L - t0);
    for (int j = 0; j < H; ++j) xb[j] = x_at<Acc>(a, b, c, t0 - H + j);
    load_row(elem_ptr(a.x, a.x_dt, b * a.x_sb + c * a.x_sc + t0 * a.x_st), a.x_dt, xb + H, n);
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) {
      Acc o = bias;
      for (int k = 0; k < W; ++k) o += w[k] * xb[t + k];
      ob[t] = o;
    }
    if (a.silu) {
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) ob[t] = silu_acc(ob[t]);
    }
    store_out(ob, elem_ptr(a.out, a.o_dt, b * a.o_sb + c * a.o_sc + t0 * a.o_st), a.o_dt, n, stage, stream);
  }
}

template <typename Acc, int W>
FL_INLINE void stage_weights(const Conv1dArgs& a, int64_t c0, int64_t nc, Acc* wt, Acc* bias) {
  for (int k = 0; k < W; ++k)
    for (int64_t j = 0; j < nc; ++j) wt[k * kClBlock + j] = load1<Acc>(a.w, a.w_dt, (c0 + j) * W + k);
  for (int64_t j = 0; j < nc; ++j) bias[j] = a.bias ? load1<Acc>(a.bias, a.b_dt, c0 + j) : Acc(0);
}

template <typename Acc, int W>
FL_INLINE void fwd_cl(const Conv1dArgs& a, int64_t i0, int64_t i1, Acc* ws, bool stream) {
  constexpr int H = W - 1;
  constexpr int64_t CB = kClBlock;
  const int64_t nch = (a.L + kClChunk - 1) / kClChunk, ncb = (a.C + CB - 1) / CB;
  Acc* xb = ws;                          // rows of CB channels: x at t0 - H .. t0 + n - 1
  Acc* ob = xb + (kClChunk + 2 * H) * CB;
  Acc* stage = ob + CB;
  Acc* wt = stage + CB;                  // wt[k * CB + j] = w[c0 + j, k]
  Acc* bias = wt + W * CB;
  int64_t cur = -1;
  // Items in (b, chunk, channel block) order: consecutive items read the same rows of time steps side by
  // side, so memory is walked in long runs (the weights are restaged per block: W + 1 short rows).
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t cb = i % ncb, bch = i / ncb, ch = bch % nch, b = bch / nch;
    const int64_t c0 = cb * CB, nc = std::min(CB, a.C - c0);
    if (cb != cur) {
      stage_weights<Acc, W>(a, c0, nc, wt, bias);
      cur = cb;
    }
    const int64_t t0 = ch * kClChunk, n = std::min(kClChunk, a.L - t0);
    for (int j = 0; j < H; ++j) load_time_row(a, b, c0, nc, t0 - H + j, xb + j * CB);
    for (int64_t r = 0; r < n; ++r)
      load_row(elem_ptr(a.x, a.x_dt, b * a.x_sb + c0 * a.x_sc + (t0 + r) * a.x_st), a.x_dt, xb + (H + r) * CB, nc);
    for (int64_t r = 0; r < n; ++r) {
      const Acc* xr = xb + r * CB;
#pragma omp simd
      for (int64_t j = 0; j < nc; ++j) {
        Acc o = bias[j];
        for (int k = 0; k < W; ++k) o += wt[k * CB + j] * xr[k * CB + j];
        ob[j] = o;
      }
      if (a.silu) {  // a loop of its own: a select inside the loop above keeps GCC from vectorising it
#pragma omp simd
        for (int64_t j = 0; j < nc; ++j) ob[j] = silu_acc(ob[j]);
      }
      store_out(ob, elem_ptr(a.out, a.o_dt, b * a.o_sb + c0 * a.o_sc + (t0 + r) * a.o_st), a.o_dt, nc, stage,
                stream);
    }
  }
}

// ----------------------------------------------------------------------------- backward
// g = dout * act'(pre) over [t0, t0 + n + H) (zero past L); dx = sum_k w[k] g(t + H - k);
// dw[k] += sum_t g(t) x(t - H + k); db += sum_t g(t); dinit like dx at negative times;
// dfinal adds to the positions the final states were copied from.
template <typename Acc, int W>
FL_INLINE void bwd_rows(const Conv1dArgs& a, int64_t c_lo, int64_t c_hi, Acc* ws, bool stream) {
  constexpr int H = W - 1;
  Acc* xb = ws;                      // x at t0 - H .. t0 + ng - 1
  Acc* gb = xb + kRowChunk + 2 * H;  // g at t0 .. t0 + n + H - 1
  Acc* dxb = gb + kRowChunk + H;
  Acc* stage = dxb + kRowChunk;
  const int64_t L = a.L;
  for (int64_t c = c_lo; c < c_hi; ++c) {
    Acc w[W], dw[W], db = 0;
    for (int k = 0; k < W; ++k) w[k] = load1<Acc>(a.w, a.w_dt, c * W + k), dw[k] = 0;
    const Acc bias = a.bias ? load1<Acc>(a.bias, a.b_dt, c) : Acc(0);
    for (int64_t b = 0; b < a.B; ++b) {
      for (int64_t t0 = 0; t0 < L; t0 += kRowChunk) {
        const int64_t n = std::min(kRowChunk, L - t0), ng = std::min(n + H, L - t0);
        for (int j = 0; j < H; ++j) xb[j] = x_at<Acc>(a, b, c, t0 - H + j);
        load_row(elem_ptr(a.x, a.x_dt, b * a.x_sb + c * a.x_sc + t0 * a.x_st), a.x_dt, xb + H, ng);
        load_row(elem_ptr(a.dout, a.d_dt, b * a.d_sb + c * a.d_sc + t0 * a.d_st), a.d_dt, gb, ng);
        for (int64_t t = ng; t < n + H; ++t) gb[t] = 0;
        if (a.silu) {
#pragma omp simd
          for (int64_t t = 0; t < ng; ++t) {
            Acc pre = bias;
            for (int k = 0; k < W; ++k) pre += w[k] * xb[t + k];
            gb[t] *= dsilu_acc(pre);
          }
        }
#pragma omp simd reduction(+ : db)
        for (int64_t t = 0; t < n; ++t) db += gb[t];
        for (int k = 0; k < W; ++k) {
          Acc s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t t = 0; t < n; ++t) s += gb[t] * xb[t + k];
          dw[k] += s;
        }
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) {
          Acc d = 0;
          for (int k = 0; k < W; ++k) d += w[k] * gb[t + H - k];
          dxb[t] = d;
        }
        if (a.dfinal)
          for (int64_t t = std::max(t0, L - H); t < t0 + n; ++t)
            dxb[t - t0] += load1<Acc>(a.dfinal, a.df_dt, b * a.df_sb + c * a.df_sc + (t - (L - H)) * a.df_st);
        store_out(dxb, elem_ptr(a.dx, a.dx_dt, b * a.dx_sb + c * a.dx_sc + t0 * a.dx_st), a.dx_dt, n, stage,
                  stream);
        if (t0 == 0 && a.dinit) {
          for (int j = 0; j < H; ++j) {  // time j - H
            Acc d = 0;
            for (int k = 0; k <= j; ++k) d += w[k] * gb[j - k];
            if (a.dfinal && j >= L)
              d += load1<Acc>(a.dfinal, a.df_dt, b * a.df_sb + c * a.df_sc + (j - L) * a.df_st);
            store1(d, a.dinit, a.di_dt, b * a.di_sb + c * a.di_sc + j * a.di_st);
          }
        }
      }
    }
    for (int k = 0; k < W; ++k) static_cast<Acc*>(a.dw)[c * W + k] = dw[k];
    if (a.db) static_cast<Acc*>(a.db)[c] = db;
  }
}

template <typename Acc, int W>
FL_INLINE void bwd_cl(const Conv1dArgs& a, int64_t cb_lo, int64_t cb_hi, Acc* ws, bool stream) {
  constexpr int H = W - 1;
  constexpr int64_t CB = kClBlock;
  Acc* xb = ws;                            // rows: x at t0 - H .. t0 + ng - 1
  Acc* gb = xb + (kClChunk + 2 * H) * CB;  // rows: g at t0 .. t0 + n + H - 1
  Acc* ob = gb + (kClChunk + H) * CB;
  Acc* stage = ob + CB;
  Acc* wt = stage + CB;
  Acc* bias = wt + W * CB;
  Acc* dw = bias + CB;  // dw[k * CB + j]
  Acc* db = dw + W * CB;
  const int64_t L = a.L;
  for (int64_t cb = cb_lo; cb < cb_hi; ++cb) {
    const int64_t c0 = cb * CB, nc = std::min(CB, a.C - c0);
    stage_weights<Acc, W>(a, c0, nc, wt, bias);
    for (int64_t j = 0; j < (W + 1) * CB; ++j) dw[j] = 0;  // dw and db
    for (int64_t b = 0; b < a.B; ++b) {
      for (int64_t t0 = 0; t0 < L; t0 += kClChunk) {
        const int64_t n = std::min(kClChunk, L - t0), ng = std::min(n + H, L - t0);
        for (int j = 0; j < H; ++j) load_time_row(a, b, c0, nc, t0 - H + j, xb + j * CB);
        for (int64_t r = 0; r < ng; ++r) {
          const int64_t t = t0 + r;
          load_row(elem_ptr(a.x, a.x_dt, b * a.x_sb + c0 * a.x_sc + t * a.x_st), a.x_dt, xb + (H + r) * CB, nc);
          load_row(elem_ptr(a.dout, a.d_dt, b * a.d_sb + c0 * a.d_sc + t * a.d_st), a.d_dt, gb + r * CB, nc);
        }
        for (int64_t r = ng; r < n + H; ++r)
          for (int64_t j = 0; j < nc; ++j) gb[r * CB + j] = 0;
        if (a.silu) {
          for (int64_t r = 0; r < ng; ++r) {
            const Acc* xr = xb + r * CB;
#pragma omp simd
            for (int64_t j = 0; j < nc; ++j) {
              Acc pre = bias[j];
              for (int k = 0; k < W; ++k) pre += wt[k * CB + j] * xr[k * CB + j];
              gb[r * CB + j] *= dsilu_acc(pre);
            }
          }
        }
        for (int64_t r = 0; r < n; ++r) {
          const Acc* gr = gb + r * CB;
          const Acc* xr = xb + r * CB;
#pragma omp simd
          for (int64_t j = 0; j < nc; ++j) {
            db[j] += gr[j];
            for (int k = 0; k < W; ++k) dw[k * CB + j] += gr[j] * xr[k * CB + j];
          }
          const Acc* gh = gb + (r + H) * CB;  // g at t + H - k is gh[-k * CB]
#pragma omp simd
          for (int64_t j = 0; j < nc; ++j) {
            Acc d = 0;
            for (int k = 0; k < W; ++k) d += wt[k * CB + j] * gh[j - k * CB];
            ob[j] = d;
          }
          const int64_t t = t0 + r;
          if (a.dfinal && t >= L - H)
            for (int64_t j = 0; j < nc; ++j)
              ob[j] += load1<Acc>(a.dfinal, a.df_dt, b * a.df_sb + (c0 + j) * a.df_sc + (t - (L - H)) * a.df_st);
          store_out(ob, elem_ptr(a.dx, a.dx_dt, b * a.dx_sb + c0 * a.dx_sc + t * a.dx_st), a.dx_dt, nc, stage,
                    stream);
        }
        if (t0 == 0 && a.dinit) {
          for (int i = 0; i < H; ++i) {  // time i - H
            for (int64_t j = 0; j < nc; ++j) {
              Acc d = 0;
              for (int k = 0; k <= i; ++k) d += wt[k * CB + j] * gb[(i - k) * CB + j];
              if (a.dfinal && i >= L)
                d += load1<Acc>(a.dfinal, a.df_dt, b * a.df_sb + (c0 + j) * a.df_sc + (i - L) * a.df_st);
              store1(d, a.dinit, a.di_dt, b * a.di_sb + (c0 + j) * a.di_sc + i * a.di_st);
            }
          }
        }
      }
    }
    for (int64_t j = 0; j < nc; ++j) {
      for (int k = 0; k < W; ++k) static_cast<Acc*>(a.dw)[(c0 + j) * W + k] = dw[k * CB + j];
      if (a.db) static_cast<Acc*>(a.db)[c0 + j] = db[j];
    }
  }
}

// ----------------------------------------------------------------------------- entry points
template <typename Acc, int W>
FL_INLINE void fwd_part(const Conv1dArgs& a, int64_t i0, int64_t i1, Acc* ws) {
  const bool stream = a.B * a.C * a.L * dtype_size(a.o_dt) >= kStreamMinBytes;
  if (a.channel_last)
    fwd_cl<Acc, W>(a, i0, i1, ws, stream);
  else
    fwd_rows<Acc, W>(a, i0, i1, ws, stream);
  if (stream) stream_fence();
}

template <typename Acc, int W>
FL_INLINE void bwd_part(const Conv1dArgs& a, int64_t i0, int64_t i1, Acc* ws) {
  const bool stream = a.B * a.C * a.L * dtype_size(a.dx_dt) >= kStreamMinBytes;
  if (a.channel_last)
    bwd_cl<Acc, W>(a, i0, i1, ws, stream);
  else
    bwd_rows<Acc, W>(a, i0, i1, ws, stream);
  if (stream) stream_fence();
}

// One AVX2/FMA/F16C clone and one baseline of each (on x86-64), the width unrolled. fp64 (gradcheck) is
// built for the baseline only: half the compile time of this file.
#define FL_CONV_ENTRY(name, part, Acc, CLONES)                                     \
  CLONES void name(const Conv1dArgs& a, int64_t i0, int64_t i1, Acc* ws) {          \
    switch (a.W) {                                                                  \
      case 2: part<Acc, 2>(a, i0, i1, ws); break;                                   \
      case 3: part<Acc, 3>(a, i0, i1, ws); break;                                   \
      default: part<Acc, 4>(a, i0, i1, ws); break;                                  \
    }                                                                               \
  }
FL_CONV_ENTRY(conv_fwd_f32, fwd_part, float, FL_CLONES)
FL_CONV_ENTRY(conv_fwd_f64, fwd_part, double, )
FL_CONV_ENTRY(conv_bwd_f32, bwd_part, float, FL_CLONES)
FL_CONV_ENTRY(conv_bwd_f64, bwd_part, double, )

template <typename F32, typename F64>
static void run_items(const Conv1dArgs& a, int64_t items, void* workspace, int parts, F32 f32, F64 f64) {
  parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(parts, items)));
  run_rows(a, items, a.x_dt == kF64, workspace, conv1d_workspace_per_part(a.W), parts, f32, f64);
}

template <typename Acc>
static void write_final(const Conv1dArgs& a, int parts) {
  const int64_t H = a.W - 1, rows = a.B * a.C;
#pragma omp parallel for num_threads(parts) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / a.C, c = r % a.C;
    for (int64_t j = 0; j < H; ++j)
      store1(x_at<Acc>(a, b, c, a.L - H + j), a.final, a.f_dt, b * a.f_sb + c * a.f_sc + j * a.f_st);
  }
}

// ----------------------------------------------------------------------------- packed sequences (seq_idx)
// A scalar path over (b, c) rows (forward) or channels (backward), any strides: the taps are masked by the
// sequence ids, so the vectorised chunk kernels above are not used. Masked taps are skipped, not multiplied
// by zero (a NaN of another sequence must not leak in).
template <typename Acc>
static void seq_fwd_rows(const Conv1dArgs& a, int64_t r0, int64_t r1) {
  const int64_t H = a.W - 1, L = a.L;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.C, c = r % a.C;
    Acc w[4] = {};
    for (int k = 0; k < a.W; ++k) w[k] = load1<Acc>(a.w, a.w_dt, c * a.W + k);
    const Acc bias = a.bias ? load1<Acc>(a.bias, a.b_dt, c) : Acc(0);
    const int32_t* sq = a.seq + b * L;
    const int64_t xo = b * a.x_sb + c * a.x_sc, oo = b * a.o_sb + c * a.o_sc;
    for (int64_t t = 0; t < L; ++t) {
      const int32_t cur = sq[t];
      Acc o = 0;
      if (cur >= 0) {
        o = bias;
        for (int64_t k = 0; k < a.W; ++k) {
          const int64_t s = t - H + k;
          if (s >= 0 && sq[s] == cur) o += w[k] * load1<Acc>(a.x, a.x_dt, xo + s * a.x_st);
        }
        if (a.silu) o = silu_acc(o);
      }
      store1(o, a.out, a.o_dt, oo + t * a.o_st);
    }
  }
}

// Channel-last x: (b, t) items, the channels (contiguous) innermost; the masks of a step are shared by its
// channels.
template <typename Acc>
static void seq_fwd_times(const Conv1dArgs& a, int64_t r0, int64_t r1) {
  const int64_t H = a.W - 1, L = a.L;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / L, t = r % L;
    const int32_t* sq = a.seq + b * L;
    const int32_t cur = sq[t];
    bool use[4] = {};
    for (int64_t k = 0; k < a.W; ++k) use[k] = cur >= 0 && t - H + k >= 0 && sq[t - H + k] == cur;
    const int64_t xo = b * a.x_sb + (t - H) * a.x_st, oo = b * a.o_sb + t * a.o_st;
    for (int64_t c = 0; c < a.C; ++c) {
      Acc o = 0;
      if (cur >= 0) {
        o = a.bias ? load1<Acc>(a.bias, a.b_dt, c) : Acc(0);
        for (int64_t k = 0; k < a.W; ++k)
          if (use[k]) o += load1<Acc>(a.w, a.w_dt, c * a.W + k) * load1<Acc>(a.x, a.x_dt, xo + c * a.x_sc + k * a.x_st);
        if (a.silu) o = silu_acc(o);
      }
      store1(o, a.out, a.o_dt, oo + c * a.o_sc);
    }
  }
}

template <typename Acc>
static void seq_bwd_channels(const Conv1dArgs& a, int64_t c_lo, int64_t c_hi) {
  const int64_t H = a.W - 1, L = a.L;
  for (int64_t c = c_lo; c < c_hi; ++c) {
    Acc w[4] = {}, dw[4] = {}, db = 0;
    for (int k = 0; k < a.W; ++k) w[k] = load1<Acc>(a.w, a.w_dt, c * a.W + k);
    const Acc bias = a.bias ? load1<Acc>(a.bias, a.b_dt, c) : Acc(0);
    for (int64_t b = 0; b < a.B; ++b) {
      const int32_t* sq = a.seq + b * L;
      const int64_t xo = b * a.x_sb + c * a.x_sc, go = b * a.d_sb + c * a.d_sc, dxo = b * a.dx_sb + c * a.dx_sc;
      Acc gh[4] = {};  // gh[j] = g(t - j), g = dout * act'(pre), 0 at padding
      for (int64_t t = 0; t < L + H; ++t) {
        for (int64_t j = H; j > 0; --j) gh[j] = gh[j - 1];
        Acc g = 0;
        if (t < L && sq[t] >= 0) {
          const int32_t cur = sq[t];
          g = load1<Acc>(a.dout, a.d_dt, go + t * a.d_st);
          if (a.silu) {
            Acc pre = bias;
            for (int64_t k = 0; k < a.W; ++k) {
              const int64_t s = t - H + k;
              if (s >= 0 && sq[s] == cur) pre += w[k] * load1<Acc>(a.x, a.x_dt, xo + s * a.x_st);
            }
            g *= dsilu_acc(pre);
          }
          db += g;
          for (int64_t k = 0; k < a.W; ++k) {
            const int64_t s = t - H + k;
            if (s >= 0 && sq[s] == cur) dw[k] += g * load1<Acc>(a.x, a.x_dt, xo + s * a.x_st);
          }
        }
        gh[0] = g;
        const int64_t s = t - H;  // dx[s] = sum_k w[k] g(s + H - k) over outputs of s's sequence
        if (s >= 0) {
          Acc d = 0;
          for (int64_t k = 0; k < a.W; ++k) {
            const int64_t tt = t - k;
            if (tt < L && sq[tt] == sq[s]) d += w[k] * gh[k];
          }
          store1(d, a.dx, a.dx_dt, dxo + s * a.dx_st);
        }
      }
    }
    for (int k = 0; k < a.W; ++k) static_cast<Acc*>(a.dw)[c * a.W + k] = dw[k];
    if (a.db) static_cast<Acc*>(a.db)[c] = db;
  }
}

void causal_conv1d_fwd(const Conv1dArgs& a, void* workspace, int parts) {
  if (a.B == 0 || a.C == 0) return;
  if (a.seq) {
    if (a.L == 0) return;
    const int64_t items = a.channel_last ? a.B * a.L : a.B * a.C;
    parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(parts, items)));
    parallel_parts(items, parts, [&](int, int64_t r0, int64_t r1) {
      if (a.channel_last)
        a.x_dt == kF64 ? seq_fwd_times<double>(a, r0, r1) : seq_fwd_times<float>(a, r0, r1);
      else
        a.x_dt == kF64 ? seq_fwd_rows<double>(a, r0, r1) : seq_fwd_rows<float>(a, r0, r1);
    });
    return;
  }
  if (a.L > 0) {
    const int64_t items = a.channel_last
                              ? a.B * ((a.C + kClBlock - 1) / kClBlock) * ((a.L + kClChunk - 1) / kClChunk)
                              : a.B * a.C * ((a.L + kRowChunk - 1) / kRowChunk);
    run_items(a, items, workspace, parts, conv_fwd_f32, conv_fwd_f64);
  }
  if (a.final) {
    if (a.x_dt == kF64)
      write_final<double>(a, parts);
    else
      write_final<float>(a, parts);
  }
}

void causal_conv1d_bwd(const Conv1dArgs& a, void* workspace, int parts) {
  if (a.C == 0) return;
  if (a.seq) {
    parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(parts, a.C)));
    parallel_parts(a.C, parts, [&](int, int64_t c0, int64_t c1) {
      if (a.x_dt == kF64)
        seq_bwd_channels<double>(a, c0, c1);
      else
        seq_bwd_channels<float>(a, c0, c1);
    });
    return;
  }
  const int64_t items = a.channel_last ? (a.C + kClBlock - 1) / kClBlock : a.C;
  run_items(a, items, workspace, parts, conv_bwd_f32, conv_bwd_f64);
}

// ----------------------------------------------------------------------------- decode update
// Storage type of each dtype code, and its conversions to and from the accumulator.
template <int DT> struct Storage { using T = uint16_t; };
template <> struct Storage<kF32> { using T = float; };
template <> struct Storage<kF64> { using T = double; };

template <int DT, typename Acc>
FL_INLINE Acc to_acc(typename Storage<DT>::T v) {
  if constexpr (DT == kF16) return Acc(f16_to_f32(v));
  else if constexpr (DT == kBF16) return Acc(bf16_to_f32(v));
  else return Acc(v);
}

template <int DT, typename Acc>
FL_INLINE typename Storage<DT>::T from_acc(Acc v) {
  if constexpr (DT == kF16) return f32_to_f16(float(v));
  else if constexpr (DT == kBF16) return f32_to_bf16(float(v));
  else return typename Storage<DT>::T(v);
}

// x, state and out share the dtype DT (the state is updated bit for bit); weights/bias any dtype.
// Blocks of kUpdBlock channels of one sequence: the W inputs of each new step are gathered into
// rows of channels, so that the taps and the silu run vectorised across channels.
constexpr int64_t kUpdBlock = 128;

template <int DT, int W>
FL_INLINE void update_rows(const Conv1dUpdateArgs& a, int64_t i0, int64_t i1) {
  using T = typename Storage<DT>::T;
  using Acc = std::conditional_t<DT == kF64, double, float>;
  constexpr int64_t H = W - 1, CB = kUpdBlock;
  Acc wtmp[W * CB], wt[W * CB], bias[CB], col[W * CB], ob[CB];  // on the stack: ~10 KiB (fp64: 20)
  const int64_t S = a.S, L = a.L, ncb = (a.C + CB - 1) / CB;
  const T* x = static_cast<const T*>(a.x);
  T* state = static_cast<T*>(a.state);
  T* out = static_cast<T*>(a.out);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / ncb, c0 = (i % ncb) * CB, nc = std::min(CB, a.C - c0);
    load_row(elem_ptr(a.w, a.w_dt, c0 * W), a.w_dt, wtmp, nc * W);
    for (int64_t j = 0; j < nc; ++j)
      for (int k = 0; k < W; ++k) wt[k * CB + j] = wtmp[j * W + k];
    if (a.bias)
      load_row(elem_ptr(a.bias, a.b_dt, c0), a.b_dt, bias, nc);
    else
      for (int64_t j = 0; j < nc; ++j) bias[j] = 0;
    T* st0 = state + b * a.s_sb + c0 * a.s_sc;
    const T* x0 = x + b * a.x_sb + c0 * a.x_sc;
    // element i of [state, x] along time for channel c0 + j
    auto at = [&](int64_t j, int64_t e) {
      return e < S ? st0[j * a.s_sc + e * a.s_st] : x0[j * a.x_sc + (e - S) * a.x_st];
    };
    for (int64_t t = 0; t < L; ++t) {
      for (int k = 0; k < W; ++k)
        for (int64_t j = 0; j < nc; ++j) col[k * CB + j] = to_acc<DT, Acc>(at(j, S - H + t + k));
#pragma omp simd
      for (int64_t j = 0; j < nc; ++j) {
        Acc o = bias[j];
        for (int k = 0; k < W; ++k) o += wt[k * CB + j] * col[k * CB + j];
        ob[j] = o;
      }
      if (a.silu) {
#pragma omp simd
        for (int64_t j = 0; j < nc; ++j) ob[j] = silu_acc(ob[j]);
      }
      T* o0 = out + b * a.o_sb + c0 * a.o_sc + t * a.o_st;
      for (int64_t j = 0; j < nc; ++j) o0[j * a.o_sc] = from_acc<DT, Acc>(ob[j]);
    }
    // Shift left by L: element e takes element e + L. Reads run ahead of writes, so the forward
    // order never reads an overwritten element.
    for (int64_t j = 0; j < nc; ++j)
      for (int64_t e = 0; e < S; ++e) st0[j * a.s_sc + e * a.s_st] = at(j, e + L);
  }
}

template <int DT>
FL_INLINE void update_dt(const Conv1dUpdateArgs& a, int64_t r0, int64_t r1) {
  switch (a.W) {
    case 2: return update_rows<DT, 2>(a, r0, r1);
    case 3: return update_rows<DT, 3>(a, r0, r1);
    default: return update_rows<DT, 4>(a, r0, r1);
  }
}

FL_CLONES void update_f32(const Conv1dUpdateArgs& a, int64_t r0, int64_t r1) { update_dt<kF32>(a, r0, r1); }
void update_f64(const Conv1dUpdateArgs& a, int64_t r0, int64_t r1) { update_dt<kF64>(a, r0, r1); }
FL_CLONES void update_f16(const Conv1dUpdateArgs& a, int64_t r0, int64_t r1) { update_dt<kF16>(a, r0, r1); }
FL_CLONES void update_bf16(const Conv1dUpdateArgs& a, int64_t r0, int64_t r1) { update_dt<kBF16>(a, r0, r1); }

// Circular buffer (cache_seqlens) and/or state slots (idx): a scalar path over (b, c) rows, any strides.
template <typename Acc>
static void update_ext_rows(const Conv1dUpdateArgs& a, int64_t r0, int64_t r1) {
  const int64_t H = a.W - 1, S = a.S, L = a.L, es = dtype_size(a.x_dt);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.C, c = r % a.C;
    const int64_t slot = a.idx ? int64_t(a.idx[b]) : b;
    const int64_t xo = b * a.x_sb + c * a.x_sc, oo = b * a.o_sb + c * a.o_sc;
    if (slot < 0) {  // padded row: zeros out, no state
      for (int64_t t = 0; t < L; ++t) store1(Acc(0), a.out, a.o_dt, oo + t * a.o_st);
      continue;
    }
    const int64_t so = slot * a.s_sb + c * a.s_sc;
    Acc w[4] = {}, xv[4] = {};
    for (int k = 0; k < a.W; ++k) w[k] = load1<Acc>(a.w, a.w_dt, c * a.W + k);
    const Acc bias = a.bias ? load1<Acc>(a.bias, a.b_dt, c) : Acc(0);
    const int64_t pos = a.cache_seqlens ? int64_t(a.cache_seqlens[b]) % S : 0;
    for (int64_t i = 0; i < H; ++i) {
      const int64_t e = a.cache_seqlens ? (pos - H + i + S) % S : S - H + i;
      xv[i] = load1<Acc>(a.state, a.s_dt, so + e * a.s_st);
    }
    for (int64_t t = 0; t < L; ++t) {
      xv[H] = load1<Acc>(a.x, a.x_dt, xo + t * a.x_st);
      Acc o = bias;
      for (int64_t k = 0; k < a.W; ++k) o += w[k] * xv[k];
      if (a.silu) o = silu_acc(o);
      store1(o, a.out, a.o_dt, oo + t * a.o_st);
      for (int64_t k = 0; k < H; ++k) xv[k] = xv[k + 1];
    }
    char* st = static_cast<char*>(a.state);
    const char* xs = static_cast<const char*>(a.x);
    if (a.cache_seqlens) {  // the last min(L, S) inputs land at (pos + t) % S
      for (int64_t t = std::max<int64_t>(0, L - S); t < L; ++t)
        std::memcpy(st + (so + ((pos + t) % S) * a.s_st) * es, xs + (xo + t * a.x_st) * es, es);
    } else {  // shift: element e takes element e + L of [state, x]; reads run ahead of writes
      for (int64_t e = 0; e < S; ++e) {
        const int64_t f = e + L;
        const char* src = f < S ? st + (so + f * a.s_st) * es : xs + (xo + (f - S) * a.x_st) * es;
        std::memmove(st + (so + e * a.s_st) * es, src, es);
      }
    }
  }
}

void causal_conv1d_update(const Conv1dUpdateArgs& a, int parts) {
  if (a.cache_seqlens || a.idx) {
    const int64_t rows = a.B * a.C;
    if (rows == 0) return;
    parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(parts, rows)));
    parallel_parts(rows, parts, [&](int, int64_t r0, int64_t r1) {
      if (a.x_dt == kF64)
        update_ext_rows<double>(a, r0, r1);
      else
        update_ext_rows<float>(a, r0, r1);
    });
    return;
  }
  const int64_t rows = a.B * ((a.C + kUpdBlock - 1) / kUpdBlock);  // (sequence, channel block) items
  if (rows == 0) return;
  parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(parts, rows)));
  parallel_parts(rows, parts, [&](int, int64_t r0, int64_t r1) {
    switch (a.x_dt) {
      case kF32: update_f32(a, r0, r1); break;
      case kF64: update_f64(a, r0, r1); break;
      case kF16: update_f16(a, r0, r1); break;
      default: update_bf16(a, r0, r1); break;
    }
  });
}

}  // namespace cpu
}  // namespace fastlayers
