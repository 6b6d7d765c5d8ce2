// The Mamba-1 selective scan on CUDA, forward (mamba_ssm's selective_scan_fn): the kernel
// and its launch configuration (device code; the CUDA runtime calls live in scan.cu).
//
// Semantics: SelectiveScanArgs (fastlayers/common.h) and the CPU kernel (csrc/cpu/scan.cpp):
// dt = softplus(delta + delta_bias) (each part optional); x_t = exp(dt_t A) x_{t-1} +
// dt_t u_t B_t (x_{-1} = 0); y_t = <x_t, C_t> + D u_t; out = y * silu(z). fp32 throughout
// (u, delta, z, out, A, D, delta_bias: fp32/fp16/bf16; B, C, last: fp32, N contiguous).
//
// scan_fwd<NS>: a CTA of 128 threads = 4 warps, one (batch, dim) channel per warp. Lane l
// keeps states n = l + 32 k (k < NS, N <= 32 NS) in registers for the whole sequence; no
// per-step state leaves them (only the last state, when asked). L is walked in chunks of
// 32 steps: lane i computes dt and dt u of step t0 + i into the warp's shared memory; then
// every step updates the lane's states and leaves the lane's share of <x_t, C_t> in a
// 32 x 33 shared array (padded: conflict-free both ways); lane i then sums row i (step
// t0 + i), adds D u, applies the gate and writes out. Warps never wait for each other
// (only __syncwarp). B_t and C_t are read from global memory (fp32, N contiguous:
// coalesced; the channels of a group read the same rows, which L1/L2 serve).
// N <= 16 leaves half of each warp's lanes idle in the step loop (Mamba-1's N = 16):
// a known cost of this first version.
//
// This header also compiles as plain C++ on top of csrc/cuda/emu/cuda_emu.h (tests).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastlayers/common.h"
#include "kernel_common.cuh"

