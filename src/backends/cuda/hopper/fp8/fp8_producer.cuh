// The FP8 forward's producer: the forward's Producer for Q and K (its TMA boxes, now of e4m3 rows), and a V loader
// that brings each key block's V^T (D rows of 128 keys, written by the pre-pass) with one TMA box instead of V's
// rows: FP8 wgmma reads both operands K-major, and the keys of P V are V's rows.
#pragma once

#include "backends/cuda/hopper/fp8/fp8_params.cuh"
#include "backends/cuda/hopper/mainloop_producer.cuh"

namespace tilewise::hopper {

template <class Traits>
struct Fp8Producer {
  static_assert(Traits::kCluster == 1, "the FP8 forward runs without clusters");
  const Fp8Params& p;
  const typename Traits::Shared& s;
  uint32_t rank;

  __device__ __forceinline__ Producer<Traits> base() const { return Producer<Traits>{p, s, 0}; }

  __device__ void run_keys() const { base().run_keys(); }

  __device__ void run_values() const {
    WorkRing<typename Traits::Shared, 1> ring{s, 0};
    auto next_unit = [&] { return ring.consume(); };
    base().template for_each_unit<Traits::kVStages>(
        next_unit, s.v_empty, s.v_sync, [](const WorkItem&, bool) {},
        [&](const Block& kb, const UnitWork& uw, int32_t, int stage, uint32_t parity, bool) {
          s.v_empty[stage].wait(parity);
          if (TILEWISE_HOPPER_ABLATE & 16) {  // measurement only (kernel_traits.cuh)
            s.v_full[stage].arrive();
            return;
          }
          s.v_full[stage].arrive_expect_tx(static_cast<uint32_t>(Traits::kTileBytes));
          const int32_t b = p.batch_base + uw.item.batch, g = uw.item.head / p.kv_group;
          const int32_t block = (b * p.kv_heads + g) * p.vt_entries + block_entry(p, kb, p.vt_slots);
          tma_load(s.v(stage), &p.vt_map, &s.v_full[stage], 0, 0, block, 0, 0);
        });
  }
};

}  // namespace tilewise::hopper
