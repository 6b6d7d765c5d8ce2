#pragma once
#include "fastlayers/common.h"

namespace fastlayers {
namespace cpu {
// workspace: parts * 4 * N accumulators (float, or double for a float64 state).
void selective_state_update(const StateUpdateArgs& a, void* workspace, int parts);

// Mamba-1 selective scan (see SelectiveScanArgs). workspace: parts * selective_scan_workspace(L, N, backward)
// accumulators (float, or double for float64 u). The backward adds into the caller-zeroed partial buffers.
int64_t selective_scan_workspace(int64_t L, int64_t N, bool backward);
void selective_scan_fwd(const SelectiveScanArgs& a, void* workspace, int parts);
void selective_scan_bwd(const SelectiveScanArgs& a, void* workspace, int parts);
}  // namespace cpu
}  // namespace fastlayers
