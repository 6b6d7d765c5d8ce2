// Host interface of the CUDA selective-scan kernel (csrc/cuda/scan.cu). Plain C++: no CUDA
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

}  // namespace cuda
}  // namespace fastlayers
