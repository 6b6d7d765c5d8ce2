// MLA decoding on CUDA (FlashMLA layout, split-KV): the kernels and their launch
// configuration (device code; the CUDA runtime calls live in mla.cu).
//
// Semantics are those of MlaDecodeArgs (fastlayers/common.h) and of the CPU kernel
// (csrc/cpu/mla.cpp): scores (q * scale) . k in fp32, online softmax in fp32, values =
// the first dv channels of each cached row, per-split normalised partials o_part /
// lse_part, then a merge over the splits by their log-sum-exp. NaN in q or in a visible
// key poisons the row (out NaN, lse NaN); a query that sees no key gets out 0, lse +inf
// (FlashMLA's convention; its split partials have lse_part -inf, which the merge skips).
//
// mla_partial<DT, NC, NR>: one CTA of 256 threads (8 warps) per (row group, KV split,
// batch row); a row group is up to 16 query rows of one KV head's problem: (new token qi,
// head h) pairs of the H / h_kv heads that read KV head g (h_kv = 1, MLA: every head and every
// new token share the latent cache rows; see mla_cta). Per tile of 32 tokens:
//   1. the 32 cached rows are copied, as raw bits of the cache dtype, into shared memory
//      (16-byte loads when the rows allow), once for every row of the group;
//   2. scores: lane t of warp w computes token t's dot products with rows w and w + 8
//      (q pre-scaled in fp32 in shared memory, read as warp-wide broadcasts; a tile row
//      is 16-byte chunks read with one conflict-free 16-byte load: the row stride in
//      words is an odd multiple of 4); the warp then does the row's online-softmax step
//      with shuffles and leaves p and the rescale factor in shared memory;
//   3. P.V on CUDA cores: thread (c, g) keeps NR x NC fp32 accumulators, columns
//      c + j * CT (CT = 256 / RS) of rows g + i * RS (RS = 16 / NR), the values read
//      from the same shared tile.
// FMAs on CUDA cores, fp32 accumulation everywhere: the kernel of fp32 inputs, and of fp16 /
// bf16 inputs that the tensor-core kernel does not take.
// mla_partial_mma<DT, NT> (fp16 / bf16; D and dv multiples of 16; cache rows 16-byte
// aligned): the same grid and outputs, both products on tensor cores (sm_80+ mma.sync
// m16n8k16, fp32 accumulators), one CTA of 4 warps, KV tiles of 32 tokens loaded with
// cp.async (double buffered) and read with ldmatrix; q enters the mma unscaled (exact: it is
// already in the input dtype) and the fp32 scores are scaled, P is rounded once to the input
// dtype for P V while l sums the fp32 P (as flash-attention does): lse is as exact as the fp32
// path's. Details above the kernel.
// mla_merge: one CTA of 128 threads per (batch row, query row): the lse-weighted sum of
// the splits' partials, rounded once to out's dtype.
//
// This header also compiles as plain C++ on top of csrc/cuda/emu/cuda_emu.h, which runs
// the same kernels on CPU threads (tests on machines without a GPU).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastlayers/common.h"
#include "kernel_common.cuh"

#ifdef __CUDACC__
#ifndef FL_DYN_SMEM
#define FL_DYN_SMEM(T, name)                                   \
  extern __shared__ __align__(16) unsigned char fl_dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(fl_dyn_smem_)
#endif
#endif

