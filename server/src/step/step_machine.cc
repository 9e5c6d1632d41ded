#include "step/step_machine.h"

#include <utility>

#include "absl/time/clock.h"
#include "muon/kernels/status_macros.h"

namespace muon::server {

StepMachine::StepMachine(Opener open) : open_(std::move(open)) {}

StepMachine::Actions StepMachine::Start() { return Next(/*read=*/true); }

StepMachine::Actions StepMachine::ReadDone(const v1::StepRequest& request) {
  return OnRead([&] { return OnMessage(request); });
}

StepMachine::Actions StepMachine::ReadGradientDone(uint32_t param_index, uint64_t offset,
                                                   v1::DType dtype,
                                                   const StepAssembler::ChunkBytes& data) {
  return OnRead([&]() -> absl::Status {
    MUON_ASSIGN_OR_RETURN(StepReader::Event event,
                          reader_.ReadGradient(param_index, offset, dtype, data));
    return OnEvent(std::move(event));
  });
}

StepMachine::Actions StepMachine::ReadMalformed() {
  return OnRead([] {
    return absl::InvalidArgumentError(
        "a Step message does not parse as a muon.v1.StepRequest; is the client's proto current?");
  });
}

StepMachine::Actions StepMachine::OnRead(absl::FunctionRef<absl::Status()> handle) {
  switch (phase_) {
    case Phase::kHeader:
    case Phase::kReceiving:
    case Phase::kReplayPending:
    case Phase::kAwaitingRound: {
      absl::Status status = handle();
      if (!status.ok()) Fail(std::move(status));
      return Next(/*read=*/true);
    }
    case Phase::kEnded:
    case Phase::kFinishing:
    case Phase::kDone:
      break;  // a read that was under way when the stream's outcome came
  }
  return Next(/*read=*/false);
}

StepMachine::Actions StepMachine::ReadsEnded() {
  switch (phase_) {
    case Phase::kHeader:
    case Phase::kReceiving:
    case Phase::kReplayPending:
    case Phase::kAwaitingRound: {
      absl::StatusOr<StepReader::Event> event = reader_.HalfClose();
      Fail(event.ok() ? absl::InternalError("the Step stream ended early") : event.status());
      break;
    }
    case Phase::kEnded:
    case Phase::kFinishing:
    case Phase::kDone:
      break;
  }
  return Next(/*read=*/false);
}

StepMachine::Actions StepMachine::WriteDone(bool ok) {
  if (!writing_) return Next(/*read=*/false);
  writing_ = false;
  if (!writes_.empty()) writes_.pop_front();
  if (ok) {
    if (backend_ != nullptr) backend_->Sent(absl::ToDoubleSeconds(absl::Now() - write_start_));
  } else {
    writes_.clear();
    Fail(absl::CancelledError("the Step stream broke while the server was sending its answers"));
  }
  return Next(/*read=*/false);
}

StepMachine::Actions StepMachine::Cancelled() {
  Fail(absl::CancelledError(
      "the client cancelled the step or its connection broke; a step cancelled after its StepEnd "
      "may have been applied, and retrying it is safe: a retry is answered exactly once"));
  return Next(/*read=*/false);
}

StepMachine::Actions StepMachine::ShuttingDown() {
  Fail(absl::UnavailableError(
      "the server is shutting down; retry the step once it is back (or against another replica): "
      "a retry is answered exactly once, whether or not this attempt was applied"));
  return Next(/*read=*/false);
}

StepMachine::Actions StepMachine::Updates(std::vector<StepResponsePtr> responses) {
  // A resend awaiting its round gets the round's early answers too.
  if (phase_ == Phase::kReceiving || phase_ == Phase::kAwaitingRound || phase_ == Phase::kEnded) {
    Enqueue(std::move(responses));
  }
  return Next(/*read=*/false);
}

StepMachine::Actions StepMachine::Committed(std::vector<StepResponsePtr> responses,
                                            bool replayed) {
  awaiting_backend_ = false;
  backend_done_ = true;
  switch (phase_) {
    case Phase::kDone:
      break;
    case Phase::kFinishing:
      // Failed first (a cancel racing with the commit): the step is applied
      // all the same, and the stream keeps its error.
      if (!replayed) committed_ = true;
      break;
    default:
      committed_ = !replayed;
      replayed_ = replayed;
      phase_ = Phase::kFinishing;
      Enqueue(std::move(responses));
      break;
  }
  return Next(/*read=*/false);
}

StepMachine::Actions StepMachine::Failed(absl::Status status) {
  awaiting_backend_ = false;
  backend_done_ = true;
  Fail(std::move(status));
  return Next(/*read=*/false);
}

absl::Status StepMachine::OnMessage(const v1::StepRequest& request) {
  MUON_ASSIGN_OR_RETURN(StepReader::Event event, reader_.Read(request));
  return OnEvent(std::move(event));
}

absl::Status StepMachine::OnEvent(StepReader::Event event) {
  switch (event.kind) {
    case StepReader::Event::Kind::kNone:
      return absl::OkStatus();
    case StepReader::Event::Kind::kHeader:
      return OnHeader(*event.header);
    case StepReader::Event::Kind::kComplete:
      backend_->Gradient(event.index, reader_.Take(event.index));
      return absl::OkStatus();
    case StepReader::Event::Kind::kEnd:
      phase_ = Phase::kEnded;
      MUON_RETURN_IF_ERROR(
          backend_->End(std::move(event.indices), reader_.bytes_received(), event.grad_scale));
      awaiting_backend_ = true;
      return absl::OkStatus();
    case StepReader::Event::Kind::kReplay:
      if (phase_ == Phase::kReplayPending) backend_->Replay();
      phase_ = Phase::kEnded;
      awaiting_backend_ = true;
      return absl::OkStatus();
  }
  return absl::OkStatus();
}

absl::Status StepMachine::OnHeader(const v1::StepHeader& header) {
  MUON_ASSIGN_OR_RETURN(backend_, open_(header));
  absl::StatusOr<StepBackend::Admission> admission = backend_->Admit(header);
  if (!admission.ok()) {
    backend_.reset();  // it holds nothing
    return admission.status();
  }
  switch (admission->role) {
    case StepBackend::Role::kReceive:
      reader_.Receive(std::move(admission->session_id), std::move(admission->params),
                      admission->gradient_buffers);
      phase_ = Phase::kReceiving;
      break;
    case StepBackend::Role::kReplay:
      reader_.Replay();
      phase_ = Phase::kReplayPending;
      break;
    case StepBackend::Role::kWait:
      reader_.Replay();
      phase_ = Phase::kAwaitingRound;
      break;
  }
  return absl::OkStatus();
}

void StepMachine::Fail(absl::Status status) {
  if (phase_ == Phase::kFinishing || phase_ == Phase::kDone) return;
  status_ = std::move(status);
  phase_ = Phase::kFinishing;
  // A write under way completes; nothing queued after it goes out.
  while (writes_.size() > (writing_ ? 1u : 0u)) writes_.pop_back();
  if (backend_ != nullptr && !backend_done_) awaiting_backend_ = !backend_->Abort();
}

void StepMachine::Enqueue(std::vector<StepResponsePtr> responses) {
  for (StepResponsePtr& r : responses) writes_.push_back(std::move(r));
}

StepMachine::Actions StepMachine::Next(bool read) {
  Actions actions;
  if (phase_ == Phase::kDone) return actions;
  actions.read = read && (phase_ == Phase::kHeader || phase_ == Phase::kReceiving ||
                          phase_ == Phase::kReplayPending || phase_ == Phase::kAwaitingRound);
  if (!writing_ && !writes_.empty()) {
    writing_ = true;
    write_start_ = absl::Now();
    actions.write = writes_.front();
  }
  if (phase_ == Phase::kFinishing && !writing_ && writes_.empty() && !awaiting_backend_) {
    phase_ = Phase::kDone;
    actions.finish = status_;
  }
  return actions;
}

}  // namespace muon::server
