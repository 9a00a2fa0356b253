// Parameters of the Hopper backward kernels. Both are built from the forward's parts (producer, tile scheduler,
// key-block cursor, masks, pipelines), so their parameters extend the forward's, whose four tensor roles they
// fill differently:
//
// Two arrangements (chosen at plan time, hopper_backend.cu): by default the fused kernel on 64-row streamed blocks
// whose dQ a producer thread adds into an fp32 accumulator by TMA reduction (dkdvq_reduce, "the reduce kernel": five
// GEMMs per block, no lockstep between the warpgroups; docs/performance.md backward v3.7 and v3.13); deterministic
// runs take the dQ kernel (S, dP and dS are recomputed: seven GEMMs per block pair, no atomics, bitwise
// reproducible) and the dK/dV kernel. A third, one fused kernel adding dQ = dS K with per-lane atomics in lockstep,
// measured slower (v1-v3.6) and was removed in v3.16.
//
//   role (FwdParams maps)    | dQ kernel (per query block) | dK/dV kernel (per key block, all GQA query heads)
//   q: owned, first operand  | Q                           | K
//   o: owned, second operand | dO                          | V
//   k: streamed, K ring      | K                           | Q (+ its rows' statistics, `stats`)
//   v: streamed, V ring      | V                           | dO
//
// Owned blocks are the tile class's query box (`qbox`, up to 128 rows), streamed ones its key box (`box`).
#pragma once

#include <cstdint>

#include "backends/cuda/hopper/params.cuh"
#include "tilewise/tilewise.hpp"

