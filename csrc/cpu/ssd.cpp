// Mamba-2 scan (ssd_scan) on the CPU: the recurrence, one (batch, head) item per thread at a time.
//
// The P x N state is kept transposed (s[n * P + p]) so that the step vectorises over the head
// channels p with no horizontal reductions: s[n, :] = a s[n, :] + B[n] dt x, y += C[n] s[n, :].
// A step is O(P N) with everything in L1/L2; on a CPU this beats the chunked (matmul) form, which
// does more arithmetic (chunk x chunk matrices) for no gain without tensor cores.
//
// The backward keeps checkpoints of the state every kChunk steps (forward pass 1), then walks the
// chunks backwards: recompute the chunk's states into a buffer (with y, dz, dC, dD on the way), then
// step backwards with the state gradient Hs (also transposed).
#include "ssd.h"

#include <cmath>
#include <omp.h>

#include "convert.h"

namespace fastlayers {
namespace cpu {
namespace {

constexpr int64_t kChunk = 64;

FL_INLINE int64_t n_chunks(int64_t L) { return (L + kChunk - 1) / kChunk; }
FL_INLINE int64_t fwd_ws(int64_t P, int64_t N) { return P * N + 8 * P; }
FL_INLINE int64_t bwd_ws(int64_t L, int64_t P, int64_t N) {
  return (n_chunks(L) + kChunk + 2) * P * N + kChunk * P + 12 * P;
}

// Row (i0, i1, i2, 0..n) of a 4-D view into / out of accumulators.
template <typename Acc>
FL_INLINE void row_in(const View4& v, int64_t i0, int64_t i1, int64_t i2, int64_t n, Acc* out, int64_t j0 = 0) {
  const void* p =
      elem_ptr(static_cast<const void*>(v.p), v.dt, i0 * v.s[0] + i1 * v.s[1] + i2 * v.s[2] + j0 * v.s[3]);
  if (v.s[3] == 1) return load_row(p, v.dt, out, n);
  for (int64_t j = 0; j < n; ++j) load_row(elem_ptr(p, v.dt, j * v.s[3]), v.dt, out + j, 1);
}
template <typename Acc>
FL_INLINE void row_out(const Acc* in, const View4& v, int64_t i0, int64_t i1, int64_t i2, int64_t n, int64_t j0 = 0) {
  void* p = elem_ptr(v.p, v.dt, i0 * v.s[0] + i1 * v.s[1] + i2 * v.s[2] + j0 * v.s[3]);
  if (v.s[3] == 1) return store_row(in, p, v.dt, n);
  for (int64_t j = 0; j < n; ++j) store_row(in + j, elem_ptr(p, v.dt, j * v.s[3]), v.dt, 1);
}

// (b, h, p, n) view <-> transposed state s[n * P + p].
template <typename Acc>
FL_INLINE void state_in(const View4& v, int64_t b, int64_t h, int64_t P, int64_t N, Acc* s, Acc* tmp) {
  for (int64_t p = 0; p < P; ++p) {
    row_in(v, b, h, p, N, tmp);
    for (int64_t n = 0; n < N; ++n) s[n * P + p] = tmp[n];
  }
}
template <typename Acc>
FL_INLINE void state_out(const Acc* s, const View4& v, int64_t b, int64_t h, int64_t P, int64_t N, Acc* tmp) {
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t n = 0; n < N; ++n) tmp[n] = s[n * P + p];
    row_out(tmp, v, b, h, p, N);
  }
}

template <typename Acc>
FL_INLINE Acc sigmoid_acc(Acc x) { return Acc(1) / (Acc(1) + exp_acc(-x)); }

// out = a prev + B dtx^T (transposed states); y = out^T C when y is given (else the output is skipped).
// prev may equal out (in-place step).
template <typename Acc>
FL_INLINE void step(const Acc* prev, Acc* out, const Acc* bt, const Acc* ct, const Acc* dtx, Acc a, Acc* y,
                    int64_t P, int64_t N) {
  if (y) {
    for (int64_t p = 0; p < P; ++p) y[p] = 0;
    int64_t n = 0;
    for (; n + 4 <= N; n += 4) {
      const Acc *q0 = prev + n * P, *q1 = q0 + P, *q2 = q1 + P, *q3 = q2 + P;
      Acc *o0 = out + n * P, *o1 = o0 + P, *o2 = o1 + P, *o3 = o2 + P;
      const Acc b0 = bt[n], b1 = bt[n + 1], b2 = bt[n + 2], b3 = bt[n + 3];
      const Acc c0 = ct[n], c1 = ct[n + 1], c2 = ct[n + 2], c3 = ct[n + 3];
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        const Acc u = dtx[p];
        const Acc v0 = a * q0[p] + b0 * u, v1 = a * q1[p] + b1 * u;
        const Acc v2 = a * q2[p] + b2 * u, v3 = a * q3[p] + b3 * u;
        o0[p] = v0;
        o1[p] = v1;
        o2[p] = v2;
        o3[p] = v3;
        y[p] += (c0 * v0 + c1 * v1) + (c2 * v2 + c3 * v3);
      }
    }
    for (; n < N; ++n) {
      const Acc* q = prev + n * P;
      Acc* o = out + n * P;
      const Acc bn = bt[n], cn = ct[n];
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) {
        const Acc v = a * q[p] + bn * dtx[p];
        o[p] = v;
        y[p] += cn * v;
      }
    }
  } else {
    for (int64_t n = 0; n < N; ++n) {
      const Acc* q = prev + n * P;
      Acc* o = out + n * P;
      const Acc bn = bt[n];
#pragma omp simd
      for (int64_t p = 0; p < P; ++p) o[p] = a * q[p] + bn * dtx[p];
    }
  }
}

