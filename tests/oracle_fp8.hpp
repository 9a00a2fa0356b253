// Test oracle of the FP8 forward (docs/semantics.md §11), written again from the spec in float64 with the spec's
// rounding points: fp32 where it says fp32, e4m3 where it says e4m3. Like oracle.hpp it uses nothing of the
// library: e4m3 rounding is a search in the table of the format's values (built from its definition, not from
// the library's bit manipulation), key blocks come from the oracle's own token table, and the masks from
// oracle::Mask.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "oracle.hpp"

namespace oracle::fp8 {

/// The finite non-negative e4m3 values, in the order of their codes 0x00..0x7e: sign 0, exponent field E (bias 7),
/// mantissa M; E = 0 is subnormal (M * 2^-9); E = 15, M = 7 is NaN.
inline const std::vector<double>& values() {
  static const std::vector<double> table = [] {
    std::vector<double> v;
    for (int e = 0; e < 16; ++e)
      for (int m = 0; m < 8; ++m)
        if (!(e == 15 && m == 7)) v.push_back(e == 0 ? m / 512.0 : (1 + m / 8.0) * std::pow(2.0, e - 7));
    return v;
  }();
  return table;
}

/// The e4m3 code of x: the nearest value, ties to the even code (= even mantissa), saturating at 448; negative
/// values that round to zero keep their sign (0x80), as IEEE rounding does.
inline uint8_t code_of(double x) {
  const std::vector<double>& v = values();
  const double a = std::min(std::fabs(x), v.back());
  const size_t hi = std::lower_bound(v.begin(), v.end(), a) - v.begin();
  size_t pick = hi;
  if (hi > 0 && v[hi] != a) {
    const double below = a - v[hi - 1], above = v[hi] - a;
    pick = below < above || (below == above && (hi - 1) % 2 == 0) ? hi - 1 : hi;
  }
  return static_cast<uint8_t>(pick | (std::signbit(x) ? 0x80 : 0x00));
}
inline double value_of(uint8_t code) { return (code & 0x80 ? -1 : 1) * values()[code & 0x7f]; }
inline double round(double x) { return value_of(code_of(x)); }

inline double fl32(double x) { return static_cast<float>(x); }

/// Scale and reciprocal of a group with absolute maximum a (§11.1), in fp32.
inline double scale_of(double a) { return a > 0 ? fl32(static_cast<float>(a) / 448.0f) : 1.0; }
inline double inv_of(double a) { return a > 0 ? fl32(448.0f / static_cast<float>(a)) : 1.0; }
inline double quantise(double x, double inv) { return round(fl32(static_cast<float>(x) * static_cast<float>(inv))); }

/// What §11.3 reads: e4m3 q, k, v (as values and as codes, contiguous [B, S, H, D]) and their scales.
struct Quantised {
  std::vector<double> q, k, v;
  std::vector<uint8_t> q_code, k_code, v_code;
  std::vector<float> q_scale, k_scale, v_scale;  // [B, Hq, S], [B, Hkv, blocks], [B, Hkv, D]
  std::vector<double> lse_shift;                 // [B, Hq, S]: scale * q_i . mu
  int64_t blocks = 0;
};

/// The key block of a token (§11.2): its tile, or num_tiles + text index / 128.
inline int64_t key_block(const Problem& p, const Token& t) {
  return t.text ? p.num_tiles() + t.text_index / 128 : t.tile;
}

/// §11.2 on inputs given as exact values with the strides of p.
inline Quantised quantise_inputs(const Problem& p, const double* q, const double* k, const double* v) {
  const Mask mask(p);
  const int64_t S = p.seq_len(), D = p.D;
  Quantised x;
  x.blocks = p.num_tiles() + (p.text_capacity + 127) / 128;
  x.q.resize(p.B * S * p.Hq * D);
  x.k.resize(p.B * S * p.Hkv * D);
  x.v.resize(x.k.size());
  x.q_scale.resize(p.B * p.Hq * S);
  x.k_scale.resize(p.B * p.Hkv * x.blocks);
  x.v_scale.resize(p.B * p.Hkv * D);
  x.lse_shift.resize(x.q_scale.size());
  const double scale = p.scale != 0 ? p.scale : 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> mu(p.B * p.Hkv * D);
  auto kv_at = [&](const double* base, const Strides3& s, int64_t b, int64_t j, int64_t g, int64_t d) {
    return fl32(base[b * s.batch + j * s.seq + g * s.head + d]);
  };
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t g = 0; g < p.Hkv; ++g) {
      auto visible = [&](int64_t j) {
        const Token& t = mask.token(j);
        return !t.text || t.text_index < p.valid_text(b);
      };
      double* m = &mu[(b * p.Hkv + g) * D];
      int64_t n = 0;
      for (int64_t j = 0; j < S; ++j)
        if (visible(j)) {
          ++n;
          for (int64_t d = 0; d < D; ++d) m[d] += kv_at(k, p.k, b, j, g, d);
        }
      for (int64_t d = 0; d < D; ++d) m[d] = fl32(m[d] / n);
      std::vector<double> kmax(x.blocks, 0.0), vmax(D, 0.0);
      for (int64_t j = 0; j < S; ++j)
        if (visible(j))
          for (int64_t d = 0; d < D; ++d) {
            double& km = kmax[key_block(p, mask.token(j))];
            km = std::max(km, std::fabs(fl32(kv_at(k, p.k, b, j, g, d) - m[d])));
            vmax[d] = std::max(vmax[d], std::fabs(kv_at(v, p.v, b, j, g, d)));
          }
      for (int64_t i = 0; i < x.blocks; ++i) x.k_scale[(b * p.Hkv + g) * x.blocks + i] = scale_of(kmax[i]);
      for (int64_t d = 0; d < D; ++d) x.v_scale[(b * p.Hkv + g) * D + d] = scale_of(vmax[d]);
      for (int64_t j = 0; j < S; ++j)
        for (int64_t d = 0; d < D; ++d) {
          const int64_t at = ((b * S + j) * p.Hkv + g) * D + d;
          x.k[at] = quantise(fl32(kv_at(k, p.k, b, j, g, d) - m[d]), inv_of(kmax[key_block(p, mask.token(j))]));
          x.v[at] = quantise(kv_at(v, p.v, b, j, g, d), inv_of(vmax[d]));
        }
    }
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t i = 0; i < S; ++i) {
        const double* row = q + b * p.q.batch + i * p.q.seq + h * p.q.head;
        const double* m = &mu[(b * p.Hkv + h / (p.Hq / p.Hkv)) * D];
        double a = 0, shift = 0;
        for (int64_t d = 0; d < D; ++d) {
          a = std::max(a, std::fabs(fl32(row[d])));
          shift += fl32(row[d]) * m[d];
        }
        x.q_scale[(b * p.Hq + h) * S + i] = scale_of(a);
        x.lse_shift[(b * p.Hq + h) * S + i] = scale * shift;
        for (int64_t d = 0; d < D; ++d) x.q[((b * S + i) * p.Hq + h) * D + d] = quantise(fl32(row[d]), inv_of(a));
      }
  for (auto [values, codes] : {std::pair{&x.q, &x.q_code}, {&x.k, &x.k_code}, {&x.v, &x.v_code}})
    for (double val : *values) codes->push_back(code_of(val));
  return x;
}

