// The semantics core, part 1: latent grid, tile grid, token positions and the window arithmetic.
//
// Everything here is header-only, constexpr-friendly and callable from host and device code, because it is
// the single source of truth shared by the CPU reference, the host planning of the CUDA kernels and the
// kernels themselves (see docs/semantics.md). Nothing in this file allocates or throws.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define TW_HD __host__ __device__ __forceinline__
#else
#define TW_HD inline
#endif

namespace tilewise {

/// Three extents or coordinates along (t, h, w): latent grids, tile shapes, tile coordinates, windows.
/// Templated on the index type: the host uses int64_t (Dim3); kernels use int32_t, whose division is cheap.
template <class I>
struct Dim3T {
  I t = 0, h = 0, w = 0;
  TW_HD constexpr I volume() const { return t * h * w; }
  TW_HD constexpr I operator[](int axis) const { return axis == 0 ? t : (axis == 1 ? h : w); }
  friend constexpr bool operator==(const Dim3T&, const Dim3T&) = default;
};
using Dim3 = Dim3T<int64_t>;

template <class J, class I>
TW_HD constexpr Dim3T<J> dim3_cast(const Dim3T<I>& d) {
  return {static_cast<J>(d.t), static_cast<J>(d.h), static_cast<J>(d.w)};
}

// The index type is deduced from the first argument only, so literals mix freely with it.
template <class I>
using Same = std::type_identity_t<I>;

template <class I>
TW_HD constexpr I ceil_div(I a, Same<I> b) { return (a + b - 1) / b; }
template <class I>
TW_HD constexpr I imin(I a, Same<I> b) { return a < b ? a : b; }
template <class I>
TW_HD constexpr I imax(I a, Same<I> b) { return a > b ? a : b; }
template <class I>
TW_HD constexpr I iclamp(I x, Same<I> lo, Same<I> hi) { return x < lo ? lo : (x > hi ? hi : x); }

/// A half-open range [begin, end) of tile coordinates along one axis.
template <class I>
struct AxisRangeT {
  I begin = 0, end = 0;
  TW_HD constexpr I size() const { return end - begin; }
  TW_HD constexpr bool contains(I c) const { return c >= begin && c < end; }
  friend constexpr bool operator==(const AxisRangeT&, const AxisRangeT&) = default;
};
using AxisRange = AxisRangeT<int64_t>;

/// The sliding-tile window along one axis with `n` tiles: the key tiles seen by the query tile at `c`
/// for a window of `k` tiles. Odd k is centred and shifted inward at the borders (never truncated); even k
/// takes k/2 tiles before and k/2 - 1 after; k >= n is the whole axis. This is THE window formula of the spec.
template <class I>
TW_HD constexpr AxisRangeT<I> window_range(I c, Same<I> k, Same<I> n) {
  if (k >= n) return {0, n};
  const I start = iclamp<I>(c - k / 2, 0, n - k);
  return {start, start + k};
}

/// Latent grid, tile shape and the tile grid derived from them. Tiles at the high end of an axis whose
/// extent is not a multiple of the tile are partial: they hold only the tokens that exist.
template <class I>
struct TileGridT {
  using D3 = Dim3T<I>;
  D3 latent;  // (T, H, W) tokens
  D3 tile;    // (tt, th, tw) tokens per tile
  D3 tiles;   // (ceil(T/tt), ceil(H/th), ceil(W/tw))

  TileGridT() = default;
  TW_HD constexpr TileGridT(D3 latent_, D3 tile_)
      : latent(latent_), tile(tile_),
        tiles{ceil_div<I>(latent_.t, tile_.t), ceil_div<I>(latent_.h, tile_.h), ceil_div<I>(latent_.w, tile_.w)} {}
  template <class J>
  TW_HD constexpr explicit TileGridT(const TileGridT<J>& o) : latent(dim3_cast<I>(o.latent)), tile(dim3_cast<I>(o.tile)),
                                                              tiles(dim3_cast<I>(o.tiles)) {}

  TW_HD constexpr I num_tokens() const { return latent.volume(); }
  TW_HD constexpr I num_tiles() const { return tiles.volume(); }
  TW_HD constexpr bool tiles_evenly() const {
    return latent.t % tile.t == 0 && latent.h % tile.h == 0 && latent.w % tile.w == 0;
  }

  // Raster token index <-> (t, h, w) coordinates.
  TW_HD constexpr I raster_index(D3 p) const { return (p.t * latent.h + p.h) * latent.w + p.w; }
  TW_HD constexpr D3 raster_coord(I i) const {
    return {i / (latent.h * latent.w), (i / latent.w) % latent.h, i % latent.w};
  }
  // Tile index (raster order over the tile grid) <-> tile coordinates.
  TW_HD constexpr I tile_index(D3 c) const { return (c.t * tiles.h + c.h) * tiles.w + c.w; }
  TW_HD constexpr D3 tile_coord(I i) const {
    return {i / (tiles.h * tiles.w), (i / tiles.w) % tiles.h, i % tiles.w};
  }
  TW_HD constexpr D3 tile_of(D3 p) const { return {p.t / tile.t, p.h / tile.h, p.w / tile.w}; }
  /// First token coordinate of a tile, and its real extent (smaller than `tile` for partial tiles).
  TW_HD constexpr D3 tile_origin(D3 c) const { return {c.t * tile.t, c.h * tile.h, c.w * tile.w}; }
  TW_HD constexpr D3 tile_extent(D3 c) const {
    return {imin<I>(tile.t, latent.t - c.t * tile.t), imin<I>(tile.h, latent.h - c.h * tile.h),
            imin<I>(tile.w, latent.w - c.w * tile.w)};
  }
  TW_HD constexpr I tile_tokens(D3 c) const { return tile_extent(c).volume(); }

  /// Position of token p in `tiled` order: tiles in raster order, tokens inside a tile in raster order.
  /// Defined only when the tile divides the latent (tiles_evenly()); then every tile has tile.volume() tokens.
  TW_HD constexpr I tiled_index(D3 p) const {
    const D3 c = tile_of(p);
    const D3 o = tile_origin(c);
    return tile_index(c) * tile.volume() + ((p.t - o.t) * tile.h + (p.h - o.h)) * tile.w + (p.w - o.w);
  }
  TW_HD constexpr D3 tiled_coord(I i) const {
    const I per = tile.volume();
    const D3 o = tile_origin(tile_coord(i / per));
    const I r = i % per;
    return {o.t + r / (tile.h * tile.w), o.h + (r / tile.w) % tile.h, o.w + r % tile.w};
  }
};
using TileGrid = TileGridT<int64_t>;

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
template <class I>
struct TokenMapT {
  TileGridT<I> grid;
  SequenceLayout seq;
  TokenOrder order = TokenOrder::raster;

  TW_HD constexpr int64_t video_position(Dim3T<I> p) const {
    return seq.video_offset() + (order == TokenOrder::raster ? grid.raster_index(p) : grid.tiled_index(p));
  }
  TW_HD constexpr Dim3T<I> video_coord(int64_t s) const {
    const I i = static_cast<I>(s - seq.video_offset());
    return order == TokenOrder::raster ? grid.raster_coord(i) : grid.tiled_coord(i);
  }
};
using TokenMap = TokenMapT<int64_t>;

}  // namespace tilewise
