// The Hopper backend's host side. Plan time: checks the device and every CUDA-specific limit, chooses the
// block box, uploads the pattern tables and fixes the launch geometry. Run time: encodes the tensor maps for
// the given pointers (host-only, no allocation, no sync) and launches one persistent kernel on the stream.
#include <cuda.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <limits>
#include <numeric>
#include <vector>

#include "backends/cuda/cuda_common.hpp"
#include "backends/cuda/dkdv_order.hpp"
#include "backends/cuda/fp8_quantize.hpp"
#include "backends/cuda/hopper/forward.hpp"
#include "backends/cuda/hopper/bwd/backward.hpp"
#include "backends/cuda/hopper/fp8/fp8_forward.hpp"
#include "backends/cuda/query_rows.hpp"
#include "tilewise/query_runs.hpp"

namespace tilewise {
namespace cuda {

using detail::fail;
using detail::require;
using detail::str;

cudaDeviceProp require_device(const char* device_name) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    fail("device", device_name, "cpu: no CUDA device is present");
  }
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, dev), "cudaGetDeviceProperties");
  return prop;
}

void require_device_pointer(const void* p, const char* name, int alignment) {
  require(reinterpret_cast<uintptr_t>(p) % alignment == 0, name, p,
          "a device pointer aligned to " + str(alignment) + " bytes");
  cudaPointerAttributes attr{};
  const bool ok = cudaPointerGetAttributes(&attr, p) == cudaSuccess &&
                  (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged);
  if (!ok) cudaGetLastError();
  require(ok, name, p, "device memory (the plan runs on cuda)");
}

namespace {

using PFN_encodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                     const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                     CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

/// cuTensorMapEncodeTiled through the runtime's driver entry point, so libtilewise needs no libcuda at link
/// time and loads on machines without a GPU driver.
PFN_encodeTiled encode_fn() {
  static PFN_encodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q),
          "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (q != cudaDriverEntryPointSuccess) throw std::runtime_error("tilewise: cuTensorMapEncodeTiled not found");
    return reinterpret_cast<PFN_encodeTiled>(f);
  }();
  return fn;
}

/// The block box of tiles of extent `e` (<= tile; e == tile for whole tiles), of at most `limit` tokens. Along axes
/// where the tile is whole the box divides it, so a block never crosses into the next tile; along axes the latent's
/// edge cuts it may be any size up to the tile, since what it covers past the edge is zero-filled by TMA.
/// Key boxes (`query` false) are the fewest blocks: each costs one pipeline stage whatever its volume. Query boxes
/// cost, per block, the K/V stream of a work item plus the GEMMs of its busy 64-row warpgroups (those with a row
/// below the box volume; the others skip): 2 + 3 per busy warpgroup, the ratio measured between items of two and
/// three busy warpgroups (docs/performance.md, v5). Ties go to the largest box (no tail to zero when a key box has
/// 128 tokens), then to long rows (w, then h), for long contiguous TMA runs. For a whole tile this is the largest
/// box dividing it.
Dim3 choose_box(const Dim3& tile, const Dim3& e, int64_t limit, bool query) {
  Dim3 best{1, 1, 1};
  int64_t best_cost = std::numeric_limits<int64_t>::max();
  auto fits = [](int64_t b, int64_t t, int64_t ext) { return ext == t ? t % b == 0 : true; };
  for (int64_t bw = tile.w; bw >= 1; --bw) {
    if (!fits(bw, tile.w, e.w) || bw > limit) continue;
    for (int64_t bh = tile.h; bh >= 1; --bh) {
      if (!fits(bh, tile.h, e.h) || bw * bh > limit) continue;
      for (int64_t bt = tile.t; bt >= 1; --bt) {
        if (!fits(bt, tile.t, e.t) || bt * bh * bw > limit) continue;
        const Dim3 b{bt, bh, bw};
        const int64_t blocks = ceil_div(e.t, bt) * ceil_div(e.h, bh) * ceil_div(e.w, bw);
        const int64_t cost = query ? blocks * (2 + 3 * ceil_div<int64_t>(b.volume(), 64)) : blocks;
        if (cost < best_cost || (cost == best_cost && b.volume() > best.volume())) best = b, best_cost = cost;
      }
    }
  }
  return best;
}

/// The key and query block boxes of every tile class (see hopper::TileClass), from choose_box on the class's tile
/// extent: query boxes of up to `query_rows` tokens, key (streamed) boxes of up to `key_rows`.
struct TileClasses {
  hopper::TileClass cls[hopper::kTileClasses];
  int32_t partial_axes = 0;
  int32_t slots = 1;        // the most query blocks of any class
  int32_t key_slots = 1;    // the most key blocks of any class
  int64_t max_volume = 0;   // of any class's key box
  int64_t key_rows = hopper::kBlockN;

  TileClasses() = default;
  TileClasses(const TileGrid& g, int64_t query_rows, int64_t key_rows_ = hopper::kBlockN) : key_rows(key_rows_) {
    const Dim3 rem{g.latent.t % g.tile.t, g.latent.h % g.tile.h, g.latent.w % g.tile.w};
    partial_axes = (rem.t ? 4 : 0) | (rem.h ? 2 : 0) | (rem.w ? 1 : 0);
    for (int c = 0; c < hopper::kTileClasses; ++c) {
      if (!exists(c)) continue;
      const Dim3 e{c & 4 ? rem.t : g.tile.t, c & 2 ? rem.h : g.tile.h, c & 1 ? rem.w : g.tile.w};
      auto subs_of = [&](const Dim3& b) { return Dim3{ceil_div(e.t, b.t), ceil_div(e.h, b.h), ceil_div(e.w, b.w)}; };
      const Dim3 box = choose_box(g.tile, e, key_rows, false), qbox = choose_box(g.tile, e, query_rows, true);
      cls[c].box = dim3_cast<int32_t>(box);
      cls[c].subs = dim3_cast<int32_t>(subs_of(box));
      cls[c].qbox = dim3_cast<int32_t>(qbox);
      cls[c].qsubs = dim3_cast<int32_t>(subs_of(qbox));
      slots = std::max<int32_t>(slots, static_cast<int32_t>(subs_of(qbox).volume()));
      key_slots = std::max<int32_t>(key_slots, static_cast<int32_t>(subs_of(box).volume()));
      max_volume = std::max(max_volume, box.volume());
    }
    for (int c = 0; c < hopper::kTileClasses; ++c)
      if (exists(c)) cls[c].tail = static_cast<int32_t>(max_volume - cls[c].box.volume());
  }
  bool exists(int c) const { return !(c & ~partial_axes); }
  /// Rows of the tiles' query blocks, padding included: each class's tiles times its query boxes times `rows`.
  int64_t padded_query_rows(const TileGrid& g, int64_t rows) const {
    int64_t total = 0;
    for (int c = 0; c < hopper::kTileClasses; ++c) {
      if (!exists(c)) continue;
      const int64_t tiles = (c & 4 ? 1 : g.latent.t / g.tile.t) * (c & 2 ? 1 : g.latent.h / g.tile.h) *
                            (c & 1 ? 1 : g.latent.w / g.tile.w);
      total += tiles * int64_t{cls[c].qsubs.t} * cls[c].qsubs.h * cls[c].qsubs.w * rows;
    }
    return total;
  }
  /// The class of tile c: hopper::tile_class's formula (tile_scheduler.cuh). The kernels keep their own copy: routed
  /// through one shared function, their machine code changed (ptxas), and they are measured as they are.
  int class_of(const TileGrid& g, const Dim3& c) const {
    return ((c.t == g.tiles.t - 1 ? 4 : 0) | (c.h == g.tiles.h - 1 ? 2 : 0) | (c.w == g.tiles.w - 1 ? 1 : 0)) &
           partial_axes;
  }
  /// Key blocks per (batch, head) as block_entry numbers them: key_slots per tile, then the text blocks.
  int64_t key_entries(const TileGrid& g, int64_t text_capacity) const {
    return g.num_tiles() * key_slots + ceil_div<int64_t>(text_capacity, key_rows);
  }
};

