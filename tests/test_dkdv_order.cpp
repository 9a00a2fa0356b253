// The dK/dV kernels' item order (src/backends/cuda/dkdv_order.hpp), host planning checked on the CPU: every order
// is a permutation of the (kv head, key tile) entries, and each keeps its promise about loads and locality. The
// loads come from the spec's window placement (semantics.md §3: a window of w tiles starts at
// clamp(c - floor(w / 2), 0, n - w)), counted here by brute force, not from the core.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "backends/cuda/dkdv_order.hpp"

namespace {

using tilewise::cuda::DkdvOrder;
using tilewise::cuda::dkdv_item_order;
using tilewise::cuda::sweep_suits;

struct OrderCase {
  tilewise::Dim3 latent, tile;
  int64_t q_heads, kv_heads;
  std::vector<tilewise::Dim3> windows;  // per query head
};

tilewise::Plan make_plan(const OrderCase& s) {
  tilewise::Problem p;
  p.q_heads = s.q_heads;
  p.kv_heads = s.kv_heads;
  p.head_dim = 64;
  p.dtype = tilewise::DType::f32;
  p.latent = s.latent;
  p.tile = s.tile;
  return tilewise::Plan(p, tilewise::Pattern::sliding_tile(s.windows), tilewise::Device::cpu);
}

std::array<int64_t, 3> grid_of(const OrderCase& s) {
  return {(s.latent.t + s.tile.t - 1) / s.tile.t, (s.latent.h + s.tile.h - 1) / s.tile.h,
          (s.latent.w + s.tile.w - 1) / s.tile.w};
}

/// Query tiles whose window contains key tile k, summed over the kv head's query heads (brute force).
std::vector<int64_t> loads(const OrderCase& s) {
  const auto n = grid_of(s);
  const int64_t tiles = n[0] * n[1] * n[2], group = s.q_heads / s.kv_heads;
  auto sees = [&](int64_t q, int64_t k, int64_t extent, int64_t w) {
    w = std::min(w, extent);
    const int64_t start = std::clamp(q - w / 2, int64_t{0}, extent - w);
    return start <= k && k < start + w;
  };
  std::vector<int64_t> load(s.kv_heads * tiles, 0);
  for (int64_t h = 0; h < s.q_heads; ++h) {
    const int64_t win[3] = {s.windows[h].t, s.windows[h].h, s.windows[h].w};
    for (int64_t k = 0; k < tiles; ++k) {
      const int64_t kc[3] = {k / (n[1] * n[2]), k / n[2] % n[1], k % n[2]};
      for (int64_t q = 0; q < tiles; ++q) {
        const int64_t qc[3] = {q / (n[1] * n[2]), q / n[2] % n[1], q % n[2]};
        bool all = true;
        for (int a = 0; a < 3; ++a) all = all && sees(qc[a], kc[a], n[a], win[a]);
        load[h / group * tiles + k] += all;
      }
    }
  }
  return load;
}

const OrderCase kSetups[] = {
    {{30, 48, 80}, {6, 8, 8}, 2, 2, {{3, 3, 3}, {3, 3, 3}}},                         // HunyuanVideo's 5x6x10 tiles
    {{21, 45, 80}, {6, 8, 8}, 4, 2, {{3, 3, 3}, {1, 3, 5}, {3, 5, 5}, {2, 2, 2}}},  // partial tiles, GQA, per head
};

void expect_permutation(const std::vector<int32_t>& order, size_t n) {
  std::vector<int32_t> sorted = order;
  std::sort(sorted.begin(), sorted.end());
  ASSERT_EQ(sorted.size(), n);
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(sorted[i], static_cast<int32_t>(i));
}

TEST(DkdvOrder, HeaviestFirstSortsByLoadWithRasterTies) {
  for (const OrderCase& s : kSetups) {
    const std::vector<int64_t> load = loads(s);
    const auto order = dkdv_item_order(make_plan(s), DkdvOrder::heaviest_first);
    expect_permutation(order, load.size());
    for (size_t i = 1; i < order.size(); ++i) {
      const int64_t a = load[order[i - 1]], b = load[order[i]];
      ASSERT_GE(a, b) << "position " << i;
      if (a == b) ASSERT_LT(order[i - 1], order[i]) << "ties keep (kv head, tile) order, position " << i;
    }
    // row 1's window 3x3x3 on 5x6x10 tiles: the windows shift at the borders, so a key tile is seen by 8 (a
    // corner) to 80 (t 2, h 2 or 3, w 2 or 7: 5 x 4 x 4) query tiles per head
    if (s.kv_heads == s.q_heads) {
      EXPECT_EQ(load[order.front()], 80);
      EXPECT_EQ(load[order.back()], 8);
    }
  }
}

TEST(DkdvOrder, PerHeadOrdersKeepNeighboursTogetherAndEndHeavyFirst) {
  for (const OrderCase& s : kSetups) {
    const auto n = grid_of(s);
    const int64_t tiles = n[0] * n[1] * n[2];
    const std::vector<int64_t> load = loads(s);
    for (DkdvOrder mode : {DkdvOrder::largest_axis, DkdvOrder::raster, DkdvOrder::sweep}) {
      const auto order = dkdv_item_order(make_plan(s), mode);
      expect_permutation(order, load.size());
      // the axes from slowest to fastest: raster (t, h, w), by extent, largest first (stable), or the sweep's w, h, t
      std::array<int, 3> axes{0, 1, 2};
      if (mode == DkdvOrder::largest_axis)
        std::stable_sort(axes.begin(), axes.end(), [&](int a, int b) { return n[a] > n[b]; });
      if (mode == DkdvOrder::sweep) axes = {2, 1, 0};
      auto rank = [&](int32_t e) {
        const int64_t k = e % tiles, c[3] = {k / (n[1] * n[2]), k / n[2] % n[1], k % n[2]};
        return (c[axes[0]] * n[axes[1]] + c[axes[1]]) * n[axes[2]] + c[axes[2]];
      };
      for (size_t i = 1; i < order.size(); ++i) {
        const int64_t ha = order[i - 1] / tiles, hb = order[i] / tiles;
        ASSERT_LE(ha, hb) << "kv heads in order, position " << i;
        if (ha != hb) continue;
        if (ha == s.kv_heads - 1) {  // the last kv head: heaviest first, ties in the per-head order
          ASSERT_GE(load[order[i - 1]], load[order[i]]) << "position " << i;
          if (load[order[i - 1]] == load[order[i]]) ASSERT_LT(rank(order[i - 1]), rank(order[i]));
        } else {
          ASSERT_LT(rank(order[i - 1]), rank(order[i])) << "position " << i;
        }
      }
    }
  }
  // HunyuanVideo's grid (5, 6, 10): w slowest, then h, then t, so head 0 starts at tiles (0,0,0), (1,0,0), ...
  const auto order = dkdv_item_order(make_plan(kSetups[0]), DkdvOrder::largest_axis);
  EXPECT_EQ(order[0], 0);
  EXPECT_EQ(order[1], 60);  // tile (t 1, h 0, w 0)
  EXPECT_EQ(order[5], 10);  // tile (t 0, h 1, w 0)
}

/// The most query tile columns (along w) that see one key tile, over every head (brute force, as `loads`).
int64_t widest_reverse_columns(int64_t columns, const std::vector<tilewise::Dim3>& windows) {
  int64_t widest = 0;
  for (const tilewise::Dim3& win : windows) {
    const int64_t w = std::min(win.w, columns);
    for (int64_t k = 0; k < columns; ++k) {
      int64_t first = columns, last = -1;
      for (int64_t q = 0; q < columns; ++q) {
        const int64_t start = std::clamp(q - w / 2, int64_t{0}, columns - w);
        if (start <= k && k < start + w) first = std::min(first, q), last = std::max(last, q);
      }
      widest = std::max(widest, last - first + 1);
    }
  }
  return widest;
}

TEST(DkdvOrder, SweepOnlyWhereEveryKeyTileIsSeenFromAtMostFourColumns) {
  struct SweepCase {
    OrderCase s;
    bool sweep;
  };
  const SweepCase cases[] = {
      {kSetups[0], true},                                                // row 1: 3 of 10 columns, 4 at the edges
      {{{30, 48, 80}, {6, 8, 8}, 1, 1, {{3, 5, 5}}}, false},            // window 5: 7 columns (measured +7%)
      {kSetups[1], false},                                               // one head's w window is 5
      {{{21, 45, 80}, {6, 8, 8}, 2, 1, {{3, 3, 3}, {2, 2, 2}}}, true},  // Wan, GQA
      {{{30, 48, 80}, {6, 8, 8}, 1, 1, {{3, 3, 1}}}, true},             // one column
      {{{30, 48, 80}, {6, 8, 8}, 1, 1, {{3, 3, 4}}}, false},            // window 4: 6 columns
      {{{13, 30, 45}, {1, 8, 16}, 1, 1, {{13, 3, 3}}}, false},          // CogVideoX: 3 of 3 columns
      {{{30, 48, 32}, {6, 8, 8}, 1, 1, {{3, 3, 3}}}, false},            // 4 of 4 columns
      {{{30, 48, 48}, {6, 8, 8}, 1, 1, {{3, 3, 3}}}, true},             // 4 of 6 columns
  };
  for (const SweepCase& c : cases) {
    const int64_t columns = grid_of(c.s)[2];
    const int64_t widest = widest_reverse_columns(columns, c.s.windows);
    EXPECT_EQ(widest <= 4 && widest < columns, c.sweep) << "the oracle's case, " << widest << " of " << columns;
    EXPECT_EQ(sweep_suits(make_plan(c.s)), c.sweep) << widest << " of " << columns << " columns";
  }
  // The other patterns: every key tile of the attention tile and of dense is seen from every column; block lists
  // are not boxes.
  tilewise::Problem p;
  p.head_dim = 64;
  p.dtype = tilewise::DType::f32;
  p.latent = {24, 45, 80};
  p.tile = {1, 8, 16};
  EXPECT_FALSE(sweep_suits(tilewise::Plan(p, tilewise::Pattern::attention_tile(3), tilewise::Device::cpu)));
  EXPECT_FALSE(sweep_suits(tilewise::Plan(p, tilewise::Pattern::dense(), tilewise::Device::cpu)));
  p.latent = {1, 1, 8};
  p.tile = {1, 1, 1};
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> tiles;
  for (int32_t q = 0; q < 8; ++q) tiles.push_back(q), offsets.push_back(static_cast<int64_t>(tiles.size()));
  EXPECT_FALSE(sweep_suits(tilewise::Plan(p, tilewise::Pattern::block_list(offsets, tiles), tilewise::Device::cpu)));
}

TEST(DkdvOrder, HeadGroupsRunInTurnHeaviestFirstInEach) {
  for (const OrderCase& s : kSetups) {
    const auto n = grid_of(s);
    const int64_t tiles = n[0] * n[1] * n[2];
    const std::vector<int64_t> load = loads(s);
    for (const int64_t group : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{64}}) {
      const auto order = dkdv_item_order(make_plan(s), DkdvOrder::head_groups, group);
      expect_permutation(order, load.size());
      for (size_t i = 1; i < order.size(); ++i) {
        const int64_t ga = order[i - 1] / tiles / group, gb = order[i] / tiles / group;
        ASSERT_LE(ga, gb) << "groups in order, position " << i;
        if (ga != gb) continue;
        ASSERT_GE(load[order[i - 1]], load[order[i]]) << "heaviest first within a group, position " << i;
        if (load[order[i - 1]] == load[order[i]]) ASSERT_LT(order[i - 1], order[i]) << "ties in (kv head, tile) order";
      }
    }
    // one group holding every kv head is the heaviest-first order itself
    EXPECT_EQ(dkdv_item_order(make_plan(s), DkdvOrder::head_groups, s.kv_heads),
              dkdv_item_order(make_plan(s), DkdvOrder::heaviest_first));
  }
}

