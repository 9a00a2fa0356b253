// The GPU reference backward: fp32 CUDA-core arithmetic, one thread per gradient row, no tensor cores, no
// atomics. Three kernels, straight from the spec's formulas (docs/semantics.md, "Gradients"):
//  1. row_statistic: D_i = dO_i . o_i - dLSE_i;
//  2. dq per (batch, head, query tile or 128 text rows): the forward's key tiles (key_boxes / block list) and the
//     valid text keys, with P_ij = exp(scale q_i.k_j - lse_i) recomputed and dq_i = scale sum_j P_ij (dP_ij - D_i) k_j;
//  3. dk, dv per (batch, kv head, key tile or 128 text keys): for each query head of the GQA group, the query tiles
//     that see the key tile (query_boxes / the transposed block list: the reverse question) and every text row.
// Like the reference forward it shares only the semantics core with the fast kernels: their oracle at sizes the
// CPU reference cannot reach.
#include "backends/cuda/reference_backward.hpp"
#include "backends/cuda/reference_common.cuh"

namespace tilewise::cuda {
namespace {

constexpr int kThreads = 128;  // rows per pass of a CTA
constexpr int kChunk = 32;     // keys (dq) or queries (dk, dv) staged in shared memory at a time
constexpr int kMaxD = 256;

struct RefBwdParams {
  const void *q, *k, *v, *o, *dout;
  void *dq, *dk, *dv;
  const float *lse, *dlse;
  float* delta;  // [B, Hq, S]
  Strides sq, sk, sv, so;  // dq has q's strides, dk k's, dv v's, dout o's
  TokenMapT<int64_t> map;
  int32_t batch, q_heads, kv_group, D;
  int64_t text_capacity;
  const int32_t* text_len;
  PatternKind kind;
  const HeadParams* heads;
  const int64_t *block_offsets, *query_offsets;
  const int32_t *block_tiles, *query_list;
  float scale;
  int64_t seq_len;
  int64_t video_items, text_items;  // per (batch, head): tiles, then blocks of kThreads text rows
};

template <class T>
__device__ __forceinline__ const T* row_ptr(const void* base, const Strides& s, int64_t b, int64_t pos, int64_t h) {
  return static_cast<const T*>(base) + b * s.batch + pos * s.seq + h * s.head;
}

__device__ __forceinline__ int64_t valid_text(const RefBwdParams& p, int64_t b) {
  return p.text_len ? iclamp<int64_t>(p.text_len[b], 0, p.text_capacity) : p.text_capacity;
}

template <class T>
__global__ void row_statistic(RefBwdParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.q_heads * p.seq_len) return;
  const int64_t pos = i % p.seq_len, h = (i / p.seq_len) % p.q_heads, b = i / (p.seq_len * p.q_heads);
  const T* o = row_ptr<T>(p.o, p.so, b, pos, h);
  const T* g = row_ptr<T>(p.dout, p.so, b, pos, h);
  float sum = 0.f;
  for (int d = 0; d < p.D; ++d) sum += to_f(o[d]) * to_f(g[d]);
  p.delta[i] = sum - (p.dlse ? p.dlse[i] : 0.f);
}

/// A row handled by one thread: its sequence position, and its latent coordinate when it is a video token.
struct Row {
  bool active = false;
  int64_t pos = 0;
  Dim3 coord{};
};

__device__ __forceinline__ Row row_of(const RefBwdParams& p, bool text, int64_t item, Dim3 tile, int64_t r,
                                      int64_t rows) {
  Row row;
  row.active = r < rows;
  if (!row.active) return row;
  if (text) {
    row.pos = p.map.seq.text_offset() + (item - p.video_items) * kThreads + r;
  } else {
    row.coord = token_in_tile(p.map.grid, tile, r);
    row.pos = p.map.video_position(row.coord);
  }
  return row;
}

template <class T>
__global__ void __launch_bounds__(kThreads) dq_kernel(RefBwdParams p) {
  __shared__ float ks[kChunk][kMaxD + 1], vs[kChunk][kMaxD + 1];
  __shared__ Dim3 kcoord[kChunk];
  const int64_t items = p.video_items + p.text_items;
  const int64_t b = blockIdx.x / (p.q_heads * items);
  const int32_t h = (blockIdx.x / items) % p.q_heads;
  const int64_t item = blockIdx.x % items;
  const int32_t kvh = h / p.kv_group;
  const TileGrid& g = p.map.grid;
  const bool text_query = item >= p.video_items;
  const Dim3 cq = text_query ? Dim3{} : g.tile_coord(item);
  const int64_t rows = text_query ? imin<int64_t>(p.text_capacity - (item - p.video_items) * kThreads, kThreads)
                                  : g.tile_tokens(cq);
  const TileList keys = text_query
                            ? TileList::all(g)
                            : TileList::of(p.kind, p.heads[h], g, p.block_offsets, p.block_tiles, h, cq, false);
  const int64_t text_keys = valid_text(p, b);

  for (int64_t r0 = 0; r0 < rows; r0 += kThreads) {
    const Row row = row_of(p, text_query, item, cq, r0 + threadIdx.x, rows);
    float q[kMaxD], dout[kMaxD], dq[kMaxD];
    float lse = 0.f, delta = 0.f;
    if (row.active) {
      const T* qp = row_ptr<T>(p.q, p.sq, b, row.pos, h);
      const T* gp = row_ptr<T>(p.dout, p.so, b, row.pos, h);
      for (int d = 0; d < p.D; ++d) q[d] = to_f(qp[d]), dout[d] = to_f(gp[d]), dq[d] = 0.f;
      const int64_t stat = (b * p.q_heads + h) * p.seq_len + row.pos;
      lse = p.lse[stat];
      delta = p.delta[stat];
    }
    auto stage = [&](int64_t j, int64_t pos) {
      const T* kp = row_ptr<T>(p.k, p.sk, b, pos, kvh);
      const T* vp = row_ptr<T>(p.v, p.sv, b, pos, kvh);
      for (int d = 0; d < p.D; ++d) ks[j][d] = to_f(kp[d]), vs[j][d] = to_f(vp[d]);
    };
    auto consume = [&](int64_t count, bool masked) {
      __syncthreads();
      for (int64_t j = 0; j < count && row.active; ++j) {
        if (masked && !video_pair_allowed<int64_t>(p.kind, p.heads[h], g, row.coord, kcoord[j])) continue;
        float s = 0.f, dp = 0.f;
        for (int d = 0; d < p.D; ++d) s += q[d] * ks[j][d], dp += dout[d] * vs[j][d];
        const float ds = expf(s * p.scale - lse) * (dp - delta);
        for (int d = 0; d < p.D; ++d) dq[d] += ds * ks[j][d];
      }
      __syncthreads();
    };
    for (int64_t i = 0; i < keys.size(); ++i) {
      const Dim3 ck = keys.tile(g, i);
      const bool masked = !text_query && block_kind<int64_t>(p.kind, p.heads[h], g, cq, ck) == BlockKind::masked;
      const int64_t n = g.tile_tokens(ck);
      for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
        const int64_t count = imin<int64_t>(kChunk, n - c0);
        if (threadIdx.x < count) {
          kcoord[threadIdx.x] = token_in_tile(g, ck, c0 + threadIdx.x);
          stage(threadIdx.x, p.map.video_position(kcoord[threadIdx.x]));
        }
        consume(count, masked);
      }
    }
    for (int64_t c0 = 0; c0 < text_keys; c0 += kChunk) {
      const int64_t count = imin<int64_t>(kChunk, text_keys - c0);
      if (threadIdx.x < count) stage(threadIdx.x, p.map.seq.text_offset() + c0 + threadIdx.x);
      consume(count, false);
    }
    if (row.active) {
      T* out = const_cast<T*>(row_ptr<T>(p.dq, p.sq, b, row.pos, h));
      for (int d = 0; d < p.D; ++d) out[d] = from_f<T>(dq[d] * p.scale);
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(RefBwdParams p) {
  __shared__ float qs[kChunk][kMaxD + 1], gs[kChunk][kMaxD + 1];
  __shared__ float lses[kChunk], deltas[kChunk];
  __shared__ Dim3 qcoord[kChunk];
  const int64_t items = p.video_items + p.text_items;
  const int32_t kv_heads = p.q_heads / p.kv_group;
  const int64_t b = blockIdx.x / (kv_heads * items);
  const int32_t kvh = (blockIdx.x / items) % kv_heads;
  const int64_t item = blockIdx.x % items;
  const TileGrid& g = p.map.grid;
  const bool text_key = item >= p.video_items;
  const Dim3 ck = text_key ? Dim3{} : g.tile_coord(item);
  const int64_t rows = text_key ? imin<int64_t>(p.text_capacity - (item - p.video_items) * kThreads, kThreads)
                                : g.tile_tokens(ck);
  const int64_t text_keys = valid_text(p, b);

  for (int64_t r0 = 0; r0 < rows; r0 += kThreads) {
    const Row row = row_of(p, text_key, item, ck, r0 + threadIdx.x, rows);
    // Text keys at padding positions are seen by no query: their gradients are zero.
    const bool seen = row.active && (!text_key || row.pos - p.map.seq.text_offset() < text_keys);
    float k[kMaxD], v[kMaxD], dk[kMaxD], dv[kMaxD];
    if (row.active) {
      const T* kp = row_ptr<T>(p.k, p.sk, b, row.pos, kvh);
      const T* vp = row_ptr<T>(p.v, p.sv, b, row.pos, kvh);
      for (int d = 0; d < p.D; ++d) k[d] = to_f(kp[d]), v[d] = to_f(vp[d]), dk[d] = 0.f, dv[d] = 0.f;
    }
    for (int32_t gi = 0; gi < p.kv_group; ++gi) {
      const int32_t h = kvh * p.kv_group + gi;
      const int64_t stat0 = (b * p.q_heads + h) * p.seq_len;
      auto stage = [&](int64_t j, int64_t pos) {
        const T* qp = row_ptr<T>(p.q, p.sq, b, pos, h);
        const T* gp = row_ptr<T>(p.dout, p.so, b, pos, h);
        for (int d = 0; d < p.D; ++d) qs[j][d] = to_f(qp[d]), gs[j][d] = to_f(gp[d]);
        lses[j] = p.lse[stat0 + pos];
        deltas[j] = p.delta[stat0 + pos];
      };
      auto consume = [&](int64_t count, bool masked) {
        __syncthreads();
        for (int64_t j = 0; j < count && seen; ++j) {
          if (masked && !video_pair_allowed<int64_t>(p.kind, p.heads[h], g, qcoord[j], row.coord)) continue;
          float s = 0.f, dp = 0.f;
          for (int d = 0; d < p.D; ++d) s += qs[j][d] * k[d], dp += gs[j][d] * v[d];
          const float pij = expf(s * p.scale - lses[j]);
          const float ds = pij * (dp - deltas[j]);
          for (int d = 0; d < p.D; ++d) dv[d] += pij * gs[j][d], dk[d] += ds * qs[j][d];
        }
        __syncthreads();
      };
      // Video queries: those whose pattern holds this key tile (every video query for a text key).
      const TileList queries =
          text_key ? TileList::all(g)
                   : TileList::of(p.kind, p.heads[h], g, p.query_offsets, p.query_list, h, ck, true);
      for (int64_t i = 0; i < queries.size(); ++i) {
        const Dim3 cq = queries.tile(g, i);
        const bool masked = !text_key && block_kind<int64_t>(p.kind, p.heads[h], g, cq, ck) == BlockKind::masked;
        const int64_t n = g.tile_tokens(cq);
        for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
          const int64_t count = imin<int64_t>(kChunk, n - c0);
          if (threadIdx.x < count) {
            qcoord[threadIdx.x] = token_in_tile(g, cq, c0 + threadIdx.x);
            stage(threadIdx.x, p.map.video_position(qcoord[threadIdx.x]));
          }
          consume(count, masked);
        }
      }
      // Text queries, padding rows included, see every video key and every valid text key.
      for (int64_t c0 = 0; c0 < p.text_capacity; c0 += kChunk) {
        const int64_t count = imin<int64_t>(kChunk, p.text_capacity - c0);
        if (threadIdx.x < count) stage(threadIdx.x, p.map.seq.text_offset() + c0 + threadIdx.x);
        consume(count, false);
      }
    }
    if (row.active) {
      T* dkp = const_cast<T*>(row_ptr<T>(p.dk, p.sk, b, row.pos, kvh));
      T* dvp = const_cast<T*>(row_ptr<T>(p.dv, p.sv, b, row.pos, kvh));
      for (int d = 0; d < p.D; ++d) dkp[d] = from_f<T>(dk[d] * p.scale), dvp[d] = from_f<T>(dv[d]);
    }
  }
}

template <class T>
void launch(const RefBwdParams& r, int64_t kv_heads, cudaStream_t s) {
  const int64_t rows = r.batch * r.q_heads * r.seq_len;
  row_statistic<T><<<static_cast<unsigned>(ceil_div<int64_t>(rows, 256)), 256, 0, s>>>(r);
  check(cudaGetLastError(), "reference backward: row statistic launch");
  const int64_t items = r.video_items + r.text_items;
  dq_kernel<T><<<static_cast<unsigned>(r.batch * r.q_heads * items), kThreads, 0, s>>>(r);
  check(cudaGetLastError(), "reference backward: dq launch");
  dkdv_kernel<T><<<static_cast<unsigned>(r.batch * kv_heads * items), kThreads, 0, s>>>(r);
  check(cudaGetLastError(), "reference backward: dk/dv launch");
}

}  // namespace

size_t reference_backward_workspace_bytes(const Plan& plan) {
  const Problem& p = plan.problem();
  WorkspaceCarver w(nullptr);
  w.take<float>(p.batch * p.q_heads * p.seq_len);
  return w.used();
}

void launch_reference_backward(const Plan& plan, const PatternTables& tables, const GradTensors& t,
                               cudaStream_t stream, void* workspace) {
  const Problem& p = plan.problem();
  WorkspaceCarver w(workspace);
  RefBwdParams r{};
  r.q = t.q, r.k = t.k, r.v = t.v, r.o = t.o, r.dout = t.dout;
  r.dq = t.dq, r.dk = t.dk, r.dv = t.dv;
  r.lse = t.lse, r.dlse = t.dlse;
  r.delta = w.take<float>(p.batch * p.q_heads * p.seq_len);
  r.sq = p.q, r.sk = p.k, r.sv = p.v, r.so = p.o;
  r.map = plan.token_map();
  r.batch = static_cast<int32_t>(p.batch);
  r.q_heads = static_cast<int32_t>(p.q_heads);
  r.kv_group = static_cast<int32_t>(p.q_heads / p.kv_heads);
  r.D = static_cast<int32_t>(p.head_dim);
  r.text_capacity = p.text_capacity;
  r.text_len = t.text_len;
  r.kind = plan.pattern().kind;
  r.heads = tables.heads.get();
  r.block_offsets = tables.block_offsets.get();
  r.block_tiles = tables.block_tiles.get();
  r.query_offsets = tables.query_tile_offsets.get();
  r.query_list = tables.query_tile_list.get();
  r.scale = static_cast<float>(p.scale);
  r.seq_len = p.seq_len;
  r.video_items = plan.grid().num_tiles();
  r.text_items = ceil_div<int64_t>(p.text_capacity, kThreads);
  if (p.dtype == DType::bf16)
    launch<__nv_bfloat16>(r, p.kv_heads, stream);
  else
    launch<__half>(r, p.kv_heads, stream);
}

}  // namespace tilewise::cuda
