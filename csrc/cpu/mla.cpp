// MLA decoding on the CPU: attention of a few new queries (all heads share one latent
// KV row per token) over a paged cache, flash-decoding style.
//
// Phase 1: tasks = (sequence, KV head, KV split); KV head g's problem has the s_q x H / h_kv query
// rows of the heads that read it (h_kv = 1, MLA: every head). A task walks its tokens in blocks of kTok rows:
// each cached row is converted to fp32 once and used by every head and query (the
// latent cache is one "KV head"), scores for the block, an online-softmax update, and
// the values (the row's first dv channels) accumulated. It writes its normalised
// partial output and log-sum-exp. Phase 2 merges the splits of each (b, query, head).
//
// Two phase-1 kernels. The scalar one (any ISA, and fp64) does one dot product per
// (query row, cached row). The AVX2/FMA one (fp32/fp16/bf16 q, chosen at run time when the
// CPU has AVX2 and FMA) treats the latent cache as one KV head shared by all R = s_q * H
// query rows and runs both products of a tile of up to kTile cached rows as register-blocked
// micro-kernels:
//   scores  S^T (tile x R) = K_tile (tile x D) . Q^T (D x R): Q^T is prepared once per task
//           (scaled, rows padded to a multiple of 8), so the accumulators run along the query
//           rows: 6 cached rows x 16 query rows (12 ymm) per block, each K element broadcast
//           once from the cache row read in place (no gather copy; fp16/bf16 rows are
//           converted to fp32 once per tile), no horizontal sums;
//   softmax on S^T vectorised over query rows, the running max / sum of 8 rows in registers;
//   values  O^T (dv x R) = alpha * O^T + V_tile^T . P^T: the scores' blocking with D and the
//           tile swapped (6 value channels x 16 query rows per block, each V element broadcast
//           once from its cache row read in place), the rescale by alpha folded in.
// While a tile is computed, the scores kernel prefetches the next tile's rows, a cache line of
// each per 16 (fp32) or 32 (fp16/bf16) steps of its loop, so the DRAM reads overlap the FMAs.
#include "mla.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <omp.h>

#include "convert.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FL_MLA_AVX2 1
#define FL_AVX2 __attribute__((target("avx2,fma")))
#define FL_AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))
#else
#define FL_MLA_AVX2 0
#endif

