// The Hopper backward kernels, composed like the forward (fwd_kernel.cuh): one producer warpgroup (two TMA loader
// threads) and two consumer warpgroups around the same K and V rings, persistent CTAs fed by the dynamic
// scheduler. The dQ kernel owns query blocks and streams key blocks; the dK/dV kernels own key blocks and stream
// query blocks (bwd_params.cuh has the roles). Plus the reduce kernel's last step: dq from its fp32
// accumulator.
#pragma once

#include "backends/cuda/hopper/bwd/bwd_consumer.cuh"
#include "backends/cuda/hopper/bwd/bwd_producer.cuh"

#include <type_traits>

namespace tilewise::hopper {

template <int kHeadDim, BwdKernel kKernel>
using BwdTraits = KernelTraits<kHeadDim, 128, reduces_dq(kKernel), false,
                               kKernel == BwdKernel::dkdv ? TILEWISE_HOPPER_BWD_STREAM_ROWS
                               : reduces_dq(kKernel)      ? 64
                                                          : kBlockN,
                               bwd_cluster(kKernel)>;

/// kFrameMask = false: the kernel without the attention tile's frame pass (frame_free_kernel), for plans with no
/// frame-masked block.
template <int kHeadDim, WgType kType, BwdKernel kKernel, bool kFrameMask = true>
__global__ void __launch_bounds__(BwdTraits<kHeadDim, kKernel>::kThreads, 1)
    backward_kernel(const __grid_constant__ BwdParams p) {
  constexpr bool kDq = kKernel == BwdKernel::dq;
  using Traits = BwdTraits<kHeadDim, kKernel>;
  extern __shared__ uint8_t smem_raw[];
  const typename Traits::Shared s = Traits::carve(smem_raw);
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0), tid = threadIdx.x % 128;

  // Rows past every box are never written by TMA: zero them once (see the forward). The reduce kernel always: its
  // dQ product sums over all 128 owned key rows, and the owned K and V rows past a small box (a partial tile's)
  // are never loaded when another class's box fills all 128 (zero_init off), so a CTA whose first items have small
  // boxes would multiply whatever the previous kernel left in shared memory into dQ: with NaN bit patterns there,
  // 0 * NaN poisons the whole block's dq (v3.9: 1616 rows of a GPU test's dq, and every dq under racecheck in v3.8).
  // Stale rows of an earlier item are harmless: real, finite values, multiplied by dS = 0.
  if (p.zero_init || Traits::kDsBytes > 0) {  // kDsBytes: the reduce kernel
    uint4* words = reinterpret_cast<uint4*>(s.q);
    for (int i = threadIdx.x; i < Traits::kBufferBytes / 16; i += Traits::kThreads) words[i] = make_uint4(0, 0, 0, 0);
    fence_proxy_async();
  }
  constexpr int kCluster = Traits::kCluster;
  constexpr bool kRecords = uses_row_records(kKernel, kCluster, Traits::D);
  if (threadIdx.x == 0) {
    s.q_full->init(2);  // the two owned blocks, each announced by its own load
    s.q_empty->init(4 * Traits::kConsumerWarpgroups);
    // In a cluster every CTA's consumers release each stage in all CTAs (the peers' loads multicast into it).
    for (int i = 0; i < Traits::kKStages; ++i) {
      s.k_full[i].init(1);
      s.k_empty[i].init(4 * Traits::kConsumerWarpgroups * kCluster);
    }
    for (int i = 0; i < Traits::kVStages; ++i) {
      s.v_full[i].init(1);
      s.v_empty[i].init(4 * Traits::kConsumerWarpgroups * kCluster);
    }
    for (int i = 0; i < 2; ++i) {
      s.work_full[i].init(1);
      // the consumers and the producer's other ring readers (the dO loader, the dQ reducer: kRingReaders; the record
      // warp's lane 0) of every CTA, and the peers' K loaders (WorkRing: only the first CTA's counts)
      constexpr int kReaders = 128 * Traits::kConsumerWarpgroups + BwdProducer<Traits>::kRingReaders + kRecords;
      s.work_empty[i].init(kReaders * kCluster + kCluster - 1);
    }
    if constexpr (kRecords) {
      for (int i = 0; i < 2; ++i) {
        s.rows_full[i].init(32);                                // every lane of the record warp, after its writes
        s.rows_empty[i].init(4 * Traits::kConsumerWarpgroups);  // each consumer warp once its rows are read
      }
    }
    if constexpr (Traits::kDqStaging) {
      for (int i = 0; i < 2; ++i) {
        s.ds_full[i].init(128 * Traits::kConsumerWarpgroups);  // both warpgroups' halves of a block's dS^T
        s.ds_empty[i].init(128);                               // the one warpgroup whose turn the dQ product is
      }
      s.dq_full->init(128);
      for (int i = 0; i < 2; ++i) s.dq_empty[i].init(1);
    }
    fence_barrier_init();
  }
  __syncthreads();
  if constexpr (kCluster > 1) cluster_sync();  // the peers' barriers exist before anything arrives on them
  const uint32_t rank = kCluster > 1 ? __shfl_sync(0xffffffffu, cluster_rank(), 0) : 0;

