// Newton–Schulz on the CPU engine against float64 references: where each
// schedule puts singular values, agreement with a float64 re-implementation of
// docs/math.md, and the errors on Gaussian inputs that docs/numerics.md quotes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <ostream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

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

// How Newton–Schulz runs: the plain iteration, or Gram Newton–Schulz with
// its default restart, with none, and with a restart after every step; and
// how close each stays to the float64 plain iteration. fp32 rounding (6e-8)
// amplified: by at most the steps' polynomial gain for plain; for Gram also
// by P's norm, which grows like 1/σ_min over a segment (measured on these
// inputs, σ_min = 1e-3 after normalization, 2026-12-02: plain ≤ 7e-6, Gram
// with the default restart ≤ 1.2e-4, without ≤ 2.2e-3, every step ≤ 5e-6).
struct Iteration {
  const char* name;
  bool gram;
  std::optional<std::vector<int>> restarts;  // unset: MakeNsCoefficients's
  double tolerance;
};
const Iteration kIterations[] = {
    {"plain", false, std::nullopt, 1e-4},
    {"gram", true, std::nullopt, 1e-3},
    {"gram_no_restart", true, std::vector<int>{}, 1e-2},
    {"gram_restart_every_step", true, std::vector<int>{1, 2, 3, 4}, 1e-4},
};
void PrintTo(const Iteration& it, std::ostream* os) { *os << it.name; }

using SingularValueParam = std::tuple<Bounds, Shape, Iteration>;
class SingularValueTest : public ::testing::TestWithParam<SingularValueParam> {};

// Every schedule, plain and Gram: the same singular-value bands, and the
// float64 plain iteration to 1e-4 (Gram Newton–Schulz is the same
// polynomial in exact arithmetic).
TEST_P(SingularValueTest, LandWhereTheScheduleSays) {
  const auto& [bounds, shape, iteration] = GetParam();
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  absl::StatusOr<NsCoefficients> coeffs = MakeNsCoefficients(bounds.kind, bounds.steps);
  ASSERT_TRUE(coeffs.ok()) << coeffs.status();
  coeffs->gram = iteration.gram;
  if (iteration.restarts) coeffs->gram_restarts = *iteration.restarts;
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
    const Matrix want = testing::NewtonSchulz(inputs[b], coeffs->steps, coeffs->norm_safety,
                                              coeffs->aol);
    const double distance = testing::FrobeniusDistance(o, want);
    std::printf("%-13s %-8s %-23s singular values in [%.3f, %.3f], bound [%.3f, %.3f], "
                "vs float64 %.2g\n",
                std::string(ScheduleName(bounds.kind)).c_str(), shape.name, iteration.name,
                s.back(), s.front(), lo, hi, distance);
    EXPECT_GE(s.back(), lo) << ScheduleName(bounds.kind) << " " << shape.name;
    EXPECT_LE(s.front(), hi) << ScheduleName(bounds.kind) << " " << shape.name;
    EXPECT_LT(distance, iteration.tolerance) << shape.name;
  }
}

std::string BoundsName(const ::testing::TestParamInfo<SingularValueParam>& info) {
  return std::string(ScheduleName(std::get<0>(info.param).kind)) + "_" +
         std::get<1>(info.param).name + "_" + std::get<2>(info.param).name;
}

INSTANTIATE_TEST_SUITE_P(AllSchedules, SingularValueTest,
                         ::testing::Combine(::testing::ValuesIn(kBounds),
                                            ::testing::ValuesIn(kShapes),
                                            ::testing::ValuesIn(kIterations)),
                         BoundsName);

// Gram Newton–Schulz is a different computation, not the plain one under
// another name: on a wide input its rounding differs from the plain
// iteration's, while both stay within the float64 reference's 1e-4.
TEST(GramNewtonSchulzTest, TakesItsOwnPath) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const int64_t rows = 48, cols = 192;
  const std::vector<float> g = testing::RandomNormal(rows * cols, rng);
  NsCoefficients coeffs = *MakeNsCoefficients(ScheduleKind::kJordan, 5);
  std::vector<float> plain = g, gram = g;
  ASSERT_TRUE(OrthogonalizeCpu(coeffs, {1, rows, cols}, plain.data()).ok());
  coeffs.gram = true;
  ASSERT_TRUE(OrthogonalizeCpu(coeffs, {1, rows, cols}, gram.data()).ok());
  EXPECT_NE(plain, gram);
  EXPECT_LT(testing::FrobeniusDistance(ToMatrix(rows, cols, gram.data()),
                                       ToMatrix(rows, cols, plain.data())),
            1e-4);
}

