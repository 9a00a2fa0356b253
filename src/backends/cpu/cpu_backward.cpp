// CPU reference backward (docs/semantics.md, "Gradients"): dq, dk, dv of the forward for f32/f64/bf16/f16,
// accumulating in f32 (f64 for f64 inputs). Two passes, each multithreaded over work items that own their output
// rows, so the result is deterministic without atomics:
//  1. dq, per (batch, query head, query tile | block of text query rows): the keys each query sees, as the Plan
//     answers (key_tiles, block_kind, video_pair_allowed) plus the valid text keys. It also leaves per-row
//     statistics for pass 2.
//  2. dk and dv, per (batch, kv head, key tile | block of text key rows): for every query head of the GQA group,
//     the query tiles that see the key tile (Plan::query_tiles) and every text query row; text keys are seen by
//     every query row. Text padding keys get dk = dv = 0.
// Like the forward it visits only allowed tiles, so its time scales with density.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backends/cpu/cpu_common.hpp"
#include "core/parallel.hpp"

namespace tilewise::cpu {
namespace {

using detail::parallel_for;

template <class T>
class BackwardKernel {
  using E = Element<T>;
  using Acc = typename E::Acc;

 public:
  BackwardKernel(const Plan& plan, const GradTensors& t)
      : plan_(plan), p_(plan.problem()), map_(plan.token_map()), t_(t), D_(p_.head_dim),
        scale_(static_cast<Acc>(p_.scale)), group_(p_.q_heads / p_.kv_heads),
        stats_(p_.batch * p_.q_heads * p_.seq_len) {}

  void operator()() {
    for_each_query_item(plan_, t_.text_len, [&](int64_t b, int64_t h, const std::vector<KeyRef>& keys, auto&& rows) {
      std::vector<Acc> k, v;
      gather_rows<T>(t_.k, p_.k, b, kv_head(h), D_, keys, k);  // [keys, D], converted once per work item
      gather_rows<T>(t_.v, p_.v, b, kv_head(h), D_, keys, v);
      RowScratch scratch(D_, keys.size());
      rows([&](int64_t pos, auto&& allowed) { dq_row(b, h, pos, keys, k, v, scratch, allowed); });
    });
    const int64_t tiles = map_.grid.num_tiles(), per_head = tiles + ceil_div(p_.text_capacity, kTextRows);
    parallel_for(p_.batch * p_.kv_heads * per_head, [&](int64_t item) {
      const int64_t b = item / (p_.kv_heads * per_head), kvh = (item / per_head) % p_.kv_heads;
      const int64_t i = item % per_head;
      if (i < tiles)
        dkdv_video_tile(b, kvh, i);
      else
        dkdv_text_keys(b, kvh, (i - tiles) * kTextRows);
    });
  }

 private:
  /// Per query row, from pass 1: the exact log-sum-exp over its allowed keys, and D_i - dLSE_i, so that
  /// P_ij = exp(s_ij - lse_i) and dS_ij = P_ij (dP_ij - delta_i).
  struct RowStats {
    Acc lse = 0, delta = 0;
  };

  /// The upstream quantities of one query row, converted: q_i, dO_i and its statistics.
  struct QueryRow {
    std::vector<Acc> q, dout;
    RowStats stats;
    explicit QueryRow(int64_t D) : q(D), dout(D) {}
  };

  int64_t kv_head(int64_t h) const { return h / group_; }
  int64_t row_index(int64_t b, int64_t h, int64_t pos) const { return (b * p_.q_heads + h) * p_.seq_len + pos; }

  // ---- pass 1: dq --------------------------------------------------------------------------------------

  /// Buffers of one query row in pass 1, allocated once per work item.
  struct RowScratch {
    std::vector<Acc> q, dout, o, dq;  // [D]
    std::vector<Acc> p, dp;           // [keys]: exp(s_ij - shift) (0 where not allowed), dP_ij
    RowScratch(int64_t D, size_t keys) : q(D), dout(D), o(D), dq(D), p(keys), dp(keys) {}
  };

