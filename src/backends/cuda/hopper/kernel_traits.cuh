// Compile-time configuration of the forward kernel for one head dim, and its shared-memory layout.
#pragma once

#include "backends/cuda/hopper/params.cuh"
#include "backends/cuda/hopper/ptx.cuh"

// K and V pipeline depths at head dim 128. With 128-row work items Q, O and 2 + 2 stages take 192 KB of shared
// memory and one more stage of either fits (224 KB; measured no gain, v4.2); with 192 rows 2 + 2 take 224 KB.
#ifndef TILEWISE_HOPPER_K_STAGES_D128
#define TILEWISE_HOPPER_K_STAGES_D128 2
#endif
#ifndef TILEWISE_HOPPER_V_STAGES_D128
#define TILEWISE_HOPPER_V_STAGES_D128 2
#endif
// K and V pipeline depths of the dK/dV kernel with 64-row streamed blocks (TILEWISE_HOPPER_BWD_STREAM_ROWS=64): its
// stages are half the bytes, so 4 + 4 hold as many rows in flight as the 128-row kernel's 2 + 2 (192 KB at D 128).
#ifndef TILEWISE_HOPPER_BWD_STREAM_STAGES
#define TILEWISE_HOPPER_BWD_STREAM_STAGES 4
#endif
// The reduce kernel's (BwdKernel::dkdvq_reduce) K-ring depth at D 128 (Q blocks of 64 rows and their statistics):
// 2 (default again since v3.30). 3 fits beside two dO stages, the dS^T ring and the dQ staging buffer (3 + 3 fits too
// but spills, v3.17); it was the default in v3.29, when a Q block's load queued behind the tensor-form dQ reductions
// in the SM's TMA unit (33x45x80 -0.8%, Wan -0.4%, the whole grid +0.6%); with the block-order dQ accumulator's bulk
// reductions the loads queue less, and 2 is equal on the sparse rows and 1.5% faster on the whole grid (v3.30).
#ifndef TILEWISE_HOPPER_BWD_REDUCE_K_STAGES_D128
#define TILEWISE_HOPPER_BWD_REDUCE_K_STAGES_D128 2
#endif
// And its V-ring (dO blocks) depth at D 128. With two rows of statistics per stage 3 + 3 fits (by ~200 bytes), but
// measured 0.2-0.8% slower than 2 + 2 (docs/performance.md backward v3.17: 2328 bytes of spills).
#ifndef TILEWISE_HOPPER_BWD_REDUCE_V_STAGES_D128
#define TILEWISE_HOPPER_BWD_REDUCE_V_STAGES_D128 2
#endif
// K and V pipeline depths at head dim 64 (96 has 3 + 3, the most that fits).
#ifndef TILEWISE_HOPPER_STAGES_D64
#define TILEWISE_HOPPER_STAGES_D64 3
#endif

// Query rows per work item (and CTA) at head dim 128: 192 = three consumer warpgroups of 64 rows, so a 6x8x8 tile
// is two work items and each K/V block read from L2 serves 192 query rows instead of 128 (the loop is bound by
// that traffic, docs/performance.md v4.2); 128 = two warpgroups (kernel v4.2).
#ifndef TILEWISE_HOPPER_BLOCK_M_D128
#define TILEWISE_HOPPER_BLOCK_M_D128 192
#endif
// At head dim 64 both 128 and 192 are built, bf16 / f16 and FP8 alike, and the plan chooses (forward_rows_built,
// cuda::choose_query_rows): at D 64 the exponentials take as many cycles per block as the products, and three
// warpgroups in turn hide them far better than two where their rows are filled (HunyuanVideo w3x3x3 at D 64 -12.9%
// in bf16 and -22.8% in FP8, CogVideoX's query runs -9.7%), while 128-token tiles without runs leave the third
// warpgroup idle (+2.0% in bf16, +5.5% in FP8; docs/performance.md, "FP8: does the SM overlap the softmax with the
// products?", calls 8-10). At head dim 96, 128 (its two warpgroups overlap, v5).
#ifndef TILEWISE_HOPPER_BLOCK_M_D96
#define TILEWISE_HOPPER_BLOCK_M_D96 128
#endif

