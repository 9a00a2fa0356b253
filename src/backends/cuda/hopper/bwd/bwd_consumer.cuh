// The backward kernels' consumers: two warpgroups, each owning 64 rows of the work item's owned block. They reuse
// the forward consumer's pieces (stage records, releases, the S = Q K^T product, descriptors) and masks.
//
// dQ (per owned query block, per streamed key block j; P is recomputed from the forward's LSE, so there is no
// online softmax):   S = Q K_j^T,  dP = dO V_j^T  (SS, N = 128)
//                    P = exp2(S scale log2e - lse2),  dS = P (dP - D)
//                    dQ += dS K_j  (RS, K MN-major)
// dK/dV (per owned key block, per streamed query block j, in halves of 64 queries (two per 128-row block, one per
// 64-row block, KernelTraits::kStreamRows): the 240 registers hold
// the dK and dV accumulators beside half-width S and dP):
//                    S^T = K Q_j^T,  dP^T = V dO_j^T  (SS, N = 64)
//                    P^T = exp2(S^T scale log2e - lse2[col]),  dS^T = P^T (dP^T - D[col])
//                    dV += P^T dO_j,  dK += dS^T Q_j  (RS, MN-major)
// Both are written straight from registers (bwd_epilogue): dq and dk scaled by the softmax scale.
#pragma once

#include <type_traits>

#include "backends/cuda/hopper/bwd/bwd_blocks.cuh"
#include "backends/cuda/hopper/bwd/bwd_preprocess.cuh"
#include "backends/cuda/hopper/bwd/bwd_trace.cuh"
#include "backends/cuda/hopper/mma_softmax_consumer.cuh"

namespace tilewise::hopper {

/// x (an accumulator of 8 kSteps columns) as the A operand of kSteps k16 wgmma steps.
template <int kSteps>
__device__ __forceinline__ void pack_operand(const float (&x)[8 * kSteps], uint32_t (&a)[kSteps][4], bool bf16) {
#pragma unroll
  for (int j = 0; j < kSteps; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) a[j][i] = pack_half2(x[8 * j + 2 * i], x[8 * j + 2 * i + 1], bf16);
}

/// kFrameMask: whether the dK/dV loops test the attention tile's frames per pair on the blocks flagged
/// BlockInfo::kFrames; false for plans that have none (frame_free_kernel).
template <class Traits, WgType kType, bool kFrameMask = true>
struct BwdConsumer : Consumer<Traits, kType> {
  using Base = Consumer<Traits, kType>;
  using Base::desc;
  using Base::lane;
  using Base::row;
  static constexpr int D = Traits::D;
  static constexpr uint32_t kStageDesc = Base::kStageDesc;
  static constexpr uint32_t kRowDesc = Traits::kRowBytes >> 4;  // descriptor units per row of a panel
  const BwdParams& bp;
  // Descriptor words beside the forward's (q_lo: owned first operand, K-major; k_lo: K stage, K-major; v_lo: V
  // stage, MN-major): the owned second operand (K-major), the V stage K-major and the K stage MN-major.
  uint32_t o_lo, vk_lo, km_lo;
  mutable BwdTracer trace;  // measurement only (bwd_trace.cuh): the reduce kernel's block loop at D 64 and 128

  __device__ __forceinline__ BwdConsumer(const BwdParams& p_, const typename Traits::Shared& s_, int wg_, int tid_,
                                         uint32_t rank_)
      : Base(p_, s_, wg_, tid_, rank_), bp(p_) {
#if TILEWISE_HOPPER_BWD_TRACE
    // every lane of the warpgroup's first warp (a warp-uniform condition: no registers of the block loop's own)
    trace.start(kTraceWg0 + wg_, __shfl_sync(0xffffffffu, tid_ < 32, 0));
#endif
    constexpr uint32_t rb = Traits::kRowBytes;
    o_lo = static_cast<uint32_t>(make_desc(smem_addr(s_.o()) + 64 * wg_ * rb, 16, 8 * rb, rb));
    vk_lo = static_cast<uint32_t>(make_desc(smem_addr(s_.v(0)), 16, 8 * rb, rb));
    km_lo = static_cast<uint32_t>(make_desc(smem_addr(s_.k(0)), Traits::kPanelBytes, 8 * rb, rb));
  }

  static constexpr int kAblate = TILEWISE_HOPPER_BWD_ABLATE;
  // The dK/dV items' owned rows come from the producer's record warp (uses_row_records; the dQ kernel has none).
  static constexpr bool kRecords = uses_row_records(BwdKernel::dkdv, Traits::kCluster, D);
  /// The item's row record is read: this warp's arrival on its slot's rows_empty (after every lane's reads).
  __device__ __forceinline__ void release_rows(uint32_t record) const {
    if constexpr (kRecords) {
      __syncwarp();
      if (lane() == 0) this->s.rows_empty[record & 1].arrive();
    }
  }
  static constexpr int kHalves = Traits::kStreamRows / 64;  // dK/dV: 64-query halves per streamed block
  // The reduce kernel's S^T and dP^T with the first k16 steps of the warpgroup's owned K or V rows in registers as
  // the A operand: the RS form reads half the shared-memory bytes of SS, which bound these m64n64 products (v3.9).
  // All of K and V at D 64 (16 registers each), all of K at D 96 (24). Checked with ptxas (v3.10): V's first 2 or 3
  // steps at D 96 put spills into the block loop (8-17 LDL), 4 serialise the wgmmas, and at D 128 more than one
  // step of K serialises them: none of those.
  static constexpr int kOwnedKSteps = !Traits::kDqStaging ? 0
                                      : D == 64           ? (TILEWISE_HOPPER_BWD_OWNED_IN_REGS != 0 ? 4 : 0)
                                      : D == 96           ? (TILEWISE_HOPPER_BWD_OWNED_K_D96 != 0 ? 6 : 0)
                                                          : 0;
  static constexpr int kOwnedVSteps =
      Traits::kDqStaging && D == 64 && TILEWISE_HOPPER_BWD_OWNED_IN_REGS != 0 ? 4 : 0;
  static_assert(kOwnedKSteps >= 0 && kOwnedKSteps <= D / 16 && kOwnedVSteps >= 0 && kOwnedVSteps <= D / 16,
                "owned k16 steps in registers: 0 to D / 16");
  using OwnedK = uint32_t[kOwnedKSteps > 0 ? kOwnedKSteps : 1][4];  // (one unused entry when none)
  using OwnedV = uint32_t[kOwnedVSteps > 0 ? kOwnedVSteps : 1][4];
  // reduce_item instead of dkdv_item in the reduce kernel: D 96 (measured at D 64 without gain, see bwd_params.cuh;
  // it compiles there too), not D 128 (see reduce_item)
  static constexpr bool kReduceOverlap = TILEWISE_HOPPER_BWD_REDUCE_OVERLAP != 0 && D == 96;
  /// Whether a switch given as a mask of head dims (1 D 64, 2 D 96, 4 D 128) holds for this kernel's.
  static constexpr bool for_head_dim(int mask) { return (mask & (D == 64 ? 1 : D == 96 ? 2 : 4)) != 0; }
  // dkdv_item's S^T and dP^T issued before the block's record is read (TILEWISE_HOPPER_BWD_ISSUE_FIRST)
  static constexpr bool kIssueGemmsFirst = for_head_dim(TILEWISE_HOPPER_BWD_ISSUE_FIRST);
  // dkdv_item's dK/dV stores after the item's last dQ turn is staged (TILEWISE_HOPPER_BWD_STORES_AFTER_LAST_DQ)
  static constexpr bool kStoresAfterLastDq = for_head_dim(TILEWISE_HOPPER_BWD_STORES_AFTER_LAST_DQ);
  /// A descriptor word that depends on a pipeline stage or ring buffer, broadcast from lane 0 so that ptxas keeps
  /// the wgmma descriptors built from it in uniform registers (v3.12: otherwise ~6 vector instructions and two R2UR
  /// per wgmma, since the stage index is a loop-carried value it cannot prove warp-uniform).
  static __device__ __forceinline__ uint32_t uniform_desc(uint32_t x) { return warp_uniform(x); }

