// Which query heads stream blocks past an owned key block in the dK/dV kernels: the producer's walk
// (BwdProducer::for_each_stream_block) and the consumers (which may start a block's GEMMs before reading its record,
// BwdConsumer::dkdv_item) ask the same functions. And what an owned row is besides its position (OwnedRowsGeometry),
// for the record warp and the consumers without records alike.
#pragma once

#include "backends/cuda/hopper/bwd/bwd_params.cuh"
#include "backends/cuda/hopper/tile_scheduler.cuh"

namespace tilewise::hopper {

/// Whether query head h streams any block past the owned key block of `item`: always, except for a block list that
/// leaves the key tile unseen by h with no text.
__device__ __forceinline__ bool streams_head(const BwdParams& p, const WorkItem& item, int32_t h) {
  if (p.map.seq.text_capacity > 0 || item.q.text || p.kind != PatternKind::block_list) return true;
  const int32_t i = h * p.map.grid.num_tiles() + p.map.grid.tile_index(item.q.tile);
  return p.query_offsets[i + 1] > p.query_offsets[i];
}
/// The last index in the GQA group of `item` of a query head that streams a block, or -1 when none does (the item's
/// one record is then empty).
__device__ __forceinline__ int32_t last_streaming_head(const BwdParams& p, const WorkItem& item) {
  int32_t last = -1;
  for (int32_t gi = 0; gi < p.kv_group; ++gi)
    if (streams_head(p, item, item.head * p.kv_group + gi)) last = gi;
  return last;
}
__device__ __forceinline__ bool streams_any(const BwdParams& p, const WorkItem& item) {
  return last_streaming_head(p, item) >= 0;
}

/// An item's owned rows besides their positions: whether any query sees row r and its frame (the attention tile's
/// token-level mask). The producer's record warp (BwdProducer::row_records) and the consumers without records
/// (BwdConsumer::owned_rows) both ask it.
struct OwnedRowsGeometry {
  int32_t text_len;  // valid text rows of the item's batch element
  int32_t frame0;    // the owned box's first frame (0 for text)
  D3 box;
  __device__ __forceinline__ OwnedRowsGeometry(const BwdParams& p, const WorkItem& item)
      : text_len(text_len_of(p, item.batch)), frame0(item.q.text ? 0 : item.q.origin(p).t), box(item.q.box(p)) {}
  /// Rows that are not real tokens (pos < 0) and text keys past the valid length are seen by no query.
  __device__ __forceinline__ bool seen(const WorkItem& item, int r, int64_t pos) const {
    return pos >= 0 && (!item.q.text || item.q.row0 + r < text_len);
  }
  __device__ __forceinline__ int32_t frame(int r) const { return frame0 + r / (box.h * box.w); }
};

}  // namespace tilewise::hopper
