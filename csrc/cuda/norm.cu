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

constexpr int64_t kMaxN = int64_t(1) << 30;  // the kernels index columns with int

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

// fp32 / fp16 / bf16; float64 is not supported by the CUDA kernels.
void check_dtype(int dt, const char* what) {
  if (dt == kF32 || dt == kF16 || dt == kBF16) return;
  throw std::invalid_argument(std::string("fastlayers._cuda: ") + what + " has dtype " + dtype_name(dt) + " (code " +
                              std::to_string(dt) + "); the CUDA kernels support float32, float16 and bfloat16");
}

void check_fwd(const NormFwdArgs& a) {
  check_dtype(a.x_dt, "x");
  check_dtype(a.w_dt, "weight");
  check_dtype(a.y_dt, "y");
  if (a.r) check_dtype(a.r_dt, "residual");
  if (a.b) check_dtype(a.b_dt, "bias");
  if (a.h) check_dtype(a.h_dt, "h");
  if (a.M < 0 || a.N < 0 || a.N > kMaxN)
    throw std::invalid_argument("fastlayers._cuda.norm_fwd: M must be >= 0 and N in [0, 2**30], got M=" +
                                std::to_string(a.M) + ", N=" + std::to_string(a.N));
  if (!a.x || !a.w || !a.y || !a.rstd || (!a.is_rms && !a.mean))
    throw std::invalid_argument("fastlayers._cuda.norm_fwd: x, weight, y, rstd (and mean for LayerNorm) are required");
}

void check_bwd(const NormBwdArgs& a, int parts) {
  check_dtype(a.dy_dt, "dy");
  check_dtype(a.x_dt, "x");
  check_dtype(a.w_dt, "weight");
  check_dtype(a.dx_dt, "dx");
  if (a.r) check_dtype(a.r_dt, "residual");
  if (a.b) check_dtype(a.b_dt, "bias");
  if (a.dh) check_dtype(a.dh_dt, "dh");
  if (a.dr) check_dtype(a.dr_dt, "dresidual");
  if (a.M < 0 || a.N < 0 || a.N > kMaxN)
    throw std::invalid_argument("fastlayers._cuda.norm_bwd: M must be >= 0 and N in [0, 2**30], got M=" +
                                std::to_string(a.M) + ", N=" + std::to_string(a.N));
  if (parts < 1) throw std::invalid_argument("fastlayers._cuda.norm_bwd: parts must be >= 1");
  if (!a.dy || !a.x || !a.w || !a.rstd || !a.dx || !a.dw_part || (!a.is_rms && !a.mean))
    throw std::invalid_argument(
        "fastlayers._cuda.norm_bwd: dy, x, weight, rstd, dx, dw_part (and mean for LayerNorm) are required");
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

void norm_fwd(const NormFwdArgs& a, void* stream) {
  check_fwd(a);
  if (a.M == 0 || a.N == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cuda_kernels::launch_norm_fwd(a, [&](auto kernel, dim3 grid, dim3 block, const NormFwdArgs& args) {
    kernel<<<grid, block, 0, s>>>(args);
  });
  check(cudaGetLastError(), "norm_fwd kernel launch");
}

void norm_bwd(const NormBwdArgs& a, int parts, void* stream) {
  check_bwd(a, parts);
  if (a.N == 0) return;  // M == 0 still launches: every dw_part row is written (zeros)
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cuda_kernels::launch_norm_bwd(a, parts, [&](auto kernel, dim3 grid, dim3 block, const NormBwdArgs& args) {
    kernel<<<grid, block, 0, s>>>(args);
  });
  check(cudaGetLastError(), "norm_bwd kernel launch");
}

}  // namespace cuda
}  // namespace fastlayers
