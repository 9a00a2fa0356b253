// Key runs: the keys of a query run block (include/tilewise/query_runs.hpp) as 1-D blocks of raster video rows, where
// the run's key tiles span the tile grid's columns, so that each frame's keys are one contiguous range of whole
// token rows (and the frames' ranges one range when the rows are all of them). A range's last block is masked past
// its end, as a text block is past the text length; no block carries the cut tiles' padding. The query-run forward
// only (Traits::kQueryRuns, FwdRunParams::key_runs).
#pragma once

#include "backends/cuda/hopper/tile_scheduler.cuh"

namespace tilewise::hopper {

/// A key-run block: Block::run() with row0 its first raster row and sub.h its real rows (<= kBlockN).
__device__ __forceinline__ Block key_run_block(int32_t row0, int32_t rows) {
  Block b;
  b.sub = {Block::kRunSub, rows, 0};
  b.row0 = row0;
  return b;
}

/// The BlockInfo of a key-run block (its rows, masked past the range's end): BlockInfo::kRows, t = first row,
/// h = real rows.
__device__ __forceinline__ BlockInfo describe_key_run(const Block& kb, bool last) {
  BlockInfo bi{last ? BlockInfo::kLast : 0u, kb.row0, kb.sub.h, 0};
  bi.flags |= BlockInfo::kRows | (kb.sub.h < kBlockN ? BlockInfo::kMasked : 0u);
  return bi;
}

/// The forward's key walk of the query-run kernel: a run item's keys as key-run blocks (then the text keys, as
/// KeyBlockCursor walks them) when the plan has key runs (FwdRunParams::key_runs); KeyBlockCursor's walk otherwise.
class RunKeyBlockCursor {
 public:
  __device__ __forceinline__ RunKeyBlockCursor(const FwdParams& p, const WorkItem& w, int32_t text_len)
      : tiles_(tiles_walk(p, w, text_len, w.q.run() && with_runs(p).key_runs)),
        rows_(w.q.run() && with_runs(p).key_runs) {
    if (!rows_) return;
    const Grid& g = p.map.grid;
    const KeyBoxesT<int32_t> boxes = key_boxes<int32_t>(p.kind, p.heads[w.head], g, w.q.tile);  // (w: every column)
    frame_ = boxes.t0.begin * g.tile.t;
    frame_end_ = imin<int32_t>(boxes.t0.end * g.tile.t, g.latent.t);
    const int32_t row_begin = boxes.h.begin * g.tile.h, row_end = imin<int32_t>(boxes.h.end * g.tile.h, g.latent.h);
    frame_tokens_ = g.latent.h * g.latent.w;
    if (row_begin == 0 && row_end == g.latent.h) {  // whole frames: one range
      first_ = frame_ * frame_tokens_;
      length_ = (frame_end_ - frame_) * frame_tokens_;
      frame_ = frame_end_ - 1;
    } else {
      first_ = frame_ * frame_tokens_ + row_begin * g.latent.w;
      length_ = (row_end - row_begin) * g.latent.w;
    }
    pos_ = first_;
  }

  __device__ __forceinline__ bool done() const { return rows_ ? rows_done_ && tiles_.done() : tiles_.done(); }

  __device__ __forceinline__ bool next(Block& b) {
    // (with key runs the tiles' cursor has only text left; it sets text and row0 alone, and Block::run() is false
    // for text blocks, so a previous run block's mark left in sub does not matter)
    if (!rows_ || rows_done_) return tiles_.next(b);
    const int32_t end = first_ + length_;
    b = key_run_block(pos_, imin<int32_t>(kBlockN, end - pos_));
    pos_ += kBlockN;
    if (pos_ >= end) {  // the next frame's range, or the text
      if (++frame_ < frame_end_) {
        first_ += frame_tokens_;
        pos_ = first_;
      } else {
        rows_done_ = true;
      }
    }
    return true;
  }

 private:
  /// KeyBlockCursor's walk of `w`, or, with key runs, one of its text keys alone (no tiles).
  static __device__ __forceinline__ KeyBlockCursor tiles_walk(const FwdParams& p, const WorkItem& w, int32_t text_len,
                                                              bool rows) {
    if (!rows) return KeyBlockCursor(p, w, text_len);
    KeyBlockCursor text_only(p, text_len);
    text_only.start_boxes(KeyBoxesT<int32_t>{});
    return text_only;
  }

  KeyBlockCursor tiles_;  // the tiles' walk, or (with key runs) only its text blocks
  bool rows_ = false, rows_done_ = false;
  int32_t frame_ = 0, frame_end_ = 0, frame_tokens_ = 0, first_ = 0, length_ = 0, pos_ = 0;
};

}  // namespace tilewise::hopper
