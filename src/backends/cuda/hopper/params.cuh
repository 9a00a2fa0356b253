// Parameters of the Hopper forward kernel, filled by the host plan (cuda_backend.cu) and passed by value.
#pragma once

#include <cuda.h>

#include "tilewise/geometry.hpp"
#include "tilewise/pattern.hpp"

namespace tilewise::hopper {

// Kernels index with 32 bits (the host checks every count fits); only memory offsets are 64-bit.
using D3 = Dim3T<int32_t>;
using Grid = TileGridT<int32_t>;

constexpr int kBlockN = 128;  // key rows per pipeline stage (query rows per work item: KernelTraits::kBlockM)

/// Batch element b's valid text length: text_len[b] clamped to [0, capacity] (out-of-range lengths are clamped,
/// since no host sync checks them), the capacity without text_len.
__device__ __forceinline__ int32_t clamped_text_len(const int32_t* text_len, int64_t b, int32_t capacity) {
  if (text_len == nullptr) return capacity;
  const int32_t L = text_len[b];
  return L < 0 ? 0 : (L > capacity ? capacity : L);
}

/// How a tensor's 5-D tensor maps are addressed: the maps are (D', W', H', T', X) for video and (D', L, 1, 1, X)
/// for text, with the head folded into coordinate 0 (bshd-like storage: head stride == D) or into coordinate
/// 4 (bhsd-like: batch stride == heads * head stride), or coordinate 4 = head for one launch per batch element.
struct TensorView {
  int32_t head_mult0 = 0;   // c0 = head * head_mult0 + column
  int32_t batch_mult4 = 0;  // c4 = batch * batch_mult4 + head * head_mult4
  int32_t head_mult4 = 0;
  __device__ __forceinline__ int c0(int head, int column) const { return head * head_mult0 + column; }
  __device__ __forceinline__ int c4(int batch, int head) const { return batch * batch_mult4 + head * head_mult4; }
};

/// Tiles fall into classes by the axes along which the latent's edge cuts them short: bit 2 = t, 1 = h, 0 = w
/// (class 0: whole tiles). Each class has its own block box, so a partial tile is covered by as few blocks as a
/// box of at most 128 tokens allows (e.g. a 6x5x8 tile by two 3x5x8 boxes, not three 2x8x8 ones).
constexpr int kTileClasses = 8;

struct TileClass {
  D3 box;            // tokens of one key block: a box inside the tile (along whole axes it divides the tile)
  D3 subs;           // key blocks per axis: ceil(tile extent / box)
  D3 qbox;           // tokens of one query block (work item), likewise, up to KernelTraits::kBlockM of them
  D3 qsubs;          // query blocks per axis
  int32_t tail = 0;  // V rows past this box's volume that other classes' loads may have left: zeroed on load
};

/// The producer's description of the key block it put in a pipeline stage, so the consumers need not walk the
/// pattern themselves: they read 16 bytes per block and only compute a mask when `masked` is set.
struct alignas(16) BlockInfo {
  static constexpr uint32_t kLast = 1;    // the work item's last key block
  static constexpr uint32_t kMasked = 2;  // some columns are not real, allowed keys (ragged, text padding, frames)
  static constexpr uint32_t kText = 4;    // a block of text keys starting at row t
  static constexpr uint32_t kRows = 32;   // the query-run forward: a key-run block, raster rows from t, h real ones
  static constexpr uint32_t kFrames = 8;  // an attention-tile block mixing allowed and forbidden frame pairs
  static constexpr uint32_t kEmpty = 16;  // backward: a placeholder stage with nothing loaded (an item with no blocks)
  static constexpr int kClassShift = 8;   // bits 8-10: the tile class of a video block (its box)
  static constexpr int kHeadShift = 16;   // backward: bits 16-31, the streamed block's query head within its group
  uint32_t flags;
  __device__ __forceinline__ int tile_class() const { return (flags >> kClassShift) & (kTileClasses - 1); }
  int32_t t, h, w;  // video: the box origin (t, h, w) in the latent; text: t = first text row
};

struct FwdParams {  // CUtensorMap members carry their own 64-byte alignment
  CUtensorMap q_video[kTileClasses], k_video[kTileClasses], v_video[kTileClasses], o_video[kTileClasses];
  CUtensorMap q_text, k_text, v_text, o_text;  // unused without text
  TensorView q, k, v, o;

