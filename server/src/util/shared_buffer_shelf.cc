#include "util/shared_buffer_shelf.h"

#include <utility>

namespace muon::server {

// A taken buffer's deleter: back to its slot, replacing (freeing) a free
// buffer kept there, or freed when the shelf is gone.
class SharedBufferShelf::Return {
 public:
  Return(std::weak_ptr<Free> free, uint32_t slot, int64_t bytes)
      : free_(std::move(free)), slot_(slot), bytes_(bytes) {}

  void operator()(std::byte* raw) const {
    std::unique_ptr<std::byte[]> buffer(raw);
    const std::shared_ptr<Free> free = free_.lock();
    if (free == nullptr) return;
    std::unique_ptr<std::byte[]> old;  // freed outside the lock
    absl::MutexLock lock(&free->mu);
    if (slot_ >= free->kept.size()) free->kept.resize(slot_ + 1);
    Free::Kept& kept = free->kept[slot_];
    old = std::move(kept.buffer);
    free->kept_bytes += bytes_ - (old != nullptr ? kept.bytes : 0);
    kept = Free::Kept{bytes_, std::move(buffer)};
  }

 private:
  std::weak_ptr<Free> free_;
  uint32_t slot_;
  int64_t bytes_;
};

SharedBufferShelf::SharedBufferShelf() : free_(std::make_shared<Free>()) {}

SharedBufferShelf::~SharedBufferShelf() = default;

std::shared_ptr<std::byte[]> SharedBufferShelf::Take(uint32_t slot, int64_t bytes) {
  std::unique_ptr<std::byte[]> buffer;
  std::unique_ptr<std::byte[]> stale;  // another size (the update dtype changed): freed
  {
    absl::MutexLock lock(&free_->mu);
    if (slot < free_->kept.size() && free_->kept[slot].buffer != nullptr) {
      Free::Kept& kept = free_->kept[slot];
      free_->kept_bytes -= kept.bytes;
      (kept.bytes == bytes ? buffer : stale) = std::move(kept.buffer);
      kept = Free::Kept{};
    }
  }
  // Default-initialized: no zero fill, the caller writes every byte.
  if (buffer == nullptr) buffer.reset(new std::byte[static_cast<size_t>(bytes)]);
  return std::shared_ptr<std::byte[]>(buffer.release(), Return(free_, slot, bytes));
}

int64_t SharedBufferShelf::kept_bytes() const {
  absl::MutexLock lock(&free_->mu);
  return free_->kept_bytes;
}

}  // namespace muon::server
