#ifndef MUON_KERNELS_NS_SCHEDULE_H_
#define MUON_KERNELS_NS_SCHEDULE_H_

#include <array>
#include <vector>

#include "absl/status/statusor.h"
#include "muon/kernels/types.h"

namespace muon {

// The coefficients of one Newton–Schulz run: X ← a·X + (b·A + c·A·A)·X with
// A = X·Xᵀ, one tuple per step, after normalizing X by
// norm_safety·‖X‖_F (or by AOL row scaling when aol is set).
struct NsCoefficients {
  ScheduleKind kind = ScheduleKind::kJordan;
  std::vector<std::array<double, 3>> steps;  // (a, b, c) per step
  double norm_safety = 1.0;  // divide by norm_safety·‖X‖_F + 1e-7
  bool aol = false;          // AOL rescaling replaces the Frobenius norm
};

// The schedule's coefficients for `steps` steps. polar_express is computed by
// the Remez construction (cushion 0.02, 1.01 deflation of all but the last
// step, start interval [1e-3, 1]); the fixed-tuple schedules repeat their last
// tuple past their published length. kSvd returns no steps.
// InvalidArgument when steps < 1 or > 100 (except kSvd, which ignores steps).
absl::StatusOr<NsCoefficients> MakeNsCoefficients(ScheduleKind kind, int steps);

// The odd quintic p(x) = a·x + b·x³ + c·x⁵ minimizing max |p(x) − 1| over
// [lo, hi], by the Remez exchange. REQUIRES: 0 < lo ≤ hi.
std::array<double, 3> OptimalQuintic(double lo, double hi);

}  // namespace muon

#endif  // MUON_KERNELS_NS_SCHEDULE_H_
