// One test problem described once and turned into (a) a tilewise::Problem + Pattern for the library and
// (b) an oracle::Problem for the independent oracle. Also random problem generators and seeding.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "oracle.hpp"
#include "tilewise/tilewise.hpp"

namespace oracle {

/// How q/k/v/o are stored: the two layouts, or a custom strided view (fused qkv buffer, padded output).
enum class StorageKind { bshd, bhsd, fused };

struct Case {
  int64_t batch = 1, q_heads = 1, kv_heads = 1, head_dim = 64;
  tilewise::DType dtype = tilewise::DType::f64;
  tilewise::Dim3 latent{5, 6, 7}, tile{2, 4, 3};
  int64_t text = 0;  // text capacity
  bool text_first = false, tiled = false;
  std::vector<int32_t> text_len;  // empty: run without text_len (every text position valid)
  StorageKind storage = StorageKind::bshd;
  Kind kind = Kind::dense;
  std::vector<HeadPattern> heads{HeadPattern{}};        // table: 1 entry or one per global head
  std::vector<std::vector<std::vector<int64_t>>> blocks;  // block list table: [table head][query tile]
  int64_t head_offset = 0;
  double scale = 0;

  int64_t seq_len() const { return latent.volume() + text; }
  int64_t tiles(int axis) const { return (latent[axis] + tile[axis] - 1) / tile[axis]; }
  int64_t num_tiles() const { return tiles(0) * tiles(1) * tiles(2); }
};

/// Where q, k, v live in one input buffer and o in one output buffer, with element strides.
struct Views {
  Strides3 q, k, v, o;
  int64_t k_offset = 0, v_offset = 0, in_size = 0, out_size = 0;
};

inline int64_t view_size(const Case& c, const Strides3& s, int64_t heads) {
  return (c.batch - 1) * s.batch + (c.seq_len() - 1) * s.seq + (heads - 1) * s.head + c.head_dim;
}

inline Views make_views(const Case& c) {
  const int64_t S = c.seq_len(), Hq = c.q_heads, Hkv = c.kv_heads, D = c.head_dim;
  Views v;
  switch (c.storage) {
    case StorageKind::bshd:
      v.q = v.o = {S * Hq * D, Hq * D, D};
      v.k = v.v = {S * Hkv * D, Hkv * D, D};
      break;
    case StorageKind::bhsd:
      v.q = v.o = {Hq * S * D, D, S * D};
      v.k = v.v = {Hkv * S * D, D, S * D};
      break;
    case StorageKind::fused: {  // [B, S, Hq + 2 Hkv, D] rows padded by 8, batches by 16; o padded too
      const int64_t row = (Hq + 2 * Hkv) * D + 8;
      v.q = v.k = v.v = {S * row + 16, row, D};
      v.o = {S * (Hq * D + 8) + 24, Hq * D + 8, D};
      v.k_offset = Hq * D;
      v.v_offset = (Hq + Hkv) * D;
      v.in_size = view_size(c, v.q, Hq + 2 * Hkv);
      v.out_size = view_size(c, v.o, Hq);
      return v;
    }
  }
  v.k_offset = view_size(c, v.q, Hq);
  v.v_offset = v.k_offset + view_size(c, v.k, Hkv);
  v.in_size = v.v_offset + view_size(c, v.v, Hkv);
  v.out_size = view_size(c, v.o, Hq);
  return v;
}

inline Storage storage_of(tilewise::DType t) {
  switch (t) {
    case tilewise::DType::f64: return Storage::f64;
    case tilewise::DType::f32: return Storage::f32;
    case tilewise::DType::bf16: return Storage::bf16;
    case tilewise::DType::f16: return Storage::f16;
  }
  return Storage::f64;
}

inline tilewise::Problem to_problem(const Case& c) {
  tilewise::Problem p;
  p.batch = c.batch;
  p.q_heads = c.q_heads;
  p.kv_heads = c.kv_heads;
  p.head_dim = c.head_dim;
  p.dtype = c.dtype;
  p.latent = c.latent;
  p.tile = c.tile;
  p.text_capacity = c.text;
  p.text_position = c.text_first ? tilewise::TextPosition::first : tilewise::TextPosition::last;
  p.order = c.tiled ? tilewise::TokenOrder::tiled : tilewise::TokenOrder::raster;
  p.head_offset = c.head_offset;
  p.scale = c.scale;
  if (c.storage == StorageKind::bhsd) p.layout = tilewise::Layout::bhsd;
  if (c.storage == StorageKind::fused) {  // explicit strides; bshd/bhsd leave them 0 (= contiguous layout)
    const Views v = make_views(c);
    auto st = [](const Strides3& s) { return tilewise::Strides{s.batch, s.seq, s.head, 1}; };
    p.q = st(v.q), p.k = st(v.k), p.v = st(v.v), p.o = st(v.o);
  }
  return p;
}

inline tilewise::Pattern to_pattern(const Case& c) {
  switch (c.kind) {
    case Kind::dense: return tilewise::Pattern::dense();
    case Kind::sliding_tile: {
      std::vector<tilewise::Dim3> w;
      for (const HeadPattern& h : c.heads) w.push_back({h.kt, h.kh, h.kw});
      return tilewise::Pattern::sliding_tile(w);
    }
    case Kind::attention_tile: {
      std::vector<tilewise::HeadParams> hp;
      for (const HeadPattern& h : c.heads) hp.push_back({{1, 1, 1}, h.global_frames, h.radius});
      return tilewise::Pattern::attention_tile(hp);
    }
    case Kind::block_list: {
      std::vector<int64_t> offsets{0};
      std::vector<int32_t> tiles;
      for (const auto& head : c.blocks)
        for (const auto& keys : head) {
          for (int64_t t : keys) tiles.push_back(static_cast<int32_t>(t));
          offsets.push_back(static_cast<int64_t>(tiles.size()));
        }
      return tilewise::Pattern::block_list(offsets, tiles);
    }
  }
  return {};
}

inline Problem to_oracle(const Case& c) {
  const Views v = make_views(c);
  Problem p;
  p.B = c.batch, p.Hq = c.q_heads, p.Hkv = c.kv_heads, p.D = c.head_dim;
  p.T = c.latent.t, p.H = c.latent.h, p.W = c.latent.w;
  p.tt = c.tile.t, p.th = c.tile.h, p.tw = c.tile.w;
  p.text_capacity = c.text;
  p.text_first = c.text_first;
  p.tiled_order = c.tiled;
  p.text_len.assign(c.text_len.begin(), c.text_len.end());
  p.scale = c.scale;
  p.kind = c.kind;
  for (int64_t h = 0; h < c.q_heads; ++h) {  // a table of one entry is shared; else indexed by global head
    if (c.kind == Kind::sliding_tile || c.kind == Kind::attention_tile)
      p.heads.push_back(c.heads.size() == 1 ? c.heads[0] : c.heads.at(c.head_offset + h));
    if (c.kind == Kind::block_list) p.blocks.push_back(c.blocks.size() == 1 ? c.blocks[0] : c.blocks.at(c.head_offset + h));
  }
  p.q = v.q, p.k = v.k, p.v = v.v, p.o = v.o;
  return p;
}

inline std::string describe(const Case& c) {
  static const char* kinds[] = {"dense", "sliding_tile", "attention_tile", "block_list"};
  static const char* storages[] = {"bshd", "bhsd", "fused-qkv"};
  std::ostringstream s;
  s << "B" << c.batch << " Hq" << c.q_heads << "/Hkv" << c.kv_heads << " D" << c.head_dim << " "
    << tilewise::to_string(c.dtype) << " latent " << c.latent.t << "x" << c.latent.h << "x" << c.latent.w
    << " tile " << c.tile.t << "x" << c.tile.h << "x" << c.tile.w << " text " << c.text
    << (c.text_first ? " first" : " last") << " len{";
  for (int32_t l : c.text_len) s << l << ",";
  s << "} " << storages[static_cast<int>(c.storage)] << (c.tiled ? " tiled" : " raster") << " "
    << kinds[static_cast<int>(c.kind)] << " heads[";
  for (const HeadPattern& h : c.heads) {
    if (c.kind == Kind::attention_tile)
      s << "g" << h.global_frames << "r" << h.radius << ",";
    else
      s << h.kt << "x" << h.kh << "x" << h.kw << ",";
  }
  s << "] head_offset " << c.head_offset << " scale " << c.scale;
  return s.str();
}

// ---- randomness -------------------------------------------------------------------------------------------

/// A fresh seed from std::random_device, or TILEWISE_TEST_SEED to replay a failure.
inline uint64_t fresh_seed() {
  if (const char* env = std::getenv("TILEWISE_TEST_SEED")) return std::strtoull(env, nullptr, 10);
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}
inline std::string seed_note(uint64_t seed) {
  return "seed " + std::to_string(seed) + " (replay with TILEWISE_TEST_SEED=" + std::to_string(seed) + ")";
}

using Rng = std::mt19937_64;
inline int64_t uniform(Rng& rng, int64_t lo, int64_t hi) {
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

/// Random non-empty ascending key tile sets for `table_heads` heads.
inline std::vector<std::vector<std::vector<int64_t>>> random_blocks(Rng& rng, int64_t table_heads, int64_t num_tiles) {
  std::vector<std::vector<std::vector<int64_t>>> blocks(table_heads, std::vector<std::vector<int64_t>>(num_tiles));
  for (auto& head : blocks)
    for (auto& keys : head) {
      for (int64_t t = 0; t < num_tiles; ++t)
        if (uniform(rng, 0, 2) == 0) keys.push_back(t);
      if (keys.empty()) keys.push_back(uniform(rng, 0, num_tiles - 1));
    }
  return blocks;
}

/// A random small problem of the given pattern kind: partial tiles, any windows (odd, even, larger than
/// the grid), text first or last with per-batch lengths, GQA, the three storage kinds, per-head tables.
inline Case random_case(Rng& rng, Kind kind, tilewise::DType dtype) {
  Case c;
  c.kind = kind;
  c.dtype = dtype;
  c.latent = {uniform(rng, 1, 6), uniform(rng, 1, 6), uniform(rng, 1, 6)};
  c.tile = {uniform(rng, 1, 4), uniform(rng, 1, 4), uniform(rng, 1, 4)};
  static constexpr int64_t head_sets[][2] = {{1, 1}, {2, 1}, {2, 2}, {4, 2}, {4, 1}};
  const auto& hs = head_sets[uniform(rng, 0, 4)];
  c.q_heads = hs[0], c.kv_heads = hs[1];
  c.batch = uniform(rng, 1, 3);
  c.head_dim = std::array<int64_t, 3>{64, 96, 128}[uniform(rng, 0, 2)];
  c.text = uniform(rng, 0, 8);
  c.text_first = uniform(rng, 0, 1);
  if (uniform(rng, 0, 2) > 0)
    for (int64_t b = 0; b < c.batch; ++b) {
      const int64_t pick = uniform(rng, 0, 2);
      c.text_len.push_back(static_cast<int32_t>(pick == 0 ? 0 : pick == 1 ? c.text : uniform(rng, 0, c.text)));
    }
  c.storage = static_cast<StorageKind>(uniform(rng, 0, 2));
  const int64_t table = uniform(rng, 0, 1) ? 1 : c.q_heads;
  c.heads.clear();
  for (int64_t i = 0; i < table; ++i) {
    HeadPattern h;
    h.kt = uniform(rng, 1, c.tiles(0) + 1);
    h.kh = uniform(rng, 1, c.tiles(1) + 1);
    h.kw = uniform(rng, 1, c.tiles(2) + 1);
    h.global_frames = uniform(rng, 0, c.latent.t + 1);
    h.radius = uniform(rng, 0, 2);
    c.heads.push_back(h);
  }
  if (kind == Kind::block_list) c.blocks = random_blocks(rng, table, c.num_tiles());
  return c;
}

}  // namespace oracle
