// The Mamba-1 selective scan on CUDA, forward and backward (mamba_ssm's selective_scan_fn):
// the kernels and their launch configuration (device code; the CUDA runtime calls live in
// scan.cu). The forward keeps the states in registers and writes no per-step state; the
// backward (scan_bwd, further down) recomputes them from a checkpoint of the state every
// chunk of 32 / NS steps, the only state it keeps in global memory.
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
// a known cost of this first version (the backward's too).
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

// Channel d's constants for this lane: A[k] of its states n = lane + 32 k (0 past N), the states
// zeroed, delta_bias and D (0 when absent).
template <int NS>
FL_DEV void scan_channel(const SelectiveScanArgs& a, int64_t d, int lane, float (&A)[NS], float (&x)[NS], float& bias,
                         float& Dd) {
#pragma unroll
  for (int k = 0; k < NS; ++k) {
    const int64_t n = lane + 32 * k;
    A[k] = n < a.N ? scan_ld(a.A, d * a.A.s[0] + n * a.A.s[1]) : 0.f;
    x[k] = 0.f;
  }
  bias = a.delta_bias.p ? scan_ld(a.delta_bias, d * a.delta_bias.s[0]) : 0.f;
  Dd = a.D.p ? scan_ld(a.D, d * a.D.s[0]) : 0.f;
}

// One step of the recurrence on the lane's states n = lane + 32 k (< N): x = exp(dt A) x + dt u B_t.
// With Y, returns the lane's share of y_t = <x_t, C_t> (else 0).
template <int NS, bool Y>
FL_DEV float scan_step(float (&x)[NS], const float (&A)[NS], float dt, float dtu, const float* bt, const float* ct,
                       int lane, int64_t N) {
  float p = 0.f;
#pragma unroll
  for (int k = 0; k < NS; ++k) {
    const int64_t n = lane + 32 * k;
    if (n < N) {
      x[k] = expf(dt * A[k]) * x[k] + dtu * bt[n];
      if (Y) p += x[k] * ct[n];
    }
  }
  return p;
}

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

  float A[NS], x[NS], bias, Dd;
  scan_channel(a, d, lane, A, x, bias, Dd);
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
    for (int i = 0; i < T; ++i)  // B_t, C_t loads do not depend on x: unrolled, they overlap
      part[i * 33 + lane] = scan_step<NS, true>(x, A, dts[i], dtus[i], Bp + (t0 + i) * bst, Cp + (t0 + i) * cst,
                                                lane, N);
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
// Backward. scan_bwd<NS>: the same layout (a warp per (batch, dim) channel, lane l owns
// states n = l + 32 k), chunks of TC = 32 / NS steps (TC * NS = 32 floats of per-step
// state history per lane, kept in registers), segments of M = NS chunks (32 steps).
//  1. Forward over every segment but the last, writing only the state at the end of each
//     segment to a checkpoint buffer ckpt (fp32, allocated by the caller: per channel
//     (segments - 1) checkpoints + M - 1 chunk starts, O(L / 32) states, not O(L)).
//  2. Chunks from last to first. On reaching a segment (at its last chunk), the forward is
//     rerun from the segment's checkpoint over its other chunks, their start states going
//     to the channel's M - 1 `sub` slots (none for NS = 1). Each chunk then reloads its
//     start state, recomputes its TC states (in registers) and <x_t, C_t> (for dz), and
//     walks backwards with the state gradient h (h_T = dlast; hn_t = h_t + g_t C_t;
//     h_{t-1} = exp(dt_t A) hn_t).
// Per-step sums over n (d dt, d u, y) go through a TC x 33 shared array per warp as in the
// forward; lane i finishes step t0 + i. dA, time-invariant dB/dC, dD and d delta_bias are
// summed in registers and added once per channel; time-varying dB/dC get one atomicAdd per
// (channel, step, state) into fp32 dB_part/dC_part (the channels of a group share rows).
// When the CTA's 4 channels share their rows of time-varying B (C) (one batch row, one
// group: Mamba-1's (batch, N, L) B and C), each chunk's dB (dC) is summed over the 4 warps in
// shared memory and added with one atomic per (step, state). Reductions go into part
// blockIdx.x % parts of the dX_part buffers.
// No per-step state reaches global memory. Extra cost: forward passes (pass 1, the chunk
// recompute, and for NS >= 2 the segment rerun over (M - 1) / M of the steps), i.e. 3 to
// 3.9 exps a (step, state) against the forward's 1, and the checkpoint buffer, about
// batch * dim * (L / 32 + M) * N fp32. Registers (ptxas, sm_80/90, CUDA 13): NS = 1 uses
// 128 (4 CTAs an SM; <= 8 bytes spilled); NS >= 2 holds 32 history floats plus h, dA, dB,
// dC sums a state and takes 219-255 (launch bounds of 2 CTAs; <= 16 bytes spilled). Known costs of this first
// version: N <= 16 idles half the lanes; NS >= 2 runs 8 warps an SM; time-varying dB/dC
// cost one fp32 atomic per (CTA or channel, step, state). On an H200 (2026-11-27) it passes
// its tests; fwd+bwd at b8 d2048 L2048 n16 bf16 took 20.9 ms (36 GB/s): far from the copy.

