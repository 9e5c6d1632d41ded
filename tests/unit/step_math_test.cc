// The element-wise math of internal/step_math.h against its formulas
// (docs/math.md) in float64, on fresh random inputs.
#include "muon/kernels/internal/step_math.h"

#include <cmath>
#include <limits>
#include <random>
#include <string>

#include "gtest/gtest.h"
#include "muon/kernels/internal/param_table.h"

namespace muon::internal {
namespace {

// One fp32 rounding of each of a few operations: a few ulps of the result's
// largest term.
constexpr double kUlps = 8 * 0x1p-24;

TEST(StepMathTest, MomentumFormsAndNesterovMatchTheirFormulas) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  for (bool ema : {true, false}) {
    for (bool nesterov : {true, false}) {
      const double beta = std::uniform_real_distribution<double>(0, 0.999)(rng);
      const MomentumCoefficients c = MakeMomentumCoefficients(beta, ema, nesterov);
      for (int k = 0; k < 1000; ++k) {
        const float b = static_cast<float>(normal(rng)), g = static_cast<float>(normal(rng));
        float b_new;
        const float m = MomentumStep(c, b, g, &b_new);
        const double gain = ema ? 1 - beta : 1;
        const double want_b = beta * b + gain * g;
        const double want_m = nesterov ? gain * g + beta * want_b : want_b;
        const double scale = std::fabs(b) + std::fabs(g) + 1e-30;
        EXPECT_NEAR(b_new, want_b, kUlps * scale);
        EXPECT_NEAR(m, want_m, 2 * kUlps * scale);
      }
    }
  }
}

TEST(StepMathTest, AdamWMatchesItsBiasCorrectedFormula) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> unit(0, 1);
  for (int trial = 0; trial < 200; ++trial) {
    const double beta1 = 0.99 * unit(rng), beta2 = 0.9999 * unit(rng);
    const double eps = 1e-8, lr = 1e-3;
    const int64_t step = 1 + static_cast<int64_t>(unit(rng) * 100);
    const auto c = MakeAdamWCoefficients<double>(beta1, beta2, eps, lr, step);
    const auto cf = MakeAdamWCoefficients<float>(beta1, beta2, eps, lr, step);
    const float m = static_cast<float>(normal(rng)), v = static_cast<float>(unit(rng));
    const float g = static_cast<float>(normal(rng));
    const double want_m = beta1 * m + (1 - beta1) * g;
    const double want_v = beta2 * v + (1 - beta2) * g * g;
    for (bool in_double : {true, false}) {
      float m_new, v_new;
      const float u = in_double ? AdamWStep(c, m, v, g, &m_new, &v_new)
                                : AdamWStep(cf, m, v, g, &m_new, &v_new);
      EXPECT_NEAR(m_new, want_m, kUlps * (std::fabs(m) + std::fabs(g)));
      EXPECT_NEAR(v_new, want_v, kUlps * (v + g * g));
      // The bias-corrected quotient of the fp32 moments (m may have cancelled,
      // so it is checked on the moments the step produced): one rounding to
      // float in double, a few float roundings otherwise.
      const double want_u = -lr * (m_new / (1 - std::pow(beta1, step))) /
                            (std::sqrt(v_new / (1 - std::pow(beta2, step))) + eps);
      EXPECT_NEAR(u, want_u, (in_double ? 0x1p-24 : 16 * 0x1p-24) * std::fabs(want_u))
          << (in_double ? "double" : "float");
    }
  }
}

TEST(StepMathTest, ShapeScalesAndDecay) {
  EXPECT_DOUBLE_EQ(ShapeScaleOf(ShapeScaleForm::kSpectral, 3072, 768), 2.0);
  EXPECT_DOUBLE_EQ(ShapeScaleOf(ShapeScaleForm::kSpectral, 768, 3072), 1.0);
  EXPECT_DOUBLE_EQ(ShapeScaleOf(ShapeScaleForm::kRmsMatch, 768, 3072), 0.2 * std::sqrt(3072.0));
  EXPECT_DOUBLE_EQ(ShapeScaleOf(ShapeScaleForm::kNone, 5, 7), 1.0);
  EXPECT_DOUBLE_EQ(ShapeScaleFactor(ShapeScale::kSpectral, {2, 64, 16}), 2.0);
  EXPECT_DOUBLE_EQ(ShapeScaleFactor(ShapeScale::kRmsMatch, {1, 16, 64}), 1.6);
  EXPECT_EQ(MuonUpdateScale(0.02, 2.0), static_cast<float>(-0.04));
  EXPECT_EQ(MuonUpdate(-0.5f, 3.0f), -1.5f);
  EXPECT_DOUBLE_EQ(DecayFactor(0.02, 0.1), 1 - 0.002);
  EXPECT_EQ(DecayedWeight(0.5f, 4.0f, 1.0f), 3.0f);
  EXPECT_FALSE(Finite(std::numeric_limits<float>::infinity()));
  EXPECT_FALSE(Finite(std::numeric_limits<float>::quiet_NaN()));
  EXPECT_TRUE(Finite(std::numeric_limits<float>::max()));
}

}  // namespace
}  // namespace muon::internal
