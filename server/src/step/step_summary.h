#ifndef MUON_SERVER_SRC_STEP_STEP_SUMMARY_H_
#define MUON_SERVER_SRC_STEP_STEP_SUMMARY_H_

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "muon/v1/optimizer.pb.h"
#include "observability/metrics.h"
#include "session/session.h"

namespace muon::server {

// What a committed step reports, in either mode.
struct SummaryInput {
  uint64_t step = 0;
  std::vector<uint32_t> param_indices;  // ascending
  StepTimings timings;
  // (parameter index, error) of each measured Muon parameter.
  std::vector<std::pair<uint32_t, double>> orthogonality;
  // The client asked for the errors (StepHeader.measure_orthogonality);
  // otherwise they were sampled by the server and stay out of the reply.
  bool reply_orthogonality = false;
  int64_t bytes_received = 0;
  int64_t bytes_sent = 0;
  int64_t ns_flops = 0;
};

// The step's StepSummary message. Reports the step's timings and errors to
// `metrics` (when not null): call once per committed step.
v1::StepResponse MakeSummary(SummaryInput input, const Session& session, StepReporter* metrics);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STEP_STEP_SUMMARY_H_
