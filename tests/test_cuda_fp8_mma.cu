// The FP8 forward's two products on one warpgroup, against the host (docs/performance.md, the FP8 forward's design):
//   S = Q K^T   e4m3 operands from shared memory, both K-major (WgmmaFp8<128>::ss, four k32 steps over D = 128);
//   O = P V     P = e4m3(S / 64) packed from S's accumulator registers as they lie, V^T in shared memory with its
//               keys in the order those registers imply (WgmmaFp8<128>::rs), so that neither operand is
//               transposed in a kernel.
// and precision fp8's online softmax (Fp8Softmax: integer running maximum, e4m3 P, l of the e4m3 values) over two
// key blocks feeding that product, against a host emulation of §11.4.
// A layout error gives errors of the size of the values. Inputs are small e4m3 values, so S is exact in fp32 and P
// is the host's e4m3 rounding of it; O is compared with a tolerance of 2e-3 of its terms' absolute sum (FP8 wgmma
// accumulates with fewer bits than fp32; a layout error is off by the size of the terms). Skipped without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "core/numeric.hpp"
#include "grad_harness.hpp"
#include "oracle_case.hpp"
#include "tilewise/tilewise.hpp"

#ifdef TILEWISE_WITH_CUDA
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "backends/cuda/hopper/fp8_softmax.cuh"
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

/// Row-major index, in a [64][width] matrix, of accumulator value i of the thread at (fragment row `row`, lane).
__device__ int fragment_at(int i, int row, int lane, int width) {
  return (row + 8 * ((i % 4) / 2)) * width + 8 * (i / 4) + 2 * (lane % 4) + (i % 2);
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
  for (int i = 0; i < kKeys / 2; ++i) s_out[fragment_at(i, row, lane, kKeys)] = s[i];

  // P's A fragments as they lie in the accumulator (Fp8Softmax::to_operand).
  uint16_t pairs[Fp8Softmax::kPairs];
  for (int j = 0; j < Fp8Softmax::kPairs; ++j) pairs[j] = Fp8Softmax::e4m3x2(s[2 * j] / 64.f, s[2 * j + 1] / 64.f);
  uint32_t pa[4][4];
  Fp8Softmax::to_operand(pairs, pa);
  float o[kDim / 2];
  for (float& x : o) x = 0.f;
  wgmma_fence();
#pragma unroll
  for (int step = 0; step < kKeys / 32; ++step)
    WgmmaFp8<kDim>::rs(o, pa[step], make_desc(va + 32 * step, 16, 1024, 128), step > 0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(o);
  for (int i = 0; i < kDim / 2; ++i) o_out[fragment_at(i, row, lane, kDim)] = o[i];
}

/// Two key blocks of 128 through Fp8Softmax and the P V product: s [2][64][128] scores (-inf: masked), factor
/// [2][64] per block and row, vt [2][128 dims][128 logical keys] -> codes [2][64][128] (P's e4m3 codes by physical
/// key), m and l [64] after both blocks, o [64][128] (unnormalised: sum of p~ v).
/// kFold: Fp8Softmax::step's folded form (TILEWISE_HOPPER_FP8_FOLD).
template <bool kFold>
__global__ void fp8_softmax_blocks(const float* s, const float* factor, const uint8_t* vt, uint8_t* codes_out,
                                   float* m_out, float* l_out, float* o_out) {
  __shared__ __align__(1024) uint8_t sv[kDim * 128];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, row = 16 * warp + lane / 4;
  auto at = [&](int i) { return fragment_at(i, row, lane, kKeys); };
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, o[kDim / 2];
  for (float& x : o) x = 0.f;
  const uint32_t va = smem_addr(sv);
  for (int block = 0; block < 2; ++block) {
    __syncthreads();  // the previous block's product has read sv (each thread waited for its wgmma)
    for (int i = tid; i < kDim * 128; i += 128) sv[panel_offset(i / 128, i % 128)] = vt[block * kDim * 128 + i];
    fence_proxy_async();
    __syncthreads();
    float frag[Fp8Softmax::kValues], corr[2];
    const float f[2] = {factor[block * kRows + row], factor[block * kRows + row + 8]};
    for (int i = 0; i < Fp8Softmax::kValues; ++i) frag[i] = s[block * kRows * kKeys + at(i)];
    uint16_t pairs[Fp8Softmax::kPairs];
    Fp8Softmax::step<true, kFold>(frag, f, m, l, corr, pairs);
    for (int j = 0; j < Fp8Softmax::kPairs; ++j) {
      codes_out[block * kRows * kKeys + at(2 * j)] = static_cast<uint8_t>(pairs[j] & 0xff);
      codes_out[block * kRows * kKeys + at(2 * j + 1)] = static_cast<uint8_t>(pairs[j] >> 8);
    }
    for (int i = 0; i < kDim / 2; ++i) o[i] *= corr[(i % 4) / 2];
    uint32_t pa[4][4];
    Fp8Softmax::to_operand(pairs, pa);
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < kKeys / 32; ++step)
      WgmmaFp8<kDim>::rs(o, pa[step], make_desc(va + 32 * step, 16, 1024, 128), 1);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(o);
  }
  if (lane % 4 == 0)
    for (int rr = 0; rr < 2; ++rr) m_out[row + 8 * rr] = m[rr], l_out[row + 8 * rr] = l[rr];
  for (int i = 0; i < kDim / 2; ++i) o_out[fragment_at(i, row, lane, kDim)] = o[i];
}

