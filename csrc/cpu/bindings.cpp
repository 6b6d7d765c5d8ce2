// fastlayers._C: the CPU kernels as a plain pybind11 module (no torch headers,
// no libtorch). Tensors arrive as raw addresses (int), strides in elements and
// dtype codes (fastlayers/_dtypes.py); Python allocates every buffer.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <omp.h>
#include <sys/mman.h>
#include <unistd.h>

#include "conv1d.h"
#include "hybridnorm.h"
#include "mla.h"
#include "norm.h"
#include "scan.h"
#include "ssd.h"

namespace py = pybind11;
using namespace fastlayers;

static inline void* P(uintptr_t p) { return reinterpret_cast<void*>(p); }

// A strided tensor view from Python: (address, dtype code, 4 strides in elements); address 0 = absent.
using PyView = std::tuple<uintptr_t, int, std::array<int64_t, 4>>;
static View4 view4(const PyView& v, const char* what, bool required) {
  View4 r{P(std::get<0>(v)), std::get<1>(v), {0, 0, 0, 0}};
  if (r.p || required) check_dtype(r.dt, what, true);
  if (required && !r.p) throw std::invalid_argument(std::string("fastlayers: missing ") + what);
  for (int i = 0; i < 4; ++i) r.s[i] = std::get<2>(v)[i];
  return r;
}

