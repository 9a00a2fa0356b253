// Instantiations of the Hopper forward kernel (head dims 64, 96, 128 x bf16, f16) and its launcher.
#include "backends/cuda/hopper/forward.hpp"
#include "backends/cuda/hopper/cluster_launch.hpp"
#include "backends/cuda/hopper/fwd_kernel.cuh"

#include <algorithm>
#include <type_traits>

namespace tilewise::hopper {
namespace {

template <int D, WgType T, bool kRuns>
cudaError_t launch(const FwdRunParams& params, int grid, cudaStream_t stream) {
  constexpr int smem = KernelTraits<D>::kSmemBytes;
  static const cudaError_t attr =
      cudaFuncSetAttribute(forward_kernel<D, T, kRuns>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  // A cluster of C CTAs takes C work items at a time (tile_scheduler.cuh): C times as many CTAs as units or SM
  // groups, whichever is fewer.
  constexpr int C = KernelTraits<D>::kCluster;
  grid = C * std::max(1, std::min((params.num_work + C - 1) / C, grid / C));
  const ClusterLaunch lc(grid, KernelTraits<D>::kThreads, smem, C, stream);
  return cudaLaunchKernelEx(&lc.config, forward_kernel<D, T, kRuns>, static_cast<const ForwardParams<kRuns>&>(params));
}

/// f(KernelTraits<D>{}) for a supported head dim D, else `unsupported`.
template <class R, class F>
R with_traits(int head_dim, R unsupported, F&& f) {
  return with_head_dim(head_dim, unsupported, [&](auto d) { return f(KernelTraits<decltype(d)::value>{}); });
}

}  // namespace

int query_block_rows(int head_dim) {
  return with_traits(head_dim, 0, [](auto traits) { return decltype(traits)::kBlockM; });
}

int forward_smem_bytes(int head_dim) {
  return with_traits(head_dim, 0, [](auto traits) { return decltype(traits)::kSmemBytes; });
}

cudaError_t launch_forward(const FwdRunParams& params, int head_dim, bool bf16, int grid, cudaStream_t stream) {
  return with_traits(head_dim, cudaErrorInvalidValue, [&](auto traits) {
    constexpr int D = decltype(traits)::D;
    auto go = [&](auto runs) {  // runs: the query runs' kernel (FwdRunParams::runs set)
      constexpr bool kRuns = decltype(runs)::value;
      return bf16 ? launch<D, WgType::bf16, kRuns>(params, grid, stream)
                  : launch<D, WgType::f16, kRuns>(params, grid, stream);
    };
    return params.runs != nullptr ? go(std::true_type{}) : go(std::false_type{});
  });
}

}  // namespace tilewise::hopper
