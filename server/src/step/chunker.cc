#include "step/chunker.h"

#include <algorithm>

namespace muon::server {

int64_t ChunkPayloadBytes(int64_t requested, int64_t max_message_bytes, int64_t element_size) {
  const int64_t fits = max_message_bytes - kChunkOverheadBytes;
  const int64_t bytes = std::min(requested, fits);
  return std::max(element_size, bytes / element_size * element_size);
}

std::vector<ChunkRange> CutIntoChunks(int64_t total_bytes, int64_t chunk_bytes) {
  std::vector<ChunkRange> ranges;
  ranges.reserve(static_cast<size_t>((total_bytes + chunk_bytes - 1) / chunk_bytes));
  for (int64_t offset = 0; offset < total_bytes; offset += chunk_bytes) {
    ranges.push_back({offset, std::min(chunk_bytes, total_bytes - offset)});
  }
  return ranges;
}

}  // namespace muon::server
