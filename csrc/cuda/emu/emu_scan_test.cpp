// Checks the CUDA selective-scan forward and backward (scan_kernels.cuh), run on CPU threads
// by cuda_emu.h, against the CPU kernels (csrc/cpu/scan.cpp). Build and run: see
// run_emu_test.sh (`sh run_emu_test.sh scan`).
#include "cuda_emu.h"
// clang-format off
#include "../scan_kernels.cuh"
// clang-format on

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "../../cpu/convert.h"
#include "../../cpu/scan.h"
#define EMU_SEED 777
#include "emu_harness.h"

using namespace fastlayers;
namespace ck = fastlayers::cuda_kernels;

static const auto emu_launch = [](auto k, dim3 g, dim3 bl, size_t smem, const auto&... args) {
  emu::launch_smem(k, g, bl, smem, args...);
};

static bool close(float got, float want, int dt) {
  if (std::isnan(want)) return std::isnan(got);
  const float rtol = dt == kF32 ? 2e-5f : dt == kF16 ? 2.5e-3f : 1.6e-2f;
  const float atol = dt == kF32 ? 2e-5f : dt == kF16 ? 2e-3f : 1.6e-2f;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

struct Case {
  int dt = kF32;
  int64_t batch = 2, dim = 5, L = 40, N = 16, GB = 1, GC = 1;
  bool var_b = true, var_c = true;  // time-varying (batch, G, L, N) or time-invariant (dim, N)
  bool D = true, z = true, bias = true, softplus = true, last = true, transposed = false, nan = false;
  bool bwd = true;  // also check the backward (last: with dlast)
};

// The backward: every gradient of the emulated scan_bwd (2 parts, padded du/ddelta/dz rows, a
// transposed dlast) against cpu::selective_scan_bwd (1 part). Per-step gradients are compared
// elementwise in their dtype; the summed ones (dA, dB, dC, dD, d delta_bias: fp32 sums over steps
// and channels, added in another order) with a tolerance that also scales with the tensor's
// largest magnitude.
static float max_abs(const std::vector<float>& v) {
  float m = 0.f;
  for (float x : v)
    if (std::isfinite(x) && std::fabs(x) > m) m = std::fabs(x);
  return m;
}

static void run_bwd(const Case& c, const SelectiveScanArgs& a, const std::string& cfg0) {
  const std::string cfg = "bwd " + cfg0;
  const int64_t batch = c.batch, dim = c.dim, L = c.L, N = c.N, pad = 2;
  const int64_t nB = c.var_b ? batch * c.GB * L * N : dim * N, nC = c.var_c ? batch * c.GC * L * N : dim * N;
  Buf dout(c.dt, batch * dim * L), dlast(kF32, batch * dim * N), dlast_t(kF32, batch * dim * N);
  dout.random(0.f, 1.f);
  dlast.random(0.f, 1.f);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t d = 0; d < dim; ++d)
      for (int64_t n = 0; n < N; ++n) dlast_t.set((b * N + n) * dim + d, dlast.get((b * dim + d) * N + n));
  const View4 none{nullptr, -1, {0, 0, 0, 0}};

  // CPU reference.
  Buf du_c(c.dt, batch * dim * L), dd_c(c.dt, batch * dim * L), dz_c(c.dt, batch * dim * L);
  std::vector<float> dA_c(dim * N, 0.f), dB_c(nB, 0.f), dC_c(nC, 0.f), dD_c(dim, 0.f), db_c(dim, 0.f);
  SelectiveScanArgs ac = a;
  ac.dout = dout.view(dim * L, L, 1);
  ac.dlast = c.last ? dlast.view(dim * N, N, 1) : none;
  ac.du = du_c.view(dim * L, L, 1);
  ac.ddelta = dd_c.view(dim * L, L, 1);
  ac.dz = c.z ? dz_c.view(dim * L, L, 1) : none;
  ac.dA_part = dA_c.data(); ac.dB_part = dB_c.data(); ac.dC_part = dC_c.data();
  ac.dD_part = c.D ? dD_c.data() : nullptr;
  ac.dbias_part = c.bias ? db_c.data() : nullptr;
  ac.dB_part_stride = nB; ac.dC_part_stride = nC;
  std::vector<float> ws(size_t(cpu::selective_scan_workspace(L, N, true)));
  cpu::selective_scan_bwd(ac, ws.data(), 1);

  // Emulated kernel, 2 parts.
  const int parts = 2;
  Buf du_g(c.dt, batch * dim * (L + pad)), dd_g(c.dt, batch * dim * (L + pad)), dz_g(c.dt, batch * dim * (L + pad));
  du_g.poison(); dd_g.poison(); dz_g.poison();
  std::vector<float> dA_g(parts * dim * N, 0.f), dB_g(parts * nB, 0.f), dC_g(parts * nC, 0.f), dD_g(parts * dim, 0.f),
      db_g(parts * dim, 0.f);
  const size_t n_ck = size_t(ck::scan_bwd_ckpt_elems(batch, dim, L, N));
  std::vector<float> ckpt(n_ck + 64, NAN);  // NaN: a read of a slot never written shows
  for (size_t i = n_ck; i < ckpt.size(); ++i) ckpt[i] = 12345.f;  // a guard past the end
  SelectiveScanArgs ag = a;
  const View4 padded_dt{nullptr, c.dt, {dim * (L + pad), L + pad, 1, 0}};
  ag.dout = ac.dout;
  ag.dlast = c.last ? dlast_t.view(dim * N, 1, dim) : none;
  ag.du = padded_dt; ag.du.p = du_g.b.data();
  ag.ddelta = padded_dt; ag.ddelta.p = dd_g.b.data();
  ag.dz = c.z ? padded_dt : none;
  if (c.z) ag.dz.p = dz_g.b.data();
  ag.dA_part = dA_g.data(); ag.dB_part = dB_g.data(); ag.dC_part = dC_g.data();
  ag.dD_part = c.D ? dD_g.data() : nullptr;
  ag.dbias_part = c.bias ? db_g.data() : nullptr;
  ag.dB_part_stride = nB; ag.dC_part_stride = nC;
  expect(ck::run_selective_scan_bwd(ag, ckpt.data(), parts, emu_launch), "launched (" + cfg + ")");

  // Per-step gradients (dtype of the inputs), padding untouched.
  auto cmp_steps = [&](const char* name, const Buf& want, const Buf& got) {
    std::vector<float> w(size_t(want.n()));
    for (int64_t i = 0; i < want.n(); ++i) w[size_t(i)] = want.get(i);
    const float scale = max_abs(w);
    ++checks;
    int bad = 0;
    for (int64_t r = 0; r < batch * dim; ++r)
      for (int64_t t = 0; t < L + pad; ++t) {
        const float g = got.get(r * (L + pad) + t);
        bool ok;
        if (t >= L) {
          ok = std::isnan(g);
        } else {
          const float x = w[size_t(r * L + t)];
          ok = close(g, x, c.dt) || (!std::isnan(x) && std::fabs(g - x) <= 1e-4f * scale);
        }
        if (!ok && bad++ < 3)
          std::printf("  MISMATCH %s [row %lld, t %lld] got %g want %g (%s)\n", name, (long long)r, (long long)t, g,
                      t < L ? w[size_t(r * L + t)] : NAN, cfg.c_str());
      }
    if (bad) {
      ++failures;
      std::printf("FAIL %s: %d bad (%s)\n", name, bad, cfg.c_str());
    }
  };
  // Summed gradients (fp32): the parts added up.
  auto cmp_sums = [&](const char* name, const std::vector<float>& want, const std::vector<float>& got) {
    const size_t n = want.size();
    const float scale = max_abs(want);
    ++checks;
    int bad = 0;
    for (size_t i = 0; i < n; ++i) {
      float g = 0.f;
      for (int p = 0; p < parts; ++p) g += got[p * n + i];
      const float x = want[i];
      const bool ok = std::isnan(x) ? std::isnan(g) : std::fabs(g - x) <= 2e-5f * std::fabs(x) + 5e-5f * scale + 1e-6f;
      if (!ok && bad++ < 3)
        std::printf("  MISMATCH %s [%zu] got %g want %g (scale %g, %s)\n", name, i, g, x, scale, cfg.c_str());
    }
    if (bad) {
      ++failures;
      std::printf("FAIL %s: %d bad (%s)\n", name, bad, cfg.c_str());
    }
  };
  bool guard = true;
  for (size_t i = n_ck; i < ckpt.size(); ++i) guard = guard && ckpt[i] == 12345.f;
  expect(guard, "checkpoint buffer: nothing written past its end (" + cfg + ")");
  cmp_steps("du", du_c, du_g);
  cmp_steps("ddelta", dd_c, dd_g);
  if (c.z) cmp_steps("dz", dz_c, dz_g);
  cmp_sums("dA", dA_c, dA_g);
  cmp_sums("dB", dB_c, dB_g);
  cmp_sums("dC", dC_c, dC_g);
  if (c.D) cmp_sums("dD", dD_c, dD_g);
  if (c.bias) cmp_sums("ddelta_bias", db_c, db_g);
  if (c.nan) {
    // u is NaN at step 2 of channel 0 of the last batch row: the states from step 2 on are NaN, so are that
    // channel's ddelta from step 2 on, dA and dD; du (linear in u, no state in it) stays finite.
    const int64_t r = (batch - 1) * dim * (L + pad);
    expect(std::isnan(dd_g.get(r + 2)) && std::isnan(dd_g.get(r + L - 1)) && !std::isnan(dd_g.get(r + 1)),
           "NaN in u: NaN ddelta from that step on (" + cfg + ")");
    expect(!std::isnan(du_g.get(r + 2)), "NaN in u: du finite (" + cfg + ")");
    expect(std::isnan(dA_g[0] + dA_g[dim * N]) && (!c.D || std::isnan(dD_g[0] + dD_g[dim])),
           "NaN in u: NaN dA, dD (" + cfg + ")");
  }
}

