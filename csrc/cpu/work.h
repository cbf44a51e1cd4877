// The fused CPU passes over a TensorTable.
//
// Every tensor is cut into units of at most kUnitElems elements (cut again at
// segment boundaries: see csrc/common/segments.h); threads take units
// dynamically, and every reduction keeps one partial per unit, combined in a
// fixed order, so results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "../common/dtypes.h"
#include "../common/norm_kind.h"
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
  char* weight;                  // AGC: the parameter read beside the grad (nullptr: none)
  DType weight_dtype;
  bool one_stream;               // AGC's: cut into rows or read beside a weight; each run one stream (row_kernels)
};

// A unit is a range of one tensor.  Usually it lies in one segment; a unit of
// a tensor cut into small slices (AGC's rows) holds `pieces` whole slices of
// `piece` elements, slice k being segment `segment + k`: per-call costs are
// paid per unit, not per slice.
struct Unit {
  int32_t tensor;
  int32_t pieces;      // whole slices in the unit (1 for a unit inside one segment)
  int64_t begin, end;  // element range in the tensor's logical (row-major) order
  int64_t segment;     // of the first piece
  int64_t piece;       // elements per piece (end - begin when pieces == 1)
  int64_t partial;     // index of the unit's first partial result (one per piece)
};

// What reduce_segments gives, per segment (each array num_segments() long;
// the caller owns them, a null pointer skips that output).
struct SegmentSums {
  double* powers = nullptr;         // grads: sum of |x|^p (p = 1, 2) or max |x| (inf), NaN propagating
  double* weight_powers = nullptr;  // the weights (AGC)
  int64_t* counts = nullptr;        // [2]: elements that are inf or NaN, elements that are zero (all segments)
  double* coefs = nullptr;          // AGC in the pass: the coefficient of each row clipped there (see below)
};

class Work {
 public:
  explicit Work(const TensorTable& table);  // the table must outlive the Work

  // The p-norm of all elements of all tensors as one vector (sqrt applied for L2).
  double norm(NormKind kind, int nthreads) const;
  void scale(double coef, int nthreads) const;
  // torch's clamp_(lo, hi) (lo, hi as Python gives them: +-inf for no bound),
  // each bound rounded to every grad's dtype; stores only what changes.
  void clamp(double lo, double hi, int nthreads) const;
  // Per segment, the p-th power sums (or maxima) of the grads (and of the
  // weights), combined over each segment's units in unit order.  With `agc`
  // (AGC's clip_factor and eps), the rows that a work unit holds whole
  // (pieces > 1) are also clipped right after they are read, while still in
  // cache (their coefficients into out.coefs, where given):
  // scale_segments(..., rows_done = true) then leaves them alone.
  struct AgcArgs {
    double clip_factor, eps;
  };
  bool reduce_segments(NormKind kind, const SegmentSums& out, int nthreads, const AgcArgs* agc = nullptr) const;
  // Every unit of segment s times coefs[s], unless that is exactly 1 (with
  // rows_done, not the units of whole rows reduce_segments has clipped).
  // Returns whether anything was written.
  bool scale_segments(const double* coefs, int nthreads, bool rows_done = false) const;
  // Benchmark floors over the same bytes.
  uint64_t touch_read(int nthreads) const;
  void touch_write(int nthreads) const;

  int64_t total_bytes() const { return total_bytes_; }
  int64_t num_units() const { return static_cast<int64_t>(units_.size()); }
  int64_t num_segments() const { return num_segments_; }
  // Whether segment s holds a float64 grad or weight (its norm and coefficient are then float64).
  bool segment_is_wide(int64_t s) const { return (flags_[static_cast<size_t>(s)] & kWide) != 0; }
  // Whether segment s is a row that a work unit holds whole (pieces > 1): AGC clips those in reduce_segments.
  bool segment_is_packed(int64_t s) const { return (flags_[static_cast<size_t>(s)] & kPacked) != 0; }
  // True if the byte ranges of two tensors intersect (duplicates, aliasing views).
  bool tensors_overlap() const;

 private:
  int threads_for(int requested, bool writes) const;
  template <class F>
  void for_each_run(const Unit& unit, const F& f) const;

  // Calls f(first element, end, segment) for each piece of a unit.
  template <class F>
  static void for_each_piece(const Unit& unit, const F& f) {
    for (int32_t k = 0; k < unit.pieces; ++k) {
      const int64_t b = unit.begin + k * unit.piece;
      f(b, unit.pieces == 1 ? unit.end : b + unit.piece, unit.segment + k);
    }
  }

  std::vector<TensorSpec> tensors_;
  std::vector<Unit> units_;
  int64_t num_partials_ = 0;  // pieces of all units
  static constexpr uint8_t kWide = 1, kPacked = 2;
  std::vector<uint8_t> flags_;  // per segment
  int64_t num_segments_ = 1;
  int64_t total_bytes_ = 0;
};

// What finish_segments computes from the segment sums (outputs may be null).
struct FinishSpec {
  int32_t mode = 0;                   // CoefficientMode (csrc/common/coefficients.h)
  const double* max_norms = nullptr;  // kClipNorm: max_norms_len values, 1 (for all) or num_segments
  int64_t max_norms_len = 0;
  double clip_factor = 0.0, eps = 0.0;  // kAgc
  void* norms = nullptr;              // per segment: its norm, rounded as the segment works (float32 unless wide)
  int32_t norms_code = 0;             //   stored in this dtype (float32 or float64)
  double* coefs = nullptr;            // per segment: the coefficient
  bool packed_done = false;           // the coefficients of packed rows are in coefs already (AGC in one pass)
  void* total = nullptr;              // the norm of all segments together (0-dim), in total_code's dtype
  int32_t total_code = 0;
};

// Norms, coefficients and the total from reduce_segments' powers, in segment order.
void finish_segments(const Work& work, NormKind kind, const double* powers, const double* weight_powers,
                     const FinishSpec& spec);

// Stores v as a value of dtype `code` at p (fp16/bf16 rounded from float32, as c10 does).
void store_as(void* p, int32_t code, double v);

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
