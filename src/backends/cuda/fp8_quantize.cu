// Plan::quantize_fp8 on the GPU (docs/semantics.md §11.2). Four passes over the sequence, one warp per row of D
// values (lane l holds channels l, l + 32, ...; D is 64, 96 or 128):
//   1. per (batch, kv head), the sums of the visible keys' channels in float64: exact, as the reference's are, while
//      a channel's magnitudes span less than about 2^28 (bf16 / fp16 have 8 / 11 significant bits), so the order
//      of the atomic additions does not change the mean;
//   2. the smoothed keys' absolute maximum per key block and the values' per channel, over the visible keys
//      (atomicMax on the float bits: the values are >= 0, and NaN is dropped by fmaxf first, as std::max drops it);
//   3. k' = fl32(k - mu) and v quantised at every position, each with its group's 448 / amax;
//   4. the block and channel maxima turned into scales in place; and Q per row, on its own.
// The maxima accumulate in the caller's k_scale and v_scale (zeroed first), so the only scratch is the sums.
// For the FP8 forward (quantize_fp8_for_forward) the same passes write q and k into the forward's workspace, skip
// v (the forward's V^T pre-pass quantises it with the inverse scales kept by pass 4a) and write each query row's
// LSE shift, scale * q . mu.
#include "backends/cuda/fp8_quantize.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>
#include <type_traits>

#include "backends/cuda/cuda_common.hpp"
#include "backends/cuda/hopper/fp8/fp8_params.cuh"  // quantize_e4m3; clamped_text_len, as the kernels clamp
#include "tilewise/fp8.hpp"

namespace tilewise::cuda {
namespace {

constexpr int kWarps = 8;           // warps per CTA
constexpr int kRowsPerWarp = 64;    // passes 1 and 2: visible rows per warp before its CTA reduces
constexpr int kMaxChannels = 4;     // channels per lane: D <= 128

struct QuantizeParams {
  const void* q;
  const void* k;
  const void* v;
  Strides qs, ks, vs;  // elements
  uint8_t* q8;
  uint8_t* k8;
  uint8_t* v8;         // or null: v is not written
  Strides q8s, k8s, v8s;  // the e4m3 outputs' (bytes)
  float* q_scale;    // [B, Hq, S]
  float* k_scale;    // [B, Hkv, blocks]: the maxima, then the scales
  float* v_scale;    // [B, Hkv, D]: likewise
  float* v_inv;      // [B, Hkv, D]: 448 / the channel maxima (fp8::inv_scale_of), or null
  float* lse_shift;  // [B, Hq, S]: scale * q . mu, or null
  double* sums;      // [B, Hkv, D]
  TokenMapT<int32_t> map;
  const int32_t* text_len;
  int32_t batch, q_heads, kv_heads, head_dim, blocks;
  int64_t seq_len;
  float scale;  // the softmax scale (lse_shift)
};

template <class T>
__device__ __forceinline__ float load(const void* base, int64_t at) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[at]);
  else
    return __half2float(static_cast<const __half*>(base)[at]);
}

__device__ __forceinline__ int32_t valid_text(const QuantizeParams& p, int32_t b) {
  return hopper::clamped_text_len(p.text_len, b, static_cast<int32_t>(p.map.seq.text_capacity));
}

/// Sequence position of visible key number `i` of batch b: the video positions, then the valid text positions.
__device__ __forceinline__ int64_t visible_position(const QuantizeParams& p, int64_t i) {
  const int64_t n_video = p.map.seq.num_video;
  return i < n_video ? p.map.seq.video_offset() + i : p.map.seq.text_offset() + (i - n_video);
}

__device__ __forceinline__ float mean_of(const QuantizeParams& p, int64_t bg, int c, int32_t b) {
  const int64_t count = p.map.seq.num_video + valid_text(p, b);
  return static_cast<float>(p.sums[bg * p.head_dim + c] / static_cast<double>(count));
}

/// The float bits of a non-negative value keep their order as integers.
__device__ __forceinline__ void atomic_max_nonneg(float* at, float x) {
  atomicMax(reinterpret_cast<int*>(at), __float_as_int(x));
}