// Consumer schedule with two warpgroups: 1 = FA3-style overlap (ping-pong + intra-warpgroup), 0 = sequential,
// -1 (default) = by head dim: overlap at D 96 (3.9% faster, v5) and at D 128 with two warpgroups (1.5-5%, v3.1),
// sequential at D 64 (the overlap measured 1.3% slower, v5). Three warpgroups are always sequential: their 160
// registers cannot hold S, P and O at once.
#ifndef TILEWISE_HOPPER_OVERLAP
#define TILEWISE_HOPPER_OVERLAP -1
#endif

// Registers of the producer warpgroup (setmaxnreg); 0 = by schedule (below). The consumers get the rest.
#ifndef TILEWISE_HOPPER_PRODUCER_REGS
#define TILEWISE_HOPPER_PRODUCER_REGS 0
#endif
// The same for the backward reduce kernel by head dim (docs/performance.md backward v3.14). Its producer threads walk
// the pattern at 24 registers and spill (~2 KB, 156 local accesses per block and walker in v3.12's counters), and one
// walker doing the work of three measured 6-28% slower (v3.14; since removed), so the walk's latency is
// close to a block's: more registers shorten it, and leave fewer for the consumers. Measured (v3.14): at D 64, 72
// (consumers 216, 84 bytes of spills left) CogVideoX -1.3%: the default; at D 128, 40 (consumers 232, no spills)
// row 1 +9.6% (and the device build serialised the f16 kernel's wgmmas), at D 96, 40 Open-Sora-Plan unchanged (more
// serialises them): 24 stays there.
#ifndef TILEWISE_HOPPER_BWD_REDUCE_PRODUCER_REGS_D128
#define TILEWISE_HOPPER_BWD_REDUCE_PRODUCER_REGS_D128 24
#endif
#ifndef TILEWISE_HOPPER_BWD_REDUCE_PRODUCER_REGS_D96
#define TILEWISE_HOPPER_BWD_REDUCE_PRODUCER_REGS_D96 24
#endif
#ifndef TILEWISE_HOPPER_BWD_REDUCE_PRODUCER_REGS_D64
#define TILEWISE_HOPPER_BWD_REDUCE_PRODUCER_REGS_D64 72
#endif

// Overlapped schedule: wait for P_{j-1} V_{j-1} after the softmax of S_j (1), or before it (0: what ptxas made of
// a plain wait there, see wgmma_wait_after).
#ifndef TILEWISE_HOPPER_LATE_PV_WAIT
#define TILEWISE_HOPPER_LATE_PV_WAIT 1
#endif

// CTAs per cluster at head dim 128. With 2, the two CTAs of a cluster take two work items at a time, and when the
// items have the same key blocks (two query blocks of one tile) each K and V block is read from L2 once and
// multicast into both. With 128-row items it passed the GPU tests but measured 3-11% slower than 1
// (docs/performance.md, v4.2: the lockstep of the two CTAs costs more than the third of the L2 traffic it saves);
// with 192-row items ptxas serialises its wgmma at 160 registers (v5). So it is off.
#ifndef TILEWISE_HOPPER_CLUSTER_D128
#define TILEWISE_HOPPER_CLUSTER_D128 1
#endif

// Overlapped schedule: wait for V_{j-1} after issuing S_j (1) rather than before (0).
#ifndef TILEWISE_HOPPER_V_WAIT_AFTER_S
#define TILEWISE_HOPPER_V_WAIT_AFTER_S 1
#endif

// Query rows per work item of the FP8 forward (fp8/): 128 = two consumer warpgroups, 192 = three. At D 128 a third
// warpgroup's chain covers part of P V's exposed latency: 192 measured 21.93 -> 20.0 ms on row 1 (FP8 v6 in
// docs/performance.md). At D 64 both are built and the plan chooses (above); at D 96, 128.
#ifndef TILEWISE_HOPPER_FP8_BLOCK_M_D128
#define TILEWISE_HOPPER_FP8_BLOCK_M_D128 192
#endif
#ifndef TILEWISE_HOPPER_FP8_BLOCK_M_D96
#define TILEWISE_HOPPER_FP8_BLOCK_M_D96 128
#endif

