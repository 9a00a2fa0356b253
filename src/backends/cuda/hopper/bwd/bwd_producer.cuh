// The backward kernels' producer: the forward's Producer (TMA loads, tail zeroing, the unit walk) with the
// backward's roles (bwd_params.cuh). Thread 0 takes work, loads the two owned blocks of an item and streams the
// K-ring tensor; thread 32 streams the V-ring tensor over the same blocks.
//  * dQ kernel: the forward's walk (a query block's key blocks, then the valid text keys). K's tail rows are zeroed
//    as V's are: dS is zero there, and 0 * NaN would not be.
//  * dK/dV kernel: per owned key block, each query head of its GQA group, and per head the query tiles that see
//    the key tile (query_boxes or the transposed block list: the reverse question) and then every text row
//    (padding rows too: text queries see every video key and every valid text key). Each streamed Q block comes
//    with its rows' statistics (one descriptor TMA beside the K stage, BwdParams::stats_map).
#pragma once

#include "backends/cuda/hopper/bwd/bwd_preprocess.cuh"
#include "backends/cuda/hopper/mainloop_producer.cuh"

namespace tilewise::hopper {

/// The L2 eviction policies of one walker's loads (TILEWISE_HOPPER_BWD_L2_HINTS, bwd_params.cuh): a null policy
/// where the bit is off, so that the plain TMA forms are issued (and no createpolicy).
struct BwdL2Hints {
  static constexpr int kBits = TILEWISE_HOPPER_BWD_L2_HINTS;
  uint64_t last = 0, first = 0;
  __device__ __forceinline__ BwdL2Hints() {
    if constexpr ((kBits & 3) != 0) last = l2_policy_evict_last();
    if constexpr ((kBits & 4) != 0) first = l2_policy_evict_first();
  }
  __device__ __forceinline__ const uint64_t* streamed() const { return (kBits & 1) ? &last : nullptr; }
  __device__ __forceinline__ const uint64_t* owned() const { return (kBits & 4) ? &first : nullptr; }
  __device__ __forceinline__ const uint64_t* reduced() const { return (kBits & 2) ? &last : nullptr; }
};

template <class Traits>
struct BwdProducer {
  const BwdParams& p;
  const typename Traits::Shared& s;

  __device__ __forceinline__ Producer<Traits> base() const { return Producer<Traits>{p, s, 0}; }

  /// Owned blocks of an item: both land on q_full (initialised for two arrivals), once the previous item's
  /// consumers have released them.
  __device__ __forceinline__ void load_owned(const WorkItem& item, uint32_t& items, const BwdL2Hints& hints) const {
    s.q_empty->wait((items & 1) ^ 1);
    base().load(p.q_video, &p.q_text, p.q, item.q, item.batch, item.head, s.q, s.q_full, true, false, hints.owned());
    base().load(p.o_video, &p.o_text, p.o, item.q, item.batch, item.head, s.o(), s.q_full, true, false,
                hints.owned());
    ++items;
  }

  // ---------------------------------------------------------------- dQ kernel
  __device__ void dq_keys() const {
    uint32_t items = 0;
    const BwdL2Hints hints;
    WorkRing<typename Traits::Shared, 1> ring{s, 0};
    auto next_unit = [&] { return ring.produce(p.work_counter, p.num_work); };
    base().template for_each_unit<Traits::kKStages>(
        next_unit, s.k_empty, s.k_sync,
        [&](const WorkItem& item, bool) { load_owned(item, items, hints); },
        [&](const Block& kb, const UnitWork& uw, int32_t text_len, int stage, uint32_t parity, bool last) {
          s.k_empty[stage].wait(parity);
          s.info[stage] = describe(p, uw.item, kb, text_len, last);
          base().zero_tail(kb, s.k(stage));
          if (TILEWISE_HOPPER_BWD_ABLATE & 8) {  // measurement only (bwd_consumer.cuh)
            s.k_full[stage].arrive();
            return;
          }
          base().load(p.k_video, &p.k_text, p.k, kb, uw.item.batch, uw.item.head / p.kv_group, s.k(stage),
                      &s.k_full[stage]);
        });
  }
  __device__ void dq_values() const { base().run_values(); }