/// Whether one head's keys of `runs` go as key-run blocks (forward_key_runs).
bool key_runs_fit(const Plan& plan, const HeadParams& head, const std::vector<QueryRun>& runs,
                  const TileClasses& classes) {
  const TileGrid& g = plan.grid();
  const PatternKind kind = plan.pattern().kind;
  for (const QueryRun& run : runs) {
    const KeyBoxes b = key_boxes(kind, head, g, run.tile);
    if (b.num_t != 1 || b.w.begin != 0 || b.w.end != g.tiles.w) return false;
    const int64_t frames = std::min(b.t0.end * g.tile.t, g.latent.t) - b.t0.begin * g.tile.t;
    const int64_t rows = std::min(b.h.end * g.tile.h, g.latent.h) - b.h.begin * g.tile.h;
    const int64_t range = rows * g.latent.w, n = hopper::kBlockN;
    const int64_t run_blocks = rows == g.latent.h ? ceil_div(frames * range, n) : frames * ceil_div(range, n);
    int64_t box_blocks = 0;
    for (int64_t i = 0; i < b.num_tiles(); ++i) {
      box_blocks += classes.cls[classes.class_of(g, b.tile(i))].subs.volume();
    }
    if (run_blocks > box_blocks) return false;
  }
  return true;
}

/// Whether the query runs' keys go as key-run blocks (hopper/run_keys.cuh): every local head's key tiles of every run
/// span the tile grid's columns (so each frame's keys are one range of whole token rows) and no run walks more key
/// blocks so than through its key tiles' boxes. TILEWISE_KEY_RUNS=0 in the environment keeps the boxes
/// (measurements).
bool forward_key_runs(const Plan& plan, const std::vector<QueryRun>& runs, const TileClasses& classes) {
  const char* env = std::getenv("TILEWISE_KEY_RUNS");
  if (env != nullptr && std::string(env) == "0") return false;
  for (int64_t h = 0; h < plan.problem().q_heads; ++h)
    if ((h == 0 || !(plan.head(h).window == plan.head(0).window)) && !key_runs_fit(plan, plan.head(h), runs, classes))
      return false;
  return true;
}

enum class ViewMode { head_in_dim0, head_batch_merged, per_batch };

/// How a tensor's elements are laid out for TMA: the element type, its bytes, and the columns of one swizzled
/// panel (a whole swizzle row: 128, 64 or 32 bytes).
struct ElementFormat {
  CUtensorMapDataType dtype;
  int64_t esize;
  int panel_cols;
};
/// The 16-bit dtype's (64-column panels, 32 at D 96; see KernelTraits).
ElementFormat native_format(const Problem& p) {
  return {p.dtype == DType::bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
          dtype_size(p.dtype), p.head_dim % 64 == 0 ? 64 : 32};
}
/// e4m3 (the FP8 forward's Q and K): one byte per element, a panel per 128, 64 or 32 bytes of a row.
ElementFormat e4m3_format(const Problem& p) {
  return {CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, p.head_dim % 128 == 0 ? 128 : (p.head_dim % 64 == 0 ? 64 : 32)};
}

/// The forward's query runs (query_runs.hpp) where the plan may take them: raster order, sliding tile or dense, and
/// the same runs for every local head (one run table serves all; each head's key walk is its own, so per-head windows
/// that group the tokens alike, e.g. calibrated ones differing along t, keep the runs); none otherwise, or with
/// TILEWISE_QUERY_RUNS=0 in the environment (measurements). (The attention tile's frame masks read a row's frame
/// from its tile box, masks.cuh; block lists are per-tile tables.)
std::vector<QueryRun> forward_query_runs(const Plan& plan) {
  const Problem& p = plan.problem();
  const char* env = std::getenv("TILEWISE_QUERY_RUNS");
  const PatternKind kind = plan.pattern().kind;
  if ((env != nullptr && std::string(env) == "0") || p.order != TokenOrder::raster ||
      (kind != PatternKind::sliding_tile && kind != PatternKind::dense))
    return {};
  const std::vector<QueryRun> runs = query_runs(kind, plan.head(0), plan.grid());
  auto same = [](const QueryRun& a, const QueryRun& b) { return a.begin == b.begin && a.end == b.end && a.tile == b.tile; };
  for (int64_t h = 1; h < p.q_heads; ++h) {
    if (plan.head(h).window == plan.head(0).window) continue;
    const std::vector<QueryRun> other = query_runs(kind, plan.head(h), plan.grid());
    if (!std::equal(runs.begin(), runs.end(), other.begin(), other.end(), same)) return {};
  }
  return runs;
}

/// `runs` as FwdRunParams::runs wants them: per block of `rows` rows its first raster video row and the index of the
/// tile whose key walk it takes; empty where the runs make no fewer blocks than `tile_items` (or a run is shorter
/// than a block).
std::vector<int32_t> forward_run_blocks(const Plan& plan, const std::vector<QueryRun>& runs, int rows,
                                        int64_t tile_items) {
  const int64_t blocks = runs.empty() ? -1 : run_blocks(runs, rows);
  if (blocks < 0 || blocks >= tile_items) return {};
  std::vector<int32_t> table;
  table.reserve(static_cast<size_t>(2 * blocks));
  for (const QueryRun& run : runs)
    for (int64_t i = 0; i < ceil_div<int64_t>(run.size(), rows); ++i) {
      table.push_back(static_cast<int32_t>(run_block_begin(run, i, rows)));
      table.push_back(static_cast<int32_t>(plan.grid().tile_index(run.tile)));
    }
  return table;
}

ViewMode view_mode(const Strides& s, int64_t heads, int64_t D) {
  if (s.head == D) return ViewMode::head_in_dim0;
  if (s.batch == heads * s.head) return ViewMode::head_batch_merged;
  return ViewMode::per_batch;
}

