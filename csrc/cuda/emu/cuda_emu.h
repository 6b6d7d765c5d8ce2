// A minimal CPU emulation of the CUDA execution model, enough to run the kernels of
// norm_kernels.cuh, mla_kernels.cuh and scan_kernels.cuh on a machine without a GPU (tests
// only; never built into _cuda).
//
// Every CUDA thread of a block is a fiber (ucontext, its own stack) on the calling OS
// thread; the blocks of a launch (x fastest, then y, z) run one after another. A fiber runs
// until it reaches a barrier or returns; the scheduler resumes the fibers round-robin.
// __syncthreads is a barrier of the block's threads; warp shuffles go through an exchange
// buffer and a barrier of the warp's 32 threads (__syncwarp is that barrier), so the
// emulation requires (and the kernels guarantee) that every lane of a warp reaches each
// shuffle. A round in which no fiber reaches a barrier or returns is a deadlock (a barrier
// not every thread reaches): reported, then abort(). __shared__ becomes `static`: one copy,
// reused block after block; dynamic shared memory (FL_DYN_SMEM) is one buffer of the
// launch's size, poisoned with NaN bytes (0xff) before every block. Thread 0 runs first to
// its next barrier, then thread 1, ...: a read of shared memory that a missing barrier
// leaves unordered sees NaN or a stale value in this order.
//
// Cooperative fibers instead of OS threads: no OS scheduler in the way (a barrier costs
// context switches in this process, not futex wake-ups of hundreds of threads on a shared
// 2-core machine). What this cannot show: real concurrency (accesses that a barrier should
// order run here in one fixed order), memory ordering, alignment faults, performance.
#pragma once
#define FL_CUDA_EMU 1

#include <math.h>
#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
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
struct alignas(16) float4 {
  float x, y, z, w;
};
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline dim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0};  // of the running fiber
inline dim3 blockDim, gridDim;

// Dynamic shared memory: `T* name` at the start of the launch's buffer.
#define FL_DYN_SMEM(T, name) T* name = reinterpret_cast<T*>(emu::dyn_smem)

namespace emu {
struct Fiber {
  ucontext_t ctx;
  dim3 tidx;
  bool done = false;
};
inline ucontext_t sched_ctx;
inline std::vector<Fiber>* fibers = nullptr;
inline unsigned cur = 0, n_threads = 0;
inline unsigned long long progress = 0;  // barrier arrivals and returns
inline unsigned bar_count = 0, bar_gen = 0;
inline unsigned warp_count[32], warp_gen[32];
inline unsigned char* dyn_smem = nullptr;
inline float xch[1024];
inline int tid() { return int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }

inline void yield() { swapcontext(&(*fibers)[cur].ctx, &sched_ctx); }

// Arrive at a barrier of `n` fibers (count, generation); wait until the generation moves.
inline void barrier(unsigned& count, unsigned& gen, unsigned n) {
  ++progress;
  const unsigned g = gen;
  if (++count == n) {
    count = 0;
    ++gen;
    return;
  }
  while (gen == g) yield();
}
inline void syncwarp() {
  const int w = tid() >> 5;
  barrier(warp_count[w], warp_gen[w], 32);
}
}  // namespace emu

static inline void __syncthreads() { emu::barrier(emu::bar_count, emu::bar_gen, emu::n_threads); }
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

// One OS thread runs every fiber and a fiber only yields at a barrier: a plain add is atomic.
static inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
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
inline void (*fiber_body)(void*) = nullptr;
inline void* fiber_arg = nullptr;
inline void fiber_entry() {
  fiber_body(fiber_arg);
  (*fibers)[cur].done = true;
  ++progress;
}  // returns to sched_ctx (uc_link)

// Run kernel(args...) on grid x block with `smem` bytes of dynamic shared memory.
template <class K, class... Args>
void launch_smem(K kernel, dim3 grid, dim3 block, size_t smem, const Args&... args) {
  gridDim = grid;
  blockDim = block;
  const unsigned nt = block.x * block.y * block.z;
  if (nt > 1024 || nt % 32 != 0) throw std::runtime_error("emu::launch: bad block size");
  if (smem > (227u << 10)) throw std::runtime_error("emu::launch: dynamic shared memory above 227 KiB");
  std::vector<unsigned char> dyn(smem + 16, 0xff);
  dyn_smem = dyn.data() + (16 - reinterpret_cast<uintptr_t>(dyn.data()) % 16) % 16;
  constexpr size_t kStack = 256 << 10;
  std::unique_ptr<char[]> stacks(new char[nt * kStack]);
  std::vector<Fiber> fs(nt);
  fibers = &fs;
  n_threads = nt;
  auto body = [&]() { kernel(args...); };
  fiber_body = [](void* p) { (*static_cast<decltype(body)*>(p))(); };
  fiber_arg = &body;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        std::memset(dyn_smem, 0xff, smem);  // NaN again: no value carried over from the previous block
        bar_count = bar_gen = 0;
        for (unsigned w = 0; w < 32; ++w) warp_count[w] = warp_gen[w] = 0;
        for (unsigned t = 0; t < nt; ++t) {
          Fiber& f = fs[t];
          f.done = false;
          f.tidx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = stacks.get() + t * kStack;
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = &sched_ctx;
          makecontext(&f.ctx, fiber_entry, 0);
        }
        unsigned left = nt;
        while (left) {
          const unsigned long long before = progress;
          for (unsigned t = 0; t < nt; ++t) {
            if (fs[t].done) continue;
            cur = t;
            threadIdx = fs[t].tidx;
            swapcontext(&sched_ctx, &fs[t].ctx);
            if (fs[t].done) --left;
          }
          if (left && progress == before) {
            std::fprintf(stderr, "emu::launch: deadlock in block (%u,%u,%u): %u threads wait at a barrier "
                                 "that not every thread reaches\n", x, y, z, left);
            std::abort();
          }
        }
      }
  fibers = nullptr;
  dyn_smem = nullptr;
}

// Run kernel(args...) on grid x block (no dynamic shared memory).
template <class K, class... Args>
void launch(K kernel, dim3 grid, dim3 block, const Args&... args) {
  launch_smem(kernel, grid, block, 0, args...);
}
}  // namespace emu
