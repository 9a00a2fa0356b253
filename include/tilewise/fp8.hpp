// The semantics core, part 3: FP8 (e4m3) quantisation groups and scales (docs/semantics.md §11).
//
// Header-only and callable from host and device code, like geometry.hpp: the CPU reference quantises with these
// functions, and a kernel's pre-pass and main loop must group and scale exactly as they say. The rounding to
// e4m3 itself is the hardware's on the GPU (cvt.rn.satfinite) and src/core/numeric.hpp's on the host.
#pragma once

#include <cstdint>

#include "tilewise/geometry.hpp"

namespace tilewise::fp8 {

/// The largest finite e4m3 magnitude: a group's absolute maximum maps to it.
inline constexpr float kMax = 448.0f;
/// Text positions per key block (video key blocks are tiles).
inline constexpr int64_t kTextBlockRows = 128;
/// The largest finite float, so that inv_scale stays finite for tiny groups (FLT_MAX without <cfloat>).
inline constexpr float kFloatMax = 3.40282347e+38f;

/// Dequantisation scale of a group with absolute maximum `amax` (>= 0): amax / 448, correctly rounded in fp32
/// (1 for an all-zero group, whose values quantise to 0 whatever the scale).
TW_HD float scale_of(float amax) { return amax > 0.0f ? amax / kMax : 1.0f; }
/// What a value is multiplied by before rounding to e4m3: 448 / amax in fp32 (1 for an all-zero group), kept
/// finite for groups so small that the quotient would overflow.
TW_HD float inv_scale_of(float amax) {
  if (!(amax > 0.0f)) return 1.0f;
  const float inv = kMax / amax;
  return inv < kFloatMax ? inv : kFloatMax;
}

/// K quantisation blocks of one (batch, kv head): one per tile, then one per kTextBlockRows text positions.
template <class I>
TW_HD constexpr I key_blocks(const TileGridT<I>& grid, int64_t text_capacity) {
  return grid.num_tiles() + static_cast<I>(ceil_div<int64_t>(text_capacity, kTextBlockRows));
}

/// The K block of sequence position `s`: its tile's index for a video token, num_tiles + text index / 128 for a
/// text position.
template <class I>
TW_HD constexpr I key_block(const TokenMapT<I>& map, int64_t s) {
  if (map.seq.is_text(s)) return map.grid.num_tiles() + static_cast<I>((s - map.seq.text_offset()) / kTextBlockRows);
  return map.grid.tile_index(map.grid.tile_of(map.video_coord(s)));
}

}  // namespace tilewise::fp8
