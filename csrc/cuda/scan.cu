// The Mamba-1 selective scan forward and backward on CUDA: host side (launch, CUDA errors). The kernel,
// the argument checks and the launch configuration are in scan_kernels.cuh (shared with
// the CPU emulation test).
#include "scan.h"

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "scan_kernels.cuh"

namespace fastlayers {
namespace cuda {

namespace {
// Launches through `run` on `stream`, turning a launch error into std::runtime_error.
template <class Run>
void launch_checked(void* stream, const char* what, Run&& run) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  run([&](auto kernel, dim3 grid, dim3 block, size_t smem, const auto&... args) {
    kernel<<<grid, block, smem, s>>>(args...);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
      const std::string detail = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
      if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
        throw std::runtime_error("fastlayers._cuda: no CUDA device available (" + detail + ")");
      throw std::runtime_error(std::string("fastlayers._cuda: ") + what + " kernel launch failed (" + detail + ")");
    }
  });
}
}  // namespace

void selective_scan_fwd(const SelectiveScanArgs& a, void* stream) {
  launch_checked(stream, "selective_scan_fwd",
                 [&](auto&& launch) { cuda_kernels::run_selective_scan_fwd(a, launch); });
}

int64_t selective_scan_bwd_ckpt(int64_t batch, int64_t dim, int64_t L, int64_t N) {
  return cuda_kernels::scan_bwd_ckpt_elems(batch, dim, L, N);
}

void selective_scan_bwd(const SelectiveScanArgs& a, void* ckpt, int parts, void* stream) {
  launch_checked(stream, "selective_scan_bwd", [&](auto&& launch) {
    cuda_kernels::run_selective_scan_bwd(a, static_cast<float*>(ckpt), parts, launch);
  });
}

}  // namespace cuda
}  // namespace fastlayers
