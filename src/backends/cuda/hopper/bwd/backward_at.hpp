// The backward kernels of one head dim, each head dim in a translation unit of its own (backward_d64.cu,
// backward_d96.cu, backward_d128.cu): ptxas options may then differ by head dim (CMakeLists.txt: the D 96 kernels at
// another register usage level, docs/performance.md backward v3.32), and the three compile in parallel. backward.cu
// dispatches to them by head dim.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "backends/cuda/hopper/bwd/bwd_params.cuh"

namespace tilewise::hopper {

/// Kernel `kernel` at head dim D (bf16 or f16), persistent on `grid` CTAs.
template <int D>
cudaError_t launch_backward_at(const BwdParams& params, bool bf16, BwdKernel kernel, int grid, cudaStream_t stream);
/// reduce_cluster_ctas at head dim D (0 where that kernel is not built).
template <int D>
int reduce_cluster_ctas_at(bool bf16);
/// Measurement builds (TILEWISE_HOPPER_BWD_TRACE): the clock table of head dim D's kernels (bwd_trace.cuh's, one per
/// translation unit) into `out`; `clear` zeroes it.
template <int D>
int read_backward_trace_at(void* out, size_t bytes, bool clear);

}  // namespace tilewise::hopper