template <typename Acc>
struct Item {
  int64_t b, h, g;
  const Acc *dt, *B, *C;  // dt row (stride H), B/C rows of (b, ., g) (stride G * N)
  const uint8_t* reset;   // (L,) or null
  const int64_t* vslot;   // (L,) or null: the varlen-state slot of each step (-1: none)
  Acc A;
};

template <typename Acc>
FL_INLINE Item<Acc> item(const SsdScanArgs& a, int64_t r) {
  Item<Acc> it;
  it.b = r / a.H;
  it.h = r % a.H;
  it.g = it.h / (a.H / a.G);
  it.dt = static_cast<const Acc*>(a.dt) + it.b * a.L * a.H + it.h;
  it.B = static_cast<const Acc*>(a.B) + (it.b * a.L * a.G + it.g) * a.N;
  it.C = static_cast<const Acc*>(a.C) + (it.b * a.L * a.G + it.g) * a.N;
  it.reset = a.reset ? a.reset + it.b * a.L : nullptr;
  it.vslot = a.vslot ? a.vslot + it.b * a.L : nullptr;
  it.A = static_cast<const Acc*>(a.A)[it.h];
  return it;
}

template <typename Acc>
FL_INLINE void load_D(const SsdScanArgs& a, int64_t h, Acc* Dr) {
  for (int64_t p = 0; p < a.P; ++p)
    load_row(elem_ptr(static_cast<const void*>(a.D.p), a.D.dt, h * a.D.s[0] + p * a.D.s[1]), a.D.dt, Dr + p, 1);
}

// The forward walks each item in blocks of kFwdP head channels (independent rows of the state): a
// kFwdP x N state stays in L1 for the whole sequence.
constexpr int64_t kFwdP = 32;

