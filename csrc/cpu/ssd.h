#pragma once
#include "fastlayers/common.h"

namespace fastlayers {

// Mamba-2 scan (fastlayers.ssd_scan) over (batch, head) items of L steps, headdim P, dstate N, with the
// dt already processed (bias, softplus, clamp) by the caller:
//   s_t = exp(dt_t A_h) s_{t-1} + dt_t x_t B_t^T  (P x N),  y_t = s_t C_t + D x_t,  out = y * silu(z).
// x, z, out, dout, dx, dz: (b, l, h, p) views, any strides; D (h, p) (s[0], s[1]; s[1] may be 0);
// init, final_state, dfinal, dinit (b, h, p, n) views, any strides. dt (b, l, h), A (h,), B, C (b, l, g, n):
// accumulator dtype, contiguous (head h reads group h / (H / G)). reset (b, l) bytes or null: 1 where the
// state restarts from zero (the first step of a packed sequence; init seeds step 0 only).
// Backward outputs: ddt (b, l, h), dA (b, h), dD (b, h, p) in the accumulator dtype, written complete;
// dB_part, dC_part (parts, b, l, g, n): per-thread partials (heads of a group summed), zeroed by the caller.
// Varlen states (optional): vslot (b, l) int64, k >= 0 where step t is the last of packed sequence k, else -1;
// the forward writes the state after such a step to varlen[k] ((num_seqs, h, p, n) view); the backward adds
// dvarlen[k] (optional) to the state gradient there.
struct SsdScanArgs {
  View4 x, D, z, init, out, final_state;           // D, z, init, final_state: p == null when absent
  View4 dout, dfinal, dx, dz, dinit;               // backward only (dfinal, dz, dinit optional)
  View4 varlen, dvarlen;                           // forward / backward, with vslot; p == null when absent
  const void *dt, *A, *B, *C;
  const uint8_t* reset;
  const int64_t* vslot;
  void *ddt, *dA, *dD, *dB_part, *dC_part;
  int64_t batch, L, H, P, N, G;
};

namespace cpu {
// Accumulators per part of the workspace.
int64_t ssd_scan_workspace(int64_t L, int64_t P, int64_t N, bool backward);
void ssd_scan_fwd(const SsdScanArgs& a, void* workspace, int parts);
void ssd_scan_bwd(const SsdScanArgs& a, void* workspace, int parts);
}  // namespace cpu
}  // namespace fastlayers
