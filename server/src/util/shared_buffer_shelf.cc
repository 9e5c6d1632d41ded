#include "util/shared_buffer_shelf.h"

#include <utility>

namespace muon::server {

// A taken buffer's deleter: back to its slot on the shelf, or freed when the
// shelf is gone.
class SharedBufferShelf::Return {
 public:
  Return(std::weak_ptr<BufferShelf> free, uint32_t slot, int64_t bytes)
      : free_(std::move(free)), slot_(slot), bytes_(bytes) {}

  void operator()(std::byte* raw) const {
    std::unique_ptr<std::byte[]> buffer(raw);
    if (const std::shared_ptr<BufferShelf> free = free_.lock()) {
      free->Give(slot_, bytes_, std::move(buffer));
    }
  }

 private:
  std::weak_ptr<BufferShelf> free_;
  uint32_t slot_;
  int64_t bytes_;
};

SharedBufferShelf::SharedBufferShelf() : free_(std::make_shared<BufferShelf>()) {}

SharedBufferShelf::~SharedBufferShelf() = default;

std::shared_ptr<std::byte[]> SharedBufferShelf::Take(uint32_t slot, int64_t bytes) {
  return std::shared_ptr<std::byte[]>(free_->Take(slot, bytes).release(),
                                      Return(free_, slot, bytes));
}

int64_t SharedBufferShelf::kept_bytes() const { return free_->kept_bytes(); }

}  // namespace muon::server
