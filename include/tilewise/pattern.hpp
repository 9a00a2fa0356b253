// The semantics core, part 2: which video keys a video query sees, per head.
//
// A pattern answers at two levels:
//  * tile level: the key tiles of a query tile, as up to two boxes of the tile grid (KeyBoxes), and for each
//    (query tile, key tile) block whether it is fully allowed or needs an element mask (BlockKind);
//  * token level: video_pair_allowed(), the spec's formula, used only inside blocks that need a mask;
//  * the reverse question for the backward: the query tiles that see a key tile (query_boxes).
// Header-only and host/device, like geometry.hpp. Explicit block lists are tables, handled by the Plan.
#pragma once

#include "tilewise/geometry.hpp"

namespace tilewise {

enum class PatternKind : int32_t { dense = 0, sliding_tile = 1, attention_tile = 2, block_list = 3 };

/// Pattern parameters of one head (plain data, copied to the device as a table indexed by global head).
struct HeadParams {
  Dim3 window{1, 1, 1};       // sliding tile: (kt, kh, kw) in tiles, each >= 1
  int64_t global_frames = 0;  // attention tile: g
  int64_t radius = 0;         // attention tile: r
};

/// The key tiles of one query tile: `num_t` ranges along t (1 or 2, disjoint, ascending) crossed with one
/// range along h and one along w. (Two named ranges rather than an array: kernels must not index at run time.)
template <class I>
struct KeyBoxesT {
  int32_t num_t = 1;
  AxisRangeT<I> t0, t1;  // t1 only when num_t == 2
  AxisRangeT<I> h, w;

  friend constexpr bool operator==(const KeyBoxesT&, const KeyBoxesT&) = default;

