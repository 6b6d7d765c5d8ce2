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
#define EMU_SEED 1234
#include "emu_harness.h"

using namespace fastlayers;
namespace ck = fastlayers::cuda_kernels;

static int force_parts = 0;  // > 0: the backward's P
static int force_batch = 0;  // > 0: the backward loop kernel's batch (else sized at launch)

// The launcher of norm.cu, with emu::launch for the <<<>>> launch.
static const auto emu_launch = [](auto k, dim3 g, dim3 bl, const auto&... args) { emu::launch(k, g, bl, args...); };


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
  // The gain: offset + w (Gemma: offset 1), or no weight at all; Llama's casting rounds xhat to x's dtype.
  const bool has_w = pick({1, 1, 0});
  const double offset = pick({0, 0, 1}) ? 1.0 : 0.0;
  const int xhat_dt = xdt != kF32 && pick({0, 1}) ? xdt : -1;
  char cfgs[320];
  std::snprintf(cfgs, sizeof cfgs,
                "M=%lld N=%lld x=%s rms=%d res=%d bias=%d w=%s h=%d dh=%d pad=%lld off=%lld nan=%d has_w=%d "
                "offset=%g xhat=%d",
                (long long)M, (long long)N, dtype_name(xdt), rms, res, bias, dtype_name(wdt), hsel, dh_in,
                (long long)pad, (long long)off, nan_row, has_w, offset, xhat_dt);
  const std::string cfg = cfgs;

  T2 x(xdt, M, N, pad, off), r(rdt, M, N, pad + 1, off), w(wdt, 1, N, 0, off), b(wdt, 1, N, 0, 0);
  x.fill_random(1.5f, 2.f);
  r.fill_random(-0.5f, 1.f);
  w.fill_random(offset != 0.0 ? 0.f : 1.f, 0.5f);
  b.fill_random(0.f, 0.5f);
  if (nan_row && M > 1) x.put(M / 2, N / 3, NAN);

  // Forward: CPU reference and emulated CUDA.
  T2 y_c(xdt, M, N, 0, 0), h_c(hdt, M, N, 0, 0), mean_c(kF32, 1, M, 0, 0), rstd_c(kF32, 1, M, 0, 0);
  T2 y_g(xdt, M, N, pad, off), h_g(hdt, M, N, pad + 2, 0), mean_g(kF32, 1, M, 0, off), rstd_g(kF32, 1, M, 0, 0);
  y_g.poison(); h_g.poison(); mean_g.poison(); rstd_g.poison();
  NormFwdArgs fc{x.ptr(), x.stride, xdt, res ? r.ptr() : nullptr, r.stride, rdt, w.ptr(), wdt,
                 bias ? b.ptr() : nullptr, wdt, y_c.ptr(), y_c.stride, xdt, hsel ? h_c.ptr() : nullptr, h_c.stride, hdt,
                 rms ? nullptr : mean_c.ptr(), rstd_c.ptr(), M, N, 1e-5, rms, offset, xhat_dt};
  if (!has_w) fc.w = nullptr;
  NormFwdArgs fg = fc;
  fg.y = y_g.ptr(); fg.y_stride = y_g.stride;
  fg.h = hsel ? h_g.ptr() : nullptr; fg.h_stride = h_g.stride;
  fg.mean = rms ? nullptr : mean_g.ptr(); fg.rstd = rstd_g.ptr();
  if (M == 0) {  // zero-element CUDA tensors have data_ptr() == 0
    fg.x = fg.r = nullptr;
    fg.y = fg.h = fg.mean = fg.rstd = nullptr;
  }
  // The entry point of norm.cu: argument checks, then the launch (none for M == 0).
  const bool fwd_launched = ck::run_norm_fwd(fg, emu_launch);
  expect(fwd_launched == (M > 0), ("forward launched iff M > 0 (" + cfg + ")").c_str());
  if (M > 0) {
    std::vector<float> ws(8 * N * 2);  // generous: the CPU kernel needs parts * 4 * N
    cpu::norm_fwd(fc, ws.data(), 2);
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
                 res ? dr_c.ptr() : nullptr, dr_c.stride, rdt, dw_c.ptr(), bias ? db_c.ptr() : nullptr, M, N, rms,
                 offset, xhat_dt};
  if (!has_w) bc.w = nullptr;
  NormBwdArgs bg = bc;
  bg.dx = dx_g.ptr(); bg.dx_stride = dx_g.stride;
  bg.dr = res ? dr_g.ptr() : nullptr; bg.dr_stride = dr_g.stride;
  bg.dw_part = dw_g.ptr(); bg.db_part = bias ? db_g.ptr() : nullptr;
  if (M == 0) {  // only weight and the partial rows are non-empty
    bg.dy = bg.x = bg.r = bg.mean = bg.rstd = bg.dh = nullptr;
    bg.dx = bg.dr = nullptr;
  }
  std::vector<float> ws(8 * N * parts_c);
  cpu::norm_bwd(bc, ws.data(), parts_c);
  if (force_batch > 0) {  // the checks of run_norm_bwd, then a given batch size
    expect(ck::check_norm_bwd(bg, parts_g), "check_norm_bwd");
    ck::launch_norm_bwd(bg, parts_g, emu_launch, force_batch);
  } else {
    expect(ck::run_norm_bwd(bg, parts_g, emu_launch), ("backward launched (" + cfg + ")").c_str());
  }
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