  TokenMapT<int32_t> map;  // grid, sequence layout and token order (the semantics core)
  TileClass cls[kTileClasses];
  int32_t partial_axes = 0;   // bit mask (as the class index) of the axes whose last tile is partial
  int32_t slots_per_tile = 1;  // work items per query tile: the most query blocks any class needs
  bool zero_init = false;      // every box has fewer than 128 tokens: the rows past them are zeroed once
  int32_t batch = 1;     // batch elements in this launch
  int32_t batch_base = 0;  // global index of this launch's first batch element (per-batch launches)
  int32_t q_heads = 1;
  int32_t kv_group = 1;  // q_heads / kv_heads
  const int32_t* text_len = nullptr;  // [B] on device, null = full capacity

  PatternKind kind = PatternKind::dense;
  const HeadParams* heads = nullptr;     // [q_heads] (local heads)
  const int64_t* block_offsets = nullptr;  // block list CSR over (local head, query tile)
  const int32_t* block_tiles = nullptr;

  float scale_log2 = 1.f;  // softmax scale * log2(e)
  uint32_t opaque_zero = 0;  // always 0, but ptxas cannot fold it (see wgmma_wait_after)
  float* lse = nullptr;    // [B, Hq, S] float, or null
  int64_t seq_len = 0;

  int32_t video_items = 0;  // work items per (batch, head): query blocks of the video part
  int32_t text_items = 0;   // and of the text part
  int32_t num_work = 0;
  int32_t* work_counter = nullptr;  // dynamic scheduler: next work item (zeroed on the stream before a launch)
  // Order of the video items within a batch element: [heads * tiles] entries head * tiles + tile, heaviest first
  // (the dK/dV kernels: a key tile's load is the query tiles that see it, 8 to 80 on 5x6x10 tiles); null: head by
  // head, tiles in raster order. Last, so the forward's parameters keep their offsets.
  const int32_t* video_order = nullptr;
  // The dK/dV kernels' walks (KeyBlockCursorT<kRows, true>): each item's query tiles w slowest instead of in raster
  // order, with the sweep order of the items (cuda::sweep_suits). Never read by the forward.
  int32_t walk_width_slowest = 0;
};

/// The bf16 / f16 forward's parameters: FwdParams and its query runs (include/tilewise/query_runs.hpp). A struct
/// of its own, so that the other kernels' parameters (BwdParams, Fp8Params) and machine code stay as they were; code
/// shared with them reads these fields only where Traits::kQueryRuns says the kernel is the forward's
/// (`with_runs`).
struct FwdRunParams : FwdParams {
  // When set, the video items are run blocks: [video_items] pairs (first raster video row, index of the tile that
  // stands for the run's key walk), whose Q and O move through the row maps (the video tokens as rows, raster
  // order); null: the tiles' blocks.
  const int32_t* runs = nullptr;
  // With runs, also their keys as key-run blocks (run_keys.cuh: every run's key tiles span the tile grid's columns),
  // K and V through row maps like Q's.
  bool key_runs = false;
  CUtensorMap q_rows, o_rows, k_rows, v_rows;
};
/// `p` as the forward's parameters (valid only in a kernel launched with FwdRunParams: Traits::kQueryRuns).
__device__ __forceinline__ const FwdRunParams& with_runs(const FwdParams& p) {
  return static_cast<const FwdRunParams&>(p);
}

}  // namespace tilewise::hopper
