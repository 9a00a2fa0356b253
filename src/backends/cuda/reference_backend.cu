// A simple GPU reference: fp32 CUDA-core arithmetic, no tensor cores, no TMA, no pipelining. One CTA per
// (batch, head, query tile) or per 128 text rows; the CTA stages 32 keys at a time in shared memory (every
// query of a tile has the same key tiles) and each thread keeps one query row's online softmax. It shares
// only the semantics core (key_boxes, block_kind, video_pair_allowed) with the fast kernel, so it is the
// oracle for problems too large for the CPU reference.
#include "backends/cuda/cuda_common.hpp"
#include "backends/cuda/fp8_quantize.hpp"
#include "backends/cuda/reference_backward.hpp"
#include "backends/cuda/reference_common.cuh"

namespace tilewise {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kChunk = 32;
constexpr int kMaxD = 256;

struct RefParams {
  const void *q, *k, *v;
  void* o;
  float* lse;
  Strides sq, sk, sv, so;
  TokenMapT<int64_t> map;
  int32_t q_heads, kv_group, D;
  int64_t text_capacity;
  const int32_t* text_len;
  PatternKind kind;
  const HeadParams* heads;
  const int64_t* block_offsets;
  const int32_t* block_tiles;
  float scale;
  int64_t seq_len;
  int64_t video_items, text_items;
};

/// One key tile (or the text part) of a query block's key list, visited in order by all threads.
template <class T>
__global__ void __launch_bounds__(kThreads) reference_kernel(RefParams p) {
  __shared__ float ks[kChunk][kMaxD + 1], vs[kChunk][kMaxD + 1];
  __shared__ int64_t kpos[kChunk];
  __shared__ Dim3 kcoord[kChunk];
  const int64_t items = p.video_items + p.text_items;
  const int64_t b = blockIdx.x / (p.q_heads * items);
  const int32_t h = (blockIdx.x / items) % p.q_heads;
  const int64_t item = blockIdx.x % items;
  const int32_t kvh = h / p.kv_group;
  const TileGrid& g = p.map.grid;
  const int64_t cap = p.text_capacity;
  const int64_t text_valid = p.text_len ? iclamp<int64_t>(p.text_len[b], 0, cap) : cap;
  const bool text_query = item >= p.video_items;
  const Dim3 cq = text_query ? Dim3{} : g.tile_coord(item);
  const int64_t rows = text_query ? imin<int64_t>(cap - (item - p.video_items) * kThreads, kThreads) : g.tile_tokens(cq);

  // Key tiles of this block: the whole grid for text queries, else the pattern's (boxes or block list).
  const TileList keys = text_query ? TileList::all(g)
                                   : TileList::of(p.kind, p.heads[h], g, p.block_offsets, p.block_tiles, h, cq, false);
  const int64_t num_key_tiles = keys.size();

  for (int64_t r0 = 0; r0 < rows; r0 += kThreads) {
    const int64_t r = r0 + threadIdx.x;
    const bool active = r < rows;
    int64_t qpos = 0;
    Dim3 qc{};
    if (active) {
      if (text_query) {
        qpos = p.map.seq.text_offset() + (item - p.video_items) * kThreads + r;
      } else {
        qc = token_in_tile(g, cq, r);
        qpos = p.map.video_position(qc);
      }
    }
    float q[kMaxD], acc[kMaxD];
    for (int d = 0; d < p.D; ++d) {
      q[d] = active ? to_f(static_cast<const T*>(p.q)[b * p.sq.batch + qpos * p.sq.seq + h * p.sq.head + d]) : 0.f;
      acc[d] = 0.f;
    }
    float m = -INFINITY, l = 0.f;

    // Visit the key tiles (then the text keys) in chunks of kChunk tokens staged in shared memory.
    auto consume = [&](int64_t count, bool masked) {
      __syncthreads();
      for (int64_t j = 0; j < count; ++j) {
        if (!active) break;
        if (masked && !video_pair_allowed<int64_t>(p.kind, p.heads[h], g, qc, kcoord[j])) continue;
        float s = 0.f;
        for (int d = 0; d < p.D; ++d) s += q[d] * ks[j][d];
        s *= p.scale;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new), e = expf(s - m_new);
        l = l * corr + e;
        for (int d = 0; d < p.D; ++d) acc[d] = acc[d] * corr + e * vs[j][d];
        m = m_new;
      }
      __syncthreads();
    };
    auto stage = [&](int64_t j, int64_t pos) {
      for (int d = 0; d < p.D; ++d) {
        ks[j][d] = to_f(static_cast<const T*>(p.k)[b * p.sk.batch + pos * p.sk.seq + kvh * p.sk.head + d]);
        vs[j][d] = to_f(static_cast<const T*>(p.v)[b * p.sv.batch + pos * p.sv.seq + kvh * p.sv.head + d]);
      }
    };
    for (int64_t i = 0; i < num_key_tiles; ++i) {
      const Dim3 ck = keys.tile(g, i);
      const bool masked = !text_query && block_kind<int64_t>(p.kind, p.heads[h], g, cq, ck) == BlockKind::masked;
      const int64_t n = g.tile_tokens(ck);
      for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
        const int64_t count = imin<int64_t>(kChunk, n - c0);
        if (threadIdx.x < count) {
          const int64_t x = c0 + threadIdx.x;
          const Dim3 kc = token_in_tile(g, ck, x);
          kcoord[threadIdx.x] = kc;
          kpos[threadIdx.x] = p.map.video_position(kc);
          stage(threadIdx.x, kpos[threadIdx.x]);
        }
        consume(count, masked);
      }
    }
    for (int64_t c0 = 0; c0 < text_valid; c0 += kChunk) {
      const int64_t count = imin<int64_t>(kChunk, text_valid - c0);
      if (threadIdx.x < count) stage(threadIdx.x, p.map.seq.text_offset() + c0 + threadIdx.x);
      consume(count, false);
    }
    if (active) {
      T* out = static_cast<T*>(p.o) + b * p.so.batch + qpos * p.so.seq + h * p.so.head;
      for (int d = 0; d < p.D; ++d) out[d] = from_f<T>(acc[d] / l);
      if (p.lse) p.lse[(b * p.q_heads + h) * p.seq_len + qpos] = m + logf(l);
    }
  }
}

