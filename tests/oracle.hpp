// Test oracle: naive dense attention in float64 with the mask evaluated element by element, written again
// from the spec (/work/shared/spec/semantics.md, docs/semantics.md). It deliberately uses nothing from
// geometry.hpp, pattern.hpp or Plan: token positions, tile coordinates, windows, frames and text rules are
// all spelled out here a second time, so a mistake in the library cannot hide in the oracle as well.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "core/numeric.hpp"  // bit conversions only (bf16/f16 <-> float)

namespace oracle {

enum class Kind { dense, sliding_tile, attention_tile, block_list };

/// Element strides of a [B, S, H, D] view whose last dimension is contiguous.
struct Strides3 {
  int64_t batch = 0, seq = 0, head = 0;
};

/// Pattern parameters of one (local) query head.
struct HeadPattern {
  int64_t kt = 1, kh = 1, kw = 1;  // sliding tile window, in tiles
  int64_t global_frames = 0;       // attention tile g
  int64_t radius = 0;              // attention tile r
};

/// Everything the oracle needs, as plain numbers.
struct Problem {
  int64_t B = 1, Hq = 1, Hkv = 1, D = 1;
  int64_t T = 1, H = 1, W = 1;     // latent grid
  int64_t tt = 1, th = 1, tw = 1;  // tile shape
  int64_t text_capacity = 0;
  bool text_first = false;
  bool tiled_order = false;
  std::vector<int64_t> text_len;   // per batch element; empty = every text position valid
  double scale = 0;                // 0 = 1/sqrt(D)
  Kind kind = Kind::dense;
  std::vector<HeadPattern> heads;  // one per local query head (unused for dense / block list)
  std::vector<std::vector<std::vector<int64_t>>> blocks;  // block list: [head][query tile] -> key tiles
  Strides3 q, k, v, o;

  int64_t num_video() const { return T * H * W; }
  int64_t seq_len() const { return num_video() + text_capacity; }
  int64_t tiles_t() const { return (T + tt - 1) / tt; }
  int64_t tiles_h() const { return (H + th - 1) / th; }
  int64_t tiles_w() const { return (W + tw - 1) / tw; }
  int64_t num_tiles() const { return tiles_t() * tiles_h() * tiles_w(); }
  int64_t valid_text(int64_t b) const { return text_len.empty() ? text_capacity : text_len[b]; }
};

/// What sits at one sequence position.
struct Token {
  bool text = false;
  int64_t text_index = 0;  // text: index among the text positions
  int64_t t = 0, h = 0, w = 0;  // video: latent coordinate
  int64_t tile = 0;        // video: tile index, tiles in raster order over the tile grid
};

/// Spec: "if k >= n: the whole axis, else start = clamp(c - k/2, 0, n - k), key tiles [start, start + k)".
inline bool in_window(int64_t c_query, int64_t c_key, int64_t k, int64_t n) {
  if (k >= n) return true;
  const int64_t start = std::min(std::max(c_query - k / 2, int64_t{0}), n - k);
  return c_key >= start && c_key < start + k;
}

/// The token table of the joint sequence and the element-wise mask.
class Mask {
 public:
  explicit Mask(const Problem& p) : p_(p), tokens_(p.seq_len()) {
    const int64_t video0 = p.text_first ? p.text_capacity : 0;
    const int64_t text0 = p.text_first ? 0 : p.num_video();
    std::vector<bool> used(tokens_.size(), false);
    auto place = [&](int64_t pos, const Token& tok) {
      if (used.at(pos)) throw std::logic_error("oracle: two tokens at one sequence position");
      used[pos] = true;
      tokens_[pos] = tok;
    };
    for (int64_t j = 0; j < p.text_capacity; ++j) place(text0 + j, Token{true, j});
    for (int64_t t = 0; t < p.T; ++t)
      for (int64_t h = 0; h < p.H; ++h)
        for (int64_t w = 0; w < p.W; ++w) {
          const int64_t tile = ((t / p.tt) * p.tiles_h() + h / p.th) * p.tiles_w() + w / p.tw;
          const int64_t in_tile = ((t % p.tt) * p.th + h % p.th) * p.tw + w % p.tw;
          const int64_t pos = p.tiled_order ? tile * (p.tt * p.th * p.tw) + in_tile : (t * p.H + h) * p.W + w;
          place(video0 + pos, Token{false, 0, t, h, w, tile});
        }
  }

  const Token& token(int64_t s) const { return tokens_[s]; }

  /// Video query -> video key under head h's pattern.
  bool video_allowed(int64_t head, const Token& q, const Token& k) const {
    switch (p_.kind) {
      case Kind::dense: return true;
      case Kind::sliding_tile: {
        const HeadPattern& hp = p_.heads.at(head);
        return in_window(q.t / p_.tt, k.t / p_.tt, hp.kt, p_.tiles_t()) &&
               in_window(q.h / p_.th, k.h / p_.th, hp.kh, p_.tiles_h()) &&
               in_window(q.w / p_.tw, k.w / p_.tw, hp.kw, p_.tiles_w());
      }
      case Kind::attention_tile: {
        const HeadPattern& hp = p_.heads.at(head);
        const int64_t g = hp.global_frames;
        return q.t < g || k.t < g || std::abs(q.t - k.t) <= hp.radius;
      }
      case Kind::block_list: {
        const auto& keys = p_.blocks.at(head).at(q.tile);
        return std::find(keys.begin(), keys.end(), k.tile) != keys.end();
      }
    }
    return false;
  }

