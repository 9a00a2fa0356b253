// The semantics core, part 2: which video keys a video query sees, per head.
//
// A pattern answers at two levels:
//  * tile level: the key tiles of a query tile, as up to two boxes of the tile grid (KeyBoxes), and for each
//    (query tile, key tile) block whether it is fully allowed or needs an element mask (BlockKind);
//  * token level: video_pair_allowed(), the spec's formula, used only inside blocks that need a mask.
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
/// range along h and one along w.
struct KeyBoxes {
  int32_t num_t = 1;
  AxisRange t[2];
  AxisRange h, w;

  TW_HD constexpr int64_t num_tiles() const {
    int64_t nt = 0;
    for (int i = 0; i < num_t; ++i) nt += t[i].size();
    return nt * h.size() * w.size();
  }
  TW_HD constexpr bool contains(Dim3 c) const {
    bool in_t = false;
    for (int i = 0; i < num_t; ++i) in_t = in_t || t[i].contains(c.t);
    return in_t && h.contains(c.h) && w.contains(c.w);
  }
};

/// Frames [lo, hi] (inclusive) covered by tile coordinate c along t.
TW_HD constexpr AxisRange frames_of_tile(const TileGrid& g, int64_t c) {
  return {c * g.tile.t, min64((c + 1) * g.tile.t, g.latent.t)};
}

/// Attention tile, frame level: may a query in frame fq see a key in frame fk?
TW_HD constexpr bool frame_pair_allowed(int64_t fq, int64_t fk, int64_t g, int64_t r) {
  const int64_t d = fq > fk ? fq - fk : fk - fq;
  return fq < g || fk < g || d <= r;
}

/// Token level: may video query token q see video key token k under this head's pattern (spec formulas)?
/// Not defined for block lists (their allowed set is a table).
TW_HD constexpr bool video_pair_allowed(PatternKind kind, const HeadParams& p, const TileGrid& g, Dim3 q, Dim3 k) {
  switch (kind) {
    case PatternKind::sliding_tile: {
      const Dim3 cq = g.tile_of(q), ck = g.tile_of(k);
      return window_range(cq.t, p.window.t, g.tiles.t).contains(ck.t) &&
             window_range(cq.h, p.window.h, g.tiles.h).contains(ck.h) &&
             window_range(cq.w, p.window.w, g.tiles.w).contains(ck.w);
    }
    case PatternKind::attention_tile:
      return frame_pair_allowed(q.t, k.t, p.global_frames, p.radius);
    default:
      return true;
  }
}

/// Tile level: the key tiles of query tile `cq` (a superset of the tiles holding any allowed key; exact for
/// sliding tile and dense). Not defined for block lists.
TW_HD constexpr KeyBoxes key_boxes(PatternKind kind, const HeadParams& p, const TileGrid& g, Dim3 cq) {
  KeyBoxes b;
  b.h = {0, g.tiles.h};
  b.w = {0, g.tiles.w};
  b.t[0] = {0, g.tiles.t};
  if (kind == PatternKind::sliding_tile) {
    b.t[0] = window_range(cq.t, p.window.t, g.tiles.t);
    b.h = window_range(cq.h, p.window.h, g.tiles.h);
    b.w = window_range(cq.w, p.window.w, g.tiles.w);
  } else if (kind == PatternKind::attention_tile) {
    const AxisRange fq = frames_of_tile(g, cq.t);
    if (fq.begin < p.global_frames) return b;  // a global query frame sees every key
    // Key tiles holding a global frame, then the tiles of the local band [fq.begin - r, fq.end - 1 + r].
    const int64_t global_tiles = min64(ceil_div(p.global_frames, g.tile.t), g.tiles.t);
    const int64_t lo = max64(fq.begin - p.radius, 0) / g.tile.t;
    const int64_t hi = min64(ceil_div(fq.end + p.radius, g.tile.t), g.tiles.t);
    if (lo <= global_tiles) {
      b.t[0] = {0, max64(hi, global_tiles)};
    } else {
      b.num_t = global_tiles > 0 ? 2 : 1;
      b.t[0] = global_tiles > 0 ? AxisRange{0, global_tiles} : AxisRange{lo, hi};
      b.t[1] = {lo, hi};
    }
  }
  return b;
}

/// Whether a (query tile, key tile) block is wholly allowed, or needs the token-level mask (attention tile
/// with tt > 1 mixes allowed and forbidden frame pairs in one block). Key tiles outside key_boxes() are empty.
enum class BlockKind : int32_t { full = 0, masked = 1 };

TW_HD constexpr BlockKind block_kind(PatternKind kind, const HeadParams& p, const TileGrid& g, Dim3 cq, Dim3 ck) {
  if (kind != PatternKind::attention_tile) return BlockKind::full;
  // A forbidden pair needs fq >= g, fk >= g and |fq - fk| > r: look for the farthest such pair.
  const AxisRange fq = frames_of_tile(g, cq.t), fk = frames_of_tile(g, ck.t);
  const int64_t qlo = max64(fq.begin, p.global_frames), qhi = fq.end - 1;
  const int64_t klo = max64(fk.begin, p.global_frames), khi = fk.end - 1;
  if (qlo > qhi || klo > khi) return BlockKind::full;
  const int64_t far = max64(qhi - klo, khi - qlo);
  return far > p.radius ? BlockKind::masked : BlockKind::full;
}

}  // namespace tilewise