// The consumers issue S and dP (S^T and dP^T) in separate commit groups, so that P is computed while dP still runs,
// and in dK/dV issue dV (which needs only P) before dS is computed (v3.1: row 1 86.41 -> 85.08 ms). Measured and
// removed in the eleventh session, with the other switches that had stayed off (docs/performance.md backward
// v3.16 lists them and the commit that still has them): the warpgroups taking turns to issue their GEMMs, the
// uniform-descriptor, all-seen and stmatrix switches' older code, 8-byte dQ atomics, L2 eviction hints.
// The dK/dV kernels take their video items heaviest first (FwdParams::video_order, filled at plan time from
// Plan::num_query_tiles). Default since v3.2 (row 1 84.52 -> 84.01 ms; 25/25 backward GPU tests and the fuzz on
// the H200): a key tile's load varies 10x, so the light items fill the tail instead of a heavy one arriving last.
#ifndef TILEWISE_HOPPER_BWD_HEAVY_FIRST
#define TILEWISE_HOPPER_BWD_HEAVY_FIRST 1
#endif
// Which order the host gives those items (cuda::dkdv_item_order in backends/cuda/dkdv_order.hpp, as a DkdvOrder;
// docs/performance.md backward v3.12): 0 (default) = every head's heaviest tiles first (v3.2); 1 = each kv head's
// tiles with the tile grid's largest axis slowest and only the last kv head's heaviest first, which an L2 model
// preferred (18% -> 2% misses) but the H200 did not: row 1 +1.9 to +2.1% (L2 hit rate 82% -> 77%), Wan 21x45x80
// -2.3%, the other rows within 0.5%; 2 = the same with each kv head's tiles in raster order (row 1 +2.5%, Wan +1.4%);
// 3 = heaviest first within groups of TILEWISE_HOPPER_BWD_HEAD_GROUP kv heads, one group after the other (v3.18:
// not yet measured; row 1 took 3.1% more cycles per block than the whole grid with 24 heads, 0.7% with 4).
// Plans that suit the sweep (cuda::sweep_suits: no key tile seen from more than four query tile columns) take
// DkdvOrder::sweep_centred instead, with the kernels walking each item's query tiles w slowest (FwdParams::
// walk_width_slowest; docs/performance.md backward v3.26: Wan -3.2 to -4.2%, 33x45x80 -2.8%, row 1 equal; v3.36,
// its items centred on their columns: row 1 -3.4% more).
#ifndef TILEWISE_HOPPER_BWD_ITEM_ORDER
#define TILEWISE_HOPPER_BWD_ITEM_ORDER 0
#endif
#ifndef TILEWISE_HOPPER_BWD_HEAD_GROUP
#define TILEWISE_HOPPER_BWD_HEAD_GROUP 4
#endif
// Rows of the dK/dV kernel's streamed query blocks (and its K and V ring stages): 128 (the forward's key blocks,
// two 64-query halves per stage), or 64 (boxes of at most 64 rows per tile class, one half per stage; the host asks
// backward.cu for the value, hopper::dkdv_stream_rows). 64 is the first step towards a fused kernel whose shared
// memory holds two dO stages, a double-buffered dS and a dQ staging buffer at D 128 (docs/performance.md, the plan
// after v3.4). Not yet run on a GPU: 128 until it has passed the backward tests and the fuzz there.
#ifndef TILEWISE_HOPPER_BWD_STREAM_ROWS
#define TILEWISE_HOPPER_BWD_STREAM_ROWS 128
#endif
// The reduce kernel's block loop at D 96 (docs/performance.md backward v3.8-v3.10): 1 (default) =
// BwdConsumer::reduce_item (the dK wait deferred behind the previous block's dQ product on a warpgroup's dQ turn),
// 0 = dkdv_item's loop (every block's GEMMs waited for at its end). Open-Sora-Plan D 96 121.9 -> 116.3 ms with the
// owned K below (v3.10; either alone -1% to -2%). At D 64 it gains nothing once the owned K and V are in registers
// (CogVideoX 24.84 -> 24.87 ms), so D 64 keeps level 0; at D 128 it does not fit (see reduce_item). Its two dq NaN
// failures (v3.8, v3.9) were the fused kernels' uninitialised owned rows, fixed since (test CudaBackwardLeftovers).
#ifndef TILEWISE_HOPPER_BWD_REDUCE_OVERLAP
#define TILEWISE_HOPPER_BWD_REDUCE_OVERLAP 1
#endif
// Where dkdv_item (the reduce kernel at D 64 and 128) issues a block's S^T and dP^T, as a mask of head dims (1: D 64,
// 2: D 96, which reduce_item runs instead, 4: D 128): as soon as the block's stages are full, its record (BlockInfo)
// read while they run (an item with no streamed block is known beforehand: streams_any), or only once the record has
// been read. The eleventh session's stall sampling put 14% of the D 128 consumers' samples between the stage wait and
// the first wgmma; issuing first measured +1.0% on row 1, +1.3% on Wan, -0.9% on CogVideoX D 64 alone and -2.8% there
// with the two orders v3.17 made the default (docs/performance.md backward v3.17).
#ifndef TILEWISE_HOPPER_BWD_ISSUE_FIRST
#define TILEWISE_HOPPER_BWD_ISSUE_FIRST 1
#endif
// The reduce kernel's S^T = K Q^T and dP^T = V dO^T at D 64 (docs/performance.md backward v3.9): 1 (default) = the
// owned K and V rows of a warpgroup held in registers as the A operand (RS wgmma; loaded once per item with ldmatrix,
// 16 registers each), so that per block only the streamed Q and dO are read from shared memory; 0 = both operands
// from shared memory (SS). Those m64n64 SS products read 4 KB per 131 kFLOP, near all of shared memory's bandwidth
// at the tensor rate: CogVideoX's backward 26.47 -> 24.46 ms with it (the D 64 GPU tests and the fuzz pass). At
// D 128 the registers are not there (dK, dV and S^T, dP^T already hold 192); D 96: the next switch.
#ifndef TILEWISE_HOPPER_BWD_OWNED_IN_REGS
#define TILEWISE_HOPPER_BWD_OWNED_IN_REGS 1
#endif
// The same at D 96 for K alone (24 registers; with V too ptxas serialises the wgmmas for registers, as at D 128 with
// K alone): S^T reads only Q from shared memory, 24 of the block's ~272 KB fewer. 1 (default): Open-Sora-Plan D 96
// 121.0 ms alone, 116.3 with the deferred dK wait, against 121.9 (docs/performance.md backward v3.10).
#ifndef TILEWISE_HOPPER_BWD_OWNED_K_D96
#define TILEWISE_HOPPER_BWD_OWNED_K_D96 1
#endif
// The reduce kernel's fp32 dQ staging stores (BwdConsumer::stage_dq; docs/performance.md backward v3.12): the lanes
// of odd accumulator rows may store column group g ^ 2 of a 32-column panel while the others store g, so that each
// half-warp of an 8-byte store covers 8 distinct 16-byte chunks of the 128-byte swizzle: 2 wavefronts per store
// instead of 4 (scripts/smem_store_patterns.cu), for 64 selects per thread and block. 2 (default since v3.14) = every
// head dim: at D 128 it measured +1.7% on row 1 in v3.12, but -0.4 to -0.6% on row 1, + text and Wan once the three
// v3.13 switches had changed the D 128 kernel's registers (v3.14); 1 = at D 64 and 96 only (CogVideoX -1.3%,
// Open-Sora-Plan -0.6% in v3.12); 0 = none. The same elements land in the same places either way.
#ifndef TILEWISE_HOPPER_BWD_STAGE_PERMUTE
#define TILEWISE_HOPPER_BWD_STAGE_PERMUTE 2
#endif
// The gradients' stores from registers (BwdConsumer::store: dK and dV at each dK/dV item's end, dQ in the dQ
// kernel), a mask of head dims (1 D 64, 2 D 96, 4 D 128): the four lanes of a quad exchange their 4-byte words (two
// shuffle rounds) so that each stores 16 contiguous bytes of a row, a quarter of the store instructions and of the
// 128-byte lines each touches, where the tensor's base and strides allow 16-byte stores (else the 4-byte stores).
// 4 (default, v3.23): row 1 -0.4 to -0.7%, Wan -0.2 to -0.4% (all of the stores, ablation bit 2048: -1.2%); at D 64
// CogVideoX measured +1.9% and at D 96 Open-Sora-Plan +0.6%, so those keep the 4-byte stores.
#ifndef TILEWISE_HOPPER_BWD_WIDE_STORES
#define TILEWISE_HOPPER_BWD_WIDE_STORES 4
#endif
// Whether the reduce kernel's dK/dV stores at an item's end wait until both warpgroups have freed the owned blocks
// (q_empty, after the item's last dQ turn), a mask of head dims as above. v3.28's timeline: that turn's staging took
// 2.9k cycles against 0.8k inside the loop, and its wait for the staging buffer 3.8k, while the other warpgroup's
// global stores were in flight, and q_empty (so the next item's owned loads) waits for that turn. 4 (default, v3.28):
// 33x45x80 -0.8%, Wan -0.7%, + text -0.3%, row 1 equal (one process); not measured at D 64 (D 96 runs reduce_item).
#ifndef TILEWISE_HOPPER_BWD_STORES_AFTER_LAST_DQ
#define TILEWISE_HOPPER_BWD_STORES_AFTER_LAST_DQ 4
#endif
// The reduce kernel's dK / dV stores at an item's end (BwdConsumer::store_staged), a mask of head dims as above: 4
// (default, v3.29) = at D 128 the dK rows are staged in the dS^T ring and the dV rows in the dQ staging buffer (both
// free once the item's last dQ turn is done and read out) and written out by bulk copies of the async proxy, so that
// the consumers do not wait for the stores (one process: 33x45x80 -0.6 to -0.7%, Wan -0.5 to -0.9%, row 1 and + text
// equal; docs/performance.md backward v3.29); 0 = from registers (BwdConsumer::store).
#ifndef TILEWISE_HOPPER_BWD_TMA_STORES
#define TILEWISE_HOPPER_BWD_TMA_STORES 4
#endif
// The reduce kernel's dQ accumulator in block order, per head dim (a bit mask: 1 = D 64, 2 = D 96, 4 = D 128): per
// (batch, query head, streamed block entry as the statistics number them) 64 x D fp32 in the dQ staging buffer's
// layout (32-column panels of 128-byte rows, 128-byte swizzle), so that the reducer adds a block by one bulk reduction
// of the staging buffer's bytes (no tensor map, no clipping) instead of a tensor reduction per 32-column panel;
// dq_from_block_accumulator converts it. A clear bit keeps [B, S, Hq, D] through the blocks' boxes. The bulk form
// lets the loads queue less behind the reductions in the SM's TMA unit (1.5k against 4.3k cycles per 16 KB load in
// scripts/dq_reduce_probe.cu): row 1 -0.8%, the whole grid -2.6%, Wan -2.1%, Open-Sora-Plan (D 96) -0.5%, but
// CogVideoX (D 64) +1.0% (docs/performance.md backward v3.30), hence 6 by default. A macro of backward.cu: the host
// asks the build (hopper::dq_block_order).
#ifndef TILEWISE_HOPPER_BWD_DQ_BLOCK_ORDER
#define TILEWISE_HOPPER_BWD_DQ_BLOCK_ORDER 6
#endif
// CTAs per cluster of the reduce kernel at D 128 (BwdKernel::dkdvq_reduce_cluster; docs/performance.md backward
// v3.14): with 3, the three CTAs of a cluster own the three 128-key blocks of one 384-token tile (or three text
// blocks of one head), which stream the same query blocks in the same order; each Q block (with its statistics) and
// each dO block is then read from L2 once and multicast into all three, instead of three times. The host takes it
// where every tile has three owned slots and TILEWISE_BACKWARD_CLUSTER=1 is set (hopper_backend.cu). Correct (the
// backward GPU tests and the fuzz pass on it) but slower: the H200 holds only 39 clusters of three (117 of its 132
// SMs), and sharing the loads cut the L2's read traffic by 58% without cutting DRAM traffic (row 1 78.5 -> 84.8 ms,
// docs/performance.md backward v3.14; v3.23: 73.8 -> 81.9 ms, and 78.3 with the reductions left to the first CTA, ablation
// bit 4096). 0 (default) = not built; 3 builds it (kernel_variants.py).
#ifndef TILEWISE_HOPPER_BWD_CLUSTER
#define TILEWISE_HOPPER_BWD_CLUSTER 0
#endif
// Where the dK/dV consumers find their owned rows' positions, frames and whether any query sees them
// (docs/performance.md backward v3.20): 1 (default) = in a record that the producer's fourth warp (idle before)
// writes into shared memory per item while the previous item runs (BwdProducer::row_records), so that the consumers'
// item start is one shared load per row instead of chains of divisions and indexed parameter loads (v3.19's stall
// sampling: the item boundary is ~19k cycles, most of it the consumers' once-per-item code); 0 = computed by every
// consumer thread at the item's start (v3.19). Clusters and D 96 keep 0 (uses_row_records).
#ifndef TILEWISE_HOPPER_BWD_ROW_RECORD
#define TILEWISE_HOPPER_BWD_ROW_RECORD 1
#endif
// Which loader of the dK/dV kernels brings a streamed block's statistics (lse2 and D, one TMA): 0 the Q loader, with
// the Q block on the K stage; 1 the dO loader, with the dO block on the V stage (stats_with_output_grads); -1
// (default) by head dim: the dO loader at D 64 only. The Q loader is the producer with the least slack (v3.19: 721
// instructions per block at 24 registers, k_empty retried 1.7 times per block against the dO loader's v_empty 31), and
// the consumers wait for both stages before they read the statistics anyway. Measured (v3.20, one process): CogVideoX
// D 64 -0.9%; row 1 equal, + text, Wan, Open-Sora-Plan D 96 +0.2 to +0.4%.
#ifndef TILEWISE_HOPPER_BWD_STATS_WITH_DO
#define TILEWISE_HOPPER_BWD_STATS_WITH_DO -1
#endif
// Measurement only (results are wrong): bit 1 skips the elementwise work, bit 2 the S and dP GEMMs, bit 4 the
// accumulating GEMMs (dQ, or dV and dK), bit 8 the streamed loads; in the reduce kernel bit 32 skips the dQ
// product, bit 128 the dQ TMA reductions, bit 1024 the dQ staging stores but one per thread (v3.22: -8.5% on row 1).
// Timing what is left shows what bounds a loop. At the dK/dV kernels' item boundary (docs/performance.md backward
// v3.19): bit 256 loads the owned K and V of a CTA's first item only (later items reuse what is there), bit 512
// frees them before the item's last dQ product (dkdv_item: D 64 and 128). In clusters (TILEWISE_HOPPER_BWD_CLUSTER),
// bit 4096 leaves the dQ reductions to the cluster's first CTA: what summing the partials in distributed shared
// memory could save at most (v3.23). Bit 8192 replaces every exponential of P^T by its argument (v3.25: what MUFU
// costs the chain; row 1 -1.0%, so the exponentials are not what it waits for). Bit 16384 (hopper_backend.cu) skips
// the dQ accumulator's zeroing and dq's conversion: what folding both into the main kernel could save at most. Bit
// 32768 (hopper_backend.cu) schedules no text key items in the reduce kernel (their dK, dV and dQ parts missing):
// what those items cost (docs/performance.md backward v3.33). Bit 65536: a video item's text query blocks load no
// bytes and add no dQ (block-order accumulators: D 96, 128), their GEMMs and softmax kept: what their memory side
// costs the video items (v3.33: their blocks ran 5.6% slower on + text than on row 1). Bit 131072: every block-order
// dQ reduction of a CTA into one 64-row slot of its own (132 x 32 KB at D 128, resident in the L2): the reductions'
// L2 work without the accumulator's DRAM traffic (docs/performance.md, backward v3.35).
// (Skipping the dK and dV stores outright is no ablation: ptxas then drops some of their wgmmas. Bit 2048 stores
// them only where a run-time test that never holds says so, which keeps the wgmmas: what the stores cost.)
#ifndef TILEWISE_HOPPER_BWD_ABLATE
#define TILEWISE_HOPPER_BWD_ABLATE 0
#endif

