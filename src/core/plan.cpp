// Plan: validates a Problem + Pattern once, normalises them (strides, scale, per-head tables) and creates the
// backend. Also answers the tile-level questions (key tiles, block kinds) and counts allowed pairs / FLOPs.
#include <algorithm>
#include <cmath>

#include "core/backend.hpp"
#include "core/errors.hpp"
#include "tilewise/fp8.hpp"

namespace tilewise {

using detail::fail;
using detail::require;
using detail::str;

Error::Error(std::string argument, const std::string& value, const std::string& expected)
    : std::invalid_argument("invalid " + argument + " = " + value + ": expected " + expected),
      argument_(std::move(argument)) {}

int64_t dtype_size(DType t) {
  switch (t) {
    case DType::f32: return 4;
    case DType::f64: return 8;
    case DType::bf16:
    case DType::f16: return 2;
  }
  fail("dtype", str(static_cast<int>(t)), "one of f32, f64, bf16, f16");
}

const char* to_string(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::f64: return "f64";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
  }
  return "?";
}

const char* to_string(Precision p) {
  switch (p) {
    case Precision::native: return "native";
    case Precision::fp8: return "fp8";
    case Precision::fp8_scaled: return "fp8_scaled";
  }
  return "?";
}

const char* to_string(PatternKind k) {
  switch (k) {
    case PatternKind::dense: return "dense";
    case PatternKind::sliding_tile: return "sliding-tile";
    case PatternKind::attention_tile: return "attention-tile";
    case PatternKind::block_list: return "block-list";
  }
  return "?";
}

const char* to_string(Device d) {
  switch (d) {
    case Device::cpu: return "cpu";
    case Device::cuda: return "cuda";
    case Device::cuda_reference: return "cuda-reference";
  }
  return "?";
}

Strides Strides::contiguous(Layout layout, int64_t seq_len, int64_t heads, int64_t head_dim) {
  if (layout == Layout::bhsd) return {heads * seq_len * head_dim, head_dim, seq_len * head_dim, 1};
  return {seq_len * heads * head_dim, heads * head_dim, head_dim, 1};
}

Pattern Pattern::dense() { return Pattern{}; }

Pattern Pattern::sliding_tile(Dim3 window) { return sliding_tile(std::vector<Dim3>{window}); }

Pattern Pattern::sliding_tile(const std::vector<Dim3>& windows_per_head) {
  Pattern p;
  p.kind = PatternKind::sliding_tile;
  p.heads.clear();
  for (const Dim3& w : windows_per_head) p.heads.push_back(HeadParams{w, 0, 0});
  return p;
}

Pattern Pattern::attention_tile(int64_t global_frames, int64_t radius) {
  return attention_tile(std::vector<HeadParams>{HeadParams{{1, 1, 1}, global_frames, radius}});
}

Pattern Pattern::attention_tile(const std::vector<HeadParams>& per_head) {
  Pattern p;
  p.kind = PatternKind::attention_tile;
  p.heads = per_head;
  return p;
}

Pattern Pattern::block_list(std::vector<int64_t> offsets, std::vector<int32_t> tiles) {
  Pattern p;
  p.kind = PatternKind::block_list;
  p.block_offsets = std::move(offsets);
  p.block_tiles = std::move(tiles);
  return p;
}

namespace {

void validate_dim3(const std::string& name, const Dim3& d) {
  require(d.t >= 1 && d.h >= 1 && d.w >= 1, name, str(d), "three sizes >= 1 (TxHxW)");
}

void validate_strides(const std::string& name, const Strides& s) {
  require(s.dim == 1, name + ".dim", s.dim, "1 (the head dimension must be contiguous)");
  require(s.batch >= 0 && s.seq >= 0 && s.head >= 0, name,
          str(s.batch) + "," + str(s.seq) + "," + str(s.head), "non-negative element strides (batch, seq, head)");
}

/// Table size for per-head data: 1 (shared by all heads) or one entry per global head.
int64_t check_table_size(const std::string& name, int64_t size, const Problem& p) {
  const int64_t needed = p.head_offset + p.q_heads;
  const bool ok = size == 1 || (p.head_offset == 0 ? size == p.q_heads : size >= needed);
  require(ok, name, size,
          p.head_offset == 0 ? "1 (all heads) or q_heads = " + str(p.q_heads) + " entries"
                             : "1 or at least head_offset + q_heads = " + str(needed) + " entries");
  return size;
}

}  // namespace

