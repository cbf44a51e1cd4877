// fastclip._cuda: the CUDA C++ backend's Python module (kernels: kernels.cu).
//
// Torch-independent: it takes the unit table's bytes (built by fastclip._cpu,
// csrc/common/unit_table.h), raw device addresses, dtype codes and the CUDA
// stream as integers, and links the CUDA runtime statically, so it builds
// without torch or a GPU and one binary serves any torch version.  Launch
// functions return the number of kernel launches and never wait for the
// device; a CUDA error raises RuntimeError naming the CUDA call.
//
// plan_chunks, locate and clip_coefficient run the kernels' host-side and
// shared code on the CPU, for tests on machines without a GPU.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "launch.h"

namespace py = pybind11;
using namespace fastclip;
using namespace fastclip::cuda;

namespace {

UnitColumns columns(std::string_view table, int64_t rows) {
  try {
    return UnitColumns::of(table.data(), table.size(), rows);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(std::string("fastclip._cuda: ") + e.what());
  }
}

// invalid_argument from the table checks becomes ValueError; CUDA failures stay RuntimeError.
template <class F>
auto guarded(F f) {
  try {
    return f();
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

void* address(uintptr_t p) { return reinterpret_cast<void*>(p); }

}  // namespace

#ifdef FASTCLIP_CUDA_EMULATION
PYBIND11_MODULE(_cuda_emu, m) {
  m.doc() = "fastclip's CUDA kernels compiled for the CPU with a CUDA emulation (tests: csrc/cuda/emulation.h)";
  m.attr("emulated") = true;
#else
PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fastclip fused CUDA kernels (torch-independent; CUDA runtime linked statically)";
  m.attr("emulated") = false;
#endif

  m.def("runtime_status", [] {
    const RuntimeStatus s = runtime_status();
    py::dict d;
    d["devices"] = s.devices;
    d["driver_version"] = s.driver_version;
    d["runtime_version"] = s.runtime_version;
    d["error"] = s.error;
    return d;
  }, "Devices this module's CUDA runtime sees, driver and runtime versions, and why none can be used.");

  m.def("device_setup", [](int device) {
    const DeviceSetup& s = device_setup(device);
    py::dict d;
    d["name"] = s.name;
    d["capability"] = py::make_tuple(s.major, s.minor);
    d["sms"] = s.sms;
    d["norm_grid"] = s.norm_grid;
    d["scale_grid"] = s.scale_grid;
    d["clamp_grid"] = s.clamp_grid;
    d["segment_grid"] = s.segment_grid;
    d["norm_registers"] = s.norm_registers;
    d["cooperative"] = s.cooperative;
    d["large_params"] = s.large_params;
    return d;
  }, py::arg("device"), "Launch shape of a device (from the compiled kernels' occupancy); raises if it cannot run them.");

  m.def(
      "clip_norm",
      [](int device, uintptr_t stream, std::string_view table, int64_t rows, int64_t units, int kind, double max_norm,
         int result_code, uintptr_t total_out, uintptr_t results, uintptr_t partials, int64_t partials_capacity,
         uintptr_t counter, bool scale, bool allow_cooperative) {
        if (kind < kL1 || kind > kLinf) throw py::value_error("fastclip._cuda: norm kind must be 1, 2 or 3");
        if (result_code < 0 || result_code > 3) throw py::value_error("fastclip._cuda: bad result dtype code");
        const UnitColumns c = columns(table, rows);
        NormJob job;
        job.kind = kind;
        job.max_norm = max_norm;
        job.result_code = result_code;
        job.total_out = address(total_out);
        job.results = static_cast<double*>(address(results));
        job.partials = static_cast<double*>(address(partials));
        job.partials_capacity = partials_capacity;
        job.counter = static_cast<unsigned int*>(address(counter));
        job.scale = scale;
        job.allow_cooperative = allow_cooperative;
        return guarded([&] { return clip_norm(device, stream, c, units, job); });
      },
      py::arg("device"), py::arg("stream"), py::arg("table"), py::arg("rows"), py::arg("units"), py::arg("kind"),
      py::arg("max_norm"), py::arg("result_code"), py::arg("total_out"), py::arg("results"), py::arg("partials"),
      py::arg("partials_capacity"), py::arg("counter"), py::arg("scale"), py::arg("allow_cooperative"),
      "Total norm into total_out, [coefficient, float64 total] into results; with scale=True also clip the grads "
      "(one cooperative launch when the device allows and the table fits one launch).");

  m.def(
      "scale",
      [](int device, uintptr_t stream, std::string_view table, int64_t rows, int64_t units, uintptr_t coef,
         int coef_code) {
        const UnitColumns c = columns(table, rows);
        return guarded([&] { return scale(device, stream, c, units, address(coef), coef_code); });
      },
      py::arg("device"), py::arg("stream"), py::arg("table"), py::arg("rows"), py::arg("units"), py::arg("coef"),
      py::arg("coef_code"), "grads *= the 0-dim device scalar at coef (of dtype code coef_code), unless it is 1.");

  m.def(
      "clamp",
      [](int device, uintptr_t stream, std::string_view table, int64_t rows, int64_t units, float lo32, float hi32,
         float lo16, float hi16, float lo_bf16, float hi_bf16, double lo64, double hi64) {
        const UnitColumns c = columns(table, rows);
        const ClampBounds b{lo32, hi32, lo16, hi16, lo_bf16, hi_bf16, lo64, hi64};
        return guarded([&] { return clamp(device, stream, c, units, b); });
      },
      py::arg("device"), py::arg("stream"), py::arg("table"), py::arg("rows"), py::arg("units"), py::arg("lo32"),
      py::arg("hi32"), py::arg("lo16"), py::arg("hi16"), py::arg("lo_bf16"), py::arg("hi_bf16"), py::arg("lo64"),
      py::arg("hi64"), "clip_grad_value_ with bounds already rounded to each dtype; stores only what changes.");

  m.def(
      "segments",
      [](int device, uintptr_t stream, const std::string& step, uintptr_t table, int64_t rows, int64_t units,
         int64_t segments, int64_t filled, uintptr_t unit_parts, uintptr_t unit_weight_parts,
         uintptr_t segment_counter, uintptr_t done_counter, uintptr_t powers, uintptr_t weight_powers,
         uintptr_t counts, uintptr_t max_norms, int64_t max_norms_len, double clip_factor, double eps,
         uintptr_t norms, int norms_code, uintptr_t coefs, uintptr_t total, int total_code, int mode, int kind,
         bool finish) {
        if (!valid_norm_kind(kind)) throw py::value_error("fastclip._cuda: norm kind must be 1, 2 or 3");
        if (mode < kNoCoefficient || mode > kAgc) throw py::value_error("fastclip._cuda: unknown coefficient mode");
        if (norms_code < 0 || norms_code > 3 || total_code < 0 || total_code > 3)
          throw py::value_error("fastclip._cuda: bad dtype code");
        SegmentArgs a;
        a.table = reinterpret_cast<const int64_t*>(table);
        a.rows = rows;
        a.units = units;
        a.segments = segments;
        a.filled = filled;
        a.unit_parts = reinterpret_cast<double*>(unit_parts);
        a.unit_weight_parts = reinterpret_cast<double*>(unit_weight_parts);
        a.segment_counter = reinterpret_cast<unsigned*>(segment_counter);
        a.done_counter = reinterpret_cast<unsigned*>(done_counter);
        a.powers = reinterpret_cast<double*>(powers);
        a.weight_powers = reinterpret_cast<double*>(weight_powers);
        a.counts = reinterpret_cast<unsigned long long*>(counts);
        a.max_norms = reinterpret_cast<const double*>(max_norms);
        a.max_norms_len = max_norms_len;
        a.clip_factor = clip_factor;
        a.eps = eps;
        a.norms = address(norms);
        a.norms_code = norms_code;
        a.coefs = reinterpret_cast<double*>(coefs);
        a.total = address(total);
        a.total_code = total_code;
        a.mode = mode;
        a.kind = kind;
        a.finish = finish;
        return guarded([&] {
          if (step == "reduce") return segment_reduce(device, stream, a);
          if (step == "finish") return segment_finish(device, stream, a);
          if (step == "apply") return segment_apply(device, stream, a);
          throw std::invalid_argument("fastclip._cuda.segments: step must be reduce, finish or apply");
        });
      },
      py::arg("device"), py::arg("stream"), py::arg("step"), py::arg("table"), py::arg("rows"), py::arg("units"),
      py::arg("segments"), py::arg("filled"), py::arg("unit_parts") = 0, py::arg("unit_weight_parts") = 0,
      py::arg("segment_counter") = 0, py::arg("done_counter") = 0, py::arg("powers") = 0,
      py::arg("weight_powers") = 0, py::arg("counts") = 0, py::arg("max_norms") = 0, py::arg("max_norms_len") = 0,
      py::arg("clip_factor") = 0.0, py::arg("eps") = 0.0, py::arg("norms") = 0, py::arg("norms_code") = 0,
      py::arg("coefs") = 0, py::arg("total") = 0, py::arg("total_code") = 0, py::arg("mode") = 0,
      py::arg("kind") = 2, py::arg("finish") = false,
      "A segmented primitive (step: reduce, finish or apply) over a segment table in device memory "
      "(csrc/common/segment_table.h); every array a device address (0: not wanted).  Returns the launches.");

  // ---- the kernels' host-side code, for tests without a GPU

  m.def(
      "plan_chunks",
      [](std::string_view table, int64_t rows, int64_t units, int cap) {
        const UnitColumns c = columns(table, rows);
        return guarded([&] {
          validate(c, units);
          std::vector<std::tuple<int64_t, int64_t, int64_t>> out;
          for (const Chunk& k : chunks_of(c, units, cap)) out.emplace_back(k.begin, k.end, k.units);
          return out;
        });
      },
      py::arg("table"), py::arg("rows"), py::arg("units"), py::arg("cap"),
      "[(first row, end row, units)] of the launches for a table, at most `cap` rows each.");

  m.def(
      "locate",
      [](std::string_view table, int64_t rows, int64_t units, int64_t unit) {
        const UnitColumns c = columns(table, rows);
        return guarded([&] {
          validate(c, units);
          if (unit < 0 || unit >= units) throw std::invalid_argument("locate: no such unit");
          // The kernels' own search, over the chunk of kLargeRows rows that holds the unit.
          auto t = std::make_unique<KernelTable<kLargeRows>>();
          for (const Chunk& k : chunks_of(c, units, kLargeRows)) {
            const int64_t base = c.first_unit[k.begin];
            if (unit >= base + k.units) continue;
            fill(*t, c, k);
            const int32_t u = static_cast<int32_t>(unit - base);
            const int r = t->locate(u);
            const int64_t start = static_cast<int64_t>(u - t->first_unit[r]) * kUnitElems;
            const int64_t left = t->numel(r) - start;
            return py::make_tuple(k.begin + r, start, left < kUnitElems ? left : kUnitElems, t->code(r));
          }
          throw std::invalid_argument("locate: unit not in any chunk");
        });
      },
      py::arg("table"), py::arg("rows"), py::arg("units"), py::arg("unit"),
      "(row, first element, element count, dtype code) of a work unit, found as the kernels find it.");

  m.def(
      "clip_coefficient",
      [](double total, int result_code, double max_norm) { return clip_coefficient(total, result_code == 1, max_norm); },
      py::arg("total"), py::arg("result_code"), py::arg("max_norm"),
      "The coefficient the kernels compute (the same function, compiled for the host).");

  m.attr("unit_elems") = kUnitElems;  // also the segmented kernels' unit
  m.attr("threads") = kThreads;
  m.attr("small_rows") = kSmallRows;
  m.attr("large_rows") = kLargeRows;
#ifdef FASTCLIP_CUDA_ARCHS
  m.attr("archs") = FASTCLIP_CUDA_ARCHS;
#else
  m.attr("archs") = "";
#endif
}
