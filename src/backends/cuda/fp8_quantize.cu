// Plan::quantize_fp8 on the GPU (docs/semantics.md §11.2). Four passes, each lane on 8 contiguous channels of a row
// (16-byte loads of the 16-bit inputs, 8-byte stores of e4m3 codes): a row of D values takes D / 8 lanes of a group of
// L = 4, 8, 16 or 16 lanes (D = 32, 64, 96, 128; for D = 96 the group's last 4 lanes idle), so a warp covers
// R = 32 / L rows per instruction. Where the pointers or strides do not allow the wide accesses, the same kernels
// load and store element by element (kWide = false).
//   1. key_statistics, per (batch, kv head, key block) and part of at most kPartRows of its visible keys (the block's
//      own positions: a tile's tokens, or up to 128 valid text positions): the keys' channel sums in float64
//      (exact, as the reference's are, while a channel's magnitudes span less than about 2^28: bf16 / fp16 have 8 /
//      11 significant bits, so the order of the additions does not change the mean), the keys' per channel minimum
//      and maximum (scratch, one slot per part), and the values' absolute maximum per channel (atomicMax on the
//      float bits into v_scale: the values are >= 0). NaN is dropped by the comparisons, as std::max drops it.
//   2. finish_statistics: the mean keys mu = fl32(sum / count); per key block, the smoothed keys' absolute maximum
//      max_c max(fl32(kmax_c - mu_c), fl32(mu_c - kmin_c), 0), which is exactly max |fl32(k - mu)| over the block's
//      visible keys (k -> fl32(k - mu) is monotonic and fl32(mu - k) = -fl32(k - mu)); the scales and their inverses.
//   3. quantize_keys_values: k' = fl32(k - mu) and v quantised at every position (padding too, with its block's
//      scale), with the inverse scales of pass 2.
//   4. quantize_queries: Q per row, on its own (and each row's LSE shift, scale * q . mu, when asked for).
// Scratch: the float64 sums and the statistics (quantize_fp8_stats_floats floats: the per-part minima and maxima,
// mu, V's and K's inverse scales); quantize_fp8 takes them on the stream, the forward from its workspace. For the FP8
// forward (quantize_fp8_for_forward) the passes write q and k into the forward's workspace and skip v (the forward's
// V^T pre-pass quantises it with the inverse scales kept in v_inv).
#include "backends/cuda/fp8_quantize.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "backends/cuda/cuda_common.hpp"
#include "backends/cuda/hopper/fp8/fp8_params.cuh"  // quantize_e4m3; clamped_text_len, as the kernels clamp
#include "backends/cuda/row_pass_order.hpp"
#include "tilewise/fp8.hpp"