Plan::Plan(const Problem& problem, const Pattern& pattern, Device device) : device_(device) {
  Problem p = problem;
  require(p.batch >= 1, "batch", p.batch, ">= 1");
  require(p.q_heads >= 1, "q_heads", p.q_heads, ">= 1");
  require(p.kv_heads >= 1, "kv_heads", p.kv_heads, ">= 1");
  require(p.q_heads % p.kv_heads == 0, "kv_heads", p.kv_heads,
          "a divisor of q_heads = " + str(p.q_heads) + " (grouped-query attention)");
  require(p.head_dim >= 1, "head_dim", p.head_dim, ">= 1");
  require(p.dtype == DType::f32 || p.dtype == DType::f64 || p.dtype == DType::bf16 || p.dtype == DType::f16,
          "dtype", static_cast<int>(p.dtype), "one of f32, f64, bf16, f16");
  validate_dim3("latent", p.latent);
  validate_dim3("tile", p.tile);
  require(p.text_capacity >= 0, "text_capacity", p.text_capacity, ">= 0");
  require(p.text_position == TextPosition::last || p.text_position == TextPosition::first, "text_position",
          static_cast<int>(p.text_position), "last or first");
  require(p.head_offset >= 0, "head_offset", p.head_offset, ">= 0");
  require(p.sm_margin >= 0, "sm_margin", p.sm_margin, ">= 0 (SMs the CUDA kernels leave free)");
  const TileGrid grid(p.latent, p.tile);
  require(p.order == TokenOrder::raster || (p.order == TokenOrder::tiled && grid.tiles_evenly()), "order",
          p.order == TokenOrder::tiled ? "tiled" : str(static_cast<int>(p.order)),
          p.order == TokenOrder::tiled
              ? "raster, since tiled order needs a latent " + str(p.latent) + " that is a multiple of the tile " +
                    str(p.tile)
              : "raster or tiled");
  const int64_t S = p.sequence_length();
  if (p.seq_len == 0) p.seq_len = S;
  require(p.seq_len == S, "seq_len", p.seq_len,
          "T*H*W + L_text = " + str(p.latent.volume()) + " + " + str(p.text_capacity) + " = " + str(S));
  require(p.layout == Layout::bshd || p.layout == Layout::bhsd, "layout", static_cast<int>(p.layout),
          "bshd or bhsd");
  const Strides qo_default = Strides::contiguous(p.layout, S, p.q_heads, p.head_dim);
  const Strides kv_default = Strides::contiguous(p.layout, S, p.kv_heads, p.head_dim);
  auto fill = [](Strides& s, const Strides& d) {
    if (s.batch == 0 && s.seq == 0 && s.head == 0) s = Strides{d.batch, d.seq, d.head, s.dim};
  };
  fill(p.q, qo_default);
  fill(p.o, qo_default);
  fill(p.k, kv_default);
  fill(p.v, kv_default);
  validate_strides("q_strides", p.q);
  validate_strides("k_strides", p.k);
  validate_strides("v_strides", p.v);
  validate_strides("o_strides", p.o);
  require(std::isfinite(p.scale), "scale", p.scale, "a finite number (0 = 1/sqrt(head_dim))");
  require(p.precision == Precision::native || p.precision == Precision::fp8 || p.precision == Precision::fp8_scaled,
          "precision", static_cast<int>(p.precision), "native, fp8 or fp8_scaled (0, 1, 2)");
  if (p.scale == 0.0) p.scale = 1.0 / std::sqrt(static_cast<double>(p.head_dim));

  // Pattern: normalise to one entry per local head.
  Pattern n;
  n.kind = pattern.kind;
  n.heads.clear();
  const int64_t num_tiles = grid.num_tiles();
  switch (pattern.kind) {
    case PatternKind::dense:
      n.heads.assign(p.q_heads, HeadParams{});
      break;
    case PatternKind::sliding_tile:
    case PatternKind::attention_tile: {
      const bool sta = pattern.kind == PatternKind::sliding_tile;
      const int64_t size =
          check_table_size(sta ? "windows (per-head window table length)" : "attention_tile heads (table length)",
                           static_cast<int64_t>(pattern.heads.size()), p);
      for (int64_t h = 0; h < p.q_heads; ++h) {
        const int64_t g = size == 1 ? 0 : p.head_offset + h;
        const HeadParams& hp = pattern.heads[g];
        if (sta) {
          require(hp.window.t >= 1 && hp.window.h >= 1 && hp.window.w >= 1, "window[" + str(g) + "]",
                  str(hp.window), "three window sizes >= 1 in tiles (kt x kh x kw)");
        } else {
          require(hp.global_frames >= 0, "global_frames[" + str(g) + "]", hp.global_frames, ">= 0");
          require(hp.radius >= 0, "radius[" + str(g) + "]", hp.radius, ">= 0");
        }
        // Beyond the grid means the whole axis / every frame: clamp so no index arithmetic can overflow
        // (the kernels compute in 32 bits).
        HeadParams c = hp;
        c.window = {imin<int64_t>(hp.window.t, grid.tiles.t), imin<int64_t>(hp.window.h, grid.tiles.h),
                    imin<int64_t>(hp.window.w, grid.tiles.w)};
        c.global_frames = imin<int64_t>(hp.global_frames, p.latent.t);
        c.radius = imin<int64_t>(hp.radius, p.latent.t);
        n.heads.push_back(c);
      }
      break;
    }
    case PatternKind::block_list: {
      const auto& off = pattern.block_offsets;
      const auto& tl = pattern.block_tiles;
      require(!off.empty() && (off.size() - 1) % num_tiles == 0, "block_offsets (length)", off.size(),
              "heads * num_tiles + 1 with num_tiles = " + str(num_tiles));
      const int64_t size = check_table_size("block_offsets (heads in table)",
                                            static_cast<int64_t>((off.size() - 1) / num_tiles), p);
      require(off.front() == 0 && off.back() == static_cast<int64_t>(tl.size()), "block_offsets",
              str(off.front()) + ".." + str(off.back()), "to start at 0 and end at block_tiles length " +
              str(tl.size()));
      n.heads.assign(p.q_heads, HeadParams{});
      n.block_offsets.push_back(0);
      for (int64_t h = 0; h < p.q_heads; ++h) {
        const int64_t g = size == 1 ? 0 : p.head_offset + h;
        for (int64_t qt = 0; qt < num_tiles; ++qt) {
          const int64_t a = off[g * num_tiles + qt], b = off[g * num_tiles + qt + 1];
          const std::string where = "block list of head " + str(g) + ", query tile " + str(qt);
          require(a <= b && a >= 0 && b <= static_cast<int64_t>(tl.size()), "block_offsets[" + str(g * num_tiles + qt) + "]",
                  str(a) + ".." + str(b), "non-decreasing offsets within block_tiles");
          require(b > a, where, "empty", "at least one key tile (every query needs an allowed key)");
          for (int64_t i = a; i < b; ++i) {
            require(tl[i] >= 0 && tl[i] < num_tiles, where, tl[i], "a key tile index in [0, " + str(num_tiles) + ")");
            require(i == a || tl[i] > tl[i - 1], where, tl[i], "key tiles in strictly ascending order");
            n.block_tiles.push_back(tl[i]);
          }
          n.block_offsets.push_back(static_cast<int64_t>(n.block_tiles.size()));
        }
      }
      break;
    }
    default:
      fail("pattern", str(static_cast<int>(pattern.kind)), "dense, sliding-tile, attention-tile or block-list");
  }

  problem_ = p;
  pattern_ = std::move(n);
  if (pattern_.kind == PatternKind::block_list) {
    // Transpose the table once: the backward asks which query tiles see a key tile.
    reverse_offsets_.assign(p.q_heads * num_tiles + 1, 0);
    for (int64_t h = 0; h < p.q_heads; ++h)
      for (int64_t i = pattern_.block_offsets[h * num_tiles]; i < pattern_.block_offsets[(h + 1) * num_tiles]; ++i)
        ++reverse_offsets_[h * num_tiles + pattern_.block_tiles[i] + 1];
    for (size_t i = 1; i < reverse_offsets_.size(); ++i) reverse_offsets_[i] += reverse_offsets_[i - 1];
    reverse_tiles_.resize(pattern_.block_tiles.size());
    std::vector<int64_t> fill(reverse_offsets_.begin(), reverse_offsets_.end() - 1);
    for (int64_t h = 0; h < p.q_heads; ++h)
      for (int64_t qt = 0; qt < num_tiles; ++qt)  // ascending qt, so every reverse list is sorted
        for (int64_t i = pattern_.block_offsets[h * num_tiles + qt]; i < pattern_.block_offsets[h * num_tiles + qt + 1];
             ++i)
          reverse_tiles_[fill[h * num_tiles + pattern_.block_tiles[i]]++] = static_cast<int32_t>(qt);
  }
  map_ = TokenMap{grid, SequenceLayout{p.latent.volume(), p.text_capacity, p.text_position}, p.order};
  require(device == Device::cpu || device == Device::cuda || device == Device::cuda_reference, "device",
          static_cast<int>(device), "cpu, cuda or cuda-reference");
  backend_ = device == Device::cpu    ? make_cpu_backend(*this)
             : device == Device::cuda ? make_cuda_backend(*this)
                                      : make_cuda_reference_backend(*this);
}