  /// May query position i see key position j (batch b, query head h)?
  bool allowed(int64_t b, int64_t head, int64_t i, int64_t j) const {
    const Token& q = tokens_[i];
    const Token& k = tokens_[j];
    if (k.text) return k.text_index < p_.valid_text(b);  // valid text keys only, for every query
    if (q.text) return true;                              // text queries see every video key
    return video_allowed(head, q, k);
  }

  /// Number of allowed (query, key) pairs over batch, heads, queries and keys.
  int64_t count_allowed() const {
    int64_t n = 0;
    const int64_t S = p_.seq_len();
    for (int64_t b = 0; b < p_.B; ++b)
      for (int64_t h = 0; h < p_.Hq; ++h)
        for (int64_t i = 0; i < S; ++i)
          for (int64_t j = 0; j < S; ++j) n += allowed(b, h, i, j);
    return n;
  }

 private:
  Problem p_;
  std::vector<Token> tokens_;
};

/// o[b, i, h, :] and lse[b, h, i] ([B, Hq, S] contiguous; may be null) in float64.
inline void attention(const Problem& p, const double* q, const double* k, const double* v, double* o,
                      double* lse) {
  const Mask mask(p);
  const int64_t S = p.seq_len(), D = p.D, group = p.Hq / p.Hkv;
  const double scale = p.scale != 0 ? p.scale : 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<double> s(S), acc(D);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h) {
      const int64_t kvh = h / group;
      for (int64_t i = 0; i < S; ++i) {
        const double* qi = q + b * p.q.batch + i * p.q.seq + h * p.q.head;
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < S; ++j) {
          s[j] = -std::numeric_limits<double>::infinity();
          if (!mask.allowed(b, h, i, j)) continue;
          const double* kj = k + b * p.k.batch + j * p.k.seq + kvh * p.k.head;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += qi[d] * kj[d];
          s[j] = scale * dot;
          mx = std::max(mx, s[j]);
        }
        if (mx == -std::numeric_limits<double>::infinity()) throw std::logic_error("oracle: query without keys");
        double sum = 0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t j = 0; j < S; ++j) {
          if (s[j] == -std::numeric_limits<double>::infinity()) continue;
          const double e = std::exp(s[j] - mx);
          const double* vj = v + b * p.v.batch + j * p.v.seq + kvh * p.v.head;
          sum += e;
          for (int64_t d = 0; d < D; ++d) acc[d] += e * vj[d];
        }
        double* oi = o + b * p.o.batch + i * p.o.seq + h * p.o.head;
        for (int64_t d = 0; d < D; ++d) oi[d] = acc[d] / sum;
        if (lse) lse[(b * p.Hq + h) * S + i] = mx + std::log(sum);
      }
    }
}

// ---- 16-bit storage helpers (round to nearest even) ---------------------------------------------------

enum class Storage { f64, f32, bf16, f16 };

inline int64_t storage_size(Storage s) {
  return s == Storage::f64 ? 8 : s == Storage::f32 ? 4 : 2;
}

/// Stores x (rounded to the storage type) as element i of buf.
inline void store(Storage s, void* buf, int64_t i, double x) {
  switch (s) {
    case Storage::f64: static_cast<double*>(buf)[i] = x; break;
    case Storage::f32: static_cast<float*>(buf)[i] = static_cast<float>(x); break;
    case Storage::bf16:
      static_cast<uint16_t*>(buf)[i] = tilewise::detail::float_to_bf16(static_cast<float>(x));
      break;
    case Storage::f16:
      static_cast<uint16_t*>(buf)[i] = tilewise::detail::float_to_f16(static_cast<float>(x));
      break;
  }
}

/// Element i of buf, exactly, as a double.
inline double load(Storage s, const void* buf, int64_t i) {
  switch (s) {
    case Storage::f64: return static_cast<const double*>(buf)[i];
    case Storage::f32: return static_cast<const float*>(buf)[i];
    case Storage::bf16: return tilewise::detail::bf16_to_float(static_cast<const uint16_t*>(buf)[i]);
    case Storage::f16: return tilewise::detail::f16_to_float(static_cast<const uint16_t*>(buf)[i]);
  }
  return 0;
}

/// x rounded to the storage type and back (the values a 16-bit input really holds).
inline double round_trip(Storage s, double x) {
  unsigned char tmp[8];
  store(s, tmp, 0, x);
  return load(s, tmp, 0);
}

/// Spacing of representable numbers of the storage type at magnitude |x| (normal range).
inline double ulp(Storage s, double x) {
  const int mantissa_bits = s == Storage::f64 ? 52 : s == Storage::f32 ? 23 : s == Storage::bf16 ? 7 : 10;
  const int min_exp = s == Storage::f16 ? -14 : s == Storage::bf16 || s == Storage::f32 ? -126 : -1022;
  const int e = x == 0 ? min_exp : std::max(std::ilogb(x), min_exp);
  return std::ldexp(1.0, e - mantissa_bits);
}

}  // namespace oracle
