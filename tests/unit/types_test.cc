#include "muon/kernels/types.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>

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
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  for (int i = 0; i < 10000; ++i) {
    const float x = normal(rng) * 100;
    EXPECT_LE(std::fabs(RoundTrip(DType::kBFloat16, x) - x), std::fabs(x) * (1.0f / 256)) << x;
    // Below 2^-14 fp16 is subnormal, a multiple of 2^-24: half of that, absolute.
    EXPECT_LE(std::fabs(RoundTrip(DType::kFloat16, x) - x),
              std::fabs(x) * (1.0f / 2048) + std::ldexp(1.0f, -25))
        << x;
    EXPECT_EQ(RoundTrip(DType::kFloat32, x), x);
  }
}

// The value of a 16-bit pattern with `mantissa_bits` stored mantissa bits and
// an exponent bias of `bias`, by the IEEE formula in double (bf16: 7, 127;
// fp16: 10, 15).
double Value16(uint16_t h, int mantissa_bits, int bias) {
  const int exponent_bits = 15 - mantissa_bits;
  const int e = (h >> mantissa_bits) & ((1 << exponent_bits) - 1);
  const int m = h & ((1 << mantissa_bits) - 1);
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (e == (1 << exponent_bits) - 1) {
    return m != 0 ? std::numeric_limits<double>::quiet_NaN()
                  : sign * std::numeric_limits<double>::infinity();
  }
  if (e == 0) return sign * std::ldexp(m, 1 - bias - mantissa_bits);  // subnormal
  return sign * std::ldexp((1 << mantissa_bits) + m, e - bias - mantissa_bits);
}

// x rounded to a format with `mantissa_bits` stored bits, exponent bias
// `bias` and largest finite value `max`, to nearest, ties to even, in double:
// x/ulp is exact (a power-of-two scaling), and nearbyint rounds half to even
// in the default rounding mode. Beyond max (after rounding): infinity.
double RoundTo16(float x, int mantissa_bits, int bias, double max) {
  const double d = x;
  int e = 0;
  std::frexp(d, &e);  // |d| in [2^(e-1), 2^e)
  const int min_exponent = 1 - bias;  // of the normal numbers
  const int exponent = std::max(e - 1, min_exponent);
  const double ulp = std::ldexp(1.0, exponent - mantissa_bits);
  const double r = std::nearbyint(d / ulp) * ulp;
  if (std::fabs(r) > max) return std::copysign(std::numeric_limits<double>::infinity(), d);
  return r;
}

float Decoded(DType dtype, uint16_t h) {
  float y;
  DecodeToFloat(dtype, reinterpret_cast<const std::byte*>(&h), 1, &y);
  return y;
}

TEST(TypesTest, EveryHalfWidthPatternDecodesExactlyAndRoundTrips) {
  for (uint32_t i = 0; i < 65536; ++i) {
    const auto h = static_cast<uint16_t>(i);
    SCOPED_TRACE(::testing::Message() << "bits 0x" << std::hex << i);
    const double bf = Value16(h, 7, 127), fp = Value16(h, 10, 15);
    const float b = Decoded(DType::kBFloat16, h), f = Decoded(DType::kFloat16, h);
    if (std::isnan(bf)) {
      ASSERT_TRUE(std::isnan(b));
      EXPECT_TRUE(std::isnan(RoundTrip(DType::kBFloat16, b)));
    } else {
      ASSERT_EQ(static_cast<double>(b), bf);
      ASSERT_EQ(Bits(DType::kBFloat16, b), h);  // -0 and subnormals included
    }
    if (std::isnan(fp)) {
      ASSERT_TRUE(std::isnan(f));
      EXPECT_TRUE(std::isnan(RoundTrip(DType::kFloat16, f)));
    } else {
      ASSERT_EQ(static_cast<double>(f), fp);
      ASSERT_EQ(Bits(DType::kFloat16, f), h);
    }
  }
}

