// Internal: what the CPU reference's forward (cpu_backend.cpp), FP8 forward (cpu_fp8.cpp) and backward
// (cpu_backward.cpp) share: element types and their conversions, strided row access, the run-time text_len check,
// the key set of a query tile as the Plan answers it (the backends enumerate it here once rather than each deriving
// it), and the query-side work items.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "core/errors.hpp"
#include "core/numeric.hpp"
#include "core/parallel.hpp"
#include "tilewise/tilewise.hpp"

namespace tilewise::cpu {

// ---- elements -------------------------------------------------------------------------------------------

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };
struct e4m3_t { uint8_t bits; };

/// Storage type T: its accumulator (f32, f64 for f64 storage) and the conversions (16-bit: round to nearest even).
template <class T>
struct Element;
template <>
struct Element<float> {
  using Acc = float;
  static float load(const float* p) { return *p; }
  static void store(float* p, float x) { *p = x; }
};
template <>
struct Element<double> {
  using Acc = double;
  static double load(const double* p) { return *p; }
  static void store(double* p, double x) { *p = x; }
};
template <>
struct Element<bf16_t> {
  using Acc = float;
  static float load(const bf16_t* p) { return detail::bf16_to_float(p->bits); }
  static void store(bf16_t* p, float x) { p->bits = detail::float_to_bf16(x); }
};
template <>
struct Element<f16_t> {
  using Acc = float;
  static float load(const f16_t* p) { return detail::f16_to_float(p->bits); }
  static void store(f16_t* p, float x) { p->bits = detail::float_to_f16(x); }
};

/// e4m3 is an input type only (Precision::fp8_scaled, and the quantised operands of fp8), so it has no store (the
/// quantisation writes codes itself, cpu_fp8.cpp); every e4m3 product and sum of D of them is exact in double, so
/// the FP8 reference works in double.
template <>
struct Element<e4m3_t> {
  using Acc = double;
  static double load(const e4m3_t* p) { return detail::e4m3_to_double(p->bits); }
};

/// Calls f(std::type_identity<T>{}) with the storage type T of `dtype`.
template <class F>
void with_storage_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32: f(std::type_identity<float>{}); break;
    case DType::f64: f(std::type_identity<double>{}); break;
    case DType::bf16: f(std::type_identity<bf16_t>{}); break;
    case DType::f16: f(std::type_identity<f16_t>{}); break;
  }
}

/// Row (b, pos, head) of a strided [B, S, H, D] view (the last dimension is contiguous).
template <class T>
const T* row_at(const void* base, const Strides& s, int64_t b, int64_t pos, int64_t head) {
  return static_cast<const T*>(base) + b * s.batch + pos * s.seq + head * s.head;
}
template <class T>
T* row_at(void* base, const Strides& s, int64_t b, int64_t pos, int64_t head) {
  return static_cast<T*>(base) + b * s.batch + pos * s.seq + head * s.head;
}

/// Converts row (b, pos, head) to the accumulator type, into out[0, D).
template <class T, class Acc>
void load_row(const void* base, const Strides& s, int64_t b, int64_t pos, int64_t head, int64_t D, Acc* out) {
  const T* p = row_at<T>(base, s, b, pos, head);
  for (int64_t d = 0; d < D; ++d) out[d] = Element<T>::load(p + d);
}

