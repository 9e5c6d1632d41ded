#ifndef MUON_SERVER_SRC_SESSION_H_
#define MUON_SERVER_SRC_SESSION_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "muon/kernels/engine.h"
#include "muon/server/server.h"
#include "muon/v1/optimizer.pb.h"

namespace muon::server {

class CheckpointStore;
class ParameterServerRounds;
class SessionReporter;
class StepReporter;

// One registered parameter of a session.
struct SessionParam {
  ParamSpec spec;
  ParamId engine_id = 0;
  int64_t tensor_bytes = 0;  // bytes of one gradient in spec.dtype
  int64_t state_bytes = 0;   // engine optimizer state
};

// The responses of a committed step (update chunks, then the summary), kept
// to answer a retry of that step without applying it again.
struct StepRecord {
  uint64_t step = 0;
  std::vector<std::shared_ptr<const v1::StepResponse>> responses;
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
// flag and the last step's record. Thread-safe.
class Session {
 public:
  explicit Session(SessionInit init);
  ~Session();

  const std::string& id() const { return id_; }
  // Secret; only CreateSession returns it.
  const std::string& token() const { return token_; }
  v1::SessionMode mode() const { return mode_; }
  uint32_t num_workers() const { return num_workers_; }
  const std::vector<SessionParam>& params() const { return params_; }
  const v1::CreateSessionRequest& config() const { return config_; }
  absl::Time create_time() const { return create_time_; }

  // Ok for the session's token. Unauthenticated for an empty token,
  // PermissionDenied for any other. Compares in constant time; the messages
  // never contain a token.
  absl::Status CheckToken(absl::string_view token) const;

  // What a Step header for `step` from `worker` gets.
  struct Admission {
    // Set for a retry of the last committed step: replay these responses.
    std::shared_ptr<const StepRecord> replay;
  };
  // A new step (step == committed + 1) marks the session in flight: the
  // caller must then call CommitStep or AbortStep exactly once.
  // FailedPrecondition for a step ahead of or too far behind the session
  // (naming the expected step); Aborted while another step is in flight;
  // NotFound once deleted.
  absl::StatusOr<Admission> AdmitStep(uint64_t step, uint32_t worker);
  // REQUIRES: a new step admitted for `worker`, its transaction committed.
  void CommitStep(uint32_t worker, std::shared_ptr<const StepRecord> record);
  // REQUIRES: a new step admitted for `worker`, its transaction destroyed.
  void AbortStep(uint32_t worker);

  // PARAMETER_SERVER mode -------------------------------------------------
  // The step rounds; null in UPDATES mode.
  ParameterServerRounds* rounds() const { return rounds_.get(); }
  void set_rounds(std::unique_ptr<ParameterServerRounds> rounds);
  // Takes the in-flight slot for a round of the next step. Aborted while a
  // checkpoint or an upload holds it; NotFound once deleted.
  absl::Status BeginRound();
  // Ends a round: its step is committed with one record per worker.
  void CommitRound(uint64_t step, std::vector<std::shared_ptr<const StepRecord>> records);
  void AbortRound();
  // For a step at or before the committed one: `worker`'s record of it.
  // FailedPrecondition (naming the expected step) when it is not kept.
  absl::StatusOr<std::shared_ptr<const StepRecord>> Recorded(uint64_t step, uint32_t worker) const;

  // Holds the session's in-flight slot for a weights upload, so it cannot
  // interleave with a step. Aborted while a step or upload is in flight;
  // NotFound once deleted. REQUIRES: EndWeightsUpload afterwards.
  absl::Status BeginWeightsUpload();
  void EndWeightsUpload();

  // Holds the in-flight slot for a checkpoint, waiting up to `wait` for a
  // step in flight to end: while held, the engine state is the committed
  // step's. DeadlineExceeded when the session stayed busy; NotFound once
  // deleted. REQUIRES: Release afterwards.
  absl::Status Hold(absl::Duration wait);
  void Release();

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

  // Marks the session deleted. FailedPrecondition while a step is in flight.
  absl::Status MarkDeleted();

  uint64_t step() const;
  // with_params: fill SessionInfo.params.
  void FillInfo(bool with_params, v1::SessionInfo* info) const;

 private:
  // FailedPrecondition for a step ahead of the next one.
  absl::Status AheadError(uint64_t step) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string id_;
  const std::string token_;
  const v1::CreateSessionRequest config_;
  const v1::SessionMode mode_;
  const uint32_t num_workers_;
  const std::vector<SessionParam> params_;
  const absl::Time create_time_;
  std::unique_ptr<ParameterServerRounds> rounds_;  // set before the session is shared

