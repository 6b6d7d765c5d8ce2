// HybridNorm kernels on the CPU: per-head RMSNorm + RoPE (the q/k/v prologue of
// QKV-norm attention) and SwiGLU, forward and backward.
//
// Both walk rows (one head of D elements, or one token's F hidden units) split
// into contiguous blocks, one block per OpenMP thread. A row is staged once in an
// L1-resident accumulator buffer, so every input is read once and every output
// written once; outputs larger than the caches are streamed (non-temporal).
#include "hybridnorm.h"

#include <cmath>
#include <omp.h>

#include "convert.h"

namespace fastlayers {
namespace cpu {

// Rotate-half RoPE in place: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s); Inverse
// (the backward's transpose) -> (x1 c + x2 s, x2 c - x1 s).
template <typename Acc, bool Inverse>
FL_INLINE void rotate(Acc* buf, const Acc* c, const Acc* s, int64_t half) {
#pragma omp simd
  for (int64_t j = 0; j < half; ++j) {
    const Acc x1 = buf[j], x2 = buf[j + half];
    buf[j] = Inverse ? x1 * c[j] + x2 * s[j] : x1 * c[j] - x2 * s[j];
    buf[j + half] = Inverse ? x2 * c[j] - x1 * s[j] : x2 * c[j] + x1 * s[j];
  }
}

template <typename Acc>
FL_INLINE Acc row_rstd(const Acc* x, int64_t D, double eps) {
  Acc ss = 0;
#pragma omp simd reduction(+ : ss)
  for (int64_t j = 0; j < D; ++j) ss += x[j] * x[j];
  return Acc(1) / std::sqrt(ss / Acc(D) + Acc(eps));
}

template <typename Acc>
FL_INLINE void hnr_fwd_rows(const HeadNormRopeArgs& a, int64_t i0, int64_t i1, Acc* buf, Acc* wbuf, Acc* stage) {
  const int64_t D = a.D, half = D / 2;
  const bool stream = a.B * a.T * a.H * D * dtype_size(a.o_dt) >= kStreamMinBytes;
  if (a.w) load_row(a.w, a.w_dt, wbuf, D);
  const Acc* cosb = static_cast<const Acc*>(a.cos);
  const Acc* sinb = static_cast<const Acc*>(a.sin);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t h = i % a.H, bt = i / a.H, t = bt % a.T, b = bt / a.T;
    load_row(elem_ptr(a.x, a.x_dt, b * a.x_sb + t * a.x_st + h * a.x_sh), a.x_dt, buf, D);
    if (a.w) {
      const Acc rstd = row_rstd(buf, D, a.eps);
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) buf[j] = buf[j] * rstd * wbuf[j];
    }
    if (cosb) {
      const int64_t row = (a.offsets[b] + t) * a.cs_stride;
      rotate<Acc, false>(buf, cosb + row, sinb + row, half);
    }
    store_out(buf, elem_ptr(a.out, a.o_dt, b * a.o_sb + t * a.o_st + h * a.o_sh), a.o_dt, D, stage, stream);
  }
  if (stream) stream_fence();
}