  TW_HD constexpr I num_tiles() const { return (t0.size() + (num_t == 2 ? t1.size() : 0)) * h.size() * w.size(); }
  TW_HD constexpr bool contains(Dim3T<I> c) const {
    return (t0.contains(c.t) || (num_t == 2 && t1.contains(c.t))) && h.contains(c.h) && w.contains(c.w);
  }
  /// The i-th key tile (0 <= i < num_tiles()), in ascending raster order of the tile grid.
  TW_HD constexpr Dim3T<I> tile(I i) const {
    const I it = i / (h.size() * w.size());
    return {it < t0.size() ? t0.begin + it : t1.begin + (it - t0.size()), h.begin + (i / w.size()) % h.size(),
            w.begin + i % w.size()};
  }
};
using KeyBoxes = KeyBoxesT<int64_t>;

/// Frames [begin, end) covered by tile coordinate c along t (the last tile may hold fewer frames).
template <class I>
TW_HD constexpr AxisRangeT<I> frames_of_tile(const TileGridT<I>& g, I c) {
  return {c * g.tile.t, imin<I>((c + 1) * g.tile.t, g.latent.t)};
}

/// Attention tile, frame level: may a query in frame fq see a key in frame fk?
template <class I>
TW_HD constexpr bool frame_pair_allowed(I fq, Same<I> fk, Same<I> g, Same<I> r) {
  const I d = fq > fk ? fq - fk : fk - fq;
  return fq < g || fk < g || d <= r;
}

/// Token level: may video query token q see video key token k under this head's pattern (spec formulas)?
/// Not defined for block lists (their allowed set is a table).
template <class I>
TW_HD constexpr bool video_pair_allowed(PatternKind kind, const HeadParams& p, const TileGridT<I>& g, Dim3T<I> q,
                                        Dim3T<I> k) {
  switch (kind) {
    case PatternKind::sliding_tile: {
      const Dim3T<I> cq = g.tile_of(q), ck = g.tile_of(k);
      return window_range<I>(cq.t, static_cast<I>(p.window.t), g.tiles.t).contains(ck.t) &&
             window_range<I>(cq.h, static_cast<I>(p.window.h), g.tiles.h).contains(ck.h) &&
             window_range<I>(cq.w, static_cast<I>(p.window.w), g.tiles.w).contains(ck.w);
    }
    case PatternKind::attention_tile:
      return frame_pair_allowed<I>(q.t, k.t, static_cast<I>(p.global_frames), static_cast<I>(p.radius));
    default:
      return true;
  }
}

/// Tile level: the key tiles of query tile `cq` (a superset of the tiles holding any allowed key; exact for
/// sliding tile and dense). Not defined for block lists.
template <class I>
TW_HD constexpr KeyBoxesT<I> key_boxes(PatternKind kind, const HeadParams& p, const TileGridT<I>& g, Dim3T<I> cq) {
  KeyBoxesT<I> b;
  b.t0 = {0, g.tiles.t};
  b.h = {0, g.tiles.h};
  b.w = {0, g.tiles.w};
  if (kind == PatternKind::sliding_tile) {
    b.t0 = window_range<I>(cq.t, static_cast<I>(p.window.t), g.tiles.t);
    b.h = window_range<I>(cq.h, static_cast<I>(p.window.h), g.tiles.h);
    b.w = window_range<I>(cq.w, static_cast<I>(p.window.w), g.tiles.w);
  } else if (kind == PatternKind::attention_tile) {
    const I gf = static_cast<I>(p.global_frames), r = static_cast<I>(p.radius);
    const AxisRangeT<I> fq = frames_of_tile<I>(g, cq.t);
    if (fq.begin < gf) return b;  // a global query frame sees every key
    // Key tiles holding a global frame, then the tiles of the local band [fq.begin - r, fq.end - 1 + r].
    const I global_tiles = imin<I>(ceil_div<I>(gf, g.tile.t), g.tiles.t);
    const I lo = imax<I>(fq.begin - r, 0) / g.tile.t;
    const I hi = imin<I>(ceil_div<I>(fq.end + r, g.tile.t), g.tiles.t);
    if (lo <= global_tiles) {
      b.t0 = {0, imax<I>(hi, global_tiles)};
    } else if (global_tiles > 0) {
      b.num_t = 2;
      b.t0 = {0, global_tiles};
      b.t1 = {lo, hi};
    } else {
      b.t0 = {lo, hi};
    }
  }
  return b;
}

/// The reverse of window_range: the query tiles along an axis of `n` tiles whose window of `k` tiles contains key
/// tile `c`. Since a window's start is non-decreasing in the query coordinate, they form one range. Not symmetric
/// at the borders: with n = 10, k = 5 key tile 0 is seen by query tiles [0, 3) and key tile 2 by [0, 5).
template <class I>
TW_HD constexpr AxisRangeT<I> window_range_reverse(I c, Same<I> k, Same<I> n) {
  if (k >= n) return {0, n};
  // start(q) = clamp(q - k/2, 0, n - k). q sees c iff start(q) <= c and start(q) + k > c.
  const I hi = c >= n - k ? n : imin<I>(n, c + k / 2 + 1);  // start(q) <= c
  const I lo = c - k + 1 <= 0 ? 0 : c - k + 1 + k / 2;       // start(q) >= c - k + 1
  return {lo, hi};
}

/// Tile level, reverse question: the query tiles whose key_boxes() contain key tile `ck` (the backward walks them
/// per key tile). Exact for sliding tile and dense; for attention tile the frame rule is symmetric in (fq, fk), so
/// the same boxes as key_boxes() of `ck`, and block_kind() of each pair still says which blocks need the mask.
/// Not defined for block lists (the Plan transposes their table).
template <class I>
TW_HD constexpr KeyBoxesT<I> query_boxes(PatternKind kind, const HeadParams& p, const TileGridT<I>& g, Dim3T<I> ck) {
  if (kind != PatternKind::sliding_tile) return key_boxes<I>(kind, p, g, ck);
  KeyBoxesT<I> b;
  b.t0 = window_range_reverse<I>(ck.t, static_cast<I>(p.window.t), g.tiles.t);
  b.h = window_range_reverse<I>(ck.h, static_cast<I>(p.window.h), g.tiles.h);
  b.w = window_range_reverse<I>(ck.w, static_cast<I>(p.window.w), g.tiles.w);
  return b;
}

/// Whether a (query tile, key tile) block is wholly allowed, or needs the token-level mask (attention tile
/// with tt > 1 mixes allowed and forbidden frame pairs in one block). Only meaningful for key tiles inside
/// key_boxes(); the others are empty.
enum class BlockKind : int32_t { full = 0, masked = 1 };

template <class I>
TW_HD constexpr BlockKind block_kind(PatternKind kind, const HeadParams& p, const TileGridT<I>& g, Dim3T<I> cq,
                                     Dim3T<I> ck) {
  if (kind != PatternKind::attention_tile) return BlockKind::full;
  // A forbidden pair needs fq >= g, fk >= g and |fq - fk| > r: look for the farthest such pair.
  const I gf = static_cast<I>(p.global_frames);
  const AxisRangeT<I> fq = frames_of_tile<I>(g, cq.t), fk = frames_of_tile<I>(g, ck.t);
  const I qlo = imax<I>(fq.begin, gf), qhi = fq.end - 1;
  const I klo = imax<I>(fk.begin, gf), khi = fk.end - 1;
  if (qlo > qhi || klo > khi) return BlockKind::full;
  const I far = imax<I>(qhi - klo, khi - qlo);
  return far > static_cast<I>(p.radius) ? BlockKind::masked : BlockKind::full;
}

}  // namespace tilewise
