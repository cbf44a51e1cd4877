// The fused CPU passes over a TensorTable.
//
// Every tensor is cut into units of at most kUnitElems elements; threads take
// units dynamically, and every reduction keeps one partial per unit,
// combined in a fixed order, so results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "../common/dtypes.h"
#include "../common/tensor_table.h"
#include "row_kernels.h"

namespace fastclip::cpu {

constexpr int64_t kUnitElems = int64_t{1} << 15;
// Below this many bytes a pass runs on the calling thread only: waking the
// workers costs more than it saves.
constexpr int64_t kParallelMinBytes = int64_t{1} << 21;

struct TensorSpec {
  char* data;                    // element 0
  int64_t numel;
  DType dtype;
  const StridedLayout* strided;  // nullptr: a dense block of numel elements
};

struct Unit {
  int32_t tensor;
  int64_t begin, end;  // element range in the tensor's logical (row-major) order
};

class Work {
 public:
  explicit Work(const TensorTable& table);  // the table must outlive the Work

  // The p-norm of all elements of all tensors as one vector (sqrt applied for L2).
  double norm(NormKind kind, int nthreads) const;
  void scale(double coef, int nthreads) const;
  void clamp(double clip_value, int nthreads) const;
  // Benchmark floors over the same bytes.
  uint64_t touch_read(int nthreads) const;
  void touch_write(int nthreads) const;

  int64_t total_bytes() const { return total_bytes_; }
  int64_t num_units() const { return static_cast<int64_t>(units_.size()); }
  // True if the byte ranges of two tensors intersect (duplicates, aliasing views).
  bool tensors_overlap() const;

 private:
  int threads_for(int requested, bool writes) const;
  template <class F>
  void for_each_run(const Unit& unit, const F& f) const;

  std::vector<TensorSpec> tensors_;
  std::vector<Unit> units_;
  int64_t total_bytes_ = 0;
};

// torch's coefficient clamp(max_norm / (total + 1e-6), max=1), with torch's
// rounding: reciprocal, then multiply, in float (or double for fp64 results).
double clip_coefficient(double total, DType result_dtype, double max_norm);

struct ClipOutcome {
  double total;    // the norm as stored in the result dtype
  double coef;     // the coefficient used (NaN if not computed)
  bool aborted;    // error_if_nonfinite and the norm is not finite: nothing scaled
  bool scaled;     // a scaling pass ran (coef != 1)
};

// norm, coefficient and, unless the coefficient is exactly 1, the scaling pass.
// For fp16/bf16 results the coefficient uses the float32 total.
ClipOutcome clip_norm(const Work& work, NormKind kind, double max_norm, DType result_dtype,
                      bool error_if_nonfinite, int nthreads);

}  // namespace fastclip::cpu
