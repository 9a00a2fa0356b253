// Measurement only (scripts/bwd_trace.py): a clock timeline of one CTA of the backward's reduce kernel. The stall
// sampling and the ablations (docs/performance.md backward v3.7-v3.21) say how much each part of a block costs, not
// when each role waits for what; the FP8 forward's timeline of the same kind found a chain of 500-970 cycles per
// block that sampling had not shown (FP8 v9). With TILEWISE_HOPPER_BWD_TRACE=1 the first warp of each consumer
// warpgroup (every lane, the same stamp), the two loaders and the dQ reducer of CTA TILEWISE_HOPPER_BWD_TRACE_CTA
// stamp the SM clock at each step of their first blocks and items; tw_debug_bwd_trace (backward.cu) reads the table
// back (docs/performance.md backward v3.22). Built with 0 (the default) every BwdTracer call is empty and the kernels'
// machine code is unchanged; the traced D 128 kernel has 4 spill instructions in its block loop and runs ~5% slower.
#pragma once

#include <cstdint>

#include "backends/cuda/hopper/clock_trace.cuh"

#ifndef TILEWISE_HOPPER_BWD_TRACE
#define TILEWISE_HOPPER_BWD_TRACE 0
#endif
#ifndef TILEWISE_HOPPER_BWD_TRACE_CTA
#define TILEWISE_HOPPER_BWD_TRACE_CTA 0
#endif
// >= 0: trace the CTA that takes this work unit instead, from that unit on (ClockTracer::unit), e.g. 0, a text key
// item where the row has text (heaviest first), which the dynamic scheduler gives to whichever CTA asks first.
#ifndef TILEWISE_HOPPER_BWD_TRACE_UNIT
#define TILEWISE_HOPPER_BWD_TRACE_UNIT -1
#endif

namespace tilewise::hopper {

/// Rows of the trace's block table: the two consumer warpgroups, the Q loader, the dO loader, the dQ reducer.
enum BwdTraceRole : int { kTraceWg0 = 0, kTraceQLoader = 2, kTraceDoLoader = 3, kTraceReducer = 4 };

#if TILEWISE_HOPPER_BWD_TRACE
inline constexpr int kBwdTraceRoles = 5, kBwdTraceBlocks = 2048, kBwdTraceEvents = 16;
inline constexpr int kBwdTraceItems = 256, kBwdTraceItemEvents = 14;
/// Stamps per role and block (events: scripts/bwd_trace.py names them), and per role and item (the consumer
/// warpgroups and the Q loader).
struct BwdTraceTable {
  uint32_t block[kBwdTraceRoles][kBwdTraceBlocks][kBwdTraceEvents];
  uint32_t item[3][kBwdTraceItems][kBwdTraceItemEvents];
};
// (static: each head dim's translation unit has its own, backward_at.hpp; tw_debug_bwd_trace reads them all)
static __device__ BwdTraceTable bwd_trace;
struct BwdTraceSlots {
  static constexpr unsigned kCta = TILEWISE_HOPPER_BWD_TRACE_CTA;
  static constexpr int kUnit = TILEWISE_HOPPER_BWD_TRACE_UNIT;
  static __device__ __forceinline__ uint32_t* slot(int role, uint32_t block, int e) {
    return block < kBwdTraceBlocks ? &bwd_trace.block[role][block][e] : nullptr;
  }
  static __device__ __forceinline__ uint32_t* item_slot(int role, uint32_t item, int e) {
    return item < kBwdTraceItems ? &bwd_trace.item[role < 2 ? role : 2][item][e] : nullptr;
  }
};
#else
struct BwdTraceSlots;
#endif
/// One thread's stamps (clock_trace.cuh); the consumers stamp their dQ turns and items at the numbers their loops
/// keep anyway (the dQ block m, the item's record), stamp(m, e).
using BwdTracer = ClockTracer<BwdTraceSlots, TILEWISE_HOPPER_BWD_TRACE != 0>;

}  // namespace tilewise::hopper
