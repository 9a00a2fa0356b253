// Producer: two threads of the producer warpgroup walk the work items and their key blocks and issue TMA loads of
// Q and K (one thread) and V (the other) straight from the user's tensors into the shared-memory pipeline.
#pragma once

#include "backends/cuda/hopper/kernel_traits.cuh"
#include "backends/cuda/hopper/run_keys.cuh"
#include "backends/cuda/hopper/tile_scheduler.cuh"

namespace tilewise::hopper {

template <class Traits>
struct Producer {
  static constexpr int kCluster = Traits::kCluster;
  const FwdParams& p;
  const typename Traits::Shared& s;
  uint32_t rank;  // within the cluster

  /// Announces one block (all panels) of a tensor on `bar`, and, when `issue`, loads it into `dst`: into this CTA
  /// only, or (`multicast`) into the same offsets of every CTA of the cluster, each completing on its own `bar`.
  /// `video` holds a map per class.
  __device__ __forceinline__ void load(const CUtensorMap* video, const CUtensorMap* text, const TensorView& view,
                                       const Block& b, int batch, int head, uint8_t* dst, Barrier* bar,
                                       bool issue = true, bool multicast = false,
                                       const CUtensorMap* rows_map = nullptr) const {
    if constexpr (Traits::kQueryRuns) {  // a run block: Q's, or K's / V's (rows_map)
      if (b.run()) return load_rows(b.query ? with_runs(p).q_rows : *rows_map, view, b, batch, head, dst, bar, issue,
                                    multicast);
    }
    const int rows = b.text ? (b.query ? Traits::kBlockM : Traits::kStreamRows) : static_cast<int>(b.box(p).volume());
    const int panel_bytes = b.query ? Traits::kQPanelBytes : Traits::kPanelBytes;
    bar->arrive_expect_tx(static_cast<uint32_t>(rows * Traits::D * Traits::kInBytes));
    if (!issue) return;  // the peer CTA multicasts it
    const int c4 = view.c4(batch, head);
    const D3 o = b.tma_origin(p);
    const CUtensorMap* map = b.text ? text : video + b.cls;
    const int c1 = b.text ? b.row0 : static_cast<int>(o.w), c2 = b.text ? 0 : static_cast<int>(o.h),
              c3 = b.text ? 0 : static_cast<int>(o.t);
    load_panels(map, view, head, dst, panel_bytes, bar, c1, c2, c3, c4, multicast);
  }
  /// The TMA loads of one block, a panel of kPanelCols columns at a time, from `map` at (c1, c2, c3, c4).
  __device__ __forceinline__ void load_panels(const CUtensorMap* map, const TensorView& view, int head, uint8_t* dst,
                                              int panel_bytes, Barrier* bar, int c1, int c2, int c3, int c4,
                                              bool multicast) const {
#pragma unroll
    for (int panel = 0; panel < Traits::kPanels; ++panel) {
      const int c0 = view.c0(head, panel * Traits::kPanelCols);
      uint8_t* d = dst + panel * panel_bytes;
      if (multicast)
        tma_load_multicast(d, map, bar, c0, c1, c2, c3, c4, (1u << kCluster) - 1);
      else
        tma_load(d, map, bar, c0, c1, c2, c3, c4);
    }
  }

  /// load() of a run block (Traits::kQueryRuns): kBlockM (query) or kBlockN (key) rows of the row map from row0.
  __device__ __forceinline__ void load_rows(const CUtensorMap& map, const TensorView& view, const Block& b, int batch,
                                            int head, uint8_t* dst, Barrier* bar, bool issue, bool multicast) const {
    const int rows = b.query ? Traits::kBlockM : kBlockN;
    const int panel_bytes = b.query ? Traits::kQPanelBytes : Traits::kPanelBytes;
    bar->arrive_expect_tx(static_cast<uint32_t>(rows * Traits::D * Traits::kInBytes));
    if (!issue) return;  // the peer CTA multicasts it
    load_panels(&map, view, head, dst, panel_bytes, bar, b.row0, 0, 0, view.c4(batch, head), multicast);
  }

  /// The row map of K (or V) in the query-run forward (its key-run blocks); none elsewhere.
  __device__ __forceinline__ const CUtensorMap* rows_map(bool values) const {
    if constexpr (Traits::kQueryRuns)
      return values ? &with_runs(p).v_rows : &with_runs(p).k_rows;
    else
      return nullptr;
  }

