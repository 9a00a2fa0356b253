// The Hopper backward's launchers: the preprocess and the dQ conversions (instantiated here), and the main kernels by
// head dim (backward_at.hpp: each head dim's in a translation unit of its own).
#include "backends/cuda/hopper/bwd/backward.hpp"
#include "backends/cuda/hopper/bwd/backward_at.hpp"
#include "backends/cuda/hopper/bwd/bwd_kernels.cuh"
#include "backends/cuda/hopper/head_dims.hpp"

#include <algorithm>
#include <type_traits>

namespace tilewise::hopper {

int dkdv_stream_rows() { return TILEWISE_HOPPER_BWD_STREAM_ROWS; }

int reduce_cluster_size() { return bwd_cluster(BwdKernel::dkdvq_reduce_cluster); }

int reduce_cluster_ctas(int head_dim, bool bf16) { return head_dim == 128 ? reduce_cluster_ctas_at<128>(bf16) : 0; }

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
    return launch_backward_at<decltype(d)::value>(params, bf16, kernel, grid, stream);
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
          <<<grid, kDqConvertThreads, 0, stream>>>(params, accum, static_cast<__nv_bfloat16*>(dq), q_strides, scale);
    else
      dq_from_block_accumulator<__half, D><<<grid, kDqConvertThreads, 0, stream>>>(
          params, accum, static_cast<__half*>(dq), q_strides, scale);
    return cudaGetLastError();
  });
}

}  // namespace tilewise::hopper

#if TILEWISE_HOPPER_BWD_TRACE
/// The timeline of the last backward (bwd_trace.cuh's table) into `out` (host memory, `bytes` long); `clear` zeroes
/// the tables afterwards, so that the next run's stamps are told apart from older ones. Each head dim's kernels
/// stamp into their own translation unit's table: the first with a stamp is the last run's.
extern "C" __attribute__((visibility("default"))) int tw_debug_bwd_trace(void* out, size_t bytes, int clear) {
  using namespace tilewise::hopper;
  int (*const readers[])(void*, size_t, bool) = {read_backward_trace_at<128>, read_backward_trace_at<64>,
                                                 read_backward_trace_at<96>};
  bool found = false;
  for (auto read : readers) {
    if (found) {
      if (const int e = read(nullptr, 0, clear != 0); e != 0) return e;
      continue;
    }
    if (const int e = read(out, bytes, clear != 0); e != 0) return e;
    const auto* words = static_cast<const uint32_t*>(out);
    found = std::any_of(words, words + bytes / sizeof(uint32_t), [](uint32_t w) { return w != 0; });
  }
  return 0;
}
#endif
