// Does a TMA load wait behind the same SM's bulk reductions? (docs/performance.md backward v3.28, next steps: the
// reduce kernel's three TMA-issuing threads each spend 1.1-1.9k cycles per block in their issue step, and one SM alone
// reduces at ~28 bytes per cycle, so a block's 32 KB dQ reduction may hold the SM's TMA unit ~1.2k cycles.)
//
// One CTA per SM. Its loader thread (warp 0) issues `--loads` bulk copies of 16 KB (a streamed Q or dO block) from
// global into shared memory, one at a time, and times each from before its issue to its mbarrier's completion, and
// the issue instruction alone. Its reducer thread (warp 1), in the modes that have one, meanwhile keeps up to five
// 32 KB bulk reductions (one dQ partial) in flight into an L2-resident accumulator, as the reduce kernel's reducer does.
// Modes: `alone` (no reductions anywhere), `same` (every CTA reduces beside its own loads: the kernel's situation),
// `others` (only the CTAs whose loads are not timed reduce: the L2's load without the SM's own queue). The loads
// read either an L2-resident 4 MB region (`--source l2`) or sweep a 2 GB buffer (`--source dram`).
// Prints the median and 90th percentile cycles of the loads of the timed SMs.
//
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -o /tmp/tma_queue_probe scripts/tma_queue_probe.cu
//   /tmp/tma_queue_probe [--loads 2000] [--source l2|dram]
// What to read: if `same` is much slower than `others`, loads wait behind their own SM's reductions (a queue in the
// TMA unit), and splitting each reduction between loads is worth a try; if `others` is as slow, the L2 is the queue.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tma_probe.cuh"

namespace {

constexpr int kLoadBytes = 16 * 1024;   // a streamed block: 64 rows x 128 bf16
constexpr int kReduceBytes = 32 * 1024;  // a dQ partial: 64 rows x 128 fp32
constexpr int kInFlight = 5;             // bulk reductions in flight per CTA
constexpr int kSmemBytes = kLoadBytes + kReduceBytes;
constexpr int64_t kL2Bytes = 4 << 20, kDramBytes = int64_t{2} << 30, kAccBytes = 8 << 20;

enum Mode { kAlone = 0, kSame = 1, kOthers = 2 };
const char* const kModeNames[] = {"alone", "same", "others"};

__device__ __forceinline__ bool timed_sm(int mode) {
  // In `others`, the even blocks load (timed) and the odd ones reduce; otherwise every block is timed.
  return mode != kOthers || (blockIdx.x % 2) == 0;
}

__global__ void __launch_bounds__(64) probe(const uint8_t* src, int64_t src_bytes, float* acc, int mode, int loads,
                                            uint32_t* stop, unsigned long long* cycles) {
  extern __shared__ __align__(128) uint8_t smem[];  // the 16 KB load buffer, the 32 KB partial (over 48 KB: dynamic)
  uint8_t* buf = smem;
  float* partial = reinterpret_cast<float*>(smem + kLoadBytes);
  __shared__ alignas(8) unsigned long long bar;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < kReduceBytes / 4; i += blockDim.x) partial[i] = 1.f;
  if (threadIdx.x == 0) mbarrier_init(&bar);
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  const bool timed = timed_sm(mode);
  const bool reduces = mode == kSame || (mode == kOthers && !timed);
  if (warp == 0 && lane == 0 && timed) {
    // The loader: one 16 KB copy at a time, each timed from before its issue to its completion.
    const int64_t blocks = src_bytes / kLoadBytes;
    for (int n = 0; n < loads; ++n) {
      const uint8_t* from = src + ((static_cast<int64_t>(blockIdx.x) * 7919 + n * 131) % blocks) * kLoadBytes;
      const long long t0 = clock64();
      bulk_load(&bar, buf, from, kLoadBytes);
      const long long t1 = clock64();
      mbarrier_wait(&bar, static_cast<uint32_t>(n & 1));
      const long long t2 = clock64();
      cycles[(static_cast<int64_t>(blockIdx.x) * loads + n) * 2] = static_cast<unsigned long long>(t2 - t0);
      cycles[(static_cast<int64_t>(blockIdx.x) * loads + n) * 2 + 1] = static_cast<unsigned long long>(t1 - t0);
    }
    atomicAdd(stop, 1u);  // the reducers stop once every timed loader is done
  }
  if (warp == 1 && lane == 0 && reduces) {
    // The reducer: 32 KB reductions into an L2-resident accumulator, at most kInFlight reading shared memory.
    const int64_t blocks = kAccBytes / kReduceBytes;
    const uint32_t loaders = mode == kOthers ? (gridDim.x + 1) / 2 : gridDim.x;
    for (int64_t n = 0; *reinterpret_cast<volatile uint32_t*>(stop) < loaders; ++n) {
      float* to = acc + ((static_cast<int64_t>(blockIdx.x) * 17 + n) % blocks) * (kReduceBytes / 4);
      asm volatile(
          "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
          "cp.async.bulk.commit_group;\n"
          "cp.async.bulk.wait_group.read %3;\n" ::"l"(to),
          "r"(smem_addr(partial)), "r"(kReduceBytes), "n"(kInFlight - 1)
          : "memory");
    }
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
  }
}

}  // namespace