namespace fastlayers {
namespace cuda_kernels {

constexpr int kScanWarps = 4;
constexpr int kScanThreads = 32 * kScanWarps;
constexpr int kScanChunkT = 32;
constexpr int kScanMaxN = 256;

FL_DEV float scan_ld(const View4& v, int64_t off) {
  if (v.dt == kF32) return static_cast<const float*>(v.p)[off];
  const uint32_t h = static_cast<const uint16_t*>(v.p)[off];
  return v.dt == kBF16 ? bf16_bits_to_f32(h) : f16_bits_to_f32(h);
}

FL_DEV void scan_st(const View4& v, int64_t off, float x) {
  if (v.dt == kF32)
    static_cast<float*>(v.p)[off] = x;
  else
    static_cast<uint16_t*>(v.p)[off] = uint16_t(v.dt == kBF16 ? f32_to_bf16_bits(x) : f32_to_f16_bits(x));
}

// torch's softplus (threshold 20); NaN stays NaN.
FL_DEV float scan_softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

template <int NS>
FL_GLOBAL void FL_LAUNCH_BOUNDS(kScanThreads, 4) scan_fwd(SelectiveScanArgs a) {
  __shared__ float dt_s[kScanWarps][kScanChunkT];
  __shared__ float dtu_s[kScanWarps][kScanChunkT];
  __shared__ float part_s[kScanWarps][kScanChunkT * 33];
  const int tid = int(threadIdx.x), lane = tid & 31, w = tid >> 5;
  const int64_t ch = int64_t(blockIdx.x) * kScanWarps + w;
  if (ch >= a.batch * a.dim) return;  // the whole warp: no block-wide barrier in this kernel
  const int64_t b = ch / a.dim, d = ch % a.dim, N = a.N, L = a.L;
  const int64_t gb = a.dim / a.GB, gc = a.dim / a.GC;
  float* dts = dt_s[w];
  float* dtus = dtu_s[w];
  float* part = part_s[w];

  float A[NS], x[NS];
#pragma unroll
  for (int k = 0; k < NS; ++k) {
    const int64_t n = lane + 32 * k;
    A[k] = n < N ? scan_ld(a.A, d * a.A.s[0] + n * a.A.s[1]) : 0.f;
    x[k] = 0.f;
  }
  const float bias = a.delta_bias.p ? scan_ld(a.delta_bias, d * a.delta_bias.s[0]) : 0.f;
  const float Dd = a.D.p ? scan_ld(a.D, d * a.D.s[0]) : 0.f;
  const float* Bp = static_cast<const float*>(a.B.p) + b * a.B.s[0] + (d / gb) * a.B.s[1];
  const float* Cp = static_cast<const float*>(a.C.p) + b * a.C.s[0] + (d / gc) * a.C.s[1];
  const int64_t bst = a.B.s[2], cst = a.C.s[2];
  const int64_t u_off = b * a.u.s[0] + d * a.u.s[1], dl_off = b * a.delta.s[0] + d * a.delta.s[1];
  const int64_t z_off = b * a.z.s[0] + d * a.z.s[1], o_off = b * a.out.s[0] + d * a.out.s[1];

  for (int64_t t0 = 0; t0 < L; t0 += kScanChunkT) {
    const int T = int(L - t0 < kScanChunkT ? L - t0 : kScanChunkT);
    float u = 0.f;
    if (lane < T) {
      const int64_t t = t0 + lane;
      u = scan_ld(a.u, u_off + t * a.u.s[2]);
      float dt = scan_ld(a.delta, dl_off + t * a.delta.s[2]) + bias;
      if (a.softplus) dt = scan_softplus(dt);
      dts[lane] = dt;
      dtus[lane] = dt * u;
    }
    __syncwarp();
#pragma unroll 4
    for (int i = 0; i < T; ++i) {  // B_t, C_t loads do not depend on x: unrolled, they overlap
      const float dt = dts[i], dtu = dtus[i];
      const float* bt = Bp + (t0 + i) * bst;
      const float* ct = Cp + (t0 + i) * cst;
      float p = 0.f;
#pragma unroll
      for (int k = 0; k < NS; ++k) {
        const int64_t n = lane + 32 * k;
        if (n < N) {
          x[k] = expf(dt * A[k]) * x[k] + dtu * bt[n];
          p += x[k] * ct[n];
        }
      }
      part[i * 33 + lane] = p;
    }
    __syncwarp();
    if (lane < T) {
      const int64_t t = t0 + lane;
      float y = 0.f;
      for (int k = 0; k < 32; ++k) y += part[lane * 33 + k];
      y += Dd * u;
      if (a.z.p) {
        const float z = scan_ld(a.z, z_off + t * a.z.s[2]);
        y *= z / (1.f + expf(-z));
      }
      scan_st(a.out, o_off + t * a.out.s[2], y);
    }
    __syncwarp();  // dts, dtus, part are rewritten by the next chunk
  }
  if (a.last.p) {
    float* lp = static_cast<float*>(a.last.p) + b * a.last.s[0] + d * a.last.s[1];
#pragma unroll
    for (int k = 0; k < NS; ++k) {
      const int64_t n = lane + 32 * k;
      if (n < N) lp[n * a.last.s[2]] = x[k];
    }
  }
}

// ---------------------------------------------------------------------------------
// Host side (shared with the emulation test).

inline void scan_fail(const std::string& what) {
  throw std::invalid_argument("fastlayers._cuda.selective_scan_fwd: " + what);
}

static inline bool scan_dt_ok(int dt) { return dt == kF32 || dt == kF16 || dt == kBF16; }

// Argument checks; false when there is nothing to launch (batch * dim == 0 or L == 0).
inline bool check_selective_scan_fwd(const SelectiveScanArgs& a) {
  if (a.batch < 0 || a.dim < 0 || a.L < 0 || a.N < 1) scan_fail("negative size or N < 1");
  if (a.N > kScanMaxN) scan_fail("N = " + std::to_string(a.N) + " above " + std::to_string(kScanMaxN));
  if (a.batch * a.dim == 0 || a.L == 0) return false;
  if (!a.u.p || !a.delta.p || !a.A.p || !a.B.p || !a.C.p || !a.out.p) scan_fail("null pointer");
  if (a.GB < 1 || a.GC < 1 || a.dim % a.GB || a.dim % a.GC) scan_fail("the groups of B and C must divide dim");
  for (const View4* v : {&a.u, &a.delta, &a.A, &a.out})
    if (!scan_dt_ok(v->dt)) scan_fail(std::string("unsupported dtype ") + dtype_name(v->dt));
  for (const View4* v : {&a.D, &a.z, &a.delta_bias})
    if (v->p && !scan_dt_ok(v->dt)) scan_fail(std::string("unsupported dtype ") + dtype_name(v->dt));
  if (a.B.dt != kF32 || a.C.dt != kF32 || (a.last.p && a.last.dt != kF32))
    scan_fail("B, C and last must be float32");
  if ((a.batch * a.dim + kScanWarps - 1) / kScanWarps > (int64_t(1) << 31) - 1) scan_fail("too many channels");
  return true;
}

template <class Launch>
bool run_selective_scan_fwd(const SelectiveScanArgs& a, Launch&& launch) {
  if (!check_selective_scan_fwd(a)) return false;
  const dim3 grid(unsigned((a.batch * a.dim + kScanWarps - 1) / kScanWarps)), block(kScanThreads);
  if (a.N <= 32)
    launch(scan_fwd<1>, grid, block, size_t(0), a);
  else if (a.N <= 64)
    launch(scan_fwd<2>, grid, block, size_t(0), a);
  else if (a.N <= 128)
    launch(scan_fwd<4>, grid, block, size_t(0), a);
  else
    launch(scan_fwd<8>, grid, block, size_t(0), a);
  return true;
}

}  // namespace cuda_kernels
}  // namespace fastlayers
