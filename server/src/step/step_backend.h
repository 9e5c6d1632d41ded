#ifndef MUON_SERVER_SRC_STEP_STEP_BACKEND_H_
#define MUON_SERVER_SRC_STEP_STEP_BACKEND_H_

// What a Step stream's session mode does with the stream's gradients, behind
// one interface: UPDATES (step/update_backend.h) computes each parameter's
// update as its gradient completes and commits at StepEnd;
// PARAMETER_SERVER (ps/round_backend.h) adds the worker's gradient to its
// round. The StepMachine (step/step_machine.h) drives a backend and learns
// of its asynchronous results through StepEvents.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "muon/v1/optimizer.pb.h"
#include "step/step_reader.h"
#include "storage/step_reply.h"

namespace muon::server {

// A message of the stream's answer; an update chunk's data may lie in a
// buffer the reply holds (storage/step_reply.h).
using StepResponsePtr = std::shared_ptr<const StepReply>;

// The results of a backend's work, delivered to the stream. Thread-safe; a
// backend calls them from its own tasks (Updates also from the engine's
// threads while a task computes, one call per update as it is ready), never
// from inside one of its StepBackend methods (the caller holds the stream's
// lock there).
class StepEvents {
 public:
  virtual ~StepEvents() = default;
  // Runs `work` on the server's pool; the stream stays alive until it ends.
  virtual void Schedule(absl::AnyInvocable<void() &&> work) = 0;
  // Keeps the stream alive while something outside it (a round) may still
  // call it; one Unpin per Pin.
  virtual void Pin() = 0;
  virtual void Unpin() = 0;

  // Update chunks ready to send; more follow.
  virtual void Updates(std::vector<StepResponsePtr> responses) = 0;
  // Terminal: the step is applied (or, `replayed`, was applied before);
  // send `responses`, the summary last, and finish OK.
  virtual void Committed(std::vector<StepResponsePtr> responses, bool replayed) = 0;
  // Terminal: the step failed; nothing of it is applied (a strict server's
  // unwritten step excepted: see UpdateStepBackend).
  virtual void Failed(absl::Status status) = 0;
};

class StepBackend {
 public:
  // What the stream does after its header.
  enum class Role {
    kReceive,  // a new step: gradients go to Gradient, StepEnd to End
    kReplay,   // a retry of a committed step: chunks ignored, StepEnd → Replay
    kWait,     // a resend to a round that has this worker's gradient: chunks
               // ignored, the round's outcome comes as Committed or Failed
  };
  struct Admission {
    Role role = Role::kReceive;
    std::string session_id;                // for messages
    std::vector<StepReader::Param> params;  // kReceive: the session's parameters
    // kReceive, optional: where the gradients are assembled (the session's
    // kept buffers, valid while the backend lives).
    BufferShelf* gradient_buffers = nullptr;
  };

  virtual ~StepBackend() = default;

  // The stream's header names this backend's session: admit its step.
  // Errors as Session::AdmitStep or ParameterServerRounds::Join; on error
  // nothing is held.
  virtual absl::StatusOr<Admission> Admit(const v1::StepHeader& header) = 0;
  // kReceive: parameter `index`'s gradient is whole (its registered bytes).
  virtual void Gradient(uint32_t index, std::unique_ptr<std::byte[]> bytes) = 0;
  // kReceive: StepEnd was read; the step carries `indices` (ascending),
  // every one given to Gradient, each to be scaled by `grad_scale`
  // (StepEnd.grad_scale) when set. Its outcome comes as Committed or Failed.
  // An error here is the step's (nothing applied, no event follows).
  virtual absl::Status End(std::vector<uint32_t> indices, int64_t bytes_received,
                           std::optional<double> grad_scale) = 0;
  // kReplay: StepEnd was read; answers with Committed(replayed) or Failed.
  virtual void Replay() = 0;
  // The stream failed: drop what is not committed and free the session.
  // True when the backend holds nothing now and sends no terminal event;
  // false when work under way ends with one terminal event (Committed when
  // a commit was already under way, else Failed).
  virtual bool Abort() = 0;
  // A message of this step took `seconds` to write (for its summary).
  virtual void Sent(double seconds) = 0;
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STEP_STEP_BACKEND_H_
