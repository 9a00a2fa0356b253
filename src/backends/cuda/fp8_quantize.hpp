// Plan::quantize_fp8 on the GPU (docs/semantics.md §11.2): the pre-pass of precision fp8, shared by the CUDA
// backends. Groups and scales come from include/tilewise/fp8.hpp (the same functions the CPU reference calls), the
// rounding to e4m3 from the hardware, so the bytes and scales equal the CPU reference's (tests/test_cuda_fp8.cpp).
#pragma once

#include <cuda_runtime.h>

#include "core/backend.hpp"

namespace tilewise::cuda {

/// Quantises q, k, v (bf16 or f16, the plan's strides) into `out` (e4m3 with the same strides, and the scales):
/// Q per row, K smoothed per key block, V per channel. Every pointer is checked first (device memory, aligned),
/// so nothing is launched on a bad argument. Stream-ordered: a small scratch (the mean keys' float64 sums and the
/// statistics, quantize_fp8_stats_floats) is taken with cudaMallocAsync on `stream` and freed there.
void quantize_fp8(const Plan& plan, const Tensors& in, const Fp8Tensors& out, cudaStream_t stream);

/// Where precision fp8's forward wants the pre-pass's results (its workspace): q and k in e4m3 with their own
/// strides (bytes), the scales, V's inverse scales (its V^T pre-pass quantises v itself, so v is not written here),
/// each query row's LSE shift (scale * q . mu), the mean keys' float64 sums and the statistics (scratch: 256-byte
/// aligned, quantize_fp8_stats_floats(plan) floats).
struct ForwardQuantized {
  uint8_t* q8;
  uint8_t* k8;
  Strides q8_strides, k8_strides;
  float* q_scale;
  float* k_scale;
  float* v_scale;
  float* v_inv;
  float* lse_shift;
  double* sums;
  float* stats;
};

/// The pre-pass's statistics scratch in floats: per (batch, kv head) its key blocks' per channel key minima and
/// maxima (one slot per 1024 rows of the largest tile), the mean keys and the inverse scales.
int64_t quantize_fp8_stats_floats(const Plan& plan);

/// quantize_fp8's passes into `out`, for the FP8 forward's run (the caller checked the pointers).
void quantize_fp8_for_forward(const Plan& plan, const Tensors& in, const ForwardQuantized& out, cudaStream_t stream);

}  // namespace tilewise::cuda