int main(int argc, char** argv) {
  int loads = 2000;
  bool dram = false;
  for (int a = 1; a < argc; ++a) {
    const std::string arg = argv[a];
    if (arg == "--loads" && a + 1 < argc) {
      loads = std::atoi(argv[++a]);
    } else if (arg == "--source" && a + 1 < argc) {
      const std::string v = argv[++a];
      if (v != "l2" && v != "dram") {
        std::fprintf(stderr, "invalid --source = %s: expected l2 or dram\n", v.c_str());
        return 2;
      }
      dram = v == "dram";
    } else {
      std::fprintf(stderr, "invalid argument = %s: expected --loads N or --source l2|dram\n", arg.c_str());
      return 2;
    }
  }
  if (loads < 1) {
    std::fprintf(stderr, "invalid --loads = %d: expected >= 1\n", loads);
    return 2;
  }
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int ctas = prop.multiProcessorCount;  // one per SM (64 threads and ~48 KB of shared memory each)
  const int64_t src_bytes = dram ? kDramBytes : kL2Bytes;
  const uint8_t* src = device_zeros<uint8_t>(src_bytes);
  float* acc = device_zeros<float>(kAccBytes / 4);
  uint32_t* stop = device_zeros<uint32_t>(1);
  const size_t n_cycles = static_cast<size_t>(ctas) * loads * 2;
  unsigned long long* cycles = device_zeros<unsigned long long>(n_cycles);
  std::vector<unsigned long long> host(n_cycles);
  CHECK(cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  std::printf("%s: %d SMs; %d loads of %d KB per timed SM from %s; reductions of %d KB, %d in flight per CTA\n",
              prop.name, ctas, loads, kLoadBytes / 1024, dram ? "a 2 GB sweep (DRAM)" : "4 MB (L2-resident)",
              kReduceBytes / 1024, kInFlight);
  std::printf("| mode | load cycles: median | p90 | issue cycles: median | p90 |\n|---|---|---|---|---|\n");
  for (int mode = kAlone; mode <= kOthers; ++mode) {
    CHECK(cudaMemset(stop, 0, sizeof(uint32_t)));
    CHECK(cudaMemset(cycles, 0, n_cycles * sizeof(unsigned long long)));
    probe<<<ctas, 64, kSmemBytes>>>(src, src_bytes, acc, mode, loads, stop, cycles);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(host.data(), cycles, n_cycles * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
    std::vector<unsigned long long> total, issue;
    for (int b = 0; b < ctas; ++b) {
      if (mode == kOthers && b % 2 != 0) continue;  // (timed_sm)
      for (int n = loads / 10; n < loads; ++n) {  // the first tenth warms up
        total.push_back(host[(static_cast<size_t>(b) * loads + n) * 2]);
        issue.push_back(host[(static_cast<size_t>(b) * loads + n) * 2 + 1]);
      }
    }
    std::printf("| %s | %llu | %llu | %llu | %llu |\n", kModeNames[mode], percentile(total, 0.5),
                percentile(total, 0.9), percentile(issue, 0.5), percentile(issue, 0.9));
  }
  return 0;
}
