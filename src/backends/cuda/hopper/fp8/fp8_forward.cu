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
#include <vector>

namespace tilewise::hopper {

/// The FP8 forward's traits: kRows query rows per work item (one of forward_rows_built(D, true)).
template <int kHeadDim, int kRows>
using Fp8Traits = KernelTraits<kHeadDim, 0, false, true, kBlockN, 0, false, kRows>;

template <int kHeadDim, WgType kType, int kRows>
__global__ void __launch_bounds__(Fp8Traits<kHeadDim, kRows>::kThreads, 1)
    fp8_forward_kernel(const __grid_constant__ Fp8Params p) {
  using Traits = Fp8Traits<kHeadDim, kRows>;
  forward_cta<Traits, Fp8Producer<Traits>, Fp8Consumer<Traits, kType>>(p);
}

/// The V^T blocks (Fp8Params::vt_map): one CTA of kBlockN threads per (vt entry, b * Hkv + g) in `order`. The
/// block's key rows come into shared memory as e4m3 (V's codes, or V in the 16-bit dtype T quantised with the
/// channels' inverse scales, as quantize_fp8 would), a 16-byte load per thread and pass (a row is D / 8 or D / 16
/// loads side by side: coalesced), zero where the row is no token or a text padding key (P is 0 there, and 0 x NaN
/// would not be); then thread d < D writes V^T row d, its 128 keys in P's register order (vt_key_of_column).
/// The rows' positions are worked out once each (thread r, row r) and every pass's load is issued before the first
/// is used: with a position per pass and thread and one load in flight, the pack read row 1's V at ~0.7 TB/s
/// (0.78 ms; docs/performance.md, "FP8: where the end-to-end time goes outside the kernel").
template <class T, int kHeadDim>
__global__ void __launch_bounds__(kBlockN) vt_pack(const __grid_constant__ Fp8Params p, const void* v, Strides vs,
                                                   const float* v_inv, uint8_t* vt, cuda::RowPassOrder order) {
  __shared__ uint8_t rows[kBlockN][128 + 16];  // [key][channel]; the padding keeps 16-byte rows apart in banks
  __shared__ int64_t row_at[kBlockN];          // the key row's sequence position, or -1 (no token, text padding)
  constexpr bool kCodes = std::is_same_v<T, uint8_t>;
  constexpr int kPerLoad = 16 / sizeof(T);  // elements per 16-byte load
  constexpr int kLoadsPerRow = kHeadDim / kPerLoad, kRowsPerPass = kBlockN / kLoadsPerRow;
  constexpr int kPasses = (kBlockN + kRowsPerPass - 1) / kRowsPerPass;
  const int32_t entry = order.chunk(blockIdx.x), bg = order.head(blockIdx.x);
  const int32_t b = bg / p.kv_heads, g = bg % p.kv_heads;
  {
    const int32_t text_len = clamped_text_len(p.text_len, b, static_cast<int32_t>(p.map.seq.text_capacity));
    int64_t pos = block_row_position(p, entry, p.vt_slots, threadIdx.x);
    if (pos >= 0 && p.map.seq.is_text(pos) && pos - p.map.seq.text_offset() >= text_len) pos = -1;  // padding
    row_at[threadIdx.x] = pos;
  }
  __syncthreads();
  const int chunk = threadIdx.x % kLoadsPerRow, lane_row = threadIdx.x / kLoadsPerRow;
  const bool active = threadIdx.x < kRowsPerPass * kLoadsPerRow;
  float inv[kPerLoad];  // this thread's channels' inverse scales (the same channels on every pass)
#pragma unroll
  for (int i = 0; i < kPerLoad; ++i)
    inv[i] = kCodes || !active ? 1.f : v_inv[int64_t{bg} * kHeadDim + chunk * kPerLoad + i];
  const T* base = static_cast<const T*>(v) + b * vs.batch + g * vs.head + chunk * kPerLoad;
  uint4 raw[kPasses];
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {  // every pass's load in flight before the first is converted
    const int r = pass * kRowsPerPass + lane_row;
    raw[pass] = make_uint4(0, 0, 0, 0);
    if (active && r < kBlockN && row_at[r] >= 0)
      raw[pass] = *reinterpret_cast<const uint4*>(base + row_at[r] * vs.seq);  // 16-byte aligned: TMA's rule
  }
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int r = pass * kRowsPerPass + lane_row;
    if (!active || r >= kBlockN) continue;
    const T* x = reinterpret_cast<const T*>(&raw[pass]);
    const bool real = row_at[r] >= 0;
#pragma unroll
    for (int i = 0; i < kPerLoad; ++i) {
      uint8_t code = 0;
      if constexpr (kCodes)
        code = x[i];
      else if (real)
        code = quantize_e4m3(static_cast<float>(x[i]), inv[i]);
      rows[r][chunk * kPerLoad + i] = code;
    }
  }
  __syncthreads();
  const int r = threadIdx.x;
  if (r >= kHeadDim) return;
  uint4* out = reinterpret_cast<uint4*>(vt + ((int64_t{bg} * p.vt_entries + entry) * kHeadDim + r) * kBlockN);
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

template <int D, WgType T, int R>
cudaError_t launch(const Fp8Params& params, int grid, cudaStream_t stream) {
  constexpr int smem = Fp8Traits<D, R>::kSmemBytes;
  static const cudaError_t attr =
      cudaFuncSetAttribute(fp8_forward_kernel<D, T, R>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  fp8_forward_kernel<D, T, R><<<grid, Fp8Traits<D, R>::kThreads, smem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace

std::vector<int> fp8_forward_query_rows(int head_dim) {
  return with_head_dim(head_dim, std::vector<int>{},
                       [](auto d) { return query_rows_of(forward_rows_built(decltype(d)::value, true)); });
}

cudaError_t launch_vt_pack(const Fp8Params& params, const void* v, const Strides& v_strides, VtSource source,
                           const float* v_inv, uint8_t* vt, int head_dim, cudaStream_t stream) {
  const cuda::RowPassOrder order = cuda::RowPassOrder::of(params.vt_entries, int64_t{params.batch} * params.kv_heads,
                                                          v_strides.head, v_strides.seq);
  const unsigned grid = order.grid();
  return with_head_dim(head_dim, cudaErrorInvalidValue, [&](auto d) {
    constexpr int D = decltype(d)::value;
    auto pack = [&](auto kernel) {
      kernel<<<grid, kBlockN, 0, stream>>>(params, v, v_strides, v_inv, vt, order);
      return cudaGetLastError();
    };
    switch (source) {
      case VtSource::e4m3: return pack(vt_pack<uint8_t, D>);
      case VtSource::bf16: return pack(vt_pack<__nv_bfloat16, D>);
      case VtSource::f16: return pack(vt_pack<__half, D>);
    }
    return cudaErrorInvalidValue;
  });
}

cudaError_t launch_fp8_forward(const Fp8Params& params, int head_dim, int rows, bool bf16, int grid,
                               cudaStream_t stream) {
  grid = std::max(1, std::min(grid, params.num_work));
  return with_head_dim(head_dim, cudaErrorInvalidValue, [&](auto d) {
    constexpr int D = decltype(d)::value;
    return with_query_rows<forward_rows_built(D, true)>(rows, cudaErrorInvalidValue, [&](auto r) {
      constexpr int R = decltype(r)::value;
      return bf16 ? launch<D, WgType::bf16, R>(params, grid, stream) : launch<D, WgType::f16, R>(params, grid, stream);
    });
  });
}

}  // namespace tilewise::hopper

#if TILEWISE_HOPPER_FP8_TRACE
/// The timeline of the last FP8 forward (fp8_consumer.cuh's fp8_trace) into `out` (host memory, `bytes` long).
extern "C" __attribute__((visibility("default"))) int tw_debug_fp8_trace(void* out, size_t bytes) {
  return tilewise::hopper::read_clock_table(tilewise::hopper::fp8_trace, out, bytes, false);
}
#endif