/// Whether the dK/dV kernels take the sweep (cuda::sweep_suits); TILEWISE_BACKWARD_SWEEP=0 or 1 in the environment
/// turns it off or on for every plan (measurements: bench_backward.py --variants raster=@TILEWISE_BACKWARD_SWEEP=0).
bool backward_sweep(const Plan& plan) {
  const char* env = std::getenv("TILEWISE_BACKWARD_SWEEP");
  if (env != nullptr && (std::string(env) == "0" || std::string(env) == "1")) return std::string(env) == "1";
  return sweep_suits(plan);
}

/// The dK/dV kernels' item order: the sweep where it is taken, centred (TILEWISE_BACKWARD_SWEEP_ORDER=4 in the
/// environment takes the plain sweep instead, for measurements), else TILEWISE_HOPPER_BWD_ITEM_ORDER's. `sms`: the
/// SMs the kernels run on, each owning one 128-key block of a key tile at a time, which sets the centred timeline.
std::vector<int32_t> backward_item_order(const Plan& plan, bool sweep, int64_t sms) {
  DkdvOrder order = static_cast<DkdvOrder>(TILEWISE_HOPPER_BWD_ITEM_ORDER);
  if (sweep) {
    const char* env = std::getenv("TILEWISE_BACKWARD_SWEEP_ORDER");
    order = env != nullptr && std::string(env) == "4" ? DkdvOrder::sweep : DkdvOrder::sweep_centred;
  }
  const double in_flight =
      static_cast<double>(sms) * hopper::kBlockN / static_cast<double>(plan.problem().tile.volume());
  return dkdv_item_order(plan, order, TILEWISE_HOPPER_BWD_HEAD_GROUP, in_flight);
}

class HopperBackend final : public Backend {
 public:
  explicit HopperBackend(const Plan& plan)
      : tables_(plan, Device::cuda),
        sweep_(backward_sweep(plan)),
        dkdv_order_(backward_item_order(plan, sweep_,
                                        std::max<int64_t>(1, tables_.device.multiProcessorCount -
                                                                 plan.problem().sm_margin))) {
    const Problem& p = plan.problem();
    const cudaDeviceProp& prop = tables_.device;
    require(prop.major == 9, "device", std::string(prop.name) + " (sm_" + str(prop.major) + str(prop.minor) + ")",
            "a Hopper GPU (sm_90) for Device::cuda; use cuda-reference or cpu elsewhere");
    require(p.dtype == DType::bf16 || p.dtype == DType::f16, "dtype", to_string(p.dtype), "bf16 or f16 on cuda");
    require(hopper::forward_smem_bytes(static_cast<int>(p.head_dim)) > 0, "head_dim", p.head_dim,
            "64, 96 or 128 on cuda");
    require(p.scale > 0, "scale", p.scale, "a positive number on cuda");
    // fp8_scaled: q, k, v are the caller's e4m3 (one byte per element); o is in dtype.
    const int64_t esize = dtype_size(p.dtype), in_size = p.precision == Precision::fp8_scaled ? 1 : esize;
    auto strides_ok = [&](const char* name, const Strides& s, int64_t bytes) {
      for (int64_t v : {s.batch, s.seq, s.head})
        require((v * bytes) % 16 == 0, name, str(s.batch) + "," + str(s.seq) + "," + str(s.head),
                "strides (batch, seq, head) that are multiples of 16 bytes (" + str(16 / bytes) +
                    " elements) for TMA");
    };
    strides_ok("q_strides", p.q, in_size);
    strides_ok("k_strides", p.k, in_size);
    strides_ok("v_strides", p.v, in_size);
    strides_ok("o_strides", p.o, esize);
    constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
    require(p.latent.volume() <= kMax / 2 && p.text_capacity <= kMax / 2, "latent", str(p.latent),
            "fewer than 2^30 video tokens per sequence on cuda");

    per_batch_ = view_mode(p.q, p.q_heads, p.head_dim) == ViewMode::per_batch ||
                 view_mode(p.o, p.q_heads, p.head_dim) == ViewMode::per_batch ||
                 view_mode(p.k, p.kv_heads, p.head_dim) == ViewMode::per_batch ||
                 view_mode(p.v, p.kv_heads, p.head_dim) == ViewMode::per_batch;
    max_ctas_ = static_cast<int>(std::max<int64_t>(1, prop.multiProcessorCount - p.sm_margin));
    const TileGrid& g = plan.grid();
    const std::vector<QueryRun> runs = forward_query_runs(plan);
    const int head_dim = static_cast<int>(p.head_dim);
    query_rows_ = choose_query_rows(hopper::forward_query_rows(head_dim), [&](int rows) {
      const TileClasses c(g, rows);
      const std::vector<int32_t> table = forward_run_blocks(plan, runs, rows, g.num_tiles() * c.slots);
      return (table.empty() ? c.padded_query_rows(g, rows) : static_cast<int64_t>(table.size() / 2) * rows) +
             ceil_div<int64_t>(p.text_capacity, rows) * rows;
    });
    classes_ = TileClasses(g, query_rows_);
    video_items_ = static_cast<int32_t>(g.num_tiles() * classes_.slots);
    if (const std::vector<int32_t> table = forward_run_blocks(plan, runs, query_rows_, video_items_); !table.empty()) {
      run_blocks_ = DeviceArray<int32_t>(table);
      video_items_ = static_cast<int32_t>(table.size() / 2);
      key_runs_ = forward_key_runs(plan, runs, classes_);
    }
    text_items_ = static_cast<int32_t>(ceil_div<int64_t>(p.text_capacity, query_rows_));
    const int64_t launch_batch = per_batch_ ? 1 : p.batch;
    const int64_t work = launch_batch * p.q_heads * (int64_t{video_items_} + text_items_);
    require(work <= kMax, "problem size", work, "fewer than 2^31 work items per launch");

    // Key blocks are the same for every kernel (boxes of at most kBlockN tokens, whatever the query rows): per-block
    // data of the pre-passes (the backward's statistics, FP8's V^T) is indexed by block_entry over them.
    key_slots_ = classes_.key_slots;
    key_entries_ = static_cast<int32_t>(classes_.key_entries(g, p.text_capacity));
    // The backward's kernels own 128-row blocks (bwd/bwd_params.cuh); the dQ kernel streams the 128-row key blocks,
    // the dK/dV kernel query blocks of the rows its build has (hopper::dkdv_stream_rows: 128 or 64), whose per-block
    // statistics are numbered over its own boxes.
    bwd_classes_ = TileClasses(g, hopper::kBackwardOwnedRows);
    dkdv_classes_ = TileClasses(g, hopper::kBackwardOwnedRows, hopper::dkdv_stream_rows());
    stream_entries_ = static_cast<int32_t>(dkdv_classes_.key_entries(g, p.text_capacity));
    // The arrangement of the backward's kernels: the reduce kernel (2) at every density (v3.7 kept the two kernels (0)
    // for nearly dense plans, 2% faster there then; since v3.13 the reduce kernel is faster on every benchmark row,
    // the whole grid 841.51 ms against 943.94, docs/performance.md backward v3.13); deterministic runs take the two.
    // TILEWISE_BACKWARD_FUSED_DQ=0 in the environment takes the two kernels for every run (measurements; 2 or unset:
    // the reduce kernel; 1 was an atomic fused kernel, removed in v3.16, and now means the reduce kernel too).
    const char* fused = std::getenv("TILEWISE_BACKWARD_FUSED_DQ");
    reduce_kernel_ = fused == nullptr || std::string(fused) != "0";
    if (reduce_kernel_) {  // the reduce kernel streams 64-row blocks whatever the dK/dV kernel's build has
      reduce_classes_ = TileClasses(g, hopper::kBackwardOwnedRows, 64);
      reduce_entries_ = static_cast<int32_t>(reduce_classes_.key_entries(g, p.text_capacity));
      dq_block_order_ = hopper::dq_block_order(static_cast<int>(p.head_dim));  // (the build's, by head dim)
      // In clusters where the build has them, every tile has as many owned slots as a cluster has CTAs (a 6x8x8
      // tile: three 128-key blocks), so that a cluster's CTAs share their streamed blocks (tile_scheduler.cuh,
      // decode_tile_unit), and TILEWISE_BACKWARD_CLUSTER=1 asks for it (measured 8% slower on the H200, where only
      // 117 of the 132 SMs hold clusters of three: docs/performance.md backward v3.14).
      const char* cluster = std::getenv("TILEWISE_BACKWARD_CLUSTER");
      const bool want_cluster = cluster != nullptr && std::string(cluster) == "1";
      if (const int c = hopper::reduce_cluster_size(); want_cluster && c > 1 && reduce_classes_.slots == c) {
        reduce_cluster_ctas_ = std::min(hopper::reduce_cluster_ctas(static_cast<int>(p.head_dim), p.dtype == DType::bf16),
                                        max_ctas_ / c * c);
      }
    }

    if (p.precision != Precision::native) {  // the FP8 forward (its own query blocks, the V^T blocks, scratch)
      fp8_rows_ = choose_query_rows(hopper::fp8_forward_query_rows(head_dim), [&](int rows) {
        return TileClasses(g, rows).padded_query_rows(g, rows) + ceil_div<int64_t>(p.text_capacity, rows) * rows;
      });
      fp8_classes_ = TileClasses(g, fp8_rows_);
      // Fp8Params' DivisorU32 divides positions by tile extents exactly while both stay below 2^16.
      require(std::max({p.latent.t, p.latent.h, p.latent.w}) < (int64_t{1} << 16), "latent", str(p.latent),
              "axes of fewer than 65536 positions for precision fp8 on cuda");
      require(std::max({p.tile.t, p.tile.h, p.tile.w}) < (int64_t{1} << 16), "tile", str(p.tile),
              "extents of fewer than 65536 positions for precision fp8 on cuda");
      require(p.batch * p.kv_heads * key_entries_ < (int64_t{1} << 31), "problem size",
              p.batch * p.kv_heads * key_entries_, "fewer than 2^31 key blocks for precision fp8 on cuda");
      const int64_t fp8_work = launch_batch * p.q_heads *
                               (g.num_tiles() * fp8_classes_.slots + ceil_div<int64_t>(p.text_capacity, fp8_rows_));
      require(fp8_work <= kMax, "problem size", fp8_work, "fewer than 2^31 work items per launch");
      own_fp8_scratch_ = DeviceArray<uint8_t>(fp8_layout(plan, nullptr).bytes);
    }
  }

