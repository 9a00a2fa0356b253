// The sliding-tile mask equals the original STA kernel's on its reference configuration: tile 6x8x8,
// latent 30x48x80 (tile grid 5x6x10), window 3x3x3. The original kernel centres the window of a query tile
// at clamp(c, 1, n - 2) per axis and takes key tiles centre-1 .. centre+1; for a general odd window k
// (k <= n) that is centre = clamp(c, k/2, n-1-k/2) and key tiles centre-k/2 .. centre+k/2.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "oracle_case.hpp"  // seeding only
#include "tilewise/tilewise.hpp"

namespace {

using tilewise::Dim3;

constexpr Dim3 kTile{6, 8, 8}, kLatent{30, 48, 80}, kGrid{5, 6, 10};

/// Original STA along one axis: is key tile ck in the window of query tile cq?
bool original_sta(int64_t cq, int64_t ck, int64_t k, int64_t n) {
  const int64_t centre = std::clamp(cq, k / 2, n - 1 - k / 2);
  return ck >= centre - k / 2 && ck <= centre + k / 2;
}

bool original_sta(Dim3 cq, Dim3 ck, Dim3 k) {
  return original_sta(cq.t, ck.t, k.t, kGrid.t) && original_sta(cq.h, ck.h, k.h, kGrid.h) &&
         original_sta(cq.w, ck.w, k.w, kGrid.w);
}

tilewise::Plan sta_plan(Dim3 window) {
  tilewise::Problem p;
  p.latent = kLatent;
  p.tile = kTile;
  p.head_dim = 128;
  p.text_capacity = 226;  // text does not change the video mask
  return tilewise::Plan(p, tilewise::Pattern::sliding_tile(window), tilewise::Device::cpu);
}

Dim3 tile_of(Dim3 p) { return {p.t / kTile.t, p.h / kTile.h, p.w / kTile.w}; }
Dim3 tile_coord(int64_t i) { return {i / (kGrid.h * kGrid.w), (i / kGrid.w) % kGrid.h, i % kGrid.w}; }

TEST(StaOriginal, TokenPairsOnRandomSample) {
  const uint64_t seed = oracle::fresh_seed();
  SCOPED_TRACE(oracle::seed_note(seed));
  oracle::Rng rng(seed);
  const tilewise::Plan plan = sta_plan({3, 3, 3});
  ASSERT_EQ(plan.grid().tiles, kGrid);
  auto token = [&] {
    return Dim3{oracle::uniform(rng, 0, kLatent.t - 1), oracle::uniform(rng, 0, kLatent.h - 1),
                oracle::uniform(rng, 0, kLatent.w - 1)};
  };
  // Half the keys uniform over the latent, half within two tiles of the query (both sides of the border).
  auto near = [&](Dim3 q) {
    auto axis = [&](int64_t x, int64_t tile, int64_t extent) {
      return std::clamp<int64_t>(x + oracle::uniform(rng, -2 * tile, 2 * tile), 0, extent - 1);
    };
    return Dim3{axis(q.t, kTile.t, kLatent.t), axis(q.h, kTile.h, kLatent.h), axis(q.w, kTile.w, kLatent.w)};
  };
  int64_t allowed = 0, mismatches = 0;
  constexpr int64_t kPairs = 200000;
  for (int64_t i = 0; i < kPairs; ++i) {
    const Dim3 q = token();
    const Dim3 k = i % 2 ? token() : near(q);
    const bool want = original_sta(tile_of(q), tile_of(k), {3, 3, 3});
    allowed += want;
    if (plan.video_pair_allowed(0, q, k) != want && ++mismatches <= 5)
      ADD_FAILURE() << "query (" << q.t << "," << q.h << "," << q.w << ") key (" << k.t << "," << k.h << ","
                    << k.w << "): original STA says " << want;
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_GT(allowed, kPairs / 10);  // the sample exercises both answers
  EXPECT_LT(allowed, kPairs * 9 / 10);
}

TEST(StaOriginal, KeyTilesOfEveryQueryTileForOddWindows) {
  for (int64_t kt : {1, 3, 5})
    for (int64_t kh : {1, 3, 5})
      for (int64_t kw : {1, 3, 5, 7, 9}) {
        const Dim3 window{kt, kh, kw};
        SCOPED_TRACE("window " + std::to_string(kt) + "x" + std::to_string(kh) + "x" + std::to_string(kw));
        const tilewise::Plan plan = sta_plan(window);
        for (int64_t qt = 0; qt < kGrid.volume(); ++qt) {
          std::vector<int32_t> expected;
          for (int64_t c = 0; c < kGrid.volume(); ++c)
            if (original_sta(tile_coord(qt), tile_coord(c), window)) expected.push_back(static_cast<int32_t>(c));
          ASSERT_EQ(plan.key_tiles(0, qt), expected) << "query tile " << qt;
        }
      }
}

}  // namespace