// A kept NsWorkspace carries nothing from one call to the next: filled with
// NaN, reused across shapes (wide, tall, batched, growing and shrinking) and
// iterations (plain, AOL, Gram), it gives the bits of a fresh one.
TEST(NsWorkspaceTest, AKeptWorkspaceGivesTheBitsOfAFreshOne) {
  const uint64_t seed = testing::FreshSeed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  NsWorkspace kept;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Big enough for the first case only: later ones grow them.
  kept.y.assign(1000, nan);
  kept.a.assign(600, nan);
  kept.b.assign(600, nan);
  for (std::vector<float>& g : kept.gram) g.assign(600, nan);
  struct Case {
    MatrixView view;
    ScheduleKind kind;
    int steps;
    bool gram;
  };
  for (const Case& c : {Case{{1, 24, 40}, ScheduleKind::kJordan, 5, false},
                        Case{{1, 96, 32}, ScheduleKind::kPolarExpress, 5, false},
                        Case{{3, 16, 20}, ScheduleKind::kAol, 4, false},
                        Case{{1, 48, 192}, ScheduleKind::kJordan, 5, true},
                        Case{{1, 160, 40}, ScheduleKind::kDion, 5, true},
                        Case{{1, 8, 12}, ScheduleKind::kJordan, 5, false}}) {
    SCOPED_TRACE(std::to_string(c.view.batch) + "x" + std::to_string(c.view.rows) + "x" +
                 std::to_string(c.view.cols) + (c.gram ? " gram" : ""));
    NsCoefficients coeffs = *MakeNsCoefficients(c.kind, c.steps);
    coeffs.gram = c.gram;
    const std::vector<float> g =
        testing::RandomNormal(c.view.batch * c.view.rows * c.view.cols, rng);
    std::vector<float> fresh = g, reused = g;
    ASSERT_TRUE(OrthogonalizeCpu(coeffs, c.view, fresh.data()).ok());
    ASSERT_TRUE(OrthogonalizeCpu(coeffs, c.view, reused.data(), &kept).ok());
    EXPECT_EQ(std::memcmp(fresh.data(), reused.data(), fresh.size() * sizeof(float)), 0);
  }
}

TEST(GramNewtonSchulzTest, AutoUsesGramWhereItSavesFlops) {
  HyperParams hp;
  EXPECT_EQ(hp.ns_gram, NsGram::kOff);
  hp.ns_gram = NsGram::kAuto;
  const auto gram = [&](int64_t rows, int64_t cols) {
    return MakeNsCoefficients(hp, {1, rows, cols})->gram;
  };
  // Wide and tall 4:1 (GPT-2's MLP): Gram; square and 2:1: plain.
  EXPECT_TRUE(gram(768, 3072));
  EXPECT_TRUE(gram(3072, 768));
  EXPECT_TRUE(gram(768, 2304));
  EXPECT_FALSE(gram(768, 768));
  EXPECT_FALSE(gram(512, 1024));
  hp.ns_gram = NsGram::kOn;
  EXPECT_TRUE(gram(768, 768));
  hp.ns_gram = NsGram::kOff;
  EXPECT_FALSE(gram(768, 3072));
  hp.ns_schedule = ScheduleKind::kSvd;
  hp.ns_gram = NsGram::kOn;
  EXPECT_FALSE(gram(768, 3072));
  // One restart, after half the steps rounded up.
  EXPECT_EQ(MakeNsCoefficients(ScheduleKind::kJordan, 5)->gram_restarts, std::vector<int>{3});
  EXPECT_EQ(MakeNsCoefficients(ScheduleKind::kAol, 4)->gram_restarts, std::vector<int>{2});
  EXPECT_TRUE(MakeNsCoefficients(ScheduleKind::kJordan, 1)->gram_restarts.empty());
  // The flop model: 5 steps, one restart, 768×3072 is 2/3 of the plain flops.
  EXPECT_NEAR(GramNsFlops(768, 3072, 5, {3}) / PlainNsFlops(768, 3072, 5), 2.0 / 3.0, 1e-12);
  EXPECT_NEAR(GramNsFlops(768, 3072, 5, {}) / PlainNsFlops(768, 3072, 5), 50.0 / 90.0, 1e-12);
}

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
    for (bool gram : {false, true}) {
      std::vector<float> x(12 * 20, 0.0f);
      NsCoefficients coeffs = *MakeNsCoefficients(kind, 5);
      coeffs.gram = gram;
      ASSERT_TRUE(OrthogonalizeCpu(coeffs, {1, 12, 20}, x.data()).ok());
      EXPECT_TRUE(std::all_of(x.begin(), x.end(), [](float v) { return v == 0.0f; }))
          << ScheduleName(kind) << (gram ? " gram" : "");
    }
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
    for (bool gram : {false, true}) {
      if (gram && c.kind == ScheduleKind::kSvd) continue;
      NsCoefficients coeffs = *MakeNsCoefficients(c.kind, c.steps);
      coeffs.gram = gram;
      std::vector<float> x = g;
      ASSERT_TRUE(OrthogonalizeCpu(coeffs, {1, rows, cols}, x.data()).ok());
      const double error = OrthogonalityError(rows, cols, x.data());
      const double distance = testing::FrobeniusDistance(ToMatrix(rows, cols, x.data()), polar);
      std::printf("gaussian 768x2304 %-13s %d steps %-5s: error %.4g distance %.4g\n",
                  std::string(ScheduleName(c.kind)).c_str(), c.steps, gram ? "gram" : "plain",
                  error, distance);
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
}

}  // namespace
}  // namespace muon
