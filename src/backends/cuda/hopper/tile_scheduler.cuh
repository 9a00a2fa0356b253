// Tile scheduler and block enumeration: which query block a work item is, and the sequence of key blocks it
// visits. Only the producer thread walks the key blocks; it describes each one to the consumers in a 16-byte
// BlockInfo beside the stage, so the consumers' instruction stream stays free of pattern arithmetic.
//
// A block is a box of tokens inside one tile (the box of the tile's class, see TileClass), so every key block
// lies wholly inside or outside a query tile's window. Blocks of border tiles may hang over the latent's edge:
// TMA zero-fills those rows on load and clips them on store, and the consumers mask those keys.
#pragma once

#include "backends/cuda/hopper/params.cuh"
#include "backends/cuda/hopper/ptx.cuh"

namespace tilewise::hopper {

/// The class of tile c: the axes along which it is the latent's last, partial tile (see TileClass).
__device__ __forceinline__ int32_t tile_class(const FwdParams& p, D3 c) {
  const D3 n = p.map.grid.tiles;
  return ((c.t == n.t - 1 ? 4 : 0) | (c.h == n.h - 1 ? 2 : 0) | (c.w == n.w - 1 ? 1 : 0)) & p.partial_axes;
}

/// One block of tokens: video (box `sub` of tile `tile`, in the key or query box shape of the tile's class), text
/// (rows [row0, row0 + kBlockN), or + kBlockM for a query block), or a query run block (run(): raster video rows
/// [row0, row0 + kBlockM), all seeing the key tiles of `tile`; FwdRunParams::runs).
struct Block {
  bool text = false;
  bool query = false;  // a work item's query block (its class's qbox), not a key block (box)
  int32_t cls = 0;  // tile class (video)
  D3 tile{};
  D3 sub{};
  int32_t row0 = 0;