namespace fastlayers {
namespace cpu {

constexpr int64_t kTok = 32;  // cached rows per block

constexpr int64_t kTile = 64;  // cached rows per tile of the vectorised kernel
constexpr int64_t kPfDist = 1;  // tiles ahead that the scores kernel prefetches (2-4: no faster)

static int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }

// Query row r of KV head g's problem (rows = s_q * H / h_kv of them): its new token qi and head h.
static inline void mla_row(const MlaDecodeArgs& a, int64_t g, int64_t r, int64_t& qi, int64_t& h) {
  const int64_t hg = a.H / a.h_kv;
  qi = r / hg;
  h = g * hg + r % hg;
}

// Cached tokens of sequence b, clamped to what the block table holds (MlaDecodeArgs::max_tokens).
static inline int64_t mla_len(const MlaDecodeArgs& a, int64_t b) {
  const int64_t n = a.seqlens[b];
  return a.max_tokens > 0 && n > a.max_tokens ? a.max_tokens : n;
}

// Floats one thread of the vectorised kernel needs (see mla_task_avx2 for the layout).
static int64_t mla_vec_workspace(int64_t rows, int64_t D, int64_t dv) {
  const int64_t Rp = round8(rows);
  return D * Rp + kTile * Rp + dv * Rp + 5 * Rp + kTile * D + round8(D) + 64;
}

int64_t mla_decode_workspace(int64_t rows, int64_t D, int64_t dv) {
  return std::max(rows * D + kTok * D + rows * kTok + rows * dv + 2 * rows, mla_vec_workspace(rows, D, dv));
}

template <typename Acc>
FL_INLINE void mla_task(const MlaDecodeArgs& a, int64_t b, int64_t g, int64_t sp, Acc* ws) {
  const int64_t D = a.D, dv = a.dv, hg = a.H / a.h_kv, rows = a.s_q * hg;
  Acc* qf = ws;                   // rows x D
  Acc* kb = qf + rows * D;        // kTok x D
  Acc* sc = kb + kTok * D;        // rows x kTok
  Acc* o = sc + rows * kTok;      // rows x dv
  Acc* m = o + rows * dv;         // rows
  Acc* l = m + rows;              // rows
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  const int64_t n = mla_len(a, b);
  const int64_t t0 = std::min<int64_t>(n, sp * a.split_tokens), t1 = std::min<int64_t>(n, t0 + a.split_tokens);
  Acc* o_part = static_cast<Acc*>(a.o_part) + ((b * a.n_splits + sp) * a.h_kv + g) * rows * dv;
  Acc* lse_part = static_cast<Acc*>(a.lse_part) + ((b * a.n_splits + sp) * a.h_kv + g) * rows;
  const int64_t kv_head = g * a.kv_shead;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t qi, h;
    mla_row(a, g, r, qi, h);
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
      load_row(elem_ptr(a.kv, a.kv_dt, blk * a.kv_sblock + row * a.kv_srow + kv_head), a.kv_dt, kb + j * D, D);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const Acc* qr = qf + r * D;
      Acc* sr = sc + r * kTok;
      // Keys visible to query qi: positions <= n - s_q + qi (causal), all otherwise.
      const int64_t last = a.causal ? n - a.s_q + r / hg : n - 1;
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

#if FL_MLA_AVX2
// ---------------------------------------------------------------------------------------------
// The vectorised kernel (AVX2 + FMA, fp32 accumulators).

// S^T rows 0..NT-1 (Rp apart), query lanes [0, 8 NV): sum_c K[t][c] * Q^T[c][r]. Every cache
// element is broadcast once and used for 8 NV query rows. With PF, the rows pf[0..NT) of the
// next tile (`es` bytes an element) are prefetched a cache line of each per line of K consumed:
// spread through the FMAs, so the loads of the next tile overlap this one's arithmetic (a burst
// of prefetches at the start of a block stalls on the miss buffers instead).
template <int NV, int NT, bool PF>
FL_AVX2 __attribute__((noinline)) static void mla_scores_block(const float* qt, int64_t Rp, const float* const* k,
                                                                int64_t D, float* st, const char* const* pf,
                                                                int64_t es) {
  __m256 acc[NT][NV];
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[t][v] = _mm256_setzero_ps();
  const float* kp[NT];
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t) kp[t] = k[t];
  const int64_t step = PF ? 64 / es : D;  // elements per cache line of a prefetched row
  for (int64_t c0 = 0; c0 < D; c0 += step) {
    if constexpr (PF) {
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) _mm_prefetch(pf[t] + c0 * es, _MM_HINT_T0);
    }
    const int64_t c1 = std::min(D, c0 + step);
    for (int64_t c = c0; c < c1; ++c) {
      __m256 qv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) qv[v] = _mm256_loadu_ps(qt + c * Rp + 8 * v);
#pragma GCC unroll 16
      for (int t = 0; t < NT; ++t) {
        const __m256 kv = _mm256_broadcast_ss(kp[t] + c);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[t][v] = _mm256_fmadd_ps(kv, qv[v], acc[t][v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(st + t * Rp + 8 * v, acc[t][v]);
}

// n (1..NT) cached rows: the block of exactly n rows (prefetching pf[0..n) when pf).
template <int NV, int NT>
FL_AVX2_INLINE void mla_scores_n(int n, const float* qt, int64_t Rp, const float* const* k, int64_t D, float* st,
                                 const char* const* pf, int64_t es) {
  if constexpr (NT > 1) {
    if (n < NT) return mla_scores_n<NV, NT - 1>(n, qt, Rp, k, D, st, pf, es);
  }
  if (pf)
    mla_scores_block<NV, NT, true>(qt, Rp, k, D, st, pf, es);
  else
    mla_scores_block<NV, NT, false>(qt, Rp, k, D, st, pf, es);
}

// S^T (nt x Rp) = K (nt rows at k[0..nt)) . Q^T (D x Rp). pf (kTile entries, or null): rows of
// the next tile to prefetch, the entries past its end repeating its last row.
FL_AVX2 static void mla_scores_tile(const float* qt, int64_t Rp, const float* const* k, int nt, int64_t D,
                                    float* st, const char* const* pf, int64_t es) {
  const int64_t nvec = Rp / 8;
  const int bt = nvec == 1 ? 12 : 6;  // cached rows per block
  for (int t = 0; t < nt; t += bt) {
    const int n = std::min(bt, nt - t);
    const char* const* bpf = pf ? pf + t : nullptr;
    if (nvec == 1) {  // up to 8 query rows: 12 cached rows x 8 lanes per block
      mla_scores_n<1, 12>(n, qt, Rp, k + t, D, st + t * Rp, bpf, es);
      continue;
    }
    int64_t v = 0;  // 6 cached rows x 16 query rows per block; the first prefetches
    for (; v + 2 <= nvec; v += 2)
      mla_scores_n<2, 6>(n, qt + 8 * v, Rp, k + t, D, st + t * Rp + 8 * v, v == 0 ? bpf : nullptr, es);
    if (v < nvec) mla_scores_n<1, 6>(n, qt + 8 * v, Rp, k + t, D, st + t * Rp + 8 * v, v == 0 ? bpf : nullptr, es);
  }
}

// exp_f32 (convert.h) on 8 lanes, the same reduction and polynomial: inf above 88.72, 0 below
// -87.3, NaN stays NaN.
FL_AVX2_INLINE __m256 exp256(__m256 x) {
  const __m256 xc = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
  const __m256i ni = _mm256_sub_epi32(
      _mm256_cvttps_epi32(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(200.5f))),
      _mm256_set1_epi32(200));
  const __m256 n = _mm256_cvtepi32_ps(ni);
  const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f),
                                   _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc));
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(_mm256_mul_ps(y, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256 res = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23)));
  res = _mm256_blendv_ps(res, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x, _mm256_set1_ps(88.72f), _CMP_GT_OQ));
  res = _mm256_andnot_ps(_mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ), res);
  return _mm256_blendv_ps(res, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// Online softmax of one tile, vectorised over the query rows (8 at a time, running state in
// registers). st holds the scores (nt x Rp) and gets the probabilities exp(s - m_new); m, l are
// the running max / sum; alpha = exp(m_old - m_new) rescales the rows of O. Keys after last[r]
// are masked (causal) when `mask`. A NaN score is skipped by the max and makes p, hence l and
// the row of O, NaN (NaN in, NaN out).
FL_AVX2 static void mla_softmax_tile(float* st, int64_t Rp, int nt, float* m, float* l, float* alpha,
                                     const int32_t* last, int64_t tb, bool mask) {
  const float ninf = -std::numeric_limits<float>::infinity();
  if (mask) {
    for (int t = 0; t < nt; ++t) {
      float* s = st + t * Rp;
      const int32_t pos = static_cast<int32_t>(tb + t);
#pragma omp simd
      for (int64_t r = 0; r < Rp; ++r) s[r] = pos <= last[r] ? s[r] : ninf;
    }
  }
  const __m256 vninf = _mm256_set1_ps(ninf), zero = _mm256_setzero_ps();
  for (int64_t r = 0; r < Rp; r += 8) {
    float* s = st + r;
    const __m256 m_old = _mm256_loadu_ps(m + r);
    __m256 mx0 = m_old, mx1 = m_old;  // max(s, mx) keeps mx where s is NaN
    int t = 0;
    for (; t + 2 <= nt; t += 2) {
      mx0 = _mm256_max_ps(_mm256_loadu_ps(s + t * Rp), mx0);
      mx1 = _mm256_max_ps(_mm256_loadu_ps(s + (t + 1) * Rp), mx1);
    }
    if (t < nt) mx0 = _mm256_max_ps(_mm256_loadu_ps(s + t * Rp), mx0);
    const __m256 mx = _mm256_max_ps(mx0, mx1);
    // Nothing visible yet: subtract 0 (p = exp(-inf) = 0, alpha = 0).
    const __m256 mu = _mm256_blendv_ps(mx, zero, _mm256_cmp_ps(mx, vninf, _CMP_EQ_OQ));
    const __m256 a = exp256(_mm256_sub_ps(m_old, mu));
    _mm256_storeu_ps(alpha + r, a);
    _mm256_storeu_ps(m + r, mx);
    __m256 l0 = _mm256_mul_ps(_mm256_loadu_ps(l + r), a), l1 = zero;
    for (t = 0; t + 2 <= nt; t += 2) {
      const __m256 p0 = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t * Rp), mu));
      const __m256 p1 = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + (t + 1) * Rp), mu));
      _mm256_storeu_ps(s + t * Rp, p0);
      _mm256_storeu_ps(s + (t + 1) * Rp, p1);
      l0 = _mm256_add_ps(l0, p0);
      l1 = _mm256_add_ps(l1, p1);
    }
    if (t < nt) {
      const __m256 p0 = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t * Rp), mu));
      _mm256_storeu_ps(s + t * Rp, p0);
      l0 = _mm256_add_ps(l0, p0);
    }
    _mm256_storeu_ps(l + r, _mm256_add_ps(l0, l1));
  }
}

