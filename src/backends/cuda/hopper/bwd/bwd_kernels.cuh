// The Hopper backward kernels, composed like the forward (fwd_kernel.cuh): one producer warpgroup (two TMA loader
// threads) and two consumer warpgroups around the same K and V rings, persistent CTAs fed by the dynamic
// scheduler. dq_kernel owns query blocks and streams key blocks; dkdv_kernel owns key blocks and streams query
// blocks (bwd_params.cuh has the roles).
#pragma once

#include "backends/cuda/hopper/bwd/bwd_consumer.cuh"
#include "backends/cuda/hopper/bwd/bwd_producer.cuh"

namespace tilewise::hopper {

template <int kHeadDim>
using BwdTraits = KernelTraits<kHeadDim, 128>;

template <int kHeadDim, WgType kType, bool kDq>
__global__ void __launch_bounds__(BwdTraits<kHeadDim>::kThreads, 1) backward_kernel(const __grid_constant__ BwdParams p) {
  using Traits = BwdTraits<kHeadDim>;
  extern __shared__ uint8_t smem_raw[];
  const typename Traits::Shared s = Traits::carve(smem_raw);
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0), tid = threadIdx.x % 128;

  // Rows past every box are never written by TMA: zero them once (see the forward).
  if (p.zero_init) {
    uint4* words = reinterpret_cast<uint4*>(s.q);
    for (int i = threadIdx.x; i < Traits::kBufferBytes / 16; i += Traits::kThreads) words[i] = make_uint4(0, 0, 0, 0);
    fence_proxy_async();
  }
  if (threadIdx.x == 0) {
    s.q_full->init(2);  // the two owned blocks, each announced by its own load
    s.q_empty->init(4 * Traits::kConsumerWarpgroups);
    for (int i = 0; i < Traits::kKStages; ++i) {
      s.k_full[i].init(1);
      s.k_empty[i].init(4 * Traits::kConsumerWarpgroups);
    }
    for (int i = 0; i < Traits::kVStages; ++i) {
      s.v_full[i].init(1);
      s.v_empty[i].init(4 * Traits::kConsumerWarpgroups);
    }
    for (int i = 0; i < 2; ++i) {
      s.work_full[i].init(1);
      s.work_empty[i].init(128 * Traits::kConsumerWarpgroups + 1);  // the consumers and the V loader
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    regs_decrease<Traits::kProducerRegs>();
    const BwdProducer<Traits> producer{p, s};
    if (tid == 0) {
      if constexpr (kDq) producer.dq_keys();
      else producer.dkdv_keys();
    } else if (tid == 32) {
      if constexpr (kDq) producer.dq_values();
      else producer.dkdv_values();
    }
  } else {
    regs_increase<Traits::kConsumerRegs>();
    BwdConsumer<Traits, kType>(p, s, wg - 1, tid).template run<kDq>();
  }
}

}  // namespace tilewise::hopper
