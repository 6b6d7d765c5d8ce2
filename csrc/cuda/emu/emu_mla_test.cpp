// Checks the CUDA MLA decoding kernels (mla_kernels.cuh), run on CPU threads by
// cuda_emu.h, against the CPU kernel (csrc/cpu/mla.cpp). Build and run: see
// run_emu_test.sh (`sh run_emu_test.sh mla`).
#include "cuda_emu.h"
// clang-format off
#include "../mla_kernels.cuh"
// clang-format on

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../../cpu/convert.h"
#include "../../cpu/mla.h"
#define EMU_SEED 4321
#include "emu_harness.h"

using namespace fastlayers;
namespace ck = fastlayers::cuda_kernels;

static const auto emu_launch = [](auto k, dim3 g, dim3 bl, size_t smem, const auto&... args) {
  emu::launch_smem(k, g, bl, smem, args...);
};

struct Tol {
  float atol, rtol;
};
// Tolerance of a value of dtype dt. CUDA-core kernel: fp32 arithmetic throughout, so its fp32
// outputs (o_part, lse_part, lse) get fp32 tolerances and out that of its dtype. Tensor-core
// kernel (mma: the inputs are 16-bit, dt_in): s = (q . k) * scale with exact 16-bit products
// and fp32 sums, m and l in fp32 from the fp32 p: lse and lse_part are fp32-exact (the fp32
// tolerance; an H200 run showed the bf16 lse 1e-4 off the fp64 reference when q * scale was
// rounded to bf16 and l summed the rounded p). P enters P V rounded to the dtype (<= u / 2
// relative, u = 2^-8 bf16, 2^-11 fp16): o = sum of (p / l) v (|v| <= ~4) is off by
// ~ u * (weighted rms of v) ~ u, a few u at the tail. So 4u absolute + 4u relative for o_part
// (bf16 0.0156, fp16 0.002); out adds its own rounding (u / 2 relative) to that: the 16-bit
// tolerances of the CUDA-core kernel's out (bf16 0.016, fp16 0.0025 relative) with the same
// 4u absolute.
static Tol tol(int dt, bool mma, int dt_in) {
  if (mma) {
    const float u = dt_in == kBF16 ? 0x1p-8f : 0x1p-11f;
    if (dt == kF32) return {4 * u, 4 * u};
    return {4 * u, dt == kF16 ? 2.5e-3f : 1.6e-2f};
  }
  if (dt == kF32) return {2e-5f, 2e-5f};
  return dt == kF16 ? Tol{2e-3f, 2.5e-3f} : Tol{1.6e-2f, 1.6e-2f};
}

static double worst = 0;  // the largest |got - want| / (atol + rtol |want|) of the tensor-core cases

static bool close(float got, float want, Tol t, bool track) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  const double ratio = std::fabs(double(got) - want) / (t.atol + t.rtol * std::fabs(double(want)));
  if (track && ratio > worst) worst = ratio;
  return ratio <= 1.0;
}

struct Case {
  int dt = kBF16;
  int64_t H = 16, s_q = 1, D = 160, dv = 128, page = 16;
  std::vector<int64_t> lens;
  bool causal = false;
  int64_t n_splits = 1, split_tokens = 1 << 20;
  int64_t q_pad = 0, kv_pad = 0, kv_off = 0;  // q head stride D + q_pad; kv row stride D + kv_pad; kv base offset
  int nan = 0;                                // 1: NaN in q of one head; 2: NaN in a visible key; 3: in a masked one
  bool tc = true;                             // tensor cores where they apply (false: the CUDA-core kernel)
  int64_t over = 0;                           // added to sequence 0's length past what its table holds
  int64_t h_kv = 1, head_pad = 0;             // KV heads (H a multiple); their stride D + head_pad
};

