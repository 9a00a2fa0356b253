// How many clusters of each size fit on this GPU with the forward kernel's footprint (384 threads, ~193 KB of
// dynamic shared memory, one CTA per SM): cluster sizes that leave SMs idle cost throughput.
// Build and run: nvcc -arch=sm_90a -o /tmp/cluster_occupancy scripts/cluster_occupancy.cu && /tmp/cluster_occupancy
#include <cstdio>
#include <cuda_runtime.h>

__global__ void probe() {}

int main() {
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("%s: %d SMs\n", prop.name, prop.multiProcessorCount);
  for (int smem : {197 * 1024, 229 * 1024}) {
    cudaFuncSetAttribute(probe, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    cudaFuncSetAttribute(probe, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    for (int c = 1; c <= 8; ++c) {
      cudaLaunchConfig_t cfg{};
      cfg.gridDim = dim3(c * 64);
      cfg.blockDim = dim3(384);
      cfg.dynamicSmemBytes = smem;
      cudaLaunchAttribute attr{};
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = c, attr.val.clusterDim.y = 1, attr.val.clusterDim.z = 1;
      cfg.attrs = &attr, cfg.numAttrs = 1;
      int n = 0;
      cudaError_t e = cudaOccupancyMaxActiveClusters(&n, probe, &cfg);
      std::printf("smem %3d KB cluster %d: %3d clusters = %3d SMs %s\n", smem / 1024, c, n, n * c,
                  e == cudaSuccess ? "" : cudaGetErrorString(e));
    }
  }
}
