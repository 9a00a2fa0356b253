// Plan::quantize_fp8 on the GPU (docs/semantics.md §11.2): the pre-pass of precision fp8, shared by the CUDA
// backends. Groups and scales come from include/tilewise/fp8.hpp (the same functions the CPU reference calls), the
// rounding to e4m3 from the hardware, so the bytes and scales equal the CPU reference's (tests/test_cuda_fp8.cpp).
#pragma once

#include <cuda_runtime.h>

#include "core/backend.hpp"

namespace tilewise::cuda {

/// Quantises q, k, v (bf16 or f16, the plan's strides) into `out` (e4m3 with the same strides, and the scales):
/// Q per row, K smoothed per key block, V per channel. Every pointer is checked first (device memory, aligned),
/// so nothing is launched on a bad argument. Stream-ordered: a small float64 scratch (the mean keys' sums) is
/// taken with cudaMallocAsync on `stream` and freed there.
void quantize_fp8(const Plan& plan, const Tensors& in, const Fp8Tensors& out, cudaStream_t stream);

}  // namespace tilewise::cuda
