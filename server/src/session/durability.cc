#include "session/durability.h"

#include <iostream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "muon/kernels/sharded_engine.h"
#include "muon/kernels/status_macros.h"

namespace muon::server {

Durability::Durability(DurabilityOptions options, const Engine* engine)
    : options_(options), engine_(engine) {}

bool Durability::DueAtCommit(uint64_t step) const {
  if (!enabled()) return false;
  if (options_.strict) return true;
  return options_.every_steps > 0 && step % options_.every_steps == 0;
}

absl::StatusOr<v1::SessionCheckpoint> Durability::Write(Session& session,
                                                        const Session::Snapshot& snapshot) const {
  MUON_ASSIGN_OR_RETURN(SessionImage image, ImageOf(session, snapshot, *engine_));
  return options_.store->Write(image);
}

absl::Status Durability::AtCommit(Session& session, const Session::Snapshot& committed) const {
  if (!DueAtCommit(committed.step)) return absl::OkStatus();
  absl::StatusOr<v1::SessionCheckpoint> written = Write(session, committed);
  session.set_durable(written.ok());
  if (written.ok()) return absl::OkStatus();
  std::cerr << "muon-server: checkpoint of session " << session.id() << " at step "
            << committed.step << " failed: " << written.status() << std::endl;
  if (!options_.strict) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "step ", committed.step, " of session ", session.id(),
      " was applied but could not be written to disk (", written.status().message(),
      "), and this server acknowledges only durable steps (--durability=strict); retry the "
      "same step: it is answered once the checkpoint directory is writable again"));
}

bool Durability::ReplayNeedsWrite(const Session& session) const {
  return strict() && !session.durable();
}

absl::Status Durability::WriteBeforeReplay(Session& session, uint64_t step) const {
  absl::StatusOr<v1::SessionCheckpoint> written = Checkpoint(session, absl::ZeroDuration());
  if (written.ok()) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "step ", step, " of session ", session.id(), " is applied but still not on disk (",
      written.status().message(), "); retry it once the checkpoint directory is writable"));
}

absl::Status Durability::AfterUpload(Session& session) const {
  if (!enabled()) return absl::OkStatus();
  absl::StatusOr<v1::SessionCheckpoint> written = Write(session, session.TakeSnapshot());
  session.set_durable(written.ok());
  return written.status();
}

absl::StatusOr<v1::SessionCheckpoint> Durability::Checkpoint(Session& session,
                                                             absl::Duration wait) const {
  if (!enabled()) {
    return absl::FailedPreconditionError(
        "this server has no checkpoint directory; start it with --checkpoint_dir=DIR");
  }
  MUON_ASSIGN_OR_RETURN(Lease lease, session.AwaitLease(wait));
  return CheckpointHeld(session);
}

absl::StatusOr<v1::SessionCheckpoint> Durability::CheckpointHeld(Session& session) const {
  if (!enabled()) {
    return absl::FailedPreconditionError(
        "this server has no checkpoint directory; start it with --checkpoint_dir=DIR");
  }
  absl::StatusOr<v1::SessionCheckpoint> written = Write(session, session.TakeSnapshot());
  // A failed extra write leaves the committed step as durable as it was.
  if (written.ok()) session.set_durable(true);
  return written;
}

absl::Status Durability::Forget(absl::string_view session_id) const {
  if (!enabled()) return absl::OkStatus();
  return options_.store->Remove(session_id);
}

absl::StatusOr<SessionImage> ImageOf(const Session& session, const Session::Snapshot& snapshot,
                                     const Engine& engine) {
  SessionImage image;
  image.session_id = session.id();
  image.token = session.token();
  image.config = session.config();
  image.create_time = session.create_time();
  image.step = snapshot.step;
  image.last_step_time = snapshot.last_step_time;
  image.records = snapshot.records;
  image.params.reserve(session.params().size());
  for (const SessionParam& p : session.params()) {
    MUON_ASSIGN_OR_RETURN(ParamState state, engine.ExportState(p.engine_id));
    image.params.push_back(std::move(state));
    // Only an engine of several devices places parameters.
    if (absl::StatusOr<int> device = ShardOf(engine, p.engine_id); device.ok()) {
      image.devices.push_back(*device);
    }
  }
  if (!image.devices.empty() && image.devices.size() != image.params.size()) {
    return absl::InternalError("the engine placed only some of the session's parameters");
  }
  return image;
}

}  // namespace muon::server