  /// dq_i = scale * sum_j dS_ij k_j over the allowed keys of row i; records the row's statistics.
  template <class Allowed>
  void dq_row(int64_t b, int64_t h, int64_t pos, const std::vector<KeyRef>& keys, const std::vector<Acc>& k,
              const std::vector<Acc>& v, RowScratch& row, Allowed&& allowed) {
    const int64_t n = static_cast<int64_t>(keys.size());
    Acc *q = row.q.data(), *dout = row.dout.data(), *o = row.o.data(), *dq = row.dq.data();
    Acc *p = row.p.data(), *dp = row.dp.data();
    std::fill_n(dq, D_, Acc(0));
    std::fill_n(p, n, Acc(0));
    load_row<T>(t_.q, p_.q, b, pos, h, D_, q);
    load_row<T>(t_.dout, p_.o, b, pos, h, D_, dout);
    load_row<T>(t_.o, p_.o, b, pos, h, D_, o);
    // The forward's lse is float32: it serves as the exponent shift, and the row sum renormalises so that P is
    // the softmax to working precision (for f64 inputs the f32 lse alone would limit accuracy to ~1e-7).
    const int64_t r = row_index(b, h, pos);
    const Acc shift = static_cast<Acc>(t_.lse[r]);
    Acc sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (!allowed(keys[j])) continue;
      p[j] = std::exp(scale_ * dot(q, &k[j * D_], D_) - shift);
      dp[j] = dot(dout, &v[j * D_], D_);
      sum += p[j];
    }
    RowStats& stats = stats_[r];
    stats.lse = shift + std::log(sum);
    stats.delta = dot(dout, o, D_) - (t_.dlse ? static_cast<Acc>(t_.dlse[r]) : Acc(0));
    for (int64_t j = 0; j < n; ++j) {
      if (p[j] == 0) continue;  // not allowed (or underflowed: no contribution either way)
      const Acc ds = p[j] / sum * (dp[j] - stats.delta);
      for (int64_t d = 0; d < D_; ++d) dq[d] += ds * k[j * D_ + d];
    }
    T* out = row_at<T>(t_.dq, p_.q, b, pos, h);
    for (int64_t d = 0; d < D_; ++d) E::store(out + d, scale_ * dq[d]);
  }

  // ---- pass 2: dk, dv ----------------------------------------------------------------------------------

  /// Keys of one work item, converted, and their accumulators.
  struct KeyBlock {
    std::vector<KeyRef> keys;
    std::vector<Acc> k, v, dk, dv;  // [keys, D]
  };

  KeyBlock key_block(int64_t b, int64_t kvh, std::vector<KeyRef> keys) const {
    KeyBlock kb{std::move(keys), {}, {}, {}, {}};
    gather_rows<T>(t_.k, p_.k, b, kvh, D_, kb.keys, kb.k);
    gather_rows<T>(t_.v, p_.v, b, kvh, D_, kb.keys, kb.v);
    kb.dk.assign(kb.k.size(), Acc(0));
    kb.dv.assign(kb.v.size(), Acc(0));
    return kb;
  }

  void load_query(int64_t b, int64_t h, int64_t pos, QueryRow& row) const {
    load_row<T>(t_.q, p_.q, b, pos, h, D_, row.q.data());
    load_row<T>(t_.dout, p_.o, b, pos, h, D_, row.dout.data());
    row.stats = stats_[row_index(b, h, pos)];
  }

  /// Adds query row i's terms to the keys it sees: dv_j += P_ij dO_i, dk_j += dS_ij q_i (scaled at the end).
  template <class Allowed>
  void accumulate(const QueryRow& row, KeyBlock& kb, Allowed&& allowed) const {
    for (size_t j = 0; j < kb.keys.size(); ++j) {
      if (!allowed(kb.keys[j])) continue;
      const Acc p = std::exp(scale_ * dot(row.q.data(), &kb.k[j * D_], D_) - row.stats.lse);
      const Acc ds = p * (dot(row.dout.data(), &kb.v[j * D_], D_) - row.stats.delta);
      Acc* dk = &kb.dk[j * D_];
      Acc* dv = &kb.dv[j * D_];
      for (int64_t d = 0; d < D_; ++d) {
        dv[d] += p * row.dout[d];
        dk[d] += ds * row.q[d];
      }
    }
  }

