#pragma once
#include "fastlayers/common.h"

namespace fastlayers {
namespace cpu {
// workspace: parts * 4 * D (head norm) accumulators (float, or double for float64 inputs).
void head_norm_rope_fwd(const HeadNormRopeArgs& a, void* workspace, int parts);
void head_norm_rope_bwd(const HeadNormRopeBwdArgs& a, void* workspace, int parts);
// workspace: parts * 4 * F accumulators.
void swiglu_fwd(const SwigluArgs& a, void* workspace, int parts);
void swiglu_bwd(const SwigluArgs& a, void* workspace, int parts);
}  // namespace cpu
}  // namespace fastlayers