/// The query rows per work item built for the forward kernels at head dim D (FP8 ones when `fp8`), as a set: bit 0
/// for 128 rows, bit 1 for 192. The host chooses among them per plan (cuda::choose_query_rows); the first of the set
/// is what KernelTraits takes when given no rows.
constexpr int forward_rows_built(int D, bool fp8) {
  const int rows = D == 64    ? 0
                   : D == 128 ? (fp8 ? TILEWISE_HOPPER_FP8_BLOCK_M_D128 : TILEWISE_HOPPER_BLOCK_M_D128)
                              : (fp8 ? TILEWISE_HOPPER_FP8_BLOCK_M_D96 : TILEWISE_HOPPER_BLOCK_M_D96);
  return rows == 0 ? 3 : rows == 128 ? 1 : rows == 192 ? 2 : 0;
}
/// The rows of the first entry of a forward_rows_built set.
constexpr int first_rows_built(int set) { return set & 1 ? 128 : 192; }
// K and V^T pipeline depths of the FP8 forward: its stages are half the bf16 ones' bytes.
#ifndef TILEWISE_HOPPER_FP8_STAGES
#define TILEWISE_HOPPER_FP8_STAGES 4
#endif
// The FP8 forward's row sums l: 1 = by the tensor cores (8 rows of e4m3 ones under each V^T stage, so the P V
// product's extra 8 columns are the sums of exactly the P it used), 0 = by the consumers (each code converted back
// and added: ~3 more instructions per score).
#ifndef TILEWISE_HOPPER_FP8_ONES
#define TILEWISE_HOPPER_FP8_ONES 1
#endif
// The FP8 softmax with its per-score scalings folded (Fp8Softmax::step): the row maximum taken on the raw scores and
// scaled once per row, and 448 * 2^(s f - M) computed as 2^(fma(s, f, log2 448 - M)): two instructions fewer per
// score. Default since FP8 v4 (docs/performance.md: row-1 kernel 22.88 -> 21.66 ms, CogVideoX 12.38 -> 11.54, FP8
// tests 24/24); 0 = the step exactly as the reference states it.
#ifndef TILEWISE_HOPPER_FP8_FOLD
#define TILEWISE_HOPPER_FP8_FOLD 1
#endif

// Measurement only: 1 records the FP8 consumers' timeline (fp8_consumer.cuh, scripts/fp8_trace.py).
#ifndef TILEWISE_HOPPER_FP8_TRACE
#define TILEWISE_HOPPER_FP8_TRACE 0
#endif

// Measurement only (results are wrong): bit 1 skips the softmax, bit 2 the P V GEMM, bit 4 the S GEMM, bit 8 the
// ping-pong barriers (overlapped schedule), bit 16 the V loads, bit 32 the K loads
// (in a cluster, the multicast ones). Timing what is left shows which part bounds the loop. An ablation must leave
// every result it does not remove observable: the compiler deletes work whose result feeds nothing (FP8 v6.1 in
// docs/performance.md: two ablations that also lost the exponentials and most of P V; check with cuobjdump). The
// FP8 forward also reads bit 128: no promotion of P V into O, one element still added so that P V stays live; 256: no
// exponentials (each exponent taken as its value); 512: no e4m3 conversions (each pair's bytes picked from its floats).
#ifndef TILEWISE_HOPPER_ABLATE
#define TILEWISE_HOPPER_ABLATE 0
#endif

