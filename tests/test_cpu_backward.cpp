// The CPU backward (Plan::run_backward on Device::cpu) against the independent float64 backward oracle
// (backward_oracle.hpp), on small randomized problems with fresh random inputs and upstream gradients; a
// finite-difference check against the CPU forward; and determinism.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "backward_oracle.hpp"
#include "buffer.hpp"
#include "case_families.hpp"
#include "oracle_case.hpp"

namespace {

using oracle::Buffer;
using oracle::Case;
using oracle::Kind;
using oracle::for_each_element;
using oracle::frames;
using oracle::kAllDtypes;
using oracle::sta;
using oracle::window;
using tilewise::DType;

tilewise::Plan make_plan(const Case& c) {
  return tilewise::Plan(oracle::to_problem(c), oracle::to_pattern(c), tilewise::Device::cpu);
}

/// What a backward reads: q, k, v (one buffer, at the case's views), the forward's o and lse (from the CPU
/// forward on those inputs), and random upstream gradients dout (o's view) and dlse (empty: run without it).
struct BackwardInputs {
  Buffer in, o, dout;
  std::vector<float> lse, dlse;
};

BackwardInputs make_inputs(const Case& c, const tilewise::Plan& plan, oracle::Rng& rng, bool with_dlse) {
  const oracle::Views views = oracle::make_views(c);
  const oracle::Storage st = oracle::storage_of(c.dtype);
  BackwardInputs x{Buffer(st, views.in_size), Buffer(st, views.out_size), Buffer(st, views.out_size), {}, {}};
  x.in.randomize(rng);
  x.dout.randomize(rng);
  x.lse.assign(c.batch * c.q_heads * c.seq_len(), NAN);
  if (with_dlse) {
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    x.dlse.resize(x.lse.size());
    for (float& g : x.dlse) g = dist(rng);
  }
  plan.run({x.in.ptr(0), x.in.ptr(views.k_offset), x.in.ptr(views.v_offset), x.o.ptr(), x.lse.data(),
            c.text_len.empty() ? nullptr : c.text_len.data()});
  return x;
}

/// Runs the backward into a gradient buffer laid out like the input buffer (dq at q's view, dk at k's, dv at
/// v's: a fused qkv input gets a fused dqkv), every element poisoned with NaN first.
Buffer run_backward(const Case& c, const tilewise::Plan& plan, const BackwardInputs& x, bool deterministic = false) {
  const oracle::Views views = oracle::make_views(c);
  Buffer grads(x.in.st, views.in_size);
  grads.fill(NAN);
  tilewise::GradTensors t;
  t.q = x.in.ptr(0), t.k = x.in.ptr(views.k_offset), t.v = x.in.ptr(views.v_offset);
  t.o = x.o.ptr(), t.lse = x.lse.data(), t.dout = x.dout.ptr(), t.dlse = x.dlse.empty() ? nullptr : x.dlse.data();
  t.dq = grads.ptr(0), t.dk = grads.ptr(views.k_offset), t.dv = grads.ptr(views.v_offset);
  t.text_len = c.text_len.empty() ? nullptr : c.text_len.data();
  plan.run_backward(t, nullptr, nullptr, deterministic);
  return grads;
}

/// The oracle's gradients on the same (stored) inputs, laid out like run_backward's buffer (NaN outside views).
std::vector<double> oracle_grads(const Case& c, const BackwardInputs& x) {
  const oracle::Views views = oracle::make_views(c);
  const std::vector<double> in = x.in.values(), dout = x.dout.values();
  const std::vector<double> dlse(x.dlse.begin(), x.dlse.end());
  std::vector<double> g(views.in_size, NAN);
  oracle::attention_backward(oracle::to_oracle(c), in.data(), in.data() + views.k_offset, in.data() + views.v_offset,
                             dout.data(), dlse.empty() ? nullptr : dlse.data(), g.data(), g.data() + views.k_offset,
                             g.data() + views.v_offset);
  return g;
}

/// The exact gradients' response to the rounding of the given o. The backward reads o as stored (16-bit: rounded)
/// and takes D_i = dO_i . o_i from it; against the exact o this adds e_i = dO_i . (o_exact_i - o_stored_i) to dLSE_i
/// (spec, "Gradients": dS_ij = P_ij (dP_ij - D_i + dLSE_i)). The gradients are linear in dLSE, so the oracle's
/// backward with dO = 0 and dLSE = e is exactly that response (dv: 0). Laid out like oracle_grads.
std::vector<double> o_rounding_response(const Case& c, const BackwardInputs& x) {
  const oracle::Views views = oracle::make_views(c);
  const oracle::Problem p = oracle::to_oracle(c);
  const std::vector<double> in = x.in.values(), dout = x.dout.values();
  std::vector<double> o_exact(views.out_size, NAN);
  oracle::attention(p, in.data(), in.data() + views.k_offset, in.data() + views.v_offset, o_exact.data(), nullptr);
  const int64_t S = c.seq_len();
  std::vector<double> e(c.batch * c.q_heads * S, 0.0);
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t i = 0; i < S; ++i)
      for (int64_t h = 0; h < c.q_heads; ++h) {
        const int64_t row = b * views.o.batch + i * views.o.seq + h * views.o.head;
        double& ei = e[(b * c.q_heads + h) * S + i];
        for (int64_t d = 0; d < c.head_dim; ++d) ei += dout[row + d] * (o_exact[row + d] - x.o.at(row + d));
      }
  const std::vector<double> zeros(views.out_size, 0.0);
  std::vector<double> g(views.in_size, NAN);
  oracle::attention_backward(p, in.data(), in.data() + views.k_offset, in.data() + views.v_offset, zeros.data(),
                             e.data(), g.data(), g.data() + views.k_offset, g.data() + views.v_offset);
  return g;
}

