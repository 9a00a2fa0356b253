// Thin inline-PTX layer for the Hopper primitives the forward kernel uses: mbarriers, TMA (bulk tensor copies),
// async-proxy fences, named barriers, register reallocation and wgmma fences/descriptors. Each wrapper is one
// instruction or one wait loop, so the kernel code reads like the hardware's programming model.
#pragma once

#include <cuda.h>  // CUtensorMap (type only; encoding happens on the host through the driver entry point)

#include <cstdint>

namespace tilewise::hopper {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------- mbarrier
struct Barrier {
  uint64_t word;

  __device__ __forceinline__ void init(uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(&word)), "r"(arrivals));
  }
  __device__ __forceinline__ void arrive() {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(&word)) : "memory");
  }
  /// Arrives and announces `bytes` of asynchronous (TMA) traffic that must land before the phase completes.
  __device__ __forceinline__ void arrive_expect_tx(uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(&word)), "r"(bytes)
                 : "memory");
  }
  /// Blocks until the phase with the given parity has completed.
  __device__ __forceinline__ void wait(uint32_t parity) {
    asm volatile(
        "{\n.reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n}\n" ::"r"(smem_addr(&word)),
        "r"(parity)
        : "memory");
  }
};

__device__ __forceinline__ void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

/// One 16-byte shared-memory load (the generic pointer would otherwise compile to a generic LD).
__device__ __forceinline__ uint4 ld_shared_v4(const void* ptr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(smem_addr(ptr)));
  return v;
}

// ---------------------------------------------------------------- TMA
__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

/// Loads one 5-D box into shared memory; completion is signalled on `bar` (bytes counted by expect_tx).
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, Barrier* bar, int c0, int c1, int c2,
                                         int c3, int c4) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6, %7}], [%2];\n" ::
          "r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(&bar->word)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
      : "memory");
}

/// Stores one 5-D box from shared memory; the parts outside the tensor are clipped by the hardware.
__device__ __forceinline__ void tma_store(const CUtensorMap* map, const void* src, int c0, int c1, int c2, int c3,
                                          int c4) {
  asm volatile(
      "cp.async.bulk.tensor.5d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5, %6}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(smem_addr(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
      : "memory");
}
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
/// Waits until every committed store has finished reading shared memory.
__device__ __forceinline__ void tma_store_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
/// Waits until every committed store is complete (visible in global memory).
__device__ __forceinline__ void tma_store_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

/// Ordinary shared-memory stores must be fenced before the async proxy (TMA, wgmma) reads them.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---------------------------------------------------------------- named barriers, register reallocation
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
template <uint32_t kRegs>
__device__ __forceinline__ void regs_increase() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <uint32_t kRegs>
__device__ __forceinline__ void regs_decrease() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---------------------------------------------------------------- wgmma
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
/// wgmma.wait_group that cannot run before `dep` is computed: a branch on dep (always 0 at run time; both sides
/// wait) puts the wait in a block of its own. ptxas otherwise hoists a wait above independent work, e.g. the whole
/// softmax that is meant to overlap the wgmma being waited for.
template <int kPending>
__device__ __forceinline__ void wgmma_wait_after(uint32_t dep) {
  asm volatile(
      "{\n.reg .pred other;\nsetp.ne.b32 other, %0, 0;\n@other bra.uni WAIT_OTHER_%=;\n"
      "wgmma.wait_group.sync.aligned %1;\nbra.uni WAIT_DONE_%=;\n"
      "WAIT_OTHER_%=:\nwgmma.wait_group.sync.aligned %1;\nWAIT_DONE_%=:\n}\n" ::"r"(dep),
      "n"(kPending)
      : "memory");
}
/// Keeps the compiler from moving accumulator reads/writes across an asynchronous wgmma.
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

/// Shared-memory matrix descriptor (see the PTX ISA "matrix descriptor" format). `swizzle_bytes` is the row
/// width of the swizzle atom: 128 (layout type 1) or 64 (layout type 2). Offsets are in bytes.
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_byte_addr, uint32_t leading_byte_offset,
                                              uint32_t stride_byte_offset, int swizzle_bytes) {
  const uint64_t layout = swizzle_bytes == 128 ? 1 : 2;
  return (static_cast<uint64_t>((smem_byte_addr & 0x3FFFF) >> 4)) |
         (static_cast<uint64_t>((leading_byte_offset & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((stride_byte_offset & 0x3FFFF) >> 4) << 32) | (layout << 62);
}

/// Byte offset of element (row, col) of a 16-bit panel whose rows are `row_bytes` wide and swizzled by the
/// TMA/wgmma pattern of that width (16-byte chunks XOR-ed with the row index within the 8-row atom).
__device__ __forceinline__ uint32_t swizzled_offset(uint32_t row, uint32_t col, uint32_t row_bytes) {
  const uint32_t linear = row * row_bytes + col * 2;
  const uint32_t mask = row_bytes == 128 ? 0x380u : 0x180u;  // the address bits that select the XOR pattern
  return linear ^ ((linear & mask) >> 3);
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi, bool bf16) {
  uint32_t r;
  if (bf16)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

}  // namespace tilewise::hopper
