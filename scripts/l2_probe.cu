// What the H200's L2 keeps of a working set swept over and over, for the three ways the backward touches memory:
// plain loads (the streamed Q and dO), fp32 reductions from registers (red.global), and bulk reductions from shared
// memory (cp.reduce.async.bulk, as the reduce kernel adds its dQ partials). The persistent CTAs take 32 KB blocks of
// a W MB buffer in order from an atomic counter, round after round, so every round touches every line once in the
// same order: an LRU cache holding W keeps it all after the first round, one smaller misses it all. DRAM bytes per
// launch (ncu) over the rounds give the share each access type keeps; the knee in W is the L2's capacity for it.
// docs/performance.md backward v3.26 asks this: row 1's dQ accumulator moves ~44 GB of DRAM traffic under every item
// order, where an LRU model of the L2's 50 MB predicts a few GB for the best ones.
//
// Build and run on the device (ncu for the DRAM bytes; the program itself prints each launch's time):
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -o /tmp/l2_probe scripts/l2_probe.cu
//   ncu --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct -k regex:sweep \
//     /tmp/l2_probe [--rounds 10] [--sms N] [--sizes 8,16,24,32,40,48,64]
// --sms N: only the CTAs on SMs below N work (the others leave at once), to see whether the L2 holds more for SMs
// of one part of the chip (H100-class L2s are two partitions). --sm-bit K:V (repeatable, all must hold): only SMs whose
// id has bit K equal to V, e.g. --sm-bit 3:0 for the SMs with (smid / 8) even. --modes read,red,bulk_red picks the
// access types (all three by default).
// Measured on the H200 (docs/performance.md backward v3.27): plain loads from all SMs keep ~28 MB of the 60 MB (the
// first misses at 30 MB, nothing kept at 48 MB); with the SMs below 66 the same. Reductions keep their lines resident
// up to 48 MB (93% hits) but write dirty lines back to DRAM beyond ~25 MB (26 MB: 2 MB per round, 32 MB: ~20 MB).
// Its own times at 8 MB (resident; v3.28, --sms N): the chip adds ~2.5 TB/s of fp32 by bulk reductions (reached from
// 66 SMs; red.global float4 2.1 TB/s), one SM alone 49 GB/s; row 1's dQ reductions need ~1.6 TB/s of that.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_check.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kBlockFloats = 8192;  // one 32 KB block: the reduce kernel's 64 x 128 fp32 dQ partial
enum Mode { kRead = 0, kRed = 1, kBulkRed = 2 };
const char* const kModeNames[] = {"read", "red", "bulk_red"};

__device__ __forceinline__ uint32_t smid() {
  uint32_t id;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
  return id;
}

/// Which SMs take part: an id below `below`, and for every bit k set in `bits`, bit k of the id equal to its bit in
/// `values`.
struct SmFilter {
  uint32_t below, bits = 0, values = 0;
  __host__ __device__ bool active(uint32_t id) const { return id < below && ((id ^ values) & bits) == 0; }
};

