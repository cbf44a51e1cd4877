#include "work.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "../common/accumulate.h"
#include "../common/coefficients.h"
#include "../common/segments.h"
#include "thread_pool.h"

namespace fastclip::cpu {
namespace {

int64_t span_elements(const TensorSpec& t) {
  if (t.strided == nullptr) return t.numel;
  int64_t last = 0;
  for (int d = 0; d < t.strided->ndim; ++d) last += (t.strided->sizes[d] - 1) * t.strided->strides[d];
  return last + 1;
}

}  // namespace

Work::Work(const TensorTable& table) {
  table.validate();
  const size_t n = table.size();
  if (n > static_cast<size_t>(INT32_MAX)) throw std::invalid_argument("tensor table: too many tensors");
  const bool segmented = table.segmented(), weights = table.has_weights();
  tensors_.reserve(n);
  num_segments_ = segmented ? table.num_segments : 1;
  flags_.assign(static_cast<size_t>(num_segments_), 0);
  int64_t nunits = 0;
  for (size_t i = 0; i < n; ++i) {
    const int32_t layout = table.layout[i];
    const DType dtype = static_cast<DType>(table.dtypes[i]);
    const DType weight_dtype = weights ? static_cast<DType>(table.weight_dtypes[i]) : dtype;
    tensors_.push_back(TensorSpec{reinterpret_cast<char*>(static_cast<uintptr_t>(table.ptrs[i])), table.numels[i],
                                  dtype, layout < 0 ? nullptr : &table.strided[static_cast<size_t>(layout)],
                                  weights ? reinterpret_cast<char*>(static_cast<uintptr_t>(table.weight_ptrs[i])) : nullptr,
                                  weight_dtype, segmented && (weights || table.slices_of(i) > 1)});
    nunits += (table.numels[i] + kUnitElems - 1) / kUnitElems;
    if (segmented && table.numels[i] > 0) {
      const int64_t slices = table.slices_of(i);
      nunits += slices;  // (at most one more unit per slice)
      // A segment with a float64 grad or weight works in float64 (its slices too).
      if (dtype == DType::kFloat64 || weight_dtype == DType::kFloat64) {
        for (int64_t k = 0; k < slices; ++k) flags_[static_cast<size_t>(table.segment_of(i) + k)] |= kWide;
      }
    } else if (dtype == DType::kFloat64 && table.numels[i] > 0) {
      flags_[0] |= kWide;
    }
  }
  units_.reserve(static_cast<size_t>(nunits));
  for (size_t i = 0; i < n; ++i) {
    const TensorSpec& t = tensors_[i];
    total_bytes_ += t.numel * element_size(t.dtype);
    const int64_t len = segmented ? table.slice_of(i) : t.numel, first = segmented ? table.first_segment[i] : 0;
    if (len >= t.numel) {  // one segment (the usual case: no division per unit)
      for (int64_t b = 0; b < t.numel; b += kUnitElems) {
        const int64_t e = std::min(b + kUnitElems, t.numel);
        units_.push_back(Unit{static_cast<int32_t>(i), 1, b, e, first, e - b, num_partials_++});
      }
    } else if (len <= kUnitElems / 2) {  // small slices: several whole ones per unit
      const int64_t per = kUnitElems / len, slices = t.numel / len;
      for (int64_t k = 0; k < slices; k += per) {
        const int32_t pieces = static_cast<int32_t>(std::min(per, slices - k));
        units_.push_back(Unit{static_cast<int32_t>(i), pieces, k * len, (k + pieces) * len, first + k, len,
                              num_partials_});
        num_partials_ += pieces;
        if (pieces > 1) {
          for (int32_t r = 0; r < pieces; ++r) flags_[static_cast<size_t>(first + k + r)] |= kPacked;
        }
      }
    } else {  // large slices: each cut into units
      for (int64_t k = 0, units = units_of_tensor(t.numel, len, kUnitElems); k < units; ++k) {
        const UnitSpan span = unit_span(k, len, kUnitElems);
        units_.push_back(Unit{static_cast<int32_t>(i), 1, span.start, span.start + span.count, first + span.slice,
                              span.count, num_partials_++});
      }
    }
  }
}

// Calls f(tensor, pointer, count, element_stride) for each run of elements of
// a unit: one run for a dense tensor, one per row (innermost dimension) for a
// strided view.
template <class F>
void Work::for_each_run(const Unit& unit, const F& f) const {
  const TensorSpec& t = tensors_[static_cast<size_t>(unit.tensor)];
  const int64_t es = element_size(t.dtype);
  if (t.strided == nullptr) {
    f(t, t.data + unit.begin * es, unit.end - unit.begin, int64_t{1});
    return;
  }
  const StridedLayout& s = *t.strided;
  const int inner = s.ndim - 1;
  const int64_t row_len = s.sizes[inner];
  for (int64_t pos = unit.begin; pos < unit.end;) {
    const int64_t col = pos % row_len;
    int64_t row = pos / row_len, offset = 0;
    for (int d = inner - 1; d >= 0; --d) {
      offset += (row % s.sizes[d]) * s.strides[d];
      row /= s.sizes[d];
    }
    const int64_t count = std::min(row_len - col, unit.end - pos);
    f(t, t.data + (offset + col * s.strides[inner]) * es, count, s.strides[inner]);
    pos += count;
  }
}

bool Work::tensors_overlap() const {
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  ranges.reserve(tensors_.size());
  for (const TensorSpec& t : tensors_) {
    if (t.numel == 0) continue;
    const auto start = reinterpret_cast<uintptr_t>(t.data);
    ranges.emplace_back(start, start + static_cast<uintptr_t>(span_elements(t) * element_size(t.dtype)));
  }
  std::sort(ranges.begin(), ranges.end());
  uintptr_t end = 0;
  for (size_t i = 0; i < ranges.size(); ++i) {
    if (i > 0 && ranges[i].first < end) return true;
    end = std::max(end, ranges[i].second);
  }
  return false;
}

int Work::threads_for(int requested, bool writes) const {
  if (requested <= 1 || total_bytes_ < kParallelMinBytes) return 1;
  // Two threads must never write the same element (a duplicated grad is
  // scaled twice, in sequence, like torch does).
  if (writes && tensors_overlap()) return 1;
  return requested;
}

// Folds values in a fixed order: compensated sums, or the NaN-propagating max.
class Fold {
 public:
  explicit Fold(NormKind kind) : max_(kind == kLinf) {}
  void add(double v) {
    if (max_) {
      m_ = nan_max(m_, v);
    } else {
      sum_.add(v);
    }
  }
  double value() const { return max_ ? m_ : sum_.value(); }

