// The semantics core, part 1: latent grid, tile grid, token positions and the window arithmetic.
//
// Everything here is header-only, constexpr-friendly and callable from host and device code, because it is
// the single source of truth shared by the CPU reference, the host planning of the CUDA kernels and the
// kernels themselves (see docs/semantics.md). Nothing in this file allocates or throws.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TW_HD __host__ __device__ __forceinline__
#else
#define TW_HD inline
#endif

namespace tilewise {

/// Three extents or coordinates along (t, h, w): latent grids, tile shapes, tile coordinates, windows.
struct Dim3 {
  int64_t t = 0, h = 0, w = 0;
  TW_HD constexpr int64_t volume() const { return t * h * w; }
  TW_HD constexpr int64_t operator[](int axis) const { return axis == 0 ? t : (axis == 1 ? h : w); }
  friend constexpr bool operator==(const Dim3&, const Dim3&) = default;
};

TW_HD constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
TW_HD constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
TW_HD constexpr int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
TW_HD constexpr int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

/// A half-open range [begin, end) of tile coordinates along one axis.
struct AxisRange {
  int64_t begin = 0, end = 0;
  TW_HD constexpr int64_t size() const { return end - begin; }
  TW_HD constexpr bool contains(int64_t c) const { return c >= begin && c < end; }
};

/// The sliding-tile window along one axis with `n` tiles: the key tiles seen by the query tile at `c`
/// for a window of `k` tiles. Odd k is centred and shifted inward at the borders (never truncated); even k
/// takes k/2 tiles before and k/2 - 1 after; k >= n is the whole axis. This is THE window formula of the spec.
TW_HD constexpr AxisRange window_range(int64_t c, int64_t k, int64_t n) {
  if (k >= n) return {0, n};
  const int64_t start = clamp64(c - k / 2, 0, n - k);
  return {start, start + k};
}

/// Latent grid, tile shape and the tile grid derived from them. Tiles at the high end of an axis whose
/// extent is not a multiple of the tile are partial: they hold only the tokens that exist.
struct TileGrid {
  Dim3 latent;  // (T, H, W) tokens
  Dim3 tile;    // (tt, th, tw) tokens per tile
  Dim3 tiles;   // (ceil(T/tt), ceil(H/th), ceil(W/tw))

  TileGrid() = default;
  TW_HD constexpr TileGrid(Dim3 latent_, Dim3 tile_)
      : latent(latent_), tile(tile_),
        tiles{ceil_div(latent_.t, tile_.t), ceil_div(latent_.h, tile_.h), ceil_div(latent_.w, tile_.w)} {}

  TW_HD constexpr int64_t num_tokens() const { return latent.volume(); }
  TW_HD constexpr int64_t num_tiles() const { return tiles.volume(); }
  TW_HD constexpr bool tiles_evenly() const {
    return latent.t % tile.t == 0 && latent.h % tile.h == 0 && latent.w % tile.w == 0;
  }

  // Raster token index <-> (t, h, w) coordinates.
  TW_HD constexpr int64_t raster_index(Dim3 p) const { return (p.t * latent.h + p.h) * latent.w + p.w; }
  TW_HD constexpr Dim3 raster_coord(int64_t i) const {
    return {i / (latent.h * latent.w), (i / latent.w) % latent.h, i % latent.w};
  }
  // Tile index (raster order over the tile grid) <-> tile coordinates.
  TW_HD constexpr int64_t tile_index(Dim3 c) const { return (c.t * tiles.h + c.h) * tiles.w + c.w; }
  TW_HD constexpr Dim3 tile_coord(int64_t i) const {
    return {i / (tiles.h * tiles.w), (i / tiles.w) % tiles.h, i % tiles.w};
  }
  TW_HD constexpr Dim3 tile_of(Dim3 p) const { return {p.t / tile.t, p.h / tile.h, p.w / tile.w}; }
  /// First token coordinate of a tile, and its real extent (smaller than `tile` for partial tiles).
  TW_HD constexpr Dim3 tile_origin(Dim3 c) const { return {c.t * tile.t, c.h * tile.h, c.w * tile.w}; }
  TW_HD constexpr Dim3 tile_extent(Dim3 c) const {
    return {min64(tile.t, latent.t - c.t * tile.t), min64(tile.h, latent.h - c.h * tile.h),
            min64(tile.w, latent.w - c.w * tile.w)};
  }
  TW_HD constexpr int64_t tile_tokens(Dim3 c) const { return tile_extent(c).volume(); }

  /// Position of token p in `tiled` order: tiles in raster order, tokens inside a tile in raster order.
  /// Defined only when the tile divides the latent (tiles_evenly()); then every tile has tile.volume() tokens.
  TW_HD constexpr int64_t tiled_index(Dim3 p) const {
    const Dim3 c = tile_of(p);
    const Dim3 o = tile_origin(c);
    return tile_index(c) * tile.volume() + ((p.t - o.t) * tile.h + (p.h - o.h)) * tile.w + (p.w - o.w);
  }
  TW_HD constexpr Dim3 tiled_coord(int64_t i) const {
    const int64_t per = tile.volume();
    const Dim3 o = tile_origin(tile_coord(i / per));
    const int64_t r = i % per;
    return {o.t + r / (tile.h * tile.w), o.h + (r / tile.w) % tile.h, o.w + r % tile.w};
  }
};

/// Where the text part sits in the joint sequence.
enum class TextPosition : int32_t { last = 0, first = 1 };
/// Order of the video tokens inside the sequence.
enum class TokenOrder : int32_t { raster = 0, tiled = 1 };

/// The joint sequence: N_video video tokens and L_text text positions (capacity), text first or last.
struct SequenceLayout {
  int64_t num_video = 0;
  int64_t text_capacity = 0;
  TextPosition text_position = TextPosition::last;

  TW_HD constexpr int64_t length() const { return num_video + text_capacity; }
  TW_HD constexpr int64_t video_offset() const {
    return text_position == TextPosition::first ? text_capacity : 0;
  }
  TW_HD constexpr int64_t text_offset() const {
    return text_position == TextPosition::first ? 0 : num_video;
  }
  TW_HD constexpr bool is_text(int64_t s) const {
    const int64_t t0 = text_offset();
    return s >= t0 && s < t0 + text_capacity;
  }
};

/// Where each video token sits in the joint sequence: the one map from (t, h, w) to a sequence position.
struct TokenMap {
  TileGrid grid;
  SequenceLayout seq;
  TokenOrder order = TokenOrder::raster;

  TW_HD constexpr int64_t video_position(Dim3 p) const {
    return seq.video_offset() + (order == TokenOrder::raster ? grid.raster_index(p) : grid.tiled_index(p));
  }
  TW_HD constexpr Dim3 video_coord(int64_t s) const {
    const int64_t i = s - seq.video_offset();
    return order == TokenOrder::raster ? grid.raster_coord(i) : grid.tiled_coord(i);
  }
};

}  // namespace tilewise
