// Host-side entry points of the Hopper forward kernel (the only things the CUDA backend needs to see).
#pragma once

#include <cuda_runtime.h>

#include "backends/cuda/hopper/head_dims.hpp"
#include "backends/cuda/hopper/params.cuh"

namespace tilewise::hopper {

/// Dynamic shared memory of the kernel for a head dim (0 when unsupported).
int forward_smem_bytes(int head_dim);
/// Query rows per work item of the kernel for a head dim (0 when unsupported).
int query_block_rows(int head_dim);
/// Launches the persistent forward kernel on `grid` CTAs.
cudaError_t launch_forward(const FwdRunParams& params, int head_dim, bool bf16, int grid, cudaStream_t stream);

}  // namespace tilewise::hopper
