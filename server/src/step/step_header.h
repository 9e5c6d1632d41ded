#ifndef MUON_SERVER_SRC_STEP_STEP_HEADER_H_
#define MUON_SERVER_SRC_STEP_STEP_HEADER_H_

#include <optional>

#include "absl/status/status.h"
#include "muon/v1/optimizer.pb.h"
#include "session/session.h"

namespace muon::server {

// What both step modes check in a StepHeader, against its session: the
// worker is one of the session's, lr and lr_scale are finite and >= 0,
// update_dtype is a dtype, WEIGHTS is asked only of a PARAMETER_SERVER
// session, param_options only of an UPDATES one. InvalidArgument naming the
// field.
absl::Status CheckStepHeader(const v1::StepHeader& header, const Session& session);

// The learning rate a step gives the engine for a parameter registered with
// `registered_lr`: `lr` when set, scaled by `lr_scale` when set; unset (the
// engine's own) when neither is.
std::optional<double> StepLr(std::optional<double> lr, std::optional<double> lr_scale,
                             double registered_lr);

// Whether a step measures orthogonality: the client asked, or the server
// samples this step (every `sample_every`th of a session; 0: never). Step
// numbers are per session and consecutive, so this needs no state.
bool MeasuresOrthogonality(bool asked, uint64_t step, int sample_every);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STEP_STEP_HEADER_H_
