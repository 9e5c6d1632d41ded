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

class SessionReporter;

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

// A session: immutable configuration plus its step counter, the in-flight
// flag and the last step's record. Thread-safe.
class Session {
 public:
  Session(std::string id, std::string token, std::string name, v1::SessionMode mode,
          uint32_t num_workers, std::vector<SessionParam> params);

  const std::string& id() const { return id_; }
  // Secret; only CreateSession returns it.
  const std::string& token() const { return token_; }
  v1::SessionMode mode() const { return mode_; }
  uint32_t num_workers() const { return num_workers_; }
  const std::vector<SessionParam>& params() const { return params_; }

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

  // Holds the session's in-flight slot for a weights upload, so it cannot
  // interleave with a step. Aborted while a step or upload is in flight;
  // NotFound once deleted. REQUIRES: EndWeightsUpload afterwards.
  absl::Status BeginWeightsUpload();
  void EndWeightsUpload();

  // Marks the session deleted. FailedPrecondition while a step is in flight.
  absl::Status MarkDeleted();

  uint64_t step() const;
  // with_params: fill SessionInfo.params.
  void FillInfo(bool with_params, v1::SessionInfo* info) const;

 private:
  const std::string id_;
  const std::string token_;
  const std::string name_;
  const v1::SessionMode mode_;
  const uint32_t num_workers_;
  const std::vector<SessionParam> params_;
  const absl::Time create_time_;

  mutable absl::Mutex mu_;
  uint64_t step_ ABSL_GUARDED_BY(mu_) = 0;
  bool in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool deleted_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time last_step_time_ ABSL_GUARDED_BY(mu_) = absl::InfinitePast();
  // Per worker: the last committed step's responses.
  std::vector<std::shared_ptr<const StepRecord>> last_ ABSL_GUARDED_BY(mu_);
};

// All sessions of the server. Thread-safe.
class SessionRegistry {
 public:
  // engine and metrics must outlive the registry. admin_token: the
  // operator's token (ServerOptions::admin_token); empty: none configured.
  SessionRegistry(Engine* engine, const Limits& limits, SessionReporter* metrics,
                  std::string admin_token = "");
  ~SessionRegistry();

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
  // The session or NotFound; no token checked.
  absl::StatusOr<std::shared_ptr<Session>> Find(absl::string_view id) const;

  Engine* const engine_;
  const Limits limits_;
  SessionReporter* const metrics_;
  const std::string admin_token_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  int reserved_ ABSL_GUARDED_BY(mu_) = 0;  // creations under way
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_SESSION_H_