/// Sequence position of text slot r (spec: text after the video, or before it).
int64_t text_position(const Case& c, int64_t r) { return (c.text_first ? 0 : c.latent.volume()) + r; }

/// Per tensor (dq, dk, dv): every element written and finite, relative L2 error within the data type's
/// tolerance (f64 also element-wise); text padding keys get exactly zero dk and dv; nothing outside the views
/// is written. o_rounding (16-bit only; laid out like ref): o_rounding_response; the 16-bit run is then compared
/// with ref + o_rounding, the exact gradients of the o it was given.
void expect_grads_match(const Case& c, const Buffer& got, const std::vector<double>& ref,
                        const std::vector<double>* o_rounding = nullptr) {
  const oracle::Views views = oracle::make_views(c);
  std::vector<bool> covered(views.in_size, false);
  struct Tensor {
    const char* name;
    int64_t offset;
    oracle::Strides3 view;
    int64_t heads;
  };
  const Tensor tensors[] = {{"dq", 0, views.q, c.q_heads},
                            {"dk", views.k_offset, views.k, c.kv_heads},
                            {"dv", views.v_offset, views.v, c.kv_heads}};
  for (const Tensor& t : tensors) {
    SCOPED_TRACE(t.name);
    double err2 = 0, ref2 = 0, max_err = 0, max_ref = 0;
    int64_t not_finite = 0;
    for_each_element(c, t.view, t.heads, [&](int64_t i) {
      i += t.offset;
      covered[i] = true;
      const double g = got.at(i), r = ref[i] + (o_rounding ? (*o_rounding)[i] : 0.0);
      not_finite += !std::isfinite(g);
      err2 += (g - r) * (g - r);
      ref2 += r * r;
      max_err = std::max(max_err, std::abs(g - r));
      max_ref = std::max(max_ref, std::abs(r));
    });
    EXPECT_EQ(not_finite, 0) << "gradient elements not written or not finite";
    if (ref2 == 0) {
      // The true gradient is exactly zero (e.g. dq when every query sees one key and there is no dLSE: P = 1, so
      // dS = dP - D = 0): the computed one is zero up to the rounding of dP - D, whose terms are O(1) here.
      EXPECT_LE(max_err, c.dtype == DType::f64 ? 1e-12 : 1e-4) << "a gradient that is exactly zero";
      continue;
    }
    const double rel = std::sqrt(err2 / ref2);
    switch (c.dtype) {
      case DType::f64:
        EXPECT_LE(rel, 1e-10);
        EXPECT_LE(max_err, 1e-10 * max_ref);
        break;
      case DType::f32: EXPECT_LE(rel, 1e-5); break;
      case DType::bf16:
      case DType::f16:
        // Against the exact gradients of the rounded o the run was given (o_rounding): where dP - D cancels, the
        // rounding of o alone moves the gradients by more than 1% (dq 1.27% on one seed); the run's own error is
        // ~0.2%.
        EXPECT_LE(rel, 1e-2);
        break;
    }
  }
  // Padding text keys: no query sees them, so their gradients are exactly zero.
  int64_t padding_nonzero = 0;
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t r = c.text_len.empty() ? c.text : c.text_len[b]; r < c.text; ++r)
      for (int64_t h = 0; h < c.kv_heads; ++h)
        for (int64_t d = 0; d < c.head_dim; ++d) {
          const int64_t pos = text_position(c, r);
          padding_nonzero += got.at(views.k_offset + b * views.k.batch + pos * views.k.seq + h * views.k.head + d) != 0;
          padding_nonzero += got.at(views.v_offset + b * views.v.batch + pos * views.v.seq + h * views.v.head + d) != 0;
        }
  EXPECT_EQ(padding_nonzero, 0) << "dk/dv of text padding keys must be exactly 0";
  int64_t gaps_written = 0;
  for (int64_t i = 0; i < views.in_size; ++i) gaps_written += !covered[i] && !std::isnan(got.at(i));
  EXPECT_EQ(gaps_written, 0) << "elements outside the gradient views were written";
}

