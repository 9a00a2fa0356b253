// GPU tests of the Hopper forward kernel (Device::cuda) and of the fp32 GPU reference (Device::cuda_reference).
// Small problems are checked against the CPU reference, full-size ones against the GPU reference. Every run
// poisons the output first (all bits set: NaN in bf16/f16) and checks each element was written, finite and
// within the spec's accuracy rule; repeated runs must be bitwise identical. Skips where there is no GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "core/numeric.hpp"
#include "tilewise/query_runs.hpp"
#include "tilewise/tilewise.hpp"

#ifdef TILEWISE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace tilewise {
namespace {

#ifdef TILEWISE_WITH_CUDA

#define CUDA_OK(x) ASSERT_EQ((x), cudaSuccess) << #x

struct Buffers {
  std::vector<uint16_t> q, k, v;  // 16-bit storage, sized by the strides' extents
  std::vector<int32_t> text_len;
};

/// Elements spanned by a [B, S, H, D] view with these strides.
int64_t extent(const Problem& p, const Strides& s, int64_t heads) {
  return (p.batch - 1) * s.batch + (p.seq_len - 1) * s.seq + (heads - 1) * s.head + p.head_dim;
}

uint16_t to_bits(float x, DType t) { return t == DType::bf16 ? detail::float_to_bf16(x) : detail::float_to_f16(x); }
float from_bits(uint16_t b, DType t) { return t == DType::bf16 ? detail::bf16_to_float(b) : detail::f16_to_float(b); }

struct Result {
  std::vector<uint16_t> o;
  std::vector<float> lse;
};

class DeviceRun {
 public:
  DeviceRun(const Plan& plan, const Buffers& in) : plan_(plan) {
    const Problem& p = plan.problem();
    o_elems_ = extent(p, p.o, p.q_heads);
    lse_elems_ = p.batch * p.q_heads * p.seq_len;
    upload(&q_, in.q);
    upload(&k_, in.k);
    upload(&v_, in.v);
    EXPECT_EQ(cudaMalloc(&o_, o_elems_ * 2), cudaSuccess);
    EXPECT_EQ(cudaMalloc(&lse_, lse_elems_ * 4), cudaSuccess);
    if (!in.text_len.empty()) {
      EXPECT_EQ(cudaMalloc(&text_len_, in.text_len.size() * 4), cudaSuccess);
      EXPECT_EQ(cudaMemcpy(text_len_, in.text_len.data(), in.text_len.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
    }
  }
  ~DeviceRun() {
    for (void* p : {q_, k_, v_, o_, static_cast<void*>(lse_), static_cast<void*>(text_len_)}) cudaFree(p);
  }

  /// Poisons o and lse, runs, and returns them.
  Result run() {
    Result r;
    EXPECT_EQ(cudaMemset(o_, 0xFF, o_elems_ * 2), cudaSuccess);
    EXPECT_EQ(cudaMemset(lse_, 0xFF, lse_elems_ * 4), cudaSuccess);
    plan_.run({q_, k_, v_, o_, lse_, text_len_});
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    r.o.resize(o_elems_);
    r.lse.resize(lse_elems_);
    EXPECT_EQ(cudaMemcpy(r.o.data(), o_, o_elems_ * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(r.lse.data(), lse_, lse_elems_ * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    return r;
  }

 private:
  void upload(void** dst, const std::vector<uint16_t>& h) {
    EXPECT_EQ(cudaMalloc(dst, h.size() * 2), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(*dst, h.data(), h.size() * 2, cudaMemcpyHostToDevice), cudaSuccess);
  }
  const Plan& plan_;
  int64_t o_elems_ = 0, lse_elems_ = 0;
  void *q_ = nullptr, *k_ = nullptr, *v_ = nullptr, *o_ = nullptr;
  float* lse_ = nullptr;
  int32_t* text_len_ = nullptr;
};

Buffers random_inputs(const Plan& plan, std::vector<int32_t> text_len, uint32_t seed) {
  const Problem& p = plan.problem();
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.f, 1.f);
  Buffers b;
  auto fill = [&](std::vector<uint16_t>& x, int64_t elems) {
    x.resize(elems);
    for (auto& e : x) e = to_bits(n(rng), p.dtype);
  };
  fill(b.q, extent(p, p.q, p.q_heads));
  fill(b.k, extent(p, p.k, p.kv_heads));
  fill(b.v, extent(p, p.v, p.kv_heads));
  b.text_len = std::move(text_len);
  return b;
}

/// Compares the valid elements of two outputs (only positions the strides address) and the LSE.
void expect_close(const Plan& plan, const Result& got, const Result& ref, double tol) {
  const Problem& p = plan.problem();
  double err2 = 0, ref2 = 0;
  int64_t bad = 0, lse_bad = 0;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t s = 0; s < p.seq_len; ++s)
      for (int64_t h = 0; h < p.q_heads; ++h) {
        for (int64_t d = 0; d < p.head_dim; ++d) {
          const int64_t i = b * p.o.batch + s * p.o.seq + h * p.o.head + d;
          const float x = from_bits(got.o[i], p.dtype), y = from_bits(ref.o[i], p.dtype);
          if (!std::isfinite(x)) ++bad;
          err2 += (double(x) - y) * (double(x) - y);
          ref2 += double(y) * y;
        }
        const int64_t li = (b * p.q_heads + h) * p.seq_len + s;
        if (!(std::abs(got.lse[li] - ref.lse[li]) <= 2e-2 * std::max(1.f, std::abs(ref.lse[li])))) ++lse_bad;
      }
  EXPECT_EQ(bad, 0) << "output elements not written or not finite";
  EXPECT_EQ(lse_bad, 0) << "LSE elements off or not written";
  const double rel = std::sqrt(err2 / ref2);
  EXPECT_LE(rel, tol) << "relative L2 error";
  ::testing::Test::RecordProperty("rel_l2", std::to_string(rel));
}

std::vector<float> widen(const std::vector<uint16_t>& x, DType t) {
  std::vector<float> f(x.size());
  for (size_t i = 0; i < x.size(); ++i) f[i] = from_bits(x[i], t);
  return f;
}

/// Runs the CPU reference (f32 accumulation over the same 16-bit inputs) into a Result of 16-bit outputs.
Result cpu_reference(const Problem& problem, const Pattern& pattern, const Buffers& in) {
  Problem p32 = problem;
  p32.dtype = DType::f32;
  const Plan cpu(p32, pattern, Device::cpu);
  const Problem& p = cpu.problem();
  std::vector<float> q = widen(in.q, problem.dtype), k = widen(in.k, problem.dtype), v = widen(in.v, problem.dtype);
  std::vector<float> o(extent(p, p.o, p.q_heads), 0.f), lse(p.batch * p.q_heads * p.seq_len, 0.f);
  cpu.run({q.data(), k.data(), v.data(), o.data(), lse.data(), in.text_len.empty() ? nullptr : in.text_len.data()});
  Result r;
  r.o.resize(o.size());
  for (size_t i = 0; i < o.size(); ++i) r.o[i] = to_bits(o[i], problem.dtype);
  r.lse = lse;
  return r;
}

bool have_gpu() { return cuda_available(); }

struct Case {
  std::string name;
  Problem problem;
  Pattern pattern;
  std::vector<int32_t> text_len;
};

Problem base(Dim3 latent, Dim3 tile, int64_t heads, int64_t kv_heads, int64_t D, int64_t text = 0) {
  Problem p;
  p.latent = latent;
  p.tile = tile;
  p.q_heads = heads;
  p.kv_heads = kv_heads;
  p.head_dim = D;
  p.text_capacity = text;
  return p;
}

/// CogVideoX-like cases (1x8x16 tiles cut along h and w): 640 + 320 token runs per frame with window (., 2, 3) on 3
/// tile rows, 900 with (., 3, 3); D 96 cuts them into 128-row blocks, D 64 and 128 into 192-row ones. Their keys go as
/// key-run blocks (run_keys.cuh): ranges of whole token rows, cut short (a masked last block) in the D 96, dense and
/// CogVideoX cases (900 -> 7 x 128 + 4; 600; 1080 and 990 per frame).
std::vector<Case> query_run_cases() {
  std::vector<Case> c;
  {
    Problem p = base({3, 30, 45}, {1, 8, 16}, 4, 2, 64, 30);
    p.text_position = TextPosition::first;
    c.push_back({"query_runs_cogvideox_d64_text_first", p, Pattern::sliding_tile({3, 3, 3}), {}});
  }
  {
    // Per-head windows that group the tokens alike (they differ along t only, as calibrated ones may): one run
    // table, each head's own key walk.
    Problem p = base({3, 30, 45}, {1, 8, 16}, 4, 4, 64, 20);
    c.push_back({"query_runs_per_head_windows_d64_text_last", p,
                 Pattern::sliding_tile(std::vector<Dim3>{{1, 3, 3}, {2, 3, 3}, {3, 3, 3}, {1, 3, 3}}), {}});
  }
  {
    Problem p = base({3, 24, 40}, {1, 8, 16}, 4, 2, 64, 40);
    p.batch = 2;
    p.text_position = TextPosition::first;
    c.push_back({"query_runs_gqa_d64_text_first", p, Pattern::sliding_tile({3, 2, 3}), {40, 17}});
  }
  {
    Problem p = base({2, 24, 40}, {1, 8, 16}, 2, 2, 128, 16);
    p.dtype = DType::f16;
    c.push_back({"query_runs_f16_d128_text_last", p, Pattern::sliding_tile({2, 2, 3}), {}});
  }
  {
    Problem p = base({2, 20, 45}, {1, 8, 16}, 2, 1, 96);
    p.layout = Layout::bhsd;
    c.push_back({"query_runs_bhsd_gqa_d96", p, Pattern::sliding_tile({1, 3, 3}), {}});
  }
  c.push_back({"query_runs_dense_cut_tiles", base({2, 10, 30}, {1, 4, 8}, 2, 2, 64, 8), Pattern::dense(), {}});
  return c;
}

std::vector<Case> small_cases() {
  std::vector<Case> c;
  c.push_back({"sta_even_grid", base({8, 32, 40}, {2, 8, 8}, 2, 2, 128), Pattern::sliding_tile({3, 3, 3}), {}});
  c.push_back({"sta_partial_every_axis_even_window", base({9, 21, 27}, {2, 8, 8}, 2, 2, 128),
               Pattern::sliding_tile({3, 2, 2}), {}});
  {
    Problem p = base({6, 16, 24}, {2, 8, 8}, 2, 1, 64, 40);
    p.batch = 2;
    c.push_back({"text_last_partial_gqa_d64", p, Pattern::sliding_tile({1, 1, 1}), {17, 40}});
  }
  {
    Problem p = base({4, 16, 16}, {2, 8, 8}, 2, 2, 128, 130);
    p.batch = 3;
    p.text_position = TextPosition::first;
    c.push_back({"text_first_len0_full_partial", p, Pattern::sliding_tile({1, 2, 1}), {0, 130, 77}});
  }
  {
    Problem p = base({6, 16, 16}, {2, 8, 8}, 2, 2, 96);
    p.dtype = DType::f16;
    c.push_back({"f16_d96", p, Pattern::sliding_tile({2, 1, 2}), {}});
  }
  {
    Problem p = base({6, 16, 16}, {2, 8, 8}, 4, 2, 64, 20);
    p.layout = Layout::bhsd;
    c.push_back({"bhsd_gqa", p, Pattern::sliding_tile(std::vector<Dim3>{{1, 1, 1}, {3, 3, 3}, {2, 2, 2}, {1, 2, 1}}),
                 {}});
  }
  {
    Problem p = base({5, 16, 16}, {1, 8, 16}, 2, 2, 128);
    c.push_back({"attention_tile_tt1", p, Pattern::attention_tile(1, 0), {}});
  }
  {
    Problem p = base({7, 16, 16}, {2, 8, 8}, 2, 2, 128, 16);
    c.push_back({"attention_tile_masked_blocks", p, Pattern::attention_tile(std::vector<HeadParams>{{{1, 1, 1}, 1, 0}, {{1, 1, 1}, 0, 1}}),
                 {}});
  }
  // Tiles cut short on every axis: each of the 8 tile classes gets its own box (2x8x8, 3x8x5, 3x5x8, ...), so
  // blocks of 128, 120 and fewer tokens share the pipeline stages.
  {
    Problem p = base({15, 21, 20}, {6, 8, 8}, 2, 1, 64, 40);
    p.batch = 2;
    c.push_back({"partial_tile_classes_all_axes_gqa_d64_text", p, Pattern::sliding_tile({2, 2, 2}), {33, 0}});
  }
  // Head dim 64 chooses its query rows per plan (cuda::choose_query_rows): whole 6x8x8 tiles take 192-row items
  // (two 3x8x8 query blocks, three busy warpgroups; 4800 padded rows against 4736 at 128), the 2x8x8 tiles of the
  // D 64 cases above 128-row ones (a 192-row item would idle its third warpgroup).
  {
    Problem p = base({12, 16, 24}, {6, 8, 8}, 4, 2, 64, 72);
    p.text_position = TextPosition::first;
    c.push_back({"whole_tiles_d64_192_rows_gqa_text_first", p, Pattern::sliding_tile({2, 2, 3}), {61}});
  }
  {
    Problem p = base({9, 13, 12}, {6, 8, 8}, 2, 2, 96);
    p.dtype = DType::f16;
    c.push_back({"partial_tile_classes_f16_d96", p, Pattern::sliding_tile({1, 2, 1}), {}});
  }
  {
    Problem p = base({9, 13, 8}, {6, 8, 8}, 2, 2, 128, 16);
    c.push_back({"partial_tile_classes_attention_tile_masked_frames", p,
                 Pattern::attention_tile(std::vector<HeadParams>{{{1, 1, 1}, 1, 0}, {{1, 1, 1}, 0, 1}}), {}});
  }
  // Head dim 128 runs 192 query rows per work item: whole 6x8x8 tiles are two 3x8x8 query blocks (three busy
  // warpgroups), cut tiles get smaller query boxes whose last warpgroup has no rows and skips its GEMMs, and the
  // 200 text rows are a full block and one of 8 rows (one busy warpgroup).
  {
    Problem p = base({9, 13, 12}, {6, 8, 8}, 2, 2, 128, 200);
    p.batch = 2;
    c.push_back({"partial_tile_classes_d128_text_idle_warpgroups", p, Pattern::sliding_tile({2, 2, 2}), {200, 150}});
  }
  c.push_back({"window_larger_than_grid_one_tile_axis", base({2, 16, 16}, {2, 8, 8}, 2, 2, 64),
               Pattern::sliding_tile({5, 5, 5}), {}});
  c.push_back({"small_tiles_ragged_blocks", base({8, 12, 12}, {4, 4, 4}, 2, 2, 128), Pattern::sliding_tile({1, 3, 3}), {}});
  c.push_back({"dense_with_text", base({4, 16, 16}, {2, 8, 8}, 2, 2, 128, 50), Pattern::dense(), {}});
  {
    Problem p = base({4, 16, 16}, {2, 8, 8}, 2, 2, 128);
    p.order = TokenOrder::tiled;
    c.push_back({"tiled_order", p, Pattern::sliding_tile({1, 1, 2}), {}});
  }
  {
    // Per-batch launches: bhsd storage whose batch stride is padded (not heads * head stride).
    Problem p = base({4, 16, 16}, {2, 8, 8}, 2, 2, 64, 8);
    p.batch = 2;
    const int64_t S = p.sequence_length();
    p.q = p.k = p.v = p.o = Strides{2 * S * 64 + 64, 64, S * 64, 1};
    c.push_back({"padded_batch_stride", p, Pattern::sliding_tile({1, 1, 1}), {5, 8}});
  }
  {
    // Block list: random key tiles per (head, query tile), always including the query's own tile.
    Problem p = base({4, 16, 24}, {2, 8, 8}, 2, 2, 128);
    const TileGrid g(p.latent, p.tile);
    std::mt19937 rng(7);
    std::vector<int64_t> off{0};
    std::vector<int32_t> tiles;
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t qt = 0; qt < g.num_tiles(); ++qt) {
        for (int64_t kt = 0; kt < g.num_tiles(); ++kt)
          if (kt == qt || rng() % 3 == 0) tiles.push_back(static_cast<int32_t>(kt));
        off.push_back(static_cast<int64_t>(tiles.size()));
      }
    c.push_back({"block_list", p, Pattern::block_list(off, tiles), {}});
  }
  // Query runs (query_runs.hpp): windows spanning the tile grid's columns, so whole token rows share their keys and
  // the plan takes 1-D run blocks (the last of a run overlapping the one before); CudaQueryRuns below checks that
  // they are taken and change no bit.
  for (const Case& r : query_run_cases()) c.push_back(r);
  return c;
}

class CudaSmall : public ::testing::TestWithParam<int> {};

TEST_P(CudaSmall, MatchesCpuReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  const Case c = small_cases()[GetParam()];
  SCOPED_TRACE(c.name);
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const Plan plan(c.problem, c.pattern, Device::cuda);
  const Buffers in = random_inputs(plan, c.text_len, seed);
  DeviceRun dev(plan, in);
  const Result a = dev.run();
  const Result ref = cpu_reference(c.problem, c.pattern, in);
  expect_close(plan, a, ref, 1e-2);
  const Result b = dev.run();
  EXPECT_EQ(0, std::memcmp(a.o.data(), b.o.data(), a.o.size() * 2)) << "output differs between identical runs";

  // The GPU reference must agree with the CPU reference too (it is the oracle for large problems).
  const Plan ref_plan(c.problem, c.pattern, Device::cuda_reference);
  DeviceRun ref_dev(ref_plan, in);
  expect_close(ref_plan, ref_dev.run(), ref, 1e-2);
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaSmall, ::testing::Range(0, static_cast<int>(small_cases().size())),
                         [](const auto& info) { return small_cases()[info.param].name; });

/// Query run blocks compute every row exactly as the tiles' blocks do (the same keys in the same order, each row's
/// softmax its own): with their keys in the tiles' boxes (TILEWISE_KEY_RUNS=0) the outputs are bitwise those of the
/// tiles' blocks (TILEWISE_QUERY_RUNS=0). Key-run blocks visit the keys in another order (raster rows, not tile by
/// tile), so the full runs' outputs are only close to them (and the CPU reference, CudaSmall). The cases qualify for
/// runs by the core's answer (fewer run blocks than the tiles' query blocks; whether the backend took them shows in
/// bench_forward.py --variants tiles=@TILEWISE_QUERY_RUNS=0).
TEST(CudaQueryRuns, RunBlocksChangeNoBitAgainstTheTilesBlocks) {
  for (const Case& c : query_run_cases()) {
    const TileGrid g(c.problem.latent, c.problem.tile);
    const int64_t blocks = run_blocks(query_runs(c.pattern.kind, c.pattern.heads[0], g), c.problem.head_dim == 128 ? 192 : 128);
    EXPECT_GT(blocks, 0) << c.name;
    EXPECT_LT(blocks, g.num_tiles()) << c.name << ": no fewer blocks than the tiles'";
  }
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  for (const Case& c : query_run_cases()) {
    SCOPED_TRACE(c.name);
    const uint32_t seed = std::random_device{}();
    SCOPED_TRACE("seed " + std::to_string(seed));
    const Plan runs(c.problem, c.pattern, Device::cuda);
    ::setenv("TILEWISE_KEY_RUNS", "0", 1);
    const Plan query_runs_only(c.problem, c.pattern, Device::cuda);
    ::setenv("TILEWISE_QUERY_RUNS", "0", 1);
    const Plan tiles(c.problem, c.pattern, Device::cuda);
    ::unsetenv("TILEWISE_QUERY_RUNS");
    ::unsetenv("TILEWISE_KEY_RUNS");
    const Buffers in = random_inputs(runs, c.text_len, seed);
    const Result a = DeviceRun(query_runs_only, in).run(), b = DeviceRun(tiles, in).run();
    EXPECT_EQ(0, std::memcmp(a.o.data(), b.o.data(), a.o.size() * 2)) << "O differs from the tiles' blocks";
    EXPECT_EQ(0, std::memcmp(a.lse.data(), b.lse.data(), a.lse.size() * sizeof(float))) << "LSE differs";
    expect_close(runs, DeviceRun(runs, in).run(), b, 1e-2);
  }
}

TEST(CudaFullSize, HunyuanShapesMatchGpuReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  struct Full {
    Dim3 latent;
    int64_t text;
    std::vector<int32_t> len;
  };
  for (const Full& f : {Full{{30, 48, 80}, 256, {226}}, Full{{33, 45, 80}, 0, {}}}) {
    Problem p = base(f.latent, {6, 8, 8}, 2, 2, 128, f.text);
    const Pattern pat = Pattern::sliding_tile({3, 3, 3});
    const uint32_t seed = std::random_device{}();
    SCOPED_TRACE("latent " + std::to_string(f.latent.t) + "x" + std::to_string(f.latent.h) + "x" +
                 std::to_string(f.latent.w) + " seed " + std::to_string(seed));
    const Plan fast(p, pat, Device::cuda), ref(p, pat, Device::cuda_reference);
    const Buffers in = random_inputs(fast, f.len, seed);
    DeviceRun a(fast, in), b(ref, in);
    expect_close(fast, a.run(), b.run(), 1e-2);
  }
}

// Blocks of partial tiles hold fewer than 128 tokens, and the rows past them in a pipeline stage may keep
// another block's keys and values. NaNs in one tile's K and V must stay in the rows whose window holds that
// tile, as in the reference: a stale NaN value times a zero probability would spread them.
TEST(CudaPartialTiles, NonFiniteKeysStayInTheRowsThatSeeThem) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  const Pattern pat = Pattern::sliding_tile({1, 2, 2});
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const Plan plan(base({15, 21, 20}, {6, 8, 8}, 2, 2, 128), pat, Device::cuda);
  const Problem& p = plan.problem();  // strides and sequence length resolved
  Buffers in = random_inputs(plan, {}, seed);
  const uint16_t nan = to_bits(std::numeric_limits<float>::quiet_NaN(), p.dtype);
  for (int64_t t = 0; t < 6; ++t)  // every token of tile (0, 0, 0)
    for (int64_t h = 0; h < 8; ++h)
      for (int64_t w = 0; w < 8; ++w)
        for (int64_t head = 0; head < p.kv_heads; ++head)
          for (int64_t d = 0; d < p.head_dim; ++d) {
            const int64_t pos = (t * p.latent.h + h) * p.latent.w + w;
            in.k[pos * p.k.seq + head * p.k.head + d] = nan;
            in.v[pos * p.v.seq + head * p.v.head + d] = nan;
          }
  const Result got = DeviceRun(plan, in).run(), ref = cpu_reference(p, pat, in);
  int64_t finite_rows = 0, nan_rows = 0, leaked = 0;
  double err2 = 0, ref2 = 0;
  for (int64_t s = 0; s < p.seq_len; ++s)
    for (int64_t head = 0; head < p.q_heads; ++head) {
      const int64_t i0 = s * p.o.seq + head * p.o.head;
      const bool row_finite = std::isfinite(from_bits(ref.o[i0], p.dtype));
      (row_finite ? finite_rows : nan_rows)++;
      if (!row_finite) continue;
      for (int64_t d = 0; d < p.head_dim; ++d) {
        const float x = from_bits(got.o[i0 + d], p.dtype), y = from_bits(ref.o[i0 + d], p.dtype);
        if (!std::isfinite(x)) ++leaked;
        err2 += (double(x) - y) * (double(x) - y);
        ref2 += double(y) * y;
      }
    }
  EXPECT_GT(nan_rows, 0) << "the oracle should see the NaN tile in some rows";
  EXPECT_GT(finite_rows, nan_rows) << "most rows' windows should not hold the NaN tile";
  EXPECT_EQ(leaked, 0) << "non-finite outputs in rows whose window does not hold the NaN tile";
  EXPECT_LE(std::sqrt(err2 / ref2), 1e-2) << "relative L2 error over the finite rows";
}

TEST(CudaErrors, MisalignedStridesAndHostPointers) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  Problem p = base({4, 16, 16}, {2, 8, 8}, 2, 2, 64);
  p.q = Strides{p.sequence_length() * 2 * 64 + 4, 2 * 64, 64, 1};  // batch stride of 4 elements past 16 bytes
  try {
    Plan plan(p, Pattern::dense(), Device::cuda);
    FAIL() << "expected tilewise::Error";
  } catch (const Error& e) {
    EXPECT_EQ(e.argument(), "q_strides");
    EXPECT_NE(std::string(e.what()).find("multiples of 16 bytes"), std::string::npos) << e.what();
  }
  Problem ok = base({4, 16, 16}, {2, 8, 8}, 2, 2, 64);
  const Plan plan(ok, Pattern::dense(), Device::cuda);
  std::vector<uint16_t> host(plan.problem().sequence_length() * 2 * 64);
  try {
    plan.run({host.data(), host.data(), host.data(), host.data()});
    FAIL() << "expected tilewise::Error for host pointers";
  } catch (const Error& e) {
    EXPECT_EQ(e.argument(), "q");
  }
  Problem f32 = ok;
  f32.dtype = DType::f32;
  EXPECT_THROW((void)Plan(f32, Pattern::dense(), Device::cuda), Error);
  Problem d80 = ok;
  d80.head_dim = 80;
  EXPECT_THROW((void)Plan(d80, Pattern::dense(), Device::cuda), Error);
}

/// Device buffers for one problem, filled from host vectors; a tiny RAII holder for the two tests below.
struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(size_t bytes) { EXPECT_EQ(cudaMalloc(&ptr, bytes), cudaSuccess); }
  ~DeviceBuffer() { cudaFree(ptr); }
};

