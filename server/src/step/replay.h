#ifndef MUON_SERVER_SRC_STEP_REPLAY_H_
#define MUON_SERVER_SRC_STEP_REPLAY_H_

#include <vector>

#include "absl/status/statusor.h"
#include "session/session.h"
#include "step/step_backend.h"

namespace muon::server {

// The answer to a retry of a committed step, in either mode: its recorded
// responses, the summary marked `replayed`. On a strict server whose last
// write of the session failed, the session is written first (this may take
// long: call it off the reactor); Unavailable while it still cannot be.
absl::StatusOr<std::vector<StepResponsePtr>> ReplayResponses(SessionRegistry& sessions,
                                                             Session& session,
                                                             const StepRecord& record);

// Writes the session as of the step just committed in the engine when
// durability asks for it (`record` is `worker`'s record of it; `records`
// every worker's). Only a strict server fails the step on a failed write:
// the step stays applied in memory and its retry is answered once a write
// succeeds; otherwise the error is logged and the next checkpoint tries
// again. REQUIRES: the session's in-flight slot is held for the commit.
absl::Status WriteCheckpointIfDue(SessionRegistry& sessions, Session& session, uint64_t step,
                                  std::vector<std::shared_ptr<const StepRecord>> records);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STEP_REPLAY_H_
