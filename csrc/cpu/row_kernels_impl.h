// Row kernels, written once with GCC/Clang vector extensions and included by
// row_kernels.cpp inside one namespace per instruction set (baseline x86-64 /
// generic, and AVX2+FMA+F16C).  The same source therefore gives 2x16-byte SSE
// code or 32-byte AVX2 code.
//
// No include guard and no #include on purpose: the including file has pulled
// in every header before opening the ISA namespace.  FASTCLIP_AVX2 selects
// intrinsics for the widening conversions (GCC splits the generic forms into
// 128-bit halves) and the F16C fp16 conversions.
//
// Accumulation order is fixed by the source (lanes, then a fixed tree), never
// by the vector width, so every ISA gives bit-identical results.

typedef float vf __attribute__((vector_size(32)));     // 8 x f32
typedef float vf4 __attribute__((vector_size(16)));    // 4 x f32
typedef double vd __attribute__((vector_size(32)));    // 4 x f64
typedef int32_t vi __attribute__((vector_size(32)));   // 8 x i32 (comparison masks of vf)
typedef uint32_t vu __attribute__((vector_size(32)));  // 8 x u32
typedef int64_t vl __attribute__((vector_size(32)));   // 4 x i64 (comparison masks of vd)
typedef uint16_t vh __attribute__((vector_size(16)));  // 8 x u16 (fp16 / bf16 bits)
typedef int16_t vs __attribute__((vector_size(16)));   // 8 x i16 masks

template <class V, class T>
static inline V loadu(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <class V, class T>
static inline void storeu(T* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}
template <class To, class From>
static inline To bitcast(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bitcast needs equal sizes");
  To t;
  __builtin_memcpy(&t, &f, sizeof(To));
  return t;
}
template <class V, class S>
static inline V splat(S s) {  // every lane = s (V{} + s would turn -0.0 into +0.0)
  V v;
  for (unsigned i = 0; i < sizeof(V) / sizeof(S); ++i) v[i] = s;
  return v;
}
// Software prefetch this many bytes ahead in streaming loops: on the 2-core
// machines measured it brought the fp32 norm pass from ~10% to ~4% above a
// plain read.  A prefetch never faults, even past the end of the data.
static constexpr int kPrefetchBytes = 1024;
template <class T>
static inline void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes);
}

static inline bool any(const vi& m) {
  const vl w = bitcast<vl>(m);
  return (w[0] | w[1] | w[2] | w[3]) != 0;
}
static inline bool any(const vl& m) { return (m[0] | m[1] | m[2] | m[3]) != 0; }

// ---------------------------------------------------------------- fp16 / bf16

// 4 floats loaded straight into doubles; 8 uint16 zero-extended to uint32.
#if FASTCLIP_AVX2
static inline vd load4_as_double(const float* p) { return (vd)_mm256_cvtps_pd(_mm_loadu_ps(p)); }
static inline vu widen_u16(const vh& h) { return (vu)_mm256_cvtepu16_epi32((__m128i)h); }
#else
static inline vd load4_as_double(const float* p) { return __builtin_convertvector(loadu<vf4>(p), vd); }
static inline vu widen_u16(const vh& h) { return __builtin_convertvector(h, vu); }
#endif

