#ifndef MUON_SERVER_SRC_STORAGE_CHECKPOINT_FORMAT_H_
#define MUON_SERVER_SRC_STORAGE_CHECKPOINT_FORMAT_H_

// The bytes of a checkpoint file: a SessionImage in the versioned,
// checksummed layout of proto/muon/storage/checkpoint.proto. No file access
// here (checkpoint_store.h does that), so the format is tested on strings.

#include <cstddef>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "storage/session_image.h"

namespace muon::server {

// Where an encoded image goes, in order. Append's errors end the encoding.
class ByteSink {
 public:
  virtual ~ByteSink() = default;
  virtual absl::Status Append(const void* data, size_t bytes) = 0;
};

// A sink into a string.
class StringSink final : public ByteSink {
 public:
  absl::Status Append(const void* data, size_t bytes) override {
    out_.append(static_cast<const char*>(data), bytes);
    return absl::OkStatus();
  }
  std::string& contents() { return out_; }

 private:
  std::string out_;
};

// Writes `image` (stamped `write_time`) to `sink`; returns the bytes written.
// The sink's error, or Internal when the metadata cannot be serialized.
absl::StatusOr<uint64_t> EncodeImage(const SessionImage& image, absl::Time write_time,
                                     ByteSink& sink);

// Verifies and decodes a whole file's bytes; `name` (its path) is named in
// the errors. DataLoss for a foreign file (bad magic), another format
// version, a truncated file, a checksum mismatch, or metadata that does not
// parse or does not fit together. The records have config.num_workers
// entries (at least one).
absl::StatusOr<SessionImage> DecodeImage(std::string contents, absl::string_view name);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STORAGE_CHECKPOINT_FORMAT_H_
