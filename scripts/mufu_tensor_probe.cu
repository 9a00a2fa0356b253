// Can an H200 SM run the FP8 forward's softmax (MUFU ex2, FMNMX, FFMA, e4m3 conversions) at the same time as its
// FP8 tensor-core products, or do the two add up, and what does the FP8 kernel's block cost with nothing else?
// (docs/performance.md, "FP8: does the SM overlap the softmax with the products?": the answers, and the floor they
// set for issue 18's 14 ms; raw outputs in docs/bench/h200-fp8-probe.md.)
//
// One CTA per SM, two or three warpgroups of 64 query rows, each running one role for a number of blocks on
// operands resident in shared memory (no loads, no masks, no barriers: the pipes alone). A block is what the FP8
// kernel does per warpgroup and 128-key block at D 128:
//   T  products only: S = Q K^T (four m64n128k32 e4m3 SS wgmmas), wait, O += P V (four RS wgmmas, P fixed), wait;
//   X  softmax only: the kernel's own `Fp8Softmax::step` (the default's fold, no row sum) and the P fragments;
//   F  both in the kernel's sequential order (S, wait, softmax, P V, wait);
//   P  both in FlashAttention-3's intra-warpgroup order (two warpgroups, 250 registers): S of block j+1 issued
//      before the softmax of block j;
//   O  F with P V at N = 136 (the kernel's row sums by V^T's eight rows of ones), accumulated across blocks;
//   G  the kernel's block: O's product into a fresh accumulator per block, promoted into O in fp32;
//   N  F with the row sums by an m64n8 product of their own;  A  F with the row sums on the ALUs (f16x2).
// Every configuration does the same work, 3 x n blocks (of products and/or softmax), so times compare directly:
//   T3 | X3            all products in one warpgroup, all softmax steps in the other: the hardware's own answer to
//                      whether the pipes overlap (against T3 and X3 alone);
//   TT, XX             each pipe alone with two warpgroups (the reference for the rest);
//   FF, PP, FFF        the kernel's order on two and three warpgroups, FA3's on two;
//   OOO, GGG, NNN, AAA the kernel's block part by part (three warpgroups).
// Prints one table: ms (median of --repeats launches), the SM clock over the launch (CTA 0's cycles / time), each
// warpgroup's own cycles in CTA 0, the products' rate, and the time against the pipes alone (sum and max).
//
// Each loop must keep what the kernel keeps: ptxas drops what feeds nothing (an empty asm is no barrier to it; two
// wgmma loops in one kernel serialise every wgmma, C7511; a loop over 168 registers spills). So the roles share one
// loop switched by flags where that fits, and the larger ones are kernels of their own. Check `-Xptxas -v` (no
// spill bytes) and the loop's SASS (MUFU, QGMMA, FADD counts) after any change.
//
//   nvcc -O3 -std=c++20 -gencode=arch=compute_90a,code=sm_90a -I src -I src/backends/cuda/hopper \
//        -o /tmp/mufu_tensor_probe scripts/mufu_tensor_probe.cu
//   /tmp/mufu_tensor_probe [--blocks 20000] [--repeats 7]
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_check.cuh"
#include "fp8_softmax.cuh"
#include "ptx.cuh"
#include "wgmma_ops.cuh"

using namespace tilewise::hopper;

