// Row kernels, written once with GCC/Clang vector extensions and included by
// row_kernels.cpp inside one namespace per instruction set: "baseline"
// (16-byte vectors: SSE2 on x86-64, NEON on Arm) and "avx2" (32-byte
// vectors, FMA, F16C).
//
// No include guard and no #include on purpose: the including file has pulled
// in every header before opening the ISA namespace.  FASTCLIP_AVX2 selects
// the 32-byte build and the intrinsics it needs (GCC splits the generic
// widening conversions into halves, and F16C converts fp16).
//
// Every reduction has a fixed set of *logical* accumulators: which one an
// element goes to depends on its index only (i mod 16 for fp32/fp64, i mod
// 32 for fp16, an even/odd map for bf16), blocks arrive in the order of
// for_blocks (which depends on n only), and the accumulators are combined in
// a fixed tree.  The vector width only decides how many accumulators share a
// register, so both instruction sets give bit-identical results.

#if FASTCLIP_AVX2
#define FASTCLIP_VBYTES 32
#else
#define FASTCLIP_VBYTES 16
#endif

typedef float vf __attribute__((vector_size(FASTCLIP_VBYTES)));         // L floats
typedef float vfh __attribute__((vector_size(FASTCLIP_VBYTES / 2)));    // D floats
typedef double vd __attribute__((vector_size(FASTCLIP_VBYTES)));        // D doubles
typedef int32_t vi __attribute__((vector_size(FASTCLIP_VBYTES)));       // masks of vf
typedef uint32_t vu __attribute__((vector_size(FASTCLIP_VBYTES)));
typedef int64_t vl __attribute__((vector_size(FASTCLIP_VBYTES)));       // masks of vd
typedef uint16_t vh __attribute__((vector_size(FASTCLIP_VBYTES / 2)));  // L fp16/bf16 values
typedef int16_t vs __attribute__((vector_size(FASTCLIP_VBYTES)));      // 2L fp16/bf16 bit patterns
constexpr int L = FASTCLIP_VBYTES / 4;  // floats per vector
constexpr int D = FASTCLIP_VBYTES / 8;  // doubles per vector

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
// Every lane = s, converted to the lane type (V{} + s would turn -0.0 into
// +0.0).  The lane count comes from V's lanes, not from s's type.
template <class V, class S>
static inline V splat(S s) {
  using Lane = typename std::remove_reference<decltype(V{}[0])>::type;
  V v;
  for (unsigned i = 0; i < sizeof(V) / sizeof(Lane); ++i) v[i] = static_cast<Lane>(s);
  return v;
}

// Every streaming loop walks a run as kStreams equal parts in lockstep.  One
// core keeps more cache-line misses in flight when the hardware prefetchers
// follow several sequential streams: on the 2-core EPYC measured, a plain
// read went from 28 to 31 GB/s (one core: 17 to 21) and the fp32 norm pass
// from 27 to 29.5 GB/s, where software prefetch had gained only ~5%.
static constexpr int kStreams = 4;

// Calls step(p + k) for every full block of B elements of [0, n): first the
// blocks of the kStreams parts, taking one block of each part in turn, then
// the blocks after them (kSplit false: every block in order).  The order
// depends on n, B and kSplit only, so reductions that take B from elements
// (not from the vector width) give the same bits on every instruction set.
// Returns the elements done (a multiple of B).
// Inlined with everything it calls, so the accumulators that `step` captures
// stay in registers (GCC stopped inlining the loads once a loop had two
// copies of the step).  Loads are passed as lambdas, not function pointers,
// for the same reason.
// Runs shorter than kStreamsFrom bytes are walked as one stream: their parts
// would be too short for the prefetchers.  AGC's rows are always walked as
// one stream (kSplit false): consecutive rows are then one long stream, and
// a grad row read beside its weight row already makes two.
static constexpr int64_t kStreamsFrom = 16384;

template <int B, bool kSplit = true, class T, class Step>
[[gnu::always_inline, gnu::flatten]] static inline int64_t for_blocks(T* p, int64_t n, const Step& step) {
  const bool split = kSplit && n * static_cast<int64_t>(sizeof(T)) >= kStreamsFrom;
  const int64_t part = split ? n / (kStreams * B) * B : 0;
  for (int64_t i = 0; i < part; i += B) {
    for (int s = 0; s < kStreams; ++s) step(p + s * part + i);
  }
  int64_t i = kStreams * part;
  for (; i + B <= n; i += B) step(p + i);
  return i;
}

// Whether any lane of a comparison mask is set (a ptest / movemask: the
// generic form extracts lanes, which costs more than the comparison itself).
static inline bool any(const vl& m) {
#if FASTCLIP_AVX2
  return !_mm256_testz_si256((__m256i)m, (__m256i)m);
#elif FASTCLIP_X86
  return _mm_movemask_epi8((__m128i)m) != 0;
#else
  int64_t r = 0;
  for (int k = 0; k < D; ++k) r |= m[k];
  return r != 0;
#endif
}
static inline bool any(const vi& m) { return any(bitcast<vl>(m)); }
static inline bool any(const vs& m) { return any(bitcast<vl>(m)); }

// ---------------------------------------------------------------- conversions

