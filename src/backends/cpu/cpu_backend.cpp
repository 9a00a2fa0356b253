// CPU reference backend: computes the spec for f32/f64/bf16/f16 (accumulating in f32, or f64 for f64 inputs),
// multithreaded over (batch, head, query tile) work items. It visits only the key tiles of each query tile's
// pattern, so its time scales with density. It is the oracle for the GPU tests and the demo's CPU path.
// The FP8 forward lives in cpu_fp8.cpp, the backward in cpu_backward.cpp; what they share, in cpu_common.hpp.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backends/cpu/cpu_common.hpp"
#include "core/backend.hpp"

namespace tilewise {
namespace {

using cpu::KeyRef;
using cpu::for_each_query_item;

template <class T>
class CpuKernel {
  using E = cpu::Element<T>;
  using Acc = typename E::Acc;

 public:
  CpuKernel(const Plan& plan, const Tensors& t) : plan_(plan), p_(plan.problem()), map_(plan.token_map()), t_(t) {}

  void operator()() const {
    for_each_query_item(plan_, t_.text_len, [&](int64_t b, int64_t h, const std::vector<KeyRef>& keys, auto&& rows) {
      const Gathered kv = gather(b, h, keys);
      rows([&](int64_t pos, auto&& allowed) { row(b, h, pos, keys, kv, allowed); });
    });
  }

 private:
  struct Gathered {
    std::vector<Acc> k, v;  // [keys, D], converted once per work item
  };

  Gathered gather(int64_t b, int64_t h, const std::vector<KeyRef>& keys) const {
    const int64_t kvh = cpu::kv_head(p_, h);
    Gathered g;
    cpu::gather_rows<T>(t_.k, p_.k, b, kvh, p_.head_dim, keys, g.k);
    cpu::gather_rows<T>(t_.v, p_.v, b, kvh, p_.head_dim, keys, g.v);
    return g;
  }

  template <class Allowed>
  void row(int64_t b, int64_t h, int64_t pos, const std::vector<KeyRef>& keys, const Gathered& kv,
           Allowed&& allowed) const {
    const int64_t D = p_.head_dim;
    const Acc scale = static_cast<Acc>(p_.scale);
    constexpr Acc kNone = -std::numeric_limits<Acc>::infinity();
    std::vector<Acc> q(D), acc(D, Acc(0)), s(keys.size());
    cpu::load_row<T>(t_.q, p_.q, b, pos, h, D, q.data());
    Acc mx = kNone;
    for (size_t j = 0; j < keys.size(); ++j) {
      s[j] = allowed(keys[j]) ? scale * cpu::dot(q.data(), &kv.k[j * D], D) : kNone;
      mx = std::max(mx, s[j]);
    }
    Acc sum = 0;
    for (size_t j = 0; j < keys.size(); ++j) {
      if (s[j] == kNone) continue;
      const Acc pj = std::exp(s[j] - mx);
      sum += pj;
      const Acc* vj = &kv.v[j * D];
      for (int64_t d = 0; d < D; ++d) acc[d] += pj * vj[d];
    }
    T* op = cpu::row_at<T>(t_.o, p_.o, b, pos, h);
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
    if (plan.problem().precision != Precision::native) return cpu::run_fp8(plan, t);
    // Validate everything before the first write: outputs stay untouched on error.
    cpu::require_text_len(plan.problem(), t.text_len);
    cpu::with_storage_type(plan.problem().dtype, [&](auto type) {
      CpuKernel<typename decltype(type)::type>(plan, t)();
    });
  }
  // Always deterministic (no atomics; each output row has one writer); no workspace.
  void run_backward(const Plan& plan, const GradTensors& t, void*, void*, bool) const override {
    cpu::run_backward(plan, t);
  }
  void quantize_fp8(const Plan& plan, const Tensors& inputs, const Fp8Tensors& out, void*) const override {
    cpu::quantize_fp8(plan, inputs, out);
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const Plan&) { return std::make_unique<CpuBackend>(); }

}  // namespace tilewise
