// fastclip's CUDA kernels and their launchers (interface: launch.h).
//
// Work: the grads, viewed as one concatenation, cut into units of kUnitElems
// elements (kernel_table.h).  A persistent grid, sized from the compiled
// kernel's occupancy, gives block b the units b, b + G, b + 2G, ...  Each
// block finds a unit's grad by a binary search over the table, which is a
// kernel parameter (__grid_constant__: read in place, never copied).
//
// clip_grad_norm_ is one cooperative launch when the table fits one launch:
//   1. every block reduces its units into one float64 partial;
//   2. grid.sync();
//   3. every block combines all partials in the same fixed order (so every
//      block gets the same bits, and runs repeat bit for bit), and computes
//      torch's clip coefficient; block 0 stores the total;
//   4. unless the coefficient is exactly 1, every block scales its units,
//      last first (the units read last are the ones still in L2).
// Otherwise (no cooperative launch, or a table of several chunks) the norm
// launches end with "last block done" (the last block to finish combines the
// partials, in the same order) and scale launches read the coefficient from
// device memory.  clip_grad_value_ is one launch that writes back only the
// 16-byte vectors in which some element changes.
//
// Accumulation: fp16/bf16 in float32 within a unit, fp32 and fp64 in float64;
// units and blocks combine in float64.  The inf-norm propagates NaN.
// 16-byte vector loads and stores wherever the grad is 16-byte aligned (a
// unit starts a multiple of 32 KB into its grad); 64-bit element offsets.

#ifdef FASTCLIP_CUDA_EMULATION  // fastclip._cuda_emu: the same code on the CPU (emulation.h)
#include "emulation.h"
#else
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/segment_table.h"
#include "../common/segments.h"
#include "launch.h"

namespace cg = cooperative_groups;

namespace fastclip::cuda {
namespace {

// ------------------------------------------------------------------ dtypes

// S: storage, Math: what scale and clamp compute in (torch's opmath), UnitAcc:
// a thread's accumulator within one unit.
// float32 and float64 compute in themselves and accumulate a unit in double.
template <class T>
struct Native {
  using S = T;
  using Math = T;
  using UnitAcc = double;
  static __device__ T widen(T s) { return s; }
  static __device__ T narrow(T m) { return m; }
};
using F32 = Native<float>;
using F64 = Native<double>;
struct F16 {
  using S = unsigned short;
  using Math = float;
  using UnitAcc = float;
  static __device__ float widen(S s) { return __half2float(__ushort_as_half(s)); }
  static __device__ S narrow(float m) { return __half_as_ushort(__float2half_rn(m)); }
};
struct BF16 {
  using S = unsigned short;
  using Math = float;
  using UnitAcc = float;
  static __device__ float widen(S s) { return __uint_as_float(static_cast<unsigned>(s) << 16); }
  static __device__ S narrow(float m) { return __bfloat16_as_ushort(__float2bfloat16_rn(m)); }
};

// Calls f(D{}) with D the traits of dtype `code`: the one switch over dtypes
// of every kernel (codes: csrc/common/dtypes.h).
template <class F>
__device__ __forceinline__ void with_dtype(int code, F&& f) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat32: f(F32{}); break;
    case DType::kFloat64: f(F64{}); break;
    case DType::kFloat16: f(F16{}); break;
    default: f(BF16{}); break;
  }
}

__device__ __forceinline__ int size_of(int code) {
  int size = 0;
  with_dtype(code, [&](auto d) { size = sizeof(typename decltype(d)::S); });
  return size;
}

template <class T>
__device__ __forceinline__ T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;  // NaN wins, as torch's max
}

__device__ __forceinline__ double combine(double a, double b, int kind) {
  return kind == kLinf ? nan_max(a, b) : a + b;
}

// ------------------------------------------------------------------ walking a unit

