// The CPU backend (tilewise::Plan on Device::cpu) against the independent float64 oracle (oracle.hpp), on
// small randomized problems with fresh random inputs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "buffer.hpp"
#include "case_families.hpp"
#include "oracle_case.hpp"

namespace {

using oracle::Buffer;
using oracle::Case;
using oracle::Kind;
using oracle::Outputs;
using oracle::random_inputs;
using oracle::StorageKind;
using oracle::for_each_element;
using oracle::frames;
using oracle::kAllDtypes;
using oracle::sta;
using oracle::window;
using tilewise::DType;

constexpr double kSentinel = 1234.5;

/// Runs the case on the CPU backend and on the oracle with the same inputs; the output starts as a sentinel.
Outputs run_both(const Case& c, const Buffer& in) {
  const oracle::Views views = oracle::make_views(c);
  Outputs out{Buffer(in.st, views.out_size), std::vector<float>(c.batch * c.q_heads * c.seq_len(), NAN), {}, {}};
  for (int64_t i = 0; i < out.o.size(); ++i) out.o.set(i, kSentinel);

  const tilewise::Plan plan(oracle::to_problem(c), oracle::to_pattern(c), tilewise::Device::cpu);
  if (c.storage != StorageKind::fused) {  // the library's default strides are the layout's
    auto st = [](const oracle::Strides3& s) { return tilewise::Strides{s.batch, s.seq, s.head, 1}; };
    EXPECT_EQ(plan.problem().q, st(views.q));
    EXPECT_EQ(plan.problem().k, st(views.k));
    EXPECT_EQ(plan.problem().o, st(views.o));
  }
  plan.run({in.ptr(0), in.ptr(views.k_offset), in.ptr(views.v_offset), out.o.ptr(), out.lse.data(),
            c.text_len.empty() ? nullptr : c.text_len.data()});

  const std::vector<double> x = in.values();
  out.ref_o.assign(views.out_size, NAN);
  out.ref_lse.assign(out.lse.size(), NAN);
  oracle::attention(oracle::to_oracle(c), x.data(), x.data() + views.k_offset, x.data() + views.v_offset,
                    out.ref_o.data(), out.ref_lse.data());
  return out;
}

/// Compares library and oracle outputs with the tolerance of the data type; checks that every output
/// element is written and finite and that gaps of a strided output are untouched.
void expect_matches(const Case& c, const Outputs& r) {
  const oracle::Views views = oracle::make_views(c);
  const oracle::Storage st = oracle::storage_of(c.dtype);
  std::vector<bool> covered(views.out_size, false);
  double max_err = 0, err2 = 0, ref2 = 0, worst_rounding = 0;
  int64_t not_finite = 0;
  for_each_element(c, views.o, c.q_heads, [&](int64_t i) {
    covered[i] = true;
    const double got = r.o.at(i), want = r.ref_o[i];
    if (!std::isfinite(got)) ++not_finite;
    max_err = std::max(max_err, std::abs(got - want));
    err2 += (got - want) * (got - want);
    ref2 += want * want;
    // 16-bit outputs: the f32 result rounded to nearest, so within half a unit of the oracle (+ f32 slack).
    const double half_ulp = 0.5 * oracle::ulp(st, std::max(std::abs(got), std::abs(want)));
    worst_rounding = std::max(worst_rounding, std::abs(got - want) / (half_ulp + 2e-5));
  });
  int64_t gaps_touched = 0;
  for (int64_t i = 0; i < views.out_size; ++i)
    if (!covered[i] && r.o.at(i) != oracle::round_trip(st, kSentinel)) ++gaps_touched;
  double lse_err = 0;
  int64_t lse_not_finite = 0;  // the lse buffer starts as NaN
  for (size_t i = 0; i < r.lse.size(); ++i) {
    lse_not_finite += !std::isfinite(r.lse[i]);
    lse_err = std::max(lse_err, std::abs(r.lse[i] - r.ref_lse[i]) / std::max(1.0, std::abs(r.ref_lse[i])));
  }

  EXPECT_EQ(not_finite, 0) << "outputs not finite";
  EXPECT_EQ(lse_not_finite, 0) << "lse not written or not finite";
  EXPECT_EQ(gaps_touched, 0) << "elements outside the output view were written";
  EXPECT_GT(ref2, 0.0);
  switch (c.dtype) {
    case DType::f64:
      EXPECT_LE(max_err, 1e-12);
      EXPECT_LE(lse_err, 1e-6);  // lse is float32
      break;
    case DType::f32:
      EXPECT_LE(max_err, 1e-5);
      EXPECT_LE(lse_err, 1e-5);
      break;
    case DType::bf16:
    case DType::f16:
      EXPECT_LE(std::sqrt(err2 / ref2), 1e-2);
      EXPECT_LE(worst_rounding, 1.0) << "an output is not the oracle value rounded to nearest";
      EXPECT_LE(lse_err, 1e-4);
      break;
  }
}

void check_case(const Case& c, oracle::Rng& rng) {
  SCOPED_TRACE(oracle::describe(c));
  expect_matches(c, run_both(c, random_inputs(c, rng)));
}

/// The sliding-tile grid of this file's families: 5x6x7 in 2x4x3 tiles (grid 3x2x3, partial on every axis).
constexpr tilewise::Dim3 kLatent{5, 6, 7};

class CpuReference : public ::testing::Test {
 protected:
  const uint64_t seed = oracle::fresh_seed();
  oracle::Rng rng{seed};
  ::testing::ScopedTrace trace{__FILE__, __LINE__, oracle::seed_note(seed)};
};

TEST_F(CpuReference, RandomProblemsEveryPatternAndDtype) {
  oracle::for_each_random_case(rng, 10, [&](const Case& c, int) { check_case(c, rng); });
}

TEST_F(CpuReference, PartialTilesOnEveryAxisOddAndEvenWindows) {
  for (const Case& c : oracle::partial_tile_cases()) check_case(c, rng);
}

TEST_F(CpuReference, WindowLargerThanGridIsWholeAxis) {
  for (const Case& c : oracle::window_larger_than_grid_cases(kLatent)) check_case(c, rng);
}

TEST_F(CpuReference, OneTileAxis) {
  check_case(sta({window(3, 3, 3)}, {2, 6, 7}, {2, 4, 3}), rng);  // t: one full tile
  check_case(sta({window(1, 2, 1)}, {5, 1, 7}, {2, 4, 3}), rng);  // h: one partial tile (H < th)
  check_case(sta({window(2, 1, 2)}, {4, 5, 2}, {1, 2, 3}), rng);  // w: one partial tile
}

TEST_F(CpuReference, TextFirstAndLastWithPerBatchLengths) {
  for (const Case& c : oracle::text_first_last_cases(kLatent, {2, 4, 3})) check_case(c, rng);
}

TEST_F(CpuReference, LongTextCapacity) {  // CogVideoX-sized text: text rows span several work chunks
  for (bool first : {false, true}) {
    Case c = sta({window(1, 2, 1)}, {3, 4, 5}, {2, 4, 3});
    c.head_dim = 64;
    c.batch = 3;
    c.text = 226;
    c.text_first = first;
    c.text_len = {0, 226, 131};
    check_case(c, rng);
  }
}

TEST_F(CpuReference, GroupedQueryAttentionWithPerHeadWindows) {
  for (const Case& c : oracle::gqa_per_head_window_cases(kLatent)) check_case(c, rng);
}

TEST_F(CpuReference, HeadDims) {
  for (const Case& c : oracle::head_dim_cases(kLatent)) check_case(c, rng);
}

TEST_F(CpuReference, StorageLayoutsAndStridedViews) {
  for (const Case& c : oracle::storage_cases(kLatent)) check_case(c, rng);
}

TEST_F(CpuReference, AttentionTileGlobalFramesRadiusAndFrameTiles) {
  for (const Case& c : oracle::attention_tile_cases({})) check_case(c, rng);
}

TEST_F(CpuReference, ExplicitBlockLists) {
  for (const Case& c : oracle::dense_and_block_list_cases(rng, {})) check_case(c, rng);
}

TEST_F(CpuReference, HeadOffsetSelectsGlobalTableEntries) {
  for (const Case& c : oracle::head_offset_cases(rng, kLatent)) check_case(c, rng);
}

TEST_F(CpuReference, HugeWindowsAndFrameParametersAreDense) {
  // Valid values far beyond the grid ("every key"): the result must be dense attention, not garbage.
  for (int64_t x : {int64_t{1} << 31, std::numeric_limits<int64_t>::max()}) {
    check_case(sta({window(x, x, x)}, kLatent), rng);
    for (auto hp : {frames(0, x), frames(x, 0)}) {
      Case c;
      c.kind = Kind::attention_tile;
      c.heads = {hp};
      c.latent = {6, 2, 3};
      c.tile = {2, 2, 2};
      check_case(c, rng);
    }
  }
}

TEST_F(CpuReference, CustomScale) {
  for (const Case& c : oracle::custom_scale_cases(kLatent)) check_case(c, rng);
}

TEST_F(CpuReference, DtypesAndOutputRounding) {
  for (DType dtype : kAllDtypes) {
    Case c = sta({window(3, 1, 2)}, kLatent);
    c.dtype = dtype;
    c.head_dim = 128;
    c.text = 4;
    check_case(c, rng);
  }
}

/// tile() the inputs, run with TokenOrder::tiled, untile() the output: equals the raster run.
TEST_F(CpuReference, TiledOrderMatchesRasterAfterTile) {
  for (DType dtype : {DType::f64, DType::bf16})
    for (bool text_first : {false, true}) {
      Case c = sta({window(3, 1, 2), window(2, 2, 2)}, {4, 8, 6}, {2, 4, 3});
      c.dtype = dtype;
      c.q_heads = 2;
      c.kv_heads = 1;
      c.batch = 2;
      c.text = 3;
      c.text_first = text_first;
      c.text_len = {3, 1};
      SCOPED_TRACE(oracle::describe(c));
      const Buffer raster_in = random_inputs(c, rng);
      const Outputs raster = run_both(c, raster_in);
      expect_matches(c, raster);

      // Tile q, k and v (k/v have kv_heads heads per position); the oracle runs on the tiled inputs too.
      const oracle::Views views = oracle::make_views(c);
      tilewise::Problem pq = oracle::to_problem(c), pkv = pq;
      pkv.q_heads = pkv.kv_heads;
      Buffer tiled_in = raster_in;
      for (int64_t off : {int64_t{0}, views.k_offset, views.v_offset})
        tilewise::tile(off == 0 ? pq : pkv, raster_in.ptr(off), tiled_in.ptr(off));
      Case ct = c;
      ct.tiled = true;
      const Outputs tiled = run_both(ct, tiled_in);
      expect_matches(ct, tiled);

      Buffer untiled = tiled.o;
      tilewise::untile(pq, tiled.o.ptr(), untiled.ptr());
      double diff = 0;
      for (int64_t i = 0; i < untiled.size(); ++i) diff = std::max(diff, std::abs(untiled.at(i) - raster.o.at(i)));
      EXPECT_LE(diff, dtype == DType::f64 ? 1e-12 : oracle::ulp(oracle::Storage::bf16, 1.0));  // one bf16 step

      // LSE of the tiled run sits at the tiled position of each token.
      const oracle::Mask raster_mask(oracle::to_oracle(c)), tiled_mask(oracle::to_oracle(ct));
      std::vector<int64_t> raster_pos_of_tiled(c.seq_len());
      for (int64_t s = 0; s < c.seq_len(); ++s)
        for (int64_t r = 0; r < c.seq_len(); ++r) {
          const oracle::Token &a = tiled_mask.token(s), &b = raster_mask.token(r);
          if (a.text == b.text && a.text_index == b.text_index && a.t == b.t && a.h == b.h && a.w == b.w)
            raster_pos_of_tiled[s] = r;
        }
      double lse_diff = 0;
      for (int64_t bh = 0; bh < c.batch * c.q_heads; ++bh)
        for (int64_t s = 0; s < c.seq_len(); ++s)
          lse_diff = std::max(lse_diff, std::abs(double(tiled.lse[bh * c.seq_len() + s]) -
                                                 raster.lse[bh * c.seq_len() + raster_pos_of_tiled[s]]));
      EXPECT_LE(lse_diff, 1e-5);
    }
}

}  // namespace
