#include "session/session.h"

#include <sys/random.h>

#include <algorithm>
#include <iostream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "api/auth.h"
#include "storage/checkpoint.h"
#include "wire/convert.h"
#include "observability/metrics.h"
#include "ps/ps_round.h"
#include "muon/kernels/status_macros.h"

namespace muon::server {
namespace {

// `bytes` bytes from the kernel's urandom source, in hex. Session tokens take
// 16 (128 bits), too many to guess.
absl::StatusOr<std::string> RandomHex(size_t bytes) {
  unsigned char buf[32];
  if (bytes > sizeof(buf) || getrandom(buf, bytes, 0) != static_cast<ssize_t>(bytes)) {
    return absl::InternalError("cannot read random bytes for a session id and token (getrandom)");
  }
  std::string out;
  for (size_t i = 0; i < bytes; ++i) absl::StrAppendFormat(&out, "%02x", buf[i]);
  return out;
}

absl::Status MissingToken(absl::string_view id) {
  return absl::UnauthenticatedError(absl::StrCat(
      "this call needs the token CreateSession returned for session ", id,
      "; send it in the request's token field or as the metadata 'authorization: Bearer <token>'"));
}

// Never names the token sent: it may be another session's.
absl::Status WrongToken(absl::string_view id) {
  return absl::PermissionDeniedError(absl::StrCat(
      "the token sent is not session ", id,
      "'s; use the token CreateSession returned for it (GetSession, DeleteSession and Checkpoint "
      "also take the server's admin token)"));
}

void SetTimestamp(absl::Time t, google::protobuf::Timestamp* ts) {
  const int64_t ns = absl::ToUnixNanos(t);
  ts->set_seconds(ns / 1000000000);
  ts->set_nanos(static_cast<int32_t>(ns % 1000000000));
}

absl::Time FromTimestamp(const google::protobuf::Timestamp& ts) {
  return absl::FromUnixSeconds(ts.seconds()) + absl::Nanoseconds(ts.nanos());
}

}  // namespace

Session::Session(SessionInit init)
    : id_(std::move(init.id)),
      token_(std::move(init.token)),
      config_(std::move(init.config)),
      mode_(init.mode),
      num_workers_(init.num_workers),
      params_(std::move(init.params)),
      create_time_(init.create_time),
      step_(init.step),
      last_step_time_(init.last_step_time),
      last_(std::move(init.records)) {
  last_.resize(num_workers_);
}

absl::Status Session::CheckToken(absl::string_view token) const {
  if (token.empty()) return MissingToken(id_);
  if (!ConstantTimeEquals(token, token_)) return WrongToken(id_);
  return absl::OkStatus();
}

Session::~Session() = default;

absl::StatusOr<Session::Admission> Session::AdmitStep(uint64_t step, uint32_t worker) {
  {
    absl::MutexLock lock(&mu_);
    if (deleted_) return absl::NotFoundError(absl::StrCat("session ", id_, " was deleted"));
    if (step == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("step numbers start at 1; session ", id_, " expects step ", step_ + 1));
    }
    if (step == step_ + 1) {
      if (in_flight_) {
        return absl::AbortedError(
            absl::StrCat("session ", id_, " already has step ", step,
                         " in flight on another stream; retry once that stream has ended"));
      }
      in_flight_ = true;
      return Admission{};
    }
    if (step > step_) return AheadError(step);
  }
  MUON_ASSIGN_OR_RETURN(std::shared_ptr<const StepRecord> record, Recorded(step, worker));
  return Admission{std::move(record)};
}

absl::Status Session::AheadError(uint64_t step) const {
  return absl::FailedPreconditionError(absl::StrCat("step ", step, " is ahead of session ", id_,
                                                    ": its last committed step is ", step_,
                                                    ", so the expected step is ", step_ + 1));
}

absl::StatusOr<std::shared_ptr<const StepRecord>> Session::Recorded(uint64_t step,
                                                                    uint32_t worker) const {
  absl::MutexLock lock(&mu_);
  const std::shared_ptr<const StepRecord>& last = last_[worker];
  if (last != nullptr && last->step == step) return last;
  return absl::FailedPreconditionError(absl::StrCat(
      "step ", step, " of session ", id_, " was already committed and only the last step's updates",
      " are kept for retries; the session is at step ", step_, ", so the expected step is ",
      step_ + 1));
}

void Session::set_rounds(std::unique_ptr<ParameterServerRounds> rounds) {
  rounds_ = std::move(rounds);
}

