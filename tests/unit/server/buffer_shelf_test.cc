// BufferShelf (a session's kept buffers) and StepAssembler writing into the
// buffers it takes from one.

#include "util/buffer_shelf.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <string>

#include "status_matchers.h"
#include "step/step_assembler.h"

namespace muon::server {
namespace {

using ::muon::testing::IsOk;

TEST(BufferShelfTest, TakeReturnsTheBufferKeptForTheSlotWhenTheSizeMatches) {
  BufferShelf shelf;
  std::unique_ptr<std::byte[]> a = shelf.Take(3, 64);
  ASSERT_NE(a, nullptr);
  const std::byte* kept = a.get();
  shelf.Give(3, 64, std::move(a));
  EXPECT_EQ(shelf.kept_bytes(), 64);
  EXPECT_NE(shelf.Take(0, 64).get(), kept);  // another slot
  std::unique_ptr<std::byte[]> again = shelf.Take(3, 64);
  EXPECT_EQ(again.get(), kept);
  EXPECT_EQ(shelf.kept_bytes(), 0);
}

TEST(BufferShelfTest, ASizeThatChangedGetsANewBufferAndGiveReplacesTheKeptOne) {
  BufferShelf shelf;
  shelf.Give(0, 16, std::make_unique<std::byte[]>(16));
  shelf.Give(0, 32, std::make_unique<std::byte[]>(32));  // frees the 16 bytes
  EXPECT_EQ(shelf.kept_bytes(), 32);
  std::unique_ptr<std::byte[]> other = shelf.Take(0, 48);  // parameters were added: 48 now
  ASSERT_NE(other, nullptr);
  EXPECT_EQ(shelf.kept_bytes(), 0);  // the stale buffer is dropped, not kept
  shelf.Give(0, 48, nullptr);
  EXPECT_EQ(shelf.kept_bytes(), 0);
}

TEST(BufferShelfTest, TheAssemblerWritesIntoTheShelfsBuffer) {
  BufferShelf shelf;
  std::unique_ptr<std::byte[]> buffer = std::make_unique<std::byte[]>(8);
  const std::byte* kept = buffer.get();
  shelf.Give(1, 8, std::move(buffer));
  StepAssembler assembler({{"a", 4, 4}, {"b", 8, 4}}, &shelf);
  bool complete = false;
  ASSERT_THAT(assembler.Add(1, 4, std::string("5678"), &complete), IsOk());
  EXPECT_FALSE(complete);
  ASSERT_THAT(assembler.Add(1, 0, std::string("1234"), &complete), IsOk());
  EXPECT_TRUE(complete);
  ASSERT_THAT(assembler.Add(0, 0, std::string("abcd"), &complete), IsOk());
  EXPECT_TRUE(complete);
  std::unique_ptr<std::byte[]> b = assembler.Take(1);
  EXPECT_EQ(b.get(), kept);
  EXPECT_EQ(std::memcmp(b.get(), "12345678", 8), 0);
  EXPECT_EQ(std::memcmp(assembler.Take(0).get(), "abcd", 4), 0);
  EXPECT_EQ(shelf.kept_bytes(), 0);
}

}  // namespace
}  // namespace muon::server
