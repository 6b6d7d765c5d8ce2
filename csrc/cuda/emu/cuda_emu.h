// A minimal CPU emulation of the CUDA execution model, enough to run the kernels of
// norm_kernels.cuh on a machine without a GPU (tests only; never built into _cuda).
//
// One std::thread per CUDA thread of a block, the blocks of a launch (x fastest, then y,
// z) one after another on the same threads. __syncthreads is a block-wide barrier; warp
// shuffles go through an exchange buffer and a barrier of the 32 threads of the warp,
// so the emulation requires (and the kernels guarantee) that every lane of a warp
// reaches each shuffle. __shared__ becomes `static`: one copy, reused block after block;
// dynamic shared memory (FL_DYN_SMEM) is one buffer of the launch's size, poisoned with
// NaN bytes (0xff) before the launch.
#pragma once
#define FL_CUDA_EMU 1

#include <math.h>

#include <barrier>
#include <stdexcept>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define FL_DEV static inline
#define FL_GLOBAL static
#define FL_LAUNCH_BOUNDS(n, m)
#define FL_ALIGN16 __attribute__((aligned(16)))
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned x, y, z, w;
};
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline thread_local dim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0};
inline dim3 blockDim, gridDim;

// Dynamic shared memory: `T* name` at the start of the launch's buffer.
#define FL_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(emu::dyn_smem)

namespace emu {
inline std::barrier<>* bar = nullptr;
inline std::barrier<>* warp_bar[32];
inline unsigned char* dyn_smem = nullptr;
inline float xch[1024];
inline int tid() { return int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }
}  // namespace emu

static inline void __syncthreads() { emu::bar->arrive_and_wait(); }

namespace emu {
inline void syncwarp() { warp_bar[tid() >> 5]->arrive_and_wait(); }
}  // namespace emu

static inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }

static inline float __shfl_xor_sync(unsigned, float v, int mask) {
  const int t = emu::tid();
  emu::xch[t] = v;
  emu::syncwarp();
  const float r = emu::xch[t ^ mask];
  emu::syncwarp();
  return r;
}

static inline float __shfl_down_sync(unsigned, float v, unsigned d) {
  const int t = emu::tid();
  emu::xch[t] = v;
  emu::syncwarp();
  const float r = (t & 31) + int(d) < 32 ? emu::xch[t + int(d)] : v;
  emu::syncwarp();
  return r;
}

static inline float __shfl_sync(unsigned, float v, int src) {
  const int t = emu::tid();
  emu::xch[t] = v;
  emu::syncwarp();
  const float r = emu::xch[(t & ~31) + (src & 31)];
  emu::syncwarp();
  return r;
}

static inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
static inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline float emu_f16_bits_to_f32(uint32_t s) {
  const uint16_t b = static_cast<uint16_t>(s);
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return float(h);
}
static inline uint32_t emu_f32_to_f16_bits(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
static inline uint32_t emu_f32_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return ((u >> 16) | 0x40u) & 0xffffu;
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

namespace emu {
// Run kernel(args...) on grid x block with `smem` bytes of dynamic shared memory: one
// thread per CUDA thread, every block of the grid in turn (x fastest, then y, z); a
// barrier between blocks, so a block starts after every thread of the previous one
// returned.
template <class K, class... Args>
void launch_smem(K kernel, dim3 grid, dim3 block, size_t smem, const Args&... args) {
  gridDim = grid;
  blockDim = block;
  const unsigned nt = block.x * block.y * block.z;
  if (nt > 1024 || nt % 32 != 0) throw std::runtime_error("emu::launch: bad block size");
  if (smem > (227u << 10)) throw std::runtime_error("emu::launch: dynamic shared memory above 227 KiB");
  std::vector<unsigned char> dyn(smem + 16, 0xff);
  dyn_smem = dyn.data() + (16 - reinterpret_cast<uintptr_t>(dyn.data()) % 16) % 16;
  std::barrier<> barrier(nt), end_of_block(nt);
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  for (unsigned w = 0; w < nt / 32; ++w) {
    warps.emplace_back(std::make_unique<std::barrier<>>(32));
    warp_bar[w] = warps.back().get();
  }
  bar = &barrier;
  std::vector<std::thread> threads;
  threads.reserve(nt);
  for (unsigned t = 0; t < nt; ++t)
    threads.emplace_back([&, t] {
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            blockIdx = dim3(x, y, z);
            kernel(args...);
            end_of_block.arrive_and_wait();
          }
    });
  for (auto& th : threads) th.join();
  dyn_smem = nullptr;
}

// Run kernel(args...) on grid x block (no dynamic shared memory).
template <class K, class... Args>
void launch(K kernel, dim3 grid, dim3 block, const Args&... args) {
  launch_smem(kernel, grid, block, 0, args...);
}
}  // namespace emu
