// GPU tests of the backward pass (Plan::run_backward) of the Hopper kernel (Device::cuda) and of the fp32 GPU
// reference (Device::cuda_reference). Small problems are judged against the CPU backward on the same 16-bit
// inputs and against a float64 CPU run on the upcast inputs (the spec's accuracy rule, see gradcheck::judge);
// the HunyuanVideo-size problem against the GPU reference. Every run poisons o, lse, dq, dk, dv and the
// workspace with NaN bytes first and checks that every element was written, nothing outside the strided views
// was, and keys no query sees get exactly zero dk and dv. Inputs are fresh random numbers per run; the seed is
// printed on failure (replay with TILEWISE_TEST_SEED). Tests skip visibly where there is no GPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include "grad_harness.hpp"
#ifdef TILEWISE_WITH_CUDA
#include "cuda_shared_leftovers.hpp"
#endif
#include "oracle_case.hpp"
#include "tilewise/tilewise.hpp"

namespace {

using gradcheck::Inputs;
using gradcheck::Outputs;
using gradcheck::Workbench;
using tilewise::Device;
using tilewise::Dim3;
using tilewise::DType;

#define SKIP_WITHOUT_GPU() \
  if (!tilewise::cuda_available()) GTEST_SKIP() << "no CUDA device (or built without CUDA): GPU test skipped"

// ---- cases ------------------------------------------------------------------------------------------------

/// A bf16 bshd problem without text, dense until a pattern is set.
oracle::Case base(Dim3 latent, Dim3 tile, int64_t q_heads, int64_t kv_heads, int64_t head_dim) {
  oracle::Case c;
  c.latent = latent, c.tile = tile;
  c.q_heads = q_heads, c.kv_heads = kv_heads, c.head_dim = head_dim;
  c.dtype = DType::bf16;
  c.kind = oracle::Kind::dense;
  return c;
}

/// Sliding tile with one window for all heads or one per (global) head.
oracle::Case& windows(oracle::Case& c, const std::vector<Dim3>& per_head) {
  c.kind = oracle::Kind::sliding_tile;
  c.heads.clear();
  for (const Dim3& w : per_head) c.heads.push_back({w.t, w.h, w.w, 0, 0});
  return c;
}

/// Attention tile with (global frames, radius) for all heads or one per head.
oracle::Case& attention_tile(oracle::Case& c, const std::vector<std::pair<int64_t, int64_t>>& per_head) {
  c.kind = oracle::Kind::attention_tile;
  c.heads.clear();
  for (auto [g, r] : per_head) c.heads.push_back({1, 1, 1, g, r});
  return c;
}

/// Text of `capacity` positions, first or last; `lens` (one per batch element, which sets the batch) or none.
oracle::Case& text(oracle::Case& c, int64_t capacity, bool first, std::vector<int32_t> lens = {}) {
  c.text = capacity;
  c.text_first = first;
  if (!lens.empty()) c.batch = static_cast<int64_t>(lens.size());
  c.text_len = std::move(lens);
  return c;
}

struct NamedCase {
  std::string name;
  oracle::Case c;
  bool dlse = false;  // run with an upstream gradient of the lse
};

std::vector<NamedCase> small_cases() {
  std::vector<NamedCase> v;
  auto add = [&](std::string name, oracle::Case c, bool dlse) { v.push_back({std::move(name), std::move(c), dlse}); };
  {
    oracle::Case c = base({8, 16, 40}, {2, 8, 8}, 2, 2, 128);
    add("sta_odd_window", windows(c, {{3, 3, 3}}), true);
  }
  {
    oracle::Case c = base({9, 21, 27}, {2, 8, 8}, 2, 2, 128);  // 5x3x4 tiles, the last partial on every axis
    add("sta_even_window_partial_every_axis", windows(c, {{4, 2, 2}}), false);
  }
  {
    oracle::Case c = base({6, 16, 16}, {2, 8, 8}, 4, 2, 64);
    c.storage = oracle::StorageKind::bhsd;
    windows(c, {{1, 1, 1}, {3, 3, 3}, {2, 2, 2}, {1, 2, 1}});
    add("sta_per_head_windows_gqa_bhsd_text_last", text(c, 20, false, {20, 7}), true);
  }
  {
    oracle::Case c = base({2, 16, 16}, {2, 8, 8}, 2, 1, 64);
    add("sta_window_larger_than_grid", windows(c, {{5, 5, 5}, {1, 9, 1}}), false);
  }
  {
    // Tiles cut short on every axis: 8 classes of tile shapes, blocks of fewer than a whole tile of tokens.
    oracle::Case c = base({15, 21, 20}, {6, 8, 8}, 2, 1, 64);
    windows(c, {{2, 2, 2}});
    add("partial_tile_classes_gqa_d64_text_last", text(c, 40, false, {33, 0}), true);
  }
  {
    // The same at D 64 with GQA, shrunk so that racecheck finishes (the case above did not in 330 s): every axis cut
    // (7 = 6 + 1, 10 = 8 + 2), two query heads on one kv head, 40 text positions last (33 valid).
    oracle::Case c = base({7, 10, 10}, {6, 8, 8}, 2, 1, 64);
    windows(c, {{2, 2, 2}});
    add("partial_tile_classes_gqa_d64_text_last_small", text(c, 40, false, {33}), true);
  }
  {
    oracle::Case c = base({9, 13, 12}, {6, 8, 8}, 2, 2, 128);
    windows(c, {{2, 2, 2}});
    add("partial_tile_classes_d128_text_first", text(c, 200, true, {200, 150}), false);
  }
  {
    // The same tile classes at a size compute-sanitizer's racecheck should finish in a device call (the case above
    // took more than 270 s under it, and this one at 9x13x12 more than 240 s; racecheck ran a 936-token D 96 case
    // in 130 s): the smallest latent with every axis cut (7 = 6 + 1, 10 = 8 + 2), one head, one batch element,
    // 70 text positions first (a 64-row block and a partial one; 50 valid).
    oracle::Case c = base({7, 10, 10}, {6, 8, 8}, 1, 1, 128);
    windows(c, {{2, 2, 2}});
    add("partial_tile_classes_d128_text_first_small", text(c, 70, true, {50}), true);
  }
  {
    oracle::Case c = base({4, 16, 16}, {2, 8, 8}, 2, 2, 128);
    windows(c, {{1, 2, 1}});
    add("text_first_len0_full_partial", text(c, 130, true, {0, 130, 77}), true);
  }
  {
    oracle::Case c = base({4, 16, 16}, {2, 8, 8}, 4, 1, 96);
    windows(c, {{1, 1, 1}});
    add("text_last_full_partial_len0_gqa_hkv1_d96", text(c, 40, false, {40, 17, 0}), true);
  }
  {
    oracle::Case c = base({6, 16, 16}, {2, 8, 8}, 2, 2, 96);
    c.dtype = DType::f16;
    add("f16_d96", windows(c, {{2, 1, 2}}), true);
  }
  {
    oracle::Case c = base({6, 16, 16}, {2, 8, 8}, 2, 2, 64);
    c.dtype = DType::f16;
    c.storage = oracle::StorageKind::bhsd;
    windows(c, {{3, 1, 1}});
    add("f16_d64_bhsd_text_first", text(c, 24, true, {5}), false);
  }
  {
    oracle::Case c = base({6, 16, 24}, {2, 8, 8}, 4, 2, 128);
    c.dtype = DType::f16;
    add("f16_d128_gqa", windows(c, {{3, 3, 3}}), false);
  }
  {
    oracle::Case c = base({5, 16, 16}, {1, 8, 16}, 2, 2, 128);  // tt = 1: every block wholly in or out
    add("attention_tile_tt1", attention_tile(c, {{1, 0}}), true);
  }
  {
    oracle::Case c = base({7, 16, 16}, {2, 8, 8}, 2, 2, 128);  // tt = 2: blocks that need the frame mask
    attention_tile(c, {{1, 0}, {0, 1}});
    add("attention_tile_tt2_masked_blocks_text", text(c, 16, false), false);
  }
  {
    oracle::Case c = base({9, 13, 8}, {6, 8, 8}, 2, 2, 96);
    add("attention_tile_partial_frames_d96", attention_tile(c, {{1, 0}, {2, 2}}), true);
  }
  {
    // D 64 has two reduce kernels: with the frame pass (attention-tile plans, this case) and without (the others)
    oracle::Case c = base({7, 16, 16}, {2, 8, 8}, 2, 1, 64);
    attention_tile(c, {{1, 0}, {0, 1}});
    add("attention_tile_tt2_masked_blocks_gqa_d64", text(c, 16, true), true);
  }
  {
    oracle::Case c = base({4, 16, 16}, {2, 8, 8}, 2, 2, 128);
    add("dense_text_last", text(c, 50, false, {50, 3}), false);
  }
  {
    oracle::Case c = base({3, 8, 8}, {2, 8, 8}, 4, 1, 64);
    c.scale = 0.2;
    add("dense_gqa_text_first_d64_custom_scale", text(c, 17, true), true);
  }
  {
    // Random key tiles per (head, query tile), always including the query's own tile.
    oracle::Case c = base({4, 16, 24}, {2, 8, 8}, 4, 2, 128);
    c.kind = oracle::Kind::block_list;
    oracle::Rng rng(7);
    const int64_t n = c.num_tiles();
    c.blocks.assign(4, std::vector<std::vector<int64_t>>(n));
    for (auto& head : c.blocks)
      for (int64_t qt = 0; qt < n; ++qt)
        for (int64_t kt = 0; kt < n; ++kt)
          if (kt == qt || oracle::uniform(rng, 0, 2) == 0) head[qt].push_back(kt);
    add("block_list_per_head_gqa", c, true);
  }
  {
    // One table for all heads in which no query tile lists the last key tile: its keys get dk = dv = 0.
    oracle::Case c = base({4, 16, 16}, {2, 8, 8}, 2, 1, 128);
    c.kind = oracle::Kind::block_list;
    const int64_t n = c.num_tiles();
    c.blocks.assign(1, std::vector<std::vector<int64_t>>(n));
    for (int64_t qt = 0; qt < n; ++qt) c.blocks[0][qt] = qt == n - 1 ? std::vector<int64_t>{0, 1} : std::vector<int64_t>{qt, (qt + 3) % (n - 1)};
    for (auto& keys : c.blocks[0]) std::sort(keys.begin(), keys.end()), keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
    add("block_list_unseen_key_tile", c, false);
    // The same at D 64, where the reduce kernel issues a block's GEMMs before reading its record, so an item with no
    // streamed block is recognised up front (streams_any).
    c.head_dim = 64;
    add("block_list_unseen_key_tile_gqa_d64", c, true);
  }
  {
    // 6x8x8 tiles at D 128 have three owned 128-key blocks each: the units of the reduce kernel in clusters
    // (TILEWISE_HOPPER_BWD_CLUSTER), whose CTAs share their streamed blocks. Per-head block lists with GQA, in which
    // neither query head of kv head 0 lists the last key tile (its three CTAs stream nothing: zero gradients).
    oracle::Case c = base({6, 16, 24}, {6, 8, 8}, 4, 2, 128);
    c.kind = oracle::Kind::block_list;
    oracle::Rng rng(11);
    const int64_t n = c.num_tiles();
    c.blocks.assign(4, std::vector<std::vector<int64_t>>(n));
    for (int64_t h = 0; h < 4; ++h)
      for (int64_t qt = 0; qt < n; ++qt)
        for (int64_t kt = 0; kt < n; ++kt) {
          const bool unseen = h < 2 && kt == n - 1;
          if (!unseen && (kt == qt || kt == 0 || oracle::uniform(rng, 0, 2) == 0)) c.blocks[h][qt].push_back(kt);
        }
    add("tile_units_block_list_gqa_unseen", c, true);
  }
  {
    // The same units with per-head windows, GQA, bhsd, and 100 text rows last: one text block, so two of its unit's
    // three CTAs own no rows and only take part in the stream.
    oracle::Case c = base({6, 16, 24}, {6, 8, 8}, 4, 2, 128);
    c.storage = oracle::StorageKind::bhsd;
    windows(c, {{1, 1, 1}, {1, 2, 3}, {1, 1, 2}, {1, 2, 1}});
    add("tile_units_windows_gqa_bhsd_text_last", text(c, 100, false, {100, 37}), true);
  }
  {
    // The case above shrunk for racecheck (it ran past 455 s alone on a GPU; the 770-token D 128 case above took
    // 169 s): 6x8x8 tiles at D 128 (three owned 128-key blocks, the second tile cut to 6x8x2), two query heads on one
    // kv head with a window each, bhsd, 40 text rows last of which 37 are valid.
    oracle::Case c = base({6, 8, 10}, {6, 8, 8}, 2, 1, 128);
    c.storage = oracle::StorageKind::bhsd;
    windows(c, {{1, 1, 1}, {1, 1, 2}});
    add("tile_units_small_windows_gqa_bhsd_text_last", text(c, 40, false, {37}), true);
  }
  {
    oracle::Case c = base({4, 16, 16}, {2, 8, 8}, 2, 2, 128);
    c.tiled = true;
    windows(c, {{1, 1, 2}});
    add("tiled_order_text_last", text(c, 8, false), false);
  }
  {
    // q, k, v in one padded [B, S, Hq + 2 Hkv, D] buffer (and dq, dk, dv likewise), o and dout padded too.
    oracle::Case c = base({4, 16, 16}, {2, 8, 8}, 2, 1, 64);
    c.storage = oracle::StorageKind::fused;
    windows(c, {{2, 2, 2}});
    add("fused_padded_views", text(c, 8, false, {5, 8}), true);
  }
  {
    // Sequence parallelism: local heads 2 and 3 of a 4-head table.
    oracle::Case c = base({6, 16, 16}, {2, 8, 8}, 2, 2, 128);
    c.head_offset = 2;
    add("head_offset_per_head_windows", windows(c, {{1, 1, 1}, {1, 1, 1}, {3, 1, 2}, {2, 2, 1}}), false);
  }
  return v;
}

// ---- checks -----------------------------------------------------------------------------------------------

/// Structure (every element written, nothing outside the views, unseen keys zero) and accuracy of one run.
void expect_sound_and_accurate(const oracle::Case& c, const Outputs& got, const Outputs& half, const Outputs& exact,
                               const std::string& label) {
  for (const std::string& line : gradcheck::structural_problems(c, got, gradcheck::small_enough_for_full_mask(c)))
    ADD_FAILURE() << label << ": " << line;
  for (const gradcheck::Verdict& v : gradcheck::judge(got, half, exact, c.dtype)) {
    EXPECT_TRUE(v.ok) << label << ": " << v.describe();
    ::testing::Test::RecordProperty(label + "_" + gradcheck::kTensorNames[v.tensor] + "_rel_l2", std::to_string(v.err));
  }
}

/// Bitwise equality of the gradient buffers of two runs; names the first differing tensor and element.
void expect_bitwise_equal(const Outputs& a, const Outputs& b, const std::string& what) {
  if (a.grad_bytes == b.grad_bytes) return;
  for (gradcheck::Tensor t : {gradcheck::kDq, gradcheck::kDk, gradcheck::kDv}) {
    const int64_t i = gradcheck::first_difference(a[t], b[t]);
    if (i >= 0)
      ADD_FAILURE() << what << ": " << gradcheck::kTensorNames[t] << " differs first at canonical element " << i << " ("
                    << a[t][i] << " vs " << b[t][i] << ")";
  }
  ADD_FAILURE() << what << ": the gradient buffers differ bitwise";
}

std::string trace(const std::string& name, const oracle::Case& c, bool dlse, uint64_t seed) {
  return name + ": " + oracle::describe(c) + (dlse ? " with dlse" : " without dlse") + "; " + oracle::seed_note(seed);
}

// ---- tests ------------------------------------------------------------------------------------------------

class CudaBackwardSmall : public ::testing::TestWithParam<int> {};

TEST_P(CudaBackwardSmall, MatchesCpuBackward) {
  SKIP_WITHOUT_GPU();
  const NamedCase nc = small_cases()[GetParam()];
  const uint64_t seed = oracle::fresh_seed();
  SCOPED_TRACE(trace(nc.name, nc.c, nc.dlse, seed));
  const Inputs in = gradcheck::random_inputs(nc.c, nc.dlse, seed);
  // The oracles: the CPU backward on the same 16-bit inputs (f32 accumulation) and in float64 on them upcast.
  const Outputs half = gradcheck::run(nc.c, nc.c.dtype, Device::cpu, in);
  const Outputs exact = gradcheck::run(nc.c, DType::f64, Device::cpu, in);

  // Each device runs its own forward first: the backward reads that forward's o and lse.
  expect_sound_and_accurate(nc.c, gradcheck::run(nc.c, nc.c.dtype, Device::cuda_reference, in), half, exact,
                            "cuda_reference");
  expect_sound_and_accurate(nc.c, gradcheck::run(nc.c, nc.c.dtype, Device::cuda, in), half, exact, "cuda");

  // Deterministic mode: as accurate, and two runs on the same buffers are bitwise identical.
  const tilewise::Plan plan(gradcheck::problem_of(nc.c, nc.c.dtype), oracle::to_pattern(nc.c), Device::cuda);
  Workbench bench(plan, nc.c, in);
  bench.forward();
  bench.backward(/*deterministic=*/true);
  const Outputs first = bench.read();
  bench.backward(/*deterministic=*/true);
  const Outputs second = bench.read();
  expect_sound_and_accurate(nc.c, first, half, exact, "cuda_deterministic");
  expect_bitwise_equal(first, second, "two deterministic runs");
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaBackwardSmall, ::testing::Range(0, static_cast<int>(small_cases().size())),
                         [](const auto& info) { return small_cases()[info.param].name; });

// Many query tiles and all four query heads of a kv head accumulate into each key: where a kernel would use
// floating-point atomics, deterministic mode must not. Fresh buffers each time, so nothing carries over.
TEST(CudaBackwardDeterministic, HeavyKeyReuseIsBitwiseRepeatable) {
  SKIP_WITHOUT_GPU();
  oracle::Case c = base({4, 16, 16}, {2, 8, 8}, 4, 1, 128);
  text(c, 64, true, {64, 30});
  const uint64_t seed = oracle::fresh_seed();
  SCOPED_TRACE(trace("dense_text_first_gqa", c, true, seed));
  const Inputs in = gradcheck::random_inputs(c, true, seed);
  const Outputs reference = gradcheck::run(c, c.dtype, Device::cuda, in, /*deterministic=*/true);
  for (int repeat = 0; repeat < 3; ++repeat)
    expect_bitwise_equal(reference, gradcheck::run(c, c.dtype, Device::cuda, in, true),
                         "deterministic run " + std::to_string(repeat + 2) + " vs run 1");
}

TEST(CudaBackwardFullSize, HunyuanMatchesGpuReference) {
  SKIP_WITHOUT_GPU();
  // HunyuanVideo 720p: latent 30x48x80, tile 6x8x8, window 3x3x3, 256 text positions of which 226 are valid.
  oracle::Case c = base({30, 48, 80}, {6, 8, 8}, 2, 2, 128);
  windows(c, {{3, 3, 3}});
  text(c, 256, false, {226});
  const uint64_t seed = oracle::fresh_seed();
  SCOPED_TRACE(trace("hunyuan_720p", c, true, seed));
  const Inputs in = gradcheck::random_inputs(c, true, seed);
  const Outputs ref = gradcheck::run(c, c.dtype, Device::cuda_reference, in);
  const Outputs got = gradcheck::run(c, c.dtype, Device::cuda, in);
  // The reference's own structure too: it is the oracle here. Text padding keys only (no pair-by-pair mask).
  for (const std::string& line : gradcheck::structural_problems(c, ref, false)) ADD_FAILURE() << "cuda_reference: " << line;
  for (const std::string& line : gradcheck::structural_problems(c, got, false)) ADD_FAILURE() << "cuda: " << line;
  for (const gradcheck::Verdict& v : gradcheck::judge_against(got, ref, 1e-2)) {
    EXPECT_TRUE(v.ok) << v.describe();
    RecordProperty(std::string(gradcheck::kTensorNames[v.tensor]) + "_rel_l2", std::to_string(v.err));
  }
}

/// o, lse and the deterministic gradients of one Hopper plan of `c` that leaves `sm_margin` SMs free.
Outputs run_leaving_sms(const oracle::Case& c, const Inputs& in, int64_t sm_margin) {
  tilewise::Problem problem = gradcheck::problem_of(c, c.dtype);
  problem.sm_margin = sm_margin;
  const tilewise::Plan plan(problem, oracle::to_pattern(c), Device::cuda);
  Workbench bench(plan, c, in);
  bench.forward();
  bench.backward(/*deterministic=*/true);
  return bench.read();
}

// sm_margin only shrinks the persistent kernels' grids: the dynamic scheduler gives each work item to one CTA,
// which computes it in a fixed order, so the forward and the deterministic backward must not change a bit.
// 2 x 4 heads x 64 tiles (plus text) is more work than 132 SMs, so every grid below is the margin's.
TEST(CudaSmMargin, FewerSmsComputeTheSameBits) {
  SKIP_WITHOUT_GPU();
  oracle::Case c = base({8, 32, 32}, {2, 8, 8}, 4, 2, 128);
  windows(c, {{3, 3, 3}});
  text(c, 40, false, {40, 17});
  const uint64_t seed = oracle::fresh_seed();
  SCOPED_TRACE(trace("sm_margin", c, true, seed));
  const Inputs in = gradcheck::random_inputs(c, true, seed);
  const Outputs all = run_leaving_sms(c, in, 0);
  for (const std::string& line : gradcheck::structural_problems(c, all, false)) ADD_FAILURE() << line;
  // 100: 32 of an H200's 132 SMs; 1 << 20: more than any device has, so one CTA.
  for (int64_t margin : {int64_t{100}, int64_t{1} << 20}) {
    const Outputs fewer = run_leaving_sms(c, in, margin);
    const std::string what = "sm_margin " + std::to_string(margin) + " vs 0";
    EXPECT_TRUE(fewer.values[gradcheck::kO] == all.values[gradcheck::kO]) << what << ": o differs";
    EXPECT_TRUE(fewer.values[gradcheck::kLse] == all.values[gradcheck::kLse]) << what << ": lse differs";
    expect_bitwise_equal(all, fewer, what);
  }
}

#ifdef TILEWISE_WITH_CUDA
#define CUDA_OK(x) ASSERT_EQ((x), cudaSuccess) << #x

// Shared memory an earlier kernel left behind must not reach the gradients. The fused kernels sum dQ over all 128
// owned key rows, and when one tile class's box fills 128 rows the rows past a partial tile's smaller box are never
// loaded: a CTA whose first items have small boxes used to multiply leftover bits into dq (0 * NaN), which showed
// only when the leftovers happened to be NaN patterns (docs/performance.md backward v3.9). Here they are, on every
// SM, before each backward: f16 and bf16 NaN in every element.
TEST(CudaBackwardLeftovers, SharedMemoryNaNsDoNotReachTheGradients) {
  SKIP_WITHOUT_GPU();
  const std::vector<NamedCase> cases = small_cases();
  for (const char* name : {"partial_tile_classes_gqa_d64_text_last", "partial_tile_classes_d128_text_first_small",
                           "attention_tile_partial_frames_d96"}) {
    const auto it = std::find_if(cases.begin(), cases.end(), [&](const NamedCase& nc) { return nc.name == name; });
    ASSERT_NE(it, cases.end()) << name;
    const oracle::Case& c = it->c;
    const uint64_t seed = oracle::fresh_seed();
    SCOPED_TRACE(trace(name, c, it->dlse, seed));
    const Inputs in = gradcheck::random_inputs(c, it->dlse, seed);
    const Outputs half = gradcheck::run(c, c.dtype, Device::cpu, in);
    const Outputs exact = gradcheck::run(c, DType::f64, Device::cpu, in);
    const tilewise::Plan plan(gradcheck::problem_of(c, c.dtype), oracle::to_pattern(c), Device::cuda);
    Workbench bench(plan, c, in);
    bench.forward();
    for (int run = 0; run < 2; ++run) {
      tilewise_test::fill_shared_memory(0xFFFFFFFFu);
      bench.backward(/*deterministic=*/false);
      expect_sound_and_accurate(c, bench.read(), half, exact, "after NaN-filled shared memory, run " + std::to_string(run));
    }
  }
}

// The backward is documented CUDA-graph capturable: no allocation, no host synchronisation inside.
TEST(CudaBackwardGraph, CapturedBackwardReplaysLikeEager) {
  SKIP_WITHOUT_GPU();
  oracle::Case c = base({6, 16, 24}, {2, 8, 8}, 4, 2, 128);
  windows(c, {{3, 3, 3}});
  text(c, 24, false, {24, 9});
  const uint64_t seed = oracle::fresh_seed();
  SCOPED_TRACE(trace("graph", c, true, seed));
  const Inputs in = gradcheck::random_inputs(c, true, seed);
  const tilewise::Plan plan(gradcheck::problem_of(c, c.dtype), oracle::to_pattern(c), Device::cuda);
  Workbench bench(plan, c, in);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  bench.forward(stream);
  bench.backward(/*deterministic=*/true, stream);
  const Outputs eager = bench.read();

  cudaGraph_t graph;
  cudaGraphExec_t exec;
  // Global capture mode: an allocation or synchronisation inside run_backward would invalidate the capture.
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  bench.backward(true, stream);  // the poisoning memsets are captured too
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 2; ++replay) {
    CUDA_OK(cudaGraphLaunch(exec, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    const Outputs replayed = bench.read();
    for (const std::string& line : gradcheck::structural_problems(c, replayed, true)) ADD_FAILURE() << line;
    expect_bitwise_equal(eager, replayed, "replay " + std::to_string(replay) + " vs eager");
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}
#endif

/// Expects `f` to throw tilewise::Error naming `argument`.
void expect_error_naming(const std::function<void()>& f, const std::string& argument) {
  try {
    f();
    ADD_FAILURE() << "expected tilewise::Error naming '" << argument << "', nothing was thrown";
  } catch (const tilewise::Error& e) {
    EXPECT_EQ(e.argument(), argument) << e.what();
  }
}

TEST(CudaBackwardErrors, NullPointersAndWorkspaceNameTheArgument) {
  SKIP_WITHOUT_GPU();
  oracle::Case c = base({4, 16, 16}, {2, 8, 8}, 2, 2, 64);
  windows(c, {{1, 1, 1}});
  text(c, 8, false, {5});
  const uint64_t seed = oracle::fresh_seed();
  SCOPED_TRACE(oracle::seed_note(seed));
  const Inputs in = gradcheck::random_inputs(c, false, seed);
  using Clear = std::function<void(tilewise::GradTensors&)>;
  const std::vector<std::pair<std::string, Clear>> required{
      {"q", [](auto& t) { t.q = nullptr; }},       {"k", [](auto& t) { t.k = nullptr; }},
      {"v", [](auto& t) { t.v = nullptr; }},       {"o", [](auto& t) { t.o = nullptr; }},
      {"lse", [](auto& t) { t.lse = nullptr; }},   {"dout", [](auto& t) { t.dout = nullptr; }},
      {"dq", [](auto& t) { t.dq = nullptr; }},     {"dk", [](auto& t) { t.dk = nullptr; }},
      {"dv", [](auto& t) { t.dv = nullptr; }}};
  for (Device device : {Device::cuda, Device::cuda_reference}) {
    SCOPED_TRACE(tilewise::to_string(device));
    const tilewise::Plan plan(gradcheck::problem_of(c, c.dtype), oracle::to_pattern(c), device);
    Workbench bench(plan, c, in);
    bench.forward();
    bench.poison_gradients();
    const tilewise::GradTensors good = bench.grad_tensors();
    auto expect_refused = [&](const std::string& name, const Clear& modify) {
      tilewise::GradTensors t = good;
      modify(t);
      expect_error_naming([&] { plan.run_backward(t, nullptr, bench.workspace()); }, name);
    };
    for (const auto& [name, clear] : required) expect_refused(name, clear);
    // Host memory where device memory is expected (a kernel would fault on it).
    std::vector<uint8_t> host(bench.grad_buffer_bytes());
    expect_refused("dout", [&](auto& t) { t.dout = host.data(); });
    expect_refused("dq", [&](auto& t) { t.dq = host.data(); });
    if (plan.backward_workspace_bytes() > 0) {
      expect_error_naming([&] { plan.run_backward(good, nullptr, nullptr); }, "workspace");
      expect_error_naming([&] { plan.run_backward(good, nullptr, static_cast<char*>(bench.workspace()) + 128); },
                          "workspace");
    } else {
      std::cout << "note: " << tilewise::to_string(device)
                << " needs no backward workspace: the null-workspace check does not apply\n";
    }
    // Nothing is written on error: the gradient buffer still holds the poison, byte for byte.
    const Outputs after = bench.read();
    const auto poisoned = std::count(after.grad_bytes.begin(), after.grad_bytes.end(), uint8_t{0xFF});
    EXPECT_EQ(poisoned, static_cast<std::ptrdiff_t>(after.grad_bytes.size())) << "gradients written by a refused call";
    // And the same buffers then run fine.
    bench.backward(false);
    for (const std::string& line : gradcheck::structural_problems(c, bench.read(), true)) ADD_FAILURE() << line;
  }
}

}  // namespace