  mutable absl::Mutex mu_;
  uint64_t step_ ABSL_GUARDED_BY(mu_) = 0;
  bool in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool deleted_ ABSL_GUARDED_BY(mu_) = false;
  bool durable_ ABSL_GUARDED_BY(mu_) = true;
  absl::Time last_step_time_ ABSL_GUARDED_BY(mu_);
  // Per worker: the last committed step's responses.
  std::vector<std::shared_ptr<const StepRecord>> last_ ABSL_GUARDED_BY(mu_);
};

// When sessions are written to disk (docs/operations.md, "Durability").
struct DurabilityOptions {
  // Null: no checkpoints.
  const CheckpointStore* store = nullptr;
  // Every step is on disk before it is acknowledged.
  bool strict = false;
  // Otherwise: a checkpoint at every Nth step of a session; 0: none.
  int every_steps = 0;
};

// How PARAMETER_SERVER rounds run (ps_round.h).
struct RoundOptions {
  StepReporter* metrics = nullptr;
  // How long a round waits for all its workers, from its first stream.
  absl::Duration worker_timeout = absl::Seconds(120);
  // Largest UpdateChunk payload.
  int64_t chunk_bytes = 1 << 20;
};

// All sessions of the server. Thread-safe.
class SessionRegistry {
 public:
  // engine, metrics and durability.store must outlive the registry.
  // admin_token: the operator's token (ServerOptions::admin_token); empty:
  // none configured.
  SessionRegistry(Engine* engine, const Limits& limits, SessionReporter* metrics,
                  DurabilityOptions durability = {}, RoundOptions rounds = {},
                  std::string admin_token = "");
  ~SessionRegistry();

  // Restores every session of the checkpoint directory. A file that cannot
  // be read or restored is skipped with a logged error (it stays on disk for
  // an operator). Returns how many sessions were restored.
  int RestoreAll();

  bool checkpoints_enabled() const { return durability_.store != nullptr; }
  bool strict() const { return durability_.store != nullptr && durability_.strict; }

  // Whether the commit of `step` must write a checkpoint before the step is
  // acknowledged.
  bool CheckpointsAtCommit(uint64_t step) const;

  // For a commit under way: the session is held (its step in flight) and the
  // engine state is already `snapshot`'s step. Writes it; on failure marks
  // the session not durable.
  absl::Status CheckpointCommit(Session& session, const Session::Snapshot& snapshot);

  // Fails parameter-server rounds whose workers did not all arrive in time.
  void ExpireRounds(absl::Time now);

  // Holds the session (waiting up to `wait` for its step in flight) and
  // writes its committed state. FailedPrecondition without a checkpoint
  // directory.
  absl::StatusOr<v1::SessionCheckpoint> Checkpoint(Session& session, absl::Duration wait);

  // Checkpoint of every session; the first error after trying them all.
  absl::StatusOr<std::vector<v1::SessionCheckpoint>> CheckpointAll(absl::Duration wait);

  // Validates the request, registers every parameter with the engine (all
  // or none) and adds the session. InvalidArgument for a bad request;
  // ResourceExhausted over a limit or the engine's memory budget.
  absl::StatusOr<std::shared_ptr<Session>> Create(const v1::CreateSessionRequest& request);

  // The session, for a call that presents its token (Step, PushWeights,
  // PullWeights). InvalidArgument for an empty id; NotFound for an unknown
  // one; Unauthenticated without a token; PermissionDenied for a wrong one.
  absl::StatusOr<std::shared_ptr<Session>> Get(absl::string_view id, absl::string_view token) const;

  // The session, for a call an operator may make too (GetSession,
  // DeleteSession, Checkpoint of one session): `token` is checked as the
  // session's token and, when an admin token is configured, `admin_token` as
  // that; either one suffices. Errors as Get: Unauthenticated when both are
  // empty, PermissionDenied when neither matches.
  absl::StatusOr<std::shared_ptr<Session>> GetAuthorized(absl::string_view id,
                                                         absl::string_view token,
                                                         absl::string_view admin_token) const;

  // For calls over every session (ListSessions, Checkpoint of all sessions).
  // Ok when no admin token is configured; otherwise Unauthenticated for an
  // empty token, PermissionDenied for a wrong one.
  absl::Status CheckAdmin(absl::string_view admin_token) const;

  std::vector<std::shared_ptr<Session>> List() const;

  // Removes the session and frees its engine state. Authorized as
  // GetAuthorized(id, token, token): the session's token or the admin token.
  // NotFound, Unauthenticated, PermissionDenied, FailedPrecondition while a
  // step is in flight.
  absl::Status Delete(absl::string_view id, absl::string_view token);

 private:
  absl::Status Restore(const std::string& path);
  // Checks the limits on one session and registers its parameters with the
  // engine, all or none.
  absl::StatusOr<std::vector<SessionParam>> RegisterParams(const v1::CreateSessionRequest& request);
  void UnregisterParams(absl::Span<const SessionParam> params);
  // Counts a session being created against --max_sessions; AddReserved
  // adds it (or, given null, just ends the reservation).
  absl::Status Reserve();
  void AddReserved(std::shared_ptr<Session> session);
  // A session from `init`, with its rounds in PARAMETER_SERVER mode.
  std::shared_ptr<Session> NewSession(SessionInit init);
  // The session or NotFound; no token checked.
  absl::StatusOr<std::shared_ptr<Session>> Find(absl::string_view id) const;

  Engine* const engine_;
  const Limits limits_;
  SessionReporter* const metrics_;
  const DurabilityOptions durability_;
  const RoundOptions round_options_;
  const std::string admin_token_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  int reserved_ ABSL_GUARDED_BY(mu_) = 0;  // creations under way
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_SESSION_H_
