#ifndef MUON_SERVER_SRC_STEP_CHUNKER_H_
#define MUON_SERVER_SRC_STEP_CHUNKER_H_

#include <cstdint>
#include <vector>

namespace muon::server {

// The one way every reply tensor (step updates, parameter-server replies,
// PullWeights) is cut into messages: each chunk holds whole elements, so it
// can be encoded and decoded on its own, and none exceeds the maximum asked
// for.

// Room left in a message for a chunk's fields other than its payload.
inline constexpr int64_t kChunkOverheadBytes = 1024;

// Largest payload per chunk: `requested` capped so that a chunk fits in a
// message of `max_message_bytes`, rounded down to whole `element_size`s,
// and never less than one element.
// REQUIRES: requested > 0, element_size > 0.
int64_t ChunkPayloadBytes(int64_t requested, int64_t max_message_bytes, int64_t element_size);

struct ChunkRange {
  int64_t offset = 0;
  int64_t size = 0;
  bool operator==(const ChunkRange& other) const {
    return offset == other.offset && size == other.size;
  }
};

// Consecutive ranges covering [0, total_bytes), each `chunk_bytes` long but
// the last. REQUIRES: chunk_bytes > 0.
std::vector<ChunkRange> CutIntoChunks(int64_t total_bytes, int64_t chunk_bytes);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STEP_CHUNKER_H_
