// Instantiations of the Hopper forward kernel (head dims 64, 96, 128 x bf16, f16) and its launcher.
#include "backends/cuda/hopper/forward.hpp"
#include "backends/cuda/hopper/fwd_kernel.cuh"

namespace tilewise::hopper {
namespace {

template <int D, WgType T>
cudaError_t launch(const FwdParams& params, int grid, cudaStream_t stream) {
  constexpr int smem = KernelTraits<D>::kSmemBytes;
  static const cudaError_t attr =
      cudaFuncSetAttribute(forward_kernel<D, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  forward_kernel<D, T><<<grid, kThreads, smem, stream>>>(params);
  return cudaGetLastError();
}

template <WgType T>
cudaError_t launch_dim(const FwdParams& params, int head_dim, int grid, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return launch<64, T>(params, grid, stream);
    case 96: return launch<96, T>(params, grid, stream);
    case 128: return launch<128, T>(params, grid, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int forward_smem_bytes(int head_dim) {
  switch (head_dim) {
    case 64: return KernelTraits<64>::kSmemBytes;
    case 96: return KernelTraits<96>::kSmemBytes;
    case 128: return KernelTraits<128>::kSmemBytes;
  }
  return 0;
}

cudaError_t launch_forward(const FwdParams& params, int head_dim, bool bf16, int grid, cudaStream_t stream) {
  return bf16 ? launch_dim<WgType::bf16>(params, head_dim, grid, stream)
              : launch_dim<WgType::f16>(params, head_dim, grid, stream);
}

}  // namespace tilewise::hopper