// Calls op(x) on the unit's elements in place, a 16-byte vector (or one
// element) at a time, and stores back what op says changed.
template <class D, class Op>
__device__ __forceinline__ void visit_unit(typename D::S* p, int64_t count, Op& op) {
  using S = typename D::S;
  constexpr int V = 16 / sizeof(S);
  struct alignas(16) Vec {
    S x[V];
  };
  const bool aligned = (reinterpret_cast<uintptr_t>(p) & 15) == 0;
  if (aligned && count == kUnitElems) {
    // The common case: a full unit, 8 to 32 vectors per thread, 4 loads in flight.
    constexpr int kPerThread = kUnitElems / V / kThreads;
    constexpr int kBatch = 4;
    static_assert(kPerThread % kBatch == 0, "unit must split into batches");
    Vec* vp = reinterpret_cast<Vec*>(p) + threadIdx.x;
#pragma unroll
    for (int b = 0; b < kPerThread; b += kBatch) {
      Vec v[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) v[j] = vp[(b + j) * kThreads];
#pragma unroll
      for (int j = 0; j < kBatch; ++j)
        if (op(v[j].x)) vp[(b + j) * kThreads] = v[j];
    }
    return;
  }
  // A grad's last unit, or a grad that is not 16-byte aligned.
  int64_t done = 0;
  if (aligned) {
    Vec* vp = reinterpret_cast<Vec*>(p);
    const int64_t vectors = count / V;
    for (int64_t i = threadIdx.x; i < vectors; i += kThreads) {
      Vec v = vp[i];
      if (op(v.x)) vp[i] = v;
    }
    done = vectors * V;
  }
  for (int64_t i = done + threadIdx.x; i < count; i += kThreads) {
    S x[1] = {p[i]};
    if (op(x)) p[i] = x[0];
  }
}

template <class D, int KIND>
struct NormOp {
  typename D::UnitAcc acc = 0;
  template <int N>
  __device__ __forceinline__ bool operator()(typename D::S (&x)[N]) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const auto v = static_cast<typename D::UnitAcc>(D::widen(x[k]));
      const auto a = v < 0 ? -v : v;
      if (KIND == kL1) acc += a;
      else if (KIND == kL2) acc = fma(v, v, acc);
      else acc = nan_max(acc, a);
    }
    return false;
  }
};

// NormOp, also counting non-finite elements and zeros (grad_stats).
template <class D, int KIND>
struct StatsOp : NormOp<D, KIND> {
  unsigned long long nonfinite = 0, zeros = 0;
  template <int N>
  __device__ __forceinline__ bool operator()(typename D::S (&x)[N]) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const auto v = D::widen(x[k]);
      nonfinite += (v - v) != (v - v);  // inf - inf and NaN - NaN are NaN
      zeros += v == 0;
    }
    return NormOp<D, KIND>::operator()(x);
  }
};

template <class D>
struct ScaleOp {
  typename D::Math coef;
  template <int N>
  __device__ __forceinline__ bool operator()(typename D::S (&x)[N]) {
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] = D::narrow(D::widen(x[k]) * coef);
    return true;
  }
};

// torch's clamp_min_(lo) then clamp_max_(hi); NaN elements never change.
template <class D>
struct ClampOp {
  typename D::Math lo, hi;
  template <int N>
  __device__ __forceinline__ bool operator()(typename D::S (&x)[N]) {
    bool changed = false;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const auto v = D::widen(x[k]);
      auto y = v < lo ? lo : v;
      y = y > hi ? hi : y;
      if (v < lo || v > hi) {
        x[k] = D::narrow(y);
        changed = true;
      }
    }
    return changed;
  }
};

// This thread's share of a unit's norm; with `count_them`, it also adds this
// thread's non-finite elements and zeros to counts[0] and counts[1].
template <class D, int KIND>
__device__ __forceinline__ double unit_norm(void* p, int64_t count, unsigned long long* counts, bool count_them) {
  if (count_them) {
    StatsOp<D, KIND> op;
    visit_unit<D>(static_cast<typename D::S*>(p), count, op);
    counts[0] += op.nonfinite;
    counts[1] += op.zeros;
    return static_cast<double>(op.acc);
  }
  NormOp<D, KIND> op;
  visit_unit<D>(static_cast<typename D::S*>(p), count, op);
  return static_cast<double>(op.acc);
}

__device__ __forceinline__ double unit_norm(int code, void* p, int64_t count, int kind,
                                            unsigned long long* counts = nullptr, bool count_them = false) {
  double part = 0.0;
  with_dtype(code, [&](auto d) {
    using D = decltype(d);
    switch (kind) {
      case kL1: part = unit_norm<D, kL1>(p, count, counts, count_them); break;
      case kL2: part = unit_norm<D, kL2>(p, count, counts, count_them); break;
      default: part = unit_norm<D, kLinf>(p, count, counts, count_them); break;
    }
  });
  return part;
}

// x *= coef over a unit (in float32 for fp32/fp16/bf16, float64 for fp64, like torch's _foreach_mul_).
__device__ __forceinline__ void unit_scale(int code, void* p, int64_t count, double coef) {
  with_dtype(code, [&](auto d) {
    using D = decltype(d);
    ScaleOp<D> op{static_cast<typename D::Math>(coef)};
    visit_unit<D>(static_cast<typename D::S*>(p), count, op);
  });
}

