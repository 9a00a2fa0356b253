// Epilogue: normalises O, writes it (as the output dtype) into the O buffer in the swizzled TMA layout and
// stores the box with TMA (rows outside the latent or text capacity are clipped by the hardware), and writes
// the LSE of real rows.
#pragma once

#include "backends/cuda/hopper/kernel_traits.cuh"
#include "backends/cuda/hopper/tile_scheduler.cuh"
#include "backends/cuda/hopper/wgmma_ops.cuh"

namespace tilewise::hopper {

constexpr uint32_t kEpilogueBarrier = 1;  // named barrier of the consumer warpgroups

template <class Traits, WgType kType>
struct Epilogue {
  static constexpr int D = Traits::D;
  const FwdParams& p;
  const typename Traits::Shared& s;
  int wg, tid;

  /// Sequence position of block row `r`, or -1 when the row is not a real token.
  __device__ __forceinline__ int64_t position(const Block& q, int r) const {
    if (r >= query_rows<Traits::kBlockM, Traits::kQueryRuns>(p, q)) return -1;
    if (q.text) return p.map.seq.text_offset() + q.row0 + r;
    // A run block's rows are raster video rows (the host takes runs in raster order only).
    if (Traits::kQueryRuns && q.run()) return p.map.seq.video_offset() + q.row0 + r;
    const D3 b = q.box(p);
    const D3 o = q.origin(p), L = p.map.grid.latent;
    const D3 c{o.t + r / (b.h * b.w), o.h + (r / b.w) % b.h, o.w + r % b.w};
    if (c.t >= L.t || c.h >= L.h || c.w >= L.w) return -1;
    return p.map.video_position(c);
  }

  /// Index into [B, Hq, S] per-row arrays (the LSE, the FP8 scales) of this thread's accumulator row rr, or -1
  /// when the row is not a real token.
  __device__ __forceinline__ int64_t row_index(const WorkItem& item, int rr) const {
    const int r = 64 * wg + 16 * (tid / 32) + (tid % 32) / 4 + 8 * rr;
    const int64_t pos = position(item.q, r);
    return pos < 0 ? -1 : ((p.batch_base + item.batch) * int64_t{p.q_heads} + item.head) * p.seq_len + pos;
  }

  /// The LSE of this thread's accumulator row rr, value_at(row_index), written by its quad's first lane when the
  /// row is a real token.
  template <class F>
  __device__ __forceinline__ void write_lse(const WorkItem& item, int rr, F&& value_at) const {
    if (p.lse != nullptr && tid % 4 == 0) {
      const int64_t at = row_index(item, rr);
      if (at >= 0) p.lse[at] = value_at(at);
    }
  }

  __device__ void store(const WorkItem& item, float (&o)[D / 2], const float (&m)[2], const float (&l)[2]) const {
    float inv[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float sum = l[rr];
      sum += __shfl_xor_sync(0xffffffff, sum, 1);
      sum += __shfl_xor_sync(0xffffffff, sum, 2);
      inv[rr] = sum > 0.f ? 1.f / sum : 0.f;
      write_lse(item, rr, [&](int64_t) { return (m[rr] + __log2f(sum)) * 0.69314718055994531f; });
    }
    write_o(item, o, inv);
  }

  /// O * row_scale (per accumulator row) into the O buffer and out with TMA; with kColumnScale, also times
  /// col_scale(column) (the FP8 forward's per-channel V scales). The accumulator's first D columns are O (the FP8
  /// forward's has 8 more).
  template <bool kColumnScale = false, int kAcc = D / 2, class ColScale = float>
  __device__ void write_o(const WorkItem& item, float (&o)[kAcc], const float (&row_scale)[2],
                          const ColScale& col_scale = {}) const {
    static_assert(kAcc >= D / 2, "an accumulator of at least D columns");
    const int warp = tid / 32, lane = tid % 32;
    // The previous item's output store must have finished reading the O buffer before it is overwritten; the
    // store thread waits for it here, an item later, rather than right after issuing it.
    if (wg == 0 && tid == 0) tma_store_wait_read();
    named_barrier_sync(kEpilogueBarrier, 128 * Traits::kConsumerWarpgroups);
    // Registers -> swizzled shared memory (this warpgroup's own 64 rows of the O buffer).
#pragma unroll
    for (int i = 0; i < D / 2; i += 2) {
      const int rr = (i % 4) / 2;
      const int r = 64 * wg + 16 * warp + lane / 4 + 8 * rr;
      const int col = 8 * (i / 4) + 2 * (lane % 4);
      const uint32_t off = (col / Traits::kOPanelCols) * Traits::kOPanelBytes +
                           swizzled_offset(r, col % Traits::kOPanelCols, Traits::kORowBytes);
      float x = o[i] * row_scale[rr], y = o[i + 1] * row_scale[rr];
      if constexpr (kColumnScale) x *= col_scale(col), y *= col_scale(col + 1);
      *reinterpret_cast<uint32_t*>(s.o() + off) = pack_half2(x, y, kType == WgType::bf16);
    }
    fence_proxy_async();
    named_barrier_sync(kEpilogueBarrier, 128 * Traits::kConsumerWarpgroups);
    if (wg == 0 && tid == 0) {
      const Block& b = item.q;
      const int c4 = p.o.c4(item.batch, item.head);
      const D3 org = b.tma_origin(p);
#pragma unroll
      for (int panel = 0; panel < Traits::kOPanels; ++panel) {
        const int c0 = p.o.c0(item.head, panel * Traits::kOPanelCols);
        const uint8_t* src = s.o() + panel * Traits::kOPanelBytes;
        if (b.text)
          tma_store(&p.o_text, src, c0, b.row0, 0, 0, c4);
        else if (Traits::kQueryRuns && b.run())
          tma_store(&with_runs(p).o_rows, src, c0, b.row0, 0, 0, c4);
        else
          tma_store(&p.o_video[b.cls], src, c0, static_cast<int>(org.w), static_cast<int>(org.h), static_cast<int>(org.t), c4);
      }
      tma_store_commit();
    }
  }
};

}  // namespace tilewise::hopper
