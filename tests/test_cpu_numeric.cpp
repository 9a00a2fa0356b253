// The CPU backend's 16-bit conversions (core/numeric.hpp), which the oracle tests also use to build their
// inputs: decoding is exact, and encoding rounds to the nearest representable value, ties to even, with
// overflow to infinity, checked against IEEE rounding done independently in double.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include "core/numeric.hpp"
#include "oracle_case.hpp"  // seeding

namespace {

using tilewise::detail::bf16_to_float;
using tilewise::detail::f16_to_float;
using tilewise::detail::float_to_bf16;
using tilewise::detail::float_to_f16;

struct Format {
  int mantissa_bits, min_exp;
  double max_finite;
};
constexpr Format kBf16{7, -126, 0x1.fep127};
constexpr Format kF16{10, -14, 65504.0};

/// x rounded to the format: nearest, ties to even (nearbyint in the default mode), overflow to infinity.
double nearest(double x, Format f) {
  if (x == 0 || !std::isfinite(x)) return x;
  const double ulp = std::ldexp(1.0, std::max(std::ilogb(x), f.min_exp) - f.mantissa_bits);
  const double r = std::nearbyint(x / ulp) * ulp;
  return std::abs(r) > f.max_finite ? std::copysign(INFINITY, x) : r;
}

/// Independent f16 decoding: sign, 5-bit exponent (bias 15), 10-bit mantissa, subnormals at 2^-24.
double decode_f16(uint16_t h) {
  const double sign = h & 0x8000 ? -1.0 : 1.0;
  const int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0x1f) return man ? NAN : sign * INFINITY;
  return sign * (exp == 0 ? std::ldexp(man, -24) : std::ldexp(1024 + man, exp - 25));
}

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(CpuNumeric, DecodeIsExactAndRoundTrips) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t h = static_cast<uint16_t>(i);
    const float b = bf16_to_float(h), f = f16_to_float(h);
    EXPECT_EQ(std::isnan(b), ((i >> 7) & 0xff) == 0xff && (i & 0x7f)) << i;
    if (!std::isnan(b)) {
      EXPECT_EQ(float_to_bf16(b), h) << i;
    }
    const double want = decode_f16(h);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(f)) << i;
      EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(f)))) << i;
    } else {
      EXPECT_EQ(static_cast<double>(f), want) << i;
      EXPECT_EQ(float_to_f16(f), h) << i;
    }
  }
}

TEST(CpuNumeric, EncodeRoundsToNearestEven) {
  const uint64_t seed = oracle::fresh_seed();
  SCOPED_TRACE(oracle::seed_note(seed));
  oracle::Rng rng(seed);
  std::uniform_int_distribution<uint32_t> bits;
  std::uniform_int_distribution<int> f16_exp(-27, 17);
  int64_t bad_bf16 = 0, bad_f16 = 0;
  for (int i = 0; i < 1000000; ++i) {
    // Any float bit pattern, and floats spread over the f16 range (subnormals and overflow included).
    const float any = from_bits(bits(rng));
    const float near16 = std::ldexp(from_bits((bits(rng) & 0x807fffffu) | 0x3f800000u), f16_exp(rng));
    // Exact ties halfway between two neighbours: (m + 1/2) ulp, normal and subnormal.
    const float tie16 = std::ldexp(static_cast<float>(bits(rng) % 2048) + 0.5f, std::max(f16_exp(rng), -14) - 10);
    const float tie_bf16 = std::ldexp(static_cast<float>(128 + bits(rng) % 128) + 0.5f, int(bits(rng) % 250) - 130);
    for (float x : {any, near16, tie16, tie_bf16, -tie16}) {
      if (std::isnan(x)) continue;
      if (bf16_to_float(float_to_bf16(x)) != nearest(x, kBf16) && ++bad_bf16 <= 5)
        ADD_FAILURE() << "bf16(" << x << ") = " << bf16_to_float(float_to_bf16(x)) << ", expected "
                      << nearest(x, kBf16);
      if (f16_to_float(float_to_f16(x)) != nearest(x, kF16) && ++bad_f16 <= 5)
        ADD_FAILURE() << "f16(" << x << ") = " << f16_to_float(float_to_f16(x)) << ", expected " << nearest(x, kF16);
    }
  }
  EXPECT_EQ(bad_bf16, 0);
  EXPECT_EQ(bad_f16, 0);
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
  EXPECT_TRUE(std::isnan(f16_to_float(float_to_f16(NAN))));
  EXPECT_EQ(f16_to_float(float_to_f16(65519.0f)), 65504.0f);
  EXPECT_EQ(f16_to_float(float_to_f16(65520.0f)), INFINITY);  // the tie above the largest finite f16
}

}  // namespace