  /// The FP8 forward's workspace: the scheduler's counter and the V^T blocks, and for precision fp8 the pre-pass's
  /// results (quantize_fp8_for_forward): q and k in e4m3 ([B, S, H, D], contiguous), the scales, V's inverse
  /// scales, the rows' LSE shift, the mean keys' sums and the pre-pass's statistics.
  struct Fp8Scratch {
    int32_t* counter;
    uint8_t* vt;
    ForwardQuantized quantized;
    size_t bytes;
  };
  Fp8Scratch fp8_layout(const Plan& plan, void* base) const {
    const Problem& p = plan.problem();
    WorkspaceCarver w(base);
    Fp8Scratch f{};
    f.counter = w.take<int32_t>(1);
    f.vt = w.take<uint8_t>(p.batch * p.kv_heads * int64_t{key_entries_} * p.head_dim * hopper::kBlockN);
    if (p.precision == Precision::fp8) {
      ForwardQuantized& q = f.quantized;
      const int64_t D = p.head_dim, S = p.seq_len;
      q.q8 = w.take<uint8_t>(p.batch * S * p.q_heads * D);
      q.k8 = w.take<uint8_t>(p.batch * S * p.kv_heads * D);
      q.q8_strides = {S * p.q_heads * D, p.q_heads * D, D};
      q.k8_strides = {S * p.kv_heads * D, p.kv_heads * D, D};
      q.q_scale = w.take<float>(p.batch * p.q_heads * S);
      q.k_scale = w.take<float>(p.batch * p.kv_heads * plan.fp8_key_blocks());
      q.v_scale = w.take<float>(p.batch * p.kv_heads * D);
      q.v_inv = w.take<float>(p.batch * p.kv_heads * D);
      q.lse_shift = w.take<float>(p.batch * p.q_heads * S);
      q.sums = w.take<double>(p.batch * p.kv_heads * D);
      q.stats = w.take<float>(quantize_fp8_stats_floats(plan));
    }
    f.bytes = w.used();
    return f;
  }

  /// The parameters every kernel shares: the semantics core's token map, the tile classes' boxes, the batch and
  /// heads of a launch, and the pattern tables.
  void fill_common(const Plan& plan, const TileClasses& classes, const int32_t* text_len, hopper::FwdParams& prm) const {
    const Problem& p = plan.problem();
    prm.map = TokenMapT<int32_t>{TileGridT<int32_t>(plan.grid()), plan.token_map().seq, p.order};
    std::copy(std::begin(classes.cls), std::end(classes.cls), std::begin(prm.cls));
    prm.partial_axes = classes.partial_axes;
    prm.slots_per_tile = classes.slots;
    prm.zero_init = classes.max_volume < classes.key_rows;
    prm.batch = per_batch_ ? 1 : static_cast<int32_t>(p.batch);
    prm.q_heads = static_cast<int32_t>(p.q_heads);
    prm.kv_group = static_cast<int32_t>(p.q_heads / p.kv_heads);
    prm.text_len = text_len;
    prm.kind = plan.pattern().kind;
    prm.heads = tables_.heads.get();
    prm.block_offsets = tables_.block_offsets.get();
    prm.block_tiles = tables_.block_tiles.get();
    prm.scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
    prm.seq_len = p.seq_len;
  }

  /// Backward scratch: the two scheduler counters, D in sequence order, and the per-block statistics.
  size_t backward_workspace_bytes(const Plan& plan) const override { return backward_layout(plan, nullptr).used(); }

