#include "storage/checkpoint.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "muon/kernels/status_macros.h"

namespace muon::server {
namespace {

constexpr char kMagic[8] = {'M', 'U', 'O', 'N', 'C', 'K', 'P', 'T'};
constexpr char kEndMagic[8] = {'M', 'U', 'O', 'N', 'E', 'N', 'D', '1'};
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kPreambleBytes = 16;  // magic, version, 0
// meta offset, meta bytes, crc, 0, end magic.
constexpr size_t kFooterBytes = 8 + 8 + 4 + 4 + 8;
constexpr absl::string_view kSuffix = ".ckpt";
constexpr absl::string_view kTmpSuffix = ".ckpt.tmp";

std::string ErrnoText() { return std::strerror(errno); }

void SetTimestamp(absl::Time t, google::protobuf::Timestamp* ts) {
  const int64_t ns = absl::ToUnixNanos(t);
  ts->set_seconds(ns / 1000000000);
  ts->set_nanos(static_cast<int32_t>(ns % 1000000000));
}

// Appends to a file descriptor, keeping the offset and the running CRC-32.
class Appender {
 public:
  Appender(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}

  absl::Status Append(const void* data, size_t bytes) {
    const char* p = static_cast<const char*>(data);
    // zlib's crc32 takes 32-bit lengths; tensors can be larger.
    for (size_t done = 0; done < bytes;) {
      const size_t n = std::min<size_t>(bytes - done, 1u << 30);
      crc_ = crc32(crc_, reinterpret_cast<const Bytef*>(p + done), static_cast<uInt>(n));
      done += n;
    }
    while (bytes > 0) {
      const ssize_t n = ::write(fd_, p, bytes);
      if (n < 0) {
        if (errno == EINTR) continue;
        return absl::UnavailableError(absl::StrCat("writing ", path_, ": ", ErrnoText()));
      }
      p += n;
      bytes -= static_cast<size_t>(n);
      offset_ += static_cast<uint64_t>(n);
    }
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status AppendValue(T value) {
    return Append(&value, sizeof(value));
  }

  absl::StatusOr<storage::Blob> AppendBlob(const void* data, size_t bytes) {
    storage::Blob blob;
    blob.set_offset(offset_);
    blob.set_bytes(bytes);
    MUON_RETURN_IF_ERROR(Append(data, bytes));
    return blob;
  }

  uint64_t offset() const { return offset_; }
  uint32_t crc() const { return static_cast<uint32_t>(crc_); }

 private:
  const int fd_;
  const std::string path_;
  uint64_t offset_ = 0;
  uLong crc_ = crc32(0, nullptr, 0);
};

absl::Status WriteBlobIfAny(Appender& out, const std::vector<float>& values, storage::Blob* blob) {
  if (values.empty()) return absl::OkStatus();
  MUON_ASSIGN_OR_RETURN(*blob, out.AppendBlob(values.data(), values.size() * sizeof(float)));
  return absl::OkStatus();
}

absl::Status FsyncPath(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("opening ", path, ": ", ErrnoText()));
  const int rc = ::fsync(fd);
  const std::string error = ErrnoText();
  ::close(fd);
  if (rc != 0) return absl::UnavailableError(absl::StrCat("fsync of ", path, ": ", error));
  return absl::OkStatus();
}

bool IsSessionId(absl::string_view id) {
  if (id.empty() || id.size() > 64) return false;
  return std::all_of(id.begin(), id.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

absl::Status Corrupt(const std::string& path, absl::string_view what) {
  return absl::DataLossError(absl::StrCat("checkpoint ", path, ": ", what));
}

template <typename T>
T LoadValue(const std::string& data, size_t offset) {
  T value;
  std::memcpy(&value, data.data() + offset, sizeof(value));
  return value;
}

// The blob's bytes; an unset blob is empty.
absl::StatusOr<absl::string_view> BlobBytes(const LoadedCheckpoint& c, const storage::Blob& blob) {
  if (blob.bytes() == 0) return absl::string_view();
  const uint64_t data_end = c.contents.size();
  if (blob.offset() < kPreambleBytes || blob.offset() > data_end ||
      blob.bytes() > data_end - blob.offset()) {
    return Corrupt(c.path, absl::StrCat("a blob [", blob.offset(), ", +", blob.bytes(),
                                        ") lies outside the data section"));
  }
  return absl::string_view(c.contents).substr(blob.offset(), blob.bytes());
}

absl::StatusOr<std::vector<float>> FloatsOf(const LoadedCheckpoint& c, const storage::Blob& blob) {
  MUON_ASSIGN_OR_RETURN(absl::string_view bytes, BlobBytes(c, blob));
  if (bytes.size() % sizeof(float) != 0) {
    return Corrupt(c.path, absl::StrCat("a tensor blob of ", bytes.size(),
                                        " bytes is not a whole number of floats"));
  }
  std::vector<float> values(bytes.size() / sizeof(float));
  std::memcpy(values.data(), bytes.data(), bytes.size());
  return values;
}

}  // namespace

absl::StatusOr<std::unique_ptr<CheckpointStore>> CheckpointStore::Open(const std::string& dir) {
  if (dir.empty()) return absl::InvalidArgumentError("--checkpoint_dir is empty");
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create --checkpoint_dir=", dir, ": ", ErrnoText()));
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat("--checkpoint_dir=", dir, " is not a directory"));
  }
  if (::access(dir.c_str(), W_OK | X_OK) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--checkpoint_dir=", dir, " is not writable by this process: ", ErrnoText()));
  }
  auto store = std::unique_ptr<CheckpointStore>(new CheckpointStore(dir));
  // A write a crash interrupted: the renamed-over file it was replacing is
  // still there and complete.
  if (DIR* d = ::opendir(dir.c_str())) {
    std::vector<std::string> stale;
    while (dirent* e = ::readdir(d)) {
      if (absl::EndsWith(e->d_name, kTmpSuffix)) stale.push_back(absl::StrCat(dir, "/", e->d_name));
    }
    ::closedir(d);
    for (const std::string& path : stale) ::unlink(path.c_str());
  }
  return store;
}

std::string CheckpointStore::PathOf(absl::string_view session_id) const {
  return absl::StrCat(dir_, "/", session_id, kSuffix);
}

absl::StatusOr<v1::SessionCheckpoint> CheckpointStore::Write(const Session& session,
                                                             const Session::Snapshot& snapshot,
                                                             const Engine& engine) const {
  const std::string path = PathOf(session.id());
  const std::string tmp = absl::StrCat(path, ".tmp");
  // 0600: the file holds the session's token.
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("creating ", tmp, ": ", ErrnoText()));
  Appender out(fd, tmp);
  auto write_all = [&]() -> absl::Status {
    MUON_RETURN_IF_ERROR(out.Append(kMagic, sizeof(kMagic)));
    MUON_RETURN_IF_ERROR(out.AppendValue<uint32_t>(kFormatVersion));
    MUON_RETURN_IF_ERROR(out.AppendValue<uint32_t>(0));
    storage::CheckpointMeta meta;
    meta.set_session_id(session.id());
    meta.set_token(session.token());
    *meta.mutable_config() = session.config();
    meta.set_step(snapshot.step);
    SetTimestamp(session.create_time(), meta.mutable_create_time());
    if (snapshot.last_step_time != absl::InfinitePast()) {
      SetTimestamp(snapshot.last_step_time, meta.mutable_last_step_time());
    }
    SetTimestamp(absl::Now(), meta.mutable_write_time());
    for (const SessionParam& p : session.params()) {
      MUON_ASSIGN_OR_RETURN(ParamState state, engine.ExportState(p.engine_id));
      storage::ParamStateBlobs* blobs = meta.add_params();
      blobs->set_step(state.step);
      MUON_RETURN_IF_ERROR(WriteBlobIfAny(out, state.momentum, blobs->mutable_momentum()));
      MUON_RETURN_IF_ERROR(WriteBlobIfAny(out, state.exp_avg, blobs->mutable_exp_avg()));
      MUON_RETURN_IF_ERROR(WriteBlobIfAny(out, state.exp_avg_sq, blobs->mutable_exp_avg_sq()));
      MUON_RETURN_IF_ERROR(WriteBlobIfAny(out, state.weights, blobs->mutable_weights()));
    }
    std::string bytes;
    for (size_t w = 0; w < snapshot.records.size(); ++w) {
      const std::shared_ptr<const StepRecord>& record = snapshot.records[w];
      if (record == nullptr) continue;
      storage::WorkerRecord* r = meta.add_records();
      r->set_worker(static_cast<uint32_t>(w));
      r->set_step(record->step);
      for (const auto& response : record->responses) {
        bytes.clear();
        response->SerializeToString(&bytes);
        MUON_ASSIGN_OR_RETURN(*r->add_responses(), out.AppendBlob(bytes.data(), bytes.size()));
      }
    }
    const uint64_t meta_offset = out.offset();
    bytes.clear();
    if (!meta.SerializeToString(&bytes)) {
      return absl::InternalError(absl::StrCat("cannot serialize the metadata of ", path));
    }
    MUON_RETURN_IF_ERROR(out.Append(bytes.data(), bytes.size()));
    MUON_RETURN_IF_ERROR(out.AppendValue<uint64_t>(meta_offset));
    MUON_RETURN_IF_ERROR(out.AppendValue<uint64_t>(bytes.size()));
    MUON_RETURN_IF_ERROR(out.AppendValue<uint32_t>(out.crc()));
    MUON_RETURN_IF_ERROR(out.AppendValue<uint32_t>(0));
    MUON_RETURN_IF_ERROR(out.Append(kEndMagic, sizeof(kEndMagic)));
    if (::fsync(fd) != 0) return absl::UnavailableError(absl::StrCat("fsync of ", tmp, ": ", ErrnoText()));
    return absl::OkStatus();
  };
  absl::Status status = write_all();
  if (::close(fd) != 0 && status.ok()) {
    status = absl::UnavailableError(absl::StrCat("closing ", tmp, ": ", ErrnoText()));
  }
  if (status.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    status = absl::UnavailableError(absl::StrCat("renaming ", tmp, " to ", path, ": ", ErrnoText()));
  }
  if (!status.ok()) {
    ::unlink(tmp.c_str());
    return status;
  }
  // The rename is durable only once the directory entry is.
  MUON_RETURN_IF_ERROR(FsyncPath(dir_, O_RDONLY | O_DIRECTORY));
  v1::SessionCheckpoint result;
  result.set_session_id(session.id());
  result.set_step(snapshot.step);
  result.set_path(path);
  result.set_bytes(static_cast<int64_t>(out.offset()));
  return result;
}

