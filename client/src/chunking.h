#ifndef MUON_CLIENT_SRC_CHUNKING_H_
#define MUON_CLIENT_SRC_CHUNKING_H_

// Cutting tensors into step chunks and putting updates back together.
// Internal to muon_client (tests include it directly).

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "muon/client/client.h"
#include "muon/v1/optimizer.pb.h"

namespace muon::client_internal {

struct ByteRange {
  size_t offset = 0;
  size_t size = 0;
  bool operator==(const ByteRange&) const = default;
};

// The chunk size actually used for `requested` bytes: rounded down to a
// multiple of 4 (every wire dtype's element size divides it), at least 4.
size_t EffectiveChunkBytes(size_t requested);

// [0, total) cut into consecutive ranges of EffectiveChunkBytes(chunk_bytes)
// bytes, the last one shorter. No range for total == 0.
std::vector<ByteRange> SplitIntoChunks(size_t total, size_t chunk_bytes);

// Collects one step's update chunks, then checks them against the summary.
// Not thread-safe.
class UpdateAssembler {
 public:
  // Copies the chunk into its parameter's buffer. DATA_LOSS when the chunk contradicts earlier ones
  // (total_bytes, dtype or decay changed), lies outside total_bytes, or overlaps received bytes.
  absl::Status Add(const v1::UpdateChunk& chunk);

  // The updates of exactly summary.param_indices, each complete, ascending.
  // DATA_LOSS when one is missing or incomplete, or an update came for a
  // parameter the summary does not list. Leaves the assembler empty.
  absl::StatusOr<std::vector<ParameterUpdate>> Finish(const v1::StepSummary& summary);

 private:
  struct Pending {
    ParameterUpdate update;
    // Received byte ranges, offset → end, merged when adjacent.
    std::map<uint64_t, uint64_t> ranges;
    uint64_t received = 0;
  };
  std::map<uint32_t, Pending> pending_;
};

}  // namespace muon::client_internal

#endif  // MUON_CLIENT_SRC_CHUNKING_H_
