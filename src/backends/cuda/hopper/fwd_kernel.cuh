// The Hopper forward kernel: a persistent, warp-specialised CTA of one producer warpgroup (TMA loads) and two or
// three consumer warpgroups (wgmma + online softmax + epilogue) around a multi-stage shared-memory pipeline.
#pragma once

#include <type_traits>

#include "backends/cuda/hopper/kernel_traits.cuh"
#include "backends/cuda/hopper/mainloop_producer.cuh"
#include "backends/cuda/hopper/mma_softmax_consumer.cuh"

namespace tilewise::hopper {

/// One CTA of a forward kernel made of these roles: ProducerT{p, s, rank} with run_keys() (Q and K, thread 0) and
/// run_values() (V, thread 32), and ConsumerT(p, s, warpgroup, thread, rank).run(). The bf16 / f16 forward below
/// and the FP8 forward (fp8/fp8_kernel.cuh) are this body with their own roles.
template <class Traits, class ProducerT, class ConsumerT, class Params>
__device__ __forceinline__ void forward_cta(const Params& p) {
  extern __shared__ uint8_t smem_raw[];
  const typename Traits::Shared s = Traits::carve(smem_raw);
  // The shuffle tells the compiler the warpgroup index is warp-uniform, so descriptors derived from it live in
  // uniform registers rather than being moved there before every wgmma.
  const int wg = __shfl_sync(0xffffffffu, threadIdx.x / 128, 0), tid = threadIdx.x % 128;

  // When every box has fewer than 128 tokens, rows past the largest are never written by TMA: zero them once so
  // masked columns multiply zeros, never stale bits that could be NaN (rows between a smaller box and the largest
  // are zeroed per load, see TileClass::tail).
  if (p.zero_init) {
    uint4* words = reinterpret_cast<uint4*>(s.q);
    for (int i = threadIdx.x; i < Traits::kBufferBytes / 16; i += Traits::kThreads)
      words[i] = make_uint4(0, 0, 0, 0);
    fence_proxy_async();
  }
  // Shared memory a consumer keeps constant through the kernel (the FP8 forward's rows of ones), after the zeroing
  // and before anyone reads it (the barrier below).
  if constexpr (requires { ConsumerT::prepare_shared(s); }) {
    if (p.zero_init) __syncthreads();
    ConsumerT::prepare_shared(s);
  }
  if (threadIdx.x == 0) {
    s.q_full->init(1);
    s.q_empty->init(4 * Traits::kConsumerWarpgroups);  // one arrival per consumer warp, as for K and V
    // One arrival per consumer warp on the empty barriers (see Consumer::release); 256 would load the shared pipe.
    // In a cluster, both CTAs' consumers release each stage (Consumer::release).
    for (int i = 0; i < Traits::kKStages; ++i) {
      s.k_full[i].init(1);
      s.k_empty[i].init(4 * Traits::kConsumerWarpgroups * Traits::kCluster);
    }
    for (int i = 0; i < Traits::kVStages; ++i) {
      s.v_full[i].init(1);
      s.v_empty[i].init(4 * Traits::kConsumerWarpgroups * Traits::kCluster);
    }
    // The readers of a ring slot: the consumers and the V loader of every CTA, and the K loaders of all but the
    // first (which writes it); all arrive on the first CTA's work_empty.
    for (int i = 0; i < 2; ++i) {
      s.work_full[i].init(1);
      s.work_empty[i].init((128 * Traits::kConsumerWarpgroups + 1) * Traits::kCluster + Traits::kCluster - 1);
    }
    s.k_sync->init(1);
    s.v_sync->init(1);
    fence_barrier_init();
  }
  __syncthreads();
  if constexpr (Traits::kCluster > 1) cluster_sync();  // the peer's barriers exist before anything arrives on them
  // Warp-uniform for the compiler too (as wg below): a branch on it must not look divergent around wgmma.
  const uint32_t rank = Traits::kCluster > 1 ? __shfl_sync(0xffffffffu, cluster_rank(), 0) : 0;

  // The producer needs few registers; the consumers hold S, P and O fragments (ptxas allocates each branch
  // within its setmaxnreg budget).
  if (wg == 0) {
    regs_decrease<Traits::kProducerRegs>();
    if (tid == 0) {
      prefetch_tensormap(&p.q_video[0]);
      prefetch_tensormap(&p.k_video[0]);
      ProducerT{p, s, rank}.run_keys();
    } else if (tid == 32) {
      prefetch_tensormap(&p.v_video[0]);
      ProducerT{p, s, rank}.run_values();
    }
  } else {
    regs_increase<Traits::kConsumerRegs>();
    ConsumerT(p, s, wg - 1, tid, rank).run();
  }
  // No CTA leaves while its peer may still arrive on its barriers or multicast into its shared memory.
  if constexpr (Traits::kCluster > 1) cluster_sync();
}

/// kRuns: the video items are query run blocks (FwdRunParams::runs set); otherwise the tiles' blocks, with the
/// parameters they always had (FwdParams: the tiles' kernel keeps its machine code).
template <bool kRuns>
using ForwardParams = std::conditional_t<kRuns, FwdRunParams, FwdParams>;
/// The bf16 / f16 forward's traits: kRows query rows per work item (one of forward_rows_built(D, false)).
template <int kHeadDim, bool kRuns, int kRows>
using FwdTraits = KernelTraits<kHeadDim, 0, false, false, kBlockN, 0, kRuns, kRows>;
template <int kHeadDim, WgType kType, bool kRuns, int kRows>
__global__ void __launch_bounds__(FwdTraits<kHeadDim, kRuns, kRows>::kThreads, 1)
    forward_kernel(const __grid_constant__ ForwardParams<kRuns> p) {
  using Traits = FwdTraits<kHeadDim, kRuns, kRows>;
  forward_cta<Traits, Producer<Traits>, Consumer<Traits, kType>>(p);
}

}  // namespace tilewise::hopper
