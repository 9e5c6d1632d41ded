#include "chunking.h"

#include <algorithm>
#include <cstring>
#include <iterator>
#include <utility>

#include "absl/strings/str_cat.h"

namespace muon::client_internal {

size_t EffectiveChunkBytes(size_t requested) { return std::max<size_t>(4, requested / 4 * 4); }

std::vector<ByteRange> SplitIntoChunks(size_t total, size_t chunk_bytes) {
  const size_t step = EffectiveChunkBytes(chunk_bytes);
  std::vector<ByteRange> ranges;
  ranges.reserve((total + step - 1) / step);
  for (size_t offset = 0; offset < total; offset += step) {
    ranges.push_back({offset, std::min(step, total - offset)});
  }
  return ranges;
}

UpdateAssembler::UpdateAssembler(std::vector<ParameterUpdate> recycled) {
  for (ParameterUpdate& u : recycled) recycled_[u.param_index] = std::move(u.data);
}

absl::Status UpdateAssembler::Add(const v1::UpdateChunk& chunk) {
  return Add(chunk, chunk.data().size(), [&](std::byte* destination) {
    std::memcpy(destination, chunk.data().data(), chunk.data().size());
  });
}

absl::Status UpdateAssembler::Add(const v1::UpdateChunk& chunk, uint64_t size,
                                  absl::FunctionRef<void(std::byte*)> copy) {
  const uint32_t index = chunk.param_index();
  const uint64_t offset = chunk.offset();
  const uint64_t total = chunk.total_bytes();
  if (offset > total || size > total - offset) {
    return absl::DataLossError(absl::StrCat("update chunk of parameter ", index, " at bytes [",
                                            offset, ", ", offset + size, ") lies outside its ",
                                            total, " bytes"));
  }
  auto [it, inserted] = pending_.try_emplace(index);
  Pending& p = it->second;
  if (inserted) {
    p.update.param_index = index;
    p.update.dtype = chunk.dtype();
    p.update.content = chunk.content() == v1::UPDATE_CONTENT_UNSPECIFIED ? v1::UPDATE_CONTENT_UPDATE
                                                                         : chunk.content();
    p.update.decay = chunk.decay();
    if (auto kept = recycled_.find(index); kept != recycled_.end()) {
      p.update.data = std::move(kept->second);
      recycled_.erase(kept);
    }
    p.update.data.resize(total);  // zero-fills only bytes it did not have
  } else if (p.update.data.size() != total || p.update.dtype != chunk.dtype() ||
             p.update.decay != chunk.decay()) {
    return absl::DataLossError(absl::StrCat("update chunks of parameter ", index,
                                            " disagree on total_bytes, dtype or decay"));
  }
  if (size == 0) return absl::OkStatus();
  // The first range starting after `offset`, and the one before it.
  auto next = p.ranges.upper_bound(offset);
  if ((next != p.ranges.end() && next->first < offset + size) ||
      (next != p.ranges.begin() && std::prev(next)->second > offset)) {
    return absl::DataLossError(absl::StrCat("update chunk of parameter ", index, " at bytes [",
                                            offset, ", ", offset + size,
                                            ") overlaps bytes already received"));
  }
  copy(p.update.data.data() + offset);
  p.received += size;
  uint64_t start = offset;
  uint64_t end = offset + size;
  if (next != p.ranges.begin() && std::prev(next)->second == start) {
    auto before = std::prev(next);
    start = before->first;
    p.ranges.erase(before);
  }
  if (next != p.ranges.end() && next->first == end) {
    end = next->second;
    p.ranges.erase(next);
  }
  p.ranges[start] = end;
  return absl::OkStatus();
}

std::vector<ParameterUpdate> UpdateAssembler::Release() {
  std::vector<ParameterUpdate> buffers;
  for (auto& [index, p] : pending_) buffers.push_back(std::move(p.update));
  for (auto& [index, data] : recycled_) {
    ParameterUpdate& u = buffers.emplace_back();
    u.param_index = index;
    u.data = std::move(data);
  }
  pending_.clear();
  recycled_.clear();
  return buffers;
}

absl::StatusOr<std::vector<ParameterUpdate>> UpdateAssembler::Finish(
    const v1::StepSummary& summary) {
  std::map<uint32_t, Pending> pending = std::move(pending_);
  pending_.clear();
  recycled_.clear();
  std::vector<ParameterUpdate> updates;
  updates.reserve(summary.param_indices_size());
  for (uint32_t index : summary.param_indices()) {
    auto it = pending.find(index);
    if (it == pending.end()) {
      return absl::DataLossError(absl::StrCat("step ", summary.step(),
                                              ": the summary lists parameter ", index,
                                              " but no update came for it"));
    }
    const Pending& p = it->second;
    if (p.received != p.update.data.size()) {
      return absl::DataLossError(absl::StrCat("step ", summary.step(), ": the update of parameter ",
                                              index, " is incomplete (", p.received, " of ",
                                              p.update.data.size(), " bytes)"));
    }
    updates.push_back(std::move(it->second.update));
    pending.erase(it);
  }
  if (!pending.empty()) {
    return absl::DataLossError(
        absl::StrCat("step ", summary.step(), ": an update came for parameter ",
                     pending.begin()->first, ", which the summary does not list"));
  }
  std::sort(updates.begin(), updates.end(), [](const ParameterUpdate& a, const ParameterUpdate& b) {
    return a.param_index < b.param_index;
  });
  return updates;
}

}  // namespace muon::client_internal