static void run_case(const Case& c) {
  const int64_t batch = c.batch, dim = c.dim, L = c.L, N = c.N;
  char cfgs[256];
  std::snprintf(cfgs, sizeof cfgs,
                "%s batch=%lld dim=%lld L=%lld N=%lld GB=%lld GC=%lld varB=%d varC=%d D=%d z=%d bias=%d sp=%d last=%d "
                "transposed=%d nan=%d",
                dtype_name(c.dt), (long long)batch, (long long)dim, (long long)L, (long long)N, (long long)c.GB,
                (long long)c.GC, c.var_b, c.var_c, c.D, c.z, c.bias, c.softplus, c.last, c.transposed, c.nan);
  const std::string cfg = cfgs;
  // u, delta, z: (batch, dim, L), contiguous or a transposed (batch, L, dim) buffer.
  auto bdl = [&](Buf& t) {
    return c.transposed ? t.view(L * dim, 1, dim) : t.view(dim * L, L, 1);
  };
  Buf u(c.dt, batch * dim * L), delta(c.dt, batch * dim * L), z(c.dt, batch * dim * L);
  u.random(0.f, 1.f);
  delta.random(c.softplus ? -1.f : 0.3f, c.softplus ? 1.f : 0.1f);
  z.random(0.f, 1.f);
  Buf A(kF32, dim * N), D(kF32, dim), bias(kF32, dim);
  for (int64_t i = 0; i < dim * N; ++i) A.set(i, -std::exp(std::normal_distribution<float>(0.f, 1.f)(rng)));
  D.random(0.f, 1.f);
  bias.random(c.softplus ? 0.f : 0.1f, c.softplus ? 0.5f : 0.05f);  // without softplus: dt > 0
  if (c.nan) u.set((batch - 1) * dim * L + 2, NAN);  // channel 0 of the last batch row, step 2 (contiguous layout)
  // B, C: fp32 (Bb, G, L', N), N contiguous; time-invariant: (1, dim, 1, N) with strides (0, N, 0, 1).
  Buf Bm(kF32, c.var_b ? batch * c.GB * L * N : dim * N), Cm(kF32, c.var_c ? batch * c.GC * L * N : dim * N);
  Bm.random(0.f, 1.f);
  Cm.random(0.f, 1.f);
  const View4 Bv = c.var_b ? Bm.view(c.GB * L * N, L * N, N, 1) : Bm.view(0, N, 0, 1);
  const View4 Cv = c.var_c ? Cm.view(c.GC * L * N, L * N, N, 1) : Cm.view(0, N, 0, 1);
  const int64_t GB = c.var_b ? c.GB : dim, GC = c.var_c ? c.GC : dim;

  SelectiveScanArgs a{};
  a.u = bdl(u); a.delta = bdl(delta); a.A = A.view(N, 1, 0); a.B = Bv; a.C = Cv;
  a.D = c.D ? D.view(1, 0, 0) : View4{nullptr, -1, {0, 0, 0, 0}};
  a.z = c.z ? bdl(z) : View4{nullptr, -1, {0, 0, 0, 0}};
  a.delta_bias = c.bias ? bias.view(1, 0, 0) : View4{nullptr, -1, {0, 0, 0, 0}};
  a.batch = batch; a.dim = dim; a.L = L; a.N = N; a.GB = GB; a.GC = GC; a.softplus = c.softplus;

  Buf out_c(c.dt, batch * dim * L), last_c(kF32, batch * dim * N);
  SelectiveScanArgs ac = a;
  ac.out = out_c.view(dim * L, L, 1);
  ac.last = c.last ? last_c.view(dim * N, N, 1) : View4{nullptr, -1, {0, 0, 0, 0}};
  std::vector<float> ws(size_t(cpu::selective_scan_workspace(L, N, false)));
  cpu::selective_scan_fwd(ac, ws.data(), 1);

  // Emulated kernel: out with a padded row stride, last transposed to (batch, N, dim) storage.
  const int64_t pad = 3;
  Buf out_g(c.dt, batch * dim * (L + pad)), last_g(kF32, batch * dim * N);
  out_g.poison();
  last_g.poison();
  SelectiveScanArgs ag = a;
  ag.out = out_g.view(dim * (L + pad), L + pad, 1);
  ag.last = c.last ? last_g.view(dim * N, 1, dim) : View4{nullptr, -1, {0, 0, 0, 0}};
  expect(ck::run_selective_scan_fwd(ag, emu_launch), "launched (" + cfg + ")");

  ++checks;
  int bad = 0;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t d = 0; d < dim; ++d) {
      for (int64_t t = 0; t < L + pad; ++t) {
        const float g = out_g.get((b * dim + d) * (L + pad) + t);
        const bool ok = t < L ? close(g, out_c.get((b * dim + d) * L + t), c.dt) : std::isnan(g);  // padding untouched
        if (!ok && bad++ < 3)
          std::printf("  MISMATCH out [%lld,%lld,%lld] got %g want %g (%s)\n", (long long)b, (long long)d,
                      (long long)t, g, t < L ? out_c.get((b * dim + d) * L + t) : NAN, cfg.c_str());
      }
      if (c.last)
        for (int64_t n = 0; n < N; ++n) {
          const float g = last_g.get((b * N + n) * dim + d), w = last_c.get((b * dim + d) * N + n);
          if (!close(g, w, kF32) && bad++ < 3)
            std::printf("  MISMATCH last [%lld,%lld,%lld] got %g want %g (%s)\n", (long long)b, (long long)d,
                        (long long)n, g, w, cfg.c_str());
        }
    }
  if (bad) {
    ++failures;
    std::printf("FAIL: %d bad (%s)\n", bad, cfg.c_str());
  }
  if (c.nan) expect(std::isnan(out_g.get((batch - 1) * dim * (L + pad) + L - 1)), "NaN in u: NaN out (" + cfg + ")");
  if (c.bwd) run_bwd(c, a, cfg);
}


