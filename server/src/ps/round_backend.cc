#include "ps/round_backend.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "muon/kernels/status_macros.h"
#include "step/replay.h"
#include "wire/convert.h"

namespace muon::server {

RoundStepBackend::RoundStepBackend(const StepBackendEnv& env, std::shared_ptr<Session> session,
                                   StepEvents* events)
    : env_(env), session_(std::move(session)), events_(events), rounds_(RoundsOf(*session_)) {}

absl::StatusOr<StepBackend::Admission> RoundStepBackend::Admit(const v1::StepHeader& header) {
  if (header.update_dtype() != v1::DTYPE_UNSPECIFIED) {
    MUON_ASSIGN_OR_RETURN(format_.dtype, DTypeFromProto(header.update_dtype(), DType::kFloat32));
  }
  format_.content = header.update_content() == v1::UPDATE_CONTENT_UPDATE
                        ? v1::UPDATE_CONTENT_UPDATE
                        : v1::UPDATE_CONTENT_WEIGHTS;
  Contribution contribution;
  contribution.format = format_;
  if (header.has_lr()) contribution.lr = header.lr();
  if (header.has_lr_scale()) contribution.lr_scale = header.lr_scale();
  contribution.measure_orthogonality = header.measure_orthogonality();
  // Pinned before joining: the round may call RoundDone as soon as it holds
  // this backend.
  events_->Pin();
  absl::StatusOr<ParameterServerRounds::Admission> joined =
      rounds_->Join(header.step(), header.worker_id(), this, contribution);
  if (!joined.ok() || joined->role == ParameterServerRounds::Role::kReplay) events_->Unpin();
  if (!joined.ok()) return joined.status();
  Admission admission;
  admission.session_id = session_->id();
  answered_.assign(session_->params().size(), false);
  switch (joined->role) {
    case ParameterServerRounds::Role::kReplay:
      replay_ = std::move(joined->replay);
      admission.role = Role::kReplay;
      return admission;
    case ParameterServerRounds::Role::kWait:
      joined_ = true;
      admission.role = Role::kWait;
      return admission;
    case ParameterServerRounds::Role::kContribute:
      break;
  }
  joined_ = true;
  given_.assign(session_->params().size(), false);
  admission.role = Role::kReceive;
  for (const SessionParam& p : session_->params()) {
    admission.params.push_back({p.spec.name, p.tensor_bytes, p.spec.dtype});
  }
  return admission;
}

void RoundStepBackend::Gradient(uint32_t index, std::unique_ptr<std::byte[]> bytes) {
  given_[index] = true;
  // Held by the round at once; the parameter's average and step start as
  // soon as every worker's gradient of it is in.
  if (rounds_->Add(this, index, std::move(bytes))) {
    events_->Schedule([this] { rounds_->Drive(); });
  }
}

absl::Status RoundStepBackend::End(std::vector<uint32_t> indices, int64_t bytes_received,
                                   std::optional<double> grad_scale) {
  if (grad_scale.has_value()) {
    return absl::InvalidArgumentError(
        "StepEnd.grad_scale is for UPDATES sessions; a parameter-server session averages the "
        "workers' gradients as sent: clip them before sending");
  }
  const std::vector<SessionParam>& params = session_->params();
  // The reader has checked that `indices` are exactly the parameters given.
  for (uint32_t i = 0; indices.size() != params.size() && i < params.size(); ++i) {
    if (!given_[i]) {
      return absl::InvalidArgumentError(
          absl::StrCat("a PARAMETER_SERVER step carries every parameter; parameter ", i, " ('",
                       params[i].spec.name, "') is missing"));
    }
  }
  // Checking the gradients (and, for the last worker, the rest of the
  // step) is engine work: off the reactor.
  events_->Schedule([this, bytes_received] {
    absl::Status status = rounds_->End(this, bytes_received);
    if (status.ok()) return;  // the round answers
    // Out of the round, so that the worker's retry is not refused as a
    // second live stream; when the round has answered already, it is done.
    if (rounds_->Leave(this)) {
      events_->Failed(status);
      events_->Unpin();
    }
  });
  return absl::OkStatus();
}

void RoundStepBackend::Replay() {
  ScheduleReplay(events_, *env_.durability, *session_, replay_);
}

bool RoundStepBackend::Abort() {
  if (!joined_) return true;
  if (!rounds_->Leave(this)) return false;  // RoundDone is on its way
  events_->Unpin();
  return true;
}

void RoundStepBackend::Answers(std::vector<StepResponsePtr> responses) {
  for (const StepResponsePtr& r : responses) answered_[r->message.update().param_index()] = true;
  events_->Updates(std::move(responses));
}

void RoundStepBackend::RoundDone(absl::StatusOr<std::shared_ptr<const StepRecord>> result) {
  if (result.ok()) {
    // The record holds every answer (a replay sends them all); this stream
    // has had some already.
    std::vector<StepResponsePtr> rest;
    for (const StepResponsePtr& r : (*result)->responses) {
      const bool update = r->message.has_update();
      if (!update || !answered_[r->message.update().param_index()]) rest.push_back(r);
    }
    events_->Committed(std::move(rest), /*replayed=*/false);
  } else {
    events_->Failed(result.status());
  }
  events_->Unpin();  // the last use of this
}

}  // namespace muon::server