namespace tilewise::cuda {
namespace {

constexpr int kWarps = 8;                  // warps per CTA
constexpr int kThreads = 32 * kWarps;
constexpr int kVec = 8;                    // contiguous channels per lane
constexpr int kMaxDim = 128;               // D <= 128
constexpr int kPartRows = 1024;            // pass 1: key block rows per CTA (larger blocks take several parts)
// The passes' depths: rows per lane in flight and rows per warp. Deeper measured slower in every pass before their
// rework (these against 4 or 8 / 8 / 128 / 64; docs/performance.md "FP8: the quantisation passes reworked"): they
// were bound by instructions, not by latency per trip.
constexpr int kStatsUnroll = 2;       // pass 1: rows per lane in flight
constexpr int kKeyRowsPerWarp = 64;   // pass 3: positions per warp
constexpr int kQueryRowsPerWarp = 32; // pass 4: query rows per warp
constexpr int kUnroll = 4;            // passes 3 and 4: rows per lane in flight

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
  float* k_scale;    // [B, Hkv, blocks]
  float* v_scale;    // [B, Hkv, D]: the channel maxima (pass 1), then the scales (pass 2)
  float* v_inv;      // [B, Hkv, D]: 448 / the channel maxima (fp8::inv_scale_of), or null
  float* lse_shift;  // [B, Hq, S]: scale * q . mu, or null
  double* sums;      // [B, Hkv, D]
  // The statistics (scratch, StatsLayout):
  float* minmax;     // [B, Hkv, blocks, parts, 2, D]: the visible keys' per channel minima, then maxima
  float* mu;         // [B, Hkv, D]: the mean keys, fl32(sum / count)
  float* vinv;       // [B, Hkv, D]: V's inverse scales
  float* kinv;       // [B, Hkv, blocks]: K's inverse scales
  TokenMapT<int32_t> map;
  const int32_t* text_len;
  int32_t batch, q_heads, kv_heads, head_dim, blocks, parts;
  int64_t seq_len;
  float scale;  // the softmax scale (lse_shift)
};

/// Where the statistics lie in their scratch (floats; mu first after the minima and maxima, 16-byte aligned for
/// float4 loads when the scratch is: the minima and maxima are a multiple of D >= 32 floats).
struct StatsLayout {
  int64_t minmax, mu, vinv, kinv, total;
  StatsLayout(const Plan& plan, int64_t parts) {
    const Problem& p = plan.problem();
    const int64_t bg = p.batch * p.kv_heads, blocks = plan.fp8_key_blocks();
    minmax = 0;
    mu = bg * blocks * parts * 2 * p.head_dim;
    vinv = mu + bg * p.head_dim;
    kinv = vinv + bg * p.head_dim;
    total = kinv + bg * blocks;
  }
};

int64_t parts_of(const Plan& plan) {  // text blocks (<= 128 rows) always fit in one part
  return ceil_div<int64_t>(plan.grid().tile.volume(), kPartRows);
}

/// A lane's place in the row layout: kLanes lanes per row (lanes_for(D), a power of two, so that the reductions
/// across a row's lanes unroll), R = 32 / kLanes rows per warp instruction, this lane's row `group` and its channels
/// [8 * chunk, 8 * chunk + 8) when `active`.
template <int kLanes>
struct RowLanes {
  static constexpr int lanes = kLanes, rows = 32 / kLanes;
  int group, chunk;
  bool active;
  __device__ explicit RowLanes(int head_dim)
      : group(static_cast<int>(threadIdx.x % 32) / kLanes),
        chunk(static_cast<int>(threadIdx.x % 32) % kLanes),
        active(chunk * kVec < head_dim) {}
};
constexpr int lanes_for(int head_dim) { return head_dim <= 32 ? 4 : (head_dim <= 64 ? 8 : 16); }

/// Eight 16-bit values, two per word (the lower channel in the lower half).
struct Raw8 {
  uint32_t w[4];
};

template <bool kWide>
__device__ __forceinline__ Raw8 load8(const void* base, int64_t at) {
  const uint16_t* src = static_cast<const uint16_t*>(base) + at;
  Raw8 r;
  if constexpr (kWide) {
    const uint4 u = *reinterpret_cast<const uint4*>(src);
    r.w[0] = u.x, r.w[1] = u.y, r.w[2] = u.z, r.w[3] = u.w;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) r.w[j] = uint32_t{src[2 * j]} | (uint32_t{src[2 * j + 1]} << 16);
  }
  return r;
}

/// Value j of `r` in fp32 (exact, as __bfloat162float / __half2float convert).
template <class T>
__device__ __forceinline__ float value(const Raw8& r, int j) {
  const uint32_t w = r.w[j / 2];
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __uint_as_float(j % 2 ? (w & 0xffff0000u) : (w << 16));
  else
    return __half2float(__ushort_as_half(static_cast<unsigned short>(j % 2 ? w >> 16 : w & 0xffffu)));
}

