// The C ABI: status codes and messages for bad inputs, outputs untouched on error, and bit-identical results
// to the C++ API on good inputs.
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/numeric.hpp"
#include "tilewise/tilewise.h"
#include "tilewise/tilewise.hpp"

namespace {

/// A small problem with partial tiles (5x6x7 over 2x4x4), GQA and text: 210 video + 8 text positions.
tw_problem small_problem() {
  tw_problem p;
  tw_problem_init(&p);
  p.batch = 2;
  p.q_heads = 4;
  p.kv_heads = 2;
  p.head_dim = 32;
  p.dtype = TW_DTYPE_BF16;
  const int64_t latent[3] = {5, 6, 7}, tile[3] = {2, 4, 4};
  std::memcpy(p.latent, latent, sizeof latent);
  std::memcpy(p.tile, tile, sizeof tile);
  p.text_capacity = 8;
  return p;
}

/// The C++ problem a tw_problem describes, written out here field by field (not through the C ABI's own
/// conversion), so that comparing the two APIs tests that conversion.
tilewise::Problem cpp_problem(const tw_problem& p) {
  tilewise::Problem cp;
  cp.batch = p.batch;
  cp.q_heads = p.q_heads;
  cp.kv_heads = p.kv_heads;
  cp.head_dim = p.head_dim;
  cp.dtype = static_cast<tilewise::DType>(p.dtype);
  cp.latent = {p.latent[0], p.latent[1], p.latent[2]};
  cp.tile = {p.tile[0], p.tile[1], p.tile[2]};
  cp.text_capacity = p.text_capacity;
  cp.text_position = static_cast<tilewise::TextPosition>(p.text_position);
  cp.layout = static_cast<tilewise::Layout>(p.layout);
  cp.scale = p.scale;
  return cp;
}

int64_t seq_len(const tw_problem& p) { return p.latent[0] * p.latent[1] * p.latent[2] + p.text_capacity; }

/// Random bf16 inputs, seeded from std::random_device; the seed goes into every failure message.
struct Inputs {
  explicit Inputs(const tw_problem& p) : seed(std::random_device{}()) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    const int64_t S = seq_len(p);
    auto fill = [&](std::vector<uint16_t>& t, int64_t heads) {
      t.resize(p.batch * S * heads * p.head_dim);
      for (auto& x : t) x = tilewise::detail::float_to_bf16(normal(rng));
    };
    fill(q, p.q_heads);
    fill(k, p.kv_heads);
    fill(v, p.kv_heads);
  }
  uint32_t seed;
  std::vector<uint16_t> q, k, v;
};

constexpr uint16_t kSentinel = 0x7bad;

