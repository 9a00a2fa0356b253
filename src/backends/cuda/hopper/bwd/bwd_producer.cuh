// The backward kernels' producer: the forward's Producer (TMA loads, tail zeroing, the unit walk) with the
// backward's roles (bwd_params.cuh). Thread 0 takes work, loads the two owned blocks of an item and streams the
// K-ring tensor; thread 32 streams the V-ring tensor over the same blocks.
//  * dQ kernel: the forward's walk (a query block's key blocks, then the valid text keys). K's tail rows are zeroed
//    as V's are: dS is zero there, and 0 * NaN would not be.
//  * dK/dV kernel: per owned key block, each query head of its GQA group, and per head the query tiles that see
//    the key tile (query_boxes or the transposed block list: the reverse question) and then every text row
//    (padding rows too: text queries see every video key and every valid text key). Each streamed Q block comes
//    with its rows' statistics (one descriptor TMA beside the K stage, BwdParams::stats_map; at D 64 beside the dO
//    block on the V stage: TILEWISE_HOPPER_BWD_STATS_WITH_DO). In the reduce kernel
//    thread 64 adds each block's dQ into the fp32 accumulator, walking the blocks too (one thread walking for all
//    three roles measured 6-28% slower: docs/performance.md backward v3.14). In clusters
//    (BwdKernel::dkdvq_reduce_cluster) the CTAs of a unit walk the same blocks; one multicasts each Q block, another
//    each dO block.
#pragma once

#include "backends/cuda/hopper/bwd/bwd_blocks.cuh"
#include "backends/cuda/hopper/bwd/bwd_preprocess.cuh"
#include "backends/cuda/hopper/bwd/bwd_trace.cuh"
#include "backends/cuda/hopper/epilogue.cuh"
#include "backends/cuda/hopper/mainloop_producer.cuh"

namespace tilewise::hopper {

template <class Traits>
struct BwdProducer {
  static constexpr int kCluster = Traits::kCluster;
  static_assert(Traits::kStatsBytes == kStatsRows * Traits::kStreamRows * 4, "a stage holds one statistics entry");
  static constexpr bool kHeavyFirst = TILEWISE_HOPPER_BWD_HEAVY_FIRST != 0;
  static constexpr bool kStatsWithDo = stats_with_output_grads(kCluster, Traits::kKStages, Traits::kVStages, Traits::D);
  const BwdParams& p;
  const typename Traits::Shared& s;
  uint32_t rank;  // within the cluster (the reduce kernel in clusters: the tile slot this CTA owns)
  mutable BwdTracer trace{};  // measurement only (bwd_trace.cuh): each producer thread's own

  __device__ __forceinline__ Producer<Traits> base() const { return Producer<Traits>{p, s, 0}; }

  /// Owned blocks of an item: both land on q_full (initialised for two arrivals), once the previous item's
  /// consumers have released them.
  /// Tried and dropped (v3.27): the owned boxes brought into the L2 (cp.async.bulk.prefetch.tensor) before the
  /// q_empty wait, ~10k cycles ahead of these loads: + text, 33x45x80 and Wan -0.4 to -0.6%, row 1 +0.3 to +0.6%.
  __device__ __forceinline__ void load_owned(const WorkItem& item, uint32_t& items) const {
    s.q_empty->wait((items & 1) ^ 1);
    trace.stamp_item(2);
    if ((TILEWISE_HOPPER_BWD_ABLATE & 256) && items > 0) {  // measurement only: no reload (bwd_params.cuh)
      s.q_full->arrive();
      s.q_full->arrive();
      ++items;
      return;
    }
    base().load(p.q_video, &p.q_text, p.q, item.q, item.batch, item.head, s.q, s.q_full);
    base().load(p.o_video, &p.o_text, p.o, item.q, item.batch, item.head, s.o(), s.q_full);
    trace.stamp_item(3);
    ++items;
  }

