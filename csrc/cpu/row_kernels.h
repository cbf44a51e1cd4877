// Kernels over one run of elements (contiguous, or with a constant stride),
// compiled once per instruction set and picked at run time.
//
// A "run" is the unit of work the executor (work.cpp) hands out: a pointer,
// an element count and an element stride.  Stride 1 takes the SIMD path.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../common/dtypes.h"
#include "../common/norm_kind.h"

namespace fastclip::cpu {

// For L1/L2: the sum of |x| or x*x (accumulated in double for fp32/fp64 and in
// float lanes for fp16/bf16).  For inf: max |x|, NaN if any element is NaN.
using ReduceFn = double (*)(const void* data, int64_t n, int64_t stride);
// The same value in the same pass, also adding to counts[1] the elements that
// are zero (counts[0], the non-finite ones, is count_nonfinite's: called only
// for runs whose value is not finite).
using StatsFn = double (*)(const void* data, int64_t n, int64_t stride, int64_t* counts);
using CountFn = int64_t (*)(const void* data, int64_t n, int64_t stride);
// The same over `rows` consecutive dense runs of `len` elements (AGC's small
// dim-0 slices), one value per row into out[]: per-call costs paid once.
using ReduceRowsFn = void (*)(const void* data, int64_t rows, int64_t len, double* out);
// AGC: grads and weights of one dtype, each row of both in one loop, the bits of two
// ReduceRowsFn calls.
using ReduceRowPairsFn = void (*)(const void* grads, const void* weights, int64_t rows, int64_t len, double* gout,
                                  double* wout);
// Row r times coefs[r], skipping rows whose coefficient is exactly 1.
using ScaleRowsFn = void (*)(void* data, int64_t rows, int64_t len, const double* coefs);
// x = x * coef, computed in the grad's opmath type (float, or double for fp64).
using ScaleFn = void (*)(void* data, int64_t n, int64_t stride, double coef);
// x = min(max(x, lo), hi) with torch's NaN rules; lo/hi are already values of
// the element type.  Stores only vectors in which some element changes.
using ClampFn = void (*)(void* data, int64_t n, int64_t stride, double lo, double hi);
// Benchmark floors: read every byte once, or read and write it back unchanged.
using TouchReadFn = uint64_t (*)(const void* data, int64_t nbytes);
using TouchWriteFn = void (*)(void* data, int64_t nbytes, uint64_t zero);

struct RowKernels {
  const char* isa;
  ReduceFn reduce[3][kNumDTypes];  // [NormKind - 1][DType]
  StatsFn stats[3][kNumDTypes];
  CountFn count_nonfinite[kNumDTypes];  // elements that are inf or NaN
  ReduceRowsFn reduce_rows[3][kNumDTypes];
  ReduceRowPairsFn reduce_row_pairs[3][kNumDTypes];
  ScaleRowsFn scale_rows[kNumDTypes];
  ScaleFn scale[kNumDTypes];
  ClampFn clamp[kNumDTypes];
  TouchReadFn touch_read;
  TouchWriteFn touch_write;
};

// The kernels of the active instruction set (the widest this CPU supports,
// unless select_isa() chose another).
const RowKernels& row_kernels();
// Names of the instruction sets this binary has and this CPU can run.
std::vector<std::string> available_isas();
// Returns false if `name` is unknown or not supported here.
bool select_isa(const std::string& name);

}  // namespace fastclip::cpu
