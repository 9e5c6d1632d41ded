#include "storage/checkpoint_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "muon/kernels/status_macros.h"
#include "storage/checkpoint_format.h"

namespace muon::server {
namespace {

constexpr absl::string_view kSuffix = ".ckpt";
constexpr absl::string_view kTmpSuffix = ".ckpt.tmp";

std::string ErrnoText() { return std::strerror(errno); }

// Appends to a file descriptor.
class FileSink final : public ByteSink {
 public:
  FileSink(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}

  absl::Status Append(const void* data, size_t bytes) override {
    const char* p = static_cast<const char*>(data);
    while (bytes > 0) {
      const ssize_t n = ::write(fd_, p, bytes);
      if (n < 0) {
        if (errno == EINTR) continue;
        return absl::UnavailableError(absl::StrCat("writing ", path_, ": ", ErrnoText()));
      }
      p += n;
      bytes -= static_cast<size_t>(n);
    }
    return absl::OkStatus();
  }

 private:
  const int fd_;
  const std::string path_;
};

absl::Status FsyncPath(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags | O_CLOEXEC);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("opening ", path, ": ", ErrnoText()));
  const int rc = ::fsync(fd);
  const std::string error = ErrnoText();
  ::close(fd);
  if (rc != 0) return absl::UnavailableError(absl::StrCat("fsync of ", path, ": ", error));
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadWhole(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("opening ", path, ": ", ErrnoText()));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const std::string error = ErrnoText();
    ::close(fd);
    return absl::UnavailableError(absl::StrCat("stat of ", path, ": ", error));
  }
  std::string contents(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < contents.size()) {
    const ssize_t n = ::read(fd, contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  if (done != contents.size()) {
    return absl::UnavailableError(absl::StrCat("reading ", path, ": short read"));
  }
  return contents;
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

absl::StatusOr<v1::SessionCheckpoint> CheckpointStore::Write(const SessionImage& image) const {
  const std::string path = PathOf(image.session_id);
  const std::string tmp = absl::StrCat(path, ".tmp");
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("creating ", tmp, ": ", ErrnoText()));
  FileSink sink(fd, tmp);
  absl::StatusOr<uint64_t> bytes = EncodeImage(image, absl::Now(), sink);
  absl::Status status = bytes.status();
  if (status.ok() && ::fsync(fd) != 0) {
    status = absl::UnavailableError(absl::StrCat("fsync of ", tmp, ": ", ErrnoText()));
  }
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
  result.set_session_id(image.session_id);
  result.set_step(image.step);
  result.set_path(path);
  result.set_bytes(static_cast<int64_t>(*bytes));
  return result;
}

absl::StatusOr<SessionImage> CheckpointStore::Read(const std::string& path) const {
  MUON_ASSIGN_OR_RETURN(std::string contents, ReadWhole(path));
  return DecodeImage(std::move(contents), path);
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

}  // namespace muon::server
