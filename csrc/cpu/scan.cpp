// Mamba scans on the CPU. selective_state_update: the one-token decode step;
// selective_scan_fwd/bwd: the Mamba-1 scan over whole sequences (further down).
//
// Rows are (batch, head, p) triples of N states, split into contiguous blocks per
// OpenMP thread; a row's state, A, B and C are staged in accumulator buffers so the
// update and the <s, C> reduction vectorise over N (exp included, see exp_acc).
#include "scan.h"

#include <cmath>
#include <omp.h>

#include "convert.h"

namespace fastlayers {
namespace cpu {

FL_INLINE const void* at(const View4& v, int64_t i0, int64_t i1, int64_t i2) {
  return elem_ptr(static_cast<const void*>(v.p), v.dt, i0 * v.s[0] + i1 * v.s[1] + i2 * v.s[2]);
}

template <typename Acc>
FL_INLINE Acc load1(const View4& v, int64_t i0, int64_t i1, int64_t i2) {
  Acc r = 0;
  load_row(at(v, i0, i1, i2), v.dt, &r, 1);
  return r;
}

// Load N elements with element stride s (contiguous fast path).
template <typename Acc>
FL_INLINE void load_n(const View4& v, const void* p, int64_t n, int64_t s, Acc* out) {
  if (s == 1) return load_row(p, v.dt, out, n);
  for (int64_t j = 0; j < n; ++j) load_row(elem_ptr(p, v.dt, j * s), v.dt, out + j, 1);
}

template <typename Acc>
FL_INLINE void state_update_rows(const StateUpdateArgs& a, int64_t r0, int64_t r1, Acc* sb, Acc* ab, Acc* bb,
                                 Acc* cb) {
  const int64_t N = a.N, heads_per_group = a.H / a.G;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t p = r % a.P, h = (r / a.P) % a.H, i = r / (a.P * a.H);
    const int64_t si = a.idx ? a.idx[i] : i, g = h / heads_per_group;
    Acc dt = load1<Acc>(a.dt, i, h, p);
    if (a.dt_bias.p) dt += load1<Acc>(a.dt_bias, h, p, 0);
    if (a.softplus) dt = dt > Acc(20) ? dt : std::log1p(std::exp(dt));
    const Acc x = load1<Acc>(a.x, i, h, p), dtx = dt * x;
    void* sp = elem_ptr(a.state.p, a.state.dt, si * a.state.s[0] + h * a.state.s[1] + p * a.state.s[2]);
    load_n(a.state, sp, N, a.state.s[3], sb);
    load_n(a.B, at(a.B, i, g, 0), N, a.B.s[2], bb);
    load_n(a.C, at(a.C, i, g, 0), N, a.C.s[2], cb);
    Acc y = 0;
    if (a.A.s[2] == 0) {  // one A per (head, channel), as Mamba-2 passes it: one exp per row
      const Acc dA = exp_acc(dt * load1<Acc>(a.A, h, p, 0));
#pragma omp simd reduction(+ : y)
      for (int64_t n = 0; n < N; ++n) {
        const Acc s = dA * sb[n] + dtx * bb[n];
        sb[n] = s;
        y += s * cb[n];
      }
    } else {
      load_n(a.A, at(a.A, h, p, 0), N, a.A.s[2], ab);
#pragma omp simd reduction(+ : y)
      for (int64_t n = 0; n < N; ++n) {
        const Acc s = exp_acc(dt * ab[n]) * sb[n] + dtx * bb[n];
        sb[n] = s;
        y += s * cb[n];
      }
    }
    if (a.state.s[3] == 1) {
      store_row(sb, sp, a.state.dt, N);
    } else {
      for (int64_t n = 0; n < N; ++n) store_row(sb + n, elem_ptr(sp, a.state.dt, n * a.state.s[3]), a.state.dt, 1);
    }
    if (a.D.p) y += load1<Acc>(a.D, h, p, 0) * x;
    if (a.z.p) {
      const Acc z = load1<Acc>(a.z, i, h, p);
      y *= z / (Acc(1) + exp_acc(-z));
    }
    store_row(&y, elem_ptr(a.out.p, a.out.dt, i * a.out.s[0] + h * a.out.s[1] + p * a.out.s[2]), a.out.dt, 1);
  }
}

FL_CLONES void state_update_f32(const StateUpdateArgs& a, int64_t r0, int64_t r1, float* ws) {
  state_update_rows<float>(a, r0, r1, ws, ws + a.N, ws + 2 * a.N, ws + 3 * a.N);
}
FL_CLONES void state_update_f64(const StateUpdateArgs& a, int64_t r0, int64_t r1, double* ws) {
  state_update_rows<double>(a, r0, r1, ws, ws + a.N, ws + 2 * a.N, ws + 3 * a.N);
}

void selective_state_update(const StateUpdateArgs& a, void* workspace, int parts) {
  const int64_t rows = a.batch * a.H * a.P;
  if (rows == 0) return;
  run_rows(a, rows, a.state.dt == kF64, workspace, 4 * a.N, parts, state_update_f32, state_update_f64);
}

// ============================================================================ selective scan
// One (batch, dim) channel at a time per thread: its rows of u, delta (made into dt) and z are
// staged in accumulator buffers; the walk over t keeps the N-vector state in L1 and vectorises
// over N (exp_acc). The backward recomputes the channel's states and exp(dt A) into an L x N
// buffer, then walks t backwards with the state gradient h.

// softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p(y) = 2 atanh(s), s = y / (2 + y) <= 1/3,
// by its odd series to s^15 (truncation < 2e-9 relative): arithmetic only, so loops vectorise.
// x > 20 returns x, as torch's softplus does; NaN stays NaN.
FL_INLINE float softplus_acc(float x) {
  const float ax = x < 0.0f ? -x : x;
  const float y = exp_f32(-ax);
  const float s = y / (2.0f + y), s2 = s * s;
  float p = 1.0f / 15;
  p = p * s2 + 1.0f / 13;
  p = p * s2 + 1.0f / 11;
  p = p * s2 + 1.0f / 9;
  p = p * s2 + 1.0f / 7;
  p = p * s2 + 1.0f / 5;
  p = p * s2 + 1.0f / 3;
  p = p * s2 + 1.0f;
  const float r = (x > 0.0f ? x : 0.0f) + 2.0f * s * p;
  return x > 20.0f ? x : r;
}
FL_INLINE double softplus_acc(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

template <typename Acc>
FL_INLINE Acc sigmoid_acc(Acc x) { return Acc(1) / (Acc(1) + exp_acc(-x)); }

// Row (b, d, 0..L) of a (batch, dim, L) view into/out of accumulators.
template <typename Acc>
FL_INLINE void load_t(const View4& v, int64_t b, int64_t d, int64_t L, Acc* out) {
  load_n(v, at(v, b, d, 0), L, v.s[2], out);
}
template <typename Acc>
FL_INLINE void store_t(const Acc* in, const View4& v, int64_t b, int64_t d, int64_t L) {
  void* p = elem_ptr(v.p, v.dt, b * v.s[0] + d * v.s[1]);
  if (v.s[2] == 1) return store_row(in, p, v.dt, L);
  for (int64_t j = 0; j < L; ++j) store_row(in + j, elem_ptr(p, v.dt, j * v.s[2]), v.dt, 1);
}

// dt = softplus(delta + bias) for the channel's row; sig = sigmoid(delta + bias) (softplus' derivative)
// when sig is given.
template <typename Acc>
FL_INLINE void dt_row(const SelectiveScanArgs& a, int64_t b, int64_t d, Acc* dt, Acc* sig) {
  const int64_t L = a.L;
  load_t(a.delta, b, d, L, dt);
  const Acc bias = a.delta_bias.p ? load1<Acc>(a.delta_bias, d, 0, 0) : Acc(0);
  if (!a.softplus) {
    if (a.delta_bias.p) {
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) dt[t] += bias;
    }
    return;
  }
  if (sig) {
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) sig[t] = sigmoid_acc(dt[t] + bias);
  }
#pragma omp simd
  for (int64_t t = 0; t < L; ++t) dt[t] = softplus_acc(dt[t] + bias);
}