namespace fastlayers {
namespace cuda_kernels {

constexpr int kMlaThreads = 256;       // 8 warps
constexpr int kMlaTok = 32;            // tokens per tile: one per lane in the score phase
constexpr int kMlaRows = 16;           // query rows per CTA (2 per warp in the score phase)
constexpr int kMlaMaxD = 768;          // row size limit (shared memory: 32 fp32 rows + 16 q rows)
constexpr int kMlaMaxDv = 512;         // value channels limit (2 x 16 accumulators a thread)
constexpr int kMlaMaxGridYZ = 65535;   // n_splits (grid y) and batch (grid z)
constexpr int kMlaMergeThreads = 128;  // merge CTA: 4 columns a thread at dv = 512

// Shared-memory layout of mla_partial for a row size D (elements of es bytes).
struct MlaSmem {
  int rw;      // tile row stride in 32-bit words: 16-byte chunks, an odd number of them
  int qd;      // q row stride in floats: the elements a tile row's words cover
  int chunks;  // 16-byte chunks a tile row holds (rw / 4)
  size_t bytes;
};

inline MlaSmem mla_smem(int64_t D, int es) {
  MlaSmem s{};
  s.chunks = int((D * es + 15) / 16);
  if (s.chunks % 2 == 0) ++s.chunks;  // odd: lanes t and t + 1..7 hit different banks
  s.rw = 4 * s.chunks;
  s.qd = s.rw * 4 / es;
  s.bytes = size_t(4) * (size_t(kMlaTok) * s.rw          // tile
                         + size_t(kMlaRows) * s.qd       // q (scaled, fp32)
                         + size_t(kMlaRows) * kMlaTok    // p
                         + 4 * kMlaRows);                // alpha, skip, l, m
  return s;
}

template <int DT>
FL_DEV float mla_elem(const uint32_t* row, int c) {  // element c of a raw tile row
  if (DT == kF32) return __uint_as_float(row[c]);
  const uint32_t w = row[c >> 1];
  const uint32_t h = (c & 1) ? (w >> 16) : (w & 0xffffu);
  return DT == kBF16 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
}

template <int DT>
FL_DEV float mla_load(const void* base, int64_t i) {  // element i of a global tensor
  if (DT == kF32) return static_cast<const float*>(base)[i];
  const uint32_t h = static_cast<const uint16_t*>(base)[i];
  return DT == kBF16 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
}

FL_DEV void mla_store(void* base, int dt, int64_t i, float v) {
  if (dt == kF32)
    static_cast<float*>(base)[i] = v;
  else
    static_cast<uint16_t*>(base)[i] = uint16_t(dt == kBF16 ? f32_to_bf16_bits(v) : f32_to_f16_bits(v));
}

FL_DEV float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
FL_DEV float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

FL_DEV float mla_ninf() { return -__uint_as_float(0x7f800000u); }
FL_DEV float mla_pinf() { return __uint_as_float(0x7f800000u); }
FL_DEV float mla_nan() { return __uint_as_float(0x7fc00000u); }

// The partial kernel. NC x NR accumulators a thread: NC columns (CT = 256 * NR / 16
// apart), NR rows (RS = 16 / NR apart); needs dv <= NC * CT.
// What a CTA of the partial kernels works on: KV head g and rows [lr0, lr0 + nrows) of its problem
// (the rg = s_q * hg query rows of the hg = H / h_kv heads that read it; row i is new token i / hg,
// head g * hg + i % hg), both from blockIdx.x; partial rows [r0, r0 + nrows) of the rows = s_q * H
// (r0 = g * rg + lr0); KV split sp (blockIdx.y) of sequence b (blockIdx.z) of length n, tokens
// [t0, t1) (empty past the sequence's end). 32-bit row arithmetic (s_q * H < 2^31, checked on the
// host); r0 is recomputed by mla_r0 where the partials are written (not kept live across the loop).
struct MlaCta {
  int64_t rows, sp, b, n, t0, t1;
  int g, hg, lr0, nrows;
};
FL_DEV void mla_group(const MlaDecodeArgs& a, int& g, int& hg, int& lr0, int& rg) {
  hg = int(a.H) / int(a.h_kv);
  rg = int(a.s_q) * hg;
  const int blocks = (rg + kMlaRows - 1) / kMlaRows, bx = int(blockIdx.x);
  g = bx / blocks;
  lr0 = (bx - g * blocks) * kMlaRows;
}
FL_DEV int64_t mla_r0(const MlaDecodeArgs& a) {  // the CTA's first partial row: g * rg + lr0
  int g, hg, lr0, rg;
  mla_group(a, g, hg, lr0, rg);
  return int64_t(g) * rg + lr0;
}
FL_DEV MlaCta mla_cta(const MlaDecodeArgs& a) {
  MlaCta c;
  c.rows = a.s_q * a.H;
  int rg;
  mla_group(a, c.g, c.hg, c.lr0, rg);
  c.nrows = rg - c.lr0 < kMlaRows ? rg - c.lr0 : kMlaRows;
  c.sp = blockIdx.y, c.b = blockIdx.z;
  c.n = a.seqlens[c.b];
  if (a.max_tokens > 0 && c.n > a.max_tokens) c.n = a.max_tokens;
  c.t0 = c.sp * a.split_tokens < c.n ? c.sp * a.split_tokens : c.n;
  c.t1 = c.t0 + a.split_tokens < c.n ? c.t0 + a.split_tokens : c.n;
  return c;
}

template <int DT, int NC, int NR>
FL_GLOBAL void FL_LAUNCH_BOUNDS(kMlaThreads, 2) mla_partial(MlaDecodeArgs a, MlaSmem L, int log2_page) {
  constexpr int RS = kMlaRows / NR;
  constexpr int CT = kMlaThreads / RS;
  constexpr int ES = DT == kF32 ? 4 : 2;
  FL_DYN_SMEM(uint32_t, tile);                                   // kMlaTok x L.rw words
  float* qs = reinterpret_cast<float*>(tile + kMlaTok * L.rw);  // kMlaRows x L.qd
  float* ps = qs + kMlaRows * L.qd;                              // kMlaRows x kMlaTok
  float* alpha_s = ps + kMlaRows * kMlaTok;                      // kMlaRows
  float* skip_s = alpha_s + kMlaRows;                            // kMlaRows (1: row unchanged this tile)
  float* l_s = skip_s + kMlaRows;                                // kMlaRows (final)
  float* m_s = l_s + kMlaRows;                                   // kMlaRows (final)

  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const MlaCta cta = mla_cta(a);
  const int64_t rows = cta.rows, sp = cta.sp, b = cta.b, n = cta.n, t0 = cta.t0, t1 = cta.t1;
  const int lr0 = cta.lr0, hg = cta.hg;
  const int nrows = cta.nrows;
  const int D = int(a.D), dv = int(a.dv);
  const float ninf = mla_ninf();

  // q rows of the group, scaled, fp32; zero past D (the tile's padding is zero too).
  const float scale = float(a.scale);
  for (int e = tid; e < kMlaRows * L.qd; e += kMlaThreads) {
    const int r = e / L.qd, c = e % L.qd;
    float v = 0.f;
    if (r < nrows && c < D) {
      const int rr = lr0 + r, qi = rr / hg, h = cta.g * hg + rr % hg;
      v = mla_load<DT>(a.q, b * a.q_sb + qi * a.q_ss + h * a.q_sh + c) * scale;
    }
    qs[e] = v;
  }

  // Score-phase rows of this warp: warp and warp + 8; their running max and sum
  // (every lane holds the same values).
  float m_run[2] = {ninf, ninf}, l_run[2] = {0.f, 0.f};
  int64_t last[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int qi = (lr0 + warp + 8 * i) / hg;
    last[i] = a.causal ? n - a.s_q + qi : n - 1;  // the last key query qi sees
  }

  float acc[NR][NC];
#pragma unroll
  for (int i = 0; i < NR; ++i)
#pragma unroll
    for (int j = 0; j < NC; ++j) acc[i][j] = 0.f;
  const int cth = tid % CT, rth = tid / CT;

  const int32_t* table = a.block_table + b * a.bt_stride;
  const char* kv = static_cast<const char*>(a.kv) + cta.g * a.kv_shead * ES;  // KV head g's rows
  const int row_bytes = D * ES;
  const bool vec = (reinterpret_cast<uintptr_t>(kv) & 15u) == 0 && (a.kv_sblock * ES) % 16 == 0 &&
                   (a.kv_srow * ES) % 16 == 0;  // (kv includes KV head g's offset)
  const int64_t page_mask = (int64_t(1) << log2_page) - 1;

  for (int64_t tb = t0; tb < t1; tb += kMlaTok) {
    const int nt = int(t1 - tb < kMlaTok ? t1 - tb : kMlaTok);
    // 1. the tile: chunk e = token (e / chunks), 16-byte chunk (e % chunks) of its row.
    for (int e = tid; e < kMlaTok * L.chunks; e += kMlaThreads) {
      const int j = e / L.chunks, ch = e % L.chunks, off = ch * 16;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (j < nt && off < row_bytes) {
        const int64_t t = tb + j;
        const int64_t blk = table[t >> log2_page];
        const char* src = kv + (blk * a.kv_sblock + (t & page_mask) * a.kv_srow) * ES + off;
        if (vec && off + 16 <= row_bytes) {
          v = *reinterpret_cast<const uint4*>(src);
        } else {
          uint32_t w[4] = {0u, 0u, 0u, 0u};
          for (int k = 0; k < 16 / ES && off + (k + 1) * ES <= row_bytes; ++k) {
            if (ES == 4)
              w[k] = reinterpret_cast<const uint32_t*>(src)[k];
            else
              w[k >> 1] |= uint32_t(reinterpret_cast<const uint16_t*>(src)[k]) << (16 * (k & 1));
          }
          v = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
      *reinterpret_cast<uint4*>(tile + j * L.rw + 4 * ch) = v;
    }
    __syncthreads();

    // 2. scores of token `lane` against rows warp, warp + 8; the online-softmax step.
    {
      float dot[2] = {0.f, 0.f};
      const uint32_t* krow = tile + lane * L.rw;
      const float* q0 = qs + warp * L.qd;
      const float* q1 = qs + (warp + 8) * L.qd;
      for (int ch = 0; ch < L.chunks; ++ch) {
        const uint4 kk = *reinterpret_cast<const uint4*>(krow + 4 * ch);
        const uint32_t kw[4] = {kk.x, kk.y, kk.z, kk.w};
        constexpr int PER = 16 / ES;
        float kf[PER];
#pragma unroll
        for (int k = 0; k < PER; ++k) {
          if (DT == kF32)
            kf[k] = __uint_as_float(kw[k]);
          else {
            const uint32_t h = (k & 1) ? (kw[k >> 1] >> 16) : (kw[k >> 1] & 0xffffu);
            kf[k] = DT == kBF16 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
          }
        }
        const float4* a0 = reinterpret_cast<const float4*>(q0 + ch * PER);  // 16-byte aligned: qd % 4 == 0
        const float4* a1 = reinterpret_cast<const float4*>(q1 + ch * PER);
#pragma unroll
        for (int v = 0; v < PER / 4; ++v) {
          const float4 x0 = a0[v], x1 = a1[v];
          dot[0] += x0.x * kf[4 * v] + x0.y * kf[4 * v + 1] + x0.z * kf[4 * v + 2] + x0.w * kf[4 * v + 3];
          dot[1] += x1.x * kf[4 * v] + x1.y * kf[4 * v + 1] + x1.z * kf[4 * v + 2] + x1.w * kf[4 * v + 3];
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int r = warp + 8 * i;  // warp-uniform
        const int64_t t = tb + lane;
        const bool vis = r < nrows && lane < nt && t <= last[i];
        const float s = vis ? dot[i] : ninf;
        const float bad = warp_max(vis && s != s ? 1.f : 0.f);
        const float mx = fmaxf(m_run[i], warp_max(s));  // fmaxf: the NaN-free max
        float p = 0.f, alpha = 1.f, skip = 0.f;
        if (r >= nrows) {
          skip = 1.f;
        } else if (bad != 0.f || m_run[i] != m_run[i]) {  // NaN in, NaN out: poison the row
          m_run[i] = l_run[i] = mla_nan();
          alpha = mla_nan();
        } else if (mx == ninf) {  // nothing visible yet
          skip = 1.f;
        } else {
          alpha = m_run[i] == ninf ? 0.f : expf(m_run[i] - mx);
          p = s == ninf ? 0.f : expf(s - mx);
          l_run[i] = l_run[i] * alpha + warp_sum(p);
          m_run[i] = mx;
        }
        if (r < kMlaRows) {
          ps[r * kMlaTok + lane] = p;
          if (lane == 0) {
            alpha_s[r] = alpha;
            skip_s[r] = skip;
          }
        }
      }
    }
    __syncthreads();

    // 3. acc = acc * alpha + P . V over the tile's tokens (all nt of them, like the CPU).
    {
      bool skip[NR];
#pragma unroll
      for (int i = 0; i < NR; ++i) {
        const int r = rth + i * RS;
        skip[i] = skip_s[r] != 0.f;
        const float al = alpha_s[r];
        if (!skip[i])
#pragma unroll
          for (int j = 0; j < NC; ++j) acc[i][j] *= al;
      }
      // Four tokens a step: p as one 16-byte load. Past nt, p is 0 and the tile rows are zero
      // (no NaN from them); below nt a masked token adds 0 * v, as the CPU kernel does.
      for (int j0 = 0; j0 < nt; j0 += 4) {
        float v[4][NC];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const uint32_t* vrow = tile + (j0 + u) * L.rw;
#pragma unroll
          for (int j = 0; j < NC; ++j) {
            const int c = cth + j * CT;
            v[u][j] = c < dv ? mla_elem<DT>(vrow, c) : 0.f;
          }
        }
#pragma unroll
        for (int i = 0; i < NR; ++i) {
          if (skip[i]) continue;
          const float4 p = *reinterpret_cast<const float4*>(ps + (rth + i * RS) * kMlaTok + j0);
#pragma unroll
          for (int j = 0; j < NC; ++j) acc[i][j] += p.x * v[0][j] + p.y * v[1][j] + p.z * v[2][j] + p.w * v[3][j];
        }
      }
    }
    __syncthreads();  // the tile, p, alpha are rewritten next
  }

  // Normalised partials and the split's lse.
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      l_s[warp + 8 * i] = l_run[i];
      m_s[warp + 8 * i] = m_run[i];
    }
  }
  __syncthreads();
  const int64_t r0 = mla_r0(a);
  float* o_part = static_cast<float*>(a.o_part) + ((b * a.n_splits + sp) * rows + r0) * dv;
  float* lse_part = static_cast<float*>(a.lse_part) + (b * a.n_splits + sp) * rows + r0;
#pragma unroll
  for (int i = 0; i < NR; ++i) {
    const int r = rth + i * RS;
    if (r >= nrows) continue;
    const float l = l_s[r];
    const bool empty = !(l > 0.f) && !(l != l);  // no visible key (NaN stays NaN)
    const float inv = empty ? 0.f : 1.f / l;
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      const int c = cth + j * CT;
      if (c < dv) o_part[int64_t(r) * dv + c] = acc[i][j] * inv;
    }
    if (cth == 0) lse_part[r] = empty ? ninf : m_s[r] + logf(l);
  }
}

// The merge: CTA (query row r, batch row b); thread k owns columns k + 128 * j.
template <int NC>
FL_GLOBAL void FL_LAUNCH_BOUNDS(kMlaMergeThreads, 4) mla_merge(MlaDecodeArgs a) {
  const int tid = int(threadIdx.x);
  const int64_t rows = a.s_q * a.H, r = blockIdx.x, b = blockIdx.y;
  const int dv = int(a.dv);
  const float ninf = mla_ninf();
  const float* lse_part = static_cast<const float*>(a.lse_part) + b * a.n_splits * rows + r;
  float mx = ninf;
  bool nan = false;
  for (int64_t sp = 0; sp < a.n_splits; ++sp) {
    const float v = lse_part[sp * rows];
    nan = nan || v != v;
    mx = fmaxf(mx, v);
  }
  float acc[NC];
#pragma unroll
  for (int j = 0; j < NC; ++j) acc[j] = 0.f;
  float total = 0.f;
  if (mx != ninf) {
    for (int64_t sp = 0; sp < a.n_splits; ++sp) {
      const float v = lse_part[sp * rows];
      if (v == ninf) continue;
      const float w = expf(v - mx);
      total += w;
      const float* op = static_cast<const float*>(a.o_part) + ((b * a.n_splits + sp) * rows + r) * dv;
#pragma unroll
      for (int j = 0; j < NC; ++j) {
        const int c = tid + j * kMlaMergeThreads;
        if (c < dv) acc[j] += w * op[c];
      }
    }
    const float inv = 1.f / total;
#pragma unroll
    for (int j = 0; j < NC; ++j) acc[j] *= inv;
  }
  // Partial row r: row rr of KV head g's problem (mla_cta).
  const int64_t hg = a.H / a.h_kv, g = r / (a.s_q * hg), rr = r - g * (a.s_q * hg);
  const int64_t qi = rr / hg, h = g * hg + rr % hg;
  const int64_t o = ((b * a.s_q + qi) * a.H + h) * dv;
#pragma unroll
  for (int j = 0; j < NC; ++j) {
    const int c = tid + j * kMlaMergeThreads;
    if (c < dv) mla_store(a.out, a.out_dt, o + c, nan ? mla_nan() : acc[j]);
  }
  if (tid == 0)
    static_cast<float*>(a.lse)[(b * a.H + h) * a.s_q + qi] = nan ? mla_nan() : (mx == ninf ? mla_pinf() : mx + logf(total));
}

// ---------------------------------------------------------------------------------
// Tensor-core partial kernel (fp16 / bf16, sm_80+ mma.sync; D and dv multiples of 16,
// 16-byte aligned cache rows). Same grid, outputs and semantics as mla_partial.

constexpr int kMmaThreads = 128;  // 4 warps
constexpr int kMmaTok = 32;       // tokens per tile: 8 per warp in S = Q K^T, 2 k16 steps of P V
constexpr int kMmaPw = 20;        // P row stride in 32-bit words (16 pairs + 4: conflict-free fragment loads)

// Shared-memory layout of mla_partial_mma for a row size D (16-bit elements).
struct MlaMmaSmem {
  int ld;  // row stride (elements) of the KV tiles and of q: D + 8, an odd number of 16-byte chunks
  size_t bytes;
};

inline MlaMmaSmem mla_mma_smem(int64_t D) {
  MlaMmaSmem s{};
  s.ld = int(D) + 8;
  s.bytes = size_t(2) * (size_t(2) * kMmaTok * s.ld + size_t(kMlaRows) * s.ld)  // 2 KV tiles, q
            + size_t(4) * (size_t(kMlaRows) * kMmaPw                           // P (16-bit pairs)
                           + 3 * (kMmaThreads / 32) * kMlaRows);                // per-warp max, NaN flag, sum
  return s;
}

// The tensor-core path applies: 16-bit inputs, D and dv multiples of 16, cache rows that
// cp.async can copy in 16-byte pieces.
inline bool mla_mma_ok(const MlaDecodeArgs& a) {
  return a.q_dt != kF32 && a.D % 16 == 0 && a.dv % 16 == 0 && (reinterpret_cast<uintptr_t>(a.kv) & 15u) == 0 &&
         a.kv_srow % 8 == 0 && a.kv_sblock % 8 == 0 && (a.h_kv == 1 || a.kv_shead % 8 == 0);
}

template <int DT>
FL_DEV uint32_t mla_bits(float v) {  // round to DT (nearest even), raw bits
  return DT == kBF16 ? f32_to_bf16_bits(v) : f32_to_f16_bits(v);
}

// One CTA of 4 warps per (row group of 16 query rows, KV split, batch row). q (as given, in
// the input dtype; the scale is applied to the fp32 scores) stays in shared memory; per tile of 32
// tokens (cp.async, double buffered: tile i + 1 loads while tile i is computed):
//   S = Q K^T: warp w computes the 16 x 8 scores of tokens 8w..8w+7 over the full D
//     (A = q via ldmatrix.x4, B = the tile rows via ldmatrix: row-major K is B's
//     column-major layout), fp32 accumulators;
//   online softmax in fp32 on s * scale: per row, the tile max over the 4 warps (quad
//     shuffles, then shared memory), p = exp(s - m), l += the sum of the fp32 p, p rounded
//     to the input dtype for P V (rounding q * scale or summing the rounded p instead put
//     the bf16 lse 1e-4 off the fp64 reference on an H200);
//   O += P V: the S accumulator pairs (c0, c1) / (c2, c3) of token pair 2q, 2q + 1 are the
//     A-fragment registers of the next mma once packed to 16 bits: each warp stores its
//     packed pairs in shared memory and reads the 2 k16 A fragments of all 32 tokens back
//     with plain 32-bit loads; B = V^T via ldmatrix.x4.trans of the same tile rows (the
//     first dv channels); warp w owns dv columns [8 NT w, 8 NT (w + 1)), NT n8 tiles of
//     fp32 accumulators.
template <int DT, int NT>
FL_GLOBAL void FL_LAUNCH_BOUNDS(kMmaThreads, 2) mla_partial_mma(MlaDecodeArgs a, MlaMmaSmem L, int log2_page) {
  constexpr bool BF = DT == kBF16;
  constexpr int NW = kMmaThreads / 32;
  FL_DYN_SMEM(uint16_t, kvs);                                     // 2 x kMmaTok x L.ld
  uint16_t* qs = kvs + 2 * kMmaTok * L.ld;                        // kMlaRows x L.ld
  uint32_t* ps = reinterpret_cast<uint32_t*>(qs + kMlaRows * L.ld);  // kMlaRows x kMmaPw
  float* red_m = reinterpret_cast<float*>(ps + kMlaRows * kMmaPw);   // NW x kMlaRows
  float* red_bad = red_m + NW * kMlaRows;                            // NW x kMlaRows
  float* red_l = red_bad + NW * kMlaRows;                            // NW x kMlaRows

  const int tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5, g = lane >> 2, qd = lane & 3;
  const MlaCta cta = mla_cta(a);
  const int64_t rows = cta.rows, sp = cta.sp, b = cta.b, n = cta.n, t0 = cta.t0, t1 = cta.t1;
  const int lr0 = cta.lr0, hg = cta.hg;
  const int nrows = cta.nrows;
  const int D = int(a.D), dv = int(a.dv), nvt = dv / 8;
  const float ninf = mla_ninf();

  const int32_t* table = a.block_table + b * a.bt_stride;
  const char* kv = static_cast<const char*>(a.kv) + cta.g * a.kv_shead * 2;  // KV head g's rows
  const int64_t page_mask = (int64_t(1) << log2_page) - 1;
  const int cpr = D / 8;  // 16-byte chunks a row
  // Tile of tokens tb.. into buffer buf: chunk e = token e / cpr, piece e % cpr; tokens past
  // the split are zero-filled (no global read).
  auto issue = [&](int64_t tb, int buf) {
    const int nt = int(t1 - tb < kMmaTok ? t1 - tb : kMmaTok);
    uint16_t* dst = kvs + buf * kMmaTok * L.ld;
    for (int e = tid; e < kMmaTok * cpr; e += kMmaThreads) {
      const int j = e / cpr, ch = e - j * cpr;
      const char* src = kv;
      int bytes = 0;
      if (j < nt) {
        const int64_t t = tb + j;
        const int64_t blk = table[t >> log2_page];
        src = kv + (blk * a.kv_sblock + (t & page_mask) * a.kv_srow) * 2 + ch * 16;
        bytes = 16;
      }
      fl_cp_async16(dst + j * L.ld + ch * 8, src, bytes);
    }
    fl_cp_async_commit();
  };
  if (t0 < t1) issue(t0, 0);

  // q rows of the group as given (DT to DT: exact); zero rows past nrows. The scale goes on
  // the fp32 scores.
  const float scale = float(a.scale);
  for (int e = tid; e < kMlaRows * D; e += kMmaThreads) {
    const int r = e / D, c = e - r * D;
    float v = 0.f;
    if (r < nrows) {
      const int rr = lr0 + r, qi = rr / hg, h = cta.g * hg + rr % hg;
      v = mla_load<DT>(a.q, b * a.q_sb + qi * a.q_ss + h * a.q_sh + c);
    }
    qs[r * L.ld + c] = uint16_t(mla_bits<DT>(v));
  }

  // This lane's rows in every fragment: g and g + 8. Running max / sum (the same in the
  // 4 lanes of a quad and in every warp: computed from the same shared values).
  float m_run[2] = {ninf, ninf}, l_run[2] = {0.f, 0.f};
  int64_t last[2];
  bool rok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = g + 8 * i;
    rok[i] = r < nrows;
    const int qi = (lr0 + r) / hg;
    last[i] = a.causal ? n - a.s_q + qi : n - 1;
  }
  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;

