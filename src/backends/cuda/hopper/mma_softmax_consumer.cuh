// Consumer: each consumer warpgroup (two or three) owns 64 query rows of the work item. Per key block j it runs
// S_j = Q K_j^T (wgmma, both operands in shared memory), masks only ragged or pattern-masked blocks, updates
// the online softmax in registers, and accumulates O += P V (wgmma, P from registers, V MN-major in smem).
//
// Overlap (as in FlashAttention-3): S_j and P_{j-1} V_{j-1} are issued together, and the softmax of S_j runs
// while P_{j-1} V_{j-1} is still on the tensor cores (intra-warpgroup); the two warpgroups take turns issuing
// their GEMMs through a pair of named barriers, so one's softmax overlaps the other's GEMMs (ping-pong).
#pragma once

#include "backends/cuda/hopper/epilogue.cuh"
#include "backends/cuda/hopper/kernel_traits.cuh"
#include "backends/cuda/hopper/masks.cuh"
#include "backends/cuda/hopper/tile_scheduler.cuh"
#include "backends/cuda/hopper/wgmma_ops.cuh"

namespace tilewise::hopper {

constexpr uint32_t kSchedulerBarrier = 2;  // + warpgroup index: "your turn to issue GEMMs"

// Online softmax keeps a row's running max stale until a block raises it by more than this (log2 units), so P
// stays below 2^8 and most blocks skip the rescale of O (exact: O and the row sum share the stale max).
constexpr float kRescaleThreshold = 8.f;

template <class Traits, WgType kType>
struct Consumer {
  static constexpr int D = Traits::D;
  static constexpr int kSteps = kBlockN / 16;  // k16 steps of the P V product
  static constexpr uint32_t kStageDesc = Traits::kTileBytes >> 4;  // descriptor units between two stages
  const FwdParams& p;
  const typename Traits::Shared& s;
  int wg;    // consumer warpgroup: query rows [64 * wg, 64 * wg + 64) (warp-uniform, see fwd_kernel)
  int tid;   // thread within the warpgroup
  uint32_t rank;  // CTA within the cluster
  // Descriptor words of the Q buffer (this warpgroup's rows) and of stage 0 of K and V. Each wgmma then adds a
  // compile-time offset (plus the stage's) to the low word: no per-block descriptor arithmetic.
  uint32_t q_lo, k_lo, v_lo, kq_hi, v_hi;

  __device__ __forceinline__ Consumer(const FwdParams& p_, const typename Traits::Shared& s_, int wg_, int tid_,
                                      uint32_t rank_)
      : p(p_), s(s_), wg(wg_), tid(tid_), rank(rank_) {
    const uint64_t q = make_desc(smem_addr(s.q) + 64 * wg * Traits::kRowBytes, 16, 8 * Traits::kRowBytes,
                                 Traits::kRowBytes);
    const uint64_t k = make_desc(smem_addr(s.k(0)), 16, 8 * Traits::kRowBytes, Traits::kRowBytes);
    // V is [keys x D] with D contiguous: an MN-major B operand. Leading offset = next panel of columns,
    // stride offset = next 8 key rows.
    const uint64_t v = make_desc(smem_addr(s.v(0)), Traits::kPanelBytes, 8 * Traits::kRowBytes, Traits::kRowBytes);
    q_lo = static_cast<uint32_t>(q), k_lo = static_cast<uint32_t>(k), v_lo = static_cast<uint32_t>(v);
    kq_hi = static_cast<uint32_t>(q >> 32), v_hi = static_cast<uint32_t>(v >> 32);
  }

  /// The producer's record of the block in `stage`. Lane 0 reads it and broadcasts it: lane 0 is also the
  /// thread whose arrival releases the stage, so the read is ordered before the producer's next write.
  __device__ __forceinline__ BlockInfo info(int stage) const {
    uint4 v{};
    if (lane() == 0) v = ld_shared_v4(s.info + stage);
    return {__shfl_sync(0xffffffffu, v.x, 0), static_cast<int32_t>(__shfl_sync(0xffffffffu, v.y, 0)),
            static_cast<int32_t>(__shfl_sync(0xffffffffu, v.z, 0)),
            static_cast<int32_t>(__shfl_sync(0xffffffffu, v.w, 0))};
  }

  static __device__ __forceinline__ uint64_t desc(uint32_t lo, uint32_t hi) {
    return (static_cast<uint64_t>(hi) << 32) | lo;
  }
  __device__ __forceinline__ int lane() const { return tid % 32; }
  /// Row (within the query block) of this thread's accumulator rows rr = 0 and rr = 1 (+8).
  __device__ __forceinline__ int row(int rr) const { return 64 * wg + 16 * (tid / 32) + lane() / 4 + 8 * rr; }