using GpuBuffer = gradcheck::Buffer;

template <class T>
GpuBuffer on_gpu(const std::vector<T>& host) {
  return gradcheck::make_buffer(tilewise::Device::cuda, host.size() * sizeof(T), host.data());
}
GpuBuffer on_gpu(size_t bytes) { return gradcheck::make_buffer(tilewise::Device::cuda, bytes); }
template <class T>
T* ptr(const GpuBuffer& b) { return static_cast<T*>(b.data()); }
#endif

/// Fresh random inputs per run; the seed is in every failure's trace.
class CudaFp8Mma : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!tilewise::cuda_available()) GTEST_SKIP() << "no CUDA device (or built without CUDA): GPU test skipped";
  }
  const uint64_t seed = oracle::fresh_seed();
  const ::testing::ScopedTrace trace{__FILE__, __LINE__, oracle::seed_note(seed)};
  oracle::Rng rng{seed};
};

TEST_F(CudaFp8Mma, ProductsWithPFromTheAccumulatorAndVtInItsKeyOrder) {
#ifdef TILEWISE_WITH_CUDA
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

  const GpuBuffer dq = on_gpu(q), dk = on_gpu(k), dvt = on_gpu(vt), ds = on_gpu(4 * kRows * kKeys),
                  dout = on_gpu(4 * kRows * kDim);
  fp8_products<<<1, 128>>>(ptr<uint8_t>(dq), ptr<uint8_t>(dk), ptr<uint8_t>(dvt), ptr<float>(ds), ptr<float>(dout));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<float> s = ds.download_as<float>(kRows * kKeys), o = dout.download_as<float>(kRows * kDim);

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

#ifdef TILEWISE_WITH_CUDA
/// Two blocks through Fp8Softmax::step (kFold: its folded form) into the product, against the host's online §11.4.
/// Integer scores times factors 1 or 2: every t is an integer, so 2^(t - M) and 448 times it are exact and the
/// codes are the host's to the bit; the folded form computes 2^(t - M + log2 448), within ~1e-7 of those values,
/// so its code may differ by one step where the exact value is a rounding tie (448 * 2^-17 = 3.5 * 2^-9, say).
/// Block 1 raises the maximum of the rows it gives scores up to +3; row 5 is masked everywhere, row 7 in block 0.
template <bool kFold>
void check_online_softmax(oracle::Rng& rng) {
  std::uniform_int_distribution<int> score(-12, 0), raise(0, 3), coin(0, 1);
  const size_t n = 2 * kRows * kKeys;
  std::vector<float> s(n), factor(2 * kRows);
  for (int block = 0; block < 2; ++block)
    for (int r = 0; r < kRows; ++r) {
      factor[block * kRows + r] = coin(rng) ? 2.f : 1.f;
      for (int j = 0; j < kKeys; ++j) {
        float x = static_cast<float>(score(rng) + (block == 1 && r % 3 == 0 ? raise(rng) : 0));
        if (r == 5 || (r == 7 && block == 0) || coin(rng) * coin(rng) * coin(rng)) x = -INFINITY;
        s[(block * kRows + r) * kKeys + j] = x;
      }
    }
  const double pool[] = {-2, -1, -0.5, 0, 0.5, 1, 2};
  std::uniform_int_distribution<int> pick(0, 6);
  std::vector<double> v(2 * kKeys * kDim);  // [block][key][d]
  for (double& x : v) x = pool[pick(rng)];
  std::vector<uint8_t> vt(2 * kDim * kKeys);
  for (int block = 0; block < 2; ++block)
    for (int d = 0; d < kDim; ++d)
      for (int l = 0; l < kKeys; ++l)
        vt[(block * kDim + d) * kKeys + l] = tilewise::detail::double_to_e4m3(
            v[(block * kKeys + 32 * (l / 32) + physical_key(l % 32)) * kDim + d]);

  const GpuBuffer ds = on_gpu(s), df = on_gpu(factor), dvt = on_gpu(vt), dcodes = on_gpu(n), dm = on_gpu(4 * kRows),
                  dl = on_gpu(4 * kRows), dout = on_gpu(4 * kRows * kDim);
  fp8_softmax_blocks<kFold><<<1, 128>>>(ptr<float>(ds), ptr<float>(df), ptr<uint8_t>(dvt), ptr<uint8_t>(dcodes),
                                 ptr<float>(dm), ptr<float>(dl), ptr<float>(dout));
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const std::vector<uint8_t> codes = dcodes.download_as<uint8_t>(n);
  const std::vector<float> m = dm.download_as<float>(kRows), l = dl.download_as<float>(kRows),
                           o = dout.download_as<float>(kRows * kDim);

  // The host's online §11.4: per block the running integer maximum, codes against it, l and O rescaled by
  // 2^(M_old - M_new).
  for (int r = 0; r < kRows; ++r) {
    double m_run = -INFINITY, l_run = 0;
    std::vector<double> o_run(kDim, 0.0);
    for (int block = 0; block < 2; ++block) {
      double mx = -INFINITY;
      std::vector<double> t(kKeys);
      for (int j = 0; j < kKeys; ++j) {
        t[j] = double(s[(block * kRows + r) * kKeys + j]) * factor[block * kRows + r];
        mx = std::max(mx, t[j]);
      }
      const double m_new = std::max(m_run, std::ceil(mx));
      const double corr = m_new == m_run ? 1.0 : std::exp2(m_run - m_new);
      const double m_use = m_new == -INFINITY ? 0.0 : m_new;
      l_run *= corr;
      for (double& x : o_run) x *= corr;
      for (int j = 0; j < kKeys; ++j) {
        const double exact = 448.0 * std::exp2(t[j] - m_use);
        const uint8_t want = tilewise::detail::double_to_e4m3(exact), got = codes[(block * kRows + r) * kKeys + j];
        const bool tie = tilewise::detail::double_to_e4m3(exact * (1 + 1e-6)) !=
                         tilewise::detail::double_to_e4m3(exact * (1 - 1e-6));
        if (!kFold || !tie)
          ASSERT_EQ(got, want) << "block " << block << ", P[" << r << ", " << j << "]";
        else  // codes of positive values are ordered: one step either way
          ASSERT_LE(std::abs(int{got} - int{want}), 1) << "block " << block << ", P[" << r << ", " << j << "] (tie)";
        const double p = tilewise::detail::e4m3_to_double(got);  // l and O from the codes the kernel used
        l_run += p;
        for (int d = 0; d < kDim; ++d) o_run[d] += p * v[(block * kKeys + j) * kDim + d];
      }
      m_run = m_new;
    }
    ASSERT_EQ(m[r], m_run) << "M[" << r << "]";
    ASSERT_NEAR(l[r], l_run, 1e-6 * l_run) << "l[" << r << "]";
    for (int d = 0; d < kDim; ++d)  // |v| <= 2: the terms' absolute sum is at most 2 l
      ASSERT_NEAR(o[r * kDim + d], o_run[d], 4e-3 * l_run + 1e-6) << "O[" << r << ", " << d << "]";
  }
  EXPECT_EQ(m[5], -INFINITY);
  EXPECT_EQ(l[5], 0.f);
}
#endif

TEST_F(CudaFp8Mma, OnlineSoftmaxOverTwoBlocksIntoTheProduct) {
#ifdef TILEWISE_WITH_CUDA
  check_online_softmax<false>(rng);
#endif
}

TEST_F(CudaFp8Mma, FoldedSoftmaxOverTwoBlocksIntoTheProduct) {
#ifdef TILEWISE_WITH_CUDA
  check_online_softmax<true>(rng);
#endif
}

}  // namespace