  // ldmatrix row addresses: q (x4: rows lane % 16, columns + 8 (lane / 16)), K (x4: token
  // 8 warp + lane % 8, columns + 8 (lane / 8): 2 k16 steps), V (x4.trans: token lane).
  const uint16_t* qa = qs + (lane & 15) * L.ld + (lane >> 4) * 8;
  int buf = 0;
  for (int64_t tb = t0; tb < t1; tb += kMmaTok, buf ^= 1) {
    const int nt = int(t1 - tb < kMmaTok ? t1 - tb : kMmaTok);
    fl_cp_async_wait<0>();  // this thread's pieces of tile tb
    __syncthreads();        // everyone's pieces; everyone done with the other buffer and with P
    if (tb + kMmaTok < t1) issue(tb + kMmaTok, buf ^ 1);
    const uint16_t* kt = kvs + buf * kMmaTok * L.ld;

    // S = Q K^T for tokens 8 warp .. 8 warp + 7.
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    {
      const uint16_t* kb = kt + (warp * 8 + (lane & 7)) * L.ld + (lane >> 3) * 8;
      int k = 0;
      for (; k + 32 <= D; k += 32) {
        uint32_t a0[4], a1[4], bb[4];
        fl_ldmatrix_x4(a0, qa + k);
        fl_ldmatrix_x4(a1, qa + k + 16);
        fl_ldmatrix_x4(bb, kb + k);
        const uint32_t b0[2] = {bb[0], bb[1]}, b1[2] = {bb[2], bb[3]};
        fl_mma_16816<BF>(s, a0, b0, s);
        fl_mma_16816<BF>(s, a1, b1, s);
      }
      if (k < D) {  // D / 16 odd: one k16 step left
        uint32_t a0[4], bb[2];
        fl_ldmatrix_x4(a0, qa + k);
        fl_ldmatrix_x2(bb, kb + k);
        fl_mma_16816<BF>(s, a0, bb, s);
      }
    }

    // Online softmax. s[2i + h]: row g + 8i, token 8 warp + 2 qd + h of the tile.
    float tmax[2], tbad[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float bad = 0.f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = warp * 8 + 2 * qd + h;
        const bool vis = rok[i] && j < nt && tb + j <= last[i];
        const float v = s[2 * i + h] * scale;
        if (vis && v != v) bad = 1.f;
        s[2 * i + h] = vis ? v : ninf;
      }
      float mx = fmaxf(s[2 * i], s[2 * i + 1]);  // fmaxf: the NaN-free max
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      bad = fmaxf(bad, __shfl_xor_sync(0xffffffffu, bad, 1));
      bad = fmaxf(bad, __shfl_xor_sync(0xffffffffu, bad, 2));
      tmax[i] = mx;
      tbad[i] = bad;
    }
    if (qd == 0) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        red_m[warp * kMlaRows + g + 8 * i] = tmax[i];
        red_bad[warp * kMlaRows + g + 8 * i] = tbad[i];
      }
    }
    __syncthreads();
    float alpha[2];
    bool skip[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = g + 8 * i;
      float mt = ninf, bad = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) {
        mt = fmaxf(mt, red_m[w * kMlaRows + r]);
        bad = fmaxf(bad, red_bad[w * kMlaRows + r]);
      }
      const float mx = fmaxf(m_run[i], mt);
      float p0 = 0.f, p1 = 0.f;
      alpha[i] = 1.f;
      skip[i] = false;
      if (!rok[i]) {
        skip[i] = true;
      } else if (bad != 0.f || m_run[i] != m_run[i]) {  // NaN in, NaN out: poison the row
        m_run[i] = l_run[i] = mla_nan();
        alpha[i] = mla_nan();
      } else if (mx == ninf) {  // nothing visible yet
        skip[i] = true;
      } else {
        alpha[i] = m_run[i] == ninf ? 0.f : expf(m_run[i] - mx);
        p0 = s[2 * i] == ninf ? 0.f : expf(s[2 * i] - mx);
        p1 = s[2 * i + 1] == ninf ? 0.f : expf(s[2 * i + 1] - mx);
        l_run[i] *= alpha[i];
        m_run[i] = mx;
      }
      const uint32_t h0 = mla_bits<DT>(p0), h1 = mla_bits<DT>(p1);
      ps[r * kMmaPw + warp * 4 + qd] = h0 | (h1 << 16);
      float sum = p0 + p1;  // fp32 p: lse does not carry P's rounding
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      if (qd == 0) red_l[warp * kMlaRows + r] = sum;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (skip[i]) continue;
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) sum += red_l[w * kMlaRows + g + 8 * i];
      l_run[i] += sum;
    }

    // O = O alpha + P V (skipped rows unchanged: a masked NaN value must not reach them).
    uint32_t pa[2][4];
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      pa[kk][0] = ps[g * kMmaPw + kk * 8 + qd];
      pa[kk][1] = ps[(g + 8) * kMmaPw + kk * 8 + qd];
      pa[kk][2] = ps[g * kMmaPw + kk * 8 + 4 + qd];
      pa[kk][3] = ps[(g + 8) * kMmaPw + kk * 8 + 4 + qd];
    }
    const uint16_t* vb = kt + lane * L.ld;
