// Device helpers shared by the GPU reference kernels (forward and backward): element conversions and the tile
// lists a reference CTA walks, both taken from the semantics core (key_boxes / query_boxes, block-list tables).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "tilewise/pattern.hpp"

namespace tilewise::cuda {

template <class T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <class T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_f(float x) { return __float2half(x); }

/// Token x (raster order inside the tile) of tile c.
__device__ __forceinline__ Dim3 token_in_tile(const TileGrid& g, Dim3 c, int64_t x) {
  const Dim3 o = g.tile_origin(c), e = g.tile_extent(c);
  return {o.t + x / (e.h * e.w), o.h + (x / e.w) % e.h, o.w + x % e.w};
}

/// The tiles one reference CTA visits, in ascending order: boxes of the tile grid, or a range of a CSR table.
struct TileList {
  KeyBoxes boxes{};
  const int32_t* list = nullptr;  // non-null: tiles list[begin, end)
  int64_t begin = 0, end = 0;

  /// Every tile of the grid (text rows see every video key; text keys are seen by every video query).
  static __device__ TileList all(const TileGrid& g) {
    TileList l;
    l.boxes.t0 = {0, g.tiles.t};
    l.boxes.h = {0, g.tiles.h};
    l.boxes.w = {0, g.tiles.w};
    return l;
  }
  /// The key tiles of query tile cq of local head h (the forward's question), or the query tiles that see key
  /// tile cq (`reverse`, the backward's), from the pattern's boxes or its (transposed) block-list table.
  static __device__ TileList of(PatternKind kind, const HeadParams& hp, const TileGrid& g, const int64_t* offsets,
                                const int32_t* tiles, int64_t h, Dim3 c, bool reverse) {
    if (kind == PatternKind::dense) return all(g);
    TileList l;
    if (kind == PatternKind::block_list) {
      const int64_t i = h * g.num_tiles() + g.tile_index(c);
      l.list = tiles;
      l.begin = offsets[i];
      l.end = offsets[i + 1];
    } else {
      l.boxes = reverse ? query_boxes<int64_t>(kind, hp, g, c) : key_boxes<int64_t>(kind, hp, g, c);
    }
    return l;
  }
  __device__ int64_t size() const { return list ? end - begin : boxes.num_tiles(); }
  __device__ Dim3 tile(const TileGrid& g, int64_t i) const { return list ? g.tile_coord(list[begin + i]) : boxes.tile(i); }
};

}  // namespace tilewise::cuda