/// Eight e4m3 codes (code j in byte j of lo, hi) at `at`.
template <bool kWide>
__device__ __forceinline__ void store8(uint8_t* at, uint32_t lo, uint32_t hi) {
  if constexpr (kWide) {
    *reinterpret_cast<uint2*>(at) = make_uint2(lo, hi);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) at[j] = static_cast<uint8_t>(lo >> (8 * j)), at[4 + j] = static_cast<uint8_t>(hi >> (8 * j));
  }
}

/// Eight e4m3 codes, of value(j) * inv(j) for channel j, packed for store8 (code j in byte j % 4 of word j / 4): four
/// conversion instructions, two values each.
template <class Value, class Inv>
__device__ __forceinline__ uint2 quantize8(Value value, Inv inv) {
  uint32_t word[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int j = 4 * h;
    word[h] = hopper::quantize_e4m3x2(value(j), value(j + 1), inv(j), inv(j + 1)) |
              (hopper::quantize_e4m3x2(value(j + 2), value(j + 3), inv(j + 2), inv(j + 3)) << 16);
  }
  return make_uint2(word[0], word[1]);
}

__device__ __forceinline__ float infinity() { return __int_as_float(0x7f800000); }

__device__ __forceinline__ int32_t valid_text(const QuantizeParams& p, int32_t b) {
  return hopper::clamped_text_len(p.text_len, b, static_cast<int32_t>(p.map.seq.text_capacity));
}

__device__ __forceinline__ float mean_of(const QuantizeParams& p, int64_t bg, int c, int32_t b) {
  const int64_t count = p.map.seq.num_video + valid_text(p, b);
  return static_cast<float>(p.sums[bg * p.head_dim + c] / static_cast<double>(count));
}

/// The float bits of a non-negative value keep their order as integers.
__device__ __forceinline__ void atomic_max_nonneg(float* at, float x) {
  atomicMax(reinterpret_cast<int*>(at), __float_as_int(x));
}

