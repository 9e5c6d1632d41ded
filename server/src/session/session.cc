#include "session/session.h"

#include <algorithm>
#include <iostream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "util/constant_time.h"
#include "wire/convert.h"
#include "muon/kernels/status_macros.h"

namespace muon::server {
namespace {

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

}  // namespace

Session::Session(SessionInit init)
    : id_(std::move(init.id)),
      token_(std::move(init.token)),
      mode_(init.mode),
      num_workers_(init.num_workers),
      create_time_(init.create_time),
      step_(init.step),
      last_step_time_(init.last_step_time),
      last_activity_(absl::Now()),
      last_(std::move(init.records)) {
  last_.resize(num_workers_);
  layouts_.push_back({std::move(init.config), std::move(init.params)});
}

const std::vector<SessionParam>& Session::params() const {
  absl::MutexLock lock(&mu_);
  return layouts_.back().params;
}

const v1::CreateSessionRequest& Session::config() const {
  absl::MutexLock lock(&mu_);
  return layouts_.back().config;
}

void Session::SetParams(const Lease& lease, std::vector<SessionParam> params,
                        v1::CreateSessionRequest config) {
  if (lease.session_ != this) return;
  absl::MutexLock lock(&mu_);
  layouts_.push_back({std::move(config), std::move(params)});
}

absl::Status Session::CheckToken(absl::string_view token) const {
  if (token.empty()) return MissingToken(id_);
  if (!ConstantTimeEquals(token, token_)) return WrongToken(id_);
  return absl::OkStatus();
}

Session::~Session() {
  // A round may hold the slot; its lease ends while mu_ still exists.
  rounds_.reset();
}

absl::StatusOr<Session::Admission> Session::AdmitStep(uint64_t step, uint32_t worker) {
  {
    absl::MutexLock lock(&mu_);
    if (deleted_) return absl::NotFoundError(absl::StrCat("session ", id_, " was deleted"));
    if (step == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("step numbers start at 1; session ", id_, " expects step ", step_ + 1));
    }
    if (step == step_ + 1) {
      if (holder_.has_value()) return BusyError();
      holder_ = LeasePurpose::kStep;
      return Admission{nullptr, Lease(this, LeasePurpose::kStep)};
    }
    if (step > step_) return AheadError(step);
  }
  MUON_ASSIGN_OR_RETURN(std::shared_ptr<const StepRecord> record, Recorded(step, worker));
  return Admission{std::move(record), Lease()};
}

absl::Status Session::AheadError(uint64_t step) const {
  return absl::FailedPreconditionError(absl::StrCat("step ", step, " is ahead of session ", id_,
                                                    ": its last committed step is ", step_,
                                                    ", so the expected step is ", step_ + 1));
}

absl::Status Session::BusyError() const {
  switch (*holder_) {
    case LeasePurpose::kStep:
    case LeasePurpose::kRound:
      return absl::AbortedError(absl::StrCat("session ", id_, " already has step ", step_ + 1,
                                             " in flight on another stream; retry once it ends"));
    case LeasePurpose::kWeightsUpload:
      return absl::AbortedError(
          absl::StrCat("session ", id_, " is having its weights uploaded; retry once it ends"));
    case LeasePurpose::kAddParams:
      return absl::AbortedError(
          absl::StrCat("session ", id_, " is having parameters added; retry once it ends"));
    case LeasePurpose::kCheckpoint:
      break;
  }
  return absl::AbortedError(
      absl::StrCat("session ", id_, " is being checkpointed; retry once it ends"));
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

void Session::set_rounds(std::unique_ptr<SessionRounds> rounds) {
  rounds_ = std::move(rounds);
}

absl::StatusOr<Lease> Session::TryLease(LeasePurpose purpose) {
  absl::MutexLock lock(&mu_);
  if (deleted_) return absl::NotFoundError(absl::StrCat("session ", id_, " was deleted"));
  if (holder_.has_value()) return BusyError();
  holder_ = purpose;
  return Lease(this, purpose);
}

absl::StatusOr<Lease> Session::AwaitLease(absl::Duration wait) {
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return !holder_.has_value() || deleted_;
  };
  mu_.AwaitWithTimeout(absl::Condition(&idle), wait);
  if (deleted_) return absl::NotFoundError(absl::StrCat("session ", id_, " was deleted"));
  if (holder_.has_value()) {
    return absl::DeadlineExceededError(
        absl::StrCat("session ", id_, " stayed busy for ", absl::FormatDuration(wait), " (",
                     BusyError().message(), ")"));
  }
  holder_ = LeasePurpose::kCheckpoint;
  return Lease(this, LeasePurpose::kCheckpoint);
}

void Session::EndLease() {
  absl::MutexLock lock(&mu_);
  if (*holder_ != LeasePurpose::kCheckpoint) last_activity_ = absl::Now();
  holder_.reset();
}

absl::Time Session::last_activity() const {
  absl::MutexLock lock(&mu_);
  return last_activity_;
}

void Session::Touch() {
  absl::MutexLock lock(&mu_);
  last_activity_ = absl::Now();
}

void Session::Retire(Lease lease) {
  absl::MutexLock lock(&mu_);
  deleted_ = true;
  holder_.reset();
  lease.session_ = nullptr;
}

void Session::EndLeaseCommitted(
    uint64_t step,
    absl::FunctionRef<void(std::vector<std::shared_ptr<const StepRecord>>&)> update) {
  absl::MutexLock lock(&mu_);
  step_ = step;
  update(last_);
  last_step_time_ = absl::Now();
  last_activity_ = last_step_time_;
  holder_.reset();
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
  if (holder_.has_value()) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot delete: ", BusyError().message()));
  }
  deleted_ = true;
  return absl::OkStatus();
}

uint64_t Session::step() const {
  absl::MutexLock lock(&mu_);
  return step_;
}

void Session::FillInfo(bool with_params, v1::SessionInfo* info) const {
  const std::vector<SessionParam>& current = params();
  info->set_session_id(id_);
  info->set_name(config().name());
  info->set_mode(mode_);
  info->set_num_workers(num_workers_);
  info->set_benchmark_echo(config().benchmark_echo());
  info->set_num_params(static_cast<uint32_t>(current.size()));
  int64_t state_bytes = 0;
  for (size_t i = 0; i < current.size(); ++i) {
    const SessionParam& p = current[i];
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
  SetTimestamp(last_activity_, info->mutable_last_activity_time());
}

}  // namespace muon::server
