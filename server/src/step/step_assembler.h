#ifndef MUON_SERVER_SRC_STEP_ASSEMBLER_H_
#define MUON_SERVER_SRC_STEP_ASSEMBLER_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/functional/function_ref.h"
#include "absl/strings/string_view.h"
#include "util/buffer_shelf.h"

namespace muon::server {

// Collects one step's gradient chunks (any order, any size) into whole
// tensors, rejecting chunks out of bounds, misaligned or overlapping.
// Thread-compatible: one thread (the stream's reader) drives it.
class StepAssembler {
 public:
  struct Tensor {
    std::string name;          // for messages
    int64_t bytes = 0;         // whole tensor
    int64_t element_size = 1;  // offsets and lengths are multiples of it
  };
  // Tensor i's bytes go into a buffer taken from `shelf`'s slot i when one
  // is given (a session's kept gradient buffers), else into a new one.
  explicit StepAssembler(std::vector<Tensor> tensors, BufferShelf* shelf = nullptr);

  // One chunk's bytes: `size` of them, which `copy_to` writes to its
  // argument. The source may be a protobuf string or the slices of a
  // message as it came off the wire (api/step_wire.h); it is read once,
  // after every check passed.
  struct ChunkBytes {
    uint64_t size = 0;
    absl::FunctionRef<void(std::byte* destination)> copy_to;
  };

  // Copies `data` to [offset, offset + size) of tensor `index` and sets
  // *complete when the tensor is now whole. NotFound for an unknown index;
  // InvalidArgument for an empty, misaligned, out-of-bounds or overlapping
  // chunk. On error nothing changes.
  absl::Status Add(uint32_t index, uint64_t offset, const ChunkBytes& data, bool* complete);
  absl::Status Add(uint32_t index, uint64_t offset, absl::string_view data, bool* complete);

  // Moves out a whole tensor's bytes. REQUIRES: tensor `index` is complete
  // and not taken yet.
  std::unique_ptr<std::byte[]> Take(uint32_t index);

  // Ok when tensor `index` is whole; InvalidArgument naming the first
  // missing byte range otherwise.
  absl::Status CheckComplete(uint32_t index) const;

  // Indices of the tensors that received at least one chunk, ascending.
  std::vector<uint32_t> Started() const;
  bool started(uint32_t index) const { return state_[index].started; }
  int64_t bytes_received() const { return bytes_received_; }

 private:
  struct State {
    bool started = false;
    int64_t received = 0;
    std::unique_ptr<std::byte[]> data;
    std::map<uint64_t, uint64_t> ranges;  // start → end of received bytes
  };
  std::vector<Tensor> tensors_;
  BufferShelf* const shelf_;
  std::vector<State> state_;
  int64_t bytes_received_ = 0;
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STEP_ASSEMBLER_H_
