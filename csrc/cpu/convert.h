// Row loads/stores between the storage dtypes and the accumulator type.
// Every helper is always-inlined into the row kernels, so each ISA clone of a
// kernel (FL_CLONES) gets its own vectorised copy of these loops.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>

#include "fastlayers/common.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if defined(__GNUC__)
#define FL_INLINE static inline __attribute__((always_inline))
#else
#define FL_INLINE static inline
#endif

// x86-64: build a baseline and an AVX2/FMA/F16C (x86-64-v3) clone, chosen at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTLAYERS_NO_CLONES)
#define FL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FL_CLONES
#endif

namespace fastlayers {
namespace cpu {

FL_INLINE float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays NaN (quiet bit forced so it cannot round to inf).
FL_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

FL_INLINE float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
FL_INLINE uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// fp16 <-> fp32 in plain integer/float arithmetic, so the loops vectorise on any
// ISA (GCC 12 converts _Float16 one element at a time). Both were checked
// exhaustively against the hardware conversion: all 2^16 halves, all 2^32 floats
// (round to nearest even, overflow to inf, subnormals, NaN stays NaN).
FL_INLINE float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, em = h & 0x7fffu;
  // Shifted into place the bits read as a float 2^-112 too small, for normals and subnormals alike.
  const uint32_t mag = f32_bits(bits_f32(em << 13) * 0x1p112f);
  return bits_f32((em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : mag) | sign);
}

FL_INLINE uint16_t f32_to_f16(float f) {
  const uint32_t w = f32_bits(f), sign = w & 0x80000000u, w2 = w + w;
  // |f| scaled so that anything beyond fp16's range becomes inf; then adding a power of
  // two just above |f|'s (at least the subnormal grid's) lets the FPU's round-to-nearest-even
  // drop exactly the mantissa bits fp16 cannot hold.
  float a = (std::fabs(f) * 0x1p112f) * 0x1p-110f;
  uint32_t e = w2 & 0xff000000u;
  e = e < 0x71000000u ? 0x71000000u : e;
  const uint32_t b = f32_bits(bits_f32((e >> 1) + 0x07800000u) + a);
  const uint32_t out = w2 > 0xff000000u ? 0x7e00u : ((b >> 13) & 0x7c00u) + (b & 0x0fffu);
  return static_cast<uint16_t>((sign >> 16) | out);
}

FL_INLINE const void* elem_ptr(const void* base, int dt, int64_t off) {
  return static_cast<const char*>(base) + off * (dt == kF64 ? 8 : dt == kF32 ? 4 : 2);
}
FL_INLINE void* elem_ptr(void* base, int dt, int64_t off) {
  return static_cast<char*>(base) + off * (dt == kF64 ? 8 : dt == kF32 ? 4 : 2);
}

template <typename Acc, bool Add>
FL_INLINE void load_or_add(const void* p, int dt, Acc* out, int64_t n) {
  switch (dt) {
    case kF32: {
      const float* s = static_cast<const float*>(p);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] = Add ? out[j] + Acc(s[j]) : Acc(s[j]);
      break;
    }
    case kF64: {
      const double* s = static_cast<const double*>(p);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] = Add ? out[j] + Acc(s[j]) : Acc(s[j]);
      break;
    }
    case kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(p);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] = Add ? out[j] + Acc(f16_to_f32(s[j])) : Acc(f16_to_f32(s[j]));
      break;
    }
    case kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(p);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] = Add ? out[j] + Acc(bf16_to_f32(s[j])) : Acc(bf16_to_f32(s[j]));
      break;
    }
  }
}

template <typename Acc>
FL_INLINE void load_row(const void* p, int dt, Acc* out, int64_t n) { load_or_add<Acc, false>(p, dt, out, n); }
template <typename Acc>
FL_INLINE void add_row(const void* p, int dt, Acc* out, int64_t n) { load_or_add<Acc, true>(p, dt, out, n); }

template <typename Acc>
FL_INLINE void store_row(const Acc* in, void* p, int dt, int64_t n) {
  switch (dt) {
    case kF32: {
      float* d = static_cast<float*>(p);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) d[j] = float(in[j]);
      break;
    }
    case kF64: {
      double* d = static_cast<double*>(p);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) d[j] = double(in[j]);
      break;
    }
    case kF16: {
      uint16_t* d = static_cast<uint16_t*>(p);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) d[j] = f32_to_f16(float(in[j]));
      break;
    }
    case kBF16: {
      uint16_t* d = static_cast<uint16_t*>(p);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) d[j] = f32_to_bf16(float(in[j]));
      break;
    }
  }
}