  // A run block is marked by sub.t < 0 (it is no sub-block of its tile) rather than by a member of its own: the
  // other kernels keep Block's layout, and with it their machine code (their producers hold blocks in local memory).
  // A text block is never one (the key cursors set only text and row0 for it, leaving sub as it was).
  static constexpr int32_t kRunSub = -1;
  __device__ __forceinline__ bool run() const { return !text && sub.t < 0; }
  __device__ __forceinline__ const D3& box(const FwdParams& p) const {
    return query ? p.cls[cls].qbox : p.cls[cls].box;
  }
  __device__ __forceinline__ D3 origin(const FwdParams& p) const {  // semantic (t, h, w) of the first token
    const D3 o = p.map.grid.tile_origin(tile), b = box(p);
    return {o.t + sub.t * b.t, o.h + sub.h * b.h, o.w + sub.w * b.w};
  }
  /// TMA coordinates (w, h, t) of the box in the physical view: the latent itself for raster order, or
  /// (tiles * tt, th, tw) for tiled order (whole tiles only), where tile i is rows [i * tt, (i + 1) * tt).
  __device__ __forceinline__ D3 tma_origin(const FwdParams& p) const {
    if (p.map.order == TokenOrder::raster) return origin(p);
    const D3 b = box(p);
    return {p.map.grid.tile_index(tile) * p.map.grid.tile.t + sub.t * b.t, sub.h * b.h, sub.w * b.w};
  }
  /// Whether some of a key block's rows are not real tokens (beyond the latent or beyond the box volume).
  __device__ __forceinline__ bool ragged(const FwdParams& p) const {
    if (text) return false;
    const D3 o = origin(p), L = p.map.grid.latent, b = box(p);
    return b.volume() < kBlockN || o.t + b.t > L.t || o.h + b.h > L.h || o.w + b.w > L.w;
  }
};

/// Index of key block `b` among the key blocks of one (batch, head), as the pre-passes store per-block data (the
/// backward's row statistics, the FP8 forward's V^T): `slots` entries per tile (the most key boxes any tile class
/// needs; a tile's sub-blocks in (t, h, w) order), then the text blocks of kRows rows (the blocks' rows: kBlockN,
/// or the dK/dV kernel's streamed rows, KernelTraits::kStreamRows).
template <int kRows = kBlockN>
__device__ __forceinline__ int32_t block_entry(const FwdParams& p, const Block& b, int32_t slots) {
  if (b.text) return p.map.grid.num_tiles() * slots + b.row0 / kRows;
  const D3 s = p.cls[b.cls].subs;
  return p.map.grid.tile_index(b.tile) * slots + (b.sub.t * s.h + b.sub.h) * s.w + b.sub.w;
}

/// The inverse of block_entry, row by row: the sequence position of row r (< kRows) of key block `entry`, or -1
/// when that row is no token (past the box's volume or the latent, a spare slot of a class with fewer blocks, past
/// the text capacity). Text padding rows are tokens here (whether a key is valid is text_len's business).
template <int kRows = kBlockN>
__device__ __forceinline__ int64_t block_row_position(const FwdParams& p, int32_t entry, int32_t slots, int32_t r) {
  const int32_t video_entries = p.map.grid.num_tiles() * slots;
  if (entry >= video_entries) {
    const int64_t row = int64_t{entry - video_entries} * kRows + r;
    return row < p.map.seq.text_capacity ? p.map.seq.text_offset() + row : -1;
  }
  Block blk;
  blk.tile = p.map.grid.tile_coord(entry / slots);
  blk.cls = tile_class(p, blk.tile);
  const D3 s = p.cls[blk.cls].subs, box = p.cls[blk.cls].box;
  const int32_t sub = entry % slots;
  blk.sub = {sub / (s.h * s.w), (sub / s.w) % s.h, sub % s.w};
  const D3 o = blk.origin(p), L = p.map.grid.latent;
  const D3 c{o.t + r / (box.h * box.w), o.h + (r / box.w) % box.h, o.w + r % box.w};
  const bool real = sub < s.volume() && r < box.volume() && c.t < L.t && c.h < L.h && c.w < L.w;
  return real ? p.map.video_position(c) : -1;
}

/// Rows of a query block that can be real tokens: rows past them are neither loaded nor stored (rows inside the
/// box but outside the latent are, and are clipped by TMA).
template <int kBlockM, bool kRuns = false>
__device__ __forceinline__ int32_t query_rows(const FwdParams& p, const Block& q) {
  if (kRuns && q.run()) return kBlockM;
  if (!q.text) return q.box(p).volume();
  const int32_t left = static_cast<int32_t>(p.map.seq.text_capacity) - q.row0;
  return left < kBlockM ? left : kBlockM;
}

struct WorkItem {
  int32_t batch = 0;  // index within this launch
  int32_t head = 0;   // local query head
  Block q;
  bool empty = false;  // a spare slot of a tile whose class needs fewer blocks: nothing to do
};

/// Work items are ordered text query blocks first (they see every key, so they are the longest), then video
/// query blocks; within each, batch outer, then (head, tile) in p.video_order's order when kOrdered, else head
/// then tiles in raster order, the blocks of a tile inner, so that concurrently running CTAs share their key
/// tiles in L2. A query block has kBlockM rows.
/// `heads`: the heads of the items (the backward's dK/dV items are per kv head), q_heads for the forward.
/// kOrdered: the video items follow p.video_order (heaviest first; the dK/dV kernels), a compile-time choice so
/// that the other kernels keep their code as it was; kRuns likewise: the video items may be run blocks (p.runs).
template <int kBlockM, bool kOrdered = false, bool kRuns = false>
__device__ __forceinline__ WorkItem decode_work(const FwdParams& p, int32_t w, int32_t heads) {
  WorkItem it;
  it.q.query = true;
  const int32_t text_total = p.batch * heads * p.text_items;
  if (w < text_total) {
    it.batch = w / (heads * p.text_items);
    it.head = (w / p.text_items) % heads;
    it.q.text = true;
    it.q.row0 = (w % p.text_items) * kBlockM;
    return it;
  }
  w -= text_total;
  it.batch = w / (heads * p.video_items);
  it.head = (w / p.video_items) % heads;
  int32_t index = w % p.video_items;
  if constexpr (kRuns) {
    if (const int32_t* runs = with_runs(p).runs; runs != nullptr) {  // a run block: its rows, the tile of its keys
      it.q.sub = {Block::kRunSub, 0, 0};
      it.q.row0 = runs[2 * index];
      it.q.tile = p.map.grid.tile_coord(runs[2 * index + 1]);
      it.q.cls = tile_class(p, it.q.tile);
      return it;
    }
  }
  if constexpr (kOrdered) {
    if (p.video_order) {  // the (head, tile) at this rank of the heaviest-first order; a tile's blocks stay together
      const int32_t tiles = p.map.grid.num_tiles();
      const int32_t e = p.video_order[it.head * tiles + index / p.slots_per_tile];
      it.head = e / tiles;
      index = e % tiles * p.slots_per_tile + index % p.slots_per_tile;
    }
  }
  it.q.tile = p.map.grid.tile_coord(index / p.slots_per_tile);
  it.q.cls = tile_class(p, it.q.tile);
  const int32_t r = index % p.slots_per_tile;
  const D3 s = p.cls[it.q.cls].qsubs;
  it.q.sub = {r / (s.h * s.w), (r / s.w) % s.h, r % s.w};
  it.empty = r >= s.volume();  // a class with fewer blocks than the most any class needs
  return it;
}
template <int kBlockM, bool kRuns = false>
__device__ __forceinline__ WorkItem decode_work(const FwdParams& p, int32_t w) {
  return decode_work<kBlockM, false, kRuns>(p, w, p.q_heads);
}

/// One scheduled unit of work for one CTA of a cluster: its item (possibly empty), and whether every CTA of the
/// cluster walks the same key blocks in this unit, so that each K and V block is loaded once and multicast.
struct UnitWork {
  WorkItem item;
  bool shared = false;
};

/// Whether two items visit the same key blocks in the same order (see KeyBlockCursor): one batch (text length)
/// and head (window), and both text rows or both query blocks of one tile.
__device__ __forceinline__ bool same_key_blocks(const WorkItem& a, const WorkItem& b) {
  return a.batch == b.batch && a.head == b.head && a.q.text == b.q.text && (a.q.text || a.q.tile == b.q.tile);
}

/// Unit u is work items [kCluster u, kCluster u + kCluster): consecutive items, so the query blocks of one tile
/// mostly land in one unit (decode_work's order).
template <int kCluster>
__device__ __forceinline__ int32_t num_units(const FwdParams& p) {
  return (p.num_work + kCluster - 1) / kCluster;
}
template <int kCluster, int kBlockM, bool kRuns = false>
__device__ __forceinline__ UnitWork decode_unit(const FwdParams& p, int32_t u, uint32_t rank) {
  if constexpr (kCluster == 1) {
    return {decode_work<kBlockM, kRuns>(p, u), false};
  } else {
    WorkItem none;
    none.empty = true;
    const int32_t w = kCluster * u;
    const WorkItem a = decode_work<kBlockM, kRuns>(p, w),
                   b = w + 1 < p.num_work ? decode_work<kBlockM, kRuns>(p, w + 1) : none;
    return {rank == 0 ? a : b, !a.empty && !b.empty && same_key_blocks(a, b)};
  }
}

/// Units of clusters whose CTAs share a tile (the backward's reduce kernel in clusters, BwdKernel in
/// bwd_params.cuh): unit u is one (batch, head) and either one tile, whose owned slot `rank` is this CTA's item
/// (p.slots_per_tile == kCluster, which the host checks), or kCluster consecutive text blocks, block kCluster j +
/// rank being this CTA's. All CTAs of a unit stream the same blocks, so each is read once and multicast; an item
/// past the tile's boxes or the text is empty, but keeps the unit's (batch, head, tile), and its CTA still takes
/// part in the stream. Units follow decode_work's order (text first, then the tiles in p.video_order's).
template <int kCluster>
__device__ __forceinline__ int32_t text_units(const FwdParams& p) {
  return (p.text_items + kCluster - 1) / kCluster;
}
template <int kCluster>
__device__ __forceinline__ int32_t num_tile_units(const FwdParams& p, int32_t heads) {
  return p.batch * heads * (text_units<kCluster>(p) + p.map.grid.num_tiles());
}
template <int kCluster, int kBlockM, bool kOrdered>
__device__ __forceinline__ WorkItem decode_tile_unit(const FwdParams& p, int32_t u, uint32_t rank, int32_t heads) {
  const int32_t per_head = text_units<kCluster>(p), text_total = p.batch * heads * per_head;
  if (u >= text_total)  // a tile: its slot `rank`
    return decode_work<kBlockM, kOrdered>(
        p, p.batch * heads * p.text_items + kCluster * (u - text_total) + static_cast<int32_t>(rank), heads);
  const int32_t bh = u / per_head, j = kCluster * (u % per_head) + static_cast<int32_t>(rank);
  if (j < p.text_items) return decode_work<kBlockM, kOrdered>(p, bh * p.text_items + j, heads);
  WorkItem it;  // past the text
  it.batch = bh / heads, it.head = bh % heads;
  it.q.query = true, it.q.text = true, it.q.row0 = j * kBlockM;
  it.empty = true;
  return it;
}

/// The units a kernel's scheduler hands out, and this CTA's item of unit u: tile units (decode_tile_unit) in
/// clusters, work items (decode_work) otherwise.
template <int kCluster>
__device__ __forceinline__ int32_t scheduled_units(const FwdParams& p, int32_t heads) {
  return kCluster > 1 ? num_tile_units<kCluster>(p, heads) : p.num_work;
}
template <int kCluster, int kBlockM, bool kOrdered>
__device__ __forceinline__ WorkItem scheduled_item(const FwdParams& p, int32_t u, uint32_t rank, int32_t heads) {
  if constexpr (kCluster > 1)
    return decode_tile_unit<kCluster, kBlockM, kOrdered>(p, u, rank, heads);
  else
    return decode_work<kBlockM, kOrdered>(p, u, heads);
}

/// The rule by which every role (both loaders, the consumers) restarts its pipes at stage 0, so that all agree:
/// in a cluster, before a shared unit that follows an unshared one, whose CTAs walked different blocks and may
/// have left their rings at different stages. Called once per unit, empty items included.
template <int kCluster>
struct StageAlignment {
  bool aligned = true;  // the cluster's CTAs agree on stages: the last unit had them walk the same blocks
  __device__ __forceinline__ bool restart_before(const UnitWork& uw) {
    const bool restart = kCluster > 1 && uw.shared && !aligned;
    aligned = uw.shared;
    return restart;
  }
};

/// Dynamic scheduling: the producer thread of the cluster's first CTA takes the next unit index from a global
/// counter and hands it to every thread that needs it, in all CTAs of the cluster, through a two-slot ring in
/// shared memory, so heavy items (text rows, global frames) never leave CTAs idle at the end. The slot is free
/// again when every reader of the cluster has arrived on the first CTA's work_empty. An index >= the number of
/// units tells everyone to stop.
template <class Shared, int kCluster>
struct WorkRing {
  const Shared& s;
  uint32_t rank = 0;    // within the cluster
  uint32_t n = 0;       // units passed through the ring so far
  int32_t ahead = -1;   // producer: the next index, fetched one unit early so the atomic's latency is hidden

