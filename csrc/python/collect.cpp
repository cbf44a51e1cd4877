#include "collect.h"

#include "dlpack_exchange.h"

namespace py = pybind11;

namespace fastclip {
namespace {

PyObject* interned(const char* name) { return PyUnicode_InternFromString(name); }

// DLPack's C exchange API of torch.Tensor, when this torch publishes one.
const dlpack::ExchangeApi* g_dlpack = nullptr;

int32_t code_of(const dlpack::DataType& t) {
  if (t.lanes != 1) return -1;
  if (t.code == dlpack::kFloat) {
    if (t.bits == 32) return static_cast<int32_t>(DType::kFloat32);
    if (t.bits == 64) return static_cast<int32_t>(DType::kFloat64);
    if (t.bits == 16) return static_cast<int32_t>(DType::kFloat16);
  }
  if (t.code == dlpack::kBfloat && t.bits == 16) return static_cast<int32_t>(DType::kBFloat16);
  return -1;
}

// One C call per tensor: pointer, device, dtype, shape and strides.  A
// dense tensor of a float dtype on the CPU (device -1) or on a CUDA device
// gives true, its code, device and element count.
bool dense_with_dlpack(PyObject* t, dlpack::Tensor& d, int32_t& code, int32_t& device, int64_t& numel) {
  if (g_dlpack->dltensor_from_py_object_no_sync(t, &d) != 0) return PyErr_Clear(), false;  // no storage, meta, ...
  code = code_of(d.dtype);
  if (code < 0) return false;
  if (d.device.device_type == dlpack::kCPU) {
    device = -1;
  } else if (d.device.device_type == dlpack::kCUDA && d.device.device_id >= 0) {
    device = d.device.device_id;
  } else {
    return false;
  }
  int64_t expected_stride = 1;
  bool contiguous = true;
  numel = 1;
  for (int k = d.ndim - 1; k >= 0; --k) {
    const int64_t size = d.shape[k];
    numel *= size;
    if (size != 1) {
      if (d.strides != nullptr && d.strides[k] != expected_stride) contiguous = false;
      expected_stride *= size;
    }
  }
  return contiguous || numel == 0;
}

bool describe_with_dlpack(PyObject* t, Collected& out) {
  dlpack::Tensor d;
  int32_t code, device;
  int64_t numel;
  if (!dense_with_dlpack(t, d, code, device, numel)) return false;
  // All on the CPU, or all on one CUDA device (the GPU backends' case).
  if (out.cuda_device != -2 && out.cuda_device != device) return false;
  out.cuda_device = device;
  out.table.push_dense(reinterpret_cast<int64_t>(static_cast<char*>(d.data) + d.byte_offset), numel, code);
  out.dtype_mask |= 1u << code;
  return true;
}

// Without the exchange API: torch.Tensor's own attribute descriptors, looked
// up once per call (calling a descriptor directly skips the attribute lookup).
struct TensorAccess {
  explicit TensorAccess(PyObject* tensor_type) : type(tensor_type) {
    if (g_dlpack != nullptr) return;  // not needed
    dtype = attr("dtype");
    is_cpu = attr("is_cpu");
    is_contiguous = attr("is_contiguous");
    data_ptr = attr("data_ptr");
    nbytes = attr("nbytes");  // a property: cheaper to call than numel()
  }
  py::object attr(const char* name) const {
    PyObject* a = PyObject_GetAttrString(type, name);
    if (a == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(a);
  }
  PyObject* get(const py::object& descr, PyObject* obj) const {  // obj.name for a property
    return Py_TYPE(descr.ptr())->tp_descr_get(descr.ptr(), obj, type);
  }
  PyObject* call(const py::object& descr, PyObject* obj) const {  // obj.name()
    return PyObject_Vectorcall(descr.ptr(), &obj, 1, nullptr);
  }

  PyObject* type;
  py::object dtype, is_cpu, is_contiguous, data_ptr, nbytes;
  PyObject* last_dtype = nullptr;  // most grads share a dtype: remember the last one
  long last_code = -1;
};

bool describe_with_attributes(PyObject* t, PyObject* codes, TensorAccess& access, Collected& out) {
  PyObject* dtype = access.get(access.dtype, t);  // torch.dtype objects are singletons
  if (dtype == nullptr) return PyErr_Clear(), false;
  if (dtype != access.last_dtype) {
    PyObject* code = PyDict_GetItemWithError(codes, dtype);  // borrowed
    if (code == nullptr) return Py_DECREF(dtype), PyErr_Clear(), false;
    access.last_dtype = dtype;
    access.last_code = PyLong_AsLong(code);
  }
  Py_DECREF(dtype);

  PyObject* is_cpu = access.get(access.is_cpu, t);
  const bool on_cpu = is_cpu == Py_True;
  Py_XDECREF(is_cpu);
  if (!on_cpu) return PyErr_Clear(), false;

  PyObject* contiguous = access.call(access.is_contiguous, t);
  const bool dense = contiguous == Py_True;
  Py_XDECREF(contiguous);
  if (!dense) return PyErr_Clear(), false;

  PyObject* ptr = access.call(access.data_ptr, t);  // raises for tensors without storage
  if (ptr == nullptr) return PyErr_Clear(), false;
  const long long address = PyLong_AsLongLong(ptr);
  Py_DECREF(ptr);
  PyObject* nbytes = access.get(access.nbytes, t);
  if (nbytes == nullptr) return PyErr_Clear(), false;
  const long long bytes = PyLong_AsLongLong(nbytes);
  Py_DECREF(nbytes);
  if (PyErr_Occurred()) return PyErr_Clear(), false;

  const int32_t code = static_cast<int32_t>(access.last_code);
  out.cuda_device = -1;
  out.table.push_dense(address, bytes / element_size(static_cast<DType>(code)), code);
  out.dtype_mask |= 1u << code;
  return true;
}

}  // namespace

bool set_dlpack_exchange_api(const py::handle& capsule) {
  g_dlpack = nullptr;
  if (capsule.is_none()) return false;
  auto* api = static_cast<const dlpack::ExchangeApi*>(PyCapsule_GetPointer(capsule.ptr(), "dlpack_exchange_api"));
  if (api == nullptr) {
    PyErr_Clear();
    return false;
  }
  // Walk to a table of major version 1, the layout declared in dlpack_exchange.h.
  const dlpack::ExchangeApiHeader* h = &api->header;
  while (h != nullptr && h->version.major != 1) h = h->prev_api;
  if (h == nullptr || h->version.minor < 2) return false;
  api = reinterpret_cast<const dlpack::ExchangeApi*>(h);
  if (api->dltensor_from_py_object_no_sync == nullptr) return false;
  g_dlpack = api;
  return true;
}

bool using_dlpack_exchange_api() { return g_dlpack != nullptr; }

py::object agc_table(const TensorTable& grads, const py::list& weights, const py::list& grad_list,
                     const py::handle& plain, const py::handle& parameter) {
  const size_t n = grads.size();
  if (g_dlpack == nullptr || static_cast<size_t>(PyList_GET_SIZE(weights.ptr())) != n ||
      static_cast<size_t>(PyList_GET_SIZE(grad_list.ptr())) != n)
    return py::none();
  TensorTable out = grads;
  out.first_segment.resize(n);
  out.slice_len.resize(n);
  out.weight_ptrs.resize(n);
  out.weight_dtypes.resize(n);
  int64_t count = 0;
  for (size_t i = 0; i < n; ++i) {
    PyObject* weight = PyList_GET_ITEM(weights.ptr(), static_cast<Py_ssize_t>(i));
    PyObject* grad = PyList_GET_ITEM(grad_list.ptr(), static_cast<Py_ssize_t>(i));
    // only torch.Tensor and nn.Parameter themselves: subclasses (DTensor, ...) and stand-ins take the general path
    const PyObject* wtype = reinterpret_cast<PyObject*>(Py_TYPE(weight));
    if ((wtype != plain.ptr() && wtype != parameter.ptr()) || reinterpret_cast<PyObject*>(Py_TYPE(grad)) != plain.ptr())
      return py::none();
    dlpack::Tensor w, g;
    int32_t wcode, gcode, wdevice, gdevice;
    int64_t wnumel, gnumel;
    if (!dense_with_dlpack(weight, w, wcode, wdevice, wnumel) || !dense_with_dlpack(grad, g, gcode, gdevice, gnumel))
      return py::none();
    if (wdevice != gdevice || w.ndim != g.ndim || gnumel != grads.numels[i] || grads.layout[i] != -1) return py::none();
    for (int k = 0; k < w.ndim; ++k)
      if (w.shape[k] != g.shape[k]) return py::none();
    out.weight_ptrs[i] = reinterpret_cast<int64_t>(static_cast<char*>(w.data) + w.byte_offset);
    out.weight_dtypes[i] = wcode;
    // units: the dim-0 slices (the whole tensor for ndim <= 1), as methods/agc.py's _segments
    out.first_segment[i] = count;
    if (g.ndim <= 1 || g.shape[0] <= 1) {
      out.slice_len[i] = 0;
      count += 1;
    } else {
      out.slice_len[i] = gnumel / g.shape[0];
      count += g.shape[0];
    }
  }
  out.num_segments = count;
  try {
    out.validate();
  } catch (const std::invalid_argument&) {
    return py::none();
  }
  return py::make_tuple(py::cast(std::move(out)), count);
}

Collected collect(const py::list& items, bool from_params, const py::dict& codes, const py::handle& plain,
                  const py::handle& parameter) {
  static PyObject* const grad_name = interned("grad");
  TensorAccess access(plain.ptr());
  Collected out;
  const Py_ssize_t count = PyList_GET_SIZE(items.ptr());
  out.tensors = py::reinterpret_steal<py::list>(PyList_New(count));  // filled in place, cut to size below
  if (!out.tensors) throw py::error_already_set();
  out.table.ptrs.reserve(static_cast<size_t>(count));
  out.table.numels.reserve(static_cast<size_t>(count));
  out.table.dtypes.reserve(static_cast<size_t>(count));
  out.table.layout.reserve(static_cast<size_t>(count));
  Py_ssize_t found = 0;
  bool complete = true;
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* tensor = PyList_GET_ITEM(items.ptr(), i);
    if (from_params) {
      tensor = PyObject_GetAttr(tensor, grad_name);  // torch's own AttributeError for non-parameters
      if (tensor == nullptr) throw py::error_already_set();
      if (tensor == Py_None) {
        Py_DECREF(tensor);
        continue;
      }
    } else {
      Py_INCREF(tensor);
    }
    PyList_SET_ITEM(out.tensors.ptr(), found++, tensor);  // steals the reference
    if (!complete) continue;
    // Only exact torch.Tensor or nn.Parameter (which adds no behaviour of its
    // own): other subclasses (DTensor, ...) take the general path.
    const PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(tensor));
    complete = (type == access.type || type == parameter.ptr()) &&
               (g_dlpack != nullptr ? describe_with_dlpack(tensor, out)
                                    : describe_with_attributes(tensor, codes.ptr(), access, out));
  }
  if (found < count && PyList_SetSlice(out.tensors.ptr(), found, count, nullptr) != 0) throw py::error_already_set();
  out.complete = complete;
  if (out.cuda_device == -2) out.cuda_device = -1;  // no tensors: the CPU, as torch answers
  if (!complete) out.table = TensorTable();
  return out;
}

}  // namespace fastclip
