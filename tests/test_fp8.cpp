// The FP8 forward (docs/semantics.md §11) on the CPU reference: its e4m3 rounding, its quantised arithmetic
// against the independent float64 simulation of the spec (oracle_fp8.hpp, tight), its accuracy against the
// unquantised float64 oracle, the fp8_scaled path, and the errors of every new argument (C++ and C ABI).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "buffer.hpp"
#include "core/numeric.hpp"
#include "oracle_case.hpp"
#include "oracle_fp8.hpp"
#include "tilewise/fp8.hpp"
#include "tilewise/tilewise.h"
#include "tilewise/tilewise.hpp"

namespace {

using oracle::Buffer;
using oracle::Case;
using oracle::Kind;
using oracle::Outputs;
using oracle::random_inputs;
using tilewise::DType;
using tilewise::Precision;

constexpr double kSentinel = 1234.5;

// ---- e4m3 ---------------------------------------------------------------------------------------------------

TEST(E4m3, EveryCodeDecodesToTheFormatsValueAndEncodesBack) {
  for (int code = 0; code < 256; ++code) {
    const auto c = static_cast<uint8_t>(code);
    const double value = tilewise::detail::e4m3_to_double(c);
    if ((code & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(value)) << code;
      continue;
    }
    EXPECT_EQ(value, oracle::fp8::value_of(c)) << code;
    // -0 encodes as 0x80, like every other negative value.
    EXPECT_EQ(tilewise::detail::double_to_e4m3(value), code) << code << " = " << value;
  }
  EXPECT_EQ(tilewise::detail::double_to_e4m3(NAN), 0x7f);
}

TEST(E4m3, RoundsToNearestEvenAndSaturates) {
  const std::vector<double>& v = oracle::fp8::values();
  for (size_t i = 0; i + 1 < v.size(); ++i) {
    const double mid = (v[i] + v[i + 1]) / 2;  // a tie: to the even code
    EXPECT_EQ(tilewise::detail::double_to_e4m3(mid), i % 2 == 0 ? i : i + 1) << mid;
    EXPECT_EQ(tilewise::detail::double_to_e4m3(-mid), (i % 2 == 0 ? i : i + 1) | 0x80) << -mid;
    EXPECT_EQ(tilewise::detail::double_to_e4m3(std::nextafter(mid, 0.0)), i) << mid;
    EXPECT_EQ(tilewise::detail::double_to_e4m3(std::nextafter(mid, 1e9)), i + 1) << mid;
  }
  for (double big : {448.0, 449.0, 464.0, 1e6, 1e300, double(INFINITY)}) {
    EXPECT_EQ(tilewise::detail::round_e4m3(big), 448.0) << big;
    EXPECT_EQ(tilewise::detail::round_e4m3(-big), -448.0) << big;
  }
  EXPECT_EQ(tilewise::detail::round_e4m3(std::ldexp(1.0, -10)), 0.0);  // half the smallest subnormal: to even (0)
  EXPECT_EQ(tilewise::detail::round_e4m3(std::ldexp(1.5, -10)), std::ldexp(1.0, -9));
  const uint64_t seed = oracle::fresh_seed();
  SCOPED_TRACE(oracle::seed_note(seed));
  oracle::Rng rng(seed);
  std::uniform_real_distribution<double> exponent(-12, 10), sign(-1, 1);
  for (int i = 0; i < 20000; ++i) {
    const double x = std::copysign(std::exp2(exponent(rng)), sign(rng));
    ASSERT_EQ(tilewise::detail::double_to_e4m3(x), oracle::fp8::code_of(x)) << x;
  }
}

TEST(Fp8Groups, ScalesAndKeyBlocks) {
  EXPECT_EQ(tilewise::fp8::scale_of(0.0f), 1.0f);
  EXPECT_EQ(tilewise::fp8::inv_scale_of(0.0f), 1.0f);
  EXPECT_EQ(tilewise::fp8::scale_of(896.0f), 2.0f);
  EXPECT_EQ(tilewise::fp8::inv_scale_of(896.0f), 0.5f);
  EXPECT_TRUE(std::isfinite(tilewise::fp8::inv_scale_of(1e-44f)));  // a denormal group stays finite
  // latent 5x6x7 in 2x4x3 tiles: 3x2x3 = 18 tiles; 300 text positions (text first) are 3 blocks of 128.
  const tilewise::TileGrid grid({5, 6, 7}, {2, 4, 3});
  const tilewise::TokenMap map{grid, {210, 300, tilewise::TextPosition::first}, tilewise::TokenOrder::raster};
  EXPECT_EQ(tilewise::fp8::key_blocks(grid, 300), 18 + 3);
  EXPECT_EQ(tilewise::fp8::key_block(map, 0), 18);
  EXPECT_EQ(tilewise::fp8::key_block(map, 127), 18);
  EXPECT_EQ(tilewise::fp8::key_block(map, 128), 19);
  EXPECT_EQ(tilewise::fp8::key_block(map, 299), 20);
  EXPECT_EQ(tilewise::fp8::key_block(map, 300), 0);             // video (0, 0, 0)
  EXPECT_EQ(tilewise::fp8::key_block(map, 300 + 7 * 6 * 2 + 4 * 7 + 6), (1 * 2 + 1) * 3 + 2);  // (2, 4, 6)
}

// ---- the quantised reference against the oracle ---------------------------------------------------------------

tilewise::Problem fp8_problem(const Case& c, Precision precision) {
  tilewise::Problem p = oracle::to_problem(c);
  p.precision = precision;
  return p;
}

/// precision fp8 on `in` (the case's storage), against the oracle's quantisation and arithmetic of the same values.
Outputs run_fp8(const Case& c, const Buffer& in) {
  const oracle::Views views = oracle::make_views(c);
  Outputs r{Buffer(in.st, views.out_size), std::vector<float>(c.batch * c.q_heads * c.seq_len(), NAN), {}, {}};
  r.o.fill(kSentinel);
  const tilewise::Plan plan(fp8_problem(c, Precision::fp8), oracle::to_pattern(c));
  plan.run({in.ptr(0), in.ptr(views.k_offset), in.ptr(views.v_offset), r.o.ptr(), r.lse.data(),
            c.text_len.empty() ? nullptr : c.text_len.data()});
  const std::vector<double> x = in.values();
  const oracle::Problem op = oracle::to_oracle(c);
  const oracle::fp8::Quantised q =
      oracle::fp8::quantise_inputs(op, x.data(), x.data() + views.k_offset, x.data() + views.v_offset);
  r.ref_o.assign(views.out_size, NAN);
  r.ref_lse.assign(r.lse.size(), NAN);
  oracle::fp8::attention(op, q, true, r.ref_o.data(), r.ref_lse.data());
  return r;
}

/// Outputs equal to the oracle's up to the final rounding to the storage type; lse to float32.
void expect_matches(const Case& c, const Outputs& r) {
  const oracle::Views views = oracle::make_views(c);
  const oracle::Storage st = oracle::storage_of(c.dtype);
  std::vector<bool> covered(views.out_size, false);
  double worst = 0;
  int64_t not_finite = 0;
  oracle::for_each_element(c, views.o, c.q_heads, [&](int64_t i) {
    covered[i] = true;
    const double got = r.o.at(i), want = r.ref_o[i];
    not_finite += !std::isfinite(got);
    // The reference computes in float64 and rounds to the storage type through fp32, as a kernel's fp32
    // accumulator is: within half a unit of the storage type (and one of fp32) of the oracle.
    const double mag = std::max(std::abs(got), std::abs(want));
    const double unit = st == oracle::Storage::f64
                            ? 1e-12 * std::max(1.0, std::abs(want))
                            : 0.5 * oracle::ulp(st, mag) + (st == oracle::Storage::f32 ? 0.5 : 1.0) *
                                                               oracle::ulp(oracle::Storage::f32, mag);
    worst = std::max(worst, std::abs(got - want) / (unit + 1e-300));
  });
  int64_t gaps = 0;
  for (int64_t i = 0; i < views.out_size; ++i) gaps += !covered[i] && r.o.at(i) != oracle::round_trip(st, kSentinel);
  double lse_err = 0;
  for (size_t i = 0; i < r.lse.size(); ++i)
    lse_err = std::max(lse_err, std::abs(r.lse[i] - r.ref_lse[i]) / std::max(1.0, std::abs(r.ref_lse[i])));
  EXPECT_EQ(not_finite, 0);
  EXPECT_EQ(gaps, 0) << "elements outside the output view were written";
  EXPECT_LE(worst, 1.0) << "an output differs from the oracle's by more than its final rounding";
  EXPECT_LE(lse_err, 2e-7);
}

class Fp8Reference : public ::testing::Test {
 protected:
  const uint64_t seed = oracle::fresh_seed();
  oracle::Rng rng{seed};
  ::testing::ScopedTrace trace{__FILE__, __LINE__, oracle::seed_note(seed)};