  void store(const KeyBlock& kb, int64_t b, int64_t kvh) const {
    for (size_t j = 0; j < kb.keys.size(); ++j) {
      T* dk = row_at<T>(t_.dk, p_.k, b, kb.keys[j].pos, kvh);
      T* dv = row_at<T>(t_.dv, p_.v, b, kb.keys[j].pos, kvh);
      for (int64_t d = 0; d < D_; ++d) {
        E::store(dk + d, scale_ * kb.dk[j * D_ + d]);
        E::store(dv + d, kb.dv[j * D_ + d]);
      }
    }
  }

  void dkdv_video_tile(int64_t b, int64_t kvh, int64_t kt) const {
    const TileGrid& g = map_.grid;
    const Dim3 ck = g.tile_coord(kt);
    std::vector<KeyRef> keys;
    for_each_token(g, ck, [&](Dim3 k) { keys.push_back({map_.video_position(k), k, false}); });
    KeyBlock kb = key_block(b, kvh, std::move(keys));
    QueryRow row(D_);
    for (int64_t h = kvh * group_; h < (kvh + 1) * group_; ++h) {
      for (int32_t qt : plan_.query_tiles(h, kt)) {
        const Dim3 cq = g.tile_coord(qt);
        const bool masked = plan_.block_kind(h, cq, ck) == BlockKind::masked;
        for_each_token(g, cq, [&](Dim3 q) {
          load_query(b, h, map_.video_position(q), row);
          accumulate(row, kb, [&](const KeyRef& k) { return !masked || plan_.video_pair_allowed(h, q, k.coord); });
        });
      }
      for (int64_t r = 0; r < p_.text_capacity; ++r) {  // text rows (padding ones too) see every video key
        load_query(b, h, map_.seq.text_offset() + r, row);
        accumulate(row, kb, [](const KeyRef&) { return true; });
      }
    }
    store(kb, b, kvh);
  }

  void dkdv_text_keys(int64_t b, int64_t kvh, int64_t first) const {
    const int64_t last = std::min(first + kTextRows, p_.text_capacity);
    const int64_t valid_end = std::max(first, std::min(last, valid_text(p_, t_.text_len, b)));
    std::vector<KeyRef> keys;
    for (int64_t r = first; r < valid_end; ++r) keys.push_back({map_.seq.text_offset() + r, {}, false});
    KeyBlock kb = key_block(b, kvh, std::move(keys));
    QueryRow row(D_);
    if (!kb.keys.empty())
      for (int64_t h = kvh * group_; h < (kvh + 1) * group_; ++h)
        for (int64_t pos = 0; pos < p_.seq_len; ++pos) {  // every query row sees every valid text key
          load_query(b, h, pos, row);
          accumulate(row, kb, [](const KeyRef&) { return true; });
        }
    store(kb, b, kvh);
    // Padding keys: no query sees them.
    for (int64_t r = valid_end; r < last; ++r) {
      T* dk = row_at<T>(t_.dk, p_.k, b, map_.seq.text_offset() + r, kvh);
      T* dv = row_at<T>(t_.dv, p_.v, b, map_.seq.text_offset() + r, kvh);
      for (int64_t d = 0; d < D_; ++d) E::store(dk + d, Acc(0)), E::store(dv + d, Acc(0));
    }
  }

  const Plan& plan_;
  const Problem& p_;
  const TokenMap& map_;
  const GradTensors& t_;
  const int64_t D_;
  const Acc scale_;
  const int64_t group_;  // query heads per kv head
  // Written by pass 1 (each row by the one work item that owns it), read by pass 2.
  std::vector<RowStats> stats_;
};

}  // namespace

void run_backward(const Plan& plan, const GradTensors& t) {
  // Validate everything before the first write: outputs stay untouched on error.
  require_text_len(plan.problem(), t.text_len);
  with_storage_type(plan.problem().dtype, [&](auto type) { BackwardKernel<typename decltype(type)::type>(plan, t)(); });
}

}  // namespace tilewise::cpu
