#include "collect.h"

namespace py = pybind11;

namespace fastclip {
namespace {

PyObject* interned(const char* name) { return PyUnicode_InternFromString(name); }

// torch.Tensor's own attribute descriptors, looked up once per call: calling
// a descriptor directly skips the attribute lookup of every access.
struct TensorAccess {
  explicit TensorAccess(PyObject* tensor_type)
      : type(tensor_type),
        dtype(py::reinterpret_steal<py::object>(PyObject_GetAttr(tensor_type, names().dtype))),
        is_cpu(py::reinterpret_steal<py::object>(PyObject_GetAttr(tensor_type, names().is_cpu))),
        is_contiguous(py::reinterpret_steal<py::object>(PyObject_GetAttr(tensor_type, names().is_contiguous))),
        data_ptr(py::reinterpret_steal<py::object>(PyObject_GetAttr(tensor_type, names().data_ptr))),
        nbytes(py::reinterpret_steal<py::object>(PyObject_GetAttr(tensor_type, names().nbytes))) {
    if (!dtype || !is_cpu || !is_contiguous || !data_ptr || !nbytes) throw py::error_already_set();
  }
  PyObject* get(const py::object& descr, PyObject* obj) const {  // a property: obj.name
    return Py_TYPE(descr.ptr())->tp_descr_get(descr.ptr(), obj, type);
  }
  PyObject* call(const py::object& descr, PyObject* obj) const {  // a method: obj.name()
    return PyObject_Vectorcall(descr.ptr(), &obj, 1, nullptr);
  }

  struct Names {
    PyObject* dtype = interned("dtype");
    PyObject* is_cpu = interned("is_cpu");
    PyObject* is_contiguous = interned("is_contiguous");
    PyObject* data_ptr = interned("data_ptr");
    PyObject* nbytes = interned("nbytes");  // a property: cheaper to call than numel()
  };
  static const Names& names() {
    static const Names* n = new Names();  // interned for the life of the process
    return *n;
  }

  PyObject* type;
  py::object dtype, is_cpu, is_contiguous, data_ptr, nbytes;
  // Most grads share a dtype: remember the last one seen.
  PyObject* last_dtype = nullptr;
  long last_code = -1;
};

// Appends t to the table if it is a plain, contiguous CPU tensor of a known
// dtype.  Returns false (exception cleared) otherwise.
bool describe_one(PyObject* t, PyObject* codes, TensorAccess& access, Collected& out) {
  if (reinterpret_cast<PyObject*>(Py_TYPE(t)) != access.type) return false;

  PyObject* dtype = access.get(access.dtype, t);  // torch.dtype objects are immortal singletons
  if (dtype == nullptr) return PyErr_Clear(), false;
  if (dtype != access.last_dtype) {
    PyObject* code = PyDict_GetItemWithError(codes, dtype);  // borrowed
    if (code == nullptr) return Py_DECREF(dtype), PyErr_Clear(), false;
    access.last_dtype = dtype;
    access.last_code = PyLong_AsLong(code);
  }
  Py_DECREF(dtype);
  const long dtype_code = access.last_code;

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

  const int32_t code = static_cast<int32_t>(dtype_code);
  out.table.push_dense(address, bytes / element_size(static_cast<DType>(code)), code);
  out.dtype_mask |= 1u << dtype_code;
  return true;
}

}  // namespace

Collected collect(const py::list& items, bool from_params, const py::dict& codes, const py::handle& plain) {
  static PyObject* const grad_name = interned("grad");
  TensorAccess access(plain.ptr());
  Collected out;
  const Py_ssize_t count = PyList_GET_SIZE(items.ptr());
  out.tensors = py::reinterpret_steal<py::list>(PyList_New(count));  // filled in place, cut to size below
  if (!out.tensors) throw py::error_already_set();
  Py_ssize_t found = 0;
  out.table.ptrs.reserve(static_cast<size_t>(count));
  out.table.numels.reserve(static_cast<size_t>(count));
  out.table.dtypes.reserve(static_cast<size_t>(count));
  out.table.layout.reserve(static_cast<size_t>(count));
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
    if (complete) complete = describe_one(tensor, codes.ptr(), access, out);
  }
  if (found < count && PyList_SetSlice(out.tensors.ptr(), found, count, nullptr) != 0) throw py::error_already_set();
  out.complete = complete;
  if (!complete) out.table = TensorTable();
  return out;
}

}  // namespace fastclip