/// Pass 1: one CTA per (block part, b * Hkv + g) in `order` (blocks * parts chunks). Rows r of a block are its
/// tile's tokens in raster order inside the tile (or its text positions), so a part's positions come without a
/// search; part `part` takes rows [part * kPartRows, ...), whose positions the CTA works out once into shared memory
/// (each one three divisions, which every lane of a row repeated per row before). The CTA's partial sums and value
/// maxima go out with one atomic per channel; its key minima and maxima to the part's own slot (no atomics).
template <class T, bool kWide, int kLanes>
__global__ void __launch_bounds__(kThreads) key_statistics(QuantizeParams p, RowPassOrder order) {
  const int D = p.head_dim;
  const int32_t head = order.head(blockIdx.x), x = order.chunk(blockIdx.x);
  const int64_t bg = head;
  const int32_t b = head / p.kv_heads, g = head % p.kv_heads;
  const int32_t block = x / p.parts, part = x % p.parts;
  const TileGridT<int32_t>& grid = p.map.grid;
  const int32_t tiles = grid.num_tiles();
  Dim3T<int32_t> origin{}, extent{1, 1, 1};
  int64_t text0 = 0;
  int32_t n_rows;
  if (block < tiles) {
    const Dim3T<int32_t> c = grid.tile_coord(block);
    origin = grid.tile_origin(c), extent = grid.tile_extent(c);
    n_rows = extent.volume();
  } else {
    const int32_t first = (block - tiles) * static_cast<int32_t>(fp8::kTextBlockRows);
    n_rows = iclamp<int32_t>(valid_text(p, b) - first, 0, static_cast<int32_t>(fp8::kTextBlockRows));
    text0 = p.map.seq.text_offset() + first;
  }
  const int32_t begin = part * kPartRows, end = imin<int32_t>(n_rows, begin + kPartRows);
  float* out = p.minmax + ((bg * p.blocks + block) * p.parts + part) * 2 * D;
  if (begin >= end) {  // no visible key here (padding text, or a part past the block's end): an empty slot
    for (int d = threadIdx.x; d < D; d += kThreads) out[d] = infinity(), out[D + d] = -infinity();
    return;
  }
  // Positions below 2^31: the map is 32-bit (params_of).
  __shared__ int32_t position[kPartRows];
  for (int32_t r = begin + static_cast<int32_t>(threadIdx.x); r < end; r += kThreads) {
    int64_t at = text0 + r;
    if (block < tiles)
      at = p.map.video_position(Dim3T<int32_t>{origin.t + r / (extent.h * extent.w),
                                               origin.h + (r / extent.w) % extent.h, origin.w + r % extent.w});
    position[r - begin] = static_cast<int32_t>(at);
  }
  __syncthreads();

  const RowLanes<kLanes> ln(D);
  const int warp = threadIdx.x / 32, c0 = ln.chunk * kVec, step = kWarps * ln.rows;
  double sum[kVec];
  float lo[kVec], hi[kVec], vmax[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) sum[j] = 0.0, lo[j] = infinity(), hi[j] = -infinity(), vmax[j] = 0.f;
  if (ln.active) {
    const int64_t kbase = b * p.ks.batch + g * p.ks.head + c0, vbase = b * p.vs.batch + g * p.vs.head + c0;
    for (int32_t r0 = begin + warp * ln.rows + ln.group; r0 < end; r0 += kStatsUnroll * step) {
      Raw8 kx[kStatsUnroll], vx[kStatsUnroll];
#pragma unroll
      for (int u = 0; u < kStatsUnroll; ++u) {
        const int32_t r = r0 + u * step;
        if (r >= end) continue;
        const int64_t s = position[r - begin];
        kx[u] = load8<kWide>(p.k, kbase + s * p.ks.seq);
        vx[u] = load8<kWide>(p.v, vbase + s * p.vs.seq);
      }
#pragma unroll
      for (int u = 0; u < kStatsUnroll; ++u) {
        if (r0 + u * step >= end) continue;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const float x = value<T>(kx[u], j), a = fabsf(value<T>(vx[u], j));
          sum[j] += x;
          lo[j] = x < lo[j] ? x : lo[j];  // comparisons drop NaN (signalling or not), as std::max does
          hi[j] = x > hi[j] ? x : hi[j];
          vmax[j] = a > vmax[j] ? a : vmax[j];
        }
      }
    }
  }
  // The warp's row groups (lanes `lanes` apart hold the same channels; idle lanes hold the neutral values).
#pragma unroll
  for (int off = ln.lanes; off < 32; off *= 2) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      sum[j] += __shfl_xor_sync(0xffffffffu, sum[j], off);
      lo[j] = fminf(lo[j], __shfl_xor_sync(0xffffffffu, lo[j], off));
      hi[j] = fmaxf(hi[j], __shfl_xor_sync(0xffffffffu, hi[j], off));
      vmax[j] = fmaxf(vmax[j], __shfl_xor_sync(0xffffffffu, vmax[j], off));
    }
  }
  __shared__ double part_sum[kWarps][kMaxDim];
  __shared__ float part_lo[kWarps][kMaxDim], part_hi[kWarps][kMaxDim], part_vmax[kWarps][kMaxDim];
  if (ln.group == 0 && ln.active) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      part_sum[warp][c0 + j] = sum[j];
      part_lo[warp][c0 + j] = lo[j], part_hi[warp][c0 + j] = hi[j], part_vmax[warp][c0 + j] = vmax[j];
    }
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += kThreads) {
    double s = part_sum[0][d];
    float l = part_lo[0][d], h = part_hi[0][d], m = part_vmax[0][d];
    for (int i = 1; i < kWarps; ++i) {
      s += part_sum[i][d];
      l = fminf(l, part_lo[i][d]), h = fmaxf(h, part_hi[i][d]), m = fmaxf(m, part_vmax[i][d]);
    }
    if (s != 0.0) atomicAdd(&p.sums[bg * D + d], s);
    if (m > 0.f) atomic_max_nonneg(&p.v_scale[bg * D + d], m);
    out[d] = l, out[D + d] = h;
  }
}