#pragma unroll
    for (int jj = 0; jj < NT; ++jj) {
      const int j = warp * NT + jj;
      if (j >= nvt) break;  // warp-uniform
      uint32_t bv[4];
      fl_ldmatrix_x4_trans(bv, vb + 8 * j);
      const uint32_t b0[2] = {bv[0], bv[1]}, b1[2] = {bv[2], bv[3]};
      float o[4] = {0.f, 0.f, 0.f, 0.f};
      fl_mma_16816<BF>(o, pa[0], b0, o);
      fl_mma_16816<BF>(o, pa[1], b1, o);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e >> 1;
        acc[jj][e] = skip[i] ? acc[jj][e] : acc[jj][e] * alpha[i] + o[e];
      }
    }
  }

  // Normalised partials and the split's lse.
  const int64_t r0 = mla_r0(a);
  float* o_part = static_cast<float*>(a.o_part) + ((b * a.n_splits + sp) * rows + r0) * dv;
  float* lse_part = static_cast<float*>(a.lse_part) + (b * a.n_splits + sp) * rows + r0;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = g + 8 * i;
    if (!rok[i]) continue;
    const float l = l_run[i];
    const bool empty = !(l > 0.f) && !(l != l);  // no visible key (NaN stays NaN)
    const float inv = empty ? 0.f : 1.f / l;
