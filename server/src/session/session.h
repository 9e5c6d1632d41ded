#ifndef MUON_SERVER_SRC_SESSION_SESSION_H_
#define MUON_SERVER_SRC_SESSION_SESSION_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "muon/kernels/engine.h"
#include "muon/v1/optimizer.pb.h"
#include "session/lease.h"
#include "storage/session_image.h"
#include "util/buffer_shelf.h"
#include "util/shared_buffer_shelf.h"

namespace muon::server {

// What a PARAMETER_SERVER session runs its steps with (ps/ implements it;
// the registry's RoundsFactory makes it), so session/ does not depend on
// ps/.
class SessionRounds {
 public:
  virtual ~SessionRounds() = default;
  // Fails the round when its workers did not all arrive by its deadline.
  virtual void ExpireIfLate(absl::Time now) = 0;
};

// One registered parameter of a session.
struct SessionParam {
  ParamSpec spec;
  ParamId engine_id = 0;
  int64_t tensor_bytes = 0;  // bytes of one gradient in spec.dtype
  int64_t state_bytes = 0;   // engine optimizer state
};

// What a session starts from: a new session (step 0, no records) or one
// restored from a checkpoint.
struct SessionInit {
  std::string id;
  std::string token;
  // The request that created it (name, mode, parameters, hyper-parameters),
  // kept for checkpoints.
  v1::CreateSessionRequest config;
  v1::SessionMode mode = v1::SESSION_MODE_UPDATES;
  uint32_t num_workers = 1;
  std::vector<SessionParam> params;
  absl::Time create_time;
  uint64_t step = 0;
  absl::Time last_step_time = absl::InfinitePast();
  // Per worker (num_workers entries, null where none): the last committed
  // step's responses.
  std::vector<std::shared_ptr<const StepRecord>> records;
};

// A session: immutable configuration plus its step counter, the in-flight
// slot (lease.h) and the last step's record. Thread-safe.
class Session {
 public:
  explicit Session(SessionInit init);
  ~Session();

  const std::string& id() const { return id_; }
  // Secret; only CreateSession returns it.
  const std::string& token() const { return token_; }
  v1::SessionMode mode() const { return mode_; }
  uint32_t num_workers() const { return num_workers_; }
  // The current parameters and the request they are configured by (kept
  // for checkpoints). Stable references: a reader that took them before
  // SetParams keeps a consistent, older view.
  const std::vector<SessionParam>& params() const;
  const v1::CreateSessionRequest& config() const;
  absl::Time create_time() const { return create_time_; }

  // Ok for the session's token. Unauthenticated for an empty token,
  // PermissionDenied for any other. Compares in constant time; the messages
  // never contain a token.
  absl::Status CheckToken(absl::string_view token) const;

  // What a Step header for `step` from `worker` gets.
  struct Admission {
    // Set for a retry of the last committed step: replay these responses.
    std::shared_ptr<const StepRecord> replay;
    // Held for a new step (step == committed + 1): commit it with
    // lease.CommitStep, or let it go to abort.
    Lease lease;
  };
  // FailedPrecondition for a step ahead of or too far behind the session
  // (naming the expected step); Aborted while the slot is held; NotFound
  // once deleted.
  absl::StatusOr<Admission> AdmitStep(uint64_t step, uint32_t worker);

  // The in-flight slot for `purpose` (a round, a weights upload), now.
  // Aborted (naming the holder) while it is held; NotFound once deleted.
  absl::StatusOr<Lease> TryLease(LeasePurpose purpose);
  // The slot for a checkpoint, waiting up to `wait` for the holder to end:
  // while held, the engine state is the committed step's. DeadlineExceeded
  // when the session stayed busy; NotFound once deleted.
  absl::StatusOr<Lease> AwaitLease(absl::Duration wait);