// Where unit u of the table is: (first element's address, element count, dtype code).
struct UnitRef {
  void* p;
  int64_t count;
  int code;
};

template <int CAP>
__device__ __forceinline__ UnitRef unit_ref(const KernelTable<CAP>& t, int32_t u) {
  const int r = t.locate(u);
  const int code = t.code(r);
  const int64_t start = static_cast<int64_t>(u - t.first_unit[r]) * kUnitElems;
  const int64_t left = t.numel(r) - start;
  return {reinterpret_cast<char*>(t.address[r]) + start * size_of(code), left < kUnitElems ? left : kUnitElems, code};
}

// ------------------------------------------------------------------ block-level pieces

// The block's combined value, in thread 0 (fixed order: deterministic).
__device__ double block_reduce(double v, int kind) {
  __shared__ double warp_values[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = combine(v, __shfl_down_sync(0xffffffffu, v, o), kind);
  __syncthreads();  // warp_values may still be read by an earlier call
  if (lane == 0) warp_values[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_values[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = combine(v, __shfl_down_sync(0xffffffffu, v, o), kind);
  }
  return v;
}

template <int CAP>
__device__ double norm_of_my_units(const KernelTable<CAP>& t, int kind) {
  double acc = 0.0;
  for (int64_t u = blockIdx.x; u < t.units; u += gridDim.x) {  // 64-bit: u + G never wraps
    const UnitRef w = unit_ref(t, static_cast<int32_t>(u));
    acc = combine(acc, unit_norm(w.code, w.p, w.count, kind), kind);
  }
  return acc;
}

// This block's units, last first, times coef (in float32 for fp32/fp16/bf16,
// float64 for fp64, like torch's _foreach_mul_).
template <int CAP>
__device__ void scale_my_units(const KernelTable<CAP>& t, double coef) {
  if (static_cast<int32_t>(blockIdx.x) >= t.units) return;
  const int64_t mine = (t.units - 1 - static_cast<int64_t>(blockIdx.x)) / gridDim.x + 1;
  for (int64_t k = mine - 1; k >= 0; --k) {
    const UnitRef w = unit_ref(t, static_cast<int32_t>(blockIdx.x + k * gridDim.x));
    unit_scale(w.code, w.p, w.count, coef);
  }
}

__device__ double load_scalar(const void* p, int code) {
  double v = 0.0;
  with_dtype(code, [&](auto d) {
    using D = decltype(d);
    v = static_cast<double>(D::widen(*static_cast<const typename D::S*>(p)));
  });
  return v;
}

// v stored as dtype `code` (fp16/bf16 through float32, as c10 rounds a double).
__device__ void store_scalar(void* p, int code, double v) {
  with_dtype(code, [&](auto d) {
    using D = decltype(d);
    *static_cast<typename D::S*>(p) = D::narrow(static_cast<typename D::Math>(v));
  });
}

// ------------------------------------------------------------------ kernels

enum Finish : int {
  kPartialsOnly = 0,  // an early chunk of a long table: leave the partials
  kLastBlock = 1,     // the last block to finish combines all partials
  kCooperative = 2,   // grid.sync, every block combines, then scales
};

struct NormArgs {
  double* partials;
  unsigned int* counter;
  void* total_out;
  double* results;
  double max_norm;
  int32_t partial_base;  // this launch's first slot in partials
  int32_t n_partials;    // slots to combine when finishing (all launches so far)
  int32_t kind;
  int32_t result_code;
  int32_t finish;
};

template <int CAP>
__global__ void __launch_bounds__(kThreads) norm_kernel(const __grid_constant__ KernelTable<CAP> t, const NormArgs a) {
  __shared__ double s_coef;
  __shared__ bool s_last;
  const double mine = block_reduce(norm_of_my_units(t, a.kind), a.kind);
  if (threadIdx.x == 0) a.partials[a.partial_base + blockIdx.x] = mine;
  if (a.finish == kPartialsOnly) return;
  if (a.finish == kLastBlock) {
    if (threadIdx.x == 0) {
      __threadfence();  // this block's partial is visible before it is counted
      s_last = atomicAdd(a.counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
  } else {
    cg::this_grid().sync();
  }
  double raw = 0.0;
  for (int i = threadIdx.x; i < a.n_partials; i += kThreads) raw = combine(raw, __ldcg(a.partials + i), a.kind);
  raw = block_reduce(raw, a.kind);
  if (threadIdx.x == 0) {
    const double total = a.kind == kL2 ? sqrt(raw) : raw;  // float64 sqrt: correctly rounded
    const double coef = clip_coefficient(total, a.result_code == 1, a.max_norm);
    s_coef = coef;
    if (blockIdx.x == 0 || a.finish == kLastBlock) {
      store_scalar(a.total_out, a.result_code, total);
      a.results[0] = coef;
      a.results[1] = total;
    }
    if (a.finish == kLastBlock) *a.counter = 0;  // tidy (each norm sequence also sets it to 0 first)
  }
  if (a.finish != kCooperative) return;
  __syncthreads();
  const double coef = s_coef;
  if (coef != 1.0) scale_my_units(t, coef);  // x * 1 == x: skipping moves one read of the grads instead of three
}

template <int CAP>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(const __grid_constant__ KernelTable<CAP> t, const void* coef_ptr, int coef_code) {
  const double coef = load_scalar(coef_ptr, coef_code);
  if (coef != 1.0) scale_my_units(t, coef);
}

// The bounds of dtype D, as torch rounds them for it.
__device__ __forceinline__ ClampOp<F32> clamp_op(F32, const ClampBounds& b) { return {b.lo32, b.hi32}; }
__device__ __forceinline__ ClampOp<F64> clamp_op(F64, const ClampBounds& b) { return {b.lo64, b.hi64}; }
__device__ __forceinline__ ClampOp<F16> clamp_op(F16, const ClampBounds& b) { return {b.lo16, b.hi16}; }
__device__ __forceinline__ ClampOp<BF16> clamp_op(BF16, const ClampBounds& b) { return {b.lo_bf16, b.hi_bf16}; }

template <int CAP>
__global__ void __launch_bounds__(kThreads) clamp_kernel(const __grid_constant__ KernelTable<CAP> t, const ClampBounds b) {
  for (int64_t u = blockIdx.x; u < t.units; u += gridDim.x) {  // 64-bit: u + G never wraps
    const UnitRef w = unit_ref(t, static_cast<int32_t>(u));
    with_dtype(w.code, [&](auto d) {
      using D = decltype(d);
      auto op = clamp_op(d, b);
      visit_unit<D>(static_cast<typename D::S*>(w.p), w.count, op);
    });
  }
}

// ------------------------------------------------------------------ the segmented primitives
//
// Over the segment table (csrc/common/segment_table.h) in device memory:
// segment_reduce_kernel takes units b, b + G, ...; each block writes its
// unit's partial, and the last unit of a segment to finish (counted with an
// atomic per segment) folds that segment's partials in unit order, in a
// fixed thread assignment, so results repeat bit for bit; with `finish` it
// also computes the segment's coefficient (csrc/common/coefficients.h).
// segment_finish_kernel does the coefficients alone (after an all-reduce of
// the powers), segment_apply_kernel multiplies each unit by its segment's
// coefficient unless that is exactly 1.

struct SegmentUnit {
  char* p;         // the unit's first grad element
  char* w;         // the same element of the weight (AGC)
  int64_t count;
  int64_t segment;
  int code, wcode;
};

__device__ __forceinline__ SegmentUnit segment_unit(const SegmentArgs& a, int64_t u) {
  const int64_t R = a.rows;
  const int64_t* first = a.table;
  int64_t lo = 0, hi = R;  // first[lo] <= u < first[hi] (hi == R: past the end)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    if (first[mid] <= u) lo = mid; else hi = mid;
  }
  const int code = static_cast<int>(a.table[3 * R + lo]), wcode = static_cast<int>(a.table[7 * R + lo]);
  const UnitSpan span = unit_span(u - first[lo], a.table[4 * R + lo], kUnitElems);
  char* address = reinterpret_cast<char*>(a.table[R + lo]);
  char* weight = reinterpret_cast<char*>(a.table[6 * R + lo]);
  return {address + span.start * size_of(code), weight + span.start * size_of(wcode), span.count,
          a.table[5 * R + lo] + span.slice, code, wcode};
}

__device__ unsigned long long block_sum(unsigned long long v) {
  __shared__ unsigned long long warp_values[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) warp_values[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_values[lane] : 0ull;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

// values[first, first + count) folded by the block in a fixed order, in thread 0.
__device__ double fold_range(const double* values, int64_t first, int64_t count, int kind) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) acc = combine(acc, __ldcg(values + first + i), kind);
  return block_reduce(acc, kind);
}

// Segment s's coefficient and norm from its folded powers (one thread).
__device__ void finish_segment(const SegmentArgs& a, int64_t s, double power, double weight_power) {
  const bool wide = a.table[kSegmentColumns * a.rows + a.segments + 1 + s] != 0;
  if (a.coefs != nullptr) {
    const double max_norm = a.mode == kClipNorm ? a.max_norms[a.max_norms_len == 1 ? 0 : s] : 0.0;
    a.coefs[s] = segment_coefficient(a.mode, a.kind, wide, power, weight_power, max_norm, a.clip_factor, a.eps);
  }
  if (a.norms != nullptr)
    store_scalar(static_cast<char*>(a.norms) + s * size_of(a.norms_code), a.norms_code,
                 segment_norm(norm_from_power(power, a.kind), wide));
}

__global__ void __launch_bounds__(kThreads) segment_reduce_kernel(const SegmentArgs a) {
  __shared__ bool s_last, s_total;
  const int64_t* first_units = a.table + kSegmentColumns * a.rows;
  for (int64_t u = blockIdx.x; u < a.units; u += gridDim.x) {
    const SegmentUnit w = segment_unit(a, u);
    // (read from the table: ld.global, not generic loads; the same hint for the weight costs 4 registers)
    __builtin_assume(__isGlobal(w.p));
    unsigned long long counts[2] = {0, 0};  // (its address always passed, so it stays in registers)
    const double part = block_reduce(unit_norm(w.code, w.p, w.count, a.kind, counts, a.counts != nullptr), a.kind);
    double weight_part = 0.0;
    if (a.weight_powers != nullptr) weight_part = block_reduce(unit_norm(w.wcode, w.w, w.count, a.kind), a.kind);
    if (a.counts != nullptr) {
      counts[0] = block_sum(counts[0]);
      counts[1] = block_sum(counts[1]);
    }
    if (threadIdx.x == 0) {
      a.unit_parts[u] = part;
      if (a.weight_powers != nullptr) a.unit_weight_parts[u] = weight_part;
      if (a.counts != nullptr) {  // integers: any order gives the same sums
        atomicAdd(a.counts, counts[0]);
        atomicAdd(a.counts + 1, counts[1]);
      }
      __threadfence();  // this unit's partials are visible before it is counted
      const int64_t units = first_units[w.segment + 1] - first_units[w.segment];
      s_last = atomicAdd(a.segment_counter + w.segment, 1u) == static_cast<unsigned>(units - 1);
    }
    __syncthreads();
    if (s_last) {  // the segment's last unit: fold it
      __threadfence();
      const int64_t s = w.segment, first = first_units[s], units = first_units[s + 1] - first;
      const double power = fold_range(a.unit_parts, first, units, a.kind);
      const double weight_power = a.weight_powers != nullptr ? fold_range(a.unit_weight_parts, first, units, a.kind) : 0.0;
      if (threadIdx.x == 0) {
        a.powers[s] = power;
        if (a.weight_powers != nullptr) a.weight_powers[s] = weight_power;
        if (a.finish) finish_segment(a, s, power, weight_power);
        a.segment_counter[s] = 0;
        s_total = false;
        if (a.total != nullptr) {
          __threadfence();
          s_total = atomicAdd(a.done_counter, 1u) == static_cast<unsigned>(a.filled - 1);
        }
      }
      __syncthreads();
      if (s_total) {  // the last segment folded: the total, over every segment in order
        __threadfence();
        const double whole = fold_range(a.powers, 0, a.segments, a.kind);
        if (threadIdx.x == 0) {
          store_scalar(a.total, a.total_code, norm_from_power(whole, a.kind));
          *a.done_counter = 0;
        }
      }
    }
    __syncthreads();  // s_last and s_total are the next unit's
  }
}

__global__ void __launch_bounds__(kThreads) segment_finish_kernel(const SegmentArgs a) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; s < a.segments;
       s += static_cast<int64_t>(gridDim.x) * kThreads)
    finish_segment(a, s, a.powers[s], a.weight_powers != nullptr ? a.weight_powers[s] : 0.0);
  if (a.total != nullptr && blockIdx.x == 0) {
    const double whole = fold_range(a.powers, 0, a.segments, a.kind);
    if (threadIdx.x == 0) store_scalar(a.total, a.total_code, norm_from_power(whole, a.kind));
  }
}

__global__ void __launch_bounds__(kThreads) segment_apply_kernel(const SegmentArgs a) {
  if (static_cast<int64_t>(blockIdx.x) >= a.units) return;
  const int64_t mine = (a.units - 1 - static_cast<int64_t>(blockIdx.x)) / gridDim.x + 1;
  for (int64_t k = mine - 1; k >= 0; --k) {  // last first: the units the reduce read last are in L2
    const SegmentUnit w = segment_unit(a, blockIdx.x + k * gridDim.x);
    const double coef = a.coefs[w.segment];
    __builtin_assume(__isGlobal(w.p));  // (read from the table: ld.global, not generic loads, as the scale kernel's)
    if (coef != 1.0) unit_scale(w.code, w.p, w.count, coef);  // x * 1 == x: nothing to write
  }
}

// ------------------------------------------------------------------ host side

void check(cudaError_t err, const char* call);

// Makes `device` current for a call and restores the previous device after:
// the current context is per thread and shared with torch's own CUDA runtime,
// so leaving another device current would move torch's current device too.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
    else previous_ = -1;
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

void check(cudaError_t err, const char* call) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fastclip._cuda: ") + call + " failed: " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
}

