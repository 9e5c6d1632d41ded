#include "step/chunker.h"

#include <gtest/gtest.h>

#include <vector>

namespace muon::server {
namespace {

TEST(ChunkerTest, PayloadHonoursTheRequestInWholeElements) {
  const int64_t big = 4 << 20;
  EXPECT_EQ(ChunkPayloadBytes(100, big, 4), 100);
  EXPECT_EQ(ChunkPayloadBytes(1025, big, 4), 1024);  // never splits an element
  EXPECT_EQ(ChunkPayloadBytes(1025, big, 2), 1024);
  EXPECT_EQ(ChunkPayloadBytes(7, big, 2), 6);
  EXPECT_EQ(ChunkPayloadBytes(4, big, 4), 4);  // small requests are kept, not raised
  EXPECT_EQ(ChunkPayloadBytes(1, big, 4), 4);  // at least one element
}

TEST(ChunkerTest, PayloadFitsTheMessageLimit) {
  const int64_t limit = 64 * 1024;
  EXPECT_EQ(ChunkPayloadBytes(1 << 20, limit, 4), limit - kChunkOverheadBytes);
  EXPECT_EQ(ChunkPayloadBytes(1 << 20, limit + 2, 4), limit - kChunkOverheadBytes);
}

TEST(ChunkerTest, RangesCoverTheTensorInOrder) {
  EXPECT_EQ(CutIntoChunks(10, 4), (std::vector<ChunkRange>{{0, 4}, {4, 4}, {8, 2}}));
  EXPECT_EQ(CutIntoChunks(8, 4), (std::vector<ChunkRange>{{0, 4}, {4, 4}}));
  EXPECT_EQ(CutIntoChunks(3, 100), (std::vector<ChunkRange>{{0, 3}}));
  EXPECT_TRUE(CutIntoChunks(0, 4).empty());
}

TEST(ChunkerTest, EveryChunkOfAnyRequestHoldsWholeElements) {
  for (int64_t width : {2, 4}) {
    for (int64_t requested = 1; requested < 70; ++requested) {
      const int64_t chunk = ChunkPayloadBytes(requested, 4 << 20, width);
      EXPECT_LE(chunk, std::max(requested, width));
      int64_t covered = 0;
      for (const ChunkRange& r : CutIntoChunks(width * 37, chunk)) {
        EXPECT_EQ(r.offset, covered);
        EXPECT_EQ(r.offset % width, 0);
        EXPECT_EQ(r.size % width, 0);
        covered += r.size;
      }
      EXPECT_EQ(covered, width * 37);
    }
  }
}

}  // namespace
}  // namespace muon::server
