// BufferShelf (a session's kept buffers) and StepAssembler writing into the
// buffers it takes from one.

#include "util/buffer_shelf.h"
#include "util/shared_buffer_shelf.h"

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

// SharedBufferShelf: a session's update buffers, shared by the chunks sent
// from them and the step's record.
TEST(SharedBufferShelfTest, ABufferComesBackWhenItsLastHolderLetsGo) {
  SharedBufferShelf shelf;
  std::shared_ptr<std::byte[]> a = shelf.Take(2, 64);
  const std::byte* first = a.get();
  std::shared_ptr<const void> record = a;  // the record, holding it too
  a.reset();
  EXPECT_EQ(shelf.kept_bytes(), 0);
  // Still held: the next step gets another.
  std::shared_ptr<std::byte[]> b = shelf.Take(2, 64);
  EXPECT_NE(b.get(), first);
  record.reset();
  EXPECT_EQ(shelf.kept_bytes(), 64);
  b.reset();  // one free buffer per slot: the newer one is kept
  EXPECT_EQ(shelf.kept_bytes(), 64);
  std::shared_ptr<std::byte[]> c = shelf.Take(2, 64);
  EXPECT_EQ(shelf.kept_bytes(), 0);
  EXPECT_NE(shelf.Take(2, 64).get(), c.get());
}

TEST(SharedBufferShelfTest, ASizeThatChangedGetsANewBuffer) {
  SharedBufferShelf shelf;
  shelf.Take(0, 64).reset();
  EXPECT_EQ(shelf.kept_bytes(), 64);
  std::shared_ptr<std::byte[]> half = shelf.Take(0, 32);  // bf16 updates now
  EXPECT_EQ(shelf.kept_bytes(), 0);  // the fp32-sized one is freed, not kept
  half.reset();
  EXPECT_EQ(shelf.kept_bytes(), 32);
}

// A write gRPC still holds after the session is gone frees its buffer.
TEST(SharedBufferShelfTest, ABufferThatOutlivesItsShelfIsFreed) {
  std::shared_ptr<std::byte[]> held;
  {
    SharedBufferShelf shelf;
    held = shelf.Take(1, 16);
    std::memset(held.get(), 7, 16);
  }
  EXPECT_EQ(held[15], std::byte{7});
  held.reset();  // no shelf to go back to (AddressSanitizer would see a bad return)
}

}  // namespace
}  // namespace muon::server