/// Where a warp of the row passes works (grid: chunks of kWarps * kRowsPerWarp rows, B * Hkv): its (batch, kv head),
/// its lane's channels (lane + 32 c for c < channels) and its rows [first, first + kRowsPerWarp).
struct WarpRows {
  int64_t bg, first;
  int32_t b, g;
  int warp, lane, channels;
  __device__ explicit WarpRows(const QuantizeParams& p)
      : bg(blockIdx.y),
        first((int64_t{blockIdx.x} * kWarps + threadIdx.x / 32) * kRowsPerWarp),
        b(static_cast<int32_t>(bg / p.kv_heads)),
        g(static_cast<int32_t>(bg % p.kv_heads)),
        warp(threadIdx.x / 32),
        lane(threadIdx.x % 32),
        channels(p.head_dim / 32) {}
  /// Rows of this warp's range below n: several per loop trip (unrolled), so that their loads are in flight at once.
  __device__ int64_t rows(int64_t n) const {
    return first >= n ? 0 : (n - first < kRowsPerWarp ? n - first : kRowsPerWarp);
  }
  __device__ int64_t key_row(const QuantizeParams& p, int64_t s) const {
    return b * p.ks.batch + s * p.ks.seq + g * p.ks.head;
  }
  __device__ int64_t value_row(const QuantizeParams& p, int64_t s) const {
    return b * p.vs.batch + s * p.vs.seq + g * p.vs.head;
  }
};

/// The CTA's warps' per-channel values combined with `op` (through shared memory), then `publish(d, combined)` by
/// one thread per channel: one global atomic per channel and CTA instead of one per warp.
template <class V, class Op, class Publish>
__device__ __forceinline__ void combine_warps(const WarpRows& w, int head_dim, const V (&x)[kMaxChannels], Op op,
                                              Publish publish) {
  __shared__ V part[kWarps][32 * kMaxChannels];
#pragma unroll
  for (int c = 0; c < kMaxChannels; ++c) part[w.warp][w.lane + 32 * c] = x[c];
  __syncthreads();
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    V y = part[0][d];
    for (int i = 1; i < kWarps; ++i) y = op(y, part[i][d]);
    publish(d, y);
  }
}

/// Pass 1: grid (chunks of kWarps * kRowsPerWarp visible keys, B * Hkv).
template <class T>
__global__ void key_sums(QuantizeParams p) {
  const WarpRows w(p);
  const int64_t n_visible = p.map.seq.num_video + valid_text(p, w.b);
  double acc[kMaxChannels] = {0.0, 0.0, 0.0, 0.0};
  const int64_t count = w.rows(n_visible);
#pragma unroll 4
  for (int64_t r = 0; r < count; ++r) {
    const int64_t row = w.key_row(p, visible_position(p, w.first + r));
#pragma unroll
    for (int c = 0; c < kMaxChannels; ++c)
      if (c < w.channels) acc[c] += load<T>(p.k, row + w.lane + 32 * c);
  }
  combine_warps(w, p.head_dim, acc, [](double x, double y) { return x + y; }, [&](int d, double sum) {
    if (sum != 0.0) atomicAdd(&p.sums[w.bg * p.head_dim + d], sum);
  });
}

