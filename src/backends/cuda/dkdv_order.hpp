// The order of the dK/dV kernels' video work items (host planning, apart from the kernels and their scheduler,
// which only read the array: FwdParams::video_order). Plain C++ on the Plan, so the CPU tests check it too.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <numeric>
#include <vector>

#include "tilewise/pattern.hpp"
#include "tilewise/tilewise.hpp"

namespace tilewise::cuda {

/// How the items are ordered (TILEWISE_HOPPER_BWD_ITEM_ORDER; docs/performance.md backward v3.2 and v3.12).
enum class DkdvOrder {
  heaviest_first = 0,  // every head's heaviest key tiles first, ties in raster order (the default)
  largest_axis = 1,    // per kv head, the tile grid's largest axis slowest; the last kv head heaviest first
  raster = 2,          // per kv head, raster order; the last kv head heaviest first
  head_groups = 3,     // kv heads in groups of `head_group`, one group after the other, heaviest first in each
  sweep = 4,           // per kv head, w slowest, then h, t fastest, the last kv head heaviest first; the kernels
                       // then walk each item's query tiles w slowest too (FwdParams::walk_width_slowest)
};

/// Whether the dK/dV kernels take the sweep (DkdvOrder::sweep with the w-slowest walk): where no key tile is seen
/// from more than four query tile columns and the grid has more columns than that (the reverse question, per head:
/// query_boxes). A window of three columns gives three inside the grid and four next to its edges, where the
/// windows shift. The ~44 key tiles in flight on an H200 then advance along w, and each item visits its query
/// columns in turn, so the key columns that see a query column visit it one after another. Measured (docs/
/// performance.md backward v3.26): Wan 21x45x80 -3.2 to -4.2%, HunyuanVideo 33x45x80 -2.8%, row 1 30x48x80 and
/// + text within noise; wider sets lose (window 5: seven columns, +7%; the attention tile: every column, +12%).
inline bool sweep_suits(const Plan& plan) {
  const Problem& p = plan.problem();
  const TileGrid& g = plan.grid();
  if (plan.pattern().kind == PatternKind::block_list) return false;
  for (int64_t h = 0; h < p.q_heads; ++h)
    for (int64_t kt = 0; kt < g.num_tiles(); ++kt) {
      const int64_t columns = query_boxes<int64_t>(plan.pattern().kind, plan.head(h), g, g.tile_coord(kt)).w.size();
      if (columns > 4 || columns >= g.tiles.w) return false;
    }
  return true;
}

/// The dK/dV kernels' video items as entries kv_head * tiles + key tile, in `order`. A key tile's load is the
/// number of query tiles that see it, summed over its kv head's query heads (Plan::num_query_tiles: 8 to 80 at
/// window 3x3x3 on 5x6x10 tiles): ending on light items keeps the dynamic scheduler's tail short, and the
/// per-head orders keep tiles whose windows overlap side by side (which the H200 did not reward on row 1).
/// head_groups keeps heaviest first but runs few kv heads at once (`head_group` of them), so that the ~44 key
/// tiles in flight on an H200 share more of their query tiles in L2: with 4 heads row 1 took 0.7% more cycles per
/// block than the whole grid, with 24 heads 3.1% (docs/performance.md backward v3.18).
inline std::vector<int32_t> dkdv_item_order(const Plan& plan, DkdvOrder order, int64_t head_group = 4) {
  const Problem& p = plan.problem();
  const TileGrid& g = plan.grid();
  const int64_t tiles = g.num_tiles(), group = p.q_heads / p.kv_heads;
  std::vector<int64_t> load(p.kv_heads * tiles, 0);
  for (int64_t h = 0; h < p.q_heads; ++h)
    for (int64_t kt = 0; kt < tiles; ++kt) load[h / group * tiles + kt] += plan.num_query_tiles(h, kt);
  std::vector<int32_t> items(load.size());
  std::iota(items.begin(), items.end(), 0);
  if (order == DkdvOrder::heaviest_first || order == DkdvOrder::head_groups) {  // heaviest_first: one group of all
    const int64_t size = order == DkdvOrder::heaviest_first ? p.kv_heads : std::max<int64_t>(head_group, 1);
    std::stable_sort(items.begin(), items.end(), [&](int32_t a, int32_t b) {
      const int64_t ga = a / tiles / size, gb = b / tiles / size;
      return ga != gb ? ga < gb : load[a] > load[b];
    });
    return items;
  }
  const int64_t ext[3] = {g.tiles.t, g.tiles.h, g.tiles.w};
  std::array<int, 3> axes{0, 1, 2};  // slowest first
  if (order == DkdvOrder::largest_axis)
    std::stable_sort(axes.begin(), axes.end(), [&](int a, int b) { return ext[a] > ext[b]; });
  if (order == DkdvOrder::sweep) axes = {2, 1, 0};
  std::vector<int64_t> rank(tiles);  // a tile's position in the per-head order
  for (int64_t i = 0; i < tiles; ++i) {
    const auto c = g.tile_coord(i);
    const int64_t x[3] = {c.t, c.h, c.w};
    rank[i] = (x[axes[0]] * ext[axes[1]] + x[axes[1]]) * ext[axes[2]] + x[axes[2]];
  }
  const int64_t last = p.kv_heads - 1;
  std::sort(items.begin(), items.end(), [&](int32_t a, int32_t b) {
    const int64_t ha = a / tiles, hb = b / tiles;
    if (ha != hb) return ha < hb;
    if (ha == last && load[a] != load[b]) return load[a] > load[b];
    return rank[a % tiles] < rank[b % tiles];
  });
  return items;
}

}  // namespace tilewise::cuda
