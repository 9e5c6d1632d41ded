#ifndef MUON_SERVER_SRC_CHECKPOINT_H_
#define MUON_SERVER_SRC_CHECKPOINT_H_

// Session checkpoint files: <dir>/<session id>.ckpt, one per session, in the
// versioned, checksummed format of proto/muon/storage/checkpoint.proto.
// Written to a temporary file, fsynced, renamed over the old one and the
// directory fsynced, so a crash at any point leaves the old file or the new
// one, never a mix.

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "muon/kernels/engine.h"
#include "muon/storage/checkpoint.pb.h"
#include "muon/v1/optimizer.pb.h"
#include "session/session.h"

namespace muon::server {

// A checkpoint file read into memory and verified.
struct LoadedCheckpoint {
  std::string path;
  std::string contents;  // the whole file; meta's blobs point into it
  storage::CheckpointMeta meta;
};

class CheckpointStore {
 public:
  // Creates `dir` (mode 0700) when missing and removes temporary files a
  // crash left behind. FailedPrecondition when it is not a writable
  // directory.
  static absl::StatusOr<std::unique_ptr<CheckpointStore>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }

  // Writes `session` as of `snapshot`, reading its parameters' state from
  // `engine`. REQUIRES: the engine state of the session's parameters is the
  // snapshot's step (the caller holds the session).
  absl::StatusOr<v1::SessionCheckpoint> Write(const Session& session,
                                              const Session::Snapshot& snapshot,
                                              const Engine& engine) const;

  // Removes a session's file; Ok when there is none.
  absl::Status Remove(absl::string_view session_id) const;

  // Paths of the checkpoint files in the directory, sorted.
  absl::StatusOr<std::vector<std::string>> List() const;

 private:
  explicit CheckpointStore(std::string dir) : dir_(std::move(dir)) {}
  std::string PathOf(absl::string_view session_id) const;

  const std::string dir_;
};

// Reads and verifies one file. DataLoss naming the path and what is wrong
// for a bad magic, version, checksum or metadata; NotFound when unreadable.
absl::StatusOr<LoadedCheckpoint> ReadCheckpoint(const std::string& path);

// Parameter `index`'s state (the engine's ImportState checks the sizes).
// DataLoss when a blob is out of range or not whole floats.
absl::StatusOr<ParamState> ParamStateFromCheckpoint(const LoadedCheckpoint& checkpoint,
                                                    int index);

// The per-worker step records, num_workers entries (null where none).
absl::StatusOr<std::vector<std::shared_ptr<const StepRecord>>> RecordsFromCheckpoint(
    const LoadedCheckpoint& checkpoint, uint32_t num_workers);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_CHECKPOINT_H_