void check_backward(const Case& c, oracle::Rng& rng, bool with_dlse = true) {
  SCOPED_TRACE(oracle::describe(c) + (with_dlse ? " with dLSE" : " without dLSE"));
  const tilewise::Plan plan = make_plan(c);
  const BackwardInputs x = make_inputs(c, plan, rng, with_dlse);
  const bool half = c.dtype == DType::bf16 || c.dtype == DType::f16;
  const std::vector<double> o_rounding = half ? o_rounding_response(c, x) : std::vector<double>{};
  expect_grads_match(c, run_backward(c, plan, x), oracle_grads(c, x), half ? &o_rounding : nullptr);
}

/// The sliding-tile grid of this file's families: 3x6x7 in 2x4x3 tiles, a 2x2x3 grid with a partial last tile
/// on every axis (smaller than the forward's 5x6x7: the backward oracle is slower).
constexpr tilewise::Dim3 kLatent{3, 6, 7};

class CpuBackward : public ::testing::Test {
 protected:
  const uint64_t seed = oracle::fresh_seed();
  oracle::Rng rng{seed};
  ::testing::ScopedTrace trace{__FILE__, __LINE__, oracle::seed_note(seed)};
};

TEST_F(CpuBackward, RandomProblemsEveryPatternAndDtype) {
  oracle::for_each_random_case(rng, 3, [&](Case c, int rep) {
    c.batch = std::min<int64_t>(c.batch, 2);  // keep the dense oracle quick
    if (c.text_len.size() > 2) c.text_len.resize(2);
    check_backward(c, rng, rep != 1);
  });
}

TEST_F(CpuBackward, PartialTilesOnEveryAxisOddAndEvenWindows) {
  for (const Case& c : oracle::partial_tile_cases()) check_backward(c, rng);
}

TEST_F(CpuBackward, WindowLargerThanGridIsWholeAxis) {
  for (const Case& c : oracle::window_larger_than_grid_cases(kLatent)) check_backward(c, rng);
}