/// Pass 2: one warp per (batch, kv head, key block), then one thread per (batch, kv head, channel).
__global__ void __launch_bounds__(kThreads) finish_statistics(QuantizeParams p) {
  const int D = p.head_dim, lane = threadIdx.x % 32;
  const int64_t warp = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
  const int64_t n_blocks = int64_t{p.batch} * p.kv_heads * p.blocks;
  if (warp < n_blocks) {  // warp-uniform
    const int64_t bg = warp / p.blocks;
    const int32_t b = static_cast<int32_t>(bg / p.kv_heads);
    const float* slots = p.minmax + warp * p.parts * 2 * D;
    float amax = 0.f;  // NaN never enters (the comparisons drop it), nor -0
    for (int d = lane; d < D; d += 32) {
      float lo = infinity(), hi = -infinity();
      for (int part = 0; part < p.parts; ++part) {
        lo = fminf(lo, slots[part * 2 * D + d]);
        hi = fmaxf(hi, slots[part * 2 * D + D + d]);
      }
      const float mu = mean_of(p, bg, d, b);
      const float above = __fsub_rn(hi, mu), below = __fsub_rn(mu, lo);  // the largest |fl32(k - mu)| either side
      if (above > amax) amax = above;
      if (below > amax) amax = below;
    }
    for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (lane == 0) {
      p.k_scale[warp] = fp8::scale_of(amax);
      p.kinv[warp] = fp8::inv_scale_of(amax);
    }
  } else {
    const int64_t i = (warp - n_blocks) * 32 + lane;  // (b * Hkv + g) * D + d
    if (i >= int64_t{p.batch} * p.kv_heads * D) return;
    const int64_t bg = i / D;
    const float amax = p.v_scale[i];
    p.v_scale[i] = fp8::scale_of(amax);
    p.vinv[i] = fp8::inv_scale_of(amax);  // the forward's v_inv itself when it asks for it (run_passes)
    p.mu[i] = mean_of(p, bg, static_cast<int>(i % D), static_cast<int32_t>(bg / p.kv_heads));
  }
}

/// Pass 3: one CTA per (chunk of kWarps * kKeyRowsPerWarp positions, b * Hkv + g) in `order`; every position. The
/// warp looks up its positions' K inverse scales once (fp8::key_block: divisions that every lane of a row repeated
/// per row before) into shared memory. kValues: V is quantised too (quantize_fp8; the forward's V^T pre-pass
/// quantises V itself), a template parameter so that the forward's pass holds no V registers.
template <class T, bool kWide, int kLanes, bool kValues>
__global__ void __launch_bounds__(kThreads) quantize_keys_values(QuantizeParams p, RowPassOrder order) {
  const RowLanes<kLanes> ln(p.head_dim);
  const int D = p.head_dim, c0 = ln.chunk * kVec, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t head = order.head(blockIdx.x);
  const int64_t bg = head, b = head / p.kv_heads, g = head % p.kv_heads;
  const int64_t first = (int64_t{order.chunk(blockIdx.x)} * kWarps + warp) * kKeyRowsPerWarp;
  const int64_t end = first + kKeyRowsPerWarp < p.seq_len ? first + kKeyRowsPerWarp : p.seq_len;
  __shared__ float row_kinv[kWarps][kKeyRowsPerWarp];
  const float* kinv_of = p.kinv + bg * p.blocks;
  for (int i = lane; i < kKeyRowsPerWarp; i += 32)
    if (first + i < end) row_kinv[warp][i] = kinv_of[fp8::key_block(p.map, first + i)];
  __syncwarp();
  if (!ln.active) return;  // (no shuffles below)
  float mu[kVec], vinv[kVec];
  {
    const float4* m = reinterpret_cast<const float4*>(p.mu + bg * D + c0);
    const float4 m0 = m[0], m1 = m[1];
    mu[0] = m0.x, mu[1] = m0.y, mu[2] = m0.z, mu[3] = m0.w, mu[4] = m1.x, mu[5] = m1.y, mu[6] = m1.z, mu[7] = m1.w;
#pragma unroll
    for (int j = 0; j < kVec; ++j) vinv[j] = kValues ? p.vinv[bg * D + c0 + j] : 1.f;
  }
  const int64_t kbase = b * p.ks.batch + g * p.ks.head + c0, vbase = b * p.vs.batch + g * p.vs.head + c0;
  const int64_t k8base = b * p.k8s.batch + g * p.k8s.head + c0, v8base = b * p.v8s.batch + g * p.v8s.head + c0;
  for (int64_t s0 = first + ln.group; s0 < end; s0 += kUnroll * ln.rows) {
    Raw8 kx[kUnroll], vx[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // every load of the trip first
      const int64_t s = s0 + u * ln.rows;
      if (s >= end) continue;
      kx[u] = load8<kWide>(p.k, kbase + s * p.ks.seq);
      if constexpr (kValues) vx[u] = load8<kWide>(p.v, vbase + s * p.vs.seq);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t s = s0 + u * ln.rows;
      if (s >= end) continue;
      const float inv = row_kinv[warp][s - first];
      const uint2 kc =
          quantize8([&](int j) { return __fsub_rn(value<T>(kx[u], j), mu[j]); }, [&](int) { return inv; });
      store8<kWide>(p.k8 + k8base + s * p.k8s.seq, kc.x, kc.y);
      if constexpr (kValues) {
        const uint2 vc = quantize8([&](int j) { return value<T>(vx[u], j); }, [&](int j) { return vinv[j]; });
        store8<kWide>(p.v8 + v8base + s * p.v8s.seq, vc.x, vc.y);
      }
    }
  }
}

