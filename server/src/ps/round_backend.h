#ifndef MUON_SERVER_SRC_PS_ROUND_BACKEND_H_
#define MUON_SERVER_SRC_PS_ROUND_BACKEND_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "ps/ps_round.h"
#include "session/session.h"
#include "step/step_backend.h"
#include "step/update_backend.h"

namespace muon::server {

// PARAMETER_SERVER mode: a worker's stream joins the round of its step and
// hands it each parameter's gradient as it completes (the round computes a
// parameter once every worker's is in) and its StepEnd; the round commits
// after the last worker's and every waiting stream gets its answer
// (RoundDone → Committed or Failed), the parameters the round answered
// before the commit (Answers → Updates) left out of it.
// Thread-safe as the machine needs it: the stream's calls are serialized;
// Answers and RoundDone come from another worker's thread, the round's
// driver, one after the other.
class RoundStepBackend final : public StepBackend, public RoundWaiter {
 public:
  RoundStepBackend(const StepBackendEnv& env, std::shared_ptr<Session> session,
                   StepEvents* events);

  absl::StatusOr<Admission> Admit(const v1::StepHeader& header) override;
  void Gradient(uint32_t index, std::unique_ptr<std::byte[]> bytes) override;
  absl::Status End(std::vector<uint32_t> indices, int64_t bytes_received,
                   std::optional<double> grad_scale) override;
  void Replay() override;
  bool Abort() override;
  void Sent(double) override {}

  void RoundDone(absl::StatusOr<std::shared_ptr<const StepRecord>> result) override;
  void Answers(std::vector<StepResponsePtr> responses) override;
  void Hold() override { events_->Pin(); }
  void Release() override { events_->Unpin(); }

 private:
  const StepBackendEnv env_;
  const std::shared_ptr<Session> session_;
  StepEvents* const events_;
  ParameterServerRounds* const rounds_;

  ReplyFormat format_;  // what this worker asked to get back
  // Registered with the round (kContribute, kWait): it holds a pin.
  bool joined_ = false;
  std::shared_ptr<const StepRecord> replay_;
  std::vector<bool> given_;  // by parameter index: its gradient was Added
  // By parameter index: its answer went out before the commit (Answers).
  std::vector<bool> answered_;
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_PS_ROUND_BACKEND_H_
