#include "muon/kernels/types.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "gtest/gtest.h"

namespace muon {
namespace {

float RoundTrip(DType dtype, float x) {
  std::byte bytes[4];
  EncodeFromFloat(dtype, &x, 1, bytes);
  float y;
  DecodeToFloat(dtype, bytes, 1, &y);
  return y;
}

uint16_t Bits(DType dtype, float x) {
  std::byte bytes[2];
  EncodeFromFloat(dtype, &x, 1, bytes);
  uint16_t h;
  std::memcpy(&h, bytes, 2);
  return h;
}

TEST(TypesTest, BFloat16RoundsToNearestEven) {
  EXPECT_EQ(Bits(DType::kBFloat16, 1.0f), 0x3F80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even (1.0).
  EXPECT_EQ(Bits(DType::kBFloat16, 1.0f + 1.0f / 256), 0x3F80);
  // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6.
  EXPECT_EQ(Bits(DType::kBFloat16, 1.0f + 3.0f / 256), 0x3F82);
  EXPECT_TRUE(std::isnan(RoundTrip(DType::kBFloat16, std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(std::isinf(RoundTrip(DType::kBFloat16, std::numeric_limits<float>::infinity())));
}

TEST(TypesTest, Float16Conversions) {
  EXPECT_EQ(Bits(DType::kFloat16, 1.0f), 0x3C00);
  EXPECT_EQ(Bits(DType::kFloat16, -2.0f), 0xC000);
  EXPECT_EQ(Bits(DType::kFloat16, 65504.0f), 0x7BFF);
  EXPECT_EQ(Bits(DType::kFloat16, 1e6f), 0x7C00);  // overflow → inf
  EXPECT_EQ(Bits(DType::kFloat16, 1.0f + 1.0f / 2048), 0x3C00);  // tie → even
  EXPECT_EQ(Bits(DType::kFloat16, 1.0f + 3.0f / 2048), 0x3C02);
  EXPECT_FLOAT_EQ(RoundTrip(DType::kFloat16, std::ldexp(1.0f, -24)), std::ldexp(1.0f, -24));
  EXPECT_FLOAT_EQ(RoundTrip(DType::kFloat16, std::ldexp(3.0f, -20)), std::ldexp(3.0f, -20));
  EXPECT_TRUE(std::isnan(RoundTrip(DType::kFloat16, std::numeric_limits<float>::quiet_NaN())));
}

TEST(TypesTest, RoundTripErrorWithinHalfAnUlp) {
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> normal;
  for (int i = 0; i < 10000; ++i) {
    const float x = normal(rng) * 100;
    EXPECT_LE(std::fabs(RoundTrip(DType::kBFloat16, x) - x), std::fabs(x) * (1.0f / 256)) << x;
    EXPECT_LE(std::fabs(RoundTrip(DType::kFloat16, x) - x), std::fabs(x) * (1.0f / 2048)) << x;
    EXPECT_EQ(RoundTrip(DType::kFloat32, x), x);
  }
}

TEST(TypesTest, MatrixViews) {
  const MatrixView m = MatrixViewOf({768, 2304});
  EXPECT_EQ(m.batch, 1);
  EXPECT_EQ(m.rows, 768);
  const MatrixView e = MatrixViewOf({8, 64, 32});
  EXPECT_EQ(e.batch, 8);
  EXPECT_EQ(e.rows, 64);
  EXPECT_EQ(e.cols, 32);
  const MatrixView conv = MatrixViewOf({64, 3, 3, 3});
  EXPECT_EQ(conv.batch, 1);
  EXPECT_EQ(conv.rows, 64);
  EXPECT_EQ(conv.cols, 27);
}

TEST(TypesTest, ParsesNames) {
  EXPECT_EQ(*ParseSchedule("polar_express"), ScheduleKind::kPolarExpress);
  EXPECT_EQ(*ParseDType("bfloat16"), DType::kBFloat16);
  EXPECT_EQ(*ParseShapeScale("rms_match"), ShapeScale::kRmsMatch);
  EXPECT_EQ(*ParseMomentumForm("sum"), MomentumForm::kSum);
  const absl::Status bad = ParseSchedule("newton").status();
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("polar_express"), absl::string_view::npos) << bad;
}

}  // namespace
}  // namespace muon