  // PARAMETER_SERVER mode -------------------------------------------------
  // The step rounds; null in UPDATES mode.
  SessionRounds* rounds() const { return rounds_.get(); }
  // REQUIRES: before the session is shared.
  void set_rounds(std::unique_ptr<SessionRounds> rounds);
  // For a step at or before the committed one: `worker`'s record of it.
  // FailedPrecondition (naming the expected step) when it is not kept.
  absl::StatusOr<std::shared_ptr<const StepRecord>> Recorded(uint64_t step, uint32_t worker) const;

  // The committed step and what a checkpoint of it records.
  struct Snapshot {
    uint64_t step = 0;
    absl::Time last_step_time;
    std::vector<std::shared_ptr<const StepRecord>> records;  // per worker
  };
  Snapshot TakeSnapshot() const;

  // Strict durability: false from a failed checkpoint write of the committed
  // step until a write succeeds; such a step is not acknowledged.
  bool durable() const;
  void set_durable(bool durable);

  // Marks the session deleted. FailedPrecondition while the slot is held.
  absl::Status MarkDeleted();

  uint64_t step() const;

  // The last time its client used the session: created or restored, a call
  // with its token (Touch), or a step, round or weights upload ending.
  // Checkpoints are the server's, not the client's, and do not count.
  absl::Time last_activity() const;
  void Touch();
  // Marks the session deleted, ending `lease` (held for this session)
  // without counting as activity: the idle reaper's removal.
  void Retire(Lease lease);
  // Replaces the parameters and their configuration (AddParameters, and
  // its undo). REQUIRES: `lease` held for this session.
  void SetParams(const Lease& lease, std::vector<SessionParam> params,
                 v1::CreateSessionRequest config);
  // with_params: fill SessionInfo.params.
  void FillInfo(bool with_params, v1::SessionInfo* info) const;

  // The last step's gradient and update buffers, by parameter index, kept
  // for the next step (UPDATES mode), freed with the session: one gradient
  // of each parameter; of its updates, the one the last step's record still
  // sends from and one free.
  BufferShelf& gradient_buffers() const { return gradient_buffers_; }
  SharedBufferShelf& update_buffers() const { return update_buffers_; }

 private:
  friend class Lease;
  // FailedPrecondition for a step ahead of the next one.
  absl::Status AheadError(uint64_t step) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Aborted, naming what holds the slot.
  absl::Status BusyError() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A lease ends: the slot is free, the step unchanged.
  void EndLease();
  // A lease ends with `step` committed; `update` sets the per-worker records.
  void EndLeaseCommitted(
      uint64_t step,
      absl::FunctionRef<void(std::vector<std::shared_ptr<const StepRecord>>&)> update);

  const std::string id_;
  const std::string token_;
  const v1::SessionMode mode_;
  const uint32_t num_workers_;
  const absl::Time create_time_;
  std::unique_ptr<SessionRounds> rounds_;  // set before the session is shared
  mutable BufferShelf gradient_buffers_;
  mutable SharedBufferShelf update_buffers_;

  mutable absl::Mutex mu_;
  uint64_t step_ ABSL_GUARDED_BY(mu_) = 0;
  // What holds the in-flight slot; unset while it is free.
  std::optional<LeasePurpose> holder_ ABSL_GUARDED_BY(mu_);
  struct Layout {
    v1::CreateSessionRequest config;
    std::vector<SessionParam> params;
  };
  // Every layout the session had, the current one last; a deque so that
  // references to the older ones stay valid (they are few and small).
  std::deque<Layout> layouts_ ABSL_GUARDED_BY(mu_);
  bool deleted_ ABSL_GUARDED_BY(mu_) = false;
  bool durable_ ABSL_GUARDED_BY(mu_) = true;
  absl::Time last_step_time_ ABSL_GUARDED_BY(mu_);
  absl::Time last_activity_ ABSL_GUARDED_BY(mu_);
  // Per worker: the last committed step's responses.
  std::vector<std::shared_ptr<const StepRecord>> last_ ABSL_GUARDED_BY(mu_);
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_SESSION_SESSION_H_
