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
  float* stats = nullptr;       // [B, Hq, stats_entries, 3 x the streamed rows]
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

template <class T>
__device__ __forceinline__ float dot_rows(const T* a, const T* b, int D) {
  float sum = 0.f;
  for (int d = 0; d < D; d += 8) {  // rows are 16-byte aligned (the plan checks the strides)
    const uint4 x = *reinterpret_cast<const uint4*>(a + d), y = *reinterpret_cast<const uint4*>(b + d);
    const T* xs = reinterpret_cast<const T*>(&x);
    const T* ys = reinterpret_cast<const T*>(&y);
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += static_cast<float>(xs[i]) * static_cast<float>(ys[i]);
  }
  return sum;
}

/// One CTA of kRows threads per (stats entry, batch x head), in PreprocessParams::order: thread r is row r of the
/// entry's block (kRows: the dK/dV kernel's streamed rows; p.cls holds its boxes).
template <class T, int kRows>
__global__ void __launch_bounds__(kRows) bwd_preprocess(const __grid_constant__ BwdParams p, PreprocessParams pre,
                                                        int head_dim) {
  const int32_t entry = static_cast<int32_t>(pre.order.chunk(blockIdx.x));
  const int32_t bh = static_cast<int32_t>(pre.order.head(blockIdx.x)), r = threadIdx.x;
  const int64_t at = block_row_position<kRows>(p, entry, p.stream_slots, r);
  const bool real = at >= 0;
  const int64_t pos = real ? at : 0;
  const int64_t b = bh / p.q_heads, h = bh % p.q_heads;
  float lse2 = INFINITY, d = 0.f;
  if (real) {
    const int64_t stat = bh * p.seq_len + pos;
    const int64_t off = b * pre.so.batch + pos * pre.so.seq + h * pre.so.head;
    d = dot_rows(static_cast<const T*>(pre.o) + off, static_cast<const T*>(pre.dout) + off, head_dim) -
        (pre.dlse ? pre.dlse[stat] : 0.f);
    lse2 = pre.lse[stat] * p.scale_log2_lse;
    pre.delta[stat] = d;
  }
  float* out = pre.stats + (int64_t{bh} * p.stats_entries + entry) * (kStatsRows * kRows);
  out[r] = lse2;
  out[kRows + r] = d;
}

}  // namespace tilewise::hopper