#pragma unroll
    for (int jj = 0; jj < NT; ++jj) {
      const int j = warp * NT + jj;
      if (j >= nvt) break;
      const int c = 8 * j + 2 * qd;
      o_part[int64_t(r) * dv + c] = acc[jj][2 * i] * inv;
      o_part[int64_t(r) * dv + c + 1] = acc[jj][2 * i + 1] * inv;
    }
    if (warp == 0 && qd == 0) lse_part[r] = empty ? ninf : m_run[i] + logf(l);
  }
}

// ---------------------------------------------------------------------------------
// Host side (shared with the emulation test): checks and launches.

inline void mla_fail(const std::string& what) { throw std::invalid_argument("fastlayers._cuda.mla_decode: " + what); }

// Argument checks; false when there is nothing to launch (B, s_q or H is 0).
inline bool check_mla_decode(const MlaDecodeArgs& a) {
  for (int dt : {a.q_dt, a.kv_dt, a.out_dt})
    if (dt != kF32 && dt != kF16 && dt != kBF16)
      mla_fail(std::string("unsupported dtype ") + dtype_name(dt) + " (float32, float16, bfloat16)");
  if (a.kv_dt != a.q_dt) mla_fail("q and kv_cache must have the same dtype");
  if (a.B < 0 || a.s_q < 0 || a.H < 0) mla_fail("negative size");
  if (a.B == 0 || a.s_q == 0 || a.H == 0) return false;
  if (a.h_kv < 1 || a.H % a.h_kv) mla_fail("H must be a multiple of h_kv >= 1");
  if (a.D < 1 || a.D > kMlaMaxD)
    mla_fail("D = " + std::to_string(a.D) + " outside 1.." + std::to_string(kMlaMaxD));
  if (a.dv < 1 || a.dv > a.D || a.dv > kMlaMaxDv)
    mla_fail("head_dim_v = " + std::to_string(a.dv) + " outside 1..min(D, " + std::to_string(kMlaMaxDv) + ")");
  if (a.page < 1 || (a.page & (a.page - 1))) mla_fail("page size must be a power of two");
  if (a.n_splits < 1 || a.n_splits > kMlaMaxGridYZ || a.split_tokens < 1)
    mla_fail("n_splits must be in 1..65535 and split_tokens >= 1");
  if (a.B > kMlaMaxGridYZ) mla_fail("batch above 65535");
  if (a.s_q * a.H > (int64_t(1) << 31) - 1) mla_fail("too many query rows (s_q * H >= 2^31)");
  if (!a.q || !a.kv || !a.block_table || !a.seqlens || !a.o_part || !a.lse_part || !a.out || !a.lse)
    mla_fail("null pointer");
  return true;
}

