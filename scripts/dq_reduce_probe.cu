// How long does the SM's TMA unit take for one streamed block's dQ partial (64 rows x 128 fp32, 32 KB) in the two
// forms a reducer can use? (docs/performance.md backward v3.29: the reduce kernel's reducer spends ~1.3-1.45k cycles
// per block issuing its four tensor reductions, though issuing a bulk reduction takes ~63 cycles in
// scripts/tma_queue_probe.cu, and v3.29's paced reducer showed that its throughput is on the kernel's path.)
//
// One CTA per SM. Its reducer thread (warp 1) reduces one 32 KB partial after another, as the kernel's reducer does
// (issue, commit, wait until shared memory has been read, next), `--gap` cycles apart, in one of two forms:
//   tensor: four `cp.reduce.async.bulk.tensor.5d` of 32-column panels (128-byte swizzle) into an accumulator laid out
//           as the kernel's is, [rows, heads, D] fp32 with 24 heads, each box 8 x 8 rows of one head (a 6x8x8 tile's
//           64-row block: eight runs of eight rows, 12 KB apart);
//   bulk:   one `cp.reduce.async.bulk` of 32 KB into an accumulator laid out block after block (what a layout of the
//           accumulator in the kernel's block order would allow).
// Its loader thread (warp 0), with `--loads`, meanwhile brings 16 KB blocks (a streamed Q or dO block) from an
// L2-resident region one at a time, as the kernel's two loaders do, and times them.
// Prints, per form: the issue and read-out cycles per partial (median, p90), the loads' cycles, and the bytes per
// cycle each SM reduced.
//
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a -o /tmp/dq_reduce_probe scripts/dq_reduce_probe.cu
//   /tmp/dq_reduce_probe [--blocks 1000] [--gap 4000] [--acc-mb 96]
// What to read: if `bulk`'s issue + read-out is much shorter than `tensor`'s at the kernel's gap, a dQ accumulator
// in block order (one bulk reduction per block, converted by the dq pass) would shorten the reducer's step.
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "tma_probe.cuh"

namespace {

constexpr int kLoadBytes = 16 * 1024;    // a streamed block: 64 rows x 128 bf16
constexpr int kPartialBytes = 32 * 1024;  // a dQ partial: 64 rows x 128 fp32
constexpr int kPanelBytes = 8 * 1024;     // one 32-column panel of it
constexpr int kHeads = 24, kD = 128;
constexpr int64_t kL2Bytes = 4 << 20;
constexpr int kSmemBytes = 1024 + kLoadBytes + kPartialBytes;  // (1024: the swizzle's alignment)

struct Args {
  const uint8_t* src;
  float* acc;
  int64_t acc_blocks;  // 64-row blocks of one head in the accumulator
  int tensor;          // 1 = four tensor reductions, 0 = one bulk reduction
  int loads;           // 1 = the loader runs beside
  int blocks;          // partials reduced per CTA
  long long gap;       // cycles from one partial's read-out to the next one's issue
  uint32_t* stop;
  unsigned long long* cycles;  // per CTA and partial: issue, read out; then per CTA and load: load cycles
};

__global__ void __launch_bounds__(64) probe(const __grid_constant__ CUtensorMap map, const Args a) {
  extern __shared__ uint8_t raw[];
  uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + 1023) & ~uintptr_t(1023));
  uint8_t* partial = base;  // 1024-aligned: the 128-byte swizzle's pattern repeats every 1 KB
  uint8_t* buf = base + kPartialBytes;
  __shared__ alignas(8) unsigned long long bar;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < kPartialBytes / 4; i += blockDim.x) reinterpret_cast<float*>(partial)[i] = 1.f;
  if (threadIdx.x == 0) mbarrier_init(&bar);
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  unsigned long long* out = a.cycles + static_cast<int64_t>(blockIdx.x) * a.blocks * 3;
  if (warp == 1 && lane == 0) {
    const int head = blockIdx.x % kHeads;
    for (int n = 0; n < a.blocks; ++n) {
      const int64_t blk = (blockIdx.x / kHeads * 131 + static_cast<int64_t>(n) * 7) % a.acc_blocks;
      const long long t0 = clock64();
      if (a.tensor) {
        for (int panel = 0; panel < kD / 32; ++panel)
          asm volatile(
              "cp.reduce.async.bulk.tensor.5d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, %5, %6}], "
              "[%1];\n" ::"l"(reinterpret_cast<uint64_t>(&map)),
              "r"(smem_addr(partial + panel * kPanelBytes)), "r"(panel * 32), "r"(head), "r"(0), "r"(0),
              "r"(static_cast<int>(blk))
              : "memory");
      } else {
        float* to = a.acc + (blk * kHeads + head) * (kPartialBytes / 4);
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(to),
                     "r"(smem_addr(partial)), "r"(kPartialBytes)
                     : "memory");
      }
      asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
      const long long t1 = clock64();
      asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
      const long long t2 = clock64();
      out[n * 3] = static_cast<unsigned long long>(t1 - t0);
      out[n * 3 + 1] = static_cast<unsigned long long>(t2 - t1);
      while (clock64() - t2 < a.gap) {
      }
    }
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    atomicAdd(a.stop, 1u);
  }
  if (warp == 0 && lane == 0 && a.loads) {
    const int64_t l2_blocks = kL2Bytes / kLoadBytes;
    for (int n = 0; *reinterpret_cast<volatile uint32_t*>(a.stop) < gridDim.x; ++n) {
      const uint8_t* from = a.src + ((static_cast<int64_t>(blockIdx.x) * 7919 + n * 131) % l2_blocks) * kLoadBytes;
      const long long t0 = clock64();
      bulk_load(&bar, buf, from, kLoadBytes);
      mbarrier_wait(&bar, static_cast<uint32_t>(n & 1));
      if (n < a.blocks) out[n * 3 + 2] = static_cast<unsigned long long>(clock64() - t0);
    }
  }
}

