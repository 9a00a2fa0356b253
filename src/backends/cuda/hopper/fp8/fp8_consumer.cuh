// The FP8 forward's consumer (docs/semantics.md §11.4): each consumer warpgroup owns 64 query rows of the work item.
// Per key block: S = Q K^T on e4m3 operands from shared memory (wgmma k32), the block's mask, precision fp8's
// online softmax step (Fp8Softmax: integer running maximum, P in e4m3 against it, l of the e4m3 values), and
// O += P V with P packed from the accumulator as it lies and V^T from the V ring (already in that key order).
// The scores' scale is per (row, block): the softmax scale times the row's q scale times the block's k scale;
// the output's is per channel (V's scales), applied once in the epilogue with 1 / l. The row sums l come out of the
// P V product itself (TILEWISE_HOPPER_FP8_ONES): 8 rows of ones under each V^T stage make 8 more accumulator
// columns, each the sum of the e4m3 P the tensor cores used, rescaled with O for free.
// One GEMM at a time per warpgroup (the bf16 forward's sequential schedule); the warpgroups overlap each other
// (three of them: 192-row items at D 128), each issuing its GEMMs when it is ready. A ring of turns (each warpgroup
// issuing in turn, as the bf16 forward's ping-pong does) was 1.5% faster before the key block's index left the chain,
// and 7.7% slower after it (performance.md, FP8 v6 and v9): it is gone.
//
// Each block's P V goes into a fresh accumulator, added to O in fp32 registers: FP8 wgmma accumulates with a few
// bits fewer than fp32 (as DeepSeek-V3 reports for Hopper, and FP8 GEMMs promote every 128 products for it), and
// accumulating across a whole row in the tensor cores lost the small weights' share: measured on the H200, the
// row sums came out up to 20% short on HunyuanVideo w3x3x3 and O was off by 1.7 (relative L2) on the whole-grid
// window; summed per block, both keep fp32's precision across blocks.
#pragma once

#include "backends/cuda/hopper/clock_trace.cuh"
#include "backends/cuda/hopper/fp8/fp8_params.cuh"
#include "backends/cuda/hopper/fp8_softmax.cuh"
#include "backends/cuda/hopper/mma_softmax_consumer.cuh"

namespace tilewise::hopper {

// Measurement only (scripts/fp8_trace.py, clock_trace.cuh): the SM clock at each step of CTA 0's first blocks, per
// consumer warpgroup, read back by tw_debug_fp8_trace (fp8_forward.cu).
#if TILEWISE_HOPPER_FP8_TRACE
inline constexpr int kFp8TraceWarpgroups = 4, kFp8TraceBlocks = 1024, kFp8TraceEvents = 10;
struct Fp8TraceTable {
  uint32_t block[kFp8TraceWarpgroups][kFp8TraceBlocks][kFp8TraceEvents];
};
__device__ Fp8TraceTable fp8_trace;
struct Fp8TraceSlots {
  static constexpr unsigned kCta = 0;
  static __device__ __forceinline__ uint32_t* slot(int wg, uint32_t block, int e) {
    return block < kFp8TraceBlocks ? &fp8_trace.block[wg][block][e] : nullptr;
  }
  static __device__ __forceinline__ uint32_t* item_slot(int, uint32_t, int) { return nullptr; }
};
#else
struct Fp8TraceSlots;
#endif
using Fp8Tracer = ClockTracer<Fp8TraceSlots, TILEWISE_HOPPER_FP8_TRACE != 0>;

template <class Traits, WgType kType>
struct Fp8Consumer {
  static constexpr int D = Traits::D;
  static constexpr int kSteps = Traits::kPanelCols / 32;  // k32 steps of Q K^T per panel
  static constexpr int kPvSteps = kBlockN / 32;           // k32 steps of P V
  static_assert(Fp8Softmax::kValues == kBlockN / 2, "a thread's S fragment of a 64 x 128 block");
  static constexpr bool kOnes = Traits::kOnesRows > 0;
  static constexpr int kAccN = D + Traits::kOnesRows;  // columns of the P V accumulator: O, then the row sums
  static constexpr uint32_t kOne = 0x38383838u;         // four e4m3 1.0
  using Base = Consumer<Traits, kType>;  // the stage records, the releases, the idle walk
  using KPipe = typename Base::KPipe;
  using VPipe = typename Base::VPipe;
  const Fp8Params& p;
  const typename Traits::Shared& s;
  int wg, tid;
  Base base;
  uint64_t q_desc, k_desc, vt_desc;  // this warpgroup's Q rows, stage 0 of K and of V^T
  mutable Fp8Tracer trace;  // measurement only: this warpgroup's first thread (TILEWISE_HOPPER_FP8_TRACE)

