// CPU reference of the FP8 forward (docs/semantics.md §11): the quantisation of precision fp8 (Q per row, K
// smoothed per key block, V per channel; quantize_fp8) and the e4m3 arithmetic of §11.4 shared by fp8 and
// fp8_scaled. Every rounding the spec names is done here exactly as it says (fp32 where it says fp32, e4m3 where
// it says e4m3); everything else is float64, in which the e4m3 dot products are exact. So a GPU kernel's result
// differs from this one only by its fp32 accumulation, not by a different quantisation.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>
#include <vector>

#include "backends/cpu/cpu_common.hpp"
#include "tilewise/fp8.hpp"

namespace tilewise::cpu {
namespace {

using detail::parallel_for;
using detail::require;
using detail::str;

/// The e4m3 operands of §11.4 and their scales. Quantised q, k, v may live in any strided view: the caller's for
/// fp8_scaled, contiguous scratch for fp8.
struct Fp8Operands {
  const void* q;
  const void* k;
  const void* v;
  Strides qs, ks, vs;
  const float* q_scale;  // [B, Hq, S]
  const float* k_scale;  // [B, Hkv, key blocks]
  const float* v_scale;  // [B, Hkv, D]
  const std::vector<double>* lse_shift = nullptr;  // [B, Hq, S], precision fp8: scale * q_i . mu
};

/// The keys of (b, kv head) that take part in the statistics: every video position and the valid text positions.
template <class F>
void for_each_visible_key(const TokenMap& map, int64_t valid_text, F&& f) {
  for (int64_t j = 0; j < map.seq.num_video; ++j) f(map.seq.video_offset() + j);
  for (int64_t j = 0; j < valid_text; ++j) f(map.seq.text_offset() + j);
}

/// fl32(x * inv) rounded to e4m3 (§11.1): the product in fp32, as a kernel computes it.
uint8_t quantise(float x, float inv) { return detail::double_to_e4m3(x * inv); }

/// Precision fp8's quantisation of q, k, v in storage type T (§11.2), into e4m3 views `out` with strides `st`
/// (q, k, v) and the scales; with `lse_shift`, also scale * q_i . mu per query row.
template <class T>
void quantise_inputs(const Plan& plan, const Tensors& in, const Fp8Tensors& out, const Strides (&st)[3],
                     std::vector<double>* lse_shift) {
  const Problem& p = plan.problem();
  const TokenMap& map = plan.token_map();
  const int64_t S = p.seq_len, D = p.head_dim, blocks = plan.fp8_key_blocks();
  std::vector<float> mean(p.batch * p.kv_heads * D);
  parallel_for(p.batch * p.kv_heads, [&](int64_t bg) {
    const int64_t b = bg / p.kv_heads, g = bg % p.kv_heads;
    const int64_t valid = valid_text(p, in.text_len, b);
    std::vector<float> x(D);
    // K: the mean key over the visible keys, summed in float64 and rounded once to fp32.
    std::vector<double> sum(D, 0.0);
    int64_t count = 0;
    for_each_visible_key(map, valid, [&](int64_t j) {
      load_row<T>(in.k, p.k, b, j, g, D, x.data());
      for (int64_t d = 0; d < D; ++d) sum[d] += x[d];
      ++count;
    });
    float* mu = &mean[bg * D];
    for (int64_t d = 0; d < D; ++d) mu[d] = static_cast<float>(sum[d] / static_cast<double>(count));
    // Smoothed keys k' = fl32(k - mu) at every position, then the absolute maximum of each key block over its
    // visible keys.
    std::vector<float> smoothed(S * D);
    for (int64_t j = 0; j < S; ++j) {
      load_row<T>(in.k, p.k, b, j, g, D, x.data());
      for (int64_t d = 0; d < D; ++d) smoothed[j * D + d] = x[d] - mu[d];
    }
    std::vector<float> kmax(blocks, 0.0f), vmax(D, 0.0f);
    for_each_visible_key(map, valid, [&](int64_t j) {
      float& m = kmax[fp8::key_block(map, j)];
      for (int64_t d = 0; d < D; ++d) m = std::max(m, std::fabs(smoothed[j * D + d]));
      load_row<T>(in.v, p.v, b, j, g, D, x.data());
      for (int64_t d = 0; d < D; ++d) vmax[d] = std::max(vmax[d], std::fabs(x[d]));
    });
    std::vector<float> kinv(blocks), vinv(D);
    for (int64_t n = 0; n < blocks; ++n) {
      out.k_scale[bg * blocks + n] = fp8::scale_of(kmax[n]);
      kinv[n] = fp8::inv_scale_of(kmax[n]);
    }
    for (int64_t d = 0; d < D; ++d) {
      out.v_scale[bg * D + d] = fp8::scale_of(vmax[d]);
      vinv[d] = fp8::inv_scale_of(vmax[d]);
    }
    for (int64_t j = 0; j < S; ++j) {
      const float inv = kinv[fp8::key_block(map, j)];
      e4m3_t* kq = row_at<e4m3_t>(out.k, st[1], b, j, g);
      for (int64_t d = 0; d < D; ++d) kq[d].bits = quantise(smoothed[j * D + d], inv);
      load_row<T>(in.v, p.v, b, j, g, D, x.data());
      e4m3_t* vq = row_at<e4m3_t>(out.v, st[2], b, j, g);
      for (int64_t d = 0; d < D; ++d) vq[d].bits = quantise(x[d], vinv[d]);
    }
  });
  // Q: one group per row.
  parallel_for(p.batch * p.q_heads, [&](int64_t bh) {
    const int64_t b = bh / p.q_heads, h = bh % p.q_heads;
    const float* mu = &mean[(b * p.kv_heads + kv_head(p, h)) * D];
    std::vector<float> x(D);
    for (int64_t i = 0; i < S; ++i) {
      load_row<T>(in.q, p.q, b, i, h, D, x.data());
      float amax = 0.0f;
      double q_dot_mu = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        amax = std::max(amax, std::fabs(x[d]));
        q_dot_mu += static_cast<double>(x[d]) * mu[d];
      }
      out.q_scale[bh * S + i] = fp8::scale_of(amax);
      const float inv = fp8::inv_scale_of(amax);
      e4m3_t* qq = row_at<e4m3_t>(out.q, st[0], b, i, h);
      for (int64_t d = 0; d < D; ++d) qq[d].bits = quantise(x[d], inv);
      if (lse_shift) (*lse_shift)[bh * S + i] = p.scale * q_dot_mu;
    }
  });
}

/// §11.4 on e4m3 operands: o in storage type T, and lse.
template <class T>
class Fp8Attention {
 public:
  Fp8Attention(const Plan& plan, const Tensors& t, const Fp8Operands& x)
      : plan_(plan), p_(plan.problem()), map_(plan.token_map()), t_(t), x_(x), blocks_(plan.fp8_key_blocks()) {}