  __device__ __forceinline__ int32_t produce(int32_t* counter, int32_t units) {
    const int32_t w = ahead >= 0 ? ahead : atomicAdd(counter, 1);
    ahead = w < units ? atomicAdd(counter, 1) : w;  // in flight while this unit's loads are issued
    const uint32_t slot = n & 1;
    s.work_empty[slot].wait(((n >> 1) & 1) ^ 1);
    s.work[slot] = w;
#pragma unroll
    for (uint32_t peer = 1; peer < kCluster; ++peer) st_cluster(&s.work[slot], peer, w);
    s.work_full[slot].arrive();
#pragma unroll
    for (uint32_t peer = 1; peer < kCluster; ++peer) s.work_full[slot].arrive_remote_release(peer);
    ++n;
    return w;
  }
  __device__ __forceinline__ int32_t consume() {
    const uint32_t slot = n & 1;
    if constexpr (kCluster > 1)
      s.work_full[slot].wait_cluster((n >> 1) & 1);
    else
      s.work_full[slot].wait((n >> 1) & 1);
    const int32_t w = *static_cast<volatile int32_t*>(&s.work[slot]);
    if (kCluster == 1 || rank == 0)
      s.work_empty[slot].arrive();
    else
      s.work_empty[slot].arrive_remote_release(0);
    ++n;
    return w;
  }
};

__device__ __forceinline__ int32_t text_len_of(const FwdParams& p, int32_t batch) {
  return clamped_text_len(p.text_len, p.batch_base + batch, static_cast<int32_t>(p.map.seq.text_capacity));
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
  bi.flags |= static_cast<uint32_t>(kb.cls) << BlockInfo::kClassShift;
  bi.t = o.t, bi.h = o.h, bi.w = o.w;
  if (!item.q.text && p.kind == PatternKind::attention_tile &&
      block_kind<int32_t>(p.kind, p.heads[item.head], p.map.grid, item.q.tile, kb.tile) == BlockKind::masked)
    bi.flags |= BlockInfo::kFrames | BlockInfo::kMasked;
  if (kb.ragged(p)) bi.flags |= BlockInfo::kMasked;
  return bi;
}

/// The key blocks of one work item, in order: the video key tiles of the query's pattern (each split into its
/// live sub-blocks, the boxes of p.cls), then the valid text rows (`text_len`, from text_len_of) in blocks of kRows:
/// kBlockN, or the dK/dV kernel's streamed rows (KernelTraits::kStreamRows, with boxes of as many rows in p.cls).
/// A box's tiles are walked in raster order (t slowest, w fastest), or, with kWalkChoice where the parameters'
/// walk_width_slowest is set, w slowest and t fastest: the dK/dV kernels' walk under the sweep item order
/// (cuda::sweep_suits), where the key tiles in flight advance along w, so that the key columns that see a query
/// column visit it one after another. (The flag is read from the parameters where it is used: the loaders that walk
/// run at 24 registers.)
template <int kRows = kBlockN, bool kWalkChoice = false>
class KeyBlockCursorT {
 public:
  /// The forward's walk: the key blocks of query block `w`, then the valid text keys.
  __device__ __forceinline__ KeyBlockCursorT(const FwdParams& p, const WorkItem& w, int32_t text_len)
      : KeyBlockCursorT(p, text_len) {
    const Grid& g = p.map.grid;
    if (w.q.text || p.kind == PatternKind::dense) {
      start_boxes(all_tiles(g));
    } else if (p.kind == PatternKind::block_list) {
      const int32_t i = w.head * g.num_tiles() + g.tile_index(w.q.tile);
      start_list(p.block_tiles, p.block_offsets[i], p.block_offsets[i + 1]);
    } else {
      start_boxes(key_boxes<int32_t>(p.kind, p.heads[w.head], g, w.q.tile));
    }
  }
  /// Any walk (the backward streams query blocks through it): start with start_boxes or start_list; after the
  /// tiles come text rows [0, text_end) in blocks of kRows.
  __device__ __forceinline__ KeyBlockCursorT(const FwdParams& p, int32_t text_end) : p_(p), text_end_(text_end) {}

