// MLA decoding on the CPU: attention of a few new queries (all heads share one latent
// KV row per token) over a paged cache, flash-decoding style.
//
// Phase 1: tasks = (sequence, KV split). A task walks its tokens in blocks of kTok rows:
// each cached row is converted to fp32 once and used by every head and query (the
// latent cache is one "KV head"), scores for the block, an online-softmax update, and
// the values (the row's first dv channels) accumulated. It writes its normalised
// partial output and log-sum-exp. Phase 2 merges the splits of each (b, query, head).
#include "mla.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <omp.h>

#include "convert.h"

namespace fastlayers {
namespace cpu {

constexpr int64_t kTok = 32;  // cached rows per block

int64_t mla_decode_workspace(int64_t rows, int64_t D, int64_t dv) {
  return rows * D + kTok * D + rows * kTok + rows * dv + 2 * rows;
}

template <typename Acc>
FL_INLINE void mla_task(const MlaDecodeArgs& a, int64_t b, int64_t sp, Acc* ws) {
  const int64_t D = a.D, dv = a.dv, rows = a.s_q * a.H;
  Acc* qf = ws;                   // rows x D
  Acc* kb = qf + rows * D;        // kTok x D
  Acc* sc = kb + kTok * D;        // rows x kTok
  Acc* o = sc + rows * kTok;      // rows x dv
  Acc* m = o + rows * dv;         // rows
  Acc* l = m + rows;              // rows
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  const int64_t n = a.seqlens[b];
  const int64_t t0 = std::min<int64_t>(n, sp * a.split_tokens), t1 = std::min<int64_t>(n, t0 + a.split_tokens);
  Acc* o_part = static_cast<Acc*>(a.o_part) + ((b * a.n_splits + sp) * rows) * dv;
  Acc* lse_part = static_cast<Acc*>(a.lse_part) + (b * a.n_splits + sp) * rows;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t qi = r / a.H, h = r % a.H;
    load_row(elem_ptr(a.q, a.q_dt, b * a.q_sb + qi * a.q_ss + h * a.q_sh), a.q_dt, qf + r * D, D);
    const Acc s = Acc(a.scale);
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) qf[r * D + j] *= s;
    m[r] = ninf;
    l[r] = 0;
    for (int64_t j = 0; j < dv; ++j) o[r * dv + j] = 0;
  }
  const int32_t* table = a.block_table + b * a.bt_stride;
  for (int64_t tb = t0; tb < t1; tb += kTok) {
    const int64_t nt = std::min<int64_t>(kTok, t1 - tb);
    for (int64_t j = 0; j < nt; ++j) {
      const int64_t t = tb + j;
      const int64_t blk = table[t / a.page], row = t % a.page;
      load_row(elem_ptr(a.kv, a.kv_dt, blk * a.kv_sblock + row * a.kv_srow), a.kv_dt, kb + j * D, D);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const Acc* qr = qf + r * D;
      Acc* sr = sc + r * kTok;
      // Keys visible to query qi: positions <= n - s_q + qi (causal), all otherwise.
      const int64_t last = a.causal ? n - a.s_q + r / a.H : n - 1;
      Acc mx = m[r];
      bool nan = false;
      for (int64_t j = 0; j < nt; ++j) {
        const Acc* kr = kb + j * D;
        Acc d = 0;
#pragma omp simd reduction(+ : d)
        for (int64_t c = 0; c < D; ++c) d += qr[c] * kr[c];
        sr[j] = tb + j <= last ? d : ninf;
        nan |= sr[j] != sr[j];
        if (sr[j] > mx) mx = sr[j];
      }
      if (nan) {  // NaN in, NaN out: poison the row's running state
        m[r] = l[r] = std::numeric_limits<Acc>::quiet_NaN();
        for (int64_t c = 0; c < dv; ++c) o[r * dv + c] = m[r];
        continue;
      }
      if (mx == ninf) continue;  // nothing visible yet in this block
      const Acc alpha = m[r] == ninf ? Acc(0) : exp_acc(m[r] - mx);
      Acc* orow = o + r * dv;
      Acc lsum = l[r] * alpha;
      if (alpha != Acc(1)) {
#pragma omp simd
        for (int64_t c = 0; c < dv; ++c) orow[c] *= alpha;
      }
      for (int64_t j = 0; j < nt; ++j) {
        const Acc p = sr[j] == ninf ? Acc(0) : exp_acc(sr[j] - mx);
        lsum += p;
        const Acc* vr = kb + j * D;
#pragma omp simd
        for (int64_t c = 0; c < dv; ++c) orow[c] += p * vr[c];
      }
      m[r] = mx;
      l[r] = lsum;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const bool empty = !(l[r] > 0) && !(l[r] != l[r]);  // no visible key (NaN stays NaN)
    const Acc inv = empty ? Acc(0) : Acc(1) / l[r];
    for (int64_t c = 0; c < dv; ++c) o_part[r * dv + c] = o[r * dv + c] * inv;
    lse_part[r] = empty ? ninf : m[r] + std::log(l[r]);
  }
}

template <typename Acc>
FL_INLINE void mla_merge(const MlaDecodeArgs& a, int64_t idx, Acc* buf) {
  // idx enumerates (b, query row r = qi * H + h).
  const int64_t rows = a.s_q * a.H, b = idx / rows, r = idx % rows, dv = a.dv;
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  const Acc* lse_part = static_cast<const Acc*>(a.lse_part) + b * a.n_splits * rows + r;
  Acc mx = ninf;
  bool nan = false;
  for (int64_t sp = 0; sp < a.n_splits; ++sp) {
    const Acc v = lse_part[sp * rows];
    nan |= v != v;
    if (v > mx) mx = v;
  }
  Acc total = 0;
  for (int64_t c = 0; c < dv; ++c) buf[c] = 0;
  if (mx != ninf) {
    for (int64_t sp = 0; sp < a.n_splits; ++sp) {
      const Acc v = lse_part[sp * rows];
      if (v == ninf) continue;
      const Acc w = exp_acc(v - mx);
      total += w;
      const Acc* op = static_cast<const Acc*>(a.o_part) + ((b * a.n_splits + sp) * rows + r) * dv;
#pragma omp simd
      for (int64_t c = 0; c < dv; ++c) buf[c] += w * op[c];
    }
    const Acc inv = Acc(1) / total;
#pragma omp simd
    for (int64_t c = 0; c < dv; ++c) buf[c] *= inv;
  }
  const Acc lse = nan ? std::numeric_limits<Acc>::quiet_NaN() : (mx == ninf ? ninf : mx + std::log(total));
  if (nan)
    for (int64_t c = 0; c < dv; ++c) buf[c] = std::numeric_limits<Acc>::quiet_NaN();
  const int64_t qi = r / a.H, h = r % a.H;
  store_row(buf, elem_ptr(a.out, a.out_dt, ((b * a.s_q + qi) * a.H + h) * dv), a.out_dt, dv);
  static_cast<Acc*>(a.lse)[(b * a.H + h) * a.s_q + qi] = lse;
}

FL_CLONES void mla_task_f32(const MlaDecodeArgs& a, int64_t b, int64_t sp, float* ws) { mla_task<float>(a, b, sp, ws); }
FL_CLONES void mla_task_f64(const MlaDecodeArgs& a, int64_t b, int64_t sp, double* ws) {
  mla_task<double>(a, b, sp, ws);
}
FL_CLONES void mla_merge_f32(const MlaDecodeArgs& a, int64_t i, float* buf) { mla_merge<float>(a, i, buf); }
FL_CLONES void mla_merge_f64(const MlaDecodeArgs& a, int64_t i, double* buf) { mla_merge<double>(a, i, buf); }

void mla_decode(const MlaDecodeArgs& a, void* workspace, int parts) {
  if (a.B == 0 || a.s_q == 0 || a.H == 0) return;
  const bool f64 = a.q_dt == kF64;
  const int64_t per = mla_decode_workspace(a.s_q * a.H, a.D, a.dv);
  const int64_t tasks = a.B * a.n_splits, merges = a.B * a.s_q * a.H;
#pragma omp parallel num_threads(parts)
  {
    const int tid = omp_get_thread_num();
    char* ws = static_cast<char*>(workspace) + tid * per * (f64 ? 8 : 4);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      if (f64)
        mla_task_f64(a, t / a.n_splits, t % a.n_splits, reinterpret_cast<double*>(ws));
      else
        mla_task_f32(a, t / a.n_splits, t % a.n_splits, reinterpret_cast<float*>(ws));
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < merges; ++i) {
      if (f64)
        mla_merge_f64(a, i, reinterpret_cast<double*>(ws));
      else
        mla_merge_f32(a, i, reinterpret_cast<float*>(ws));
    }
  }
}

}  // namespace cpu
}  // namespace fastlayers
