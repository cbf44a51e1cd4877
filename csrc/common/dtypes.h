// Element types shared by every fastclip kernel, and exact scalar conversions.
//
// The codes are the contract between Python and C++: fastclip/_work.py maps
// torch dtypes to them.  Nothing here depends on torch.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastclip {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
constexpr int kNumDTypes = 4;

inline bool valid_dtype(int32_t code) { return code >= 0 && code < kNumDTypes; }

inline int element_size(DType d) {
  switch (d) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    default: return 2;
  }
}

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE binary16 -> float, exact for every input (subnormals, inf, NaN).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t rest = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent and mantissa in float position
  const uint32_t exp = rest & (0x1fu << 23);
  rest += (127u - 15u) << 23;                                 // rebias the exponent
  if (exp == (0x1fu << 23)) {
    rest += (128u - 16u) << 23;                               // inf / NaN keep an all-ones exponent
  } else if (exp == 0) {
    rest += 1u << 23;                                         // zero / subnormal: renormalise through the FPU
    rest = float_bits(bits_float(rest) - bits_float(113u << 23));
  }
  return bits_float(rest | sign);
}

// float -> IEEE binary16 with round-to-nearest-even (what F16C and torch do).
inline uint16_t float_to_half(float f) {
  uint32_t x = float_bits(f);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint32_t out;
  if (x >= (127u + 16u) << 23) {                // >= 65536, inf or NaN
    out = x > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (x < (113u << 23)) {                 // result is subnormal or zero
    // Adding 0.5 puts the half's ulp at the float's last mantissa bit, so the
    // FPU's own round-to-nearest-even does the rounding.
    const uint32_t magic = (127u - 15u + 23u - 10u + 1u) << 23;
    out = float_bits(bits_float(x) + bits_float(magic)) - magic;
  } else {
    const uint32_t odd = (x >> 13) & 1u;
    x += ((15u - 127u) << 23) + 0xfffu + odd;     // rebias, then round half to even
    out = x >> 13;
  }
  return static_cast<uint16_t>(out | (sign >> 16));
}

inline float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// float -> bfloat16 with round-to-nearest-even, NaN kept quiet (c10::BFloat16's rule).
inline uint16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7fc0u;
  const uint32_t u = float_bits(f);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The value `v` takes when stored in dtype `d` (for fp16/bf16 through float,
// exactly like a c10 scalar conversion from double).
inline double round_to_dtype(double v, DType d) {
  switch (d) {
    case DType::kFloat64: return v;
    case DType::kFloat32: return static_cast<float>(v);
    case DType::kFloat16: return half_to_float(float_to_half(static_cast<float>(v)));
    case DType::kBFloat16: return bf16_to_float(float_to_bf16(static_cast<float>(v)));
  }
  return v;
}

}  // namespace fastclip