  /// The reduce kernel's dQ accumulator: [B, S, Hq, D], or in block order per (batch, head) its streamed blocks'
  /// entries of 64 rows (spare rows of cut tiles' boxes and of spare slots included).
  int64_t dq_accum_floats(const Problem& p) const {
    return p.batch * p.q_heads * (dq_block_order_ ? int64_t{reduce_entries_} * 64 : p.seq_len) * p.head_dim;
  }
  struct BackwardScratch {
    int32_t* counters;
    float* delta;
    float* stats;
    float* dq_accum;
    size_t bytes;
    size_t used() const { return bytes; }
  };
  BackwardScratch backward_layout(const Plan& plan, void* base) const {
    const Problem& p = plan.problem();
    WorkspaceCarver w(base);
    BackwardScratch b{};
    b.counters = w.take<int32_t>(2);
    b.delta = w.take<float>(p.batch * p.q_heads * p.seq_len);
    const int64_t entry_words = std::max(int64_t{stream_entries_} * dkdv_classes_.key_rows, int64_t{reduce_entries_} * 64);
    b.stats = w.take<float>(p.batch * p.q_heads * entry_words * hopper::kStatsRows);
    b.dq_accum = reduce_kernel_ ? w.take<float>(dq_accum_floats(p)) : nullptr;
    b.bytes = w.used();
    return b;
  }

  /// Preprocess (D and the streamed blocks' statistics), then, by default (not `deterministic`), the reduce kernel:
  /// the fused kernel on 64-row streamed blocks whose dQ goes into a [B, S, Hq, D] fp32 accumulator by TMA
  /// reductions (docs/performance.md, backward v3.6-v3.7), and a conversion.
  /// Otherwise the dQ kernel and the dK/dV kernel (seven GEMMs per block pair; each gradient row is summed by one
  /// warpgroup in a fixed order, so bitwise reproducible).
  void run_backward(const Plan& plan, const GradTensors& t, void* stream_ptr, void* workspace,
                    bool deterministic) const override {
    deterministic = deterministic || !reduce_kernel_;
    const bool reduce = !deterministic;
    // The dK/dV kernel's streamed blocks: its build's rows, or the reduce kernel's 64.
    const TileClasses& streamed_classes = reduce ? reduce_classes_ : dkdv_classes_;
    const int32_t streamed_entries = reduce ? reduce_entries_ : stream_entries_;
    const Problem& p = plan.problem();
    require_device_tensors(t, 16);
    const auto stream = static_cast<cudaStream_t>(stream_ptr);
    const BackwardScratch ws = backward_layout(plan, workspace);
    const TileGrid& g = plan.grid();
    hopper::BwdParams prm{};
    fill_common(plan, bwd_classes_, t.text_len, prm);
    prm.kv_heads = static_cast<int32_t>(p.kv_heads);
    prm.query_offsets = tables_.query_tile_offsets.get();
    prm.query_list = tables_.query_tile_list.get();
    prm.scale_log2_lse = 1.4426950408889634f;
    prm.lse = const_cast<float*>(t.lse);  // read only by the backward
    prm.video_items = static_cast<int32_t>(g.num_tiles() * bwd_classes_.slots);
    prm.text_items = static_cast<int32_t>(ceil_div<int64_t>(p.text_capacity, hopper::kBackwardOwnedRows));
    prm.delta = ws.delta;
    encode_stats(p, ws.stats, streamed_entries, streamed_classes.key_rows, prm.stats_map);
    prm.stream_slots = streamed_classes.key_slots;
    prm.stats_entries = streamed_entries;
    prm.dq_accum = ws.dq_accum;
    const size_t accum_bytes = sizeof(float) * static_cast<size_t>(dq_accum_floats(p));
    // (Ablation bit 16384, measurement only: neither the accumulator's zeroing nor dq's conversion, what doing
    // both inside the main kernel could save at most.)
    const bool dq_passes = !deterministic && !(TILEWISE_HOPPER_BWD_ABLATE & 16384);
    // (Zeroing it in the preprocess instead, each CTA its own block, measured 0.05 ms slower: backward v3.33.)
    if (dq_passes) check(cudaMemsetAsync(ws.dq_accum, 0, accum_bytes, stream), "cudaMemsetAsync");

    // The dK/dV kernel's parameters start from these with its own boxes (its streamed blocks, which the preprocess
    // numbers its statistics by).
    hopper::BwdParams streamed = prm;
    fill_common(plan, streamed_classes, t.text_len, streamed);
    hopper::PreprocessParams pre{t.o, t.dout, p.o, t.lse, t.dlse, ws.delta, ws.stats, static_cast<int32_t>(p.batch)};
    const bool bf16 = p.dtype == DType::bf16;
    const int D = static_cast<int>(p.head_dim);
    check(hopper::launch_backward_preprocess(streamed, pre, D, bf16, static_cast<int>(streamed_classes.key_rows),
                                             stream),
          "backward preprocess launch");

    const ElementFormat format = native_format(p);
    const int rows = hopper::kBackwardOwnedRows;
    for (int64_t b = 0; b < (per_batch_ ? p.batch : 1); ++b) {
      prm.batch_base = static_cast<int32_t>(b);
      // dQ: owned Q and dO, streamed K and V.
      hopper::BwdParams dq = prm;
      encode(plan, bwd_classes_, rows, t.q, p.q, p.q_heads, b, dq.q_video, dq.q_text, dq.q, format, true);
      encode(plan, bwd_classes_, rows, t.dout, p.o, p.q_heads, b, dq.o_video, dq.o_text, dq.o, format, true);
      encode(plan, bwd_classes_, rows, t.k, p.k, p.kv_heads, b, dq.k_video, dq.k_text, dq.k, format, false);
      encode(plan, bwd_classes_, rows, t.v, p.v, p.kv_heads, b, dq.v_video, dq.v_text, dq.v, format, false);
      dq.grad0 = t.dq;
      dq.grad0_strides = p.q;
      dq.grad0_scale = static_cast<float>(p.scale);
      dq.num_work = dq.batch * dq.q_heads * (dq.video_items + dq.text_items);
      dq.work_counter = ws.counters;
      // dK, dV: owned K and V (per kv head), streamed Q and dO of each query head of the group.
      hopper::BwdParams dkv = streamed;
      dkv.batch_base = prm.batch_base;
      encode(plan, streamed_classes, rows, t.k, p.k, p.kv_heads, b, dkv.q_video, dkv.q_text, dkv.q, format, true);
      encode(plan, streamed_classes, rows, t.v, p.v, p.kv_heads, b, dkv.o_video, dkv.o_text, dkv.o, format, true);
      encode(plan, streamed_classes, rows, t.q, p.q, p.q_heads, b, dkv.k_video, dkv.k_text, dkv.k, format, false);
      encode(plan, streamed_classes, rows, t.dout, p.o, p.q_heads, b, dkv.v_video, dkv.v_text, dkv.v, format, false);
      if (reduce && !dq_block_order_) {  // the accumulator, [B, S, Hq, D] fp32, through the streamed blocks' boxes
        const Strides acc{p.seq_len * p.q_heads * p.head_dim, p.q_heads * p.head_dim, p.head_dim, 1};
        encode(plan, streamed_classes, rows, ws.dq_accum, acc, p.q_heads, b, dkv.dq_video, dkv.dq_text, dkv.dq_view,
               ElementFormat{CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, 32}, false);
      }
      dkv.grad0 = t.dk;
      dkv.grad0_strides = p.k;
      dkv.grad0_scale = static_cast<float>(p.scale);
      dkv.grad1 = t.dv;
      dkv.grad1_strides = p.v;
      dkv.video_order = dkdv_order_.get();
      dkv.walk_width_slowest = sweep_;
      if (TILEWISE_HOPPER_BWD_ABLATE & 32768) dkv.text_items = 0;  // measurement only (bwd_params.cuh)
      dkv.num_work = dkv.batch * dkv.kv_heads * (dkv.video_items + dkv.text_items);
      dkv.work_counter = ws.counters + 1;

      check(cudaMemsetAsync(ws.counters, 0, 2 * sizeof(int32_t), stream), "cudaMemsetAsync");
      if (deterministic)
        check(hopper::launch_backward(dq, D, bf16, hopper::BwdKernel::dq, std::min(dq.num_work, max_ctas_), stream),
              "dQ kernel launch");
      const bool cluster = reduce && reduce_cluster_ctas_ > 0;
      const hopper::BwdKernel kernel = deterministic ? hopper::BwdKernel::dkdv
                                       : cluster     ? hopper::BwdKernel::dkdvq_reduce_cluster
                                                     : hopper::BwdKernel::dkdvq_reduce;
      int grid = std::min(dkv.num_work, max_ctas_);
      if (cluster) {  // a cluster per unit: a tile's slots, or as many text blocks (tile_scheduler.cuh)
        const int c = hopper::reduce_cluster_size();
        const int64_t units = int64_t{dkv.batch} * dkv.kv_heads * (ceil_div<int64_t>(dkv.text_items, c) + g.num_tiles());
        grid = static_cast<int>(std::min<int64_t>(c * units, reduce_cluster_ctas_));
      }
      check(hopper::launch_backward(dkv, D, bf16, kernel, grid, stream), "dK/dV kernel launch");
    }
    if (dq_passes && dq_block_order_)
      check(hopper::launch_dq_from_block_accumulator(streamed, ws.dq_accum, t.dq, p.q, p.batch, D,
                                                     static_cast<float>(p.scale), bf16, stream),
            "dq conversion launch");
    else if (dq_passes)
      check(hopper::launch_dq_from_accumulator(ws.dq_accum, t.dq, p.q, p.batch, p.q_heads, p.seq_len, D,
                                               static_cast<float>(p.scale), bf16, stream),
            "dq conversion launch");
  }

