// Tile scheduler and block enumeration: which query block a work item is, and the sequence of key blocks it
// visits. Only the producer thread walks the key blocks; it describes each one to the consumers in a 16-byte
// BlockInfo beside the stage, so the consumers' instruction stream stays free of pattern arithmetic.
//
// A block is a box of `box` tokens inside one tile (box divides the tile), so every key block lies wholly
// inside or outside a query tile's window. Blocks of border tiles may hang over the latent's edge: TMA
// zero-fills those rows on load and clips them on store, and the consumers mask those keys.
#pragma once

#include "backends/cuda/hopper/params.cuh"

namespace tilewise::hopper {

/// Sub-blocks per tile along each axis, and how many of them hold tokens for tile c.
__device__ __forceinline__ D3 subs_per_tile(const FwdParams& p) {
  const D3 t = p.map.grid.tile;
  return {t.t / p.box.t, t.h / p.box.h, t.w / p.box.w};
}
__device__ __forceinline__ D3 live_subs(const FwdParams& p, D3 c) {
  const D3 e = p.map.grid.tile_extent(c);
  return {ceil_div(e.t, p.box.t), ceil_div(e.h, p.box.h), ceil_div(e.w, p.box.w)};
}

/// One block of tokens: video (a box inside tile `tile`, at sub-block `sub`) or text (rows [row0, row0+128)).
struct Block {
  bool text = false;
  D3 tile{};
  D3 sub{};
  int32_t row0 = 0;

  __device__ __forceinline__ D3 origin(const FwdParams& p) const {  // semantic (t, h, w) of the first token
    const D3 o = p.map.grid.tile_origin(tile);
    return {o.t + sub.t * p.box.t, o.h + sub.h * p.box.h, o.w + sub.w * p.box.w};
  }
  /// TMA coordinates (w, h, t) of the box in the physical view: the latent itself for raster order, or
  /// (tiles * tt, th, tw) for tiled order, where tile i is rows [i * tt, (i + 1) * tt).
  __device__ __forceinline__ D3 tma_origin(const FwdParams& p) const {
    if (p.map.order == TokenOrder::raster) return origin(p);
    return {p.map.grid.tile_index(tile) * p.map.grid.tile.t + sub.t * p.box.t, sub.h * p.box.h, sub.w * p.box.w};
  }
  /// Whether some of the block's rows are not real tokens (beyond the latent or beyond the box volume).
  __device__ __forceinline__ bool ragged(const FwdParams& p) const {
    if (text) return false;
    const D3 o = origin(p), L = p.map.grid.latent;
    return p.box.volume() < kBlockN || o.t + p.box.t > L.t || o.h + p.box.h > L.h || o.w + p.box.w > L.w;
  }
};

struct WorkItem {
  int32_t batch = 0;  // index within this launch
  int32_t head = 0;   // local query head
  Block q;
  bool empty = false;  // a sub-block wholly outside the latent: nothing to do
};

/// Work items are ordered text query blocks first (they see every key, so they are the longest), then video
/// query blocks; within each, (batch, head) outer and block inner so that concurrently running CTAs share
/// their key tiles in L2.
__device__ __forceinline__ WorkItem decode_work(const FwdParams& p, int32_t w) {
  WorkItem it;
  const int32_t text_total = p.batch * p.q_heads * p.text_items;
  if (w < text_total) {
    it.batch = w / (p.q_heads * p.text_items);
    it.head = (w / p.text_items) % p.q_heads;
    it.q.text = true;
    it.q.row0 = (w % p.text_items) * kBlockM;
    return it;
  }
  w -= text_total;
  it.batch = w / (p.q_heads * p.video_items);
  it.head = (w / p.video_items) % p.q_heads;
  const int32_t qb = w % p.video_items;
  const D3 s = subs_per_tile(p);
  const int32_t per_tile = s.volume();
  it.q.tile = p.map.grid.tile_coord(qb / per_tile);
  const int32_t r = qb % per_tile;
  it.q.sub = {r / (s.h * s.w), (r / s.w) % s.h, r % s.w};
  const D3 live = live_subs(p, it.q.tile);
  it.empty = it.q.sub.t >= live.t || it.q.sub.h >= live.h || it.q.sub.w >= live.w;
  return it;
}

/// Dynamic scheduling: the producer thread takes the next work index from a global counter and hands it to
/// the consumers through a two-slot ring in shared memory, so heavy items (text rows, global frames) never
/// leave CTAs idle at the end. An index >= num_work tells everyone to stop.
template <class Shared>
struct WorkRing {
  const Shared& s;
  uint32_t n = 0;       // items passed through the ring so far
  int32_t ahead = -1;   // producer: the next index, fetched one item early so the atomic's latency is hidden

