// Fused residual-add + RMSNorm / LayerNorm, forward and backward, on the CPU.
//
// One kernel family for both norms (is_rms), with optional residual, bias and
// pre-norm output. Each thread owns a contiguous block of rows; a row is staged
// once into an L1-resident accumulator buffer (fp32, or fp64 for fp64 inputs),
// so every input is read from memory exactly once and every output written once.
#include "norm.h"

#include <cmath>
#include <algorithm>
#include <cstring>
#include <omp.h>

#include "convert.h"

namespace fastlayers {
namespace cpu {

// The gain (offset + w), or 1 without a weight, in the accumulator type.
template <typename Acc>
FL_INLINE void load_gain(const void* w, int w_dt, double offset, Acc* out, int64_t N) {
  if (!w) {
    for (int64_t j = 0; j < N; ++j) out[j] = Acc(1);
    return;
  }
  load_row(w, w_dt, out, N);
  if (offset != 0.0) {
    const Acc o = Acc(offset);
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) out[j] += o;
  }
}

// v rounded to a 16-bit dtype (round to nearest even) and back; any other dt: v.
template <typename Acc>
FL_INLINE Acc round_to(Acc v, int dt) {
  if (dt == kBF16) return Acc(bf16_to_f32(f32_to_bf16(float(v))));
  if (dt == kF16) return Acc(f16_to_f32(f32_to_f16(float(v))));
  return v;
}

template <typename Acc>
FL_INLINE void norm_fwd_rows(const NormFwdArgs& a, int64_t r0, int64_t r1, Acc* buf, Acc* wbuf, Acc* bbuf,
                             Acc* stage) {
  const int64_t N = a.N;
  const bool stream = a.M * N * dtype_size(a.y_dt) >= kStreamMinBytes;
  load_gain(a.w, a.w_dt, a.offset, wbuf, N);
  if (a.b) load_row(a.b, a.b_dt, bbuf, N);
  const int rdt = a.xhat_dt == kBF16 || a.xhat_dt == kF16 ? a.xhat_dt : -1;
  const Acc inv_n = Acc(1) / Acc(N);
  for (int64_t i = r0; i < r1; ++i) {
    load_row(elem_ptr(a.x, a.x_dt, i * a.x_stride), a.x_dt, buf, N);
    if (a.r) add_row(elem_ptr(a.r, a.r_dt, i * a.r_stride), a.r_dt, buf, N);
    if (a.h) store_out(buf, elem_ptr(a.h, a.h_dt, i * a.h_stride), a.h_dt, N, stage, stream);
    Acc mu = 0;
    if (!a.is_rms) {
      Acc s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < N; ++j) s += buf[j];
      mu = s * inv_n;
    }
    Acc ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < N; ++j) {
      const Acc d = buf[j] - mu;
      ss += d * d;
    }
    const Acc rstd = Acc(1) / std::sqrt(ss * inv_n + Acc(a.eps));
    if (!a.is_rms) static_cast<Acc*>(a.mean)[i] = mu;
    static_cast<Acc*>(a.rstd)[i] = rstd;
    if (rdt >= 0) {  // Llama's casting: xhat rounded to the input dtype before the gain
      for (int64_t j = 0; j < N; ++j) buf[j] = round_to((buf[j] - mu) * rstd, rdt) * wbuf[j] + (a.b ? bbuf[j] : Acc(0));
    } else if (a.b) {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) buf[j] = (buf[j] - mu) * rstd * wbuf[j] + bbuf[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) buf[j] = (buf[j] - mu) * rstd * wbuf[j];
    }
    store_out(buf, elem_ptr(a.y, a.y_dt, i * a.y_stride), a.y_dt, N, stage, stream);
  }
  if (stream) stream_fence();
}

