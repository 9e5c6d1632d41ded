#ifndef MUON_SERVER_SRC_STEP_STEP_OPTIONS_H_
#define MUON_SERVER_SRC_STEP_STEP_OPTIONS_H_

#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "muon/kernels/engine.h"
#include "muon/v1/optimizer.pb.h"

namespace muon::server {

// What one parameter's GradientInput carries for a step besides its
// gradient: the step's lr and hyper-parameters (unset: the registered ones).
struct ParamStepInput {
  std::optional<double> lr;
  std::optional<HyperParams> hyper_params;
};

// An UPDATES step header's per-step settings (lr, lr_scale, param_options)
// as one ParamStepInput per parameter of `specs` (the session's, by index).
// REQUIRES: CheckStepHeader accepted the header. InvalidArgument naming the
// field for a value out of range, a field fixed at registration, or an
// unknown or repeated parameter index.
absl::StatusOr<std::vector<ParamStepInput>> StepInputsFromHeader(
    const v1::StepHeader& header, absl::Span<const ParamSpec* const> specs);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STEP_STEP_OPTIONS_H_
