// The backward's preprocess: the row statistic D_i = dO_i . o_i - dLSE_i, once per query row, written twice: in
// sequence order (`delta`, read by the dQ kernel for its owned rows) and per streamed block beside the row's LSE
// in base 2 (`stats`, which the dK/dV kernels' producer loads with one TMA per block). Rows of a streamed block that
// are not real tokens get LSE +inf and D 0, so their probabilities and dS are exactly zero (the reduce kernel's TMA
// reductions clip them: its dQ needs no row positions).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "backends/cuda/hopper/bwd/bwd_params.cuh"
#include "backends/cuda/hopper/tile_scheduler.cuh"
#include "backends/cuda/row_pass_order.hpp"

namespace tilewise::hopper {

/// One streamed block's statistics are kStatsRows rows of as many floats as the block has rows (kBlockN, or the
/// dK/dV kernel's KernelTraits::kStreamRows): the rows' LSE in base 2, and D. (A third row of sequence positions
/// served the atomic fused kernel's dQ until v3.16.)
constexpr int kStatsRows = 2;  // rows per entry in BwdParams::stats_map

struct PreprocessParams {
  const void* o = nullptr;
  const void* dout = nullptr;
  Strides so;  // o's and dout's element strides
  const float* lse = nullptr;   // [B, Hq, S], natural log
  const float* dlse = nullptr;  // [B, Hq, S] or null
  float* delta = nullptr;       // [B, Hq, S]
  float* stats = nullptr;       // [B, Hq, stats_entries, kStatsRows x the streamed rows]
  int32_t batch = 1;            // every batch element (one launch)
  // The CTAs' order over (stats entry, batch x head), set by launch_backward_preprocess from o's strides.
  cuda::RowPassOrder order;
};

/// The statistics entry (within a (batch, head)) of a streamed block of kRows rows: video entries per (tile, slot),
/// then text.
template <int kRows>
__device__ __forceinline__ int32_t stats_entry(const BwdParams& p, const Block& b) {
  return block_entry<kRows>(p, b, p.stream_slots);
}

/// Threads of a preprocess CTA: four warps share one statistics entry.
constexpr int kPreprocessThreads = 128;

/// One CTA per (stats entry, batch x head), in PreprocessParams::order. A row is read by a segment of a warp's lanes,
/// 16 bytes each (kLanes a power of two covering the row's 16-byte chunks: 16 at D 128 and 96, 8 at D 64), so every
/// load instruction reads whole rows (coalesced) and each lane has all its rows' loads in flight before it adds.
/// The rows' sequence positions are computed once each, into shared memory, and the rows' LSE (and dLSE) loaded with
/// O and dO: loaded after the sum, they were a second DRAM round trip per CTA, which held v3.19's kernel and a
/// coalesced rewrite of it at ~0.72 ms on row 1 (0.40 with them beside the rows' loads: backward v3.24).
template <class T, int kRows, int kHeadDim>
__global__ void __launch_bounds__(kPreprocessThreads) bwd_preprocess(const __grid_constant__ BwdParams p,
                                                                     PreprocessParams pre) {
  constexpr int kChunks = kHeadDim * int{sizeof(T)} / 16;  // 16-byte chunks of a row
  constexpr int kLanes = kChunks <= 8 ? 8 : 16;
  static_assert(kChunks <= kLanes && 32 % kLanes == 0, "a row's chunks fit one segment of a warp");
  constexpr int kSegments = kPreprocessThreads / kLanes;  // rows read at once by the CTA
  static_assert(kRows % kSegments == 0, "the entry's rows split evenly over the segments");
  constexpr int kSteps = kRows / kSegments;
  const int32_t entry = static_cast<int32_t>(pre.order.chunk(blockIdx.x));
  const int32_t bh = static_cast<int32_t>(pre.order.head(blockIdx.x));
  const int seg = threadIdx.x / kLanes, chunk = threadIdx.x % kLanes;
  const int64_t b = bh / p.q_heads, h = bh % p.q_heads;
  const T* o = static_cast<const T*>(pre.o) + b * pre.so.batch + h * pre.so.head + chunk * 8;
  const T* dout = static_cast<const T*>(pre.dout) + b * pre.so.batch + h * pre.so.head + chunk * 8;

  __shared__ int64_t row_at[kRows];  // a row's sequence position, or -1 past the real tokens
  for (int r = threadIdx.x; r < kRows; r += kPreprocessThreads)
    row_at[r] = block_row_position<kRows>(p, entry, p.stream_slots, r);
  __syncthreads();
  int64_t at[kSteps];
  uint4 x[kSteps], y[kSteps];
  float lse[kSteps], dlse[kSteps];
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {  // every load first: kSteps rows' two chunks and statistics in flight per lane
    at[s] = row_at[s * kSegments + seg];
    x[s] = y[s] = make_uint4(0, 0, 0, 0);
    lse[s] = INFINITY, dlse[s] = 0.f;
    if (at[s] >= 0) {
      const int64_t stat = bh * p.seq_len + at[s];
      lse[s] = pre.lse[stat];  // one address per segment
      if (pre.dlse) dlse[s] = pre.dlse[stat];
      if (chunk < kChunks) {
        x[s] = *reinterpret_cast<const uint4*>(o + at[s] * pre.so.seq);  // rows are 16-byte aligned (plan checks)
        y[s] = *reinterpret_cast<const uint4*>(dout + at[s] * pre.so.seq);
      }
    }
  }
  float* out = pre.stats + (int64_t{bh} * p.stats_entries + entry) * (kStatsRows * kRows);
#pragma unroll
  for (int s = 0; s < kSteps; ++s) {
    const T* xs = reinterpret_cast<const T*>(&x[s]);
    const T* ys = reinterpret_cast<const T*>(&y[s]);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += static_cast<float>(xs[i]) * static_cast<float>(ys[i]);
#pragma unroll
    for (int off = kLanes / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off, kLanes);
    const int r = s * kSegments + seg;
    if (chunk != 0) continue;
    float lse2 = INFINITY, d = 0.f;
    if (at[s] >= 0) {
      d = sum - dlse[s];
      lse2 = lse[s] * p.scale_log2_lse;
      pre.delta[bh * p.seq_len + at[s]] = d;
    }
    out[r] = lse2;
    out[kRows + r] = d;
  }
}

}  // namespace tilewise::hopper
