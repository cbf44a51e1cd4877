#include "work.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "../common/accumulate.h"
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
  tensors_.reserve(n);
  int64_t nunits = 0;
  for (size_t i = 0; i < n; ++i) {
    const int32_t layout = table.layout[i];
    tensors_.push_back(TensorSpec{reinterpret_cast<char*>(static_cast<uintptr_t>(table.ptrs[i])), table.numels[i],
                                  static_cast<DType>(table.dtypes[i]),
                                  layout < 0 ? nullptr : &table.strided[static_cast<size_t>(layout)]});
    nunits += (table.numels[i] + kUnitElems - 1) / kUnitElems;
  }
  units_.reserve(static_cast<size_t>(nunits));
  for (size_t i = 0; i < n; ++i) {
    const TensorSpec& t = tensors_[i];
    total_bytes_ += t.numel * element_size(t.dtype);
    for (int64_t b = 0; b < t.numel; b += kUnitElems)
      units_.push_back(Unit{static_cast<int32_t>(i), b, std::min(b + kUnitElems, t.numel)});
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

double Work::norm(NormKind kind, int nthreads) const {
  const RowKernels& k = row_kernels();
  const int ki = static_cast<int>(kind) - 1;
  std::vector<double> partial(units_.size());
  parallel_items(num_units(), threads_for(nthreads, false), false, [&](int64_t u) {
    double max = 0.0;
    CompensatedSum sum;  // the rows of a strided unit
    for_each_run(units_[static_cast<size_t>(u)], [&](const TensorSpec& t, char* p, int64_t n, int64_t s) {
      const double r = k.reduce[ki][static_cast<int>(t.dtype)](p, n, s);
      if (kind == NormKind::kInf) {
        max = nan_max(max, r);
      } else {
        sum.add(r);
      }
    });
    partial[static_cast<size_t>(u)] = kind == NormKind::kInf ? max : sum.value();
  });
  if (kind == NormKind::kInf) {
    double m = 0.0;
    for (double v : partial) m = nan_max(m, v);
    return m;
  }
  CompensatedSum total;  // in unit order: the same result for any thread count
  for (double v : partial) total.add(v);
  return kind == NormKind::kL2 ? std::sqrt(total.value()) : total.value();
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

void Work::clamp(double clip_value, int nthreads) const {
  const RowKernels& k = row_kernels();
  // torch converts each bound to the grad's dtype (after a range check that
  // the Python side has already done).
  double lo[kNumDTypes], hi[kNumDTypes];
  for (int d = 0; d < kNumDTypes; ++d) {
    lo[d] = round_to_dtype(-clip_value, static_cast<DType>(d));
    hi[d] = round_to_dtype(clip_value, static_cast<DType>(d));
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

double clip_coefficient(double total, DType result_dtype, double max_norm) {
  if (result_dtype == DType::kFloat64) {
    const double r = 1.0 / (total + 1e-6);
    const double c = r * max_norm;
    return c > 1.0 ? 1.0 : c;  // NaN stays NaN, as with torch.clamp
  }
  const float r = 1.0f / (static_cast<float>(total) + static_cast<float>(1e-6));
  const float c = r * static_cast<float>(max_norm);
  return c > 1.0f ? 1.0 : static_cast<double>(c);
}

ClipOutcome clip_norm(const Work& work, NormKind kind, double max_norm, DType result_dtype,
                      bool error_if_nonfinite, int nthreads) {
  const double raw = work.norm(kind, nthreads);
  ClipOutcome out{round_to_dtype(raw, result_dtype), std::numeric_limits<double>::quiet_NaN(), false, false};
  if (error_if_nonfinite && !std::isfinite(out.total)) {
    out.aborted = true;
    return out;
  }
  out.coef = clip_coefficient(raw, result_dtype, max_norm);
  if (out.coef != 1.0) {  // multiplying by exactly 1 changes no bit: skip the pass
    work.scale(out.coef, nthreads);
    out.scaled = true;
  }
  return out;
}

}  // namespace fastclip::cpu
