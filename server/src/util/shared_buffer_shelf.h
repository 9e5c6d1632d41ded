#ifndef MUON_SERVER_SRC_UTIL_SHARED_BUFFER_SHELF_H_
#define MUON_SERVER_SRC_UTIL_SHARED_BUFFER_SHELF_H_

#include <cstdint>
#include <memory>

#include "util/buffer_shelf.h"

namespace muon::server {

// A session's update buffers, one slot per parameter. Unlike BufferShelf's,
// a buffer taken here is shared: the update chunks sent from it reference
// it (no copy into a string), and so do the step's record and gRPC's send
// slices, for as long as they live. It comes back to the shelf when the last
// of them lets go, so the next Take of its slot gets it again, its pages
// already mapped; while any holds it, Take hands out another, and a retried
// step still answers from bytes no later step overwrote. One free buffer is
// kept per slot; a buffer that outlives its shelf is simply freed.
// Thread-safe.
class SharedBufferShelf {
 public:
  SharedBufferShelf();
  ~SharedBufferShelf();
  SharedBufferShelf(const SharedBufferShelf&) = delete;
  SharedBufferShelf& operator=(const SharedBufferShelf&) = delete;

  // A buffer of `bytes` for `slot`: the free one kept there when it has that
  // size, else a new one. Its contents are unspecified.
  std::shared_ptr<std::byte[]> Take(uint32_t slot, int64_t bytes);
  // Bytes of the free buffers kept now.
  int64_t kept_bytes() const;

 private:
  class Return;

  // The free buffers, kept as long as the shelf lives; the taken buffers'
  // deleters see it through a weak_ptr.
  const std::shared_ptr<BufferShelf> free_;
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_UTIL_SHARED_BUFFER_SHELF_H_