  __device__ __forceinline__ int32_t produce(int32_t* counter, int32_t num_work) {
    const int32_t w = ahead >= 0 ? ahead : atomicAdd(counter, 1);
    ahead = w < num_work ? atomicAdd(counter, 1) : w;  // in flight while this item's loads are issued
    const uint32_t slot = n & 1;
    s.work_empty[slot].wait(((n >> 1) & 1) ^ 1);
    s.work[slot] = w;
    s.work_full[slot].arrive();
    ++n;
    return w;
  }
  __device__ __forceinline__ int32_t consume() {
    const uint32_t slot = n & 1;
    s.work_full[slot].wait((n >> 1) & 1);
    const int32_t w = *static_cast<volatile int32_t*>(&s.work[slot]);
    s.work_empty[slot].arrive();
    ++n;
    return w;
  }
};

__device__ __forceinline__ int32_t text_len_of(const FwdParams& p, int32_t batch) {
  const int32_t cap = static_cast<int32_t>(p.map.seq.text_capacity);
  if (p.text_len == nullptr) return cap;
  const int32_t L = p.text_len[p.batch_base + batch];
  return L < 0 ? 0 : (L > cap ? cap : L);  // out-of-range lengths are clamped (no host sync to check them)
}

/// The consumers' view of key block `kb` of `item`: whether it is the last, and whether (and why) it needs a mask.
__device__ __forceinline__ BlockInfo describe(const FwdParams& p, const WorkItem& item, const Block& kb,
                                              int32_t text_len, bool last) {
  BlockInfo bi{last ? BlockInfo::kLast : 0u, 0, 0, 0};
  if (kb.text) {
    bi.flags |= BlockInfo::kText | (kb.row0 + kBlockN > text_len ? BlockInfo::kMasked : 0u);
    bi.t = kb.row0;
    return bi;
  }
  const D3 o = kb.origin(p);
  bi.t = o.t, bi.h = o.h, bi.w = o.w;
  if (!item.q.text && p.kind == PatternKind::attention_tile &&
      block_kind<int32_t>(p.kind, p.heads[item.head], p.map.grid, item.q.tile, kb.tile) == BlockKind::masked)
    bi.flags |= BlockInfo::kFrames | BlockInfo::kMasked;
  if (kb.ragged(p)) bi.flags |= BlockInfo::kMasked;
  return bi;
}

/// The key blocks of one work item, in order: the video key tiles of the query's pattern (each split into its
/// live sub-blocks), then the valid text rows (`text_len`, from text_len_of) in blocks of kBlockN.
class KeyBlockCursor {
 public:
  __device__ __forceinline__ KeyBlockCursor(const FwdParams& p, const WorkItem& w, int32_t text_len) : p_(p) {
    const Grid& g = p.map.grid;
    text_end_ = text_len;
    if (w.q.text || p.kind == PatternKind::dense) {
      boxes_ = KeyBoxesT<int32_t>{};
      boxes_.t0 = {0, g.tiles.t};
      boxes_.h = {0, g.tiles.h};
      boxes_.w = {0, g.tiles.w};
    } else if (p.kind == PatternKind::block_list) {
      const int32_t i = w.head * g.num_tiles() + g.tile_index(w.q.tile);
      list_ = true;
      list_pos_ = p.block_offsets[i];
      list_end_ = p.block_offsets[i + 1];
    } else {
      boxes_ = key_boxes<int32_t>(p.kind, p.heads[w.head], g, w.q.tile);
    }
    if (list_) {
      load_list_tile();
    } else {
      tile_ = {boxes_.t0.begin, boxes_.h.begin, boxes_.w.begin};
      video_done_ = boxes_.num_tiles() == 0;
      live_ = live_subs(p, tile_);
    }
  }

  /// Produces the next block; false when done.
  __device__ __forceinline__ bool next(Block& b) {
    if (!video_done_) {
      b.text = false;
      b.tile = tile_;
      b.sub = sub_;
      advance_video();
      return true;
    }
    if (text_row_ < text_end_) {
      b.text = true;
      b.row0 = text_row_;
      text_row_ += kBlockN;
      return true;
    }
    return false;
  }

 private:
  __device__ __forceinline__ void load_list_tile() {
    if (list_pos_ >= list_end_) {
      video_done_ = true;
      return;
    }
    tile_ = p_.map.grid.tile_coord(p_.block_tiles[list_pos_]);
    live_ = live_subs(p_, tile_);
    sub_ = {0, 0, 0};
  }

  // Next live sub-block of the current tile, else the first of the next key tile. The boxes are walked
  // incrementally rather than through KeyBoxes::tile(i): its divisions per key tile cost ~6% on the dense
  // (whole-grid) row when measured (docs/performance.md, v2.1 review).
  __device__ __forceinline__ void advance_video() {
    if (++sub_.w < live_.w) return;
    sub_.w = 0;
    if (++sub_.h < live_.h) return;
    sub_.h = 0;
    if (++sub_.t < live_.t) return;
    sub_.t = 0;
    if (list_) {
      ++list_pos_;
      load_list_tile();
      return;
    }
    if (++tile_.w < boxes_.w.end) return next_tile();
    tile_.w = boxes_.w.begin;
    if (++tile_.h < boxes_.h.end) return next_tile();
    tile_.h = boxes_.h.begin;
    if (++tile_.t < (range_ == 0 ? boxes_.t0.end : boxes_.t1.end)) return next_tile();
    if (range_ == 0 && boxes_.num_t == 2) {
      range_ = 1;
      tile_.t = boxes_.t1.begin;
      return next_tile();
    }
    video_done_ = true;
  }
  __device__ __forceinline__ void next_tile() { live_ = live_subs(p_, tile_); }

  const FwdParams& p_;
  KeyBoxesT<int32_t> boxes_{};
  bool list_ = false;
  int32_t list_pos_ = 0, list_end_ = 0;
  int32_t range_ = 0;
  D3 tile_{}, sub_{0, 0, 0}, live_{1, 1, 1};
  bool video_done_ = false;
  int32_t text_row_ = 0, text_end_ = 0;
};

}  // namespace tilewise::hopper
