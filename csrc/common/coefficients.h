// The per-segment formulas of the clipping methods, written once: the CPU
// kernels, the CUDA kernels (and their emulation) include this file, and the
// Triton kernels have one twin of each (fastclip/backends/triton_kernels.py,
// tested against these through fastclip._cpu).
//
// Every norm is first accumulated in float64 (a p-th power sum, or a maximum
// for the inf-norm).  A "wide" segment has a float64 grad (or weight): its
// norm and coefficient stay in float64; any other segment is worked in
// float32, as torch works a float32 norm (fp16/bf16 segments too: fastclip
// clips them with their float32 norm, see README).
#pragma once

#include <cmath>

#include "hd.h"
#include "norm_kind.h"

namespace fastclip {

// The norm from its accumulated power: the square root for L2 (float64 sqrt:
// correctly rounded), the value itself for L1 and inf.
FASTCLIP_HD double norm_from_power(double power, int kind) { return kind == kL2 ? sqrt(power) : power; }

// A norm as the segment's arithmetic sees it: float64, or rounded to float32.
FASTCLIP_HD double segment_norm(double norm, bool wide) {
  return wide ? norm : static_cast<double>(static_cast<float>(norm));
}

// torch's clip_grads_with_norm_ coefficient clamp(max_norm / (total + 1e-6), max=1),
// with torch's rounding: reciprocal, then multiply; in float32 unless wide.
// NaN stays NaN, as with torch.clamp.
FASTCLIP_HD double clip_coefficient(double total, bool wide, double max_norm) {
  if (wide) {
    const double c = (1.0 / (total + 1e-6)) * max_norm;
    return c > 1.0 ? 1.0 : c;
  }
  const float r = 1.0f / (static_cast<float>(total) + static_cast<float>(1e-6));
  const float c = r * static_cast<float>(max_norm);
  return c > 1.0f ? 1.0 : static_cast<double>(c);
}

// AGC (timm.utils.agc.adaptive_clip_grad) for one unit: max_norm =
// max(‖W‖, eps) * clip_factor; a unit whose grad norm is not below it (NaN
// included, as torch.where has it) is scaled by max_norm / max(‖G‖, 1e-6),
// else left alone (coefficient exactly 1).  timm's operations in its order,
// in float32 unless wide; the scalars are rounded to float32 as torch rounds
// a Python scalar for a float32 tensor.
FASTCLIP_HD double agc_coefficient(double grad_norm, double weight_norm, bool wide, double clip_factor, double eps) {
  if (wide) {
    const double max_norm = (weight_norm < eps ? eps : weight_norm) * clip_factor;
    if (grad_norm < max_norm) return 1.0;
    return max_norm / (grad_norm < 1e-6 ? 1e-6 : grad_norm);
  }
  const float g = static_cast<float>(grad_norm), w = static_cast<float>(weight_norm);
  const float e = static_cast<float>(eps);
  const float max_norm = (w < e ? e : w) * static_cast<float>(clip_factor);
  if (g < max_norm) return 1.0;
  const float floor = static_cast<float>(1e-6);
  return static_cast<double>(max_norm / (g < floor ? floor : g));
}

// What a segmented call computes from each segment's reduction.
enum CoefficientMode : int32_t {
  kNoCoefficient = 0,  // statistics: norms only
  kClipNorm = 1,       // clip_grad_norm_ per segment (per tensor, per group)
  kAgc = 2,            // adaptive_clip_grad_: per unit, from the grad's and the weight's norms
};

// Segment s's coefficient from its accumulated powers (kind: the norm's).
FASTCLIP_HD double segment_coefficient(int mode, int kind, bool wide, double power, double weight_power,
                                       double max_norm, double clip_factor, double eps) {
  const double norm = norm_from_power(power, kind);
  if (mode == kClipNorm) return clip_coefficient(norm, wide, max_norm);
  if (mode == kAgc) return agc_coefficient(norm, norm_from_power(weight_power, kind), wide, clip_factor, eps);
  return 1.0;
}

}  // namespace fastclip
