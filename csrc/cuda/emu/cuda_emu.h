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

// ---------------------------------------------------------------------------------
// Warp-collective PTX (the inline asm of kernel_common.cuh: fl_ldmatrix_*, fl_mma_16816,
// fl_cp_async16 / _commit / _wait). Every lane of the warp must call them together (as on
// the GPU: .sync.aligned). Each lane deposits its operands in an exchange slot, the warp
// meets at a barrier, each lane computes its own results from the warp's slots, the warp
// meets again (the slots are reused by the next call).
namespace emu {
inline uint32_t xu[1024][6];     // per-thread operand slots (mma: a0..a3, b0, b1)
inline const void* xa[1024];     // per-thread row addresses (ldmatrix)
struct Copy {
  void* dst;
  const void* src;
  int src_bytes;  // the rest of the 16 bytes is zero-filled
};
// cp.async state of each thread: the copies issued since its last commit, then its committed
// groups (oldest first). The destination is undefined while a copy is in flight: it is
// poisoned (NaN bytes) when the copy is issued, and the data lands only when a wait_group of
// its thread retires its group. A read that a missing wait (or a missing barrier after it)
// leaves unordered sees NaN; a copy issued before the other threads are done reading the
// buffer (a missing barrier before the issue) turns their reads into NaN.
inline std::vector<Copy> cp_open[1024];
inline std::vector<std::vector<Copy>> cp_groups[1024];
inline void cp_reset() {
  for (int t = 0; t < 1024; ++t) {
    cp_open[t].clear();
    cp_groups[t].clear();
  }
}
[[noreturn]] inline void ptx_fault(const char* what) {
  std::fprintf(stderr, "emu: %s (thread %d of block (%u,%u,%u))\n", what, tid(), blockIdx.x, blockIdx.y, blockIdx.z);
  std::abort();
}
inline uint16_t ld16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// ldmatrix.sync.aligned.m8n8.xN{.trans}.shared.b16: N 8x8 matrices of 16-bit elements.
// Matrix i's 8 rows start at the addresses of lanes 8i..8i+7 (row k at lane 8i + k; 16
// contiguous bytes a row, 16-byte aligned); the other lanes' addresses are ignored. Lane l
// (g = l / 4, q = l % 4) receives register i = the pair (low half first):
//   plain:  M_i[g][2q], M_i[g][2q + 1]          (row g, columns 2q, 2q + 1)
//   .trans: M_i[2q][g], M_i[2q + 1][g]          (the same for the transposed matrix)
template <int N, bool T>
inline void ldmatrix(uint32_t* r, const void* p) {
  const int t = tid(), w0 = t & ~31, l = t & 31, g = l >> 2, q = l & 3;
  xa[t] = p;
  if (l < 8 * N && (reinterpret_cast<uintptr_t>(p) & 15u)) ptx_fault("ldmatrix: row address not 16-byte aligned");
  syncwarp();
  for (int i = 0; i < N; ++i) {
    uint32_t v = 0;
    for (int h = 0; h < 2; ++h) {
      const int row = T ? 2 * q + h : g, col = T ? g : 2 * q + h;
      v |= uint32_t(ld16(static_cast<const uint16_t*>(xa[w0 + 8 * i + row]) + col)) << (16 * h);
    }
    r[i] = v;
  }
  syncwarp();
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: D (16 x 8, fp32) =
// A (16 x 16) . B (16 x 8) + C. Fragments of lane l (g = l / 4, q = l % 4; a register holds
// two 16-bit elements, the lower column / row index in the low half):
//   A: a0 = A[g][2q..2q+1], a1 = A[g+8][2q..2q+1], a2 = A[g][2q+8..2q+9], a3 = A[g+8][2q+8..2q+9]
//   B: b0 = B[2q..2q+1][g], b1 = B[2q+8..2q+9][g]          (k pairs of column n = g)
//   C, D: c0, c1 = C[g][2q], C[g][2q+1]; c2, c3 = C[g+8][2q], C[g+8][2q+1]
// The products of two bf16 (or two fp16) values are exact in fp32; they are summed in fp32
// (k = 0..15 after C, each addition rounded to nearest even). The hardware's adder tree
// rounds differently in the last bits: the tests' tolerances cover that.
template <bool BF16>
inline void mma16816(float* d, const uint32_t* a, const uint32_t* b, const float* c) {
  const int t = tid(), w0 = t & ~31, l = t & 31, g = l >> 2, q = l & 3;
  for (int i = 0; i < 4; ++i) xu[t][i] = a[i];
  xu[t][4] = b[0];
  xu[t][5] = b[1];
  syncwarp();
  auto cvt = [](uint32_t reg, int half) {
    const uint32_t h = (reg >> (16 * half)) & 0xffffu;
    return BF16 ? __uint_as_float(h << 16) : emu_f16_bits_to_f32(h);
  };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * q + (e & 1);
    float acc = c[e];
    for (int k = 0; k < 16; ++k) {
      const int kl = k & 7;  // A[row][k]: lane (row % 8) * 4 + kl / 2, register (row >= 8) + 2 (k >= 8)
      const float av = cvt(xu[w0 + (row & 7) * 4 + kl / 2][(row >> 3) + 2 * (k >> 3)], k & 1);
      const float bv = cvt(xu[w0 + col * 4 + kl / 2][4 + (k >> 3)], k & 1);  // B[k][col]: lane col * 4 + kl / 2
      acc += av * bv;
    }
    out[e] = acc;
  }
  syncwarp();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}
}  // namespace emu

static inline void fl_ldmatrix_x1(uint32_t (&r)[1], const void* p) { emu::ldmatrix<1, false>(r, p); }
static inline void fl_ldmatrix_x2(uint32_t (&r)[2], const void* p) { emu::ldmatrix<2, false>(r, p); }
static inline void fl_ldmatrix_x4(uint32_t (&r)[4], const void* p) { emu::ldmatrix<4, false>(r, p); }
static inline void fl_ldmatrix_x1_trans(uint32_t (&r)[1], const void* p) { emu::ldmatrix<1, true>(r, p); }
static inline void fl_ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) { emu::ldmatrix<2, true>(r, p); }
static inline void fl_ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { emu::ldmatrix<4, true>(r, p); }
template <bool BF16>
static inline void fl_mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  emu::mma16816<BF16>(d, a, b, c);
}
// cp.async.cg.shared.global [dst], [src], 16, src_bytes (16-byte aligned both sides): dst
// poisoned now, written when a wait_group retires its group (see cp_open above).
static inline void fl_cp_async16(void* dst, const void* src, int src_bytes) {
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15u)
    emu::ptx_fault("cp.async: address not 16-byte aligned");
  std::memset(dst, 0xff, 16);
  emu::cp_open[emu::tid()].push_back(emu::Copy{dst, src, src_bytes});
}
static inline void fl_cp_async_commit() {
  const int t = emu::tid();
  emu::cp_groups[t].push_back(std::move(emu::cp_open[t]));
  emu::cp_open[t].clear();
}
// cp.async.wait_group N: all but the N most recent committed groups of this thread have landed.
template <int N>
static inline void fl_cp_async_wait() {
  auto& gs = emu::cp_groups[emu::tid()];
  while (int(gs.size()) > N) {
    for (const emu::Copy& c : gs.front()) {
      std::memset(c.dst, 0, 16);
      std::memcpy(c.dst, c.src, size_t(c.src_bytes));
    }
    gs.erase(gs.begin());
  }
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
        cp_reset();
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