template <typename Acc>
FL_INLINE void hnr_bwd_rows(const HeadNormRopeBwdArgs& a, int64_t i0, int64_t i1, Acc* xb, Acc* gb, Acc* wbuf,
                            Acc* stage, Acc* dw) {
  const int64_t D = a.D, half = D / 2;
  const bool stream = a.B * a.T * a.H * D * dtype_size(a.dx_dt) >= kStreamMinBytes;
  if (a.w) {
    load_row(a.w, a.w_dt, wbuf, D);
    for (int64_t j = 0; j < D; ++j) dw[j] = 0;
  }
  const Acc* cosb = static_cast<const Acc*>(a.cos);
  const Acc* sinb = static_cast<const Acc*>(a.sin);
  const Acc inv_d = Acc(1) / Acc(D);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t h = i % a.H, bt = i / a.H, t = bt % a.T, b = bt / a.T;
    load_row(elem_ptr(a.dout, a.d_dt, b * a.d_sb + t * a.d_st + h * a.d_sh), a.d_dt, gb, D);
    if (cosb) {
      const int64_t row = (a.offsets[b] + t) * a.cs_stride;
      rotate<Acc, true>(gb, cosb + row, sinb + row, half);
    }
    if (a.w) {
      // g = d out / d n;  n = x̂ w,  x̂ = x rstd:  dx = rstd (g w - x̂ mean(g w x̂)).
      load_row(elem_ptr(a.x, a.x_dt, b * a.x_sb + t * a.x_st + h * a.x_sh), a.x_dt, xb, D);
      const Acc rstd = row_rstd(xb, D, a.eps);
      Acc c1 = 0;
#pragma omp simd reduction(+ : c1)
      for (int64_t j = 0; j < D; ++j) {
        const Acc xh = xb[j] * rstd, g = gb[j];
        dw[j] += g * xh;
        const Acc dn = g * wbuf[j];
        c1 += dn * xh;
        xb[j] = xh;
        gb[j] = dn;
      }
      c1 *= inv_d;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) gb[j] = rstd * (gb[j] - c1 * xb[j]);
    }
    store_out(gb, elem_ptr(a.dx, a.dx_dt, b * a.dx_sb + t * a.dx_st + h * a.dx_sh), a.dx_dt, D, stage, stream);
  }
  if (stream) stream_fence();
}

template <typename Acc>
FL_INLINE void swiglu_fwd_rows(const SwigluArgs& a, int64_t r0, int64_t r1, Acc* gb, Acc* ub, Acc* stage) {
  const int64_t F = a.F;
  const bool stream = a.M * F * dtype_size(a.o_dt) >= kStreamMinBytes;
  for (int64_t i = r0; i < r1; ++i) {
    load_row(elem_ptr(a.gate, a.g_dt, i * a.g_stride), a.g_dt, gb, F);
    load_row(elem_ptr(a.up, a.u_dt, i * a.u_stride), a.u_dt, ub, F);
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) {
      const Acc g = gb[j];
      gb[j] = g / (Acc(1) + exp_acc(-g)) * ub[j];
    }
    store_out(gb, elem_ptr(a.out, a.o_dt, i * a.o_stride), a.o_dt, F, stage, stream);
  }
  if (stream) stream_fence();
}

template <typename Acc>
FL_INLINE void swiglu_bwd_rows(const SwigluArgs& a, int64_t r0, int64_t r1, Acc* gb, Acc* ub, Acc* db,
                               Acc* stage) {
  const int64_t F = a.F;
  const bool stream = a.M * F * dtype_size(a.o_dt) >= kStreamMinBytes;
  for (int64_t i = r0; i < r1; ++i) {
    load_row(elem_ptr(a.gate, a.g_dt, i * a.g_stride), a.g_dt, gb, F);
    load_row(elem_ptr(a.up, a.u_dt, i * a.u_stride), a.u_dt, ub, F);
    load_row(elem_ptr(a.dout, a.d_dt, i * a.d_stride), a.d_dt, db, F);
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) {
      const Acc g = gb[j], d = db[j];
      const Acc s = Acc(1) / (Acc(1) + exp_acc(-g));
      gb[j] = d * ub[j] * s * (Acc(1) + g * (Acc(1) - s));  // d gate
      ub[j] = d * g * s;                                    // d up
    }
    store_out(gb, elem_ptr(a.out, a.o_dt, i * a.o_stride), a.o_dt, F, stage, stream);
    store_out(ub, elem_ptr(a.dup, a.du_dt, i * a.du_stride), a.du_dt, F, stage, stream);
  }
  if (stream) stream_fence();
}