  /// d[64 x N] = A[64 rows of an owned buffer, K-major] * B[N rows of a stage from row `b_row`, K-major]^T.
  template <int N>
  __device__ __forceinline__ void gemm_ss(float (&d)[N / 2], uint32_t a_lo, uint32_t b_lo) const {
    uint32_t none[1][4];  // no step from registers: never read
    gemm_owned<N, 0>(d, none, a_lo, b_lo);
  }
  /// The first kSteps k16 steps of this warpgroup's 64 rows of an owned buffer (K-major, in panels of kPanelCols
  /// swizzled columns) as A operands, by ldmatrix: lane l addresses row l % 8 + 8 ((l / 8) % 2) of its warp's 16
  /// and columns 8 (l / 16) onwards of the step's 16.
  template <int kSteps, int kLen>
  __device__ __forceinline__ void load_owned(uint32_t (&a)[kLen][4], const uint8_t* buffer) const {
    constexpr int kCols = Traits::kPanelCols;
    const int l = lane();
    const uint32_t r = 64 * this->wg + 16 * (this->tid / 32) + l % 8 + 8 * ((l / 8) % 2);
#pragma unroll
    for (int j = 0; j < kSteps; ++j) {
      const int col = 16 * j + 8 * (l / 16);
      ldmatrix_x4(a[j], smem_addr(buffer) + (col / kCols) * Traits::kQPanelBytes +
                            swizzled_offset(r, col % kCols, Traits::kRowBytes));
    }
  }
  /// gemm_ss with the first kSteps k16 steps of the owned operand from registers (load_owned), the rest from the
  /// owned buffer at `a_lo`: d[64 x N] = A * B[N rows of a stage, K-major]^T.
  template <int N, int kSteps, int kLen>
  __device__ __forceinline__ void gemm_owned(float (&d)[N / 2], const uint32_t (&a)[kLen][4], uint32_t a_lo,
                                             uint32_t b_lo) const {
#pragma unroll
    for (int panel = 0; panel < Traits::kPanels; ++panel)
#pragma unroll
      for (int kk = 0; kk < Traits::kPanelCols / 16; ++kk) {
        const int step = panel * (Traits::kPanelCols / 16) + kk;
        const uint32_t a_off = (panel * Traits::kQPanelBytes + kk * 32) >> 4;
        const uint32_t b_off = (panel * Traits::kPanelBytes + kk * 32) >> 4;
        if (step < kSteps)  // (the index clamped for the branch compiled away: a may have one unused entry)
          WgmmaRS<kType, N>::template rs<0>(d, a[step < kSteps ? step : 0], desc(b_lo + b_off, this->kq_hi), step > 0);
        else
          Wgmma<kType, N>::template ss<0>(d, desc(a_lo + a_off, this->kq_hi), desc(b_lo + b_off, this->kq_hi),
                                          step > 0);
      }
  }
  /// S^T = K Q^T and dP^T = V dO^T of a 64-row streamed block at `b_lo`: the owned rows' first kOwnedKSteps
  /// (kOwnedVSteps) k16 steps from registers (loaded by load_owned at the item's start), the rest from shared memory.
  /// (The ablation that skips the S and dP GEMMs applies to the shared-memory form only.)
  __device__ __forceinline__ void scores_t(float (&sc)[32], const OwnedK& owned_k, uint32_t b_lo) const {
    if (kOwnedKSteps > 0 || !(kAblate & 2)) gemm_owned<64, kOwnedKSteps>(sc, owned_k, this->q_lo, b_lo);
  }
  __device__ __forceinline__ void dprobs_t(float (&dp)[32], const OwnedV& owned_v, uint32_t b_lo) const {
    if (kOwnedVSteps > 0 || !(kAblate & 2)) gemm_owned<64, kOwnedVSteps>(dp, owned_v, o_lo, b_lo);
  }
  /// An item's start in the dK/dV loops: dK and dV zeroed, and the owned K and V steps that S^T and dP^T take
  /// from registers loaded.
  __device__ __forceinline__ void start_item(float (&dk)[D / 2], float (&dv)[D / 2], OwnedK& owned_k,
                                             OwnedV& owned_v) const {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dk[i] = 0.f, dv[i] = 0.f;
    load_owned<kOwnedKSteps>(owned_k, this->s.q);
    load_owned<kOwnedVSteps>(owned_v, this->s.o());
  }
  /// d[64 x D] += A (registers, kSteps k16 steps) * B[16 kSteps rows of a stage, MN-major].
  template <int kSteps>
  __device__ __forceinline__ void gemm_rs(float (&d)[D / 2], const uint32_t (&a)[kSteps][4], uint32_t b_lo) const {
#pragma unroll
    for (int j = 0; j < kSteps; ++j) WgmmaRS<kType, D>::template rs<1>(d, a[j], desc(b_lo + j * 16 * kRowDesc, this->v_hi), 1);
  }

  /// Sequence position of this thread's owned row rr (-1: not a real token).
  __device__ __forceinline__ int64_t owned_position(const WorkItem& item, int rr) const {
    return Epilogue<Traits, kType>{this->p, this->s, this->wg, this->tid}.position(item.q, row(rr));
  }
  /// Both owned rows' positions, once per item: each takes ~100 instructions of divisions and indexed parameter
  /// loads in a chain, which the stores at an item's end repeated per gradient (v3.19: 16% of the samples at six
  /// blocks per item). 32 bits: the host keeps sequences below 2^31 tokens (hopper_backend.cu).
  __device__ __forceinline__ void owned_positions(const WorkItem& item, int32_t (&pos)[2]) const {
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) pos[rr] = static_cast<int32_t>(owned_position(item, rr));
  }