namespace {

enum Role : int {
  kIdle = 0, kTensor = 1, kSoftmax = 2, kFull = 3, kPipelined = 4, kPromoted = 5, kOnes = 6, kOnesN8 = 7, kSumsAlu = 8
};

constexpr int kQBytes = 64 * 128;    // a warpgroup's 64 query rows, D 128 e4m3, one 128-byte swizzle panel
constexpr int kKBytes = 128 * 128;   // a 128-key block
constexpr int kVtBytes = 136 * 128;  // V^T: D rows of 128 keys, and the kernel's 8 rows of ones (the row sums)
constexpr int kSmemBytes = 1024 + 3 * kQBytes + kKBytes + kVtBytes + 96 * 1024;  // padding: one CTA per SM

struct Args {
  int role[3];
  int blocks[3];
  unsigned long long* cycles;  // per CTA: the clock over the launch (thread 0), then each warpgroup's own role
  float* sink;                 // keeps every result live
};

struct Operands {
  uint64_t q, k, vt;
};

__device__ __forceinline__ void issue_s(float (&sc)[64], const Operands& d) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) WgmmaFp8<128>::ss(sc, d.q + ((kk * 32) >> 4), d.k + ((kk * 32) >> 4), kk > 0);
}
__device__ __forceinline__ void issue_pv(float (&pv)[64], const uint32_t (&pa)[4][4], const Operands& d) {
#pragma unroll
  for (int j = 0; j < 4; ++j) WgmmaFp8<128>::rs(pv, pa[j], d.vt + ((32 * j) >> 4), 1);
}
// The row sums alone: m64n8k32 e4m3 (RS), B = eight rows of V^T's stage read as ones (the values do not matter here).
__device__ __forceinline__ void issue_sums_n8(float (&l)[4], const uint32_t (&pa)[4][4], const Operands& d) {
#pragma unroll
  for (int j = 0; j < 4; ++j)
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1;\n}\n"
        : "+f"(l[0]), "+f"(l[1]), "+f"(l[2]), "+f"(l[3])
        : "r"(pa[j][0]), "r"(pa[j][1]), "r"(pa[j][2]), "r"(pa[j][3]), "l"(d.vt + ((32 * j) >> 4)), "r"(1));
}
// The row sums on the ALUs: each code pair to f16x2 (exact), summed per row in f16x2, then to fp32. Registers
// pa[j][0] and pa[j][2] hold row r's codes, pa[j][1] and pa[j][3] row r + 8's (Fp8Softmax::to_operand).
__device__ __forceinline__ void sums_alu(float (&l)[2], const float (&corr)[2], const uint32_t (&pa)[4][4]) {
  __half2 acc[2][2] = {{__float2half2_rn(0.f), __float2half2_rn(0.f)}, {__float2half2_rn(0.f), __float2half2_rn(0.f)}};
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int x = 0; x < 4; ++x)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        uint32_t h2;
        const uint16_t codes = static_cast<uint16_t>(pa[j][x] >> (16 * half));
        asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h2) : "h"(codes));
        acc[x % 2][half] = __hadd2(acc[x % 2][half], *reinterpret_cast<const __half2*>(&h2));
      }
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    const float2 f = __half22float2(__hadd2(acc[rr][0], acc[rr][1]));
    l[rr] = fmaf(l[rr], corr[rr], f.x + f.y);
  }
}

// The kernel's softmax step on one S block (fold on, no row sum: the D 128 default), then its A fragments.
__device__ __forceinline__ void softmax(const float (&sc)[64], float (&m_run)[2], float (&l_run)[2],
                                        uint32_t (&pa)[4][4], float (&corr)[2]) {
  const float factor[2] = {0.0625f, 0.0625f};
  uint16_t pairs[Fp8Softmax::kPairs];
  Fp8Softmax::step<false, true, 0>(sc, factor, m_run, l_run, corr, pairs);
  Fp8Softmax::to_operand(pairs, pa);
}

// One block's S (issued, waited for), then its softmax and P fragments: the kernel's chain up to P V.
__device__ __forceinline__ void s_then_softmax(float (&sc)[64], const Operands& d, float (&m_run)[2],
                                               float (&l_run)[2], uint32_t (&pa)[4][4], float (&corr)[2]) {
  wgmma_fence();
  issue_s(sc, d);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(sc);
  softmax(sc, m_run, l_run, pa, corr);
}

// Which roles a kernel runs: the one loop (T, X and F, two warpgroups), or one role alone: F on three warpgroups
// (the one loop needs more than their 168 registers each, and ptxas then serialises the wgmmas, C7512), P (two S
// accumulators: 250 registers), G, O, N, A.
enum Kernel : int {
  kOneLoop = 0, kFullOnly = 1, kPipelinedOnly = 2, kPromotedOnly = 3, kOnesOnly = 4, kOnesN8Only = 5, kSumsAluOnly = 6
};