// The argument checks of the entry points (run_norm_fwd / run_norm_bwd, as norm.cu).
static void check_entry_points() {
  float w[8] = {1, 1, 1, 1, 1, 1, 1, 1}, dwp[4 * 8], buf[64];
  for (float& v : dwp) v = NAN;
  auto never = [](auto, dim3, dim3, const auto&...) { throw std::logic_error("unexpected launch"); };
  // Empty problems: nothing launched, null pointers accepted.
  NormFwdArgs f{};
  f.x_dt = f.r_dt = f.w_dt = f.b_dt = f.y_dt = f.h_dt = kBF16;
  f.N = 8; f.eps = 1e-5; f.is_rms = false;
  f.w = w; f.w_dt = kF32;
  expect(!ck::run_norm_fwd(f, never), "fwd M=0: no launch, null x/y/mean/rstd accepted");
  f.M = 5; f.N = 0; f.w = nullptr;
  expect(!ck::run_norm_fwd(f, never), "fwd N=0: no launch");
  f.N = 8;
  expect(throws_invalid([&] { ck::run_norm_fwd(f, never); }), "fwd M>0 without pointers throws");
  f.M = 0; f.x_dt = kF64;
  expect(throws_invalid([&] { ck::run_norm_fwd(f, never); }), "fwd float64 x throws even for M=0");
  f.x_dt = kBF16; f.w_dt = kF64; f.w = w;
  expect(throws_invalid([&] { ck::run_norm_fwd(f, never); }), "fwd float64 weight throws");
  f.w = nullptr;  // no weight (gain 1): its dtype code is not looked at
  expect(!ck::run_norm_fwd(f, never), "fwd M=0 without a weight: no launch, no dtype check of the absent weight");
  f.w_dt = kF32; f.M = -1;
  expect(throws_invalid([&] { ck::run_norm_fwd(f, never); }), "fwd M<0 throws");

  NormBwdArgs b{};
  b.dy_dt = b.x_dt = b.r_dt = b.b_dt = b.dh_dt = b.dx_dt = b.dr_dt = kBF16;
  b.w = w; b.w_dt = kF32; b.N = 8; b.is_rms = false;
  expect(throws_invalid([&] { ck::run_norm_bwd(b, 4, never); }), "bwd M=0 without dw_part throws");
  b.dw_part = dwp;
  expect(throws_invalid([&] { ck::run_norm_bwd(b, 0, never); }), "bwd parts=0 throws");
  // M == 0: launched, every dw_part row written with zeros.
  for (int narrow = 0; narrow < 2; ++narrow) {
    for (int64_t n : {int64_t(8), int64_t(5000), int64_t(9000)}) {  // register kernel, loop kernel
      std::vector<float> wv(size_t(n), 1.f), dw(size_t(4 * n), NAN), db(size_t(4 * n), NAN);
      b.N = n; b.w = wv.data(); b.dw_part = dw.data(); b.db_part = db.data(); b.b = wv.data();
      b.dy_dt = b.x_dt = b.dx_dt = narrow ? kBF16 : kF32;
      const bool launched = ck::run_norm_bwd(b, 4, emu_launch);
      bool zero = true;
      for (size_t i = 0; i < dw.size(); ++i) zero = zero && dw[i] == 0.f && db[i] == 0.f;
      char what[96];
      std::snprintf(what, sizeof what, "bwd M=0 N=%lld narrow=%d: launched, dw_part/db_part all zero", (long long)n,
                    narrow);
      expect(launched && zero, what);
    }
  }
  b.db_part = nullptr; b.b = nullptr;
  b.N = 0; b.w = nullptr; b.dw_part = nullptr; b.M = 3;
  expect(!ck::run_norm_bwd(b, 2, never), "bwd N=0: no launch");
  b.N = 8; b.w = w; b.dw_part = dwp;
  expect(throws_invalid([&] { ck::run_norm_bwd(b, 2, never); }), "bwd M>0 without dy/x/rstd/dx throws");
  b.M = 0; b.w_dt = kF64;
  expect(throws_invalid([&] { ck::run_norm_bwd(b, 2, never); }), "bwd float64 weight throws");
  (void)buf;
}