/// Pass 4: one CTA per (chunk of kWarps * kQueryRowsPerWarp rows, b * Hq + h) in `order`; per row its maximum,
/// scale and e4m3 values.
template <class T, bool kWide, int kLanes>
__global__ void __launch_bounds__(kThreads) quantize_queries(QuantizeParams p, RowPassOrder order) {
  const RowLanes<kLanes> ln(p.head_dim);
  const int D = p.head_dim, c0 = ln.chunk * kVec;
  const int32_t head = order.head(blockIdx.x);  // b * Hq + h
  const int64_t bh = head, chunk = order.chunk(blockIdx.x);
  const int64_t b = head / p.q_heads, h = head % p.q_heads;
  const int64_t bg = b * p.kv_heads + h / (p.q_heads / p.kv_heads);
  const int64_t first = (chunk * kWarps + threadIdx.x / 32) * kQueryRowsPerWarp;
  const int64_t end = first + kQueryRowsPerWarp < p.seq_len ? first + kQueryRowsPerWarp : p.seq_len;
  const int64_t qbase = b * p.qs.batch + h * p.qs.head + c0, q8base = b * p.q8s.batch + h * p.q8s.head + c0;
  const bool shift = p.lse_shift != nullptr;
  float mu[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) mu[j] = shift && ln.active ? p.mu[bg * D + c0 + j] : 0.f;
  for (int64_t base = first; base < end; base += kUnroll * ln.rows) {  // warp-uniform trips (shuffles below)
    Raw8 x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * ln.rows + ln.group;
      if (ln.active && i < end) x[u] = load8<kWide>(p.q, qbase + i * p.qs.seq);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * ln.rows + ln.group;
      const bool ok = ln.active && i < end;
      float amax = 0.f;  // (fmaxf drops NaN, as std::max does)
#pragma unroll
      for (int j = 0; j < kVec; ++j) amax = fmaxf(amax, ok ? fabsf(value<T>(x[u], j)) : 0.f);
#pragma unroll
      for (int o = ln.lanes / 2; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      const float inv = fp8::inv_scale_of(amax);
      if (ok) {
        if (ln.chunk == 0) p.q_scale[bh * p.seq_len + i] = fp8::scale_of(amax);
        const uint2 qc = quantize8([&](int j) { return value<T>(x[u], j); }, [&](int) { return inv; });
        store8<kWide>(p.q8 + q8base + i * p.q8s.seq, qc.x, qc.y);
      }
      if (shift) {  // what smoothing took out of the scores, for the LSE (semantics.md §11.4)
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < kVec; ++j) dot += ok ? value<T>(x[u], j) * mu[j] : 0.f;
#pragma unroll
        for (int o = ln.lanes / 2; o > 0; o /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        if (ok && ln.chunk == 0) p.lse_shift[bh * p.seq_len + i] = p.scale * dot;
      }
    }
  }
}

