// Internal: host conversions between float and the 16-bit storage types (round to nearest even), and to and from
// FP8 e4m3 (docs/semantics.md §11.1).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace tilewise::detail {

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
    u = sign | ((112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (au >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (au < 0x38800000u) {                                                // subnormal or zero in f16
    float a;
    std::memcpy(&a, &au, 4);
    const float scaled = a * 16777216.0f;  // 2^24: f16 subnormal unit is 2^-24
    uint32_t m = static_cast<uint32_t>(scaled);
    const float rem = scaled - static_cast<float>(m);
    if (rem > 0.5f || (rem == 0.5f && (m & 1u))) ++m;
    return static_cast<uint16_t>(sign | m);
  }
  uint32_t r = au - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

// ---- e4m3 (OCP FP8 E4M3 "fn": bias 7, 3 mantissa bits, largest 448, no infinities; 0x7f / 0xff are NaN) ------
// Written out by hand because no compiler or standard library here has an e4m3 type. On the GPU the hardware
// converts (cvt.rn.satfinite.e4m3x2.f32), with the same rounding: to nearest, ties to even, saturating.

inline double e4m3_to_double(uint8_t code) {
  const int exponent = (code >> 3) & 0xf, mantissa = code & 0x7;
  if (exponent == 0xf && mantissa == 0x7) return std::numeric_limits<double>::quiet_NaN();
  const double magnitude = exponent == 0 ? std::ldexp(mantissa, -9)                  // subnormal: m * 2^-9
                                         : std::ldexp(8 + mantissa, exponent - 10);  // (1 + m/8) * 2^(e-7)
  return code & 0x80 ? -magnitude : magnitude;
}

/// x rounded to e4m3: to nearest, ties to even, |x| > 448 saturating to +-448, NaN to 0x7f. A double argument,
/// so that fp32 values (exact in double) and float64 ones are rounded once.
inline uint8_t double_to_e4m3(double x) {
  if (std::isnan(x)) return 0x7f;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  const double a = std::fabs(x);
  if (a >= 448.0) return sign | 0x7e;
  // Spacing of the representable values around a: 2^(e-3) in the binade [2^e, 2^(e+1)), 2^-9 below 2^-6.
  const int e = a < 0x1p-6 ? -6 : std::ilogb(a);
  const double units = std::ldexp(a, 3 - e);  // a in units of the spacing: exact (a power-of-two scaling)
  double m = std::floor(units);
  const double rest = units - m;
  if (rest > 0.5 || (rest == 0.5 && std::fmod(m, 2.0) != 0.0)) m += 1;  // to nearest, ties to even
  const double r = std::ldexp(m, e - 3);   // at most 448: a < 448 lies below the last midpoint (464)
  if (r < 0x1p-6) return sign | static_cast<uint8_t>(m);  // subnormal (m = 0..7) or zero
  const int re = std::ilogb(r);             // rounding may carry into the next binade
  return sign | static_cast<uint8_t>(((re + 7) << 3) | (static_cast<int>(std::ldexp(r, 3 - re)) - 8));
}

/// x rounded to e4m3 and back.
inline double round_e4m3(double x) { return e4m3_to_double(double_to_e4m3(x)); }

}  // namespace tilewise::detail