template <typename Acc>
void fwd_items(const SsdScanArgs& a, int64_t r0, int64_t r1, Acc* ws) {
  const int64_t L = a.L, P = a.P, N = a.N, GN = a.G * a.N, H = a.H, PB0 = P < kFwdP ? P : kFwdP;
  Acc *s = ws, *xr = s + PB0 * N, *dtx = xr + P, *y = dtx + P, *zr = y + P, *Dr = zr + P, *tmp = Dr + P;
  // tmp needs N: it spans the rest of the workspace (>= 3P + N).
  for (int64_t r = r0; r < r1; ++r) {
    const Item<Acc> it = item<Acc>(a, r);
    if (a.D.p) load_D(a, it.h, Dr);
    for (int64_t p0 = 0; p0 < P; p0 += kFwdP) {
      const int64_t PB = P - p0 < kFwdP ? P - p0 : kFwdP;
      if (a.init.p) {
        for (int64_t p = 0; p < PB; ++p) {
          row_in(a.init, it.b, it.h, p0 + p, N, tmp);
          for (int64_t n = 0; n < N; ++n) s[n * PB + p] = tmp[n];
        }
      } else {
        for (int64_t i = 0; i < PB * N; ++i) s[i] = 0;
      }
      for (int64_t t = 0; t < L; ++t) {
        if (it.reset && t > 0 && it.reset[t])
          for (int64_t i = 0; i < PB * N; ++i) s[i] = 0;
        const Acc dtt = it.dt[t * H], ea = exp_acc(dtt * it.A);
        row_in(a.x, it.b, t, it.h, PB, xr, p0);
#pragma omp simd
        for (int64_t p = 0; p < PB; ++p) dtx[p] = dtt * xr[p];
        step(s, s, it.B + t * GN, it.C + t * GN, dtx, ea, y, PB, N);
        if (a.D.p) {
#pragma omp simd
          for (int64_t p = 0; p < PB; ++p) y[p] += Dr[p0 + p] * xr[p];
        }
        if (a.z.p) {
          row_in(a.z, it.b, t, it.h, PB, zr, p0);
#pragma omp simd
          for (int64_t p = 0; p < PB; ++p) y[p] *= zr[p] * sigmoid_acc(zr[p]);
        }
        row_out(y, a.out, it.b, t, it.h, PB, p0);
        if (it.vslot && it.vslot[t] >= 0 && a.varlen.p) {
          for (int64_t p = 0; p < PB; ++p) {
            for (int64_t n = 0; n < N; ++n) tmp[n] = s[n * PB + p];
            row_out(tmp, a.varlen, it.vslot[t], it.h, p0 + p, N);
          }
        }
      }
      if (a.final_state.p) {
        for (int64_t p = 0; p < PB; ++p) {
          for (int64_t n = 0; n < N; ++n) tmp[n] = s[n * PB + p];
          row_out(tmp, a.final_state, it.b, it.h, p0 + p, N);
        }
      }
    }
  }
}