FL_INLINE int64_t dtype_size(int dt) { return dt == kF64 ? 8 : dt == kF32 ? 4 : 2; }

// Outputs much larger than the caches are written with non-temporal stores: they
// skip the read-for-ownership of every destination line (a third of the traffic
// of a read-modify-write kernel) and do not evict the inputs from cache.
constexpr int64_t kStreamMinBytes = int64_t(16) << 20;

FL_INLINE void stream_bytes(void* dst, const void* src, int64_t nbytes) {
#if defined(__SSE2__)
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  int64_t head = static_cast<int64_t>((-reinterpret_cast<uintptr_t>(d)) & 15u);
  if (head > nbytes) head = nbytes;
  std::memcpy(d, s, head);
  d += head, s += head, nbytes -= head;
  for (; nbytes >= 16; nbytes -= 16, d += 16, s += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(d), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  std::memcpy(d, s, nbytes);
#else
  std::memcpy(dst, src, nbytes);
#endif
}

FL_INLINE void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Store a row of accumulators as dtype dt, streaming through `stage` (n elements
// of scratch) when `stream` is set.
template <typename Acc>
FL_INLINE void store_out(const Acc* in, void* p, int dt, int64_t n, void* stage, bool stream) {
  if (!stream) return store_row(in, p, dt, n);
  if ((dt == kF32 && sizeof(Acc) == 4) || (dt == kF64 && sizeof(Acc) == 8))
    return stream_bytes(p, in, n * int64_t(sizeof(Acc)));
  store_row(in, stage, dt, n);
  stream_bytes(p, stage, n * dtype_size(dt));
}


// Rows [r0, r1) of part t when M rows are split into `parts` contiguous blocks.
FL_INLINE void split_rows(int64_t M, int parts, int t, int64_t* r0, int64_t* r1) {
  const int64_t base = M / parts, rem = M % parts;
  *r0 = t * base + (t < rem ? t : rem);
  *r1 = *r0 + base + (t < rem ? 1 : 0);
}

// Splits `rows` into `parts` contiguous blocks, one per OpenMP thread (a runtime that grants
// fewer threads than asked still covers every part), and calls fn(part, r0, r1) for each
// non-empty block, or for every block when `empty_too` (a part that must write its row of
// per-part partial sums even when it has no rows).
template <typename F>
void parallel_parts(int64_t rows, int parts, F&& fn, bool empty_too = false) {
#pragma omp parallel for num_threads(parts) schedule(static, 1)
  for (int p = 0; p < parts; ++p) {
    int64_t r0, r1;
    split_rows(rows, parts, p, &r0, &r1);
    if (r0 < r1 || empty_too) fn(p, r0, r1);
  }
}

// parallel_parts over a kernel pair kern(args, r0, r1, ws): the double one when f64, else the
// float one; part p's workspace is `per` accumulators from p * per.
template <typename Args, typename F32, typename F64>
void run_rows(const Args& a, int64_t rows, bool f64, void* workspace, int64_t per, int parts, F32 f32, F64 f64fn) {
  parallel_parts(rows, parts, [&](int p, int64_t r0, int64_t r1) {
    if (f64)
      f64fn(a, r0, r1, static_cast<double*>(workspace) + per * p);
    else
      f32(a, r0, r1, static_cast<float*>(workspace) + per * p);
  });
}

// exp(x) in float from arithmetic and bit operations only, so that `omp simd`
// loops vectorise (libm's expf does not without -ffast-math; the selects need
// -fno-trapping-math, set for the whole module): Cody-Waite range reduction and
// Cephes' degree-6 polynomial, ~1 ulp. Returns inf above 88.72 and exp(88.3) on
// (88.3, 88.72]; flushed to 0 below -87.3 (where it would be denormal); NaN stays NaN.
FL_INLINE float exp_f32(float x) {
  float xc = x > 88.3f ? 88.3f : x;
  xc = xc < -87.3f ? -87.3f : xc;
  // round(xc / ln 2) by truncation of a positive number (xc / ln 2 + 200.5 > 0).
  const int32_t ni = static_cast<int32_t>(xc * 1.44269504088896341f + 200.5f) - 200;
  const float n = static_cast<float>(ni);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  float res = y * bits_f32(static_cast<uint32_t>((ni + 127) << 23));
  res = x > 88.72f ? __builtin_inff() : res;
  res = x < -87.3f ? 0.0f : res;
  return x == x ? res : x;
}
FL_INLINE float exp_acc(float x) { return exp_f32(x); }
FL_INLINE double exp_acc(double x) { return std::exp(x); }

}  // namespace cpu
}  // namespace fastlayers
