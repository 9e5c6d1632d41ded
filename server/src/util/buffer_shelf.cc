#include "util/buffer_shelf.h"

#include <utility>

namespace muon::server {

std::unique_ptr<std::byte[]> BufferShelf::Take(uint32_t slot, int64_t bytes) {
  std::unique_ptr<std::byte[]> kept;
  std::unique_ptr<std::byte[]> stale;  // another size (the wire dtype changed): freed unlocked
  {
    absl::MutexLock lock(&mu_);
    if (slot < kept_.size() && kept_[slot].buffer != nullptr) {
      kept_bytes_ -= kept_[slot].bytes;
      (kept_[slot].bytes == bytes ? kept : stale) = std::move(kept_[slot].buffer);
      kept_[slot] = Kept{};
    }
  }
  if (kept != nullptr) return kept;
  // Default-initialized: no zero fill, the caller writes every byte.
  return std::unique_ptr<std::byte[]>(new std::byte[static_cast<size_t>(bytes)]);
}

void BufferShelf::Give(uint32_t slot, int64_t bytes, std::unique_ptr<std::byte[]> buffer) {
  if (buffer == nullptr) return;
  std::unique_ptr<std::byte[]> old;  // freed outside the lock
  absl::MutexLock lock(&mu_);
  if (slot >= kept_.size()) kept_.resize(slot + 1);
  old = std::move(kept_[slot].buffer);
  kept_bytes_ += bytes - (old != nullptr ? kept_[slot].bytes : 0);
  kept_[slot] = Kept{bytes, std::move(buffer)};
}

int64_t BufferShelf::kept_bytes() const {
  absl::MutexLock lock(&mu_);
  return kept_bytes_;
}

}  // namespace muon::server