 private:
  bool max_;
  double m_ = 0.0;
  CompensatedSum sum_;
};

double Work::norm(NormKind kind, int nthreads) const {
  const RowKernels& k = row_kernels();
  const int ki = static_cast<int>(kind) - 1;
  std::vector<double> partial(units_.size());
  parallel_items(num_units(), threads_for(nthreads, false), false, [&](int64_t u) {
    Fold fold(kind);  // the rows of a strided unit
    for_each_run(units_[static_cast<size_t>(u)], [&](const TensorSpec& t, char* p, int64_t n, int64_t s) {
      fold.add(k.reduce[ki][static_cast<int>(t.dtype)](p, n, s));
    });
    partial[static_cast<size_t>(u)] = fold.value();
  });
  Fold total(kind);  // in unit order: the same result for any thread count
  for (double v : partial) total.add(v);
  return norm_from_power(total.value(), kind);
}

bool Work::reduce_segments(NormKind kind, const SegmentSums& out, int nthreads, const AgcArgs* agc) const {
  const RowKernels& k = row_kernels();
  const int ki = static_cast<int>(kind) - 1;
  const size_t n = static_cast<size_t>(num_partials_);
  const bool weights = out.weight_powers != nullptr, counting = out.counts != nullptr;
  if (agc != nullptr && (!weights || counting)) throw std::invalid_argument("reduce_segments: AGC needs the weights");
  std::vector<double> grad(n), weight(weights ? n : 0);
  std::vector<int64_t> counts(counting ? 2 * units_.size() : 0);
  std::atomic<bool> clipped{false};
  parallel_items(num_units(), threads_for(nthreads, agc != nullptr), false, [&](int64_t u) {
    const Unit& unit = units_[static_cast<size_t>(u)];
    int64_t* c = counting ? &counts[2 * static_cast<size_t>(u)] : nullptr;
    const TensorSpec& t = tensors_[static_cast<size_t>(unit.tensor)];
    const int d = static_cast<int>(t.dtype), wd = static_cast<int>(t.weight_dtype);
    // AGC's dense runs (`rows` consecutive runs of `len` elements from element
    // `begin`, partials from `slot`): every grad run and weight run one stream
    // (row_kernels_impl.h), the grad beside its weight when of one dtype; the
    // same bits either way.
    auto read_rows = [&](int64_t begin, int64_t rows, int64_t len, int64_t slot) {
      const char* gdata = t.data + begin * element_size(t.dtype);
      double* g = &grad[static_cast<size_t>(slot)];
      if (!weights) {
        k.reduce_rows[ki][d](gdata, rows, len, g);
        return;
      }
      const char* wdata = t.weight + begin * element_size(t.weight_dtype);
      double* w = &weight[static_cast<size_t>(slot)];
      if (d == wd) {
        k.reduce_row_pairs[ki][d](gdata, wdata, rows, len, g, w);
      } else {
        k.reduce_rows[ki][d](gdata, rows, len, g);
        k.reduce_rows[ki][wd](wdata, rows, len, w);
      }
    };
    if (unit.pieces > 1 && !counting) {  // many short dense rows: one call for them all
      read_rows(unit.begin, unit.pieces, unit.piece, unit.partial);
      if (agc != nullptr) {  // each row is its own segment: its coefficient is known now
        const double* g = &grad[static_cast<size_t>(unit.partial)];
        const double* w = &weight[static_cast<size_t>(unit.partial)];
        const int64_t es = element_size(t.dtype);
        for (int32_t r = 0; r < unit.pieces; ++r) {
          const double coef = segment_coefficient(kAgc, kind, segment_is_wide(unit.segment + r), g[r], w[r], 0.0,
                                                  agc->clip_factor, agc->eps);
          if (out.coefs != nullptr) out.coefs[unit.segment + r] = coef;
          if (coef == 1.0) continue;  // x * 1 == x: nothing to write
          k.scale[d](t.data + (unit.begin + r * unit.piece) * es, unit.piece, 1, coef);
          clipped.store(true, std::memory_order_relaxed);
        }
      }
      return;
    }
    int64_t slot = unit.partial;
    for_each_piece(unit, [&](int64_t begin, int64_t end, int64_t) {
      if (t.one_stream && !counting && t.strided == nullptr) {
        read_rows(begin, 1, end - begin, slot++);
        return;
      }
      Fold fold(kind);
      for_each_run(Unit{unit.tensor, 1, begin, end, 0, end - begin, 0},
                   [&](const TensorSpec& rt, char* p, int64_t m, int64_t s) {
                     const int d = static_cast<int>(rt.dtype);
                     const double r = counting ? k.stats[ki][d](p, m, s, c) : k.reduce[ki][d](p, m, s);
                     if (counting && !std::isfinite(r)) c[0] += k.count_nonfinite[d](p, m, s);  // runs that hold one
                     fold.add(r);
                   });
      grad[static_cast<size_t>(slot)] = fold.value();
      if (weights) {  // (a strided grad) weights are dense, element for element with their grad: one stream
        k.reduce_rows[ki][wd](t.weight + begin * element_size(t.weight_dtype), 1, end - begin,
                              &weight[static_cast<size_t>(slot)]);
      }
      ++slot;
    });
  });
  // Partials come in segment order (units in order, pieces in order): fold
  // each segment's run of them, in that order.
  std::vector<double> grad_sum(static_cast<size_t>(num_segments_)), weight_sum(weights ? grad_sum.size() : 0);
  std::vector<uint8_t> seen(grad_sum.size(), 0);
  {
    Fold g(kind), w(kind);
    int64_t current = -1;
    auto flush = [&] {
      if (current < 0) return;
      grad_sum[static_cast<size_t>(current)] = g.value();
      if (weights) weight_sum[static_cast<size_t>(current)] = w.value();
      seen[static_cast<size_t>(current)] = 1;
    };
    for (const Unit& unit : units_) {
      int64_t slot = unit.partial;
      if (unit.pieces > 1) {  // whole rows, one segment each: its one partial (a fold of one value is that value)
        flush();
        current = -1;
        for (int32_t r = 0; r < unit.pieces; ++r) {
          const size_t s = static_cast<size_t>(unit.segment + r), k = static_cast<size_t>(slot + r);
          grad_sum[s] = grad[k];
          if (weights) weight_sum[s] = weight[k];
          seen[s] = 1;
        }
        continue;
      }
      for_each_piece(unit, [&](int64_t, int64_t, int64_t segment) {
        if (segment != current) {
          flush();
          current = segment;
          g = Fold(kind);
          w = Fold(kind);
        }
        g.add(grad[static_cast<size_t>(slot)]);
        if (weights) w.add(weight[static_cast<size_t>(slot)]);
        ++slot;
      });
    }
    flush();
  }
  for (int64_t s = 0; s < num_segments_; ++s) {  // segments without units: 0
    if (out.powers != nullptr) out.powers[s] = seen[static_cast<size_t>(s)] ? grad_sum[static_cast<size_t>(s)] : 0.0;
    if (weights) out.weight_powers[s] = seen[static_cast<size_t>(s)] ? weight_sum[static_cast<size_t>(s)] : 0.0;
  }
  if (counting) {
    int64_t nonfinite = 0, zeros = 0;
    for (size_t i = 0; i < units_.size(); ++i) nonfinite += counts[2 * i], zeros += counts[2 * i + 1];
    out.counts[0] = nonfinite;
    out.counts[1] = zeros;
  }
  return clipped.load();
}

bool Work::scale_segments(const double* coefs, int nthreads, bool rows_done) const {
  const RowKernels& k = row_kernels();
  bool any = false;
  for (const Unit& unit : units_) {
    if (rows_done && unit.pieces > 1) continue;
    for_each_piece(unit, [&](int64_t, int64_t, int64_t segment) { any = any || coefs[segment] != 1.0; });
  }
  if (!any) return false;
  parallel_items(num_units(), threads_for(nthreads, true), true, [&](int64_t u) {
    const Unit& unit = units_[static_cast<size_t>(u)];
    if (unit.pieces > 1) {  // many short dense rows: one call for them all
      if (rows_done) return;
      const TensorSpec& t = tensors_[static_cast<size_t>(unit.tensor)];
      k.scale_rows[static_cast<int>(t.dtype)](t.data + unit.begin * element_size(t.dtype), unit.pieces, unit.piece,
                                              coefs + unit.segment);
      return;
    }
    for_each_piece(unit, [&](int64_t begin, int64_t end, int64_t segment) {
      const double coef = coefs[segment];
      if (coef == 1.0) return;  // x * 1 == x: nothing to write
      for_each_run(Unit{unit.tensor, 1, begin, end, 0, end - begin, 0},
                   [&](const TensorSpec& t, char* p, int64_t n, int64_t s) {
                     k.scale[static_cast<int>(t.dtype)](p, n, s, coef);
                   });
    });
  });
  return true;
}

void Work::scale(double coef, int nthreads) const {
  const RowKernels& k = row_kernels();
  // Reverse order: the last units read by the norm pass are still in cache.
  parallel_items(num_units(), threads_for(nthreads, true), true, [&](int64_t u) {
    for_each_run(units_[static_cast<size_t>(u)], [&](const TensorSpec& t, char* p, int64_t n, int64_t s) {
      k.scale[static_cast<int>(t.dtype)](p, n, s, coef);
    });
  });
}

void Work::clamp(double lo_value, double hi_value, int nthreads) const {
  const RowKernels& k = row_kernels();
  // torch converts each bound to the grad's dtype (after a range check that
  // the Python side has already done).
  double lo[kNumDTypes], hi[kNumDTypes];
  for (int d = 0; d < kNumDTypes; ++d) {
    lo[d] = round_to_dtype(lo_value, static_cast<DType>(d));
    hi[d] = round_to_dtype(hi_value, static_cast<DType>(d));
  }
  parallel_items(num_units(), threads_for(nthreads, true), false, [&](int64_t u) {
    for_each_run(units_[static_cast<size_t>(u)], [&](const TensorSpec& t, char* p, int64_t n, int64_t s) {
      const int d = static_cast<int>(t.dtype);
      k.clamp[d](p, n, s, lo[d], hi[d]);
    });
  });
}

uint64_t Work::touch_read(int nthreads) const {
  const RowKernels& k = row_kernels();
  std::vector<uint64_t> partial(units_.size());
  parallel_items(num_units(), threads_for(nthreads, false), false, [&](int64_t u) {
    uint64_t acc = 0;
    for_each_run(units_[static_cast<size_t>(u)], [&](const TensorSpec& t, char* p, int64_t n, int64_t s) {
      const int64_t es = element_size(t.dtype);
      if (s == 1) {
        acc |= k.touch_read(p, n * es);
      } else {
        for (int64_t i = 0; i < n; ++i) acc |= k.touch_read(p + i * s * es, es);
      }
    });
    partial[static_cast<size_t>(u)] = acc;
  });
  uint64_t r = 0;
  for (uint64_t v : partial) r |= v;
  return r;
}

void Work::touch_write(int nthreads) const {
  const RowKernels& k = row_kernels();
  const uint64_t zero = static_cast<uint64_t>(units_.size() > int64_t{1} << 62);  // 0, opaque to the compiler
  parallel_items(num_units(), threads_for(nthreads, true), false, [&](int64_t u) {
    for_each_run(units_[static_cast<size_t>(u)], [&](const TensorSpec& t, char* p, int64_t n, int64_t s) {
      const int64_t es = element_size(t.dtype);
      if (s == 1) {
        k.touch_write(p, n * es, zero);
      } else {
        for (int64_t i = 0; i < n; ++i) k.touch_write(p + i * s * es, es, zero);
      }
    });
  });
}

void store_as(void* p, int32_t code, double v) {
  switch (static_cast<DType>(code)) {
    case DType::kFloat64: *static_cast<double*>(p) = v; break;
    case DType::kFloat32: *static_cast<float*>(p) = static_cast<float>(v); break;
    case DType::kFloat16: *static_cast<uint16_t*>(p) = float_to_half(static_cast<float>(v)); break;
    case DType::kBFloat16: *static_cast<uint16_t*>(p) = float_to_bf16(static_cast<float>(v)); break;
  }
}

void finish_segments(const Work& work, NormKind kind, const double* powers, const double* weight_powers,
                     const FinishSpec& spec) {
  const int64_t n = work.num_segments();
  if (spec.mode == kClipNorm && spec.max_norms_len != 1 && spec.max_norms_len != n)
    throw std::invalid_argument("finish_segments: one max_norm, or one per segment");
  const int64_t es = element_size(static_cast<DType>(spec.norms_code));
  Fold total(kind);
  for (int64_t s = 0; s < n; ++s) {
    const bool wide = work.segment_is_wide(s);
    const double power = powers[s];
    const double wpower = weight_powers != nullptr ? weight_powers[s] : 0.0;
    const double max_norm = spec.mode == kClipNorm ? spec.max_norms[spec.max_norms_len == 1 ? 0 : s] : 0.0;
    if (spec.coefs != nullptr && !(spec.packed_done && work.segment_is_packed(s)))
      spec.coefs[s] = segment_coefficient(spec.mode, kind, wide, power, wpower, max_norm, spec.clip_factor, spec.eps);
    if (spec.norms != nullptr)
      store_as(static_cast<char*>(spec.norms) + s * es, spec.norms_code,
               segment_norm(norm_from_power(power, kind), wide));
    if (spec.total != nullptr) total.add(power);
  }
  if (spec.total != nullptr) store_as(spec.total, spec.total_code, norm_from_power(total.value(), kind));
}

ClipOutcome clip_norm(const Work& work, NormKind kind, double max_norm, DType result_dtype,
                      bool error_if_nonfinite, int nthreads) {
  const double raw = work.norm(kind, nthreads);
  ClipOutcome out{round_to_dtype(raw, result_dtype), std::numeric_limits<double>::quiet_NaN(), false, false};
  if (error_if_nonfinite && !std::isfinite(out.total)) {
    out.aborted = true;
    return out;
  }
  out.coef = clip_coefficient(raw, result_dtype == DType::kFloat64, max_norm);
  if (out.coef != 1.0) {  // multiplying by exactly 1 changes no bit: skip the pass
    work.scale(out.coef, nthreads);
    out.scaled = true;
  }
  return out;
}

}  // namespace fastclip::cpu