namespace tilewise::hopper {

/// A consumer's or loader's position in a ring of kRing stages: the stage its next key block uses and, per stage,
/// the parity of that stage's full barrier for that use (its empty barrier's is the opposite). K and V have rings
/// of their own depths. One word (stage in the low byte, parities above): the consumers are short of registers.
template <int kRing>
struct PipeState {
  uint32_t bits = 0;
  __device__ __forceinline__ int stage() const { return static_cast<int>(bits & 0xffu); }
  __device__ __forceinline__ uint32_t phase_of(int st) const { return (bits >> (8 + st)) & 1; }
  __device__ __forceinline__ uint32_t phase() const { return phase_of(stage()); }
  __device__ __forceinline__ void advance() {
    const uint32_t st = bits & 0xffu;
    bits ^= 0x100u << st;                          // this stage's next use has the other parity
    bits += st + 1 == kRing ? 0u - st : 1u;        // next stage, wrapping
  }
  /// Next block in stage 0, so that the CTAs of a cluster that walked different blocks agree again on stages.
  __device__ __forceinline__ void restart() { bits &= ~0xffu; }
};

/// kOwnedRows: 0 for the forward (its query rows per work item come from the switches above); the backward's
/// kernels own 128 rows per work item (two warpgroups of 240 registers: S, dP and a D-wide accumulator, or the
/// dK and dV accumulators with half-width S and dP) and keep per-stage row statistics beside the K ring.
/// kDqStagingArg: the backward's reduce kernel (64-row streamed blocks): a ring of two dS^T buffers and an fp32 dQ
/// staging buffer beside fewer stages.
/// kFp8: the FP8 forward (fp8/): Q and K e4m3 (one byte per element), V^T blocks of D rows x 128 keys in the V
/// ring, O in the 16-bit output dtype.
/// kStreamRowsArg: rows of a streamed (K and V ring) block: kBlockN, or 64 in the two-kernel backward's dK/dV
/// kernel (TILEWISE_HOPPER_BWD_STREAM_ROWS), whose stages then hold one 64-query half each.
/// kClusterArg: CTAs per cluster when not 0 (the backward's reduce kernel in clusters); 0 = the forward's switch.
/// kQueryRuns: the bf16 / f16 forward whose video items are query run blocks (FwdRunParams::runs), a kernel of its
/// own beside the tiles' one, which keeps its machine code (the decode of a run block in every role, and the row
/// maps, cost the D 128 kernel ~650 instructions and 112 bytes more of spills).
/// kQueryRowsArg: the forward's query rows per work item, one of forward_rows_built(D, kFp8); 0 = the first of them.
template <int kHeadDim, int kOwnedRows = 0, bool kDqStagingArg = false, bool kFp8 = false, int kStreamRowsArg = kBlockN,
          int kClusterArg = 0, bool kQueryRunsArg = false, int kQueryRowsArg = 0>
struct KernelTraits {
  static constexpr int D = kHeadDim;
  static constexpr bool kBackward = kOwnedRows != 0;
  static constexpr bool kQueryRuns = kQueryRunsArg;
  static_assert(!kQueryRuns || (!kBackward && !kFp8), "query runs are the bf16 / f16 forward's");
  static_assert(!(kFp8 && kBackward), "FP8 is forward only");
  static constexpr int kInBytes = kFp8 ? 1 : 2;  // bytes per element of the loaded Q and K (and V)
  static constexpr int kStreamRows = kStreamRowsArg;
  static_assert(kStreamRows == kBlockN || (kStreamRows == 64 && kBackward),
                "streamed blocks of 128 rows, or 64 in the backward's dK/dV kernels");
  // The reduce kernel (BwdKernel::dkdvq_reduce): a ring of two dS^T buffers and an fp32 staging buffer from which a
  // producer thread adds each block's dQ into global memory by TMA.
  static constexpr bool kDqStaging = kDqStagingArg;
  static_assert(!kDqStaging || kStreamRows == 64, "the reduce kernel streams 64-row blocks");
  // Query rows per work item (the backward's dK/dV kernel: key rows).
  static constexpr int kBlockM = kBackward       ? kOwnedRows
                                 : kQueryRowsArg ? kQueryRowsArg
                                                 : first_rows_built(forward_rows_built(D, kFp8));
  static_assert(kBlockM == 128 || kBlockM == 192, "two or three consumer warpgroups of 64 rows");
  static_assert(kBackward || (forward_rows_built(D, kFp8) & (kBlockM == 128 ? 1 : 2)) != 0,
                "a forward's query rows among those built for its head dim (forward_rows_built)");
  static constexpr int kConsumerWarpgroups = kBlockM / 64;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);
  // Head dims that are multiples of 64 use 64-column panels with the 128-byte swizzle; 96 uses 32-column panels
  // with the 64-byte swizzle, so no panel ever reads past the head's last column. In e4m3 a panel is a whole
  // swizzle row of 128 (D 128), 64 (D 64) or 32 bytes (D 96, three panels).
  static constexpr int kPanelCols = kFp8 ? (D % 128 == 0 ? 128 : (D % 64 == 0 ? 64 : 32)) : (D % 64 == 0 ? 64 : 32);
  static constexpr int kRowBytes = kPanelCols * kInBytes;
  static constexpr int kPanels = D / kPanelCols;
  static constexpr int kPanelBytes = kStreamRows * kRowBytes;  // one panel of a K or V stage
  static constexpr int kTileBytes = kPanels * kPanelBytes;  // a K or V stage: kStreamRows x D (FP8's V^T: D x 128)
  static constexpr int kQPanelBytes = kBlockM * kRowBytes;  // one panel of the Q buffer (and O's, in 16 bits)
  static constexpr int kQTileBytes = kPanels * kQPanelBytes;
  // The O buffer holds the output dtype (16 bits) in the 16-bit panels, also when Q is e4m3.
  static constexpr int kOPanelCols = D % 64 == 0 ? 64 : 32;
  static constexpr int kORowBytes = kOPanelCols * 2;
  static constexpr int kOPanels = D / kOPanelCols;
  static constexpr int kOPanelBytes = kBlockM * kORowBytes;
  static constexpr int kOTileBytes = kOPanels * kOPanelBytes;
  // FP8: rows of e4m3 ones under each V^T stage (TILEWISE_HOPPER_FP8_ONES), written once, never loaded over.
  static constexpr int kOnesRows = kFp8 && TILEWISE_HOPPER_FP8_ONES ? 8 : 0;
  static constexpr int kVTileBytes = kTileBytes + kOnesRows * kBlockN;  // a V stage (FP8: V^T, D x 128, + ones)
  static constexpr int kStagesSmallD = D == 64 ? TILEWISE_HOPPER_STAGES_D64 : 3;
  // The reduce kernel fits its dS ring and dQ staging beside the rings. Without them, the forward's depths.
  static constexpr int kKStages = kFp8 ? TILEWISE_HOPPER_FP8_STAGES
                                 : kDqStaging ? (D == 128 ? TILEWISE_HOPPER_BWD_REDUCE_K_STAGES_D128 : 4)
                                 : kStreamRows != kBlockN ? TILEWISE_HOPPER_BWD_STREAM_STAGES
                                             : (D >= 128 ? TILEWISE_HOPPER_K_STAGES_D128 : kStagesSmallD);
  static constexpr int kVStages = kFp8 ? TILEWISE_HOPPER_FP8_STAGES
                                 : kDqStaging ? (D == 128 ? TILEWISE_HOPPER_BWD_REDUCE_V_STAGES_D128 : 4)
                                 : kStreamRows != kBlockN ? TILEWISE_HOPPER_BWD_STREAM_STAGES
                                             : (D >= 128 ? TILEWISE_HOPPER_V_STAGES_D128 : kStagesSmallD);
  static constexpr int kCluster = kClusterArg > 0                    ? kClusterArg
                                  : D == 128 && !kBackward && !kFp8 ? TILEWISE_HOPPER_CLUSTER_D128
                                                                    : 1;
  static_assert(kCluster == 1 || kCluster == 2 || (kCluster == 3 && kBackward), "clusters of 1 or 2 CTAs (3: backward)");
  static constexpr bool kOverlap = !kBackward && !kFp8 && kConsumerWarpgroups == 2 &&
                                   (TILEWISE_HOPPER_OVERLAP < 0 ? D != 64 : TILEWISE_HOPPER_OVERLAP != 0);
  // Register split between the producer warpgroup and each consumer warpgroup. The CTA is launched with
  // 65536 / kThreads registers per thread, rounded down to a multiple of 8 (168 for 384 threads, 128 for 512), and
  // setmaxnreg only redistributes that pool: a split asking for more makes setmaxnreg.inc wait forever. The
  // overlapped consumer holds S, P and O at once (ptxas serialises every wgmma when its fragments do not fit,
  // C7512) and gets 216; three sequential consumers get 160 each, which leaves 32 for the producer's pattern walk.
  static constexpr int kLaunchRegs = 65536 / kThreads / 8 * 8;
  static constexpr int kPool = kLaunchRegs * (1 + kConsumerWarpgroups);
  static constexpr int kReduceProducerRegs = D == 128 ? TILEWISE_HOPPER_BWD_REDUCE_PRODUCER_REGS_D128
                                             : D == 96 ? TILEWISE_HOPPER_BWD_REDUCE_PRODUCER_REGS_D96
                                                       : TILEWISE_HOPPER_BWD_REDUCE_PRODUCER_REGS_D64;
  static constexpr int kProducerRegs = TILEWISE_HOPPER_PRODUCER_REGS > 0 ? TILEWISE_HOPPER_PRODUCER_REGS
                                       : kDqStaging                 ? kReduceProducerRegs
                                       : kBackward                  ? 24
                                       : kConsumerWarpgroups == 3   ? 32
                                       : kOverlap                   ? 72
                                                                    : 80;
  static constexpr int kConsumerRegs = (kPool - kProducerRegs) / kConsumerWarpgroups / 8 * 8;
  static_assert(kProducerRegs + kConsumerWarpgroups * kConsumerRegs <= kPool,
                "the register split exceeds the CTA's allocation (setmaxnreg.inc would deadlock)");