// O^T (columns c0..c0+MC-1 of O, Rp apart; query lanes [0, 8 NV)) = alpha * O^T + V^T . P^T:
// the same register blocking as the scores, with the roles of D and the tile swapped. Each V
// element is broadcast once from its cache row (read in place) for 8 NV query rows.
template <int NV, int MC>
FL_AVX2 __attribute__((noinline)) static void mla_pv_block(float* ot, int64_t Rp, const float* pt,
                                                            const float* alpha, const float* const* v, int nt,
                                                            int64_t c0) {
  __m256 acc[MC][NV];
  {
    __m256 al[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) al[j] = _mm256_loadu_ps(alpha + 8 * j);
#pragma GCC unroll 16
    for (int c = 0; c < MC; ++c)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[c][j] = _mm256_mul_ps(_mm256_loadu_ps(ot + c * Rp + 8 * j), al[j]);
  }
  for (int t = 0; t < nt; ++t) {
    const float* vr = v[t] + c0;
    __m256 pv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) pv[j] = _mm256_loadu_ps(pt + t * Rp + 8 * j);
#pragma GCC unroll 16
    for (int c = 0; c < MC; ++c) {
      const __m256 b = _mm256_broadcast_ss(vr + c);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[c][j] = _mm256_fmadd_ps(b, pv[j], acc[c][j]);
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < MC; ++c)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(ot + c * Rp + 8 * j, acc[c][j]);
}

