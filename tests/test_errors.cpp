// Every invalid input gets a tilewise::Error naming the argument, the value and what was expected
// ("invalid <argument> = <value>: expected <expected>"), and nothing is written to the outputs.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "tilewise/tilewise.hpp"

namespace {

using tilewise::Device;
using tilewise::Dim3;
using tilewise::DType;
using tilewise::Pattern;
using tilewise::Plan;
using tilewise::Problem;

/// f() must throw tilewise::Error whose argument() contains `argument`, whose what() reads
/// "invalid <argument()> = <value>: expected ..." and whose expectation mentions `expected`. An empty
/// `value` skips the value check (for errors whose value the spec leaves open).
void expect_error(const std::function<void()>& f, const std::string& argument, const std::string& value,
                  const std::string& expected) {
  SCOPED_TRACE("expected an error for " + argument + " = " + value);
  try {
    f();
    ADD_FAILURE() << "no tilewise::Error thrown";
  } catch (const tilewise::Error& e) {
    const std::string what = e.what();
    EXPECT_NE(e.argument().find(argument), std::string::npos) << "argument() = " << e.argument();
    const std::string prefix = "invalid " + e.argument() + " = " + value;  // value "": not checked
    EXPECT_EQ(what.rfind(value.empty() ? prefix : prefix + ": expected ", 0), 0u) << what;
    EXPECT_NE(what.find(expected), std::string::npos) << what;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw something else than tilewise::Error: " << e.what();
  }
}

/// A small valid problem: 2 batches, 4 q heads over 2 kv heads, latent 4x4x4 in 2x2x2 tiles, 3 text slots.
Problem base() {
  Problem p;
  p.batch = 2;
  p.q_heads = 4;
  p.kv_heads = 2;
  p.head_dim = 8;
  p.dtype = DType::f32;
  p.latent = {4, 4, 4};
  p.tile = {2, 2, 2};
  p.text_capacity = 3;
  return p;
}

void plan_of(const Problem& p, const Pattern& pattern = Pattern::sliding_tile({3, 3, 3})) {
  Plan(p, pattern, Device::cpu);
}

std::function<void()> with(void (*edit)(Problem&), const Pattern& pattern = Pattern::sliding_tile({3, 3, 3})) {
  return [=] {
    Problem p = base();
    edit(p);
    plan_of(p, pattern);
  };
}

TEST(Errors, BaseProblemIsValid) { EXPECT_NO_THROW(plan_of(base())); }

TEST(Errors, Shapes) {
  expect_error(with([](Problem& p) { p.batch = 0; }), "batch", "0", ">= 1");
  expect_error(with([](Problem& p) { p.batch = -2; }), "batch", "-2", ">= 1");
  expect_error(with([](Problem& p) { p.q_heads = 0; }), "q_heads", "0", ">= 1");
  expect_error(with([](Problem& p) { p.q_heads = -4; }), "q_heads", "-4", ">= 1");
  expect_error(with([](Problem& p) { p.kv_heads = 0; }), "kv_heads", "0", ">= 1");
  expect_error(with([](Problem& p) { p.kv_heads = -1; }), "kv_heads", "-1", ">= 1");
  expect_error(with([](Problem& p) { p.kv_heads = 3; }), "kv_heads", "3", "divisor of q_heads = 4");
  expect_error(with([](Problem& p) { p.head_dim = 0; }), "head_dim", "0", ">= 1");
  expect_error(with([](Problem& p) { p.head_dim = -64; }), "head_dim", "-64", ">= 1");
  expect_error(with([](Problem& p) { p.latent = {4, 0, 4}; }), "latent", "4x0x4", ">= 1");
  expect_error(with([](Problem& p) { p.tile = {2, 0, 2}; }), "tile", "2x0x2", ">= 1");
  expect_error(with([](Problem& p) { p.tile = {-1, 2, 2}; }), "tile", "-1x2x2", ">= 1");
  expect_error(with([](Problem& p) { p.tile = {2, 2, 0}; }), "tile", "2x2x0", ">= 1");
  expect_error(with([](Problem& p) { p.text_capacity = -1; }), "text_capacity", "-1", ">= 0");
  expect_error(with([](Problem& p) { p.seq_len = 70; }), "seq_len", "70", "64 + 3 = 67");
  expect_error(with([](Problem& p) { p.seq_len = 64; }), "seq_len", "64", "67");
  expect_error(with([](Problem& p) { p.head_offset = -1; }), "head_offset", "-1", ">= 0");
  expect_error(with([](Problem& p) { p.sm_margin = -1; }), "sm_margin", "-1", ">= 0");
}

TEST(Errors, DtypeScaleAndOrder) {
  expect_error(with([](Problem& p) { p.dtype = static_cast<DType>(9); }), "dtype", "9", "f32");
  expect_error([] { tilewise::dtype_size(static_cast<DType>(-1)); }, "dtype", "-1", "bf16");
  expect_error(with([](Problem& p) { p.scale = NAN; }), "scale", "nan", "finite");
  expect_error(with([](Problem& p) { p.scale = INFINITY; }), "scale", "inf", "finite");
  expect_error(with([](Problem& p) {
                 p.order = tilewise::TokenOrder::tiled;
                 p.latent = {5, 4, 4};
               }),
               "order", "tiled", "multiple of the tile");
  expect_error(with([](Problem& p) { p.order = static_cast<tilewise::TokenOrder>(7); }), "order", "7", "raster");
  expect_error(with([](Problem& p) { p.layout = static_cast<tilewise::Layout>(5); }), "layout", "5", "bshd");
}

TEST(Errors, Strides) {
  expect_error(with([](Problem& p) { p.q.dim = 2; }), "q_strides", "2", "1");
  expect_error(with([](Problem& p) { p.v = {67 * 16, 16, 8, 0}; }), "v_strides", "0", "1");
  expect_error(with([](Problem& p) { p.k = {-100, 16, 8, 1}; }), "k_strides", "-100,16,8", "non-negative");
  expect_error(with([](Problem& p) { p.o = {2144, -32, 8, 1}; }), "o_strides", "2144,-32,8", "non-negative");
  expect_error(with([](Problem& p) { p.q = {2144, 32, -8, 1}; }), "q_strides", "2144,32,-8", "non-negative");
}

TEST(Errors, Windows) {
  for (Dim3 w : {Dim3{0, 3, 3}, Dim3{3, 0, 3}, Dim3{3, 3, 0}, Dim3{3, -1, 3}}) {
    const std::string v = std::to_string(w.t) + "x" + std::to_string(w.h) + "x" + std::to_string(w.w);
    expect_error([&] { plan_of(base(), Pattern::sliding_tile(w)); }, "window", v, ">= 1");
  }
  // Per-head table: the bad head is named.
  expect_error([] { plan_of(base(), Pattern::sliding_tile({{3, 3, 3}, {3, 3, 3}, {1, 0, 1}, {3, 3, 3}})); },
               "window[2]", "1x0x1", ">= 1");
  // Table length neither 1 nor the head count.
  expect_error([] { plan_of(base(), Pattern::sliding_tile({{3, 3, 3}, {3, 3, 3}, {3, 3, 3}})); }, "window", "3",
               "q_heads = 4");
  expect_error([] { plan_of(base(), Pattern::sliding_tile(std::vector<Dim3>{})); }, "window", "0", "q_heads = 4");
  expect_error([] { plan_of(base(), Pattern::attention_tile({{}, {}})); }, "attention_tile", "2", "q_heads = 4");
  {  // Under sequence parallelism the table is global: it must reach head_offset + q_heads.
    Problem p = base();
    p.head_offset = 4;
    EXPECT_NO_THROW(plan_of(p, Pattern::sliding_tile(std::vector<Dim3>(8, Dim3{3, 3, 3}))));
    expect_error([&] { plan_of(p, Pattern::sliding_tile(std::vector<Dim3>(6, Dim3{3, 3, 3}))); }, "window", "6",
                 "head_offset + q_heads = 8");
  }
  expect_error([] { plan_of(base(), Pattern::attention_tile(-1, 0)); }, "global_frames", "-1", ">= 0");
  expect_error([] { plan_of(base(), Pattern::attention_tile(1, -2)); }, "radius", "-2", ">= 0");
}

TEST(Errors, BlockLists) {
  // base(): 2x2x2 = 8 tiles; a shared table has 9 offsets.
  auto diagonal = [] {
    std::vector<int64_t> off;
    std::vector<int32_t> tiles;
    for (int32_t t = 0; t < 8; ++t) off.push_back(t), tiles.push_back(t);
    off.push_back(8);
    return std::make_pair(off, tiles);
  };
  auto [off, tiles] = diagonal();
  EXPECT_NO_THROW(plan_of(base(), Pattern::block_list(off, tiles)));
  {  // offsets length neither 1 + num_tiles nor 1 + heads * num_tiles
    auto o = off;
    o.push_back(8);
    expect_error([&] { plan_of(base(), Pattern::block_list(o, tiles)); }, "block_offsets", "10", "num_tiles = 8");
    expect_error([&] { plan_of(base(), Pattern::block_list({}, {})); }, "block_offsets", "0", "num_tiles = 8");
  }
  {  // 3 heads in the table for 4 heads
    std::vector<int64_t> o{0};
    std::vector<int32_t> t;
    for (int i = 0; i < 24; ++i) t.push_back(i % 8), o.push_back(i + 1);
    expect_error([&] { plan_of(base(), Pattern::block_list(o, t)); }, "block_offsets", "3", "q_heads = 4");
  }
  {  // out-of-range key tiles
    auto t = tiles;
    t[3] = 8;
    expect_error([&] { plan_of(base(), Pattern::block_list(off, t)); }, "query tile 3", "8", "[0, 8)");
    t[3] = -1;
    expect_error([&] { plan_of(base(), Pattern::block_list(off, t)); }, "query tile 3", "-1", "[0, 8)");
  }
  {  // unsorted and duplicate key tiles: query tile 0 gets {5, 2}, query tile 1 gets {2, 2}
    std::vector<int64_t> o{0, 2, 4, 5, 6, 7, 8, 9, 10};
    std::vector<int32_t> t{5, 2, 2, 2, 2, 3, 4, 5, 6, 7};
    expect_error([&] { plan_of(base(), Pattern::block_list(o, t)); }, "query tile 0", "2", "ascending");
    t[0] = 1;
    expect_error([&] { plan_of(base(), Pattern::block_list(o, t)); }, "query tile 1", "2", "ascending");
  }
  {  // an empty list: query tile 5 has no key tile
    std::vector<int64_t> o{0, 1, 2, 3, 4, 5, 5, 6, 7};
    std::vector<int32_t> t{0, 1, 2, 3, 4, 6, 7};
    expect_error([&] { plan_of(base(), Pattern::block_list(o, t)); }, "query tile 5", "empty", "at least one");
  }
  {  // offsets that do not span block_tiles, or decrease
    auto o = off;
    o.back() = 7;
    expect_error([&] { plan_of(base(), Pattern::block_list(o, tiles)); }, "block_offsets", "0..7", "length 8");
    o = off;
    o[0] = 1;
    expect_error([&] { plan_of(base(), Pattern::block_list(o, tiles)); }, "block_offsets", "1..8", "start at 0");
    o = off;
    o[3] = 5;
    o[4] = 3;
    expect_error([&] { plan_of(base(), Pattern::block_list(o, tiles)); }, "block_offsets[3]", "5..3",
                 "non-decreasing");
  }
}

/// Runs a plan on real buffers whose outputs hold a sentinel; after an error they must still hold it.
struct SentinelRun {
  Problem p = base();
  std::vector<float> q, k, v, o, lse;
  SentinelRun() {
    const int64_t S = p.sequence_length();
    q.assign(p.batch * S * p.q_heads * p.head_dim, 0.25f);
    k.assign(p.batch * S * p.kv_heads * p.head_dim, -0.5f);
    v.assign(k.size(), 0.75f);
    o.assign(q.size(), 7.0f);
    lse.assign(p.batch * p.q_heads * S, 7.0f);
  }
  tilewise::Tensors tensors(const int32_t* text_len = nullptr) {
    return {q.data(), k.data(), v.data(), o.data(), lse.data(), text_len};
  }
  bool untouched() const {
    for (float x : o)
      if (x != 7.0f) return false;
    for (float x : lse)
      if (x != 7.0f) return false;
    return true;
  }
};

TEST(Errors, TextLenAtRunTimeIsCheckedBeforeAnyWrite) {
  SentinelRun r;
  const Plan plan(r.p, Pattern::sliding_tile({3, 3, 3}), Device::cpu);
  const int32_t too_long[] = {1, 4}, negative[] = {-1, 3};
  expect_error([&] { plan.run(r.tensors(too_long)); }, "text_len[1]", "4", "text capacity = 3");
  EXPECT_TRUE(r.untouched());
  expect_error([&] { plan.run(r.tensors(negative)); }, "text_len[0]", "-1", "[0, text capacity = 3]");
  EXPECT_TRUE(r.untouched());
  expect_error([&] { (void)plan.allowed_pairs(too_long); }, "text_len[1]", "4", "text capacity = 3");
  expect_error([&] { (void)plan.flops(negative); }, "text_len[0]", "-1", "text capacity = 3");
  // The same buffers with a valid text_len are fine and written.
  const int32_t ok[] = {0, 3};
  plan.run(r.tensors(ok));
  EXPECT_FALSE(r.untouched());
}

TEST(Errors, NullTensorPointers) {
  SentinelRun r;
  const Plan plan(r.p, Pattern::dense(), Device::cpu);
  for (const char* name : {"q", "k", "v", "o"}) {
    tilewise::Tensors t = r.tensors();
    const std::string n = name;
    if (n == "q") t.q = nullptr;
    if (n == "k") t.k = nullptr;
    if (n == "v") t.v = nullptr;
    if (n == "o") t.o = nullptr;
    expect_error([&] { plan.run(t); }, name, "null", "tensor pointer");
    EXPECT_TRUE(r.untouched()) << name;
  }
  std::vector<float> out(r.q.size());
  expect_error([&] { tilewise::tile(r.p, nullptr, out.data()); }, "raster_in", "null", "tensor pointer");
  expect_error([&] { tilewise::tile(r.p, r.q.data(), nullptr); }, "tiled_out", "null", "tensor pointer");
  expect_error([&] { tilewise::untile(r.p, nullptr, out.data()); }, "tiled_in", "null", "tensor pointer");
  expect_error([&] { tilewise::untile(r.p, r.q.data(), nullptr); }, "raster_out", "null", "tensor pointer");
  Problem uneven = r.p;
  uneven.latent = {4, 3, 4};
  expect_error([&] { tilewise::tile(uneven, r.q.data(), out.data()); }, "order", "tiled", "multiple of the tile");
}

/// A backward on real buffers: the forward's o and lse from a valid run, gradients holding a sentinel that must
/// survive any error.
struct BackwardSentinelRun {
  SentinelRun fwd;
  std::vector<float> dout, dlse, dq, dk, dv;
  explicit BackwardSentinelRun(const Plan& plan) {
    plan.run(fwd.tensors());
    dout.assign(fwd.o.size(), 0.5f);
    dlse.assign(fwd.lse.size(), -0.25f);
    dq.assign(fwd.q.size(), 7.0f);
    dk.assign(fwd.k.size(), 7.0f);
    dv.assign(fwd.v.size(), 7.0f);
  }
  tilewise::GradTensors tensors(const int32_t* text_len = nullptr) {
    return {fwd.q.data(), fwd.k.data(), fwd.v.data(), fwd.o.data(), fwd.lse.data(), dout.data(), dlse.data(),
            dq.data(),    dk.data(),    dv.data(),    text_len};
  }
  bool untouched() const {
    for (const std::vector<float>* g : {&dq, &dk, &dv})
      for (float x : *g)
        if (x != 7.0f) return false;
    return true;
  }
};

TEST(Errors, BackwardNullTensorPointersAreNamed) {
  const Plan plan(base(), Pattern::sliding_tile({3, 3, 3}), Device::cpu);
  BackwardSentinelRun r(plan);
  const std::pair<const char*, void (*)(tilewise::GradTensors&)> cases[] = {
      {"q", [](tilewise::GradTensors& t) { t.q = nullptr; }},
      {"k", [](tilewise::GradTensors& t) { t.k = nullptr; }},
      {"v", [](tilewise::GradTensors& t) { t.v = nullptr; }},
      {"o", [](tilewise::GradTensors& t) { t.o = nullptr; }},
      {"lse", [](tilewise::GradTensors& t) { t.lse = nullptr; }},
      {"dout", [](tilewise::GradTensors& t) { t.dout = nullptr; }},
      {"dq", [](tilewise::GradTensors& t) { t.dq = nullptr; }},
      {"dk", [](tilewise::GradTensors& t) { t.dk = nullptr; }},
      {"dv", [](tilewise::GradTensors& t) { t.dv = nullptr; }},
  };
  for (const auto& [name, clear] : cases) {
    tilewise::GradTensors t = r.tensors();
    clear(t);
    try {
      plan.run_backward(t);
      ADD_FAILURE() << "no error for null " << name;
    } catch (const tilewise::Error& e) {
      EXPECT_EQ(e.argument(), name);  // exactly: "q" must not be reported for "dq"
      EXPECT_EQ(std::string(e.what()).rfind(std::string("invalid ") + name + " = null: expected a tensor pointer", 0),
                0u)
          << e.what();
    }
    EXPECT_TRUE(r.untouched()) << name;
  }
  expect_error([&] { plan.run_backward(r.tensors(), nullptr, reinterpret_cast<void*>(0x10)); }, "workspace", "",
               "256-byte aligned");
  EXPECT_TRUE(r.untouched());
  // dlse and text_len are optional; the CPU needs no workspace.
  EXPECT_EQ(plan.backward_workspace_bytes(), 0u);
  tilewise::GradTensors t = r.tensors();
  t.dlse = nullptr;
  EXPECT_NO_THROW(plan.run_backward(t, nullptr, nullptr, true));
  EXPECT_FALSE(r.untouched());
}

TEST(Errors, BackwardTextLenIsCheckedBeforeAnyWrite) {
  const Plan plan(base(), Pattern::attention_tile(1, 0), Device::cpu);
  BackwardSentinelRun r(plan);
  const int32_t too_long[] = {1, 4}, negative[] = {-1, 3};
  expect_error([&] { plan.run_backward(r.tensors(too_long)); }, "text_len[1]", "4", "text capacity = 3");
  EXPECT_TRUE(r.untouched());
  expect_error([&] { plan.run_backward(r.tensors(negative)); }, "text_len[0]", "-1", "[0, text capacity = 3]");
  EXPECT_TRUE(r.untouched());
  const int32_t ok[] = {0, 3};
  plan.run_backward(r.tensors(ok));
  EXPECT_FALSE(r.untouched());
}

TEST(Errors, DeviceWithoutCuda) {
  if (tilewise::cuda_available()) GTEST_SKIP() << "a CUDA device is present";
  // Without CUDA support or without a GPU the argument is "device"; the value is not specified.
  expect_error([] { Plan(base(), Pattern::dense(), Device::cuda); }, "device", "", "");
  expect_error([] { Plan(base(), Pattern::dense(), Device::cuda_reference); }, "device", "", "");
}

TEST(Errors, UnknownDevice) {
  expect_error([] { Plan(base(), Pattern::dense(), static_cast<Device>(7)); }, "device", "7", "cpu");
}

}  // namespace