  /// Frees a pipeline stage once this warp's wgmma reading it has completed. One arrival per warp (not per
  /// warpgroup): each warp's lane 0 also read the stage's BlockInfo, and its own arrival is what orders that
  /// read before the producer's next write of the record (compute-sanitizer racecheck checks exactly this).
  /// In a cluster, a stage's empty barrier counts the releases of all its CTAs: in a shared unit this warp arrives on
  /// its own CTA's and on each peer's (whose loaders multicast into this CTA's stages), otherwise kCluster times on
  /// its own.
  __device__ __forceinline__ void release(Barrier& empty, bool shared) const {
    if (lane() != 0) return;
    if (Traits::kCluster > 1 && shared) {
      empty.arrive();
#pragma unroll
      for (uint32_t r = 1; r < Traits::kCluster; ++r) empty.arrive_remote((rank + r) % Traits::kCluster);
    } else {
      empty.arrive(Traits::kCluster);
    }
  }

  /// Once S of the block in `stage` is computed, its K stage is free, and after the item's last block so is Q:
  /// the producer loads the next item's Q while this one's last P V and output store still run.
  __device__ __forceinline__ void release_s_operands(int stage, const BlockInfo& bi, bool shared) const {
    release(s.k_empty[stage], shared);
    if ((bi.flags & BlockInfo::kLast) && lane() == 0) s.q_empty->arrive();
  }

  /// A ring of turns among the consumer warpgroups, on the named barriers kFirst + warpgroup: waits for this
  /// warpgroup's turn, and hands it to the next warpgroup of the ring (the other one of two; written apart so that
  /// the two-warpgroup kernels keep the machine code they were measured with).
  template <uint32_t kFirst>
  __device__ __forceinline__ void turn_sync() const { named_barrier_sync(kFirst + wg, 256); }
  template <uint32_t kFirst>
  __device__ __forceinline__ void turn_arrive() const {
    const int next = Traits::kConsumerWarpgroups == 2 ? 1 - wg : (wg + 1) % Traits::kConsumerWarpgroups;
    named_barrier_arrive(kFirst + next, 256);
  }
  /// The ring of GEMM issues (the overlapped schedule).
  __device__ __forceinline__ void scheduler_sync() const { turn_sync<kSchedulerBarrier>(); }
  __device__ __forceinline__ void scheduler_arrive() const { turn_arrive<kSchedulerBarrier>(); }

  /// Sets the scores of keys this block's rows may not see to -inf, for blocks the producer flagged (masks.cuh).
  __device__ __forceinline__ void mask_scores(float (&sc)[kBlockN / 2], const BlockInfo& bi, int32_t text_len,
                                              const WorkItem& item) const {
    const KeyMask mask = KeyMask::of<Traits::kQueryRuns>(p, bi, text_len, lane());
    if (mask.active) {
      mask.apply(sc, lane());
      if (mask.frames) mask_frames(sc, p, item, bi, lane(), [&](int rr) { return row(rr); });
    }
  }

