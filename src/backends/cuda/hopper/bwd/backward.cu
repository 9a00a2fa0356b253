// Instantiations of the Hopper backward kernels (head dims 64, 96, 128 x bf16, f16 x dQ, dK/dV), the preprocess,
// and their launchers.
#include "backends/cuda/hopper/bwd/backward.hpp"
#include "backends/cuda/hopper/bwd/bwd_kernels.cuh"

namespace tilewise::hopper {
namespace {

template <int D, WgType T, bool kDq>
cudaError_t launch(const BwdParams& params, int grid, cudaStream_t stream) {
  constexpr int smem = BwdTraits<D>::kSmemBytes;
  static const cudaError_t attr =
      cudaFuncSetAttribute(backward_kernel<D, T, kDq>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  backward_kernel<D, T, kDq><<<grid, BwdTraits<D>::kThreads, smem, stream>>>(params);
  return cudaGetLastError();
}

template <class R, class F>
R with_head_dim(int head_dim, R unsupported, F&& f) {
  switch (head_dim) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
  }
  return unsupported;
}

}  // namespace

int backward_smem_bytes(int head_dim) {
  return with_head_dim(head_dim, 0, [](auto d) { return BwdTraits<decltype(d)::value>::kSmemBytes; });
}

cudaError_t launch_backward_preprocess(const BwdParams& params, const PreprocessParams& pre, int head_dim, bool bf16,
                                       cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(params.stats_entries), static_cast<unsigned>(pre.batch * params.q_heads));
  if (bf16)
    bwd_preprocess<__nv_bfloat16><<<grid, kBlockN, 0, stream>>>(params, pre, head_dim);
  else
    bwd_preprocess<__half><<<grid, kBlockN, 0, stream>>>(params, pre, head_dim);
  return cudaGetLastError();
}

cudaError_t launch_backward(const BwdParams& params, int head_dim, bool bf16, bool dq, int grid, cudaStream_t stream) {
  return with_head_dim(head_dim, cudaErrorInvalidValue, [&](auto d) {
    constexpr int D = decltype(d)::value;
    if (bf16)
      return dq ? launch<D, WgType::bf16, true>(params, grid, stream) : launch<D, WgType::bf16, false>(params, grid, stream);
    return dq ? launch<D, WgType::f16, true>(params, grid, stream) : launch<D, WgType::f16, false>(params, grid, stream);
  });
}

}  // namespace tilewise::hopper
