// tilewise public C++ API, plan/run style.
//
//   tilewise::Problem problem{...};                       // shapes, dtype, latent grid, tile, text, strides
//   auto pattern = tilewise::Pattern::sliding_tile({3, 3, 3});
//   tilewise::Plan plan(problem, pattern, tilewise::Device::cuda);   // validates once, plans tables
//   plan.run({q, k, v, o, lse, text_len}, stream);                    // only launches (CUDA-graph safe)
//
// What is computed is defined in docs/semantics.md. Every invalid argument throws tilewise::Error naming
// the argument, the value and what was expected; nothing is written to outputs on error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "tilewise/geometry.hpp"
#include "tilewise/pattern.hpp"

namespace tilewise {

/// Error for any invalid argument: what() reads "invalid <argument> = <value>: expected <expected>".
class Error : public std::invalid_argument {
 public:
  Error(std::string argument, const std::string& value, const std::string& expected);
  const std::string& argument() const { return argument_; }

 private:
  std::string argument_;
};

enum class DType : int32_t { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };
/// cpu: the reference backend; cuda: the Hopper kernel; cuda_reference: a simple fp32 GPU kernel (no tensor
/// cores) used as the oracle for problems too large for the CPU.
enum class Device : int32_t { cpu = 0, cuda = 1, cuda_reference = 2 };
enum class Layout : int32_t { bshd = 0, bhsd = 1 };
/// The arithmetic of the forward (docs/semantics.md §11). native: in dtype, fp32 accumulation. fp8: q, k, v in
/// dtype, quantised by tilewise to e4m3 (Q per row, K smoothed per key block, P at a fixed scale, V per channel).
/// fp8_scaled: q, k, v are e4m3 (one byte per element) with the caller's scales (Tensors::q_scale, ...); dtype
/// is then the output's type only.
enum class Precision : int32_t { native = 0, fp8 = 1, fp8_scaled = 2 };

int64_t dtype_size(DType t);
const char* to_string(DType t);
const char* to_string(Precision p);
const char* to_string(PatternKind k);
const char* to_string(Device d);

/// Element strides of a [B, S, H, D] view. `dim` must be 1 (the last dimension is contiguous).
struct Strides {
  int64_t batch = 0, seq = 0, head = 0, dim = 1;
  static Strides contiguous(Layout layout, int64_t seq_len, int64_t heads, int64_t head_dim);
  friend bool operator==(const Strides&, const Strides&) = default;
};

/// The problem: shapes, data type, latent grid, tiles, text and storage. Zero strides mean contiguous
/// storage in `layout`.
struct Problem {
  int64_t batch = 1;
  int64_t q_heads = 1;
  int64_t kv_heads = 1;      // q_heads % kv_heads == 0 (GQA: query head h reads kv head h / (q_heads/kv_heads))
  int64_t head_dim = 128;
  DType dtype = DType::bf16;
  Dim3 latent{1, 1, 1};      // (T, H, W) video tokens
  Dim3 tile{6, 8, 8};        // (tt, th, tw)
  int64_t text_capacity = 0; // L_text
  TextPosition text_position = TextPosition::last;
  TokenOrder order = TokenOrder::raster;
  int64_t seq_len = 0;       // S of the tensors; 0 = derive as T*H*W + L_text, else must equal it
  Layout layout = Layout::bshd;
  Strides q{0, 0, 0, 1}, k{0, 0, 0, 1}, v{0, 0, 0, 1}, o{0, 0, 0, 1};
  double scale = 0.0;        // 0 = 1/sqrt(head_dim)
  int64_t head_offset = 0;   // global index of local head 0 (sequence parallelism): pattern tables are global
  Precision precision = Precision::native;  // fp8 / fp8_scaled: docs/semantics.md §11
  // An execution option; results are bitwise the same for any value. SMs the CUDA kernels leave free for work
  // beside them (NCCL's all-to-alls under sequence parallelism; FlashAttention-3's sm_margin): a persistent launch
  // (cuda: forward and backward) has max(1, SMs - sm_margin) CTAs, so a margin >= the device's SM count still
  // launches one. The cpu and cuda_reference backends (one CTA per work item, not persistent) ignore it.
  int64_t sm_margin = 0;

