// Precision fp8's online softmax on a consumer thread's fragment of one key block (docs/semantics.md §11.4), and P
// as the A operand of the e4m3 P V product. Unlike the bf16 loop's there is no stale-maximum threshold: P is
// quantised against the running maximum, so that maximum must be the true one so far (a stale one would saturate
// e4m3 at 448), and it is an integer, so that rescaling O and l is by exact powers of two and P's rounding equals
// the reference's, which quantises against the row's final maximum.
#pragma once

#include <cuda_fp8.h>

#include <cstdint>

#include "backends/cuda/hopper/ptx.cuh"  // fast_exp2: exact at integers, which every rescale factor here is

namespace tilewise::hopper {

struct Fp8Softmax {
  static constexpr int kValues = 64;  // a thread's fragment of a 64 x 128 block: rows r and r + 8, 32 keys each

  static __device__ __forceinline__ uint32_t e4m3(float x) {
    return static_cast<uint32_t>(__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3));
  }
  static __device__ __forceinline__ float value_of(uint32_t code) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code), __NV_E4M3)));
  }

  /// One block: t = s * factor[row] (masked entries are -inf), M = max(M, ceil(max t)) per row, the e4m3 codes of
  /// 448 * 2^(t - M) into `codes` (in the fragment's order), l = l * corr + the sum of their values. corr[row] =
  /// 2^(M_old - M_new) is what O must be multiplied by (0 while a row has seen no key; 1 when M stayed).
  static __device__ __forceinline__ void step(const float (&s)[kValues], const float (&factor)[2], float (&m_run)[2],
                                              float (&l_run)[2], float (&corr)[2], uint8_t (&codes)[kValues]) {
    float t[kValues];
#pragma unroll
    for (int i = 0; i < kValues; ++i) t[i] = s[i] * factor[(i % 4) / 2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < kValues; ++i)
        if ((i % 4) / 2 == rr) mx = fmaxf(mx, t[i]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the four threads of a row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[rr], ceilf(mx));
      corr[rr] = m_new == m_run[rr] ? 1.f : fast_exp2(m_run[rr] - m_new);  // -inf - finite: 0
      m_run[rr] = m_new;
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: every p is 0
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kValues; ++i)
        if ((i % 4) / 2 == rr) {
          codes[i] = static_cast<uint8_t>(e4m3(448.f * fast_exp2(t[i] - m_use)));
          sum += value_of(codes[i]);
        }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      l_run[rr] = l_run[rr] * corr[rr] + sum;
    }
  }

  /// The codes as the A fragments of four k32 steps: step j, register x holds four codes as they lie in the
  /// accumulator ({row r, keys of chunks 4j, 4j+1}, {row r+8, same}, then chunks 4j+2, 4j+3): the key order the
  /// V^T blocks are written in (docs/performance.md, the FP8 forward's design).
  static __device__ __forceinline__ void to_operand(const uint8_t (&codes)[kValues], uint32_t (&pa)[4][4]) {
    auto pack = [&](int a, int b, int c, int d) {
      return uint32_t{codes[a]} | uint32_t{codes[b]} << 8 | uint32_t{codes[c]} << 16 | uint32_t{codes[d]} << 24;
    };
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int a = 16 * j;
      pa[j][0] = pack(a, a + 1, a + 4, a + 5);
      pa[j][1] = pack(a + 2, a + 3, a + 6, a + 7);
      pa[j][2] = pack(a + 8, a + 9, a + 12, a + 13);
      pa[j][3] = pack(a + 10, a + 11, a + 14, a + 15);
    }
  }
};

}  // namespace tilewise::hopper
