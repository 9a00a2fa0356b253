// Inputs, the float64 reference and timing for the CLI commands.
//
// The reference is the CPU backend run at f64 on the same (rounded) inputs with the same pattern, so the
// measured error is the backend's arithmetic alone. When that would take too long (HunyuanVideo-sized
// problems: ~1e13 FLOPs), sampled query rows are recomputed in f64 instead, with the keys taken from the
// plan's own mask queries (key_tiles + video_pair_allowed) and the valid text.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <functional>
#include <random>
#include <vector>

#include "core/numeric.hpp"
#include "core/parallel.hpp"
#include "device.hpp"
#include "tilewise/tilewise.hpp"

namespace tilewise::cli {

inline double load(DType t, const std::byte* base, int64_t i) {
  switch (t) {
    case DType::f32: return reinterpret_cast<const float*>(base)[i];
    case DType::f64: return reinterpret_cast<const double*>(base)[i];
    case DType::bf16: return detail::bf16_to_float(reinterpret_cast<const uint16_t*>(base)[i]);
    case DType::f16: return detail::f16_to_float(reinterpret_cast<const uint16_t*>(base)[i]);
  }
  return 0;
}

inline void store(DType t, std::byte* base, int64_t i, float x) {
  switch (t) {
    case DType::f32: reinterpret_cast<float*>(base)[i] = x; break;
    case DType::f64: reinterpret_cast<double*>(base)[i] = x; break;
    case DType::bf16: reinterpret_cast<uint16_t*>(base)[i] = detail::float_to_bf16(x); break;
    case DType::f16: reinterpret_cast<uint16_t*>(base)[i] = detail::float_to_f16(x); break;
  }
}

using detail::parallel_for;  // all cores (inputs for HunyuanVideo are ~1e9 elements)

/// q, k, v on the host, contiguous in the problem's layout, standard normal values rounded to the dtype.
struct Inputs {
  DType dtype;
  int64_t q_elems, kv_elems;
  std::vector<std::byte> q, k, v;
};

inline Inputs random_inputs(const Problem& p, uint64_t seed) {
  const int64_t S = p.sequence_length();
  Inputs in{p.dtype, p.batch * S * p.q_heads * p.head_dim, p.batch * S * p.kv_heads * p.head_dim, {}, {}, {}};
  const int64_t es = dtype_size(p.dtype);
  int tensor = 0;
  for (auto* buf : {&in.q, &in.k, &in.v}) {
    const int64_t n = buf == &in.q ? in.q_elems : in.kv_elems;
    buf->resize(n * es);
    constexpr int64_t kChunk = 1 << 16;  // each chunk has its own engine: same values for any thread count
    parallel_for((n + kChunk - 1) / kChunk, [&, tensor](int64_t c) {
      std::seed_seq ss{seed, static_cast<uint64_t>(tensor), static_cast<uint64_t>(c)};
      std::mt19937_64 rng(ss);
      std::normal_distribution<float> normal;
      for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) store(p.dtype, buf->data(), i, normal(rng));
    });
    ++tensor;
  }
  return in;
}

/// Error of a run's output against the f64 reference.
struct ErrorStats {
  double rel_l2 = 0, max_abs = 0;
  int64_t nan = 0;          // NaN outputs over the whole tensor (unwritten ones included: o starts as NaN)
  int64_t outputs = 0;      // elements of o
  int64_t rows = 0;         // query rows compared, summed over (batch, head)
  int64_t total_rows = 0;   // all query rows over (batch, head)
  bool sampled = false;
};

/// Accumulates sum of squares of the error and of the reference, and the max abs error.
struct Accumulator {
  double err2 = 0, ref2 = 0, max_abs = 0;
  void add(double out, double ref) {
    const double e = std::abs(out - ref);
    err2 += e * e;
    ref2 += ref * ref;
    if (!(e <= max_abs)) max_abs = e;  // NaN propagates into max_abs
  }
  void merge(const Accumulator& o) {
    err2 += o.err2;
    ref2 += o.ref2;
    if (!(o.max_abs <= max_abs)) max_abs = o.max_abs;
  }
};