/// §11.4: o (with the strides of p) and lse ([B, Hq, S], may be null) from quantised operands; with_shift adds
/// the smoothing term of precision fp8 to the lse.
inline void attention(const Problem& p, const Quantised& x, bool with_shift, double* o, double* lse) {
  const Mask mask(p);
  const int64_t S = p.seq_len(), D = p.D, group = p.Hq / p.Hkv;
  const double scale = p.scale != 0 ? p.scale : 1.0 / std::sqrt(static_cast<double>(D));
  const double none = -std::numeric_limits<double>::infinity();
  std::vector<double> t(S), acc(D);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h) {
      const int64_t g = h / group;
      for (int64_t i = 0; i < S; ++i) {
        const int64_t r = (b * p.Hq + h) * S + i;
        double t_max = none;
        for (int64_t j = 0; j < S; ++j) {
          t[j] = none;
          if (!mask.allowed(b, h, i, j)) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += x.q[((b * S + i) * p.Hq + h) * D + d] * x.k[((b * S + j) * p.Hkv + g) * D + d];
          t[j] = scale * std::log2(std::exp(1.0)) * x.q_scale[r] *
                 x.k_scale[(b * p.Hkv + g) * x.blocks + key_block(p, mask.token(j))] * dot;
          t_max = std::max(t_max, t[j]);
        }
        const double m = std::ceil(t_max);
        double l = 0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = 0; j < S; ++j) {
          if (t[j] == none) continue;
          const double pq = round(448.0 * std::pow(2.0, t[j] - m));
          l += pq;
          for (int64_t d = 0; d < D; ++d) acc[d] += pq * x.v[((b * S + j) * p.Hkv + g) * D + d];
        }
        for (int64_t d = 0; d < D; ++d)
          o[b * p.o.batch + i * p.o.seq + h * p.o.head + d] = x.v_scale[(b * p.Hkv + g) * D + d] * acc[d] / l;
        if (lse) lse[r] = std::log(2.0) * (m + std::log2(l / 448.0)) + (with_shift ? x.lse_shift[r] : 0.0);
      }
    }
}

}  // namespace oracle::fp8