unsigned blocks_for(int64_t items, int64_t per_block) { return static_cast<unsigned>(ceil_div(items, per_block)); }

/// The passes' CTAs visit (chunk, head) pairs in RowPassOrder: every head of a chunk together where the tensor
/// keeps a token's heads side by side (whole rows per DRAM page), so the grids are 1-D.
template <class T, bool kWide, int kLanes>
void launch_all(const QuantizeParams& p, cudaStream_t stream) {
  const int64_t bg = int64_t{p.batch} * p.kv_heads;
  const RowPassOrder blocks = RowPassOrder::of(int64_t{p.blocks} * p.parts, bg, p.ks.head, p.ks.seq);
  const RowPassOrder positions =
      RowPassOrder::of(ceil_div<int64_t>(p.seq_len, kWarps * kKeyRowsPerWarp), bg, p.ks.head, p.ks.seq);
  const RowPassOrder queries = RowPassOrder::of(ceil_div<int64_t>(p.seq_len, kWarps * kQueryRowsPerWarp),
                                                int64_t{p.batch} * p.q_heads, p.qs.head, p.qs.seq);
  key_statistics<T, kWide, kLanes><<<blocks.grid(), kThreads, 0, stream>>>(p, blocks);
  const int64_t finish_warps = bg * p.blocks + ceil_div<int64_t>(bg * p.head_dim, 32);
  finish_statistics<<<blocks_for(finish_warps, kWarps), kThreads, 0, stream>>>(p);
  if (p.v8 != nullptr)
    quantize_keys_values<T, kWide, kLanes, true><<<positions.grid(), kThreads, 0, stream>>>(p, positions);
  else
    quantize_keys_values<T, kWide, kLanes, false><<<positions.grid(), kThreads, 0, stream>>>(p, positions);
  quantize_queries<T, kWide, kLanes><<<queries.grid(), kThreads, 0, stream>>>(p, queries);
}
/// launch_all for p's dtype, access width and lanes per row.
template <class T>
void launch_all(const QuantizeParams& p, bool wide, cudaStream_t stream) {
  auto with_lanes = [&](auto wide_c) {
    constexpr bool kWide = decltype(wide_c)::value;
    switch (lanes_for(p.head_dim)) {
      case 4: return launch_all<T, kWide, 4>(p, stream);
      case 8: return launch_all<T, kWide, 8>(p, stream);
      default: return launch_all<T, kWide, 16>(p, stream);
    }
  };
  wide ? with_lanes(std::true_type{}) : with_lanes(std::false_type{});
}

/// Whether every tensor allows the 16-byte loads and 8-byte stores: 16-byte aligned inputs, 8-byte aligned outputs,
/// every stride a multiple of 8 elements.
bool wide_accesses(const QuantizeParams& p) {
  const auto aligned = [](const void* at, uintptr_t n) { return reinterpret_cast<uintptr_t>(at) % n == 0; };
  const auto strides = [](const Strides& s) { return s.batch % 8 == 0 && s.seq % 8 == 0 && s.head % 8 == 0; };
  return aligned(p.q, 16) && aligned(p.k, 16) && aligned(p.v, 16) && strides(p.qs) && strides(p.ks) &&
         strides(p.vs) && aligned(p.q8, 8) && aligned(p.k8, 8) && strides(p.q8s) && strides(p.k8s) &&
         (p.v8 == nullptr || (aligned(p.v8, 8) && strides(p.v8s)));
}

