// Consumer: each of the two consumer warpgroups owns 64 query rows of the work item. Per key block it runs
// S = Q K^T (wgmma, both operands in shared memory), masks only ragged or pattern-masked blocks, updates the
// online softmax in registers, and accumulates O += P V (wgmma, P from registers, V MN-major in shared memory).
#pragma once

#include <cfloat>

#include "backends/cuda/hopper/epilogue.cuh"
#include "backends/cuda/hopper/kernel_traits.cuh"
#include "backends/cuda/hopper/tile_scheduler.cuh"
#include "backends/cuda/hopper/wgmma_ops.cuh"

namespace tilewise::hopper {

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <class Traits, WgType kType>
struct Consumer {
  static constexpr int D = Traits::D;
  static constexpr int kSteps = kBlockN / 16;  // k16 steps of the P V product
  const FwdParams& p;
  const typename Traits::Shared& s;
  int wg;    // consumer warpgroup: query rows [64 * wg, 64 * wg + 64)
  int tid;   // thread within the warpgroup

  __device__ __forceinline__ int quad() const { return tid % 4; }
  /// Row (within the 128-row block) of this thread's accumulator rows r = 0 (and r = 1: +8).
  __device__ __forceinline__ int row(int r) const { return 64 * wg + 16 * (tid / 32) + (tid % 32) / 4 + 8 * r; }

  __device__ __forceinline__ uint64_t q_desc(int panel, int kk) const {
    return make_desc(smem_addr(s.q) + panel * Traits::kPanelBytes + 64 * wg * Traits::kRowBytes + kk * 32, 16,
                     8 * Traits::kRowBytes, Traits::kRowBytes);
  }
  __device__ __forceinline__ uint64_t k_desc(int stage, int panel, int kk) const {
    return make_desc(smem_addr(s.k(stage)) + panel * Traits::kPanelBytes + kk * 32, 16, 8 * Traits::kRowBytes,
                     Traits::kRowBytes);
  }
  // V is [keys x D] with D contiguous: an MN-major B operand. Leading offset = next panel of columns,
  // stride offset = next 8 key rows.
  __device__ __forceinline__ uint64_t v_desc(int stage, int step) const {
    return make_desc(smem_addr(s.v(stage)) + step * 16 * Traits::kRowBytes, Traits::kPanelBytes,
                     8 * Traits::kRowBytes, Traits::kRowBytes);
  }

  /// Key column c (0..127) of block kb: is it a real, allowed key for query row `qrow`?
  struct Mask {
    bool active = false;          // false: every column is a valid, allowed key
    bool text = false;
    int32_t text_valid = 0;       // text: columns < text_valid are valid
    D3 origin{}, limit{};       // video: key coordinate = origin + local(c); valid while < limit
    int32_t volume = 0;
    bool frames = false;          // attention tile block that mixes allowed and forbidden frame pairs
    int32_t g = 0, r = 0;
    int32_t qframe0 = 0, qframe1 = 0;

    __device__ __forceinline__ bool allowed(int c, int rr, const D3& box) const {
      if (text) return c < text_valid;
      if (c >= volume) return false;
      const int32_t hw = box.h * box.w;
      const int32_t kt = origin.t + c / hw, kh = origin.h + (c / box.w) % box.h, kw = origin.w + c % box.w;
      if (kt >= limit.t || kh >= limit.h || kw >= limit.w) return false;
      return !frames || frame_pair_allowed<int32_t>(rr == 0 ? qframe0 : qframe1, kt, g, r);
    }
  };

  __device__ __forceinline__ Mask make_mask(const WorkItem& item, const Block& kb, int32_t text_len) const {
    Mask m;
    if (kb.text) {
      m.text = true;
      m.text_valid = text_len - kb.row0;
      m.active = m.text_valid < kBlockN;
      return m;
    }
    m.origin = kb.origin(p);
    m.limit = p.map.grid.latent;
    m.volume = static_cast<int32_t>(p.box.volume());
    if (!item.q.text && p.kind == PatternKind::attention_tile) {
      const HeadParams& hp = p.heads[item.head];
      m.frames = block_kind<int32_t>(p.kind, hp, p.map.grid, item.q.tile, kb.tile) == BlockKind::masked;
      m.g = static_cast<int32_t>(hp.global_frames);
      m.r = static_cast<int32_t>(hp.radius);
      const D3 qo = item.q.origin(p);
      m.qframe0 = qo.t + row(0) / (p.box.h * p.box.w);
      m.qframe1 = qo.t + row(1) / (p.box.h * p.box.w);
    }
    m.active = m.frames || kb.ragged(p);
    return m;
  }

