#include "step/replay.h"

#include <iostream>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace muon::server {

absl::StatusOr<std::vector<StepResponsePtr>> ReplayResponses(SessionRegistry& sessions,
                                                             Session& session,
                                                             const StepRecord& record) {
  if (sessions.strict() && !session.durable()) {
    absl::StatusOr<v1::SessionCheckpoint> written =
        sessions.Checkpoint(session, absl::ZeroDuration());
    if (!written.ok()) {
      return absl::UnavailableError(absl::StrCat(
          "step ", record.step, " of session ", session.id(),
          " is applied but still not on disk (", written.status().message(),
          "); retry it once the checkpoint directory is writable"));
    }
  }
  std::vector<StepResponsePtr> responses(record.responses.begin(), record.responses.end() - 1);
  auto summary = std::make_shared<v1::StepResponse>(*record.responses.back());
  summary->mutable_summary()->set_replayed(true);
  responses.push_back(std::move(summary));
  return responses;
}

absl::Status WriteCheckpointIfDue(SessionRegistry& sessions, Session& session, uint64_t step,
                                  std::vector<std::shared_ptr<const StepRecord>> records) {
  if (!sessions.CheckpointsAtCommit(step)) return absl::OkStatus();
  Session::Snapshot snapshot = session.TakeSnapshot();
  snapshot.step = step;
  snapshot.last_step_time = absl::Now();
  snapshot.records = std::move(records);
  absl::Status status = sessions.CheckpointCommit(session, snapshot);
  if (status.ok()) return status;
  std::cerr << "muon-server: checkpoint of session " << session.id() << " at step " << step
            << " failed: " << status << std::endl;
  if (!sessions.strict()) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "step ", step, " of session ", session.id(), " was applied but could not be written to disk (",
      status.message(),
      "), and this server acknowledges only durable steps (--durability=strict); retry the same "
      "step: it is answered once the checkpoint directory is writable again"));
}

}  // namespace muon::server
