#include "step/step_header.h"

#include "absl/strings/str_cat.h"
#include "muon/kernels/status_macros.h"
#include "wire/convert.h"

namespace muon::server {

absl::Status CheckStepHeader(const v1::StepHeader& header, const Session& session) {
  if (header.worker_id() >= session.num_workers()) {
    return absl::InvalidArgumentError(
        absl::StrCat("worker_id ", header.worker_id(), " is out of range: session ", session.id(),
                     " has ", session.num_workers(), " worker(s)"));
  }
  MUON_RETURN_IF_ERROR(ValidateStepHeader(header));
  if (header.update_content() == v1::UPDATE_CONTENT_WEIGHTS &&
      session.mode() != v1::SESSION_MODE_PARAMETER_SERVER) {
    return absl::InvalidArgumentError(absl::StrCat(
        "StepHeader.update_content is WEIGHTS but session ", session.id(),
        " is in UPDATES mode, where the server holds no weights; leave it unset"));
  }
  if (header.defer_compute() && session.mode() == v1::SESSION_MODE_PARAMETER_SERVER) {
    return absl::InvalidArgumentError(
        "StepHeader.defer_compute is for UPDATES sessions; a parameter-server step takes no "
        "StepEnd.grad_scale: clip the gradients before sending them");
  }
  if (header.param_options_size() > 0 && session.mode() == v1::SESSION_MODE_PARAMETER_SERVER) {
    return absl::InvalidArgumentError(
        "StepHeader.param_options is for UPDATES sessions; a parameter-server step takes the "
        "session's hyper-parameters, with lr and lr_scale");
  }
  return absl::OkStatus();
}

std::optional<double> StepLr(std::optional<double> lr, std::optional<double> lr_scale,
                             double registered_lr) {
  if (!lr.has_value() && !lr_scale.has_value()) return std::nullopt;
  return lr.value_or(registered_lr) * lr_scale.value_or(1.0);
}

bool MeasuresOrthogonality(bool asked, uint64_t step, int sample_every) {
  return asked || (sample_every > 0 && step % static_cast<uint64_t>(sample_every) == 0);
}

}  // namespace muon::server
