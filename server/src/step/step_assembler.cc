#include "step/step_assembler.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace muon::server {

StepAssembler::StepAssembler(std::vector<Tensor> tensors, BufferShelf* shelf)
    : tensors_(std::move(tensors)), shelf_(shelf), state_(tensors_.size()) {}

absl::Status StepAssembler::Add(uint32_t index, uint64_t offset, absl::string_view data,
                                bool* complete) {
  return Add(index, offset,
             ChunkBytes{data.size(),
                        [&](std::byte* destination) {
                          std::memcpy(destination, data.data(), data.size());
                        }},
             complete);
}

absl::Status StepAssembler::Add(uint32_t index, uint64_t offset, const ChunkBytes& data,
                                bool* complete) {
  *complete = false;
  if (index >= tensors_.size()) {
    return absl::NotFoundError(absl::StrCat("parameter index ", index,
                                            " is not in this session (it has ", tensors_.size(),
                                            " parameters, indices 0..", tensors_.size() - 1, ")"));
  }
  const Tensor& t = tensors_[index];
  State& s = state_[index];
  const std::string who = absl::StrCat("parameter ", index, " ('", t.name, "')");
  const uint64_t size = data.size;
  const uint64_t total = static_cast<uint64_t>(t.bytes);
  if (size == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": empty gradient chunk at offset ", offset));
  }
  if (offset % t.element_size != 0 || size % t.element_size != 0) {
    return absl::InvalidArgumentError(absl::StrCat(who, ": chunk at offset ", offset, " of ", size,
                                                   " bytes is not aligned to the ", t.element_size,
                                                   "-byte element size of its dtype"));
  }
  if (offset >= total || size > total - offset) {
    return absl::InvalidArgumentError(absl::StrCat(who, ": chunk [", offset, ", ", offset + size,
                                                   ") is out of bounds; the gradient has ", total,
                                                   " bytes"));
  }
  const uint64_t end = offset + size;
  auto next = s.ranges.lower_bound(offset);
  if (next != s.ranges.end() && next->first < end) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": chunk [", offset, ", ", end, ") overlaps bytes [", next->first, ", ",
                     next->second, ") already received (duplicate chunk)"));
  }
  if (next != s.ranges.begin()) {
    auto prev = std::prev(next);
    if (prev->second > offset) {
      return absl::InvalidArgumentError(
          absl::StrCat(who, ": chunk [", offset, ", ", end, ") overlaps bytes [", prev->first, ", ",
                       prev->second, ") already received (duplicate chunk)"));
    }
  }
  if (s.data == nullptr) {
    s.data = shelf_ != nullptr ? shelf_->Take(index, t.bytes)
                               : std::unique_ptr<std::byte[]>(new std::byte[total]);
  }
  data.copy_to(s.data.get() + offset);
  s.started = true;
  s.received += static_cast<int64_t>(size);
  bytes_received_ += static_cast<int64_t>(size);
  // Merge with neighbours so the map stays small for in-order chunks.
  uint64_t start = offset;
  uint64_t stop = end;
  if (next != s.ranges.end() && next->first == end) {
    stop = next->second;
    next = s.ranges.erase(next);
  }
  if (next != s.ranges.begin()) {
    auto prev = std::prev(next);
    if (prev->second == offset) {
      start = prev->first;
      s.ranges.erase(prev);
    }
  }
  s.ranges[start] = stop;
  *complete = s.received == t.bytes;
  return absl::OkStatus();
}

std::unique_ptr<std::byte[]> StepAssembler::Take(uint32_t index) {
  return std::move(state_[index].data);
}

absl::Status StepAssembler::CheckComplete(uint32_t index) const {
  const Tensor& t = tensors_[index];
  const State& s = state_[index];
  if (s.received == t.bytes) return absl::OkStatus();
  uint64_t missing_start = 0;
  uint64_t missing_end = static_cast<uint64_t>(t.bytes);
  if (!s.ranges.empty()) {
    auto first = s.ranges.begin();
    if (first->first > 0) {
      missing_end = first->first;
    } else {
      missing_start = first->second;
      auto second = std::next(first);
      missing_end = second == s.ranges.end() ? static_cast<uint64_t>(t.bytes) : second->first;
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat("parameter ", index, " ('", t.name, "'): received ", s.received, " of ", t.bytes,
                   " gradient bytes; missing chunk(s), first missing bytes [", missing_start, ", ",
                   missing_end, ")"));
}

std::vector<uint32_t> StepAssembler::Started() const {
  std::vector<uint32_t> out;
  for (uint32_t i = 0; i < state_.size(); ++i) {
    if (state_[i].started) out.push_back(i);
  }
  return out;
}

}  // namespace muon::server
