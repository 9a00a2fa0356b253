// Sequence parallelism (Ulysses) with tilewise's C ABI: what a C/C++ inference engine does with its own
// all-to-all (NCCL's ncclSend/ncclRecv in a group, MPI_Alltoallv, ...). See docs/parallel.md.
//
// The transport sits behind a function pointer, so this file needs neither NCCL nor MPI: main() runs P ranks as
// threads with an in-memory all-to-all and checks that every rank's output chunk equals one plan over the whole
// problem. Build (CPU library):
//   c++ -std=c++20 -O2 -Iinclude examples/ulysses_c_abi.cpp -Lbuild-cpu -ltilewise -Wl,-rpath,$PWD/build-cpu -pthread
#include <tilewise/tilewise.h>

#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

// A collective all-to-all of bytes: send_bytes[j] bytes at send + send_offsets[j] go to rank j, which receives
// them at recv + recv_offsets[rank]. Every rank of the group calls it. An engine wraps ncclGroupStart /
// ncclSend / ncclRecv / ncclGroupEnd on its stream here (or MPI_Alltoallv).
struct Transport {
  void (*all_to_all)(void* ctx, int rank, const char* send, const size_t* send_offsets, const size_t* send_bytes,
                     char* recv, const size_t* recv_offsets, const size_t* recv_bytes);
  void* ctx;
};

struct Geometry {
  int64_t heads, head_dim, latent[3], tile[3], text_capacity;
  int64_t seq() const { return latent[0] * latent[1] * latent[2] + text_capacity; }
};

// Rank r holds positions [r*c, min(S, (r+1)*c)), c = ceil(S / P) (docs/semantics.md, "Sequence-parallel sharding").
static int64_t chunk_begin(int64_t S, int P, int r) { return std::min(S, r * ((S + P - 1) / P)); }

// One rank's Ulysses forward, float32, batch 1, [S, H, D] rows. q/k/v/o_local: this rank's chunk [s_r, H, D].
// windows: the global per-head table [H][3]. Returns a tw_status.
static tw_status ulysses_forward(int rank, int P, const Geometry& g, const int64_t* windows, const float* q_local,
                                 const float* k_local, const float* v_local, float* o_local, int32_t text_len,
                                 const Transport& t) {
  const int64_t S = g.seq(), H = g.heads, D = g.head_dim, h = H / P;  // h: local heads (H % P == 0 checked)
  const size_t row = sizeof(float) * h * D;                          // one position, the heads of one rank
  std::vector<size_t> sizes(P), send_off(P), send_bytes(P), recv_off(P), recv_bytes(P);
  for (int j = 0; j < P; ++j) sizes[j] = chunk_begin(S, P, j + 1) - chunk_begin(S, P, j);
  const int64_t s = sizes[rank];

  // Sequence -> heads: pack rank j's heads of every local position contiguously, exchange, and every rank then
  // holds the whole sequence [S, h, D] for its heads (rank i's chunk at rows chunk_begin(i)).
  std::vector<float> send(s * H * D), full_q(S * h * D), full_k(S * h * D), full_v(S * h * D), full_o(S * h * D);
  for (int j = 0; j < P; ++j) {
    send_off[j] = j * s * row;
    send_bytes[j] = s * row;
    recv_off[j] = chunk_begin(S, P, j) * row;
    recv_bytes[j] = sizes[j] * row;
  }
  const float* inputs[3] = {q_local, k_local, v_local};
  float* fulls[3] = {full_q.data(), full_k.data(), full_v.data()};
  for (int x = 0; x < 3; ++x) {
    for (int j = 0; j < P; ++j)
      for (int64_t p = 0; p < s; ++p)
        std::memcpy(&send[(j * s + p) * h * D], &inputs[x][(p * H + j * h) * D], row);
    t.all_to_all(t.ctx, rank, reinterpret_cast<const char*>(send.data()), send_off.data(), send_bytes.data(),
                 reinterpret_cast<char*>(fulls[x]), recv_off.data(), recv_bytes.data());
  }

  // tilewise on the whole sequence for the local heads: head_offset = rank * h makes the plan read the window
  // table at the global head. The table passed is the global one up to this rank's last head (head_offset + h
  // entries): the library takes exactly q_heads entries at head_offset 0 and at least head_offset + q_heads
  // elsewhere, so the same rule serves every rank.
  tw_problem p;
  tw_problem_init(&p);
  p.batch = 1;
  p.q_heads = p.kv_heads = h;
  p.head_dim = D;
  p.dtype = TW_DTYPE_F32;
  std::memcpy(p.latent, g.latent, sizeof p.latent);
  std::memcpy(p.tile, g.tile, sizeof p.tile);
  p.text_capacity = g.text_capacity;
  p.head_offset = rank * h;
  tw_pattern pattern;
  tw_pattern_init(&pattern);
  pattern.kind = TW_PATTERN_SLIDING_TILE;
  pattern.num_heads = p.head_offset + h;
  pattern.windows = windows;
  tw_plan* plan = nullptr;  // an engine creates it once per geometry and rank, not per call
  if (tw_status st = tw_plan_create(&p, &pattern, TW_DEVICE_CPU, &plan); st != TW_OK) return st;
  tw_status st = tw_plan_run(plan, full_q.data(), full_k.data(), full_v.data(), full_o.data(), nullptr, &text_len,
                             nullptr);
  tw_plan_destroy(plan);
  if (st != TW_OK) return st;

  // Heads -> sequence: the reverse exchange; rank j's block holds global heads [j*h, (j+1)*h).
  std::vector<float> back(P * s * h * D);
  for (int j = 0; j < P; ++j) {
    send_off[j] = chunk_begin(S, P, j) * row;
    send_bytes[j] = sizes[j] * row;
    recv_off[j] = j * s * row;
    recv_bytes[j] = s * row;
  }
  t.all_to_all(t.ctx, rank, reinterpret_cast<const char*>(full_o.data()), send_off.data(), send_bytes.data(),
               reinterpret_cast<char*>(back.data()), recv_off.data(), recv_bytes.data());
  for (int j = 0; j < P; ++j)
    for (int64_t q = 0; q < s; ++q) std::memcpy(&o_local[(q * H + j * h) * D], &back[(j * s + q) * h * D], row);
  return TW_OK;
}