/// The passes on `prm` (its pointers checked by the caller): V's maxima zeroed, the sums and statistics taken from
/// prm.sums and `stats` or, when prm.sums is null, allocated on the stream for the call.
void run_passes(const Plan& plan, QuantizeParams prm, float* stats, cudaStream_t stream) {
  const Problem& p = plan.problem();
  const size_t sums_bytes = sizeof(double) * p.batch * p.kv_heads * p.head_dim;  // a multiple of 256: D % 32 == 0
  const StatsLayout layout(plan, prm.parts);
  const bool own_scratch = prm.sums == nullptr;
  if (own_scratch) {
    void* scratch = nullptr;
    check(cudaMallocAsync(&scratch, sums_bytes + sizeof(float) * layout.total, stream), "cudaMallocAsync (quantize_fp8)");
    prm.sums = static_cast<double*>(scratch);
    stats = reinterpret_cast<float*>(static_cast<char*>(scratch) + sums_bytes);
  }
  prm.minmax = stats + layout.minmax, prm.mu = stats + layout.mu;
  prm.vinv = prm.v_inv != nullptr ? prm.v_inv : stats + layout.vinv;  // one copy of V's inverse scales
  prm.kinv = stats + layout.kinv;
  check(cudaMemsetAsync(prm.sums, 0, sums_bytes, stream), "cudaMemsetAsync");
  check(cudaMemsetAsync(prm.v_scale, 0, sizeof(float) * p.batch * p.kv_heads * p.head_dim, stream), "cudaMemsetAsync");
  const bool wide = wide_accesses(prm);
  if (p.dtype == DType::bf16)
    launch_all<__nv_bfloat16>(prm, wide, stream);
  else
    launch_all<__half>(prm, wide, stream);
  const cudaError_t launched = cudaGetLastError();
  if (own_scratch) check(cudaFreeAsync(prm.sums, stream), "cudaFreeAsync (quantize_fp8)");
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
  prm.parts = static_cast<int32_t>(parts_of(plan));
  prm.seq_len = p.seq_len;
  prm.scale = static_cast<float>(p.scale);
  return prm;
}

void require_quantizable(const Problem& p) {
  detail::require(p.dtype == DType::bf16 || p.dtype == DType::f16, "dtype", to_string(p.dtype),
                  "bf16 or f16 for quantize_fp8 on cuda");
  detail::require(p.head_dim % 32 == 0 && p.head_dim <= kMaxDim, "head_dim", p.head_dim,
                  "64, 96 or 128 for quantize_fp8 on cuda");
  detail::require(p.batch * p.kv_heads <= 65535, "batch", p.batch,
                  "batch x kv_heads <= 65535 for quantize_fp8 on cuda (one grid row per pair)");
}

}  // namespace

int64_t quantize_fp8_stats_floats(const Plan& plan) { return StatsLayout(plan, parts_of(plan)).total; }

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
  run_passes(plan, prm, nullptr, stream);
}

void quantize_fp8_for_forward(const Plan& plan, const Tensors& in, const ForwardQuantized& out, cudaStream_t stream) {
  require_quantizable(plan.problem());
  QuantizeParams prm = params_of(plan, in);
  prm.q8 = out.q8, prm.k8 = out.k8, prm.q8s = out.q8_strides, prm.k8s = out.k8_strides;
  prm.q_scale = out.q_scale, prm.k_scale = out.k_scale, prm.v_scale = out.v_scale, prm.v_inv = out.v_inv;
  prm.lse_shift = out.lse_shift;
  prm.sums = out.sums;
  run_passes(plan, prm, out.stats, stream);
}

}  // namespace tilewise::cuda