template <class Kernel>
int blocks_per_sm(Kernel kernel, const char* name) {
  int n = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0), name);
  if (n < 1) throw std::runtime_error(std::string("fastclip._cuda: ") + name + " fits no block on an SM");
  return n;
}

DeviceSetup make_setup(int device) {
  DeviceSetup s;
  s.device = device;
  DeviceGuard guard(device);
  cudaDeviceProp prop;
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  s.name = prop.name;
  s.major = prop.major;
  s.minor = prop.minor;
  s.sms = prop.multiProcessorCount;
  int coop = 0, driver = 0;
  check(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device), "cudaDeviceGetAttribute");
  check(cudaDriverGetVersion(&driver), "cudaDriverGetVersion");
  s.cooperative = coop != 0;
  s.large_params = driver >= 12010 && prop.major >= 7;
  // Occupancy of the kernels as compiled for this device (this also fails
  // clearly when the binary has no code for it).  Both table sizes compile to
  // the same code; take the smaller occupancy so one grid serves both.
  const char* occupancy = "cudaOccupancyMaxActiveBlocksPerMultiprocessor";
  s.norm_grid = s.sms * std::min(blocks_per_sm(norm_kernel<kSmallRows>, occupancy),
                                 blocks_per_sm(norm_kernel<kLargeRows>, occupancy));
  s.scale_grid = s.sms * std::min(blocks_per_sm(scale_kernel<kSmallRows>, occupancy),
                                  blocks_per_sm(scale_kernel<kLargeRows>, occupancy));
  s.clamp_grid = s.sms * std::min(blocks_per_sm(clamp_kernel<kSmallRows>, occupancy),
                                  blocks_per_sm(clamp_kernel<kLargeRows>, occupancy));
  s.segment_grid = s.sms * std::min(blocks_per_sm(segment_reduce_kernel, occupancy),
                                    blocks_per_sm(segment_apply_kernel, occupancy));
  cudaFuncAttributes attr;
  check(cudaFuncGetAttributes(&attr, norm_kernel<kLargeRows>), "cudaFuncGetAttributes");
  s.norm_registers = attr.numRegs;
  return s;
}

