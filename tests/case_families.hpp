// The families of small odd problems that both CPU test files check: test_cpu_reference.cpp runs each case
// through the forward against oracle.hpp, test_cpu_backward.cpp through the backward against
// backward_oracle.hpp. A family is built here once so that the two files cannot drift apart; what they need
// differently is a parameter (mostly the latent: the backward oracle is slower, so its file passes smaller
// grids). Where the two files used to differ only slightly, a family holds the union of their cases.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "oracle_case.hpp"

namespace oracle {

inline constexpr tilewise::DType kAllDtypes[] = {tilewise::DType::f64, tilewise::DType::f32,
                                                 tilewise::DType::bf16, tilewise::DType::f16};

inline HeadPattern window(int64_t kt, int64_t kh, int64_t kw) { return {kt, kh, kw, 0, 0}; }
inline HeadPattern frames(int64_t g, int64_t r) { return {1, 1, 1, g, r}; }

/// Sliding tile with one window for all heads or one per (global) head.
inline Case sta(std::vector<HeadPattern> windows, tilewise::Dim3 latent, tilewise::Dim3 tile = {2, 4, 3}) {
  Case c;
  c.kind = Kind::sliding_tile;
  c.heads = std::move(windows);
  c.latent = latent;
  c.tile = tile;
  return c;
}

/// Calls check(case, rep) on `reps` random problems (random_case) of every pattern kind and data type. Each
/// problem is drawn just before its check, so a seed draws the same problems as when the files had this loop.
template <class Check>
void for_each_random_case(Rng& rng, int reps, Check check) {
  for (Kind kind : {Kind::sliding_tile, Kind::attention_tile, Kind::dense, Kind::block_list})
    for (tilewise::DType dtype : kAllDtypes)
      for (int rep = 0; rep < reps; ++rep) check(random_case(rng, kind, dtype), rep);
}

/// Latent 5x6x7 in 2x4x3 tiles (grid 3x2x3, a partial last tile on every axis) with odd and even windows.
inline std::vector<Case> partial_tile_cases() {
  std::vector<Case> cases;
  for (HeadPattern w : {window(1, 1, 1), window(3, 1, 3), window(2, 2, 2), window(2, 1, 3), window(3, 2, 1)}) {
    Case c = sta({w}, {5, 6, 7});
    c.text = 5;
    c.text_len = {3};
    cases.push_back(c);
  }
  return cases;
}

/// Windows of more tiles than the grid has on an axis (they mean the whole axis).
inline std::vector<Case> window_larger_than_grid_cases(tilewise::Dim3 latent) {
  std::vector<Case> cases;
  for (HeadPattern w : {window(9, 9, 9), window(4, 3, 4), window(9, 1, 2)}) cases.push_back(sta({w}, latent));
  return cases;
}

/// Text first and last, 4 batches: per-batch lengths (none, full, partial), no text_len (every text position
/// valid; the only cases here with an empty text_len, which the backward also runs without dLSE), and dense
/// with other lengths.
inline std::vector<Case> text_first_last_cases(tilewise::Dim3 latent, tilewise::Dim3 tile) {
  std::vector<Case> cases;
  for (bool first : {false, true}) {
    Case c = sta({window(3, 1, 2)}, latent, tile);
    c.batch = 4;
    c.text = 6;
    c.text_first = first;
    c.text_len = {0, 6, 3, 1};
    cases.push_back(c);
    c.text_len.clear();
    cases.push_back(c);
    c.kind = Kind::dense;
    c.text_len = {6, 0, 2, 5};
    cases.push_back(c);
  }
  return cases;
}

/// Four heads with their own windows over two KV heads, then one KV head (f64 and bf16).
inline std::vector<Case> gqa_per_head_window_cases(tilewise::Dim3 latent) {
  Case c = sta({window(1, 1, 1), window(3, 2, 3), window(2, 1, 2), window(9, 9, 9)}, latent);
  c.q_heads = 4;
  c.kv_heads = 2;
  c.batch = 2;
  c.text = 4;
  c.text_len = {2, 4};
  std::vector<Case> cases{c};
  c.kv_heads = 1;
  cases.push_back(c);
  c.dtype = tilewise::DType::bf16;
  cases.push_back(c);
  return cases;
}

/// Head dims 64, 96 and 128 in f64 and bf16.
inline std::vector<Case> head_dim_cases(tilewise::Dim3 latent) {
  std::vector<Case> cases;
  for (int64_t d : {64, 96, 128})
    for (tilewise::DType dtype : {tilewise::DType::f64, tilewise::DType::bf16}) {
      Case c = sta({window(3, 1, 2)}, latent);
      c.head_dim = d;
      c.dtype = dtype;
      c.q_heads = 2;
      c.text = 3;
      cases.push_back(c);
    }
  return cases;
}

/// bshd, bhsd and a fused strided view, every dtype, GQA with per-head windows and per-batch text lengths.
inline std::vector<Case> storage_cases(tilewise::Dim3 latent) {
  std::vector<Case> cases;
  for (StorageKind s : {StorageKind::bshd, StorageKind::bhsd, StorageKind::fused})
    for (tilewise::DType dtype : kAllDtypes) {
      Case c = sta({window(3, 1, 2), window(2, 2, 1)}, latent);
      c.storage = s;
      c.dtype = dtype;
      c.batch = 2;
      c.q_heads = 2;
      c.kv_heads = 1;
      c.text = 4;
      c.text_first = dtype == tilewise::DType::f32;
      c.text_len = {1, 4};
      cases.push_back(c);
    }
  return cases;
}

/// Attention tile over global frames g, radius r and frame tiles tt (tt = 2 makes blocks partially masked;
/// those run in f64, for a tight check, and in bf16); then per-head parameters with GQA and an odd frame
/// count, without text and with it. `text_len` applies to the single-head cases (the backward passes one
/// with a padding slot, so that padding keys are checked too).
inline std::vector<Case> attention_tile_cases(const std::vector<int32_t>& text_len) {
  std::vector<Case> cases;
  for (int64_t g : {0, 1, 2})
    for (int64_t r : {0, 1})
      for (int64_t tt : {1, 2})
        for (tilewise::DType dtype : {tilewise::DType::f64, tilewise::DType::bf16}) {
          if (tt == 1 && dtype != tilewise::DType::f64) continue;
          Case c;
          c.kind = Kind::attention_tile;
          c.heads = {frames(g, r)};
          c.latent = {6, 3, 5};
          c.tile = {tt, 2, 3};
          c.text = 3;
          c.text_first = g == 1;
          c.text_len = text_len;
          c.dtype = dtype;
          cases.push_back(c);
        }
  Case c;
  c.kind = Kind::attention_tile;
  c.heads = {frames(0, 0), frames(1, 1), frames(2, 0), frames(0, 2)};
  c.q_heads = 4;
  c.kv_heads = 2;
  c.latent = {7, 2, 3};
  c.tile = {2, 2, 2};
  for (int64_t text : {0, 2}) {
    c.text = text;
    cases.push_back(c);
  }
  return cases;
}

/// Dense, then random block lists (on Case's default 5x6x7 grid): one table shared by both heads, then one
/// table per head in every dtype but f32.
inline std::vector<Case> dense_and_block_list_cases(Rng& rng, const std::vector<int32_t>& text_len) {
  Case c;
  c.q_heads = 2;
  c.text = 3;
  c.text_len = text_len;
  std::vector<Case> cases{c};
  c.kind = Kind::block_list;
  c.blocks = random_blocks(rng, 1, c.num_tiles());
  cases.push_back(c);
  c.blocks = random_blocks(rng, 2, c.num_tiles());
  for (tilewise::DType dtype : {tilewise::DType::f64, tilewise::DType::bf16, tilewise::DType::f16}) {
    c.dtype = dtype;
    cases.push_back(c);
  }
  return cases;
}

/// Two local heads that are global heads 2 and 3 of a four-entry table: sliding tile, then block list.
inline std::vector<Case> head_offset_cases(Rng& rng, tilewise::Dim3 latent) {
  Case c = sta({window(1, 1, 1), window(1, 1, 1), window(3, 2, 1), window(1, 2, 3)}, latent);
  c.q_heads = 2;
  c.head_offset = 2;
  std::vector<Case> cases{c};
  c.kind = Kind::block_list;
  c.blocks = random_blocks(rng, 4, c.num_tiles());
  cases.push_back(c);
  return cases;
}

/// A custom softmax scale in raster order, then in tiled order with per-head windows and a text length.
inline std::vector<Case> custom_scale_cases(tilewise::Dim3 latent) {
  Case c = sta({window(2, 1, 2)}, latent);
  c.scale = 0.37;
  c.text = 2;
  std::vector<Case> cases{c};
  c = sta({window(3, 1, 2), window(2, 2, 2)}, {4, 4, 6}, {2, 2, 3});
  c.tiled = true;
  c.q_heads = 2;
  c.text = 3;
  c.text_len = {2};
  c.scale = 0.37;
  cases.push_back(c);
  return cases;
}

}  // namespace oracle