  __device__ void run() const {
    uint32_t kv_iter = 0, items = 0;
    for (int32_t w = blockIdx.x; w < p.num_work; w += gridDim.x) {
      const WorkItem item = decode_work(p, w);
      if (item.empty) continue;
      const int32_t text_len = text_len_of(p, item.batch);
      float o[D / 2];
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
      float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

      s.q_full->wait(items & 1);
      KeyBlockCursor cursor(p, item);
      Block kb;
      while (cursor.next(kb)) {
        const int stage = kv_iter % Traits::kStages;
        const uint32_t phase = (kv_iter / Traits::kStages) & 1;
        ++kv_iter;

        // S = Q K^T
        float sc[kBlockN / 2];
        s.k_full[stage].wait(phase);
        wgmma_fence();
#pragma unroll
        for (int panel = 0; panel < Traits::kPanels; ++panel)
#pragma unroll
          for (int kk = 0; kk < Traits::kPanelCols / 16; ++kk)
            Wgmma<kType, kBlockN>::template ss_impl<0>(sc, q_desc(panel, kk), k_desc(stage, panel, kk),
                                                        panel + kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(sc);
        s.k_empty[stage].arrive();

        // Mask where the block is ragged or pattern-masked; full blocks skip this entirely.
        const Mask mask = make_mask(item, kb, text_len);
        if (mask.active) {
#pragma unroll
          for (int i = 0; i < kBlockN / 2; ++i) {
            const int c = 8 * (i / 4) + 2 * quad() + (i % 2);
            if (!mask.allowed(c, (i % 4) / 2, p.box)) sc[i] = -INFINITY;
          }
        }

        // Online softmax (base 2). Each row's 128 scores live in the 4 threads of a quad.
        float corr[2];
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          float mx = -INFINITY;
#pragma unroll
          for (int i = 0; i < kBlockN / 2; ++i)
            if ((i % 4) / 2 == rr) mx = fmaxf(mx, sc[i]);
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
          const float m_new = fmaxf(m_run[rr], mx * p.scale_log2);
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          corr[rr] = fast_exp2(m_run[rr] - m_use);
          m_run[rr] = m_new;
          float sum = 0.f;
#pragma unroll
          for (int i = 0; i < kBlockN / 2; ++i)
            if ((i % 4) / 2 == rr) {
              sc[i] = fast_exp2(fmaf(sc[i], p.scale_log2, -m_use));
              sum += sc[i];
            }
          l_run[rr] = l_run[rr] * corr[rr] + sum;
        }
#pragma unroll
        for (int i = 0; i < D / 2; ++i) o[i] *= corr[(i % 4) / 2];

        // P as the A operand: k16 step j covers accumulator chunks 2j and 2j+1.
        uint32_t pa[kSteps][4];
#pragma unroll
        for (int j = 0; j < kSteps; ++j)
#pragma unroll
          for (int x = 0; x < 4; ++x)
            pa[j][x] = pack_half2(sc[8 * j + 2 * x], sc[8 * j + 2 * x + 1], kType == WgType::bf16);

        // O += P V
        s.v_full[stage].wait(phase);
        wgmma_fence();
#pragma unroll
        for (int j = 0; j < kSteps; ++j) WgmmaRS<kType, D>::template rs<1>(o, pa[j], v_desc(stage, j), 1);
        wgmma_commit();
        wgmma_wait<0>();
        fence_regs(o);
        s.v_empty[stage].arrive();
      }

      Epilogue<Traits, kType>{p, s, wg, tid}.store(item, o, m_run, l_run);
      ++items;
    }
    if (wg == 0 && tid == 0) tma_store_wait_all();  // the last output box must land before the CTA retires
  }
};

}  // namespace tilewise::hopper