#if FASTCLIP_AVX2
static inline vd load_as_double(const float* p) { return (vd)_mm256_cvtps_pd(_mm_loadu_ps(p)); }
static inline vu widen_u16(const vh& h) { return (vu)_mm256_cvtepu16_epi32((__m128i)h); }
// The L floats of v added to L/D = 2 vectors of doubles.
static inline void add_as_doubles(vd* acc, const vf& v) {
  acc[0] += (vd)_mm256_cvtps_pd(_mm256_castps256_ps128((__m256)v));
  acc[1] += (vd)_mm256_cvtps_pd(_mm256_extractf128_ps((__m256)v, 1));
}
#else
static inline vd load_as_double(const float* p) { return __builtin_convertvector(loadu<vfh>(p), vd); }
static inline vu widen_u16(const vh& h) { return __builtin_convertvector(h, vu); }
static inline void add_as_doubles(vd* acc, const vf& v) {
  acc[0] += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1), vd);
  acc[1] += __builtin_convertvector(__builtin_shufflevector(v, v, 2, 3), vd);
}
#endif

#if FASTCLIP_AVX2
static inline vf half_to_float_v(const vh& h) { return (vf)_mm256_cvtph_ps((__m128i)h); }
static inline vh float_to_half_v(const vf& f) {
  return (vh)_mm256_cvtps_ph((__m256)f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#else
// Branch-free vector forms of half_to_float / float_to_half in dtypes.h.
static inline vf half_to_float_v(const vh& h) {
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
static inline vh float_to_half_v(const vf& f) {
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

static inline vf bf16_to_float_v(const vh& b) { return bitcast<vf>(widen_u16(b) << 16); }

// Two vectors of L uint32 values below 2^16, as 2L uint16 at p.
static inline void store_narrow2(uint16_t* p, const vu& a, const vu& b) {
#if FASTCLIP_AVX2
  // packus interleaves 128-bit lanes; the permute puts them back in order
  storeu(p, _mm256_permute4x64_epi64(_mm256_packus_epi32((__m256i)a, (__m256i)b), 0xD8));
#else
  storeu(p, __builtin_convertvector(a, vh));
  storeu(p + L, __builtin_convertvector(b, vh));
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
  static inline vf load(const uint16_t* p) {
    const vh h = loadu<vh>(p);
    return BF16 ? bf16_to_float_v(h) : half_to_float_v(h);
  }
  // Rounds 2L floats (two vectors) to the 16-bit type at p.
  static inline void store2_rounded(uint16_t* p, const vf& a, const vf& b) {
    if constexpr (BF16) {
      store_narrow2(p, bf16_round(a), bf16_round(b));
    } else {
      storeu(p, float_to_half_v(a));
      storeu(p + L, float_to_half_v(b));
    }
  }
  // Stores 2L floats that are exact values of the 16-bit type (clamp results).
  static inline void store2_exact(uint16_t* p, const vf& a, const vf& b) {
    if constexpr (BF16) {
      store_narrow2(p, bitcast<vu>(a) >> 16, bitcast<vu>(b) >> 16);
    } else {
      storeu(p, float_to_half_v(a));
      storeu(p + L, float_to_half_v(b));
    }
  }
  static inline float to_float(uint16_t v) { return BF16 ? bf16_to_float(v) : half_to_float(v); }
  static inline uint16_t from_float(float f) { return BF16 ? float_to_bf16(f) : float_to_half(f); }
};

// ---------------------------------------------------------------- reductions

// Counting policies of the reductions: the stats kernels count the zeros
// (either sign) of the values they sum, in the same pass; the plain norm
// kernels count nothing (NoCounts compiles away).  Non-finite elements need
// no count of their own here: a run holds one only if its sum (or max) is
// not finite, and only such runs are counted again, by count_nonfinite.
struct NoCounts {
  template <class V>
  void add(const V&) {}
  void add1(double) {}
  void store(int64_t*) const {}
};

// M: the lane-mask vector type of the values counted (vl for vd, vi for vf).
// Per-lane counts never overflow: a unit has at most kUnitElems elements.
template <class M>
struct LaneCounts {
  M zeros{};
  int64_t tail_zeros = 0;
  template <class V>
  void add(const V& v) {
    zeros -= (M)(v == V{});
  }
  void add1(double x) { tail_zeros += x == 0.0; }
  void store(int64_t* counts) const {
    int64_t b = tail_zeros;
    for (unsigned k = 0; k < sizeof(M) / sizeof(zeros[0]); ++k) b += zeros[k];
    counts[1] += b;
  }
};

// Elements that are inf or NaN, by their exponent bits (runs whose sum was
// not finite: rare, so one element at a time).
template <class T, class Bits, Bits kExponent>
static int64_t count_nonfinite(const void* data, int64_t n, int64_t stride) {
  const T* p = static_cast<const T*>(data);
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += (bitcast<Bits>(p[i * stride]) & kExponent) == kExponent;
  return count;
}

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

// The fixed trees over the logical accumulators.  combine16: over a[0..15],
// held in order in 16 / D vectors, r[j] = (a[j] + a[4 + j]) + (a[8 + j] +
// a[12 + j]) for j = 0..3, then (r[0] + r[1]) + (r[2] + r[3]); in the vectors
// (storing them and reloading the lanes cost more than the rest of a short
// row: AGC's rows of 64 elements).
static inline double combine16(const vd* acc) {
#if FASTCLIP_VBYTES == 32
  const vd r = (acc[0] + acc[1]) + (acc[2] + acc[3]);  // r[j], j = 0..3
  return (r[0] + r[1]) + (r[2] + r[3]);
#else
  const vd lo = (acc[0] + acc[2]) + (acc[4] + acc[6]), hi = (acc[1] + acc[3]) + (acc[5] + acc[7]);  // r[0..1], r[2..3]
  return (lo[0] + lo[1]) + (hi[0] + hi[1]);
#endif
}
// combine8: over a[0..7] in 8 / D vectors, ((a[0] + a[4]) + (a[1] + a[5])) +
// ((a[2] + a[6]) + (a[3] + a[7])), likewise in the vectors.
static inline double combine8(const vd* acc) {
#if FASTCLIP_VBYTES == 32
  const vd v = acc[0] + acc[1];  // a[j] + a[4 + j], j = 0..3
  return (v[0] + v[1]) + (v[2] + v[3]);
#else
  const vd lo = acc[0] + acc[2], hi = acc[1] + acc[3];  // j = 0..1, j = 2..3
  return (lo[0] + lo[1]) + (hi[0] + hi[1]);
#endif
}

// fp32 and fp64: 16 logical double accumulators (element i of the run goes
// to accumulator i % 16, blocks in for_blocks order), then the elements left
// over, in order.  `load`
// gives D elements as doubles.  The squares of floats are exact in double,
// so for fp32 the only rounding is the sum.  fp64 (kCompensated) carries the
// rounding error of every addition (TwoSum), as torch's cascade summation
// keeps fp64 sums accurate.
static inline void two_sum_add(vd& sum, vd& error, const vd& x) {
  const vd t = sum + x;
  const vd z = t - sum;
  error += (sum - (t - z)) + (x - z);
  sum = t;
}

// The 16 accumulators of one run (see above): step() adds a block of 16
// elements, finish() the elements left over, and gives the sum.
template <int P, bool kCompensated, class T, class Load>
struct Sum16 {
  using Element = T;
  static constexpr int kBlock = 16;  // elements a step takes
  static constexpr int kVecs = 16 / D;
  vd acc[kVecs] = {};
  vd err[kCompensated ? kVecs : 1] = {};  // (one unused vector without compensation: less to zero per row)
  Load load;

  template <class Counts>
  [[gnu::always_inline]] inline void step(const T* q, Counts& counts) {
    if constexpr (!std::is_same<Counts, NoCounts>::value) {
      // counted as stored (fp32: 8 lanes a vector, not 4 as doubles)
      using VT = typename std::conditional<sizeof(T) == 4, vf, vd>::type;
      constexpr int W = FASTCLIP_VBYTES / sizeof(T);
      for (int k = 0; k < 16 / W; ++k) counts.add(loadu<VT>(q + k * W));
    }
    for (int k = 0; k < kVecs; ++k) {
#if FASTCLIP_AVX2
      // The square of a float is exact in double, so acc + x*x rounds once
      // either way: one fused instruction, the same bits as the baseline's two.
      if constexpr (P == 2 && sizeof(T) == 4) {
        const vd v = load(q + k * D);
        acc[k] = (vd)_mm256_fmadd_pd((__m256d)v, (__m256d)v, (__m256d)acc[k]);
        continue;
      }
#endif
      const vd x = term<P>(load(q + k * D));
      if constexpr (kCompensated) {
        two_sum_add(acc[k], err[k], x);
      } else {
        acc[k] += x;
      }
    }
  }

  // Elements i.. of the run (stride apart), then the fixed combination.
  template <class Counts>
  double finish(const T* p, int64_t i, int64_t n, int64_t stride, Counts& counts) const {
    if constexpr (kCompensated) {
      double lanes[16], errors[16];  // (no zeroing of memory per call, which showed for many tiny runs)
      for (int k = 0; k < kVecs; ++k) {
        storeu(lanes + k * D, acc[k]);
        storeu(errors + k * D, err[k]);
      }
      CompensatedSum total;
      for (int k = 0; k < 16; ++k) total.add(lanes[k]);
      for (int k = 0; k < 16; ++k) total.error += errors[k];
      for (; i < n; ++i) {
        const double x = static_cast<double>(p[i * stride]);
        counts.add1(x);
        total.add(term1<P>(x));
      }
      return total.value();
    } else {
      double tail = 0.0;
      for (; i < n; ++i) {
        const double x = static_cast<double>(p[i * stride]);
        counts.add1(x);
        tail += term1<P>(x);
      }
      return combine16(acc) + tail;
    }
  }
};

template <int P, bool kCompensated, class T, class Load, class Counts>
static double sum16(const T* p, int64_t n, int64_t stride, Counts& counts) {
  Sum16<P, kCompensated, T, Load> sum;
  const int64_t i = stride == 1 ? for_blocks<16>(p, n, [&](const T* q) { sum.step(q, counts); }) : 0;
  return sum.finish(p, i, n, stride, counts);
}

// Two dense runs of n elements (AGC's grad row and weight row) in lockstep:
// two streams in flight, each summed by its own accumulator (Sum16, SumH16
// or MaxAbs) with the blocks, order and arithmetic of sum_row.
template <class Acc>
static void sum_pair(const typename Acc::Element* a, const typename Acc::Element* b, int64_t n, double* out_a,
                     double* out_b) {
  Acc sa, sb;
  NoCounts none;
  const int64_t i = for_blocks<Acc::kBlock, false>(a, n, [&](const typename Acc::Element* q) {
    sa.step(q, none);
    sb.step(b + (q - a), none);
  });
  *out_a = sa.finish(a, i, n, 1, none);
  *out_b = sb.finish(b, i, n, 1, none);
}

// D elements as doubles.
struct LoadF32 {
  vd operator()(const float* q) const { return load_as_double(q); }
};
struct LoadF64 {
  vd operator()(const double* q) const { return loadu<vd>(q); }
};

template <int P, class Counts>
static double sum_f32(const void* data, int64_t n, int64_t stride, Counts& counts) {
  return sum16<P, false, float, LoadF32>(static_cast<const float*>(data), n, stride, counts);
}

template <int P, class Counts>
static double sum_f64(const void* data, int64_t n, int64_t stride, Counts& counts) {
  return sum16<P, true, double, LoadF64>(static_cast<const double*>(data), n, stride, counts);
}

// bfloat16 has float32's exponent range, so float32 blocks cannot hold all of
// its sums: squares of values beyond ~1.8e19 (and long L1 sums of values near
// the top) overflow, squares below 2^-126 (values below ~1e-19) lose bits.
// A run whose float32 result shows that is summed again in double, one
// element at a time (rare: such values, or an inf element).  Each square
// rounds by at most 2^-150, so a result of at least n * 2^-120 is accurate to
// 2^-30; a result of 0 from a run of zeros needs no second sum.
template <int P>
static bool bf16_float_sum_lost_range(double r, const uint16_t* p, int64_t n) {
  if (r != r) return false;  // a NaN element: NaN either way
  if (r == __builtin_inf()) return true;
  if (P != 2 || r >= static_cast<double>(n) * 0x1p-120) return false;
  uint16_t bits = 0;  // all zeros (either sign)?
  for (int64_t i = 0; i < n; ++i) bits |= p[i];
  return (bits & 0x7fff) != 0;
}
template <int P>
static double sum_bf16_wide(const uint16_t* p, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = bf16_to_float(p[i]);
    if (x == __builtin_inf() || x == -__builtin_inf()) return __builtin_inf();  // (no NaN: the float sum was not NaN)
    s += term1<P>(x);
  }
  return s;
}

// fp16 / bf16: squares are exact in float.  32 logical float accumulators
// (element i of a block of 32 goes to accumulator i for fp16; bf16: see the
// loop) sum 8 blocks of 32 elements (8 terms each, in for_blocks order); then they are
// folded into 8 logical double accumulators, so the float rounding never
// builds up over long runs.
template <int P, bool BF16>
struct SumH16 {
  using H = Half16<BF16>;
  using Element = uint16_t;
  static constexpr int kBlock = 32;  // elements a step takes
  static constexpr int kVecs = 32 / L;  // float accumulators
  vd dacc[8 / D] = {};
  vf acc[kVecs] = {};
  int steps = 0;  // blocks of 32 summed into acc since the last fold

  [[gnu::always_inline]] inline void fold() {
    // logical lane j of the block: (acc j + acc 8+j) + (acc 16+j + acc 24+j)
    for (int h = 0; h < 8 / L; ++h) {
      const vf block = (acc[h] + acc[h + 8 / L]) + (acc[h + 16 / L] + acc[h + 24 / L]);
      add_as_doubles(dacc + h * (L / D), block);
    }
    for (vf& a : acc) a = vf{};
    steps = 0;
  }

  template <class Counts>
  [[gnu::always_inline]] inline void step(const uint16_t* q, Counts& counts) {
    if constexpr (BF16) {
      // A 32-bit word holds two bf16 elements (little-endian): a shift gives
      // the even one as a float, a mask the odd one, with no widening.
      // Element 16g + 2l + parity of the block goes to logical accumulator
      // (2g + parity) * 8 + l on every instruction set.
      constexpr int per = 8 / L;  // loads of 2L elements per 16 elements
      for (int j = 0; j < 16 / L; ++j) {
        const vu x = loadu<vu>(q + j * 2 * L);
        const int g = j / per, h = j % per;
        const vf even = bitcast<vf>(x << 16), odd = bitcast<vf>(x & 0xffff0000u);
        counts.add(even);
        counts.add(odd);
        acc[2 * g * per + h] += term<P>(even);
        acc[(2 * g + 1) * per + h] += term<P>(odd);
      }
    } else {
      for (int k = 0; k < kVecs; ++k) {
        const vf v = H::load(q + k * L);
        counts.add(v);
        acc[k] += term<P>(v);
      }
    }
    if (++steps == 8) fold();
  }

  // Elements i.. of the dense run p[0, n), then the fixed combination (and
  // bf16's sum again in double where float32 lost its range).
  template <class Counts>
  double finish(const uint16_t* p, int64_t i, int64_t n, int64_t, Counts& counts) {
    if (steps > 0) fold();
    double tail = 0.0;
    for (; i < n; ++i) {
      const double x = H::to_float(p[i]);
      counts.add1(x);
      tail += term1<P>(x);
    }
    const double r = combine8(dacc) + tail;
    if constexpr (BF16) {
      if (bf16_float_sum_lost_range<P>(r, p, n)) return sum_bf16_wide<P>(p, n);
    }
    return r;
  }
};

template <int P, bool BF16, class Counts>
static double sum_h16(const void* data, int64_t n, int64_t stride, Counts& counts) {
  using H = Half16<BF16>;
  const uint16_t* p = static_cast<const uint16_t*>(data);
  if (stride != 1) {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double x = H::to_float(p[i * stride]);
      counts.add1(x);
      s += term1<P>(x);
    }
    return s;
  }
  SumH16<P, BF16> sum;
  const int64_t i = for_blocks<32>(p, n, [&](const uint16_t* q) { sum.step(q, counts); });
  return sum.finish(p, i, n, 1, counts);
}

// max |x| over a run, NaN propagating (max is exact, so no order to fix).
// Comparisons ignore NaN, so NaN is tracked in its own mask and wins.
// Load gives a vector V of elements from a pointer, Value one element as double.
template <class V, class M, class T, class Load, class Value>
struct MaxAbs {
  using Element = T;
  static constexpr int kStep = sizeof(V) / sizeof(V{}[0]);
  static constexpr int kBlock = 2 * kStep;  // elements a step takes
  V m0{}, m1{};
  M nan{};
  Load load;
  Value value;

  template <class Counts>
  [[gnu::always_inline]] inline void step(const T* q, Counts& counts) {
    const V v0 = load(q), v1 = load(q + kStep);
    counts.add(v0);
    counts.add(v1);
    const V x0 = term<1>(v0), x1 = term<1>(v1);
    nan |= (x0 != x0) | (x1 != x1);
    m0 = x0 > m0 ? x0 : m0;
    m1 = x1 > m1 ? x1 : m1;
  }

  // Elements i.. of the run (stride apart) after the vector blocks.
  template <class Counts>
  double finish(const T* p, int64_t i, int64_t n, int64_t stride, Counts& counts) const {
    const bool saw_nan = any(nan);
    const V mv = m1 > m0 ? m1 : m0;
    double m = 0.0;
    for (int k = 0; k < kStep; ++k) m = mv[k] > m ? mv[k] : m;
    for (; i < n; ++i) {
      const double x = value(p[i * stride]);
      counts.add1(x);
      m = nan_max(m, __builtin_fabs(x));
    }
    return saw_nan ? __builtin_nan("") : m;
  }
};

template <class Acc, class Counts>
static double max_abs(const typename Acc::Element* p, int64_t n, int64_t stride, Counts& counts) {
  Acc acc;
  const int64_t i =
      stride == 1 ? for_blocks<Acc::kBlock>(p, n, [&](const typename Acc::Element* q) { acc.step(q, counts); }) : 0;
  return acc.finish(p, i, n, stride, counts);
}

// A vector of elements as stored (fp64: LoadF64 above), 16-bit ones as floats;
// one element as double.
struct LoadVF32 {
  vf operator()(const float* q) const { return loadu<vf>(q); }
};
template <bool BF16>
struct LoadVH16 {
  vf operator()(const uint16_t* q) const { return Half16<BF16>::load(q); }
};
struct AsDouble {
  template <class T>
  double operator()(T x) const { return static_cast<double>(x); }
};
template <bool BF16>
struct ValueH16 {
  double operator()(uint16_t x) const { return static_cast<double>(Half16<BF16>::to_float(x)); }
};
using MaxF32 = MaxAbs<vf, vi, float, LoadVF32, AsDouble>;
using MaxF64 = MaxAbs<vd, vl, double, LoadF64, AsDouble>;
template <bool BF16>
using MaxH16 = MaxAbs<vf, vi, uint16_t, LoadVH16<BF16>, ValueH16<BF16>>;

template <class Counts>
static double max_f32(const void* data, int64_t n, int64_t stride, Counts& counts) {
  return max_abs<MaxF32>(static_cast<const float*>(data), n, stride, counts);
}

template <bool BF16, class Counts>
static double max_h16(const void* data, int64_t n, int64_t stride, Counts& counts) {
  return max_abs<MaxH16<BF16>>(static_cast<const uint16_t*>(data), n, stride, counts);
}

template <class Counts>
static double max_f64(const void* data, int64_t n, int64_t stride, Counts& counts) {
  return max_abs<MaxF64>(static_cast<const double*>(data), n, stride, counts);
}

// The reductions as RowKernels entries: the plain norm (no counts) and the
// stats variant (the same sum, plus the counts of non-finite values and zeros).
// F is one of the reductions above, LaneMask the mask type its vectors count in.
template <double (*F)(const void*, int64_t, int64_t, NoCounts&)>
[[gnu::flatten]] static double plain(const void* data, int64_t n, int64_t stride) {
  NoCounts none;
  return F(data, n, stride, none);
}
template <class LaneMask, double (*F)(const void*, int64_t, int64_t, LaneCounts<LaneMask>&)>
[[gnu::flatten]] static double counted(const void* data, int64_t n, int64_t stride, int64_t* counts) {
  LaneCounts<LaneMask> c;
  const double r = F(data, n, stride, c);
  c.store(counts);
  return r;
}

// ---------------------------------------------------------------- scaling

// x *= c for float32 / float64 (vector type V of element type T).
template <class V, class T>
static void scale_native(T* p, int64_t n, int64_t stride, T c) {
  constexpr int W = sizeof(V) / sizeof(T);
  int64_t i = 0;
  if (stride == 1) {
    i = for_blocks<2 * W>(p, n, [&](T* q) {
      storeu(q, loadu<V>(q) * c);
      storeu(q + W, loadu<V>(q + W) * c);
    });
  }
  for (; i < n; ++i) p[i * stride] *= c;
}

static void scale_f32(void* data, int64_t n, int64_t stride, double coef) {
  // torch reads a scalar operand in opmath: float for float32 grads
  scale_native<vf>(static_cast<float*>(data), n, stride, static_cast<float>(coef));
}

static void scale_f64(void* data, int64_t n, int64_t stride, double coef) {
  scale_native<vd>(static_cast<double*>(data), n, stride, coef);
}

template <bool BF16>
static void scale_h16(void* data, int64_t n, int64_t stride, double coef) {
  using H = Half16<BF16>;
  uint16_t* p = static_cast<uint16_t*>(data);
  const float c = static_cast<float>(coef);
  int64_t i = 0;
  if (stride == 1) {
    i = for_blocks<2 * L>(p, n, [&](uint16_t* q) { H::store2_rounded(q, H::load(q) * c, H::load(q + L) * c); });
  }
  for (; i < n; ++i) p[i * stride] = H::from_float(H::to_float(p[i * stride]) * c);
}

// ---------------------------------------------------------------- many short rows

// Consecutive dense rows are one sequential stream, which the hardware
// prefetchers follow.  (Software prefetching the rows ahead, once measured as
// a gain on one thread, made AGC over GPT-2 small's fp32 grads 1.4x slower
// on the 2-core EPYC measured since: 49 against 36 ms without a clip, 60
// against 42 ms with one unit in ten clipping; 74 against 50 ms on one thread.)

// One AGC row: a dense run walked as one stream (see kStreamsFrom).  Four
// streams per row, eight with its weight row, each restarting at every row,
// made AGC over rows of 4096 or more fp32 elements 25% slower on one core of
// the 2-core EPYC (9.5-10.0 against 7.4-7.6 ms for 25.6M grads and weights;
// rows of 2048: 7.0-7.6 either way).
template <class Acc>
static double sum_row(const typename Acc::Element* p, int64_t n) {
  Acc acc;
  NoCounts none;
  const int64_t i = for_blocks<Acc::kBlock, false>(p, n, [&](const typename Acc::Element* q) { acc.step(q, none); });
  return acc.finish(p, i, n, 1, none);
}

// One value per row of `rows` dense rows of `len` elements.
template <class Acc>
static void reduce_rows(const void* data, int64_t rows, int64_t len, double* out) {
  const typename Acc::Element* p = static_cast<const typename Acc::Element*>(data);
  for (int64_t r = 0; r < rows; ++r) out[r] = sum_row<Acc>(p + r * len, len);
}

// AGC's grads and weights of one dtype (every norm and dtype): row r of
// both in one loop, with the bits of reduce_rows.  Two streams in
// flight: AGC over ResNet-50's fp32 grads 6-7% faster than reading a unit's
// grad rows, then its weight rows (8.2-9.0 -> 7.7-8.5 ms; GPT-2 small 3%;
// bf16 ResNet-50 4.15-4.26 -> 4.06-4.09 ms; the inf norm on fp32 ResNet-50
// 7.1-7.4 -> 6.7-6.9 ms, on the 2-core EPYC measured).
template <class Acc>
static void reduce_row_pairs(const void* grads, const void* weights, int64_t rows, int64_t len, double* gout,
                             double* wout) {
  using T = typename Acc::Element;
  const T* g = static_cast<const T*>(grads);
  const T* w = static_cast<const T*>(weights);
  for (int64_t r = 0; r < rows; ++r) sum_pair<Acc>(g + r * len, w + r * len, len, gout + r, wout + r);
}

template <void (*F)(void*, int64_t, int64_t, double), int ES>
static void scale_rows(void* data, int64_t rows, int64_t len, const double* coefs) {
  char* p = static_cast<char*>(data);
  for (int64_t r = 0; r < rows; ++r) {
    if (coefs[r] != 1.0) F(p + r * len * ES, len, 1, coefs[r]);  // x * 1 == x: nothing to write
  }
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

// Exactly the lanes clamping changes (NaN lanes never change).
template <class V, class M>
static inline M outside(const V& x, const V& lo, const V& hi) {
  return (x < lo) | (x > hi);
}
template <class V>
static inline V clamped(const V& x, const V& lo, const V& hi) {
  const V y = x < lo ? lo : x;
  return y > hi ? hi : y;
}

// Most vectors change nothing when few values are clipped: four vectors of
// comparisons are tested at once before any blending or storing.  With
// lo == -hi (clip_value >= 0) a lane changes exactly when |x| > hi.
template <class V, class M, class T>
static void clamp_dense(T* p, int64_t n, int64_t* done, const V& lo, const V& hi) {
  constexpr int W = sizeof(V) / sizeof(T);
  const bool symmetric = hi[0] >= 0 && lo[0] == -hi[0];
  *done = for_blocks<4 * W>(p, n, [&](T* q) {
    const V x0 = loadu<V>(q), x1 = loadu<V>(q + W), x2 = loadu<V>(q + 2 * W), x3 = loadu<V>(q + 3 * W);
    M m0, m1, m2, m3;
    if (symmetric) {
      m0 = term<1>(x0) > hi, m1 = term<1>(x1) > hi, m2 = term<1>(x2) > hi, m3 = term<1>(x3) > hi;
    } else {
      m0 = outside<V, M>(x0, lo, hi), m1 = outside<V, M>(x1, lo, hi);
      m2 = outside<V, M>(x2, lo, hi), m3 = outside<V, M>(x3, lo, hi);
    }
    if (!any((m0 | m1) | (m2 | m3))) return;
    if (any(m0)) storeu(q, clamped(x0, lo, hi));
    if (any(m1)) storeu(q + W, clamped(x1, lo, hi));
    if (any(m2)) storeu(q + 2 * W, clamped(x2, lo, hi));
    if (any(m3)) storeu(q + 3 * W, clamped(x3, lo, hi));
  });
}

static void clamp_f32(void* data, int64_t n, int64_t stride, double lo_d, double hi_d) {
  float* p = static_cast<float*>(data);
  const float lo = static_cast<float>(lo_d), hi = static_cast<float>(hi_d);
  const bool nan_bound = lo != lo || hi != hi;
  int64_t i = 0;
  if (stride == 1 && !nan_bound) clamp_dense<vf, vi>(p, n, &i, splat<vf>(lo), splat<vf>(hi));
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
  if (stride == 1 && !nan_bound) clamp_dense<vd, vl>(p, n, &i, splat<vd>(lo), splat<vd>(hi));
  for (; i < n; ++i) {
    double& x = p[i * stride];
    const double y = clamp1(x, lo, hi, nan_bound);
    if (bitcast<uint64_t>(y) != bitcast<uint64_t>(x)) x = y;
  }
}

// clip_value >= 0 (lo is -hi, bit for bit, and hi is not -0.0) on fp16 / bf16: these
// order like their magnitude bits, so whether |x| > hi is a 16-bit integer
// compare and the clamped value is hi with x's sign, with no widening to
// float.  NaN lanes (magnitude bits above inf's) stay as they are.
template <bool BF16>
static int64_t clamp_h16_symmetric(uint16_t* p, int64_t n, uint16_t hi_bits) {
  const vs hi = splat<vs>(static_cast<int16_t>(hi_bits));
  const vs inf = splat<vs>(static_cast<int16_t>(BF16 ? 0x7f80 : 0x7c00));
  const vs sign = splat<vs>(INT16_MIN);  // the sign bit
  auto changes = [&](const vs& x) {
    const vs magnitude = x & 0x7fff;
    return (magnitude > hi) & (magnitude <= inf);
  };
  return for_blocks<4 * L>(p, n, [&](uint16_t* q) {
    const vs a = loadu<vs>(q), b = loadu<vs>(q + 2 * L);
    const vs change_a = changes(a), change_b = changes(b);
    if (!any(change_a | change_b)) return;
    if (any(change_a)) storeu(q, change_a ? (a & sign) | hi : a);
    if (any(change_b)) storeu(q + 2 * L, change_b ? (b & sign) | hi : b);
  });
}

template <bool BF16>
static void clamp_h16(void* data, int64_t n, int64_t stride, double lo_d, double hi_d) {
  using H = Half16<BF16>;
  uint16_t* p = static_cast<uint16_t*>(data);
  // lo/hi are exact values of the 16-bit type, so every result narrows exactly.
  const float lo = static_cast<float>(lo_d), hi = static_cast<float>(hi_d);
  const bool nan_bound = lo != lo || hi != hi;
  int64_t i = 0;
  // (bits: with lo = +0.0 and hi = +0.0 the sign of x must not survive)
  if (stride == 1 && !nan_bound && float_bits(lo) == (float_bits(hi) ^ 0x80000000u) && float_bits(hi) >> 31 == 0) {
    i = clamp_h16_symmetric<BF16>(p, n, H::from_float(hi));
  } else if (stride == 1 && !nan_bound) {
    const vf vlo = splat<vf>(lo), vhi = splat<vf>(hi);
    i = for_blocks<4 * L>(p, n, [&](uint16_t* q) {
      const vf x0 = H::load(q), x1 = H::load(q + L), x2 = H::load(q + 2 * L), x3 = H::load(q + 3 * L);
      const vi m01 = outside<vf, vi>(x0, vlo, vhi) | outside<vf, vi>(x1, vlo, vhi);
      const vi m23 = outside<vf, vi>(x2, vlo, vhi) | outside<vf, vi>(x3, vlo, vhi);
      if (any(m01)) H::store2_exact(q, clamped(x0, vlo, vhi), clamped(x1, vlo, vhi));
      if (any(m23)) H::store2_exact(q + 2 * L, clamped(x2, vlo, vhi), clamped(x3, vlo, vhi));
    });
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
  constexpr int V = FASTCLIP_VBYTES;
  vl acc0{}, acc1{}, acc2{}, acc3{};
  int64_t i = for_blocks<4 * V>(p, nbytes, [&](const char* q) {
    acc0 |= loadu<vl>(q);
    acc1 |= loadu<vl>(q + V);
    acc2 |= loadu<vl>(q + 2 * V);
    acc3 |= loadu<vl>(q + 3 * V);
  });
  uint64_t r = 0;
  for (; i < nbytes; ++i) r |= static_cast<unsigned char>(p[i]);
  acc0 |= acc1 | acc2 | acc3;
  for (int k = 0; k < D; ++k) r |= static_cast<uint64_t>(acc0[k]);
  return r;
}

// Writes back what it read; `zero` is 0 at run time, which the compiler cannot know.
static void touch_write(void* data, int64_t nbytes, uint64_t zero) {
  char* p = static_cast<char*>(data);
  constexpr int V = FASTCLIP_VBYTES;
  const vl z = splat<vl>(static_cast<int64_t>(zero));
  int64_t i = for_blocks<2 * V>(p, nbytes, [&](char* q) {
    storeu(q, loadu<vl>(q) ^ z);
    storeu(q + V, loadu<vl>(q + V) ^ z);
  });
  for (; i < nbytes; ++i) p[i] = static_cast<char>(p[i] ^ static_cast<char>(zero));
}

// ---------------------------------------------------------------- table

// A row kernel (Op::of<Acc>) for every norm kind and dtype: the accumulator
// of each, listed once for reduce_rows and reduce_row_pairs alike.
struct RowsOf {
  template <class Acc>
  static constexpr ReduceRowsFn of = reduce_rows<Acc>;
};
struct RowPairsOf {
  template <class Acc>
  static constexpr ReduceRowPairsFn of = reduce_row_pairs<Acc>;
};
template <class Op, class Fn>
static void fill_row_kernels(Fn (&t)[3][kNumDTypes]) {
  constexpr int f32 = static_cast<int>(DType::kFloat32), f64 = static_cast<int>(DType::kFloat64),
                f16 = static_cast<int>(DType::kFloat16), bf16 = static_cast<int>(DType::kBFloat16);
  constexpr int l1 = 0, l2 = 1, linf = 2;
  t[l1][f32] = Op::template of<Sum16<1, false, float, LoadF32>>;
  t[l2][f32] = Op::template of<Sum16<2, false, float, LoadF32>>;
  t[linf][f32] = Op::template of<MaxF32>;
  t[l1][f64] = Op::template of<Sum16<1, true, double, LoadF64>>;
  t[l2][f64] = Op::template of<Sum16<2, true, double, LoadF64>>;
  t[linf][f64] = Op::template of<MaxF64>;
  t[l1][f16] = Op::template of<SumH16<1, false>>;
  t[l2][f16] = Op::template of<SumH16<2, false>>;
  t[linf][f16] = Op::template of<MaxH16<false>>;
  t[l1][bf16] = Op::template of<SumH16<1, true>>;
  t[l2][bf16] = Op::template of<SumH16<2, true>>;
  t[linf][bf16] = Op::template of<MaxH16<true>>;
}

static RowKernels make_table(const char* isa) {
  RowKernels t{};
  t.isa = isa;
  constexpr int f32 = static_cast<int>(DType::kFloat32), f64 = static_cast<int>(DType::kFloat64),
                f16 = static_cast<int>(DType::kFloat16), bf16 = static_cast<int>(DType::kBFloat16);
  constexpr int l1 = 0, l2 = 1, linf = 2;
  // counted in lanes of their own width: fp32, fp16, bf16 as floats (vi), fp64 as doubles (vl)
  t.reduce[l1][f32] = plain<sum_f32<1, NoCounts>>;
  t.reduce[l2][f32] = plain<sum_f32<2, NoCounts>>;
  t.reduce[linf][f32] = plain<max_f32<NoCounts>>;
  t.reduce[l1][f64] = plain<sum_f64<1, NoCounts>>;
  t.reduce[l2][f64] = plain<sum_f64<2, NoCounts>>;
  t.reduce[linf][f64] = plain<max_f64<NoCounts>>;
  t.reduce[l1][f16] = plain<sum_h16<1, false, NoCounts>>;
  t.reduce[l2][f16] = plain<sum_h16<2, false, NoCounts>>;
  t.reduce[linf][f16] = plain<max_h16<false, NoCounts>>;
  t.reduce[l1][bf16] = plain<sum_h16<1, true, NoCounts>>;
  t.reduce[l2][bf16] = plain<sum_h16<2, true, NoCounts>>;
  t.reduce[linf][bf16] = plain<max_h16<true, NoCounts>>;
  t.stats[l1][f32] = counted<vi, sum_f32<1, LaneCounts<vi>>>;
  t.stats[l2][f32] = counted<vi, sum_f32<2, LaneCounts<vi>>>;
  t.stats[linf][f32] = counted<vi, max_f32<LaneCounts<vi>>>;
  t.stats[l1][f64] = counted<vl, sum_f64<1, LaneCounts<vl>>>;
  t.stats[l2][f64] = counted<vl, sum_f64<2, LaneCounts<vl>>>;
  t.stats[linf][f64] = counted<vl, max_f64<LaneCounts<vl>>>;
  t.stats[l1][f16] = counted<vi, sum_h16<1, false, LaneCounts<vi>>>;
  t.stats[l2][f16] = counted<vi, sum_h16<2, false, LaneCounts<vi>>>;
  t.stats[linf][f16] = counted<vi, max_h16<false, LaneCounts<vi>>>;
  t.stats[l1][bf16] = counted<vi, sum_h16<1, true, LaneCounts<vi>>>;
  t.stats[l2][bf16] = counted<vi, sum_h16<2, true, LaneCounts<vi>>>;
  t.stats[linf][bf16] = counted<vi, max_h16<true, LaneCounts<vi>>>;
  t.scale[f32] = scale_f32;
  t.scale[f64] = scale_f64;
  t.scale[f16] = scale_h16<false>;
  t.scale[bf16] = scale_h16<true>;
  t.clamp[f32] = clamp_f32;
  t.clamp[f64] = clamp_f64;
  t.clamp[f16] = clamp_h16<false>;
  t.clamp[bf16] = clamp_h16<true>;
  fill_row_kernels<RowsOf>(t.reduce_rows);
  fill_row_kernels<RowPairsOf>(t.reduce_row_pairs);
  t.scale_rows[f32] = scale_rows<scale_f32, 4>;
  t.scale_rows[f64] = scale_rows<scale_f64, 8>;
  t.scale_rows[f16] = scale_rows<scale_h16<false>, 2>;
  t.scale_rows[bf16] = scale_rows<scale_h16<true>, 2>;
  t.count_nonfinite[f32] = count_nonfinite<float, uint32_t, 0x7f800000u>;
  t.count_nonfinite[f64] = count_nonfinite<double, uint64_t, 0x7ff0000000000000ull>;
  t.count_nonfinite[f16] = count_nonfinite<uint16_t, uint16_t, 0x7c00>;
  t.count_nonfinite[bf16] = count_nonfinite<uint16_t, uint16_t, 0x7f80>;
  t.touch_read = touch_read;
  t.touch_write = touch_write;
  return t;
}

#undef FASTCLIP_VBYTES
