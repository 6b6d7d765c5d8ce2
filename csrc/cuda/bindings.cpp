// fastlayers._cuda: the CUDA kernels as a plain pybind11 module (no torch headers,
// no libtorch, static cudart). Tensors arrive as raw device addresses (int), strides
// in elements and dtype codes (fastlayers/_dtypes.py); Python allocates every buffer
// and passes the stream (torch.cuda.current_stream().cuda_stream) and makes the
// tensors' device current. This file is compiled by the host compiler: no CUDA
// headers here, every CUDA call is behind csrc/cuda/norm.h, mla.h and scan.h.
//
// Errors: CUDA failures raise RuntimeError ("fastlayers._cuda: ..."), bad arguments
// (e.g. float64, which the CUDA kernels do not support) raise ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <tuple>

#include "mla.h"
#include "norm.h"
#include "scan.h"

namespace py = pybind11;
using namespace fastlayers;

static inline void* P(uintptr_t p) { return reinterpret_cast<void*>(p); }

// A strided tensor view from Python: (address, dtype code, 4 strides in elements); address 0 = absent.
using PyView = std::tuple<uintptr_t, int, std::array<int64_t, 4>>;
static View4 view4(const PyView& v) {
  View4 r{P(std::get<0>(v)), std::get<1>(v), {0, 0, 0, 0}};
  for (int i = 0; i < 4; ++i) r.s[i] = std::get<2>(v)[i];
  return r;
}

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fastlayers CUDA kernels (torch-free ABI, static cudart)";

  m.def(
      "norm_fwd",
      [](uintptr_t x, int64_t x_stride, int x_dt, uintptr_t r, int64_t r_stride, int r_dt, uintptr_t w, int w_dt,
         uintptr_t b, int b_dt, uintptr_t y, int64_t y_stride, int y_dt, uintptr_t h, int64_t h_stride, int h_dt,
         uintptr_t mean, uintptr_t rstd, int64_t M, int64_t N, double eps, bool is_rms, uintptr_t stream,
         double offset, int xhat_dt) {
        NormFwdArgs a{P(x), x_stride, x_dt, P(r), r_stride, r_dt, P(w), w_dt, P(b), b_dt, P(y), y_stride, y_dt,
                      P(h),  h_stride, h_dt, P(mean), P(rstd), M,  N,  eps, is_rms, offset, xhat_dt};
        py::gil_scoped_release nogil;
        cuda::norm_fwd(a, P(stream));
      },
      py::arg("x"), py::arg("x_stride"), py::arg("x_dt"), py::arg("r"), py::arg("r_stride"), py::arg("r_dt"),
      py::arg("w"), py::arg("w_dt"), py::arg("b"), py::arg("b_dt"), py::arg("y"), py::arg("y_stride"),
      py::arg("y_dt"), py::arg("h"), py::arg("h_stride"), py::arg("h_dt"), py::arg("mean"), py::arg("rstd"),
      py::arg("M"), py::arg("N"), py::arg("eps"), py::arg("is_rms"), py::arg("stream"), py::arg("offset") = 0.0,
      py::arg("xhat_dt") = -1,
      "Fused residual + RMSNorm/LayerNorm forward on `stream` (see csrc/include/fastlayers/common.h).");

  m.def(
      "norm_bwd",
      [](uintptr_t dy, int64_t dy_stride, int dy_dt, uintptr_t x, int64_t x_stride, int x_dt, uintptr_t r,
         int64_t r_stride, int r_dt, uintptr_t w, int w_dt, uintptr_t b, int b_dt, uintptr_t mean, uintptr_t rstd,
         uintptr_t dh, int64_t dh_stride, int dh_dt, uintptr_t dx, int64_t dx_stride, int dx_dt, uintptr_t dr,
         int64_t dr_stride, int dr_dt, uintptr_t dw_part, uintptr_t db_part, int64_t M, int64_t N, bool is_rms,
         int parts, uintptr_t stream, double offset, int xhat_dt) {
        NormBwdArgs a{P(dy), dy_stride, dy_dt, P(x), x_stride, x_dt, P(r), r_stride, r_dt, P(w), w_dt, P(b), b_dt,
                      P(mean), P(rstd), P(dh), dh_stride, dh_dt, P(dx), dx_stride, dx_dt, P(dr), dr_stride, dr_dt,
                      P(dw_part), P(db_part), M, N, is_rms, offset, xhat_dt};
        py::gil_scoped_release nogil;
        cuda::norm_bwd(a, parts, P(stream));
      },
      py::arg("dy"), py::arg("dy_stride"), py::arg("dy_dt"), py::arg("x"), py::arg("x_stride"), py::arg("x_dt"),
      py::arg("r"), py::arg("r_stride"), py::arg("r_dt"), py::arg("w"), py::arg("w_dt"), py::arg("b"),
      py::arg("b_dt"), py::arg("mean"), py::arg("rstd"), py::arg("dh"), py::arg("dh_stride"), py::arg("dh_dt"),
      py::arg("dx"), py::arg("dx_stride"), py::arg("dx_dt"), py::arg("dr"), py::arg("dr_stride"),
      py::arg("dr_dt"), py::arg("dw_part"), py::arg("db_part"), py::arg("M"), py::arg("N"), py::arg("is_rms"),
      py::arg("parts"), py::arg("stream"), py::arg("offset") = 0.0, py::arg("xhat_dt") = -1,
      "Fused residual + RMSNorm/LayerNorm backward on `stream`; dw/db as (parts, N) fp32 partial sums.");

  m.def(
      "mla_decode",
      [](uintptr_t q, std::array<int64_t, 3> qs, int q_dt, uintptr_t kv, int64_t kv_sblock, int64_t kv_srow,
         int kv_dt, uintptr_t block_table, int64_t bt_stride, uintptr_t seqlens, uintptr_t o_part,
         uintptr_t lse_part, uintptr_t out, int out_dt, uintptr_t lse, int64_t B, int64_t s_q, int64_t H, int64_t D,
         int64_t dv, int64_t page, int64_t n_splits, int64_t split_tokens, double scale, bool causal,
         int64_t max_tokens, uintptr_t stream, int64_t h_kv, int64_t kv_shead) {
        MlaDecodeArgs a{P(q), qs[0], qs[1], qs[2], q_dt, P(kv), kv_sblock, kv_srow, kv_dt,
                        static_cast<const int32_t*>(P(block_table)), bt_stride,
                        static_cast<const int32_t*>(P(seqlens)), P(o_part), P(lse_part), P(out), out_dt, P(lse),
                        B, s_q, H, D, dv, page, n_splits, split_tokens, scale, causal, max_tokens, h_kv, kv_shead};
        py::gil_scoped_release nogil;
        cuda::mla_decode(a, P(stream));
      },
      py::arg("q"), py::arg("q_strides"), py::arg("q_dt"), py::arg("kv"), py::arg("kv_sblock"), py::arg("kv_srow"),
      py::arg("kv_dt"), py::arg("block_table"), py::arg("bt_stride"), py::arg("seqlens"), py::arg("o_part"),
      py::arg("lse_part"), py::arg("out"), py::arg("out_dt"), py::arg("lse"), py::arg("B"), py::arg("s_q"),
      py::arg("H"), py::arg("D"), py::arg("dv"), py::arg("page"), py::arg("n_splits"), py::arg("split_tokens"),
      py::arg("scale"), py::arg("causal"), py::arg("max_tokens"), py::arg("stream"), py::arg("h_kv") = 1,
      py::arg("kv_shead") = 0,
      "MLA decoding over a paged latent cache, split-KV (see MlaDecodeArgs), on `stream`: fp32/fp16/bf16, "
      "D <= 768, head_dim_v <= 512; h_kv KV heads (kv_shead elements apart), H a multiple of h_kv.");

  m.def(
      "selective_scan_fwd",
      [](const PyView& u, const PyView& delta, const PyView& A, const PyView& B, const PyView& C, const PyView& D,
         const PyView& z, const PyView& delta_bias, const PyView& out, const PyView& last, int64_t batch,
         int64_t dim, int64_t L, int64_t N, int64_t GB, int64_t GC, bool softplus, uintptr_t stream) {
        SelectiveScanArgs a{};
        a.u = view4(u); a.delta = view4(delta); a.A = view4(A); a.B = view4(B); a.C = view4(C);
        a.D = view4(D); a.z = view4(z); a.delta_bias = view4(delta_bias); a.out = view4(out);
        a.last = view4(last);
        a.batch = batch; a.dim = dim; a.L = L; a.N = N; a.GB = GB; a.GC = GC; a.softplus = softplus;
        py::gil_scoped_release nogil;
        cuda::selective_scan_fwd(a, P(stream));
      },
      py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
      py::arg("delta_bias"), py::arg("out"), py::arg("last"), py::arg("batch"), py::arg("dim"), py::arg("L"),
      py::arg("N"), py::arg("GB"), py::arg("GC"), py::arg("softplus"), py::arg("stream"),
      "Mamba-1 selective scan forward (see SelectiveScanArgs) on `stream`; views are (address, dtype code, "
      "4 strides), address 0 for an absent tensor.");

  m.def(
      "selective_scan_bwd",
      [](const PyView& u, const PyView& delta, const PyView& A, const PyView& B, const PyView& C, const PyView& D,
         const PyView& z, const PyView& delta_bias, const PyView& dout, const PyView& dlast, const PyView& du,
         const PyView& ddelta, const PyView& dz, uintptr_t dA_part, uintptr_t dB_part, uintptr_t dC_part,
         uintptr_t dD_part, uintptr_t dbias_part, int64_t dB_part_stride, int64_t dC_part_stride, int64_t batch,
         int64_t dim, int64_t L, int64_t N, int64_t GB, int64_t GC, bool softplus, uintptr_t ckpt, int parts,
         uintptr_t stream) {
        SelectiveScanArgs a{};
        a.u = view4(u); a.delta = view4(delta); a.A = view4(A); a.B = view4(B); a.C = view4(C);
        a.D = view4(D); a.z = view4(z); a.delta_bias = view4(delta_bias);
        a.dout = view4(dout); a.dlast = view4(dlast); a.du = view4(du); a.ddelta = view4(ddelta); a.dz = view4(dz);
        a.dA_part = P(dA_part); a.dB_part = P(dB_part); a.dC_part = P(dC_part); a.dD_part = P(dD_part);
        a.dbias_part = P(dbias_part); a.dB_part_stride = dB_part_stride; a.dC_part_stride = dC_part_stride;
        a.batch = batch; a.dim = dim; a.L = L; a.N = N; a.GB = GB; a.GC = GC; a.softplus = softplus;
        py::gil_scoped_release nogil;
        cuda::selective_scan_bwd(a, P(ckpt), parts, P(stream));
      },
      py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
      py::arg("delta_bias"), py::arg("dout"), py::arg("dlast"), py::arg("du"), py::arg("ddelta"), py::arg("dz"),
      py::arg("dA_part"), py::arg("dB_part"), py::arg("dC_part"), py::arg("dD_part"), py::arg("dbias_part"),
      py::arg("dB_part_stride"), py::arg("dC_part_stride"), py::arg("batch"), py::arg("dim"), py::arg("L"),
      py::arg("N"), py::arg("GB"), py::arg("GC"), py::arg("softplus"), py::arg("ckpt"), py::arg("parts"),
      py::arg("stream"),
      "Mamba-1 selective scan backward (see SelectiveScanArgs) on `stream`: du, ddelta, dz written; dA, dB, dC, "
      "dD, d delta_bias added into part (block % parts) of the zeroed fp32 partial buffers; ckpt: "
      "selective_scan_bwd_ckpt(...) fp32 elements of scratch.");
  m.def("selective_scan_bwd_ckpt", &cuda::selective_scan_bwd_ckpt, py::arg("batch"), py::arg("dim"), py::arg("L"),
        py::arg("N"), "fp32 elements of the checkpoint scratch buffer selective_scan_bwd needs (0: none).");

  m.def("device_count", &cuda::device_count,
        "Number of CUDA devices visible to this module; 0 without a device or a recent enough driver.");
  m.def("sm_count", &cuda::sm_count, py::arg("device"), "Number of streaming multiprocessors of a device.");
  m.def("norm_bwd_parts", &cuda::norm_bwd_parts, py::arg("M"), py::arg("N"), py::arg("sm_count"),
        "Number of rows P of dw_part/db_part that norm_bwd writes for an (M, N) problem.");
}