// launch(kernel, grid, block, dynamic shared bytes, args...). Two launches: the
// partial kernel, then the merge (same stream).
template <int DT, class Launch>
void launch_mla_dt(const MlaDecodeArgs& a, Launch&& launch, bool tensor_cores) {
  const MlaSmem L = mla_smem(a.D, DT == kF32 ? 4 : 2);
  int log2_page = 0;
  while ((int64_t(1) << log2_page) < a.page) ++log2_page;
  // x: (KV head, row group of its s_q * H / h_kv query rows); see mla_cta.
  const dim3 grid(unsigned(a.h_kv * ((a.s_q * (a.H / a.h_kv) + kMlaRows - 1) / kMlaRows)), unsigned(a.n_splits),
                  unsigned(a.B));
  const dim3 block(kMlaThreads);
  if (DT != kF32 && tensor_cores && mla_mma_ok(a)) {
    const MlaMmaSmem M = mla_mma_smem(a.D);
    const dim3 mb(kMmaThreads);
    constexpr int DM = DT == kF32 ? kBF16 : DT;  // (no fp32 instance)
    if (a.dv > 256)
      launch(mla_partial_mma<DM, 16>, grid, mb, M.bytes, a, M, log2_page);
    else if (a.dv > 128)
      launch(mla_partial_mma<DM, 8>, grid, mb, M.bytes, a, M, log2_page);
    else if (a.dv > 64)
      launch(mla_partial_mma<DM, 4>, grid, mb, M.bytes, a, M, log2_page);
    else
      launch(mla_partial_mma<DM, 2>, grid, mb, M.bytes, a, M, log2_page);
  } else if (a.dv > 256)
    launch(mla_partial<DT, 2, 16>, grid, block, L.bytes, a, L, log2_page);
  else if (a.dv > 128)
    launch(mla_partial<DT, 1, 16>, grid, block, L.bytes, a, L, log2_page);
  else if (a.dv > 64)
    launch(mla_partial<DT, 1, 8>, grid, block, L.bytes, a, L, log2_page);
  else
    launch(mla_partial<DT, 1, 4>, grid, block, L.bytes, a, L, log2_page);
  const dim3 mgrid(unsigned(a.s_q * a.H), unsigned(a.B));
  const dim3 mblock(kMlaMergeThreads);
  if (a.dv > 2 * kMlaMergeThreads)
    launch(mla_merge<4>, mgrid, mblock, size_t(0), a);
  else if (a.dv > kMlaMergeThreads)
    launch(mla_merge<2>, mgrid, mblock, size_t(0), a);
  else
    launch(mla_merge<1>, mgrid, mblock, size_t(0), a);
}

// tensor_cores: fp16 / bf16 use mla_partial_mma where mla_mma_ok (the CUDA-core kernel
// otherwise; false: always, for the tests).
template <class Launch>
bool run_mla_decode(const MlaDecodeArgs& a, Launch&& launch, bool tensor_cores = true) {
  if (!check_mla_decode(a)) return false;
  if (a.q_dt == kF32)
    launch_mla_dt<kF32>(a, launch, false);
  else if (a.q_dt == kBF16)
    launch_mla_dt<kBF16>(a, launch, tensor_cores);
  else
    launch_mla_dt<kF16>(a, launch, tensor_cores);
  return true;
}

}  // namespace cuda_kernels
}  // namespace fastlayers