template <typename Acc>
FL_INLINE void norm_bwd_rows(const NormBwdArgs& a, int64_t r0, int64_t r1, Acc* hb, Acc* gb, Acc* wbuf,
                             Acc* stage, Acc* dw, Acc* db) {
  const int64_t N = a.N;
  const bool stream = a.M * N * dtype_size(a.dx_dt) >= kStreamMinBytes;
  load_gain(a.w, a.w_dt, a.offset, wbuf, N);
  const int rdt = a.xhat_dt == kBF16 || a.xhat_dt == kF16 ? a.xhat_dt : -1;
  for (int64_t j = 0; j < N; ++j) dw[j] = 0;
  if (db)
    for (int64_t j = 0; j < N; ++j) db[j] = 0;
  const Acc inv_n = Acc(1) / Acc(N);
  const Acc* mean = static_cast<const Acc*>(a.mean);
  const Acc* rstdp = static_cast<const Acc*>(a.rstd);
  for (int64_t i = r0; i < r1; ++i) {
    // Recompute h = x (+ r) and its normalised value x̂.
    load_row(elem_ptr(a.x, a.x_dt, i * a.x_stride), a.x_dt, hb, N);
    if (a.r) add_row(elem_ptr(a.r, a.r_dt, i * a.r_stride), a.r_dt, hb, N);
    load_row(elem_ptr(a.dy, a.dy_dt, i * a.dy_stride), a.dy_dt, gb, N);
    const Acc mu = a.is_rms ? Acc(0) : mean[i];
    const Acc rstd = rstdp[i];
    Acc c1 = 0, c2 = 0;
    if (rdt >= 0) {  // dw sees the rounded xhat; dx the unrounded one
      for (int64_t j = 0; j < N; ++j) {
        const Acc xh = (hb[j] - mu) * rstd, dyj = gb[j], g = dyj * wbuf[j];
        dw[j] += dyj * round_to(xh, rdt);
        if (db) db[j] += dyj;
        c1 += g * xh;
        c2 += g;
        hb[j] = xh;
        gb[j] = g;
      }
    } else if (db) {
#pragma omp simd reduction(+ : c1, c2)
      for (int64_t j = 0; j < N; ++j) {
        const Acc xh = (hb[j] - mu) * rstd, dyj = gb[j], g = dyj * wbuf[j];
        dw[j] += dyj * xh;
        db[j] += dyj;
        c1 += g * xh;
        c2 += g;
        hb[j] = xh;
        gb[j] = g;
      }
    } else {
#pragma omp simd reduction(+ : c1, c2)
      for (int64_t j = 0; j < N; ++j) {
        const Acc xh = (hb[j] - mu) * rstd, dyj = gb[j], g = dyj * wbuf[j];
        dw[j] += dyj * xh;
        c1 += g * xh;
        c2 += g;
        hb[j] = xh;
        gb[j] = g;
      }
    }
    c1 *= inv_n;
    c2 = a.is_rms ? Acc(0) : c2 * inv_n;
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) gb[j] = rstd * (gb[j] - c1 * hb[j] - c2);
    if (a.dh) add_row(elem_ptr(a.dh, a.dh_dt, i * a.dh_stride), a.dh_dt, gb, N);
    store_out(gb, elem_ptr(a.dx, a.dx_dt, i * a.dx_stride), a.dx_dt, N, stage, stream);
    if (a.dr) store_out(gb, elem_ptr(a.dr, a.dr_dt, i * a.dr_stride), a.dr_dt, N, stage, stream);
  }
  if (stream) stream_fence();
}

// Row-range entry points; on x86-64 each has an AVX2/FMA/F16C clone picked at load time.
FL_CLONES void fwd_rows_f32(const NormFwdArgs& a, int64_t r0, int64_t r1, float* ws) {
  norm_fwd_rows<float>(a, r0, r1, ws, ws + a.N, ws + 2 * a.N, ws + 3 * a.N);
}
FL_CLONES void fwd_rows_f64(const NormFwdArgs& a, int64_t r0, int64_t r1, double* ws) {
  norm_fwd_rows<double>(a, r0, r1, ws, ws + a.N, ws + 2 * a.N, ws + 3 * a.N);
}
FL_CLONES void bwd_rows_f32(const NormBwdArgs& a, int64_t r0, int64_t r1, float* ws, float* dw, float* db) {
  norm_bwd_rows<float>(a, r0, r1, ws, ws + a.N, ws + 2 * a.N, ws + 3 * a.N, dw, db);
}
FL_CLONES void bwd_rows_f64(const NormBwdArgs& a, int64_t r0, int64_t r1, double* ws, double* dw, double* db) {
  norm_bwd_rows<double>(a, r0, r1, ws, ws + a.N, ws + 2 * a.N, ws + 3 * a.N, dw, db);
}

// Rows are split into `parts` contiguous blocks, one per OpenMP task; the
// workspace holds 4*N accumulators per part. A runtime that grants fewer threads
// than asked still covers every part.
void norm_fwd(const NormFwdArgs& a, void* workspace, int parts) {
  if (a.M == 0 || a.N == 0) return;
  run_rows(a, a.M, a.x_dt == kF64, workspace, 4 * a.N, parts, fwd_rows_f32, fwd_rows_f64);
}

// Every part writes its row of dw_part/db_part (zeros for an empty block).
void norm_bwd(const NormBwdArgs& a, void* workspace, int parts) {
  if (a.N == 0) return;
  const bool f64 = a.x_dt == kF64;
  parallel_parts(a.M, parts, [&](int p, int64_t r0, int64_t r1) {
    if (f64) {
      double* db = a.db_part ? static_cast<double*>(a.db_part) + a.N * p : nullptr;
      bwd_rows_f64(a, r0, r1, static_cast<double*>(workspace) + 4 * a.N * p,
                   static_cast<double*>(a.dw_part) + a.N * p, db);
    } else {
      float* db = a.db_part ? static_cast<float*>(a.db_part) + a.N * p : nullptr;
      bwd_rows_f32(a, r0, r1, static_cast<float*>(workspace) + 4 * a.N * p,
                   static_cast<float*>(a.dw_part) + a.N * p, db);
    }
  }, /*empty_too=*/true);
}

}  // namespace cpu
}  // namespace fastlayers