// Adds the CTA's 4 warps' rows red[w * pitch + i * R + n] (i < T, n < N) into dst[i * tst + n]
// (one fp32 atomicAdd per element instead of one per warp); every thread takes a share. Call
// between two __syncthreads.
FL_DEV void scan_cta_add(const float* red, int pitch, int R, int T, int64_t N, float* dst, int64_t tst, int tid) {
  for (int e = tid; e < T * R; e += kScanThreads) {
    const int i = e / R, n = e % R;
    if (n < N) {
      float s = 0.f;
      for (int w = 0; w < kScanWarps; ++w) s += red[w * pitch + e];
      atomicAdd(dst + i * tst + n, s);
    }
  }
}

template <int NS>
FL_GLOBAL void FL_LAUNCH_BOUNDS(kScanThreads, (NS == 1 ? 4 : 2)) scan_bwd(SelectiveScanArgs a, float* ckpt, int parts) {
  constexpr int TC = kScanChunkT / NS, R = 32 * NS;
  constexpr int kPab = 2 * TC * 33 > TC * R ? 2 * TC * 33 : TC * R;  // pa, pb; or a chunk of dB/dC rows
  __shared__ float dt_s[kScanWarps][TC];
  __shared__ float dtu_s[kScanWarps][TC];
  __shared__ float u_s[kScanWarps][TC];
  __shared__ float g_s[kScanWarps][TC];
  __shared__ float pab_s[kScanWarps][kPab];
  const int tid = int(threadIdx.x), lane = tid & 31, w = tid >> 5;
  const int64_t ch = int64_t(blockIdx.x) * kScanWarps + w;
  if (ch >= a.batch * a.dim) return;  // the whole warp; the __syncthreads below run only when no warp left
  const int64_t b = ch / a.dim, d = ch % a.dim, N = a.N, L = a.L;
  const int64_t gb = a.dim / a.GB, gc = a.dim / a.GC;
  const int part = int(blockIdx.x % unsigned(parts));
  float* dts = dt_s[w];
  float* dtus = dtu_s[w];
  float* us = u_s[w];
  float* gs = g_s[w];
  float* pa = pab_s[w];
  float* pb = pa + TC * 33;
  float* red = pab_s[w];  // this warp's dB or dC rows of a chunk, R a step

  float A[NS], x[NS], bias, Dd;
  scan_channel(a, d, lane, A, x, bias, Dd);
  const int64_t boff = b * a.B.s[0] + (d / gb) * a.B.s[1], coff = b * a.C.s[0] + (d / gc) * a.C.s[1];
  const float* Bp = static_cast<const float*>(a.B.p) + boff;
  const float* Cp = static_cast<const float*>(a.C.p) + coff;
  float* dBp = static_cast<float*>(a.dB_part) + int64_t(part) * a.dB_part_stride + boff;
  float* dCp = static_cast<float*>(a.dC_part) + int64_t(part) * a.dC_part_stride + coff;
  const int64_t bst = a.B.s[2], cst = a.C.s[2];
  const int64_t u_off = b * a.u.s[0] + d * a.u.s[1], dl_off = b * a.delta.s[0] + d * a.delta.s[1];
  const int64_t z_off = b * a.z.s[0] + d * a.z.s[1], go_off = b * a.dout.s[0] + d * a.dout.s[1];
  const int64_t du_off = b * a.du.s[0] + d * a.du.s[1], dd_off = b * a.ddelta.s[0] + d * a.ddelta.s[1];
  const int64_t dz_off = b * a.dz.s[0] + d * a.dz.s[1];
  // Checkpoints every kScanChunkT = M chunks (a segment); the starts of a segment's chunks are
  // recomputed into `sub` (M - 1 states) when the backward walk reaches the segment.
  constexpr int M = NS;
  const int64_t nch = (L + TC - 1) / TC, nseg = (L + kScanChunkT - 1) / kScanChunkT;
  float* ck = nch > 1 ? ckpt + ch * (nseg - 1 + M - 1) * N : nullptr;
  float* sub = nch > 1 ? ck + (nseg - 1) * N : nullptr;
  // x advanced over the TC steps of the chunk at t0 (a full chunk).
  auto fwd_chunk = [&](int64_t t0) {
    if (lane < TC) {
      const int64_t t = t0 + lane;
      const float u = scan_ld(a.u, u_off + t * a.u.s[2]);
      float dt = scan_ld(a.delta, dl_off + t * a.delta.s[2]) + bias;
      if (a.softplus) dt = scan_softplus(dt);
      dts[lane] = dt;
      dtus[lane] = dt * u;
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < TC; ++i) scan_step<NS, false>(x, A, dts[i], dtus[i], Bp + (t0 + i) * bst, nullptr, lane, N);
    __syncwarp();  // dts, dtus are rewritten by the next chunk
  };
  // When the CTA's 4 channels read the same rows of time-varying B (C): one batch row, one group
  // (CTA-uniform, so the __syncthreads below are reached by every thread or none), their dB (dC)
  // shares of each chunk are summed in shared memory first: 4x fewer atomics.
  const int64_t ch0 = int64_t(blockIdx.x) * kScanWarps, d0 = ch0 % a.dim;
  const bool full = ch0 + kScanWarps <= a.batch * a.dim && d0 + kScanWarps <= a.dim;
  const bool cta_b = bst != 0 && full && d0 / gb == (d0 + kScanWarps - 1) / gb;
  const bool cta_c = cst != 0 && full && d0 / gc == (d0 + kScanWarps - 1) / gc;

  // Pass 1: the states at the segment ends (all segments but the last).
  for (int64_t c = 0; c < (nseg - 1) * M; ++c) {
    fwd_chunk(c * TC);
    if ((c + 1) % M == 0) {
#pragma unroll
      for (int k = 0; k < NS; ++k) {
        const int64_t n = lane + 32 * k;
        if (n < N) ck[((c + 1) / M - 1) * N + n] = x[k];
      }
    }
  }

  // Pass 2: chunks backwards.
  float h[NS], dAl[NS], dBl[NS], dCl[NS];
#pragma unroll
  for (int k = 0; k < NS; ++k) {
    const int64_t n = lane + 32 * k;
    h[k] = a.dlast.p && n < N
               ? scan_ld(a.dlast, b * a.dlast.s[0] + d * a.dlast.s[1] + n * a.dlast.s[2])
               : 0.f;
    dAl[k] = dBl[k] = dCl[k] = 0.f;
  }
  float dD_acc = 0.f, dbias_acc = 0.f;  // lane i: its steps' shares
  for (int64_t c = nch - 1; c >= 0; --c) {
    const int64_t t0 = c * TC, sg = c / M;
    const int T = int(L - t0 < TC ? L - t0 : TC), j = int(c % M);
    if (M > 1 && (c == nch - 1 || j == M - 1)) {  // entering segment sg from its end: chunk starts into sub
#pragma unroll
      for (int k = 0; k < NS; ++k) {
        const int64_t n = lane + 32 * k;
        x[k] = sg > 0 && n < N ? ck[(sg - 1) * N + n] : 0.f;
      }
      for (int jj = 0; jj < j; ++jj) {
        fwd_chunk((sg * M + jj) * TC);
#pragma unroll
        for (int k = 0; k < NS; ++k) {
          const int64_t n = lane + 32 * k;
          if (n < N) sub[jj * N + n] = x[k];
        }
      }
    }
    float u = 0.f, sig = 1.f, go = 0.f, zz = 0.f, sz = 0.f, g = 0.f;
    if (lane < T) {
      const int64_t t = t0 + lane;
      u = scan_ld(a.u, u_off + t * a.u.s[2]);
      float dt = scan_ld(a.delta, dl_off + t * a.delta.s[2]) + bias;
      if (a.softplus) {
        sig = 1.f / (1.f + expf(-dt));
        dt = scan_softplus(dt);
      }
      go = scan_ld(a.dout, go_off + t * a.dout.s[2]);
      g = go;
      if (a.z.p) {
        zz = scan_ld(a.z, z_off + t * a.z.s[2]);
        sz = 1.f / (1.f + expf(-zz));
        g = go * zz * sz;
      }
      dts[lane] = dt;
      dtus[lane] = dt * u;
      us[lane] = u;
      gs[lane] = g;
    }
    float x0[NS], xh[TC][NS];
#pragma unroll
    for (int k = 0; k < NS; ++k) {
      const int64_t n = lane + 32 * k;
      x0[k] = n >= N ? 0.f : j > 0 ? sub[(j - 1) * N + n] : sg > 0 ? ck[(sg - 1) * N + n] : 0.f;
      x[k] = x0[k];
    }
    __syncwarp();
    // Recompute the chunk's states (and y's shares when the gate needs y).
#pragma unroll
    for (int i = 0; i < TC; ++i) {
      if (i < T) {
        pa[i * 33 + lane] = scan_step<NS, true>(x, A, dts[i], dtus[i], Bp + (t0 + i) * bst, Cp + (t0 + i) * cst,
                                                lane, N);
#pragma unroll
        for (int k = 0; k < NS; ++k) xh[i][k] = x[k];
      }
    }
    __syncwarp();
    if (a.z.p && lane < T) {
      float y = 0.f;
      for (int k = 0; k < 32; ++k) y += pa[lane * 33 + k];
      y += Dd * u;
      if (a.dz.p) scan_st(a.dz, dz_off + (t0 + lane) * a.dz.s[2], go * y * sz * (1.f + zz * (1.f - sz)));
    }
    __syncwarp();  // pa is rewritten below
    if (cta_c) {  // dC_t = g_t x_t, summed over the CTA's channels
#pragma unroll
      for (int i = 0; i < TC; ++i)
        if (i < T) {
#pragma unroll
          for (int k = 0; k < NS; ++k) red[i * R + lane + 32 * k] = gs[i] * xh[i][k];
        }
      __syncthreads();
      scan_cta_add(&pab_s[0][0], kPab, R, T, N, dCp + t0 * cst, cst, tid);
      __syncthreads();
    }
    // The adjoint walk over the chunk, last step first.
#pragma unroll
    for (int i = TC - 1; i >= 0; --i) {
      if (i < T) {
        const int64_t t = t0 + i;
        const float dt = dts[i], dtu = dtus[i], ut = us[i], gt = gs[i];
        const float* bt = Bp + t * bst;
        const float* ct = Cp + t * cst;
        float ddt = 0.f, dut = 0.f;
#pragma unroll
        for (int k = 0; k < NS; ++k) {
          const int64_t n = lane + 32 * k;
          if (n < N) {
            const float e = expf(dt * A[k]);
            const float hn = h[k] + gt * ct[n];
            const float xp = i > 0 ? xh[i > 0 ? i - 1 : 0][k] : x0[k];
            const float ex = e * xp * hn;
            const float dc = gt * xh[i][k], db = hn * dtu;
            if (!cst)
              dCl[k] += dc;
            else if (!cta_c)
              atomicAdd(dCp + t * cst + n, dc);
            if (!bst)
              dBl[k] += db;
            else if (cta_b)
              xh[i][k] = db;  // x_t is not needed any more (step t - 1 reads x_{t-1}, x_{t-2})
            else
              atomicAdd(dBp + t * bst + n, db);
            dAl[k] += ex * dt;
            ddt += ex * A[k] + hn * bt[n] * ut;
            dut += hn * bt[n];
            h[k] = hn * e;
          }
        }
        pa[i * 33 + lane] = ddt;
        pb[i * 33 + lane] = dut;
      }
    }
    __syncwarp();
    if (lane < T) {
      const int64_t t = t0 + lane;
      float ddt = 0.f, dut = 0.f;
      for (int k = 0; k < 32; ++k) {
        ddt += pa[lane * 33 + k];
        dut += pb[lane * 33 + k];
      }
      const float dt = dts[lane];
      if (a.softplus) ddt *= sig;
      scan_st(a.du, du_off + t * a.du.s[2], dut * dt + g * Dd);
      scan_st(a.ddelta, dd_off + t * a.ddelta.s[2], ddt);
      dD_acc += g * u;
      dbias_acc += ddt;
    }
    __syncwarp();  // the shared arrays are rewritten by the next chunk (or just below)
    if (cta_b) {  // dB_t = hn_t dt_t u_t (left in xh), summed over the CTA's channels
#pragma unroll
      for (int i = 0; i < TC; ++i)
        if (i < T) {
#pragma unroll
          for (int k = 0; k < NS; ++k) red[i * R + lane + 32 * k] = lane + 32 * k < N ? xh[i][k] : 0.f;
        }
      __syncthreads();
      scan_cta_add(&pab_s[0][0], kPab, R, T, N, dBp + t0 * bst, bst, tid);
      __syncthreads();
    }
  }
  float* dAp = static_cast<float*>(a.dA_part) + (int64_t(part) * a.dim + d) * N;
#pragma unroll
  for (int k = 0; k < NS; ++k) {
    const int64_t n = lane + 32 * k;
    if (n < N) {
      atomicAdd(dAp + n, dAl[k]);
      if (!bst) atomicAdd(dBp + n, dBl[k]);
      if (!cst) atomicAdd(dCp + n, dCl[k]);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    dD_acc += __shfl_xor_sync(0xffffffffu, dD_acc, o);
    dbias_acc += __shfl_xor_sync(0xffffffffu, dbias_acc, o);
  }
  if (lane == 0) {
    if (a.dD_part) atomicAdd(static_cast<float*>(a.dD_part) + int64_t(part) * a.dim + d, dD_acc);
    if (a.dbias_part) atomicAdd(static_cast<float*>(a.dbias_part) + int64_t(part) * a.dim + d, dbias_acc);
  }
}

// ---------------------------------------------------------------------------------
// Host side (shared with the emulation test).

inline void scan_fail(const std::string& what, const char* entry = "selective_scan_fwd") {
  throw std::invalid_argument(std::string("fastlayers._cuda.") + entry + ": " + what);
}

static inline bool scan_dt_ok(int dt) { return dt == kF32 || dt == kF16 || dt == kBF16; }

// The checks the forward and the backward share; false when there is nothing to launch
// (batch * dim == 0 or L == 0).
inline bool check_selective_scan_common(const SelectiveScanArgs& a, const char* entry) {
  if (a.batch < 0 || a.dim < 0 || a.L < 0 || a.N < 1) scan_fail("negative size or N < 1", entry);
  if (a.N > kScanMaxN)
    scan_fail("N = " + std::to_string(a.N) + " above " + std::to_string(kScanMaxN), entry);
  if (a.batch * a.dim == 0 || a.L == 0) return false;
  if (!a.u.p || !a.delta.p || !a.A.p || !a.B.p || !a.C.p) scan_fail("null pointer", entry);
  if (a.GB < 1 || a.GC < 1 || a.dim % a.GB || a.dim % a.GC) scan_fail("the groups of B and C must divide dim", entry);
  for (const View4* v : {&a.u, &a.delta, &a.A})
    if (!scan_dt_ok(v->dt)) scan_fail(std::string("unsupported dtype ") + dtype_name(v->dt), entry);
  for (const View4* v : {&a.D, &a.z, &a.delta_bias})
    if (v->p && !scan_dt_ok(v->dt)) scan_fail(std::string("unsupported dtype ") + dtype_name(v->dt), entry);
  if (a.B.dt != kF32 || a.C.dt != kF32) scan_fail("B and C must be float32", entry);
  if ((a.batch * a.dim + kScanWarps - 1) / kScanWarps > (int64_t(1) << 31) - 1) scan_fail("too many channels", entry);
  return true;
}

// Argument checks; false when there is nothing to launch (batch * dim == 0 or L == 0).
inline bool check_selective_scan_fwd(const SelectiveScanArgs& a) {
  if (!check_selective_scan_common(a, "selective_scan_fwd")) return false;
  if (!a.out.p) scan_fail("null pointer");
  if (!scan_dt_ok(a.out.dt)) scan_fail(std::string("unsupported dtype ") + dtype_name(a.out.dt));
  if (a.last.p && a.last.dt != kF32) scan_fail("B, C and last must be float32");
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

// Backward: the steps of a chunk (32 / states a lane) and the fp32 elements of the
// checkpoint buffer scan_bwd needs (per channel: segments - 1 checkpoints + M - 1 chunk
// starts of N states; 0 for L <= one chunk).
inline int64_t scan_bwd_chunk(int64_t N) { return N <= 32 ? 32 : N <= 64 ? 16 : N <= 128 ? 8 : 4; }
inline int64_t scan_bwd_ckpt_elems(int64_t batch, int64_t dim, int64_t L, int64_t N) {
  if (batch * dim <= 0 || L <= 0 || N < 1) return 0;
  const int64_t tc = scan_bwd_chunk(N), nch = (L + tc - 1) / tc, nseg = (L + kScanChunkT - 1) / kScanChunkT;
  return nch > 1 ? batch * dim * (nseg - 1 + kScanChunkT / tc - 1) * N : 0;
}

inline bool check_selective_scan_bwd(const SelectiveScanArgs& a, const float* ckpt, int parts) {
  const char* e = "selective_scan_bwd";
  if (!check_selective_scan_common(a, e)) return false;
  if (!a.dout.p || !a.du.p || !a.ddelta.p || !a.dA_part || !a.dB_part || !a.dC_part) scan_fail("null pointer", e);
  for (const View4* v : {&a.dout, &a.du, &a.ddelta})
    if (!scan_dt_ok(v->dt)) scan_fail(std::string("unsupported dtype ") + dtype_name(v->dt), e);
  if (a.dz.p && !scan_dt_ok(a.dz.dt)) scan_fail(std::string("unsupported dtype ") + dtype_name(a.dz.dt), e);
  if (a.dlast.p && a.dlast.dt != kF32) scan_fail("dlast must be float32", e);
  if (a.D.p && !a.dD_part) scan_fail("D without dD_part", e);
  if (a.delta_bias.p && !a.dbias_part) scan_fail("delta_bias without dbias_part", e);
  if (parts < 1) scan_fail("parts < 1", e);
  if (!ckpt && scan_bwd_ckpt_elems(a.batch, a.dim, a.L, a.N) > 0) scan_fail("null checkpoint buffer", e);
  return true;
}

// The backward (SelectiveScanArgs): du, ddelta, dz written; dA/dB/dC/dD/dbias added into
// part blockIdx % parts of the (zeroed) partial buffers. ckpt: scan_bwd_ckpt_elems fp32.
template <class Launch>
bool run_selective_scan_bwd(const SelectiveScanArgs& a, float* ckpt, int parts, Launch&& launch) {
  if (!check_selective_scan_bwd(a, ckpt, parts)) return false;
  const dim3 grid(unsigned((a.batch * a.dim + kScanWarps - 1) / kScanWarps)), block(kScanThreads);
  if (a.N <= 32)
    launch(scan_bwd<1>, grid, block, size_t(0), a, ckpt, parts);
  else if (a.N <= 64)
    launch(scan_bwd<2>, grid, block, size_t(0), a, ckpt, parts);
  else if (a.N <= 128)
    launch(scan_bwd<4>, grid, block, size_t(0), a, ckpt, parts);
  else
    launch(scan_bwd<8>, grid, block, size_t(0), a, ckpt, parts);
  return true;
}

}  // namespace cuda_kernels
}  // namespace fastlayers
