#include "step/step_summary.h"

#include <algorithm>

namespace muon::server {

v1::StepResponse MakeSummary(SummaryInput input, const Session& session, StepReporter* metrics) {
  v1::StepResponse response;
  v1::StepSummary* summary = response.mutable_summary();
  summary->set_step(input.step);
  for (uint32_t i : input.param_indices) summary->add_param_indices(i);
  v1::StepTimings* t = summary->mutable_timings();
  t->set_receive_seconds(input.timings.receive);
  t->set_queue_seconds(input.timings.queue);
  t->set_compute_seconds(input.timings.compute);
  t->set_send_seconds(input.timings.send);
  t->set_total_seconds(input.timings.total);
  if (metrics != nullptr) {
    metrics->StepCommitted(input.timings, static_cast<int64_t>(input.param_indices.size()));
  }
  std::sort(input.orthogonality.begin(), input.orthogonality.end());
  for (const auto& [index, error] : input.orthogonality) {
    if (metrics != nullptr) {
      metrics->OrthogonalityError(session.params()[index].spec.hp.ns_schedule, error);
    }
    if (!input.reply_orthogonality) continue;
    v1::OrthogonalityError* e = summary->add_orthogonality_errors();
    e->set_param_index(index);
    e->set_error(error);
  }
  summary->set_bytes_received(static_cast<uint64_t>(input.bytes_received));
  summary->set_bytes_sent(static_cast<uint64_t>(input.bytes_sent));
  summary->set_ns_flops(input.ns_flops);
  return response;
}

}  // namespace muon::server
