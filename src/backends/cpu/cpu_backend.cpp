// CPU reference backend: computes the spec for f32/f64/bf16/f16 (accumulating in f32, or f64 for f64 inputs),
// multithreaded over (batch, head, query tile) work items. It visits only the key tiles of each query tile's
// pattern, so its time scales with density. It is the oracle for the GPU tests and the demo's CPU path.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/backend.hpp"
#include "core/errors.hpp"
#include "core/numeric.hpp"
#include "core/parallel.hpp"

namespace tilewise {
namespace {

using detail::parallel_for;
using detail::require;
using detail::str;

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
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };
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

/// One allowed key candidate of a work item: its sequence position, and for keys of masked blocks its
/// coordinate (so the token-level pattern is evaluated per query).
struct KeyRef {
  int64_t pos;
  Dim3 coord;
  bool masked;
};

template <class T>
class CpuKernel {
  using E = Element<T>;
  using Acc = typename E::Acc;

 public:
  CpuKernel(const Plan& plan, const Tensors& t) : plan_(plan), p_(plan.problem()), map_(plan.token_map()), t_(t) {}

  void operator()() const {
    const TileGrid& g = map_.grid;
    const int64_t video_items = g.num_tiles();
    const int64_t text_items = ceil_div(p_.text_capacity, kTextRows);
    const int64_t per_bh = video_items + text_items;
    parallel_for(p_.batch * p_.q_heads * per_bh, [&](int64_t item) {
      const int64_t b = item / (p_.q_heads * per_bh);
      const int64_t h = (item / per_bh) % p_.q_heads;
      const int64_t i = item % per_bh;
      if (i < video_items)
        video_tile(b, h, i);
      else
        text_rows(b, h, (i - video_items) * kTextRows);
    });
  }

 private:
  static constexpr int64_t kTextRows = 64;

  int64_t text_len(int64_t b) const { return t_.text_len ? t_.text_len[b] : p_.text_capacity; }

  void add_text_keys(int64_t b, std::vector<KeyRef>& keys) const {
    const int64_t t0 = map_.seq.text_offset();
    for (int64_t j = 0; j < text_len(b); ++j) keys.push_back({t0 + j, {}, false});
  }

  void video_tile(int64_t b, int64_t h, int64_t qt) const {
    const TileGrid& g = map_.grid;
    const Dim3 cq = g.tile_coord(qt);
    std::vector<KeyRef> keys;
    for (int32_t kt : plan_.key_tiles(h, qt)) {
      const Dim3 ck = g.tile_coord(kt);
      const bool masked = plan_.block_kind(h, cq, ck) == BlockKind::masked;
      for_each_token(ck, [&](Dim3 k) { keys.push_back({map_.video_position(k), k, masked}); });
    }
    add_text_keys(b, keys);
    Gathered kv = gather(b, h, keys);
    for_each_token(cq, [&](Dim3 q) {
      row(b, h, map_.video_position(q), keys, kv, [&](const KeyRef& k) {
        return !k.masked || plan_.video_pair_allowed(h, q, k.coord);
      });
    });
  }

  void text_rows(int64_t b, int64_t h, int64_t first) const {
    std::vector<KeyRef> keys;
    const int64_t v0 = map_.seq.video_offset();
    for (int64_t j = 0; j < map_.seq.num_video; ++j) keys.push_back({v0 + j, {}, false});
    add_text_keys(b, keys);
    Gathered kv = gather(b, h, keys);
    const int64_t last = std::min(first + kTextRows, p_.text_capacity);
    for (int64_t r = first; r < last; ++r)
      row(b, h, map_.seq.text_offset() + r, keys, kv, [](const KeyRef&) { return true; });
  }

  template <class F>
  void for_each_token(Dim3 c, F&& f) const {
    const Dim3 o = map_.grid.tile_origin(c), e = map_.grid.tile_extent(c);
    for (int64_t t = 0; t < e.t; ++t)
      for (int64_t y = 0; y < e.h; ++y)
        for (int64_t x = 0; x < e.w; ++x) f(Dim3{o.t + t, o.h + y, o.w + x});
  }