  __device__ __forceinline__ Fp8Consumer(const Fp8Params& p_, const typename Traits::Shared& s_, int wg_, int tid_,
                                         uint32_t rank)
      : p(p_), s(s_), wg(wg_), tid(tid_), base(p_, s_, wg_, tid_, rank) {
    constexpr uint32_t rb = Traits::kRowBytes;
    q_desc = make_desc(smem_addr(s.q) + 64 * wg * rb, 16, 8 * rb, rb);
    k_desc = make_desc(smem_addr(s.k(0)), 16, 8 * rb, rb);
    vt_desc = make_desc(smem_addr(s.v(0)), 16, 8 * kBlockN, kBlockN);  // rows of 128 keys, 128-byte swizzle
    trace.start(wg, tid == 0);
  }

  __device__ __forceinline__ int lane() const { return tid % 32; }

  /// The rows of ones under every V^T stage (forward_cta calls this before its first barrier).
  static __device__ __forceinline__ void prepare_shared(const typename Traits::Shared& s) {
    if constexpr (kOnes) {
      constexpr int kWords = Traits::kOnesRows * kBlockN / 4;
      for (int i = threadIdx.x; i < Traits::kVStages * kWords; i += Traits::kThreads)
        reinterpret_cast<uint32_t*>(s.v(i / kWords) + Traits::kTileBytes)[i % kWords] = kOne;
      fence_proxy_async();  // generic stores, read by wgmma (the async proxy)
    }
  }

  /// The fp8 key block (fp8.hpp's numbering: a tile, or 128 text rows) that a pipeline block lies in.
  __device__ __forceinline__ int32_t key_block(const BlockInfo& bi) const {
    const Grid& g = p.map.grid;
    if (bi.flags & BlockInfo::kText) return g.num_tiles() + bi.t / kBlockN;
    return g.tile_index(D3{static_cast<int32_t>(p.tile_t.div(bi.t)), static_cast<int32_t>(p.tile_h.div(bi.h)),
                           static_cast<int32_t>(p.tile_w.div(bi.w))});  // g.tile_of without its divisions
  }

  __device__ __forceinline__ void issue_s(float (&sc)[kBlockN / 2], int stage) const {
#pragma unroll
    for (int panel = 0; panel < Traits::kPanels; ++panel)
#pragma unroll
      for (int kk = 0; kk < kSteps; ++kk)
        WgmmaFp8<kBlockN>::ss(sc, q_desc + ((panel * Traits::kQPanelBytes + kk * 32) >> 4),
                              k_desc + ((stage * Traits::kTileBytes + panel * Traits::kPanelBytes + kk * 32) >> 4),
                              panel + kk > 0);
  }
  /// pv = P V of one block (and, with the ones, its row sums): a fresh accumulator (see the header).
  __device__ __forceinline__ void issue_pv(float (&pv)[kAccN / 2], const uint32_t (&pa)[kPvSteps][4], int stage) const {
#pragma unroll
    for (int j = 0; j < kPvSteps; ++j) {
      WgmmaFp8<kAccN>::rs(pv, pa[j], vt_desc + ((stage * Traits::kVTileBytes + 32 * j) >> 4), j > 0);
    }
  }