absl::Status Session::BeginRound() {
  absl::MutexLock lock(&mu_);
  if (deleted_) return absl::NotFoundError(absl::StrCat("session ", id_, " was deleted"));
  if (in_flight_) {
    return absl::AbortedError(absl::StrCat(
        "session ", id_, " is being checkpointed or its weights uploaded; retry the step"));
  }
  in_flight_ = true;
  return absl::OkStatus();
}

void Session::CommitRound(uint64_t step, std::vector<std::shared_ptr<const StepRecord>> records) {
  absl::MutexLock lock(&mu_);
  step_ = step;
  last_ = std::move(records);
  last_.resize(num_workers_);
  last_step_time_ = absl::Now();
  in_flight_ = false;
}

void Session::AbortRound() {
  absl::MutexLock lock(&mu_);
  in_flight_ = false;
}

void Session::CommitStep(uint32_t worker, std::shared_ptr<const StepRecord> record) {
  absl::MutexLock lock(&mu_);
  step_ = record->step;
  last_[worker] = std::move(record);
  last_step_time_ = absl::Now();
  in_flight_ = false;
}

void Session::AbortStep(uint32_t /*worker*/) {
  absl::MutexLock lock(&mu_);
  in_flight_ = false;
}

absl::Status Session::BeginWeightsUpload() {
  absl::MutexLock lock(&mu_);
  if (deleted_) return absl::NotFoundError(absl::StrCat("session ", id_, " was deleted"));
  if (in_flight_) {
    return absl::AbortedError(
        absl::StrCat("session ", id_, " has a step or upload in flight; retry once it ends"));
  }
  in_flight_ = true;
  return absl::OkStatus();
}

void Session::EndWeightsUpload() {
  absl::MutexLock lock(&mu_);
  in_flight_ = false;
}

absl::Status Session::Hold(absl::Duration wait) {
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return !in_flight_ || deleted_; };
  mu_.AwaitWithTimeout(absl::Condition(&idle), wait);
  if (deleted_) return absl::NotFoundError(absl::StrCat("session ", id_, " was deleted"));
  if (in_flight_) {
    return absl::DeadlineExceededError(
        absl::StrCat("session ", id_, " had a step in flight for ", absl::FormatDuration(wait),
                     "; retry once its step has ended"));
  }
  in_flight_ = true;
  return absl::OkStatus();
}

void Session::Release() {
  absl::MutexLock lock(&mu_);
  in_flight_ = false;
}

Session::Snapshot Session::TakeSnapshot() const {
  absl::MutexLock lock(&mu_);
  return Snapshot{step_, last_step_time_, last_};
}

bool Session::durable() const {
  absl::MutexLock lock(&mu_);
  return durable_;
}

void Session::set_durable(bool durable) {
  absl::MutexLock lock(&mu_);
  durable_ = durable;
}

absl::Status Session::MarkDeleted() {
  absl::MutexLock lock(&mu_);
  if (deleted_) return absl::NotFoundError(absl::StrCat("session ", id_, " was deleted"));
  if (in_flight_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "session ", id_, " has step ", step_ + 1, " in flight; delete it once the step has ended"));
  }
  deleted_ = true;
  return absl::OkStatus();
}

uint64_t Session::step() const {
  absl::MutexLock lock(&mu_);
  return step_;
}

void Session::FillInfo(bool with_params, v1::SessionInfo* info) const {
  info->set_session_id(id_);
  info->set_name(config_.name());
  info->set_mode(mode_);
  info->set_num_workers(num_workers_);
  info->set_num_params(static_cast<uint32_t>(params_.size()));
  int64_t state_bytes = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    const SessionParam& p = params_[i];
    state_bytes += p.state_bytes;
    if (!with_params) continue;
    v1::ParameterInfo* out = info->add_params();
    out->set_index(static_cast<uint32_t>(i));
    out->set_name(p.spec.name);
    for (int64_t d : p.spec.shape) out->add_shape(d);
    out->set_dtype(DTypeToProto(p.spec.dtype));
    out->set_kind(KindToProto(p.spec.kind));
    HyperParamsToProto(p.spec.hp, out->mutable_hyper_params());
    out->set_state_bytes(p.state_bytes);
    out->set_tensor_bytes(p.tensor_bytes);
  }
  info->set_state_bytes(state_bytes);
  SetTimestamp(create_time_, info->mutable_create_time());
  absl::MutexLock lock(&mu_);
  info->set_step(step_);
  info->set_next_step(step_ + 1);
  if (last_step_time_ != absl::InfinitePast()) {
    SetTimestamp(last_step_time_, info->mutable_last_step_time());
  }
}

