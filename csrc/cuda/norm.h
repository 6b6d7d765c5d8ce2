// Host interface of the CUDA norm kernels (csrc/cuda/norm.cu). Plain C++: no CUDA
// headers, so bindings.cpp compiles with the host compiler alone. Streams are passed
// as void* (a cudaStream_t). Every CUDA error is thrown as std::runtime_error with a
// message naming the failing call; bad arguments as std::invalid_argument.
#pragma once
#include <cstdint>

#include "fastlayers/common.h"

namespace fastlayers {
namespace cuda {

// Number of CUDA devices; 0 when there is no device or no (recent enough) driver.
int device_count();
// Number of streaming multiprocessors of a device.
int sm_count(int device);
// Number P of rows of dw_part/db_part norm_bwd writes for an (M, N) problem.
int norm_bwd_parts(int64_t M, int64_t N, int sm_count);

// Launch on `stream` on the current device (the caller makes the tensors' device
// current). Asynchronous; launch errors are reported, kernel faults surface later.
// Zero-element tensors may be null (torch's data_ptr() of an empty CUDA tensor is 0):
// with M == 0 or N == 0 the forward launches nothing and needs no pointer.
void norm_fwd(const NormFwdArgs& a, void* stream);
// parts: the number of rows of dw_part (and db_part), any value >= 1. With M == 0
// (N > 0) only weight and dw_part (db_part) are needed, and every partial row is
// written with zeros; with N == 0 nothing is launched.
void norm_bwd(const NormBwdArgs& a, int parts, void* stream);

}  // namespace cuda
}  // namespace fastlayers