namespace {

/// Tensors::q_scale (which 0), k_scale (1) or v_scale (2) given where the plan's precision reads none, or missing
/// where it does.
[[noreturn]] void fail_scale(const Plan& plan, int which, const float* given) {
  const Problem& p = plan.problem();
  const std::string name = which == 0 ? "q_scale" : which == 1 ? "k_scale" : "v_scale";
  if (given != nullptr)
    fail(name, str(given), std::string("null: scales are read with precision fp8_scaled only, and this plan's is ") +
                               to_string(p.precision));
  const std::string shape = which == 0 ? "[B, Hq, S] = [" + str(p.batch) + ", " + str(p.q_heads) + ", " +
                                             str(p.seq_len) + "]"
                            : which == 1 ? "[B, Hkv, fp8_key_blocks] = [" + str(p.batch) + ", " + str(p.kv_heads) +
                                               ", " + str(plan.fp8_key_blocks()) + "]"
                                         : "[B, Hkv, D] = [" + str(p.batch) + ", " + str(p.kv_heads) + ", " +
                                               str(p.head_dim) + "]";
  fail(name, "null", "a float32 tensor " + shape + " of scales (precision fp8_scaled)");
}

}  // namespace

Plan::~Plan() = default;
Plan::Plan(Plan&&) noexcept = default;
Plan& Plan::operator=(Plan&&) noexcept = default;