SessionRegistry::SessionRegistry(Engine* engine, const Limits& limits, SessionReporter* metrics,
                                 DurabilityOptions durability, RoundOptions rounds,
                                 std::string admin_token)
    : engine_(engine),
      limits_(limits),
      metrics_(metrics),
      durability_(durability),
      round_options_(rounds),
      admin_token_(std::move(admin_token)) {}

std::shared_ptr<Session> SessionRegistry::NewSession(SessionInit init) {
  auto session = std::make_shared<Session>(std::move(init));
  if (session->mode() == v1::SESSION_MODE_PARAMETER_SERVER) {
    session->set_rounds(
        std::make_unique<ParameterServerRounds>(session.get(), engine_, this, round_options_));
  }
  return session;
}

void SessionRegistry::ExpireRounds(absl::Time now) {
  for (const std::shared_ptr<Session>& session : List()) {
    if (session->rounds() != nullptr) session->rounds()->ExpireIfLate(now);
  }
}

SessionRegistry::~SessionRegistry() {
  absl::MutexLock lock(&mu_);
  for (auto& [id, session] : sessions_) {
    for (const SessionParam& p : session->params()) engine_->Unregister(p.engine_id).IgnoreError();
  }
}

absl::StatusOr<std::vector<SessionParam>> SessionRegistry::RegisterParams(
    const v1::CreateSessionRequest& request) {
  if (limits_.max_params_per_session > 0 &&
      request.params_size() > limits_.max_params_per_session) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the session has ", request.params_size(), " parameters; this server allows ",
                     limits_.max_params_per_session, " per session (--max_params_per_session)"));
  }
  MUON_ASSIGN_OR_RETURN(std::vector<ParamSpec> specs, SpecsFromRequest(request));

  std::vector<SessionParam> params(specs.size());
  int64_t session_bytes = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    params[i].tensor_bytes = NumElements(specs[i].shape) * DTypeSize(specs[i].dtype);
    params[i].state_bytes = StateBytes(specs[i]);
    // State, plus one gradient in flight and one cached update.
    session_bytes += params[i].state_bytes + 2 * params[i].tensor_bytes;
    params[i].spec = std::move(specs[i]);
  }
  if (limits_.max_bytes_per_session > 0 && session_bytes > limits_.max_bytes_per_session) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the session needs ", session_bytes,
        " bytes (optimizer state plus one gradient and one update per parameter); this server "
        "allows ",
        limits_.max_bytes_per_session, " per session (--max_bytes_per_session)"));
  }
  absl::Status status;
  size_t registered = 0;
  for (; registered < params.size(); ++registered) {
    absl::StatusOr<ParamId> id = engine_->Register(params[registered].spec);
    if (!id.ok()) {
      status = id.status();
      break;
    }
    params[registered].engine_id = *id;
  }
  if (!status.ok()) {
    UnregisterParams(absl::MakeConstSpan(params.data(), registered));
    const std::string& who = params[registered].spec.name;
    return absl::Status(status.code(), absl::StrCat("registering parameter ", registered, " ('",
                                                    who, "'): ", status.message()));
  }
  return params;
}

void SessionRegistry::UnregisterParams(absl::Span<const SessionParam> params) {
  for (const SessionParam& p : params) engine_->Unregister(p.engine_id).IgnoreError();
}

absl::Status SessionRegistry::Reserve() {
  absl::MutexLock lock(&mu_);
  if (static_cast<int64_t>(sessions_.size()) + reserved_ >= limits_.max_sessions) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "this server already has ", sessions_.size(), " sessions, its limit", " (--max_sessions=",
        limits_.max_sessions, "); delete unused sessions or raise the limit"));
  }
  ++reserved_;
  return absl::OkStatus();
}