template <int kKernel>
__device__ __forceinline__ float run_role(int role, int blocks, const Operands& d) {
  float sc[64], pv[64], m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f}, corr[2];
  uint32_t pa[4][4];
#pragma unroll
  for (int i = 0; i < 64; ++i) {  // S like a product's (scores of a few units), for the softmax-only role
    sc[i] = 0.37f * static_cast<float>((threadIdx.x * 7 + i * 13) % 41) - 7.f;
    pv[i] = 0.f;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int x = 0; x < 4; ++x) pa[j][x] = 0x30383038u ^ (threadIdx.x * 0x01010101u & 0x07070707u);
  if (kKernel == kPromotedOnly || kKernel == kOnesOnly) {
    // The FP8 kernel's consumer block without its loads, masks and barriers: a fresh P V accumulator per block with
    // the row sums in 8 more columns (V^T's rows of ones, N = 136), promoted into O in fp32 (fp8_consumer.cuh).
    // kOnesOnly: the same products, accumulated across blocks in the tensor cores (no promotion).
    float o[68], acc[68];
#pragma unroll
    for (int i = 0; i < 68; ++i) o[i] = acc[i] = 0.f;
    if (kKernel == kPromotedOnly) m_run[0] = m_run[1] = 0.f;  // (fewer live values: l_run is not returned here)
    for (int b = 0; b < blocks; ++b) {
      s_then_softmax(sc, d, m_run, l_run, pa, corr);
      const bool rescale = __any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f);
      if (kKernel == kOnesOnly) {
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) WgmmaFp8<136>::rs(acc, pa[j], d.vt + ((32 * j) >> 4), b + j > 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(acc);
        if (rescale) o[0] += 1.f;  // keeps the vote
      } else {
        // A fresh accumulator declared in the loop, as the kernel's: nothing of it lives across blocks, so its
        // registers are S's (declared outside, as acc is, it spilled 632 bytes).
        float fresh[68];
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < 4; ++j) WgmmaFp8<136>::rs(fresh, pa[j], d.vt + ((32 * j) >> 4), j > 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(fresh);
        if (rescale) {
#pragma unroll
          for (int i = 0; i < 68; ++i) o[i] = fmaf(o[i], corr[(i % 4) / 2], fresh[i]);
        } else {
#pragma unroll
          for (int i = 0; i < 68; ++i) o[i] += fresh[i];
        }
      }
    }
    float t = kKernel == kOnesOnly ? acc[0] + acc[67] : 0.f;  // every element of O read: otherwise ptxas drops the
                                                              // promotion of the unread ones
