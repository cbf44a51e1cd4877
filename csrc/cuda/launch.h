// What the Python module (module.cpp) asks of the CUDA kernels (kernels.cu).
// Plain C++, no CUDA types: addresses and the stream travel as integers,
// so nothing here depends on torch or on the CUDA headers.
//
// Every function sets the device, launches on `stream` and returns the
// number of kernel launches; none waits for the device.  A CUDA error raises
// std::runtime_error naming the CUDA call that failed.
#pragma once

#include <cstdint>
#include <string>

#include "../common/coefficients.h"
#include "../common/norm_kind.h"
#include "kernel_table.h"

namespace fastclip::cuda {

struct RuntimeStatus {
  int devices = 0;
  int driver_version = 0;   // e.g. 13000 for CUDA 13.0; 0 when there is no driver
  int runtime_version = 0;  // of the CUDA runtime linked into this module
  std::string error;        // why no device can be used, or ""
};
RuntimeStatus runtime_status();

// Launch shape of one device, found once from the compiled kernels' occupancy.
struct DeviceSetup {
  int device = 0;
  std::string name;
  int major = 0, minor = 0;
  int sms = 0;
  int norm_grid = 0;    // blocks of a norm launch: resident blocks per SM * SMs (cooperative: all at once)
  int scale_grid = 0;
  int clamp_grid = 0;
  int segment_grid = 0;  // blocks of the segmented kernels
  int norm_registers = 0;  // per thread, of the compiled norm kernel (32 KB-table variant)
  bool cooperative = false;   // the device can launch cooperative grids
  bool large_params = false;  // 32 KB of kernel parameters (CUDA >= 12.1, compute capability >= 7.0)
};
const DeviceSetup& device_setup(int device);

struct NormJob {
  int kind = kL2;
  double max_norm = 0.0;      // for the coefficient
  int result_code = 0;        // dtype code of total_out
  void* total_out = nullptr;  // 0-dim result tensor
  double* results = nullptr;  // [clip coefficient, float64 total] (device)
  double* partials = nullptr; // one double per block of every launch
  int64_t partials_capacity = 0;
  unsigned int* counter = nullptr;  // zero; the last block of a norm launch resets it
  bool scale = false;               // also multiply the grads by the coefficient
  bool allow_cooperative = true;    // one launch for norm and scale when the device can
};

int clip_norm(int device, uintptr_t stream, const UnitColumns& table, int64_t units, const NormJob& job);
int scale(int device, uintptr_t stream, const UnitColumns& table, int64_t units, const void* coef, int coef_code);

// clip_grad_value_'s bounds, already rounded to each dtype (as torch converts them).
struct ClampBounds {
  float lo32, hi32, lo16, hi16, lo_bf16, hi_bf16;
  double lo64, hi64;
};
int clamp(int device, uintptr_t stream, const UnitColumns& table, int64_t units, const ClampBounds& bounds);

// One segmented call (csrc/common/segments.h): the segment table
// (csrc/common/segment_table.h, in device memory) and where the kernels
// read and write, all device addresses (null: not wanted).  Passed to the
// kernels by value.
struct SegmentArgs {
  const int64_t* table = nullptr;
  int64_t rows = 0, units = 0, segments = 0, filled = 0;  // filled: segments with units
  double* unit_parts = nullptr;         // scratch: a partial per unit (grads) ...
  double* unit_weight_parts = nullptr;  // ... and per unit (weights)
  unsigned* segment_counter = nullptr;  // one per segment, zeroed on the stream before each reduce launch
  unsigned* done_counter = nullptr;     // likewise
  double* powers = nullptr;             // per segment: sum of |g|^p or max |g| (float64)
  double* weight_powers = nullptr;      // per segment, the weights' (AGC)
  unsigned long long* counts = nullptr; // [2]: elements that are inf or NaN, that are zero
  const double* max_norms = nullptr;    // kClipNorm: 1 or `segments` values
  int64_t max_norms_len = 0;
  double clip_factor = 0.0, eps = 0.0;  // kAgc
  void* norms = nullptr;                // per segment, in dtype norms_code
  double* coefs = nullptr;              // per segment
  void* total = nullptr;                // 0-dim, in dtype total_code
  int32_t norms_code = 0, total_code = 0;
  int32_t mode = 0;                     // CoefficientMode
  int32_t kind = kL2;
  bool finish = false;                  // segment_reduce also computes coefficients and norms (and total)
};
int segment_reduce(int device, uintptr_t stream, const SegmentArgs& args);
int segment_finish(int device, uintptr_t stream, const SegmentArgs& args);
int segment_apply(int device, uintptr_t stream, const SegmentArgs& args);

}  // namespace fastclip::cuda
