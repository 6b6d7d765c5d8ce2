// Fused residual-add + RMSNorm / LayerNorm on CUDA: host side (argument checks,
// launches, CUDA errors). The kernels are in norm_kernels.cuh.
#include "norm.h"

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "norm_kernels.cuh"

namespace fastlayers {
namespace cuda {

namespace {

bool is_no_device(cudaError_t e) {
  return e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver;
}

[[noreturn]] void throw_cuda(cudaError_t e, const char* what) {
  cudaGetLastError();  // clear the (non-sticky) error state of this runtime
  const std::string detail = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  if (is_no_device(e)) throw std::runtime_error("fastlayers._cuda: no CUDA device available (" + detail + ")");
  throw std::runtime_error(std::string("fastlayers._cuda: ") + what + " failed (" + detail + ")");
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw_cuda(e, what);
}

}  // namespace

int device_count() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (is_no_device(e)) {
    cudaGetLastError();
    return 0;
  }
  check(e, "cudaGetDeviceCount");
  return n;
}

int sm_count(int device) {
  int n = 0;
  check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute(sm count)");
  return n;
}

int norm_bwd_parts(int64_t M, int64_t N, int sm) { return cuda_kernels::norm_bwd_parts(M, N, sm); }

// Argument checks (cuda_kernels::check_norm_fwd / check_norm_bwd) and launch
// configuration live in norm_kernels.cuh, shared with the CPU emulation test.
void norm_fwd(const NormFwdArgs& a, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool launched = cuda_kernels::run_norm_fwd(
      a, [&](auto kernel, dim3 grid, dim3 block, const auto&... args) { kernel<<<grid, block, 0, s>>>(args...); });
  if (launched) check(cudaGetLastError(), "norm_fwd kernel launch");
}

// M == 0 (with N > 0) still launches: every dw_part/db_part row is written (zeros).
void norm_bwd(const NormBwdArgs& a, int parts, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool launched = cuda_kernels::run_norm_bwd(
      a, parts,
      [&](auto kernel, dim3 grid, dim3 block, const auto&... args) { kernel<<<grid, block, 0, s>>>(args...); });
  if (launched) check(cudaGetLastError(), "norm_bwd kernel launch");
}

}  // namespace cuda
}  // namespace fastlayers
