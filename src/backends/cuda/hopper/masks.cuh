// Masks of a key block, as policies every consumer (the forward's, the backward's dQ) applies to an S fragment of
// 64 x 128 in the wgmma accumulator layout: which key columns are real, allowed keys (ragged border blocks, text
// padding), and the attention tile's token-level frame rule inside blocks that mix allowed and forbidden pairs.
// The producer flags the blocks that need either (BlockInfo); unflagged blocks cost nothing.
#pragma once

#include "backends/cuda/hopper/tile_scheduler.cuh"

namespace tilewise::hopper {

/// Column of accumulator element i of a thread with this lane, for an accumulator of N/2 elements (m64nN).
__device__ __forceinline__ int accumulator_column(int i, int lane) { return 8 * (i / 4) + 2 * (lane % 4) + (i % 2); }

/// Which key columns of a block are real, allowed keys. Video columns are decided once per block by the
/// whole warp (each lane checks 4 columns, __ballot_sync gathers 128 bits), so ragged blocks cost little.
struct KeyMask {
  bool active = false;  // false: every column is a real, allowed key (the common case: no work at all)
  bool frames = false;  // attention tile block mixing allowed and forbidden frame pairs (token-level mask)
  uint32_t valid[4] = {~0u, ~0u, ~0u, ~0u};  // bit c % 32 of word c / 32: column c is a real key

  /// The mask of a block the producer flagged (rare: ragged border blocks, text padding, frame-straddling). kRuns:
  /// the query-run forward, whose key-run blocks (BlockInfo::kRows) have bi.h real rows.
  template <bool kRuns = false>
  static __device__ __forceinline__ KeyMask of(const FwdParams& p, const BlockInfo& bi, int32_t text_len, int lane) {
    KeyMask m;
    if (!(bi.flags & BlockInfo::kMasked)) return m;
    m.active = true;
    const bool rows = kRuns && (bi.flags & BlockInfo::kRows);
    if (rows || (bi.flags & BlockInfo::kText)) {
      const int32_t n = rows ? bi.h : text_len - bi.t;  // columns [0, n) are valid keys
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int32_t k = n - 32 * j;
        m.valid[j] = k >= 32 ? ~0u : (k <= 0 ? 0u : (1u << k) - 1);
      }
      return m;
    }
    m.frames = (bi.flags & BlockInfo::kFrames) != 0;
    const D3 L = p.map.grid.latent, b = p.cls[bi.tile_class()].box;
    const int32_t hw = b.h * b.w, volume = b.t * hw;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int32_t c = 32 * j + lane;
      const int32_t kt = bi.t + c / hw, kh = bi.h + (c / b.w) % b.h, kw = bi.w + c % b.w;
      m.valid[j] = __ballot_sync(0xffffffffu, c < volume && kt < L.t && kh < L.h && kw < L.w);
    }
    return m;
  }

  /// Sets the scores of columns that are not real keys to -inf (a select, so stale bits never leak).
  __device__ __forceinline__ void apply(float (&sc)[kBlockN / 2], int lane) const {
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) {
      // Word c / 32 = i / 16 is known at compile time.
      const int c = accumulator_column(i, lane);
      if (!((valid[i / 16] >> (c % 32)) & 1u)) sc[i] = -INFINITY;
    }
  }
};

/// The token-level frame rule on a masked attention-tile block (rare: only tt > 1 tiles straddling |fq-fk|=r):
/// query rows of `item` (row(rr) gives this thread's two rows) against the key block `bi`.
template <class RowOf>
__device__ __forceinline__ void mask_frames(float (&sc)[kBlockN / 2], const FwdParams& p, const WorkItem& item,
                                            const BlockInfo& bi, int lane, RowOf&& row) {
  const HeadParams& hp = p.heads[item.head];
  const int32_t g = static_cast<int32_t>(hp.global_frames), r = static_cast<int32_t>(hp.radius);
  const D3 qb = item.q.box(p), kb = p.cls[bi.tile_class()].box;
  const int32_t q_hw = qb.h * qb.w, k_hw = kb.h * kb.w, qt0 = item.q.origin(p).t;
#pragma unroll
  for (int i = 0; i < kBlockN / 2; ++i) {
    const int c = accumulator_column(i, lane);
    if (!frame_pair_allowed<int32_t>(qt0 + row((i % 4) / 2) / q_hw, bi.t + c / k_hw, g, r)) sc[i] = -INFINITY;
  }
}

}  // namespace tilewise::hopper
