#ifndef MUON_SERVER_SRC_UTIL_BUFFER_SHELF_H_
#define MUON_SERVER_SRC_UTIL_BUFFER_SHELF_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace muon::server {

// Keeps one byte buffer per slot (a session's parameter) from one step to
// the next, so that a step's gradients and updates land in pages that are
// already mapped: a fresh buffer of a tensor's size comes from mmap, and the
// kernel zero-fills each of its pages on first touch, which was about a
// quarter of the server's time on the wire benchmark (docs/performance.md).
// A buffer taken and never given back is simply freed by its owner.
// Thread-safe.
class BufferShelf {
 public:
  // A buffer of `bytes` for `slot`: the one kept there when it has that
  // size, else a new one. Its contents are unspecified.
  std::unique_ptr<std::byte[]> Take(uint32_t slot, int64_t bytes);
  // Keeps `buffer`, `bytes` long, for the next Take of `slot`, freeing any
  // buffer kept there before.
  void Give(uint32_t slot, int64_t bytes, std::unique_ptr<std::byte[]> buffer);
  // Bytes kept now.
  int64_t kept_bytes() const;

 private:
  struct Kept {
    int64_t bytes = 0;
    std::unique_ptr<std::byte[]> buffer;
  };
  mutable absl::Mutex mu_;
  std::vector<Kept> kept_ ABSL_GUARDED_BY(mu_);
  int64_t kept_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_UTIL_BUFFER_SHELF_H_
