// What the TMA probes share (scripts/tma_queue_probe.cu, scripts/dq_reduce_probe.cu): one bulk load on an mbarrier,
// its wait, zeroed device buffers, and the percentiles of their timings. Standalone programs: the library's ptx.cuh
// is not included, so that each probe builds with one nvcc command and shows every instruction it times.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cuda_check.cuh"

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbarrier_init(unsigned long long* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_addr(bar)));
}
/// `bytes` from global `from` into shared `to` by one bulk copy, completing on `bar` (one arrival with its bytes).
__device__ __forceinline__ void bulk_load(unsigned long long* bar, void* to, const void* from, uint32_t bytes) {
  asm volatile(
      "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%2], [%3], %1, [%0];\n" ::"r"(smem_addr(bar)),
      "r"(bytes), "r"(smem_addr(to)), "l"(from)
      : "memory");
}
__device__ __forceinline__ void mbarrier_wait(unsigned long long* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nWAIT_%=:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

/// `count` zeroed elements of device memory (freed at exit).
template <class T>
T* device_zeros(size_t count) {
  T* p = nullptr;
  CHECK(cudaMalloc(&p, count * sizeof(T)));
  CHECK(cudaMemset(p, 0, count * sizeof(T)));
  return p;
}

inline unsigned long long percentile(std::vector<unsigned long long> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(q * static_cast<double>(v.size())))];
}
