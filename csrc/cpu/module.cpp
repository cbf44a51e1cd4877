// pybind11 module fastclip._cpu: the tensor table, its fast gather, and the
// fused CPU passes.  Torch-independent: it sees integers (addresses, sizes,
// strides, dtype codes), floats, and Python objects read by attribute name.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common/coefficients.h"
#include "../common/segment_table.h"
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
  if (!valid_norm_kind(kind)) throw py::value_error("fastclip._cpu: norm kind must be 1 (L1), 2 (L2) or 3 (inf)");
  return static_cast<NormKind>(kind);
}

template <class T>
T* pointer(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// A copy of `t` with segments (and weights) attached; None first_segment: tensor i is segment i.
TensorTable with_segments(const TensorTable& t, const std::optional<std::vector<int64_t>>& first_segment,
                          const std::optional<std::vector<int64_t>>& slice_len, int64_t num_segments,
                          const std::optional<std::vector<int64_t>>& weight_ptrs,
                          const std::optional<std::vector<int32_t>>& weight_dtypes) {
  TensorTable out = t;
  const size_t n = t.size();
  if (first_segment) {
    out.first_segment = *first_segment;
  } else {
    out.first_segment.resize(n);
    for (size_t i = 0; i < n; ++i) out.first_segment[i] = static_cast<int64_t>(i);
  }
  out.slice_len = slice_len ? *slice_len : std::vector<int64_t>(n, 0);
  out.num_segments = num_segments;
  if (weight_ptrs) out.weight_ptrs = *weight_ptrs;
  if (weight_dtypes) out.weight_dtypes = *weight_dtypes;
  try {
    out.validate();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(std::string("fastclip._cpu.") + e.what());
  }
  return out;
}

// The segmented passes, steps chosen by bits: 1 reduce, 2 finish, 4 apply.
// Arrays are raw addresses (0: not wanted) of num_segments entries each.
bool run_segments(const TensorTable& t, int32_t kind_code, int32_t steps, int nthreads, uintptr_t powers,
                  uintptr_t weight_powers, uintptr_t counts, int32_t mode, uintptr_t max_norms, int64_t max_norms_len,
                  double clip_factor, double eps, uintptr_t norms, int32_t norms_code, uintptr_t coefs,
                  uintptr_t total, int32_t total_code) {
  const NormKind kind = checked_kind(kind_code);
  if (mode < kNoCoefficient || mode > kAgc) throw py::value_error("fastclip._cpu: unknown coefficient mode");
  if (!valid_dtype(norms_code) || !valid_dtype(total_code)) throw py::value_error("fastclip._cpu: bad dtype code");
  if ((steps & 1) && (powers == 0 || (t.has_weights() && weight_powers == 0)))
    throw py::value_error("fastclip._cpu: the reduce step needs its outputs");
  if ((steps & 4) && coefs == 0) throw py::value_error("fastclip._cpu: the apply step needs the coefficients");
  py::gil_scoped_release release;
  const Work work(t);
  // AGC in one call: the rows read whole are clipped as they are reduced
  // (their coefficient needs only their own norms), the rest after finish.
  const bool agc_inline = steps == 7 && mode == kAgc && t.has_weights() && counts == 0;
  bool written = false;
  if (steps & 1) {
    SegmentSums sums;
    sums.powers = pointer<double>(powers);
    sums.weight_powers = pointer<double>(weight_powers);
    sums.counts = pointer<int64_t>(counts);
    if (agc_inline) sums.coefs = pointer<double>(coefs);
    const Work::AgcArgs agc{clip_factor, eps};
    written = work.reduce_segments(kind, sums, nthreads, agc_inline ? &agc : nullptr);
  }
  if (steps & 2) {
    FinishSpec spec;
    spec.mode = mode;
    spec.max_norms = pointer<const double>(max_norms);
    spec.max_norms_len = max_norms_len;
    spec.clip_factor = clip_factor;
    spec.eps = eps;
    spec.norms = pointer<void>(norms);
    spec.norms_code = norms_code;
    spec.coefs = pointer<double>(coefs);
    spec.packed_done = agc_inline;
    spec.total = pointer<void>(total);
    spec.total_code = total_code;
    finish_segments(work, kind, pointer<const double>(powers), pointer<const double>(weight_powers), spec);
  }
  if (steps & 4) written = work.scale_segments(pointer<const double>(coefs), nthreads, agc_inline) || written;
  return written;
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
      .def(
          "segment_table",
          [](const TensorTable& t, int64_t unit) {
            SegmentTable st;
            try {
              st = make_segment_table(t, unit);
            } catch (const std::invalid_argument& e) {
              throw py::value_error(std::string("fastclip._cpu.") + e.what());
            }
            return py::make_tuple(py::bytes(st.bytes), st.rows, st.units, st.segments, st.filled_segments,
                                  st.aligned16, st.dtype_mask, st.weight_mask);
          },
          py::arg("unit"),
          "(bytes, rows, units, segments, filled segments, aligned16, dtype mask, weight dtype mask): the GPU "
          "backends' table for the segmented kernels (csrc/common/segment_table.h).")
      .def("with_segments", &with_segments, py::arg("first_segment"), py::arg("slice_len"), py::arg("num_segments"),
           py::arg("weight_ptrs") = py::none(), py::arg("weight_dtypes") = py::none(),
           "A copy with segments (csrc/common/segments.h): per tensor the id of its first segment (None: tensor i "
           "is segment i) and its slice length (None or 0: whole); for AGC the weights read beside the grads.")
      .def_readonly("num_segments", &TensorTable::num_segments)
      .def_property_readonly("has_weights", &TensorTable::has_weights)
      .def_readonly("ptrs", &TensorTable::ptrs)
      .def_readonly("numels", &TensorTable::numels)
      .def_readonly("dtypes", &TensorTable::dtypes);

  m.def(
      "collect",
      [](const py::list& items, bool from_params, const py::dict& codes, const py::handle& plain,
         const py::handle& parameter) {
        Collected c = collect(items, from_params, codes, plain, parameter);
        py::object table = c.complete ? py::cast(std::move(c.table)) : py::none();
        return py::make_tuple(c.tensors, table, c.dtype_mask, c.cuda_device);
      },
      py::arg("items"), py::arg("from_params"), py::arg("codes"), py::arg("plain"), py::arg("parameter"),
      "(tensors, TensorTable or None, dtype bit mask, CUDA device index or -1 for CPU): the table only if "
      "every tensor is a plain tensor (or parameter), contiguous, of a known dtype, all on the CPU or all on one "
      "CUDA device.");

  m.def("agc_table", &agc_table, py::arg("grads"), py::arg("weights"), py::arg("grad_list"), py::arg("plain"),
        py::arg("parameter"),
        "AGC's table in one call: the grads' table (collect's) with each parameter read beside its grad and the "
        "dim-0 slices as segments; (table, number of segments), or None when a pair needs the general path.");
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
        Work(t).clamp(-clip_value, clip_value, nthreads);
      },
      py::arg("table"), py::arg("clip_value"), py::arg("nthreads"), "clip_grad_value_: clamp_range(-v, v).");
  m.def(
      "clamp_range",
      [](const TensorTable& t, double lo, double hi, int nthreads) {
        py::gil_scoped_release release;
        Work(t).clamp(lo, hi, nthreads);
      },
      py::arg("table"), py::arg("lo"), py::arg("hi"), py::arg("nthreads"),
      "grad.clamp_(lo, hi) for every grad (+-inf: no bound), each bound rounded to the grad's dtype; stores only "
      "what changes.  NaN bounds are the caller's (torch's ops).");
  m.def("segments", &run_segments, py::arg("table"), py::arg("kind"), py::arg("steps"), py::arg("nthreads"),
        py::arg("powers") = 0, py::arg("weight_powers") = 0, py::arg("counts") = 0, py::arg("mode") = 0,
        py::arg("max_norms") = 0, py::arg("max_norms_len") = 0, py::arg("clip_factor") = 0.0, py::arg("eps") = 0.0,
        py::arg("norms") = 0, py::arg("norms_code") = 0, py::arg("coefs") = 0, py::arg("total") = 0,
        py::arg("total_code") = 0,
        "The segmented primitives over a table with segments, steps by bits (1 reduce, 2 finish, 4 apply), "
        "arrays as addresses of num_segments entries: reduce fills powers (weight_powers, counts[2]); finish "
        "norms, coefs and total from them; apply scales segment s by coefs[s] unless it is 1.  Returns whether "
        "apply wrote anything.");
  m.def(
      "segment_coefficient",
      [](int32_t mode, int32_t kind, bool wide, double power, double weight_power, double max_norm,
         double clip_factor, double eps) {
        return segment_coefficient(mode, checked_kind(kind), wide, power, weight_power, max_norm, clip_factor, eps);
      },
      py::arg("mode"), py::arg("kind"), py::arg("wide"), py::arg("power"), py::arg("weight_power"),
      py::arg("max_norm"), py::arg("clip_factor"), py::arg("eps"),
      "The per-segment coefficient every backend computes (csrc/common/coefficients.h), for tests.");
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
    return clip_coefficient(total, checked_dtype(result_dtype) == DType::kFloat64, max_norm);
  });
  m.def("round_to_dtype", [](double v, int32_t dtype) { return round_to_dtype(v, checked_dtype(dtype)); });
  m.def("isa", [] { return std::string(row_kernels().isa); }, "Instruction set of the active kernels.");
  m.def("available_isas", &available_isas, "Instruction sets this binary has and this CPU runs, widest first.");
  m.def("select_isa", &select_isa, py::arg("name"), "Switch kernels; False if unknown or unsupported.");
  m.def("threading", [] { return std::string(threading()); }, "'openmp' (the process's OpenMP runtime) or 'pool'.");
  m.def("set_threading", [](const std::string& name) { return set_threading(name.c_str()); }, py::arg("name"));
  // The codes Python and every kernel share, defined once (csrc/common).
  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(DType::kFloat32);
  dtypes["float64"] = static_cast<int>(DType::kFloat64);
  dtypes["float16"] = static_cast<int>(DType::kFloat16);
  dtypes["bfloat16"] = static_cast<int>(DType::kBFloat16);
  m.attr("DTYPE_CODES") = dtypes;
  py::dict kinds;
  kinds[py::float_(1.0)] = static_cast<int>(kL1);
  kinds[py::float_(2.0)] = static_cast<int>(kL2);
  kinds[py::float_(std::numeric_limits<double>::infinity())] = static_cast<int>(kLinf);
  m.attr("NORM_KINDS") = kinds;
  py::dict modes;
  modes["none"] = static_cast<int>(kNoCoefficient);
  modes["clip_norm"] = static_cast<int>(kClipNorm);
  modes["agc"] = static_cast<int>(kAgc);
  m.attr("COEFFICIENT_MODES") = modes;
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
