// Fast gather of the common case straight from Python objects.
//
// Reading .grad, .dtype, .is_cpu, .is_contiguous(), .data_ptr() and .numel()
// of 2000 tensors from Python costs more than torch's whole clip on them; the
// same calls made from C++ through the Python C API (by name: no torch
// headers, no torch ABI) cost a fraction.  Only plain, contiguous CPU tensors
// of the four float dtypes are taken here; anything else is left to the
// general Python path (fastclip/_work.py).
#pragma once

#include <pybind11/pybind11.h>

#include "../common/tensor_table.h"

namespace fastclip {

struct Collected {
  pybind11::list tensors;      // the grads (or the tensors), None entries dropped
  bool complete = false;       // true: `table` describes every tensor
  TensorTable table;
  uint32_t dtype_mask = 0;     // bit per dtype code present
};

// `items`: a list of parameters (from_params: read .grad, skip None) or of
// tensors.  `codes`: dict torch.dtype -> dtype code.  `plain`: torch.Tensor.
Collected collect(const pybind11::list& items, bool from_params, const pybind11::dict& codes,
                  const pybind11::handle& plain);

}  // namespace fastclip
