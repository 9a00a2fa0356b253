// Instantiations of the Hopper forward kernel (head dims 64, 96, 128 x bf16, f16) and its launcher.
#include "backends/cuda/hopper/forward.hpp"
#include "backends/cuda/hopper/cluster_launch.hpp"
#include "backends/cuda/hopper/fwd_kernel.cuh"

#include <algorithm>
#include <type_traits>
#include <vector>

namespace tilewise::hopper {
namespace {

template <int D, WgType T, bool kRuns, int kRows>
cudaError_t launch(const FwdRunParams& params, int grid, cudaStream_t stream) {
  using Traits = FwdTraits<D, kRuns, kRows>;
  constexpr int smem = Traits::kSmemBytes;
  static const cudaError_t attr =
      cudaFuncSetAttribute(forward_kernel<D, T, kRuns, kRows>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  // A cluster of C CTAs takes C work items at a time (tile_scheduler.cuh): C times as many CTAs as units or SM
  // groups, whichever is fewer.
  constexpr int C = Traits::kCluster;
  grid = C * std::max(1, std::min((params.num_work + C - 1) / C, grid / C));
  const ClusterLaunch lc(grid, Traits::kThreads, smem, C, stream);
  return cudaLaunchKernelEx(&lc.config, forward_kernel<D, T, kRuns, kRows>,
                            static_cast<const ForwardParams<kRuns>&>(params));
}

}  // namespace

std::vector<int> forward_query_rows(int head_dim) {
  return with_head_dim(head_dim, std::vector<int>{},
                       [](auto d) { return query_rows_of(forward_rows_built(decltype(d)::value, false)); });
}

int forward_smem_bytes(int head_dim) {
  return with_head_dim(head_dim, 0, [](auto d) { return KernelTraits<decltype(d)::value>::kSmemBytes; });
}

cudaError_t launch_forward(const FwdRunParams& params, int head_dim, int rows, bool bf16, int grid,
                           cudaStream_t stream) {
  return with_head_dim(head_dim, cudaErrorInvalidValue, [&](auto d) {
    constexpr int D = decltype(d)::value;
    return with_query_rows<forward_rows_built(D, false)>(rows, cudaErrorInvalidValue, [&](auto r) {
      constexpr int R = decltype(r)::value;
      auto go = [&](auto runs) {  // runs: the query runs' kernel (FwdRunParams::runs set)
        constexpr bool kRuns = decltype(runs)::value;
        return bf16 ? launch<D, WgType::bf16, kRuns, R>(params, grid, stream)
                    : launch<D, WgType::f16, kRuns, R>(params, grid, stream);
      };
      return params.runs != nullptr ? go(std::true_type{}) : go(std::false_type{});
    });
  });
}

}  // namespace tilewise::hopper
