// Producer: two threads of the producer warpgroup walk the work items and their key blocks and issue TMA loads of
// Q and K (one thread) and V (the other) straight from the user's tensors into the shared-memory pipeline.
#pragma once

#include "backends/cuda/hopper/kernel_traits.cuh"
#include "backends/cuda/hopper/tile_scheduler.cuh"

namespace tilewise::hopper {

template <class Traits>
struct Producer {
  const FwdParams& p;
  const typename Traits::Shared& s;

  /// Loads one block (all panels) of a tensor into `dst`, completing on `bar`. `video` holds a map per class.
  __device__ __forceinline__ void load(const CUtensorMap* video, const CUtensorMap* text, const TensorView& view,
                                       const Block& b, int batch, int head, uint8_t* dst, Barrier* bar) const {
    const int rows = b.text ? kBlockN : static_cast<int>(b.box(p).volume());
    bar->arrive_expect_tx(static_cast<uint32_t>(rows * Traits::D * 2));
    const int c4 = view.c4(batch, head);
    const D3 o = b.tma_origin(p);
#pragma unroll
    for (int panel = 0; panel < Traits::kPanels; ++panel) {
      const int c0 = view.c0(head, panel * Traits::kPanelCols);
      uint8_t* d = dst + panel * Traits::kPanelBytes;
      if (b.text)
        tma_load(d, text, bar, c0, b.row0, 0, 0, c4);
      else
        tma_load(d, video + b.cls, bar, c0, static_cast<int>(o.w), static_cast<int>(o.h), static_cast<int>(o.t), c4);
    }
  }

  /// Zeroes V rows [volume, volume + tail) of a stage, which a larger box loaded earlier may have filled: P is
  /// zero there, but 0 * NaN would not be. Generic stores, so the proxy fence orders them before the wgmma reads.
  __device__ __forceinline__ void zero_tail(const Block& b, uint8_t* dst) const {
    const TileClass& c = p.cls[b.cls];
    if (b.text || c.tail == 0) return;
    const int first = c.box.volume() * Traits::kRowBytes / 16, count = c.tail * Traits::kRowBytes / 16;
    for (int panel = 0; panel < Traits::kPanels; ++panel) {
      uint4* words = reinterpret_cast<uint4*>(dst + panel * Traits::kPanelBytes) + first;
      for (int i = 0; i < count; ++i) words[i] = make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async();
  }

  /// Calls f(block, stage, parity of the stage's empty barrier to wait for, last) for each key block of `item`, in
  /// pipeline order. Both loaders walk through here, so they always agree on which block each stage holds.
  template <class F>
  __device__ __forceinline__ void for_each_key_block(const WorkItem& item, int32_t text_len, uint32_t& kv_iter,
                                                     F&& f) const {
    KeyBlockCursor cursor(p, item, text_len);
    // Every work item has at least one key block (the plan guarantees an allowed key).
    for (Block kb; cursor.next(kb); ++kv_iter)
      f(kb, static_cast<int>(kv_iter % Traits::kStages), ((kv_iter / Traits::kStages) & 1) ^ 1, cursor.done());
  }

  /// The Q and K loader (warp 0 of the producer warpgroup): takes work items from the scheduler, loads each
  /// item's Q and its key blocks' K, and describes each block to the consumers (BlockInfo).
  __device__ void run_keys() const {
    uint32_t kv_iter = 0, items = 0;
    WorkRing<typename Traits::Shared> ring{s};
    for (int32_t w; (w = ring.produce(p.work_counter, p.num_work)) < p.num_work;) {
      const WorkItem item = decode_work(p, w);
      if (item.empty) continue;
      // The previous item's last S GEMM must have read Q; its remaining blocks and output store still run.
      s.q_empty->wait((items & 1) ^ 1);
      load(p.q_video, &p.q_text, p.q, item.q, item.batch, item.head, s.q, s.q_full);
      ++items;
      const int kv_head = item.head / p.kv_group;
      const int32_t text_len = text_len_of(p, item.batch);
      for_each_key_block(item, text_len, kv_iter, [&](const Block& kb, int stage, uint32_t parity, bool last) {
        s.k_empty[stage].wait(parity);
        // The consumers read the record after k_full completes; the arrive below releases this store.
        s.info[stage] = describe(p, item, kb, text_len, last);
        load(p.k_video, &p.k_text, p.k, kb, item.batch, kv_head, s.k(stage), &s.k_full[stage]);
      });
    }
  }

  /// The V loader (warp 1): walks the same items (read from the scheduler's ring, like a consumer) and blocks,
  /// so a V stage that is released late never holds back the next K load.
  __device__ void run_values() const {
    uint32_t kv_iter = 0;
    WorkRing<typename Traits::Shared> ring{s};
    for (int32_t w; (w = ring.consume()) < p.num_work;) {
      const WorkItem item = decode_work(p, w);
      if (item.empty) continue;
      const int kv_head = item.head / p.kv_group;
      for_each_key_block(item, text_len_of(p, item.batch), kv_iter,
                         [&](const Block& kb, int stage, uint32_t parity, bool) {
                           s.v_empty[stage].wait(parity);
                           zero_tail(kb, s.v(stage));
                           load(p.v_video, &p.v_text, p.v, kb, item.batch, kv_head, s.v(stage), &s.v_full[stage]);
                         });
    }
  }
};

}  // namespace tilewise::hopper