#pragma unroll
    for (int i = 0; i < 68; ++i) t += o[i];
    pv[0] = t;
  } else if (kKernel == kOnesN8Only || kKernel == kSumsAluOnly) {
    // FFF's block with the row sums added another way: their own m64n8 product, or on the ALUs.
    float l8[4] = {0.f, 0.f, 0.f, 0.f};
    for (int b = 0; b < blocks; ++b) {
      s_then_softmax(sc, d, m_run, l_run, pa, corr);
      if (kKernel == kSumsAluOnly) sums_alu(l_run, corr, pa);
      wgmma_fence();
      issue_pv(pv, pa, d);
      if (kKernel == kOnesN8Only) issue_sums_n8(l8, pa, d);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(pv);
    }
    pv[0] += l8[0] + l8[1] + l8[2] + l8[3];
  } else if (kKernel != kPipelinedOnly) {
    // One loop for the three roles, the parts switched by warp-uniform flags: ptxas then neither serialises the
    // wgmmas (two loops with wgmmas in one kernel do: C7511) nor hoists the softmax out of the loop or drops the
    // fragments nobody reads (an empty asm is no barrier to ptxas): every part may feed a later wgmma.
    const bool do_s = kKernel == kFullOnly || role != kSoftmax, do_softmax = kKernel == kFullOnly || role != kTensor;
    for (int b = 0; b < blocks; ++b) {
      if (do_s) {
        wgmma_fence();
        issue_s(sc, d);
        wgmma_commit();
        wgmma_wait<0>();
      }
      if (do_softmax) softmax(sc, m_run, l_run, pa, corr);
      if (do_s) {
        wgmma_fence();
        issue_pv(pv, pa, d);
        wgmma_commit();
        wgmma_wait<0>();
      }
    }
  } else if (role == kPipelined) {
    float sn[64];
    wgmma_fence();
    issue_s(sc, d);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(sc);
    for (int b = 0; b + 1 < blocks; b += 2) {  // two blocks per turn, so that the S buffers' roles stay static
      wgmma_fence();
      issue_s(sn, d);  // S of the next block under this block's softmax
      wgmma_commit();
      softmax(sc, m_run, l_run, pa, corr);
      wgmma_fence();
      issue_pv(pv, pa, d);
      wgmma_commit();
      wgmma_wait_after<1>(pa[3][3]);  // the next S is done; this P V may still run
      fence_regs(sn);
      wgmma_fence();
      issue_s(sc, d);
      wgmma_commit();
      softmax(sn, m_run, l_run, pa, corr);
      wgmma_wait<1>();  // the previous P V (it reads the fragments rewritten below)
      wgmma_fence();
      issue_pv(pv, pa, d);
      wgmma_commit();
      wgmma_wait_after<1>(pa[3][3]);
      fence_regs(sc);
    }
    wgmma_wait<0>();
    fence_regs(pv);
    sc[0] += sn[0];
  }
  if (kKernel == kPromotedOnly) return pv[0] + m_run[1];
  return sc[0] + pv[0] + l_run[0] + l_run[1] + m_run[1] + __uint_as_float(pa[1][2]);
}

template <int kWarpgroups, int kKernel>
__global__ void __launch_bounds__(128 * kWarpgroups, 1) probe(const Args a) {
  extern __shared__ uint8_t raw[];
  uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
  uint8_t* q = base;
  uint8_t* k = q + 3 * kQBytes;
  uint8_t* vt = k + kKBytes;
  // e4m3 values of magnitude 2^-6 .. 3.75, random signs: no NaN, products like real scores (power depends on data).
  for (int i = threadIdx.x; i < (3 * kQBytes + kKBytes + kVtBytes) / 4; i += blockDim.x) {
    uint32_t w = 0;
    for (int b = 0; b < 4; ++b) {
      uint32_t h = (i * 4 + b + 1) * 2654435761u ^ (blockIdx.x * 40503u);
      h ^= h >> 13;
      h *= 0x5bd1e995u;
      h ^= h >> 15;
      const uint32_t code = (h & 0x87u) | ((1 + (h >> 8) % 8) << 3);
      w |= code << (8 * b);
    }
    reinterpret_cast<uint32_t*>(q)[i] = w;
  }
  fence_proxy_async();
  __syncthreads();
  const int wg = threadIdx.x / 128;
  const Operands d{make_desc(smem_addr(q + wg * kQBytes), 16, 1024, 128), make_desc(smem_addr(k), 16, 1024, 128),
                   make_desc(smem_addr(vt), 16, 1024, 128)};
  const unsigned long long t0 = clock64();
  const float r = run_role<kKernel>(a.role[wg], a.blocks[wg], d);
  if (threadIdx.x % 128 == 0) a.cycles[4 * blockIdx.x + 1 + wg] = clock64() - t0;
  __syncthreads();
  if (threadIdx.x == 0) a.cycles[4 * blockIdx.x] = clock64() - t0;
  if (r == 1.2345f) a.sink[blockIdx.x * blockDim.x + threadIdx.x] = r;  // never true; keeps r live
}

struct Config {
  std::string name;
  int warpgroups;
  int role[3];
  double blocks[3];  // in units of n
};

