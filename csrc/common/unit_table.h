// The table of torch's operations on the GPU backends: the Triton kernels read it
// from device memory; the CUDA kernels take its rows as kernel parameters
// (csrc/cuda/kernel_table.h).  The segmented methods use csrc/common/segment_table.h.
//
// All dense, non-empty tensors of a TensorTable, viewed as one virtual
// concatenation, are cut into work units of `unit` elements; a unit never
// spans two tensors.  The table is four int64 columns of `rows` entries:
//
//     [first unit | address | element count | dtype code]
//
// so a kernel finds the tensor of unit u by a binary search over the first
// column.  Empty tensors are left out (nothing to read or write, and no
// zero-length row to confuse the search); strided views are left out too
// (the host handles them: see fastclip/backends/triton_backend.py).
#pragma once

#include <cstdint>
#include <string>

#include "tensor_table.h"

namespace fastclip {

struct UnitTable {
  std::string bytes;        // 4 * rows int64 values, column after column
  int64_t rows = 0;
  int64_t units = 0;
  bool aligned16 = true;    // every row's address is a multiple of 16 bytes
  uint32_t dtype_mask = 0;  // bit per dtype code present among the rows
};

inline UnitTable make_unit_table(const TensorTable& t, int64_t unit) {
  if (unit < 8 || unit % 8 != 0) throw std::invalid_argument("unit table: the unit must be a positive multiple of 8");
  UnitTable out;
  const size_t n = t.size();
  size_t rows = 0;
  for (size_t i = 0; i < n; ++i) rows += t.numels[i] > 0 && t.layout[i] < 0;
  out.rows = static_cast<int64_t>(rows);
  out.bytes.resize(4 * rows * sizeof(int64_t));
  int64_t* first = reinterpret_cast<int64_t*>(&out.bytes[0]);
  int64_t* address = first + rows;
  int64_t* numel = address + rows;
  int64_t* code = numel + rows;
  size_t r = 0;
  for (size_t i = 0; i < n; ++i) {
    if (t.numels[i] == 0 || t.layout[i] >= 0) continue;
    first[r] = out.units;
    address[r] = t.ptrs[i];
    numel[r] = t.numels[i];
    code[r] = t.dtypes[i];
    out.units += (t.numels[i] + unit - 1) / unit;
    out.aligned16 = out.aligned16 && t.ptrs[i] % 16 == 0;
    out.dtype_mask |= 1u << t.dtypes[i];
    ++r;
  }
  return out;
}

}  // namespace fastclip