size_t Plan::workspace_bytes() const { return backend_->workspace_bytes(*this); }

void Plan::run(const Tensors& t, void* stream, void* workspace) const {
  require(t.q != nullptr, "q", "null", "a tensor pointer");
  require(t.k != nullptr, "k", "null", "a tensor pointer");
  require(t.v != nullptr, "v", "null", "a tensor pointer");
  require(t.o != nullptr, "o", "null", "a tensor pointer");
  require(reinterpret_cast<uintptr_t>(workspace) % 256 == 0, "workspace", workspace, "a 256-byte aligned pointer");
  const float* scales[] = {t.q_scale, t.k_scale, t.v_scale};
  for (int i = 0; i < 3; ++i)  // given exactly with fp8_scaled (the message is only built on failure: run is hot)
    if ((scales[i] != nullptr) != (problem_.precision == Precision::fp8_scaled)) fail_scale(*this, i, scales[i]);
  backend_->run(*this, t, stream, workspace);
}

void Plan::quantize_fp8(const void* q, const void* k, const void* v, const int32_t* text_len, const Fp8Tensors& out,
                        void* stream) const {
  require(problem_.precision != Precision::fp8_scaled, "precision", to_string(problem_.precision),
          "native or fp8: quantize_fp8 reads q, k, v in dtype, and this plan's are e4m3 already");
  const std::pair<const void*, const char*> required[] = {{q, "q"},         {k, "k"},         {v, "v"},
                                                          {out.q, "out.q"}, {out.k, "out.k"}, {out.v, "out.v"},
                                                          {out.q_scale, "out.q_scale"}, {out.k_scale, "out.k_scale"},
                                                          {out.v_scale, "out.v_scale"}};
  for (const auto& [ptr, name] : required) require(ptr != nullptr, name, "null", "a tensor pointer");
  backend_->quantize_fp8(*this, Tensors{q, k, v, nullptr, nullptr, text_len}, out, stream);
}