TEST_F(CpuBackward, TextFirstAndLastWithPerBatchLengths) {
  // 3x4x5 in 2x2x2 tiles: smaller than the forward's grid, as 4 batches go through the slower oracle. The cases
  // without text_len also run without dLSE.
  for (const Case& c : oracle::text_first_last_cases({3, 4, 5}, {2, 2, 2})) check_backward(c, rng, !c.text_len.empty());
}

TEST_F(CpuBackward, TextKeysSpanSeveralWorkItems) {  // text capacity above one block of text rows / keys
  Case c = sta({window(1, 2, 1)}, {2, 3, 4}, {2, 2, 2});
  c.batch = 2;
  c.text = 150;
  c.text_first = true;
  c.text_len = {131, 64};
  c.head_dim = 64;
  check_backward(c, rng);
}

TEST_F(CpuBackward, GroupedQueryAttentionWithPerHeadWindows) {
  for (const Case& c : oracle::gqa_per_head_window_cases(kLatent)) check_backward(c, rng);
}

TEST_F(CpuBackward, HeadDims) {
  for (const Case& c : oracle::head_dim_cases(kLatent)) check_backward(c, rng);
}

TEST_F(CpuBackward, StorageLayoutsAndStridedViews) {
  for (const Case& c : oracle::storage_cases(kLatent)) check_backward(c, rng);
}

TEST_F(CpuBackward, AttentionTileFullAndMaskedBlocks) {
  // One padding text slot of three: its dk/dv must be exactly 0.
  for (const Case& c : oracle::attention_tile_cases({2})) check_backward(c, rng);
}

TEST_F(CpuBackward, DenseAndExplicitBlockLists) {
  // The f16 case runs without dLSE.
  for (const Case& c : oracle::dense_and_block_list_cases(rng, {1})) check_backward(c, rng, c.dtype != DType::f16);
}

TEST_F(CpuBackward, HeadOffsetSelectsGlobalTableEntries) {
  for (const Case& c : oracle::head_offset_cases(rng, kLatent)) check_backward(c, rng);
}

TEST_F(CpuBackward, TiledOrderAndCustomScale) {
  for (const Case& c : oracle::custom_scale_cases(kLatent)) check_backward(c, rng);
}

TEST_F(CpuBackward, WithAndWithoutDlseEveryDtype) {
  for (DType dtype : kAllDtypes)
    for (bool with_dlse : {false, true}) {
      Case c = sta({window(3, 1, 2)}, {4, 5, 6}, {2, 2, 4});
      c.dtype = dtype;
      c.text = 4;
      c.text_len = {3};
      check_backward(c, rng, with_dlse);
    }
}

/// Loss whose gradient the backward computes: sum(o * dO) + sum(lse * dLSE), with o and lse from the CPU forward.
double forward_loss(const Case& c, const tilewise::Plan& plan, const Buffer& in, const std::vector<double>& dout,
                    const std::vector<float>& dlse) {
  const oracle::Views views = oracle::make_views(c);
  Buffer o(in.st, views.out_size);
  std::vector<float> lse(c.batch * c.q_heads * c.seq_len());
  plan.run({in.ptr(0), in.ptr(views.k_offset), in.ptr(views.v_offset), o.ptr(), lse.data(),
            c.text_len.empty() ? nullptr : c.text_len.data()});
  double loss = 0;
  for_each_element(c, views.o, c.q_heads, [&](int64_t i) { loss += o.at(i) * dout[i]; });
  for (size_t i = 0; i < dlse.size(); ++i) loss += double(lse[i]) * dlse[i];
  return loss;
}

