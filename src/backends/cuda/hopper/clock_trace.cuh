// Measurement only: clock timelines of a kernel's roles (scripts/timeline.py and the scripts that use it:
// scripts/bwd_trace.py for the backward, scripts/fp8_trace.py for the FP8 forward). Stall sampling and ablations say
// how much each part of a block costs, not when each role waits for what; a timeline does (FP8 v9, backward v3.22 in
// docs/performance.md). One thread per role stamps the SM clock at each step of its first blocks (and items) into a
// table in device memory, which a debug entry point of the library copies out (read_clock_table). The stamps are
// the clock's low 32 bits, differences taken modulo 2^32: 64-bit ones took more registers in loops with none to
// spare (backward v3.20). With tracing off, ClockTracer<Slots, false> is empty and the kernels' machine code is
// what it is without any tracer.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace tilewise::hopper {

/// One thread's stamps. `Slots` says where a stamp goes: `kCta` (the one CTA that records) and
/// `static __device__ uint32_t* slot(int role, uint32_t block, int event)` and `item_slot(role, item, event)`,
/// nullptr past the table's size. `n` and `items` count the thread's own blocks and items for stamp(e) and
/// stamp_item(e); a loop that numbers its blocks anyway passes its number (stamp(block, e)).
template <class Slots, bool kOn>
struct ClockTracer {
  int role = 0;
  uint32_t n = 0, items = 0;
  bool on = false, thread = false;
  /// With Slots::kUnit >= 0 the traced CTA is the one that takes work unit kUnit (e.g. a text item, which the
  /// dynamic scheduler hands to any CTA), from that unit on, not CTA kCta: each role calls unit() with the units it
  /// takes, and the table's blocks and items count from that unit's (block_base, item_base: the role's counts then).
  uint32_t block_base = 0, item_base = 0;
  static constexpr bool kByUnit = [] {
    if constexpr (requires { Slots::kUnit; }) return Slots::kUnit >= 0;
    return false;
  }();
  __device__ __forceinline__ void start(int role_, bool thread_) {
    role = role_;
    thread = thread_;
    on = !kByUnit && thread && blockIdx.x == Slots::kCta;
  }
  /// `items_so_far`: the role's item count where it numbers its items itself (the consumers), else its own.
  __device__ __forceinline__ void unit(int32_t u, uint32_t items_so_far = ~0u) {
    if constexpr (kByUnit) {
      if (on || !thread || u != Slots::kUnit) return;
      on = true;
      block_base = n;
      item_base = items_so_far == ~0u ? items : items_so_far;
    }
  }
  __device__ __forceinline__ void put(uint32_t block, int e, uint32_t v) const {
    if (on)
      if (uint32_t* at = Slots::slot(role, block - block_base, e)) *at = v;
  }
  __device__ __forceinline__ void put_item(uint32_t item, int e, uint32_t v) const {
    if (on)
      if (uint32_t* at = Slots::item_slot(role, item - item_base, e)) *at = v;
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
template <class Slots>
struct ClockTracer<Slots, false> {
  __device__ __forceinline__ void start(int, bool) {}
  static constexpr uint32_t block_base = 0;
  __device__ __forceinline__ void unit(int32_t, uint32_t = 0) {}
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

/// The debug entry points' body: a trace table (a __device__ variable) into `out` (host memory, at most `bytes`),
/// then zeroed if `clear`, so that the next run's stamps are told apart from older ones. A CUDA error code or 0.
template <class Table>
int read_clock_table(const Table& table, void* out, size_t bytes, bool clear) {
  bytes = std::min(bytes, sizeof(Table));
  if (out != nullptr && bytes > 0) {
    if (const cudaError_t e = cudaMemcpyFromSymbol(out, table, bytes); e != cudaSuccess) return static_cast<int>(e);
  }
  if (!clear) return 0;
  void* at = nullptr;
  if (const cudaError_t e = cudaGetSymbolAddress(&at, table); e != cudaSuccess) return static_cast<int>(e);
  return static_cast<int>(cudaMemset(at, 0, sizeof(Table)));
}

}  // namespace tilewise::hopper
