// The launch of the Hopper backward kernels at one head dim, for the translation unit of that head dim
// (backward_d64.cu, backward_d96.cu, backward_d128.cu; backward_at.hpp says why one per head dim). Each includes
// this header and instantiates backward_at.hpp's functions for its D with TILEWISE_BACKWARD_AT(D).
#pragma once

#include "backends/cuda/hopper/bwd/backward_at.hpp"
#include "backends/cuda/hopper/bwd/bwd_kernels.cuh"
#include "backends/cuda/hopper/cluster_launch.hpp"

#include <type_traits>

namespace tilewise::hopper::bwd_launch {

/// The reduce kernel in clusters exists at D 128 in builds with TILEWISE_HOPPER_BWD_CLUSTER > 1 (bwd_params.cuh).
template <int D, BwdKernel K>
constexpr bool kBuilt = K != BwdKernel::dkdvq_reduce_cluster || (D == 128 && bwd_cluster(K) > 1);

/// Kernel K's launch: `grid` CTAs in clusters of bwd_cluster(K).
template <int D, BwdKernel K>
ClusterLaunch launch_config(int grid, cudaStream_t stream) {
  return ClusterLaunch(grid, BwdTraits<D, K>::kThreads, BwdTraits<D, K>::kSmemBytes, bwd_cluster(K), stream);
}

template <int D, WgType T, BwdKernel K, bool F>
cudaError_t set_smem() {
  static const cudaError_t attr = cudaFuncSetAttribute(
      backward_kernel<D, T, K, F>, cudaFuncAttributeMaxDynamicSharedMemorySize, BwdTraits<D, K>::kSmemBytes);
  return attr;
}

/// Kernel K, with the attention tile's frame pass (F) or without it (frame_free_kernel).
template <int D, WgType T, BwdKernel K, bool F = true>
cudaError_t launch(const BwdParams& params, int grid, cudaStream_t stream) {
  if constexpr (!kBuilt<D, K>) {
    return cudaErrorInvalidValue;  // the host asks reduce_cluster_ctas first
  } else {
    if (const cudaError_t attr = set_smem<D, T, K, F>(); attr != cudaSuccess) return attr;
    if constexpr (bwd_cluster(K) == 1) {
      backward_kernel<D, T, K, F><<<grid, BwdTraits<D, K>::kThreads, BwdTraits<D, K>::kSmemBytes, stream>>>(params);
    } else {
      const ClusterLaunch lc = launch_config<D, K>(grid, stream);
      if (const cudaError_t e = cudaLaunchKernelEx(&lc.config, backward_kernel<D, T, K, F>, params); e != cudaSuccess)
        return e;
    }
    return cudaGetLastError();
  }
}

template <int D, WgType T>
cudaError_t launch(const BwdParams& params, BwdKernel kernel, int grid, cudaStream_t stream) {
  switch (kernel) {
    case BwdKernel::dq: return launch<D, T, BwdKernel::dq>(params, grid, stream);
    case BwdKernel::dkdv: return launch<D, T, BwdKernel::dkdv>(params, grid, stream);
    case BwdKernel::dkdvq_reduce:
      // Only the attention tile flags frame-masked blocks (BwdProducer::describe_stream): every other pattern runs
      // the kernel without the frame pass where one is built.
      if constexpr (frame_free_kernel(D, BwdKernel::dkdvq_reduce)) {
        if (params.kind != PatternKind::attention_tile)
          return launch<D, T, BwdKernel::dkdvq_reduce, false>(params, grid, stream);
      }
      return launch<D, T, BwdKernel::dkdvq_reduce>(params, grid, stream);
    case BwdKernel::dkdvq_reduce_cluster: return launch<D, T, BwdKernel::dkdvq_reduce_cluster>(params, grid, stream);
  }
  return cudaErrorInvalidValue;
}

/// Resident CTAs of the reduce kernel in clusters (0 where this build has none). A template, so that a build without
/// that kernel does not instantiate it.
template <int D, BwdKernel K = BwdKernel::dkdvq_reduce_cluster>
int cluster_ctas(bool bf16) {
  if constexpr (!kBuilt<D, K>) {
    (void)bf16;
    return 0;
  } else {
    auto ctas = [](auto type) {
      constexpr WgType T = decltype(type)::value;
      if (set_smem<D, T, K, true>() != cudaSuccess) return 0;
      const ClusterLaunch lc = launch_config<D, K>(bwd_cluster(K), nullptr);
      int clusters = 0;
      if (cudaOccupancyMaxActiveClusters(&clusters, backward_kernel<D, T, K, true>, &lc.config) != cudaSuccess) {
        (void)cudaGetLastError();  // not sticky: the plain reduce kernel runs instead
        return 0;
      }
      return clusters * bwd_cluster(K);
    };
    return bf16 ? ctas(std::integral_constant<WgType, WgType::bf16>{})
                : ctas(std::integral_constant<WgType, WgType::f16>{});
  }
}

}  // namespace tilewise::hopper::bwd_launch

namespace tilewise::hopper {

template <int D>
cudaError_t launch_backward_at(const BwdParams& params, bool bf16, BwdKernel kernel, int grid, cudaStream_t stream) {
  return bf16 ? bwd_launch::launch<D, WgType::bf16>(params, kernel, grid, stream)
              : bwd_launch::launch<D, WgType::f16>(params, kernel, grid, stream);
}
template <int D>
int reduce_cluster_ctas_at(bool bf16) {
  return bwd_launch::cluster_ctas<D>(bf16);
}
template <int D>
int read_backward_trace_at(void* out, size_t bytes, bool clear) {
#if TILEWISE_HOPPER_BWD_TRACE
  return read_clock_table(bwd_trace, out, bytes, clear);
#else
  (void)out, (void)bytes, (void)clear;
  return 0;
#endif
}

}  // namespace tilewise::hopper

/// The explicit instantiations of backward_at.hpp's functions at head dim D, for its translation unit.
#define TILEWISE_BACKWARD_AT(D)                                                                                     \
  namespace tilewise::hopper {                                                                                      \
  template cudaError_t launch_backward_at<D>(const BwdParams&, bool, BwdKernel, int, cudaStream_t);                \
  template int reduce_cluster_ctas_at<D>(bool);                                                                     \
  template int read_backward_trace_at<D>(void*, size_t, bool);                                                      \
  }