// n (1..MC) columns: the block of exactly n columns.
template <int NV, int MC>
FL_AVX2_INLINE void mla_pv_n(int n, float* ot, int64_t Rp, const float* pt, const float* alpha,
                             const float* const* v, int nt, int64_t c0) {
  if constexpr (MC > 1) {
    if (n < MC) return mla_pv_n<NV, MC - 1>(n, ot, Rp, pt, alpha, v, nt, c0);
  }
  mla_pv_block<NV, MC>(ot, Rp, pt, alpha, v, nt, c0);
}

// O^T (dv x Rp) = alpha * O^T + V^T (dv x nt; rows v[0..nt), first dv channels) . P^T (nt x Rp).
// Column blocks outside, query lanes inside: a block of V (nt x MC floats) stays in L1 for all rows.
FL_AVX2 static void mla_pv_tile(float* ot, int64_t Rp, const float* pt, const float* alpha, const float* const* v,
                                int nt, int64_t dv) {
  const int64_t nvec = Rp / 8;
  const int mc = nvec == 1 ? 12 : 6;
  for (int64_t c = 0; c < dv; c += mc) {
    const int n = static_cast<int>(std::min<int64_t>(mc, dv - c));
    float* oc = ot + c * Rp;
    if (nvec == 1) {
      mla_pv_n<1, 12>(n, oc, Rp, pt, alpha, v, nt, c);
      continue;
    }
    int64_t j = 0;
    for (; j + 2 <= nvec; j += 2) mla_pv_n<2, 6>(n, oc + 8 * j, Rp, pt + 8 * j, alpha + 8 * j, v, nt, c);
    if (j < nvec) mla_pv_n<1, 6>(n, oc + 8 * j, Rp, pt + 8 * j, alpha + 8 * j, v, nt, c);
  }
}