int64_t Plan::fp8_key_blocks() const { return fp8::key_blocks(map_.grid, problem_.text_capacity); }

void Backend::quantize_fp8(const Plan& plan, const Tensors&, const Fp8Tensors&, void*) const {
  fail("device", to_string(plan.device()), std::string("cpu: quantize_fp8 is not supported by backend ") +
                                               to_string(plan.device()) + " yet");
}

size_t Plan::backward_workspace_bytes() const { return backend_->backward_workspace_bytes(*this); }

void Plan::run_backward(const GradTensors& t, void* stream, void* workspace, bool deterministic) const {
  const std::pair<const void*, const char*> required[] = {{t.q, "q"},   {t.k, "k"},   {t.v, "v"},
                                                          {t.o, "o"},   {t.lse, "lse"}, {t.dout, "dout"},
                                                          {t.dq, "dq"}, {t.dk, "dk"}, {t.dv, "dv"}};
  for (const auto& [ptr, name] : required)
    require(ptr != nullptr, name, "null", std::string("a tensor pointer") +
                                              (std::string(name) == "lse" ? " (the forward's log-sum-exp)" : ""));
  require(problem_.precision == Precision::native, "backward", std::string("precision ") + to_string(problem_.precision),
          "a plan with precision native (FP8 attention is forward only)");
  const size_t bytes = backward_workspace_bytes();
  require(bytes == 0 || workspace != nullptr, "workspace", "null",
          "a device buffer of backward_workspace_bytes() = " + str(bytes) + " bytes");
  require(reinterpret_cast<uintptr_t>(workspace) % 256 == 0, "workspace", workspace, "a 256-byte aligned pointer");
  backend_->run_backward(*this, t, stream, workspace, deterministic);
}

const HeadParams& Plan::head(int64_t h) const { return pattern_.heads.at(h); }

std::vector<int32_t> Plan::query_tiles(int64_t h, int64_t kt) const {
  const TileGrid& g = map_.grid;
  if (pattern_.kind == PatternKind::block_list) {
    const int64_t i = h * g.num_tiles() + kt;
    return {reverse_tiles_.begin() + reverse_offsets_[i], reverse_tiles_.begin() + reverse_offsets_[i + 1]};
  }
  const KeyBoxes b = query_boxes<int64_t>(pattern_.kind, head(h), g, g.tile_coord(kt));
  std::vector<int32_t> out;
  out.reserve(b.num_tiles());
  for (int64_t i = 0; i < b.num_tiles(); ++i) out.push_back(static_cast<int32_t>(g.tile_index(b.tile(i))));
  return out;
}

int64_t Plan::num_query_tiles(int64_t h, int64_t kt) const {
  const TileGrid& g = map_.grid;
  if (pattern_.kind == PatternKind::block_list) {
    const int64_t i = h * g.num_tiles() + kt;
    return reverse_offsets_[i + 1] - reverse_offsets_[i];
  }
  return query_boxes<int64_t>(pattern_.kind, head(h), g, g.tile_coord(kt)).num_tiles();
}

std::vector<int32_t> Plan::key_tiles(int64_t h, int64_t qt) const {
  std::vector<int32_t> out;
  const TileGrid& g = map_.grid;
  if (pattern_.kind == PatternKind::block_list) {
    const int64_t i = h * g.num_tiles() + qt;
    out.assign(pattern_.block_tiles.begin() + pattern_.block_offsets[i],
               pattern_.block_tiles.begin() + pattern_.block_offsets[i + 1]);
    return out;
  }
  const KeyBoxes b = key_boxes<int64_t>(pattern_.kind, head(h), g, g.tile_coord(qt));
  out.reserve(b.num_tiles());
  for (int64_t i = 0; i < b.num_tiles(); ++i) out.push_back(static_cast<int32_t>(g.tile_index(b.tile(i))));
  return out;
}

BlockKind Plan::block_kind(int64_t h, Dim3 cq, Dim3 ck) const {
  if (pattern_.kind == PatternKind::block_list) return BlockKind::full;
  return tilewise::block_kind<int64_t>(pattern_.kind, head(h), map_.grid, cq, ck);
}

