#pragma once
#include "fastlayers/common.h"

namespace fastlayers {
namespace cpu {
// workspace: parts * 4 * N accumulators (float, or double for a float64 state).
void selective_state_update(const StateUpdateArgs& a, void* workspace, int parts);
}  // namespace cpu
}  // namespace fastlayers