// The decays exp(dt_t A) of a block of kScanChunk steps are computed first, in a loop with no
// dependence between iterations (throughput-bound); the recurrence then carries only one FMA per step.
constexpr int64_t kScanChunk = 256;

FL_INLINE int64_t scan_fwd_ws(int64_t L, int64_t N) { return 3 * L + 2 * N + kScanChunk * N; }
FL_INLINE int64_t scan_bwd_ws(int64_t L, int64_t N) { return 8 * L + 2 * L * N + 5 * N; }

// ea[t * N + n] = exp(dt[t] A[n]) for t < T.
template <typename Acc>
FL_INLINE void decays(const Acc* dt, const Acc* Ar, int64_t T, int64_t N, Acc* ea) {
  for (int64_t t = 0; t < T; ++t) {
    const Acc dtt = dt[t];
    Acc* e = ea + t * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) e[n] = exp_acc(dtt * Ar[n]);
  }
}

template <typename Acc>
FL_INLINE void scan_fwd_rows(const SelectiveScanArgs& a, int64_t r0, int64_t r1, Acc* ws) {
  const int64_t L = a.L, N = a.N, gb = a.dim / a.GB, gc = a.dim / a.GC;
  const int64_t bst = a.B.s[2], cst = a.C.s[2];
  Acc *u = ws, *dt = u + L, *y = dt + L, *x = y + L, *Ar = x + N, *ea = Ar + N;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.dim, d = r % a.dim;
    load_t(a.u, b, d, L, u);
    dt_row<Acc>(a, b, d, dt, nullptr);
    load_n(a.A, at(a.A, d, 0, 0), N, a.A.s[1], Ar);
    const Acc* Bp = static_cast<const Acc*>(a.B.p) + b * a.B.s[0] + (d / gb) * a.B.s[1];
    const Acc* Cp = static_cast<const Acc*>(a.C.p) + b * a.C.s[0] + (d / gc) * a.C.s[1];
#pragma omp simd
    for (int64_t t = 0; t < L; ++t) y[t] = dt[t] * u[t];  // dt u, overwritten by y step by step
    for (int64_t n = 0; n < N; ++n) x[n] = 0;
    for (int64_t t0 = 0; t0 < L; t0 += kScanChunk) {
      const int64_t T = L - t0 < kScanChunk ? L - t0 : kScanChunk;
      decays(dt + t0, Ar, T, N, ea);
      for (int64_t i = 0; i < T; ++i) {
        const int64_t t = t0 + i;
        const Acc dtu = y[t];
        const Acc *bt = Bp + t * bst, *ct = Cp + t * cst, *e = ea + i * N;
        Acc yt = 0;
#pragma omp simd reduction(+ : yt)
        for (int64_t n = 0; n < N; ++n) {
          const Acc s = e[n] * x[n] + dtu * bt[n];
          x[n] = s;
          yt += s * ct[n];
        }
        y[t] = yt;
      }
    }
    if (a.D.p) {
      const Acc Dd = load1<Acc>(a.D, d, 0, 0);
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) y[t] += Dd * u[t];
    }
    if (a.z.p) {
      Acc* zr = dt;  // dt is no longer needed
      load_t(a.z, b, d, L, zr);
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) y[t] *= zr[t] * sigmoid_acc(zr[t]);
    }
    store_t(y, a.out, b, d, L);
    if (a.last.p) {
      void* lp = elem_ptr(a.last.p, a.last.dt, b * a.last.s[0] + d * a.last.s[1]);
      if (a.last.s[2] == 1)
        store_row(x, lp, a.last.dt, N);
      else
        for (int64_t n = 0; n < N; ++n) store_row(x + n, elem_ptr(lp, a.last.dt, n * a.last.s[2]), a.last.dt, 1);
    }
  }
}

