#ifndef MUON_CLIENT_SRC_CHUNKING_H_
#define MUON_CLIENT_SRC_CHUNKING_H_

// Cutting tensors into step chunks and putting updates back together.
// Internal to muon_client (tests include it directly).

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

#include "absl/status/status.h"
#include "absl/functional/function_ref.h"
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
  UpdateAssembler() = default;
  // Assembles each update into the buffer `recycled` holds for its
  // parameter (an earlier step's), when there is one: of the right size, it
  // needs no allocation and no zero fill.
  explicit UpdateAssembler(std::vector<ParameterUpdate> recycled);

  // Copies the chunk into its parameter's buffer. DATA_LOSS when the chunk contradicts earlier ones
  // (total_bytes, dtype or decay changed), lies outside total_bytes, or overlaps received bytes.
  absl::Status Add(const v1::UpdateChunk& chunk);
  // The same for a chunk whose `size` bytes of data are not in `chunk`:
  // `copy` writes them to where they go (straight from gRPC's slices,
  // step_read.h), once the chunk's fields are checked.
  absl::Status Add(const v1::UpdateChunk& chunk, uint64_t size,
                   absl::FunctionRef<void(std::byte*)> copy);

  // The updates of exactly summary.param_indices, each complete, ascending.
  // DATA_LOSS when one is missing or incomplete, or an update came for a
  // parameter the summary does not list. Leaves the assembler empty.
  absl::StatusOr<std::vector<ParameterUpdate>> Finish(const v1::StepSummary& summary);

  // Every buffer it holds (assembled or recycled), for another attempt's
  // assembler. Leaves it empty.
  std::vector<ParameterUpdate> Release();

 private:
  struct Pending {
    ParameterUpdate update;
    // Received byte ranges, offset → end, merged when adjacent.
    std::map<uint64_t, uint64_t> ranges;
    uint64_t received = 0;
  };
  std::map<uint32_t, Pending> pending_;
  std::map<uint32_t, std::vector<std::byte>> recycled_;
};

}  // namespace muon::client_internal

#endif  // MUON_CLIENT_SRC_CHUNKING_H_
