// ExportState and ImportState: an UPDATES session's optimizer state, out to a
// client's checkpoint and back into a new session on any server.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/auth.h"
#include "api/service.h"
#include "muon/kernels/status_macros.h"
#include "muon/server/status_util.h"
#include "session/durability.h"
#include "session/lease.h"
#include "session/registry.h"
#include "session/session.h"
#include "step/chunker.h"
#include "step/step_assembler.h"
#include "util/thread_pool.h"

namespace muon::server {
namespace {

// How long an export or import waits for a step in flight to end.
constexpr absl::Duration kStateWait = absl::Seconds(30);

absl::Status RequireUpdates(const Session& session, absl::string_view call) {
  if (session.mode() != v1::SESSION_MODE_PARAMETER_SERVER) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat(call, ": session ", session.id(),
                   " is a PARAMETER_SERVER session; its state and weights are kept by the "
                   "server's checkpoints (--checkpoint_dir), not exported"));
}

// The state tensors a parameter of `kind` has, in the order they travel.
std::vector<v1::StateTensor> TensorsOf(OptimizerKind kind) {
  if (kind == OptimizerKind::kMuon) return {v1::STATE_TENSOR_MOMENTUM};
  return {v1::STATE_TENSOR_EXP_AVG, v1::STATE_TENSOR_EXP_AVG_SQ};
}

std::vector<float>* Field(ParamState& state, v1::StateTensor tensor) {
  switch (tensor) {
    case v1::STATE_TENSOR_MOMENTUM:
      return &state.momentum;
    case v1::STATE_TENSOR_EXP_AVG:
      return &state.exp_avg;
    case v1::STATE_TENSOR_EXP_AVG_SQ:
      return &state.exp_avg_sq;
    default:
      return nullptr;
  }
}

class ExportReactor final : public grpc::ServerWriteReactor<v1::ExportStateResponse> {
 public:
  ExportReactor(const ServiceEnv* env, grpc::CallbackServerContext* ctx,
                const v1::ExportStateRequest* request)
      : env_(env) {
    absl::StatusOr<std::shared_ptr<Session>> session =
        env_->sessions->Get(request->session_id(), RequestToken(request->token(), *ctx));
    absl::Status status = session.status();
    if (status.ok()) {
      session_ = *std::move(session);
      status = RequireUpdates(*session_, "ExportState");
    }
    if (!status.ok()) {
      Finish(ToGrpcStatus(status));
      return;
    }
    // Waiting for a step in flight and copying the state: off the reactor.
    env_->pool->Schedule([this, chunk = request->max_chunk_bytes()] {
      absl::Status built = Build(chunk);
      if (!built.ok()) {
        Finish(ToGrpcStatus(built));
        return;
      }
      StartWrite(&responses_.front());
    });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) {
      Finish(ToGrpcStatus(absl::CancelledError("the stream broke while sending the state")));
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
  absl::Status Build(uint32_t max_chunk_bytes) {
    const int64_t requested = max_chunk_bytes == 0 ? env_->options.update_chunk_bytes
                                                   : static_cast<int64_t>(max_chunk_bytes);
    const int64_t chunk_bytes = ChunkPayloadBytes(
        requested, env_->options.limits.max_message_bytes, sizeof(float));
    std::vector<ParamState> states;
    uint64_t step = 0;
    {
      // While held, the engine state is the committed step's.
      MUON_ASSIGN_OR_RETURN(Lease lease, session_->AwaitLease(kStateWait));
      step = session_->step();
      for (const SessionParam& p : session_->params()) {
        MUON_ASSIGN_OR_RETURN(ParamState state, env_->engine->ExportState(p.engine_id));
        states.push_back(std::move(state));
      }
    }
    v1::ExportStateResponse& first = responses_.emplace_back();
    first.set_step(step);
    for (const ParamState& state : states) first.add_param_steps(state.step);
    bool first_used = false;
    for (size_t i = 0; i < states.size(); ++i) {
      for (v1::StateTensor tensor : TensorsOf(session_->params()[i].spec.kind)) {
        const std::vector<float>& values = *Field(states[i], tensor);
        const int64_t total = static_cast<int64_t>(values.size() * sizeof(float));
        const char* bytes = reinterpret_cast<const char*>(values.data());
        for (const ChunkRange& range : CutIntoChunks(total, chunk_bytes)) {
          v1::ExportStateResponse& r = first_used ? responses_.emplace_back() : first;
          first_used = true;
          r.set_step(step);
          v1::StateChunk* chunk = r.mutable_chunk();
          chunk->set_param_index(static_cast<uint32_t>(i));
          chunk->set_tensor(tensor);
          chunk->set_offset(static_cast<uint64_t>(range.offset));
          chunk->set_data(bytes + range.offset, static_cast<size_t>(range.size));
          chunk->set_total_bytes(static_cast<uint64_t>(total));
        }
      }
    }
    return absl::OkStatus();
  }

  const ServiceEnv* const env_;
  std::shared_ptr<Session> session_;
  std::deque<v1::ExportStateResponse> responses_;
};

class ImportReactor final : public grpc::ServerReadReactor<v1::ImportStateRequest> {
 public:
  ImportReactor(const ServiceEnv* env, grpc::CallbackServerContext* ctx,
                v1::ImportStateResponse* response)
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
  struct Slot {
    uint32_t param = 0;
    v1::StateTensor tensor = v1::STATE_TENSOR_UNSPECIFIED;
  };

