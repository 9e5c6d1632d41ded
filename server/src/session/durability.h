#ifndef MUON_SERVER_SRC_SESSION_DURABILITY_H_
#define MUON_SERVER_SRC_SESSION_DURABILITY_H_

// When sessions are written to disk, and what a failed write means: the one
// place that decides (docs/operations.md, "Durability"). Steps, rounds,
// weight uploads, explicit checkpoints and idle removal all ask it.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "muon/kernels/engine.h"
#include "muon/v1/optimizer.pb.h"
#include "session/session.h"
#include "storage/checkpoint_store.h"
#include "storage/session_image.h"

namespace muon::server {

struct DurabilityOptions {
  // Null: no checkpoints; every other option is then moot.
  const CheckpointStore* store = nullptr;
  // Every step is on disk before it is acknowledged.
  bool strict = false;
  // Otherwise: a checkpoint at every Nth step of a session; 0: none.
  int every_steps = 0;
};

// Thread-safe. The store and engine outlive it.
class Durability {
 public:
  Durability(DurabilityOptions options, const Engine* engine);

  bool enabled() const { return options_.store != nullptr; }
  bool strict() const { return enabled() && options_.strict; }
  const CheckpointStore* store() const { return options_.store; }

  // Whether the commit of `step` writes a checkpoint before it is
  // acknowledged: every step when strict, every Nth otherwise.
  bool DueAtCommit(uint64_t step) const;

  // A commit under way: the session's lease is held and the engine already
  // at `committed.step`. Writes it when due. Returns what the step is
  // acknowledged with: Ok, or, when strict and the write failed,
  // Unavailable (the step stays applied; the session is not durable until
  // a write succeeds, and its retry waits for that). A failed write under
  // the other policies is logged; the next due step tries again.
  absl::Status AtCommit(Session& session, const Session::Snapshot& committed) const;

  // A retry of the committed step is about to be answered: true when it must
  // first be written (strict, and its write failed).
  bool ReplayNeedsWrite(const Session& session) const;
  // Writes the session for such a retry of `step`. Unavailable when the
  // write fails again.
  absl::Status WriteBeforeReplay(Session& session, uint64_t step) const;

  // A weights upload holding the lease has set the weights: pushes are rare
  // and set what every later step builds on, so they are on disk before
  // they are acknowledged whenever checkpoints are on.
  absl::Status AfterUpload(Session& session) const;

  // An explicit checkpoint: takes the lease, waiting up to `wait` for the
  // step in flight, and writes the committed state. FailedPrecondition
  // without a checkpoint directory; the lease's errors.
  absl::StatusOr<v1::SessionCheckpoint> Checkpoint(Session& session, absl::Duration wait) const;
  // The same, for a caller that already holds the session's lease.
  absl::StatusOr<v1::SessionCheckpoint> CheckpointHeld(Session& session) const;

  // The session is gone for good: its file goes too, else it would come
  // back at the next start. Ok without a checkpoint directory.
  absl::Status Forget(absl::string_view session_id) const;

 private:
  // Writes the session as of `snapshot`, reading its state from the
  // engine.
  absl::StatusOr<v1::SessionCheckpoint> Write(Session& session,
                                              const Session::Snapshot& snapshot) const;

  const DurabilityOptions options_;
  const Engine* const engine_;
};

// The image of `session` as of `snapshot`, its parameters' state read from
// `engine`. REQUIRES: the session's lease held, the engine at the
// snapshot's step.
absl::StatusOr<SessionImage> ImageOf(const Session& session, const Session::Snapshot& snapshot,
                                     const Engine& engine);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_SESSION_DURABILITY_H_
