// Host-side entry points of the Hopper forward kernel (the only things the CUDA backend needs to see).
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "backends/cuda/hopper/head_dims.hpp"
#include "backends/cuda/hopper/params.cuh"

namespace tilewise::hopper {

/// Dynamic shared memory of the kernel for a head dim (0 when unsupported).
int forward_smem_bytes(int head_dim);
/// The query rows per work item the kernels for a head dim are built with (128 and / or 192, ascending; empty when
/// unsupported): the plan chooses one (cuda::choose_query_rows).
std::vector<int> forward_query_rows(int head_dim);
/// Launches the persistent forward kernel with `rows` query rows per work item (one of forward_query_rows) on
/// `grid` CTAs.
cudaError_t launch_forward(const FwdRunParams& params, int head_dim, int rows, bool bf16, int grid,
                           cudaStream_t stream);

}  // namespace tilewise::hopper