// P: at least 1; at most 2 per SM; either <= 1 per SM or exactly 2 per SM (no partial
// second wave of a 1-block-per-SM kernel); >= kBwdMinRowsPerPart rows a part below 1 per SM.
static void check_parts() {
  bool ok = true;
  for (int sm : {1, 2, 108, 132}) {
    for (int64_t M : {int64_t(0), int64_t(1), int64_t(63), int64_t(64), int64_t(1000), int64_t(64) * 132,
                      int64_t(64) * 133, int64_t(100000), int64_t(1) << 40}) {
      const int p = ck::norm_bwd_parts(M, 4096, sm);
      const bool good = p >= 1 && p <= 2 * sm && (p <= sm || p == 2 * sm) &&
                        (p == 1 || p == 2 * sm || M / p >= ck::kBwdMinRowsPerPart) &&
                        (p != 2 * sm || M / p >= ck::kBwdMinRowsPerPart / 2);
      if (!good) std::printf("  norm_bwd_parts(M=%lld, sm=%d) = %d\n", (long long)M, sm, p);
      ok = ok && good;
    }
  }
  expect(ok, "norm_bwd_parts bounds");
}

// The loop kernel's batch: 1..512 rows, the footprint P * (batch rows + partial rows)
// within the L2 budget unless batch == 1, and the largest batch that fits.
static void check_loop_batch() {
  bool ok = true;
  for (int xdt : {kF32, kBF16})
    for (int res : {0, 1})
      for (int dbp : {0, 1})
        for (int64_t N : {int64_t(4100), int64_t(8200), int64_t(16384), int64_t(20000), int64_t(1) << 20})
          for (int P : {1, 2, 16, 132, 264}) {
            NormBwdArgs a{};
            a.x_dt = a.dy_dt = xdt; a.r_dt = kF32;
            a.r = res ? &a : nullptr;
            a.db_part = dbp ? &a : nullptr;
            a.N = N;
            const int B = ck::norm_bwd_loop_batch(a, P);
            const int64_t row = N * ((xdt == kF32 ? 4 : 2) * 2 + (res ? 4 : 0));
            const int64_t part = N * 4 * (dbp ? 2 : 1);
            auto fits = [&](int64_t b) { return P * (b * row + part) <= ck::kBwdLoopL2Bytes; };
            const bool good = B >= 1 && B <= ck::kBwdLoopBatch && (B == 1 || fits(B)) &&
                              (B == ck::kBwdLoopBatch || !fits(B + 1));
            if (!good) std::printf("  norm_bwd_loop_batch(N=%lld, P=%d, ...) = %d\n", (long long)N, P, B);
            ok = ok && good;
          }
  expect(ok, "norm_bwd_loop_batch bounds");
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
  // Several batches of the backward loop kernel in one block: the batch sized at
  // launch (N = 20000 over 8 parts of 40 rows: batches of 12 to 38 rows, by dtype), and
  // given sizes.
  force_parts = 8;
  for (int rep = 0; rep < 2; ++rep) run_case(320, 20000, false);
  force_parts = 1;
  for (int b : {512, 1, 7}) {
    force_batch = b;
    run_case(b == 512 ? 600 : 40, 8200, false);
  }
  force_batch = 0;
  force_parts = 0;
  check_entry_points();
  check_parts();
  check_loop_batch();
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
