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

/// The shared::cluster address of the same shared-memory offset in cluster CTA `rank`.
__device__ __forceinline__ uint32_t smem_addr_in(const void* p, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_addr(p)), "r"(rank));
  return remote;
}

// ---------------------------------------------------------------- mbarrier
// A try_wait loop on the phase with parity %1 of the barrier at %0, with the given memory semantics.
#define TILEWISE_MBARRIER_WAIT(SEM)                                                     \
  "{\n.reg .pred done;\nWAIT_%=:\nmbarrier.try_wait.parity" SEM ".shared::cta.b64 done, [%0], %1;\n" \
  "@!done bra WAIT_%=;\n}\n"

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
  /// Announces `bytes` more of asynchronous traffic for the current phase without arriving (a second copy that
  /// completes on the same barrier as a load whose arrive_expect_tx comes after it).
  __device__ __forceinline__ void expect_tx(uint32_t bytes) {
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(&word)), "r"(bytes)
                 : "memory");
  }
  /// Arrives `count` times at once (a CTA that does not share a stage with its cluster peer stands in for it).
  __device__ __forceinline__ void arrive(uint32_t count) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(&word)), "r"(count) : "memory");
  }
  /// Arrives on the barrier at the same offset in cluster CTA `rank`. Default (CTA-scope) semantics: cheap, and
  /// enough to say "this CTA's reads of a stage are done" (the reads are wgmma's, already waited for).
  __device__ __forceinline__ void arrive_remote(uint32_t rank) {
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(smem_addr_in(&word, rank)) : "memory");
  }
  /// arrive_remote that also releases, at cluster scope, what this thread wrote before (e.g. with st_cluster):
  /// a fence as costly as it sounds, so only for the once-per-unit scheduler ring.
  __device__ __forceinline__ void arrive_remote_release(uint32_t rank) {
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(smem_addr_in(&word, rank))
                 : "memory");
  }
  /// Blocks until the phase with the given parity has completed.
  __device__ __forceinline__ void wait(uint32_t parity) {
    asm volatile(TILEWISE_MBARRIER_WAIT("") ::"r"(smem_addr(&word)), "r"(parity) : "memory");
  }
  /// wait() that also acquires what other CTAs of the cluster wrote before arriving (arrive_remote_release).
  __device__ __forceinline__ void wait_cluster(uint32_t parity) {
    asm volatile(TILEWISE_MBARRIER_WAIT(".acquire.cluster") ::"r"(smem_addr(&word)), "r"(parity) : "memory");
  }
};

// ---------------------------------------------------------------- clusters
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
/// Stores a word at the same shared-memory offset in cluster CTA `rank`.
__device__ __forceinline__ void st_cluster(const void* local, uint32_t rank, int32_t value) {
  asm volatile("st.shared::cluster.u32 [%0], %1;\n" ::"r"(smem_addr_in(local, rank)), "r"(value) : "memory");
}
/// Every thread of every CTA of the cluster (none may have exited): orders barrier initialisation before remote
/// arrivals, and keeps a CTA's shared memory alive until its peer no longer writes to it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

__device__ __forceinline__ void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

/// One 16-byte shared-memory load (the generic pointer would otherwise compile to a generic LD).
__device__ __forceinline__ uint4 ld_shared_v4(const void* ptr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(smem_addr(ptr)));
  return v;
}

/// 2^x on the MUFU unit (ex2.approx, flushing denormals; exact at integers).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

/// Stores to shared memory by a shared-window address: a C++ store through a pointer into the dynamic shared
/// buffer compiles to a generic ST.E with a 64-bit address, which goes through the generic path of the load/store
/// unit (the reduce kernel's dS^T and dQ staging stores: 7% of its consumers' stall samples, v3.7).
/// x, with the compiler told that it is the same in every lane (a broadcast from lane 0, as CUTLASS does for warp
/// indices): what is computed from it can stay in uniform registers. Used for the wgmma descriptors that depend on a
/// pipeline stage: otherwise each wgmma's descriptor is built in vector registers and moved to uniform ones (two
/// R2UR and two more instructions per wgmma; docs/performance.md backward v3.12).
__device__ __forceinline__ uint32_t warp_uniform(uint32_t x) { return __shfl_sync(0xffffffffu, x, 0); }
__device__ __forceinline__ void st_shared_u32(void* ptr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(smem_addr(ptr)), "r"(v) : "memory");
}
__device__ __forceinline__ void st_shared_f2(void* ptr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(smem_addr(ptr)), "f"(x), "f"(y) : "memory");
}
__device__ __forceinline__ void st_shared_v4(void* ptr, uint4 v) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(smem_addr(ptr)), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}