static void run_case(const Case& c) {
  const int64_t B = int64_t(c.lens.size()), rows = c.s_q * c.H, D = c.D, dv = c.dv;

  // Cache: shuffled pages; table rows 2 wider than needed, -1 where unused.
  std::vector<int64_t> nblk(B);
  int64_t total = 0, width = 1;
  for (int64_t b = 0; b < B; ++b) {
    nblk[b] = (c.lens[b] + c.page - 1) / c.page;
    total += nblk[b];
    width = std::max(width, nblk[b]);
  }
  const int64_t nb = total + 2, bt_stride = width + 2;
  const int64_t kv_shead = D + c.head_pad, kv_srow = c.h_kv * kv_shead + c.kv_pad, kv_sblock = c.page * kv_srow;
  Buf kv(c.dt, c.kv_off + nb * kv_sblock);
  kv.random();
  std::vector<int32_t> perm(static_cast<size_t>(nb));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> table(static_cast<size_t>(B * bt_stride), -1), seqlens(static_cast<size_t>(B));
  for (int64_t b = 0, k = 0; b < B; ++b) {
    seqlens[b] = int32_t(c.lens[b]);
    for (int64_t i = 0; i < nblk[b]; ++i) table[b * bt_stride + i] = perm[k++];
  }
  // A length past the table (a check the wrapper reused): both kernels clamp it to width x page and read
  // no entry past the table (the entries past it are -1 here).
  if (c.over) seqlens[0] = int32_t(c.lens[0] + c.over);
  const int64_t q_sh = D + c.q_pad, q_ss = c.H * q_sh, q_sb = c.s_q * q_ss;
  Buf q(c.dt, B * q_sb);
  q.random();
  auto kv_at = [&](int64_t b, int64_t t) {  // element offset of token t of sequence b
    return c.kv_off + table[b * bt_stride + t / c.page] * kv_sblock + (t % c.page) * kv_srow;
  };
  if (c.nan == 1) q.set(int64_t(B - 1) * q_sb + (c.s_q - 1) * q_ss + (c.H / 2) * q_sh + D / 3, NAN);
  if (c.nan >= 2) {
    for (int64_t b = 0; b < B; ++b) {
      if (c.lens[b] < 2) continue;
      // nan 2: a visible key of every query (token 0); nan 3: the last token, which the
      // causal mask hides from every query but the last (its value, too, feeds o as p = 0).
      const int64_t t = c.nan == 2 ? 0 : c.lens[b] - 1;
      kv.set(kv_at(b, t) + (c.nan == 2 ? D - 1 : 0), NAN);
    }
  }

  MlaDecodeArgs a{};
  a.q = static_cast<char*>(q.p());
  a.q_sb = q_sb; a.q_ss = q_ss; a.q_sh = q_sh; a.q_dt = c.dt;
  a.kv = static_cast<char*>(kv.p()) + c.kv_off * esize(c.dt);
  a.kv_sblock = kv_sblock; a.kv_srow = kv_srow; a.kv_dt = c.dt;
  a.h_kv = c.h_kv; a.kv_shead = kv_shead;
  a.block_table = table.data(); a.bt_stride = bt_stride;
  a.seqlens = seqlens.data();
  a.out_dt = c.dt;
  a.B = B; a.s_q = c.s_q; a.H = c.H; a.D = D; a.dv = dv; a.page = c.page;
  a.n_splits = c.n_splits; a.split_tokens = c.split_tokens;
  a.scale = 1.0 / std::sqrt(double(D)) * 1.3;
  a.causal = c.causal;
  a.max_tokens = width * c.page;

  const bool mma = c.dt != kF32 && c.tc && ck::mla_mma_ok(a);
  char cfgs[360];
  std::snprintf(cfgs, sizeof cfgs,
                "%s B=%lld H=%lld h_kv=%lld head_pad=%lld s_q=%lld D=%lld dv=%lld page=%lld causal=%d splits=%lldx%lld "
                "q_pad=%lld kv_pad=%lld kv_off=%lld nan=%d tc=%d",
                dtype_name(c.dt), (long long)B, (long long)c.H, (long long)c.h_kv, (long long)c.head_pad,
                (long long)c.s_q, (long long)D, (long long)dv,
                (long long)c.page, c.causal, (long long)c.n_splits, (long long)c.split_tokens, (long long)c.q_pad,
                (long long)c.kv_pad, (long long)c.kv_off, c.nan, int(mma));
  const std::string cfg = cfgs;

  // CPU kernel.
  Buf out_c(c.dt, B * rows * dv), lse_c(kF32, B * rows), op_c(kF32, B * c.n_splits * rows * dv),
      lp_c(kF32, B * c.n_splits * rows);
  MlaDecodeArgs ac = a;
  ac.out = out_c.p(); ac.lse = lse_c.p(); ac.o_part = op_c.p(); ac.lse_part = lp_c.p();
  std::vector<float> ws(size_t(cpu::mla_decode_workspace(rows / c.h_kv, D, dv)));
  cpu::mla_decode(ac, ws.data(), 1, cpu::kMlaScalar);  // the scalar kernel: the plainest statement of the semantics

  // Emulated CUDA kernels, outputs and partials poisoned.
  Buf out_g(c.dt, B * rows * dv), lse_g(kF32, B * rows), op_g(kF32, B * c.n_splits * rows * dv),
      lp_g(kF32, B * c.n_splits * rows);
  out_g.poison(); lse_g.poison(); op_g.poison(); lp_g.poison();
  MlaDecodeArgs ag = a;
  ag.out = out_g.p(); ag.lse = lse_g.p(); ag.o_part = op_g.p(); ag.lse_part = lp_g.p();
  expect(ck::run_mla_decode(ag, emu_launch, c.tc), "launched (" + cfg + ")");

  auto compare = [&](const char* what, const Buf& got, const Buf& want, int dt, bool fp32_exact = false) {
    ++checks;
    int bad = 0;
    for (int64_t i = 0; i < want.n(); ++i) {
      const float g = got.get(i), w = want.get(i);
      if (!close(g, w, tol(dt, mma && !fp32_exact, c.dt), mma)) {
        if (bad < 3) std::printf("  MISMATCH %s [%lld] got %g want %g (%s)\n", what, (long long)i, g, w, cfg.c_str());
        ++bad;
      }
    }
    for (int64_t i = want.n(); i < int64_t(got.b.size()) / esize(dt); ++i)  // past the end: untouched
      if (!std::isnan(got.get(i)) && got.get(i) != 0.f) ++bad;
    if (bad) {
      ++failures;
      std::printf("FAIL %s: %d bad (%s)\n", what, bad, cfg.c_str());
    }
  };
  compare("out", out_g, out_c, c.dt);
  compare("lse", lse_g, lse_c, kF32, true);
  compare("lse_part", lp_g, lp_c, kF32, true);
  compare("o_part", op_g, op_c, kF32);
  // The case does what it says: +inf (FlashMLA's lse of a query that sees no key) / NaN rows where
  // expected; never -inf in the merged lse.
  bool any_inf = false, any_nan = false, any_ninf = false;
  for (int64_t i = 0; i < lse_c.n(); ++i) {
    any_inf = any_inf || (std::isinf(lse_c.get(i)) && lse_c.get(i) > 0);
    any_ninf = any_ninf || (std::isinf(lse_g.get(i)) && lse_g.get(i) < 0);
    any_nan = any_nan || std::isnan(lse_c.get(i));
  }
  bool empty = false;
  for (int64_t n : c.lens) empty = empty || n == 0;
  if (empty) expect(any_inf, "a length-0 sequence gives lse +inf (" + cfg + ")");
  expect(!any_ninf, "no merged lse is -inf (" + cfg + ")");
  if (c.nan == 1 || c.nan == 2) expect(any_nan, "NaN input gives NaN rows (" + cfg + ")");
}