  struct Gathered {
    std::vector<Acc> k, v;  // [keys, D], converted once per work item
  };

  const T* at(const void* base, const Strides& s, int64_t b, int64_t pos, int64_t head) const {
    return static_cast<const T*>(base) + b * s.batch + pos * s.seq + head * s.head;
  }

  Gathered gather(int64_t b, int64_t h, const std::vector<KeyRef>& keys) const {
    const int64_t D = p_.head_dim, kvh = h / (p_.q_heads / p_.kv_heads);
    Gathered g;
    g.k.resize(keys.size() * D);
    g.v.resize(keys.size() * D);
    for (size_t j = 0; j < keys.size(); ++j) {
      const T* kp = at(t_.k, p_.k, b, keys[j].pos, kvh);
      const T* vp = at(t_.v, p_.v, b, keys[j].pos, kvh);
      for (int64_t d = 0; d < D; ++d) {
        g.k[j * D + d] = E::load(kp + d);
        g.v[j * D + d] = E::load(vp + d);
      }
    }
    return g;
  }

  template <class Allowed>
  void row(int64_t b, int64_t h, int64_t pos, const std::vector<KeyRef>& keys, const Gathered& kv,
           Allowed&& allowed) const {
    const int64_t D = p_.head_dim;
    const Acc scale = static_cast<Acc>(p_.scale);
    std::vector<Acc> q(D), acc(D, Acc(0)), s(keys.size());
    const T* qp = at(t_.q, p_.q, b, pos, h);
    for (int64_t d = 0; d < D; ++d) q[d] = E::load(qp + d);
    Acc mx = -std::numeric_limits<Acc>::infinity();
    for (size_t j = 0; j < keys.size(); ++j) {
      if (!allowed(keys[j])) {
        s[j] = -std::numeric_limits<Acc>::infinity();
        continue;
      }
      const Acc* kj = &kv.k[j * D];
      Acc dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += q[d] * kj[d];
      s[j] = dot * scale;
      mx = std::max(mx, s[j]);
    }
    Acc sum = 0;
    for (size_t j = 0; j < keys.size(); ++j) {
      if (s[j] == -std::numeric_limits<Acc>::infinity()) continue;
      const Acc pj = std::exp(s[j] - mx);
      sum += pj;
      const Acc* vj = &kv.v[j * D];
      for (int64_t d = 0; d < D; ++d) acc[d] += pj * vj[d];
    }
    T* op = const_cast<T*>(at(t_.o, p_.o, b, pos, h));
    for (int64_t d = 0; d < D; ++d) E::store(op + d, acc[d] / sum);
    if (t_.lse) t_.lse[(b * p_.q_heads + h) * p_.seq_len + pos] = static_cast<float>(mx + std::log(sum));
  }

  const Plan& plan_;
  const Problem& p_;
  const TokenMap& map_;
  const Tensors& t_;
};

class CpuBackend final : public Backend {
 public:
  void run(const Plan& plan, const Tensors& t, void*, void*) const override {
    const Problem& p = plan.problem();
    // Validate everything before the first write: outputs stay untouched on error.
    if (t.text_len)
      for (int64_t b = 0; b < p.batch; ++b)
        require(t.text_len[b] >= 0 && t.text_len[b] <= p.text_capacity, "text_len[" + str(b) + "]", t.text_len[b],
                "a value in [0, text capacity = " + str(p.text_capacity) + "]");
    switch (p.dtype) {
      case DType::f32: CpuKernel<float>(plan, t)(); break;
      case DType::f64: CpuKernel<double>(plan, t)(); break;
      case DType::bf16: CpuKernel<bf16_t>(plan, t)(); break;
      case DType::f16: CpuKernel<f16_t>(plan, t)(); break;
    }
  }
  void run_backward(const Plan&, const GradTensors&, void*, void*, bool) const override {
    detail::fail("backward", "cpu", "a backend with a backward pass (not implemented yet)");
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const Plan&) { return std::make_unique<CpuBackend>(); }

}  // namespace tilewise
