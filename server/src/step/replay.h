#ifndef MUON_SERVER_SRC_STEP_REPLAY_H_
#define MUON_SERVER_SRC_STEP_REPLAY_H_

#include <vector>

#include "absl/status/statusor.h"
#include "session/durability.h"
#include "session/session.h"
#include "step/step_backend.h"

namespace muon::server {

// The answer to a retry of a committed step, in either mode: its recorded
// responses, the summary marked `replayed`. When durability asks for the
// step to be written first (a strict server whose last write failed), it is
// written now (this may take long: call it off the reactor); Unavailable
// while it still cannot be.
absl::StatusOr<std::vector<StepResponsePtr>> ReplayResponses(const Durability& durability,
                                                             Session& session,
                                                             const StepRecord& record);

// Answers a retry on `events`' pool with ReplayResponses: Committed
// (replayed) or Failed. What both backends' Replay does.
void ScheduleReplay(StepEvents* events, const Durability& durability, Session& session,
                    std::shared_ptr<const StepRecord> record);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STEP_REPLAY_H_