  /// O = O corr + P V (a block's P V, completed), the rescale only where a row's maximum moved.
  static __device__ __forceinline__ void promote(float (&o)[kAccN / 2], const float (&pv)[kAccN / 2],
                                                 const float (&corr)[2], bool rescale) {
    if (rescale) {
#pragma unroll
      for (int i = 0; i < kAccN / 2; ++i) o[i] = fmaf(o[i], corr[(i % 4) / 2], pv[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kAccN / 2; ++i) o[i] += pv[i];
    }
  }

  /// All key blocks of one work item. qf: the softmax scale (log2 domain) times each of this thread's rows' q scale.
  __device__ __forceinline__ void mainloop(const WorkItem& item, int32_t text_len, const float (&qf)[2],
                                           const float* k_scale, KPipe& ks, VPipe& vs, float (&o)[kAccN / 2],
                                           float (&m_run)[2], float (&l_run)[2]) const {
    float sc[kBlockN / 2], corr[2];
    uint16_t pairs[Fp8Softmax::kPairs];
    uint32_t pa[kPvSteps][4];
    for (bool last = false; !last;) {
      trace.stamp(0);
      s.k_full[ks.stage()].wait(ks.phase());
      const BlockInfo bi = base.info(ks.stage());
      last = bi.flags & BlockInfo::kLast;
      trace.stamp(1);
      {
        wgmma_fence();
        if (!(TILEWISE_HOPPER_ABLATE & 4)) issue_s(sc, ks.stage());
        wgmma_commit();
      }
      // The key block's scale, found and loaded while S runs: before S was issued, the index's three divisions
      // (now multiplies) cost each block 500-970 cycles of the chain (scripts/fp8_trace.py; performance.md FP8 v9).
      const float kscale = __ldg(k_scale + key_block(bi));
      trace.stamp(2);
      wgmma_wait<0>();
      fence_regs(sc);
      trace.stamp(3);
      base.release_s_operands(ks.stage(), bi, false);
      ks.advance();
      base.mask_scores(sc, bi, text_len, item);
      const float factor[2] = {qf[0] * kscale, qf[1] * kscale};
      if (!(TILEWISE_HOPPER_ABLATE & 1))  // measurement only (kernel_traits.cuh)
        Fp8Softmax::step<!kOnes, TILEWISE_HOPPER_FP8_FOLD != 0, TILEWISE_HOPPER_ABLATE>(sc, factor, m_run, l_run, corr,
                                                                                       pairs);
      const bool rescale = __any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f);
      Fp8Softmax::to_operand(pairs, pa);
      trace.stamp(4);
      s.v_full[vs.stage()].wait(vs.phase());
      trace.stamp(5);
      float pv[kAccN / 2];  // this block's P V (and row sums), then added to O in fp32
      {
        wgmma_fence();
        if (!(TILEWISE_HOPPER_ABLATE & 2)) issue_pv(pv, pa, vs.stage());
        wgmma_commit();
      }
      trace.stamp(6);
      wgmma_wait<0>();
      fence_regs(pv);
      trace.stamp(7);
      base.release(s.v_empty[vs.stage()], false);
      vs.advance();
      if (TILEWISE_HOPPER_ABLATE & 128)  // measurement only: no promotion, one element keeps P V (and P) live
        o[0] += pv[0];
      else
        promote(o, pv, corr, rescale);
      trace.stamp(8);
      trace.put(9, (uint32_t{last} << 31) | (static_cast<uint32_t>(item.head & 0x7fff) << 16) |
                       static_cast<uint32_t>(item.q.row0 & 0xffff));
      trace.next_block();
    }
  }

  __device__ void run() const {
    uint32_t items = 0;
    KPipe ks;
    VPipe vs;
    WorkRing<typename Traits::Shared, 1> ring{s, 0};
    const Epilogue<Traits, kType> epilogue{p, s, wg, tid};
    for (int32_t u; (u = __shfl_sync(0xffffffffu, ring.consume(), 0)) < p.num_work;) {
      const WorkItem item = decode_work<Traits::kBlockM>(p, u);
      if (item.empty) continue;
      const int32_t text_len = text_len_of(p, item.batch);
      const int64_t bg = int64_t{p.batch_base + item.batch} * p.kv_heads + item.head / p.kv_group;
      float o[kAccN / 2];
#pragma unroll
      for (int i = 0; i < kAccN / 2; ++i) o[i] = 0.f;
      float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, qf[2];
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {  // rows that are no token keep scale 1: their S is never stored
        const int64_t at = epilogue.row_index(item, rr);
        qf[rr] = p.scale_log2 * (at >= 0 ? __ldg(p.q_scale + at) : 1.f);
      }
      s.q_full->wait(items & 1);
      if (64 * wg >= query_rows<Traits::kBlockM>(p, item.q))
        base.mainloop_idle(false, ks, vs);
      else
        mainloop(item, text_len, qf, p.k_scale + bg * p.key_blocks, ks, vs, o, m_run, l_run);

      // o = v_scale * (sum p~ v~) / l; lse = ln 2 (M + log2(l / 448)) [+ scale q . mu] (precision fp8's shift).
      if constexpr (kOnes) l_run[0] = o[D / 2], l_run[1] = o[D / 2 + 2];  // columns D + 2q of rows r, r + 8
      float inv[2];
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        inv[rr] = l_run[rr] > 0.f ? 1.f / l_run[rr] : 0.f;
        const float lse = (m_run[rr] + (__log2f(l_run[rr]) - 8.807354922057604f)) * 0.69314718055994531f;
        epilogue.write_lse(item, rr, [&](int64_t at) { return p.lse_shift ? lse + p.lse_shift[at] : lse; });
      }
      const float* v_scale = p.v_scale + bg * D;
      epilogue.template write_o<true, kAccN / 2>(item, o, inv, [&](int col) { return __ldg(v_scale + col); });
      ++items;
    }
    if (wg == 0 && tid == 0) tma_store_wait_all();
  }
};

}  // namespace tilewise::hopper
