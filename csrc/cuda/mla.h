// Host interface of the CUDA MLA decoding kernels (csrc/cuda/mla.cu). Plain C++: no CUDA
// headers. Streams are passed as void* (a cudaStream_t); CUDA errors are thrown as
// std::runtime_error, bad arguments as std::invalid_argument.
#pragma once
#include "fastlayers/common.h"

namespace fastlayers {
namespace cuda {

// MLA decoding (MlaDecodeArgs, fastlayers/common.h) on `stream` on the current device: the
// split-partial kernel, then the merge. Asynchronous. fp32/fp16/bf16 (q and kv of one
// dtype), D <= 768, head_dim_v <= 512, batch and n_splits <= 65535, h_kv >= 1 KV heads with H a
// multiple of h_kv (a CTA per row group of one KV head's s_q * H / h_kv query rows). Launches nothing
// when B, s_q or H is 0.
void mla_decode(const MlaDecodeArgs& a, void* stream);

}  // namespace cuda
}  // namespace fastlayers