inline std::vector<double> to_f64(DType t, const std::vector<std::byte>& src, int64_t n) {
  std::vector<double> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = load(t, src.data(), i);
  return out;
}

/// Runs the CPU backend at f64 on the same inputs and pattern (same strides: they count elements), in exact
/// arithmetic whatever the checked plan's precision (an FP8 plan is held to the unquantised attention).
inline Accumulator compare_full(const Plan& plan, const Inputs& in, const std::vector<std::byte>& o,
                                const std::vector<int32_t>& text_len) {
  Problem p = plan.problem();
  p.dtype = DType::f64;
  p.precision = Precision::native;
  const Plan ref_plan(p, plan.pattern(), Device::cpu);
  const auto q = to_f64(in.dtype, in.q, in.q_elems), k = to_f64(in.dtype, in.k, in.kv_elems),
             v = to_f64(in.dtype, in.v, in.kv_elems);
  std::vector<double> ref(in.q_elems);
  ref_plan.run({q.data(), k.data(), v.data(), ref.data(), nullptr, text_len.data()});
  // o and ref share strides and are both dense, so elements correspond one to one.
  Accumulator acc;
  for (int64_t i = 0; i < in.q_elems; ++i) acc.add(load(in.dtype, o.data(), i), ref[i]);
  return acc;
}

/// The allowed keys of query position s of local head h, as sequence positions (the spec's allowed set).
inline void allowed_keys(const Plan& plan, int64_t h, int64_t s, int64_t text_len, std::vector<int64_t>& keys) {
  const TokenMap& m = plan.token_map();
  const TileGrid& g = m.grid;
  keys.clear();
  if (m.seq.is_text(s)) {
    for (int64_t j = 0; j < m.seq.num_video; ++j) keys.push_back(m.seq.video_offset() + j);
  } else {
    const Dim3 q = m.video_coord(s);
    for (int32_t kt : plan.key_tiles(h, g.tile_index(g.tile_of(q)))) {
      const Dim3 o = g.tile_origin(g.tile_coord(kt)), e = g.tile_extent(g.tile_coord(kt));
      for (int64_t t = o.t; t < o.t + e.t; ++t)
        for (int64_t y = o.h; y < o.h + e.h; ++y)
          for (int64_t x = o.w; x < o.w + e.w; ++x)
            if (plan.video_pair_allowed(h, q, {t, y, x})) keys.push_back(m.video_position({t, y, x}));
    }
  }
  for (int64_t j = 0; j < text_len; ++j) keys.push_back(m.seq.text_offset() + j);
}

inline Accumulator compare_sampled(const Plan& plan, const Inputs& in, const std::vector<std::byte>& o,
                                   const std::vector<int32_t>& text_len, int64_t rows, uint64_t seed) {
  const Problem& p = plan.problem();
  const int64_t S = p.seq_len, D = p.head_dim, group = p.q_heads / p.kv_heads;
  std::vector<Accumulator> per(p.batch * p.q_heads);
  parallel_for(p.batch * p.q_heads, [&](int64_t bh) {
    const int64_t b = bh / p.q_heads, h = bh % p.q_heads, kvh = h / group;
    // First and last positions (partial tiles and text sit at the ends), the rest uniform.
    std::mt19937_64 rng(seed ^ (0x9e3779b97f4a7c15ull * (bh + 1)));
    std::vector<int64_t> picks{0, S - 1};
    while (static_cast<int64_t>(picks.size()) < rows) picks.push_back(static_cast<int64_t>(rng() % S));
    picks.resize(rows);
    const auto at = [&](const std::vector<std::byte>& t, const Strides& st, int64_t pos, int64_t head, int64_t d) {
      return load(in.dtype, t.data(), b * st.batch + pos * st.seq + head * st.head + d);
    };
    std::vector<int64_t> keys;
    std::vector<double> q(D), score, out(D);
    Accumulator& acc = per[bh];
    for (int64_t s : picks) {
      allowed_keys(plan, h, s, text_len[b], keys);
      for (int64_t d = 0; d < D; ++d) q[d] = at(in.q, p.q, s, h, d);
      score.assign(keys.size(), 0);
      double mx = -INFINITY;
      for (size_t j = 0; j < keys.size(); ++j) {
        for (int64_t d = 0; d < D; ++d) score[j] += q[d] * at(in.k, p.k, keys[j], kvh, d);
        score[j] *= p.scale;
        mx = std::max(mx, score[j]);
      }
      std::fill(out.begin(), out.end(), 0.0);
      double sum = 0;
      for (size_t j = 0; j < keys.size(); ++j) {
        const double w = std::exp(score[j] - mx);
        sum += w;
        for (int64_t d = 0; d < D; ++d) out[d] += w * at(in.v, p.v, keys[j], kvh, d);
      }
      for (int64_t d = 0; d < D; ++d) acc.add(at(o, p.o, s, h, d), out[d] / sum);
    }
  });
  Accumulator total;
  for (const auto& a : per) total.merge(a);
  return total;
}

