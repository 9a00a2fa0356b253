// The configuration of a kernel launch in clusters of CTAs along x, for cudaLaunchKernelEx and
// cudaOccupancyMaxActiveClusters: shared by the forward's and the backward's launchers.
#pragma once

#include <cuda_runtime.h>

namespace tilewise::hopper {

struct ClusterLaunch {
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute cluster{};  // config.attrs points here: not copyable

  ClusterLaunch(int grid, int threads, int smem_bytes, int cluster_size, cudaStream_t stream) {
    config.gridDim = dim3(static_cast<unsigned>(grid));
    config.blockDim = dim3(static_cast<unsigned>(threads));
    config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
    config.stream = stream;
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = static_cast<unsigned>(cluster_size), cluster.val.clusterDim.y = 1,
    cluster.val.clusterDim.z = 1;
    config.attrs = &cluster;
    config.numAttrs = 1;
  }
  ClusterLaunch(const ClusterLaunch&) = delete;
  ClusterLaunch& operator=(const ClusterLaunch&) = delete;
};

}  // namespace tilewise::hopper
