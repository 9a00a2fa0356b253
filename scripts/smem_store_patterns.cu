// Shared-memory wavefronts per store instruction of the backward's store patterns, for ncu (the metrics below):
//   nvcc -arch=sm_90a -O3 -o /tmp/smem_store_patterns scripts/smem_store_patterns.cu
//   ncu --metrics smsp__sass_inst_executed_op_shared_st.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum \
//       /tmp/smem_store_patterns
// One kernel per pattern (its name says which); each warp repeats the pattern's stores of one 64-row block:
//   staging_f2:          the reduce kernel's fp32 dQ staging (bwd_consumer.cuh stage_dq before the permutation):
//                        8-byte stores of accumulator pairs into 128-byte swizzled 32-column panels;
//   staging_f2_permuted: the same elements, lanes of odd rows storing column group g ^ 2 where the others store g;
//   ds_u32:              the dS^T store (store_ds): 4-byte bf16 pairs into a 128-byte swizzled 64-column panel.
// Ideal: 2 wavefronts per instruction for 8-byte stores (256 bytes a warp), 1 for 4-byte ones.
#include <cstdint>
#include <cstdio>

__device__ __forceinline__ uint32_t swz(uint32_t linear) { return linear ^ ((linear & 0x380u) >> 3); }
__device__ __forceinline__ void st_f2(uint32_t addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x), "f"(y) : "memory");
}
__device__ __forceinline__ void st_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

constexpr int kD = 128, kPanelBytes = 64 * 128, kReps = 256;

template <bool kPermute>
__global__ void staging_f2(float seed) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float dq[kD / 2];
#pragma unroll
  for (int i = 0; i < kD / 2; ++i) dq[i] = seed * (i + lane);
  const bool odd = kPermute && ((lane / 4) & 1);
  for (int rep = 0; rep < kReps; ++rep) {
#pragma unroll
    for (int i = 0; i < kD / 2; i += 2) {
      const int j = odd ? (i ^ 8) : i;  // column group g ^ 2 on odd rows (compile-time pair, selected per lane)
      const uint32_t r = 16 * warp + lane / 4 + 8 * ((i % 4) / 2), c = 8 * (j / 4) + 2 * (lane % 4);
      st_f2(base + (c / 32) * kPanelBytes + swz(r * 128 + (c % 32) * 4), odd ? dq[i ^ 8] : dq[i],
            odd ? dq[(i ^ 8) + 1] : dq[i + 1]);
    }
    dq[rep % (kD / 2)] += 1.f;
  }
}

__global__ void ds_u32(uint32_t seed) {
  extern __shared__ __align__(1024) uint8_t smem[];
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int rep = 0; rep < kReps; ++rep) {
#pragma unroll
    for (int i = 0; i < 32; i += 2) {
      const uint32_t r = 16 * warp + lane / 4 + 8 * ((i % 4) / 2), c = 8 * (i / 4) + 2 * (lane % 4);
      st_u32(base + swz(r * 128 + c * 2), seed + i + rep);
    }
  }
}

int main() {
  const int bytes = 4 * kPanelBytes;
  cudaFuncSetAttribute(staging_f2<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  cudaFuncSetAttribute(staging_f2<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  cudaFuncSetAttribute(ds_u32, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  staging_f2<false><<<132, 128, bytes>>>(1.f);
  staging_f2<true><<<132, 128, bytes>>>(1.f);
  ds_u32<<<132, 128, bytes>>>(1u);
  const cudaError_t e = cudaDeviceSynchronize();
  std::printf("smem_store_patterns: %s\n", cudaGetErrorString(e));
  return e != cudaSuccess;
}