// The emulated PTX helpers against plain matrix products: one warp loads a 16 x 16 A
// (row-major, ldmatrix.x4, or 4 x ldmatrix.x1), B as 8 rows of 16 (B^T row-major: ldmatrix.x2)
// or as 16 rows of 8 (B row-major: ldmatrix.x2.trans, or x4.trans for two k16 steps / x1.trans
// pieces), multiplies with mma m16n8k16 and writes D: D must be A . B + C in fp32; the
// fragments of the x1 / x2 / x4 variants must agree. Plus the 16-bit rounding (nearest even).
template <bool BF16>
static void ptx_kernel(const uint16_t* a, const uint16_t* bt, const uint16_t* bk, const float* c, float* d,
                       uint32_t* frag_ok) {
  FL_DYN_SMEM(uint16_t, sm);  // A 16 x 24 (padded rows), B^T 8 x 24, B 32 x 8
  uint16_t* sa = sm;
  uint16_t* sbt = sm + 16 * 24;
  uint16_t* sbk = sbt + 8 * 24;
  const int l = int(threadIdx.x), g = l >> 2, q = l & 3;
  for (int e = l; e < 256; e += 32) sa[(e / 16) * 24 + e % 16] = a[e];
  for (int e = l; e < 128; e += 32) sbt[(e / 16) * 24 + e % 16] = bt[e];
  for (int e = l; e < 256; e += 32) sbk[e] = bk[e];
  __syncwarp();
  uint32_t fa[4], f1[1], fb[2], fbt[2], fb4[4], fbt1[1];
  fl_ldmatrix_x4(fa, sa + (l & 15) * 24 + (l >> 4) * 8);
  bool ok = true;
  for (int i = 0; i < 4; ++i) {  // matrix i of the x4 = rows 8 (i % 2).., columns 8 (i / 2)..
    fl_ldmatrix_x1(f1, sa + (8 * (i & 1) + (l & 7)) * 24 + 8 * (i >> 1));
    ok = ok && f1[0] == fa[i];
  }
  fl_ldmatrix_x2(fb, sbt + (l & 7) * 24 + ((l >> 3) & 1) * 8);
  fl_ldmatrix_x2_trans(fbt, sbk + (l & 15) * 8);
  fl_ldmatrix_x4_trans(fb4, sbk + l * 8);
  ok = ok && fb[0] == fbt[0] && fb[1] == fbt[1] && fb4[0] == fbt[0] && fb4[1] == fbt[1];
  for (int i = 0; i < 2; ++i) {
    fl_ldmatrix_x1_trans(fbt1, sbk + (8 * i + (l & 7)) * 8);
    ok = ok && fbt1[0] == fbt[i];
  }
  // The documented layouts, element by element: a0 = A[g][2q..], b0 = B[2q..][g].
  ok = ok && fa[0] == (uint32_t(a[g * 16 + 2 * q]) | uint32_t(a[g * 16 + 2 * q + 1]) << 16);
  ok = ok && fa[3] == (uint32_t(a[(g + 8) * 16 + 2 * q + 8]) | uint32_t(a[(g + 8) * 16 + 2 * q + 9]) << 16);
  ok = ok && fb[1] == (uint32_t(bk[(2 * q + 8) * 8 + g]) | uint32_t(bk[(2 * q + 9) * 8 + g]) << 16);
  frag_ok[l] = ok ? 1u : 0u;
  float acc[4], cc[4];
  for (int e = 0; e < 4; ++e) cc[e] = c[(g + 8 * (e >> 1)) * 8 + 2 * q + (e & 1)];
  fl_mma_16816<BF16>(acc, fa, fb, cc);
  for (int e = 0; e < 4; ++e) d[(g + 8 * (e >> 1)) * 8 + 2 * q + (e & 1)] = acc[e];
}

