#include "step/update_backend.h"

#include <algorithm>
#include <cstring>
#include <iterator>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "muon/kernels/status_macros.h"
#include "step/chunker.h"
#include "step/grad_scale.h"
#include "step/replay.h"
#include "step/step_header.h"
#include "step/step_options.h"
#include "step/step_summary.h"
#include "wire/convert.h"

namespace muon::server {
namespace {

// The chunks of parameter `index`'s update `out`, sent (and replayed) from
// the update buffer itself, which `owner` keeps alive.
std::vector<StepResponsePtr> UpdateChunks(const StepBackendEnv& env, uint32_t index,
                                          const UpdateOutput& out,
                                          const std::shared_ptr<std::byte[]>& owner) {
  const int64_t total = static_cast<int64_t>(out.bytes.size());
  const int64_t chunk_bytes = ChunkPayloadBytes(env.update_chunk_bytes, env.max_message_bytes,
                                                static_cast<int64_t>(DTypeSize(out.dtype)));
  std::vector<StepResponsePtr> chunks;
  for (const ChunkRange& range : CutIntoChunks(total, chunk_bytes)) {
    auto response = std::make_shared<StepReply>();
    response->data = absl::MakeConstSpan(out.bytes.data() + range.offset,
                                         static_cast<size_t>(range.size));
    response->data_owner = owner;
    v1::UpdateChunk* chunk = response->message.mutable_update();
    chunk->set_param_index(index);
    chunk->set_offset(static_cast<uint64_t>(range.offset));
    chunk->set_dtype(DTypeToProto(out.dtype));
    chunk->set_decay(out.decay);
    chunk->set_total_bytes(static_cast<uint64_t>(total));
    chunk->set_content(v1::UPDATE_CONTENT_UPDATE);
    chunks.push_back(std::move(response));
  }
  return chunks;
}

// A benchmark_echo session's "update": the gradient itself, in the update's
// dtype (decay stays 1).
void EchoGradient(const GradientInput& gradient, UpdateOutput* update) {
  if (gradient.dtype == update->dtype) {
    std::memcpy(update->bytes.data(), gradient.bytes.data(), update->bytes.size());
    return;
  }
  constexpr size_t kBlock = 4096;
  float block[kBlock];
  const size_t in_width = DTypeSize(gradient.dtype);
  const size_t out_width = DTypeSize(update->dtype);
  const size_t count = gradient.bytes.size() / in_width;
  for (size_t done = 0; done < count; done += kBlock) {
    const size_t n = std::min(kBlock, count - done);
    DecodeToFloat(gradient.dtype, gradient.bytes.data() + done * in_width, n, block);
    EncodeFromFloat(update->dtype, block, n, update->bytes.data() + done * out_width);
  }
}

}  // namespace

UpdateStepBackend::UpdateStepBackend(const StepBackendEnv& env, std::shared_ptr<Session> session,
                                     StepEvents* events)
    : env_(env), session_(std::move(session)), events_(events) {}

UpdateStepBackend::~UpdateStepBackend() {
  absl::MutexLock lock(&mu_);
  ReleaseLocked();
}

absl::StatusOr<StepBackend::Admission> UpdateStepBackend::Admit(const v1::StepHeader& header) {
  if (header.update_dtype() != v1::DTYPE_UNSPECIFIED) {
    MUON_ASSIGN_OR_RETURN(update_dtype_, DTypeFromProto(header.update_dtype(), DType::kFloat32));
  }
  std::vector<const ParamSpec*> specs;
  for (const SessionParam& p : session_->params()) specs.push_back(&p.spec);
  MUON_ASSIGN_OR_RETURN(step_inputs_, StepInputsFromHeader(header, specs));
  MUON_ASSIGN_OR_RETURN(Session::Admission admitted,
                        session_->AdmitStep(header.step(), header.worker_id()));
  if (admitted.lease && session_->params().size() != specs.size()) {
    return absl::AbortedError(absl::StrCat("session ", session_->id(),
                                           " had parameters added while this step was admitted; "
                                           "retry the step"));
  }
  Admission admission;
  admission.session_id = session_->id();
  if (admitted.replay != nullptr) {
    replay_ = std::move(admitted.replay);
    admission.role = Role::kReplay;
    return admission;
  }
  header_ = header;
  start_time_ = absl::Now();
  measure_orthogonality_ = MeasuresOrthogonality(header.measure_orthogonality(), header.step(),
                                                 env_.orthogonality_sample_every);
  StepOptions options;
  options.measure_orthogonality = measure_orthogonality_;
  absl::StatusOr<std::unique_ptr<StepTransaction>> txn = env_.engine->BeginStep(options);
  absl::MutexLock lock(&mu_);
  lease_ = std::move(admitted.lease);
  if (!txn.ok()) {
    ReleaseLocked();
    return txn.status();
  }
  txn_ = std::move(*txn);
  admission.role = Role::kReceive;
  for (const SessionParam& p : session_->params()) {
    admission.params.push_back({p.spec.name, p.tensor_bytes, p.spec.dtype});
  }
  admission.gradient_buffers = &session_->gradient_buffers();
  return admission;
}

void UpdateStepBackend::Gradient(uint32_t index, std::unique_ptr<std::byte[]> bytes) {
  absl::MutexLock lock(&mu_);
  if (aborted_) return;
  ready_.push_back({index, std::move(bytes), absl::Now()});
  // Deferred: StepEnd's grad_scale must reach every gradient first.
  if (!header_.defer_compute()) ScheduleLocked();
}

absl::Status UpdateStepBackend::End(std::vector<uint32_t> indices, int64_t bytes_received,
                                    std::optional<double> grad_scale) {
  if (grad_scale.has_value()) {
    MUON_RETURN_IF_ERROR(CheckGradScale(*grad_scale, header_.defer_compute()));
  }
  absl::MutexLock lock(&mu_);
  // The client sends an fp32 factor (torch's clip coefficient) as a double:
  // this cast gives it back exactly.
  if (grad_scale.has_value() && *grad_scale != 1.0) grad_scale_ = static_cast<float>(*grad_scale);
  ended_ = true;
  step_params_ = std::move(indices);
  timings_.receive = absl::ToDoubleSeconds(absl::Now() - start_time_);
  bytes_received_ = bytes_received;
  ScheduleLocked();
  return absl::OkStatus();
}

void UpdateStepBackend::Replay() {
  ScheduleReplay(events_, *env_.durability, *session_, replay_);
}

bool UpdateStepBackend::Abort() {
  absl::MutexLock lock(&mu_);
  aborted_ = true;
  ready_.clear();
  if (running_) return false;  // the task ends with a terminal event
  ReleaseLocked();
  return true;
}

void UpdateStepBackend::Sent(double seconds) {
  absl::MutexLock lock(&mu_);
  timings_.send += seconds;
}

void UpdateStepBackend::ScheduleLocked() {
  if (running_) return;
  running_ = true;
  events_->Schedule([this] { Run(); });
}

void UpdateStepBackend::Run() {
  for (;;) {
    std::vector<Ready> batch;
    std::optional<float> scale;
    {
      absl::MutexLock lock(&mu_);
      scale = grad_scale_;
      if (aborted_) {
        running_ = false;
        ReleaseLocked();
        break;
      }
      if (ready_.empty()) {
        if (!ended_ || computed_ != step_params_.size()) {
          running_ = false;
          return;
        }
      } else {
        batch.assign(std::make_move_iterator(ready_.begin()),
                     std::make_move_iterator(ready_.end()));
        ready_.clear();
      }
    }
    if (batch.empty()) {
      Commit();
      return;
    }
    absl::Status computed = Compute(std::move(batch), scale);
    if (!computed.ok()) {
      {
        absl::MutexLock lock(&mu_);
        running_ = false;
        ReleaseLocked();
      }
      events_->Failed(std::move(computed));
      return;
    }
  }
  events_->Failed(absl::AbortedError("the step was abandoned; nothing was applied"));
}

absl::Status UpdateStepBackend::Compute(std::vector<Ready> batch, std::optional<float> scale) {
  const absl::Time start = absl::Now();
  const size_t n = batch.size();
  std::vector<GradientInput> inputs(n);
  std::vector<UpdateOutput> outputs(n);
  // From the session's shelves: the gradients go back for the next step;
  // the updates go back once the record and the writes let go of them.
  std::vector<std::shared_ptr<std::byte[]>> updates(n);
  std::vector<std::vector<float>> scaled(scale.has_value() ? n : 0);
  double queue_seconds = 0;
  double queue_longest = 0;
  for (size_t i = 0; i < n; ++i) {
    const SessionParam& p = session_->params()[batch[i].index];
    const double waited = absl::ToDoubleSeconds(start - batch[i].complete_time);
    queue_seconds += waited;
    queue_longest = std::max(queue_longest, waited);
    inputs[i].param = p.engine_id;
    inputs[i].dtype = p.spec.dtype;
    inputs[i].bytes = absl::MakeConstSpan(batch[i].gradient.get(), p.tensor_bytes);
    if (scale.has_value()) {
      scaled[i] = ScaledGradient(p.spec.dtype, inputs[i].bytes, *scale);
      inputs[i].dtype = DType::kFloat32;
      inputs[i].bytes = absl::MakeConstSpan(reinterpret_cast<const std::byte*>(scaled[i].data()),
                                            scaled[i].size() * sizeof(float));
    }
    inputs[i].lr = step_inputs_[batch[i].index].lr;
    inputs[i].hyper_params = step_inputs_[batch[i].index].hyper_params;
    const DType out_dtype = update_dtype_.value_or(p.spec.dtype);
    const int64_t update_bytes =
        NumElements(p.spec.shape) * static_cast<int64_t>(DTypeSize(out_dtype));
    updates[i] = session_->update_buffers().Take(batch[i].index, update_bytes);
    outputs[i].param = p.engine_id;
    outputs[i].dtype = out_dtype;
    outputs[i].bytes = absl::MakeSpan(updates[i].get(), static_cast<size_t>(update_bytes));
  }
  // Each update goes out the moment the engine has it, while the rest of the
  // batch computes: called on the engine's threads, several at once, each i
  // once (UpdateReadyFn). Should the call fail later, the chunks already
  // sent belong to a step that is never committed, and the stream fails.
  const bool echo = session_->config().benchmark_echo();
  const auto ready = [&](size_t i) {
    const uint32_t index = batch[i].index;
    const SessionParam& p = session_->params()[index];
    std::vector<StepResponsePtr> chunks = UpdateChunks(env_, index, outputs[i], updates[i]);
    const int64_t total = static_cast<int64_t>(outputs[i].bytes.size());
    updates[i].reset();
    session_->gradient_buffers().Give(index, p.tensor_bytes, std::move(batch[i].gradient));
    {
      absl::MutexLock lock(&mu_);
      bytes_sent_ += total;
      if (measure_orthogonality_ && !echo && p.spec.kind == OptimizerKind::kMuon) {
        ortho_.emplace_back(index, outputs[i].orthogonality_error);
      }
      responses_.insert(responses_.end(), chunks.begin(), chunks.end());
    }
    events_->Updates(std::move(chunks));
  };
  StepStats stats;
  if (echo) {
    for (size_t i = 0; i < n; ++i) {
      EchoGradient(inputs[i], &outputs[i]);
      ready(i);
    }
  } else {
    MUON_RETURN_IF_ERROR(txn_->Compute(inputs, absl::MakeSpan(outputs), &stats, ready));
  }
  const double compute_seconds = absl::ToDoubleSeconds(absl::Now() - start);
  absl::MutexLock lock(&mu_);
  timings_.queue += queue_seconds;
  timings_.queue_longest = std::max(timings_.queue_longest, queue_longest);
  timings_.compute += compute_seconds;
  engine_stats_ += stats;
  computed_ += n;
  return absl::OkStatus();
}

void UpdateStepBackend::Commit() {
  absl::Status status = txn_->Commit();
  if (!status.ok()) {
    {
      absl::MutexLock lock(&mu_);
      running_ = false;
      ReleaseLocked();
    }
    events_->Failed(status);
    return;
  }
  auto record = std::make_shared<StepRecord>();
  record->step = header_.step();
  {
    absl::MutexLock lock(&mu_);
    txn_.reset();
    SummaryInput summary;
    summary.step = header_.step();
    summary.param_indices = step_params_;
    summary.timings = timings_;
    summary.timings.total = absl::ToDoubleSeconds(absl::Now() - start_time_);
    summary.orthogonality = std::move(ortho_);
    summary.reply_orthogonality = header_.measure_orthogonality();
    summary.bytes_received = bytes_received_;
    summary.bytes_sent = bytes_sent_;
    summary.ns_flops = engine_stats_.ns_flops;
    summary.timings.device_compute = engine_stats_.device_compute_seconds;
    record->responses = std::move(responses_);
    record->responses.push_back(
        MakeReply(MakeSummary(std::move(summary), *session_, env_.metrics)));
  }
  std::shared_ptr<const StepRecord> committed = std::move(record);
  // The lease is held until it records the commit, so the write sees this
  // step's state; the stream's reactions go on meanwhile.
  absl::Status durable = env_.durability->AtCommit(
      *session_, Session::Snapshot{committed->step, absl::Now(), {committed}});
  {
    absl::MutexLock lock(&mu_);
    running_ = false;
    lease_.CommitStep(header_.worker_id(), committed);
  }
  if (!durable.ok()) {
    events_->Failed(durable);
  } else {
    events_->Committed({committed->responses.back()}, /*replayed=*/false);
  }
}

void UpdateStepBackend::ReleaseLocked() {
  if (!lease_.held()) return;
  txn_.reset();
  lease_.Release();
}

}  // namespace muon::server