/// Two adjacent floats from shared memory (an 8-byte load; volatile so it stays after the barrier wait before it).
__device__ __forceinline__ float2 ld_shared_f2(const float* ptr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(smem_addr(ptr)));
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

/// tma_load into the same offsets of every cluster CTA in `mask`, each completing on its own barrier there.
__device__ __forceinline__ void tma_load_multicast(void* dst, const CUtensorMap* map, Barrier* bar, int c0, int c1,
                                                   int c2, int c3, int c4, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%3, %4, %5, %6, %7}], [%2], %8;\n" ::
          "r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(&bar->word)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4),
      "h"(mask)
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
/// Adds one 5-D box from shared memory into global memory elementwise (the tensor map's type, e.g. fp32), as one
/// bulk operation in the L2; outside the tensor it is clipped. Completes like tma_store (commit, wait_group).
__device__ __forceinline__ void tma_reduce_add(const CUtensorMap* map, const void* src, int c0, int c1, int c2, int c3,
                                               int c4) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.5d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, %5, %6}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(smem_addr(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4)
      : "memory");
}
/// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from shared to global memory as one bulk
/// operation of the async proxy (no tensor map). Completes like tma_store (commit, wait_group).
__device__ __forceinline__ void bulk_store(void* dst, const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(reinterpret_cast<uint64_t>(dst)),
               "r"(smem_addr(src)), "r"(bytes)
               : "memory");
}
/// Adds `bytes` of fp32 (a multiple of 16; both addresses 16-byte aligned) from shared memory into global memory
/// element by element, as one bulk reduction of the async proxy (no tensor map). Completes like tma_store.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, const void* src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(
                   reinterpret_cast<uint64_t>(dst)),
               "r"(smem_addr(src)), "r"(bytes)
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
/// width of the swizzle atom: 128 (layout type 1), 64 (2) or 32 (3, the FP8 forward's D 96 panels). Offsets are in
/// bytes.
__device__ __forceinline__ uint64_t make_desc(uint32_t smem_byte_addr, uint32_t leading_byte_offset,
                                              uint32_t stride_byte_offset, int swizzle_bytes) {
  const uint64_t layout = swizzle_bytes == 128 ? 1 : (swizzle_bytes == 64 ? 2 : 3);
  return (static_cast<uint64_t>((smem_byte_addr & 0x3FFFF) >> 4)) |
         (static_cast<uint64_t>((leading_byte_offset & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((stride_byte_offset & 0x3FFFF) >> 4) << 32) | (layout << 62);
}

/// Where byte `linear` (= row * row_bytes + byte within the row, any element size) of a panel whose rows are
/// `row_bytes` wide lies once swizzled by the TMA/wgmma pattern of that width (16-byte chunks XOR-ed with the row
/// index within the 8-row atom).
__device__ __forceinline__ uint32_t swizzled_bytes(uint32_t linear, uint32_t row_bytes) {
  const uint32_t mask = row_bytes == 128 ? 0x380u : 0x180u;  // the address bits that select the XOR pattern
  return linear ^ ((linear & mask) >> 3);
}
/// Byte offset of element (row, col) of a 16-bit panel, swizzled as above.
__device__ __forceinline__ uint32_t swizzled_offset(uint32_t row, uint32_t col, uint32_t row_bytes) {
  return swizzled_bytes(row * row_bytes + col * 2, row_bytes);
}

/// Four 8x8 matrices of 16-bit elements from shared memory (ldmatrix.x4): lane l gives the address of row l % 8 of
/// matrix l / 8, and register i of every lane receives its pair of matrix i. With the matrices (rows 0-7, cols 0-7),
/// (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) of a warp's 16 rows that is the wgmma
/// A-fragment of one k16 step.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

/// Four 8x8 matrices of 16-bit elements to shared memory (stmatrix.x4), ldmatrix_x4's inverse: lane l gives the
/// address of row l % 8 of matrix l / 8, and register i of every lane holds its pair of matrix i, which is how an
/// accumulator fragment's packed pairs lie.
__device__ __forceinline__ void stmatrix_x4(uint32_t addr, const uint32_t (&r)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]), "r"(r[1]),
               "r"(r[2]), "r"(r[3])
               : "memory");
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
