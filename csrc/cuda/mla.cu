// MLA decoding on CUDA: host side (launches, CUDA errors). The kernels, the argument
// checks and the launch configuration are in mla_kernels.cuh (shared with the CPU
// emulation test).
#include "mla.h"

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "mla_kernels.cuh"

namespace fastlayers {
namespace cuda {

namespace {

[[noreturn]] void throw_cuda(cudaError_t e, const char* what) {
  cudaGetLastError();  // clear the (non-sticky) error state of this runtime
  const std::string detail = std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver)
    throw std::runtime_error("fastlayers._cuda: no CUDA device available (" + detail + ")");
  throw std::runtime_error(std::string("fastlayers._cuda: ") + what + " failed (" + detail + ")");
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw_cuda(e, what);
}

}  // namespace

void mla_decode(const MlaDecodeArgs& a, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool launched = cuda_kernels::run_mla_decode(
      a, [&](auto kernel, dim3 grid, dim3 block, size_t smem, const auto&... args) {
        if (smem > (48u << 10))  // above the default limit: opt in (per kernel, cheap)
          check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
                "cudaFuncSetAttribute(mla_decode shared memory)");
        kernel<<<grid, block, smem, s>>>(args...);
        check(cudaGetLastError(), "mla_decode kernel launch");
      });
  (void)launched;
}

}  // namespace cuda
}  // namespace fastlayers
