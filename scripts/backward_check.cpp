// Quick device check of the backward during development: random problems, the forward on cuda-reference (o, lse),
// then the backward on cuda (the Hopper kernels) and on cuda-reference (fp32, independent code), compared by
// relative L2 per gradient, with deterministic false (the reduce kernel) and true (the two kernels).
// Build: g++ -std=c++20 -O2 -Iinclude scripts/backward_check.cpp -Lbuild-device -ltilewise
//   -lcudart -Wl,-rpath,build-device (with CUDA's include and lib paths).
// Usage: bwdcheck [SEED] (the checks) | bench1 [HEADS] (row 1's times) | bench_grid [HEADS] (w5x6x10's) |
//   bench_window T H W [HEADS] (any window on row 1's problem) | bench (rows 1, 1 + text, w5x6x10) | arrangements
//   (row 1's backward, two kernels and reduce kernel alternated in one process).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "tilewise/tilewise.hpp"

using namespace tilewise;

static uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
static float from_bf16(uint16_t h) {
  uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Buf {
  void* d = nullptr;
  size_t bytes = 0;
  explicit Buf(size_t n) : bytes(n) { cudaMalloc(&d, n ? n : 16); cudaMemset(d, 0xff, n); }
  ~Buf() { cudaFree(d); }
  Buf(Buf&& o) noexcept : d(o.d), bytes(o.bytes) { o.d = nullptr; }  // returned by value: one owner of the memory
  Buf(const Buf&) = delete;
  std::vector<uint16_t> half() const {
    std::vector<uint16_t> h(bytes / 2);
    cudaMemcpy(h.data(), d, bytes, cudaMemcpyDeviceToHost);
    return h;
  }
};

/// `count` standard-normal bf16 values on the device.
static Buf upload_normal(size_t count, std::mt19937& rng) {
  Buf b(count * 2);
  std::vector<uint16_t> h(count);
  std::normal_distribution<float> nd;
  for (auto& x : h) x = to_bf16(nd(rng));
  cudaMemcpy(b.d, h.data(), count * 2, cudaMemcpyHostToDevice);
  return b;
}

static double rel_l2(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b, int* nans) {
  double num = 0, den = 0;
  *nans = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = from_bf16(a[i]), y = from_bf16(b[i]);
    if (!std::isfinite(x)) ++*nans;
    num += (x - y) * (x - y);
    den += y * y;
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

/// Median of 10 timed calls of f (events on the default stream), after 3 untimed ones.
template <class F>
static float median_ms(F&& f) {
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t a, b;
  cudaEventCreate(&a), cudaEventCreate(&b);
  std::vector<float> ms;
  for (int i = 0; i < 10; ++i) {
    cudaEventRecord(a);
    f();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float t;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t);
  }
  cudaEventDestroy(a), cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

/// Times the forward and backward of the Hopper kernels on HunyuanVideo 720p (30x48x80, 24 heads, D128, 6x8x8).
/// arrangements: instead, row 1's backward in each arrangement (TILEWISE_BACKWARD_FUSED_DQ, read when a plan is made)
/// alternated three times in this one process, so that they are compared under the same clocks and power limit.
static void bench(Dim3 window, int64_t text, int32_t text_len, bool arrangements = false, int64_t heads = 24) {
  Problem p;
  p.batch = 1, p.q_heads = heads, p.kv_heads = heads, p.head_dim = 128, p.dtype = DType::bf16;
  p.latent = {30, 48, 80}, p.tile = {6, 8, 8}, p.text_capacity = text;
  Plan plan(p, Pattern::sliding_tile(window), Device::cuda);
  const Problem& n = plan.problem();
  const size_t nq = n.seq_len * n.q_heads * n.head_dim, nl = n.q_heads * n.seq_len;
  std::mt19937 rng(7);
  auto upload = [&](size_t count) { return upload_normal(count, rng); };
  Buf q = upload(nq), k = upload(nq), v = upload(nq), dout = upload(nq), o(nq * 2), lse(nl * 4), dq(nq * 2),
      dk(nq * 2), dv(nq * 2), ws(plan.backward_workspace_bytes()), tl(4);
  cudaMemcpy(tl.d, &text_len, 4, cudaMemcpyHostToDevice);
  const int32_t* tlp = text ? static_cast<const int32_t*>(tl.d) : nullptr;
  Tensors ft{q.d, k.d, v.d, o.d, static_cast<float*>(lse.d), tlp};
  GradTensors g{q.d, k.d, v.d, o.d, static_cast<float*>(lse.d), dout.d, nullptr, dq.d, dk.d, dv.d, tlp};
  if (arrangements) {
    for (int round = 0; round < 3; ++round)
      for (const char* mode : {"0", "2"}) {
        setenv("TILEWISE_BACKWARD_FUSED_DQ", mode, 1);
        Plan other(p, Pattern::sliding_tile(window), Device::cuda);
        Buf other_ws(other.backward_workspace_bytes());
        plan.run(ft);  // o and lse for the backward
        std::printf("arrangement %s (%s): backward %.2f ms\n", mode, *mode == '0' ? "two kernels" : "reduce kernel",
                    median_ms([&] { other.run_backward(g, nullptr, other_ws.d); }));
      }
    std::printf("%s\n", cudaGetErrorString(cudaDeviceSynchronize()));
    return;
  }
  const float fwd = median_ms([&] { plan.run(ft); });
  const float bwd = median_ms([&] { plan.run_backward(g, nullptr, ws.d); });
  const float det = median_ms([&] { plan.run_backward(g, nullptr, ws.d, true); });
  const int32_t tlh = text_len;
  const double flops = plan.flops(text ? &tlh : nullptr);
  // The reduce kernel's streamed blocks (64 queries x 128 owned keys) and items (128 owned keys) per head
  const double blocks = flops / (4.0 * n.head_dim) / (64.0 * 128.0) / n.q_heads, items = n.seq_len / 128.0;
  std::printf("bench w%ldx%ldx%ld text %ld: forward %.2f ms (%.0f TFLOP/s), backward %.2f ms (%.0f TFLOP/s eff.), "
              "deterministic %.2f ms, %.0f blocks per head, %.1f per item  %s\n",
              (long)window.t, (long)window.h, (long)window.w, (long)text, fwd, flops / fwd / 1e9, bwd,
              2.5 * flops / bwd / 1e9, det, blocks, blocks / items, cudaGetErrorString(cudaDeviceSynchronize()));
}

int main(int argc, char** argv) {
  // bench1 / bench_grid [HEADS]: row 1 or the whole-grid window alone (for ncu and variant sweeps), 24 heads unless
  // HEADS says otherwise (how the cycles per block depend on the heads running at once: performance.md v3.18).
  // bench_window T H W [HEADS]: any window on row 1's problem (cycles per block against blocks per item: v3.19).
  const bool window_mode = argc > 1 && std::strcmp(argv[1], "bench_window") == 0;
  if (window_mode && argc < 5) {
    std::fprintf(stderr, "bwdcheck: bench_window needs T H W [HEADS], got %d arguments\n", argc - 2);
    return 2;
  }
  const int heads_arg = window_mode ? 5 : 2;
  const int64_t heads = argc > heads_arg ? std::atoll(argv[heads_arg]) : 24;
  if (heads < 1 || heads > 1024) {
    std::fprintf(stderr, "bwdcheck: HEADS is %lld, expected 1 to 1024\n", static_cast<long long>(heads));
    return 2;
  }
  if (argc > 1 && std::strcmp(argv[1], "bench1") == 0) {
    bench({3, 3, 3}, 0, 0, false, heads);
    return 0;
  }
  if (window_mode) {
    const Dim3 w{std::atoll(argv[2]), std::atoll(argv[3]), std::atoll(argv[4])};
    if (w.t < 1 || w.h < 1 || w.w < 1) {
      std::fprintf(stderr, "bwdcheck: window %s x %s x %s, expected positive sizes\n", argv[2], argv[3], argv[4]);
      return 2;
    }
    bench(w, 0, 0, false, heads);
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "bench_grid") == 0) {
    bench({5, 6, 10}, 0, 0, false, heads);
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "arrangements") == 0) {  // row 1, two kernels against the reduce kernel
    bench({3, 3, 3}, 0, 0, true);
    return 0;
  }
  if (argc > 1 && std::strcmp(argv[1], "bench") == 0) {
    bench({3, 3, 3}, 0, 0);
    bench({3, 3, 3}, 256, 226);
    bench({5, 6, 10}, 0, 0);
    return 0;
  }
  std::mt19937 rng(argc > 1 ? atoi(argv[1]) : 1);
  struct Case {
    const char* name;
    Problem p;
    Pattern pat;
    std::vector<int32_t> text_len;
  };
  std::vector<Case> cases;
  auto base = [](Dim3 latent, Dim3 tile, int64_t D, int64_t hq, int64_t hkv, int64_t text, TextPosition tp) {
    Problem p;
    p.batch = 2, p.q_heads = hq, p.kv_heads = hkv, p.head_dim = D, p.dtype = DType::bf16;
    p.latent = latent, p.tile = tile, p.text_capacity = text, p.text_position = tp;
    return p;
  };
  cases.push_back({"sta 6x8x8 w2x3x3 D128", base({12, 16, 16}, {6, 8, 8}, 128, 2, 2, 0, TextPosition::last),
                   Pattern::sliding_tile({2, 3, 3}), {}});
  cases.push_back({"sta partial w3x3x3 text D128 gqa", base({9, 13, 19}, {6, 8, 8}, 128, 4, 2, 100, TextPosition::last),
                   Pattern::sliding_tile({3, 3, 3}), {37, 100}});
  cases.push_back({"sta text-first D64", base({5, 12, 20}, {1, 8, 16}, 64, 2, 1, 70, TextPosition::first),
                   Pattern::sliding_tile({3, 1, 1}), {0, 50}});
  cases.push_back({"attn tile g1 tt2 D96", base({7, 8, 16}, {2, 8, 8}, 96, 2, 2, 0, TextPosition::last),
                   Pattern::attention_tile(1, 1), {}});
  cases.push_back({"dense D128 text", base({4, 8, 8}, {2, 8, 8}, 128, 2, 2, 64, TextPosition::last), Pattern::dense(),
                   {64, 10}});
  int failures = 0;
  for (Case& c : cases) {
    Plan ref(c.p, c.pat, Device::cuda_reference);
    Plan fast(c.p, c.pat, Device::cuda);
    const Problem& p = ref.problem();
    const size_t nq = p.batch * p.seq_len * p.q_heads * p.head_dim, nk = p.batch * p.seq_len * p.kv_heads * p.head_dim;
    const size_t nl = p.batch * p.q_heads * p.seq_len;
    auto upload = [&](size_t n) { return upload_normal(n, rng); };
    Buf q = upload(nq), k = upload(nk), v = upload(nk), dout = upload(nq), o(nq * 2), lse(nl * 4), dlse(nl * 4);
    {
      std::vector<float> h(nl);
      std::normal_distribution<float> nd;
      for (auto& x : h) x = 0.3f * nd(rng);
      cudaMemcpy(dlse.d, h.data(), nl * 4, cudaMemcpyHostToDevice);
    }
    Buf tl(8);
    const int32_t* tlp = nullptr;
    if (!c.text_len.empty()) {
      cudaMemcpy(tl.d, c.text_len.data(), 8, cudaMemcpyHostToDevice);
      tlp = static_cast<const int32_t*>(tl.d);
    }
    ref.run({q.d, k.d, v.d, o.d, static_cast<float*>(lse.d), tlp});
    Buf dq_r(nq * 2), dk_r(nk * 2), dv_r(nk * 2), dq_f(nq * 2), dk_f(nk * 2), dv_f(nk * 2);
    Buf ws_r(ref.backward_workspace_bytes()), ws_f(fast.backward_workspace_bytes());
    GradTensors g{q.d, k.d, v.d, o.d, static_cast<float*>(lse.d), dout.d, static_cast<float*>(dlse.d),
                  dq_r.d, dk_r.d, dv_r.d, tlp};
    ref.run_backward(g, nullptr, ws_r.d);
    g.dq = dq_f.d, g.dk = dk_f.d, g.dv = dv_f.d;
    for (int deterministic = 0; deterministic < 2; ++deterministic) {
    cudaMemset(dq_f.d, 0xff, nq * 2), cudaMemset(dk_f.d, 0xff, nk * 2), cudaMemset(dv_f.d, 0xff, nk * 2);
    try {
      fast.run_backward(g, nullptr, ws_f.d, deterministic);
    } catch (const std::exception& e) {
      std::printf("%-36s fast backward threw: %s\n", c.name, e.what());
      ++failures;
      continue;
    }
    const cudaError_t err = cudaDeviceSynchronize();
    if (err != cudaSuccess) {
      std::printf("%-36s CUDA error %s\n", c.name, cudaGetErrorString(err));
      return 2;
    }
    int n1, n2, n3, m1, m2, m3;
    const double e1 = rel_l2(dq_f.half(), dq_r.half(), &n1), e2 = rel_l2(dk_f.half(), dk_r.half(), &n2),
                 e3 = rel_l2(dv_f.half(), dv_r.half(), &n3);
    rel_l2(dq_r.half(), dq_r.half(), &m1), rel_l2(dk_r.half(), dk_r.half(), &m2), rel_l2(dv_r.half(), dv_r.half(), &m3);
    const bool ok = e1 < 1e-2 && e2 < 1e-2 && e3 < 1e-2 && n1 + n2 + n3 + m1 + m2 + m3 == 0;
    failures += !ok;
    std::printf("%-36s %s dq %.2e dk %.2e dv %.2e  non-finite fast %d/%d/%d ref %d/%d/%d  %s\n", c.name,
                deterministic ? "deterministic" : "default      ", e1, e2, e3, n1, n2, n3, m1, m2, m3, ok ? "ok" : "FAIL");
    }
  }
  std::printf("%d failures\n", failures);
  return failures ? 1 : 0;
}