template <typename Acc>
FL_INLINE void scan_bwd_rows(const SelectiveScanArgs& a, int part, int64_t r0, int64_t r1, Acc* ws) {
  const int64_t L = a.L, N = a.N, gb = a.dim / a.GB, gc = a.dim / a.GC;
  const int64_t bst = a.B.s[2], cst = a.C.s[2];
  Acc *u = ws, *dt = u + L, *sig = dt + L, *g = sig + L, *y = g + L, *du = y + L, *dd = du + L, *dz = dd + L;
  Acc *xs = dz + L, *ea = xs + L * N, *Ar = ea + L * N, *h = Ar + N, *dAl = h + N, *zero = dAl + N, *xt = zero + N;
  Acc* dA_part = static_cast<Acc*>(a.dA_part) + int64_t(part) * a.dim * N;
  Acc* dD_part = a.dD_part ? static_cast<Acc*>(a.dD_part) + int64_t(part) * a.dim : nullptr;
  Acc* dbias_part = a.dbias_part ? static_cast<Acc*>(a.dbias_part) + int64_t(part) * a.dim : nullptr;
  for (int64_t n = 0; n < N; ++n) zero[n] = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / a.dim, d = r % a.dim;
    load_t(a.u, b, d, L, u);
    dt_row<Acc>(a, b, d, dt, a.softplus ? sig : nullptr);
    load_n(a.A, at(a.A, d, 0, 0), N, a.A.s[1], Ar);
    load_t(a.dout, b, d, L, g);
    const int64_t boff = b * a.B.s[0] + (d / gb) * a.B.s[1], coff = b * a.C.s[0] + (d / gc) * a.C.s[1];
    const Acc* Bp = static_cast<const Acc*>(a.B.p) + boff;
    const Acc* Cp = static_cast<const Acc*>(a.C.p) + coff;
    Acc* dBp = static_cast<Acc*>(a.dB_part) + int64_t(part) * a.dB_part_stride + boff;
    Acc* dCp = static_cast<Acc*>(a.dC_part) + int64_t(part) * a.dC_part_stride + coff;
    const Acc Dd = a.D.p ? load1<Acc>(a.D, d, 0, 0) : Acc(0);
    // Recompute the states x_t and the decays exp(dt_t A); y_t (before the gate) when z needs it.
    decays(dt, Ar, L, N, ea);
    for (int64_t n = 0; n < N; ++n) xt[n] = 0;
    for (int64_t t = 0; t < L; ++t) {
      const Acc dtu = dt[t] * u[t];
      const Acc *bt = Bp + t * bst, *ct = Cp + t * cst, *eo = ea + t * N;
      Acc* xo = xs + t * N;
      Acc yt = 0;
#pragma omp simd reduction(+ : yt)
      for (int64_t n = 0; n < N; ++n) {
        const Acc s = eo[n] * xt[n] + dtu * bt[n];
        xo[n] = s;
        xt[n] = s;
        yt += s * ct[n];
      }
      y[t] = yt;
    }
    // g = dout * silu(z) (the gradient of y), dz = dout * y * silu'(z).
    if (a.z.p) {
      Acc* zr = dz;
      load_t(a.z, b, d, L, zr);
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) {
        const Acc zt = zr[t], sg = sigmoid_acc(zt), yf = y[t] + Dd * u[t];
        dz[t] = g[t] * yf * sg * (Acc(1) + zt * (Acc(1) - sg));
        g[t] *= zt * sg;
      }
    }
    // The state gradient h (of x_t), from the last state's gradient backwards.
    if (a.dlast.p) {
      const void* lp = at(a.dlast, b, d, 0);
      load_n(a.dlast, lp, N, a.dlast.s[2], h);
    } else {
      for (int64_t n = 0; n < N; ++n) h[n] = 0;
    }
    for (int64_t n = 0; n < N; ++n) dAl[n] = 0;
    for (int64_t t = L - 1; t >= 0; --t) {
      const Acc gt = g[t], dtt = dt[t], ut = u[t];
      const Acc *bt = Bp + t * bst, *ct = Cp + t * cst, *xo = xs + t * N, *eo = ea + t * N;
      const Acc* xp = t ? xs + (t - 1) * N : zero;
      Acc *dbt = dBp + t * bst, *dct = dCp + t * cst;
      Acc ddt = 0, dut = 0;
#pragma omp simd reduction(+ : ddt, dut)
      for (int64_t n = 0; n < N; ++n) {
        const Acc hn = h[n] + gt * ct[n];
        const Acc ex = eo[n] * xp[n] * hn;
        dct[n] += gt * xo[n];
        dbt[n] += hn * dtt * ut;
        dAl[n] += ex * dtt;
        ddt += ex * Ar[n] + hn * bt[n] * ut;
        dut += hn * bt[n];
        h[n] = hn * eo[n];
      }
      dd[t] = ddt;
      du[t] = dut * dtt + gt * Dd;
    }
    if (a.softplus) {
#pragma omp simd
      for (int64_t t = 0; t < L; ++t) dd[t] *= sig[t];
    }
    Acc* dAp = dA_part + d * N;
    for (int64_t n = 0; n < N; ++n) dAp[n] += dAl[n];
    if (dD_part) {
      Acc s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t t = 0; t < L; ++t) s += g[t] * u[t];
      dD_part[d] += s;
    }
    if (dbias_part) {
      Acc s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t t = 0; t < L; ++t) s += dd[t];
      dbias_part[d] += s;
    }
    store_t(du, a.du, b, d, L);
    store_t(dd, a.ddelta, b, d, L);
    if (a.z.p && a.dz.p) store_t(dz, a.dz, b, d, L);
  }
}