  void operator()() const {
    for_each_query_item(plan_, t_.text_len, [&](int64_t b, int64_t h, const std::vector<KeyRef>& keys, auto&& rows) {
      const int64_t g = kv_head(p_, h), D = p_.head_dim;
      Keys kv;
      gather_rows<e4m3_t>(x_.k, x_.ks, b, g, D, keys, kv.k);
      gather_rows<e4m3_t>(x_.v, x_.vs, b, g, D, keys, kv.v);
      for (const KeyRef& key : keys)
        kv.scale.push_back(x_.k_scale[(b * p_.kv_heads + g) * blocks_ + fp8::key_block(map_, key.pos)]);
      rows([&](int64_t pos, auto&& allowed) { row(b, h, pos, keys, kv, allowed); });
    });
  }

 private:
  struct Keys {
    std::vector<double> k, v;   // [keys, D]: e4m3 values
    std::vector<double> scale;  // [keys]: the k_scale of each key's block
  };

  template <class Allowed>
  void row(int64_t b, int64_t h, int64_t pos, const std::vector<KeyRef>& keys, const Keys& kv,
           Allowed&& allowed) const {
    const int64_t D = p_.head_dim, g = kv_head(p_, h), r = (b * p_.q_heads + h) * p_.seq_len + pos;
    constexpr double kNone = -std::numeric_limits<double>::infinity();
    std::vector<double> q(D), acc(D, 0.0), t(keys.size());
    load_row<e4m3_t>(x_.q, x_.qs, b, pos, h, D, q.data());
    // t_ij = scale * log2(e) * q_scale * k_scale * (q~ . k~): the dot product is exact in double.
    const double c = p_.scale * std::numbers::log2e * x_.q_scale[r];
    double t_max = kNone;
    for (size_t j = 0; j < keys.size(); ++j) {
      t[j] = allowed(keys[j]) ? c * kv.scale[j] * dot(q.data(), &kv.k[j * D], D) : kNone;
      t_max = std::max(t_max, t[j]);
    }
    // The integer maximum makes the quantisation of P independent of a kernel's key block order (§11.4).
    const double m = std::ceil(t_max);
    double l = 0.0;  // the sum of the e4m3 weights that the P V product uses, so o is their convex combination
    for (size_t j = 0; j < keys.size(); ++j) {
      if (t[j] == kNone) continue;
      const double pq = detail::round_e4m3(fp8::kMax * std::exp2(t[j] - m));
      l += pq;
      const double* vj = &kv.v[j * D];
      for (int64_t d = 0; d < D; ++d) acc[d] += pq * vj[d];
    }
    const float* v_scale = &x_.v_scale[(b * p_.kv_heads + g) * D];
    T* o = row_at<T>(t_.o, p_.o, b, pos, h);
    for (int64_t d = 0; d < D; ++d) Element<T>::store(o + d, v_scale[d] * acc[d] / l);
    if (t_.lse)
      t_.lse[r] = static_cast<float>(std::numbers::ln2 * (m + std::log2(l / fp8::kMax)) +
                                     (x_.lse_shift ? (*x_.lse_shift)[r] : 0.0));
  }

