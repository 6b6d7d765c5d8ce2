// Shared by the CUDA kernel headers (norm_kernels.cuh, mla_kernels.cuh, scan_kernels.cuh):
// the device/emulation macros and the fp16/bf16 bit conversions. Compiles with nvcc, or as
// plain C++ on top of csrc/cuda/emu/cuda_emu.h.
#pragma once
#include <cstdint>

#include "fastlayers/common.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FL_DEV __device__ __forceinline__
#define FL_GLOBAL __global__
#define FL_LAUNCH_BOUNDS(n, m) __launch_bounds__(n, m)
#define FL_ALIGN16 __align__(16)
#else
#ifndef FL_CUDA_EMU
#error "kernel_common.cuh: compile with nvcc, or include emu/cuda_emu.h first"
#endif
#endif

namespace fastlayers {
namespace cuda_kernels {

FL_DEV float bf16_bits_to_f32(uint32_t s) { return __uint_as_float(s << 16); }

FL_DEV float f16_bits_to_f32(uint32_t s) {
#ifdef __CUDACC__
  return __half2float(__ushort_as_half(static_cast<unsigned short>(s)));
#else
  return emu_f16_bits_to_f32(s);
#endif
}

// Round to nearest even; NaN stays NaN.
FL_DEV uint32_t f32_to_bf16_bits(float f) {
#ifdef __CUDACC__
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  return emu_f32_to_bf16_bits(f);
#endif
}

FL_DEV uint32_t f32_to_f16_bits(float f) {
#ifdef __CUDACC__
  return __half_as_ushort(__float2half_rn(f));
#else
  return emu_f32_to_f16_bits(f);
#endif
}

FL_DEV int elem_size(int dt) { return dt == kF32 ? 4 : 2; }

FL_DEV const void* row_ptr(const void* base, int dt, int64_t row, int64_t stride) {
  return static_cast<const char*>(base) + row * stride * elem_size(dt);
}
FL_DEV void* row_ptr(void* base, int dt, int64_t row, int64_t stride) {
  return static_cast<char*>(base) + row * stride * elem_size(dt);
}
FL_DEV bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace cuda_kernels
}  // namespace fastlayers
