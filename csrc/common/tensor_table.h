// The flat description of a call's gradients, shared by every backend:
// one entry per tensor (address, element count, dtype code) plus sizes and
// strides for the rare view that is not one dense block.
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

  size_t size() const { return ptrs.size(); }

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
  }
};

}  // namespace fastclip