/// a . b over n elements. Eight partial sums in a fixed order: the compiler can vectorise the reduction (which
/// strict floating point forbids for one running sum) and the result stays the same run to run.
template <class Acc>
Acc dot(const Acc* a, const Acc* b, int64_t n) {
  constexpr int kLanes = 8;
  Acc lane[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += a[d + l] * b[d + l];
  Acc s = 0;
  for (; d < n; ++d) s += a[d] * b[d];
  for (int l = 0; l < kLanes; ++l) s += lane[l];
  return s;
}

// ---- text ---------------------------------------------------------------------------------------------

/// Run-time check of a host text_len ([B], null = full capacity), done before any output is written.
inline void require_text_len(const Problem& p, const int32_t* text_len) {
  if (!text_len) return;
  for (int64_t b = 0; b < p.batch; ++b)
    detail::require(text_len[b] >= 0 && text_len[b] <= p.text_capacity, "text_len[" + detail::str(b) + "]",
                    text_len[b], "a value in [0, text capacity = " + detail::str(p.text_capacity) + "]");
}

/// The kv head that query head h reads (grouped-query attention).
inline int64_t kv_head(const Problem& p, int64_t h) { return h / (p.q_heads / p.kv_heads); }

/// Valid text keys of batch element b.
inline int64_t valid_text(const Problem& p, const int32_t* text_len, int64_t b) {
  return text_len ? text_len[b] : p.text_capacity;
}

// ---- key sets -----------------------------------------------------------------------------------------

/// Calls f(token coordinate) for the tokens of tile c in raster order (partial tiles: only those that exist).
template <class F>
void for_each_token(const TileGrid& g, Dim3 c, F&& f) {
  const Dim3 o = g.tile_origin(c), e = g.tile_extent(c);
  for (int64_t t = 0; t < e.t; ++t)
    for (int64_t y = 0; y < e.h; ++y)
      for (int64_t x = 0; x < e.w; ++x) f(Dim3{o.t + t, o.h + y, o.w + x});
}

/// One key candidate of a query tile: its sequence position and, for keys of masked blocks, its coordinate
/// (the token-level rule is then evaluated per query).
struct KeyRef {
  int64_t pos;
  Dim3 coord;
  bool masked;
};

/// Whether video query token q (of local head h) sees candidate k.
inline bool sees(const Plan& plan, int64_t h, Dim3 q, const KeyRef& k) {
  return !k.masked || plan.video_pair_allowed(h, q, k.coord);
}

/// The video key candidates of query tile qt of local head h: the Plan's key tiles, with its block kinds.
inline void append_pattern_keys(const Plan& plan, int64_t h, int64_t qt, std::vector<KeyRef>& keys) {
  const TokenMap& map = plan.token_map();
  const Dim3 cq = map.grid.tile_coord(qt);
  for (int32_t kt : plan.key_tiles(h, qt)) {
    const Dim3 ck = map.grid.tile_coord(kt);
    const bool masked = plan.block_kind(h, cq, ck) == BlockKind::masked;
    for_each_token(map.grid, ck, [&](Dim3 k) { keys.push_back({map.video_position(k), k, masked}); });
  }
}

/// Every video key (what text queries see).
inline void append_all_video_keys(const TokenMap& map, std::vector<KeyRef>& keys) {
  const int64_t v0 = map.seq.video_offset();
  for (int64_t j = 0; j < map.seq.num_video; ++j) keys.push_back({v0 + j, {}, false});
}

/// The first `valid` text positions (what every query sees of the text).
inline void append_text_keys(const TokenMap& map, int64_t valid, std::vector<KeyRef>& keys) {
  const int64_t t0 = map.seq.text_offset();
  for (int64_t j = 0; j < valid; ++j) keys.push_back({t0 + j, {}, false});
}

/// Rows `keys` of kv head `head` of a [B, S, Hkv, D] view, converted once: out is [keys, D].
template <class T, class Acc>
void gather_rows(const void* base, const Strides& s, int64_t b, int64_t head, int64_t D,
                 const std::vector<KeyRef>& keys, std::vector<Acc>& out) {
  out.resize(keys.size() * D);
  for (size_t j = 0; j < keys.size(); ++j) load_row<T>(base, s, b, keys[j].pos, head, D, &out[j * D]);
}

// ---- work items ----------------------------------------------------------------------------------------

/// Text query rows per work item.
inline constexpr int64_t kTextRows = 64;

/// The query-side work of the forward and of the backward's dq pass, multithreaded: per (batch, query head), each
/// query tile (its pattern's keys and the valid text keys) and each block of kTextRows text query rows (every video
/// key and the valid text keys). Calls item(b, h, keys, rows) once per work item; rows(row) then calls
/// row(pos, allowed) for each query row of the item, allowed(key) being the token-level rule for that row.
template <class Item>
void for_each_query_item(const Plan& plan, const int32_t* text_len, Item&& item) {
  const Problem& p = plan.problem();
  const TokenMap& map = plan.token_map();
  const int64_t tiles = map.grid.num_tiles();
  const int64_t per_head = tiles + ceil_div(p.text_capacity, kTextRows);
  detail::parallel_for(p.batch * p.q_heads * per_head, [&](int64_t work) {
    const int64_t b = work / (p.q_heads * per_head), h = (work / per_head) % p.q_heads, i = work % per_head;
    std::vector<KeyRef> keys;
    if (i < tiles) {
      append_pattern_keys(plan, h, i, keys);
      append_text_keys(map, valid_text(p, text_len, b), keys);
      item(b, h, keys, [&](auto&& row) {
        for_each_token(map.grid, map.grid.tile_coord(i), [&](Dim3 q) {
          row(map.video_position(q), [&](const KeyRef& k) { return sees(plan, h, q, k); });
        });
      });
    } else {
      append_all_video_keys(map, keys);
      append_text_keys(map, valid_text(p, text_len, b), keys);
      const int64_t first = (i - tiles) * kTextRows, last = std::min(first + kTextRows, p.text_capacity);
      item(b, h, keys, [&](auto&& row) {
        for (int64_t r = first; r < last; ++r) row(map.seq.text_offset() + r, [](const KeyRef&) { return true; });
      });
    }
  });
}

/// The backward (cpu_backward.cpp): validates, then writes every element of dq, dk and dv.
void run_backward(const Plan& plan, const GradTensors& tensors);

/// The FP8 forward (cpu_fp8.cpp), precision fp8 or fp8_scaled: validates, then writes o and lse.
void run_fp8(const Plan& plan, const Tensors& tensors);
/// Plan::quantize_fp8 (cpu_fp8.cpp).
void quantize_fp8(const Plan& plan, const Tensors& inputs, const Fp8Tensors& out);

}  // namespace tilewise::cpu