std::mutex setups_mutex;
std::vector<std::unique_ptr<DeviceSetup>> setups;

// The chunks a table is launched in, and the table size (rows per launch) used.
struct Plan {
  const DeviceSetup* setup;
  int cap;
  std::vector<Chunk> chunks;
};

Plan plan_for(int device, const UnitColumns& c, int64_t units) {
  validate(c, units);
  const DeviceSetup& s = device_setup(device);
  const int cap = c.rows <= kSmallRows || !s.large_params ? kSmallRows : kLargeRows;
  return {&s, cap, chunks_of(c, units, cap)};
}

int grid_for(int max_grid, const Chunk& chunk) {
  return static_cast<int>(chunk.units < max_grid ? chunk.units : max_grid);
}

int64_t partials_of(const Plan& plan) {  // one per block of every norm launch
  int64_t n = 0;
  for (const Chunk& chunk : plan.chunks) n += grid_for(plan.setup->norm_grid, chunk);
  return n;
}

// Launches kernel(*args...) (args point at the kernel's parameters, the
// table among them: passed by pointer, so its 32 KB are copied once, by the driver).
#ifdef FASTCLIP_CUDA_EMULATION
template <class... Params, size_t... I>
void call_kernel(void (*kernel)(Params...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<Params>*>(args[I])...);
}

