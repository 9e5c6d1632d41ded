#ifndef MUON_SERVER_SRC_STEP_STEP_MACHINE_H_
#define MUON_SERVER_SRC_STEP_STEP_MACHINE_H_

#include <deque>
#include <memory>
#include <optional>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "muon/v1/optimizer.pb.h"
#include "step/step_backend.h"
#include "step/step_reader.h"

namespace muon::server {

// The protocol of one Step stream (docs/api.md, "Step"), without gRPC: it
// takes the stream's events (a message read, the end of reads, a write
// done, a cancel, the server shutting down) and its backend's results, and
// returns what to do on the stream. The reactor (api/step_reactor.cc) feeds
// it under its lock and runs the actions after releasing it.
//
//   kHeader ─header─▶ kReceiving ─StepEnd─▶ kEnded ─Committed─▶ kFinishing ─▶ kDone
//           ├───────▶ kReplayPending ─StepEnd─▶ kEnded (backend Replay)
//           └───────▶ kAwaitingRound ─StepEnd─▶ kEnded
//   any error, cancel, shutdown, half-close before StepEnd ─▶ kFinishing (failed)
//
// kFinishing writes what is queued (on failure only the write already under
// way), waits for the backend to let go of the session, then finishes; a
// client that has the status may retry at once.
// Thread-compatible: the caller serializes every call.
class StepMachine {
 public:
  enum class Phase {
    kHeader,         // waiting for the StepHeader
    kReceiving,      // a new step: gradient chunks until StepEnd
    kReplayPending,  // a retry of a committed step: chunks ignored until StepEnd
    kAwaitingRound,  // a resend to a round that has this worker: chunks ignored
    kEnded,          // StepEnd read: waiting for the backend's outcome
    kFinishing,      // the outcome is known: writing, then finishing
    kDone,           // finished; every later event is ignored
  };

  // What the stream must do next, in this order.
  struct Actions {
    bool read = false;                         // StartRead
    StepResponsePtr write;                     // StartWrite
    std::optional<absl::Status> finish;        // Finish with this status
  };

  // Makes the backend for a header: finds and authorizes its session,
  // checks the header, picks the mode. Errors end the stream.
  using Opener =
      absl::AnyInvocable<absl::StatusOr<std::unique_ptr<StepBackend>>(const v1::StepHeader&)>;

  explicit StepMachine(Opener open);

  // The stream ----------------------------------------------------------
  Actions Start();
  Actions ReadDone(const v1::StepRequest& request);
  // A gradient chunk read off the wire without a StepRequest
  // (StepReader::ReadGradient).
  Actions ReadGradientDone(uint32_t param_index, uint64_t offset, v1::DType dtype,
                           const StepAssembler::ChunkBytes& data);
  // A message that is no StepRequest (it does not parse).
  Actions ReadMalformed();
  // Reads ended before StepEnd: a half-close, or a read that failed.
  Actions ReadsEnded();
  Actions WriteDone(bool ok);
  // The client cancelled or the connection broke.
  Actions Cancelled();
  // The server is shutting down and cuts the stream.
  Actions ShuttingDown();

  // The backend (StepEvents) ---------------------------------------------
  Actions Updates(std::vector<StepResponsePtr> responses);
  Actions Committed(std::vector<StepResponsePtr> responses, bool replayed);
  Actions Failed(absl::Status status);

  Phase phase() const { return phase_; }
  // The step was applied by this stream, or replayed from its record.
  bool committed() const { return committed_; }
  bool replayed() const { return replayed_; }
  // OK, or the error the stream finishes (or finished) with.
  const absl::Status& status() const { return status_; }
  // Gradient bytes accepted so far.
  int64_t bytes_received() const { return reader_.bytes_received(); }

 private:
  // A message was read: `handle` takes it unless the phase reads no more.
  Actions OnRead(absl::FunctionRef<absl::Status()> handle);
  absl::Status OnMessage(const v1::StepRequest& request);
  absl::Status OnHeader(const v1::StepHeader& header);
  absl::Status OnEvent(StepReader::Event event);
  // Enters kFinishing with `status` (the first error wins); drops the
  // writes not yet under way and lets the backend go.
  void Fail(absl::Status status);
  // Queues `responses` and starts the next write or the finish when due.
  void Enqueue(std::vector<StepResponsePtr> responses);
  Actions Next(bool read);

  Opener open_;
  Phase phase_ = Phase::kHeader;
  StepReader reader_;
  std::unique_ptr<StepBackend> backend_;
  // The backend owes a terminal event (Committed or Failed).
  bool awaiting_backend_ = false;
  // The backend sent its terminal event: it holds nothing.
  bool backend_done_ = false;
  bool committed_ = false;
  bool replayed_ = false;
  absl::Status status_;
  std::deque<StepResponsePtr> writes_;
  bool writing_ = false;
  absl::Time write_start_;
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STEP_STEP_MACHINE_H_