  /// Zeroes V rows [volume, volume + tail) of a stage, which a larger box loaded earlier may have filled: P is
  /// zero there, but 0 * NaN would not be. Generic stores, so the proxy fence orders them before the wgmma reads.
  __device__ __forceinline__ void zero_tail(const Block& b, uint8_t* dst) const {
    if constexpr (Traits::kQueryRuns) {
      if (b.run()) return;  // a key-run block loads kBlockN rows (other tokens' past its end: P is 0 there)
    }
    const TileClass& c = p.cls[b.cls];
    if (b.text || c.tail == 0) return;
    const int first = c.box.volume() * Traits::kRowBytes / 16, count = c.tail * Traits::kRowBytes / 16;
    for (int panel = 0; panel < Traits::kPanels; ++panel) {
      uint4* words = reinterpret_cast<uint4*>(dst + panel * Traits::kPanelBytes) + first;
      for (int i = 0; i < count; ++i) words[i] = make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async();
  }

  /// Walks the units of this CTA's cluster and, for each one with an item for this CTA, calls f(item, shared) and
  /// then, for each key block, g(block, unit, text_len, stage, parity of the stage's empty barrier, last).
  /// Both loaders walk through here, so they agree with each other (and with the consumers) on which stage holds
  /// which block; after a unit whose CTAs walked different blocks, the rings restart at stage 0.
  template <int kRing, class Ring, class F, class G>
  __device__ __forceinline__ void for_each_unit(Ring& next_unit, Barrier* empty, Barrier* sync, F&& f, G&& g) const {
    PipeState<kRing> pipe;
    StageAlignment<kCluster> alignment;
    uint32_t syncs = 0;
    for (int32_t u; (u = next_unit()) < num_units<kCluster>(p);) {
      const UnitWork uw = decode_unit<kCluster, Traits::kBlockM, Traits::kQueryRuns>(p, u, rank);
      if (alignment.restart_before(uw)) {
        // This CTA's empty barriers have not seen the peer's releases since the last shared unit: wait until
        // this CTA's own stages are all free, meet the peer, and only then multicast into either.
        for (int st = 0; st < kRing; ++st) empty[st].wait(pipe.phase_of(st) ^ 1);
        sync->arrive_remote(rank ^ 1);
        sync->wait_cluster(syncs++ & 1);
        pipe.restart();
      }
      if (uw.item.empty) continue;
      f(uw.item, uw.shared);
      const int32_t text_len = text_len_of(p, uw.item.batch);
      std::conditional_t<Traits::kQueryRuns, RunKeyBlockCursor, KeyBlockCursor> cursor(p, uw.item, text_len);
      // Every work item has at least one key block (the plan guarantees an allowed key).
      for (Block kb; cursor.next(kb); pipe.advance())
        g(kb, uw, text_len, pipe.stage(), pipe.phase() ^ 1, cursor.done());
    }
  }

  /// The Q and K loader (warp 0 of the producer warpgroup): takes units from the scheduler (the cluster's first
  /// CTA) or from the ring (the others), loads each item's Q and its key blocks' K (multicast by the first CTA
  /// when shared), and describes each block to the consumers (BlockInfo).
  __device__ void run_keys() const {
    uint32_t items = 0;
    WorkRing<typename Traits::Shared, kCluster> ring{s, rank};
    auto next_unit = [&] {
      return rank == 0 ? ring.produce(p.work_counter, num_units<kCluster>(p)) : ring.consume();
    };
    for_each_unit<Traits::kKStages>(
        next_unit, s.k_empty, s.k_sync,
        [&](const WorkItem& item, bool) {
          // The previous item's last S GEMM must have read Q; its remaining blocks and output store still run.
          s.q_empty->wait((items & 1) ^ 1);
          load(p.q_video, &p.q_text, p.q, item.q, item.batch, item.head, s.q, s.q_full);
          ++items;
        },
        [&](const Block& kb, const UnitWork& uw, int32_t text_len, int stage, uint32_t parity, bool last) {
          s.k_empty[stage].wait(parity);
          // The consumers read the record after k_full completes; the arrive below releases this store.
          if constexpr (Traits::kQueryRuns)
            s.info[stage] = kb.run() ? describe_key_run(kb, last) : describe(p, uw.item, kb, text_len, last);
          else
            s.info[stage] = describe(p, uw.item, kb, text_len, last);
          if (TILEWISE_HOPPER_ABLATE & 32) {
            s.k_full[stage].arrive();
            return;
          }
          load(p.k_video, &p.k_text, p.k, kb, uw.item.batch, uw.item.head / p.kv_group, s.k(stage),
               &s.k_full[stage], !uw.shared || rank == 0, uw.shared, rows_map(false));
        });
  }

  /// The V loader (warp 1): walks the same units (read from the scheduler's ring, like a consumer) and blocks, so
  /// a V stage that is released late never holds back the next K load. In a shared unit the last CTA multicasts V.
  __device__ void run_values() const {
    WorkRing<typename Traits::Shared, kCluster> ring{s, rank};
    auto next_unit = [&] { return ring.consume(); };
    for_each_unit<Traits::kVStages>(
        next_unit, s.v_empty, s.v_sync, [](const WorkItem&, bool) {},
        [&](const Block& kb, const UnitWork& uw, int32_t, int stage, uint32_t parity, bool) {
          s.v_empty[stage].wait(parity);
          zero_tail(kb, s.v(stage));
          if (TILEWISE_HOPPER_ABLATE & 16) {
            s.v_full[stage].arrive();
            return;
          }
          load(p.v_video, &p.v_text, p.v, kb, uw.item.batch, uw.item.head / p.kv_group, s.v(stage),
               &s.v_full[stage], !uw.shared || rank == kCluster - 1, uw.shared, rows_map(true));
        });
  }
};

}  // namespace tilewise::hopper