static void check_norm_dtypes(int x_dt, int r_dt, int w_dt, int b_dt, int y_dt, int h_dt, bool has_r, bool has_b,
                              bool has_h, bool has_w) {
  check_dtype(x_dt, "x", true);
  if (has_w) check_dtype(w_dt, "weight", true);
  check_dtype(y_dt, "y", true);
  if (has_r) check_dtype(r_dt, "residual", true);
  if (has_b) check_dtype(b_dt, "bias", true);
  if (has_h) check_dtype(h_dt, "h", true);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlayers CPU kernels (C++/OpenMP, torch-free ABI)";

  m.def(
      "norm_fwd",
      [](uintptr_t x, int64_t x_stride, int x_dt, uintptr_t r, int64_t r_stride, int r_dt, uintptr_t w, int w_dt,
         uintptr_t b, int b_dt, uintptr_t y, int64_t y_stride, int y_dt, uintptr_t h, int64_t h_stride, int h_dt,
         uintptr_t mean, uintptr_t rstd, int64_t M, int64_t N, double eps, bool is_rms, uintptr_t workspace,
         int parts, double offset, int xhat_dt) {
        check_norm_dtypes(x_dt, r_dt, w_dt, b_dt, y_dt, h_dt, r != 0, b != 0, h != 0, w != 0);
        if (parts < 1) throw std::invalid_argument("fastlayers: parts must be >= 1");
        NormFwdArgs a{P(x), x_stride, x_dt, P(r), r_stride, r_dt, P(w), w_dt, P(b), b_dt, P(y), y_stride, y_dt,
                      P(h),  h_stride, h_dt, P(mean), P(rstd), M,  N,  eps, is_rms, offset, xhat_dt};
        py::gil_scoped_release nogil;
        cpu::norm_fwd(a, P(workspace), parts);
      },
      "Fused residual + RMSNorm/LayerNorm forward (see csrc/include/fastlayers/common.h).");

  m.def(
      "norm_bwd",
      [](uintptr_t dy, int64_t dy_stride, int dy_dt, uintptr_t x, int64_t x_stride, int x_dt, uintptr_t r,
         int64_t r_stride, int r_dt, uintptr_t w, int w_dt, uintptr_t b, int b_dt, uintptr_t mean, uintptr_t rstd,
         uintptr_t dh, int64_t dh_stride, int dh_dt, uintptr_t dx, int64_t dx_stride, int dx_dt, uintptr_t dr,
         int64_t dr_stride, int dr_dt, uintptr_t dw_part, uintptr_t db_part, int64_t M, int64_t N, bool is_rms,
         uintptr_t workspace, int parts, double offset, int xhat_dt) {
        check_norm_dtypes(x_dt, r_dt, w_dt, b_dt, dx_dt, dh_dt, r != 0, b != 0, dh != 0, w != 0);
        check_dtype(dy_dt, "dy", true);
        if (dr) check_dtype(dr_dt, "dresidual", true);
        if (parts < 1) throw std::invalid_argument("fastlayers: parts must be >= 1");
        NormBwdArgs a{P(dy), dy_stride, dy_dt, P(x), x_stride, x_dt, P(r), r_stride, r_dt, P(w), w_dt, P(b), b_dt,
                      P(mean), P(rstd), P(dh), dh_stride, dh_dt, P(dx), dx_stride, dx_dt, P(dr), dr_stride, dr_dt,
                      P(dw_part), P(db_part), M, N, is_rms, offset, xhat_dt};
        py::gil_scoped_release nogil;
        cpu::norm_bwd(a, P(workspace), parts);
      },
      "Fused residual + RMSNorm/LayerNorm backward; dw/db as (parts, N) partial sums.");

  using S3 = std::array<int64_t, 3>;  // strides of (B, T, H) in elements
  m.def(
      "head_norm_rope_fwd",
      [](uintptr_t x, S3 xs, int x_dt, uintptr_t w, int w_dt, uintptr_t out, S3 os, int o_dt, uintptr_t cos,
         uintptr_t sin, int64_t cs_stride, uintptr_t offsets, int64_t B, int64_t T, int64_t H, int64_t D,
         double eps, uintptr_t workspace, int parts) {
        check_dtype(x_dt, "x", true);
        check_dtype(o_dt, "out", true);
        if (w) check_dtype(w_dt, "weight", true);
        if (parts < 1) throw std::invalid_argument("fastlayers: parts must be >= 1");
        HeadNormRopeArgs a{P(x),  xs[0], xs[1], xs[2], x_dt, P(w), w_dt, P(out), os[0], os[1], os[2], o_dt,
                           P(cos), P(sin), cs_stride, static_cast<const int64_t*>(P(offsets)), B, T, H, D, eps};
        py::gil_scoped_release nogil;
        cpu::head_norm_rope_fwd(a, P(workspace), parts);
      },
      "Per-head RMSNorm + RoPE forward over (B, T, H, D) (see HeadNormRopeArgs).");

  m.def(
      "head_norm_rope_bwd",
      [](uintptr_t dout, S3 ds, int d_dt, uintptr_t x, S3 xs, int x_dt, uintptr_t w, int w_dt, uintptr_t cos,
         uintptr_t sin, int64_t cs_stride, uintptr_t offsets, uintptr_t dx, S3 dxs, int dx_dt, uintptr_t dw_part,
         int64_t B, int64_t T, int64_t H, int64_t D, double eps, uintptr_t workspace, int parts) {
        check_dtype(d_dt, "dout", true);
        check_dtype(x_dt, "x", true);
        check_dtype(dx_dt, "dx", true);
        if (w) check_dtype(w_dt, "weight", true);
        if (parts < 1) throw std::invalid_argument("fastlayers: parts must be >= 1");
        HeadNormRopeBwdArgs a{P(dout), ds[0], ds[1], ds[2], d_dt, P(x), xs[0], xs[1], xs[2], x_dt, P(w), w_dt,
                              P(cos), P(sin), cs_stride, static_cast<const int64_t*>(P(offsets)),
                              P(dx), dxs[0], dxs[1], dxs[2], dx_dt, P(dw_part), B, T, H, D, eps};
        py::gil_scoped_release nogil;
        cpu::head_norm_rope_bwd(a, P(workspace), parts);
      },
      "Per-head RMSNorm + RoPE backward; dweight as (parts, D) partial sums.");

  // swiglu: forward when dout == 0 (out = silu(gate) * up), else backward (out = dgate, dup).
  m.def(
      "swiglu",
      [](uintptr_t gate, int64_t gs, int g_dt, uintptr_t up, int64_t us, int u_dt, uintptr_t dout, int64_t ds,
         int d_dt, uintptr_t out, int64_t os, int o_dt, uintptr_t dup, int64_t dus, int du_dt, int64_t M, int64_t F,
         uintptr_t workspace, int parts) {
        check_dtype(g_dt, "gate", true);
        check_dtype(u_dt, "up", true);
        check_dtype(o_dt, "out", true);
        if (dout) {
          check_dtype(d_dt, "dout", true);
          check_dtype(du_dt, "dup", true);
        }
        if (parts < 1) throw std::invalid_argument("fastlayers: parts must be >= 1");
        SwigluArgs a{P(gate), gs, g_dt, P(up), us, u_dt, P(dout), ds, d_dt, P(out), os, o_dt, P(dup), dus, du_dt,
                     M, F};
        py::gil_scoped_release nogil;
        if (dout)
          cpu::swiglu_bwd(a, P(workspace), parts);
        else
          cpu::swiglu_fwd(a, P(workspace), parts);
      },
      "SwiGLU forward (dout = 0) or backward over (M, F) rows.");

  m.def(
      "selective_state_update",
      [](const PyView& state, const PyView& x, const PyView& dt, const PyView& A, const PyView& B, const PyView& C,
         const PyView& D, const PyView& z, const PyView& dt_bias, const PyView& out, uintptr_t idx, int64_t batch,
         int64_t H, int64_t Pdim, int64_t N, int64_t G, bool softplus, uintptr_t workspace, int parts) {
        if (parts < 1) throw std::invalid_argument("fastlayers: parts must be >= 1");
        if (G < 1 || H % G) throw std::invalid_argument("fastlayers: the number of groups must divide the heads");
        StateUpdateArgs a{view4(state, "state", true), view4(x, "x", true), view4(dt, "dt", true),
                          view4(A, "A", true), view4(B, "B", true), view4(C, "C", true), view4(D, "D", false),
                          view4(z, "z", false), view4(dt_bias, "dt_bias", false), view4(out, "out", true),
                          static_cast<const int64_t*>(P(idx)), batch, H, Pdim, N, G, softplus};
        py::gil_scoped_release nogil;
        cpu::selective_state_update(a, P(workspace), parts);
      },
      "One decode step of the Mamba scan, state updated in place (see StateUpdateArgs).");

  m.def("mla_decode_workspace", &cpu::mla_decode_workspace,
        "Accumulators per thread of mla_decode for (rows = s_q * H, D, dv).");
  m.def("mla_decode_has_avx2", &cpu::mla_decode_has_avx2,
        "Whether mla_decode's vectorised (AVX2 + FMA) kernel can run on this CPU.");
  // mla_decode's argument check on CPU tensors, one pass instead of a dozen small torch ops:
  // (min length, max length, the sequence holding the max, the first sequence whose used block
  // table entries, ceil(len / page) of them, leave [0, num_blocks); -1 when none).
  m.def(
      "mla_check_table",
      [](uintptr_t block_table, int64_t bt_s0, int64_t bt_s1, int64_t max_blocks, uintptr_t seqlens, int64_t lens_s,
         int64_t B, int64_t page, int64_t num_blocks) {
        const int32_t* bt = static_cast<const int32_t*>(P(block_table));
        const int32_t* lens = static_cast<const int32_t*>(P(seqlens));
        int64_t lo = 0, hi = 0, arg_hi = 0, bad = -1;
        for (int64_t b = 0; b < B; ++b) {
          const int64_t n = lens[b * lens_s];
          if (b == 0 || n < lo) lo = n;
          if (b == 0 || n > hi) hi = n, arg_hi = b;
          const int64_t used = n > 0 ? std::min(max_blocks, (n + page - 1) / page) : 0;
          for (int64_t j = 0; j < used && bad < 0; ++j) {
            const int64_t e = bt[b * bt_s0 + j * bt_s1];
            if (e < 0 || e >= num_blocks) bad = b;
          }
        }
        return std::make_tuple(lo, hi, arg_hi, bad);
      },
      "mla_decode's checks of cache_seqlens and block_table (int32 CPU tensors).");
  m.def(
      "mla_decode",
      [](uintptr_t q, S3 qs, int q_dt, uintptr_t kv, int64_t kv_sblock, int64_t kv_srow, int64_t kv_shead,
         int kv_dt, uintptr_t block_table, int64_t bt_stride, uintptr_t seqlens, uintptr_t o_part,
         uintptr_t lse_part, uintptr_t out, int out_dt, uintptr_t lse, int64_t B, int64_t s_q, int64_t H,
         int64_t h_kv, int64_t D, int64_t dv, int64_t page, int64_t n_splits, int64_t split_tokens, double scale,
         bool causal, int64_t max_tokens, uintptr_t workspace, int parts, int kernel) {
        check_dtype(q_dt, "q", true);
        if (kernel < cpu::kMlaAuto || kernel > cpu::kMlaVector)
          throw std::invalid_argument("fastlayers: mla_decode kernel must be 0 (auto), 1 (scalar) or 2 (vector)");
        if (kernel == cpu::kMlaVector && !cpu::mla_decode_has_avx2())
          throw std::invalid_argument("fastlayers: mla_decode's vectorised kernel needs a CPU with AVX2 and FMA");
        if (kernel == cpu::kMlaVector && q_dt == kF64)
          throw std::invalid_argument("fastlayers: mla_decode's vectorised kernel takes fp32/fp16/bf16, not fp64");
        check_dtype(kv_dt, "kv_cache", true);
        check_dtype(out_dt, "out", true);
        if (parts < 1 || n_splits < 1 || split_tokens < 1 || page < 1)
          throw std::invalid_argument("fastlayers: mla_decode needs parts, n_splits, split_tokens, page >= 1");
        if (h_kv < 1 || H % h_kv)
          throw std::invalid_argument("fastlayers: mla_decode needs H a multiple of h_kv >= 1");
        MlaDecodeArgs a{P(q), qs[0], qs[1], qs[2], q_dt, P(kv), kv_sblock, kv_srow, kv_dt,
                        static_cast<const int32_t*>(P(block_table)), bt_stride,
                        static_cast<const int32_t*>(P(seqlens)), P(o_part), P(lse_part), P(out), out_dt, P(lse),
                        B, s_q, H, D, dv, page, n_splits, split_tokens, scale, causal, max_tokens, h_kv, kv_shead};
        py::gil_scoped_release nogil;
        cpu::mla_decode(a, P(workspace), parts, kernel);
      },
      "MLA decoding over a paged latent cache, split-KV (see MlaDecodeArgs).");
  // causal_conv1d: forward when dout == 0 (out, final), else backward (dx, dinit, dw, db).
  m.def(
      "causal_conv1d",
      [](uintptr_t x, S3 xs, int x_dt, uintptr_t w, int w_dt, uintptr_t bias, int b_dt, uintptr_t init, S3 is,
         int i_dt, uintptr_t out, S3 os, int o_dt, uintptr_t fin, S3 fs, int f_dt, uintptr_t dout, S3 ds, int d_dt,
         uintptr_t dfin, S3 dfs, int df_dt, uintptr_t dx, S3 dxs, int dx_dt, uintptr_t dinit, S3 dis, int di_dt,
         uintptr_t dw, uintptr_t db, int64_t B, int64_t C, int64_t L, int64_t W, bool silu, bool channel_last,
         uintptr_t workspace, int parts, uintptr_t seq) {
        check_dtype(x_dt, "x", true);
        check_dtype(w_dt, "weight", true);
        if (bias) check_dtype(b_dt, "bias", true);
        if (init) check_dtype(i_dt, "initial_states", true);
        if (W < 2 || W > 4) throw std::invalid_argument("fastlayers: causal_conv1d width must be 2, 3 or 4");
        if (parts < 1) throw std::invalid_argument("fastlayers: parts must be >= 1");
        Conv1dArgs a{};
        a.x = P(x), a.x_sb = xs[0], a.x_sc = xs[1], a.x_st = xs[2], a.x_dt = x_dt;
        a.w = P(w), a.w_dt = w_dt, a.bias = P(bias), a.b_dt = b_dt;
        a.init = P(init), a.i_sb = is[0], a.i_sc = is[1], a.i_st = is[2], a.i_dt = i_dt;
        a.out = P(out), a.o_sb = os[0], a.o_sc = os[1], a.o_st = os[2], a.o_dt = o_dt;
        a.final = P(fin), a.f_sb = fs[0], a.f_sc = fs[1], a.f_st = fs[2], a.f_dt = f_dt;
        a.dout = P(dout), a.d_sb = ds[0], a.d_sc = ds[1], a.d_st = ds[2], a.d_dt = d_dt;
        a.dfinal = P(dfin), a.df_sb = dfs[0], a.df_sc = dfs[1], a.df_st = dfs[2], a.df_dt = df_dt;
        a.dx = P(dx), a.dx_sb = dxs[0], a.dx_sc = dxs[1], a.dx_st = dxs[2], a.dx_dt = dx_dt;
        a.dinit = P(dinit), a.di_sb = dis[0], a.di_sc = dis[1], a.di_st = dis[2], a.di_dt = di_dt;
        a.dw = P(dw), a.db = P(db), a.B = B, a.C = C, a.L = L, a.W = W, a.silu = silu;
        a.channel_last = channel_last;
        a.seq = static_cast<const int32_t*>(P(seq));
        if (seq && (init || fin || dfin || dinit))
          throw std::invalid_argument("fastlayers: causal_conv1d with seq_idx takes no initial/final states");
        if (dout) {
          check_dtype(d_dt, "dout", true);
          check_dtype(dx_dt, "dx", true);
          if (dfin) check_dtype(df_dt, "dfinal_states", true);
          if (dinit) check_dtype(di_dt, "dinitial_states", true);
          if (!dw) throw std::invalid_argument("fastlayers: causal_conv1d backward needs dweight");
          py::gil_scoped_release nogil;
          cpu::causal_conv1d_bwd(a, P(workspace), parts);
        } else {
          check_dtype(o_dt, "out", true);
          if (fin) check_dtype(f_dt, "final_states", true);
          py::gil_scoped_release nogil;
          cpu::causal_conv1d_fwd(a, P(workspace), parts);
        }
      },
      "Depthwise causal conv1d forward (dout = 0) or backward over (B, C, L) (see csrc/cpu/conv1d.h).");

  m.def("conv1d_workspace_per_part", &cpu::conv1d_workspace_per_part,
        "Accumulators of workspace each part of causal_conv1d needs, for a width W.");

  m.def(
      "causal_conv1d_update",
      [](uintptr_t x, S3 xs, int x_dt, uintptr_t state, S3 ss, int s_dt, uintptr_t w, int w_dt, uintptr_t bias,
         int b_dt, uintptr_t out, S3 os, int o_dt, int64_t B, int64_t C, int64_t L, int64_t S, int64_t W, bool silu,
         int parts, uintptr_t cache_seqlens, uintptr_t idx) {
        check_dtype(x_dt, "x", true);
        check_dtype(w_dt, "weight", true);
        check_dtype(o_dt, "out", true);
        if (bias) check_dtype(b_dt, "bias", true);
        if (s_dt != x_dt) throw std::invalid_argument("fastlayers: conv_state must have the dtype of x");
        if (W < 2 || W > 4 || S < W - 1)
          throw std::invalid_argument("fastlayers: causal_conv1d_update needs width 2..4 and state_len >= width - 1");
        if (parts < 1) throw std::invalid_argument("fastlayers: parts must be >= 1");
        Conv1dUpdateArgs a{P(x), xs[0], xs[1], xs[2], x_dt, P(state), ss[0], ss[1], ss[2], s_dt, P(w), w_dt,
                           P(bias), b_dt, P(out), os[0], os[1], os[2], o_dt, B, C, L, S, W, silu,
                           static_cast<const int32_t*>(P(cache_seqlens)), static_cast<const int32_t*>(P(idx))};
        py::gil_scoped_release nogil;
        cpu::causal_conv1d_update(a, parts);
      },
      "Causal conv1d decode step: out from [conv_state, x], conv_state shifted in place (or, with cache_seqlens, "
      "a circular buffer; with idx, state rows chosen per sequence, negative: padded).");
  // selective_scan: forward when dout is absent (address 0), else backward.
  m.def(
      "selective_scan",
      [](const PyView& u, const PyView& delta, const PyView& A, const PyView& B, const PyView& C, const PyView& D,
         const PyView& z, const PyView& delta_bias, const PyView& out, const PyView& last, const PyView& dout,
         const PyView& dlast, const PyView& du, const PyView& ddelta, const PyView& dz, uintptr_t dA_part,
         uintptr_t dB_part, uintptr_t dC_part, uintptr_t dD_part, uintptr_t dbias_part, int64_t dB_part_stride,
         int64_t dC_part_stride, int64_t batch, int64_t dim, int64_t L, int64_t N, int64_t GB, int64_t GC,
         bool softplus, uintptr_t workspace, int parts) {
        if (parts < 1) throw std::invalid_argument("fastlayers: parts must be >= 1");
        if (GB < 1 || dim % GB || GC < 1 || dim % GC)
          throw std::invalid_argument("fastlayers: the number of groups of B and C must divide dim");
        const bool bwd = std::get<0>(dout) != 0;
        SelectiveScanArgs a{view4(u, "u", true), view4(delta, "delta", true), view4(A, "A", true),
                            view4(B, "B", true), view4(C, "C", true), view4(D, "D", false), view4(z, "z", false),
                            view4(delta_bias, "delta_bias", false), view4(out, "out", !bwd),
                            view4(last, "last_state", false), view4(dout, "dout", false),
                            view4(dlast, "dlast_state", false), view4(du, "du", bwd),
                            view4(ddelta, "ddelta", bwd), view4(dz, "dz", false), P(dA_part), P(dB_part),
                            P(dC_part), P(dD_part), P(dbias_part), dB_part_stride, dC_part_stride, batch, dim, L,
                            N, GB, GC, softplus};
        const int acc = a.u.dt == kF64 ? kF64 : kF32;
        if (a.B.dt != acc || a.C.dt != acc || (a.last.p && a.last.dt != acc))
          throw std::invalid_argument("fastlayers: selective_scan B, C and last_state must be in the accumulator dtype");
        if (bwd && (!a.dA_part || !a.dB_part || !a.dC_part))
          throw std::invalid_argument("fastlayers: selective_scan backward needs dA, dB and dC partial buffers");
        py::gil_scoped_release nogil;
        if (bwd)
          cpu::selective_scan_bwd(a, P(workspace), parts);
        else
          cpu::selective_scan_fwd(a, P(workspace), parts);
      },
      "Mamba-1 selective scan forward (dout absent) or backward (see SelectiveScanArgs).");

  m.def("selective_scan_workspace", &cpu::selective_scan_workspace,
        "Accumulators per part of the selective_scan workspace: (L, N, backward).");

  // ssd_scan (Mamba-2): forward when dout is absent (address 0), else backward (see SsdScanArgs).
  m.def(
      "ssd_scan",
      [](const PyView& x, const PyView& D, const PyView& z, const PyView& init, const PyView& out,
         const PyView& final_state, const PyView& dout, const PyView& dfinal, const PyView& dx, const PyView& dz,
         const PyView& dinit, const PyView& varlen, const PyView& dvarlen, uintptr_t dt, uintptr_t A, uintptr_t B,
         uintptr_t C, uintptr_t reset, uintptr_t vslot, uintptr_t ddt,
         uintptr_t dA, uintptr_t dD, uintptr_t dB_part, uintptr_t dC_part, int64_t batch, int64_t L, int64_t H,
         int64_t Pd, int64_t N, int64_t G, uintptr_t workspace, int parts) {
        if (parts < 1) throw std::invalid_argument("fastlayers: parts must be >= 1");
        if (G < 1 || H % G) throw std::invalid_argument("fastlayers: ssd_scan ngroups must divide nheads");
        if (!dt || !A || !B || !C) throw std::invalid_argument("fastlayers: ssd_scan needs dt, A, B and C");
        const bool bwd = std::get<0>(dout) != 0;
        SsdScanArgs a{view4(x, "x", true), view4(D, "D", false), view4(z, "z", false),
                      view4(init, "initial_states", false), view4(out, "out", !bwd),
                      view4(final_state, "final_states", false), view4(dout, "dout", false),
                      view4(dfinal, "dfinal_states", false), view4(dx, "dx", bwd), view4(dz, "dz", false),
                      view4(dinit, "dinitial_states", false), view4(varlen, "varlen_states", false),
                      view4(dvarlen, "dvarlen_states", false), P(dt), P(A), P(B), P(C),
                      reinterpret_cast<const uint8_t*>(reset), reinterpret_cast<const int64_t*>(vslot), P(ddt), P(dA), P(dD), P(dB_part), P(dC_part),
                      batch, L, H, Pd, N, G};
        if ((a.varlen.p || a.dvarlen.p) && !a.vslot)
          throw std::invalid_argument("fastlayers: ssd_scan varlen states need vslot");
        if (bwd && (!a.ddt || !a.dA || !a.dB_part || !a.dC_part || (a.D.p && !a.dD)))
          throw std::invalid_argument("fastlayers: ssd_scan backward needs ddt, dA, dB, dC (and dD) buffers");
        py::gil_scoped_release nogil;
        if (bwd)
          cpu::ssd_scan_bwd(a, P(workspace), parts);
        else
          cpu::ssd_scan_fwd(a, P(workspace), parts);
      },
      "Mamba-2 ssd_scan forward (dout absent) or backward (see SsdScanArgs).");
  m.def("ssd_scan_workspace", &cpu::ssd_scan_workspace,
        "Accumulators per part of the ssd_scan workspace: (L, P, N, backward).");

  m.def("max_threads", []() { return omp_get_max_threads(); });

  // Ask the kernel to back [ptr, ptr+nbytes) with transparent huge pages before
  // first touch. Large fresh outputs otherwise cost one page fault per 4 KiB,
  // which on small machines is slower than the kernel itself. Only the 2 MiB-aligned
  // interior is advised; it is a hint and never changes contents.
  m.def("advise_hugepages", [](uintptr_t ptr, size_t nbytes) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = 2u << 20;
    const uintptr_t lo = (ptr + huge - 1) & ~(huge - 1);
    const uintptr_t hi = (ptr + nbytes) & ~(huge - 1);
    if (hi > lo) return madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE) == 0;
#endif
    (void)ptr;
    (void)nbytes;
    return false;
  });
}