  absl::Status Handle() {
    if (request_.has_header()) return Start(request_.header());
    if (session_ == nullptr) {
      return absl::InvalidArgumentError(
          "the first message of an ImportState stream must be an ImportStateHeader");
    }
    if (!request_.has_chunk()) return absl::InvalidArgumentError("empty ImportStateRequest");
    const v1::StateChunk& chunk = request_.chunk();
    const size_t n = session_->params().size();
    if (chunk.param_index() >= n) {
      return absl::NotFoundError(absl::StrCat("parameter index ", chunk.param_index(),
                                              " is not in session ", session_->id(),
                                              " (indices 0..", n - 1, ")"));
    }
    for (size_t k = 0; k < slots_.size(); ++k) {
      if (slots_[k].param == chunk.param_index() && slots_[k].tensor == chunk.tensor()) {
        bool complete = false;
        return assembler_->Add(static_cast<uint32_t>(k), chunk.offset(), chunk.data(),
                               &complete);
      }
    }
    const SessionParam& p = session_->params()[chunk.param_index()];
    return absl::InvalidArgumentError(
        absl::StrCat("parameter ", chunk.param_index(), " ('", p.spec.name, "') is ",
                     p.spec.kind == OptimizerKind::kMuon ? "a Muon" : "an AdamW",
                     " parameter and has no state tensor ", v1::StateTensor_Name(chunk.tensor())));
  }

  absl::Status Start(const v1::ImportStateHeader& header) {
    if (session_ != nullptr) {
      return absl::InvalidArgumentError("a second ImportStateHeader on one stream");
    }
    MUON_ASSIGN_OR_RETURN(
        session_, env_->sessions->Get(header.session_id(), RequestToken(header.token(), *ctx_)));
    MUON_RETURN_IF_ERROR(RequireUpdates(*session_, "ImportState"));
    const size_t n = session_->params().size();
    if (static_cast<size_t>(header.param_steps_size()) != n) {
      return absl::InvalidArgumentError(
          absl::StrCat("ImportStateHeader has ", header.param_steps_size(),
                       " param_steps; session ", session_->id(), " has ", n, " parameters"));
    }
    std::vector<StepAssembler::Tensor> tensors;
    for (uint32_t i = 0; i < n; ++i) {
      const SessionParam& p = session_->params()[i];
      if (header.param_steps(static_cast<int>(i)) < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("parameter ", i, " ('", p.spec.name, "'): param_steps must be >= 0"));
      }
      param_steps_.push_back(header.param_steps(static_cast<int>(i)));
      for (v1::StateTensor tensor : TensorsOf(p.spec.kind)) {
        slots_.push_back({i, tensor});
        tensors.push_back({absl::StrCat(p.spec.name, " ", v1::StateTensor_Name(tensor)),
                           NumElements(p.spec.shape) * static_cast<int64_t>(sizeof(float)),
                           static_cast<int64_t>(sizeof(float))});
      }
    }
    assembler_ = std::make_unique<StepAssembler>(std::move(tensors));
    return absl::OkStatus();
  }

