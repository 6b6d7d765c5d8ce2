// Checks the CUDA norm kernels (norm_kernels.cuh), run on CPU threads by cuda_emu.h,
// against the CPU kernel (csrc/cpu/norm.cpp). Build and run: see run_emu_test.sh.
#include "cuda_emu.h"
// clang-format off
#include "../norm_kernels.cuh"
// clang-format on

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "../../cpu/convert.h"
#include "../../cpu/norm.h"

using namespace fastlayers;
namespace ck = fastlayers::cuda_kernels;

static std::mt19937_64 rng(1234);
static int failures = 0, checks = 0;
static int force_parts = 0;  // > 0: the backward's P

static int esize(int dt) { return dt == kF32 ? 4 : 2; }

static float get(const std::vector<uint8_t>& buf, int dt, int64_t i) {
  if (dt == kF32) {
    float f;
    std::memcpy(&f, buf.data() + 4 * i, 4);
    return f;
  }
  uint16_t s;
  std::memcpy(&s, buf.data() + 2 * i, 2);
  return dt == kBF16 ? cpu::bf16_to_f32(s) : emu_f16_bits_to_f32(s);
}
static void set(std::vector<uint8_t>& buf, int dt, int64_t i, float v) {
  if (dt == kF32) {
    std::memcpy(buf.data() + 4 * i, &v, 4);
    return;
  }
  const uint16_t s = dt == kBF16 ? cpu::f32_to_bf16(v) : uint16_t(emu_f32_to_f16_bits(v));
  std::memcpy(buf.data() + 2 * i, &s, 2);
}

// A (rows, N) tensor with row stride `stride`, starting `off` elements into its buffer.
struct T2 {
  int dt = kF32;
  int64_t rows = 0, N = 0, stride = 0, off = 0;
  std::vector<uint8_t> buf;
  T2() = default;
  T2(int dt_, int64_t rows_, int64_t N_, int64_t pad, int64_t off_)
      : dt(dt_), rows(rows_), N(N_), stride(N_ + pad), off(off_) {
    buf.assign(size_t((off + rows * stride + 16) * esize(dt)), 0);
  }
  void* ptr() { return buf.data() + off * esize(dt); }
  float at(int64_t r, int64_t c) const { return get(buf, dt, off + r * stride + c); }
  void put(int64_t r, int64_t c, float v) { set(buf, dt, off + r * stride + c, v); }
  void fill_random(float mean, float sd) {
    std::normal_distribution<float> d(mean, sd);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < N; ++c) put(r, c, d(rng));
  }
  void poison() {  // NaN everywhere, padding included
    for (int64_t i = 0; i < int64_t(buf.size()) / esize(dt); ++i) set(buf, dt, i, NAN);
  }
};