  int64_t video_tokens() const { return latent.volume(); }
  int64_t sequence_length() const { return latent.volume() + text_capacity; }
};

/// Which video keys each video query sees. `heads` holds one entry for all heads or one per global head.
struct Pattern {
  PatternKind kind = PatternKind::dense;
  std::vector<HeadParams> heads = std::vector<HeadParams>(1);
  // Explicit block list, CSR over (head, query tile): key tiles of query tile qt of head h are
  // block_tiles[block_offsets[h * num_tiles + qt] .. block_offsets[h * num_tiles + qt + 1]).
  // One head's table (broadcast) or one per global head, like `heads`.
  std::vector<int64_t> block_offsets;
  std::vector<int32_t> block_tiles;

  static Pattern dense();
  static Pattern sliding_tile(Dim3 window);
  static Pattern sliding_tile(const std::vector<Dim3>& windows_per_head);
  static Pattern attention_tile(int64_t global_frames, int64_t radius = 0);
  static Pattern attention_tile(const std::vector<HeadParams>& per_head);
  static Pattern block_list(std::vector<int64_t> offsets, std::vector<int32_t> tiles);
};

/// Tensors of one run. Pointers live on the plan's device. `text_len` ([B] int32, may be null = every text
/// position valid) lives on the plan's device too; `lse` ([B, Hq, S] float32) is optional. The scales are read
/// with Precision::fp8_scaled only (and must be null otherwise), float32, contiguous (docs/semantics.md §11.3):
/// q_scale [B, Hq, S], k_scale [B, Hkv, Plan::fp8_key_blocks()], v_scale [B, Hkv, D].
struct Tensors {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;
  const int32_t* text_len = nullptr;
  const float* q_scale = nullptr;
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
};

/// What Plan::quantize_fp8 writes: e4m3 q, k, v with the plan's q, k, v strides (in bytes), and their scales as
/// Tensors::q_scale, k_scale and v_scale read them: the inputs of a Precision::fp8_scaled run.
struct Fp8Tensors {
  void* q = nullptr;
  void* k = nullptr;
  void* v = nullptr;
  float* q_scale = nullptr;
  float* k_scale = nullptr;
  float* v_scale = nullptr;
};

/// Tensors of one backward run (docs/semantics.md, "Gradients"): the forward's inputs q, k, v, its outputs o and
/// lse (required: the forward's [B, Hq, S] float32 log-sum-exp), the upstream gradients dout (o's strides) and
/// dlse ([B, Hq, S] float32, null = zero), and the gradients written: dq with q's strides, dk and dv with k's and
/// v's. Every element of dq, dk and dv is written (dk = dv = 0 for keys no query sees, such as text padding).
struct GradTensors {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* o = nullptr;
  const float* lse = nullptr;
  const void* dout = nullptr;
  const float* dlse = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  const int32_t* text_len = nullptr;
};

class Backend;  // one per device kind, created by the plan (src/backends)

/// A validated problem + pattern with everything precomputed. `run` does no host planning, no allocation
/// and (for CUDA) no host synchronisation; it runs on the given stream (cudaStream_t, null = default).
class Plan {
 public:
  Plan(const Problem& problem, const Pattern& pattern, Device device = Device::cpu);
  ~Plan();
  Plan(Plan&&) noexcept;
  Plan& operator=(Plan&&) noexcept;

  /// Device scratch bytes run() uses (the scheduler's counter; 0 on the CPU). A CUDA plan of precision fp8 also
  /// keeps the quantised q and k, the scales and the V^T blocks there (q, k and v once more at a byte per
  /// element), and fp8_scaled the V^T blocks; such a plan allocates its own copy when it is made.
  size_t workspace_bytes() const;
  /// `workspace`: null = the plan's own scratch, so such runs of one plan must not overlap on two streams;
  /// give each stream its own workspace_bytes() buffer (on the device, 256-byte aligned) to run one plan on
  /// several streams at once.
  void run(const Tensors& tensors, void* stream = nullptr, void* workspace = nullptr) const;

  /// FP8 quantisation of q, k, v (in dtype, on the plan's device; text_len as for run) exactly as a
  /// Precision::fp8 run does it (docs/semantics.md §11.2), written to `out`. For plans whose q, k, v are in dtype
  /// (precision native or fp8). CPU and CUDA plans (a CUDA plan is a native one: the CUDA backends quantise, on
  /// `stream`, but have no FP8 attention yet).
  void quantize_fp8(const void* q, const void* k, const void* v, const int32_t* text_len, const Fp8Tensors& out,
                    void* stream = nullptr) const;
  /// K quantisation blocks per (batch, kv head): tiles + ceil(text capacity / 128) (the length of k_scale's last
  /// dimension).
  int64_t fp8_key_blocks() const;

