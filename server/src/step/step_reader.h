#ifndef MUON_SERVER_SRC_STEP_READER_H_
#define MUON_SERVER_SRC_STEP_READER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "muon/kernels/types.h"
#include "muon/v1/optimizer.pb.h"
#include "step/step_assembler.h"

namespace muon::server {

// The read side of one Step stream without gRPC: the order of messages
// (header first and once, StepEnd last and required), each gradient chunk checked against
// its parameter (dtype, bounds, overlap) and assembled, and the step's
// parameter list checked when the stream ends. StepReactor drives it with
// each message it reads; the fuzz target (tests/fuzz) drives it the same way.
// Errors carry the codes and messages the client gets.
// Thread-compatible: one thread (the stream's reader) drives it.
class StepReader {
 public:
  // One parameter of the session, as registered.
  struct Param {
    std::string name;
    int64_t bytes = 0;  // of one gradient in `dtype`
    DType dtype = DType::kFloat32;
  };

  // What the caller must do after a message or the half-close.
  struct Event {
    enum class Kind {
      kNone,      // nothing (a chunk that completed nothing, a replay's chunk)
      kHeader,    // accept or reject `header`, then call Receive or Replay
      kComplete,  // parameter `index` is whole: Take it
      kEnd,       // the step carries `indices` (ascending), each complete
      kReplay,    // a retry of a committed step ended: send the recorded step
    };
    Kind kind = Kind::kNone;
    const v1::StepHeader* header = nullptr;  // kHeader; points into the request
    uint32_t index = 0;                      // kComplete
    std::vector<uint32_t> indices;           // kEnd
    std::optional<double> grad_scale;        // kEnd: StepEnd.grad_scale when set
  };

  StepReader() = default;

  // Takes the next message of the stream. InvalidArgument (or NotFound for an
  // unknown parameter index) naming what is wrong; after an error or a kEnd
  // or kReplay event, the caller reads no further.
  absl::StatusOr<Event> Read(const v1::StepRequest& request);

  // A gradient chunk read off the wire without a StepRequest (its data not
  // yet copied anywhere): the same checks and events as Read of a
  // StepRequest{gradient: TensorChunk{param_index, offset, dtype, data}}.
  absl::StatusOr<Event> ReadGradient(uint32_t param_index, uint64_t offset, v1::DType dtype,
                                     const StepAssembler::ChunkBytes& data);

  // The client half-closed. InvalidArgument before a header or a StepEnd
  // (nothing of the step is applied); no event after StepEnd.
  absl::StatusOr<Event> HalfClose();

  // After a kHeader event: the header starts a new step of session
  // `session_id` with these parameters (indices are positions), assembled
  // into buffers from `shelf` when given (StepAssembler).
  void Receive(std::string session_id, std::vector<Param> params, BufferShelf* shelf = nullptr);
  // After a kHeader event: the header retries a committed step; chunks are
  // ignored until the end.
  void Replay();

  // Moves out a whole parameter's bytes (params[index].bytes of them).
  // REQUIRES: a kComplete event for `index`, not taken yet.
  std::unique_ptr<std::byte[]> Take(uint32_t index);

  // No header has been accepted yet.
  bool expects_header() const { return phase_ == Phase::kHeader; }

  // Gradient bytes accepted so far.
  int64_t bytes_received() const;

 private:
  enum class Phase { kHeader, kReceiving, kReplay, kEnded };

  absl::Status CheckChunkDType(uint32_t param_index, v1::DType dtype) const;
  // StepEnd listed the step's parameters: check them.
  absl::StatusOr<Event> End(std::vector<uint32_t> indices);

  Phase phase_ = Phase::kHeader;
  std::string session_id_;
  std::vector<Param> params_;
  std::optional<StepAssembler> assembler_;
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STEP_READER_H_
