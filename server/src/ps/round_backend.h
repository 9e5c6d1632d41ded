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
// (RoundDone → Committed or Failed).
// Thread-safe as the machine needs it: the stream's calls are serialized;
// RoundDone comes from another worker's thread.
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
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_PS_ROUND_BACKEND_H_