  size_t workspace_bytes(const Plan& plan) const override {
    return plan.problem().precision == Precision::native ? 256 : fp8_layout(plan, nullptr).bytes;
  }

  /// precision fp8's pre-pass alone (fp8_quantize.cu); a native plan may quantise too (semantics.md §11.2).
  void quantize_fp8(const Plan& plan, const Tensors& in, const Fp8Tensors& out, void* stream) const override {
    cuda::quantize_fp8(plan, in, out, static_cast<cudaStream_t>(stream));
  }

  void run(const Plan& plan, const Tensors& t, void* stream, void* workspace) const override {
    const Problem& p = plan.problem();
    require_device_tensors(t, 16);  // TMA needs 16-byte aligned base addresses
    if (p.precision != Precision::native) return run_fp8(plan, t, static_cast<cudaStream_t>(stream), workspace);

    hopper::FwdRunParams prm{};
    const TileGrid& g = plan.grid();
    fill_common(plan, classes_, t.text_len, prm);
    prm.lse = t.lse;
    prm.video_items = video_items_;
    prm.text_items = text_items_;
    prm.num_work = prm.batch * prm.q_heads * (video_items_ + text_items_);
    prm.runs = run_blocks_.get();
    prm.key_runs = key_runs_;
    prm.work_counter = workspace ? static_cast<int32_t*>(workspace) : work_counter_.mutable_get();
    const int grid = std::min<int>(prm.num_work, max_ctas_);
    for (int64_t b = 0; b < (per_batch_ ? p.batch : 1); ++b) {
      prm.batch_base = static_cast<int32_t>(b);
      encode(plan, t.q, p.q, p.q_heads, b, prm.q_video, prm.q_text, prm.q, true, prm.runs ? &prm.q_rows : nullptr);
      encode(plan, t.k, p.k, p.kv_heads, b, prm.k_video, prm.k_text, prm.k, false, key_runs_ ? &prm.k_rows : nullptr);
      encode(plan, t.v, p.v, p.kv_heads, b, prm.v_video, prm.v_text, prm.v, false, key_runs_ ? &prm.v_rows : nullptr);
      encode(plan, t.o, p.o, p.q_heads, b, prm.o_video, prm.o_text, prm.o, true, prm.runs ? &prm.o_rows : nullptr);
      // The scheduler's counter restarts on the stream: a memset node under graph capture, no host sync.
      // (So one plan must not run concurrently on two streams with its own counter: pass a workspace per stream.)
      check(cudaMemsetAsync(prm.work_counter, 0, sizeof(int32_t), static_cast<cudaStream_t>(stream)), "cudaMemsetAsync");
      check(hopper::launch_forward(prm, static_cast<int>(p.head_dim), query_rows_, p.dtype == DType::bf16, grid,
                                   static_cast<cudaStream_t>(stream)),
            "forward kernel launch");
    }
  }