// Row-range entry points; on x86-64 each has an AVX2/FMA/F16C clone picked at load time.
#define FL_ENTRY(name, Args, body_f32, body_f64)                                     \
  FL_CLONES void name##_f32(const Args& a, int64_t r0, int64_t r1, float* ws, float* dw) { body_f32; } \
  FL_CLONES void name##_f64(const Args& a, int64_t r0, int64_t r1, double* ws, double* dw) { body_f64; }

#define FL_HNR_FWD(T) (void)dw; hnr_fwd_rows<T>(a, r0, r1, ws, ws + a.D, ws + 2 * a.D)
#define FL_HNR_BWD(T) hnr_bwd_rows<T>(a, r0, r1, ws, ws + a.D, ws + 2 * a.D, ws + 3 * a.D, dw)
#define FL_SWI_FWD(T) (void)dw; swiglu_fwd_rows<T>(a, r0, r1, ws, ws + a.F, ws + 2 * a.F)
#define FL_SWI_BWD(T) (void)dw; swiglu_bwd_rows<T>(a, r0, r1, ws, ws + a.F, ws + 2 * a.F, ws + 3 * a.F)
FL_ENTRY(hnr_fwd, HeadNormRopeArgs, FL_HNR_FWD(float), FL_HNR_FWD(double))
FL_ENTRY(hnr_bwd, HeadNormRopeBwdArgs, FL_HNR_BWD(float), FL_HNR_BWD(double))
FL_ENTRY(swi_fwd, SwigluArgs, FL_SWI_FWD(float), FL_SWI_FWD(double))
FL_ENTRY(swi_bwd, SwigluArgs, FL_SWI_BWD(float), FL_SWI_BWD(double))

// Split `rows` into `parts` blocks; part p gets 4*width accumulators of workspace
// and row p of dw_part (when given). Every part runs, even an empty one, so that
// its dw_part row is written.
template <typename Args, typename F32, typename F64>
static void run_parts(const Args& a, int64_t rows, int64_t width, bool f64, void* workspace, void* dw_part,
                      int parts, F32 f32, F64 f64fn) {
  parallel_parts(rows, parts, [&](int p, int64_t r0, int64_t r1) {
    if (f64)
      f64fn(a, r0, r1, static_cast<double*>(workspace) + 4 * width * p,
            dw_part ? static_cast<double*>(dw_part) + width * p : nullptr);
    else
      f32(a, r0, r1, static_cast<float*>(workspace) + 4 * width * p,
          dw_part ? static_cast<float*>(dw_part) + width * p : nullptr);
  }, /*empty_too=*/true);
}

void head_norm_rope_fwd(const HeadNormRopeArgs& a, void* workspace, int parts) {
  const int64_t rows = a.B * a.T * a.H;
  if (rows == 0 || a.D == 0) return;
  run_parts(a, rows, a.D, a.x_dt == kF64, workspace, nullptr, parts, hnr_fwd_f32, hnr_fwd_f64);
}

void head_norm_rope_bwd(const HeadNormRopeBwdArgs& a, void* workspace, int parts) {
  if (a.D == 0) return;
  run_parts(a, a.B * a.T * a.H, a.D, a.x_dt == kF64, workspace, a.dw_part, parts, hnr_bwd_f32, hnr_bwd_f64);
}

void swiglu_fwd(const SwigluArgs& a, void* workspace, int parts) {
  if (a.M == 0 || a.F == 0) return;
  run_parts(a, a.M, a.F, a.g_dt == kF64, workspace, nullptr, parts, swi_fwd_f32, swi_fwd_f64);
}

void swiglu_bwd(const SwigluArgs& a, void* workspace, int parts) {
  if (a.M == 0 || a.F == 0) return;
  run_parts(a, a.M, a.F, a.g_dt == kF64, workspace, nullptr, parts, swi_bwd_f32, swi_bwd_f64);
}

}  // namespace cpu
}  // namespace fastlayers