TEST(CudaGraph, CaptureAndReplayMatchEagerAndReadTextLenOnDevice) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  Problem p = base({8, 32, 40}, {2, 8, 8}, 2, 2, 128, 40);
  p.batch = 2;
  const Plan plan(p, Pattern::sliding_tile({3, 3, 3}), Device::cuda);
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const Buffers in = random_inputs(plan, {17, 40}, seed);
  DeviceRun eager(plan, in);
  const Result want = eager.run();

  const size_t elems = in.q.size(), bytes = elems * 2;
  DeviceBuffer q(bytes), k(bytes), v(bytes), o(bytes), len(2 * sizeof(int32_t));
  CUDA_OK(cudaMemcpy(q.ptr, in.q.data(), bytes, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(k.ptr, in.k.data(), bytes, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(v.ptr, in.v.data(), bytes, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(len.ptr, in.text_len.data(), 2 * sizeof(int32_t), cudaMemcpyHostToDevice));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  // Global capture mode: any allocation or synchronisation inside run() would invalidate the capture.
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  plan.run({q.ptr, k.ptr, v.ptr, o.ptr, nullptr, static_cast<const int32_t*>(len.ptr)}, stream);
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  std::vector<uint16_t> got(elems);
  for (int replay = 0; replay < 2; ++replay) {
    CUDA_OK(cudaMemsetAsync(o.ptr, 0xFF, bytes, stream));
    CUDA_OK(cudaGraphLaunch(exec, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    CUDA_OK(cudaMemcpy(got.data(), o.ptr, bytes, cudaMemcpyDeviceToHost));
    EXPECT_EQ(0, std::memcmp(got.data(), want.o.data(), bytes)) << "replay " << replay << " differs from eager";
  }
  // The graph reads text_len from the device at replay time: new lengths, same graph, new result.
  const std::vector<int32_t> other{0, 23};
  CUDA_OK(cudaMemcpy(len.ptr, other.data(), 2 * sizeof(int32_t), cudaMemcpyHostToDevice));
  CUDA_OK(cudaGraphLaunch(exec, stream));
  CUDA_OK(cudaStreamSynchronize(stream));
  CUDA_OK(cudaMemcpy(got.data(), o.ptr, bytes, cudaMemcpyDeviceToHost));
  Buffers in2 = in;
  in2.text_len = other;
  Result want2 = DeviceRun(plan, in2).run();
  EXPECT_EQ(0, std::memcmp(got.data(), want2.o.data(), bytes)) << "replay with new device text_len";
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

TEST(CudaLarge, MoreThan2To31ElementsPerTensor) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device: GPU test skipped";
  // HunyuanVideo 720p with batch 8: 2.83e9 elements per tensor (5.7 GB), beyond 32-bit offsets. The last
  // batch element holds random data that is also run alone; its output must be bitwise identical.
  Problem big = base({30, 48, 80}, {6, 8, 8}, 24, 24, 128, 256);
  big.batch = 8;
  Problem one = big;
  one.batch = 1;
  const Pattern pat = Pattern::sliding_tile({3, 3, 3});
  const Plan plan_big(big, pat, Device::cuda), plan_one(one, pat, Device::cuda);
  const size_t per = static_cast<size_t>(one.sequence_length()) * 24 * 128, total = per * 8;
  ASSERT_GT(total, size_t{1} << 31);
  const uint32_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.f, 1.f);
  std::vector<uint16_t> host(per);
  DeviceBuffer qb(total * 2), kb(total * 2), vb(total * 2), ob(total * 2), q1(per * 2), k1(per * 2), v1(per * 2),
      o1(per * 2);
  for (auto [whole, single] : {std::pair{&qb, &q1}, std::pair{&kb, &k1}, std::pair{&vb, &v1}}) {
    for (auto& e : host) e = detail::float_to_bf16(n(rng));
    CUDA_OK(cudaMemset(whole->ptr, 0x3F, (total - per) * 2));  // other batch elements: any finite data
    CUDA_OK(cudaMemcpy(static_cast<char*>(whole->ptr) + (total - per) * 2, host.data(), per * 2, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(single->ptr, host.data(), per * 2, cudaMemcpyHostToDevice));
  }
  const std::vector<int32_t> lens_big{226, 226, 226, 226, 226, 226, 226, 101}, lens_one{101};
  DeviceBuffer lb(8 * 4), l1(4);
  CUDA_OK(cudaMemcpy(lb.ptr, lens_big.data(), 8 * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(l1.ptr, lens_one.data(), 4, cudaMemcpyHostToDevice));
  plan_big.run({qb.ptr, kb.ptr, vb.ptr, ob.ptr, nullptr, static_cast<const int32_t*>(lb.ptr)});
  plan_one.run({q1.ptr, k1.ptr, v1.ptr, o1.ptr, nullptr, static_cast<const int32_t*>(l1.ptr)});
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint16_t> a(per), b(per);
  CUDA_OK(cudaMemcpy(a.data(), static_cast<char*>(ob.ptr) + (total - per) * 2, per * 2, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(b.data(), o1.ptr, per * 2, cudaMemcpyDeviceToHost));
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), per * 2)) << "last batch element differs from the same data alone";
  int64_t nonfinite = 0;
  for (uint16_t x : a) nonfinite += !std::isfinite(detail::bf16_to_float(x));
  EXPECT_EQ(nonfinite, 0);
}

#else

TEST(Cuda, Skipped) { GTEST_SKIP() << "tilewise built without CUDA: GPU tests skipped"; }

#endif

}  // namespace
}  // namespace tilewise
