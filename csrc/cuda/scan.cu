// The Mamba-1 selective scan forward on CUDA: host side (launch, CUDA errors). The kernel,
// the argument checks and the launch configuration are in scan_kernels.cuh (shared with
// the CPU emulation test).
#include "scan.h"

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "scan_kernels.cuh"

namespace fastlayers {
namespace cuda {

void selective_scan_fwd(const SelectiveScanArgs& a, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cuda_kernels::run_selective_scan_fwd(a, [&](auto kernel, dim3 grid, dim3 block, size_t smem, const auto&... args) {
    kernel<<<grid, block, smem, s>>>(args...);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
      const std::string detail = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
      if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
        throw std::runtime_error("fastlayers._cuda: no CUDA device available (" + detail + ")");
      throw std::runtime_error("fastlayers._cuda: selective_scan_fwd kernel launch failed (" + detail + ")");
    }
  });
}

}  // namespace cuda
}  // namespace fastlayers
