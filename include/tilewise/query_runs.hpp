// Query runs: maximal ranges of consecutive video tokens (raster order) that see the same keys. Where a pattern's
// window spans a whole axis of the tile grid, whole token rows share their keys, and query blocks cut from a run
// (1-D row ranges, as text blocks are) carry no padding where the tiles' boxes do: CogVideoX's 1x8x16 tiles on
// 13x30x45 fill 12 blocks of 128 rows per frame with 1350 tokens, its two runs per frame (720 and 630 tokens) 11
// (docs/performance.md, "Query runs"). The Hopper forward takes run blocks where they are fewer (hopper_backend.cu,
// forward_run_blocks); the backward and the FP8 forward keep the tiles' blocks.
#pragma once

#include <cstdint>
#include <vector>

#include "tilewise/geometry.hpp"
#include "tilewise/pattern.hpp"

namespace tilewise {

/// Video tokens [begin, end) in raster order (indices into the latent, not sequence positions), all of whose
/// tiles see the key tiles of `tile` (the first token's tile, which stands for the run in a kernel's key walk).
struct QueryRun {
  int64_t begin = 0, end = 0;
  Dim3 tile{};
  int64_t size() const { return end - begin; }
};

namespace detail {
/// What decides a video query token's keys under `kind`: its tile's key tiles, and, for the attention tile (whose
/// token-level rule is per frame, and whose tiles may hold several frames), the frame's allowed key frames.
/// Two tokens with equal signatures see the same keys (video_pair_allowed), and a kernel may walk either's tile.
struct RunSignature {
  KeyBoxes boxes;
  std::vector<bool> frames;  // attention tile: the key frames the query frame may see; empty otherwise
  bool operator==(const RunSignature&) const = default;  // (key_boxes leaves t1 empty when num_t is 1)
};

inline RunSignature run_signature(PatternKind kind, const HeadParams& p, const TileGrid& g, Dim3 token) {
  RunSignature s;
  s.boxes = key_boxes(kind, p, g, g.tile_of(token));
  if (kind == PatternKind::attention_tile) {
    s.frames.resize(static_cast<size_t>(g.latent.t));
    for (int64_t fk = 0; fk < g.latent.t; ++fk)
      s.frames[static_cast<size_t>(fk)] = frame_pair_allowed(token.t, fk, p.global_frames, p.radius);
  }
  return s;
}
}  // namespace detail

/// The query runs of one head's pattern, in raster order, covering the latent. Not defined for block lists (their
/// key sets are a table per tile; the Plan would compare the table's rows instead).
inline std::vector<QueryRun> query_runs(PatternKind kind, const HeadParams& p, const TileGrid& g) {
  std::vector<QueryRun> runs;
  detail::RunSignature current;
  // A token row changes tile every g.tile.w tokens along w: compare once per (frame, row, tile column) segment.
  for (int64_t t = 0; t < g.latent.t; ++t)
    for (int64_t h = 0; h < g.latent.h; ++h)
      for (int64_t cw = 0; cw < g.tiles.w; ++cw) {
        const Dim3 first{t, h, cw * g.tile.w};
        const int64_t begin = g.raster_index(first), end = begin + g.tile_extent(g.tile_of(first)).w;
        detail::RunSignature s = detail::run_signature(kind, p, g, first);
        if (!runs.empty() && s == current) {
          runs.back().end = end;
        } else {
          runs.push_back({begin, end, g.tile_of(first)});
          current = std::move(s);
        }
      }
  return runs;
}

/// Query blocks of `rows` rows cut from runs: ceil(size / rows) per run, the last one ending at the run's end (it
/// overlaps the one before it where size % rows != 0: those rows are computed twice, with identical results, and
/// no block reaches into another run). -1 when some run is shorter than a block, which could not be cut so.
inline int64_t run_blocks(const std::vector<QueryRun>& runs, int64_t rows) {
  int64_t blocks = 0;
  for (const QueryRun& r : runs) {
    if (r.size() < rows) return -1;
    blocks += ceil_div<int64_t>(r.size(), rows);
  }
  return blocks;
}

/// The first row (a raster video index) of block `i` of `run` cut as run_blocks says.
inline int64_t run_block_begin(const QueryRun& run, int64_t i, int64_t rows) {
  const int64_t b = run.begin + i * rows;
  return b + rows <= run.end ? b : run.end - rows;
}

}  // namespace tilewise