template <typename Acc>
void bwd_items(const SsdScanArgs& a, int part, int64_t r0, int64_t r1, Acc* ws) {
  const int64_t L = a.L, P = a.P, N = a.N, GN = a.G * a.N, H = a.H, PN = P * N, nck = n_chunks(L);
  Acc *ck = ws, *sb = ck + nck * PN, *Hs = sb + kChunk * PN, *zero = Hs + PN, *gb = zero + PN;
  Acc *xr = gb + kChunk * P, *dtx = xr + P, *y = dtx + P, *zr = y + P, *hb = zr + P;
  Acc *dxr = hb + P, *dzr = dxr + P, *Dr = dzr + P, *dDr = Dr + P, *tmp = dDr + P;  // tmp: >= N
  const int64_t part_off = int64_t(part) * a.batch * a.L * GN;
  for (int64_t i = 0; i < PN; ++i) zero[i] = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const Item<Acc> it = item<Acc>(a, r);
    Acc* dBp = static_cast<Acc*>(a.dB_part) + part_off + (it.b * a.L * a.G + it.g) * a.N;
    Acc* dCp = static_cast<Acc*>(a.dC_part) + part_off + (it.b * a.L * a.G + it.g) * a.N;
    Acc* ddt = static_cast<Acc*>(a.ddt) + it.b * L * H + it.h;
    if (a.D.p) load_D(a, it.h, Dr);
    for (int64_t p = 0; p < P; ++p) dDr[p] = 0;
    // Pass 1: the state entering each chunk (before the reset test of its first step).
    Acc* s = Hs;  // Hs is free until the backward walk
    if (a.init.p)
      state_in(a.init, it.b, it.h, P, N, s, sb);
    else
      for (int64_t i = 0; i < PN; ++i) s[i] = 0;
    for (int64_t c = 0; c < nck; ++c) {
      Acc* cs = ck + c * PN;
      for (int64_t i = 0; i < PN; ++i) cs[i] = s[i];
      if (c == nck - 1) break;
      for (int64_t t = c * kChunk; t < (c + 1) * kChunk; ++t) {
        if (it.reset && t > 0 && it.reset[t])
          for (int64_t i = 0; i < PN; ++i) s[i] = 0;
        const Acc dtt = it.dt[t * H];
        row_in(a.x, it.b, t, it.h, P, xr);
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) dtx[p] = dtt * xr[p];
        step<Acc>(s, s, it.B + t * GN, nullptr, dtx, exp_acc(dtt * it.A), nullptr, P, N);
      }
    }
    // The state gradient from the final state's.
    if (a.dfinal.p)
      state_in(a.dfinal, it.b, it.h, P, N, Hs, sb);
    else
      for (int64_t i = 0; i < PN; ++i) Hs[i] = 0;
    Acc dA = 0;
    for (int64_t c = nck - 1; c >= 0; --c) {
      const int64_t t0 = c * kChunk, T = L - t0 < kChunk ? L - t0 : kChunk;
      // Recompute the chunk's states; y (before the gate) for dz; g = dout silu(z); dC, dD.
      for (int64_t i = 0; i < T; ++i) {
        const int64_t t = t0 + i;
        const Acc* prev = i == 0 ? ck + c * PN : sb + (i - 1) * PN;
        if (it.reset && t > 0 && it.reset[t]) prev = zero;
        const Acc dtt = it.dt[t * H];
        row_in(a.x, it.b, t, it.h, P, xr);
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) dtx[p] = dtt * xr[p];
        Acc* cur = sb + i * PN;
        step(prev, cur, it.B + t * GN, it.C + t * GN, dtx, exp_acc(dtt * it.A), y, P, N);
        Acc* g = gb + i * P;
        row_in(a.dout, it.b, t, it.h, P, g);
        if (a.z.p) {
          row_in(a.z, it.b, t, it.h, P, zr);
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) {
            const Acc zt = zr[p], sg = sigmoid_acc(zt), yf = y[p] + (a.D.p ? Dr[p] * xr[p] : Acc(0));
            dzr[p] = g[p] * yf * sg * (Acc(1) + zt * (Acc(1) - sg));
            g[p] *= zt * sg;
          }
          if (a.dz.p) row_out(dzr, a.dz, it.b, t, it.h, P);
        }
        if (a.D.p) {
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) dDr[p] += g[p] * xr[p];
        }
        Acc* dct = dCp + t * GN;
        for (int64_t n = 0; n < N; ++n) {
          const Acc* sn = cur + n * P;
          Acc acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t p = 0; p < P; ++p) acc += g[p] * sn[p];
          dct[n] += acc;
        }
      }
      // Backwards through the chunk: h = Hs + C g^T is dL/ds_t; Hs becomes dL/ds_{t-1} = a_t h.
      for (int64_t i = T - 1; i >= 0; --i) {
        const int64_t t = t0 + i;
        const bool rs = it.reset && t > 0 && it.reset[t];
        const Acc* prev = rs ? zero : (i == 0 ? ck + c * PN : sb + (i - 1) * PN);
        const Acc dtt = it.dt[t * H], ea = exp_acc(dtt * it.A), keep = rs ? Acc(0) : ea;
        if (it.vslot && it.vslot[t] >= 0 && a.dvarlen.p) {  // the varlen state s_t's own gradient
          for (int64_t p = 0; p < P; ++p) {
            row_in(a.dvarlen, it.vslot[t], it.h, p, N, tmp);
            for (int64_t n = 0; n < N; ++n) Hs[n * P + p] += tmp[n];
          }
        }
        row_in(a.x, it.b, t, it.h, P, xr);
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) {
          dtx[p] = dtt * xr[p];
          hb[p] = 0;
        }
        const Acc *bt = it.B + t * GN, *ct = it.C + t * GN, *g = gb + i * P;
        Acc* dbt = dBp + t * GN;
        Acc da = 0;
        for (int64_t n = 0; n < N; ++n) {
          Acc* Hn = Hs + n * P;
          const Acc* sp = prev + n * P;
          const Acc bn = bt[n], cn = ct[n];
          Acc db = 0;
#pragma omp simd reduction(+ : db, da)
          for (int64_t p = 0; p < P; ++p) {
            const Acc hv = Hn[p] + cn * g[p];
            da += hv * sp[p];
            db += hv * dtx[p];
            hb[p] += hv * bn;
            Hn[p] = keep * hv;
          }
          dbt[n] += db;
        }
        Acc dxa = 0;
