// Parameters of the FP8 forward (docs/semantics.md §11): the forward's, whose Q and K tensor maps now address e4m3
// tensors (the pre-pass's or the caller's), plus the V^T blocks and the scales.
//
//   role (FwdParams maps)  | FP8 forward
//   q: owned               | Q, e4m3, one byte per element (the maps' panels are whole swizzle rows)
//   k: streamed, K ring    | K, e4m3 (smoothed by the pre-pass for precision fp8)
//   v: streamed, V ring    | V^T per key block (vt_map), e4m3, in P's register key order (fp8_softmax.cuh)
//   o: the output          | O in the 16-bit dtype, as in the bf16 forward
#pragma once

#include <cuda_fp8.h>

#include "backends/cuda/hopper/params.cuh"

namespace tilewise::hopper {

/// n / d as a multiply: with m = ceil(2^32 / d), floor(n m / 2^32) = floor(n / d) exactly while n d < 2^32 (here a
/// position on a latent axis and a tile's extent on it: the plan requires both below 2^16). Made on the host: the
/// FP8 consumers find each key block's scale on their critical path, where three integer divisions took 500-970
/// cycles per block (scripts/fp8_trace.py).
struct DivisorU32 {
  uint64_t m = uint64_t{1} << 32;
  static constexpr DivisorU32 of(uint32_t d) { return {0xffffffffull / d + 1}; }
  __host__ __device__ __forceinline__ uint32_t div(uint32_t n) const { return static_cast<uint32_t>((n * m) >> 32); }
};

struct Fp8Params : FwdParams {
  // V^T of every key block, (128 keys, D, blocks) with one box per block: D rows of kBlockN e4m3 keys, blocks
  // ordered (batch, kv head, entry) with `entry` as block_entry (tile_scheduler.cuh) numbers them (vt_slots per
  // tile, then the text blocks). The host checks the block count fits 31 bits.
  CUtensorMap vt_map;
  const float* q_scale = nullptr;    // [B, Hq, S]
  const float* k_scale = nullptr;    // [B, Hkv, key_blocks]: one per tile, then per 128 text rows (fp8.hpp)
  const float* v_scale = nullptr;    // [B, Hkv, D]
  const float* lse_shift = nullptr;  // [B, Hq, S]: scale * q . mu, added to the LSE (precision fp8), or null
  int32_t kv_heads = 1;
  int32_t key_blocks = 1;  // fp8::key_blocks
  int32_t vt_slots = 1;    // V^T entries per tile: the most key boxes any tile class needs
  int32_t vt_entries = 1;  // V^T entries per (batch, kv head): tiles * vt_slots, then one per 128 text rows
  DivisorU32 tile_t, tile_h, tile_w;  // the tile's extents (map.grid.tile), for key_block's divisions
};

/// fl32(x * inv) rounded to e4m3 by the hardware: to nearest, ties to even, saturating (semantics.md §11.1). The
/// one rounding of every pre-pass (quantize_fp8's passes and the V^T pack), so that their codes agree.
__device__ __forceinline__ uint8_t quantize_e4m3(float x, float inv) {
  return __nv_cvt_float_to_fp8(__fmul_rn(x, inv), __NV_SATFINITE, __NV_E4M3);
}
/// quantize_e4m3 of two values by one conversion instruction (the same rounding): x's code in the low byte.
__device__ __forceinline__ uint32_t quantize_e4m3x2(float x, float y, float inv_x, float inv_y) {
  return __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(x, inv_x), __fmul_rn(y, inv_y)), __NV_SATFINITE, __NV_E4M3);
}

/// The logical key (0..127) of a block that V^T column `c` holds: within each 16 keys, column 4q + e holds key
/// 2q + e (e < 2) or 8 + 2q + e - 2, the order in which an S accumulator fragment gives a thread its keys
/// (Fp8Softmax::to_operand packs them as they lie), so that P needs no shuffle before the P V product.
__host__ __device__ constexpr int vt_key_of_column(int c) {
  const int q = (c % 16) / 4, e = c % 4;
  return c - c % 16 + (e < 2 ? 2 * q + e : 8 + 2 * q + e - 2);
}

}  // namespace tilewise::hopper
