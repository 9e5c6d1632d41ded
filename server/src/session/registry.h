#ifndef MUON_SERVER_SRC_SESSION_REGISTRY_H_
#define MUON_SERVER_SRC_SESSION_REGISTRY_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "muon/kernels/engine.h"
#include "muon/server/server.h"
#include "muon/v1/optimizer.pb.h"
#include "session/durability.h"
#include "session/session.h"
#include "storage/session_image.h"

namespace muon::server {

class SessionReporter;

// All sessions of the server. Thread-safe.
class SessionRegistry {
 public:
  // Makes a PARAMETER_SERVER session's rounds (ps/), given the session
  // that will own them.
  using RoundsFactory = std::function<std::unique_ptr<SessionRounds>(Session*)>;

  // engine, metrics and durability must outlive the registry. admin_token:
  // the operator's token (ServerOptions::admin_token); empty: none
  // configured.
  SessionRegistry(Engine* engine, const Limits& limits, SessionReporter* metrics,
                  const Durability* durability, RoundsFactory rounds,
                  std::string admin_token = "");
  ~SessionRegistry();

  // Restores every session of the checkpoint directory. A file that cannot
  // be read or restored is skipped with a logged error (it stays on disk for
  // an operator). Returns how many sessions were restored.
  int RestoreAll();

  const Durability& durability() const { return *durability_; }

  // Fails parameter-server rounds whose workers did not all arrive in time.
  void ExpireRounds(absl::Time now);

  // Removes every session idle for Limits::session_idle_ttl at `now`, each
  // checkpointed first when checkpoints are on (its file stays: a restart
  // brings it back). A session busy now is not idle; one whose checkpoint
  // fails stays, and is tried again a TTL later. Returns how many went.
  int RemoveIdle(absl::Time now);

  // Checkpoint of every session; the first error after trying them all.
  absl::StatusOr<std::vector<v1::SessionCheckpoint>> CheckpointAll(absl::Duration wait);

  // Validates the request, registers every parameter with the engine (all
  // or none) and adds the session. InvalidArgument for a bad request;
  // ResourceExhausted over a limit or the engine's memory budget.
  absl::StatusOr<std::shared_ptr<Session>> Create(const v1::CreateSessionRequest& request);

  // Adds `added` to `session` between steps (UPDATES mode): validated with
  // the existing parameters as one CreateSession request, the limits over
  // the total, registered all or none, and written to disk when
  // checkpoints are on. Returns the index of the first one.
  // FailedPrecondition for a PARAMETER_SERVER session; Aborted while the
  // session is busy; InvalidArgument, ResourceExhausted as Create;
  // Unavailable (nothing added) when the checkpoint write fails.
  absl::StatusOr<uint32_t> AddParams(
      Session& session, const google::protobuf::RepeatedPtrField<v1::ParameterSpec>& added);

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
  absl::Status Restore(SessionImage image);
  // Takes a retired session out and frees its engine state.
  void Drop(const Session& session);
  // Checks the request and the limits on one session and registers its
  // parameters from index `first` on with the engine, all or none; returns
  // those. `devices` (a restore's, one per parameter, or empty) keeps each
  // parameter on the device it was on where this engine has that device;
  // the rest are placed by cost.
  absl::StatusOr<std::vector<SessionParam>> RegisterParams(const v1::CreateSessionRequest& request,
                                                           size_t first = 0,
                                                           absl::Span<const int> devices = {});
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
  const Durability* const durability_;
  const RoundsFactory rounds_factory_;
  const std::string admin_token_;

  mutable absl::Mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Session>> sessions_ ABSL_GUARDED_BY(mu_);
  int reserved_ ABSL_GUARDED_BY(mu_) = 0;  // creations under way
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_SESSION_REGISTRY_H_
