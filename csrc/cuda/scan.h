// Host interface of the CUDA selective-scan kernels (csrc/cuda/scan.cu). Plain C++: no CUDA
// headers. Streams are passed as void* (a cudaStream_t); CUDA errors are thrown as
// std::runtime_error, bad arguments as std::invalid_argument.
#pragma once
#include "fastlayers/common.h"

namespace fastlayers {
namespace cuda {

// The Mamba-1 selective scan forward (SelectiveScanArgs, fastlayers/common.h) on `stream`
// on the current device. Asynchronous. u, delta, z, out, A, D, delta_bias: fp32/fp16/bf16;
// B, C, last: fp32 with N contiguous; N <= 256. Launches nothing when batch * dim or L is 0.
void selective_scan_fwd(const SelectiveScanArgs& a, void* stream);

// The backward (SelectiveScanArgs: dout, optional dlast -> du, ddelta, optional dz written;
// dA/dB/dC/dD/dbias added into part (block % parts) of the zeroed fp32 dX_part buffers).
// ckpt: an fp32 scratch buffer of selective_scan_bwd_ckpt(batch, dim, L, N) elements (the
// states at the chunk ends, O(L / chunk) a channel; null when that is 0). Asynchronous.
void selective_scan_bwd(const SelectiveScanArgs& a, void* ckpt, int parts, void* stream);
int64_t selective_scan_bwd_ckpt(int64_t batch, int64_t dim, int64_t L, int64_t N);

}  // namespace cuda
}  // namespace fastlayers