/// Central differences of the loss against the f64 backward, element by element over q, k and v. Without dLSE the
/// loss is f64 throughout (step 1e-5, tight); with dLSE it reads the float32 lse, so a fourth-order stencil with a
/// larger step keeps the lse rounding small.
void expect_finite_differences_match(const Case& c, oracle::Rng& rng, bool with_dlse) {
  SCOPED_TRACE(oracle::describe(c) + (with_dlse ? " with dLSE" : " without dLSE"));
  ASSERT_EQ(c.dtype, DType::f64);
  const tilewise::Plan plan = make_plan(c);
  const BackwardInputs x = make_inputs(c, plan, rng, with_dlse);
  const Buffer grads = run_backward(c, plan, x);
  const oracle::Views views = oracle::make_views(c);
  const std::vector<double> dout = x.dout.values();
  double max_grad = 0, max_err = 0;
  Buffer in = x.in;
  auto loss_at = [&](int64_t i, double value) {
    in.set(i, value);
    return forward_loss(c, plan, in, dout, x.dlse);
  };
  for (auto [offset, view, heads] : {std::tuple{int64_t{0}, views.q, c.q_heads}, std::tuple{views.k_offset, views.k, c.kv_heads},
                                     std::tuple{views.v_offset, views.v, c.kv_heads}})
    for_each_element(c, view, heads, [&](int64_t i) {
      i += offset;
      const double x0 = x.in.at(i);
      double fd;
      if (!with_dlse) {
        const double h = 1e-5;
        fd = (loss_at(i, x0 + h) - loss_at(i, x0 - h)) / (2 * h);
      } else {
        const double h = 1e-2;
        fd = (-loss_at(i, x0 + 2 * h) + 8 * loss_at(i, x0 + h) - 8 * loss_at(i, x0 - h) + loss_at(i, x0 - 2 * h)) /
             (12 * h);
      }
      in.set(i, x0);
      max_grad = std::max(max_grad, std::abs(grads.at(i)));
      max_err = std::max(max_err, std::abs(fd - grads.at(i)));
    });
  EXPECT_GT(max_grad, 0.0);
  EXPECT_LE(max_err, (with_dlse ? 5e-4 : 1e-7) * std::max(1.0, max_grad));
}

TEST_F(CpuBackward, FiniteDifferencesOfTheForward) {
  Case c = sta({window(1, 2, 1), window(2, 1, 2)}, {3, 2, 3}, {2, 1, 2});  // partial tiles, GQA, text first
  c.q_heads = 2;
  c.head_dim = 4;
  c.text = 3;
  c.text_first = true;
  c.text_len = {2};
  for (bool with_dlse : {false, true}) expect_finite_differences_match(c, rng, with_dlse);
  Case a;  // attention tile with masked blocks, text last
  a.kind = Kind::attention_tile;
  a.heads = {frames(1, 0)};
  a.latent = {4, 2, 2};
  a.tile = {2, 2, 1};
  a.head_dim = 4;
  a.text = 2;
  a.text_len = {1};
  for (bool with_dlse : {false, true}) expect_finite_differences_match(a, rng, with_dlse);
}

/// Bitwise the same gradients run to run, with the deterministic flag or not, and on any number of threads.
TEST_F(CpuBackward, DeterministicAcrossRunsAndThreadCounts) {
  for (DType dtype : {DType::f32, DType::bf16}) {
    Case c = oracle::random_case(rng, Kind::sliding_tile, dtype);
    c.q_heads = 4, c.kv_heads = 1, c.heads = {window(2, 3, 2)};
    SCOPED_TRACE(oracle::describe(c));
    const tilewise::Plan plan = make_plan(c);
    const BackwardInputs x = make_inputs(c, plan, rng, true);
    const Buffer first = run_backward(c, plan, x, false);
    EXPECT_EQ(run_backward(c, plan, x, true).raw, first.raw);
    const char* previous = std::getenv("TILEWISE_NUM_THREADS");
    const std::string saved = previous ? previous : "";
    for (const char* threads : {"1", "3"}) {
      setenv("TILEWISE_NUM_THREADS", threads, 1);
      EXPECT_EQ(run_backward(c, plan, x).raw, first.raw) << threads << " threads";
    }
    if (previous)
      setenv("TILEWISE_NUM_THREADS", saved.c_str(), 1);
    else
      unsetenv("TILEWISE_NUM_THREADS");
  }
}

}  // namespace
