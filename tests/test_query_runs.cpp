// Query runs (include/tilewise/query_runs.hpp) against the oracle's token-level mask: a run's tokens see exactly the
// same keys, runs partition the latent in raster order, and the blocks cut from them cover each run exactly.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "oracle.hpp"
#include "oracle_case.hpp"
#include "tilewise/query_runs.hpp"

namespace {

using oracle::Case;
using oracle::Kind;

/// Key tokens (raster indices) query token `q` may see, per the oracle: one bit per video key.
std::vector<bool> allowed_keys(const oracle::Mask& mask, int64_t head, int64_t q, int64_t tokens) {
  std::vector<bool> keys(static_cast<size_t>(tokens));
  for (int64_t k = 0; k < tokens; ++k) keys[static_cast<size_t>(k)] = mask.video_allowed(head, mask.token(q), mask.token(k));
  return keys;
}

class QueryRuns : public ::testing::Test {
 protected:
  const uint64_t seed = oracle::fresh_seed();
  oracle::Rng rng{seed};
  ::testing::ScopedTrace trace{__FILE__, __LINE__, oracle::seed_note(seed)};
};

TEST_F(QueryRuns, EveryRunsTokensSeeTheSameKeysAndRunsPartitionTheLatent) {
  for (Kind kind : {Kind::dense, Kind::sliding_tile, Kind::attention_tile})
    for (int i = 0; i < 12; ++i) {
      Case c = oracle::random_case(rng, kind, tilewise::DType::f32);
      c.text = 0, c.text_len.clear(), c.tiled = false;  // video tokens at positions 0.. in raster order
      SCOPED_TRACE(oracle::describe(c));
      const oracle::Mask mask(oracle::to_oracle(c));
      const tilewise::Pattern pattern = oracle::to_pattern(c);
      const tilewise::TileGrid g(c.latent, c.tile);
      const int64_t tokens = g.num_tokens();
      for (size_t h = 0; h < pattern.heads.size(); ++h) {
        const std::vector<tilewise::QueryRun> runs = tilewise::query_runs(pattern.kind, pattern.heads[h], g);
        ASSERT_FALSE(runs.empty());
        EXPECT_EQ(runs.front().begin, 0);
        EXPECT_EQ(runs.back().end, tokens);
        std::vector<bool> previous;
        for (size_t r = 0; r < runs.size(); ++r) {
          const tilewise::QueryRun& run = runs[r];
          ASSERT_LT(run.begin, run.end);
          if (r > 0) EXPECT_EQ(run.begin, runs[r - 1].end) << "run " << r;
          EXPECT_EQ(run.tile, g.tile_of(g.raster_coord(run.begin)));
          const std::vector<bool> keys = allowed_keys(mask, static_cast<int64_t>(h), run.begin, tokens);
          for (int64_t q = run.begin + 1; q < run.end; ++q)
            ASSERT_EQ(allowed_keys(mask, static_cast<int64_t>(h), q, tokens), keys) << "run " << r << ", token " << q;
          // Maximal: the runs before and after see other keys. For the attention tile the run's tile stands for its
          // key walk, so two frames of equal keys in tiles of different key boxes stay apart: not checked there.
          if (kind != Kind::attention_tile && r > 0) EXPECT_NE(keys, previous) << "runs " << r - 1 << " and " << r;
          previous = keys;
        }
      }
    }
}

TEST_F(QueryRuns, BlocksCutFromARunCoverItExactlyAndStayInsideIt) {
  for (int i = 0; i < 200; ++i) {
    const int64_t rows = oracle::uniform(rng, 1, 9), size = oracle::uniform(rng, rows, 60), begin = oracle::uniform(rng, 0, 99);
    const tilewise::QueryRun run{begin, begin + size, {}};
    const int64_t blocks = tilewise::run_blocks({run}, rows);
    ASSERT_EQ(blocks, (size + rows - 1) / rows);
    std::vector<int> covered(static_cast<size_t>(size), 0);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = tilewise::run_block_begin(run, b, rows);
      ASSERT_GE(first, run.begin);
      ASSERT_LE(first + rows, run.end);
      for (int64_t x = first; x < first + rows; ++x) ++covered[static_cast<size_t>(x - run.begin)];
    }
    for (int64_t x = 0; x < size; ++x) EXPECT_GE(covered[static_cast<size_t>(x)], 1) << "row " << x;
  }
  EXPECT_EQ(tilewise::run_blocks({tilewise::QueryRun{0, 100, {}}, tilewise::QueryRun{100, 110, {}}}, 64), -1);
}

// The benchmark rows that motivate runs: CogVideoX's window spans its tile grid's columns (two runs per frame, 11
// blocks of 128 rows instead of 12 tiles' blocks); HunyuanVideo's 3x3x3 window on 10 tile columns leaves runs of
// one or two tile row segments (8 or 16 tokens), too short to cut.
TEST(QueryRunsRows, CogVideoXHasTwoRunsPerFrameAndHunyuanNone) {
  const tilewise::TileGrid cog({13, 30, 45}, {1, 8, 16});
  tilewise::HeadParams p;
  p.window = {13, 3, 3};
  const auto runs = tilewise::query_runs(tilewise::PatternKind::sliding_tile, p, cog);
  ASSERT_EQ(runs.size(), 26u);
  for (size_t f = 0; f < 13; ++f) {
    EXPECT_EQ(runs[2 * f].size(), 720) << "frame " << f;  // token rows 0-15: tile rows 0 and 1 see tile rows 0-2
    EXPECT_EQ(runs[2 * f + 1].size(), 630) << "frame " << f;  // rows 16-29: tile rows 2 and 3 see 1-3
  }
  EXPECT_EQ(tilewise::run_blocks(runs, 128), 13 * 11);  // against 13 x 4 x 3 = 156 tiles of one block each

  const tilewise::TileGrid hunyuan({30, 48, 80}, {6, 8, 8});
  p.window = {3, 3, 3};
  const auto short_runs = tilewise::query_runs(tilewise::PatternKind::sliding_tile, p, hunyuan);
  EXPECT_EQ(short_runs.front().size(), 16);  // tile columns 0 and 1: both windows shifted to [0, 3) at the border
  EXPECT_EQ(short_runs[1].size(), 8);
  EXPECT_EQ(tilewise::run_blocks(short_runs, 128), -1);
}

}  // namespace