  // Stage buffers are addressed arithmetically (k(stage)), never through an array indexed at run time, which
  // would put the struct in local memory.
  // Q and O have buffers of their own, so the next work item's Q can land while this item's last blocks and its
  // output store are still running (the item-boundary bubble).
  struct Shared {
    uint8_t* q;
    __device__ __forceinline__ uint8_t* o() const { return q + kQTileBytes; }
    __device__ __forceinline__ uint8_t* k(int stage) const { return q + kQTileBytes + kOTileBytes + kTileBytes * stage; }
    __device__ __forceinline__ uint8_t* v(int stage) const {
      return q + kQTileBytes + kOTileBytes + kTileBytes * kKStages + kVTileBytes * stage;
    }
    Barrier* q_full;
    Barrier* q_empty;  // the consumers' last S GEMM of an item has read Q
    Barrier* k_full;   // [kKStages]
    Barrier* k_empty;  // [kKStages]
    Barrier* v_full;   // [kVStages]
    Barrier* v_empty;  // [kVStages]
    Barrier* work_full;   // [2]: the scheduler's slot ring (producer -> consumers)
    Barrier* work_empty;  // [2]
    Barrier* k_sync;      // the K loaders of a cluster meet here before multicasting into drained stages
    Barrier* v_sync;      // the V loaders likewise
    int32_t* work;        // [2]
    BlockInfo* info;      // [kKStages]: what the key block in each K stage is (written by the producer)
    // Backward only: per K stage, the streamed block's row statistics (kBlockN values of each, see kStatsBytes).
    __device__ __forceinline__ float* stats(int stage) const {
      return reinterpret_cast<float*>(q + kBufferBytes) + stage * (kStatsBytes / 4);
    }
    // Backward only: dS^T of a block pair (owned keys x streamed queries), as two 64-query panels (with 64-row
    // streamed blocks: a ring of two blocks' dS^T).
    __device__ __forceinline__ uint8_t* ds() const {
      return q + kQTileBytes + kOTileBytes + kTileBytes * kKStages + kVTileBytes * kVStages;
    }
    // kDqStaging only: one streamed block's dQ in fp32 (64 rows x D, 32-column panels of 128-byte rows, swizzled as
    // the TMA reduction reads it), and the barriers around the dS^T ring and the staging buffer.
    __device__ __forceinline__ uint8_t* dq_stage() const { return ds() + kDsBytes; }
    Barrier* ds_full;   // [2]: both warpgroups have written their half of the buffer's dS^T
    Barrier* ds_empty;  // [2]: the buffer's dQ product has read it
    Barrier* dq_full;   // the staging buffer holds a block's dQ
    // [2]: the reduction has read block m's dQ (m % 2). Two, because the warpgroups take the blocks in turns: one can
    // reach block m + 1 before the reduction has read block m - 1, and a single barrier's parity would then read a
    // phase two ahead as complete (the fuzz hung on it).
    Barrier* dq_empty;
    // Backward only: the dK/dV kernels' owned-row records (RowRecord, bwd_params.cuh), two items' worth, written by
    // the producer's fourth warp (BwdProducer::row_records) while the consumers run the previous item.
    uint8_t* row_records;
    Barrier* rows_full;   // [2]: the record of the slot's item is written (the builder warp's 32 lanes)
    Barrier* rows_empty;  // [2]: its consumers are done with it (one arrival per consumer warp)
    __device__ __forceinline__ uint8_t* row_record(uint32_t slot) const { return row_records + slot * kRowRecordBytes; }
  };

