// PushWeights and PullWeights: the weights a PARAMETER_SERVER session holds.

#include <algorithm>
#include <cmath>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "api/auth.h"
#include "wire/convert.h"
#include "muon/kernels/status_macros.h"
#include "muon/server/status_util.h"
#include "api/service.h"
#include "session/registry.h"
#include "step/chunker.h"
#include "step/step_assembler.h"
#include "util/thread_pool.h"

namespace muon::server {
namespace {

absl::Status RequireParameterServer(const Session& session, absl::string_view call) {
  if (session.mode() == v1::SESSION_MODE_PARAMETER_SERVER) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat(call, ": session ", session.id(),
                   " is in UPDATES mode, where the client owns the weights; create the session "
                   "with SESSION_MODE_PARAMETER_SERVER to keep weights on the server"));
}

class PushReactor final : public grpc::ServerReadReactor<v1::PushWeightsRequest> {
 public:
  PushReactor(const ServiceEnv* env, grpc::CallbackServerContext* ctx,
              v1::PushWeightsResponse* response)
      : env_(env), ctx_(ctx), response_(response) {
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    absl::Status status = ok ? Handle() : OnHalfClose();
    if (!status.ok()) {
      Finish(ToGrpcStatus(status));
    } else if (ok) {
      StartRead(&request_);
    }
  }

  void OnDone() override { delete this; }

 private:
  absl::Status Handle() {
    if (request_.has_header()) {
      if (session_ != nullptr) {
        return absl::InvalidArgumentError("a second PushWeightsHeader on one stream");
      }
      const v1::PushWeightsHeader& header = request_.header();
      MUON_ASSIGN_OR_RETURN(
          session_, env_->sessions->Get(header.session_id(), RequestToken(header.token(), *ctx_)));
      MUON_RETURN_IF_ERROR(RequireParameterServer(*session_, "PushWeights"));
      std::vector<StepAssembler::Tensor> tensors;
      for (const SessionParam& p : session_->params()) {
        MUON_ASSIGN_OR_RETURN(DType dtype, DTypeFromProto(header.dtype(), p.spec.dtype));
        dtypes_.push_back(dtype);
        const int64_t size = static_cast<int64_t>(DTypeSize(dtype));
        tensors.push_back({p.spec.name, NumElements(p.spec.shape) * size, size});
      }
      assembler_ = std::make_unique<StepAssembler>(std::move(tensors));
      return absl::OkStatus();
    }
    if (session_ == nullptr) {
      return absl::InvalidArgumentError(
          "the first message of a PushWeights stream must be a PushWeightsHeader");
    }
    if (!request_.has_weights()) return absl::InvalidArgumentError("empty PushWeightsRequest");
    const v1::TensorChunk& chunk = request_.weights();
    if (chunk.dtype() != v1::DTYPE_UNSPECIFIED && chunk.param_index() < dtypes_.size() &&
        chunk.dtype() != DTypeToProto(dtypes_[chunk.param_index()])) {
      return absl::InvalidArgumentError(
          absl::StrCat("parameter ", chunk.param_index(), ": weights chunk dtype ",
                       v1::DType_Name(chunk.dtype()), " differs from the stream's ",
                       DTypeName(dtypes_[chunk.param_index()])));
    }
    bool complete = false;
    return assembler_->Add(chunk.param_index(), chunk.offset(), chunk.data(), &complete);
  }

  absl::Status OnHalfClose() {
    if (ctx_->IsCancelled()) {
      return absl::CancelledError("the PushWeights stream was cancelled; no weights changed");
    }
    if (session_ == nullptr) {
      return absl::InvalidArgumentError("the PushWeights stream ended before its header");
    }
    const std::vector<uint32_t> indices = assembler_->Started();
    for (uint32_t i : indices) MUON_RETURN_IF_ERROR(assembler_->CheckComplete(i));
    // Decoding and copying whole tensors is engine work: off the reactor.
    env_->pool->Schedule([this, indices] { Finish(ToGrpcStatus(Apply(indices))); });
    return absl::OkStatus();
  }

  // All or nothing: decode and check every tensor, then set them all.
  absl::Status Apply(const std::vector<uint32_t>& indices) {
    std::vector<std::vector<float>> values(indices.size());
    for (size_t k = 0; k < indices.size(); ++k) {
      const uint32_t i = indices[k];
      const SessionParam& p = session_->params()[i];
      const int64_t n = NumElements(p.spec.shape);
      values[k].resize(n);
      std::unique_ptr<std::byte[]> bytes = assembler_->Take(i);
      DecodeToFloat(dtypes_[i], bytes.get(), n, values[k].data());
      if (!std::all_of(values[k].begin(), values[k].end(),
                       [](float v) { return std::isfinite(v); })) {
        return absl::InvalidArgumentError(
            absl::StrCat("parameter ", i, " ('", p.spec.name, "'): weights contain NaN or Inf"));
      }
    }
    MUON_ASSIGN_OR_RETURN(Lease lease, session_->TryLease(LeasePurpose::kWeightsUpload));
    absl::Status status;
    for (size_t k = 0; k < indices.size() && status.ok(); ++k) {
      status = env_->engine->SetWeights(session_->params()[indices[k]].engine_id, values[k]);
    }
    // Pushes are rare and set what every later step builds on: on disk
    // before they are acknowledged whenever checkpoints are on.
    if (status.ok()) status = env_->sessions->durability().AfterUpload(*session_);
    lease.Release();
    MUON_RETURN_IF_ERROR(status);
    for (uint32_t i : indices) response_->add_param_indices(i);
    response_->set_step(session_->step());
    return absl::OkStatus();
  }

