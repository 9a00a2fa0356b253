// Test oracle for the backward: the spec's gradient formulas (/work/shared/spec/semantics.md, "Gradients") in
// float64, with dense loops over every (query, key) pair and the element-wise mask of oracle.hpp. Like the forward
// oracle it uses nothing from the library's core: P is recomputed from the scores (not read from a forward's lse)
// and D_i = sum_j P_ij dP_ij (not read from a forward's o), so a mistake in either cannot hide here.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "oracle.hpp"

namespace oracle {

/// Writes every element of the views dq (q's strides), dk (k's) and dv (v's) of the loss whose upstream gradients
/// are dout (o's strides) and dlse ([B, Hq, S] contiguous; null = zero). Elements outside the views are not touched.
inline void attention_backward(const Problem& p, const double* q, const double* k, const double* v,
                               const double* dout, const double* dlse, double* dq, double* dk, double* dv) {
  const Mask mask(p);
  const int64_t S = p.seq_len(), D = p.D, group = p.Hq / p.Hkv;
  const double scale = p.scale != 0 ? p.scale : 1.0 / std::sqrt(static_cast<double>(D));
  auto row = [&](auto* base, const Strides3& st, int64_t b, int64_t pos, int64_t h) {
    return base + b * st.batch + pos * st.seq + h * st.head;
  };
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t j = 0; j < S; ++j)
      for (int64_t h = 0; h < p.Hkv; ++h)
        for (int64_t d = 0; d < D; ++d) row(dk, p.k, b, j, h)[d] = row(dv, p.v, b, j, h)[d] = 0.0;

  std::vector<double> prob(S), dprob(S);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h) {
      const int64_t kvh = h / group;
      for (int64_t i = 0; i < S; ++i) {
        const double* qi = row(q, p.q, b, i, h);
        const double* doi = row(dout, p.o, b, i, h);
        // P_i: the softmax of the scaled scores over the allowed keys.
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < S; ++j) {
          prob[j] = -std::numeric_limits<double>::infinity();
          if (!mask.allowed(b, h, i, j)) continue;
          const double* kj = row(k, p.k, b, j, kvh);
          double s = 0;
          for (int64_t d = 0; d < D; ++d) s += qi[d] * kj[d];
          prob[j] = scale * s;
          mx = std::max(mx, prob[j]);
        }
        if (mx == -std::numeric_limits<double>::infinity()) throw std::logic_error("oracle: query without keys");
        double sum = 0;
        for (int64_t j = 0; j < S; ++j) sum += prob[j] = std::exp(prob[j] - mx);  // exp(-inf) = 0
        // dP_ij = dO_i . v_j and D_i = sum_j P_ij dP_ij.
        double delta = 0;
        for (int64_t j = 0; j < S; ++j) {
          prob[j] /= sum;
          dprob[j] = 0;
          if (!mask.allowed(b, h, i, j)) continue;
          const double* vj = row(v, p.v, b, j, kvh);
          for (int64_t d = 0; d < D; ++d) dprob[j] += doi[d] * vj[d];
          delta += prob[j] * dprob[j];
        }
        const double dlse_i = dlse ? dlse[(b * p.Hq + h) * S + i] : 0.0;
        double* dqi = row(dq, p.q, b, i, h);
        for (int64_t d = 0; d < D; ++d) dqi[d] = 0;
        for (int64_t j = 0; j < S; ++j) {
          if (!mask.allowed(b, h, i, j)) continue;
          const double ds = prob[j] * (dprob[j] - delta + dlse_i);
          const double* kj = row(k, p.k, b, j, kvh);
          double* dkj = row(dk, p.k, b, j, kvh);
          double* dvj = row(dv, p.v, b, j, kvh);
          for (int64_t d = 0; d < D; ++d) {
            dqi[d] += scale * ds * kj[d];
            dkj[d] += scale * ds * qi[d];  // GQA: every query head of the group adds to its kv head
            dvj[d] += prob[j] * doi[d];
          }
        }
      }
    }
}

}  // namespace oracle
