// The C ABI (include/tilewise/tilewise.h) over the C++ plan/run API.
//
// Every entry point runs its body inside guarded(): exceptions never cross the C boundary. tilewise::Error
// becomes TW_ERROR_INVALID_ARGUMENT, other std::exceptions TW_ERROR_RUNTIME (allocation failures, CUDA
// errors), anything else TW_ERROR_INTERNAL. The message and argument of the last failure are thread local,
// so concurrent callers never read each other's errors; a successful call clears them.
#include "tilewise/tilewise.h"

#include <exception>
#include <string>
#include <vector>

#include "core/errors.hpp"
#include "tilewise/fp8.hpp"
#include "tilewise/tilewise.hpp"

struct tw_plan {
  tilewise::Plan plan;
};

namespace {

using tilewise::detail::fail;
using tilewise::detail::require;
using tilewise::detail::str;

thread_local std::string last_error;
thread_local std::string last_argument;

template <class F>
tw_status guarded(F&& body) noexcept {
  try {
    body();
    last_error.clear();
    last_argument.clear();
    return TW_OK;
  } catch (const tilewise::Error& e) {
    last_error = e.what();
    last_argument = e.argument();
    return TW_ERROR_INVALID_ARGUMENT;
  } catch (const std::exception& e) {
    last_error = e.what();
    last_argument.clear();
    return TW_ERROR_RUNTIME;
  } catch (...) {
    last_error = "unknown internal error";
    last_argument.clear();
    return TW_ERROR_INTERNAL;
  }
}

/// Null checks for the pointers the C API itself dereferences; tensor pointers are checked by Plan::run.
template <class T>
const T& deref(const T* p, const char* argument, const char* expected) {
  if (p == nullptr) fail(argument, "null", expected);
  return *p;
}

tilewise::Strides to_strides(const int64_t s[4]) { return {s[0], s[1], s[2], s[3]}; }

tilewise::Problem to_problem(const tw_problem& c) {
  tilewise::Problem p;
  p.batch = c.batch;
  p.q_heads = c.q_heads;
  p.kv_heads = c.kv_heads;
  p.head_dim = c.head_dim;
  // Enum values are passed through unchecked: Plan validates them (dtype = 7 names "dtype" in the error).
  p.dtype = static_cast<tilewise::DType>(c.dtype);
  p.text_position = static_cast<tilewise::TextPosition>(c.text_position);
  p.order = static_cast<tilewise::TokenOrder>(c.order);
  p.layout = static_cast<tilewise::Layout>(c.layout);
  p.latent = {c.latent[0], c.latent[1], c.latent[2]};
  p.tile = {c.tile[0], c.tile[1], c.tile[2]};
  p.text_capacity = c.text_capacity;
  p.seq_len = c.seq_len;
  p.head_offset = c.head_offset;
  p.q = to_strides(c.q_strides);
  p.k = to_strides(c.k_strides);
  p.v = to_strides(c.v_strides);
  p.o = to_strides(c.o_strides);
  p.scale = c.scale;
  p.precision = static_cast<tilewise::Precision>(c.precision);
  p.sm_margin = c.sm_margin;
  return p;
}

/// A per-head or CSR table that the pattern kind reads must be present when its count says it has entries.
void require_table(const void* table, int64_t count, const char* argument, const std::string& expected) {
  if (count > 0 && table == nullptr) fail(argument, "null", expected);
}

tilewise::Pattern to_pattern(const tw_pattern& c) {
  const int64_t n = c.num_heads;
  switch (c.kind) {
    case TW_PATTERN_DENSE:
      return tilewise::Pattern::dense();
    case TW_PATTERN_SLIDING_TILE: {
      require(n >= 1, "num_heads", n, ">= 1 (1 = one window for every head)");
      require_table(c.windows, n, "windows", "num_heads x 3 window sizes (num_heads = " + str(n) + ")");
      std::vector<tilewise::Dim3> windows;
      for (int64_t h = 0; h < n; ++h) windows.push_back({c.windows[3 * h], c.windows[3 * h + 1], c.windows[3 * h + 2]});
      return tilewise::Pattern::sliding_tile(windows);  // Plan checks the table length and window sizes
    }
    case TW_PATTERN_ATTENTION_TILE: {
      require(n >= 1, "num_heads", n, ">= 1 (1 = the same parameters for every head)");
      require_table(c.global_frames, n, "global_frames", "num_heads = " + str(n) + " values");
      std::vector<tilewise::HeadParams> heads(n);
      for (int64_t h = 0; h < n; ++h) {
        heads[h].global_frames = c.global_frames[h];
        heads[h].radius = c.radius ? c.radius[h] : 0;  // documented: NULL radius = 0 for every head
      }
      return tilewise::Pattern::attention_tile(heads);
    }
    case TW_PATTERN_BLOCK_LIST:
      require(c.num_block_offsets >= 0, "num_block_offsets", c.num_block_offsets, ">= 0");
      require(c.num_block_tiles >= 0, "num_block_tiles", c.num_block_tiles, ">= 0");
      require_table(c.block_offsets, c.num_block_offsets, "block_offsets",
                    "num_block_offsets = " + str(c.num_block_offsets) + " offsets");
      require_table(c.block_tiles, c.num_block_tiles, "block_tiles",
                    "num_block_tiles = " + str(c.num_block_tiles) + " tile indices");
      // Plan checks the CSR structure (lengths, bounds, ordering) against the tile grid.
      return tilewise::Pattern::block_list({c.block_offsets, c.block_offsets + c.num_block_offsets},
                                           {c.block_tiles, c.block_tiles + c.num_block_tiles});
    default:
      fail("pattern.kind", str(c.kind), "TW_PATTERN_DENSE, _SLIDING_TILE, _ATTENTION_TILE or _BLOCK_LIST (0..3)");
  }
}

const tilewise::Plan& plan_of(const tw_plan* plan) {
  return deref(plan, "plan", "a plan from tw_plan_create").plan;
}

const tw_problem& problem_of(const tw_problem* problem) {
  return deref(problem, "problem", "a tw_problem filled by tw_problem_init and then set");
}

}  // namespace