namespace tilewise::hopper {

/// The backward's kernels: dQ alone and dK/dV alone (the deterministic arrangement), or dK/dV on 64-row streamed
/// blocks with dQ added by TMA reductions (the reduce kernel, the default).
/// dkdvq_reduce_cluster: the reduce kernel in clusters of TILEWISE_HOPPER_BWD_CLUSTER CTAs that share their streamed
/// blocks (decode_tile_unit, tile_scheduler.cuh).
enum class BwdKernel { dq, dkdv, dkdvq_reduce, dkdvq_reduce_cluster };
/// Whether the reduce kernel at head dim `d` keeps its dQ accumulator in block order
/// (TILEWISE_HOPPER_BWD_DQ_BLOCK_ORDER).
constexpr bool dq_block_order_at(int d) { return ((TILEWISE_HOPPER_BWD_DQ_BLOCK_ORDER >> (d / 32 - 2)) & 1) != 0; }
/// Whether a kernel adds dQ through the staging buffer and TMA reductions (the reduce kernel, in clusters or not).
constexpr bool reduces_dq(BwdKernel k) { return k == BwdKernel::dkdvq_reduce || k == BwdKernel::dkdvq_reduce_cluster; }
/// An owned row of a dK/dV item, as the producer's record warp writes it (Shared::row_record): its sequence
/// position (-1: not a real token) and its frame, whose top bit says that no query sees the row (text past the
/// valid length, or not a real token). Frames and positions are below 2^30 on CUDA (hopper_backend.cu).
struct RowRecord {
  int32_t pos;
  int32_t frame_unseen;
  static constexpr int32_t kUnseen = INT32_MIN;
};
/// Whether a kernel's items come with row records (TILEWISE_HOPPER_BWD_ROW_RECORD): the dK/dV kernels outside
/// clusters, at D 64 and 128. D 96 keeps v3.19's per-thread rows: with records its reduce kernel measured 0.8% slower
/// on Open-Sora-Plan (v3.20: 107.13 / 107.32 ms against 106.33 / 106.42; D 128 and 64 gained 2.5-3.2%).
constexpr bool uses_row_records(BwdKernel k, int cluster, int head_dim) {
  return TILEWISE_HOPPER_BWD_ROW_RECORD != 0 && k != BwdKernel::dq && cluster == 1 && head_dim != 96;
}

/// Whether the dK/dV kernels' dO loader brings each streamed block's statistics (TILEWISE_HOPPER_BWD_STATS_WITH_DO)
/// onto the V stage instead of the Q loader onto the K stage: outside clusters, where both rings have one depth (both
/// pipes then advance together, one stage each per streamed block, so the block's K and V stages share an index).
constexpr bool stats_with_output_grads(int cluster, int k_stages, int v_stages, int head_dim) {
  const bool by_dim = TILEWISE_HOPPER_BWD_STATS_WITH_DO < 0 ? head_dim == 64 : TILEWISE_HOPPER_BWD_STATS_WITH_DO != 0;
  return by_dim && cluster == 1 && k_stages == v_stages;
}

/// Whether kernel k at head dim `head_dim` is also built without the attention tile's frame pass (BwdConsumer's
/// kFrameMask = false), for plans with no frame-masked block: at D 64 the pass's presence alone cost CogVideoX's
/// backward 4.9%, though none of its blocks runs it; at D 128 it cost nothing (v3.20, call 5), so D 96 and 128 keep one
/// kernel each.
constexpr bool frame_free_kernel(int head_dim, BwdKernel k) { return head_dim == 64 && k == BwdKernel::dkdvq_reduce; }

/// CTAs per cluster of a kernel.
constexpr int bwd_cluster(BwdKernel k) {
  return k == BwdKernel::dkdvq_reduce_cluster && TILEWISE_HOPPER_BWD_CLUSTER > 1 ? TILEWISE_HOPPER_BWD_CLUSTER : 1;
}

struct BwdParams : FwdParams {
  // Gradients, written straight from registers with the element strides of the tensors they belong to.
  void* grad0 = nullptr;  // dQ kernel: dq; dK/dV kernel: dk
  void* grad1 = nullptr;  // dK/dV kernel: dv
  Strides grad0_strides, grad1_strides;
  float grad0_scale = 1.f;  // the softmax scale (dq and dk carry it; dv does not)
  float scale_log2_lse = 1.f;  // log2(e): the forward's natural-log LSE to the kernels' base 2