template <int kWarpgroups, int kKernel>
void launch_as(const Args& a, int sms) {
  static bool attr = [] {
    CHECK(cudaFuncSetAttribute(probe<kWarpgroups, kKernel>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     kSmemBytes));
    return true;
  }();
  (void)attr;
  probe<kWarpgroups, kKernel><<<sms, 128 * kWarpgroups, kSmemBytes>>>(a);
}

// Two warpgroups: the one-loop kernel, or the pipelined role's own; three: the full role's own.
void launch(const Config& cf, const Args& a, int sms) {
  if (cf.role[0] == kPipelined) {
    if (cf.warpgroups != 2) {
      std::fprintf(stderr, "invalid configuration %s: the pipelined role runs with 2 warpgroups\n", cf.name.c_str());
      std::exit(2);
    }
    return launch_as<2, kPipelinedOnly>(a, sms);
  }
  if (cf.role[0] == kPromoted) {
    if (cf.warpgroups != 3) {
      std::fprintf(stderr, "invalid configuration %s: the promoted role runs with 3 warpgroups\n", cf.name.c_str());
      std::exit(2);
    }
    return launch_as<3, kPromotedOnly>(a, sms);
  }
  if (cf.role[0] == kOnes) return launch_as<3, kOnesOnly>(a, sms);
  if (cf.role[0] == kOnesN8) return launch_as<3, kOnesN8Only>(a, sms);
  if (cf.role[0] == kSumsAlu) return launch_as<3, kSumsAluOnly>(a, sms);
  if (cf.warpgroups == 2) return launch_as<2, kOneLoop>(a, sms);
  for (int w = 0; w < 3; ++w)
    if (cf.role[w] != kFull) {
      std::fprintf(stderr, "invalid configuration %s: three warpgroups run the full role only\n", cf.name.c_str());
      std::exit(2);
    }
  return launch_as<3, kFullOnly>(a, sms);
}

}  // namespace