static bool close(float got, float want, int dt) {
  if (std::isnan(want)) return std::isnan(got);
  const float rtol = dt == kF32 ? 2e-5f : dt == kF16 ? 2.5e-3f : 1.6e-2f;
  const float atol = dt == kF32 ? 2e-5f : dt == kF16 ? 2e-3f : 1.6e-2f;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

static void compare(const char* what, const std::string& cfg, const T2& got, const T2& want) {
  ++checks;
  int bad = 0;
  for (int64_t r = 0; r < want.rows; ++r) {
    for (int64_t c = 0; c < want.N; ++c) {
      const float g = got.at(r, c), w = want.at(r, c);
      if (!close(g, w, got.dt)) {
        if (bad < 3) std::printf("  MISMATCH %s [%lld,%lld] got %g want %g  (%s)\n", what, (long long)r, (long long)c, g, w, cfg.c_str());
        ++bad;
      }
    }
    for (int64_t c = want.N; c < got.stride && r + 1 < want.rows; ++c)  // padding untouched
      if (!std::isnan(got.at(r, c))) {
        if (bad < 3) std::printf("  PADDING WRITTEN %s [%lld,%lld] (%s)\n", what, (long long)r, (long long)c, cfg.c_str());
        ++bad;
      }
  }
  if (got.off > 0 && !std::isnan(get(got.buf, got.dt, got.off - 1))) {
    std::printf("  WRITE BEFORE START %s (%s)\n", what, cfg.c_str());
    ++bad;
  }
  if (bad) {
    ++failures;
    std::printf("FAIL %s: %d bad (%s)\n", what, bad, cfg.c_str());
  }
}

static int pick(std::initializer_list<int> v) {
  std::uniform_int_distribution<size_t> d(0, v.size() - 1);
  return *(v.begin() + d(rng));
}

static void run_case(int64_t M, int64_t N, bool nan_row) {
  const int xdt = pick({kF32, kF16, kBF16});
  const bool rms = pick({0, 1});
  const int res = pick({0, 1, 2});  // none, dtype of x, fp32
  const int rdt = res == 2 ? kF32 : xdt;
  const bool bias = !rms && pick({0, 1});
  const int wdt = pick({kF32, xdt});
  const int hsel = pick({0, 1, 2});  // none, dtype of x, fp32
  const int hdt = hsel == 2 ? kF32 : xdt;
  const bool dh_in = hsel && pick({0, 1});
  const int64_t pad = pick({0, 0, 3, 8});
  const int64_t off = pick({0, 0, 1});
  char cfgs[256];
  std::snprintf(cfgs, sizeof cfgs, "M=%lld N=%lld x=%s rms=%d res=%d bias=%d w=%s h=%d dh=%d pad=%lld off=%lld nan=%d",
                (long long)M, (long long)N, dtype_name(xdt), rms, res, bias, dtype_name(wdt), hsel, dh_in,
                (long long)pad, (long long)off, nan_row);
  const std::string cfg = cfgs;

  T2 x(xdt, M, N, pad, off), r(rdt, M, N, pad + 1, off), w(wdt, 1, N, 0, off), b(wdt, 1, N, 0, 0);
  x.fill_random(1.5f, 2.f);
  r.fill_random(-0.5f, 1.f);
  w.fill_random(1.f, 0.5f);
  b.fill_random(0.f, 0.5f);
  if (nan_row && M > 1) x.put(M / 2, N / 3, NAN);

  // Forward: CPU reference and emulated CUDA.
  T2 y_c(xdt, M, N, 0, 0), h_c(hdt, M, N, 0, 0), mean_c(kF32, 1, M, 0, 0), rstd_c(kF32, 1, M, 0, 0);
  T2 y_g(xdt, M, N, pad, off), h_g(hdt, M, N, pad + 2, 0), mean_g(kF32, 1, M, 0, off), rstd_g(kF32, 1, M, 0, 0);
  y_g.poison(); h_g.poison(); mean_g.poison(); rstd_g.poison();
  NormFwdArgs fc{x.ptr(), x.stride, xdt, res ? r.ptr() : nullptr, r.stride, rdt, w.ptr(), wdt,
                 bias ? b.ptr() : nullptr, wdt, y_c.ptr(), y_c.stride, xdt, hsel ? h_c.ptr() : nullptr, h_c.stride, hdt,
                 rms ? nullptr : mean_c.ptr(), rstd_c.ptr(), M, N, 1e-5, rms};
  NormFwdArgs fg = fc;
  fg.y = y_g.ptr(); fg.y_stride = y_g.stride;
  fg.h = hsel ? h_g.ptr() : nullptr; fg.h_stride = h_g.stride;
  fg.mean = rms ? nullptr : mean_g.ptr(); fg.rstd = rstd_g.ptr();
  if (M > 0) {
    std::vector<float> ws(8 * N * 2);  // generous: the CPU kernel needs parts * 4 * N
    cpu::norm_fwd(fc, ws.data(), 2);
    ck::launch_norm_fwd(fg, [](auto k, dim3 g, dim3 bl, const NormFwdArgs& a) { emu::launch(k, g, bl, a); });
    compare("y", cfg, y_g, y_c);
    if (hsel) compare("h", cfg, h_g, h_c);
    if (!rms) compare("mean", cfg, mean_g, mean_c);
    compare("rstd", cfg, rstd_g, rstd_c);
  }

  // Backward, from the CPU forward's statistics.
  T2 dy(xdt, M, N, pad, 0), dh(hdt, M, N, 0, off);
  dy.fill_random(0.f, 1.f);
  dh.fill_random(0.f, 1.f);
  T2 dx_c(xdt, M, N, 0, 0), dr_c(rdt, M, N, 0, 0), dx_g(xdt, M, N, pad, off), dr_g(rdt, M, N, 3, 0);
  dx_g.poison(); dr_g.poison();
  const int parts_c = 3;
  int parts_g = pick({0, 1, 2}) == 0 ? ck::norm_bwd_parts(M, N, 2) : pick({1, 4, int(M) + 3});
  if (force_parts > 0) parts_g = force_parts;
  T2 dw_c(kF32, parts_c, N, 0, 0), db_c(kF32, parts_c, N, 0, 0), dw_g(kF32, parts_g, N, 0, off), db_g(kF32, parts_g, N, 0, 0);
  dw_g.poison(); db_g.poison();
  NormBwdArgs bc{dy.ptr(), dy.stride, xdt, x.ptr(), x.stride, xdt, res ? r.ptr() : nullptr, r.stride, rdt,
                 w.ptr(), wdt, bias ? b.ptr() : nullptr, wdt, rms ? nullptr : mean_c.ptr(), rstd_c.ptr(),
                 dh_in ? dh.ptr() : nullptr, dh.stride, hdt, dx_c.ptr(), dx_c.stride, xdt,
                 res ? dr_c.ptr() : nullptr, dr_c.stride, rdt, dw_c.ptr(), bias ? db_c.ptr() : nullptr, M, N, rms};
  NormBwdArgs bg = bc;
  bg.dx = dx_g.ptr(); bg.dx_stride = dx_g.stride;
  bg.dr = res ? dr_g.ptr() : nullptr; bg.dr_stride = dr_g.stride;
  bg.dw_part = dw_g.ptr(); bg.db_part = bias ? db_g.ptr() : nullptr;
  std::vector<float> ws(8 * N * parts_c);
  cpu::norm_bwd(bc, ws.data(), parts_c);
  ck::launch_norm_bwd(bg, parts_g, [](auto k, dim3 g, dim3 bl, const NormBwdArgs& a) { emu::launch(k, g, bl, a); });
  if (M > 0) {
    compare("dx", cfg, dx_g, dx_c);
    if (res) compare("dr", cfg, dr_g, dr_c);
  }
  // Partial sums: every part row written; the sums over parts agree.
  for (int which = 0; which < (bias ? 2 : 1); ++which) {
    const T2& pg = which ? db_g : dw_g;
    const T2& pc = which ? db_c : dw_c;
    ++checks;
    int bad = 0;
    for (int64_t c = 0; c < N; ++c) {
      double sg = 0, sc = 0, mag = 0;
      for (int p = 0; p < parts_g; ++p) sg += pg.at(p, c);
      for (int p = 0; p < parts_c; ++p) sc += pc.at(p, c), mag += std::fabs(pc.at(p, c));
      const bool ok = std::isnan(sc) ? std::isnan(sg) : std::fabs(sg - sc) <= 1e-4 * (1 + mag);
      if (!ok) {
        if (bad < 3) std::printf("  MISMATCH %s col %lld got %g want %g (%s)\n", which ? "db" : "dw", (long long)c, sg, sc, cfg.c_str());
        ++bad;
      }
    }
    if (bad) {
      ++failures;
      std::printf("FAIL %s partials: %d bad (%s)\n", which ? "db" : "dw", bad, cfg.c_str());
    }
  }
}

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 3;
  const int64_t Ns[] = {1, 3, 8, 17, 123, 256, 257, 512, 1000, 1024, 2048, 3000, 4096, 4100, 8192, 8200, 20000};
  const int64_t Ms[] = {0, 1, 3, 37};
  for (int64_t N : Ns)
    for (int64_t M : Ms)
      for (int rep = 0; rep < reps; ++rep) {
        if (N >= 8192 && M > 3 && rep > 0) continue;  // keep the emulation quick
        run_case(M, N, rep == 1);
      }
  // Several batches of the backward loop kernel in one block.
  force_parts = 1;
  for (int rep = 0; rep < 3; ++rep) run_case(600, 8200, false);
  force_parts = 0;
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