class ReferenceBackend final : public Backend {
 public:
  explicit ReferenceBackend(const Plan& plan) : tables_(plan, Device::cuda_reference) {
    const Problem& p = plan.problem();
    detail::require(p.dtype == DType::bf16 || p.dtype == DType::f16, "dtype", to_string(p.dtype),
                    "bf16 or f16 on cuda-reference");
    detail::require(p.head_dim <= kMaxD, "head_dim", p.head_dim, "<= " + detail::str(kMaxD) + " on cuda-reference");
    require_native_precision(p, Device::cuda_reference);
  }

  size_t backward_workspace_bytes(const Plan& plan) const override { return reference_backward_workspace_bytes(plan); }

  void quantize_fp8(const Plan& plan, const Tensors& in, const Fp8Tensors& out, void* stream) const override {
    cuda::quantize_fp8(plan, in, out, static_cast<cudaStream_t>(stream));
  }

  /// Deterministic whatever the flag: the reference accumulates each gradient row in one thread.
  void run_backward(const Plan& plan, const GradTensors& t, void* stream, void* workspace, bool) const override {
    require_device_tensors(t, 2);
    launch_reference_backward(plan, tables_, t, static_cast<cudaStream_t>(stream), workspace);
  }

  void run(const Plan& plan, const Tensors& t, void* stream, void*) const override {
    const Problem& p = plan.problem();
    require_device_tensors(t, 2);
    RefParams r{t.q, t.k, t.v, t.o, t.lse, p.q, p.k, p.v, p.o, plan.token_map(),
                static_cast<int32_t>(p.q_heads), static_cast<int32_t>(p.q_heads / p.kv_heads),
                static_cast<int32_t>(p.head_dim), p.text_capacity, t.text_len, plan.pattern().kind,
                tables_.heads.get(), tables_.block_offsets.get(), tables_.block_tiles.get(),
                static_cast<float>(p.scale), p.seq_len, plan.grid().num_tiles(),
                ceil_div<int64_t>(p.text_capacity, kThreads)};
    const int64_t blocks = p.batch * p.q_heads * (r.video_items + r.text_items);
    auto s = static_cast<cudaStream_t>(stream);
    if (p.dtype == DType::bf16)
      reference_kernel<__nv_bfloat16><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(r);
    else
      reference_kernel<__half><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(r);
    check(cudaGetLastError(), "reference kernel launch");
  }

 private:
  PatternTables tables_;
};

}  // namespace
}  // namespace cuda

std::unique_ptr<Backend> make_cuda_reference_backend(const Plan& plan) {
  return std::make_unique<cuda::ReferenceBackend>(plan);
}

}  // namespace tilewise