// One (sequence, split) task; fp32/fp16/bf16 q and cache, fp32 workspace (mla_vec_workspace).
FL_AVX2 static void mla_task_avx2(const MlaDecodeArgs& a, int64_t b, int64_t g, int64_t sp, float* ws) {
  const int64_t D = a.D, dv = a.dv, R = a.s_q * (a.H / a.h_kv), Rp = round8(R);
  float* qt = ws;                 // D x Rp: scaled queries, transposed, rows R..Rp-1 zero
  float* st = qt + D * Rp;        // kTile x Rp: scores, then probabilities (P^T)
  float* ot = st + kTile * Rp;    // dv x Rp: unnormalised outputs, transposed
  float* m = ot + dv * Rp;        // Rp each: running max, running sum, rescale
  float* l = m + Rp;
  float* alpha = l + Rp;
  int32_t* last = reinterpret_cast<int32_t*>(alpha + Rp);  // Rp: last visible key per query row
  float* kb = alpha + 2 * Rp;     // kTile x D: fp16/bf16 cache rows converted to fp32
  float* qrow = kb + kTile * D;   // D: one query row
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t n = mla_len(a, b);
  const int64_t t0 = std::min<int64_t>(n, sp * a.split_tokens), t1 = std::min<int64_t>(n, t0 + a.split_tokens);
  float* o_part = static_cast<float*>(a.o_part) + ((b * a.n_splits + sp) * a.h_kv + g) * R * dv;
  float* lse_part = static_cast<float*>(a.lse_part) + ((b * a.n_splits + sp) * a.h_kv + g) * R;
  const float scale = float(a.scale);
  for (int64_t r = 0; r < R; ++r) {
    int64_t qi, h;
    mla_row(a, g, r, qi, h);
    load_row(elem_ptr(a.q, a.q_dt, b * a.q_sb + qi * a.q_ss + h * a.q_sh), a.q_dt, qrow, D);
    for (int64_t c = 0; c < D; ++c) qt[c * Rp + r] = qrow[c] * scale;
    // Keys visible to query qi: positions <= n - s_q + qi (causal), all otherwise.
    last[r] = static_cast<int32_t>(a.causal ? n - a.s_q + qi : n - 1);
  }
  for (int64_t r = R; r < Rp; ++r) {
    for (int64_t c = 0; c < D; ++c) qt[c * Rp + r] = 0.0f;
    last[r] = static_cast<int32_t>(n - 1);
  }
  for (int64_t r = 0; r < Rp; ++r) m[r] = ninf, l[r] = 0.0f;
  for (int64_t i = 0; i < dv * Rp; ++i) ot[i] = 0.0f;
  const int32_t* table = a.block_table + b * a.bt_stride;
  const bool in_place = a.kv_dt == kF32;
  int page_shift = 0;  // page is a power of two (checked in Python)
  while ((int64_t(1) << page_shift) < a.page) ++page_shift;
  // Cache rows of the tile starting at token tb (nt of them), in place.
  auto tile_rows = [&](int64_t tb, int nt, const char** src) {
    for (int j = 0; j < nt;) {
      const int64_t t = tb + j, row = t & (a.page - 1);
      const char* p = static_cast<const char*>(elem_ptr(a.kv, a.kv_dt, table[t >> page_shift] * a.kv_sblock +
                                                                         row * a.kv_srow + g * a.kv_shead));
      const int64_t stride = a.kv_srow * dtype_size(a.kv_dt);
      for (int64_t i = row; i < a.page && j < nt; ++i, ++j, p += stride) src[j] = p;
    }
  };
  const char* src[kTile];
  const float* rows[kTile];
  const char* pf[kTile];  // rows of the tile kPfDist ahead, its last one repeated to kTile
  for (int64_t tb = t0; tb < t1; tb += kTile) {
    const int nt = static_cast<int>(std::min<int64_t>(kTile, t1 - tb));
    tile_rows(tb, nt, src);
    for (int j = 0; j < nt; ++j) {
      if (in_place) {
        rows[j] = reinterpret_cast<const float*>(src[j]);
      } else {
        load_row(src[j], a.kv_dt, kb + j * D, D);
        rows[j] = kb + j * D;
      }
    }
    const int64_t pb = tb + kPfDist * kTile;
    const int npf = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(kTile, t1 - pb)));
    tile_rows(pb, npf, pf);
    for (int j = npf; j < kTile && npf > 0; ++j) pf[j] = pf[npf - 1];
    mla_scores_tile(qt, Rp, rows, nt, D, st, npf > 0 ? pf : nullptr, dtype_size(a.kv_dt));
    mla_softmax_tile(st, Rp, nt, m, l, alpha, last, tb, a.causal && tb + nt - 1 > n - a.s_q);
    mla_pv_tile(ot, Rp, st, alpha, rows, nt, dv);
  }
  for (int64_t r = 0; r < R; ++r) {
    const bool empty = !(l[r] > 0) && !(l[r] != l[r]);  // no visible key (NaN stays NaN)
    const float inv = empty ? 0.0f : 1.0f / l[r];
    for (int64_t c = 0; c < dv; ++c) o_part[r * dv + c] = ot[c * Rp + r] * inv;
    lse_part[r] = empty ? ninf : m[r] + std::log(l[r]);
  }
}
#endif  // FL_MLA_AVX2