  // The backward's dK/dV kernel streams, beside each query block, its rows' log2-domain LSE, D = rowsum(dO o) -
  // dLSE and sequence position: one TMA of 3 x 128 words per stage.
  static constexpr int kStatsBytes = kBackward ? 2 * kStreamRows * 4 : 0;  // kStatsRows (bwd_preprocess.cuh)
  static constexpr int kDsPanelBytes = kBlockM * 128;  // 64 queries (128 bytes) per owned row
  static constexpr int kDsBytes = kDqStaging ? 2 * kDsPanelBytes : 0;
  static constexpr int kDqPanelBytes = 64 * 128;  // fp32 staging: 64 rows x 32 columns
  static constexpr int kDqStageBytes = kDqStaging ? (D / 32) * kDqPanelBytes : 0;  // one block's dQ
  /// Byte offset of fp32 element (row, col) of a streamed block's dQ in the staging buffer (and in a block-order
  /// accumulator's entry, which holds its bytes as they are): 32-column panels of 128-byte rows, in the 128-byte
  /// swizzle the TMA reduction reads.
  static __device__ __forceinline__ uint32_t dq_stage_bytes(uint32_t row, uint32_t col) {
    return (col / 32) * kDqPanelBytes + swizzled_bytes(row * 128 + (col % 32) * 4, 128);
  }
  static constexpr int kBufferBytes = kQTileBytes + kOTileBytes + kTileBytes * kKStages + kVTileBytes * kVStages +
                                      kDsBytes + kDqStageBytes;  // Q, O, K, V, dS, dQ staging
  // An even count: `info` (below the barriers and `work`) stays 16-byte aligned.
  // Backward: one 8-byte record per owned row and item slot (position, frame and whether any query sees the row)
  static constexpr int kRowRecordBytes = kBackward ? kBlockM * 8 : 0;
  static constexpr int kBarriers = 2 + 2 * kKStages + 2 * kVStages + 6 + (kDqStaging ? 8 : 0) + (kBackward ? 4 : 0);
  static constexpr int kSmemBytes = 1024 /* alignment slack */ + kBufferBytes + kKStages * kStatsBytes +
                                    kBarriers * 8 + 16 + kKStages * sizeof(BlockInfo) + 2 * kRowRecordBytes;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory exceeds the 227 KB an sm_90 CTA can have");
  static_assert(kBufferBytes % 128 == 0 && kStatsBytes % 128 == 0, "TMA writes the statistics stages: 128-byte aligned");