FL_CLONES void scan_fwd_f32(const SelectiveScanArgs& a, int64_t r0, int64_t r1, float* ws) {
  scan_fwd_rows<float>(a, r0, r1, ws);
}
FL_CLONES void scan_fwd_f64(const SelectiveScanArgs& a, int64_t r0, int64_t r1, double* ws) {
  scan_fwd_rows<double>(a, r0, r1, ws);
}
FL_CLONES void scan_bwd_f32(const SelectiveScanArgs& a, int part, int64_t r0, int64_t r1, float* ws) {
  scan_bwd_rows<float>(a, part, r0, r1, ws);
}
FL_CLONES void scan_bwd_f64(const SelectiveScanArgs& a, int part, int64_t r0, int64_t r1, double* ws) {
  scan_bwd_rows<double>(a, part, r0, r1, ws);
}

int64_t selective_scan_workspace(int64_t L, int64_t N, bool backward) {
  return backward ? scan_bwd_ws(L, N) : scan_fwd_ws(L, N);
}

void selective_scan_fwd(const SelectiveScanArgs& a, void* workspace, int parts) {
  const int64_t rows = a.batch * a.dim, per = scan_fwd_ws(a.L, a.N);
  if (rows == 0 || a.L == 0) return;
  run_rows(a, rows, a.u.dt == kF64, workspace, per, parts, scan_fwd_f32, scan_fwd_f64);
}

void selective_scan_bwd(const SelectiveScanArgs& a, void* workspace, int parts) {
  const int64_t rows = a.batch * a.dim, per = scan_bwd_ws(a.L, a.N);
  if (rows == 0 || a.L == 0) return;
  const bool f64 = a.u.dt == kF64;
  parallel_parts(rows, parts, [&](int t, int64_t r0, int64_t r1) {
    if (f64)
      scan_bwd_f64(a, t, r0, r1, static_cast<double*>(workspace) + per * t);
    else
      scan_bwd_f32(a, t, r0, r1, static_cast<float*>(workspace) + per * t);
  });
}

}  // namespace cpu
}  // namespace fastlayers