/// Pass 2: same grid; the smoothed keys' block maxima and the values' channel maxima over the visible keys.
template <class T>
__global__ void group_maxima(QuantizeParams p) {
  const WarpRows w(p);
  const int64_t n_visible = p.map.seq.num_video + valid_text(p, w.b);
  float mu[kMaxChannels], vmax[kMaxChannels];
#pragma unroll
  for (int c = 0; c < kMaxChannels; ++c) {
    mu[c] = c < w.channels ? mean_of(p, w.bg, w.lane + 32 * c, w.b) : 0.f;
    vmax[c] = 0.f;
  }
  const int64_t count = w.rows(n_visible);
#pragma unroll 4
  for (int64_t r = 0; r < count; ++r) {
    const int64_t s = visible_position(p, w.first + r), krow = w.key_row(p, s), vrow = w.value_row(p, s);
    float kmax = 0.f;
#pragma unroll
    for (int c = 0; c < kMaxChannels; ++c) {
      if (c >= w.channels) continue;
      kmax = fmaxf(kmax, fabsf(__fsub_rn(load<T>(p.k, krow + w.lane + 32 * c), mu[c])));
      vmax[c] = fmaxf(vmax[c], fabsf(load<T>(p.v, vrow + w.lane + 32 * c)));
    }
    for (int o = 16; o > 0; o /= 2) kmax = fmaxf(kmax, __shfl_xor_sync(0xffffffffu, kmax, o));
    if (w.lane == 0 && kmax > 0.f) atomic_max_nonneg(&p.k_scale[w.bg * p.blocks + fp8::key_block(p.map, s)], kmax);
  }
  combine_warps(w, p.head_dim, vmax, [](float x, float y) { return fmaxf(x, y); }, [&](int d, float m) {
    if (m > 0.f) atomic_max_nonneg(&p.v_scale[w.bg * p.head_dim + d], m);
  });
}

/// Pass 3: grid (chunks of kWarps * kRowsPerWarp positions, B * Hkv); every position (padding too, with its block's
/// scale). A warp's channel means and value scales are computed once for its rows.
template <class T>
__global__ void quantize_keys_values(QuantizeParams p) {
  const WarpRows w(p);
  float mu[kMaxChannels], vinv[kMaxChannels];
#pragma unroll
  for (int c = 0; c < kMaxChannels; ++c) {
    mu[c] = c < w.channels ? mean_of(p, w.bg, w.lane + 32 * c, w.b) : 0.f;
    vinv[c] = c < w.channels ? fp8::inv_scale_of(p.v_scale[w.bg * p.head_dim + w.lane + 32 * c]) : 1.f;
  }
  const int64_t count = w.rows(p.seq_len);
#pragma unroll 4
  for (int64_t s = w.first; s < w.first + count; ++s) {
    const float kinv = fp8::inv_scale_of(p.k_scale[w.bg * p.blocks + fp8::key_block(p.map, s)]);
    const int64_t krow = w.key_row(p, s), vrow = w.value_row(p, s);
    const int64_t k8row = w.b * p.k8s.batch + s * p.k8s.seq + w.g * p.k8s.head;
    const int64_t v8row = w.b * p.v8s.batch + s * p.v8s.seq + w.g * p.v8s.head;
#pragma unroll
    for (int c = 0; c < kMaxChannels; ++c) {
      if (c >= w.channels) continue;
      const int d = w.lane + 32 * c;
      p.k8[k8row + d] = hopper::quantize_e4m3(__fsub_rn(load<T>(p.k, krow + d), mu[c]), kinv);
      if (p.v8 != nullptr) p.v8[v8row + d] = hopper::quantize_e4m3(load<T>(p.v, vrow + d), vinv[c]);
    }
  }
}

/// Pass 4a: the maxima to scales, in place (after pass 3 has read them); V's inverse scales kept when asked for.
__global__ void maxima_to_scales(float* k_scale, int64_t n_k, float* v_scale, float* v_inv, int64_t n_v) {
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i < n_k) {
    k_scale[i] = fp8::scale_of(k_scale[i]);
  } else if (i < n_k + n_v) {
    const float amax = v_scale[i - n_k];
    if (v_inv != nullptr) v_inv[i - n_k] = fp8::inv_scale_of(amax);
    v_scale[i - n_k] = fp8::scale_of(amax);
  }
}

