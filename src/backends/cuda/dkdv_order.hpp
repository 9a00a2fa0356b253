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
  sweep_centred = 5,   // the sweep, each key tile started half its load before its column's middle (below): the
                       // sweep's default
};

/// Whether `order` is one of the sweep's orders, whose items the kernels walk w slowest.
inline bool is_sweep(DkdvOrder order) {
  return order == DkdvOrder::sweep || order == DkdvOrder::sweep_centred;
}

/// Whether the dK/dV kernels take the sweep (its orders with the w-slowest walk): where no key tile is seen
/// from more than four query tile columns and the grid has more columns than that (the reverse question, per head:
/// query_boxes). A window of three columns gives three inside the grid and four next to its edges, where the
/// windows shift. The ~44 key tiles in flight on an H200 then advance along w, and each item visits its query
/// columns in turn, so the key columns that see a query column visit it one after another. Measured (docs/
/// performance.md backward v3.26): Wan 21x45x80 -3.2 to -4.2%, HunyuanVideo 33x45x80 -2.8%, row 1 30x48x80 and
/// + text within noise until its items were centred (v3.36: -3.4% and -2.0% more); wider sets lose (window 5: seven
/// columns, +7%; the attention tile: every column, +12%).
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
///
/// sweep_centred (docs/performance.md backward v3.36) narrows the sweep's front: a key tile's item visits its query
/// columns w-1, w, w+1 in turn over a run as long as its load, and loads within one column of row 1's 5x6x10 tiles
/// differ 5x (the windows' shift at the borders), so in raster order a heavy item started with its column is still on
/// it columns later. Instead every item starts half its load before the middle of its column's turn, the turns
/// following one another at the rate the GPU takes loads (`in_flight` items at once, each through one query tile per
/// step), so that the items of one column visit its middle query column together (row 1: DRAM 62 -> 48 GB, -3.4%;
/// starting each column's heavy items first instead gave -1.7%).
inline std::vector<int32_t> dkdv_item_order(const Plan& plan, DkdvOrder order, int64_t head_group = 4,
                                            double in_flight = 44 /* an H200's 132 SMs on 384-token tiles */) {
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
  if (is_sweep(order)) axes = {2, 1, 0};
  std::vector<int64_t> rank(tiles);  // a tile's position in the per-head order
  for (int64_t i = 0; i < tiles; ++i) {
    const auto c = g.tile_coord(i);
    const int64_t x[3] = {c.t, c.h, c.w};
    rank[i] = (x[axes[0]] * ext[axes[1]] + x[axes[1]]) * ext[axes[2]] + x[axes[2]];
  }
  // sweep_centred: each item's start on a time line of load units, the kv heads' column turns one after another
  std::vector<double> start(load.size(), 0.0);
  if (order == DkdvOrder::sweep_centred) {
    auto column_of = [&](size_t e) { return e / tiles * g.tiles.w + g.tile_coord(e % tiles).w; };
    std::vector<int64_t> column(p.kv_heads * g.tiles.w, 0);
    for (size_t e = 0; e < load.size(); ++e) column[column_of(e)] += load[e];
    std::vector<double> middle(column.size());
    double t = 0;
    for (size_t c = 0; c < column.size(); ++c) {
      const double turn = static_cast<double>(column[c]) / std::max(in_flight, 1.0);
      middle[c] = t + turn / 2, t += turn;
    }
    for (size_t e = 0; e < load.size(); ++e) start[e] = middle[column_of(e)] - static_cast<double>(load[e]) / 2;
  }
  const int64_t last = p.kv_heads - 1;
  std::sort(items.begin(), items.end(), [&](int32_t a, int32_t b) {
    const int64_t ha = a / tiles, hb = b / tiles;
    if ((ha == last) != (hb == last)) return hb == last;  // the last kv head after every other, heaviest first
    if (ha == last && load[a] != load[b]) return load[a] > load[b];
    if (ha != last && order == DkdvOrder::sweep_centred && start[a] != start[b]) return start[a] < start[b];
    if (ha != hb) return ha < hb;
    return rank[a % tiles] < rank[b % tiles];
  });
  return items;
}

}  // namespace tilewise::cuda
