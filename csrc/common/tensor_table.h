// The flat description of a call's gradients, shared by every backend:
// one entry per tensor (address, element count, dtype code) plus sizes and
// strides for the rare view that is not one dense block; for the segmented
// methods, each tensor's segments (segments.h) and, for AGC, the parameter
// read beside its grad.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "dtypes.h"

namespace fastclip {

constexpr int kMaxDims = 8;

struct StridedLayout {
  int32_t ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, innermost last; overlap-free
};

struct TensorTable {
  std::vector<int64_t> ptrs;
  std::vector<int64_t> numels;
  std::vector<int32_t> dtypes;
  std::vector<int32_t> layout;  // -1: dense block from ptrs[i]; else an index into `strided`
  std::vector<StridedLayout> strided;
  // Segmented calls (segments.h); empty otherwise, and then the whole table is segment 0.
  std::vector<int64_t> first_segment;  // per tensor: the id of its first segment
  std::vector<int64_t> slice_len;      // per tensor: 0 = the whole tensor is one segment
  int64_t num_segments = 1;
  // AGC: per tensor, the parameter read beside its grad, element for element (empty otherwise).
  std::vector<int64_t> weight_ptrs;
  std::vector<int32_t> weight_dtypes;

  size_t size() const { return ptrs.size(); }
  bool segmented() const { return !first_segment.empty(); }
  bool has_weights() const { return !weight_ptrs.empty(); }
  int64_t segment_of(size_t i) const { return segmented() ? first_segment[i] : 0; }
  // Elements per segment of tensor i (its whole size when it is one segment).
  int64_t slice_of(size_t i) const {
    const int64_t s = segmented() ? slice_len[i] : 0;
    return s > 0 && s < numels[i] ? s : numels[i];
  }
  int64_t slices_of(size_t i) const { return numels[i] == 0 ? 0 : numels[i] / slice_of(i); }

  void push_dense(int64_t ptr, int64_t numel, int32_t dtype) {
    ptrs.push_back(ptr);
    numels.push_back(numel);
    dtypes.push_back(dtype);
    layout.push_back(-1);
  }

  bool has_empty() const {
    for (int64_t n : numels)
      if (n == 0) return true;
    return false;
  }

  // Throws std::invalid_argument on anything a kernel could misread.
  void validate() const {
    const size_t n = ptrs.size();
    if (numels.size() != n || dtypes.size() != n || layout.size() != n)
      throw std::invalid_argument("tensor table: ptrs, numels and dtypes must have the same length");
    for (size_t i = 0; i < n; ++i) {
      if (numels[i] < 0) throw std::invalid_argument("tensor table: negative numel");
      if (numels[i] > 0 && ptrs[i] == 0) throw std::invalid_argument("tensor table: null data pointer");
      if (!valid_dtype(dtypes[i])) throw std::invalid_argument("tensor table: unknown dtype code " + std::to_string(dtypes[i]));
      if (layout[i] < -1 || layout[i] >= static_cast<int32_t>(strided.size()))
        throw std::invalid_argument("tensor table: bad layout index");
      if (layout[i] >= 0) {
        const StridedLayout& s = strided[static_cast<size_t>(layout[i])];
        if (s.ndim < 1 || s.ndim > kMaxDims) throw std::invalid_argument("tensor table: strided views need 1 to 8 dims");
        int64_t count = 1;
        for (int d = 0; d < s.ndim; ++d) {
          if (s.sizes[d] < 1 || s.strides[d] < 0) throw std::invalid_argument("tensor table: bad size or stride");
          count *= s.sizes[d];
        }
        if (count != numels[i]) throw std::invalid_argument("tensor table: sizes do not match numel");
      }
    }
    if (segmented()) validate_segments();
    if (has_weights()) {
      if (weight_ptrs.size() != n || weight_dtypes.size() != n)
        throw std::invalid_argument("tensor table: one weight per tensor");
      for (size_t i = 0; i < n; ++i) {
        if (!valid_dtype(weight_dtypes[i])) throw std::invalid_argument("tensor table: unknown weight dtype code");
        if (numels[i] > 0 && weight_ptrs[i] == 0) throw std::invalid_argument("tensor table: null weight pointer");
        if (layout[i] >= 0) throw std::invalid_argument("tensor table: a grad read with its weight must be dense");
      }
    }
  }

 private:
  // Ids in [0, num_segments), never decreasing along the table's elements (so
  // each segment's units are one contiguous range).
  void validate_segments() const {
    const size_t n = ptrs.size();
    if (first_segment.size() != n || slice_len.size() != n)
      throw std::invalid_argument("tensor table: one first segment and one slice length per tensor");
    int64_t low = 0;  // the smallest id the next tensor may take
    for (size_t i = 0; i < n; ++i) {
      const int64_t first = first_segment[i], len = slice_len[i];
      if (len < 0 || (len > 0 && numels[i] > 0 && numels[i] % len != 0))
        throw std::invalid_argument("tensor table: a slice length must divide the tensor's size");
      if (len > 0 && len < numels[i] && layout[i] >= 0)
        throw std::invalid_argument("tensor table: a tensor cut into slices must be dense");
      const bool sliced = len > 0 && len < numels[i];
      const int64_t last = first + (sliced ? numels[i] / len : 1) - 1;
      if (numels[i] == 0) {  // no elements: no units, its ids matter to no one
        if (first < 0 || first > num_segments) throw std::invalid_argument("tensor table: a segment id out of range");
        continue;
      }
      if (first < low || last >= num_segments)
        throw std::invalid_argument("tensor table: segment ids must not decrease and stay below num_segments");
      low = last;
    }
  }
};

}  // namespace fastclip