template <bool BF16>
static void check_ptx_emulation() {
  const int dt = BF16 ? kBF16 : kF16;
  Buf a(dt, 256), bk(dt, 256), c(kF32, 128), d(kF32, 128);
  a.random(); bk.random(); c.random();
  Buf bt(dt, 128);  // B^T: bt[n][k] = B[k][n]
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 8; ++n) bt.set(n * 16 + k, bk.get(k * 8 + n));
  std::vector<uint32_t> ok(32, 0);
  emu::launch_smem(ptx_kernel<BF16>, dim3(1), dim3(32), size_t(2 * (24 * 24 + 256)),
                   static_cast<const uint16_t*>(a.p()), static_cast<const uint16_t*>(bt.p()),
                   static_cast<const uint16_t*>(bk.p()), static_cast<const float*>(c.p()), static_cast<float*>(d.p()),
                   ok.data());
  expect(std::count(ok.begin(), ok.end(), 1u) == 32,
         std::string("ldmatrix x1 / x2 / x4 (.trans) fragments agree with the documented layouts (") + dtype_name(dt) + ")");
  int bad = 0;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double want = c.get(m * 8 + n);  // exact: 16 products exact in fp32, summed in double
      for (int k = 0; k < 16; ++k) want += double(a.get(m * 16 + k)) * bk.get(k * 8 + n);
      if (std::fabs(d.get(m * 8 + n) - want) > 1e-5 * (1 + std::fabs(want))) ++bad;
    }
  expect(bad == 0, std::string("mma m16n8k16 = A . B + C in fp32 (") + dtype_name(dt) + ")");
}

