#include "step/replay.h"

#include <memory>

#include "muon/kernels/status_macros.h"

namespace muon::server {

absl::StatusOr<std::vector<StepResponsePtr>> ReplayResponses(const Durability& durability,
                                                             Session& session,
                                                             const StepRecord& record) {
  if (durability.ReplayNeedsWrite(session)) {
    MUON_RETURN_IF_ERROR(durability.WriteBeforeReplay(session, record.step));
  }
  std::vector<StepResponsePtr> responses(record.responses.begin(), record.responses.end() - 1);
  auto summary = std::make_shared<StepReply>(*record.responses.back());
  summary->message.mutable_summary()->set_replayed(true);
  responses.push_back(std::move(summary));
  return responses;
}

void ScheduleReplay(StepEvents* events, const Durability& durability, Session& session,
                    std::shared_ptr<const StepRecord> record) {
  events->Schedule([events, &durability, &session, record = std::move(record)] {
    absl::StatusOr<std::vector<StepResponsePtr>> responses =
        ReplayResponses(durability, session, *record);
    if (responses.ok()) {
      events->Committed(std::move(*responses), /*replayed=*/true);
    } else {
      events->Failed(responses.status());
    }
  });
}

}  // namespace muon::server
