// Instantiations of the Hopper backward kernels (head dims 64, 96, 128 x bf16, f16 x dQ, dK/dV), the preprocess,
// and their launchers.
#include "backends/cuda/hopper/bwd/backward.hpp"
#include "backends/cuda/hopper/bwd/bwd_kernels.cuh"
#include "backends/cuda/hopper/cluster_launch.hpp"
#include "backends/cuda/hopper/head_dims.hpp"

#include <algorithm>
#include <type_traits>

namespace tilewise::hopper {
namespace {

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

}  // namespace

int dkdv_stream_rows() { return TILEWISE_HOPPER_BWD_STREAM_ROWS; }

int reduce_cluster_size() { return bwd_cluster(BwdKernel::dkdvq_reduce_cluster); }

int reduce_cluster_ctas(int head_dim, bool bf16) { return head_dim == 128 ? cluster_ctas<128>(bf16) : 0; }

cudaError_t launch_backward_preprocess(const BwdParams& params, const PreprocessParams& pre, int head_dim, bool bf16,
                                       int stream_rows, cudaStream_t stream) {
  PreprocessParams ordered = pre;
  ordered.order = cuda::RowPassOrder::of(params.stats_entries, int64_t{pre.batch} * params.q_heads, pre.so.head,
                                         pre.so.seq);
  const unsigned grid = ordered.order.grid();
  auto run = [&](auto rows, auto d) {
    constexpr int kRows = decltype(rows)::value, D = decltype(d)::value;
    if (bf16)
      bwd_preprocess<__nv_bfloat16, kRows, D><<<grid, kPreprocessThreads, 0, stream>>>(params, ordered);
    else
      bwd_preprocess<__half, kRows, D><<<grid, kPreprocessThreads, 0, stream>>>(params, ordered);
    return cudaGetLastError();
  };
  return with_head_dim(head_dim, cudaErrorInvalidValue, [&](auto d) {
    if (stream_rows == 64) return run(std::integral_constant<int, 64>{}, d);
    if (stream_rows == kBlockN) return run(std::integral_constant<int, kBlockN>{}, d);
    return cudaErrorInvalidValue;
  });
}

cudaError_t launch_backward(const BwdParams& params, int head_dim, bool bf16, BwdKernel kernel, int grid,
                            cudaStream_t stream) {
  return with_head_dim(head_dim, cudaErrorInvalidValue, [&](auto d) {
    constexpr int D = decltype(d)::value;
    return bf16 ? launch<D, WgType::bf16>(params, kernel, grid, stream)
                : launch<D, WgType::f16>(params, kernel, grid, stream);
  });
}

cudaError_t launch_dq_from_accumulator(const float* accum, void* dq, const Strides& q_strides, int64_t batch,
                                       int64_t heads, int64_t seq_len, int head_dim, float scale, bool bf16,
                                       cudaStream_t stream) {
  const int64_t total = batch * heads * seq_len * head_dim;
  const unsigned blocks = static_cast<unsigned>((total / 8 + 255) / 256);
  if (bf16)
    dq_from_accumulator<<<blocks, 256, 0, stream>>>(accum, static_cast<__nv_bfloat16*>(dq), q_strides,
                                                    static_cast<int32_t>(heads), seq_len, head_dim, scale, total);
  else
    dq_from_accumulator<<<blocks, 256, 0, stream>>>(accum, static_cast<__half*>(dq), q_strides,
                                                    static_cast<int32_t>(heads), seq_len, head_dim, scale, total);
  return cudaGetLastError();
}

bool dq_block_order(int head_dim) {
  return with_head_dim(head_dim, false, [](auto d) { return dq_block_order_at(decltype(d)::value); });
}

cudaError_t launch_dq_from_block_accumulator(const BwdParams& params, const float* accum, void* dq,
                                             const Strides& q_strides, int64_t batch, int head_dim, float scale,
                                             bool bf16, cudaStream_t stream) {
  const int64_t ctas = int64_t{params.stats_entries} * batch * params.q_heads;
  if (ctas <= 0 || ctas >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  return with_head_dim(head_dim, cudaErrorInvalidValue, [&](auto d) {
    constexpr int D = decltype(d)::value;
    const unsigned grid = static_cast<unsigned>(ctas);
    if (bf16)
      dq_from_block_accumulator<__nv_bfloat16, D>
          <<<grid, 128, 0, stream>>>(params, accum, static_cast<__nv_bfloat16*>(dq), q_strides, scale);
    else
      dq_from_block_accumulator<__half, D><<<grid, 128, 0, stream>>>(params, accum, static_cast<__half*>(dq),
                                                                      q_strides, scale);
    return cudaGetLastError();
  });
}

}  // namespace tilewise::hopper

#if TILEWISE_HOPPER_BWD_TRACE
/// The timeline of the last backward (bwd_trace.cuh's table) into `out` (host memory, `bytes` long); `clear` zeroes
/// the table afterwards, so that the next run's stamps are told apart from older ones.
extern "C" __attribute__((visibility("default"))) int tw_debug_bwd_trace(void* out, size_t bytes, int clear) {
  return tilewise::hopper::read_clock_table(tilewise::hopper::bwd_trace, out, bytes, clear != 0);
}
#endif
