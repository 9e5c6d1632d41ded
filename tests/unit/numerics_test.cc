// Newton–Schulz on the CPU engine against float64 references: where each
// schedule puts singular values, agreement with a float64 re-implementation of
// docs/math.md, and the errors on Gaussian inputs that docs/numerics.md quotes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ostream>
#include <string>
#include <tuple>
#include <utility>

#include "gtest/gtest.h"
#include "muon/kernels/cpu_ns.h"
#include "muon/kernels/ns_schedule.h"
#include "reference.h"

namespace muon {
namespace {

using testing::Matrix;

struct Bounds {
  ScheduleKind kind;
  int steps;
  // Fixed bounds (docs/math.md), or derived from the input (lo, hi unused).
  double lo, hi;
  bool derived = false;
};

// jordan and polar_express: docs/math.md's figures. dion, aol, aol_dion: no
// published figure, so the bound is derived per input (see DerivedBounds).
constexpr Bounds kBounds[] = {
    {ScheduleKind::kJordan, 5, 0.45, 1.22},
    {ScheduleKind::kPolarExpress, 5, 0.85, 1.15},
    {ScheduleKind::kDion, 5, 0, 0, true},
    {ScheduleKind::kAol, 4, 0, 0, true},
    {ScheduleKind::kAolDion, 4, 0, 0, true},
};

// The composed scalar map of a schedule: what it does to one singular value.
double Compose(const NsCoefficients& c, double x) {
  for (const auto& [a, b, cc] : c.steps) x = a * x + b * x * x * x + cc * std::pow(x, 5);
  return x;
}

// Where a schedule must put the singular values of an input whose singular
// values are `s` (descending), in exact arithmetic: the range of the composed
// map over the interval the normalization puts them in. Frobenius: exactly
// s/(safety·‖s‖). AOL: in [(s_min/s_max)·r^(-1/4), 1], because each row sum
// of |X·Xᵀ| is at most √r·σ_max², so every d_i ≥ r^(-1/4)/σ_max and
// σ_min(D·X) ≥ σ_min(X)·min d_i; and AOL's guarantee ‖D·X‖₂ ≤ 1. Widened by
// 1e-3 for fp32 (the products' rounding moves a singular value by ~1e-5, and
// the output matches the float64 reference to 1e-4 besides).
std::pair<double, double> DerivedBounds(const NsCoefficients& c, const std::vector<double>& s) {
  double lo = 0, hi = 0;
  if (c.aol) {
    lo = s.back() / s.front() * std::pow(static_cast<double>(s.size()), -0.25);
    hi = 1.0;
  } else {
    double norm = 0;
    for (double x : s) norm += x * x;
    lo = s.back() / (c.norm_safety * std::sqrt(norm));
    hi = s.front() / (c.norm_safety * std::sqrt(norm));
  }
  double min = Compose(c, lo), max = min;
  constexpr int kPoints = 20000;  // log-spaced; the map is smooth at this scale
  for (int i = 1; i <= kPoints; ++i) {
    const double x = lo * std::pow(hi / lo, static_cast<double>(i) / kPoints);
    const double y = Compose(c, x);
    min = std::min(min, y);
    max = std::max(max, y);
  }
  return {min - 1e-3, max + 1e-3};
}

struct Shape {
  std::vector<int64_t> dims;
  const char* name;
};

// Test names in ctest, instead of gtest's byte dumps.
void PrintTo(const Bounds& b, std::ostream* os) {
  *os << ScheduleName(b.kind) << " " << b.steps << " steps";
}
void PrintTo(const Shape& s, std::ostream* os) { *os << s.name << " " << ShapeString(s.dims); }

const Shape kShapes[] = {
    {{96, 96}, "square"},   {{160, 64}, "tall"},      {{64, 160}, "wide"},
    {{1, 50}, "1xn"},       {{3, 32, 48}, "batch3d"}, {{16, 4, 3, 3}, "conv4d"},
};

// A matrix whose singular values, after the schedule's own normalization
// (by safety·‖M‖_F), spread log-uniformly from exactly 1e-3 upward.
Matrix SpreadInput(int64_t rows, int64_t cols, double safety, std::mt19937_64& rng) {
  const int64_t r = std::min(rows, cols);
  double lo = 1e-3;
  std::vector<double> s;
  for (int it = 0; it < 50; ++it) {  // fixed point: lo = 1e-3·safety·‖s(lo)‖
    s = testing::LogSpaced(r, lo, 1.0);
    double norm = 0;
    for (double x : s) norm += x * x;
    lo = std::min(1.0, 1e-3 * safety * std::sqrt(norm));
  }
  return testing::WithSingularValues(rows, cols, s, rng);
}

Matrix ToMatrix(int64_t rows, int64_t cols, const float* p) {
  return Matrix{rows, cols, std::vector<double>(p, p + rows * cols)};
}

class SingularValueTest : public ::testing::TestWithParam<std::tuple<Bounds, Shape>> {};

TEST_P(SingularValueTest, LandWhereTheScheduleSays) {
  const auto& [bounds, shape] = GetParam();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  absl::StatusOr<NsCoefficients> coeffs = MakeNsCoefficients(bounds.kind, bounds.steps);
  ASSERT_TRUE(coeffs.ok()) << coeffs.status();
  const MatrixView view = MatrixViewOf(shape.dims);
  std::vector<float> x;
  std::vector<Matrix> inputs;
  for (int64_t b = 0; b < view.batch; ++b) {
    inputs.push_back(SpreadInput(view.rows, view.cols, coeffs->norm_safety, rng));
    x.insert(x.end(), inputs.back().v.begin(), inputs.back().v.end());
  }
  ASSERT_TRUE(OrthogonalizeCpu(*coeffs, view, x.data()).ok());
  const int64_t size = view.rows * view.cols;
  for (int64_t b = 0; b < view.batch; ++b) {
    const Matrix o = ToMatrix(view.rows, view.cols, x.data() + b * size);
    const std::vector<double> s = testing::SingularValues(o);
    auto [lo, hi] = std::pair{bounds.lo, bounds.hi};
    if (bounds.derived) std::tie(lo, hi) = DerivedBounds(*coeffs, testing::SingularValues(inputs[b]));
    std::printf("%-13s %-8s singular values in [%.3f, %.3f], bound [%.3f, %.3f]\n",
                std::string(ScheduleName(bounds.kind)).c_str(), shape.name, s.back(), s.front(),
                lo, hi);
    EXPECT_GE(s.back(), lo) << ScheduleName(bounds.kind) << " " << shape.name;
    EXPECT_LE(s.front(), hi) << ScheduleName(bounds.kind) << " " << shape.name;
    // fp32 here vs float64 there: same formulas, errors of a few fp32 ulps
    // amplified by at most the steps' polynomial gain.
    const Matrix want = testing::NewtonSchulz(inputs[b], coeffs->steps, coeffs->norm_safety,
                                              coeffs->aol);
    EXPECT_LT(testing::FrobeniusDistance(o, want), 1e-4) << shape.name;
  }
}

std::string BoundsName(const ::testing::TestParamInfo<std::tuple<Bounds, Shape>>& info) {
  return std::string(ScheduleName(std::get<0>(info.param).kind)) + "_" +
         std::get<1>(info.param).name;
}

INSTANTIATE_TEST_SUITE_P(AllSchedules, SingularValueTest,
                         ::testing::Combine(::testing::ValuesIn(kBounds),
                                            ::testing::ValuesIn(kShapes)),
                         BoundsName);

class SvdTest : public ::testing::TestWithParam<Shape> {};

TEST_P(SvdTest, IsTheExactPolarFactor) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const MatrixView view = MatrixViewOf(GetParam().dims);
  const int64_t size = view.rows * view.cols;
  std::vector<float> x;
  std::vector<Matrix> inputs;
  for (int64_t b = 0; b < view.batch; ++b) {
    inputs.push_back(SpreadInput(view.rows, view.cols, 1.0, rng));
    x.insert(x.end(), inputs.back().v.begin(), inputs.back().v.end());
  }
  ASSERT_TRUE(OrthogonalizeCpu(*MakeNsCoefficients(ScheduleKind::kSvd, 0), view, x.data()).ok());
  for (int64_t b = 0; b < view.batch; ++b) {
    const Matrix o = ToMatrix(view.rows, view.cols, x.data() + b * size);
    for (double s : testing::SingularValues(o)) EXPECT_NEAR(s, 1.0, 1e-5);
    EXPECT_LT(testing::FrobeniusDistance(o, testing::Polar(inputs[b])), 1e-5);
  }
}

INSTANTIATE_TEST_SUITE_P(AllShapes, SvdTest, ::testing::ValuesIn(kShapes),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(NewtonSchulzTest, ZeroMatrixStaysZero) {
  for (ScheduleKind kind : {ScheduleKind::kJordan, ScheduleKind::kPolarExpress,
                            ScheduleKind::kDion, ScheduleKind::kAol, ScheduleKind::kSvd}) {
    std::vector<float> x(12 * 20, 0.0f);
    ASSERT_TRUE(OrthogonalizeCpu(*MakeNsCoefficients(kind, 5), {1, 12, 20}, x.data()).ok());
    EXPECT_TRUE(std::all_of(x.begin(), x.end(), [](float v) { return v == 0.0f; }))
        << ScheduleName(kind);
  }
}

TEST(NewtonSchulzTest, RejectsEmptyViews) {
  float x = 1;
  EXPECT_EQ(OrthogonalizeCpu(*MakeNsCoefficients(ScheduleKind::kJordan, 5), {1, 0, 4}, &x).code(),
            absl::StatusCode::kInvalidArgument);
}

// Gaussian 768×2304 (docs/math.md's reference figures: jordan 0.31 / 0.17,
// polar_express 0.19 / 0.10, measured with PyTorch). Prints every schedule's
// figures for docs/numerics.md.
TEST(NewtonSchulzTest, GaussianErrorsMatchDesignFigures) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int64_t rows = 768, cols = 2304;
  const std::vector<float> g = testing::RandomNormal(rows * cols, rng);
  const Matrix polar = testing::Polar(ToMatrix(rows, cols, g.data()));
  struct Case {
    ScheduleKind kind;
    int steps;
    double want_error, want_distance;  // NaN: no reference figure
  };
  const double none = std::nan("");
  const Case cases[] = {{ScheduleKind::kJordan, 5, 0.31, 0.17},
                        {ScheduleKind::kPolarExpress, 5, 0.19, 0.10},
                        {ScheduleKind::kDion, 5, none, none},
                        {ScheduleKind::kAol, 4, none, none},
                        {ScheduleKind::kAolDion, 4, none, none},
                        {ScheduleKind::kJordan, 4, none, none},
                        {ScheduleKind::kPolarExpress, 4, none, none},
                        {ScheduleKind::kDion, 4, none, none},
                        {ScheduleKind::kSvd, 0, 0.0, 0.0}};
  for (const Case& c : cases) {
    std::vector<float> x = g;
    ASSERT_TRUE(OrthogonalizeCpu(*MakeNsCoefficients(c.kind, c.steps), {1, rows, cols}, x.data())
                    .ok());
    const double error = OrthogonalityError(rows, cols, x.data());
    const double distance = testing::FrobeniusDistance(ToMatrix(rows, cols, x.data()), polar);
    std::printf("gaussian 768x2304 %-13s %d steps: error %.4g distance %.4g\n",
                std::string(ScheduleName(c.kind)).c_str(), c.steps, error, distance);
    if (c.kind == ScheduleKind::kSvd) {
      // LAPACK in float64, stored as fp32: a few fp32 roundings (6e-8) per element.
      EXPECT_LT(error, 1e-5);
      EXPECT_LT(distance, 1e-5);
    } else if (!std::isnan(c.want_error)) {
      // PyTorch's figures are bf16 runs on other draws; fp32 agrees to ±0.02.
      EXPECT_NEAR(error, c.want_error, 0.02) << ScheduleName(c.kind);
      EXPECT_NEAR(distance, c.want_distance, 0.02) << ScheduleName(c.kind);
    }
  }
}

}  // namespace
}  // namespace muon