int main(int argc, char** argv) {
  int n = 20000, repeats = 7;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string f = argv[i];
    if (f == "--blocks") n = std::atoi(argv[i + 1]);
    else if (f == "--repeats") repeats = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "invalid argument %s: expected --blocks N or --repeats N\n", f.c_str());
      return 2;
    }
  }
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  unsigned long long* cycles;
  float* sink;
  CHECK(cudaMalloc(&cycles, 4 * sms * sizeof(unsigned long long)));
  CHECK(cudaMalloc(&sink, size_t(sms) * 384 * sizeof(float)));

  // Two warpgroups (the one-loop kernel has registers to spare there), the work in units of n blocks:
  const std::vector<Config> configs = {
      {"T3 (products alone, 1 WG)", 2, {kTensor, kIdle, kIdle}, {3, 0, 0}},
      {"X3 (softmax alone, 1 WG)", 2, {kSoftmax, kIdle, kIdle}, {3, 0, 0}},
      {"T3 | X3 (split roles)", 2, {kTensor, kSoftmax, kIdle}, {3, 3, 0}},
      {"TT (products alone, 2 WGs)", 2, {kTensor, kTensor, kIdle}, {1.5, 1.5, 0}},
      {"XX (softmax alone, 2 WGs)", 2, {kSoftmax, kSoftmax, kIdle}, {1.5, 1.5, 0}},
      {"FF (kernel's order, 2 WGs)", 2, {kFull, kFull, kIdle}, {1.5, 1.5, 0}},
      {"PP (FA3 order, 2 WGs)", 2, {kPipelined, kPipelined, kIdle}, {1.5, 1.5, 0}},
      {"FFF (kernel's order, 3 WGs)", 3, {kFull, kFull, kFull}, {1, 1, 1}},
      {"OOO (FFF + the row sums' 8 columns)", 3, {kOnes, kOnes, kOnes}, {1, 1, 1}},
      {"GGG (OOO + a fresh P V per block, promoted)", 3, {kPromoted, kPromoted, kPromoted}, {1, 1, 1}},
      {"NNN (FFF + the row sums by an m64n8 product)", 3, {kOnesN8, kOnesN8, kOnesN8}, {1, 1, 1}},
      {"AAA (FFF + the row sums on the ALUs, f16x2)", 3, {kSumsAlu, kSumsAlu, kSumsAlu}, {1, 1, 1}},
  };

  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  std::vector<double> ms_of(configs.size()), mhz_of(configs.size());
  std::vector<std::array<double, 3>> wg_mcycles(configs.size());
  for (size_t c = 0; c < configs.size(); ++c) {
    const Config& cf = configs[c];
    Args a{};
    for (int w = 0; w < 3; ++w) {
      a.role[w] = cf.role[w];
      a.blocks[w] = static_cast<int>(std::lround(cf.blocks[w] * n));
      if (cf.role[w] == kPipelined) a.blocks[w] &= ~1;
    }
    a.cycles = cycles;
    a.sink = sink;
    std::vector<double> ms, mhz, wg_cycles[3];
    for (int r = 0; r < repeats + 1; ++r) {
      CHECK(cudaEventRecord(e0));
      launch(cf, a, sms);
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      CHECK(cudaGetLastError());
      float t = 0.f;
      CHECK(cudaEventElapsedTime(&t, e0, e1));
      unsigned long long cyc[4] = {};
      CHECK(cudaMemcpy(cyc, cycles, sizeof(cyc), cudaMemcpyDeviceToHost));
      if (r == 0) continue;  // warm-up
      ms.push_back(t);
      mhz.push_back(cyc[0] / (t * 1e3));
      for (int w = 0; w < 3; ++w) wg_cycles[w].push_back(cyc[1 + w] * 1e-6);
    }
    for (int w = 0; w < 3; ++w) {
      std::sort(wg_cycles[w].begin(), wg_cycles[w].end());
      wg_mcycles[c][w] = w < cf.warpgroups ? wg_cycles[w][wg_cycles[w].size() / 2] : 0.0;
    }
    std::sort(ms.begin(), ms.end());
    std::sort(mhz.begin(), mhz.end());
    ms_of[c] = ms[ms.size() / 2];
    mhz_of[c] = mhz[mhz.size() / 2];
  }
  const double flops_per_block = 2 * 2.0 * 64 * 128 * 128;  // S and P V of one warpgroup block
  // Against the pipes alone: T3 and X3 for the split, TT and XX for everything with two or three warpgroups.
  const double sum1 = ms_of[0] + ms_of[1], max1 = std::max(ms_of[0], ms_of[1]);
  const double sum2 = ms_of[3] + ms_of[4], max2 = std::max(ms_of[3], ms_of[4]);
  std::printf("blocks n = %d, %d SMs, median of %d launches; a block: one warpgroup's S and P V (64 x 128 x 128 each)"
              " and/or its softmax\n\n", n, sms, repeats);
  std::printf("| configuration | ms | SM MHz | each WG's Mcycles (CTA 0) | products TFLOP/s | / (pipes alone, sum) |"
              " / (pipes alone, max) |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (size_t c = 0; c < configs.size(); ++c) {
    const Config& cf = configs[c];
    double tensor_blocks = 0;
    for (int w = 0; w < 3; ++w)
      if (cf.role[w] != kIdle && cf.role[w] != kSoftmax) tensor_blocks += cf.blocks[w] * n;
    const bool split = c < 3;
    char wgs[64];
    std::snprintf(wgs, sizeof wgs, cf.warpgroups == 3 ? "%.1f / %.1f / %.1f" : "%.1f / %.1f", wg_mcycles[c][0],
                  wg_mcycles[c][1], wg_mcycles[c][2]);
    std::printf("| %s | %.3f | %.0f | %s | %.0f | %.3f | %.3f |\n", cf.name.c_str(), ms_of[c], mhz_of[c], wgs,
                tensor_blocks * sms * flops_per_block / (ms_of[c] * 1e9), ms_of[c] / (split ? sum1 : sum2),
                ms_of[c] / (split ? max1 : max2));
  }
  return 0;
}
