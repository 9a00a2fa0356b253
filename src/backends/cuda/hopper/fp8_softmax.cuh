// Precision fp8's online softmax on a consumer thread's fragment of one key block (docs/semantics.md §11.4), and P
// as the A operand of the e4m3 P V product. Unlike the bf16 loop's there is no stale-maximum threshold: P is
// quantised against the running maximum, so that maximum must be the true one so far (a stale one would saturate
// e4m3 at 448), and it is an integer, so that rescaling O and l is by exact powers of two and P's rounding equals
// the reference's, which quantises against the row's final maximum.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "backends/cuda/hopper/ptx.cuh"  // fast_exp2 (exact at integers, which every rescale factor is)

namespace tilewise::hopper {

struct Fp8Softmax {
  static constexpr int kValues = 64;  // a thread's fragment of a 64 x 128 block: rows r and r + 8, 32 keys each
  static constexpr int kPairs = kValues / 2;

  /// Two values to e4m3 in one instruction (lo in the low byte): to nearest, ties to even, saturating (§11.1).
  static __device__ __forceinline__ uint16_t e4m3x2(float lo, float hi) {
    uint16_t r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
  }
  /// The sum of the two e4m3 values of a pair, exactly (each is an f16 value; their sum is rounded once, in fp32).
  static __device__ __forceinline__ float pair_sum(uint16_t pair) {
    uint32_t h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(h2) : "h"(pair));
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h2));
    return f.x + f.y;
  }

  /// One block: t = s * factor[row] (masked entries are -inf), M = max(M, ceil(max t)) per row, the e4m3 codes of
  /// 448 * 2^(t - M) into `pairs` (pair j: fragment values 2j and 2j + 1, the first in the low byte), and, with
  /// kRowSum, l = l * corr + the sum of their values (without it the caller sums them otherwise: a column of ones
  /// in the P V product). corr[row] = 2^(M_old - M_new) is what O (and l) must be multiplied by (0 while a row has
  /// seen no key; 1 when M stayed).
  /// kFold: the row maximum on the raw scores, scaled once (factor > 0, so max(s f) = fl(max(s) f) exactly: rounding
  /// is monotonic), and the code's value 448 * 2^(t - M) as 2^(fma(s, f, log2 448 - M)), one rounding fewer than the
  /// reference's t = fl(s f) and a product by 448 afterwards: a code can differ by one e4m3 step where the value
  /// lies within ~1e-6 of a rounding boundary (as ex2.approx's own error already allows).
  /// kAblate: measurement only (kernel_traits.cuh's TILEWISE_HOPPER_ABLATE bits 256: no exponentials, 512: no e4m3
  /// conversions; both keep every value live).
  template <bool kRowSum = true, bool kFold = false, int kAblate = 0>
  static __device__ __forceinline__ void step(const float (&s)[kValues], const float (&factor)[2], float (&m_run)[2],
                                              float (&l_run)[2], float (&corr)[2], uint16_t (&pairs)[kPairs]) {
    constexpr float kLog2Max = 8.80735492205760410f;  // log2(448)
    float t[kValues];
#pragma unroll
    for (int i = 0; i < kValues; ++i) t[i] = kFold ? s[i] : s[i] * factor[(i % 4) / 2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < kValues; ++i)
        if ((i % 4) / 2 == rr) mx = fmaxf(mx, t[i]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the four threads of a row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      if constexpr (kFold) mx *= factor[rr];
      const float m_new = fmaxf(m_run[rr], ceilf(mx));
      corr[rr] = m_new == m_run[rr] ? 1.f : fast_exp2(m_run[rr] - m_new);  // -inf - finite: 0
      m_run[rr] = m_new;
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: every p is 0
      const float bias = kLog2Max - m_use;                   // kFold
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kPairs; ++j)
        if ((j % 2) == rr) {  // values 2j, 2j + 1 are in row (2j % 4) / 2 = j % 2
          float p[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x = kFold ? fmaf(t[2 * j + e], factor[rr], bias) : t[2 * j + e] - m_use;
            p[e] = (kAblate & 256) ? x : fast_exp2(x);
          }
          if constexpr (kAblate & 512)
            pairs[j] = static_cast<uint16_t>(__byte_perm(__float_as_uint(p[0]), __float_as_uint(p[1]), 0x0073));
          else
            pairs[j] = kFold ? e4m3x2(p[0], p[1]) : e4m3x2(448.f * p[0], 448.f * p[1]);
          if constexpr (kRowSum) sum += pair_sum(pairs[j]);
        }
      if constexpr (kRowSum) {
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        l_run[rr] = l_run[rr] * corr[rr] + sum;
      }
    }
  }

  /// The codes as the A fragments of four k32 steps: step j, register x holds four codes as they lie in the
  /// accumulator ({row r, keys of chunks 4j, 4j+1}, {row r+8, same}, then chunks 4j+2, 4j+3): the key order the
  /// V^T blocks are written in (fp8/fp8_params.cuh, vt_key_of_column). Two pairs per register.
  static __device__ __forceinline__ void to_operand(const uint16_t (&pairs)[kPairs], uint32_t (&pa)[4][4]) {
    auto pack = [&](int a, int b) { return uint32_t{pairs[a]} | uint32_t{pairs[b]} << 16; };
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int a = 8 * j;
      pa[j][0] = pack(a, a + 2);
      pa[j][1] = pack(a + 1, a + 3);
      pa[j][2] = pack(a + 4, a + 6);
      pa[j][3] = pack(a + 5, a + 7);
    }
  }
};

}  // namespace tilewise::hopper