using PFN_encodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                     const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                     CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

long long parse(const char* name, const char* v, long long lo) {
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (*end != '\0' || x < lo) {
    std::fprintf(stderr, "invalid %s = %s: expected an integer >= %lld\n", name, v, lo);
    std::exit(2);
  }
  return x;
}

}  // namespace

int main(int argc, char** argv) {
  int blocks = 1000;
  long long gap = 4000, acc_mb = 96;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "invalid argument = %s: expected --blocks N, --gap CYCLES or --acc-mb MB\n", arg.c_str());
      return 2;
    }
    if (arg == "--blocks") {
      blocks = static_cast<int>(parse("--blocks", argv[++i], 10));
    } else if (arg == "--gap") {
      gap = parse("--gap", argv[++i], 0);
    } else if (arg == "--acc-mb") {
      acc_mb = parse("--acc-mb", argv[++i], 1);
    } else {
      std::fprintf(stderr, "invalid argument = %s: expected --blocks N, --gap CYCLES or --acc-mb MB\n", arg.c_str());
      return 2;
    }
  }
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int ctas = prop.multiProcessorCount;
  const int64_t acc_blocks = std::max<int64_t>(1, (acc_mb << 20) / (int64_t{kPartialBytes} * kHeads));
  const uint8_t* src = device_zeros<uint8_t>(kL2Bytes);
  float* acc = device_zeros<float>(acc_blocks * kHeads * kPartialBytes / 4);
  uint32_t* stop = device_zeros<uint32_t>(1);
  const size_t n_cycles = static_cast<size_t>(ctas) * blocks * 3;
  unsigned long long* cycles = device_zeros<unsigned long long>(n_cycles);

  // The tensor form's map: [blocks][h 8][w 8][heads][D] fp32, a box of 32 columns x one head x 8 x 8 rows
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q{};
  CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q));
  if (q != cudaDriverEntryPointSuccess) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled not found\n");
    return 1;
  }
  const cuuint64_t row = kHeads * kD * 4;
  const cuuint64_t dims[5] = {kD, kHeads, 8, 8, static_cast<cuuint64_t>(acc_blocks)};
  const cuuint64_t strides[4] = {kD * 4, row, 8 * row, 64 * row};
  const cuuint32_t box[5] = {32, 1, 8, 8, 1}, ones[5] = {1, 1, 1, 1, 1};
  CUtensorMap map{};
  const CUresult r = reinterpret_cast<PFN_encodeTiled>(fn)(
      &map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 5, acc, dims, strides, box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    std::fprintf(stderr, "cuTensorMapEncodeTiled failed: %d\n", static_cast<int>(r));
    return 1;
  }
  CHECK(cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  std::printf("%s: %d SMs, one reducer per SM; %d partials of 32 KB each, %lld cycles apart; accumulator %lld MB\n",
              prop.name, ctas, blocks, gap, static_cast<long long>(acc_blocks * kHeads * kPartialBytes >> 20));
  std::printf("| form | loads beside | issue: median | p90 | read out: median | p90 | load: median | p90 | "
              "bytes per cycle per SM |\n|---|---|---|---|---|---|---|---|---|\n");
  std::vector<unsigned long long> host(n_cycles);
  for (int tensor = 1; tensor >= 0; --tensor) {
    for (int loads = 0; loads <= 1; ++loads) {
      CHECK(cudaMemset(stop, 0, sizeof(uint32_t)));
      CHECK(cudaMemset(cycles, 0, n_cycles * sizeof(unsigned long long)));
      const Args a{src, acc, acc_blocks, tensor, loads, blocks, gap, stop, cycles};
      probe<<<ctas, 64, kSmemBytes>>>(map, a);
      CHECK(cudaGetLastError());
      CHECK(cudaDeviceSynchronize());
      CHECK(cudaMemcpy(host.data(), cycles, n_cycles * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
      std::vector<unsigned long long> issue, read, load;
      double busy = 0;
      for (int b = 0; b < ctas; ++b)
        for (int n = blocks / 10; n < blocks; ++n) {  // the first tenth warms up
          const unsigned long long* c = &host[(static_cast<size_t>(b) * blocks + n) * 3];
          issue.push_back(c[0]);
          read.push_back(c[1]);
          if (c[2] != 0) load.push_back(c[2]);
          busy += static_cast<double>(c[0] + c[1]);
        }
      std::printf("| %s | %s | %llu | %llu | %llu | %llu | %llu | %llu | %.1f |\n",
                  tensor ? "tensor (4 panels)" : "bulk", loads ? "yes" : "no", percentile(issue, 0.5),
                  percentile(issue, 0.9), percentile(read, 0.5),
                  percentile(read, 0.9), percentile(load, 0.5), percentile(load, 0.9),
                  kPartialBytes * static_cast<double>(issue.size()) / busy);
    }
  }
  return 0;
}
