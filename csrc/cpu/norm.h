#pragma once
#include "fastlayers/common.h"

namespace fastlayers {
namespace cpu {
// workspace: parts * 4 * N accumulators (float, or double for float64 inputs).
void norm_fwd(const NormFwdArgs& a, void* workspace, int parts);
void norm_bwd(const NormBwdArgs& a, void* workspace, int parts);
}  // namespace cpu
}  // namespace fastlayers
