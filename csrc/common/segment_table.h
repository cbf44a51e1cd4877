// The GPU backends' table for the segmented primitives (segments.h), built
// here on the host for the Triton and the CUDA kernels alike, copied to the
// device once per layout (the backends cache it by its bytes).
//
// One int64 buffer:
//   8 columns of R rows, one row per non-empty tensor (all dense: the GPU
//   backends give views as contiguous copies):
//     [first unit | address | numel | dtype code | slice length | first segment | weight address | weight code]
//   (slice length: the elements per segment, numel for a whole tensor; weight
//   columns 0 and the grad's code without weights), then
//   S + 1 entries: the first unit of each segment, then the total of units
//   (a segment with no units starts where the next one does), then
//   S entries: per segment, 1 if it works in float64 (a float64 grad or weight), else 0.
// Units have at most `unit` elements and never straddle a segment, so unit u
// of a row with first unit f lies at unit_span(u - f, slice length, unit).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "segments.h"
#include "tensor_table.h"

namespace fastclip {

constexpr int kSegmentColumns = 8;

struct SegmentTable {
  std::string bytes;
  int64_t rows = 0;
  int64_t units = 0;
  int64_t segments = 0;
  int64_t filled_segments = 0;  // segments with at least one unit
  bool aligned16 = true;        // every unit starts 16-byte aligned (grads and weights)
  uint32_t dtype_mask = 0;      // bit per dtype code among the grads
  uint32_t weight_mask = 0;     // ... among the weights
};

inline SegmentTable make_segment_table(const TensorTable& t, int64_t unit) {
  if (unit < 8 || unit % 8 != 0) throw std::invalid_argument("segment table: the unit must be a positive multiple of 8");
  t.validate();
  SegmentTable out;
  const size_t n = t.size();
  const int64_t S = t.segmented() ? t.num_segments : 1;
  out.segments = S;
  std::vector<int64_t> kept;
  for (size_t i = 0; i < n; ++i) {
    if (t.numels[i] == 0) continue;
    if (t.layout[i] >= 0) throw std::invalid_argument("segment table: strided views must be given as dense copies");
    kept.push_back(static_cast<int64_t>(i));
  }
  const int64_t R = static_cast<int64_t>(kept.size());
  out.rows = R;
  std::vector<int64_t> buf(static_cast<size_t>(kSegmentColumns * R + 2 * S + 1), 0);
  int64_t* col[kSegmentColumns];
  for (int c = 0; c < kSegmentColumns; ++c) col[c] = buf.data() + c * R;
  int64_t* seg_first = buf.data() + kSegmentColumns * R;
  int64_t* seg_wide = seg_first + S + 1;
  for (int64_t s = 0; s <= S; ++s) seg_first[s] = -1;
  for (int64_t r = 0; r < R; ++r) {
    const size_t i = static_cast<size_t>(kept[static_cast<size_t>(r)]);
    const int64_t len = t.slice_of(i), first = t.segment_of(i);
    const int32_t wcode = t.has_weights() ? t.weight_dtypes[i] : t.dtypes[i];
    const int64_t wptr = t.has_weights() ? t.weight_ptrs[i] : 0;
    col[0][r] = out.units;
    col[1][r] = t.ptrs[i];
    col[2][r] = t.numels[i];
    col[3][r] = t.dtypes[i];
    col[4][r] = len;
    col[5][r] = first;
    col[6][r] = wptr;
    col[7][r] = wcode;
    const int64_t es = element_size(static_cast<DType>(t.dtypes[i]));
    const int64_t wes = element_size(static_cast<DType>(wcode));
    out.aligned16 = out.aligned16 && t.ptrs[i] % 16 == 0 && wptr % 16 == 0 && (len * es) % 16 == 0 &&
                    (len * wes) % 16 == 0;
    out.dtype_mask |= 1u << t.dtypes[i];
    if (t.has_weights()) out.weight_mask |= 1u << wcode;
    const bool wide = t.dtypes[i] == static_cast<int32_t>(DType::kFloat64) ||
                      wcode == static_cast<int32_t>(DType::kFloat64);
    const int64_t per = units_per_slice(len, unit);
    for (int64_t k = 0, slices = t.numels[i] / len; k < slices; ++k) {
      if (seg_first[first + k] < 0) seg_first[first + k] = out.units + k * per;
      if (wide) seg_wide[first + k] = 1;
    }
    out.units += units_of_tensor(t.numels[i], len, unit);
  }
  seg_first[S] = out.units;
  for (int64_t s = S - 1; s >= 0; --s) {
    if (seg_first[s] < 0) seg_first[s] = seg_first[s + 1];
    out.filled_segments += seg_first[s] < seg_first[s + 1];
  }
  out.bytes.assign(reinterpret_cast<const char*>(buf.data()), buf.size() * sizeof(int64_t));
  return out;
}

}  // namespace fastclip