  const Plan& plan_;
  const Problem& p_;
  const TokenMap& map_;
  const Tensors& t_;
  const Fp8Operands& x_;
  int64_t blocks_;
};

/// fp8_scaled: every given scale must be finite and positive (checked before anything is written).
void require_scales(const char* name, const float* scales, int64_t n0, int64_t n1, int64_t n2) {
  for (int64_t i = 0; i < n0 * n1 * n2; ++i)
    require(std::isfinite(scales[i]) && scales[i] > 0.0f,
            std::string(name) + "[" + str(i / (n1 * n2)) + ", " + str(i / n2 % n1) + ", " + str(i % n2) + "]",
            scales[i], "a finite number > 0 (the dequantisation scale, docs/semantics.md §11.3)");
}

}  // namespace

void quantize_fp8(const Plan& plan, const Tensors& in, const Fp8Tensors& out) {
  const Problem& p = plan.problem();
  require_text_len(p, in.text_len);
  with_storage_type(p.dtype, [&](auto type) {
    quantise_inputs<typename decltype(type)::type>(plan, in, out, {p.q, p.k, p.v}, nullptr);
  });
}

void run_fp8(const Plan& plan, const Tensors& t) {
  const Problem& p = plan.problem();
  require_text_len(p, t.text_len);
  const int64_t S = p.seq_len, D = p.head_dim;
  Fp8Operands x{t.q, t.k, t.v, p.q, p.k, p.v, t.q_scale, t.k_scale, t.v_scale};
  // precision fp8: quantise into contiguous bshd scratch first, exactly as quantize_fp8 does.
  std::vector<uint8_t> q8, k8, v8;
  std::vector<float> q_scale, k_scale, v_scale;
  std::vector<double> lse_shift;
  if (p.precision == Precision::fp8) {
    const Strides qs = Strides::contiguous(Layout::bshd, S, p.q_heads, D);
    const Strides ks = Strides::contiguous(Layout::bshd, S, p.kv_heads, D);
    q8.resize(p.batch * S * p.q_heads * D);
    k8.resize(p.batch * S * p.kv_heads * D);
    v8.resize(k8.size());
    q_scale.resize(p.batch * p.q_heads * S);
    k_scale.resize(p.batch * p.kv_heads * plan.fp8_key_blocks());
    v_scale.resize(p.batch * p.kv_heads * D);
    lse_shift.resize(q_scale.size());
    const Fp8Tensors scratch{q8.data(), k8.data(), v8.data(), q_scale.data(), k_scale.data(), v_scale.data()};
    with_storage_type(p.dtype, [&](auto type) {
      quantise_inputs<typename decltype(type)::type>(plan, t, scratch, {qs, ks, ks}, &lse_shift);
    });
    x = Fp8Operands{q8.data(), k8.data(), v8.data(), qs, ks, ks, q_scale.data(), k_scale.data(), v_scale.data(),
                    &lse_shift};
  } else {
    require_scales("q_scale", t.q_scale, p.batch, p.q_heads, S);
    require_scales("k_scale", t.k_scale, p.batch, p.kv_heads, plan.fp8_key_blocks());
    require_scales("v_scale", t.v_scale, p.batch, p.kv_heads, D);
  }
  with_storage_type(p.dtype, [&](auto type) { Fp8Attention<typename decltype(type)::type>(plan, t, x)(); });
}

}  // namespace tilewise::cpu
