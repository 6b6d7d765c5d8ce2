#pragma once
#include "fastlayers/common.h"

namespace fastlayers {
namespace cpu {
// Accumulators one thread needs (floats, or doubles for fp64 q) for s_q*H query rows.
int64_t mla_decode_workspace(int64_t rows, int64_t D, int64_t dv);
// Phase-1 kernel: kMlaAuto picks the vectorised one where the CPU has AVX2 + FMA (fp32, fp16,
// bf16; fp64 always runs the scalar one), kMlaScalar forces the scalar one, kMlaVector asks for
// the vectorised one (the caller checks mla_decode_has_avx2() and the dtype first).
enum { kMlaAuto = 0, kMlaScalar = 1, kMlaVector = 2 };
bool mla_decode_has_avx2();
// workspace: parts * mla_decode_workspace(s_q * H, D, dv) accumulators.
void mla_decode(const MlaDecodeArgs& a, void* workspace, int parts, int kernel);
}  // namespace cpu
}  // namespace fastlayers
