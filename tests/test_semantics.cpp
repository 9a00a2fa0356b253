// Property tests of the semantics core (geometry.hpp, pattern.hpp, Plan's tile-level answers and pair
// counts), checked against the spec's statements and against brute force over the oracle's mask.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "oracle_case.hpp"
#include "tilewise/geometry.hpp"
#include "tilewise/pattern.hpp"

namespace {

using oracle::Case;
using oracle::Kind;
using tilewise::Dim3;

class Semantics : public ::testing::Test {
 protected:
  const uint64_t seed = oracle::fresh_seed();
  oracle::Rng rng{seed};
  ::testing::ScopedTrace trace{__FILE__, __LINE__, oracle::seed_note(seed)};

  int64_t uni(int64_t lo, int64_t hi) { return oracle::uniform(rng, lo, hi); }
};

tilewise::Plan make_plan(const Case& c) {
  return tilewise::Plan(oracle::to_problem(c), oracle::to_pattern(c), tilewise::Device::cpu);
}

// ---- sliding tile windows -----------------------------------------------------------------------------

TEST_F(Semantics, WindowRangeIsCentredShiftedInwardNeverTruncated) {
  for (int64_t n = 1; n <= 12; ++n)
    for (int64_t k = 1; k <= 14; ++k)
      for (int64_t c = 0; c < n; ++c) {
        SCOPED_TRACE("n=" + std::to_string(n) + " k=" + std::to_string(k) + " c=" + std::to_string(c));
        const tilewise::AxisRange r = tilewise::window_range(c, k, n);
        EXPECT_EQ(r.size(), std::min(k, n));
        EXPECT_GE(r.begin, 0);
        EXPECT_LE(r.end, n);
        EXPECT_TRUE(r.contains(c));
        // Odd k: k/2 before and after; even k: k/2 before, k/2 - 1 after.
        const int64_t before = k / 2, after = k % 2 ? k / 2 : k / 2 - 1;
        if (k >= n) {
          EXPECT_EQ(r.begin, 0);
        } else if (c - before >= 0 && c + after <= n - 1) {
          EXPECT_EQ(r.begin, c - before);
          EXPECT_EQ(r.end, c + after + 1);
        } else if (c - before < 0) {
          EXPECT_EQ(r.begin, 0);  // shifted inward at the low border
        } else {
          EXPECT_EQ(r.end, n);  // shifted inward at the high border
        }
        for (int64_t x = 0; x < n; ++x) EXPECT_EQ(r.contains(x), oracle::in_window(c, x, k, n)) << "key " << x;
      }
}

TEST_F(Semantics, SlidingTileQueryTilesSeeProductOfMinKN) {
  for (int rep = 0; rep < 60; ++rep) {
    Case c;
    c.kind = Kind::sliding_tile;
    c.latent = {uni(1, 30), uni(1, 30), uni(1, 30)};
    c.tile = {uni(1, 6), uni(1, 6), uni(1, 6)};
    c.heads = {{uni(1, c.tiles(0) + 2), uni(1, c.tiles(1) + 2), uni(1, c.tiles(2) + 2), 0, 0}};
    SCOPED_TRACE(oracle::describe(c));
    const tilewise::Plan plan = make_plan(c);
    const auto& w = c.heads[0];
    const int64_t expected =
        std::min(w.kt, c.tiles(0)) * std::min(w.kh, c.tiles(1)) * std::min(w.kw, c.tiles(2));
    for (int64_t qt = 0; qt < c.num_tiles(); ++qt) {
      const std::vector<int32_t> keys = plan.key_tiles(0, qt);
      ASSERT_EQ(static_cast<int64_t>(keys.size()), expected) << "query tile " << qt;
      EXPECT_TRUE(std::is_sorted(keys.begin(), keys.end()));
      // Exactly the tiles inside the window on all three axes.
      const Dim3 cq{qt / (c.tiles(1) * c.tiles(2)), (qt / c.tiles(2)) % c.tiles(1), qt % c.tiles(2)};
      std::vector<int32_t> brute;
      for (int64_t kt = 0; kt < c.num_tiles(); ++kt) {
        const Dim3 ck{kt / (c.tiles(1) * c.tiles(2)), (kt / c.tiles(2)) % c.tiles(1), kt % c.tiles(2)};
        if (oracle::in_window(cq.t, ck.t, w.kt, c.tiles(0)) && oracle::in_window(cq.h, ck.h, w.kh, c.tiles(1)) &&
            oracle::in_window(cq.w, ck.w, w.kw, c.tiles(2)))
          brute.push_back(static_cast<int32_t>(kt));
      }
      EXPECT_EQ(keys, brute) << "query tile " << qt;
    }
  }
}

// ---- token orders -------------------------------------------------------------------------------------

TEST_F(Semantics, TileGridIndexMapsRoundTrip) {
  for (int rep = 0; rep < 40; ++rep) {
    const Dim3 tile{uni(1, 4), uni(1, 4), uni(1, 4)};
    const Dim3 latent{tile.t * uni(1, 4), tile.h * uni(1, 4), tile.w * uni(1, 4)};
    const tilewise::TileGrid g(latent, tile);
    Case c;
    c.latent = latent, c.tile = tile, c.tiled = true;
    const oracle::Mask tiled(oracle::to_oracle(c));  // the oracle's own tiled positions
    SCOPED_TRACE(oracle::describe(c));
    ASSERT_TRUE(g.tiles_evenly());
    for (int64_t i = 0; i < g.num_tokens(); ++i) {
      const Dim3 p = g.tiled_coord(i);
      ASSERT_EQ(g.tiled_index(p), i);
      ASSERT_EQ(g.raster_index(g.raster_coord(i)), i);
      const oracle::Token& t = tiled.token(i);
      ASSERT_EQ(p, (Dim3{t.t, t.h, t.w})) << "tiled position " << i;
      ASSERT_EQ(g.tile_index(g.tile_of(p)), t.tile);
    }
    for (int64_t i = 0; i < g.num_tiles(); ++i) ASSERT_EQ(g.tile_index(g.tile_coord(i)), i);
  }
}

TEST_F(Semantics, TokenMapPositionsMatchSpec) {
  for (int rep = 0; rep < 40; ++rep) {
    Case c;
    c.tile = {uni(1, 3), uni(1, 3), uni(1, 3)};
    c.tiled = uni(0, 1);
    const int64_t f = c.tiled ? 1 : 0;  // tiled order needs a multiple of the tile
    c.latent = {c.tile.t * uni(1, 3) + (1 - f) * uni(0, 2), c.tile.h * uni(1, 3) + (1 - f) * uni(0, 2),
                c.tile.w * uni(1, 3) + (1 - f) * uni(0, 2)};
    c.text = uni(0, 5);
    c.text_first = uni(0, 1);
    SCOPED_TRACE(oracle::describe(c));
    const tilewise::Plan plan = make_plan(c);
    const oracle::Mask mask(oracle::to_oracle(c));
    const tilewise::TokenMap& map = plan.token_map();
    for (int64_t s = 0; s < c.seq_len(); ++s) {
      const oracle::Token& t = mask.token(s);
      ASSERT_EQ(map.seq.is_text(s), t.text) << "position " << s;
      if (t.text) continue;
      ASSERT_EQ(map.video_position({t.t, t.h, t.w}), s);
      ASSERT_EQ(map.video_coord(s), (Dim3{t.t, t.h, t.w}));
    }
  }
}

TEST_F(Semantics, TileUntileRoundTripOnBuffers) {
  using tilewise::DType;
  for (DType dtype : {DType::f64, DType::f32, DType::bf16, DType::f16}) {
    Case c;
    c.dtype = dtype;
    c.tile = {uni(1, 3), uni(1, 3), uni(1, 3)};
    c.latent = {c.tile.t * uni(1, 3), c.tile.h * uni(1, 3), c.tile.w * uni(1, 3)};
    c.batch = uni(1, 2);
    c.q_heads = uni(1, 3);
    c.kv_heads = 1;
    c.head_dim = 8;
    c.text = uni(0, 4);
    c.text_first = uni(0, 1);
    SCOPED_TRACE(oracle::describe(c));
    const tilewise::Problem p = oracle::to_problem(c);
    const int64_t row = c.q_heads * c.head_dim * tilewise::dtype_size(dtype);  // bytes per position
    std::vector<unsigned char> x(c.batch * c.seq_len() * row), tiled(x.size()), back(x.size());
    for (auto& byte : x) byte = static_cast<unsigned char>(uni(0, 255));
    tilewise::tile(p, x.data(), tiled.data());
    tilewise::untile(p, tiled.data(), back.data());
    EXPECT_EQ(back, x);
    // Position by position: the tiled buffer holds each token where the spec's tiled order puts it.
    Case ct = c;
    ct.tiled = true;
    const oracle::Mask raster(oracle::to_oracle(c)), tiled_order(oracle::to_oracle(ct));
    std::map<std::vector<int64_t>, int64_t> raster_pos;
    for (int64_t s = 0; s < c.seq_len(); ++s) {
      const oracle::Token& t = raster.token(s);
      raster_pos[{t.text, t.text_index, t.t, t.h, t.w}] = s;
    }
    for (int64_t b = 0; b < c.batch; ++b)
      for (int64_t s = 0; s < c.seq_len(); ++s) {
        const oracle::Token& t = tiled_order.token(s);
        const int64_t from = raster_pos.at({t.text, t.text_index, t.t, t.h, t.w});
        ASSERT_EQ(0, std::memcmp(&tiled[(b * c.seq_len() + s) * row], &x[(b * c.seq_len() + from) * row], row))
            << "batch " << b << " tiled position " << s;
      }
  }
}

// ---- pair counts, key tiles and block kinds against the brute-force mask ---------------------------------

/// A random problem (oracle_case.hpp) that always carries a per-batch text_len.
Case random_pattern_case(oracle::Rng& rng, Kind kind) {
  Case c = oracle::random_case(rng, kind, tilewise::DType::f32);
  if (c.text_len.empty())
    for (int64_t b = 0; b < c.batch; ++b) c.text_len.push_back(static_cast<int32_t>(oracle::uniform(rng, 0, c.text)));
  return c;
}

TEST_F(Semantics, AllowedPairsAndFlopsMatchBruteForce) {
  for (Kind kind : {Kind::sliding_tile, Kind::attention_tile, Kind::dense, Kind::block_list})
    for (int rep = 0; rep < 25; ++rep) {
      const Case c = random_pattern_case(rng, kind);
      SCOPED_TRACE(oracle::describe(c));
      const tilewise::Plan plan = make_plan(c);
      const oracle::Problem op = oracle::to_oracle(c);
      const int64_t brute = oracle::Mask(op).count_allowed();
      EXPECT_EQ(plan.allowed_pairs(c.text_len.data()), brute);
      EXPECT_DOUBLE_EQ(plan.flops(c.text_len.data()), 4.0 * c.head_dim * brute);
      // Without text_len every text position counts as valid.
      oracle::Problem full = op;
      full.text_len.clear();
      EXPECT_EQ(plan.allowed_pairs(nullptr), oracle::Mask(full).count_allowed());
      // Video density: allowed video-video pairs over all of them, averaged over heads.
      const oracle::Mask mask(op);
      int64_t video = 0;
      const int64_t nv = c.latent.volume();
      for (int64_t h = 0; h < c.q_heads; ++h)
        for (int64_t i = 0; i < c.seq_len(); ++i)
          for (int64_t j = 0; j < c.seq_len(); ++j)
            if (!mask.token(i).text && !mask.token(j).text)
              video += mask.video_allowed(h, mask.token(i), mask.token(j));
      EXPECT_NEAR(plan.video_density(), double(video) / double(c.q_heads * nv * nv), 1e-12);
    }
}

/// Counts disagreements and keeps the first few descriptions (built only on failure).
struct Mismatches {
  int64_t count = 0;
  std::string first;
  template <class Message>
  void check(bool ok, Message&& message) {
    if (!ok && ++count <= 5) first += "\n  " + message();
  }
};

std::string str(const Dim3& d) {
  return std::to_string(d.t) + "," + std::to_string(d.h) + "," + std::to_string(d.w);
}

/// For every head and (query tile, key tile) block: the number of allowed token pairs by brute force, and
/// the library's key tiles, key boxes, block kinds and token-level answers must agree with it, both through
/// the Plan and through the header functions instantiated with the CUDA kernels' int32 index type.
void expect_tiles_match_mask(const Case& c) {
  SCOPED_TRACE(oracle::describe(c));
  const tilewise::Plan plan = make_plan(c);
  const oracle::Mask mask(oracle::to_oracle(c));
  const tilewise::PatternKind kind = plan.pattern().kind;
  const bool formulas = c.kind != Kind::block_list;  // block lists are tables, not header formulas
  const tilewise::TileGridT<int32_t> grid32(plan.grid());
  const int64_t nt = c.num_tiles();
  auto coord = [&](int64_t i) { return Dim3{i / (c.tiles(1) * c.tiles(2)), (i / c.tiles(2)) % c.tiles(1), i % c.tiles(2)}; };
  auto c32 = [](Dim3 d) { return tilewise::dim3_cast<int32_t>(d); };
  const auto masked = tilewise::BlockKind::masked;
  Mismatches bad;
  for (int64_t h = 0; h < c.q_heads; ++h) {
    const tilewise::HeadParams& hp = plan.head(h);
    std::vector<int64_t> allowed(nt * nt, 0), total(nt * nt, 0);
    for (int64_t i = 0; i < c.seq_len(); ++i)
      for (int64_t j = 0; j < c.seq_len(); ++j) {
        const oracle::Token &q = mask.token(i), &k = mask.token(j);
        if (q.text || k.text) continue;
        const bool ok = mask.video_allowed(h, q, k);
        const Dim3 qd{q.t, q.h, q.w}, kd{k.t, k.h, k.w};
        auto where = [&] { return "head " + std::to_string(h) + " query " + str(qd) + " key " + str(kd); };
        bad.check(plan.video_pair_allowed(h, qd, kd) == ok, where);
        if (formulas) bad.check(tilewise::video_pair_allowed<int32_t>(kind, hp, grid32, c32(qd), c32(kd)) == ok, [&] {
          return "int32 " + where();
        });
        allowed[q.tile * nt + k.tile] += ok;
        total[q.tile * nt + k.tile] += 1;
      }
    for (int64_t qt = 0; qt < nt; ++qt) {
      const std::vector<int32_t> keys = plan.key_tiles(h, qt);
      std::vector<int32_t> holding;  // key tiles holding at least one allowed key
      for (int64_t kt = 0; kt < nt; ++kt)
        if (allowed[qt * nt + kt] > 0) holding.push_back(static_cast<int32_t>(kt));
      auto where = [&] { return "head " + std::to_string(h) + " query tile " + std::to_string(qt); };
      bad.check(keys == holding, [&] {
        return where() + ": " + std::to_string(keys.size()) + " key tiles, " + std::to_string(holding.size()) +
               " tiles hold an allowed key";
      });
      const tilewise::KeyBoxes boxes = tilewise::key_boxes(kind, hp, plan.grid(), coord(qt));
      const tilewise::KeyBoxesT<int32_t> boxes32 = tilewise::key_boxes<int32_t>(kind, hp, grid32, c32(coord(qt)));
      for (int64_t kt = 0; kt < nt; ++kt) {
        const int64_t a = allowed[qt * nt + kt], n = total[qt * nt + kt];
        auto block = [&] {
          return where() + " key tile " + std::to_string(kt) + " (" + std::to_string(a) + " of " +
                 std::to_string(n) + " pairs allowed)";
        };
        if (formulas) {
          bad.check(boxes.contains(coord(kt)) == (a > 0), [&] { return "key_boxes, " + block(); });
          bad.check(boxes32.contains(c32(coord(kt))) == (a > 0), [&] { return "int32 key_boxes, " + block(); });
          if (a > 0)
            bad.check((tilewise::block_kind<int32_t>(kind, hp, grid32, c32(coord(qt)), c32(coord(kt))) == masked) ==
                          (a < n),
                      [&] { return "int32 block_kind, " + block(); });
        }
        if (a > 0)  // masked iff the block mixes allowed and forbidden pairs
          bad.check((plan.block_kind(h, coord(qt), coord(kt)) == masked) == (a < n),
                    [&] { return "block_kind, " + block(); });
      }
    }
  }
  EXPECT_EQ(bad.count, 0) << bad.first;
}

TEST_F(Semantics, KeyTilesBlockKindsAndPairsMatchMask) {
  for (Kind kind : {Kind::sliding_tile, Kind::attention_tile, Kind::dense, Kind::block_list})
    for (int rep = 0; rep < 25; ++rep) expect_tiles_match_mask(random_pattern_case(rng, kind));
}

TEST_F(Semantics, AttentionTileKeyBoxesExactOnLongFrameAxes) {
  // Many frames, few tokens per frame: global frames, local bands and their gaps in all combinations.
  for (int rep = 0; rep < 60; ++rep) {
    Case c;
    c.kind = Kind::attention_tile;
    c.latent = {uni(1, 20), uni(1, 2), uni(1, 2)};
    c.tile = {uni(1, 4), uni(1, 2), 1};
    c.q_heads = 2;
    c.heads = {oracle::HeadPattern{1, 1, 1, uni(0, c.latent.t + 1), uni(0, 4)},
               oracle::HeadPattern{1, 1, 1, uni(0, 3), uni(0, 2)}};
    expect_tiles_match_mask(c);
  }
}

TEST_F(Semantics, HugePatternParametersMeanWholeAxis) {
  // Any window >= 1 and any g, r >= 0 are valid; beyond the grid they all mean "every key" (dense).
  const int64_t huge[] = {(int64_t{1} << 31) + 5, int64_t{1} << 40, std::numeric_limits<int64_t>::max()};
  for (int64_t x : huge) {
    for (int which = 0; which < 4; ++which) {
      Case c;
      c.latent = {6, 3, 2};
      c.tile = {2, 2, 2};
      c.text = 2;
      c.kind = which == 0 ? Kind::sliding_tile : Kind::attention_tile;
      c.heads = {which == 0   ? oracle::HeadPattern{x, x, x, 0, 0}
                 : which == 1 ? oracle::HeadPattern{1, 1, 1, 0, x}   // radius
                 : which == 2 ? oracle::HeadPattern{1, 1, 1, x, 0}   // global frames
                              : oracle::HeadPattern{1, 1, 1, x, x}};
      SCOPED_TRACE("huge parameter " + std::to_string(x) + ", case " + std::to_string(which));
      const tilewise::Plan plan = make_plan(c);
      const int64_t n = c.latent.volume(), S = c.seq_len();
      EXPECT_EQ(plan.allowed_pairs(), S * S) << "dense";
      EXPECT_EQ(plan.allowed_pairs(), oracle::Mask(oracle::to_oracle(c)).count_allowed());
      EXPECT_DOUBLE_EQ(plan.video_density(), 1.0) << n << " video tokens";
      expect_tiles_match_mask(c);  // also the int32 instantiation the CUDA kernels use
    }
  }
}

// ---- the reverse question (backward): query tiles of a key tile -----------------------------------------

/// The reverse question: the query tiles whose window holds key tile c, by brute force over the spec's window.
TEST_F(Semantics, WindowRangeReverseIsTheTransposeOfWindowRange) {
  for (int64_t n = 1; n <= 12; ++n)
    for (int64_t k = 1; k <= 14; ++k)
      for (int64_t c = 0; c < n; ++c) {
        SCOPED_TRACE("n=" + std::to_string(n) + " k=" + std::to_string(k) + " key tile " + std::to_string(c));
        std::vector<int64_t> seeing;
        for (int64_t q = 0; q < n; ++q)
          if (oracle::in_window(q, c, k, n)) seeing.push_back(q);
        ASSERT_FALSE(seeing.empty());  // every key tile is seen (at least by itself)
        const tilewise::AxisRange r = tilewise::window_range_reverse(c, k, n);
        EXPECT_EQ(r.begin, seeing.front());
        EXPECT_EQ(r.end, seeing.back() + 1);
        EXPECT_EQ(r.size(), static_cast<int64_t>(seeing.size())) << "not one contiguous range";
        const tilewise::AxisRangeT<int32_t> r32 = tilewise::window_range_reverse<int32_t>(
            static_cast<int32_t>(c), static_cast<int32_t>(k), static_cast<int32_t>(n));
        EXPECT_EQ(r32.begin, r.begin);
        EXPECT_EQ(r32.end, r.end);
      }
}

/// Plan::query_tiles (and, for the formula patterns, query_boxes in both index types) must be exactly the
/// transpose of Plan::key_tiles: query tile qt is listed for key tile kt iff kt is a key tile of qt.
void expect_query_tiles_transpose_key_tiles(const Case& c) {
  SCOPED_TRACE(oracle::describe(c));
  const tilewise::Plan plan = make_plan(c);
  const tilewise::TileGrid& g = plan.grid();
  const tilewise::TileGridT<int32_t> g32(g);
  const int64_t nt = g.num_tiles();
  const bool formulas = c.kind != Kind::block_list;
  Mismatches bad;
  for (int64_t h = 0; h < c.q_heads; ++h) {
    std::vector<std::vector<int32_t>> transposed(nt);
    for (int64_t qt = 0; qt < nt; ++qt)
      for (int32_t kt : plan.key_tiles(h, qt)) transposed[kt].push_back(static_cast<int32_t>(qt));
    for (int64_t kt = 0; kt < nt; ++kt) {
      auto where = [&] { return "head " + std::to_string(h) + " key tile " + std::to_string(kt); };
      const std::vector<int32_t> queries = plan.query_tiles(h, kt);
      bad.check(queries == transposed[kt], [&] {
        return where() + ": query_tiles lists " + std::to_string(queries.size()) + " tiles, the transpose " +
               std::to_string(transposed[kt].size());
      });
      bad.check(plan.num_query_tiles(h, kt) == static_cast<int64_t>(transposed[kt].size()),
                [&] { return where() + ": num_query_tiles " + std::to_string(plan.num_query_tiles(h, kt)); });
      if (!formulas) continue;
      const tilewise::KeyBoxes boxes = tilewise::query_boxes(plan.pattern().kind, plan.head(h), g, g.tile_coord(kt));
      const tilewise::KeyBoxesT<int32_t> boxes32 = tilewise::query_boxes<int32_t>(
          plan.pattern().kind, plan.head(h), g32, tilewise::dim3_cast<int32_t>(g.tile_coord(kt)));
      bad.check(boxes.num_tiles() == static_cast<int64_t>(transposed[kt].size()), [&] { return "query_boxes size, " + where(); });
      bad.check(boxes32.num_tiles() == static_cast<int32_t>(transposed[kt].size()), [&] { return "int32 query_boxes size, " + where(); });
      for (int64_t i = 0; i < boxes.num_tiles() && i < static_cast<int64_t>(transposed[kt].size()); ++i) {
        bad.check(g.tile_index(boxes.tile(i)) == transposed[kt][i], [&] { return "query_boxes order, " + where(); });
        bad.check(g32.tile_index(boxes32.tile(static_cast<int32_t>(i))) == transposed[kt][i],
                  [&] { return "int32 query_boxes order, " + where(); });
      }
    }
  }
  EXPECT_EQ(bad.count, 0) << bad.first;
}

TEST_F(Semantics, QueryTilesAreTheTransposeOfKeyTiles) {
  for (Kind kind : {Kind::sliding_tile, Kind::attention_tile, Kind::dense, Kind::block_list})
    for (int rep = 0; rep < 25; ++rep) expect_query_tiles_transpose_key_tiles(oracle::random_case(rng, kind, tilewise::DType::f32));
  for (int rep = 0; rep < 40; ++rep) {  // larger partial grids, windows odd, even and beyond the grid
    Case c;
    c.kind = Kind::sliding_tile;
    c.latent = {uni(1, 30), uni(1, 30), uni(1, 30)};
    c.tile = {uni(1, 6), uni(1, 6), uni(1, 6)};
    c.q_heads = 2;
    c.heads = {{uni(1, c.tiles(0) + 2), uni(1, c.tiles(1) + 2), uni(1, c.tiles(2) + 2), 0, 0},
               {uni(1, 4), uni(1, 4), uni(1, 4), 0, 0}};
    expect_query_tiles_transpose_key_tiles(c);
  }
  for (int rep = 0; rep < 30; ++rep) {  // attention tile on long frame axes
    Case c;
    c.kind = Kind::attention_tile;
    c.latent = {uni(1, 20), uni(1, 2), uni(1, 2)};
    c.tile = {uni(1, 4), uni(1, 2), 1};
    c.heads = {oracle::HeadPattern{1, 1, 1, uni(0, c.latent.t + 1), uni(0, 4)}};
    expect_query_tiles_transpose_key_tiles(c);
  }
  Case c;  // block lists: a per-global-head table read from head_offset
  c.kind = Kind::block_list;
  c.q_heads = 2;
  c.head_offset = 2;
  c.blocks = oracle::random_blocks(rng, 4, c.num_tiles());
  expect_query_tiles_transpose_key_tiles(c);
}

TEST_F(Semantics, HunyuanGridKeyTileIsSeenBy8To80QueryTiles) {
  // Window 3x3x3 on the 5x6x10 tile grid of a 30x48x80 latent in 6x8x8 tiles: each query tile sees 27 key tiles,
  // but a key tile is seen by a varying number of query tiles (the inward shift at the borders piles windows up
  // on the second and second-to-last tiles): per axis 2,3,5,3,2 / 2,3,4,4,3,2 / 2,3,4,3,3,3,3,4,3,2.
  Case c = Case{};
  c.kind = Kind::sliding_tile;
  c.latent = {30, 48, 80};
  c.tile = {6, 8, 8};
  c.heads = {{3, 3, 3, 0, 0}};
  const tilewise::Plan plan = make_plan(c);
  ASSERT_EQ(plan.grid().tiles, (Dim3{5, 6, 10}));
  size_t fewest = SIZE_MAX, most = 0, total = 0, at_most = 0;
  for (int64_t kt = 0; kt < plan.grid().num_tiles(); ++kt) {
    const size_t n = plan.query_tiles(0, kt).size();
    fewest = std::min(fewest, n);
    most = std::max(most, n);
    total += n;
    at_most += n == 80;
  }
  EXPECT_EQ(fewest, 8u);  // corner key tiles: 2 x 2 x 2
  EXPECT_EQ(most, 80u);   // 5 x 4 x 4, at t = 2, h in {2, 3}, w in {2, 7}
  EXPECT_EQ(at_most, 4u);
  EXPECT_EQ(total, 300u * 27u);  // the transpose holds as many (query, key) tile pairs
  EXPECT_EQ(plan.query_tiles(0, plan.grid().tile_index({2, 2, 2})).size(), 80u);
  EXPECT_EQ(plan.query_tiles(0, 0).size(), 8u);
}

}  // namespace
