// Host-side entry points of the Hopper backward kernels (the only things the CUDA backend needs to see).
#pragma once

#include <cuda_runtime.h>

#include "backends/cuda/hopper/bwd/bwd_preprocess.cuh"

namespace tilewise::hopper {

/// Rows of an owned block (query block of the dQ kernel, key block of the dK/dV kernel).
constexpr int kBackwardOwnedRows = 128;
/// Rows of the dK/dV kernel's streamed query blocks as this build's kernels have them (TILEWISE_HOPPER_BWD_STREAM_ROWS,
/// a macro of backward.cu alone, so that a kernel variant built with another value plans for it too): the host sizes
/// the boxes, the statistics and the maps of that kernel's streamed side by it.
int dkdv_stream_rows();
/// CTAs per cluster of this build's reduce kernel in clusters (BwdKernel::dkdvq_reduce_cluster; 1: none built).
int reduce_cluster_size();
/// How many CTAs of the reduce kernel in clusters can be resident at once on the current device at head dim
/// `head_dim` (a multiple of reduce_cluster_size()), or 0 where that kernel does not exist. Plan time only.
int reduce_cluster_ctas(int head_dim, bool bf16);
/// The row-statistics preprocess over the dK/dV kernel's streamed blocks of `stream_rows` rows (64 or 128;
/// `params` holds their boxes and entries) of every (batch, query head).
cudaError_t launch_backward_preprocess(const BwdParams& params, const PreprocessParams& pre, int head_dim, bool bf16,
                                       int stream_rows, cudaStream_t stream);
/// One of the backward kernels (BwdKernel), persistent on `grid` CTAs.
cudaError_t launch_backward(const BwdParams& params, int head_dim, bool bf16, BwdKernel kernel, int grid,
                            cudaStream_t stream);
/// dq = scale * accumulator ([B, S, Hq, D] fp32), in the input dtype with q's strides.
cudaError_t launch_dq_from_accumulator(const float* accum, void* dq, const Strides& q_strides, int64_t batch,
                                       int64_t heads, int64_t seq_len, int head_dim, float scale, bool bf16,
                                       cudaStream_t stream);
/// Whether this build's reduce kernel at `head_dim` keeps its dQ accumulator in block order
/// (TILEWISE_HOPPER_BWD_DQ_BLOCK_ORDER, a macro of backward.cu alone, like TILEWISE_HOPPER_BWD_STREAM_ROWS): the host
/// sizes and converts it accordingly.
bool dq_block_order(int head_dim);
/// dq = scale * accumulator in block order (dq_block_order(head_dim); `params` holds the streamed blocks' boxes and
/// entries, batch the launch's batch elements), in the input dtype with q's strides.
cudaError_t launch_dq_from_block_accumulator(const BwdParams& params, const float* accum, void* dq,
                                             const Strides& q_strides, int64_t batch, int head_dim, float scale,
                                             bool bf16, cudaStream_t stream);

}  // namespace tilewise::hopper