// The in-memory transport of the demo: every rank publishes its send buffer, waits for all, copies its part.
struct Loopback {
  explicit Loopback(int P) : P(P), sync(P), send(P), off(P), bytes(P) {}
  int P;
  std::barrier<> sync;
  std::vector<const char*> send;
  std::vector<const size_t*> off, bytes;
  static void all_to_all(void* ctx, int rank, const char* s, const size_t* so, const size_t* sb, char* r,
                         const size_t* ro, const size_t* rb) {
    auto* L = static_cast<Loopback*>(ctx);
    L->send[rank] = s, L->off[rank] = so, L->bytes[rank] = sb;
    L->sync.arrive_and_wait();
    for (int i = 0; i < L->P; ++i) {
      if (L->bytes[i][rank] != rb[i]) std::abort();  // sender and receiver disagree on the size
      std::memcpy(r + ro[i], L->send[i] + L->off[i][rank], rb[i]);
    }
    L->sync.arrive_and_wait();  // nobody reuses its send buffer before everyone has copied
  }
};

int main() {
  const Geometry g{8, 16, {3, 8, 10}, {1, 4, 5}, 6};  // S = 246: not a multiple of 4
  const int P = 4;
  const int64_t S = g.seq(), H = g.heads, D = g.head_dim;
  std::vector<int64_t> windows;
  const int64_t table[8][3] = {{1, 1, 1}, {3, 2, 2}, {2, 1, 1}, {1, 2, 2}, {3, 1, 2}, {1, 1, 2}, {2, 2, 2}, {3, 2, 1}};
  for (auto& w : table) windows.insert(windows.end(), w, w + 3);
  std::mt19937 rng(12345);
  std::normal_distribution<float> normal;
  std::vector<float> q(S * H * D), k(S * H * D), v(S * H * D), o(S * H * D), ref(S * H * D);
  for (auto* x : {&q, &k, &v})
    for (auto& e : *x) e = normal(rng);
  const int32_t text_len = 4;

  Loopback loop(P);
  const Transport transport{&Loopback::all_to_all, &loop};
  std::vector<std::thread> ranks;
  std::vector<tw_status> status(P, TW_OK);
  for (int r = 0; r < P; ++r)
    ranks.emplace_back([&, r] {
      const int64_t b = chunk_begin(S, P, r) * H * D;
      status[r] = ulysses_forward(r, P, g, windows.data(), &q[b], &k[b], &v[b], &o[b], text_len, transport);
    });
  for (auto& t : ranks) t.join();
  for (int r = 0; r < P; ++r)
    if (status[r] != TW_OK) return std::fprintf(stderr, "rank %d: %s\n", r, tw_last_error()), 1;

  // The same problem on one plan over every head.
  tw_problem p;
  tw_problem_init(&p);
  p.q_heads = p.kv_heads = H;
  p.head_dim = D;
  p.dtype = TW_DTYPE_F32;
  std::memcpy(p.latent, g.latent, sizeof p.latent);
  std::memcpy(p.tile, g.tile, sizeof p.tile);
  p.text_capacity = g.text_capacity;
  tw_pattern pattern;
  tw_pattern_init(&pattern);
  pattern.kind = TW_PATTERN_SLIDING_TILE;
  pattern.num_heads = H;
  pattern.windows = windows.data();
  tw_plan* plan = nullptr;
  if (tw_plan_create(&p, &pattern, TW_DEVICE_CPU, &plan) != TW_OK ||
      tw_plan_run(plan, q.data(), k.data(), v.data(), ref.data(), nullptr, &text_len, nullptr) != TW_OK)
    return std::fprintf(stderr, "%s\n", tw_last_error()), 1;
  tw_plan_destroy(plan);
  double worst = 0;
  for (size_t i = 0; i < o.size(); ++i) worst = std::max(worst, double(std::fabs(o[i] - ref[i])));
  std::printf("%d ranks, S = %lld, %lld heads: max |ulysses - one plan| = %g\n", P, (long long)S, (long long)H, worst);
  return worst <= 1e-5 ? 0 : 1;
}
