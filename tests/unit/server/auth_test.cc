#include "api/auth.h"

#include <gtest/gtest.h>

#include <string>

namespace muon::server {
namespace {

TEST(ConstantTimeEqualsTest, EqualStrings) {
  EXPECT_TRUE(ConstantTimeEquals("", ""));
  EXPECT_TRUE(ConstantTimeEquals("0123456789abcdef", "0123456789abcdef"));
}

TEST(ConstantTimeEqualsTest, DifferentContent) {
  EXPECT_FALSE(ConstantTimeEquals("0123456789abcdef", "1123456789abcdef"));  // first byte
  EXPECT_FALSE(ConstantTimeEquals("0123456789abcdef", "0123456789abcdee"));  // last byte
  EXPECT_FALSE(ConstantTimeEquals("a", "A"));
}

TEST(ConstantTimeEqualsTest, DifferentLengths) {
  EXPECT_FALSE(ConstantTimeEquals("abc", "abcd"));  // a prefix
  EXPECT_FALSE(ConstantTimeEquals("abcd", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("", "x"));
  // Trailing zero bytes must not pass for the shorter string.
  EXPECT_FALSE(ConstantTimeEquals("abc", std::string("abc\0", 4)));
  // Lengths whose XOR is a multiple of 256 still differ.
  EXPECT_FALSE(ConstantTimeEquals(std::string(256, 'a'), ""));
}

TEST(ConstantTimeEqualsTest, EmbeddedZeroBytes) {
  const std::string a("ab\0cd", 5);
  EXPECT_TRUE(ConstantTimeEquals(a, std::string("ab\0cd", 5)));
  EXPECT_FALSE(ConstantTimeEquals(a, std::string("ab\0ce", 5)));
}

}  // namespace
}  // namespace muon::server