  const ServiceEnv* const env_;
  grpc::CallbackServerContext* const ctx_;
  v1::PushWeightsResponse* const response_;
  v1::PushWeightsRequest request_;
  std::shared_ptr<Session> session_;
  std::vector<DType> dtypes_;
  std::unique_ptr<StepAssembler> assembler_;
};

class PullReactor final : public grpc::ServerWriteReactor<v1::PullWeightsResponse> {
 public:
  PullReactor(const ServiceEnv* env, grpc::CallbackServerContext* ctx,
              const v1::PullWeightsRequest* request)
      : env_(env) {
    absl::Status status = Prepare(*request, RequestToken(request->token(), *ctx));
    if (!status.ok()) {
      Finish(ToGrpcStatus(status));
      return;
    }
    env_->pool->Schedule([this, request] {
      absl::Status built = Build(*request);
      if (!built.ok() || responses_.empty()) {
        Finish(ToGrpcStatus(built));
        return;
      }
      StartWrite(&responses_.front());
    });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(ToGrpcStatus(absl::CancelledError("the stream broke while sending weights")));
      return;
    }
    responses_.pop_front();
    if (responses_.empty()) {
      Finish(grpc::Status::OK);
    } else {
      StartWrite(&responses_.front());
    }
  }

  void OnDone() override { delete this; }

 private:
  absl::Status Prepare(const v1::PullWeightsRequest& request, absl::string_view token) {
    MUON_ASSIGN_OR_RETURN(session_, env_->sessions->Get(request.session_id(), token));
    MUON_RETURN_IF_ERROR(RequireParameterServer(*session_, "PullWeights"));
    const size_t n = session_->params().size();
    absl::flat_hash_set<uint32_t> seen;
    for (uint32_t i : request.param_indices()) {
      if (i >= n) {
        return absl::NotFoundError(absl::StrCat("parameter index ", i, " is not in session ",
                                                session_->id(), " (indices 0..", n - 1, ")"));
      }
      if (seen.insert(i).second) indices_.push_back(i);
    }
    if (request.param_indices_size() == 0) {
      for (uint32_t i = 0; i < n; ++i) indices_.push_back(i);
    }
    for (uint32_t i : indices_) {
      MUON_ASSIGN_OR_RETURN(DType dtype,
                            DTypeFromProto(request.dtype(), session_->params()[i].spec.dtype));
      // Chunks hold whole elements (step/chunker.h): a maximum below one
      // cannot be honoured.
      if (request.max_chunk_bytes() != 0 && request.max_chunk_bytes() < DTypeSize(dtype)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "max_chunk_bytes is ", request.max_chunk_bytes(), " but parameter ", i, " ('",
            session_->params()[i].spec.name, "') is sent as ", DTypeName(dtype), ", ",
            DTypeSize(dtype), " bytes an element; ask for at least one element (0: the default)"));
      }
      dtypes_.push_back(dtype);
    }
    return absl::OkStatus();
  }

  absl::Status Build(const v1::PullWeightsRequest& request) {
    const int64_t requested = request.max_chunk_bytes() == 0
                                  ? env_->options.update_chunk_bytes
                                  : static_cast<int64_t>(request.max_chunk_bytes());
    const uint64_t step = session_->step();
    for (size_t k = 0; k < indices_.size(); ++k) {
      const SessionParam& p = session_->params()[indices_[k]];
      const int64_t n = NumElements(p.spec.shape);
      std::vector<float> values(n);
      MUON_RETURN_IF_ERROR(env_->engine->GetWeights(p.engine_id, absl::MakeSpan(values)));
      const int64_t width = static_cast<int64_t>(DTypeSize(dtypes_[k]));
      const int64_t chunk_bytes =
          ChunkPayloadBytes(requested, env_->options.limits.max_message_bytes, width);
      for (const ChunkRange& range : CutIntoChunks(n * width, chunk_bytes)) {
        v1::PullWeightsResponse& r = responses_.emplace_back();
        v1::TensorChunk* chunk = r.mutable_weights();
        chunk->set_param_index(indices_[k]);
        chunk->set_offset(static_cast<uint64_t>(range.offset));
        std::string* data = chunk->mutable_data();
        data->resize(static_cast<size_t>(range.size));
        EncodeFromFloat(dtypes_[k], values.data() + range.offset / width,
                        static_cast<size_t>(range.size / width),
                        reinterpret_cast<std::byte*>(data->data()));
        r.set_dtype(DTypeToProto(dtypes_[k]));
        r.set_total_bytes(static_cast<uint64_t>(n * width));
        r.set_step(step);
      }
    }
    return absl::OkStatus();
  }

  const ServiceEnv* const env_;
  std::shared_ptr<Session> session_;
  std::vector<uint32_t> indices_;
  std::vector<DType> dtypes_;
  std::deque<v1::PullWeightsResponse> responses_;
};

}  // namespace

grpc::ServerReadReactor<v1::PushWeightsRequest>* NewPushWeightsReactor(
    const ServiceEnv* env, grpc::CallbackServerContext* ctx, v1::PushWeightsResponse* response) {
  return new PushReactor(env, ctx, response);
}

grpc::ServerWriteReactor<v1::PullWeightsResponse>* NewPullWeightsReactor(
    const ServiceEnv* env, grpc::CallbackServerContext* ctx,
    const v1::PullWeightsRequest* request) {
  return new PullReactor(env, ctx, request);
}

}  // namespace muon::server
