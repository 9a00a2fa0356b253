// Host-side entry points of the Hopper FP8 forward kernel (docs/semantics.md §11): what the CUDA backend sees.
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "backends/cuda/hopper/fp8/fp8_params.cuh"
#include "tilewise/tilewise.hpp"  // Strides

namespace tilewise::hopper {

/// The query rows per work item the FP8 kernels for a head dim are built with (128 and / or 192, ascending; empty
/// when unsupported: 64, 96 and 128 are): the plan chooses one (cuda::choose_query_rows).
std::vector<int> fp8_forward_query_rows(int head_dim);
/// What V^T is packed from: the caller's e4m3 V (precision fp8_scaled), or V in bf16 / f16 quantised on the way
/// with the inverse scales of quantize_fp8_for_forward (precision fp8).
enum class VtSource { e4m3, bf16, f16 };
/// Writes every key block's V^T (Fp8Params::vt_map's layout; params: the map, classes, heads, batch, vt_slots and
/// vt_entries, text_len) into `vt` from V in `source` form with `v_strides` (elements).
cudaError_t launch_vt_pack(const Fp8Params& params, const void* v, const Strides& v_strides, VtSource source,
                           const float* v_inv, uint8_t* vt, int head_dim, cudaStream_t stream);
/// Launches the persistent FP8 forward with `rows` query rows per work item (one of fp8_forward_query_rows) on
/// `grid` CTAs; `bf16` is the output dtype (else f16).
cudaError_t launch_fp8_forward(const Fp8Params& params, int head_dim, int rows, bool bf16, int grid,
                               cudaStream_t stream);

}  // namespace tilewise::hopper
