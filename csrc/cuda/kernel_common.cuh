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

// Tensor-core and async-copy PTX (sm_80+), as warp-collective helpers: every lane of the
// warp calls them together. The emulation (emu/cuda_emu.h) defines the same names and
// documents the fragment layouts. Pointers are generic addresses of shared memory (ldmatrix,
// cp.async destination) or of global memory (cp.async source).
#ifdef __CUDACC__
FL_DEV uint32_t fl_smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
FL_DEV void fl_ldmatrix_x1(uint32_t (&r)[1], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(fl_smem_addr(p)) : "memory");
}
FL_DEV void fl_ldmatrix_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(fl_smem_addr(p)) : "memory");
}
FL_DEV void fl_ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(fl_smem_addr(p)) : "memory");
}
FL_DEV void fl_ldmatrix_x1_trans(uint32_t (&r)[1], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0]) : "r"(fl_smem_addr(p)) : "memory");
}
FL_DEV void fl_ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1]) : "r"(fl_smem_addr(p)) : "memory");
}
FL_DEV void fl_ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(fl_smem_addr(p)) : "memory");
}
// d = a . b + c, m16n8k16, bf16 (BF16) or fp16 inputs, fp32 accumulators (no side effects:
// not volatile, the compiler may schedule it).
template <bool BF16>
FL_DEV void fl_mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  if (BF16)
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  else
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}
// 16 bytes global -> shared, bypassing L1; the bytes past src_bytes (0 or 16) are zero-filled.
FL_DEV void fl_cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(fl_smem_addr(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}
FL_DEV void fl_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
FL_DEV void fl_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

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
