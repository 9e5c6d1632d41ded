#ifndef MUON_SERVER_SRC_STORAGE_CHECKPOINT_STORE_H_
#define MUON_SERVER_SRC_STORAGE_CHECKPOINT_STORE_H_

// Session checkpoint files: <dir>/<session id>.ckpt, one per session, in the
// format of checkpoint_format.h. Written to a temporary file, fsynced,
// renamed over the old one and the directory fsynced, so a crash at any
// point leaves the old file or the new one, never a mix.

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "muon/v1/optimizer.pb.h"
#include "storage/session_image.h"

namespace muon::server {

// Thread-compatible per session: writes of one session must not overlap
// (its lease keeps them apart); writes of different sessions may.
class CheckpointStore {
 public:
  // Creates `dir` (mode 0700) when missing and removes temporary files a
  // crash left behind. FailedPrecondition when it is not a writable
  // directory.
  static absl::StatusOr<std::unique_ptr<CheckpointStore>> Open(const std::string& dir);

  const std::string& dir() const { return dir_; }

  // Writes `image` as its session's file (mode 0600: it holds the token).
  // Unavailable naming the path and the system's error when any step fails;
  // the old file then stays.
  absl::StatusOr<v1::SessionCheckpoint> Write(const SessionImage& image) const;

  // Reads and verifies one file. NotFound when it cannot be opened;
  // DataLoss as DecodeImage.
  absl::StatusOr<SessionImage> Read(const std::string& path) const;

  // Removes a session's file; Ok when there is none.
  absl::Status Remove(absl::string_view session_id) const;

  // Paths of the checkpoint files in the directory, sorted.
  absl::StatusOr<std::vector<std::string>> List() const;

 private:
  explicit CheckpointStore(std::string dir) : dir_(std::move(dir)) {}
  std::string PathOf(absl::string_view session_id) const;

  const std::string dir_;
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STORAGE_CHECKPOINT_STORE_H_
