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
//
// gram: the same polynomial evaluated on the wide X's r×r Gram matrix
// (Gram Newton–Schulz). With R = X·Xᵀ, each step forms Q = a·I + b·R + c·R²
// and R ← Q·R·Q, and accumulates P ← P·Q; X ← P·X is applied once at the end
// of a segment. In exact arithmetic this is the plain iteration (every matrix
// is a polynomial in R, so they commute). A segment ends after each step
// listed in gram_restarts, and at the last step: X is formed and R recomputed
// from it, which bounds how far P's rounding (P's norm grows like 1/σ_min)
// can carry. MakeNsCoefficients puts one restart after half the steps,
// rounded up: in the CPU engine's fp32 tests that was the most accurate single
// restart of every schedule (after 3 of 5 steps, after 2 of AOL's 4;
// docs/numerics.md).
struct NsCoefficients {
  ScheduleKind kind = ScheduleKind::kJordan;
  std::vector<std::array<double, 3>> steps;  // (a, b, c) per step
  double norm_safety = 1.0;  // divide by norm_safety·‖X‖_F + eps
  double eps = 1e-7;
  bool aol = false;          // AOL rescaling replaces the Frobenius norm
  bool gram = false;
  std::vector<int> gram_restarts;  // restart after this many steps (each)
};

// The schedule's coefficients for `steps` steps. polar_express is computed by
// the Remez construction (cushion 0.02, 1.01 deflation of all but the last
// step, start interval [1e-3, 1]); the fixed-tuple schedules repeat their last
// tuple past their published length. kSvd returns no steps. gram is off.
// InvalidArgument when steps < 1 or > 100 (except kSvd, which ignores steps).
absl::StatusOr<NsCoefficients> MakeNsCoefficients(ScheduleKind kind, int steps);

// MakeNsCoefficients for a parameter's hyper-parameters and matrix view,
// with `gram` resolved from hp.ns_gram (kAuto: GramNsPays) and eps from
// hp.ns_eps. A custom schedule (hp.ns_coefficients) gives its triples, one
// repeated for hp.ns_steps steps, with the plain Frobenius normalisation
// (norm_safety 1) and kind kJordan.
absl::StatusOr<NsCoefficients> MakeNsCoefficients(const HyperParams& hp, const MatrixView& view);

// Flops of one orthogonalization of a rows×cols matrix, every product
// counted at 2·m·n·k: plain Newton–Schulz (docs/math.md's
// steps·(4·r²·c + 2·r³)) or Gram Newton–Schulz with `coeffs.gram_restarts`.
double PlainNsFlops(int64_t rows, int64_t cols, int steps);
double GramNsFlops(int64_t rows, int64_t cols, int steps, const std::vector<int>& restarts);

// True when Gram Newton–Schulz needs at most kGramAutoRatio of the plain
// iteration's flops on this shape (the square r×r products run below the
// long ones' rate on a GPU, so an even split is not enough; docs/performance.md).
inline constexpr double kGramAutoRatio = 0.8;
bool GramNsPays(int64_t rows, int64_t cols, int steps, const std::vector<int>& restarts);

// The odd quintic p(x) = a·x + b·x³ + c·x⁵ minimizing max |p(x) − 1| over
// [lo, hi], by the Remez exchange. REQUIRES: 0 < lo ≤ hi.
std::array<double, 3> OptimalQuintic(double lo, double hi);

}  // namespace muon

#endif  // MUON_KERNELS_NS_SCHEDULE_H_