  /// Device scratch bytes run_backward needs (fp32 dq accumulator, row statistics); 0 on the CPU.
  size_t backward_workspace_bytes() const;
  /// dq, dk, dv of the forward's output. Like run: no host planning, no allocation, no host synchronisation,
  /// CUDA-graph capturable. `workspace` (on the plan's device, 256-byte aligned, backward_workspace_bytes()
  /// long) is required when that size is non-zero; it may be reused between calls on one stream.
  /// `deterministic`: dq bitwise reproducible run to run (no floating-point atomics), at some speed cost.
  void run_backward(const GradTensors& tensors, void* stream = nullptr, void* workspace = nullptr,
                    bool deterministic = false) const;

  const Problem& problem() const { return problem_; }   // normalised: strides and scale filled in
  const Pattern& pattern() const { return pattern_; }   // normalised: one entry per global head
  Device device() const { return device_; }
  const TileGrid& grid() const { return map_.grid; }
  const TokenMap& token_map() const { return map_; }

  /// Pattern parameters of local head h (already offset by head_offset).
  const HeadParams& head(int64_t h) const;
  /// Key tiles of query tile `qt` of local head `h`, in ascending tile order. Boxes and block lists alike.
  std::vector<int32_t> key_tiles(int64_t h, int64_t qt) const;
  /// Query tiles whose key_tiles() contain key tile `kt` for local head h, in ascending tile order (the reverse
  /// question, for the backward; block lists read a table transposed once at plan time).
  std::vector<int32_t> query_tiles(int64_t h, int64_t kt) const;
  /// query_tiles(h, kt).size() without the list: a key tile's share of the backward's work (8 to 80 query tiles
  /// per key tile at window 3x3x3 on 5x6x10 tiles), which backends use to schedule the heaviest first.
  int64_t num_query_tiles(int64_t h, int64_t kt) const;
  /// Block lists only: query_tiles() as one CSR over (local head, key tile), for backends to upload.
  const std::vector<int64_t>& query_tile_offsets() const { return reverse_offsets_; }
  const std::vector<int32_t>& query_tile_list() const { return reverse_tiles_; }
  /// Whether the (query tile, key tile) block of local head h needs the token-level mask.
  BlockKind block_kind(int64_t h, Dim3 cq, Dim3 ck) const;
  /// Token level: may video query token q see video key token k under local head h.
  bool video_pair_allowed(int64_t h, Dim3 q, Dim3 k) const;

  /// Allowed (query, key) pairs summed over batch and heads; text_len (host, [B]) null = full capacity.
  int64_t allowed_pairs(const int32_t* text_len_host = nullptr) const;
  /// 4 * D * allowed_pairs: the FLOPs of QK^T and PV restricted to allowed pairs (effective TFLOP/s).
  double flops(const int32_t* text_len_host = nullptr) const;
  /// 2.5 * flops(): the backward's five GEMMs (S, dP, dV, dK, dQ) against the forward's two, the convention
  /// FlashAttention's benchmarks use for effective backward TFLOP/s.
  double backward_flops(const int32_t* text_len_host = nullptr) const { return 2.5 * flops(text_len_host); }
  /// Allowed video-video pairs over all video-video pairs (1 - sparsity), averaged over heads.
  double video_density() const;

 private:
  Problem problem_;
  Pattern pattern_;
  Device device_;
  TokenMap map_;
  // Block lists only: the table transposed (CSR over (local head, key tile) -> query tiles), for query_tiles().
  std::vector<int64_t> reverse_offsets_;
  std::vector<int32_t> reverse_tiles_;
  std::unique_ptr<Backend> backend_;
};

/// tiled <-> raster reordering of the video part of a [B, S, H, D] tensor (text part copied through).
/// Host pointers; elements of `dtype`; contiguous bshd storage.
void tile(const Problem& problem, const void* raster_in, void* tiled_out);
void untile(const Problem& problem, const void* tiled_in, void* raster_out);

/// Whether a usable CUDA device is present (false when built without CUDA).
bool cuda_available();

}  // namespace tilewise