/// The sweep's centred order (docs/performance.md backward v3.36), against the brute-force loads: the last kv head
/// ends the order heaviest first; before it every item comes in the order of the start computed here from the column
/// sums: the middle of its column's turn (the columns of all kv heads one after another, each taking its loads over
/// `in_flight`), less half its load.
TEST(DkdvOrder, SweepCentredStartsEachItemHalfItsLoadBeforeItsColumnsMiddle) {
  for (const OrderCase& s : kSetups) {
    const auto n = grid_of(s);
    const int64_t tiles = n[0] * n[1] * n[2];
    const std::vector<int64_t> load = loads(s);
    auto w_of = [&](int32_t e) { return e % tiles % n[2]; };
    for (const double in_flight : {1.0, 44.0, 1000.0}) {
      const auto centred = dkdv_item_order(make_plan(s), DkdvOrder::sweep_centred, 4, in_flight);
      expect_permutation(centred, load.size());
      const size_t first_last = centred.size() - static_cast<size_t>(tiles);
      for (size_t i = 0; i < centred.size(); ++i)
        ASSERT_EQ(centred[i] / tiles == s.kv_heads - 1, i >= first_last) << "the last kv head last, position " << i;
      for (size_t i = first_last + 1; i < centred.size(); ++i) ASSERT_GE(load[centred[i - 1]], load[centred[i]]);
      std::vector<double> turn(s.kv_heads * n[2], 0.0);
      for (size_t e = 0; e < load.size(); ++e)
        turn[e / tiles * n[2] + w_of(static_cast<int32_t>(e))] += static_cast<double>(load[e]) / in_flight;
      auto start = [&](int32_t e) {
        const int64_t c = e / tiles * n[2] + w_of(e);
        double before = 0;
        for (int64_t j = 0; j < c; ++j) before += turn[j];
        return before + turn[c] / 2 - load[e] / 2.0;
      };
      for (size_t i = 1; i + tiles < centred.size(); ++i)
        ASSERT_LE(start(centred[i - 1]), start(centred[i]) + 1e-9) << "in_flight " << in_flight << ", position " << i;
    }
  }
}

}  // namespace