template <class... Params>
cudaError_t try_launch(void (*kernel)(Params...), int grid, cudaStream_t, bool cooperative, void** args) {
  emu::GridRun(grid, kThreads, cooperative).run([&] { call_kernel(kernel, args, std::index_sequence_for<Params...>{}); });
  return cudaSuccess;
}
#else
template <class... Params>
cudaError_t try_launch(void (*kernel)(Params...), int grid, cudaStream_t stream, bool cooperative, void** args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  config.attrs = attr;
  config.numAttrs = cooperative ? 1 : 0;
  return cudaLaunchKernelExC(&config, reinterpret_cast<const void*>(kernel), args);
}
#endif

template <class... Params>
void launch(void (*kernel)(Params...), int grid, cudaStream_t stream, const char* what, void** args) {
  check(try_launch(kernel, grid, stream, false, args), what);
}

template <int CAP>
int clip_norm_with(const Plan& plan, cudaStream_t stream, const UnitColumns& c, const NormJob& job) {
  const DeviceSetup& s = *plan.setup;
  const size_t n = plan.chunks.size();
  auto table = std::make_unique<KernelTable<CAP>>();  // 32 KB: not on the stack
  NormArgs a;
  a.partials = job.partials;
  a.counter = job.counter;
  a.total_out = job.total_out;
  a.results = job.results;
  a.max_norm = job.max_norm;
  a.kind = job.kind;
  a.result_code = job.result_code;
  void* args[] = {table.get(), &a};

  if (job.scale && job.allow_cooperative && s.cooperative && n == 1) {
    fill(*table, c, plan.chunks[0]);
    const int grid = grid_for(s.norm_grid, plan.chunks[0]);
    a.partial_base = 0;
    a.n_partials = grid;
    a.finish = kCooperative;
    const cudaError_t err = try_launch(norm_kernel<CAP>, grid, stream, true, args);
    if (err == cudaSuccess) return 1;
    // Refused (e.g. fewer SMs under MPS than the occupancy promised): take the two launches.
    if (err != cudaErrorCooperativeLaunchTooLarge && err != cudaErrorNotSupported)
      check(err, "cudaLaunchKernelExC (cooperative norm_kernel)");
    cudaGetLastError();  // not sticky: clear it
  }

  // The last block of the last norm launch finds itself with the counter,
  // which must start at 0: set it here, on the stream, so that the count
  // holds in every CUDA graph too (a graph may replay before any other does).
  check(cudaMemsetAsync(job.counter, 0, sizeof(unsigned int), stream), "cudaMemsetAsync");
  int launches = 0;
  int32_t base = 0;
  for (size_t k = 0; k < n; ++k) {
    fill(*table, c, plan.chunks[k]);
    const int grid = grid_for(s.norm_grid, plan.chunks[k]);
    a.partial_base = base;
    a.n_partials = base + grid;
    a.finish = k + 1 < n ? kPartialsOnly : kLastBlock;
    launch(norm_kernel<CAP>, grid, stream, "cudaLaunchKernelExC (norm_kernel)", args);
    ++launches;
    base += grid;
  }
  if (job.scale) {
    const void* coef = job.results;  // [0]: the coefficient, float64
    int coef_code = 1;
    void* scale_args[] = {table.get(), &coef, &coef_code};
    for (size_t k = n; k-- > 0;) {  // last chunk first: its grads were read last
      fill(*table, c, plan.chunks[k]);
      launch(scale_kernel<CAP>, grid_for(s.scale_grid, plan.chunks[k]), stream, "cudaLaunchKernelExC (scale_kernel)",
             scale_args);
      ++launches;
    }
  }
  return launches;
}