template <int kMode>
__global__ void __launch_bounds__(kThreads) sweep(float* buf, int64_t blocks, int64_t rounds, SmFilter filter,
                                                  unsigned long long* counter, float* sink) {
  __shared__ alignas(128) float ones[kBlockFloats];
  __shared__ long long next;
  if (!filter.active(smid())) return;
  if constexpr (kMode == kBulkRed) {
    for (int i = threadIdx.x; i < kBlockFloats; i += kThreads) ones[i] = 1.f;
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncthreads();
  float acc = 0.f;
  for (;;) {
    if (threadIdx.x == 0) next = static_cast<long long>(atomicAdd(counter, 1ull));
    __syncthreads();
    const long long i = next;
    __syncthreads();
    if (i >= blocks * rounds) break;
    float4* block = reinterpret_cast<float4*>(buf + (i % blocks) * kBlockFloats);
    if constexpr (kMode == kRead) {
      float4 v[kBlockFloats / 4 / kThreads];
#pragma unroll
      for (int k = 0; k < kBlockFloats / 4 / kThreads; ++k) v[k] = __ldcg(block + k * kThreads + threadIdx.x);
#pragma unroll
      for (int k = 0; k < kBlockFloats / 4 / kThreads; ++k) acc += v[k].x + v[k].y + v[k].z + v[k].w;
    } else if constexpr (kMode == kRed) {
#pragma unroll
      for (int k = 0; k < kBlockFloats / 4 / kThreads; ++k)
        atomicAdd(block + k * kThreads + threadIdx.x, make_float4(1.f, 1.f, 1.f, 1.f));
    } else if (threadIdx.x == 0) {
      asm volatile(
          "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
          "cp.async.bulk.commit_group;\n"
          "cp.async.bulk.wait_group.read 4;\n" ::"l"(block),
          "r"(static_cast<uint32_t>(__cvta_generic_to_shared(ones))), "r"(kBlockFloats * 4)
          : "memory");
    }
  }
  if constexpr (kMode == kBulkRed) {
    if (threadIdx.x == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  }
  if (acc == -1.f) *sink = acc;  // keeps the loads; never true for the zeros read
}

std::vector<int> parse_list(const char* s) {
  std::vector<int> out;
  for (const char* p = s; *p;) {
    out.push_back(std::atoi(p));
    while (*p && *p != ',') ++p;
    if (*p == ',') ++p;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t rounds = 10;
  std::vector<int> sizes{8, 16, 24, 32, 40, 48, 64};
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  uint32_t sms = static_cast<uint32_t>(prop.multiProcessorCount);
  SmFilter filter{};  // (below: --sms, set after the arguments)
  bool modes[3] = {true, true, true};
  for (int a = 1; a < argc; ++a) {
    const std::string arg = argv[a];
    if (arg == "--rounds" && a + 1 < argc) {
      rounds = std::atoll(argv[++a]);
    } else if (arg == "--sms" && a + 1 < argc) {
      sms = static_cast<uint32_t>(std::atoi(argv[++a]));
    } else if (arg == "--sizes" && a + 1 < argc) {
      sizes = parse_list(argv[++a]);
    } else if (arg == "--sm-bit" && a + 1 < argc) {
      int k = -1, v = -1;
      char rest = 0;
      if (std::sscanf(argv[++a], "%d:%d%c", &k, &v, &rest) != 2 || k < 0 || k > 31 || (v != 0 && v != 1)) {
        std::fprintf(stderr, "invalid --sm-bit = %s: expected K:V with K in 0..31 and V 0 or 1\n", argv[a]);
        return 2;
      }
      filter.bits |= 1u << k;
      filter.values = (filter.values & ~(1u << k)) | (static_cast<uint32_t>(v) << k);
    } else if (arg == "--modes" && a + 1 < argc) {
      const std::string list = std::string(",") + argv[++a] + ",";
      for (int m = kRead; m <= kBulkRed; ++m) modes[m] = list.find(std::string(",") + kModeNames[m] + ",") != std::string::npos;
      if (!modes[kRead] && !modes[kRed] && !modes[kBulkRed]) {
        std::fprintf(stderr, "invalid --modes = %s: expected a list of read, red, bulk_red\n", argv[a]);
        return 2;
      }
    } else {
      std::fprintf(stderr,
                   "invalid argument = %s: expected --rounds N, --sms N, --sizes MB,MB,..., --sm-bit K:V or --modes "
                   "read,red,bulk_red\n",
                   arg.c_str());
      return 2;
    }
  }
  filter.below = sms;
  int active = 0;
  for (uint32_t id = 0; id < static_cast<uint32_t>(prop.multiProcessorCount); ++id) active += filter.active(id);
  if (rounds < 1 || sms < 1 || sizes.empty()) {
    std::fprintf(stderr, "invalid --rounds %lld / --sms %u / --sizes: expected rounds >= 1, sms >= 1, sizes\n",
                 static_cast<long long>(rounds), sms);
    return 2;
  }
  int largest = 0;
  for (int mb : sizes) {
    if (mb < 1) {
      std::fprintf(stderr, "invalid --sizes entry = %d: expected megabytes >= 1\n", mb);
      return 2;
    }
    largest = std::max(largest, mb);
  }
  float *buf, *sink;
  unsigned long long* counter;
  CHECK(cudaMalloc(&buf, static_cast<size_t>(largest) << 20));
  CHECK(cudaMalloc(&sink, sizeof(float)));
  CHECK(cudaMalloc(&counter, sizeof(unsigned long long)));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  std::printf("%s: %d SMs, L2 %d MB; %lld rounds per launch, CTAs working on %d SMs (below %u, bits 0x%x = 0x%x)\n",
              prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20, static_cast<long long>(rounds), active, sms,
              filter.bits, filter.values);
  std::printf("| mode | MB | ms per round | GB/s |\n|---|---|---|---|\n");
  for (int mode = kRead; mode <= kBulkRed; ++mode) {
    if (!modes[mode]) continue;
    for (int mb : sizes) {
      const int64_t blocks = (static_cast<int64_t>(mb) << 20) / (kBlockFloats * 4);
      CHECK(cudaMemset(buf, 0, static_cast<size_t>(mb) << 20));
      CHECK(cudaMemset(counter, 0, sizeof(unsigned long long)));
      CHECK(cudaEventRecord(start));
      const dim3 grid(prop.multiProcessorCount), block(kThreads);
      if (mode == kRead) sweep<kRead><<<grid, block>>>(buf, blocks, rounds, filter, counter, sink);
      if (mode == kRed) sweep<kRed><<<grid, block>>>(buf, blocks, rounds, filter, counter, sink);
      if (mode == kBulkRed) sweep<kBulkRed><<<grid, block>>>(buf, blocks, rounds, filter, counter, sink);
      CHECK(cudaGetLastError());
      CHECK(cudaEventRecord(stop));
      CHECK(cudaEventSynchronize(stop));
      float ms = 0.f;
      CHECK(cudaEventElapsedTime(&ms, start, stop));
      const double bytes = static_cast<double>(mb) * (1 << 20) * rounds;
      std::printf("| %s | %d | %.4f | %.0f |\n", kModeNames[mode], mb, ms / rounds, bytes / (ms * 1e-3) / 1e9);
    }
  }
  return 0;
}
