// How partial results are combined, in the kernels and across units.
#pragma once

#include <cmath>
#include <limits>

namespace fastclip {

// max for the inf-norm: NaN wins, as torch's max_propagate_nan.
inline double nan_max(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  return a > b ? a : b;
}

// Compensated (Knuth TwoSum) summation: the rounding error of every addition
// is carried along, so a sum of doubles is nearly correctly rounded whatever
// its length.  Needs IEEE arithmetic without reassociation or contraction
// (the build uses -ffp-contract=off and no fast-math).
struct CompensatedSum {
  double sum = 0.0;
  double error = 0.0;

  void add(double x) {
    const double t = sum + x;
    const double z = t - sum;
    error += (sum - (t - z)) + (x - z);
    sum = t;
  }
  // Once the sum is inf or NaN its error term is NaN: the sum alone is the answer.
  double value() const { return std::isfinite(sum) ? sum + error : sum; }
};

}  // namespace fastclip