void SessionRegistry::AddReserved(std::shared_ptr<Session> session) {
  absl::MutexLock lock(&mu_);
  --reserved_;
  if (session != nullptr) sessions_.emplace(session->id(), std::move(session));
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::Create(
    const v1::CreateSessionRequest& request) {
  uint32_t num_workers = request.num_workers() == 0 ? 1 : request.num_workers();
  v1::SessionMode mode = request.mode();
  if (mode == v1::SESSION_MODE_UNSPECIFIED) mode = v1::SESSION_MODE_UPDATES;
  if (mode != v1::SESSION_MODE_UPDATES && mode != v1::SESSION_MODE_PARAMETER_SERVER) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown mode value ", static_cast<int>(mode),
                     "; use SESSION_MODE_UPDATES or SESSION_MODE_PARAMETER_SERVER"));
  }
  if (mode == v1::SESSION_MODE_UPDATES && num_workers != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "num_workers is ", num_workers,
        " but UPDATES mode has exactly one worker; use SESSION_MODE_PARAMETER_SERVER"));
  }
  if (num_workers > 4096) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_workers is ", num_workers, "; at most 4096 are supported"));
  }
  MUON_RETURN_IF_ERROR(Reserve());
  absl::StatusOr<std::vector<SessionParam>> params = RegisterParams(request);
  if (!params.ok()) {
    AddReserved(nullptr);
    return params.status();
  }
  absl::StatusOr<std::string> id = RandomHex(8);
  absl::StatusOr<std::string> token = RandomHex(16);
  if (!id.ok() || !token.ok()) {
    UnregisterParams(*params);
    AddReserved(nullptr);
    return id.ok() ? token.status() : id.status();
  }
  SessionInit init;
  init.id = std::move(*id);
  init.token = std::move(*token);
  init.config = request;
  init.mode = mode;
  init.num_workers = num_workers;
  init.params = std::move(*params);
  init.create_time = absl::Now();
  std::shared_ptr<Session> session = NewSession(std::move(init));
  AddReserved(session);
  metrics_->SessionCreated();
  return session;
}

int SessionRegistry::RestoreAll() {
  if (durability_.store == nullptr) return 0;
  absl::StatusOr<std::vector<std::string>> paths = durability_.store->List();
  if (!paths.ok()) {
    std::cerr << "muon-server: cannot restore sessions: " << paths.status() << std::endl;
    return 0;
  }
  int restored = 0;
  for (const std::string& path : *paths) {
    absl::Status status = Restore(path);
    if (status.ok()) {
      ++restored;
    } else {
      std::cerr << "muon-server: skipping checkpoint " << path << ": " << status << std::endl;
    }
  }
  return restored;
}

absl::Status SessionRegistry::Restore(const std::string& path) {
  MUON_ASSIGN_OR_RETURN(LoadedCheckpoint checkpoint, ReadCheckpoint(path));
  const storage::CheckpointMeta& meta = checkpoint.meta;
  {
    absl::MutexLock lock(&mu_);
    if (sessions_.contains(meta.session_id())) {
      return absl::AlreadyExistsError(
          absl::StrCat("session ", meta.session_id(), " is already on this server"));
    }
  }
  SessionInit init;
  init.id = meta.session_id();
  init.token = meta.token();
  init.config = meta.config();
  init.mode = meta.config().mode() == v1::SESSION_MODE_PARAMETER_SERVER
                  ? v1::SESSION_MODE_PARAMETER_SERVER
                  : v1::SESSION_MODE_UPDATES;
  init.num_workers = std::max<uint32_t>(1, meta.config().num_workers());
  init.create_time = FromTimestamp(meta.create_time());
  init.step = meta.step();
  if (meta.has_last_step_time()) init.last_step_time = FromTimestamp(meta.last_step_time());
  MUON_ASSIGN_OR_RETURN(init.records, RecordsFromCheckpoint(checkpoint, init.num_workers));
  MUON_RETURN_IF_ERROR(Reserve());
  absl::StatusOr<std::vector<SessionParam>> params = RegisterParams(meta.config());
  if (!params.ok()) {
    AddReserved(nullptr);
    return params.status();
  }
  absl::Status status;
  for (size_t i = 0; i < params->size() && status.ok(); ++i) {
    absl::StatusOr<ParamState> state = ParamStateFromCheckpoint(checkpoint, static_cast<int>(i));
    status = state.ok() ? engine_->ImportState((*params)[i].engine_id, *state) : state.status();
  }
  if (!status.ok()) {
    UnregisterParams(*params);
    AddReserved(nullptr);
    return status;
  }
  init.params = std::move(*params);
  AddReserved(NewSession(std::move(init)));
  metrics_->SessionRestored();
  return absl::OkStatus();
}

bool SessionRegistry::CheckpointsAtCommit(uint64_t step) const {
  if (durability_.store == nullptr) return false;
  if (durability_.strict) return true;
  return durability_.every_steps > 0 && step % durability_.every_steps == 0;
}

absl::Status SessionRegistry::CheckpointCommit(Session& session,
                                               const Session::Snapshot& snapshot) {
  absl::StatusOr<v1::SessionCheckpoint> written =
      durability_.store->Write(session, snapshot, *engine_);
  session.set_durable(written.ok());
  return written.status();
}