static void check_entry_points() {
  auto never = [](auto, dim3, dim3, size_t, const auto&...) { throw std::logic_error("unexpected launch"); };
  float buf[64] = {};
  SelectiveScanArgs a{};
  a.u = a.delta = a.A = a.out = View4{buf, kF32, {0, 0, 0, 0}};
  a.B = a.C = View4{buf, kF32, {0, 0, 0, 0}};
  a.batch = 0; a.dim = 4; a.L = 5; a.N = 16; a.GB = a.GC = 1;
  expect(!ck::run_selective_scan_fwd(a, never), "batch 0: nothing launched");
  a.batch = 1; a.L = 0;
  expect(!ck::run_selective_scan_fwd(a, never), "L 0: nothing launched");
  a.L = 5; a.N = 300;
  expect(throws_invalid([&] { ck::run_selective_scan_fwd(a, never); }), "N 300 throws");
  a.N = 16; a.u.dt = kF64;
  expect(throws_invalid([&] { ck::run_selective_scan_fwd(a, never); }), "float64 u throws");
  a.u.dt = kF32; a.B.dt = kBF16;
  expect(throws_invalid([&] { ck::run_selective_scan_fwd(a, never); }), "bf16 B throws");
  a.B.dt = kF32; a.GB = 3;
  expect(throws_invalid([&] { ck::run_selective_scan_fwd(a, never); }), "groups not dividing dim throw");

  // The backward's entry point.
  a.GB = 1;
  a.dout = a.du = a.ddelta = View4{buf, kF32, {0, 0, 0, 0}};
  a.dA_part = a.dB_part = a.dC_part = buf;
  float* ckpt = buf;
  a.batch = 0;
  expect(!ck::run_selective_scan_bwd(a, ckpt, 1, never), "bwd batch 0: nothing launched");
  a.batch = 1; a.L = 0;
  expect(!ck::run_selective_scan_bwd(a, ckpt, 1, never), "bwd L 0: nothing launched");
  a.L = 5;
  expect(throws_invalid([&] { ck::run_selective_scan_bwd(a, ckpt, 0, never); }), "bwd parts 0 throws");
  a.L = 40;  // two chunks of 32: a checkpoint is needed
  expect(ck::scan_bwd_ckpt_elems(1, 4, 40, 16) == 4 * 16 && ck::scan_bwd_ckpt_elems(1, 4, 32, 16) == 0 &&
             ck::scan_bwd_ckpt_elems(2, 3, 9, 130) == 2 * 3 * 7 * 130 &&
             ck::scan_bwd_ckpt_elems(1, 1, 300, 64) == (9 + 1) * 64,
         "bwd checkpoint sizes");
  expect(throws_invalid([&] { ck::run_selective_scan_bwd(a, nullptr, 1, never); }), "bwd null checkpoint throws");
  a.L = 5;
  a.dlast = View4{buf, kBF16, {0, 0, 0, 0}};
  expect(throws_invalid([&] { ck::run_selective_scan_bwd(a, ckpt, 1, never); }), "bwd bf16 dlast throws");
  a.dlast = View4{nullptr, -1, {0, 0, 0, 0}};
  a.D = View4{buf, kF32, {0, 0, 0, 0}};
  expect(throws_invalid([&] { ck::run_selective_scan_bwd(a, ckpt, 1, never); }), "bwd D without dD_part throws");
  a.D = View4{nullptr, -1, {0, 0, 0, 0}};
  a.du.dt = kF64;
  expect(throws_invalid([&] { ck::run_selective_scan_bwd(a, ckpt, 1, never); }), "bwd float64 du throws");
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  std::vector<Case> cases;
  { Case c; cases.push_back(c); }                                          // N 16, every option, L 40 (2 chunks)
  { Case c; c.dt = kBF16; c.L = 123; c.N = 33; c.dim = 6; c.GB = 2; c.GC = 3; cases.push_back(c); }  // N 33: 2 per lane
  { Case c; c.dt = kF16; c.L = 1; c.N = 64; c.var_b = false; c.D = false; c.z = false; cases.push_back(c); }
  { Case c; c.L = 65; c.N = 5; c.var_c = false; c.bias = false; c.softplus = false; c.last = false;
    c.transposed = true; c.batch = 1; c.dim = 9; cases.push_back(c); }  // 9 channels: a partial last CTA
  { Case c; c.dt = kBF16; c.L = 32; c.N = 130; c.dim = 3; c.batch = 1; c.transposed = true; cases.push_back(c); }
  // Backward-specific shapes (chunks of 32 / 16 / 8 / 4 steps for 1 / 2 / 4 / 8 states a lane).
  { Case c; c.L = 31; c.N = 20; c.z = false; c.D = false; c.GB = 5; cases.push_back(c); }  // one partial chunk
  { Case c; c.dt = kF16; c.L = 33; c.N = 64; c.dim = 4; c.GB = 2; c.var_c = false; c.bias = false; c.last = false;
    cases.push_back(c); }                                                   // 3 chunks of 16, the last of 1 step
  { Case c; c.L = 33; c.N = 100; c.dim = 3; c.batch = 3; c.D = false; c.softplus = false; cases.push_back(c); }
  // CTAs whose 4 channels share their B (C) rows: dB (dC) summed in shared memory before the atomics.
  { Case c; c.L = 70; c.N = 48; c.dim = 4; c.GC = 2; cases.push_back(c); }  // C groups of 2: B shared only
  { Case c; c.dt = kBF16; c.L = 45; c.N = 130; c.dim = 8; c.batch = 1; c.GB = 2; c.transposed = true;
    cases.push_back(c); }
  if (!quick) {
    { Case c; c.nan = true; c.L = 37; cases.push_back(c); }
    { Case c; c.dt = kBF16; c.L = 300; c.N = 130; c.batch = 1; c.dim = 5; c.var_b = c.var_c = false; c.z = false;
      cases.push_back(c); }                                                 // 75 chunks of 4, time-invariant B, C
    { Case c; c.L = 300; c.N = 16; c.batch = 1; c.dim = 4; c.GB = 2; c.GC = 4; cases.push_back(c); }
  }
  for (const Case& c : cases) run_case(c);
  check_entry_points();
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