/// Pass 4b: Q, one warp per (batch, head, position): the row's maximum, its scale, its e4m3 values.
template <class T>
__global__ void quantize_queries(QuantizeParams p) {
  const int64_t row = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;  // (b * Hq + h) * S + i
  if (row >= int64_t{p.batch} * p.q_heads * p.seq_len) return;
  const int lane = threadIdx.x % 32, C = p.head_dim / 32;
  const int64_t i = row % p.seq_len, bh = row / p.seq_len;
  const int64_t b = bh / p.q_heads, h = bh % p.q_heads;
  const int64_t at = b * p.qs.batch + i * p.qs.seq + h * p.qs.head;
  const int64_t at8 = b * p.q8s.batch + i * p.q8s.seq + h * p.q8s.head;
  float x[kMaxChannels], amax = 0.f;
#pragma unroll
  for (int c = 0; c < kMaxChannels; ++c) {
    x[c] = c < C ? load<T>(p.q, at + lane + 32 * c) : 0.f;
    amax = fmaxf(amax, fabsf(x[c]));
  }
  for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (lane == 0) p.q_scale[row] = fp8::scale_of(amax);
  const float inv = fp8::inv_scale_of(amax);
#pragma unroll
  for (int c = 0; c < kMaxChannels; ++c)
    if (c < C) p.q8[at8 + lane + 32 * c] = hopper::quantize_e4m3(x[c], inv);
  if (p.lse_shift != nullptr) {  // what smoothing took out of the scores, for the LSE (semantics.md §11.4)
    const int64_t bg = b * p.kv_heads + h / (p.q_heads / p.kv_heads);
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < kMaxChannels; ++c)
      if (c < C) dot += x[c] * mean_of(p, bg, lane + 32 * c, static_cast<int32_t>(b));
    for (int o = 16; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (lane == 0) p.lse_shift[row] = p.scale * dot;
  }
}

unsigned blocks_for(int64_t warps) { return static_cast<unsigned>((warps + kWarps - 1) / kWarps); }

template <class T>
void launch_all(const QuantizeParams& p, cudaStream_t stream) {
  const int64_t bg = int64_t{p.batch} * p.kv_heads;
  const int64_t max_visible = p.map.seq.num_video + p.map.seq.text_capacity;
  const dim3 chunks(blocks_for((max_visible + kRowsPerWarp - 1) / kRowsPerWarp), static_cast<unsigned>(bg));
  const int threads = 32 * kWarps;
  key_sums<T><<<chunks, threads, 0, stream>>>(p);
  group_maxima<T><<<chunks, threads, 0, stream>>>(p);
  const dim3 positions(blocks_for((p.seq_len + kRowsPerWarp - 1) / kRowsPerWarp), static_cast<unsigned>(bg));
  quantize_keys_values<T><<<positions, threads, 0, stream>>>(p);
  const int64_t n_k = bg * p.blocks, n_v = bg * p.head_dim;
  maxima_to_scales<<<static_cast<unsigned>((n_k + n_v + 255) / 256), 256, 0, stream>>>(p.k_scale, n_k, p.v_scale,
                                                                                      p.v_inv, n_v);
  quantize_queries<T><<<blocks_for(int64_t{p.batch} * p.q_heads * p.seq_len), threads, 0, stream>>>(p);
}

/// The passes on `prm` (its pointers checked by the caller): the scales' maxima zeroed, the sums taken from
/// prm.sums or, when null, allocated on the stream for the call.
void run_passes(const Plan& plan, QuantizeParams prm, cudaStream_t stream) {
  const Problem& p = plan.problem();
  const size_t sums_bytes = sizeof(double) * p.batch * p.kv_heads * p.head_dim;
  const bool own_sums = prm.sums == nullptr;
  if (own_sums)
    check(cudaMallocAsync(reinterpret_cast<void**>(&prm.sums), sums_bytes, stream), "cudaMallocAsync (quantize_fp8)");
  check(cudaMemsetAsync(prm.sums, 0, sums_bytes, stream), "cudaMemsetAsync");
  check(cudaMemsetAsync(prm.k_scale, 0, sizeof(float) * p.batch * p.kv_heads * prm.blocks, stream), "cudaMemsetAsync");
  check(cudaMemsetAsync(prm.v_scale, 0, sizeof(float) * p.batch * p.kv_heads * p.head_dim, stream), "cudaMemsetAsync");
  if (p.dtype == DType::bf16)
    launch_all<__nv_bfloat16>(prm, stream);
  else
    launch_all<__half>(prm, stream);
  const cudaError_t launched = cudaGetLastError();
  if (own_sums) check(cudaFreeAsync(prm.sums, stream), "cudaFreeAsync (quantize_fp8)");
  check(launched, "quantize_fp8 launch");
}

