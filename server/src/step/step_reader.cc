#include "step/step_reader.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "wire/convert.h"
#include "muon/kernels/status_macros.h"

namespace muon::server {

absl::StatusOr<StepReader::Event> StepReader::Read(const v1::StepRequest& request) {
  Event event;
  switch (request.kind_case()) {
    case v1::StepRequest::kHeader:
      if (phase_ != Phase::kHeader) {
        return absl::InvalidArgumentError(
            "a second StepHeader on one stream; send one header per Step stream");
      }
      event.kind = Event::Kind::kHeader;
      event.header = &request.header();
      return event;
    case v1::StepRequest::kGradient: {
      const v1::TensorChunk& chunk = request.gradient();
      const std::string& data = chunk.data();
      return ReadGradient(chunk.param_index(), chunk.offset(), chunk.dtype(),
                          StepAssembler::ChunkBytes{data.size(), [&](std::byte* destination) {
                                                      std::memcpy(destination, data.data(),
                                                                  data.size());
                                                    }});
    }
    case v1::StepRequest::kEnd: {
      if (phase_ == Phase::kHeader) {
        return absl::InvalidArgumentError(
            "the first message of a Step stream must be a StepHeader, not a StepEnd");
      }
      if (phase_ == Phase::kReplay) {
        event.kind = Event::Kind::kReplay;
        return event;
      }
      std::vector<uint32_t> listed(request.end().param_indices().begin(),
                                   request.end().param_indices().end());
      MUON_ASSIGN_OR_RETURN(event, End(std::move(listed)));
      if (request.end().has_grad_scale()) event.grad_scale = request.end().grad_scale();
      return event;
    }
    case v1::StepRequest::KIND_NOT_SET:
      break;
  }
  return absl::InvalidArgumentError(
      "empty StepRequest: set one of header, gradient or end (is the client's proto current?)");
}

absl::StatusOr<StepReader::Event> StepReader::ReadGradient(
    uint32_t param_index, uint64_t offset, v1::DType dtype,
    const StepAssembler::ChunkBytes& data) {
  Event event;
  if (phase_ == Phase::kHeader) {
    return absl::InvalidArgumentError(
        "the first message of a Step stream must be a StepHeader, not a gradient chunk");
  }
  if (phase_ == Phase::kReplay) return event;  // already applied: ignore
  if (dtype != v1::DTYPE_UNSPECIFIED && param_index < params_.size()) {
    MUON_RETURN_IF_ERROR(CheckChunkDType(param_index, dtype));
  }
  bool complete = false;
  MUON_RETURN_IF_ERROR(assembler_->Add(param_index, offset, data, &complete));
  if (complete) {
    event.kind = Event::Kind::kComplete;
    event.index = param_index;
  }
  return event;
}

absl::StatusOr<StepReader::Event> StepReader::HalfClose() {
  switch (phase_) {
    case Phase::kHeader:
      return absl::InvalidArgumentError("the Step stream ended before its StepHeader");
    case Phase::kReceiving:
    case Phase::kReplay:
      // A stream cut after its last chunk must never pass for a finished
      // step, so only StepEnd ends one.
      return absl::InvalidArgumentError(
          "the Step stream ended without a StepEnd; nothing was applied. Send "
          "StepEnd{param_indices} as the step's last message, then half-close");
    case Phase::kEnded:
      break;  // reads stop after StepEnd; nothing to do
  }
  return Event{};
}

void StepReader::Receive(std::string session_id, std::vector<Param> params, BufferShelf* shelf) {
  session_id_ = std::move(session_id);
  params_ = std::move(params);
  std::vector<StepAssembler::Tensor> tensors;
  tensors.reserve(params_.size());
  for (const Param& p : params_) {
    tensors.push_back({p.name, p.bytes, static_cast<int64_t>(DTypeSize(p.dtype))});
  }
  assembler_.emplace(std::move(tensors), shelf);
  phase_ = Phase::kReceiving;
}

void StepReader::Replay() { phase_ = Phase::kReplay; }

std::unique_ptr<std::byte[]> StepReader::Take(uint32_t index) { return assembler_->Take(index); }

int64_t StepReader::bytes_received() const {
  return assembler_.has_value() ? assembler_->bytes_received() : 0;
}

absl::Status StepReader::CheckChunkDType(uint32_t param_index, v1::DType wire) const {
  const Param& param = params_[param_index];
  absl::StatusOr<DType> dtype = DTypeFromProto(wire, param.dtype);
  if (!dtype.ok()) return dtype.status();
  if (*dtype == param.dtype) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("parameter ", param_index, " ('", param.name, "'): gradient chunk is ",
                   DTypeName(*dtype), " but the parameter was registered as ",
                   DTypeName(param.dtype), "; send gradients in the registered dtype"));
}

absl::StatusOr<StepReader::Event> StepReader::End(std::vector<uint32_t> indices) {
  phase_ = Phase::kEnded;
  const size_t n = params_.size();
  absl::flat_hash_set<uint32_t> seen;
  for (uint32_t i : indices) {
    if (i >= n) {
      return absl::NotFoundError(absl::StrCat("StepEnd lists parameter index ", i,
                                              ", which is not in session ", session_id_,
                                              " (indices 0..", n - 1, ")"));
    }
    if (!seen.insert(i).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("StepEnd lists parameter index ", i, " twice"));
    }
  }
  for (uint32_t i : assembler_->Started()) {
    if (!seen.contains(i)) {
      return absl::InvalidArgumentError(
          absl::StrCat("parameter ", i, " ('", params_[i].name,
                       "') received gradient chunks but is not listed in StepEnd; list it or "
                       "do not send it"));
    }
  }
  for (uint32_t i : indices) MUON_RETURN_IF_ERROR(assembler_->CheckComplete(i));
  std::sort(indices.begin(), indices.end());
  Event event;
  event.kind = Event::Kind::kEnd;
  event.indices = std::move(indices);
  return event;
}

}  // namespace muon::server
