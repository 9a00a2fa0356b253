// Compile-time configuration of the forward kernel for one head dim, and its shared-memory layout.
#pragma once

#include "backends/cuda/hopper/params.cuh"
#include "backends/cuda/hopper/ptx.cuh"

// K/V pipeline depth at head dim 128 (2 stages: 192 KB of shared memory with the Q and O buffers; 3 do not fit).
#ifndef TILEWISE_HOPPER_STAGES_D128
#define TILEWISE_HOPPER_STAGES_D128 2
#endif

// Consumer schedule: 1 = FA3-style overlap (ping-pong + intra-warpgroup), 0 = sequential, -1 (default) = by head
// dim: overlap at D 128, where it measured 1.5-5% faster, sequential at D 64/96, where it measured 4-5% slower
// (docs/performance.md, v3.1).
#ifndef TILEWISE_HOPPER_OVERLAP
#define TILEWISE_HOPPER_OVERLAP -1
#endif

// Registers of the producer warpgroup (setmaxnreg); 0 = by schedule (below). The consumers get the rest.
#ifndef TILEWISE_HOPPER_PRODUCER_REGS
#define TILEWISE_HOPPER_PRODUCER_REGS 0
#endif

// Overlapped schedule: wait for P_{j-1} V_{j-1} after the softmax of S_j (1), or before it (0: what ptxas made of
// a plain wait there, see wgmma_wait_after).
#ifndef TILEWISE_HOPPER_LATE_PV_WAIT
#define TILEWISE_HOPPER_LATE_PV_WAIT 1
#endif

namespace tilewise::hopper {

template <int kHeadDim>
struct KernelTraits {
  static constexpr int D = kHeadDim;
  // Head dims that are multiples of 64 use 64-column panels with the 128-byte swizzle; 96 uses 32-column panels
  // with the 64-byte swizzle, so no panel ever reads past the head's last column.
  static constexpr int kPanelCols = D % 64 == 0 ? 64 : 32;
  static constexpr int kRowBytes = kPanelCols * 2;
  static constexpr int kPanels = D / kPanelCols;
  static constexpr int kPanelBytes = kBlockM * kRowBytes;  // one panel of a 128-row buffer
  static constexpr int kTileBytes = kPanels * kPanelBytes;  // 128 rows x D
  static constexpr int kStages = D >= 128 ? TILEWISE_HOPPER_STAGES_D128 : 3;
  static constexpr bool kOverlap = TILEWISE_HOPPER_OVERLAP < 0 ? D == 128 : TILEWISE_HOPPER_OVERLAP != 0;
  // Register split between the producer warpgroup and each consumer warpgroup. The CTA is launched with 168
  // registers per thread (65536 / 384, rounded down to a multiple of 8), and setmaxnreg only redistributes that
  // pool: a split asking for more than 384 * 168 makes setmaxnreg.inc wait forever. The overlapped consumer
  // holds S, P and O at once (ptxas serialises every wgmma when its fragments do not fit, C7512) and gets 216;
  // the producer's pattern walk gets the rest.
  static constexpr int kProducerRegs =
      TILEWISE_HOPPER_PRODUCER_REGS > 0 ? TILEWISE_HOPPER_PRODUCER_REGS : (kOverlap ? 72 : 80);
  static constexpr int kConsumerRegs = (3 * 168 - kProducerRegs) / 2 / 8 * 8;
  static_assert(kProducerRegs + 2 * kConsumerRegs <= 3 * 168,
                "the register split exceeds the CTA's allocation (setmaxnreg.inc would deadlock)");
  static_assert(kBlockM == kBlockN, "Q, K and V buffers share one panel geometry");

  // Stage buffers are addressed arithmetically (k(stage)), never through an array indexed at run time, which
  // would put the struct in local memory.
  // Q and O have buffers of their own, so the next work item's Q can land while this item's last blocks and its
  // output store are still running (the item-boundary bubble).
  struct Shared {
    uint8_t* q;
    __device__ __forceinline__ uint8_t* o() const { return q + kTileBytes; }
    __device__ __forceinline__ uint8_t* k(int stage) const { return q + kTileBytes * (2 + stage); }
    __device__ __forceinline__ uint8_t* v(int stage) const { return q + kTileBytes * (2 + kStages + stage); }
    Barrier* q_full;
    Barrier* q_empty;  // the consumers' last S GEMM of an item has read Q
    Barrier* k_full;   // [kStages]
    Barrier* k_empty;  // [kStages]
    Barrier* v_full;
    Barrier* v_empty;
    Barrier* work_full;   // [2]: the scheduler's slot ring (producer -> consumers)
    Barrier* work_empty;  // [2]
    int32_t* work;        // [2]
    BlockInfo* info;      // [kStages]: what the key block in each stage is (written by the producer)
  };

  static constexpr int kBuffers = 2 + 2 * kStages;  // Q, O, and K and V per stage
  static constexpr int kBarriers = 2 + 4 * kStages + 4;
  static constexpr int kSmemBytes =
      1024 /* alignment slack */ + kTileBytes * kBuffers + kBarriers * 8 + 16 + kStages * sizeof(BlockInfo);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory exceeds the 227 KB an sm_90 CTA can have");

  /// Carves the dynamic shared memory: tiles first (1024-byte aligned, as the 128-byte swizzle requires).
  static __device__ __forceinline__ Shared carve(uint8_t* raw) {
    uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
    Shared s;
    s.q = base;
    Barrier* bars = reinterpret_cast<Barrier*>(base + kTileBytes * kBuffers);
    s.q_full = bars;
    s.q_empty = bars + 1;
    s.k_full = bars + 2;
    s.k_empty = bars + 2 + kStages;
    s.v_full = bars + 2 + 2 * kStages;
    s.v_empty = bars + 2 + 3 * kStages;
    s.work_full = bars + 2 + 4 * kStages;
    s.work_empty = bars + 4 + 4 * kStages;
    s.work = reinterpret_cast<int32_t*>(bars + kBarriers);
    s.info = reinterpret_cast<BlockInfo*>(bars + kBarriers + 2);  // 16-byte aligned: one 128-bit load each
    return s;
  }
};

}  // namespace tilewise::hopper