  void check(const Case& c) {
    SCOPED_TRACE(oracle::describe(c));
    expect_matches(c, run_fp8(c, random_inputs(c, rng)));
  }
};

TEST_F(Fp8Reference, RandomProblemsEveryPatternAndDtype) {
  // Partial tiles, odd / even / oversized windows, text first or last with per-batch lengths, GQA, D 64/96/128,
  // bshd / bhsd / fused strided views (oracle_case.hpp's generator).
  for (Kind kind : {Kind::sliding_tile, Kind::attention_tile, Kind::dense, Kind::block_list})
    for (DType dtype : {DType::f64, DType::f32, DType::bf16, DType::f16})
      for (int rep = 0; rep < 3; ++rep) check(oracle::random_case(rng, kind, dtype));
}

TEST_F(Fp8Reference, TextSpanningSeveralKeyBlocksWithPadding) {
  for (bool first : {false, true}) {
    Case c;
    c.kind = Kind::sliding_tile;
    c.heads = {{1, 2, 1, 0, 0}};
    c.latent = {3, 4, 5};
    c.tile = {2, 4, 3};
    c.head_dim = 64;
    c.batch = 3;
    c.q_heads = 2;
    c.kv_heads = 1;
    c.dtype = DType::bf16;
    c.text = 300;  // key blocks of 128, 128 and 44 text positions
    c.text_first = first;
    c.text_len = {0, 300, 131};  // none valid, all, and a block with 3 valid keys then padding
    check(c);
  }
}

TEST_F(Fp8Reference, HeadDimsAndGqa) {
  for (int64_t d : {64, 96, 128}) {
    Case c;
    c.kind = Kind::sliding_tile;
    c.heads = {{3, 1, 2, 0, 0}, {1, 1, 1, 0, 0}, {2, 2, 2, 0, 0}, {9, 9, 9, 0, 0}};
    c.head_dim = d;
    c.q_heads = 4;
    c.kv_heads = 2;
    c.batch = 2;
    c.text = 5;
    c.text_len = {5, 2};
    c.dtype = DType::f16;
    check(c);
  }
}

/// precision fp8 is quantize_fp8 followed by an fp8_scaled run, output for output; only the lse differs, by the
/// smoothing term.
TEST_F(Fp8Reference, QuantizeThenScaledIsFp8) {
  Case c = oracle::random_case(rng, Kind::sliding_tile, DType::bf16);
  c.storage = oracle::StorageKind::bshd;
  SCOPED_TRACE(oracle::describe(c));
  const oracle::Views views = oracle::make_views(c);
  const Buffer in = random_inputs(c, rng);
  const Outputs fp8 = run_fp8(c, in);
  expect_matches(c, fp8);

  const tilewise::Plan quantizer(fp8_problem(c, Precision::fp8), oracle::to_pattern(c));
  const int64_t S = c.seq_len(), D = c.head_dim, blocks = quantizer.fp8_key_blocks();
  std::vector<uint8_t> q8(c.batch * S * c.q_heads * D), k8(c.batch * S * c.kv_heads * D), v8(k8.size());
  std::vector<float> qs(c.batch * c.q_heads * S), ks(c.batch * c.kv_heads * blocks), vs(c.batch * c.kv_heads * D);
  const int32_t* text_len = c.text_len.empty() ? nullptr : c.text_len.data();
  quantizer.quantize_fp8(in.ptr(0), in.ptr(views.k_offset), in.ptr(views.v_offset), text_len,
                         {q8.data(), k8.data(), v8.data(), qs.data(), ks.data(), vs.data()});
  // The quantised tensors are the oracle's, code for code.
  const std::vector<double> x = in.values();
  const oracle::fp8::Quantised ref = oracle::fp8::quantise_inputs(
      oracle::to_oracle(c), x.data(), x.data() + views.k_offset, x.data() + views.v_offset);
  EXPECT_EQ(q8, ref.q_code);
  EXPECT_EQ(k8, ref.k_code);
  EXPECT_EQ(v8, ref.v_code);
  EXPECT_EQ(qs, ref.q_scale);
  EXPECT_EQ(ks, ref.k_scale);
  EXPECT_EQ(vs, ref.v_scale);

  const tilewise::Plan scaled(fp8_problem(c, Precision::fp8_scaled), oracle::to_pattern(c));
  Buffer o(in.st, views.out_size);
  std::vector<float> lse(fp8.lse.size());
  scaled.run({q8.data(), k8.data(), v8.data(), o.ptr(), lse.data(), text_len, qs.data(), ks.data(), vs.data()});
  EXPECT_EQ(o.raw, fp8.o.raw);
  double shift_err = 0;
  for (size_t i = 0; i < lse.size(); ++i)
    shift_err = std::max(shift_err, std::abs(lse[i] + ref.lse_shift[i] - fp8.lse[i]) / std::max(1.0, std::abs(double(fp8.lse[i]))));
  EXPECT_LE(shift_err, 1e-6);
}

double rel_l2(const std::vector<double>& a, const std::vector<double>& ref) {
  double e = 0, n = 0;
  for (size_t i = 0; i < a.size(); ++i) e += (a[i] - ref[i]) * (a[i] - ref[i]), n += ref[i] * ref[i];
  return std::sqrt(e / n);
}

/// The accuracy of §11.5 on standard normal bf16 inputs, against float64 attention on the same inputs, next to the
/// bf16 path's error.
TEST_F(Fp8Reference, AccuracyAgainstFloat64) {
  for (Kind kind : {Kind::dense, Kind::sliding_tile}) {
    Case c;
    c.kind = kind;
    c.heads = {{3, 3, 3, 0, 0}};
    c.latent = {4, 8, 8};
    c.tile = {2, 4, 4};
    c.head_dim = 128;
    c.q_heads = 2;
    c.text = 16;
    c.text_len = {12};
    c.dtype = DType::bf16;
    SCOPED_TRACE(oracle::describe(c));
    const oracle::Views views = oracle::make_views(c);
    Buffer in(oracle::Storage::bf16, views.in_size);
    std::normal_distribution<double> normal;
    for (int64_t i = 0; i < in.size(); ++i) in.set(i, normal(rng));
    const std::vector<double> x = in.values();
    std::vector<double> exact(views.out_size);
    oracle::attention(oracle::to_oracle(c), x.data(), x.data() + views.k_offset, x.data() + views.v_offset,
                      exact.data(), nullptr);
    Buffer bf16(in.st, views.out_size);
    tilewise::Plan(oracle::to_problem(c), oracle::to_pattern(c))
        .run({in.ptr(0), in.ptr(views.k_offset), in.ptr(views.v_offset), bf16.ptr(), nullptr, c.text_len.data()});
    const double fp8_err = rel_l2(run_fp8(c, in).o.values(), exact), bf16_err = rel_l2(bf16.values(), exact);
    std::printf("rel L2 vs float64: fp8 %.4f, bf16 %.5f (x%.1f)\n", fp8_err, bf16_err, fp8_err / bf16_err);
    EXPECT_LE(fp8_err, 0.08);
    EXPECT_GT(fp8_err, bf16_err);  // not vacuous: the quantisation does something
  }
}

// ---- errors --------------------------------------------------------------------------------------------------

/// f() throws tilewise::Error for `argument` whose message contains `text`.
void expect_error(const std::function<void()>& f, const std::string& argument, const std::string& text) {
  try {
    f();
    ADD_FAILURE() << "no tilewise::Error for " << argument;
  } catch (const tilewise::Error& e) {
    EXPECT_EQ(e.argument(), argument) << e.what();
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    EXPECT_EQ(std::string(e.what()).rfind("invalid " + argument + " = ", 0), 0u) << e.what();
  }
}

/// A small fp8_scaled problem (latent 2x4x4, tile 2x2x2: 4 tiles; 4 text positions: 1 block) and valid operands.
struct ScaledRun {
  tilewise::Problem p;
  std::vector<uint8_t> q, k, v;
  std::vector<float> qs, ks, vs, o;
  ScaledRun() {
    p.batch = 1;
    p.q_heads = 2;
    p.kv_heads = 1;
    p.head_dim = 8;
    p.dtype = DType::f32;
    p.latent = {2, 4, 4};
    p.tile = {2, 2, 2};
    p.text_capacity = 4;
    p.precision = Precision::fp8_scaled;
    q.assign(36 * 2 * 8, 0x38);  // 1.0
    k.assign(36 * 8, 0x30);      // 0.5
    v.assign(k.size(), 0x40);    // 2.0
    qs.assign(2 * 36, 1.0f);
    ks.assign(5, 1.0f);
    vs.assign(8, 1.0f);
    o.assign(q.size(), static_cast<float>(kSentinel));
  }
  tilewise::Tensors tensors() { return {q.data(), k.data(), v.data(), o.data(), nullptr, nullptr, qs.data(), ks.data(), vs.data()}; }
  bool o_untouched() const {
    return std::all_of(o.begin(), o.end(), [](float x) { return x == static_cast<float>(kSentinel); });
  }
};

TEST(Fp8Errors, PrecisionValue) {
  tilewise::Problem p;
  p.precision = static_cast<Precision>(5);
  expect_error([&] { tilewise::Plan(p, tilewise::Pattern::dense()); }, "precision", "native, fp8 or fp8_scaled");
}

TEST(Fp8Errors, ScalesAreRequiredForFp8ScaledAndRefusedOtherwise) {
  ScaledRun r;
  const tilewise::Plan plan(r.p, tilewise::Pattern::dense());
  EXPECT_EQ(plan.fp8_key_blocks(), 5);
  tilewise::Tensors t = r.tensors();
  t.k_scale = nullptr;
  expect_error([&] { plan.run(t); }, "k_scale", "a float32 tensor [B, Hkv, fp8_key_blocks] = [1, 1, 5] of scales");
  t = r.tensors();
  t.q_scale = nullptr;
  expect_error([&] { plan.run(t); }, "q_scale", "[B, Hq, S] = [1, 2, 36]");
  EXPECT_TRUE(r.o_untouched());
  EXPECT_NO_THROW(plan.run(r.tensors()));
  EXPECT_EQ(r.o[0], 2.0f);  // every value 2 (scales 1): the weights' convex combination

  for (Precision precision : {Precision::native, Precision::fp8}) {
    ScaledRun n;
    n.p.precision = precision;
    std::vector<float> in(36 * 2 * 8, 1.0f);
    tilewise::Tensors u = n.tensors();
    u.q = u.k = u.v = in.data();
    expect_error([&] { tilewise::Plan(n.p, tilewise::Pattern::dense()).run(u); }, "q_scale",
                 "null: scales are read with precision fp8_scaled only, and this plan's is " +
                     std::string(tilewise::to_string(precision)));
    EXPECT_TRUE(n.o_untouched());
  }
}

TEST(Fp8Errors, ScaleValuesAreCheckedBeforeAnyWrite) {
  for (float bad : {0.0f, -1.0f, NAN, INFINITY}) {
    ScaledRun r;
    r.ks[3] = bad;
    const tilewise::Plan plan(r.p, tilewise::Pattern::dense());
    expect_error([&] { plan.run(r.tensors()); }, "k_scale[0, 0, 3]", "a finite number > 0");
    EXPECT_TRUE(r.o_untouched());
  }
  ScaledRun r;
  r.vs[3] = -2.0f;
  expect_error([&] { tilewise::Plan(r.p, tilewise::Pattern::dense()).run(r.tensors()); }, "v_scale[0, 0, 3]", "> 0");
  r = ScaledRun();
  r.qs[37] = 0.0f;
  expect_error([&] { tilewise::Plan(r.p, tilewise::Pattern::dense()).run(r.tensors()); }, "q_scale[0, 1, 1]", "> 0");
  EXPECT_TRUE(r.o_untouched());
}

TEST(Fp8Errors, TextLenIsCheckedBeforeAnyWrite) {
  ScaledRun r;
  r.p.precision = Precision::fp8;
  std::vector<float> in(36 * 2 * 8, 1.0f);
  tilewise::Tensors t = r.tensors();
  t.q = t.k = t.v = in.data();
  t.q_scale = t.k_scale = t.v_scale = nullptr;
  const int32_t text_len = 5;
  t.text_len = &text_len;
  expect_error([&] { tilewise::Plan(r.p, tilewise::Pattern::dense()).run(t); }, "text_len[0]", "[0, text capacity = 4]");
  EXPECT_TRUE(r.o_untouched());
}

TEST(Fp8Errors, BackwardIsRefused) {
  ScaledRun r;
  r.p.precision = Precision::fp8;
  std::vector<float> x(36 * 2 * 8, 1.0f), lse(72, 0.0f);
  tilewise::GradTensors g{x.data(), x.data(), x.data(), x.data(), lse.data(), x.data(), nullptr,
                          x.data(), x.data(), x.data(), nullptr};
  expect_error([&] { tilewise::Plan(r.p, tilewise::Pattern::dense()).run_backward(g); }, "backward",
               "invalid backward = precision fp8: expected a plan with precision native (FP8 attention is forward only)");
}

TEST(Fp8Errors, QuantizeFp8) {
  ScaledRun r;  // precision fp8_scaled: its q, k, v are e4m3 already
  std::vector<float> in(36 * 2 * 8, 1.0f);
  const tilewise::Fp8Tensors out{r.q.data(), r.k.data(), r.v.data(), r.qs.data(), r.ks.data(), r.vs.data()};
  expect_error([&] { tilewise::Plan(r.p, tilewise::Pattern::dense()).quantize_fp8(in.data(), in.data(), in.data(), nullptr, out); },
               "precision", "native or fp8: quantize_fp8 reads q, k, v in dtype");
  r.p.precision = Precision::native;
  const tilewise::Plan plan(r.p, tilewise::Pattern::dense());
  tilewise::Fp8Tensors missing = out;
  missing.v_scale = nullptr;
  expect_error([&] { plan.quantize_fp8(in.data(), in.data(), in.data(), nullptr, missing); }, "out.v_scale", "null");
  expect_error([&] { plan.quantize_fp8(in.data(), nullptr, in.data(), nullptr, out); }, "k", "null");
  const int32_t text_len = -1;
  const std::vector<uint8_t> before = r.q;
  expect_error([&] { plan.quantize_fp8(in.data(), in.data(), in.data(), &text_len, out); }, "text_len[0]", "-1");
  EXPECT_EQ(r.q, before);
}

/// The CUDA backends have no FP8 kernel yet: the plan is refused by name (on a machine with a GPU; elsewhere the
/// device itself is refused first).
TEST(Fp8Errors, CudaReferenceRefusesFp8) {
  tilewise::Problem p;
  p.latent = {1, 8, 8};
  p.tile = {1, 8, 8};
  p.precision = Precision::fp8;
  const tilewise::Device device = tilewise::Device::cuda_reference;
  if (!tilewise::cuda_available()) {
    expect_error([&] { tilewise::Plan(p, tilewise::Pattern::dense(), device); }, "device", "cpu");
    return;
  }
  expect_error([&] { tilewise::Plan(p, tilewise::Pattern::dense(), device); }, "precision",
               "invalid precision = fp8: expected native (precision fp8 is not supported by backend cuda-reference yet)");
}

// ---- C ABI ---------------------------------------------------------------------------------------------------

TEST(Fp8CApi, RunQuantizeKeyBlocksAndSupport) {
  tw_problem p;
  tw_problem_init(&p);
  EXPECT_EQ(p.precision, TW_PRECISION_NATIVE);
  p.batch = 1, p.q_heads = 2, p.kv_heads = 1, p.head_dim = 8, p.dtype = TW_DTYPE_F32;
  const int64_t latent[3] = {2, 4, 4}, tile[3] = {2, 2, 2};
  std::memcpy(p.latent, latent, sizeof latent);
  std::memcpy(p.tile, tile, sizeof tile);
  p.text_capacity = 4;
  p.text_position = TW_TEXT_FIRST;
  p.precision = TW_PRECISION_FP8;
  tw_pattern pat;
  tw_pattern_init(&pat);
  tw_plan* plan = nullptr;
  ASSERT_EQ(tw_plan_create(&p, &pat, TW_DEVICE_CPU, &plan), TW_OK) << tw_last_error();

  int64_t count = 0;
  std::vector<int64_t> blocks(36);
  ASSERT_EQ(tw_plan_fp8_key_blocks(plan, &count, blocks.data()), TW_OK);
  EXPECT_EQ(count, 5);
  EXPECT_EQ(blocks[0], 4);   // text first: one block of 4
  EXPECT_EQ(blocks[4], 0);   // video (0, 0, 0)
  EXPECT_EQ(blocks[35], 3);  // video (1, 3, 3), tile (0, 1, 1)
  EXPECT_EQ(tw_plan_fp8_key_blocks(plan, nullptr, nullptr), TW_ERROR_INVALID_ARGUMENT);
  EXPECT_STREQ(tw_last_error_argument(), "count");

  const uint64_t seed = oracle::fresh_seed();
  SCOPED_TRACE(oracle::seed_note(seed));
  oracle::Rng rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> q(36 * 2 * 8), k(36 * 8), v(k.size()), o_c(q.size()), o_cpp(q.size());
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(rng);
  tw_tensors t;
  tw_tensors_init(&t);
  t.q = q.data(), t.k = k.data(), t.v = v.data(), t.o = o_c.data();
  ASSERT_EQ(tw_plan_run_tensors(plan, &t, nullptr, nullptr), TW_OK) << tw_last_error();
  tilewise::Problem cp;
  cp.batch = 1, cp.q_heads = 2, cp.kv_heads = 1, cp.head_dim = 8, cp.dtype = DType::f32;
  cp.latent = {2, 4, 4}, cp.tile = {2, 2, 2}, cp.text_capacity = 4;
  cp.text_position = tilewise::TextPosition::first;
  cp.precision = Precision::fp8;
  tilewise::Plan(cp, tilewise::Pattern::dense()).run({q.data(), k.data(), v.data(), o_cpp.data()});
  EXPECT_EQ(o_c, o_cpp);

  std::vector<uint8_t> q8(q.size()), k8(k.size()), v8(v.size());
  std::vector<float> qs(72), ks(5), vs(8);
  tw_fp8_tensors out;
  std::memset(&out, 0xff, sizeof out);
  tw_fp8_tensors_init(&out);
  EXPECT_TRUE(out.q == nullptr && out.k == nullptr && out.v == nullptr && out.q_scale == nullptr &&
              out.k_scale == nullptr && out.v_scale == nullptr);
  out.q = q8.data(), out.k = k8.data(), out.v = v8.data();
  out.q_scale = qs.data(), out.k_scale = ks.data(), out.v_scale = vs.data();
  ASSERT_EQ(tw_plan_quantize_fp8(plan, q.data(), k.data(), v.data(), nullptr, &out, nullptr), TW_OK) << tw_last_error();
  EXPECT_EQ(tw_plan_quantize_fp8(plan, q.data(), k.data(), v.data(), nullptr, nullptr, nullptr),
            TW_ERROR_INVALID_ARGUMENT);
  EXPECT_STREQ(tw_last_error_argument(), "out");

  // The quantised operands run on an fp8_scaled plan give the same output.
  tw_plan* scaled = nullptr;
  p.precision = TW_PRECISION_FP8_SCALED;
  ASSERT_EQ(tw_plan_create(&p, &pat, TW_DEVICE_CPU, &scaled), TW_OK) << tw_last_error();
  std::vector<float> o_scaled(q.size());
  t.q = q8.data(), t.k = k8.data(), t.v = v8.data(), t.o = o_scaled.data();
  t.q_scale = nullptr;
  EXPECT_EQ(tw_plan_run_tensors(scaled, &t, nullptr, nullptr), TW_ERROR_INVALID_ARGUMENT);
  EXPECT_STREQ(tw_last_error_argument(), "q_scale");
  t.q_scale = qs.data(), t.k_scale = ks.data(), t.v_scale = vs.data();
  ASSERT_EQ(tw_plan_run_tensors(scaled, &t, nullptr, nullptr), TW_OK) << tw_last_error();
  EXPECT_EQ(o_scaled, o_c);
  EXPECT_EQ(tw_plan_run_tensors(scaled, nullptr, nullptr, nullptr), TW_ERROR_INVALID_ARGUMENT);
  EXPECT_STREQ(tw_last_error_argument(), "tensors");
  tw_plan_destroy(scaled);
  tw_plan_destroy(plan);

  p.precision = 3;
  EXPECT_EQ(tw_plan_create(&p, &pat, TW_DEVICE_CPU, &plan), TW_ERROR_INVALID_ARGUMENT);
  EXPECT_STREQ(tw_last_error_argument(), "precision");
  EXPECT_EQ(tw_device_supports_precision(TW_DEVICE_CPU, TW_DTYPE_BF16, 128, TW_PRECISION_FP8), TW_OK);
  EXPECT_EQ(tw_device_supports_precision(TW_DEVICE_CPU, TW_DTYPE_BF16, 128, 9), TW_ERROR_INVALID_ARGUMENT);
  EXPECT_STREQ(tw_last_error_argument(), "precision");
  // The Hopper backend runs FP8 (hopper/fp8/); without a GPU the answer names the device.
  const tw_status cuda = tw_device_supports_precision(TW_DEVICE_CUDA, TW_DTYPE_BF16, 128, TW_PRECISION_FP8);
  if (tilewise::cuda_available()) {
    EXPECT_EQ(cuda, TW_OK) << tw_last_error();
  } else {
    EXPECT_EQ(cuda, TW_ERROR_INVALID_ARGUMENT);
    EXPECT_STREQ(tw_last_error_argument(), "device");
  }
  EXPECT_EQ(tw_device_supports_precision(TW_DEVICE_CUDA_REFERENCE, TW_DTYPE_BF16, 128, TW_PRECISION_FP8),
            TW_ERROR_INVALID_ARGUMENT);
}

}  // namespace