#pragma omp simd reduction(+ : dxa)
        for (int64_t p = 0; p < P; ++p) {
          dxa += xr[p] * hb[p];
          dxr[p] = dtt * hb[p] + (a.D.p ? Dr[p] * g[p] : Acc(0));
        }
        row_out(dxr, a.dx, it.b, t, it.h, P);
        ddt[t * H] = dxa + da * it.A * ea;
        dA += da * dtt * ea;
      }
    }
    static_cast<Acc*>(a.dA)[r] = dA;
    if (a.dD) {
      Acc* dd = static_cast<Acc*>(a.dD) + r * P;
      for (int64_t p = 0; p < P; ++p) dd[p] = dDr[p];
    }
    if (a.dinit.p) state_out(Hs, a.dinit, it.b, it.h, P, N, sb);
  }
}

FL_CLONES void fwd_f32(const SsdScanArgs& a, int64_t r0, int64_t r1, float* ws) { fwd_items<float>(a, r0, r1, ws); }
FL_CLONES void fwd_f64(const SsdScanArgs& a, int64_t r0, int64_t r1, double* ws) {
  fwd_items<double>(a, r0, r1, ws);
}
FL_CLONES void bwd_f32(const SsdScanArgs& a, int part, int64_t r0, int64_t r1, float* ws) {
  bwd_items<float>(a, part, r0, r1, ws);
}
FL_CLONES void bwd_f64(const SsdScanArgs& a, int part, int64_t r0, int64_t r1, double* ws) {
  bwd_items<double>(a, part, r0, r1, ws);
}

}  // namespace

int64_t ssd_scan_workspace(int64_t L, int64_t P, int64_t N, bool backward) {
  // + N: the state (de)transposes use a row of N scratch after the row buffers.
  return (backward ? bwd_ws(L, P, N) : fwd_ws(P, N)) + N;
}

void ssd_scan_fwd(const SsdScanArgs& a, void* workspace, int parts) {
  const int64_t items = a.batch * a.H, per = ssd_scan_workspace(a.L, a.P, a.N, false);
  if (items == 0 || a.P == 0) return;
  run_rows(a, items, a.x.dt == kF64, workspace, per, parts, fwd_f32, fwd_f64);
}

void ssd_scan_bwd(const SsdScanArgs& a, void* workspace, int parts) {
  const int64_t items = a.batch * a.H, per = ssd_scan_workspace(a.L, a.P, a.N, true);
  if (items == 0 || a.P == 0) return;
  const bool f64 = a.x.dt == kF64;
  parallel_parts(items, parts, [&](int t, int64_t r0, int64_t r1) {
    if (f64)
      bwd_f64(a, t, r0, r1, static_cast<double*>(workspace) + per * t);
    else
      bwd_f32(a, t, r0, r1, static_cast<float*>(workspace) + per * t);
  });
}

}  // namespace cpu
}  // namespace fastlayers