  /// Masks S (when flagged) and runs one online-softmax step: S becomes P (unnormalised, base 2, relative to
  /// the running max), and the row sums are updated. Returns whether any row of this warp raised its max past
  /// the threshold; then O must be multiplied by `corr` (1 for the rows that kept theirs).
  __device__ __forceinline__ bool softmax(float (&sc)[kBlockN / 2], const BlockInfo& bi, int32_t text_len,
                                          const WorkItem& item, float (&m_run)[2], float (&l_run)[2],
                                          float (&corr)[2]) const {
    mask_scores(sc, bi, text_len, item);
    bool rescale = false;
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < kBlockN / 2; ++i)
        if ((i % 4) / 2 == rr) mx = fmaxf(mx, sc[i]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = mx * p.scale_log2;
      corr[rr] = 1.f;
      if (m_new > m_run[rr] + kRescaleThreshold) {  // also true for the first finite max (m_run = -inf)
        corr[rr] = fast_exp2(m_run[rr] - m_new);
        m_run[rr] = m_new;
        rescale = true;
      }
      const float m_use = m_run[rr] == -INFINITY ? 0.f : m_run[rr];  // a row with no valid key yet stays at zero
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kBlockN / 2; ++i)
        if ((i % 4) / 2 == rr) {
          const float x = fmaf(sc[i], p.scale_log2, -m_use);
          sc[i] = fast_exp2(x);
          sum += sc[i];
        }
      l_run[rr] = l_run[rr] * corr[rr] + sum;
    }
    return __any_sync(0xffffffffu, rescale);
  }

  __device__ __forceinline__ void rescale_o(float (&o)[D / 2], const float (&corr)[2]) const {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] *= corr[(i % 4) / 2];
  }

  /// P as the A operand of the P V product: k16 step j covers accumulator chunks 2j and 2j+1.
  __device__ __forceinline__ void to_operand(const float (&sc)[kBlockN / 2], uint32_t (&pa)[kSteps][4]) const {
#pragma unroll
    for (int j = 0; j < kSteps; ++j)
#pragma unroll
      for (int x = 0; x < 4; ++x) pa[j][x] = pack_half2(sc[8 * j + 2 * x], sc[8 * j + 2 * x + 1], kType == WgType::bf16);
  }

  __device__ __forceinline__ void issue_s(float (&sc)[kBlockN / 2], int stage) const {
    issue_s_at(sc, k_lo + stage * kStageDesc);
  }
  /// issue_s with the K stage's descriptor word given (the backward's dQ kernel passes it warp-uniform).
  __device__ __forceinline__ void issue_s_at(float (&sc)[kBlockN / 2], uint32_t k_stage) const {
#pragma unroll
    for (int panel = 0; panel < Traits::kPanels; ++panel)
#pragma unroll
      for (int kk = 0; kk < Traits::kPanelCols / 16; ++kk) {
        const uint32_t q_off = (panel * Traits::kQPanelBytes + kk * 32) >> 4;
        const uint32_t k_off = (panel * Traits::kPanelBytes + kk * 32) >> 4;
        Wgmma<kType, kBlockN>::template ss<0>(sc, desc(q_lo + q_off, kq_hi), desc(k_stage + k_off, kq_hi),
                                               panel + kk > 0);
      }
  }
  __device__ __forceinline__ void issue_pv(float (&o)[D / 2], const uint32_t (&pa)[kSteps][4], int stage) const {
    const uint32_t v_stage = v_lo + stage * kStageDesc;
#pragma unroll
    for (int j = 0; j < kSteps; ++j)
      WgmmaRS<kType, D>::template rs<1>(o, pa[j], desc(v_stage + ((j * 16 * Traits::kRowBytes) >> 4), v_hi), 1);
  }

  using KPipe = PipeState<Traits::kKStages>;
  using VPipe = PipeState<Traits::kVStages>;

  /// All key blocks of one work item, FA3-style: S_j and P_{j-1} V_{j-1} are issued together, the softmax of S_j
  /// runs while P_{j-1} V_{j-1} is on the tensor cores, and the warpgroups take turns issuing.
  __device__ __forceinline__ void mainloop_overlapped(const WorkItem& item, int32_t text_len, bool shared, KPipe& ks,
                                                      VPipe& vs, float (&o)[D / 2], float (&m_run)[2],
                                                      float (&l_run)[2]) const {
    float sc[kBlockN / 2], corr[2];
    uint32_t pa[kSteps][4];
    // Block 0: S_0 alone (O is still zero: no rescale).
    s.k_full[ks.stage()].wait(ks.phase());
    BlockInfo bi = info(ks.stage());
    scheduler_sync();
    wgmma_fence();
    issue_s(sc, ks.stage());
    wgmma_commit();
    scheduler_arrive();
    wgmma_wait<0>();
    fence_regs(sc);
    release_s_operands(ks.stage(), bi, shared);
    ks.advance();
    softmax(sc, bi, text_len, item, m_run, l_run, corr);
    to_operand(sc, pa);

    // Blocks 1..n-1: S_j together with P_{j-1} V_{j-1}; softmax of S_j while P V runs.
    while (!(bi.flags & BlockInfo::kLast)) {
      s.k_full[ks.stage()].wait(ks.phase());
      bi = info(ks.stage());
      if (!TILEWISE_HOPPER_V_WAIT_AFTER_S) s.v_full[vs.stage()].wait(vs.phase());
      if (!(TILEWISE_HOPPER_ABLATE & 8)) scheduler_sync();
      wgmma_fence();
      if (!(TILEWISE_HOPPER_ABLATE & 4)) issue_s(sc, ks.stage());
      wgmma_commit();
      if (TILEWISE_HOPPER_V_WAIT_AFTER_S) s.v_full[vs.stage()].wait(vs.phase());  // V_{j-1} lands while S_j runs
      if (!(TILEWISE_HOPPER_ABLATE & 2)) issue_pv(o, pa, vs.stage());
      wgmma_commit();
      if (!(TILEWISE_HOPPER_ABLATE & 8)) scheduler_arrive();
      wgmma_wait<1>();  // S_j is ready; P_{j-1} V_{j-1} may still run
      fence_regs(sc);
      release_s_operands(ks.stage(), bi, shared);
      ks.advance();
      const bool rescale =
          (TILEWISE_HOPPER_ABLATE & 1) ? false : softmax(sc, bi, text_len, item, m_run, l_run, corr);
      // Only now wait for P_{j-1} V_{j-1}: the row sums are the softmax's last result.
      if constexpr (TILEWISE_HOPPER_LATE_PV_WAIT)
        wgmma_wait_after<0>((__float_as_uint(l_run[0]) | __float_as_uint(l_run[1])) & p.opaque_zero);
      else
        wgmma_wait<0>();
      fence_regs(o);
      release(s.v_empty[vs.stage()], shared);
      vs.advance();
      if (rescale) rescale_o(o, corr);
      to_operand(sc, pa);
    }

    // Last P V.
    s.v_full[vs.stage()].wait(vs.phase());
    scheduler_sync();
    wgmma_fence();
    issue_pv(o, pa, vs.stage());
    wgmma_commit();
    scheduler_arrive();
    wgmma_wait<0>();
    fence_regs(o);
    release(s.v_empty[vs.stage()], shared);
    vs.advance();
  }

  /// All key blocks of one work item, one GEMM at a time (the two warpgroups still overlap each other).
  __device__ __forceinline__ void mainloop_sequential(const WorkItem& item, int32_t text_len, bool shared, KPipe& ks,
                                                      VPipe& vs, float (&o)[D / 2], float (&m_run)[2],
                                                      float (&l_run)[2]) const {
    float sc[kBlockN / 2], corr[2];
    uint32_t pa[kSteps][4];
    for (bool last = false; !last;) {
      s.k_full[ks.stage()].wait(ks.phase());
      const BlockInfo bi = info(ks.stage());
      last = bi.flags & BlockInfo::kLast;
      wgmma_fence();
      issue_s(sc, ks.stage());
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(sc);
      release_s_operands(ks.stage(), bi, shared);
      ks.advance();
      if (softmax(sc, bi, text_len, item, m_run, l_run, corr)) rescale_o(o, corr);
      to_operand(sc, pa);
      s.v_full[vs.stage()].wait(vs.phase());
      wgmma_fence();
      issue_pv(o, pa, vs.stage());
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(o);
      release(s.v_empty[vs.stage()], shared);
      vs.advance();
    }
  }

  /// The key blocks of an item none of whose rows are this warpgroup's (a cut tile's box, the last text rows): no
  /// GEMM, only the stage releases the producer counts on. Each stage is waited for first, so a release always
  /// belongs to the stage's current use.
  __device__ __forceinline__ void mainloop_idle(bool shared, KPipe& ks, VPipe& vs) const {
    for (bool last = false; !last;) {
      s.k_full[ks.stage()].wait(ks.phase());
      const BlockInfo bi = info(ks.stage());
      last = bi.flags & BlockInfo::kLast;
      release_s_operands(ks.stage(), bi, shared);
      ks.advance();
      s.v_full[vs.stage()].wait(vs.phase());
      release(s.v_empty[vs.stage()], shared);
      vs.advance();
    }
  }

  __device__ void run() const {
    uint32_t items = 0;
    KPipe ks;
    VPipe vs;
    StageAlignment<Traits::kCluster> alignment;  // the pipes restart where the loaders' do
    WorkRing<typename Traits::Shared, Traits::kCluster> ring{s, rank};
    if (Traits::kOverlap && wg == 1) scheduler_arrive();  // warpgroup 0 issues first
    // The shuffle tells the compiler the unit (and all decoded from it) is warp-uniform: branches on it must not
    // look divergent around wgmma (ptxas would serialise every wgmma, C7520).
    for (int32_t u; (u = __shfl_sync(0xffffffffu, ring.consume(), 0)) < num_units<Traits::kCluster>(p);) {
      const UnitWork uw = decode_unit<Traits::kCluster, Traits::kBlockM, Traits::kQueryRuns>(p, u, rank);
      if (alignment.restart_before(uw)) ks.restart(), vs.restart();
      const WorkItem& item = uw.item;
      if (item.empty) continue;
      const int32_t text_len = text_len_of(p, item.batch);
      float o[D / 2];
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
      float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
      s.q_full->wait(items & 1);

      if constexpr (Traits::kOverlap) {
        mainloop_overlapped(item, text_len, uw.shared, ks, vs, o, m_run, l_run);
      } else {
        // The sequential warpgroups run independently, so one with no real rows can skip its GEMMs.
        if (64 * wg >= query_rows<Traits::kBlockM, Traits::kQueryRuns>(p, item.q))
          mainloop_idle(uw.shared, ks, vs);
        else
          mainloop_sequential(item, text_len, uw.shared, ks, vs, o, m_run, l_run);
      }
      Epilogue<Traits, kType>{p, s, wg, tid}.store(item, o, m_run, l_run);
      ++items;
    }
    if (wg == 0 && tid == 0) tma_store_wait_all();  // the last output box must land before the CTA retires
  }
};

}  // namespace tilewise::hopper