#if FASTCLIP_AVX2
static inline vf half8_to_float(const vh& h) { return (vf)_mm256_cvtph_ps((__m128i)h); }
static inline vh float8_to_half(const vf& f) {
  return (vh)_mm256_cvtps_ph((__m256)f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#else
// Branch-free vector forms of half_to_float / float_to_half in dtypes.h.
static inline vf half8_to_float(const vh& h) {
  const vu x = widen_u16(h);
  vu rest = (x & 0x7fffu) << 13;
  const vu exp = rest & (0x1fu << 23);
  rest += (127u - 15u) << 23;
  const vu infnan = (vu)(exp == (0x1fu << 23));
  rest += infnan & ((128u - 16u) << 23);
  const vu small = (vu)(exp == 0u);
  const vu sub = bitcast<vu>(bitcast<vf>(rest + (1u << 23)) - splat<vf>(bits_float(113u << 23)));
  rest = (small & sub) | (~small & rest);
  return bitcast<vf>(rest | ((x & 0x8000u) << 16));
}
static inline vh float8_to_half(const vf& f) {
  vu x = bitcast<vu>(f);
  const vu sign = x & 0x80000000u;
  x ^= sign;
  const vu is_nan = (vu)(x > 0x7f800000u);
  const vu special = (is_nan & 0x7e00u) | (~is_nan & 0x7c00u);
  const vu big = (vu)(x >= ((127u + 16u) << 23));
  const vu tiny = (vu)(x < (113u << 23));
  const uint32_t magic = (127u - 15u + 23u - 10u + 1u) << 23;
  const vu sub = bitcast<vu>(bitcast<vf>(x) + splat<vf>(bits_float(magic))) - magic;
  const vu odd = (x >> 13) & 1u;
  const vu normal = (x + (((15u - 127u) << 23) + 0xfffu) + odd) >> 13;
  vu out = (big & special) | (~big & ((tiny & sub) | (~tiny & normal)));
  out |= sign >> 16;
  return __builtin_convertvector(out, vh);
}
#endif

static inline vf bf16x8_to_float(const vh& b) { return bitcast<vf>(widen_u16(b) << 16); }

// Two vectors of 8 x uint32, each below 2^16, as 16 x uint16 at p.
static inline void store_narrow16(uint16_t* p, const vu& a, const vu& b) {
#if FASTCLIP_AVX2
  // packus interleaves 128-bit lanes; the permute puts them back in order
  storeu(p, _mm256_permute4x64_epi64(_mm256_packus_epi32((__m256i)a, (__m256i)b), 0xD8));
#else
  storeu(p, __builtin_convertvector(a, vh));
  storeu(p + 8, __builtin_convertvector(b, vh));
#endif
}

// float -> bfloat16 round-to-nearest-even, for floats computed from bf16
// data: a NaN then has zero low 16 bits (x86 keeps the payload of a NaN
// operand; a NaN made by the multiply, or a NaN coefficient, is 0x?fc00000),
// so the rounding bias cannot carry into its exponent and NaN stays NaN.
static inline vu bf16_round(const vf& f) {
  const vu u = bitcast<vu>(f);
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Element access for the 16-bit float types, as float.
template <bool BF16>
struct Half16 {
  static inline vf load8(const uint16_t* p) {
    const vh h = loadu<vh>(p);
    return BF16 ? bf16x8_to_float(h) : half8_to_float(h);
  }
  // Rounds 16 floats (two vectors) to the 16-bit type at p.
  static inline void store16_rounded(uint16_t* p, const vf& a, const vf& b) {
    if constexpr (BF16) {
      store_narrow16(p, bf16_round(a), bf16_round(b));
    } else {
      storeu(p, float8_to_half(a));
      storeu(p + 8, float8_to_half(b));
    }
  }
  // Stores 16 floats that are exact values of the 16-bit type (clamp results).
  static inline void store16_exact(uint16_t* p, const vf& a, const vf& b) {
    if constexpr (BF16) {
      store_narrow16(p, bitcast<vu>(a) >> 16, bitcast<vu>(b) >> 16);
    } else {
      storeu(p, float8_to_half(a));
      storeu(p + 8, float8_to_half(b));
    }
  }
  static inline float to_float(uint16_t v) { return BF16 ? bf16_to_float(v) : half_to_float(v); }
  static inline uint16_t from_float(float f) { return BF16 ? float_to_bf16(f) : float_to_half(f); }
};

// ---------------------------------------------------------------- reductions

// One accumulation term: |x| for L1, x*x for L2.
template <int P, class V>
static inline V term(const V& x) {
  if constexpr (P == 2) {
    return x * x;
  } else if constexpr (sizeof(x[0]) == 8) {
    return bitcast<V>(bitcast<vl>(x) & 0x7fffffffffffffffLL);
  } else {
    return bitcast<V>(bitcast<vu>(x) & 0x7fffffffu);
  }
}
template <int P>
static inline double term1(double x) {
  return P == 2 ? x * x : __builtin_fabs(x);
}
static inline double lanes_sum(const vd& a) { return (a[0] + a[1]) + (a[2] + a[3]); }
static inline double lanes_sum(const vf& a) {
  const vd lo = __builtin_convertvector(__builtin_shufflevector(a, a, 0, 1, 2, 3), vd);
  const vd hi = __builtin_convertvector(__builtin_shufflevector(a, a, 4, 5, 6, 7), vd);
  return lanes_sum(lo + hi);
}

// fp32: squares of floats are exact in double, so the only rounding is the sum.
template <int P>
static double sum_f32(const void* data, int64_t n, int64_t stride) {
  const float* p = static_cast<const float*>(data);
  if (stride != 1) {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += term1<P>(static_cast<double>(p[i * stride]));
    return s;
  }
  vd a0{}, a1{}, a2{}, a3{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    prefetch_ahead(p + i);
    a0 += term<P>(load4_as_double(p + i));
    a1 += term<P>(load4_as_double(p + i + 4));
    a2 += term<P>(load4_as_double(p + i + 8));
    a3 += term<P>(load4_as_double(p + i + 12));
  }
  double tail = 0.0;
  for (; i < n; ++i) tail += term1<P>(static_cast<double>(p[i]));
  return lanes_sum((a0 + a1) + (a2 + a3)) + tail;
}

template <int P>
static double sum_f64(const void* data, int64_t n, int64_t stride) {
  const double* p = static_cast<const double*>(data);
  if (stride != 1) {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += term1<P>(p[i * stride]);
    return s;
  }
  vd a0{}, a1{}, a2{}, a3{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    prefetch_ahead(p + i);
    prefetch_ahead(p + i + 8);
    a0 += term<P>(loadu<vd>(p + i));
    a1 += term<P>(loadu<vd>(p + i + 4));
    a2 += term<P>(loadu<vd>(p + i + 8));
    a3 += term<P>(loadu<vd>(p + i + 12));
  }
  double tail = 0.0;
  for (; i < n; ++i) tail += term1<P>(p[i]);
  return lanes_sum((a0 + a1) + (a2 + a3)) + tail;
}

// fp16 / bf16: squares are exact in float; float lanes sum blocks of 256
// elements (8 terms per lane), which are then added up in double, so the
// float rounding never builds up over long runs.
template <int P, bool BF16>
static double sum_h16(const void* data, int64_t n, int64_t stride) {
  using H = Half16<BF16>;
  const uint16_t* p = static_cast<const uint16_t*>(data);
  if (stride != 1) {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const float x = H::to_float(p[i * stride]);
      s += P == 2 ? x * x : __builtin_fabsf(x);
    }
    return s;
  }
  vd d0{}, d1{};
  int64_t i = 0;
  while (i + 32 <= n) {
    vf a0{}, a1{}, a2{}, a3{};
    const int64_t block_end = i + 256 <= n ? i + 256 : n - (n - i) % 32;
    for (; i < block_end; i += 32) {
      prefetch_ahead(p + i);
      a0 += term<P>(H::load8(p + i));
      a1 += term<P>(H::load8(p + i + 8));
      a2 += term<P>(H::load8(p + i + 16));
      a3 += term<P>(H::load8(p + i + 24));
    }
    const vf block = (a0 + a1) + (a2 + a3);
    d0 += __builtin_convertvector(__builtin_shufflevector(block, block, 0, 1, 2, 3), vd);
    d1 += __builtin_convertvector(__builtin_shufflevector(block, block, 4, 5, 6, 7), vd);
  }
  double tail = 0.0;
  for (; i < n; ++i) {
    const float x = H::to_float(p[i]);
    tail += P == 2 ? x * x : __builtin_fabsf(x);
  }
  return lanes_sum(d0 + d1) + tail;
}

// max |x| with NaN propagation.  Comparisons ignore NaN, so NaN is tracked
// in its own mask and wins at the end.
template <class Load>
static double max_abs_f32_lanes(const char* base, int sizeof_elem, int64_t n, Load load, bool* saw_nan, int64_t* done) {
  vf m0{}, m1{};
  vi nan{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    prefetch_ahead(base + i * sizeof_elem);
    const vf x0 = term<1>(load(i)), x1 = term<1>(load(i + 8));
    nan |= (x0 != x0) | (x1 != x1);
    m0 = x0 > m0 ? x0 : m0;
    m1 = x1 > m1 ? x1 : m1;
  }
  *saw_nan = any(nan);
  *done = i;
  m0 = m1 > m0 ? m1 : m0;
  float m = 0.0f;
  for (int k = 0; k < 8; ++k) m = m0[k] > m ? m0[k] : m;
  return m;
}

static inline double nan_max(double a, double b) {
  if (a != a || b != b) return __builtin_nan("");
  return a > b ? a : b;
}

static double max_f32(const void* data, int64_t n, int64_t stride) {
  const float* p = static_cast<const float*>(data);
  double m = 0.0;
  int64_t i = 0;
  if (stride == 1) {
    bool saw_nan = false;
    m = max_abs_f32_lanes(reinterpret_cast<const char*>(p), 4, n, [p](int64_t k) { return loadu<vf>(p + k); },
                          &saw_nan, &i);
    if (saw_nan) return __builtin_nan("");
  }
  for (; i < n; ++i) m = nan_max(m, __builtin_fabs(static_cast<double>(p[i * stride])));
  return m;
}

template <bool BF16>
static double max_h16(const void* data, int64_t n, int64_t stride) {
  using H = Half16<BF16>;
  const uint16_t* p = static_cast<const uint16_t*>(data);
  double m = 0.0;
  int64_t i = 0;
  if (stride == 1) {
    bool saw_nan = false;
    m = max_abs_f32_lanes(reinterpret_cast<const char*>(p), 2, n, [p](int64_t k) { return H::load8(p + k); },
                          &saw_nan, &i);
    if (saw_nan) return __builtin_nan("");
  }
  for (; i < n; ++i) m = nan_max(m, __builtin_fabs(static_cast<double>(H::to_float(p[i * stride]))));
  return m;
}

static double max_f64(const void* data, int64_t n, int64_t stride) {
  const double* p = static_cast<const double*>(data);
  double m = 0.0;
  int64_t i = 0;
  if (stride == 1) {
    vd m0{}, m1{};
    vl nan{};
    for (; i + 8 <= n; i += 8) {
      prefetch_ahead(p + i);
      const vd x0 = term<1>(loadu<vd>(p + i)), x1 = term<1>(loadu<vd>(p + i + 4));
      nan |= (x0 != x0) | (x1 != x1);
      m0 = x0 > m0 ? x0 : m0;
      m1 = x1 > m1 ? x1 : m1;
    }
    if (any(nan)) return __builtin_nan("");
    m0 = m1 > m0 ? m1 : m0;
    for (int k = 0; k < 4; ++k) m = m0[k] > m ? m0[k] : m;
  }
  for (; i < n; ++i) m = nan_max(m, __builtin_fabs(p[i * stride]));
  return m;
}

// ---------------------------------------------------------------- scaling

static void scale_f32(void* data, int64_t n, int64_t stride, double coef) {
  float* p = static_cast<float*>(data);
  const float c = static_cast<float>(coef);  // torch reads a scalar operand in opmath (float)
  int64_t i = 0;
  if (stride == 1) {
    for (; i + 16 <= n; i += 16) {
      prefetch_ahead(p + i);
      storeu(p + i, loadu<vf>(p + i) * c);
      storeu(p + i + 8, loadu<vf>(p + i + 8) * c);
    }
  }
  for (; i < n; ++i) p[i * stride] *= c;
}

static void scale_f64(void* data, int64_t n, int64_t stride, double c) {
  double* p = static_cast<double*>(data);
  int64_t i = 0;
  if (stride == 1) {
    for (; i + 8 <= n; i += 8) {
      prefetch_ahead(p + i);
      storeu(p + i, loadu<vd>(p + i) * c);
      storeu(p + i + 4, loadu<vd>(p + i + 4) * c);
    }
  }
  for (; i < n; ++i) p[i * stride] *= c;
}

template <bool BF16>
static void scale_h16(void* data, int64_t n, int64_t stride, double coef) {
  using H = Half16<BF16>;
  uint16_t* p = static_cast<uint16_t*>(data);
  const float c = static_cast<float>(coef);
  int64_t i = 0;
  if (stride == 1) {
    for (; i + 16 <= n; i += 16) {
      prefetch_ahead(p + i);
      H::store16_rounded(p + i, H::load8(p + i) * c, H::load8(p + i + 8) * c);
    }
  }
  for (; i < n; ++i) p[i * stride] = H::from_float(H::to_float(p[i * stride]) * c);
}

// ---------------------------------------------------------------- clamping
//
// torch runs clamp_min_(-v) then clamp_max_(v): y = x < lo ? lo : x, then
// y > hi ? hi : y.  NaN elements stay; a NaN bound makes every element NaN.

template <class T>
static inline T clamp1(T x, T lo, T hi, bool nan_bound) {
  if (nan_bound) return lo != lo ? lo : hi;
  const T y = x < lo ? lo : x;
  return y > hi ? hi : y;
}

// Most vectors change nothing when few values are clipped: test 32 bytes of
// comparisons at once before doing any blending or storing.
template <class V, class M>
static inline M outside(const V& x, const V& lo, const V& hi) {
  return (x < lo) | (x > hi);  // exactly the lanes clamping changes (NaN lanes never)
}
template <class V>
static inline V clamped(const V& x, const V& lo, const V& hi) {
  const V y = x < lo ? lo : x;
  return y > hi ? hi : y;
}

static void clamp_f32(void* data, int64_t n, int64_t stride, double lo_d, double hi_d) {
  float* p = static_cast<float*>(data);
  const float lo = static_cast<float>(lo_d), hi = static_cast<float>(hi_d);
  const bool nan_bound = lo != lo || hi != hi;
  int64_t i = 0;
  if (stride == 1 && !nan_bound) {
    const vf vlo = splat<vf>(lo), vhi = splat<vf>(hi);
    for (; i + 32 <= n; i += 32) {
      prefetch_ahead(p + i);
      const vf x0 = loadu<vf>(p + i), x1 = loadu<vf>(p + i + 8), x2 = loadu<vf>(p + i + 16), x3 = loadu<vf>(p + i + 24);
      const vi m0 = outside<vf, vi>(x0, vlo, vhi), m1 = outside<vf, vi>(x1, vlo, vhi);
      const vi m2 = outside<vf, vi>(x2, vlo, vhi), m3 = outside<vf, vi>(x3, vlo, vhi);
      if (!any((m0 | m1) | (m2 | m3))) continue;
      if (any(m0)) storeu(p + i, clamped(x0, vlo, vhi));
      if (any(m1)) storeu(p + i + 8, clamped(x1, vlo, vhi));
      if (any(m2)) storeu(p + i + 16, clamped(x2, vlo, vhi));
      if (any(m3)) storeu(p + i + 24, clamped(x3, vlo, vhi));
    }
  }
  for (; i < n; ++i) {
    float& x = p[i * stride];
    const float y = clamp1(x, lo, hi, nan_bound);
    if (float_bits(y) != float_bits(x)) x = y;
  }
}

static void clamp_f64(void* data, int64_t n, int64_t stride, double lo, double hi) {
  double* p = static_cast<double*>(data);
  const bool nan_bound = lo != lo || hi != hi;
  int64_t i = 0;
  if (stride == 1 && !nan_bound) {
    const vd vlo = splat<vd>(lo), vhi = splat<vd>(hi);
    for (; i + 16 <= n; i += 16) {
      prefetch_ahead(p + i);
      prefetch_ahead(p + i + 8);
      const vd x0 = loadu<vd>(p + i), x1 = loadu<vd>(p + i + 4), x2 = loadu<vd>(p + i + 8), x3 = loadu<vd>(p + i + 12);
      const vl m0 = outside<vd, vl>(x0, vlo, vhi), m1 = outside<vd, vl>(x1, vlo, vhi);
      const vl m2 = outside<vd, vl>(x2, vlo, vhi), m3 = outside<vd, vl>(x3, vlo, vhi);
      if (!any((m0 | m1) | (m2 | m3))) continue;
      if (any(m0)) storeu(p + i, clamped(x0, vlo, vhi));
      if (any(m1)) storeu(p + i + 4, clamped(x1, vlo, vhi));
      if (any(m2)) storeu(p + i + 8, clamped(x2, vlo, vhi));
      if (any(m3)) storeu(p + i + 12, clamped(x3, vlo, vhi));
    }
  }
  for (; i < n; ++i) {
    double& x = p[i * stride];
    const double y = clamp1(x, lo, hi, nan_bound);
    if (bitcast<uint64_t>(y) != bitcast<uint64_t>(x)) x = y;
  }
}

template <bool BF16>
static void clamp_h16(void* data, int64_t n, int64_t stride, double lo_d, double hi_d) {
  using H = Half16<BF16>;
  uint16_t* p = static_cast<uint16_t*>(data);
  // lo/hi are exact values of the 16-bit type, so every result narrows exactly.
  const float lo = static_cast<float>(lo_d), hi = static_cast<float>(hi_d);
  const bool nan_bound = lo != lo || hi != hi;
  int64_t i = 0;
  if (stride == 1 && !nan_bound) {
    const vf vlo = splat<vf>(lo), vhi = splat<vf>(hi);
    for (; i + 32 <= n; i += 32) {
      prefetch_ahead(p + i);
      const vf x0 = H::load8(p + i), x1 = H::load8(p + i + 8), x2 = H::load8(p + i + 16), x3 = H::load8(p + i + 24);
      const vi m01 = outside<vf, vi>(x0, vlo, vhi) | outside<vf, vi>(x1, vlo, vhi);
      const vi m23 = outside<vf, vi>(x2, vlo, vhi) | outside<vf, vi>(x3, vlo, vhi);
      if (any(m01)) H::store16_exact(p + i, clamped(x0, vlo, vhi), clamped(x1, vlo, vhi));
      if (any(m23)) H::store16_exact(p + i + 16, clamped(x2, vlo, vhi), clamped(x3, vlo, vhi));
    }
  }
  for (; i < n; ++i) {
    uint16_t& x = p[i * stride];
    const float xf = H::to_float(x);
    const bool below = xf < lo, above = (below ? lo : xf) > hi;
    if (nan_bound || below || above) x = H::from_float(clamp1(xf, lo, hi, nan_bound));
  }
}

// ---------------------------------------------------------------- floors

static uint64_t touch_read(const void* data, int64_t nbytes) {
  const char* p = static_cast<const char*>(data);
  vl acc0{}, acc1{}, acc2{}, acc3{};
  int64_t i = 0;
  for (; i + 128 <= nbytes; i += 128) {
    acc0 |= loadu<vl>(p + i);
    acc1 |= loadu<vl>(p + i + 32);
    acc2 |= loadu<vl>(p + i + 64);
    acc3 |= loadu<vl>(p + i + 96);
  }
  uint64_t r = 0;
  for (; i < nbytes; ++i) r |= static_cast<unsigned char>(p[i]);
  acc0 |= acc1 | acc2 | acc3;
  return r | static_cast<uint64_t>(acc0[0] | acc0[1] | acc0[2] | acc0[3]);
}

// Writes back what it read; `zero` is 0 at run time, which the compiler cannot know.
static void touch_write(void* data, int64_t nbytes, uint64_t zero) {
  char* p = static_cast<char*>(data);
  const vl z = splat<vl>(static_cast<int64_t>(zero));
  int64_t i = 0;
  for (; i + 64 <= nbytes; i += 64) {
    storeu(p + i, loadu<vl>(p + i) ^ z);
    storeu(p + i + 32, loadu<vl>(p + i + 32) ^ z);
  }
  for (; i < nbytes; ++i) p[i] = static_cast<char>(p[i] ^ static_cast<char>(zero));
}

// ---------------------------------------------------------------- table

static RowKernels make_table(const char* isa) {
  RowKernels t{};
  t.isa = isa;
  constexpr int f32 = static_cast<int>(DType::kFloat32), f64 = static_cast<int>(DType::kFloat64),
                f16 = static_cast<int>(DType::kFloat16), bf16 = static_cast<int>(DType::kBFloat16);
  constexpr int l1 = 0, l2 = 1, linf = 2;
  t.reduce[l1][f32] = sum_f32<1>;
  t.reduce[l2][f32] = sum_f32<2>;
  t.reduce[linf][f32] = max_f32;
  t.reduce[l1][f64] = sum_f64<1>;
  t.reduce[l2][f64] = sum_f64<2>;
  t.reduce[linf][f64] = max_f64;
  t.reduce[l1][f16] = sum_h16<1, false>;
  t.reduce[l2][f16] = sum_h16<2, false>;
  t.reduce[linf][f16] = max_h16<false>;
  t.reduce[l1][bf16] = sum_h16<1, true>;
  t.reduce[l2][bf16] = sum_h16<2, true>;
  t.reduce[linf][bf16] = max_h16<true>;
  t.scale[f32] = scale_f32;
  t.scale[f64] = scale_f64;
  t.scale[f16] = scale_h16<false>;
  t.scale[bf16] = scale_h16<true>;
  t.clamp[f32] = clamp_f32;
  t.clamp[f64] = clamp_f64;
  t.clamp[f16] = clamp_h16<false>;
  t.clamp[bf16] = clamp_h16<true>;
  t.touch_read = touch_read;
  t.touch_write = touch_write;
  return t;
}