bool Plan::video_pair_allowed(int64_t h, Dim3 q, Dim3 k) const {
  const TileGrid& g = map_.grid;
  if (pattern_.kind == PatternKind::block_list) {
    const int64_t i = h * g.num_tiles() + g.tile_index(g.tile_of(q));
    const auto first = pattern_.block_tiles.begin() + pattern_.block_offsets[i];
    const auto last = pattern_.block_tiles.begin() + pattern_.block_offsets[i + 1];
    return std::binary_search(first, last, static_cast<int32_t>(g.tile_index(g.tile_of(k))));
  }
  return tilewise::video_pair_allowed<int64_t>(pattern_.kind, head(h), g, q, k);
}

namespace {

/// Tokens along one axis covered by the tile range r (the last tile may be partial).
int64_t range_tokens(AxisRange r, int64_t tile, int64_t extent) {
  return r.size() == 0 ? 0 : imin<int64_t>(r.end * tile, extent) - r.begin * tile;
}

/// Allowed video-video pairs of one head.
int64_t video_pairs(const Plan& plan, int64_t h) {
  const TileGrid& g = plan.grid();
  const PatternKind kind = plan.pattern().kind;
  const HeadParams& hp = plan.head(h);
  if (kind == PatternKind::attention_tile) {
    // Frame level: per query frame, the allowed key frames; each frame holds H*W tokens.
    const int64_t T = g.latent.t, hw = g.latent.h * g.latent.w;
    int64_t frames = 0;
    for (int64_t fq = 0; fq < T; ++fq) {
      if (fq < hp.global_frames) {
        frames += T;
        continue;
      }
      const int64_t globals = imin<int64_t>(hp.global_frames, T);
      const int64_t lo = imax<int64_t>(fq - hp.radius, globals), hi = imin<int64_t>(fq + hp.radius, T - 1);
      frames += globals + imax<int64_t>(hi - lo + 1, 0);
    }
    return frames * hw * hw;
  }
  int64_t pairs = 0;
  for (int64_t qt = 0; qt < g.num_tiles(); ++qt) {
    const Dim3 cq = g.tile_coord(qt);
    int64_t keys = 0;
    if (kind == PatternKind::block_list) {
      for (int32_t kt : plan.key_tiles(h, qt)) keys += g.tile_tokens(g.tile_coord(kt));
    } else {
      const KeyBoxes b = key_boxes<int64_t>(kind, hp, g, cq);
      int64_t kt_tokens = 0;
      kt_tokens = range_tokens(b.t0, g.tile.t, g.latent.t) + (b.num_t == 2 ? range_tokens(b.t1, g.tile.t, g.latent.t) : 0);
      keys = kt_tokens * range_tokens(b.h, g.tile.h, g.latent.h) * range_tokens(b.w, g.tile.w, g.latent.w);
    }
    pairs += g.tile_tokens(cq) * keys;
  }
  return pairs;
}

}  // namespace

int64_t Plan::allowed_pairs(const int32_t* text_len_host) const {
  const Problem& p = problem_;
  int64_t vv = 0;
  for (int64_t h = 0; h < p.q_heads; ++h) vv += video_pairs(*this, h);
  const int64_t nv = p.latent.volume(), cap = p.text_capacity;
  int64_t total = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t L = text_len_host ? text_len_host[b] : cap;
    require(L >= 0 && L <= cap, "text_len[" + str(b) + "]", L, "a value in [0, text capacity = " + str(cap) + "]");
    // Video rows see their pattern plus L text keys; every text row (padding too) sees all video + L text keys.
    total += vv + p.q_heads * (nv * L + cap * (nv + L));
  }
  return total;
}

double Plan::flops(const int32_t* text_len_host) const {
  return 4.0 * static_cast<double>(problem_.head_dim) * static_cast<double>(allowed_pairs(text_len_host));
}

double Plan::video_density() const {
  const double nv = static_cast<double>(problem_.latent.volume());
  double sum = 0;
  for (int64_t h = 0; h < problem_.q_heads; ++h) sum += static_cast<double>(video_pairs(*this, h));
  return sum / (static_cast<double>(problem_.q_heads) * nv * nv);
}

}  // namespace tilewise