  static __device__ __forceinline__ KeyBoxesT<int32_t> all_tiles(const Grid& g) {
    KeyBoxesT<int32_t> b{};
    b.t0 = {0, g.tiles.t};
    b.h = {0, g.tiles.h};
    b.w = {0, g.tiles.w};
    return b;
  }
  /// Walks the tiles of `boxes`, each split into its live blocks.
  __device__ __forceinline__ void start_boxes(const KeyBoxesT<int32_t>& boxes) {
    boxes_ = boxes;
    tile_ = {boxes_.t0.begin, boxes_.h.begin, boxes_.w.begin};
    video_done_ = boxes_.num_tiles() == 0;
    next_tile();
  }
  /// Walks the tiles tiles[begin, end) of a CSR table, likewise.
  __device__ __forceinline__ void start_list(const int32_t* tiles, int64_t begin, int64_t end) {
    list_ = true;
    list_tiles_ = tiles;
    list_pos_ = static_cast<int32_t>(begin);
    list_end_ = static_cast<int32_t>(end);
    load_list_tile();
  }

  /// Whether the block last produced was the item's last (no look-ahead copy of a Block needed).
  __device__ __forceinline__ bool done() const { return video_done_ && text_row_ >= text_end_; }

  /// Produces the next block; false when done.
  __device__ __forceinline__ bool next(Block& b) {
    if (!video_done_) {
      b.text = false;
      b.cls = cls_;
      b.tile = tile_;
      b.sub = sub_;
      advance_video();
      return true;
    }
    if (text_row_ < text_end_) {
      b.text = true;
      b.row0 = text_row_;
      text_row_ += kRows;
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
    tile_ = p_.map.grid.tile_coord(list_tiles_[list_pos_]);
    next_tile();
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
    if (kWalkChoice && p_.walk_width_slowest) {
      if (++tile_.t < (range_ == 0 ? boxes_.t0.end : boxes_.t1.end)) return next_tile();
      if (range_ == 0 && boxes_.num_t == 2) {
        range_ = 1;
        tile_.t = boxes_.t1.begin;
        return next_tile();
      }
      range_ = 0;
      tile_.t = boxes_.t0.begin;
      if (++tile_.h < boxes_.h.end) return next_tile();
      tile_.h = boxes_.h.begin;
      if (++tile_.w < boxes_.w.end) return next_tile();
      video_done_ = true;
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
  __device__ __forceinline__ void next_tile() {
    cls_ = tile_class(p_, tile_);
    live_ = p_.cls[cls_].subs;
  }

  const FwdParams& p_;
  KeyBoxesT<int32_t> boxes_{};
  bool list_ = false;
  const int32_t* list_tiles_ = nullptr;
  int32_t list_pos_ = 0, list_end_ = 0;
  int32_t range_ = 0;
  D3 tile_{}, sub_{0, 0, 0}, live_{1, 1, 1};
  int32_t cls_ = 0;
  bool video_done_ = false;
  int32_t text_row_ = 0, text_end_ = 0;
};
using KeyBlockCursor = KeyBlockCursorT<>;

}  // namespace tilewise::hopper