  /// Carves the dynamic shared memory: tiles first (1024-byte aligned, as the 128-byte swizzle requires).
  static __device__ __forceinline__ Shared carve(uint8_t* raw) {
    uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
    Shared s;
    s.q = base;
    Barrier* bars = reinterpret_cast<Barrier*>(base + kBufferBytes + kKStages * kStatsBytes);
    s.q_full = bars;
    s.q_empty = bars + 1;
    s.k_full = bars + 2;
    s.k_empty = s.k_full + kKStages;
    s.v_full = s.k_empty + kKStages;
    s.v_empty = s.v_full + kVStages;
    s.work_full = s.v_empty + kVStages;
    s.work_empty = s.work_full + 2;
    s.k_sync = s.work_empty + 2;
    s.v_sync = s.k_sync + 1;
    s.ds_full = s.v_sync + 1;
    s.ds_empty = s.ds_full + 2;
    s.dq_full = s.ds_empty + 2;
    s.dq_empty = s.dq_full + 1;
    s.rows_full = s.v_sync + 1 + (kDqStaging ? 8 : 0);  // past the dQ barriers, which only the reduce kernel has
    s.rows_empty = s.rows_full + 2;
    s.work = reinterpret_cast<int32_t*>(bars + kBarriers);
    s.info = reinterpret_cast<BlockInfo*>(bars + kBarriers + 2);  // 16-byte aligned: one 128-bit load each
    s.row_records = reinterpret_cast<uint8_t*>(s.info + kKStages);
    return s;
  }
};

}  // namespace tilewise::hopper