  /// The FP8 forward: precision fp8's pre-pass (quantize_fp8_for_forward) unless the caller quantised
  /// (fp8_scaled), V^T per key block (launch_vt_pack), then the kernel on e4m3 Q and K maps, the V^T map and the
  /// scales. All on the stream, into the workspace (or the plan's own): no allocation, no host sync.
  void run_fp8(const Plan& plan, const Tensors& t, cudaStream_t stream, void* workspace) const {
    const Problem& p = plan.problem();
    const bool scaled = p.precision == Precision::fp8_scaled;
    if (scaled) {
      require_device_pointer(t.q_scale, "q_scale", 4);
      require_device_pointer(t.k_scale, "k_scale", 4);
      require_device_pointer(t.v_scale, "v_scale", 4);
    }
    const Fp8Scratch ws = fp8_layout(plan, workspace ? workspace : own_fp8_scratch_.mutable_get());
    const ForwardQuantized& qz = ws.quantized;
    const TileGrid& g = plan.grid();
    hopper::Fp8Params prm{};
    fill_common(plan, fp8_classes_, t.text_len, prm);
    prm.lse = t.lse;
    prm.video_items = static_cast<int32_t>(g.num_tiles() * fp8_classes_.slots);
    prm.text_items = static_cast<int32_t>(ceil_div<int64_t>(p.text_capacity, fp8_rows_));
    prm.num_work = prm.batch * prm.q_heads * (prm.video_items + prm.text_items);
    prm.work_counter = ws.counter;
    prm.kv_heads = static_cast<int32_t>(p.kv_heads);
    prm.key_blocks = static_cast<int32_t>(plan.fp8_key_blocks());
    prm.vt_slots = key_slots_;
    prm.vt_entries = key_entries_;
    prm.tile_t = hopper::DivisorU32::of(static_cast<uint32_t>(g.tile.t));
    prm.tile_h = hopper::DivisorU32::of(static_cast<uint32_t>(g.tile.h));
    prm.tile_w = hopper::DivisorU32::of(static_cast<uint32_t>(g.tile.w));
    prm.q_scale = scaled ? t.q_scale : qz.q_scale;
    prm.k_scale = scaled ? t.k_scale : qz.k_scale;
    prm.v_scale = scaled ? t.v_scale : qz.v_scale;
    prm.lse_shift = scaled ? nullptr : qz.lse_shift;
    const void* q8 = scaled ? t.q : qz.q8;
    const void* k8 = scaled ? t.k : qz.k8;
    const Strides q8s = scaled ? p.q : qz.q8_strides, k8s = scaled ? p.k : qz.k8_strides;
    if (!scaled) quantize_fp8_for_forward(plan, t, qz, stream);

    // V^T of every key block, for every batch element at once (the pack reads the whole batch).
    encode_vt(p, ws.vt, prm.vt_map);
    hopper::Fp8Params all = prm;
    all.batch = static_cast<int32_t>(p.batch);
    all.batch_base = 0;
    const hopper::VtSource source = scaled ? hopper::VtSource::e4m3
                                    : p.dtype == DType::bf16 ? hopper::VtSource::bf16 : hopper::VtSource::f16;
    check(hopper::launch_vt_pack(all, t.v, p.v, source, scaled ? nullptr : qz.v_inv, ws.vt,
                                 static_cast<int>(p.head_dim), stream),
          "V^T pack launch");

    const ElementFormat e4m3 = e4m3_format(p), out = native_format(p);
    for (int64_t b = 0; b < (per_batch_ ? p.batch : 1); ++b) {
      prm.batch_base = static_cast<int32_t>(b);
      encode(plan, fp8_classes_, fp8_rows_, q8, q8s, p.q_heads, b, prm.q_video, prm.q_text, prm.q, e4m3, true);
      encode(plan, fp8_classes_, fp8_rows_, k8, k8s, p.kv_heads, b, prm.k_video, prm.k_text, prm.k, e4m3, false);
      encode(plan, fp8_classes_, fp8_rows_, t.o, p.o, p.q_heads, b, prm.o_video, prm.o_text, prm.o, out, true);
      prm.v_video[0] = prm.vt_map;  // unused (V^T comes through vt_map); prefetched by the V loader
      check(cudaMemsetAsync(prm.work_counter, 0, sizeof(int32_t), stream), "cudaMemsetAsync");
      check(hopper::launch_fp8_forward(prm, static_cast<int>(p.head_dim), fp8_rows_, p.dtype == DType::bf16,
                                       max_ctas_, stream),
            "FP8 forward kernel launch");
    }
  }

 private:
  /// The V^T blocks as (128 keys, D, blocks): one box per block, 128-byte swizzle (Fp8Params::vt_map).
  void encode_vt(const Problem& p, const uint8_t* vt, CUtensorMap& map) const {
    const cuuint64_t blocks = static_cast<cuuint64_t>(p.batch * p.kv_heads * key_entries_);
    const cuuint64_t row = hopper::kBlockN, block = row * static_cast<cuuint64_t>(p.head_dim), all = block * blocks;
    const cuuint64_t dims[5] = {hopper::kBlockN, static_cast<cuuint64_t>(p.head_dim), blocks, 1, 1};
    const cuuint64_t strides[4] = {row, block, all, all};
    const cuuint32_t box[5] = {hopper::kBlockN, static_cast<cuuint32_t>(p.head_dim), 1, 1, 1}, ones[5] = {1, 1, 1, 1, 1};
    encode_one(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, vt, dims, strides, box, ones, CU_TENSOR_MAP_SWIZZLE_128B);
  }

  /// Tensor maps of one tensor: video (D', W', H', T', X), one per tile class (its query or key box), and text
  /// (D', L, 1, 1, X), where the physical video view is the latent for raster order and (tiles * tt, th, tw) for
  /// tiled order. Q and O (`query`) move in query blocks, K and V in key blocks. `rows`: also the video tokens as
  /// rows (D', N, 1, 1, X; query run blocks, raster order only).
  void encode(const Plan& plan, const void* base, const Strides& s, int64_t heads, int64_t batch, CUtensorMap* video,
              CUtensorMap& text, hopper::TensorView& view, bool query, CUtensorMap* rows = nullptr) const {
    encode(plan, classes_, query_rows_, base, s, heads, batch, video, text, view, native_format(plan.problem()), query,
           rows);
  }
  /// The same for any kernel's tile classes, owned (query) block rows and element format.
  void encode(const Plan& plan, const TileClasses& classes, int owned_rows, const void* base, const Strides& s,
              int64_t heads, int64_t batch, CUtensorMap* video, CUtensorMap& text, hopper::TensorView& view,
              const ElementFormat& format, bool query, CUtensorMap* rows = nullptr) const {
    const Problem& p = plan.problem();
    const TileGrid& g = plan.grid();
    const int64_t D = p.head_dim, esize = format.esize;
    const int panel_cols = format.panel_cols;
    const ViewMode mode = per_batch_ ? ViewMode::per_batch : view_mode(s, heads, D);
    const char* ptr = static_cast<const char*>(base) + (per_batch_ ? batch * s.batch * esize : 0);
    uint64_t dim0 = D, dim4 = heads, stride4 = s.head;
    view = {};
    if (mode == ViewMode::head_in_dim0) {
      dim0 = heads * D;
      dim4 = p.batch;
      stride4 = s.batch;
      view.head_mult0 = static_cast<int32_t>(D);
      view.batch_mult4 = 1;
    } else if (mode == ViewMode::head_batch_merged) {
      dim4 = p.batch * heads;
      view.batch_mult4 = static_cast<int32_t>(heads);
      view.head_mult4 = 1;
    } else {
      view.head_mult4 = 1;
    }
    const Dim3 phys = p.order == TokenOrder::raster ? g.latent : Dim3{g.num_tiles() * g.tile.t, g.tile.h, g.tile.w};
    const CUtensorMapDataType dtype = format.dtype;
    const int64_t panel_bytes = panel_cols * esize;
    const CUtensorMapSwizzle swizzle = panel_bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B
                                       : panel_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                           : CU_TENSOR_MAP_SWIZZLE_32B;
    const cuuint32_t ones[5] = {1, 1, 1, 1, 1};
    {
      const char* v0 = ptr + plan.token_map().seq.video_offset() * s.seq * esize;
      const cuuint64_t dims[5] = {dim0, (cuuint64_t)phys.w, (cuuint64_t)phys.h, (cuuint64_t)phys.t, dim4};
      const cuuint64_t strides[4] = {(cuuint64_t)(s.seq * esize), (cuuint64_t)(s.seq * phys.w * esize),
                                     (cuuint64_t)(s.seq * phys.w * phys.h * esize), (cuuint64_t)(stride4 * esize)};
      for (int c = 0; c < hopper::kTileClasses; ++c) {
        if (!classes.exists(c)) continue;
        const hopper::D3& b = query ? classes.cls[c].qbox : classes.cls[c].box;
        const cuuint32_t box[5] = {(cuuint32_t)panel_cols, (cuuint32_t)b.w, (cuuint32_t)b.h, (cuuint32_t)b.t, 1};
        encode_one(video[c], dtype, v0, dims, strides, box, ones, swizzle);
      }
    }
    if (rows != nullptr) {
      const char* v0 = ptr + plan.token_map().seq.video_offset() * s.seq * esize;
      const cuuint64_t n = static_cast<cuuint64_t>(g.num_tokens());
      const cuuint64_t dims[5] = {dim0, n, 1, 1, dim4};
      const cuuint64_t strides[4] = {(cuuint64_t)(s.seq * esize), (cuuint64_t)(s.seq * n * esize),
                                     (cuuint64_t)(s.seq * n * esize), (cuuint64_t)(stride4 * esize)};
      const cuuint32_t box[5] = {(cuuint32_t)panel_cols, (cuuint32_t)(query ? owned_rows : classes.key_rows), 1, 1, 1};
      encode_one(*rows, dtype, v0, dims, strides, box, ones, swizzle);
    }
    if (p.text_capacity > 0) {
      const char* t0 = ptr + plan.token_map().seq.text_offset() * s.seq * esize;
      const cuuint64_t dims[5] = {dim0, (cuuint64_t)p.text_capacity, 1, 1, dim4};
      const cuuint64_t strides[4] = {(cuuint64_t)(s.seq * esize), (cuuint64_t)(s.seq * p.text_capacity * esize),
                                     (cuuint64_t)(s.seq * p.text_capacity * esize), (cuuint64_t)(stride4 * esize)};
      const cuuint32_t rows = static_cast<cuuint32_t>(query ? owned_rows : classes.key_rows);
      const cuuint32_t box[5] = {(cuuint32_t)panel_cols, rows, 1, 1, 1};
      encode_one(text, dtype, t0, dims, strides, box, ones, swizzle);
    } else {
      text = video[0];  // never read
    }
  }

