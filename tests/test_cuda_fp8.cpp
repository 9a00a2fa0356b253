// Plan::quantize_fp8 on the GPU (src/backends/cuda/fp8_quantize.cu) against the independent float64 simulation of
// docs/semantics.md §11.2 (oracle_fp8.hpp): every e4m3 code and every scale equal, on random cases (every head dim,
// text first and last, padding, GQA, f16 and bf16) and on DiT-like inputs (keys with a large mean, a few large
// channels, text over several 128-position blocks). Skipped without a GPU.
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "buffer.hpp"
#include "grad_harness.hpp"
#include "oracle_case.hpp"
#include "oracle_fp8.hpp"
#include "tilewise/tilewise.hpp"

#ifdef TILEWISE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace {

using oracle::Buffer;
using oracle::Case;
using oracle::Kind;
using tilewise::DType;

#define SKIP_WITHOUT_GPU() \
  if (!tilewise::cuda_available()) GTEST_SKIP() << "no CUDA device (or built without CUDA): GPU test skipped"

#ifdef TILEWISE_WITH_CUDA
using GpuBuffer = gradcheck::Buffer;

GpuBuffer on_gpu(size_t bytes, const void* host = nullptr) {
  return gradcheck::make_buffer(tilewise::Device::cuda, bytes, host);
}

/// quantize_fp8 of `in` on a Device::cuda plan (native precision: the pre-pass alone), compared with the oracle.
void expect_oracle_quantisation(const Case& c, const Buffer& in) {
  SCOPED_TRACE(oracle::describe(c));
  const oracle::Views views = oracle::make_views(c);
  const tilewise::Plan plan(oracle::to_problem(c), oracle::to_pattern(c), tilewise::Device::cuda);
  const int64_t S = c.seq_len(), D = c.head_dim, blocks = plan.fp8_key_blocks();
  const size_t nq = c.batch * S * c.q_heads * D, nk = c.batch * S * c.kv_heads * D;
  const size_t nqs = c.batch * c.q_heads * S, nks = c.batch * c.kv_heads * blocks, nvs = c.batch * c.kv_heads * D;
  const GpuBuffer d_in = on_gpu(in.raw.size(), in.raw.data());
  const GpuBuffer q8 = on_gpu(nq), k8 = on_gpu(nk), v8 = on_gpu(nk), qs = on_gpu(4 * nqs), ks = on_gpu(4 * nks),
                  vs = on_gpu(4 * nvs), len = on_gpu(4 * c.text_len.size(), c.text_len.data());
  const int64_t esize = oracle::storage_size(in.st);
  char* base = static_cast<char*>(d_in.data());
  plan.quantize_fp8(base, base + views.k_offset * esize, base + views.v_offset * esize,
                    static_cast<const int32_t*>(len.data()),  // null without text_len (no bytes)
                    {q8.data(), k8.data(), v8.data(), static_cast<float*>(qs.data()), static_cast<float*>(ks.data()),
                     static_cast<float*>(vs.data())});
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  const std::vector<double> x = in.values();
  const oracle::fp8::Quantised ref = oracle::fp8::quantise_inputs(
      oracle::to_oracle(c), x.data(), x.data() + views.k_offset, x.data() + views.v_offset);
  EXPECT_EQ(q8.download_as<uint8_t>(nq), ref.q_code);
  EXPECT_EQ(k8.download_as<uint8_t>(nk), ref.k_code);
  EXPECT_EQ(v8.download_as<uint8_t>(nk), ref.v_code);
  EXPECT_EQ(qs.download_as<float>(nqs), ref.q_scale);
  EXPECT_EQ(ks.download_as<float>(nks), ref.k_scale);
  EXPECT_EQ(vs.download_as<float>(nvs), ref.v_scale);
}
#endif

/// Fresh random inputs per run; the seed is in every failure's trace.
class CudaFp8Quantize : public ::testing::Test {
 protected:
  void SetUp() override { SKIP_WITHOUT_GPU(); }
  const uint64_t seed = oracle::fresh_seed();
  const ::testing::ScopedTrace trace{__FILE__, __LINE__, oracle::seed_note(seed)};
  oracle::Rng rng{seed};
};

TEST_F(CudaFp8Quantize, RandomCasesMatchTheOracleCodeForCode) {
#ifdef TILEWISE_WITH_CUDA
  for (int i = 0; i < 24; ++i) {
    Case c = oracle::random_case(rng, Kind::sliding_tile, i % 2 ? DType::bf16 : DType::f16);
    c.storage = oracle::StorageKind::bshd;  // the oracle's codes are contiguous bshd
    expect_oracle_quantisation(c, oracle::random_inputs(c, rng));
    if (HasFailure()) return;
  }
#endif
}

TEST_F(CudaFp8Quantize, DitLikeKeysAndLongPaddedText) {
#ifdef TILEWISE_WITH_CUDA
  for (int64_t D : {64, 96, 128}) {
    Case c;
    c.kind = Kind::sliding_tile;
    c.heads = {{2, 2, 2, 0, 0}};
    c.latent = {5, 9, 10};  // tiles cut on every axis
    c.tile = {2, 4, 4};
    c.q_heads = 4, c.kv_heads = 2, c.head_dim = D;
    c.batch = 2;
    c.text = 300;  // three 128-position key blocks, the last partly padding in both batch elements
    c.text_len = {300, 129};
    c.text_first = D == 96;
    c.dtype = D == 64 ? DType::f16 : DType::bf16;
    c.storage = oracle::StorageKind::bshd;
    const oracle::Views views = oracle::make_views(c);
    Buffer in(oracle::storage_of(c.dtype), views.in_size);
    // Heavy-tailed values, keys with a large per-channel mean and a few channels ten times larger (what real DiT
    // keys look like, and what the smoothing is for).
    std::student_t_distribution<double> heavy(3.0);
    std::normal_distribution<double> mean(0.0, 4.0);
    std::vector<double> channel_mean(D);
    for (double& m : channel_mean) m = mean(rng);
    for (int64_t i = 0; i < views.in_size; ++i) {
      const int64_t d = i % D;
      double x = heavy(rng);
      if (i >= views.k_offset && i < views.v_offset) x += channel_mean[d] + (d % 29 == 3 ? 10.0 * x : 0.0);
      in.set(i, x);
    }
    expect_oracle_quantisation(c, in);
  }
#endif
}

}  // namespace
