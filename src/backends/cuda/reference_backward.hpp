// The GPU reference backward (reference_backward.cu), called by the cuda-reference backend.
#pragma once

#include <cuda_runtime.h>

#include "backends/cuda/cuda_common.hpp"

namespace tilewise::cuda {

/// Workspace of launch_reference_backward: the row statistic D = rowsum(dO o) - dLSE, [B, Hq, S] float.
size_t reference_backward_workspace_bytes(const Plan& plan);
/// dq, dk and dv (fp32 CUDA-core arithmetic, one thread per row; no atomics, so deterministic).
void launch_reference_backward(const Plan& plan, const PatternTables& tables, const GradTensors& t,
                               cudaStream_t stream, void* workspace);

}  // namespace tilewise::cuda