absl::Status CheckpointStore::Remove(absl::string_view session_id) const {
  const std::string path = PathOf(session_id);
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
    return absl::UnavailableError(absl::StrCat("removing ", path, ": ", ErrnoText()));
  }
  return FsyncPath(dir_, O_RDONLY | O_DIRECTORY);
}

absl::StatusOr<std::vector<std::string>> CheckpointStore::List() const {
  DIR* d = ::opendir(dir_.c_str());
  if (d == nullptr) {
    return absl::UnavailableError(absl::StrCat("listing ", dir_, ": ", ErrnoText()));
  }
  std::vector<std::string> paths;
  while (dirent* e = ::readdir(d)) {
    if (absl::EndsWith(e->d_name, kSuffix)) paths.push_back(absl::StrCat(dir_, "/", e->d_name));
  }
  ::closedir(d);
  std::sort(paths.begin(), paths.end());
  return paths;
}

absl::StatusOr<LoadedCheckpoint> ReadCheckpoint(const std::string& path) {
  LoadedCheckpoint c;
  c.path = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("opening ", path, ": ", ErrnoText()));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::UnavailableError(absl::StrCat("stat of ", path, ": ", ErrnoText()));
  }
  c.contents.resize(static_cast<size_t>(st.st_size));
  size_t done = 0;
  while (done < c.contents.size()) {
    const ssize_t n = ::read(fd, c.contents.data() + done, c.contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  if (done != c.contents.size()) {
    return absl::UnavailableError(absl::StrCat("reading ", path, ": short read"));
  }
  const std::string& data = c.contents;
  if (data.size() < kPreambleBytes + kFooterBytes) {
    return Corrupt(path, absl::StrCat("only ", data.size(), " bytes (truncated?)"));
  }
  if (std::memcmp(data.data(), kMagic, sizeof(kMagic)) != 0) {
    return Corrupt(path, "not a muon-server checkpoint (bad magic)");
  }
  const uint32_t version = LoadValue<uint32_t>(data, 8);
  if (version != kFormatVersion) {
    return Corrupt(path, absl::StrCat("format version ", version, "; this server reads version ",
                                      kFormatVersion));
  }
  const size_t footer = data.size() - kFooterBytes;
  if (std::memcmp(data.data() + data.size() - sizeof(kEndMagic), kEndMagic, sizeof(kEndMagic)) !=
      0) {
    return Corrupt(path, "no end marker (truncated by a crash mid-write?)");
  }
  const uint32_t stored_crc = LoadValue<uint32_t>(data, footer + 16);
  uLong crc = crc32(0, nullptr, 0);
  for (size_t pos = 0, end = footer + 16; pos < end;) {
    const size_t n = std::min<size_t>(end - pos, 1u << 30);
    crc = crc32(crc, reinterpret_cast<const Bytef*>(data.data() + pos), static_cast<uInt>(n));
    pos += n;
  }
  if (static_cast<uint32_t>(crc) != stored_crc) {
    return Corrupt(path, "checksum mismatch (the file was changed or damaged)");
  }
  const uint64_t meta_offset = LoadValue<uint64_t>(data, footer);
  const uint64_t meta_bytes = LoadValue<uint64_t>(data, footer + 8);
  if (meta_offset < kPreambleBytes || meta_offset > footer || meta_bytes != footer - meta_offset) {
    return Corrupt(path, "the metadata section is out of place");
  }
  if (!c.meta.ParseFromArray(data.data() + meta_offset, static_cast<int>(meta_bytes))) {
    return Corrupt(path, "the metadata does not parse");
  }
  if (!IsSessionId(c.meta.session_id())) return Corrupt(path, "bad session id in the metadata");
  if (c.meta.token().empty()) return Corrupt(path, "no token in the metadata");
  if (c.meta.params_size() != c.meta.config().params_size()) {
    return Corrupt(path, absl::StrCat("state for ", c.meta.params_size(), " parameters but ",
                                      c.meta.config().params_size(), " configured"));
  }
  // Blobs lie before the metadata; BlobBytes checks against this end.
  c.contents.resize(meta_offset);
  return c;
}

absl::StatusOr<ParamState> ParamStateFromCheckpoint(const LoadedCheckpoint& checkpoint,
                                                    int index) {
  const storage::ParamStateBlobs& blobs = checkpoint.meta.params(index);
  ParamState state;
  state.step = blobs.step();
  MUON_ASSIGN_OR_RETURN(state.momentum, FloatsOf(checkpoint, blobs.momentum()));
  MUON_ASSIGN_OR_RETURN(state.exp_avg, FloatsOf(checkpoint, blobs.exp_avg()));
  MUON_ASSIGN_OR_RETURN(state.exp_avg_sq, FloatsOf(checkpoint, blobs.exp_avg_sq()));
  MUON_ASSIGN_OR_RETURN(state.weights, FloatsOf(checkpoint, blobs.weights()));
  return state;
}

absl::StatusOr<std::vector<std::shared_ptr<const StepRecord>>> RecordsFromCheckpoint(
    const LoadedCheckpoint& checkpoint, uint32_t num_workers) {
  std::vector<std::shared_ptr<const StepRecord>> records(num_workers);
  for (const storage::WorkerRecord& r : checkpoint.meta.records()) {
    if (r.worker() >= num_workers || records[r.worker()] != nullptr) {
      return Corrupt(checkpoint.path, absl::StrCat("a step record for worker ", r.worker()));
    }
    auto record = std::make_shared<StepRecord>();
    record->step = r.step();
    for (const storage::Blob& blob : r.responses()) {
      MUON_ASSIGN_OR_RETURN(absl::string_view bytes, BlobBytes(checkpoint, blob));
      auto response = std::make_shared<v1::StepResponse>();
      if (!response->ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
        return Corrupt(checkpoint.path, "a recorded step response does not parse");
      }
      record->responses.push_back(std::move(response));
    }
    if (record->responses.empty() || !record->responses.back()->has_summary()) {
      return Corrupt(checkpoint.path, "a step record without its summary");
    }
    records[r.worker()] = std::move(record);
  }
  return records;
}

}  // namespace muon::server