static void check_rounding() {
  // Ties to even, both dtypes: 1 + half an ulp -> 1; 1 + 1.5 ulp -> 1 + 2 ulp; NaN stays NaN.
  expect(ck::f32_to_bf16_bits(1.f + 0x1p-8f) == 0x3f80u && ck::f32_to_bf16_bits(1.f + 3 * 0x1p-8f) == 0x3f82u &&
             ck::f32_to_bf16_bits(-(1.f + 0x1p-8f + 0x1p-20f)) == 0xbf81u,
         "bf16 rounding: nearest, ties to even");
  expect(ck::f32_to_f16_bits(1.f + 0x1p-11f) == 0x3c00u && ck::f32_to_f16_bits(1.f + 3 * 0x1p-11f) == 0x3c02u &&
             ck::f32_to_f16_bits(65520.f) == 0x7c00u,
         "fp16 rounding: nearest, ties to even, overflow to inf");
  expect(std::isnan(ck::bf16_bits_to_f32(ck::f32_to_bf16_bits(NAN))) &&
             std::isnan(ck::f16_bits_to_f32(ck::f32_to_f16_bits(NAN))),
         "16-bit rounding keeps NaN");
}

static void check_entry_points() {
  auto never = [](auto, dim3, dim3, size_t, const auto&...) { throw std::logic_error("unexpected launch"); };
  float dummy[64] = {};
  int32_t itab[4] = {0, 0, 0, 0};
  MlaDecodeArgs a{};
  a.q = a.kv = dummy; a.block_table = itab; a.seqlens = itab;
  a.o_part = a.lse_part = a.out = a.lse = dummy;
  a.q_dt = a.kv_dt = a.out_dt = kBF16;
  a.B = 0; a.s_q = 1; a.H = 4; a.D = 576; a.dv = 512; a.page = 64; a.n_splits = 1; a.split_tokens = 64;
  expect(!ck::run_mla_decode(a, never), "B = 0: nothing launched");
  a.B = 2; a.H = 0;
  expect(!ck::run_mla_decode(a, never), "H = 0: nothing launched");
  a.H = 4; a.q_dt = kF64;
  expect(throws_invalid([&] { ck::run_mla_decode(a, never); }), "float64 q throws");
  a.q_dt = kF32;
  expect(throws_invalid([&] { ck::run_mla_decode(a, never); }), "q and kv dtypes differ: throws");
  a.q_dt = kBF16; a.D = 800; a.dv = 512;
  expect(throws_invalid([&] { ck::run_mla_decode(a, never); }), "D above 768 throws");
  a.D = 768; a.dv = 600;
  expect(throws_invalid([&] { ck::run_mla_decode(a, never); }), "dv above 512 throws");
  a.dv = 512; a.page = 48;
  expect(throws_invalid([&] { ck::run_mla_decode(a, never); }), "page 48 throws");
  a.page = 64; a.n_splits = 0;
  expect(throws_invalid([&] { ck::run_mla_decode(a, never); }), "n_splits 0 throws");
  a.n_splits = 1; a.h_kv = 3;
  expect(throws_invalid([&] { ck::run_mla_decode(a, never); }), "H = 4 not a multiple of h_kv = 3 throws");
  a.h_kv = 0;
  expect(throws_invalid([&] { ck::run_mla_decode(a, never); }), "h_kv = 0 throws");
  a.h_kv = 1; a.lse = nullptr;
  expect(throws_invalid([&] { ck::run_mla_decode(a, never); }), "null lse throws");
  // Shared memory fits an sm_80 block (163 KiB) at the largest D, fp32.
  expect(ck::mla_smem(ck::kMlaMaxD, 4).bytes <= 163u * 1024u, "shared memory <= 163 KiB at D = 768 fp32");
  expect(ck::mla_smem(576, 2).bytes <= 100u * 1024u, "shared memory <= 100 KiB at D = 576 bf16 (2 CTAs / SM)");
  expect(ck::mla_mma_smem(576).bytes <= 100u * 1024u, "mma shared memory <= 100 KiB at D = 576 (2 CTAs / SM)");
  expect(ck::mla_mma_smem(ck::kMlaMaxD).bytes <= 163u * 1024u, "mma shared memory <= 163 KiB at D = 768");
  for (int D : {64, 80, 576, 768})
    expect((ck::mla_mma_smem(D).ld * 2 / 16) % 2 == 1, "mma rows: an odd number of 16-byte chunks");
  for (int D : {1, 7, 64, 160, 192, 576, 768})
    for (int es : {2, 4}) {
      const ck::MlaSmem L = ck::mla_smem(D, es);
      expect(L.chunks % 2 == 1 && L.chunks * 16 >= D * es && L.rw == 4 * L.chunks && L.qd * es == 16 * L.chunks,
             "tile layout: an odd number of 16-byte chunks covering a row (D = " + std::to_string(D) + ")");
    }
}

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  std::vector<Case> cases;
  auto add = [&](Case c) { cases.push_back(c); };
  {  // 128 + 32, 16 heads, pages of 16, mixed lengths incl. 0, several splits (some empty)
    Case c; c.dt = kBF16; c.H = 16; c.D = 160; c.dv = 128; c.page = 16; c.lens = {37, 0, 100};
    c.n_splits = 3; c.split_tokens = 64; add(c);
  }
  {  // 128 + 32, 1 head, s_q 2 causal, pages of 64, fp32, splits of one tile
    Case c; c.dt = kF32; c.H = 1; c.s_q = 2; c.causal = true; c.D = 160; c.dv = 128; c.page = 64;
    c.lens = {1, 70, 0}; c.n_splits = 3; c.split_tokens = 32; add(c);
  }
  {  // 512 + 64, 16 heads, pages of 64, bf16
    Case c; c.dt = kBF16; c.H = 16; c.D = 576; c.dv = 512; c.page = 64; c.lens = {65, 0}; add(c);
  }
  {  // a length 100 past its table (2 pages of 16): clamped to 32 tokens, fp32 and bf16 (3 splits)
    Case c; c.dt = kF32; c.H = 4; c.D = 160; c.dv = 128; c.page = 16; c.lens = {32, 5}; c.over = 100; add(c);
    c.dt = kBF16; c.n_splits = 3; c.split_tokens = 48; add(c);
  }
  {  // 512 + 64, 16 heads, s_q 2 causal (32 rows: two row groups), pages of 16, fp32, 2 splits
    Case c; c.dt = kF32; c.H = 16; c.s_q = 2; c.causal = true; c.D = 576; c.dv = 512; c.page = 16;
    c.lens = {33, 1}; c.n_splits = 2; c.split_tokens = 32; add(c);
  }
  {  // 512 + 64, 1 head, fp16, split not a multiple of the tile
    Case c; c.dt = kF16; c.H = 1; c.D = 576; c.dv = 512; c.page = 16; c.lens = {40, 3};
    c.n_splits = 2; c.split_tokens = 23; add(c);
  }
  {  // 64 + 0, 20 heads (a partial row group), misaligned cache rows (scalar loads), strided q
    Case c; c.dt = kBF16; c.H = 20; c.D = 64; c.dv = 64; c.page = 16; c.lens = {17, 50};
    c.q_pad = 5; c.kv_pad = 3; c.kv_off = 1; c.n_splits = 2; c.split_tokens = 32; add(c);
  }
  {  // 160 + 64 (Zebra 8B), dv 160, 3 heads, s_q 4 causal with fewer tokens than queries
    Case c; c.dt = kBF16; c.H = 3; c.s_q = 4; c.causal = true; c.D = 224; c.dv = 160; c.page = 32;
    c.lens = {2, 45}; add(c);
  }
  {  // 128 + 64, dv 100 (not a multiple of 16), fp32 rows padded but 16-byte aligned
    Case c; c.dt = kF32; c.H = 5; c.D = 192; c.dv = 100; c.page = 16; c.lens = {31}; c.kv_pad = 4; add(c);
  }
  // Several KV heads (FlashMLA's dense-decoding layout; query head h reads KV head h / (H / h_kv)).
  {  // 2 KV heads x 3 query heads, s_q 3 causal (9 rows a KV head), heads 168 apart, 2 splits
    Case c; c.dt = kBF16; c.h_kv = 2; c.H = 6; c.s_q = 3; c.causal = true; c.D = 160; c.dv = 128; c.page = 16;
    c.head_pad = 8; c.lens = {37, 0, 70}; c.n_splits = 2; c.split_tokens = 48; add(c);
  }
  {  // h_q == h_kv == 3 (one row a KV head), fp32
    Case c; c.dt = kF32; c.h_kv = 3; c.H = 3; c.D = 96; c.dv = 64; c.page = 16; c.lens = {20, 45}; add(c);
  }
  {  // 2 KV heads x 20 query heads (two row groups a KV head, the second partial), 512 + 64, pages of 64
    Case c; c.dt = kBF16; c.h_kv = 2; c.H = 40; c.D = 576; c.dv = 512; c.page = 64; c.lens = {65, 3}; add(c);
  }
  {  // 3 KV heads x 2, heads 67 apart (misaligned: no 16-byte loads, no tensor cores), s_q 2 causal
    Case c; c.dt = kBF16; c.h_kv = 3; c.H = 6; c.s_q = 2; c.causal = true; c.D = 64; c.dv = 64; c.page = 16;
    c.head_pad = 3; c.lens = {1, 33}; add(c);
  }
  if (!quick) {
    {  // NaN in a visible key of KV head 0 of 3 (heads 0-1 of 6 see it)
      Case c; c.dt = kF32; c.h_kv = 3; c.H = 6; c.D = 96; c.dv = 64; c.page = 16; c.lens = {20, 9}; c.nan = 2;
      add(c);
    }
    {  // NaN in q of one head
      Case c; c.dt = kBF16; c.H = 4; c.D = 160; c.dv = 128; c.page = 16; c.lens = {20, 9}; c.nan = 1; add(c);
    }
    {  // NaN in a visible key
      Case c; c.dt = kF32; c.H = 2; c.s_q = 2; c.causal = true; c.D = 96; c.dv = 64; c.page = 16;
      c.lens = {20, 0}; c.nan = 2; c.n_splits = 2; c.split_tokens = 16; add(c);
    }
    {  // NaN in a key hidden by the causal mask from all queries but the last
      Case c; c.dt = kBF16; c.H = 2; c.s_q = 3; c.causal = true; c.D = 96; c.dv = 64; c.page = 16;
      c.lens = {20, 40}; c.nan = 3; add(c);
    }
  }
  // Every shape on the CUDA-core kernel (its own dtype), then on the tensor-core kernel in
  // bf16 and fp16 (the CUDA-core kernel where the shape is not mma-able: D or dv not a
  // multiple of 16, misaligned cache rows).
  const size_t n_shapes = cases.size();
  for (size_t i = 0; i < n_shapes; ++i) {
    cases[i].tc = false;
    for (int dt : {kBF16, kF16}) {
      Case c = cases[i];
      c.dt = dt;
      c.tc = true;
      add(c);
    }
  }
  for (int dt : {kBF16, kF16}) {
    {  // 512 + 64, 16 heads, mixed lengths incl. 0, pages of 64, 2 splits (one empty for the short row)
      Case c; c.dt = dt; c.H = 16; c.D = 576; c.dv = 512; c.page = 64; c.lens = {70, 0, 5, 130};
      c.n_splits = 2; c.split_tokens = 96; add(c);
    }
    {  // 512 + 64, 16 heads, s_q 3 causal (48 rows), pages of 16
      Case c; c.dt = dt; c.H = 16; c.s_q = 3; c.causal = true; c.D = 576; c.dv = 512; c.page = 16;
      c.lens = {2, 41, 0}; add(c);
    }
    {  // 512 + 64, 128 heads (8 row groups), pages of 64, mixed lengths incl. 0
      Case c; c.dt = dt; c.H = 128; c.D = 576; c.dv = 512; c.page = 64; c.lens = {33, 0, 64}; add(c);
    }
    {  // 160 + 64, 4 tiles: the warps' P V work differs (8, 8, 4, 0 n8 tiles), so a warp that runs
       // ahead and issues the next tile's copies early hits the others' reads of that buffer
      Case c; c.dt = dt; c.H = 2; c.s_q = 2; c.causal = true; c.D = 224; c.dv = 160; c.page = 32;
      c.lens = {100}; add(c);
    }
    if (!quick) {
      {  // 512 + 64, 128 heads, s_q 2 causal, pages of 16, 2 splits
        Case c; c.dt = dt; c.H = 128; c.s_q = 2; c.causal = true; c.D = 576; c.dv = 512; c.page = 16;
        c.lens = {40, 1}; c.n_splits = 2; c.split_tokens = 32; add(c);
      }
      {  // 128 + 64 and 160 + 64 (dv 128 / 160), s_q 4 causal, 8 heads
        Case c; c.dt = dt; c.H = 8; c.s_q = 4; c.causal = true; c.D = 192; c.dv = 128; c.page = 16;
        c.lens = {50, 3}; add(c);
        c.D = 224; c.dv = 160; c.page = 64; c.lens = {0, 66}; add(c);
      }
      {  // 64 + 32 (dv 64: 2 n8 tiles a warp), D / 16 odd (the k16 tail), 1 head, s_q 2 causal
        Case c; c.dt = dt; c.H = 1; c.s_q = 2; c.causal = true; c.D = 80; c.dv = 64; c.page = 16;
        c.lens = {19, 0, 1}; add(c);
      }
    }
  }
  for (const Case& c : cases) run_case(c);
  std::printf("tensor-core cases: largest error / tolerance %.3f\n", worst);
  check_entry_points();
  check_ptx_emulation<true>();
  check_ptx_emulation<false>();
  check_rounding();
  std::printf("%d checks, %d failed\n", checks, failures);
  return failures ? 1 : 0;
}
