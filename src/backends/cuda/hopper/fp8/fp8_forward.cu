// Instantiations of the Hopper FP8 forward kernel (head dims 64, 96, 128 x bf16, f16 output) and its launcher: the
// forward's CTA body (fwd_kernel.cuh) with the FP8 producer and consumer.
#include "backends/cuda/hopper/fp8/fp8_forward.hpp"

#include "backends/cuda/hopper/fp8/fp8_consumer.cuh"
#include "backends/cuda/hopper/fp8/fp8_producer.cuh"
#include "backends/cuda/hopper/fwd_kernel.cuh"
#include "backends/cuda/hopper/head_dims.hpp"
#include "backends/cuda/row_pass_order.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

namespace tilewise::hopper {

template <int kHeadDim>
using Fp8Traits = KernelTraits<kHeadDim, 0, false, true>;

template <int kHeadDim, WgType kType>
__global__ void __launch_bounds__(Fp8Traits<kHeadDim>::kThreads, 1)
    fp8_forward_kernel(const __grid_constant__ Fp8Params p) {
  using Traits = Fp8Traits<kHeadDim>;
  forward_cta<Traits, Fp8Producer<Traits>, Fp8Consumer<Traits, kType>>(p);
}

/// The V^T blocks (Fp8Params::vt_map): one CTA of kBlockN threads per (vt entry, b * Hkv + g) in `order`. The
/// block's key rows come into shared memory as e4m3 (V's codes, or V in the 16-bit dtype T quantised with the
/// channels' inverse scales, as quantize_fp8 would), a 16-byte load per thread (a row is D / 8 or D / 16 loads side
/// by side: coalesced), zero where the row is no token or a text padding key (P is 0 there, and 0 x NaN would not
/// be); then thread d < D writes V^T row d, its 128 keys in P's register order (vt_key_of_column).
template <class T>
__global__ void __launch_bounds__(kBlockN) vt_pack(const __grid_constant__ Fp8Params p, const void* v, Strides vs,
                                                   const float* v_inv, uint8_t* vt, int head_dim,
                                                   cuda::RowPassOrder order) {
  __shared__ uint8_t rows[kBlockN][128 + 16];  // [key][channel]; the padding keeps 16-byte rows apart in banks
  constexpr int kPerLoad = 16 / sizeof(T);     // elements per 16-byte load
  const int32_t entry = order.chunk(blockIdx.x), bg = order.head(blockIdx.x);
  const int32_t b = bg / p.kv_heads, g = bg % p.kv_heads;
  const int loads_per_row = head_dim / kPerLoad, rows_per_pass = kBlockN / loads_per_row;
  const int32_t text_len = clamped_text_len(p.text_len, b, static_cast<int32_t>(p.map.seq.text_capacity));
  for (int first = 0; first < kBlockN; first += rows_per_pass) {
    const int r = first + threadIdx.x / loads_per_row, chunk = threadIdx.x % loads_per_row;
    if (threadIdx.x >= rows_per_pass * loads_per_row || r >= kBlockN) continue;
    int64_t pos = block_row_position(p, entry, p.vt_slots, r);
    if (pos >= 0 && p.map.seq.is_text(pos) && pos - p.map.seq.text_offset() >= text_len) pos = -1;  // padding
    uint8_t codes[kPerLoad] = {};
    if (pos >= 0) {
      const int64_t at = b * vs.batch + pos * vs.seq + g * vs.head + chunk * kPerLoad;
      const uint4 raw = *reinterpret_cast<const uint4*>(static_cast<const T*>(v) + at);  // 16-byte aligned: TMA's rule
      const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerLoad; ++i) {
        if constexpr (std::is_same_v<T, uint8_t>)
          codes[i] = x[i];
        else
          codes[i] = quantize_e4m3(static_cast<float>(x[i]), v_inv[int64_t{bg} * head_dim + chunk * kPerLoad + i]);
      }
    }
#pragma unroll
    for (int i = 0; i < kPerLoad; ++i) rows[r][chunk * kPerLoad + i] = codes[i];
  }
  __syncthreads();
  const int r = threadIdx.x;
  if (r >= head_dim) return;
  uint4* out = reinterpret_cast<uint4*>(vt + ((int64_t{bg} * p.vt_entries + entry) * head_dim + r) * kBlockN);
#pragma unroll
  for (int chunk = 0; chunk < kBlockN / 16; ++chunk) {
    uint32_t w[4];
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      w[x] = 0;
#pragma unroll
      for (int e = 0; e < 4; ++e) w[x] |= uint32_t{rows[vt_key_of_column(16 * chunk + 4 * x + e)][r]} << (8 * e);
    }
    out[chunk] = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

namespace {

template <int D, WgType T>
cudaError_t launch(const Fp8Params& params, int grid, cudaStream_t stream) {
  constexpr int smem = Fp8Traits<D>::kSmemBytes;
  static const cudaError_t attr =
      cudaFuncSetAttribute(fp8_forward_kernel<D, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  fp8_forward_kernel<D, T><<<grid, Fp8Traits<D>::kThreads, smem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace

int fp8_query_block_rows(int head_dim) {
  return with_head_dim(head_dim, 0, [](auto d) { return Fp8Traits<decltype(d)::value>::kBlockM; });
}

cudaError_t launch_vt_pack(const Fp8Params& params, const void* v, const Strides& v_strides, VtSource source,
                           const float* v_inv, uint8_t* vt, int head_dim, cudaStream_t stream) {
  const cuda::RowPassOrder order = cuda::RowPassOrder::of(params.vt_entries, int64_t{params.batch} * params.kv_heads,
                                                          v_strides.head, v_strides.seq);
  const unsigned grid = order.grid();
  auto pack = [&](auto kernel) {
    kernel<<<grid, kBlockN, 0, stream>>>(params, v, v_strides, v_inv, vt, head_dim, order);
  };
  switch (source) {
    case VtSource::e4m3: pack(vt_pack<uint8_t>); break;
    case VtSource::bf16: pack(vt_pack<__nv_bfloat16>); break;
    case VtSource::f16: pack(vt_pack<__half>); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_fp8_forward(const Fp8Params& params, int head_dim, bool bf16, int grid, cudaStream_t stream) {
  return with_head_dim(head_dim, cudaErrorInvalidValue, [&](auto d) {
    constexpr int D = decltype(d)::value;
    return bf16 ? launch<D, WgType::bf16>(params, std::max(1, std::min(grid, params.num_work)), stream)
                : launch<D, WgType::f16>(params, std::max(1, std::min(grid, params.num_work)), stream);
  });
}

}  // namespace tilewise::hopper

#if TILEWISE_HOPPER_FP8_TRACE
/// The timeline of the last FP8 forward (fp8_consumer.cuh's fp8_trace) into `out` (host memory, `bytes` long).
extern "C" __attribute__((visibility("default"))) int tw_debug_fp8_trace(void* out, size_t bytes) {
  return tilewise::hopper::read_clock_table(tilewise::hopper::fp8_trace, out, bytes, false);
}
#endif