  /// The statistics buffer as rows of as many floats as the dK/dV kernel's streamed blocks have rows
  /// (BwdParams::stats_map): one box is one block's 3 rows.
  void encode_stats(const Problem& p, const float* stats, int32_t entries, int64_t block_rows, CUtensorMap& map) const {
    const int64_t rows = p.batch * p.q_heads * int64_t{entries} * hopper::kStatsRows;
    require(rows < (int64_t{1} << 31), "problem size", rows, "fewer than 2^31 rows of backward statistics");
    const cuuint64_t cols = static_cast<cuuint64_t>(block_rows);
    const cuuint64_t row_bytes = cols * sizeof(float), all = row_bytes * static_cast<cuuint64_t>(rows);
    const cuuint64_t dims[5] = {cols, static_cast<cuuint64_t>(rows), 1, 1, 1};
    const cuuint64_t strides[4] = {row_bytes, all, all, all};
    const cuuint32_t box[5] = {static_cast<cuuint32_t>(cols), hopper::kStatsRows, 1, 1, 1}, ones[5] = {1, 1, 1, 1, 1};
    encode_one(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, stats, dims, strides, box, ones, CU_TENSOR_MAP_SWIZZLE_NONE);
  }

  static void encode_one(CUtensorMap& map, CUtensorMapDataType dtype, const void* addr, const cuuint64_t* dims,
                         const cuuint64_t* strides, const cuuint32_t* box, const cuuint32_t* elem_strides,
                         CUtensorMapSwizzle swizzle) {
    const CUresult r = encode_fn()(&map, dtype, 5, const_cast<void*>(addr), dims, strides, box, elem_strides,
                                   CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                   CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS)
      throw std::runtime_error("tilewise: cuTensorMapEncodeTiled failed (CUresult " + std::to_string(r) +
                               ") for dims " + std::to_string(dims[0]) + "x" + std::to_string(dims[1]) + "x" +
                               std::to_string(dims[2]) + "x" + std::to_string(dims[3]) + "x" + std::to_string(dims[4]));
  }

  PatternTables tables_;
  DeviceArray<int32_t> work_counter_{std::vector<int32_t>{0}};
  TileClasses classes_;
  TileClasses bwd_classes_;      // the backward's: 128-row owned (qbox) and streamed (box) blocks (the dQ kernel)
  TileClasses dkdv_classes_;     // the dK/dV kernel's: 128-row owned key blocks, streamed query blocks of its rows
  int32_t stream_entries_ = 0;   // the dK/dV kernel's streamed blocks per (batch, head) (block_entry over its boxes)
  TileClasses reduce_classes_;   // TILEWISE_BACKWARD_FUSED_DQ=2: the reduce kernel's (64-row streamed blocks)
  int reduce_cluster_ctas_ = 0;  // > 0: the reduce kernel runs in clusters, on at most this many CTAs
  int32_t reduce_entries_ = 0;
  int32_t key_slots_ = 1;     // key blocks per tile: the most key boxes of any tile class
  int32_t key_entries_ = 0;   // key blocks per (batch, head): tiles * key_slots_ + text blocks (block_entry)
  bool reduce_kernel_ = true;  // false: the two kernels for every run (TILEWISE_BACKWARD_FUSED_DQ=0), as deterministic ones
  bool dq_block_order_ = false;  // the reduce kernel's dQ accumulator in block order (hopper::dq_block_order(D))
  bool sweep_ = false;               // the dK/dV kernels' sweep: its item order and walk (backward_sweep)
  DeviceArray<int32_t> dkdv_order_;  // the dK/dV kernel's video items (dkdv_item_order)
  bool per_batch_ = false;
  int max_ctas_ = 1;  // CTAs of a persistent launch: the device's SMs less Problem::sm_margin, at least 1
  int query_rows_ = 128;  // query rows per work item of the forward kernel for this plan (choose_query_rows)
  int32_t video_items_ = 0, text_items_ = 0;
  DeviceArray<int32_t> run_blocks_;  // the forward's query run blocks (forward_run_blocks), or none: tiles' blocks
  bool key_runs_ = false;            // and their keys as key-run blocks (forward_key_runs)
  // The FP8 forward (precision fp8 / fp8_scaled only): its query rows and tile classes, and the scratch used when
  // run() is given no workspace (allocated with the plan).
  int fp8_rows_ = 128;
  TileClasses fp8_classes_;
  DeviceArray<uint8_t> own_fp8_scratch_;
};

}  // namespace
}  // namespace cuda

bool cuda_available() {
  int count = 0;
  const bool ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  if (!ok) cudaGetLastError();
  return ok;
}

std::unique_ptr<Backend> make_cuda_backend(const Plan& plan) { return std::make_unique<cuda::HopperBackend>(plan); }

}  // namespace tilewise
