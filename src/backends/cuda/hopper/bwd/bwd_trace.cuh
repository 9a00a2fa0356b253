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

#ifndef TILEWISE_HOPPER_BWD_TRACE
#define TILEWISE_HOPPER_BWD_TRACE 0
#endif
#ifndef TILEWISE_HOPPER_BWD_TRACE_CTA
#define TILEWISE_HOPPER_BWD_TRACE_CTA 0
#endif

namespace tilewise::hopper {

/// Rows of the trace's block table: the two consumer warpgroups, the Q loader, the dO loader, the dQ reducer.
enum BwdTraceRole : int { kTraceWg0 = 0, kTraceQLoader = 2, kTraceDoLoader = 3, kTraceReducer = 4 };

#if TILEWISE_HOPPER_BWD_TRACE
inline constexpr int kBwdTraceRoles = 5, kBwdTraceBlocks = 2048, kBwdTraceEvents = 16;
inline constexpr int kBwdTraceItems = 256, kBwdTraceItemEvents = 8;
/// Stamps per role and block (events: scripts/bwd_trace.py names them), and per role and item (the consumer
/// warpgroups and the Q loader). 32-bit stamps (the SM clock's low word, differences taken modulo 2^32): 64-bit ones
/// took more registers, and the consumers' block loop has none to spare (docs/performance.md backward v3.20).
struct BwdTraceTable {
  uint32_t block[kBwdTraceRoles][kBwdTraceBlocks][kBwdTraceEvents];
  uint32_t item[3][kBwdTraceItems][kBwdTraceItemEvents];
};
__device__ BwdTraceTable bwd_trace;

/// One thread's stamps: its role, whether it records, and its own count of blocks and items (stamp(e), put(e, v));
/// the consumers stamp their dQ turns and items at the numbers their loops keep anyway (the dQ block m, the item's
/// record), stamp(n, e).
struct BwdTracer {
  int role = 0;
  uint32_t n = 0, items = 0;
  bool on = false;
  __device__ __forceinline__ void start(int role_, bool thread) {
    role = role_;
    on = thread && blockIdx.x == TILEWISE_HOPPER_BWD_TRACE_CTA;
  }
  __device__ __forceinline__ void put(uint32_t block, int e, uint32_t v) const {
    if (on && block < kBwdTraceBlocks) bwd_trace.block[role][block][e] = v;
  }
  __device__ __forceinline__ void put_item(uint32_t item, int e, uint32_t v) const {
    if (on && item < kBwdTraceItems) bwd_trace.item[role < 2 ? role : 2][item][e] = v;
  }
  __device__ __forceinline__ void stamp(uint32_t block, int e) const { put(block, e, static_cast<uint32_t>(clock())); }
  __device__ __forceinline__ void stamp_item(uint32_t item, int e) const {
    put_item(item, e, static_cast<uint32_t>(clock()));
  }
  __device__ __forceinline__ void stamp(int e) const { stamp(n, e); }  // at the thread's own count
  __device__ __forceinline__ void put(int e, uint32_t v) const { put(n, e, v); }
  __device__ __forceinline__ void stamp_item(int e) const { stamp_item(items, e); }
  __device__ __forceinline__ void next_block() { ++n; }
  __device__ __forceinline__ void next_item() { ++items; }
};
#else
struct BwdTracer {
  __device__ __forceinline__ void start(int, bool) {}
  __device__ __forceinline__ void put(uint32_t, int, uint32_t) const {}
  __device__ __forceinline__ void put_item(uint32_t, int, uint32_t) const {}
  __device__ __forceinline__ void stamp(uint32_t, int) const {}
  __device__ __forceinline__ void stamp_item(uint32_t, int) const {}
  __device__ __forceinline__ void stamp(int) const {}
  __device__ __forceinline__ void put(int, uint32_t) const {}
  __device__ __forceinline__ void stamp_item(int) const {}
  __device__ __forceinline__ void next_block() {}
  __device__ __forceinline__ void next_item() {}
};
#endif

}  // namespace tilewise::hopper