  /// Whether every row of a 16-bit tensor at `base` with element strides `st` starts 16-byte aligned (the base and
  /// every stride a multiple of 8 elements): what 16-byte stores and bulk copies of rows need. Uniform across the CTA.
  static __device__ __forceinline__ bool rows_16b_aligned(const void* base, const Strides& st) {
    return ((reinterpret_cast<uintptr_t>(base) & 15) | ((st.batch | st.seq | st.head) & 7)) == 0;
  }
  /// Writes this thread's part of a D-wide accumulator of the owned rows (at `positions`, owned_positions) to `base`
  /// (element strides `st`, head `head`), times `scale`, straight from registers.
  __device__ __forceinline__ void store(const WorkItem& item, const int32_t (&positions)[2], int32_t head,
                                        const float (&acc)[D / 2], float scale, void* base, const Strides& st) const {
    const int64_t b = this->p.batch_base + item.batch;
    if ((kAblate & 2048) && bp.grad0_scale != -12345.f) return;  // measurement only: no stores (the test keeps the wgmmas)
    if constexpr (kWideStores) {
      // (uniform across the CTA, so the branch never splits a quad's shuffles)
      if (rows_16b_aligned(base, st))
        return store_wide(b, positions, head, acc, scale, static_cast<uint16_t*>(base), st);
    }
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t pos = positions[rr];
      if (pos < 0) continue;
      uint16_t* dst = static_cast<uint16_t*>(base) + b * st.batch + pos * st.seq + head * st.head;
#pragma unroll
      for (int i = 2 * rr; i < D / 2; i += 4) {
        const int col = 8 * (i / 4) + 2 * (lane() % 4);
        *reinterpret_cast<uint32_t*>(dst + col) =
            pack_half2(acc[i] * scale, acc[i + 1] * scale, kType == WgType::bf16);
      }
    }
  }
  static constexpr bool kWideStores = for_head_dim(TILEWISE_HOPPER_BWD_WIDE_STORES);
  /// The quad transpose behind the 16-byte stores: a quad (lanes 4r..4r+3, one accumulator row) holds a row's
  /// 8-column group g as four words, word q (columns 8g + 2q, 8g + 2q + 1) in lane q. Over four groups 4c..4c+3 the
  /// quad transposes that 4 x 4 matrix of words in two butterfly rounds (shuffles with lane ^ 1, then lane ^ 2; in
  /// each a lane swaps the two words whose index differs from its own in that bit), after which lane q holds all of
  /// group 4c + q: the 16 contiguous bytes at column 32c + 8q of row rr (packed, times `scale`), returned.
  __device__ __forceinline__ uint4 quad_chunk(const float (&acc)[D / 2], float scale, int rr, int c) const {
    const int q = lane() % 4;
    uint32_t w[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int i = 4 * (4 * c + t) + 2 * rr;
      w[t] = pack_half2(acc[i] * scale, acc[i + 1] * scale, kType == WgType::bf16);
    }
#pragma unroll
    for (int bit = 1; bit <= 2; bit <<= 1) {
      const bool hi = q & bit;  // this lane replaces its words whose index lacks `bit` (hi) or has it (!hi)
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        if (t & bit) continue;  // the pair (t, t | bit)
        const uint32_t sent = hi ? w[t] : w[t | bit];
        const uint32_t got = __shfl_xor_sync(0xffffffffu, sent, bit);
        if (hi)
          w[t] = got;
        else
          w[t | bit] = got;
      }
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
  /// store() by 16-byte stores of quad_chunk's rows.
  __device__ __forceinline__ void store_wide(int64_t b, const int32_t (&positions)[2], int32_t head,
                                             const float (&acc)[D / 2], float scale, uint16_t* base,
                                             const Strides& st) const {
    static_assert(D % 32 == 0, "whole 32-column chunks");
    const int q = lane() % 4;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t pos = positions[rr];  // the same in all four lanes of the quad
      uint16_t* dst = base + b * st.batch + pos * st.seq + head * st.head;
#pragma unroll
      for (int c = 0; c < D / 32; ++c) {
        const uint4 v = quad_chunk(acc, scale, rr, c);
        if (pos >= 0) *reinterpret_cast<uint4*>(dst + 32 * c + 8 * q) = v;
      }
    }
  }
  /// kTmaStores: the named barriers of the consumer warps (kStagedRowsBarrier + warp; 0 is __syncthreads', and the
  /// backward uses no other)
  static constexpr uint32_t kStagedRowsBarrier = 2;
  /// kTmaStores: where this thread's row rr of dK (`value` false) or dV is staged for its bulk copy. dK: each warp
  /// stages its 16 owned rows (256 bytes each at D 128) in the bytes of the dS^T ring that it rewrites itself in the
  /// next item's blocks (its 16 keys of this warpgroup's half of both panels), so that before those writes only its
  /// own lanes' copies must have been read (dkdv_item's start). dV: in this warpgroup's half of the dQ staging buffer,
  /// once the reducer has read the item's last turn out; its next writer, the next item's first dQ turn, comes after
  /// both warpgroups' first dS^T (ds_full), and so after their item-start waits for these copies.
  __device__ __forceinline__ uint8_t* staged_row(bool value, int rr) const {
    static_assert(D * 2 * 8 == 16 * 128, "a warp's 8 rows of a panel are its 16 keys' 128-byte dS^T rows");
    const int warp = this->tid / 32, j = lane() / 4;
    return value ? this->s.dq_stage() + 128 * D * this->wg + (16 * warp + 8 * rr + j) * (D * 2)
                 : this->s.ds() + rr * Traits::kDsPanelBytes + (64 * this->wg + 16 * warp) * 128 + j * (D * 2);
  }
  /// store() through shared memory and bulk copies (kTmaStores; `value`: dV, else dK): the consumers stage their rows
  /// and go on while the async proxy writes them out, each quad's first lane copying its two rows. Rows not
  /// 16-byte aligned (rows_16b_aligned) are left to store().
  /// (`record`: the item's, for the trace's stamps inside: events 10 and 11 for dK, 12 and 13 for dV)
  __device__ __forceinline__ void store_staged(bool value, const WorkItem& item, uint32_t record,
                                               const int32_t (&positions)[2], int32_t head, const float (&acc)[D / 2],
                                               float scale, void* base, const Strides& st) const {
    if (!rows_16b_aligned(base, st)) return store(item, positions, head, acc, scale, base, st);
    const int q = lane() % 4;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
#pragma unroll
      for (int c = 0; c < D / 32; ++c)
        st_shared_v4(staged_row(value, rr) + (32 * c + 8 * q) * 2, quad_chunk(acc, scale, rr, c));
    }
    trace.stamp_item(record, value ? 12 : 10);
    fence_proxy_async();
    // The quad's first lane copies what its three others wrote: a barrier of this warp (a named one: __syncwarp here
    // moved ptxas's register allocation and put 6 STL and 9 LDL into the block loop)
    named_barrier_sync(kStagedRowsBarrier + 4 * this->wg + this->tid / 32, 32);
    trace.stamp_item(record, value ? 13 : 11);
    if (q == 0) {
      const int64_t b = this->p.batch_base + item.batch;
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        if (positions[rr] < 0) continue;
        bulk_store(static_cast<uint16_t*>(base) + b * st.batch + positions[rr] * st.seq + head * st.head,
                   staged_row(value, rr), D * 2);
      }
      tma_store_commit();
    }
  }
  // dkdv_item's dK / dV stores through shared memory and bulk copies (TILEWISE_HOPPER_BWD_TMA_STORES): the reduce
  // kernel at D 128 outside clusters, after the item's last dQ turn (kStoresAfterLastDq: the ring is free then)
  static constexpr bool kTmaStores = Traits::kDqStaging && Traits::kCluster == 1 && D == 128 && kStoresAfterLastDq &&
                                     for_head_dim(TILEWISE_HOPPER_BWD_TMA_STORES);

  /// The statistics (lse2, D) of the streamed block in the stages the pipes point at: the K stage's, or the V stage's
  /// where the dO loader brings them (stats_with_output_grads; the same index, both pipes advancing together).
  __device__ __forceinline__ const float* block_stats(const typename Base::KPipe& ks,
                                                      const typename Base::VPipe& vs) const {
    constexpr bool kWithDo = stats_with_output_grads(Traits::kCluster, Traits::kKStages, Traits::kVStages, D);
    return this->s.stats(kWithDo ? vs.stage() : ks.stage());
  }
  /// Waits for the K and V stages the pipes point at; returns the K stage's record.
  __device__ __forceinline__ BlockInfo acquire(const typename Base::KPipe& ks, const typename Base::VPipe& vs) const {
    this->s.k_full[ks.stage()].wait(ks.phase());
    const BlockInfo bi = this->info(ks.stage());
    this->s.v_full[vs.stage()].wait(vs.phase());
    return bi;
  }
  /// Waits for the K and V stages the pipes point at (their record is read later).
  __device__ __forceinline__ void wait_stages(const typename Base::KPipe& ks, const typename Base::VPipe& vs) const {
    this->s.k_full[ks.stage()].wait(ks.phase());
    this->s.v_full[vs.stage()].wait(vs.phase());
  }
  /// The dK/dV loops' next streamed block into `bi` (and whether it is the item's last); an empty one (the only
  /// block of an item with none) is freed at once with `release`, and then the answer is false.
  template <class Release>
  __device__ __forceinline__ bool next_block(BlockInfo& bi, bool& last, typename Base::KPipe& ks,
                                             typename Base::VPipe& vs, Release&& release) const {
    bi = acquire(ks, vs);
    last = bi.flags & BlockInfo::kLast;
    if (!(bi.flags & BlockInfo::kEmpty)) return true;
    release(bi);
    return false;
  }
  /// Frees both stages (and the owned blocks after the item's last); in a cluster, in every CTA (all units are
  /// shared: decode_tile_unit).
  __device__ __forceinline__ void release_stages(const BlockInfo& bi, typename Base::KPipe& ks,
                                                 typename Base::VPipe& vs) const {
    constexpr bool kShared = Traits::kCluster > 1;
    this->release_s_operands(ks.stage(), bi, kShared);
    ks.advance();
    this->release(this->s.v_empty[vs.stage()], kShared);
    vs.advance();
  }

  // ---------------------------------------------------------------- dQ
  /// S (masked where flagged) to P = exp2(S scale log2e - lse2) of this thread's owned rows.
  __device__ __forceinline__ void probabilities(float (&sc)[kBlockN / 2], const KeyMask& mask, const WorkItem& item,
                                                const BlockInfo& bi, const float (&lse2)[2]) const {
    if (mask.active) {
      mask.apply(sc, lane());
      if (mask.frames) mask_frames(sc, bp, item, bi, lane(), [&](int rr) { return row(rr); });
    }
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) sc[i] = fast_exp2(fmaf(sc[i], bp.scale_log2, -lse2[(i % 4) / 2]));
  }

  __device__ __forceinline__ void dq_item(const WorkItem& item, typename Base::KPipe& ks,
                                          typename Base::VPipe& vs) const {
    const BwdParams& p = bp;
    const int32_t text_len = text_len_of(p, item.batch);
    float lse2[2], delta[2];
    int32_t positions[2];
    owned_positions(item, positions);
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      const int64_t pos = positions[rr];
      const int64_t stat = (int64_t{p.batch_base + item.batch} * p.q_heads + item.head) * p.seq_len + pos;
      lse2[rr] = pos < 0 ? INFINITY : p.lse[stat] * p.scale_log2_lse;
      delta[rr] = pos < 0 ? 0.f : p.delta[stat];
    }
    float dq[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;
    for (bool last = false; !last;) {
      const BlockInfo bi = acquire(ks, vs);
      last = bi.flags & BlockInfo::kLast;
      float sc[kBlockN / 2], dp[kBlockN / 2];
      wgmma_fence();
      if (!(kAblate & 2)) this->issue_s_at(sc, this->k_lo + uniform_desc(ks.stage() * kStageDesc));
      wgmma_commit();
      if (!(kAblate & 2)) gemm_ss<kBlockN>(dp, o_lo, vk_lo + uniform_desc(vs.stage() * kStageDesc));
      wgmma_commit();
      const KeyMask mask = KeyMask::of(p, bi, text_len, lane());
      auto score_gradients = [&] {  // dS = P (dP - D), in place of P
#pragma unroll
        for (int i = 0; i < kBlockN / 2; ++i) sc[i] *= dp[i] - delta[(i % 4) / 2];
      };
      wgmma_wait<1>();  // P while dP runs
      fence_regs(sc);
      if (!(kAblate & 1)) probabilities(sc, mask, item, bi, lse2);
      wgmma_wait<0>();
      fence_regs(dp);
      if (!(kAblate & 1)) score_gradients();
      uint32_t ds[kBlockN / 16][4];
      pack_operand<kBlockN / 16>(sc, ds, kType == WgType::bf16);
      wgmma_fence();
      if (!(kAblate & 4)) gemm_rs<kBlockN / 16>(dq, ds, km_lo + uniform_desc(ks.stage() * kStageDesc));
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(dq);
      release_stages(bi, ks, vs);
    }
    store(item, positions, item.head, dq, p.grad0_scale, p.grad0, p.grad0_strides);
  }

  // ---------------------------------------------------------------- dK, dV (and dQ in the reduce kernel)
  /// What P^T needs of this thread's two owned key rows: whether any query sees the row (rows that are not real
  /// tokens, so the reduce kernel's dQ never sums over them, and text keys past the valid length, whose gradients
  /// are zero, get no probability at all) and its frame (the attention tile's token-level mask).
  struct OwnedRows {
    bool seen[2];
    bool all_seen;  // every owned row of this warp is seen (warp-uniform): P^T needs no row mask
    int32_t frame[2];
    int32_t pos[2];  // sequence positions (-1: not a real token), for the stores at the item's end
  };
  /// With row records (kRecords) item number `record`'s slot is read (the producer's record warp wrote it; released
  /// with release_rows once the item is done); otherwise every thread works its two rows out.
  __device__ __forceinline__ OwnedRows owned_rows(const WorkItem& item, uint32_t record) const {
    if constexpr (kRecords) {
      OwnedRows r;
      this->s.rows_full[record & 1].wait((record >> 1) & 1);
      const RowRecord* rec = reinterpret_cast<const RowRecord*>(this->s.row_record(record & 1));
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const RowRecord x = rec[row(rr)];
        r.pos[rr] = x.pos;
        r.seen[rr] = x.frame_unseen >= 0;
        r.frame[rr] = x.frame_unseen & ~RowRecord::kUnseen;
      }
      r.all_seen = __all_sync(0xffffffffu, r.seen[0] && r.seen[1]);
      return r;
    }
    const OwnedRowsGeometry geo(bp, item);
    OwnedRows r;
    owned_positions(item, r.pos);
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      r.seen[rr] = geo.seen(item, row(rr), r.pos[rr]);
      r.frame[rr] = geo.frame(row(rr));
    }
    r.all_seen = __all_sync(0xffffffffu, r.seen[0] && r.seen[1]);
    return r;
  }

  /// S^T to P^T for this thread's 32 entries of a streamed block's half `half` (zero where the pair is not
  /// allowed); `lse2_of(k)` is the lse2 pair of the thread's column group k. The attention tile's frame test is a
  /// pass of its own, since a branch per entry keeps the scheduler from interleaving the exponentials (v1 lost about
  /// half of the dK/dV kernel's time there).
  template <class Stat>
  __device__ __forceinline__ void probabilities_of_block(float (&sc)[32], Stat&& lse2_of, const OwnedRows& rows,
                                                         const BlockInfo& bi, bool frames, const HeadParams& hp,
                                                         const D3& qbox, int half) const {
    auto exponentials = [&](auto masked) {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float2 lse2 = lse2_of(k);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 4 * k + e;
          const float x = fmaf(sc[i], bp.scale_log2, -(e % 2 ? lse2.y : lse2.x));
          const float pr = (kAblate & 8192) ? x : fast_exp2(x);  // (measurement only: bit 8192)
          sc[i] = !masked || rows.seen[e / 2] ? pr : 0.f;
        }
      }
    };
    // A warp whose owned rows are all seen (whole video tiles: every block of row 1) skips the row mask's 32
    // selects (~5% of the D 128 reduce loop's vector instructions, v3.12); the branch is warp-uniform (a vote).
    if (rows.all_seen)
      exponentials(std::false_type{});
    else
      exponentials(std::true_type{});
    if (frames) {
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int c = 64 * half + accumulator_column(i, lane());
        if (!frame_pair_allowed<int32_t>(bi.t + c / (qbox.h * qbox.w), rows.frame[(i % 4) / 2],
                                         static_cast<int32_t>(hp.global_frames), static_cast<int32_t>(hp.radius)))
          sc[i] = 0.f;
      }
    }
  }
  /// The eight float2 statistics (lse2 or D) of this thread's columns, from a stage's row `from` (its column pair).
  static __device__ __forceinline__ void load_col_stats(float2 (&cs)[8], const float* from) {
#pragma unroll
    for (int k = 0; k < 8; ++k) cs[k] = ld_shared_f2(from + 8 * k);
  }
  /// dS^T = P^T (dP^T - D[col]) in place of dP^T; `d_of(k)` is the D pair of column group k.
  template <class Stat>
  __device__ __forceinline__ void score_gradients_of_block(float (&dp)[32], const float (&sc)[32], Stat&& d_of) const {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float2 d = d_of(k);
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[4 * k + e] = sc[4 * k + e] * (dp[4 * k + e] - (e % 2 ? d.y : d.x));
    }
  }

  /// dS^T of this warpgroup's 64 owned rows for a 64-row streamed block into panel `buffer` of the dS ring, in the
  /// 128-byte swizzled layout wgmma reads as an MN-major A operand.
  __device__ __forceinline__ void store_ds(const float (&ds)[32], int buffer) const {
    uint8_t* panel = this->s.ds() + buffer * Traits::kDsPanelBytes;
    // Packed pair 4q + m is the 8x8 matrix of row half m % 2 and column group 2q + m / 2 (the accumulator's
    // layout): four stmatrix.x4, lane l addressing row l % 8 of matrix l / 8, instead of 16 four-byte stores.
    uint32_t packed[4][4];
    pack_operand<4>(ds, packed, kType == WgType::bf16);
    const int m = lane() / 8, r = row(m % 2) - lane() / 4 + lane() % 8;  // row l % 8 of matrix m's rows
#pragma unroll
    for (int q = 0; q < 4; ++q)
      stmatrix_x4(smem_addr(panel + swizzled_offset(r, 8 * (2 * q + m / 2), 128)), packed[q]);
  }

  /// The reduce kernel's dS^T store: into ring buffer blocks % 2 once that buffer's previous dQ product (two blocks
  /// ago) has read it.
  __device__ __forceinline__ void store_block_ds(const float (&ds)[32], uint32_t blocks) const {
    this->s.ds_empty[blocks & 1].wait(((blocks >> 1) & 1) ^ 1);
    store_ds(ds, static_cast<int>(blocks & 1));
  }

  /// dq = dS K for the 64 queries of dS panel `panel` (a 64-row block of the reduce kernel's ring) over all 128
  /// owned keys (A: the panel, MN-major; B: the owned K, MN-major), issued as one commit group (dq_product: and
  /// waited for).
  __device__ __forceinline__ void issue_dq_product(float (&dq)[D / 2], int panel) const {
    constexpr uint32_t rb = Traits::kRowBytes;
    // The dS panel's rows are 128 bytes (64 queries) whatever D is, so its descriptor has its own high word.
    const uint64_t a = make_desc(smem_addr(this->s.ds() + panel * Traits::kDsPanelBytes), Traits::kDsPanelBytes,
                                 8 * 128, 128);
    const uint32_t a0 = uniform_desc(static_cast<uint32_t>(a)), a_hi = static_cast<uint32_t>(a >> 32);
    const uint32_t b0 = static_cast<uint32_t>(make_desc(smem_addr(this->s.q), Traits::kQPanelBytes, 8 * rb, rb));
    wgmma_fence();
    if (kAblate & 32) {  // measurement only: no dQ product
#pragma unroll
      for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;
    } else {
#pragma unroll
      for (int j = 0; j < Traits::kBlockM / 16; ++j)  // k16 steps over the owned keys: 16 rows of either operand
        Wgmma<kType, D>::template ss<1, 1>(dq, desc(a0 + j * (16 * 128 >> 4), a_hi),
                                           desc(b0 + j * 16 * kRowDesc, this->v_hi), j > 0);
    }
    wgmma_commit();
  }
  __device__ __forceinline__ void dq_product(float (&dq)[D / 2], int panel) const {
    issue_dq_product(dq, panel);
    wgmma_wait<0>();
    fence_regs(dq);
  }

  /// dkdvq_reduce: the dQ of this CTA's streamed block number m (its dS^T in ring buffer m % 2, written by both
  /// warpgroups) into the fp32 staging buffer, in the 128-byte swizzled 32-column panels the TMA reduction reads;
  /// a producer thread adds it into the accumulator (BwdProducer::dq_reducer). The warpgroups take the blocks in
  /// turns (m % 2), each a block after its dS^T was written, so neither waits for the other in the steady state.
  /// The barrier protocol (with dkdv_item and BwdProducer::dq_reducer) is modelled in
  /// tests/test_bwd_reduce_protocol.cpp: a change to it changes the model too.
  __device__ __forceinline__ void dq_to_staging(uint32_t m) const {
    this->s.ds_full[m & 1].wait((m >> 1) & 1);
    trace.stamp(m, 9);
    float dq[D / 2];
    dq_product(dq, static_cast<int>(m & 1));
    trace.stamp(m, 10);
    stage_dq(m, dq);
  }
  /// The second half of dq_to_staging: block m's dQ product has completed (into `dq`); free its dS^T buffer and
  /// write `dq` into the staging buffer once the reduction has read the previous block's.
  __device__ __forceinline__ void stage_dq(uint32_t m, const float (&dq)[D / 2]) const {
    this->s.ds_empty[m & 1].arrive();
    // The reduction has read the previous block's dQ (the other warpgroup's): block m - 1 is its barrier's
    // ((m - 1) / 2)-th phase. This warpgroup's own block m - 2 waited for m - 3, so it is at most one phase ahead.
    if (m > 0) this->s.dq_empty[(m - 1) & 1].wait(((m - 1) >> 1) & 1);
    trace.stamp(m, 11);
    uint8_t* stage = this->s.dq_stage();
    const int warp = this->tid / 32;
    // Odd rows take column group g ^ 2 (element pair i ^ 8) where even rows take g: no two rows of a half-warp
    // then share a 16-byte chunk of the swizzle (TILEWISE_HOPPER_BWD_STAGE_PERMUTE, bwd_params.cuh).
    constexpr bool kPermute =
        TILEWISE_HOPPER_BWD_STAGE_PERMUTE == 2 || (TILEWISE_HOPPER_BWD_STAGE_PERMUTE == 1 && D < 128);
    const bool odd = kPermute && ((lane() / 4) & 1);
#pragma unroll
    for (int i = 0; i < ((kAblate & 1024) ? 2 : D / 2); i += 2) {  // (measurement only: one store, dq stays live)
      const int j = odd ? (i ^ 8) : i;
      const uint32_t r = 16 * warp + lane() / 4 + 8 * ((i % 4) / 2), c = 8 * (j / 4) + 2 * (lane() % 4);
      st_shared_f2(stage + Traits::dq_stage_bytes(r, c),
                   odd ? dq[i ^ 8] : dq[i], odd ? dq[(i ^ 8) + 1] : dq[i + 1]);
    }
    fence_proxy_async();
    this->s.dq_full->arrive();
    trace.stamp(m, 12);
  }

  /// The dK/dV kernels' item: dkdv (dK and dV) or dkdvq_reduce (and dQ through the staging buffer, a block later;
  /// `blocks` counts this CTA's streamed blocks across items, which numbers the dS ring and the staging buffer's
  /// turns).
  template <BwdKernel kKernel>
  __device__ __forceinline__ void dkdv_item(const WorkItem& item, uint32_t record, typename Base::KPipe& ks,
                                            typename Base::VPipe& vs, uint32_t& blocks) const {
    constexpr bool kReduce = reduces_dq(kKernel);
    static_assert(!kReduce || kHalves == 1, "the reduce kernel streams 64-row blocks");
    const BwdParams& p = bp;
    // The reduce kernel frees the owned K only after the item's last dQ product (below), not with its last block.
    auto release_block = [&](const BlockInfo& bi) {
      BlockInfo kept = bi;
      if constexpr (kReduce) kept.flags &= ~BlockInfo::kLast;
      release_stages(kept, ks, vs);
    };
    int64_t pending = -1;  // kReduce: the block whose dQ is still to be computed
    // kTmaStores: the item before's staged dK / dV rows read out of this warp's bytes. Only the copying lanes wait; no
    // other lane of the warp rewrites those bytes before the first block's dS^T store, behind the S^T and dP^T wgmmas,
    // which no lane passes before all have issued them. (A __syncwarp here moved ptxas's register allocation and put
    // 5 STL and 8 LDL into the block loop.)
    if constexpr (kReduce && kTmaStores) tma_store_wait_read();
    const OwnedRows rows = owned_rows(item, record);
    if constexpr (kReduce) trace.stamp_item(record, 2);
    float dk[D / 2], dv[D / 2];
    OwnedK owned_k;  // the A operands of S^T and dP^T held in registers (kOwnedKSteps, kOwnedVSteps)
    OwnedV owned_v;
    start_item(dk, dv, owned_k, owned_v);
    if constexpr (kReduce) trace.stamp_item(record, 3), trace.put_item(record, 4, blocks - trace.block_base);
    // kIssueFirst: an item with no streamed block (its one record is empty) is freed here, so that the loop below
    // may issue a block's first GEMMs before it has read the block's record.
    constexpr bool kIssueFirst = kReduce && kIssueGemmsFirst;
    if (kIssueFirst && !streams_any(p, item)) {
      BlockInfo bi;
      bool last;
      next_block(bi, last, ks, vs, release_block);
    } else {
      for (bool last = false; !last;) {
        BlockInfo bi{};  // (with kIssueFirst read after the GEMMs are issued)
        if constexpr (kReduce) trace.stamp(0);
        if constexpr (kIssueFirst)
          wait_stages(ks, vs);
        else if (!next_block(bi, last, ks, vs, release_block))
          continue;
        if constexpr (kReduce) trace.stamp(1);
        const float* stats = block_stats(ks, vs);  // lse2[kStreamRows], D[kStreamRows]
        // What the record implies for the masks: in the reduce kernel worked out after the GEMMs are issued (with
        // kIssueFirst the record itself is read then), in the dK/dV kernel before.
        bool frames;
        const HeadParams* hp;
        D3 qbox;
        auto read_record = [&] {
          frames = kFrameMask && (bi.flags & BlockInfo::kFrames);
          hp = &p.heads[item.head * p.kv_group + static_cast<int32_t>(bi.flags >> BlockInfo::kHeadShift)];
          qbox = p.cls[bi.tile_class()].box;
        };
        if constexpr (!kReduce) read_record();
        const uint32_t k_st = uniform_desc(ks.stage() * kStageDesc), v_st = uniform_desc(vs.stage() * kStageDesc);
  #pragma unroll
        for (int half = 0; half < kHalves; ++half) {
          const uint32_t row_off = 64 * half * kRowDesc;
          float sc[32], dp[32];
          constexpr bool kEarlyStats = kReduce;
          const float* cols = stats + 64 * half + 2 * (lane() % 4);
          float2 col_stats[8];  // kEarlyStats: lse2 of this thread's columns, then their D
          if constexpr (kEarlyStats) load_col_stats(col_stats, cols);
          wgmma_fence();
          scores_t(sc, owned_k, this->k_lo + k_st + row_off);
          wgmma_commit();
          dprobs_t(dp, owned_v, vk_lo + v_st + row_off);
          wgmma_commit();
          if constexpr (kReduce) trace.stamp(2);
          if constexpr (kIssueFirst) {  // (kHalves == 1)
            bi = this->info(ks.stage());
            last = bi.flags & BlockInfo::kLast;
          }
          if constexpr (kReduce) read_record();
          // P^T of this thread's 32 entries, then dS^T = P^T (dP^T - D). The columns' statistics come two at a time
          // from shared memory. The reduce kernel loads them into registers before the wgmmas that precede their use
          // are issued (lse2 before S^T and dP^T, D before dV): a shared-memory load issued behind the tensor core's
          // operand reads took 100+ cycles, and the first exponential waited for it (v3.7: loaded before the waits,
          // 76.2 -> 74.8 ms; v3.17: before the issues, row 1 -3.6%, Open-Sora-Plan D 96 -1%). The dK/dV kernel, two
          // halves a block, then spills them in its loop and loses 10% (45.5 -> 50.0 ms): it loads each pair where it
          // is used.
          auto col_stat = [&](int k, const float* late) {
            if constexpr (kEarlyStats)
              return col_stats[k];
            else
              return ld_shared_f2(late + 8 * k);
          };
          auto probabilities_t = [&] {
            probabilities_of_block(sc, [&](int k) { return col_stat(k, cols); }, rows, bi, frames, *hp, qbox, half);
          };
          auto score_gradients = [&] {
            score_gradients_of_block(dp, sc, [&](int k) { return col_stat(k, cols + Traits::kStreamRows); });
          };
          uint32_t pa[4][4], da[4][4];
          // P^T while dP^T runs; dV += P^T dO while dS^T is computed
          wgmma_wait<1>();
          fence_regs(sc);
          if constexpr (kReduce) trace.stamp(3);
          if (!(kAblate & 1)) probabilities_t();
          if constexpr (kEarlyStats) load_col_stats(col_stats, cols + Traits::kStreamRows);
          if constexpr (kReduce) trace.stamp(4);
          pack_operand<4>(sc, pa, kType == WgType::bf16);
          wgmma_fence();
          if (!(kAblate & 4)) gemm_rs<4>(dv, pa, this->v_lo + v_st + row_off);
          wgmma_commit();
          wgmma_wait<1>();  // dP^T (the dV product may still run)
          fence_regs(dp);
          if constexpr (kReduce) trace.stamp(5);
          if (!(kAblate & 1)) score_gradients();
          if constexpr (kReduce) store_block_ds(dp, blocks), trace.stamp(6);
          pack_operand<4>(dp, da, kType == WgType::bf16);
          wgmma_fence();
          if (!(kAblate & 4)) gemm_rs<4>(dk, da, km_lo + k_st + row_off);
          wgmma_commit();
          // This block's dS^T is in ring buffer blocks % 2, fenced for the dQ product's async-proxy reads (dK takes its
          // operand from registers, so the buffer is complete once stored): announced while dK runs (v3.17; after dK's
          // wait it cost row 1 0.9% more).
          if constexpr (kReduce) {
            fence_proxy_async();
            this->s.ds_full[blocks & 1].arrive();
          }
          wgmma_wait<0>();
          fence_regs(dv);
          fence_regs(dk);
          if constexpr (kReduce) trace.stamp(7);
        }
        if constexpr (kReduce) {
          // The previous block's dQ, if it is this warpgroup's turn, is computed now, when the other warpgroup has long
          // written its half.
          release_block(bi);
          trace.stamp(8);
          const bool turn = pending >= 0 && (pending & 1) == this->wg;
          if (turn) dq_to_staging(static_cast<uint32_t>(pending));
          trace.put(13, (record << 8) | (uint32_t{turn} << 1) | uint32_t{last});
          trace.next_block();
          pending = blocks++;
        } else {
          release_stages(bi, ks, vs);
        }
      }
    }
    if constexpr (kReduce) {  // the item's last dQ, then the owned K and V are free (release_s_operands' arrival)
      trace.stamp_item(record, 5);
      if ((kAblate & 512) && lane() == 0) this->s.q_empty->arrive();  // measurement only: before (bwd_params.cuh)
      if (pending >= 0 && (pending & 1) == this->wg) dq_to_staging(static_cast<uint32_t>(pending));
      if (!(kAblate & 512) && lane() == 0) this->s.q_empty->arrive();
      // kStoresAfterLastDq: the stores wait for the item's release (phase `record` of q_empty), so that they do not
      // slow the last dQ turn's staging, which the release and the next item's owned loads wait for
      if constexpr (kStoresAfterLastDq) this->s.q_empty->wait(record & 1);
      trace.stamp_item(record, 6);
    }
    if constexpr (kReduce && kTmaStores) {
      store_staged(false, item, record, rows.pos, item.head, dk, p.grad0_scale, p.grad0, p.grad0_strides);
      trace.stamp_item(record, 8);
      // dV into the staging buffer, once the reducer has read the last dQ turn staged there out
      if (blocks > 0) this->s.dq_empty[(blocks - 1) & 1].wait(((blocks - 1) >> 1) & 1);
      trace.stamp_item(record, 9);
      store_staged(true, item, record, rows.pos, item.head, dv, 1.f, p.grad1, p.grad1_strides);
    } else {
      store(item, rows.pos, item.head, dk, p.grad0_scale, p.grad0, p.grad0_strides);
      store(item, rows.pos, item.head, dv, 1.f, p.grad1, p.grad1_strides);
    }
    release_rows(record);
    if constexpr (kReduce) trace.stamp_item(record, 7);
  }

  /// The reduce kernel's item with the dK wait deferred (TILEWISE_HOPPER_BWD_REDUCE_OVERLAP=1; dkdv_item otherwise):
  /// a block's dK is not waited for at the block's end; on this warpgroup's dQ turn the previous block's dQ product
  /// is issued behind it, so the tensor cores hold queued work while this warpgroup frees the block's stages, and the
  /// dQ is staged once both have landed (the v3.7 stall sampling: the consumers wait on their own per-block chain).
  /// D 64 and 96 only: at D 128, dK, dV, the dQ accumulator and dK's operand do not fit beside each other (ptxas
  /// serialises the wgmmas "due to insufficient register resources").
  /// Tried and dropped: the next block's S^T and dP^T issued before the dK wait. ptxas serialises it (C7518) unless
  /// no lane-dependent branch (stage releases, block records) and no "maybe in flight" wgmma remain around it; made
  /// to compile at D 128 with dK's dS^T read from the ring (v3.11), it was 5% slower (docs/performance.md).
  __device__ __forceinline__ void reduce_item(const WorkItem& item, uint32_t record, typename Base::KPipe& ks,
                                              typename Base::VPipe& vs, uint32_t& blocks) const {
    const BwdParams& p = bp;
    constexpr bool bf16 = kType == WgType::bf16;
    const OwnedRows rows = owned_rows(item, record);
    auto release_block = [&](BlockInfo bi) {  // the owned K is freed after the item's last dQ product
      bi.flags &= ~BlockInfo::kLast;
      release_stages(bi, ks, vs);
    };
    float dk[D / 2], dv[D / 2];
    OwnedK owned_k;  // the A operands of S^T and dP^T held in registers (kOwnedKSteps, kOwnedVSteps)
    OwnedV owned_v;
    start_item(dk, dv, owned_k, owned_v);
    int64_t pending = -1;  // the block whose dQ is still to be computed
    for (bool last = false; !last;) {
      BlockInfo bi;
      if (!next_block(bi, last, ks, vs, release_block)) continue;
      float sc[32], dp[32];
      const uint32_t k_st = uniform_desc(ks.stage() * kStageDesc), v_st = uniform_desc(vs.stage() * kStageDesc);
      const float* cols = block_stats(ks, vs) + 2 * (lane() % 4);  // lse2[64], D[64]
      float2 cs[8];  // lse2, then D, of this thread's columns: loaded before the issues (dkdv_item says why)
      load_col_stats(cs, cols);
      wgmma_fence();
      scores_t(sc, owned_k, this->k_lo + k_st);
      wgmma_commit();
      dprobs_t(dp, owned_v, vk_lo + v_st);
      wgmma_commit();
      const int32_t head = item.head * p.kv_group + static_cast<int32_t>(bi.flags >> BlockInfo::kHeadShift);
      wgmma_wait<1>();
      fence_regs(sc);
      probabilities_of_block(sc, [&](int k) { return cs[k]; }, rows, bi,
                             kFrameMask && (bi.flags & BlockInfo::kFrames), p.heads[head],
                             p.cls[bi.tile_class()].box, 0);
      uint32_t pa[4][4], da[4][4];
      load_col_stats(cs, cols + Traits::kStreamRows);
      pack_operand<4>(sc, pa, bf16);
      wgmma_fence();
      gemm_rs<4>(dv, pa, this->v_lo + v_st);
      wgmma_commit();
      wgmma_wait<1>();  // dP^T (dV may still run)
      fence_regs(dp);
      score_gradients_of_block(dp, sc, [&](int k) { return cs[k]; });
      store_block_ds(dp, blocks);
      pack_operand<4>(dp, da, bf16);
      wgmma_fence();
      gemm_rs<4>(dk, da, km_lo + k_st);
      wgmma_commit();
      fence_proxy_async();  // this block's dS^T, for the dQ product's async-proxy reads
      this->s.ds_full[blocks & 1].arrive();
      // `turn` is warp-uniform; the shuffle from lane 0 lets ptxas see that around the wgmmas (a wait in one branch
      // for a wgmma issued in another, or a branch that looks divergent, makes it serialise them all: C7518).
      if (__shfl_sync(0xffffffffu, pending >= 0 && (pending & 1) == this->wg, 0)) {
        float dq[D / 2];
        wgmma_wait<1>();  // dV (long done): its operand registers are free for the dQ accumulator
        this->s.ds_full[pending & 1].wait((pending >> 1) & 1);
        issue_dq_product(dq, static_cast<int>(pending & 1));
        wgmma_wait<1>();  // dK
        fence_regs(dk);
        fence_regs(dv);
        release_block(bi);
        wgmma_wait<0>();
        fence_regs(dq);
        stage_dq(static_cast<uint32_t>(pending), dq);
      } else {
        wgmma_wait<0>();
        fence_regs(dk);
        fence_regs(dv);
        release_block(bi);
      }
      pending = blocks++;
    }
    if (pending >= 0 && (pending & 1) == this->wg) dq_to_staging(static_cast<uint32_t>(pending));
    if (lane() == 0) this->s.q_empty->arrive();  // the owned K and V are free
    store(item, rows.pos, item.head, dk, p.grad0_scale, p.grad0, p.grad0_strides);
    store(item, rows.pos, item.head, dv, 1.f, p.grad1, p.grad1_strides);
    release_rows(record);
  }

  /// An item none of whose rows are this warpgroup's: releases the stages the producer counts on.
  __device__ __forceinline__ void idle_item(typename Base::KPipe& ks, typename Base::VPipe& vs) const {
    for (bool last = false; !last;) {
      const BlockInfo bi = acquire(ks, vs);
      last = bi.flags & BlockInfo::kLast;
      release_stages(bi, ks, vs);
    }
  }

  /// A cluster's item with none of this CTA's rows (a spare slot of a smaller tile, text past its length): the
  /// peers multicast the unit's blocks into this CTA's stages too, so it takes and frees each one (the owned blocks
  /// were not loaded: no release of them).
  __device__ __forceinline__ void passive_item(typename Base::KPipe& ks, typename Base::VPipe& vs) const {
    for (bool last = false; !last;) {
      BlockInfo bi = acquire(ks, vs);
      last = bi.flags & BlockInfo::kLast;
      bi.flags &= ~BlockInfo::kLast;
      release_stages(bi, ks, vs);
    }
  }

  /// The work loop of the three kernels (BwdKernel): items per query head (dQ) or per kv head (dK/dV), or in
  /// clusters this CTA's items of the tiles' units.
  template <BwdKernel kKernel>
  __device__ void run() const {
    constexpr int kCluster = Traits::kCluster;
    typename Base::KPipe ks;
    typename Base::VPipe vs;
    WorkRing<typename Traits::Shared, kCluster> ring{this->s, this->rank};
    uint32_t items = 0, blocks = 0;  // blocks: dkdvq_reduce's streamed blocks (dkdv_item)
    const int32_t heads = kKernel == BwdKernel::dq ? bp.q_heads : bp.kv_heads;
    const int32_t units = scheduled_units<kCluster>(bp, heads);
    for (int32_t u; (trace.stamp_item(items, 0), u = __shfl_sync(0xffffffffu, ring.consume(), 0)) < units;) {
      trace.unit(u, items);
      constexpr bool kHeavyFirst = kKernel != BwdKernel::dq && TILEWISE_HOPPER_BWD_HEAVY_FIRST != 0;
      const WorkItem item = scheduled_item<kCluster, Traits::kBlockM, kHeavyFirst>(bp, u, this->rank, heads);
      if (item.empty) {
        if constexpr (kCluster > 1) passive_item(ks, vs);
        continue;
      }
      this->s.q_full->wait(items & 1);
      trace.stamp_item(items, 1);
      ++items;
      // A warpgroup none of whose rows are real (a small box) only releases the stages the producer counts on;
      // not in the reduce kernel, whose dQ products need both warpgroups (their unreal rows have zero dS).
      const uint32_t record = items - 1;  // the item's row record (dK/dV kernels)
      if (!reduces_dq(kKernel) && 64 * this->wg >= query_rows<Traits::kBlockM>(bp, item.q)) {
        idle_item(ks, vs);
        if constexpr (kKernel != BwdKernel::dq) release_rows(record);  // (its rows unread: every warp arrives)
        continue;
      }
      if constexpr (kKernel == BwdKernel::dq)
        dq_item(item, ks, vs);
      else if constexpr (reduces_dq(kKernel) && kReduceOverlap)
        reduce_item(item, record, ks, vs, blocks);
      else
        dkdv_item<kKernel>(item, record, ks, vs, blocks);
    }
    if constexpr (kTmaStores) tma_store_wait_all();  // (kTmaStores: the last item's copies, before the CTA ends)
  }
};

}  // namespace tilewise::hopper