template <int CAP>
int scale_with(const Plan& plan, cudaStream_t stream, const UnitColumns& c, const void* coef, int coef_code) {
  // (coef and coef_code are copies: the launch takes their addresses)
  auto table = std::make_unique<KernelTable<CAP>>();
  int launches = 0;
  for (const Chunk& chunk : plan.chunks) {
    fill(*table, c, chunk);
    void* args[] = {table.get(), &coef, &coef_code};
    launch(scale_kernel<CAP>, grid_for(plan.setup->scale_grid, chunk), stream, "cudaLaunchKernelExC (scale_kernel)",
           args);
    ++launches;
  }
  return launches;
}

template <int CAP>
int clamp_with(const Plan& plan, cudaStream_t stream, const UnitColumns& c, const ClampBounds& bounds) {
  auto table = std::make_unique<KernelTable<CAP>>();
  int launches = 0;
  for (const Chunk& chunk : plan.chunks) {
    fill(*table, c, chunk);
    ClampBounds b = bounds;
    void* args[] = {table.get(), &b};
    launch(clamp_kernel<CAP>, grid_for(plan.setup->clamp_grid, chunk), stream, "cudaLaunchKernelExC (clamp_kernel)",
           args);
    ++launches;
  }
  return launches;
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

}  // namespace