TEST(TypesTest, EncodingRoundsToNearestEvenOverAllFloats) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const double bf16_max = Value16(0x7F7F, 7, 127), fp16_max = Value16(0x7BFF, 10, 15);
  // Random bit patterns cover every exponent (fp16 subnormals, overflow and
  // float subnormals included) and, half the time, sit exactly on a tie.
  for (int i = 0; i < 200000; ++i) {
    auto bits = static_cast<uint32_t>(rng());
    if (i % 2 == 1) bits = (bits & ~0x1FFFu) | 0x1000u;  // a tie for fp16 when normal
    if (i % 4 == 3) bits = (bits & ~0xFFFFu) | 0x8000u;  // a tie for bf16
    float x;
    std::memcpy(&x, &bits, 4);
    if (!std::isfinite(x)) continue;
    SCOPED_TRACE(::testing::Message() << "x " << x << " bits 0x" << std::hex << bits);
    ASSERT_EQ(static_cast<double>(RoundTrip(DType::kBFloat16, x)), RoundTo16(x, 7, 127, bf16_max));
    ASSERT_EQ(static_cast<double>(RoundTrip(DType::kFloat16, x)), RoundTo16(x, 10, 15, fp16_max));
  }
}

TEST(TypesTest, EdgeCasesOfTheConversions) {
  const auto from_bits = [](uint32_t bits) {
    float x;
    std::memcpy(&x, &bits, 4);
    return x;
  };
  // A NaN whose payload sits only in the low bits must not round to infinity
  // (bf16), nor carry into the sign (all ones).
  for (uint32_t nan : {0x7F800001u, 0xFF800001u, 0x7FFFFFFFu, 0x7FC00000u}) {
    EXPECT_TRUE(std::isnan(RoundTrip(DType::kBFloat16, from_bits(nan)))) << std::hex << nan;
    EXPECT_TRUE(std::isnan(RoundTrip(DType::kFloat16, from_bits(nan)))) << std::hex << nan;
  }
  EXPECT_EQ(Bits(DType::kBFloat16, from_bits(0x7F7FFFFF)), 0x7F80);  // FLT_MAX rounds up to inf
  EXPECT_EQ(Bits(DType::kBFloat16, -std::numeric_limits<float>::infinity()), 0xFF80);
  EXPECT_EQ(Bits(DType::kBFloat16, -0.0f), 0x8000);
  EXPECT_EQ(Bits(DType::kBFloat16, from_bits(0x00008000)), 0x0000);  // subnormal tie → even
  EXPECT_EQ(Bits(DType::kBFloat16, from_bits(0x00018000)), 0x0002);  // subnormal tie → even
  EXPECT_EQ(Bits(DType::kFloat16, 65519.0f), 0x7BFF);
  EXPECT_EQ(Bits(DType::kFloat16, 65520.0f), 0x7C00);  // tie with 2^16 → even (inf)
  EXPECT_EQ(Bits(DType::kFloat16, -std::numeric_limits<float>::infinity()), 0xFC00);
  EXPECT_EQ(Bits(DType::kFloat16, -0.0f), 0x8000);
  EXPECT_EQ(Bits(DType::kFloat16, std::ldexp(1.0f, -25)), 0x0000);  // half the least subnormal
  EXPECT_EQ(Bits(DType::kFloat16, std::ldexp(1.0f, -25) * 1.0001f), 0x0001);
  EXPECT_EQ(Bits(DType::kFloat16, std::ldexp(3.0f, -25)), 0x0002);  // 1.5 ulp tie → even
  EXPECT_EQ(Bits(DType::kFloat16, std::ldexp(1.0f, -14) - std::ldexp(1.0f, -26)), 0x0400);
  EXPECT_EQ(Bits(DType::kFloat16, 1e-10f), 0x0000);  // underflow to +0
  EXPECT_EQ(Bits(DType::kFloat16, -1e-10f), 0x8000);  // and -0
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