QuantizeParams params_of(const Plan& plan, const Tensors& in) {
  const Problem& p = plan.problem();
  QuantizeParams prm{};
  prm.q = in.q, prm.k = in.k, prm.v = in.v;
  prm.qs = p.q, prm.ks = p.k, prm.vs = p.v;
  prm.map = TokenMapT<int32_t>{TileGridT<int32_t>(plan.grid()), plan.token_map().seq, p.order};
  prm.text_len = in.text_len;
  prm.batch = static_cast<int32_t>(p.batch);
  prm.q_heads = static_cast<int32_t>(p.q_heads);
  prm.kv_heads = static_cast<int32_t>(p.kv_heads);
  prm.head_dim = static_cast<int32_t>(p.head_dim);
  prm.blocks = static_cast<int32_t>(plan.fp8_key_blocks());
  prm.seq_len = p.seq_len;
  prm.scale = static_cast<float>(p.scale);
  return prm;
}

void require_quantizable(const Problem& p) {
  detail::require(p.dtype == DType::bf16 || p.dtype == DType::f16, "dtype", to_string(p.dtype),
                  "bf16 or f16 for quantize_fp8 on cuda");
  detail::require(p.head_dim % 32 == 0 && p.head_dim <= 32 * kMaxChannels, "head_dim", p.head_dim,
                  "64, 96 or 128 for quantize_fp8 on cuda");
  detail::require(p.batch * p.kv_heads <= 65535, "batch", p.batch,
                  "batch x kv_heads <= 65535 for quantize_fp8 on cuda (one grid row per pair)");
}

}  // namespace

void quantize_fp8(const Plan& plan, const Tensors& in, const Fp8Tensors& out, cudaStream_t stream) {
  const Problem& p = plan.problem();
  require_quantizable(p);
  const int esize = static_cast<int>(dtype_size(p.dtype));
  require_device_pointer(in.q, "q", esize);
  require_device_pointer(in.k, "k", esize);
  require_device_pointer(in.v, "v", esize);
  if (in.text_len) require_device_pointer(in.text_len, "text_len", 4);
  require_device_pointer(out.q, "out.q", 1);
  require_device_pointer(out.k, "out.k", 1);
  require_device_pointer(out.v, "out.v", 1);
  require_device_pointer(out.q_scale, "out.q_scale", 4);
  require_device_pointer(out.k_scale, "out.k_scale", 4);
  require_device_pointer(out.v_scale, "out.v_scale", 4);

  QuantizeParams prm = params_of(plan, in);
  prm.q8 = static_cast<uint8_t*>(out.q), prm.k8 = static_cast<uint8_t*>(out.k), prm.v8 = static_cast<uint8_t*>(out.v);
  prm.q8s = p.q, prm.k8s = p.k, prm.v8s = p.v;  // the inputs' strides, in bytes
  prm.q_scale = out.q_scale, prm.k_scale = out.k_scale, prm.v_scale = out.v_scale;
  run_passes(plan, prm, stream);
}

void quantize_fp8_for_forward(const Plan& plan, const Tensors& in, const ForwardQuantized& out, cudaStream_t stream) {
  require_quantizable(plan.problem());
  QuantizeParams prm = params_of(plan, in);
  prm.q8 = out.q8, prm.k8 = out.k8, prm.q8s = out.q8_strides, prm.k8s = out.k8_strides;
  prm.q_scale = out.q_scale, prm.k_scale = out.k_scale, prm.v_scale = out.v_scale, prm.v_inv = out.v_inv;
  prm.lse_shift = out.lse_shift;
  prm.sums = out.sums;
  run_passes(plan, prm, stream);
}

}  // namespace tilewise::cuda