  // ---------------------------------------------------------------- dQ kernel
  __device__ void dq_keys() const {
    uint32_t items = 0;
    WorkRing<typename Traits::Shared, 1> ring{s, 0};
    auto next_unit = [&] { return ring.produce(p.work_counter, p.num_work); };
    base().template for_each_unit<Traits::kKStages>(
        next_unit, s.k_empty, s.k_sync,
        [&](const WorkItem& item, bool) { load_owned(item, items); },
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
  /// f(block, query head, index of the head in its group, last) for every streamed block of an owned key block,
  /// or f(_, _, _, true) once with `empty` set when there is none (the consumers then write zero gradients).
  template <class F>
  __device__ __forceinline__ void for_each_stream_block(const WorkItem& item, F&& f) const {
    const Grid& g = p.map.grid;
    const int32_t last_head = last_streaming_head(p, item);
    if (last_head < 0) {
      f(Block{}, 0, 0, true, true);
      return;
    }
    for (int32_t gi = 0; gi <= last_head; ++gi) {
      const int32_t h = item.head * p.kv_group + gi;
      KeyBlockCursorT<Traits::kStreamRows, true> cursor(p, static_cast<int32_t>(p.map.seq.text_capacity));
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

  /// The dK/dV kernels' units (their work items, or in clusters the tiles' units) and this CTA's item of unit u.
  __device__ __forceinline__ int32_t dkdv_units() const { return scheduled_units<kCluster>(p, p.kv_heads); }
  __device__ __forceinline__ WorkItem dkdv_item(int32_t u) const {
    return scheduled_item<kCluster, Traits::kBlockM, kHeavyFirst>(p, u, rank, p.kv_heads);
  }
  /// Whether this CTA issues a streamed load that all CTAs of its cluster receive (the first CTA the Q blocks and
  /// their statistics, the last the dO blocks; every CTA announces the bytes on its own barrier).
  __device__ __forceinline__ bool issues(uint32_t issuer) const { return kCluster == 1 || rank == issuer; }

  /// Producer threads besides the consumers that read the scheduler's ring (WorkRing): the dO loader and the dQ
  /// reducer (the reduce kernel).
  static constexpr int kRingReaders = 1 + (Traits::kDqStaging ? 1 : 0);

  /// Loads the Q block `qb` of query head h (and its statistics) into the next K stage, described to the consumers.
  __device__ __forceinline__ void stream_queries(const WorkItem& item, const Block& qb, int32_t h, int32_t gi,
                                                 bool last, bool empty, PipeState<Traits::kKStages>& pipe) const {
    const int stage = pipe.stage();
    trace.stamp(0);
    s.k_empty[stage].wait(pipe.phase() ^ 1);
    trace.stamp(1);
    s.info[stage] = describe_stream(item, qb, h, gi, last, empty);
    if constexpr ((TILEWISE_HOPPER_BWD_ABLATE & 65536) != 0) empty = empty || video_item_text_block(item, qb);
    if (empty || (TILEWISE_HOPPER_BWD_ABLATE & 8)) {
      s.k_full[stage].arrive();
    } else {
      base().zero_tail(qb, s.k(stage));
      trace.stamp(2);
      if constexpr (!kStatsWithDo) load_stats(item, qb, h, stage, &s.k_full[stage]);
      base().load(p.k_video, &p.k_text, p.k, qb, item.batch, h, s.k(stage), &s.k_full[stage], issues(0),
                  kCluster > 1);
    }
    trace.stamp(3);
    trace.next_block();
    pipe.advance();
  }
  /// Streamed block `qb` of query head h among every (batch, head)'s streamed blocks, as the preprocess numbers its
  /// statistics (and a block-order dQ accumulator its blocks).
  __device__ __forceinline__ int64_t stream_entry(const WorkItem& item, const Block& qb, int32_t h) const {
    return (int64_t{p.batch_base + item.batch} * p.q_heads + h) * p.stats_entries +
           stats_entry<Traits::kStreamRows>(p, qb);
  }
  /// The statistics of streamed block `qb` (query head h) into statistics stage `stage`, on barrier `full`. Issued
  /// before the block's own load and announced without an arrival, so that the phase cannot complete before that
  /// load's arrive_expect_tx has counted its bytes too.
  __device__ __forceinline__ void load_stats(const WorkItem& item, const Block& qb, int32_t h, int stage,
                                             Barrier* full) const {
    const int64_t entry = stream_entry(item, qb, h);
    full->expect_tx(Traits::kStatsBytes);
    const int32_t stats_row = static_cast<int32_t>(entry * kStatsRows);
    if constexpr (kCluster == 1)
      tma_load(s.stats(stage), &p.stats_map, full, 0, stats_row, 0, 0, 0);
    else if (rank == 0)
      tma_load_multicast(s.stats(stage), &p.stats_map, full, 0, stats_row, 0, 0, 0, (1u << kCluster) - 1);
  }
  /// Loads the dO block `qb` of query head h into the next V stage.
  __device__ __forceinline__ void stream_output_grads(const WorkItem& item, const Block& qb, int32_t h, bool empty,
                                                      PipeState<Traits::kVStages>& pipe) const {
    const int stage = pipe.stage();
    trace.stamp(0);
    s.v_empty[stage].wait(pipe.phase() ^ 1);
    trace.stamp(1);
    if constexpr ((TILEWISE_HOPPER_BWD_ABLATE & 65536) != 0) empty = empty || video_item_text_block(item, qb);
    if (empty || (TILEWISE_HOPPER_BWD_ABLATE & 8)) {
      s.v_full[stage].arrive();
    } else {
      base().zero_tail(qb, s.v(stage));
      trace.stamp(2);
      if constexpr (kStatsWithDo) load_stats(item, qb, h, stage, &s.v_full[stage]);
      base().load(p.v_video, &p.v_text, p.v, qb, item.batch, h, s.v(stage), &s.v_full[stage],
                  issues(kCluster - 1), kCluster > 1);
    }
    trace.stamp(3);
    trace.next_block();
    pipe.advance();
  }
  /// Where the dQ reduction of streamed block `qb` goes, as f(text, tile class, c1, c2, c3): the text map at the
  /// block's first row, or its class's video map at its box's TMA origin (w, h, t); f is called in one branch per kind,
  /// so that `text` is a constant in each (reduction_map folds).
  template <class F>
  __device__ __forceinline__ void with_reduction_target(const Block& qb, F&& f) const {
    if (qb.text) {
      f(true, 0u, qb.row0, 0, 0);
    } else {
      const D3 o = qb.tma_origin(p);
      f(false, static_cast<uint32_t>(qb.cls), static_cast<int>(o.w), static_cast<int>(o.h), static_cast<int>(o.t));
    }
  }
  __device__ __forceinline__ const CUtensorMap* reduction_map(bool text, uint32_t cls) const {
    return text ? &p.dq_text : &p.dq_video[cls];
  }

  /// The Q loader (thread 0): takes units from the scheduler (the cluster's first CTA) or from the ring (the others).
  __device__ void dkdv_keys() const {
    uint32_t items = 0;
    PipeState<Traits::kKStages> pipe;
    WorkRing<typename Traits::Shared, kCluster> ring{s, rank};
    const int32_t units = dkdv_units();
    trace.start(kTraceQLoader, true);
    for (int32_t u; (trace.stamp_item(0), u = kCluster == 1 || rank == 0 ? ring.produce(p.work_counter, units)
                                                                   : ring.consume()) < units;) {
      trace.unit(u);
      trace.stamp_item(1);
      const WorkItem item = dkdv_item(u);
      // In a cluster a CTA with an empty item still takes part in its unit's stream (decode_tile_unit).
      if (item.empty && kCluster == 1) continue;
      // Owned blocks first: the item's first streamed block before them measured slower twice (v3.19 +1.3%; v3.23
      // +1.5% on row 1, +3.3% on Wan, +5% on Open-Sora-Plan).
      if (!item.empty) load_owned(item, items);
      for_each_stream_block(item, [&](const Block& qb, int32_t h, int32_t gi, bool last, bool empty) {
        stream_queries(item, qb, h, gi, last, empty, pipe);
      });
      trace.next_item();
    }
  }

  /// A video item's text query block: what ablation bit 65536 (measurement only) streams no bytes for and reduces no
  /// dQ of (their stages arrive as bit 8's do; the consumers compute on what the stages held). Its callers test the
  /// bit with `if constexpr`: a run-time test that folds to false still changed the default's machine code.
  static __device__ __forceinline__ bool video_item_text_block(const WorkItem& item, const Block& qb) {
    return qb.text && !item.q.text;
  }
  /// Measurement only (TILEWISE_HOPPER_BWD_ABLATE): bit 128 issues no dQ reductions; bit 4096 in clusters, the
  /// cluster's first CTA's alone.
  __device__ __forceinline__ bool reductions_ablated() const {
    return (TILEWISE_HOPPER_BWD_ABLATE & 128) || ((TILEWISE_HOPPER_BWD_ABLATE & 4096) && rank != 0);
  }
  /// The dQ reduction of streamed block m, once the consumers have put its dQ into the staging buffer: `issue` adds
  /// it into the fp32 accumulator; the buffer is freed once the reduction has read it.
  template <class Issue>
  __device__ __forceinline__ void reduce_block(uint32_t& m, Issue&& issue) const {
    trace.stamp(0);
    s.dq_full->wait(m & 1);
    trace.stamp(1);
    if (!reductions_ablated()) issue();
    tma_store_commit();
    trace.stamp(2);
    tma_store_wait_read();
    s.dq_empty[m & 1].arrive();
    trace.stamp(3);
    trace.next_block();
    ++m;
  }

  /// dkdvq_reduce (thread 64): adds each streamed block's dQ into the fp32 accumulator (reduce_block), in the
  /// order of the loaders' walk, which it walks too. The reduction leaves the consumers' path entirely. The
  /// accumulator is [B, S, Hq, D], reached through the block's box by one tensor reduction per 32-column panel (rows
  /// outside the latent or the text clipped), or where dq_block_order_at(D) in block order (one bulk
  /// reduction of the staging buffer's bytes as they are: no tensor map, no clipping).
  __device__ void dq_reducer() const {
    if constexpr (Traits::kDqStaging) {
      uint32_t m = 0;  // streamed blocks so far (the consumers number them alike)
      trace.start(kTraceReducer, true);
      WorkRing<typename Traits::Shared, kCluster> ring{s, rank};
      const int32_t units = dkdv_units();
      for (int32_t u; (u = ring.consume()) < units;) {
        trace.unit(u);
        const WorkItem item = dkdv_item(u);
        if (item.empty) continue;  // (in a cluster its consumers stage no dQ either)
        for_each_stream_block(item, [&](const Block& qb, int32_t h, int32_t, bool, bool empty) {
          if (empty) return;
          if constexpr (dq_block_order_at(Traits::D)) {
            float* to = p.dq_accum + stream_entry(item, qb, h) * (Traits::kStreamRows * Traits::D);
            if constexpr ((TILEWISE_HOPPER_BWD_ABLATE & 131072) != 0)  // measurement only (bwd_params.cuh)
              to = p.dq_accum + int64_t{blockIdx.x} * (Traits::kStreamRows * Traits::D);
            reduce_block(m, [&] {
              if constexpr ((TILEWISE_HOPPER_BWD_ABLATE & 65536) != 0) {
                if (video_item_text_block(item, qb)) return;
              }
              bulk_reduce_add_f32(to, s.dq_stage(), Traits::kDqStageBytes);
            });
          } else {
            with_reduction_target(qb, [&](bool text, uint32_t cls, int c1, int c2, int c3) {
              const CUtensorMap* map = reduction_map(text, cls);
              reduce_block(m, [&] {
                const int c4 = p.dq_view.c4(item.batch, h);
#pragma unroll
                for (int panel = 0; panel < Traits::D / 32; ++panel)
                  tma_reduce_add(map, s.dq_stage() + panel * Traits::kDqPanelBytes, p.dq_view.c0(h, panel * 32), c1,
                                 c2, c3, c4);
              });
            });
          }
        });
      }
      tma_store_wait_all();  // every reduction complete before the CTA retires
    }
  }

  /// The record warp (the producer warpgroup's fourth warp, TILEWISE_HOPPER_BWD_ROW_RECORD): per item, each owned
  /// row's RowRecord into the item's slot (two slots: items alternate), what every consumer thread otherwise works
  /// out at the item's start through divisions and indexed parameter loads (docs/performance.md backward v3.19-v3.20).
  /// Lane 0 reads the scheduler's ring; the lanes take rows lane, lane + 32, ...; each lane arrives on rows_full once
  /// its rows are written. It runs as soon as the Q loader has put the item into the ring, while the consumers still
  /// run the previous item's last blocks.
  __device__ void row_records() const {
    const int lane = threadIdx.x % 32;
    WorkRing<typename Traits::Shared, kCluster> ring{s, rank};
    const int32_t units = dkdv_units();
    uint32_t items = 0;
    for (int32_t u; (u = __shfl_sync(0xffffffffu, lane == 0 ? ring.consume() : 0, 0)) < units;) {
      const WorkItem item = dkdv_item(u);
      if (item.empty) continue;  // (as the consumers skip it)
      const uint32_t slot = items & 1;
      s.rows_empty[slot].wait(((items >> 1) & 1) ^ 1);
      const OwnedRowsGeometry geo(p, item);
      const Epilogue<Traits, WgType::bf16> at{p, s, 0, 0};  // (positions do not depend on the dtype)
      RowRecord* rec = reinterpret_cast<RowRecord*>(s.row_record(slot));
      for (int r = lane; r < Traits::kBlockM; r += 32) {
        const int64_t pos = at.position(item.q, r);
        const int32_t frame = geo.frame(r);
        rec[r] = RowRecord{static_cast<int32_t>(pos), geo.seen(item, r, pos) ? frame : (frame | RowRecord::kUnseen)};
      }
      s.rows_full[slot].arrive();
      ++items;
    }
  }

  /// The dO loader (thread 32): walks the same units and blocks as the Q loader.
  __device__ void dkdv_values() const {
    PipeState<Traits::kVStages> pipe;
    WorkRing<typename Traits::Shared, kCluster> ring{s, rank};
    const int32_t units = dkdv_units();
    trace.start(kTraceDoLoader, true);
    for (int32_t u; (u = ring.consume()) < units;) {
      trace.unit(u);
      const WorkItem item = dkdv_item(u);
      if (item.empty && kCluster == 1) continue;
      for_each_stream_block(item, [&](const Block& qb, int32_t h, int32_t, bool, bool empty) {
        stream_output_grads(item, qb, h, empty, pipe);
      });
    }
  }
};

}  // namespace tilewise::hopper
