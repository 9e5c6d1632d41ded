// Newton–Schulz on the CPU engine against float64 references: where each
// schedule puts singular values, agreement with a float64 re-implementation of
// DESIGN.md §1, and the errors on Gaussian inputs that docs/numerics.md quotes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ostream>
#include <string>
#include <tuple>

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
  double lo, hi;
};

// DESIGN.md §1 for jordan and polar_express; the others as measured (and
// recorded in docs/numerics.md) with a margin of 0.02 to 0.03. AOL's lower end
// depends on the matrix (its row scaling is not a fixed normalization).
constexpr Bounds kBounds[] = {
    {ScheduleKind::kJordan, 5, 0.45, 1.22},
    {ScheduleKind::kPolarExpress, 5, 0.85, 1.15},
    {ScheduleKind::kDion, 5, 0.45, 1.17},
    {ScheduleKind::kAol, 4, 0.15, 1.07},
    {ScheduleKind::kAolDion, 4, 0.15, 1.17},
};

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
    std::printf("%-13s %-8s singular values in [%.3f, %.3f]\n",
                std::string(ScheduleName(bounds.kind)).c_str(), shape.name, s.back(), s.front());
    EXPECT_GE(s.back(), bounds.lo) << ScheduleName(bounds.kind) << " " << shape.name;
    EXPECT_LE(s.front(), bounds.hi) << ScheduleName(bounds.kind) << " " << shape.name;
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

// Gaussian 768×2304 (DESIGN.md §1's reference figures: jordan 0.31 / 0.17,
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
                        {ScheduleKind::kDion, 4, none, none}};
  for (const Case& c : cases) {
    std::vector<float> x = g;
    ASSERT_TRUE(OrthogonalizeCpu(*MakeNsCoefficients(c.kind, c.steps), {1, rows, cols}, x.data())
                    .ok());
    const double error = OrthogonalityError(rows, cols, x.data());
    const double distance = testing::FrobeniusDistance(ToMatrix(rows, cols, x.data()), polar);
    std::printf("gaussian 768x2304 %-13s %d steps: error %.4f distance %.4f\n",
                std::string(ScheduleName(c.kind)).c_str(), c.steps, error, distance);
    if (!std::isnan(c.want_error)) {
      // PyTorch's figures are bf16 runs on other draws; fp32 agrees to ±0.02.
      EXPECT_NEAR(error, c.want_error, 0.02) << ScheduleName(c.kind);
      EXPECT_NEAR(distance, c.want_distance, 0.02) << ScheduleName(c.kind);
    }
  }
}

}  // namespace
}  // namespace muon