  if (wg == 0) {
    regs_decrease<Traits::kProducerRegs>();
    const BwdProducer<Traits> producer{p, s, rank};
    if (tid == 0) {
      if constexpr (kDq) producer.dq_keys();
      else producer.dkdv_keys();
    } else if (tid == 32) {
      if constexpr (kDq) producer.dq_values();
      else producer.dkdv_values();
    } else if (tid == 64) {
      if constexpr (Traits::kDqStaging) producer.dq_reducer();
    } else if (tid >= 96) {
      if constexpr (kRecords) producer.row_records();
    }
  } else {
    regs_increase<Traits::kConsumerRegs>();
    BwdConsumer<Traits, kType, kFrameMask>(p, s, wg - 1, tid, rank).template run<kKernel>();
  }
  // No CTA leaves while a peer may still arrive on its barriers or multicast into its shared memory.
  if constexpr (kCluster > 1) cluster_sync();
}

/// dq = scale * accumulator, in the input dtype with q's strides (eight elements per thread). The accumulator is the
/// reduce kernel's [B, S, Hq, D], which its TMA maps address like q.
template <class T>
__global__ void dq_from_accumulator(const float* accum, T* dq, Strides sq, int32_t heads, int64_t seq_len, int head_dim,
                                    float scale, int64_t total) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;  // an accumulator element
  if (i >= total) return;
  const int64_t d = i % head_dim, row = i / head_dim;
  const int64_t pos = (row / heads) % seq_len, h = row % heads, b = row / (seq_len * heads);
  const float4 x = *reinterpret_cast<const float4*>(accum + i), y = *reinterpret_cast<const float4*>(accum + i + 4);
  uint4 out;
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  out.x = pack_half2(x.x * scale, x.y * scale, bf16), out.y = pack_half2(x.z * scale, x.w * scale, bf16);
  out.z = pack_half2(y.x * scale, y.y * scale, bf16), out.w = pack_half2(y.z * scale, y.w * scale, bf16);
  *reinterpret_cast<uint4*>(dq + b * sq.batch + pos * sq.seq + h * sq.head + d) = out;
}

/// dq = scale * accumulator from the reduce kernel's accumulator in block order (TILEWISE_HOPPER_BWD_DQ_BLOCK_ORDER):
/// one CTA per (batch x head, streamed block entry), whose 64 x D fp32 are the dQ staging buffer's bytes
/// (KernelTraits::dq_stage_bytes).
/// Rows that are no token (block_row_position: past the box, the latent or the text) are skipped.
/// Every load of the block is issued first (kLoads per thread, padding rows too: they lie inside the block), then the
/// rows' positions are worked out while they are in flight: with one load per thread in flight behind the positions'
/// divisions, the pass ran at ~3 TB/s, 0.57 ms on row 1 against the memset's 4.4 TB/s (docs/performance.md v3.33).
constexpr int kDqConvertThreads = 128;
template <class T, int kHeadDim>
__global__ void __launch_bounds__(kDqConvertThreads) dq_from_block_accumulator(const __grid_constant__ BwdParams p,
                                                                               const float* accum, T* dq, Strides sq,
                                                                               float scale) {
  using Staged = BwdTraits<kHeadDim, BwdKernel::dkdvq_reduce>;  // the layout its blocks were staged in
  constexpr int kRows = Staged::kStreamRows, kChunks = kHeadDim / 4;  // a row's 16-byte chunks
  constexpr int kLoads = kRows * kChunks / kDqConvertThreads;         // consecutive threads, consecutive chunks
  static_assert(kRows * kChunks % kDqConvertThreads == 0, "the block's chunks split evenly over the threads");
  const int32_t entry = static_cast<int32_t>(blockIdx.x % static_cast<uint32_t>(p.stats_entries));
  const int64_t bh = blockIdx.x / static_cast<uint32_t>(p.stats_entries);
  const uint8_t* block = reinterpret_cast<const uint8_t*>(accum + (bh * p.stats_entries + entry) * (kRows * kHeadDim));
  auto row = [](int k) { return (k * kDqConvertThreads + static_cast<int>(threadIdx.x)) / kChunks; };
  auto chunk = [](int k) { return (k * kDqConvertThreads + static_cast<int>(threadIdx.x)) % kChunks; };
  float4 x[kLoads];
#pragma unroll
  for (int k = 0; k < kLoads; ++k)
    x[k] = *reinterpret_cast<const float4*>(block + Staged::dq_stage_bytes(row(k), 4 * chunk(k)));
  __shared__ int64_t row_at[kRows];
  for (int r = threadIdx.x; r < kRows; r += kDqConvertThreads)
    row_at[r] = block_row_position<kRows>(p, entry, p.stream_slots, r);
  __syncthreads();
  T* out = dq + bh / p.q_heads * sq.batch + bh % p.q_heads * sq.head;
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
#pragma unroll
  for (int k = 0; k < kLoads; ++k) {
    const int64_t pos = row_at[row(k)];
    if (pos < 0) continue;
    uint2 y;
    y.x = pack_half2(x[k].x * scale, x[k].y * scale, bf16), y.y = pack_half2(x[k].z * scale, x[k].w * scale, bf16);
    *reinterpret_cast<uint2*>(out + pos * sq.seq + 4 * chunk(k)) = y;
  }
}

}  // namespace tilewise::hopper