  // ---------------------------------------------------------------- dK/dV kernel
  /// Whether query head h streams any block past the owned key block of `item`.
  __device__ __forceinline__ bool streams(const WorkItem& item, int32_t h) const {
    if (p.map.seq.text_capacity > 0 || item.q.text || p.kind != PatternKind::block_list) return true;
    const int32_t i = h * p.map.grid.num_tiles() + p.map.grid.tile_index(item.q.tile);
    return p.query_offsets[i + 1] > p.query_offsets[i];  // a block list may leave a key tile unseen
  }

  /// f(block, query head, index of the head in its group, last) for every streamed block of an owned key block,
  /// or f(_, _, _, true) once with `empty` set when there is none (the consumers then write zero gradients).
  template <class F>
  __device__ __forceinline__ void for_each_stream_block(const WorkItem& item, F&& f) const {
    const Grid& g = p.map.grid;
    int32_t last_head = -1;
    for (int32_t gi = 0; gi < p.kv_group; ++gi)
      if (streams(item, item.head * p.kv_group + gi)) last_head = gi;
    if (last_head < 0) {
      f(Block{}, 0, 0, true, true);
      return;
    }
    for (int32_t gi = 0; gi <= last_head; ++gi) {
      const int32_t h = item.head * p.kv_group + gi;
      KeyBlockCursorT<Traits::kStreamRows> cursor(p, static_cast<int32_t>(p.map.seq.text_capacity));
      if (item.q.text || p.kind == PatternKind::dense) {
        cursor.start_boxes(KeyBlockCursor::all_tiles(g));
      } else if (p.kind == PatternKind::block_list) {
        const int32_t i = h * g.num_tiles() + g.tile_index(item.q.tile);
        cursor.start_list(p.query_list, p.query_offsets[i], p.query_offsets[i + 1]);
      } else {
        cursor.start_boxes(query_boxes<int32_t>(p.kind, p.heads[h], g, item.q.tile));
      }
      for (Block qb; cursor.next(qb);) f(qb, h, gi, gi == last_head && cursor.done(), false);
    }
  }

  /// The consumers' record of a streamed query block: last, empty, text, its class and origin (for the frame
  /// mask), and its query head within the group.
  __device__ __forceinline__ BlockInfo describe_stream(const WorkItem& item, const Block& qb, int32_t h, int32_t gi,
                                                       bool last, bool empty) const {
    BlockInfo bi{(last ? BlockInfo::kLast : 0u) | (empty ? BlockInfo::kEmpty : 0u) |
                     (static_cast<uint32_t>(gi) << BlockInfo::kHeadShift),
                 0, 0, 0};
    if (empty) return bi;
    if (qb.text) {
      bi.flags |= BlockInfo::kText;
      bi.t = qb.row0;
      return bi;
    }
    const D3 o = qb.origin(p);
    bi.flags |= static_cast<uint32_t>(qb.cls) << BlockInfo::kClassShift;
    bi.t = o.t, bi.h = o.h, bi.w = o.w;
    if (!item.q.text && p.kind == PatternKind::attention_tile &&
        block_kind<int32_t>(p.kind, p.heads[h], p.map.grid, qb.tile, item.q.tile) == BlockKind::masked)
      bi.flags |= BlockInfo::kFrames;
    return bi;
  }

