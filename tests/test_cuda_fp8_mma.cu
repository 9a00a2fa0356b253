// The FP8 forward's two products on one warpgroup, against the host (docs/performance.md, the FP8 forward's design):
//   S = Q K^T   e4m3 operands from shared memory, both K-major (WgmmaFp8<128>::ss, four k32 steps over D = 128);
//   O = P V     P = e4m3(S / 64) packed from S's accumulator registers as they lie, V^T in shared memory with its
//               keys in the order those registers imply (WgmmaFp8<128>::rs), so that neither operand is
//               transposed in a kernel.
// A layout error gives errors of the size of the values. Inputs are small e4m3 values, so S is exact in fp32 and P
// is the host's e4m3 rounding of it; O is compared with a tolerance of 2e-3 of its terms' absolute sum (FP8 wgmma
// accumulates with fewer bits than fp32; a layout error is off by the size of the terms). Skipped without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "core/numeric.hpp"
#include "oracle_case.hpp"
#include "tilewise/tilewise.hpp"

#ifdef TILEWISE_WITH_CUDA
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "backends/cuda/hopper/ptx.cuh"
#include "backends/cuda/hopper/wgmma_ops.cuh"
#endif

namespace {

constexpr int kRows = 64, kKeys = 128, kDim = 128;  // one warpgroup's query rows, a key block, the head dim

/// Physical key (within its 32-key k step) of logical key `k` of a P register fragment: thread lane % 4 = q holds
/// accumulator columns 2q, 2q+1 of two adjacent n8 chunks, which a k32 A fragment reads as keys 4q..4q+3.
int physical_key(int k) {
  const int group = k / 16, q = (k % 16) / 4, e = k % 4;
  return 16 * group + (e < 2 ? 2 * q + e : 8 + 2 * q + (e - 2));
}

#ifdef TILEWISE_WITH_CUDA
using namespace tilewise::hopper;

/// Byte offset of (row, byte) in a K-major panel of 128-byte rows, 128-byte swizzle (as TMA writes and wgmma reads).
__device__ uint32_t panel_offset(int row, int byte) {
  const uint32_t linear = row * 128 + byte;
  return linear ^ ((linear & 0x380u) >> 3);
}

/// q [64][128], k [128 keys][128], vt [128 dims][128 logical keys] (e4m3 codes, row-major) -> s, o [64][128] fp32.
__global__ void fp8_products(const uint8_t* q, const uint8_t* k, const uint8_t* vt, float* s_out, float* o_out) {
  __shared__ __align__(1024) uint8_t sq[kRows * 128];
  __shared__ __align__(1024) uint8_t sk[kKeys * 128];
  __shared__ __align__(1024) uint8_t sv[kDim * 128];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  for (int i = tid; i < kRows * 128; i += 128) sq[panel_offset(i / 128, i % 128)] = q[i];
  for (int i = tid; i < kKeys * 128; i += 128) sk[panel_offset(i / 128, i % 128)] = k[i];
  for (int i = tid; i < kDim * 128; i += 128) sv[panel_offset(i / 128, i % 128)] = vt[i];
  fence_proxy_async();
  __syncthreads();

  // Descriptors of 128-byte swizzled K-major panels: 8-row atoms 1024 bytes apart; a k32 step is 32 bytes on.
  const uint32_t qa = smem_addr(sq), ka = smem_addr(sk), va = smem_addr(sv);
  float s[kKeys / 2];
  for (float& x : s) x = 0.f;
  wgmma_fence();
#pragma unroll
  for (int step = 0; step < kDim / 32; ++step)
    WgmmaFp8<kKeys>::ss(s, make_desc(qa + 32 * step, 16, 1024, 128), make_desc(ka + 32 * step, 16, 1024, 128),
                        step > 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(s);

  const int row = 16 * warp + lane / 4;
  for (int i = 0; i < kKeys / 2; ++i)
    s_out[(row + 8 * ((i % 4) / 2)) * kKeys + 8 * (i / 4) + 2 * (lane % 4) + (i % 2)] = s[i];

  // P's A fragments: per k32 step, {row, keys of chunk pair 0} {row + 8, same} {row, chunk pair 1} {row + 8, ...},
  // each register four accumulator values in the order they lie.
  auto e4m3 = [](float x) { return static_cast<uint32_t>(__nv_cvt_float_to_fp8(x / 64.f, __NV_SATFINITE, __NV_E4M3)); };
  auto pack = [&](int a, int b, int c, int d) {
    return e4m3(s[a]) | e4m3(s[b]) << 8 | e4m3(s[c]) << 16 | e4m3(s[d]) << 24;
  };
  float o[kDim / 2];
  for (float& x : o) x = 0.f;
  wgmma_fence();
#pragma unroll
  for (int step = 0; step < kKeys / 32; ++step) {
    const int a = 16 * step;
    const uint32_t frag[4] = {pack(a, a + 1, a + 4, a + 5), pack(a + 2, a + 3, a + 6, a + 7),
                              pack(a + 8, a + 9, a + 12, a + 13), pack(a + 10, a + 11, a + 14, a + 15)};
    WgmmaFp8<kDim>::rs(o, frag, make_desc(va + 32 * step, 16, 1024, 128), step > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(o);
  for (int i = 0; i < kDim / 2; ++i)
    o_out[(row + 8 * ((i % 4) / 2)) * kDim + 8 * (i / 4) + 2 * (lane % 4) + (i % 2)] = o[i];
}

template <class T>
T* device_copy(const std::vector<T>& h) {
  T* d = nullptr;
  EXPECT_EQ(cudaMalloc(&d, h.size() * sizeof(T)), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return d;
}
#endif

TEST(CudaFp8Mma, ProductsWithPFromTheAccumulatorAndVtInItsKeyOrder) {
  if (!tilewise::cuda_available()) GTEST_SKIP() << "no CUDA device (or built without CUDA): GPU test skipped";
#ifdef TILEWISE_WITH_CUDA
  const uint64_t seed = oracle::fresh_seed();
  SCOPED_TRACE(oracle::seed_note(seed));
  oracle::Rng rng(seed);
  // Values with few significant bits (and both signs): every product and every sum of S is exact in fp32.
  const double pool[] = {-2, -1.5, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 1.5, 2};
  std::uniform_int_distribution<int> pick(0, 10);
  auto codes = [&](size_t n, std::vector<double>& values) {
    std::vector<uint8_t> c(n);
    values.resize(n);
    for (size_t i = 0; i < n; ++i) {
      values[i] = pool[pick(rng)];
      c[i] = tilewise::detail::double_to_e4m3(values[i]);
    }
    return c;
  };
  std::vector<double> qv, kv, vv;
  const std::vector<uint8_t> q = codes(kRows * kDim, qv), k = codes(kKeys * kDim, kv), v = codes(kKeys * kDim, vv);
  // V^T: row d holds the keys in logical order.
  std::vector<uint8_t> vt(kDim * kKeys);
  for (int d = 0; d < kDim; ++d)
    for (int l = 0; l < kKeys; ++l) vt[d * kKeys + l] = v[(32 * (l / 32) + physical_key(l % 32)) * kDim + d];

  uint8_t *dq = device_copy(q), *dk = device_copy(k), *dvt = device_copy(vt);
  float *ds = nullptr, *dout = nullptr;
  ASSERT_EQ(cudaMalloc(&ds, sizeof(float) * kRows * kKeys), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&dout, sizeof(float) * kRows * kDim), cudaSuccess);
  fp8_products<<<1, 128>>>(dq, dk, dvt, ds, dout);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::vector<float> s(kRows * kKeys), o(kRows * kDim);
  ASSERT_EQ(cudaMemcpy(s.data(), ds, sizeof(float) * s.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(o.data(), dout, sizeof(float) * o.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  for (void* p : {static_cast<void*>(dq), static_cast<void*>(dk), static_cast<void*>(dvt), static_cast<void*>(ds),
                  static_cast<void*>(dout)})
    cudaFree(p);

  for (int r = 0; r < kRows; ++r) {
    std::vector<double> p(kKeys);
    for (int j = 0; j < kKeys; ++j) {
      double sum = 0;
      for (int d = 0; d < kDim; ++d) sum += qv[r * kDim + d] * kv[j * kDim + d];
      ASSERT_EQ(s[r * kKeys + j], sum) << "S[" << r << ", " << j << "]";
      p[j] = tilewise::detail::round_e4m3(sum / 64.0);
    }
    for (int d = 0; d < kDim; ++d) {
      double want = 0, scale = 0;
      for (int j = 0; j < kKeys; ++j) want += p[j] * vv[j * kDim + d], scale += std::abs(p[j] * vv[j * kDim + d]);
      ASSERT_NEAR(o[r * kDim + d], want, 2e-3 * scale + 1e-6) << "O[" << r << ", " << d << "]";
    }
  }
#endif
}

}  // namespace