template <typename Acc>
FL_INLINE void mla_merge(const MlaDecodeArgs& a, int64_t idx, Acc* buf) {
  // idx enumerates (b, partial row r = g * R + i): row i of KV head g's problem (mla_row).
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
  // No key seen: out 0 and lse +inf (FlashMLA's convention; the partials keep -inf).
  const Acc lse = nan ? std::numeric_limits<Acc>::quiet_NaN()
                      : (mx == ninf ? std::numeric_limits<Acc>::infinity() : mx + std::log(total));
  if (nan)
    for (int64_t c = 0; c < dv; ++c) buf[c] = std::numeric_limits<Acc>::quiet_NaN();
  int64_t qi, h;
  mla_row(a, r / (rows / a.h_kv), r % (rows / a.h_kv), qi, h);
  store_row(buf, elem_ptr(a.out, a.out_dt, ((b * a.s_q + qi) * a.H + h) * dv), a.out_dt, dv);
  static_cast<Acc*>(a.lse)[(b * a.H + h) * a.s_q + qi] = lse;
}

FL_CLONES void mla_task_f32(const MlaDecodeArgs& a, int64_t b, int64_t g, int64_t sp, float* ws) {
  mla_task<float>(a, b, g, sp, ws);
}
FL_CLONES void mla_task_f64(const MlaDecodeArgs& a, int64_t b, int64_t g, int64_t sp, double* ws) {
  mla_task<double>(a, b, g, sp, ws);
}
FL_CLONES void mla_merge_f32(const MlaDecodeArgs& a, int64_t i, float* buf) { mla_merge<float>(a, i, buf); }
FL_CLONES void mla_merge_f64(const MlaDecodeArgs& a, int64_t i, double* buf) { mla_merge<double>(a, i, buf); }

bool mla_decode_has_avx2() {
#if FL_MLA_AVX2
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

void mla_decode(const MlaDecodeArgs& a, void* workspace, int parts, int kernel) {
  if (a.B == 0 || a.s_q == 0 || a.H == 0) return;
  if (a.h_kv < 1 || a.H % a.h_kv) throw std::invalid_argument("fastlayers: mla_decode needs H a multiple of h_kv >= 1");
  const bool f64 = a.q_dt == kF64;
  const bool vec = !f64 && kernel != kMlaScalar && mla_decode_has_avx2();
  const int64_t per = mla_decode_workspace(a.s_q * (a.H / a.h_kv), a.D, a.dv);
  // Tasks (sequence, KV head, split), the splits of one (sequence, KV head) next to each other.
  const int64_t tasks = a.B * a.h_kv * a.n_splits, merges = a.B * a.s_q * a.H;
#pragma omp parallel num_threads(parts)
  {
    const int tid = omp_get_thread_num();
    char* ws = static_cast<char*>(workspace) + tid * per * (f64 ? 8 : 4);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t bg = t / a.n_splits, b = bg / a.h_kv, g = bg % a.h_kv, sp = t % a.n_splits;
      if (f64)
        mla_task_f64(a, b, g, sp, reinterpret_cast<double*>(ws));
#if FL_MLA_AVX2
      else if (vec)
        mla_task_avx2(a, b, g, sp, reinterpret_cast<float*>(ws));
#endif
      else
        mla_task_f32(a, b, g, sp, reinterpret_cast<float*>(ws));
    }
#pragma omp for schedule(static)
    for (int64_t i = 0; i < merges; ++i) {
      if (f64)
        mla_merge_f64(a, i, reinterpret_cast<double*>(ws));
      else
        mla_merge_f32(a, i, reinterpret_cast<float*>(ws));
    }
  }
  (void)vec;
}

}  // namespace cpu
}  // namespace fastlayers
