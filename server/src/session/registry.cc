#include "session/registry.h"

#include <sys/random.h>

#include <algorithm>
#include <iostream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "muon/kernels/sharded_engine.h"
#include "muon/kernels/status_macros.h"
#include "observability/metrics.h"
#include "util/constant_time.h"
#include "wire/convert.h"

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

}  // namespace

SessionRegistry::SessionRegistry(Engine* engine, const Limits& limits, SessionReporter* metrics,
                                 const Durability* durability, RoundsFactory rounds,
                                 std::string admin_token)
    : engine_(engine),
      limits_(limits),
      metrics_(metrics),
      durability_(durability),
      rounds_factory_(std::move(rounds)),
      admin_token_(std::move(admin_token)) {}

std::shared_ptr<Session> SessionRegistry::NewSession(SessionInit init) {
  auto session = std::make_shared<Session>(std::move(init));
  if (session->mode() == v1::SESSION_MODE_PARAMETER_SERVER) {
    session->set_rounds(rounds_factory_(session.get()));
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
    const v1::CreateSessionRequest& request, size_t first, absl::Span<const int> devices) {
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
  params.erase(params.begin(), params.begin() + static_cast<std::ptrdiff_t>(first));
  absl::Status status;
  size_t registered = 0;
  // One device when the engine is not sharded: a checkpoint's device 0 is kept.
  const absl::StatusOr<std::vector<ShardLoad>> loads = ShardLoads(*engine_);
  const int device_count = loads.ok() ? static_cast<int>(loads->size()) : 1;
  for (; registered < params.size(); ++registered) {
    const size_t index = first + registered;
    const int device = index < devices.size() ? devices[index] : -1;
    absl::StatusOr<ParamId> id = loads.ok() && device >= 0 && device < device_count
                                     ? RegisterOnShard(*engine_, params[registered].spec, device)
                                     : engine_->Register(params[registered].spec);
    if (!id.ok()) {
      status = id.status();
      break;
    }
    params[registered].engine_id = *id;
  }
  if (!status.ok()) {
    UnregisterParams(absl::MakeConstSpan(params.data(), registered));
    const std::string& who = params[registered].spec.name;
    return absl::Status(status.code(), absl::StrCat("registering parameter ", first + registered,
                                                    " ('", who, "'): ", status.message()));
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
  if (num_workers > kMaxWorkers) {
    return absl::InvalidArgumentError(absl::StrCat("num_workers is ", num_workers, "; at most ",
                                                   kMaxWorkers, " are supported"));
  }
  if (request.benchmark_echo()) {
    if (!limits_.allow_benchmark_sessions) {
      return absl::FailedPreconditionError(
          "benchmark_echo sessions (updates that are the gradients, for wire benchmarks) are off "
          "on this server; start it with --allow_benchmark_sessions");
    }
    if (mode != v1::SESSION_MODE_UPDATES) {
      return absl::InvalidArgumentError("benchmark_echo needs SESSION_MODE_UPDATES");
    }
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

absl::StatusOr<uint32_t> SessionRegistry::AddParams(
    Session& session, const google::protobuf::RepeatedPtrField<v1::ParameterSpec>& added) {
  if (session.mode() == v1::SESSION_MODE_PARAMETER_SERVER) {
    return absl::FailedPreconditionError(absl::StrCat(
        "AddParameters: session ", session.id(),
        " is a PARAMETER_SERVER session, whose workers all send every parameter; create a new "
        "session with all of them"));
  }
  if (added.empty()) {
    return absl::InvalidArgumentError("AddParameters needs at least one parameter in `params`");
  }
  MUON_ASSIGN_OR_RETURN(Lease lease, session.TryLease(LeasePurpose::kAddParams));
  std::vector<SessionParam> before = session.params();
  v1::CreateSessionRequest before_config = session.config();
  v1::CreateSessionRequest config = before_config;
  for (const v1::ParameterSpec& p : added) *config.add_params() = p;
  MUON_ASSIGN_OR_RETURN(std::vector<SessionParam> fresh, RegisterParams(config, before.size()));
  std::vector<SessionParam> params = before;
  params.insert(params.end(), fresh.begin(), fresh.end());
  session.SetParams(lease, std::move(params), std::move(config));
  if (durability_->enabled()) {
    absl::StatusOr<v1::SessionCheckpoint> written = durability_->CheckpointHeld(session);
    if (!written.ok()) {
      // The file on disk is still the session before the call: undo to match.
      session.SetParams(lease, std::move(before), std::move(before_config));
      UnregisterParams(fresh);
      return absl::UnavailableError(absl::StrCat(
          "AddParameters: writing session ", session.id(),
          "'s checkpoint failed, so no parameter was added: ", written.status().message()));
    }
  }
  return static_cast<uint32_t>(before.size());
}

int SessionRegistry::RestoreAll() {
  const CheckpointStore* store = durability_->store();
  if (store == nullptr) return 0;
  absl::StatusOr<std::vector<std::string>> paths = store->List();
  if (!paths.ok()) {
    std::cerr << "muon-server: cannot restore sessions: " << paths.status() << std::endl;
    return 0;
  }
  int restored = 0;
  for (const std::string& path : *paths) {
    absl::StatusOr<SessionImage> image = store->Read(path);
    absl::Status status = image.ok() ? Restore(std::move(*image)) : image.status();
    if (status.ok()) {
      ++restored;
    } else {
      std::cerr << "muon-server: skipping checkpoint " << path << ": " << status << std::endl;
    }
  }
  return restored;
}

absl::Status SessionRegistry::Restore(SessionImage image) {
  {
    absl::MutexLock lock(&mu_);
    if (sessions_.contains(image.session_id)) {
      return absl::AlreadyExistsError(
          absl::StrCat("session ", image.session_id, " is already on this server"));
    }
  }
  SessionInit init;
  init.id = std::move(image.session_id);
  init.token = std::move(image.token);
  init.mode = image.config.mode() == v1::SESSION_MODE_PARAMETER_SERVER
                  ? v1::SESSION_MODE_PARAMETER_SERVER
                  : v1::SESSION_MODE_UPDATES;
  init.num_workers = std::max<uint32_t>(1, image.config.num_workers());
  init.create_time = image.create_time;
  init.step = image.step;
  init.last_step_time = image.last_step_time;
  init.records = std::move(image.records);
  MUON_RETURN_IF_ERROR(Reserve());
  absl::StatusOr<std::vector<SessionParam>> params =
      RegisterParams(image.config, 0, image.devices);
  const absl::StatusOr<std::vector<ShardLoad>> loads = ShardLoads(*engine_);
  const int device_count = loads.ok() ? static_cast<int>(loads->size()) : 1;
  const auto missing = std::count_if(image.devices.begin(), image.devices.end(),
                                     [&](int d) { return d >= device_count; });
  if (params.ok() && missing > 0) {
    std::cerr << "muon-server: session " << init.id << ": " << missing << " of "
              << image.devices.size() << " parameters were on devices this server does not have "
              << "(it has " << device_count << "); placed again by cost" << std::endl;
  }
  if (!params.ok()) {
    AddReserved(nullptr);
    return params.status();
  }
  absl::Status status;
  for (size_t i = 0; i < params->size() && status.ok(); ++i) {
    status = engine_->ImportState((*params)[i].engine_id, image.params[i]);
  }
  if (!status.ok()) {
    UnregisterParams(*params);
    AddReserved(nullptr);
    return status;
  }
  init.config = std::move(image.config);
  init.params = std::move(*params);
  AddReserved(NewSession(std::move(init)));
  metrics_->SessionRestored();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::SessionCheckpoint>> SessionRegistry::CheckpointAll(
    absl::Duration wait) {
  std::vector<std::shared_ptr<Session>> sessions = List();
  std::sort(sessions.begin(), sessions.end(),
            [](const auto& a, const auto& b) { return a->id() < b->id(); });
  std::vector<v1::SessionCheckpoint> written;
  absl::Status first_error;
  for (const std::shared_ptr<Session>& session : sessions) {
    absl::StatusOr<v1::SessionCheckpoint> one = durability_->Checkpoint(*session, wait);
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
                     "' on this server (deleted, idle longer than --session_idle_ttl, or created on "
                     "another server or before a restart); create one with CreateSession"));
  }
  return session;
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::Get(absl::string_view id,
                                                              absl::string_view token) const {
  MUON_ASSIGN_OR_RETURN(std::shared_ptr<Session> session, Find(id));
  MUON_RETURN_IF_ERROR(session->CheckToken(token));
  session->Touch();
  return session;
}

absl::StatusOr<std::shared_ptr<Session>> SessionRegistry::GetAuthorized(
    absl::string_view id, absl::string_view token, absl::string_view admin_token) const {
  MUON_ASSIGN_OR_RETURN(std::shared_ptr<Session> session, Find(id));
  const absl::Status as_session = session->CheckToken(token);
  if (as_session.ok()) {
    session->Touch();
    return session;
  }
  if (!admin_token_.empty() && !admin_token.empty()) {
    if (ConstantTimeEquals(admin_token, admin_token_)) return session;
    MUON_RETURN_IF_ERROR(session->CheckToken(admin_token));  // names neither token
    return session;
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
  Drop(*session);
  return durability_->Forget(session->id());
}

int SessionRegistry::RemoveIdle(absl::Time now) {
  const absl::Duration ttl = limits_.session_idle_ttl;
  if (ttl <= absl::ZeroDuration()) return 0;
  int removed = 0;
  for (const std::shared_ptr<Session>& session : List()) {
    if (now - session->last_activity() < ttl) continue;
    absl::StatusOr<Lease> lease = session->TryLease(LeasePurpose::kCheckpoint);
    if (!lease.ok()) continue;  // busy, so not idle; or deleted meanwhile
    const absl::Duration idle = now - session->last_activity();
    if (idle < ttl) continue;  // used meanwhile
    std::string kept;
    if (durability_->enabled()) {
      absl::StatusOr<v1::SessionCheckpoint> written = durability_->CheckpointHeld(*session);
      if (!written.ok()) {
        std::cerr << "muon-server: keeping idle session " << session->id()
                  << ": its checkpoint failed: " << written.status() << std::endl;
        session->Touch();  // the next try a TTL from now, not at every tick
        continue;
      }
      kept = absl::StrCat("; its checkpoint ", written->path(), " stays");
    }
    session->Retire(std::move(*lease));
    Drop(*session);
    std::cerr << "muon-server: removed session " << session->id() << ", idle for "
              << absl::FormatDuration(idle) << " (--session_idle_ttl="
              << absl::FormatDuration(ttl) << ")" << kept << std::endl;
    ++removed;
  }
  return removed;
}

void SessionRegistry::Drop(const Session& session) {
  {
    absl::MutexLock lock(&mu_);
    sessions_.erase(session.id());
  }
  UnregisterParams(session.params());
  metrics_->SessionDeleted();
}

}  // namespace muon::server
