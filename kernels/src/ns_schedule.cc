#include "muon/kernels/ns_schedule.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"

namespace muon {
namespace {

using Real = long double;
using Tuple = std::array<double, 3>;

constexpr Tuple kJordan = {3.4445, -4.7750, 2.0315};
constexpr std::array<Tuple, 5> kDion = {{{4.0848, -6.8946, 2.9270},
                                         {3.9505, -6.3029, 2.6377},
                                         {3.7418, -5.5913, 2.3037},
                                         {2.8769, -3.1427, 1.2046},
                                         {2.8366, -3.0525, 1.2012}}};
// Turbo-Muon's published AOL tuples (found by a genetic search).
constexpr std::array<Tuple, 4> kAol = {{{4.6051, -9.6552, 5.6769},
                                        {4.7505, -6.0861, 2.1790},
                                        {2.7763, -2.3190, 0.5523},
                                        {2.4231, -2.2861, 0.8193}}};

// Polar Express construction constants (Amsel et al. 2025).
constexpr Real kStartLower = 1e-3L;
constexpr Real kCushion = 0.02L;
constexpr Real kDeflation = 1.01L;

Real Quintic(const std::array<Real, 3>& p, Real x) {
  const Real x2 = x * x;
  return x * (p[0] + x2 * (p[1] + x2 * p[2]));
}

// Solves the 4×4 system a·x = rhs by Gaussian elimination with partial pivoting.
std::array<Real, 4> Solve4(std::array<std::array<Real, 5>, 4> a) {
  for (int c = 0; c < 4; ++c) {
    int pivot = c;
    for (int r = c + 1; r < 4; ++r) {
      if (std::fabs(a[r][c]) > std::fabs(a[pivot][c])) pivot = r;
    }
    std::swap(a[c], a[pivot]);
    for (int r = 0; r < 4; ++r) {
      if (r == c) continue;
      const Real f = a[r][c] / a[c][c];
      for (int k = c; k < 5; ++k) a[r][k] -= f * a[c][k];
    }
  }
  return {a[0][4] / a[0][0], a[1][4] / a[1][1], a[2][4] / a[2][2], a[3][4] / a[3][3]};
}

std::array<Real, 3> OptimalQuinticReal(Real lo, Real hi) {
  // Near lo = hi the equioscillating quintic is numerically the degree-5
  // Taylor polynomial of the polar map around hi.
  if (lo / hi >= 1 - 5e-6L) {
    return {15.0L / 8 / hi, -10.0L / 8 / (hi * hi * hi), 3.0L / 8 / std::pow(hi, 5.0L)};
  }
  // Interior equioscillation nodes; exact as lo → hi.
  Real q = (3 * lo + hi) / 4;
  Real r = (lo + 3 * hi) / 4;
  std::array<Real, 3> p{};
  Real error = std::numeric_limits<Real>::infinity();
  for (int iter = 0; iter < 100; ++iter) {
    const auto row = [](Real x, Real sign) {
      return std::array<Real, 5>{x, x * x * x, x * x * x * x * x, sign, 1};
    };
    const std::array<Real, 4> sol = Solve4({row(lo, 1), row(q, -1), row(r, 1), row(hi, -1)});
    p = {sol[0], sol[1], sol[2]};
    const Real previous = error;
    error = sol[3];
    // Move the interior nodes to the extrema of p: roots of p'(x) = 0.
    const Real disc = std::sqrt(9 * p[1] * p[1] - 20 * p[0] * p[2]);
    q = std::sqrt((-3 * p[1] - disc) / (10 * p[2]));
    r = std::sqrt((-3 * p[1] + disc) / (10 * p[2]));
    if (std::fabs(previous - error) <= 1e-15L) break;
  }
  return p;
}

std::vector<Tuple> PolarExpress(int steps) {
  std::vector<Tuple> out;
  Real lo = kStartLower;
  Real hi = 1;
  for (int i = 0; i < steps; ++i) {
    std::array<Real, 3> p = OptimalQuinticReal(std::max(lo, kCushion * hi), hi);
    // The cushion moved the interval; rescale so p(lo) and p(hi) centre on 1.
    const Real rescale = 2 / (Quintic(p, lo) + Quintic(p, hi));
    for (Real& v : p) v *= rescale;
    // Head-room for bf16 rounding on every step but the last.
    if (i + 1 < steps) {
      p[0] /= kDeflation;
      p[1] /= kDeflation * kDeflation * kDeflation;
      p[2] /= std::pow(kDeflation, 5.0L);
    }
    out.push_back({static_cast<double>(p[0]), static_cast<double>(p[1]),
                   static_cast<double>(p[2])});
    lo = Quintic(p, lo);
    hi = 2 - lo;
  }
  return out;
}

template <size_t N>
std::vector<Tuple> FixedTuples(const std::array<Tuple, N>& table, size_t first, int steps) {
  std::vector<Tuple> out;
  for (int i = 0; i < steps; ++i) {
    out.push_back(table[std::min(first + static_cast<size_t>(i), N - 1)]);
  }
  return out;
}

}  // namespace

std::array<double, 3> OptimalQuintic(double lo, double hi) {
  const std::array<Real, 3> p = OptimalQuinticReal(lo, hi);
  return {static_cast<double>(p[0]), static_cast<double>(p[1]), static_cast<double>(p[2])};
}

absl::StatusOr<NsCoefficients> MakeNsCoefficients(ScheduleKind kind, int steps) {
  NsCoefficients c;
  c.kind = kind;
  if (kind == ScheduleKind::kSvd) return c;
  if (steps < 1 || steps > 100) {
    return absl::InvalidArgumentError(
        absl::StrCat("Newton-Schulz steps must be in [1, 100], got ", steps));
  }
  switch (kind) {
    case ScheduleKind::kJordan:
      c.steps.assign(steps, kJordan);
      break;
    case ScheduleKind::kDion:
      c.steps = FixedTuples(kDion, 0, steps);
      break;
    case ScheduleKind::kPolarExpress:
      c.steps = PolarExpress(steps);
      c.norm_safety = static_cast<double>(kDeflation);
      break;
    case ScheduleKind::kAol:
      c.steps = FixedTuples(kAol, 0, steps);
      c.aol = true;
      break;
    case ScheduleKind::kAolDion:
      c.steps = FixedTuples(kDion, 1, steps);
      c.aol = true;
      break;
    case ScheduleKind::kSvd:
      break;
  }
  if (steps >= 2) c.gram_restarts = {(steps + 1) / 2};
  return c;
}

absl::StatusOr<NsCoefficients> MakeNsCoefficients(const HyperParams& hp, const MatrixView& view) {
  absl::StatusOr<NsCoefficients> c = MakeNsCoefficients(hp.ns_schedule, hp.ns_steps);
  if (!c.ok() || c->kind == ScheduleKind::kSvd) return c;
  c->eps = hp.ns_eps;
  if (hp.ns_coefficients.size() == 1) {
    c->steps.assign(hp.ns_steps, hp.ns_coefficients[0]);
  } else if (!hp.ns_coefficients.empty()) {
    c->steps = hp.ns_coefficients;
  }
  // ValidateHyperParams keeps a custom schedule on kJordan, whose
  // normalisation (norm_safety 1, no AOL) it then uses.
  switch (hp.ns_gram) {
    case NsGram::kOn:
      c->gram = true;
      break;
    case NsGram::kOff:
      c->gram = false;
      break;
    case NsGram::kAuto:
      c->gram = GramNsPays(view.rows, view.cols, static_cast<int>(c->steps.size()),
                           c->gram_restarts);
      break;
  }
  return c;
}

double PlainNsFlops(int64_t rows, int64_t cols, int steps) {
  const double r = static_cast<double>(std::min(rows, cols));
  const double c = static_cast<double>(std::max(rows, cols));
  return steps * (4 * r * r * c + 2 * r * r * r);
}

double GramNsFlops(int64_t rows, int64_t cols, int steps, const std::vector<int>& restarts) {
  const double r = static_cast<double>(std::min(rows, cols));
  const double c = static_cast<double>(std::max(rows, cols));
  double flops = 0;
  int done = 0;
  while (done < steps) {
    int next = steps;
    for (int k : restarts) {
      if (k > done && k < next) next = k;
    }
    const int k = next - done;
    // R = X·Xᵀ and X ← P·X (r²c each), then per step R² and, on all but the
    // segment's first step, P·Q, and on all but its last, Q² and Q²·R (r³ each).
    flops += 2 * (2 * r * r * c) + (4.0 * k - 3) * 2 * r * r * r;
    done = next;
  }
  return flops;
}

bool GramNsPays(int64_t rows, int64_t cols, int steps, const std::vector<int>& restarts) {
  return GramNsFlops(rows, cols, steps, restarts) <=
         kGramAutoRatio * PlainNsFlops(rows, cols, steps);
}

}  // namespace muon