extern "C" {

void tw_problem_init(tw_problem* problem) {
  if (problem == nullptr) return;
  const tilewise::Problem d;  // the C defaults are the C++ defaults
  *problem = tw_problem{};
  problem->batch = d.batch;
  problem->q_heads = d.q_heads;
  problem->kv_heads = d.kv_heads;
  problem->head_dim = d.head_dim;
  problem->dtype = static_cast<int32_t>(d.dtype);
  problem->text_position = static_cast<int32_t>(d.text_position);
  problem->order = static_cast<int32_t>(d.order);
  problem->layout = static_cast<int32_t>(d.layout);
  for (int a = 0; a < 3; ++a) {
    problem->latent[a] = d.latent[a];
    problem->tile[a] = d.tile[a];
  }
  problem->text_capacity = d.text_capacity;
  problem->seq_len = d.seq_len;
  problem->head_offset = d.head_offset;
  for (int64_t* s : {problem->q_strides, problem->k_strides, problem->v_strides, problem->o_strides}) {
    s[0] = s[1] = s[2] = 0;
    s[3] = 1;
  }
  problem->scale = d.scale;
  problem->precision = static_cast<int32_t>(d.precision);
  problem->sm_margin = d.sm_margin;
}

void tw_pattern_init(tw_pattern* pattern) {
  if (pattern == nullptr) return;
  *pattern = tw_pattern{};
  pattern->kind = TW_PATTERN_DENSE;
  pattern->num_heads = 1;
}

tw_status tw_plan_create(const tw_problem* problem, const tw_pattern* pattern, int32_t device, tw_plan** out) {
  return guarded([&] {
    if (out == nullptr) fail("out", "null", "a tw_plan* to receive the plan");
    *out = nullptr;
    const tilewise::Problem p = to_problem(problem_of(problem));
    const tilewise::Pattern pat = to_pattern(deref(pattern, "pattern", "a tw_pattern filled by tw_pattern_init"));
    *out = new tw_plan{tilewise::Plan(p, pat, static_cast<tilewise::Device>(device))};
  });
}

tw_status tw_plan_run(const tw_plan* plan, const void* q, const void* k, const void* v, void* o, float* lse,
                      const int32_t* text_len, void* stream) {
  return guarded([&] { plan_of(plan).run({q, k, v, o, lse, text_len}, stream); });
}

void tw_tensors_init(tw_tensors* tensors) {
  if (tensors != nullptr) *tensors = tw_tensors{};
}

tw_status tw_plan_run_tensors(const tw_plan* plan, const tw_tensors* tensors, void* workspace, void* stream) {
  return guarded([&] {
    const tilewise::Plan& p = plan_of(plan);
    const tw_tensors& t = deref(tensors, "tensors", "a tw_tensors filled by tw_tensors_init");
    p.run({t.q, t.k, t.v, t.o, t.lse, t.text_len, t.q_scale, t.k_scale, t.v_scale}, stream, workspace);
  });
}

void tw_fp8_tensors_init(tw_fp8_tensors* tensors) {
  if (tensors != nullptr) *tensors = tw_fp8_tensors{};
}

tw_status tw_plan_quantize_fp8(const tw_plan* plan, const void* q, const void* k, const void* v,
                               const int32_t* text_len, const tw_fp8_tensors* out, void* stream) {
  return guarded([&] {
    const tilewise::Plan& p = plan_of(plan);
    const tw_fp8_tensors& o = deref(out, "out", "a tw_fp8_tensors with the output pointers");
    p.quantize_fp8(q, k, v, text_len, {o.q, o.k, o.v, o.q_scale, o.k_scale, o.v_scale}, stream);
  });
}

tw_status tw_plan_fp8_key_blocks(const tw_plan* plan, int64_t* count, int64_t* block_of_position) {
  return guarded([&] {
    const tilewise::Plan& p = plan_of(plan);
    if (count == nullptr) fail("count", "null", "an int64_t* to receive the number of key blocks");
    *count = p.fp8_key_blocks();
    if (block_of_position)
      for (int64_t s = 0; s < p.problem().seq_len; ++s)
        block_of_position[s] = tilewise::fp8::key_block(p.token_map(), s);
  });
}

tw_status tw_plan_workspace_size(const tw_plan* plan, uint64_t* bytes) {
  return guarded([&] {
    const tilewise::Plan& p = plan_of(plan);
    if (bytes == nullptr) fail("bytes", "null", "a uint64_t* to receive the workspace size");
    *bytes = p.workspace_bytes();
  });
}

tw_status tw_plan_run_with_workspace(const tw_plan* plan, const void* q, const void* k, const void* v, void* o,
                                     float* lse, const int32_t* text_len, void* workspace, void* stream) {
  return guarded([&] { plan_of(plan).run({q, k, v, o, lse, text_len}, stream, workspace); });
}

void tw_grad_tensors_init(tw_grad_tensors* tensors) {
  if (tensors != nullptr) *tensors = tw_grad_tensors{};
}

tw_status tw_plan_backward_workspace_size(const tw_plan* plan, uint64_t* bytes) {
  return guarded([&] {
    const tilewise::Plan& p = plan_of(plan);
    if (bytes == nullptr) fail("bytes", "null", "a uint64_t* to receive the workspace size");
    *bytes = p.backward_workspace_bytes();
  });
}

tw_status tw_plan_run_backward(const tw_plan* plan, const tw_grad_tensors* tensors, void* workspace,
                               int32_t deterministic, void* stream) {
  return guarded([&] {
    const tilewise::Plan& p = plan_of(plan);
    const tw_grad_tensors& t = deref(tensors, "tensors", "a tw_grad_tensors filled by tw_grad_tensors_init");
    p.run_backward({t.q, t.k, t.v, t.o, t.lse, t.dout, t.dlse, t.dq, t.dk, t.dv, t.text_len}, stream, workspace,
                   deterministic != 0);
  });
}

tw_status tw_plan_flops(const tw_plan* plan, const int32_t* text_len_host, double* flops) {
  return guarded([&] {
    const tilewise::Plan& p = plan_of(plan);
    if (flops == nullptr) fail("flops", "null", "a double* to receive the FLOP count");
    *flops = p.flops(text_len_host);
  });
}

tw_status tw_plan_density(const tw_plan* plan, double* density) {
  return guarded([&] {
    const tilewise::Plan& p = plan_of(plan);
    if (density == nullptr) fail("density", "null", "a double* to receive the density");
    *density = p.video_density();
  });
}

void tw_plan_destroy(tw_plan* plan) { delete plan; }

tw_status tw_tile(const tw_problem* problem, const void* raster_in, void* tiled_out) {
  return guarded([&] { tilewise::tile(to_problem(problem_of(problem)), raster_in, tiled_out); });
}

tw_status tw_untile(const tw_problem* problem, const void* tiled_in, void* raster_out) {
  return guarded([&] { tilewise::untile(to_problem(problem_of(problem)), tiled_in, raster_out); });
}

namespace {

tilewise::Dim3 to_dim3(const int64_t* d, const char* argument) {
  if (d == nullptr) fail(argument, "null", "three sizes (t, h, w)");
  const tilewise::Dim3 v{d[0], d[1], d[2]};
  require(v.t >= 1 && v.h >= 1 && v.w >= 1, argument, str(v), "three sizes >= 1 (TxHxW)");
  return v;
}

void write_dim3(const tilewise::Dim3& d, int64_t* out, const char* argument) {
  if (out == nullptr) fail(argument, "null", "an int64_t[3] to receive the result");
  out[0] = d.t;
  out[1] = d.h;
  out[2] = d.w;
}

/// The window formula of the spec (window_range) gives the extent: min(k, n) key tiles along each axis.
tilewise::Dim3 effective_window(const tilewise::Dim3& window, const tilewise::Dim3& tiles) {
  return {tilewise::window_range<int64_t>(0, window.t, tiles.t).size(),
          tilewise::window_range<int64_t>(0, window.h, tiles.h).size(),
          tilewise::window_range<int64_t>(0, window.w, tiles.w).size()};
}

}  // namespace

tw_status tw_tile_grid(const int64_t latent[3], const int64_t tile[3], int64_t tiles[3]) {
  return guarded([&] {
    const tilewise::TileGrid grid(to_dim3(latent, "latent"), to_dim3(tile, "tile"));
    write_dim3(grid.tiles, tiles, "tiles");
  });
}

tw_status tw_effective_window(const int64_t latent[3], const int64_t tile[3], const int64_t window[3],
                              int64_t effective[3]) {
  return guarded([&] {
    const tilewise::TileGrid grid(to_dim3(latent, "latent"), to_dim3(tile, "tile"));
    write_dim3(effective_window(to_dim3(window, "window"), grid.tiles), effective, "effective");
  });
}

tw_status tw_plan_grid(const tw_plan* plan, int64_t tiles[3]) {
  return guarded([&] { write_dim3(plan_of(plan).grid().tiles, tiles, "tiles"); });
}

tw_status tw_plan_window(const tw_plan* plan, int64_t head, int64_t window[3]) {
  return guarded([&] {
    const tilewise::Plan& p = plan_of(plan);
    require(p.pattern().kind == tilewise::PatternKind::sliding_tile, "plan", tilewise::to_string(p.pattern().kind),
            "a sliding tile plan (only those have windows)");
    require(head >= 0 && head < p.problem().q_heads, "head", head,
            "a local head in [0, " + str(p.problem().q_heads) + ")");
    write_dim3(effective_window(p.head(head).window, p.grid().tiles), window, "window");
  });
}

tw_status tw_device_supports(int32_t device, int32_t dtype, int64_t head_dim) {
  return tw_device_supports_precision(device, dtype, head_dim, TW_PRECISION_NATIVE);
}

tw_status tw_device_supports_precision(int32_t device, int32_t dtype, int64_t head_dim, int32_t precision) {
  return guarded([&] {
    // A one-tile problem: whatever it is refused for is about the device, the dtype, the head dim or the precision.
    tilewise::Problem p;
    p.dtype = static_cast<tilewise::DType>(dtype);
    p.head_dim = head_dim;
    p.precision = static_cast<tilewise::Precision>(precision);
    p.latent = {1, 8, 8};
    p.tile = {1, 8, 8};
    const tilewise::Plan plan(p, tilewise::Pattern::dense(), static_cast<tilewise::Device>(device));
  });
}

const char* tw_last_error(void) { return last_error.c_str(); }
const char* tw_last_error_argument(void) { return last_argument.c_str(); }

int32_t tw_cuda_available(void) {
  try {
    return tilewise::cuda_available() ? 1 : 0;
  } catch (...) {
    return 0;  // a broken driver counts as "no usable device"
  }
}

const char* tw_version(void) { return TILEWISE_VERSION; }  // from the VERSION file (CMakeLists.txt)

}  // extern "C"