/// FLOPs above which the full f64 reference is replaced by sampled rows (a few seconds on a small CPU).
inline constexpr double kFullReferenceFlops = 5e10;
inline constexpr int64_t kDefaultSampledRows = 64;

/// Compares `o` (host copy of a run of `plan` on `in`) with the f64 reference. ref_rows: 0 = every row,
/// N = N sampled rows per (batch, head), unset = every row when affordable.
inline ErrorStats compare_to_reference(const Plan& plan, const Inputs& in, const std::vector<std::byte>& o,
                                       const std::vector<int32_t>& text_len, std::optional<int64_t> ref_rows,
                                       uint64_t seed) {
  const Problem& p = plan.problem();
  ErrorStats st;
  st.outputs = in.q_elems;
  st.total_rows = p.batch * p.q_heads * p.seq_len;
  for (int64_t i = 0; i < in.q_elems; ++i) st.nan += std::isnan(load(in.dtype, o.data(), i)) ? 1 : 0;
  const int64_t rows = ref_rows.value_or(plan.flops(text_len.data()) <= kFullReferenceFlops ? 0 : kDefaultSampledRows);
  st.sampled = rows > 0 && rows < p.seq_len;
  const Accumulator acc = st.sampled ? compare_sampled(plan, in, o, text_len, rows, seed)
                                     : compare_full(plan, in, o, text_len);
  st.rows = st.sampled ? p.batch * p.q_heads * rows : st.total_rows;
  st.rel_l2 = std::sqrt(acc.err2 / acc.ref2);
  st.max_abs = acc.max_abs;
  return st;
}

/// q, k, v, o and text_len on a plan's device.
struct DeviceTensors {
  DeviceBuffer q, k, v, o, text_len;
  DeviceTensors(Device d, const Inputs& in, const std::vector<int32_t>& lens)
      : q(d, in.q.size()), k(d, in.k.size()), v(d, in.v.size()), o(d, in.q.size()),
        text_len(d, lens.size() * sizeof(int32_t)) {
    q.upload(in.q.data());
    k.upload(in.k.data());
    v.upload(in.v.data());
    text_len.upload(lens.data());
    o.poison();
  }
  Tensors view() {
    return {q.data(), k.data(), v.data(), o.data(), nullptr, static_cast<const int32_t*>(text_len.data())};
  }
};

/// Median wall time in ms of `iters` runs after `warmup` untimed ones, each ended by a device sync.
/// after_run (if any) is called after every run, warm-ups included (progress).
inline double median_ms(const Plan& plan, DeviceTensors& t, int64_t iters, int64_t warmup,
                        const std::function<void()>& after_run = {}) {
  const Tensors view = t.view();
  for (int64_t i = 0; i < warmup; ++i) {
    plan.run(view);
    if (after_run) after_run();
  }
  synchronize(plan.device());
  std::vector<double> ms;
  for (int64_t i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    plan.run(view);
    synchronize(plan.device());
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    if (after_run) after_run();
  }
  std::sort(ms.begin(), ms.end());
  return ms.size() % 2 ? ms[ms.size() / 2] : 0.5 * (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]);
}

}  // namespace tilewise::cli