  __device__ void dkdv_keys() const {
    uint32_t items = 0;
    const BwdL2Hints hints;
    PipeState<Traits::kKStages> pipe;
    WorkRing<typename Traits::Shared, 1> ring{s, 0};
    for (int32_t u; (u = ring.produce(p.work_counter, p.num_work)) < p.num_work;) {
      const WorkItem item = decode_work<Traits::kBlockM, TILEWISE_HOPPER_BWD_HEAVY_FIRST != 0>(p, u, p.kv_heads);
      if (item.empty) continue;
      load_owned(item, items, hints);
      for_each_stream_block(item, [&](const Block& qb, int32_t h, int32_t gi, bool last, bool empty) {
        const int stage = pipe.stage();
        s.k_empty[stage].wait(pipe.phase() ^ 1);
        s.info[stage] = describe_stream(item, qb, h, gi, last, empty);
        if (empty || (TILEWISE_HOPPER_BWD_ABLATE & 8)) {
          s.k_full[stage].arrive();
        } else {
          base().zero_tail(qb, s.k(stage));
          // The statistics first, announced without an arrival, so the phase cannot complete before the Q load's
          // arrive_expect_tx has counted its bytes too.
          const int64_t entry = (int64_t{p.batch_base + item.batch} * p.q_heads + h) * p.stats_entries +
                                stats_entry<Traits::kStreamRows>(p, qb);
          s.k_full[stage].expect_tx(Traits::kStatsBytes);
          tma_load(s.stats(stage), &p.stats_map, &s.k_full[stage], 0, static_cast<int32_t>(entry * kStatsRows), 0,
                   0, 0, hints.streamed());
          base().load(p.k_video, &p.k_text, p.k, qb, item.batch, h, s.k(stage), &s.k_full[stage], true, false,
                      hints.streamed());
        }
        pipe.advance();
      });
    }
  }

  /// dkdvq_reduce (thread 64): walks the same items and streamed blocks as the loaders and, once the consumers
  /// have put a block's dQ into the staging buffer, adds it into the fp32 accumulator with TMA reductions (one per
  /// 32-column panel, through the block's box: rows outside the latent or the text are clipped), then frees the
  /// buffer once they have read it. The reduction leaves the consumers' path entirely.
  __device__ void dq_reducer() const {
    if constexpr (Traits::kDqStaging) {
      const BwdL2Hints hints;
      uint32_t m = 0;  // streamed blocks so far (the consumers number them alike)
      WorkRing<typename Traits::Shared, 1> ring{s, 0};
      for (int32_t u; (u = ring.consume()) < p.num_work;) {
        const WorkItem item = decode_work<Traits::kBlockM, TILEWISE_HOPPER_BWD_HEAVY_FIRST != 0>(p, u, p.kv_heads);
        if (item.empty) continue;
        for_each_stream_block(item, [&](const Block& qb, int32_t h, int32_t, bool, bool empty) {
          if (empty) return;
          s.dq_full->wait(m & 1);
          const int c4 = p.dq_view.c4(item.batch, h);
          const D3 o = qb.tma_origin(p);
#pragma unroll
          for (int panel = 0; panel < ((TILEWISE_HOPPER_BWD_ABLATE & 128) ? 0 : Traits::D / 32); ++panel) {
            const int c0 = p.dq_view.c0(h, panel * 32);
            const uint8_t* src = s.dq_stage() + panel * Traits::kDqPanelBytes;
            if (qb.text)
              tma_reduce_add(&p.dq_text, src, c0, qb.row0, 0, 0, c4, hints.reduced());
            else
              tma_reduce_add(&p.dq_video[qb.cls], src, c0, static_cast<int>(o.w), static_cast<int>(o.h),
                             static_cast<int>(o.t), c4, hints.reduced());
          }
          tma_store_commit();
          tma_store_wait_read();
          s.dq_empty[m & 1].arrive();
          ++m;
        });
      }
      tma_store_wait_all();  // every reduction complete before the CTA retires
    }
  }

  __device__ void dkdv_values() const {
    const BwdL2Hints hints;
    PipeState<Traits::kVStages> pipe;
    WorkRing<typename Traits::Shared, 1> ring{s, 0};
    for (int32_t u; (u = ring.consume()) < p.num_work;) {
      const WorkItem item = decode_work<Traits::kBlockM, TILEWISE_HOPPER_BWD_HEAVY_FIRST != 0>(p, u, p.kv_heads);
      if (item.empty) continue;
      for_each_stream_block(item, [&](const Block& qb, int32_t h, int32_t, bool, bool empty) {
        const int stage = pipe.stage();
        s.v_empty[stage].wait(pipe.phase() ^ 1);
        if (empty || (TILEWISE_HOPPER_BWD_ABLATE & 8)) {
          s.v_full[stage].arrive();
        } else {
          base().zero_tail(qb, s.v(stage));
          base().load(p.v_video, &p.v_text, p.v, qb, item.batch, h, s.v(stage), &s.v_full[stage], true, false,
                      hints.streamed());
        }
        pipe.advance();
      });
    }
  }
};

}  // namespace tilewise::hopper