/// Expects `status` to be an invalid-argument failure naming `argument`, with the message containing `text`.
void expect_invalid(tw_status status, const std::string& argument, const std::string& text) {
  EXPECT_EQ(status, TW_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(std::string(tw_last_error_argument()), argument) << tw_last_error();
  EXPECT_NE(std::string(tw_last_error()).find(text), std::string::npos) << tw_last_error();
  EXPECT_EQ(std::string(tw_last_error()).rfind("invalid " + argument + " = ", 0), 0u) << tw_last_error();
}

/// Creates a plan expecting failure; also checks that *out is left null.
void expect_create_fails(const tw_problem& p, const tw_pattern& pat, const std::string& argument,
                         const std::string& text) {
  tw_plan* plan = reinterpret_cast<tw_plan*>(0x1);
  expect_invalid(tw_plan_create(&p, &pat, TW_DEVICE_CPU, &plan), argument, text);
  EXPECT_EQ(plan, nullptr);
}

tw_pattern sta(const int64_t* windows, int64_t heads) {
  tw_pattern pat;
  tw_pattern_init(&pat);
  pat.kind = TW_PATTERN_SLIDING_TILE;
  pat.num_heads = heads;
  pat.windows = windows;
  return pat;
}

const int64_t kWin333[3] = {3, 3, 3};

TEST(CApi, NullPointersAreNamed) {
  tw_problem p = small_problem();
  tw_pattern pat = sta(kWin333, 1);
  tw_plan* plan = nullptr;
  expect_invalid(tw_plan_create(nullptr, &pat, TW_DEVICE_CPU, &plan), "problem", "= null");
  expect_invalid(tw_plan_create(&p, nullptr, TW_DEVICE_CPU, &plan), "pattern", "= null");
  expect_invalid(tw_plan_create(&p, &pat, TW_DEVICE_CPU, nullptr), "out", "= null");
  pat.windows = nullptr;
  expect_invalid(tw_plan_create(&p, &pat, TW_DEVICE_CPU, &plan), "windows", "num_heads x 3 window sizes (num_heads = 1)");
  pat.kind = TW_PATTERN_ATTENTION_TILE;  // global_frames NULL
  expect_invalid(tw_plan_create(&p, &pat, TW_DEVICE_CPU, &plan), "global_frames", "num_heads = 1 values");

  double x = 0;
  expect_invalid(tw_plan_run(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr), "plan", "null");
  expect_invalid(tw_plan_flops(nullptr, nullptr, &x), "plan", "null");
  expect_invalid(tw_plan_density(nullptr, &x), "plan", "null");
  expect_invalid(tw_tile(nullptr, &x, &x), "problem", "null");
  expect_invalid(tw_untile(nullptr, &x, &x), "problem", "null");
  tw_plan_destroy(nullptr);  // a no-op, like free(NULL)
}

TEST(CApi, InvalidProblemsAreRejectedAtCreate) {
  const tw_pattern pat = sta(kWin333, 1);
  tw_problem p = small_problem();
  p.kv_heads = 3;
  expect_create_fails(p, pat, "kv_heads", "invalid kv_heads = 3: expected a divisor of q_heads = 4");

  p = small_problem();
  p.tile[1] = 0;
  expect_create_fails(p, pat, "tile", "= 2x0x4");

  p = small_problem();
  p.seq_len = seq_len(p) + 1;
  expect_create_fails(p, pat, "seq_len", "T*H*W + L_text = 210 + 8 = 218");

  p = small_problem();
  p.q_strides[3] = 2;
  expect_create_fails(p, pat, "q_strides.dim", "contiguous");

  p = small_problem();
  p.dtype = 7;
  expect_create_fails(p, pat, "dtype", "invalid dtype = 7: expected one of f32, f64, bf16, f16");

  p = small_problem();
  p.sm_margin = -8;
  expect_create_fails(p, pat, "sm_margin", "invalid sm_margin = -8: expected >= 0");
}

TEST(CApi, InvalidPatternsAreRejectedAtCreate) {
  const tw_problem p = small_problem();
  const int64_t zero_window[3] = {3, 0, 3};
  expect_create_fails(p, sta(zero_window, 1), "window[0]", "3x0x3");

  const int64_t three_heads[9] = {3, 3, 3, 1, 1, 1, 2, 2, 2};
  expect_create_fails(p, sta(three_heads, 3), "windows (per-head window table length)", "q_heads = 4");

  tw_pattern bad_kind = sta(kWin333, 1);
  bad_kind.kind = 9;
  expect_create_fails(p, bad_kind, "pattern.kind", "= 9");

  tw_pattern empty = sta(kWin333, 0);
  expect_create_fails(p, empty, "num_heads", "= 0");
}

/// A valid plan whose runs fail must leave o untouched.
class CApiRun : public ::testing::Test {
 protected:
  void SetUp() override {
    const tw_pattern pat = sta(kWin333, 1);
    ASSERT_EQ(tw_plan_create(&p, &pat, TW_DEVICE_CPU, &plan), TW_OK) << tw_last_error();
    o.assign(in.q.size(), kSentinel);
  }
  void TearDown() override { tw_plan_destroy(plan); }
  void expect_o_untouched() {
    SCOPED_TRACE("seed " + std::to_string(in.seed));
    for (size_t i = 0; i < o.size(); ++i) ASSERT_EQ(o[i], kSentinel) << "o[" << i << "] was written";
  }

  tw_problem p = small_problem();
  Inputs in{p};
  tw_plan* plan = nullptr;
  std::vector<uint16_t> o;
};

TEST_F(CApiRun, TextLenAboveCapacityAtRunTime) {
  const int32_t text_len[2] = {8, 9};
  expect_invalid(tw_plan_run(plan, in.q.data(), in.k.data(), in.v.data(), o.data(), nullptr, text_len, nullptr),
                 "text_len[1]", "invalid text_len[1] = 9: expected a value in [0, text capacity = 8]");
  expect_o_untouched();
}

TEST_F(CApiRun, NullTensors) {
  expect_invalid(tw_plan_run(plan, nullptr, in.k.data(), in.v.data(), o.data(), nullptr, nullptr, nullptr), "q", "null");
  expect_invalid(tw_plan_run(plan, in.q.data(), in.k.data(), nullptr, o.data(), nullptr, nullptr, nullptr), "v", "null");
  expect_o_untouched();
  expect_invalid(tw_plan_run(plan, in.q.data(), in.k.data(), in.v.data(), nullptr, nullptr, nullptr, nullptr), "o", "null");
}

TEST_F(CApiRun, SuccessClearsTheLastError) {
  ASSERT_NE(tw_plan_run(plan, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr), TW_OK);
  ASSERT_STRNE(tw_last_error(), "");
  double flops = 0;
  ASSERT_EQ(tw_plan_flops(plan, nullptr, &flops), TW_OK);
  EXPECT_STREQ(tw_last_error(), "");
  EXPECT_STREQ(tw_last_error_argument(), "");
  EXPECT_GT(flops, 0);
}

TEST_F(CApiRun, LastErrorIsPerThread) {
  ASSERT_NE(tw_plan_run(plan, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr), TW_OK);
  std::string other;
  std::thread([&] { other = tw_last_error(); }).join();
  EXPECT_EQ(other, "");
  EXPECT_STREQ(tw_last_error_argument(), "q");
}

/// The backward through the C ABI: named errors that leave the gradients untouched, and on good inputs the same
/// bits as the C++ API.
class CApiBackward : public CApiRun {
 protected:
  void SetUp() override {
    CApiRun::SetUp();
    lse.resize(p.batch * p.q_heads * seq_len(p));
    ASSERT_EQ(tw_plan_run(plan, in.q.data(), in.k.data(), in.v.data(), o.data(), lse.data(), text_len, nullptr), TW_OK)
        << tw_last_error();
    std::mt19937 rng(in.seed + 1);
    std::normal_distribution<float> normal;
    dout.resize(o.size());
    for (auto& x : dout) x = tilewise::detail::float_to_bf16(normal(rng));
    dlse.resize(lse.size());
    for (auto& x : dlse) x = normal(rng);
    dq.assign(in.q.size(), kSentinel);
    dk.assign(in.k.size(), kSentinel);
    dv.assign(in.v.size(), kSentinel);
    tw_grad_tensors_init(&t);
    t.q = in.q.data(), t.k = in.k.data(), t.v = in.v.data(), t.o = o.data(), t.lse = lse.data();
    t.dout = dout.data(), t.dlse = dlse.data(), t.dq = dq.data(), t.dk = dk.data(), t.dv = dv.data();
    t.text_len = text_len;
  }
  bool grads_untouched() const {
    for (const std::vector<uint16_t>* g : {&dq, &dk, &dv})
      for (uint16_t x : *g)
        if (x != kSentinel) return false;
    return true;
  }

  const int32_t text_len[2] = {5, 0};  // the forward's and the backward's
  std::vector<float> lse, dlse;
  std::vector<uint16_t> dout, dq, dk, dv;
  tw_grad_tensors t;
};

TEST_F(CApiBackward, GradTensorsInitAndWorkspaceSize) {
  tw_grad_tensors g;
  std::memset(&g, 0x5a, sizeof g);  // init must set every field
  tw_grad_tensors_init(&g);
  for (const void* ptr : {g.q, g.k, g.v, g.o, static_cast<const void*>(g.lse), g.dout,
                          static_cast<const void*>(g.dlse), static_cast<const void*>(g.dq), static_cast<const void*>(g.dk),
                          static_cast<const void*>(g.dv), static_cast<const void*>(g.text_len)})
    EXPECT_EQ(ptr, nullptr);
  tw_grad_tensors_init(nullptr);  // a no-op
  uint64_t bytes = 123;
  ASSERT_EQ(tw_plan_backward_workspace_size(plan, &bytes), TW_OK) << tw_last_error();
  EXPECT_EQ(bytes, 0u);  // the CPU needs no scratch
  expect_invalid(tw_plan_backward_workspace_size(nullptr, &bytes), "plan", "null");
  expect_invalid(tw_plan_backward_workspace_size(plan, nullptr), "bytes", "null");
}

TEST_F(CApiBackward, ErrorsAreNamedAndLeaveGradientsUntouched) {
  expect_invalid(tw_plan_run_backward(nullptr, &t, nullptr, 0, nullptr), "plan", "null");
  expect_invalid(tw_plan_run_backward(plan, nullptr, nullptr, 0, nullptr), "tensors", "null");
  tw_grad_tensors bad = t;
  bad.lse = nullptr;
  expect_invalid(tw_plan_run_backward(plan, &bad, nullptr, 0, nullptr), "lse", "log-sum-exp");
  bad = t;
  bad.dout = nullptr;
  expect_invalid(tw_plan_run_backward(plan, &bad, nullptr, 0, nullptr), "dout", "null");
  bad = t;
  bad.dk = nullptr;
  expect_invalid(tw_plan_run_backward(plan, &bad, nullptr, 0, nullptr), "dk", "null");
  bad = t;
  const int32_t too_long[2] = {8, 9};
  bad.text_len = too_long;
  expect_invalid(tw_plan_run_backward(plan, &bad, nullptr, 0, nullptr), "text_len[1]",
                 "invalid text_len[1] = 9: expected a value in [0, text capacity = 8]");
  SCOPED_TRACE("seed " + std::to_string(in.seed));
  EXPECT_TRUE(grads_untouched());
}

TEST_F(CApiBackward, MatchesCppBitForBit) {
  SCOPED_TRACE("seed " + std::to_string(in.seed));
  ASSERT_EQ(tw_plan_run_backward(plan, &t, nullptr, 1, nullptr), TW_OK) << tw_last_error();
  EXPECT_STREQ(tw_last_error(), "");
  for (const std::vector<uint16_t>* g : {&dq, &dk, &dv})
    for (uint16_t x : *g) ASSERT_NE(x, kSentinel) << "a gradient element was not written";

  const tilewise::Plan cpp(cpp_problem(p), tilewise::Pattern::sliding_tile({3, 3, 3}), tilewise::Device::cpu);
  std::vector<uint16_t> dq_cpp(dq.size()), dk_cpp(dk.size()), dv_cpp(dv.size());
  cpp.run_backward({in.q.data(), in.k.data(), in.v.data(), o.data(), lse.data(), dout.data(), dlse.data(),
                    dq_cpp.data(), dk_cpp.data(), dv_cpp.data(), text_len});
  EXPECT_EQ(dq, dq_cpp);
  EXPECT_EQ(dk, dk_cpp);
  EXPECT_EQ(dv, dv_cpp);
}

TEST(CApi, InitMatchesCppDefaults) {
  tw_problem c;
  std::memset(&c, 0x5a, sizeof c);  // init must set every field, not rely on zeroed memory
  tw_problem_init(&c);
  const tilewise::Problem d;
  EXPECT_EQ(c.batch, d.batch);
  EXPECT_EQ(c.q_heads, d.q_heads);
  EXPECT_EQ(c.kv_heads, d.kv_heads);
  EXPECT_EQ(c.head_dim, d.head_dim);
  EXPECT_EQ(c.dtype, static_cast<int32_t>(d.dtype));
  EXPECT_EQ(c.tile[0], d.tile.t);
  EXPECT_EQ(c.tile[2], d.tile.w);
  EXPECT_EQ(c.text_capacity, 0);
  EXPECT_EQ(c.seq_len, 0);
  EXPECT_EQ(c.scale, 0.0);
  EXPECT_EQ(c.precision, static_cast<int32_t>(d.precision));
  EXPECT_EQ(c.sm_margin, d.sm_margin);
  for (const int64_t* s : {c.q_strides, c.k_strides, c.v_strides, c.o_strides}) {
    EXPECT_EQ(s[0], 0);
    EXPECT_EQ(s[3], 1);
  }
  tw_pattern pat;
  std::memset(&pat, 0x5a, sizeof pat);
  tw_pattern_init(&pat);
  EXPECT_EQ(pat.kind, TW_PATTERN_DENSE);
  EXPECT_EQ(pat.num_heads, 1);
  EXPECT_EQ(pat.windows, nullptr);
  EXPECT_STREQ(tw_version(), "0.1.0");
  EXPECT_EQ(tw_cuda_available(), tilewise::cuda_available() ? 1 : 0);
}

/// Runs one pattern through the C ABI and through the C++ API: outputs, lse, FLOPs and density must agree
/// bit for bit (the C ABI only converts structs).
void expect_same_as_cpp(const tw_problem& p, const tw_pattern& cpat, const tilewise::Pattern& pattern) {
  const Inputs in(p);
  SCOPED_TRACE("seed " + std::to_string(in.seed));
  const int64_t S = seq_len(p);
  const int32_t text_len[2] = {static_cast<int32_t>(p.text_capacity), 3};

  tw_plan* plan = nullptr;
  ASSERT_EQ(tw_plan_create(&p, &cpat, TW_DEVICE_CPU, &plan), TW_OK) << tw_last_error();
  std::vector<uint16_t> o_c(in.q.size(), kSentinel);
  std::vector<float> lse_c(p.batch * p.q_heads * S);
  ASSERT_EQ(tw_plan_run(plan, in.q.data(), in.k.data(), in.v.data(), o_c.data(), lse_c.data(), text_len, nullptr),
            TW_OK)
      << tw_last_error();
  double flops_c = 0, density_c = 0;
  ASSERT_EQ(tw_plan_flops(plan, text_len, &flops_c), TW_OK);
  ASSERT_EQ(tw_plan_density(plan, &density_c), TW_OK);
  tw_plan_destroy(plan);

  const tilewise::Plan cpp(cpp_problem(p), pattern, tilewise::Device::cpu);
  std::vector<uint16_t> o_cpp(in.q.size(), kSentinel);
  std::vector<float> lse_cpp(lse_c.size());
  cpp.run({in.q.data(), in.k.data(), in.v.data(), o_cpp.data(), lse_cpp.data(), text_len});

  EXPECT_EQ(o_c, o_cpp);
  EXPECT_EQ(std::memcmp(lse_c.data(), lse_cpp.data(), lse_c.size() * sizeof(float)), 0);
  EXPECT_EQ(flops_c, cpp.flops(text_len));
  EXPECT_EQ(density_c, cpp.video_density());
  for (uint16_t x : o_c) ASSERT_NE(x, kSentinel) << "an output element was not written";
}

TEST(CApi, SlidingTilePerHeadMatchesCpp) {
  tw_problem p = small_problem();
  p.layout = TW_LAYOUT_BHSD;
  p.text_position = TW_TEXT_FIRST;
  const int64_t windows[12] = {1, 1, 1, 3, 1, 3, 2, 2, 2, 3, 3, 3};
  expect_same_as_cpp(p, sta(windows, 4), tilewise::Pattern::sliding_tile({{1, 1, 1}, {3, 1, 3}, {2, 2, 2}, {3, 3, 3}}));
}

// sm_margin is an execution option that the CPU backend ignores: a plan with one computes the same bits as the
// C++ plan without (cpp_problem leaves it at 0).
TEST(CApi, SmMarginChangesNoBit) {
  tw_problem p = small_problem();
  p.sm_margin = 100;
  expect_same_as_cpp(p, sta(kWin333, 1), tilewise::Pattern::sliding_tile({3, 3, 3}));
}

TEST(CApi, AttentionTileMatchesCpp) {
  tw_problem p = small_problem();
  p.scale = 0.3;
  tw_pattern pat;
  tw_pattern_init(&pat);
  pat.kind = TW_PATTERN_ATTENTION_TILE;
  const int64_t g[1] = {1};
  pat.global_frames = g;  // radius NULL = 0
  expect_same_as_cpp(p, pat, tilewise::Pattern::attention_tile(1, 0));
}

TEST(CApi, BlockListMatchesCpp) {
  tw_problem p = small_problem();  // 3x2x2 = 12 tiles
  std::vector<int64_t> offsets{0};
  std::vector<int32_t> tiles;
  for (int32_t qt = 0; qt < 12; ++qt) {  // each query tile sees itself and tile 0
    if (qt != 0) tiles.push_back(0);
    tiles.push_back(qt);
    offsets.push_back(static_cast<int64_t>(tiles.size()));
  }
  tw_pattern pat;
  tw_pattern_init(&pat);
  pat.kind = TW_PATTERN_BLOCK_LIST;
  pat.block_offsets = offsets.data();
  pat.num_block_offsets = static_cast<int64_t>(offsets.size());
  pat.block_tiles = tiles.data();
  pat.num_block_tiles = static_cast<int64_t>(tiles.size());
  expect_same_as_cpp(p, pat, tilewise::Pattern::block_list(offsets, tiles));
}

TEST(CApi, TileUntileRoundTrip) {
  tw_problem p = small_problem();
  p.latent[0] = 4;
  p.latent[1] = 8;
  p.latent[2] = 8;  // tiled order needs tile | latent
  const Inputs in(p);
  std::vector<uint16_t> tiled(in.q.size()), back(in.q.size()), cpp(in.q.size());
  ASSERT_EQ(tw_tile(&p, in.q.data(), tiled.data()), TW_OK) << tw_last_error();
  ASSERT_EQ(tw_untile(&p, tiled.data(), back.data()), TW_OK) << tw_last_error();
  EXPECT_EQ(back, in.q);
  tilewise::tile(cpp_problem(p), in.q.data(), cpp.data());
  EXPECT_EQ(tiled, cpp);

  p.latent[2] = 7;  // 7 is not a multiple of 4
  std::vector<uint16_t> out(in.q.size(), kSentinel);
  expect_invalid(tw_tile(&p, in.q.data(), out.data()), "order", "multiple of the tile");
  EXPECT_EQ(out, std::vector<uint16_t>(in.q.size(), kSentinel));
}


// --- queries the bindings take facts from (grid, effective window, device support) ---

TEST(CApi, TileGridAndEffectiveWindowFollowTheSpec) {
  std::mt19937 rng(std::random_device{}());
  std::uniform_int_distribution<int64_t> size(1, 40), tsize(1, 9), wsize(1, 12);
  for (int trial = 0; trial < 50; ++trial) {
    const int64_t latent[3] = {size(rng), size(rng), size(rng)}, tile[3] = {tsize(rng), tsize(rng), tsize(rng)};
    const int64_t window[3] = {wsize(rng), wsize(rng), wsize(rng)};
    int64_t tiles[3] = {-1, -1, -1}, eff[3] = {-1, -1, -1};
    ASSERT_EQ(tw_tile_grid(latent, tile, tiles), TW_OK) << tw_last_error();
    ASSERT_EQ(tw_effective_window(latent, tile, window, eff), TW_OK) << tw_last_error();
    for (int a = 0; a < 3; ++a) {
      EXPECT_EQ(tiles[a], (latent[a] + tile[a] - 1) / tile[a]);  // spec: ceil(T / tt)
      // Spec: k >= n covers the axis (n tiles), else k tiles.
      EXPECT_EQ(eff[a], window[a] >= tiles[a] ? tiles[a] : window[a]);
    }
  }
}

TEST(CApi, QueriesRefuseBadSizesAndLeaveOutputsAlone) {
  const int64_t latent[3] = {4, 6, 8}, tile[3] = {2, 0, 4}, ok_tile[3] = {2, 3, 4}, window[3] = {1, -2, 1};
  int64_t out[3] = {7, 7, 7};
  expect_invalid(tw_tile_grid(latent, tile, out), "tile", "2x0x4");
  expect_invalid(tw_effective_window(latent, ok_tile, window, out), "window", "1x-2x1");
  expect_invalid(tw_tile_grid(nullptr, ok_tile, out), "latent", "null");
  expect_invalid(tw_tile_grid(latent, ok_tile, nullptr), "tiles", "null");
  EXPECT_EQ(out[0], 7);
  EXPECT_EQ(out[1], 7);
  EXPECT_EQ(out[2], 7);
}

TEST(CApi, PlanGridAndPerHeadWindows) {
  tw_problem p = small_problem();  // 5x6x7 over 2x4x4: grid 3x2x2, 4 heads
  const int64_t windows[4][3] = {{1, 1, 1}, {2, 5, 1}, {9, 9, 9}, {3, 2, 2}};
  tw_pattern pat;
  tw_pattern_init(&pat);
  pat.kind = TW_PATTERN_SLIDING_TILE;
  pat.num_heads = 4;
  pat.windows = &windows[0][0];
  tw_plan* plan = nullptr;
  ASSERT_EQ(tw_plan_create(&p, &pat, TW_DEVICE_CPU, &plan), TW_OK) << tw_last_error();
  int64_t tiles[3], w[3];
  ASSERT_EQ(tw_plan_grid(plan, tiles), TW_OK);
  EXPECT_EQ(std::vector<int64_t>(tiles, tiles + 3), (std::vector<int64_t>{3, 2, 2}));
  const std::vector<std::vector<int64_t>> expected = {{1, 1, 1}, {2, 2, 1}, {3, 2, 2}, {3, 2, 2}};
  for (int64_t h = 0; h < 4; ++h) {
    ASSERT_EQ(tw_plan_window(plan, h, w), TW_OK) << tw_last_error();
    EXPECT_EQ(std::vector<int64_t>(w, w + 3), expected[h]) << "head " << h;
  }
  expect_invalid(tw_plan_window(plan, 4, w), "head", "[0, 4)");
  tw_plan_destroy(plan);

  tw_pattern dense;
  tw_pattern_init(&dense);
  ASSERT_EQ(tw_plan_create(&p, &dense, TW_DEVICE_CPU, &plan), TW_OK) << tw_last_error();
  expect_invalid(tw_plan_window(plan, 0, w), "plan", "sliding tile");
  tw_plan_destroy(plan);
}

TEST(CApi, DeviceSupports) {
  for (int32_t dtype : {TW_DTYPE_F32, TW_DTYPE_F64, TW_DTYPE_BF16, TW_DTYPE_F16})
    for (int64_t d : {1, 16, 64, 80, 96, 128, 256}) EXPECT_EQ(tw_device_supports(TW_DEVICE_CPU, dtype, d), TW_OK);
  expect_invalid(tw_device_supports(TW_DEVICE_CPU, 9, 64), "dtype", "9");
  expect_invalid(tw_device_supports(TW_DEVICE_CPU, TW_DTYPE_BF16, 0), "head_dim", "0");
  expect_invalid(tw_device_supports(7, TW_DTYPE_BF16, 64), "device", "7");
  if (!tw_cuda_available()) {
    EXPECT_EQ(tw_device_supports(TW_DEVICE_CUDA, TW_DTYPE_BF16, 64), TW_ERROR_INVALID_ARGUMENT);
    EXPECT_EQ(std::string(tw_last_error_argument()), "device") << tw_last_error();
    return;
  }
  // The Hopper backend: bf16/f16 at D 64, 96, 128 (on an sm_90 device; elsewhere "device" is named).
  tw_status hopper = tw_device_supports(TW_DEVICE_CUDA, TW_DTYPE_BF16, 128);
  if (hopper != TW_OK) {
    EXPECT_EQ(std::string(tw_last_error_argument()), "device") << tw_last_error();
    return;
  }
  for (int32_t dtype : {TW_DTYPE_BF16, TW_DTYPE_F16})
    for (int64_t d : {64, 96, 128}) EXPECT_EQ(tw_device_supports(TW_DEVICE_CUDA, dtype, d), TW_OK) << tw_last_error();
  expect_invalid(tw_device_supports(TW_DEVICE_CUDA, TW_DTYPE_F32, 64), "dtype", "f32");
  expect_invalid(tw_device_supports(TW_DEVICE_CUDA, TW_DTYPE_BF16, 80), "head_dim", "80");
}

}  // namespace