  const float* delta = nullptr;  // [B, Hq, S]: D_i = dO_i . o_i - dLSE_i (from the preprocess kernel)
  float* dq_accum = nullptr;     // fused dK/dV/dQ kernel: [B, Hq, S, D] fp32, zeroed before, scaled after
  // dK/dV kernel: per (batch, query head, streamed block) 3 x kBlockN floats: the rows' LSE in base 2 (+inf for
  // rows that are not real tokens, so their probabilities are exactly zero), D and sequence position, as a 2-D
  // tensor of 128-float rows (3 rows per block; bwd_preprocess.cuh writes it), so that each block's statistics come
  // with one descriptor TMA (cp.async.bulk.tensor). A raw cp.async.bulk would do the same copy, but
  // compute-sanitizer's racecheck does not see its mbarrier completion as ordering the consumers' generic reads
  // and reports false WAR hazards (found here in v3.2; the same finding in FlashAttention's SM100 backward,
  // AI/RACECHECK_TMA_HAZARD.md there), which would leave a real race in these reads undetectable.
  CUtensorMap stats_map;
  int32_t stream_slots = 1;     // streamed blocks per tile: the most key boxes any class needs
  int32_t stats_entries = 0;    // per (batch, head): tiles * stream_slots video entries, then the text blocks
  int32_t kv_heads = 1;
  const int64_t* query_offsets = nullptr;  // block lists transposed (Plan::query_tile_offsets)
  const int32_t* query_list = nullptr;
  // dkdvq_reduce (last, so that the other kernels' parameter offsets stay as they were): the accumulator as [B, S, Hq, D] fp32 seen through the streamed blocks' boxes (the Q maps'
  // geometry with 32-column fp32 panels), for cp.reduce.async.bulk.tensor.
  CUtensorMap dq_video[kTileClasses], dq_text;
  TensorView dq_view;
};

}  // namespace tilewise::hopper