absl::StatusOr<v1::SessionCheckpoint> SessionRegistry::Checkpoint(Session& session,
                                                                  absl::Duration wait) {
  if (durability_.store == nullptr) {
    return absl::FailedPreconditionError(
        "this server has no checkpoint directory; start it with --checkpoint_dir=DIR");
  }
  MUON_RETURN_IF_ERROR(session.Hold(wait));
  absl::StatusOr<v1::SessionCheckpoint> written =
      durability_.store->Write(session, session.TakeSnapshot(), *engine_);
  if (written.ok()) session.set_durable(true);
  session.Release();
  return written;
}

absl::StatusOr<std::vector<v1::SessionCheckpoint>> SessionRegistry::CheckpointAll(
    absl::Duration wait) {
  std::vector<std::shared_ptr<Session>> sessions = List();
  std::sort(sessions.begin(), sessions.end(),
            [](const auto& a, const auto& b) { return a->id() < b->id(); });
  std::vector<v1::SessionCheckpoint> written;
  absl::Status first_error;
  for (const std::shared_ptr<Session>& session : sessions) {
    absl::StatusOr<v1::SessionCheckpoint> one = Checkpoint(*session, wait);
    if (one.ok()) {
      written.push_back(std::move(*one));
    } else if (!absl::IsNotFound(one.status()) && first_error.ok()) {
      // NotFound: deleted meanwhile, nothing to keep.
      first_error = one.status();
    }
  }
  if (!first_error.ok()) return first_error;
  return written;
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::Find(absl::string_view id) const {
  std::shared_ptr<Session> session;
  {
    absl::MutexLock lock(&mu_);
    auto it = sessions_.find(id);
    if (it != sessions_.end()) session = it->second;
  }
  if (session == nullptr) {
    if (id.empty()) return absl::InvalidArgumentError("session_id is empty");
    return absl::NotFoundError(
        absl::StrCat("no session '", id,
                     "' on this server (deleted, or created on another server or before a "
                     "restart); create one with CreateSession"));
  }
  return session;
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::Get(absl::string_view id,
                                                              absl::string_view token) const {
  MUON_ASSIGN_OR_RETURN(std::shared_ptr<Session> session, Find(id));
  MUON_RETURN_IF_ERROR(session->CheckToken(token));
  return session;
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::GetAuthorized(
    absl::string_view id, absl::string_view token, absl::string_view admin_token) const {
  MUON_ASSIGN_OR_RETURN(std::shared_ptr<Session> session, Find(id));
  const absl::Status as_session = session->CheckToken(token);
  if (as_session.ok()) return session;
  if (!admin_token_.empty() && !admin_token.empty()) {
    if (ConstantTimeEquals(admin_token, admin_token_)) return session;
    return WrongToken(id);
  }
  return as_session;
}

absl::Status SessionRegistry::CheckAdmin(absl::string_view admin_token) const {
  if (admin_token_.empty()) return absl::OkStatus();
  if (admin_token.empty()) {
    return absl::UnauthenticatedError(
        "this call needs the server's admin token (--admin_token); send it in the request's "
        "admin_token field or as the metadata 'authorization: Bearer <token>'");
  }
  if (!ConstantTimeEquals(admin_token, admin_token_)) {
    return absl::PermissionDeniedError(
        "the admin token sent is not this server's (--admin_token); ask its operator for it");
  }
  return absl::OkStatus();
}

std::vector<std::shared_ptr<Session>> SessionRegistry::List() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::shared_ptr<Session>> out;
  out.reserve(sessions_.size());
  for (const auto& [id, session] : sessions_) out.push_back(session);
  return out;
}

absl::Status SessionRegistry::Delete(absl::string_view id, absl::string_view token) {
  MUON_ASSIGN_OR_RETURN(std::shared_ptr<Session> session, GetAuthorized(id, token, token));
  MUON_RETURN_IF_ERROR(session->MarkDeleted());
  {
    absl::MutexLock lock(&mu_);
    sessions_.erase(session->id());
  }
  for (const SessionParam& p : session->params()) {
    MUON_RETURN_IF_ERROR(engine_->Unregister(p.engine_id));
  }
  metrics_->SessionDeleted();
  // Else the deleted session would come back at the next start.
  if (durability_.store != nullptr) return durability_.store->Remove(session->id());
  return absl::OkStatus();
}

}  // namespace muon::server
