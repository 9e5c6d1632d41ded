#include "muon/kernels/ns_schedule.h"

#include <cmath>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace muon {
namespace {

TEST(NsScheduleTest, PolarExpressMatchesDesignTable) {
  // docs/math.md, to the 10 decimals printed there.
  const double want[5][3] = {{8.2373124905, -23.1577474146, 16.6805684114},
                             {4.0824419991, -2.8930477353, 0.5252849257},
                             {3.9263479923, -2.8547468035, 0.5318022423},
                             {3.2982187133, -2.4245419810, 0.4863200836},
                             {2.3200073129, -1.6862169730, 0.4206802734}};
  absl::StatusOr<NsCoefficients> c = MakeNsCoefficients(ScheduleKind::kPolarExpress, 5);
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ(c->steps.size(), 5u);
  for (int i = 0; i < 5; ++i) {
    for (int j = 0; j < 3; ++j) EXPECT_NEAR(c->steps[i][j], want[i][j], 1e-8) << i << "," << j;
  }
  EXPECT_DOUBLE_EQ(c->norm_safety, 1.01);
  EXPECT_FALSE(c->aol);
}

TEST(NsScheduleTest, PolarExpressLastStepIsNotDeflated) {
  // Any number of steps is computed, not looked up: with 8 steps the
  // composed map takes all of [1e-3, 1] (after the 1.01 margin) close to 1,
  // and the 5-step prefix differs from the 5-step schedule (whose last step
  // is not deflated).
  absl::StatusOr<NsCoefficients> c = MakeNsCoefficients(ScheduleKind::kPolarExpress, 8);
  absl::StatusOr<NsCoefficients> five = MakeNsCoefficients(ScheduleKind::kPolarExpress, 5);
  ASSERT_TRUE(c.ok());
  ASSERT_TRUE(five.ok());
  ASSERT_EQ(c->steps.size(), 8u);
  EXPECT_EQ(c->steps[3], five->steps[3]);
  EXPECT_NEAR(c->steps[4][0], five->steps[4][0] / 1.01, 0.1);
  EXPECT_NE(c->steps[4], five->steps[4]);
  for (double x0 : {1e-3, 0.01, 0.3, 1.0}) {
    double x = x0 / 1.01;
    for (const auto& [a, b, cc] : c->steps) x = a * x + b * x * x * x + cc * std::pow(x, 5);
    EXPECT_NEAR(x, 1.0, 0.02) << x0;
  }
}

TEST(NsScheduleTest, OptimalQuinticEquioscillates) {
  const auto p = OptimalQuintic(0.1, 1.0);
  const auto f = [&](double x) { return p[0] * x + p[1] * x * x * x + p[2] * std::pow(x, 5); };
  const double e = std::fabs(f(0.1) - 1.0);
  EXPECT_NEAR(std::fabs(f(1.0) - 1.0), e, 1e-9);
  for (int i = 0; i <= 1000; ++i) EXPECT_LE(std::fabs(f(0.1 + 0.9 * i / 1000.0) - 1.0), e + 1e-9);
}

TEST(NsScheduleTest, FixedSchedules) {
  auto jordan = MakeNsCoefficients(ScheduleKind::kJordan, 3);
  ASSERT_TRUE(jordan.ok());
  EXPECT_THAT(jordan->steps, ::testing::Each(std::array<double, 3>{3.4445, -4.7750, 2.0315}));
  auto dion = MakeNsCoefficients(ScheduleKind::kDion, 7);
  ASSERT_TRUE(dion.ok());
  EXPECT_EQ(dion->steps[0], (std::array<double, 3>{4.0848, -6.8946, 2.9270}));
  EXPECT_EQ(dion->steps[4], (std::array<double, 3>{2.8366, -3.0525, 1.2012}));
  EXPECT_EQ(dion->steps[6], dion->steps[4]);  // the last tuple repeats
  auto aol = MakeNsCoefficients(ScheduleKind::kAol, 4);
  ASSERT_TRUE(aol.ok());
  EXPECT_TRUE(aol->aol);
  EXPECT_EQ(aol->steps[0], (std::array<double, 3>{4.6051, -9.6552, 5.6769}));
  EXPECT_EQ(aol->steps[3], (std::array<double, 3>{2.4231, -2.2861, 0.8193}));
  auto aol_dion = MakeNsCoefficients(ScheduleKind::kAolDion, 4);
  ASSERT_TRUE(aol_dion.ok());
  EXPECT_EQ(aol_dion->steps[0], dion->steps[1]);  // the last four Dion tuples
  EXPECT_EQ(aol_dion->steps[3], dion->steps[4]);
}

TEST(NsScheduleTest, RejectsStepCountsOutOfRange) {
  for (int steps : {0, -1, 101}) {
    EXPECT_EQ(MakeNsCoefficients(ScheduleKind::kJordan, steps).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
  auto svd = MakeNsCoefficients(ScheduleKind::kSvd, 0);
  ASSERT_TRUE(svd.ok());
  EXPECT_TRUE(svd->steps.empty());
}

}  // namespace
}  // namespace muon