  absl::Status OnHalfClose() {
    if (ctx_->IsCancelled()) {
      return absl::CancelledError("the ImportState stream was cancelled; no state changed");
    }
    if (session_ == nullptr) {
      return absl::InvalidArgumentError("the ImportState stream ended before its header");
    }
    for (uint32_t k = 0; k < slots_.size(); ++k) {
      MUON_RETURN_IF_ERROR(assembler_->CheckComplete(k));
    }
    // Copying whole tensors into the engine is engine work: off the reactor.
    env_->pool->Schedule([this] { Finish(ToGrpcStatus(Apply())); });
    return absl::OkStatus();
  }

  // All or nothing: every value is checked before any parameter changes.
  absl::Status Apply() {
    MUON_ASSIGN_OR_RETURN(Lease lease, session_->AwaitLease(kStateWait));
    if (session_->step() != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("ImportState: session ", session_->id(), " is at step ",
                       session_->step(), "; import into a new session, before its first step"));
    }
    const std::vector<SessionParam>& params = session_->params();
    if (params.size() != param_steps_.size()) {
      return absl::AbortedError(absl::StrCat("ImportState: session ", session_->id(),
                                             " had parameters added during the import; export "
                                             "and import again"));
    }
    std::vector<ParamState> states;
    for (size_t i = 0; i < params.size(); ++i) {
      MUON_ASSIGN_OR_RETURN(ParamState state, env_->engine->ExportState(params[i].engine_id));
      state.step = param_steps_[i];
      states.push_back(std::move(state));
    }
    for (uint32_t k = 0; k < slots_.size(); ++k) {
      const Slot& slot = slots_[k];
      std::vector<float>& values = *Field(states[slot.param], slot.tensor);
      std::unique_ptr<std::byte[]> bytes = assembler_->Take(k);
      std::memcpy(values.data(), bytes.get(), values.size() * sizeof(float));
      for (float v : values) {
        if (!std::isfinite(v) || (slot.tensor == v1::STATE_TENSOR_EXP_AVG_SQ && v < 0)) {
          return absl::InvalidArgumentError(absl::StrCat(
              "parameter ", slot.param, " ('", params[slot.param].spec.name, "'): ",
              v1::StateTensor_Name(slot.tensor), " holds ", v,
              slot.tensor == v1::STATE_TENSOR_EXP_AVG_SQ ? "; it must be finite and >= 0"
                                                          : "; it must be finite"));
        }
      }
    }
    for (size_t i = 0; i < params.size(); ++i) {
      MUON_RETURN_IF_ERROR(env_->engine->ImportState(params[i].engine_id, states[i]));
    }
    // What later steps build on: on disk before it is acknowledged whenever
    // checkpoints are on, as a weights upload.
    MUON_RETURN_IF_ERROR(env_->sessions->durability().AfterUpload(*session_));
    response_->set_step(session_->step());
    return absl::OkStatus();
  }

  const ServiceEnv* const env_;
  grpc::CallbackServerContext* const ctx_;
  v1::ImportStateResponse* const response_;
  v1::ImportStateRequest request_;
  std::shared_ptr<Session> session_;
  std::vector<int64_t> param_steps_;
  std::vector<Slot> slots_;
  std::unique_ptr<StepAssembler> assembler_;
};

}  // namespace

grpc::ServerWriteReactor<v1::ExportStateResponse>* NewExportStateReactor(
    const ServiceEnv* env, grpc::CallbackServerContext* ctx,
    const v1::ExportStateRequest* request) {
  return new ExportReactor(env, ctx, request);
}

grpc::ServerReadReactor<v1::ImportStateRequest>* NewImportStateReactor(
    const ServiceEnv* env, grpc::CallbackServerContext* ctx, v1::ImportStateResponse* response) {
  return new ImportReactor(env, ctx, response);
}

}  // namespace muon::server
