// pybind11 module fastclip._cpu: the tensor table, its fast gather, and the
// fused CPU passes.  Torch-independent: it sees integers (addresses, sizes,
// strides, dtype codes), floats, and Python objects read by attribute name.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "../common/unit_table.h"
#include "../python/collect.h"
#include "row_kernels.h"
#include "thread_pool.h"
#include "work.h"

namespace py = pybind11;
using namespace fastclip;
using namespace fastclip::cpu;

namespace {

using Strided = std::tuple<int64_t, std::vector<int64_t>, std::vector<int64_t>>;

DType checked_dtype(int32_t code) {
  if (!valid_dtype(code)) throw py::value_error("fastclip._cpu: unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

NormKind checked_kind(int32_t kind) {
  if (kind < 1 || kind > 3) throw py::value_error("fastclip._cpu: norm kind must be 1 (L1), 2 (L2) or 3 (inf)");
  return static_cast<NormKind>(kind);
}

// The general path: lists built in Python (fastclip/_work.py describe()).
TensorTable make_table(const std::vector<int64_t>& ptrs, const std::vector<int64_t>& numels,
                       const std::vector<int32_t>& dtypes, const std::vector<Strided>& strided) {
  TensorTable t;
  t.ptrs = ptrs;
  t.numels = numels;
  t.dtypes = dtypes;
  t.layout.assign(ptrs.size(), -1);
  for (const Strided& s : strided) {
    const int64_t index = std::get<0>(s);
    const std::vector<int64_t>& sizes = std::get<1>(s);
    const std::vector<int64_t>& strides = std::get<2>(s);
    if (index < 0 || static_cast<size_t>(index) >= ptrs.size())
      throw py::value_error("fastclip._cpu.TensorTable: strided index out of range");
    if (sizes.empty() || sizes.size() > static_cast<size_t>(kMaxDims) || sizes.size() != strides.size())
      throw py::value_error("fastclip._cpu.TensorTable: strided views need 1 to 8 sizes and as many strides");
    StridedLayout layout;
    layout.ndim = static_cast<int32_t>(sizes.size());
    for (size_t d = 0; d < sizes.size(); ++d) {
      layout.sizes[d] = sizes[d];
      layout.strides[d] = strides[d];
    }
    t.layout[static_cast<size_t>(index)] = static_cast<int32_t>(t.strided.size());
    t.strided.push_back(layout);
  }
  try {
    t.validate();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(std::string("fastclip._cpu.") + e.what());
  }
  return t;
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fastclip fused CPU kernels (torch-independent)";

  py::class_<TensorTable>(m, "TensorTable", "Addresses, element counts, dtype codes (and strided layouts) of tensors.")
      .def(py::init(&make_table), py::arg("ptrs"), py::arg("numels"), py::arg("dtypes"),
           py::arg("strided") = std::vector<Strided>{})
      .def("__len__", &TensorTable::size)
      .def("has_empty", &TensorTable::has_empty)
      .def(
          "unit_table",
          [](const TensorTable& t, int64_t unit) {
            UnitTable u;
            try {
              u = make_unit_table(t, unit);
            } catch (const std::invalid_argument& e) {
              throw py::value_error(std::string("fastclip._cpu.") + e.what());
            }
            return py::make_tuple(py::bytes(u.bytes), u.rows, u.units, u.aligned16, u.dtype_mask);
          },
          py::arg("unit"),
          "(bytes, rows, units, aligned16, dtype mask): the GPU backends' table, four int64 columns "
          "[first unit | address | numel | dtype code] of the dense non-empty tensors (csrc/common/unit_table.h).")
      .def_readonly("ptrs", &TensorTable::ptrs)
      .def_readonly("numels", &TensorTable::numels)
      .def_readonly("dtypes", &TensorTable::dtypes);

  m.def(
      "collect",
      [](const py::list& items, bool from_params, const py::dict& codes, const py::handle& plain) {
        Collected c = collect(items, from_params, codes, plain);
        py::object table = c.complete ? py::cast(std::move(c.table)) : py::none();
        return py::make_tuple(c.tensors, table, c.dtype_mask, c.cuda_device);
      },
      py::arg("items"), py::arg("from_params"), py::arg("codes"), py::arg("plain"),
      "(tensors, TensorTable or None, dtype bit mask, CUDA device index or -1 for CPU): the table only if "
      "every tensor is a plain, contiguous tensor of a known dtype, all on the CPU or all on one CUDA device.");

  m.def("set_dlpack_exchange_api", &set_dlpack_exchange_api, py::arg("capsule"),
        "Describe tensors through this DLPack C exchange API capsule (None: by attributes).");
  m.def("using_dlpack_exchange_api", &using_dlpack_exchange_api);

  m.def(
      "norm",
      [](const TensorTable& t, int32_t kind, int nthreads) {
        const NormKind k = checked_kind(kind);
        py::gil_scoped_release release;
        return Work(t).norm(k, nthreads);
      },
      py::arg("table"), py::arg("kind"), py::arg("nthreads"),
      "p-norm (kind 1, 2 or 3 = inf) of all elements as one vector, as a double.");
  m.def(
      "clip_norm",
      [](const TensorTable& t, int32_t kind, double max_norm, int32_t result_dtype, bool error_if_nonfinite,
         int nthreads) {
        const NormKind k = checked_kind(kind);
        const DType r = checked_dtype(result_dtype);
        py::gil_scoped_release release;
        const ClipOutcome o = clip_norm(Work(t), k, max_norm, r, error_if_nonfinite, nthreads);
        return std::make_tuple(o.total, o.coef, o.aborted, o.scaled);
      },
      py::arg("table"), py::arg("kind"), py::arg("max_norm"), py::arg("result_dtype"), py::arg("error_if_nonfinite"),
      py::arg("nthreads"),
      "Fused clip_grad_norm_: (total as stored in result_dtype, coefficient, aborted, scaled).");
  m.def(
      "scale",
      [](const TensorTable& t, double coef, int nthreads) {
        py::gil_scoped_release release;
        Work(t).scale(coef, nthreads);
      },
      py::arg("table"), py::arg("coef"), py::arg("nthreads"));
  m.def(
      "clamp",
      [](const TensorTable& t, double clip_value, int nthreads) {
        py::gil_scoped_release release;
        Work(t).clamp(clip_value, nthreads);
      },
      py::arg("table"), py::arg("clip_value"), py::arg("nthreads"));
  m.def(
      "touch_read",
      [](const TensorTable& t, int nthreads) {
        py::gil_scoped_release release;
        return Work(t).touch_read(nthreads);
      },
      py::arg("table"), py::arg("nthreads"), "Benchmark floor: read every byte once.");
  m.def(
      "touch_write",
      [](const TensorTable& t, int nthreads) {
        py::gil_scoped_release release;
        Work(t).touch_write(nthreads);
      },
      py::arg("table"), py::arg("nthreads"), "Benchmark floor: read every byte and write it back.");
  m.def(
      "tensors_overlap", [](const TensorTable& t) { return Work(t).tensors_overlap(); }, py::arg("table"));

  m.def("clip_coefficient", [](double total, int32_t result_dtype, double max_norm) {
    return clip_coefficient(total, checked_dtype(result_dtype), max_norm);
  });
  m.def("round_to_dtype", [](double v, int32_t dtype) { return round_to_dtype(v, checked_dtype(dtype)); });
  m.def("isa", [] { return std::string(row_kernels().isa); }, "Instruction set of the active kernels.");
  m.def("available_isas", &available_isas, "Instruction sets this binary has and this CPU runs, widest first.");
  m.def("select_isa", &select_isa, py::arg("name"), "Switch kernels; False if unknown or unsupported.");
  m.def("threading", [] { return std::string(threading()); }, "'openmp' (the process's OpenMP runtime) or 'pool'.");
  m.def("set_threading", [](const std::string& name) { return set_threading(name.c_str()); }, py::arg("name"));
  m.attr("unit_elems") = kUnitElems;
  m.attr("parallel_min_bytes") = kParallelMinBytes;
#if defined(__clang__)
  m.attr("compiler") = "clang " __clang_version__;
#elif defined(__GNUC__)
  m.attr("compiler") = "gcc " __VERSION__;
#else
  m.attr("compiler") = "unknown";
#endif
}
