// The order in which a row pass's CTAs (the backward's preprocess, the FP8 quantisation passes) visit the pairs
// (chunk of sequence rows, head): plain arithmetic shared by the launches, the kernels and the CPU tests.
//
// Why it matters: in [B, S, H, D] one token's heads lie side by side (H * D elements), so a pass that runs one head's
// chunks at a time reads 2 * D bytes of every token, a DRAM page (1-2 KB) opened per few hundred bytes used; running
// every head of a chunk together reads whole token rows. In [B, H, S, D] a head's rows are contiguous and the
// chunks of one head go together. (The backward's preprocess read row 1's O and dO at 1.6 TB/s with heads outer:
// docs/performance.md backward v3.18; 0.78 ms heads inner, v3.19.)
#pragma once

#include <cstdint>

#include "tilewise/geometry.hpp"  // TW_HD

namespace tilewise::cuda {

/// The largest 1-D grid (gridDim.x).
constexpr int64_t kMaxGridX = 0x7fffffff;

struct RowPassOrder {
  int64_t chunks = 1;  // chunks of rows per head
  int64_t heads = 1;   // (batch, head) pairs
  bool heads_inner = true;

  /// The order for a tensor whose head stride and sequence stride (elements) are these: heads inner when a
  /// token's heads are closer together than its neighbouring tokens.
  static RowPassOrder of(int64_t chunks, int64_t heads, int64_t head_stride, int64_t seq_stride) {
    return {chunks, heads, head_stride < seq_stride};
  }
  /// CTAs of the 1-D grid, one per pair. Launches take grid(), at most kMaxGridX, so chunk() and head() may divide
  /// in 32 bits (a 64-bit division is a few dozen instructions in a kernel).
  TW_HD int64_t ctas() const { return chunks * heads; }
  /// gridDim.x for the launch: the CTAs, or 0 past the limit, which fails the launch (cudaErrorInvalidConfiguration,
  /// as every launcher's error check reports) instead of wrapping around.
  unsigned grid() const { return ctas() > kMaxGridX ? 0u : static_cast<unsigned>(ctas()); }
  TW_HD int32_t chunk(uint32_t cta) const {
    return static_cast<int32_t>(heads_inner ? cta / static_cast<uint32_t>(heads) : cta % static_cast<uint32_t>(chunks));
  }
  TW_HD int32_t head(uint32_t cta) const {
    return static_cast<int32_t>(heads_inner ? cta % static_cast<uint32_t>(heads) : cta / static_cast<uint32_t>(chunks));
  }
};

}  // namespace tilewise::cuda
