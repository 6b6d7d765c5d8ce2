// Mamba scans on the CPU. selective_state_update: the one-token decode step.
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
  const bool f64 = a.state.dt == kF64;
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int t = 0; t < parts; ++t) {
    int64_t r0, r1;
    split_rows(rows, parts, t, &r0, &r1);
    if (r0 == r1) continue;
    if (f64)
      state_update_f64(a, r0, r1, static_cast<double*>(workspace) + 4 * a.N * t);
    else
      state_update_f32(a, r0, r1, static_cast<float*>(workspace) + 4 * a.N * t);
  }
}

}  // namespace cpu
}  // namespace fastlayers
