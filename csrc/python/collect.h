// Fast gather of the common case straight from Python objects.
//
// Reading .grad, .dtype, .is_cpu, .is_contiguous(), .data_ptr() and .numel()
// of 2000 tensors from Python costs a large part of torch's whole clip on
// them.  Here each grad is read once (.grad) and described by one C call of
// DLPack's exchange API (torch >= 2.10), or else by torch.Tensor's attribute
// descriptors called from C.  No torch headers, no torch ABI.  Only plain,
// contiguous tensors of the four float dtypes, all on the CPU or (through the
// exchange API) all on one CUDA device, are taken here; anything else is
// left to the general Python path (fastclip/_work.py).
#pragma once

#include <pybind11/pybind11.h>

#include "../common/tensor_table.h"

namespace fastclip {

struct Collected {
  pybind11::list tensors;      // the grads (or the tensors), None entries dropped
  bool complete = false;       // true: `table` describes every tensor
  TensorTable table;
  uint32_t dtype_mask = 0;     // bit per dtype code present
  int32_t cuda_device = -2;    // -1: CPU; >= 0: that CUDA device; -2: no tensor seen yet
};

// `items`: a list of parameters (from_params: read .grad, skip None) or of
// tensors.  `codes`: dict torch.dtype -> dtype code.  `plain`: torch.Tensor;
// `parameter`: nn.Parameter (a tensor get_total_norm may be given: read alike).
Collected collect(const pybind11::list& items, bool from_params, const pybind11::dict& codes,
                  const pybind11::handle& plain, const pybind11::handle& parameter);

// AGC's table: `grads` (collect's table of `grad_list`, every grad dense) with,
// beside grad i, the parameter weights[i] (same shape, device, dense), and
// each grad's dim-0 slices as its segments (the whole grad for ndim <= 1).
// (table, number of segments), or None when some pair needs the general path
// (a weight that is not a `plain` torch.Tensor or a `parameter`, nn.Parameter).
pybind11::object agc_table(const TensorTable& grads, const pybind11::list& weights, const pybind11::list& grad_list,
                           const pybind11::handle& plain, const pybind11::handle& parameter);

// Use `capsule` (torch.Tensor.__dlpack_c_exchange_api__, or None to stop
// using it).  Returns whether it is in use: it must be a DLPack 1.x table.
bool set_dlpack_exchange_api(const pybind11::handle& capsule);
bool using_dlpack_exchange_api();

}  // namespace fastclip