RuntimeStatus runtime_status() {
  RuntimeStatus r;
  cudaRuntimeGetVersion(&r.runtime_version);
  cudaDriverGetVersion(&r.driver_version);
  const cudaError_t err = cudaGetDeviceCount(&r.devices);
  if (err != cudaSuccess) {
    r.devices = 0;
    r.error = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // not sticky: clear it
  } else if (r.devices == 0) {
    r.error = "no CUDA device";
  }
  return r;
}

const DeviceSetup& device_setup(int device) {
  std::lock_guard<std::mutex> lock(setups_mutex);
  if (device < 0 || device > 1024) throw std::invalid_argument("fastclip._cuda: bad device index");
  if (setups.size() <= static_cast<size_t>(device)) setups.resize(device + 1);
  if (!setups[device]) setups[device] = std::make_unique<DeviceSetup>(make_setup(device));
  return *setups[device];
}

int clip_norm(int device, uintptr_t stream, const UnitColumns& c, int64_t units, const NormJob& job) {
  const Plan plan = plan_for(device, c, units);
  if (plan.chunks.empty()) return 0;
  if (partials_of(plan) > job.partials_capacity)
    throw std::invalid_argument("fastclip._cuda: the partials buffer is too small for this table");
  DeviceGuard guard(device);
  return plan.cap == kSmallRows ? clip_norm_with<kSmallRows>(plan, as_stream(stream), c, job)
                                : clip_norm_with<kLargeRows>(plan, as_stream(stream), c, job);
}

int scale(int device, uintptr_t stream, const UnitColumns& c, int64_t units, const void* coef, int coef_code) {
  if (coef_code < 0 || coef_code > 3) throw std::invalid_argument("fastclip._cuda: bad coefficient dtype code");
  const Plan plan = plan_for(device, c, units);
  DeviceGuard guard(device);
  return plan.cap == kSmallRows ? scale_with<kSmallRows>(plan, as_stream(stream), c, coef, coef_code)
                                : scale_with<kLargeRows>(plan, as_stream(stream), c, coef, coef_code);
}

int clamp(int device, uintptr_t stream, const UnitColumns& c, int64_t units, const ClampBounds& bounds) {
  const Plan plan = plan_for(device, c, units);
  DeviceGuard guard(device);
  return plan.cap == kSmallRows ? clamp_with<kSmallRows>(plan, as_stream(stream), c, bounds)
                                : clamp_with<kLargeRows>(plan, as_stream(stream), c, bounds);
}

namespace {

// One launch of a segmented kernel over `items` (units or segments): at most
// one block per item, at most the device's grid; 0 launches when there are none.
int launch_segments(void (*kernel)(SegmentArgs), const char* what, int device, uintptr_t stream,
                    const SegmentArgs& args, int64_t items) {
  if (items == 0) return 0;
  const DeviceSetup& s = device_setup(device);
  DeviceGuard guard(device);
  SegmentArgs a = args;
  void* params[] = {&a};
  launch(kernel, static_cast<int>(std::min<int64_t>(items, s.segment_grid)), as_stream(stream), what, params);
  return 1;
}

}  // namespace

int segment_reduce(int device, uintptr_t stream, const SegmentArgs& args) {
  if (args.units > 0) {
    // The last unit of each segment (and the last segment) finds itself with
    // these counters, which must start at 0: set here, on the stream, as the
    // norm launch does, so that the counts hold in every CUDA graph too (a
    // workspace first used in one capture may be used next by another graph,
    // or by eager code, before that graph ever replays).
    DeviceGuard guard(device);
    check(cudaMemsetAsync(args.segment_counter, 0, sizeof(unsigned int) * static_cast<size_t>(args.segments),
                          as_stream(stream)),
          "cudaMemsetAsync");
    check(cudaMemsetAsync(args.done_counter, 0, sizeof(unsigned int), as_stream(stream)), "cudaMemsetAsync");
  }
  return launch_segments(segment_reduce_kernel, "cudaLaunchKernelExC (segment_reduce_kernel)", device, stream, args,
                         args.units);
}

int segment_finish(int device, uintptr_t stream, const SegmentArgs& args) {
  return launch_segments(segment_finish_kernel, "cudaLaunchKernelExC (segment_finish_kernel)", device, stream, args,
                         (args.segments + kThreads - 1) / kThreads);
}

int segment_apply(int device, uintptr_t stream, const SegmentArgs& args) {
  return launch_segments(segment_apply_kernel, "cudaLaunchKernelExC (segment_apply_kernel)", device, stream, args,
                         args.units);
}

}  // namespace fastclip::cuda
