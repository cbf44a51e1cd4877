// Segments: what the segmented primitives (reduce per segment, a coefficient
// per segment, apply per segment) reduce separately.
//
// A segment is a set of elements that gives one value: one segment per
// tensor (per-tensor clipping, gradient statistics), one per group of
// tensors (norm groups), one per dim-0 slice of a tensor (AGC).  A table
// says, per tensor, the id of its first segment and its slice length: 0 (or
// the tensor's size) makes the whole tensor one segment, a shorter length L
// cuts it into numel / L slices, slice k being segment first + k.  Ids never
// decrease along the table, so when tensors are cut into work units that
// never straddle a segment, every segment's units form one contiguous range:
// a segment's partial results are combined over that range, in unit order.
#pragma once

#include <cstdint>

#include "hd.h"

namespace fastclip {

// Where work unit k (counted from the tensor's first unit) of a tensor lies,
// for units of at most `unit` elements cut per slice of `slice_len` elements.
struct UnitSpan {
  int64_t slice;  // the slice it belongs to (its segment: first segment + slice)
  int64_t start;  // first element, in the tensor
  int64_t count;  // elements
};

FASTCLIP_HD int64_t units_per_slice(int64_t slice_len, int64_t unit) { return (slice_len + unit - 1) / unit; }

FASTCLIP_HD UnitSpan unit_span(int64_t k, int64_t slice_len, int64_t unit) {
  const int64_t per = units_per_slice(slice_len, unit);
  const int64_t slice = k / per, j = k - slice * per;
  const int64_t start = j * unit, left = slice_len - start;
  return {slice, slice * slice_len + start, left < unit ? left : unit};
}

// Units of a tensor of `numel` elements in slices of `slice_len` (0: one slice).
FASTCLIP_HD int64_t units_of_tensor(int64_t numel, int64_t slice_len, int64_t unit) {
  if (numel == 0) return 0;
  if (slice_len <= 0 || slice_len >= numel) return (numel + unit - 1) / unit;
  return numel / slice_len * units_per_slice(slice_len, unit);
}

}  // namespace fastclip
