#pragma once
#include "fastlayers/common.h"

namespace fastlayers {
namespace cpu {
// Accumulators one thread needs (floats, or doubles for fp64 q) for s_q*H query rows.
int64_t mla_decode_workspace(int64_t rows, int64_t D, int64_t dv);
// workspace: parts * mla_decode_workspace(s_q * H, D, dv) accumulators.
void mla_decode(const MlaDecodeArgs& a, void* workspace, int parts);
}  // namespace cpu
}  // namespace fastlayers
