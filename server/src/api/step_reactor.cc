// The Step stream: header, gradient chunks, end; updates stream back as each
// parameter completes; the summary is the commit.
//
// Threads: gRPC runs the read and write reactions; the ThreadPool runs the
// engine work (one task at a time per step, since a StepTransaction is
// driven by one thread at a time). StartWrite and Finish are never called
// with mu_ held: a reaction may run inline inside them.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <deque>
#include <iostream>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "api/auth.h"
#include "wire/convert.h"
#include "observability/metrics.h"
#include "muon/kernels/status_macros.h"
#include "muon/server/status_util.h"
#include "ps/ps_round.h"
#include "api/service.h"
#include "session/registry.h"
#include "step/step_options.h"
#include "step/step_reader.h"
#include "util/thread_pool.h"

namespace muon::server {
namespace {

using StepResponsePtr = std::shared_ptr<const v1::StepResponse>;

class StepReactor final : public grpc::ServerBidiReactor<v1::StepRequest, v1::StepResponse>,
                          public RoundWaiter {
 public:
  StepReactor(const ServiceEnv* env, DrainGate* gate, grpc::CallbackServerContext* ctx)
      : env_(env), gate_(gate), ctx_(ctx) {
    absl::Status open = gate_->OpenStream(env_->options.limits.max_concurrent_streams);
    if (!open.ok()) {
      Actions actions;
      actions.finish = ToGrpcStatus(open);
      Run(actions);
      return;
    }
    stream_open_ = true;
    env_->step_metrics->StreamOpened();
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      OnHalfClose();
      return;
    }
    bool keep_reading = true;
    absl::Status status = HandleMessage(&keep_reading);
    if (!status.ok()) {
      Fail(status);
      return;
    }
    {
      // A step that already failed (say, in the engine) reads no further.
      absl::MutexLock lock(&mu_);
      if (finish_requested_) keep_reading = false;
    }
    if (keep_reading) StartRead(&request_);
  }

  void OnWriteDone(bool ok) override {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      send_seconds_ += absl::ToDoubleSeconds(absl::Now() - write_start_);
      if (ok && !writes_.empty() && writes_.front()->has_update()) {
        env_->step_metrics->BytesSent(
            static_cast<int64_t>(writes_.front()->update().data().size()));
      }
      if (!ok) {
        // The client went away; nothing more can be sent.
        writes_.clear();
        FailLocked(absl::CancelledError("the stream broke while sending updates"), &actions);
      } else {
        if (!writes_.empty()) writes_.pop_front();
        if (write_after_end_) ConfirmEndLocked();
        NextWriteLocked(&actions);
      }
      TryFinishLocked(&actions);
    }
    Run(actions);
  }

  void OnCancel() override {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      FailLocked(absl::CancelledError(
                     "the client cancelled the step or the connection broke; nothing was applied"),
                 &actions);
    }
    Run(actions);
    LeaveRound();
  }

  // PARAMETER_SERVER: the round this stream waits on has ended.
  void RoundDone(absl::StatusOr<std::shared_ptr<const StepRecord>> result) override {
    if (!result.ok()) {
      Fail(result.status());
    } else {
      Actions actions;
      {
        absl::MutexLock lock(&mu_);
        if (!failed_) {
          for (const StepResponsePtr& r : (*result)->responses) writes_.push_back(r);
          // The round committed without this stream: nothing to hold back
          // for (NextWriteLocked), and anything the client still sends is
          // ignored.
          reads_ended_ = true;
          committed_ = true;
          finish_requested_ = true;
          NextWriteLocked(&actions);
          TryFinishLocked(&actions);
        }
      }
      Run(actions);
    }
    Unref();  // the round's reference
  }

  void OnDone() override {
    if (counted_step_) gate_->EndStep();
    if (stream_open_) {
      gate_->CloseStream();
      env_->step_metrics->StreamClosed();
    }
    Unref();
  }

 private:
  // What to do on the stream once mu_ is released.
  struct Actions {
    const v1::StepResponse* write = nullptr;
    std::optional<grpc::Status> finish;
  };

  struct Ready {
    uint32_t index = 0;
    std::unique_ptr<std::byte[]> gradient;
    absl::Time complete_time;
  };

  ~StepReactor() override {
    absl::MutexLock lock(&mu_);
    ReleaseLocked();
  }

  void Run(const Actions& actions) {
    if (actions.write != nullptr) StartWrite(actions.write);
    if (actions.finish.has_value()) {
      final_code_ = actions.finish->error_code();
      // Counted before Finish, so a client that has its status sees it.
      env_->step_metrics->StepEnded(Outcome());
      Finish(*actions.finish);
    }
  }

  // For muon_steps_total, as the stream finishes. A committed step counts
  // as ok even when its summary could not be delivered: it was applied.
  StepOutcome Outcome() {
    absl::MutexLock lock(&mu_);
    if (committed_) return StepOutcome::kOk;
    if (replayed_) return StepOutcome::kRetried;
    if (final_code_ == grpc::StatusCode::OK) return StepOutcome::kAborted;  // not reached
    return OutcomeOfFailure(final_code_);
  }

  void Unref() {
    bool last = false;
    {
      absl::MutexLock lock(&mu_);
      last = --refs_ == 0;
    }
    if (last) delete this;
  }

  // Read path -------------------------------------------------------------
  // (read reactions are serialized, so request_ and reader_ need no lock.)

  absl::Status HandleMessage(bool* keep_reading) {
    if (request_.has_gradient() && !reader_.expects_header()) {
      env_->step_metrics->BytesReceived(static_cast<int64_t>(request_.gradient().data().size()));
    }
    MUON_ASSIGN_OR_RETURN(StepReader::Event event, reader_.Read(request_));
    if (request_.has_end()) *keep_reading = false;
    return HandleEvent(std::move(event), /*by_step_end=*/true);
  }

  void OnHalfClose() {
    if (ctx_->IsCancelled()) {
      Fail(absl::CancelledError("the step's stream was cancelled; nothing was applied"));
      return;
    }
    absl::StatusOr<StepReader::Event> event = reader_.HalfClose();
    absl::Status status =
        event.ok() ? HandleEvent(std::move(*event), /*by_step_end=*/false) : event.status();
    if (!status.ok()) Fail(status);
  }

  // by_step_end: the event came from a message, not from the end of reads.
  absl::Status HandleEvent(StepReader::Event event, bool by_step_end) {
    switch (event.kind) {
      case StepReader::Event::Kind::kNone:
        return absl::OkStatus();
      case StepReader::Event::Kind::kHeader:
        return OnHeader(*event.header);
      case StepReader::Event::Kind::kComplete:
        if (rounds_ != nullptr) {
          round_tensors_[event.index] = reader_.Take(event.index);
        } else {
          EnqueueReady(event.index);
        }
        return absl::OkStatus();
      case StepReader::Event::Kind::kEnd:
        if (rounds_ != nullptr) return Contribute(event.indices);
        OnEnd(std::move(event.indices), by_step_end);
        return absl::OkStatus();
      case StepReader::Event::Kind::kReplay:
        // A parameter-server stream whose worker already contributed waits
        // for its round instead.
        if (!waiting_for_round_) StartReplay();
        return absl::OkStatus();
    }
    return absl::OkStatus();
  }

  absl::Status OnHeader(const v1::StepHeader& header) {
    MUON_ASSIGN_OR_RETURN(
        session_, env_->sessions->Get(header.session_id(), RequestToken(header.token(), *ctx_)));
    if (header.worker_id() >= session_->num_workers()) {
      return absl::InvalidArgumentError(
          absl::StrCat("worker_id ", header.worker_id(), " is out of range: session ",
                       session_->id(), " has ", session_->num_workers(), " worker(s)"));
    }
    const bool parameter_server = session_->mode() == v1::SESSION_MODE_PARAMETER_SERVER;
    std::vector<const ParamSpec*> specs;
    for (const SessionParam& p : session_->params()) specs.push_back(&p.spec);
    MUON_ASSIGN_OR_RETURN(step_inputs_, StepInputsFromHeader(header, specs, parameter_server));
    if (header.update_dtype() != v1::DTYPE_UNSPECIFIED) {
      MUON_ASSIGN_OR_RETURN(DType dtype, DTypeFromProto(header.update_dtype(), DType::kFloat32));
      update_dtype_ = dtype;
    }
    if (header.update_content() == v1::UPDATE_CONTENT_WEIGHTS && !parameter_server) {
      return absl::InvalidArgumentError(absl::StrCat(
          "StepHeader.update_content is WEIGHTS but session ", session_->id(),
          " is in UPDATES mode, where the server holds no weights; leave it unset"));
    }
    header_ = header;
    start_time_ = absl::Now();

    // From here until OnDone the stream counts as a step in flight, so a
    // drain that begins now waits for its summary to be written.
    MUON_RETURN_IF_ERROR(gate_->StartStep());
    counted_step_ = true;
    if (parameter_server) return JoinRound(header);
    absl::StatusOr<Session::Admission> admission =
        session_->AdmitStep(header.step(), header.worker_id());
    if (!admission.ok()) return admission.status();
    if (admission->replay != nullptr) {
      replay_ = std::move(admission->replay);
      reader_.Replay();
      return absl::OkStatus();
    }
    // The server samples every Nth step of each session for the
    // orthogonality histogram; step numbers are per session and
    // consecutive, so this needs no state.
    const int sample_every = env_->options.orthogonality_sample_every;
    measure_orthogonality_ = header.measure_orthogonality() ||
                             (sample_every > 0 && header.step() % sample_every == 0);
    StepOptions options;
    options.measure_orthogonality = measure_orthogonality_;
    absl::StatusOr<std::unique_ptr<StepTransaction>> txn = env_->engine->BeginStep(options);
    absl::MutexLock lock(&mu_);
    lease_ = std::move(admission->lease);  // ReleaseLocked aborts the step from here on
    if (!txn.ok()) return txn.status();
    txn_ = std::move(*txn);
    std::vector<StepReader::Param> params;
    params.reserve(session_->params().size());
    for (const SessionParam& p : session_->params()) {
      params.push_back({p.spec.name, p.tensor_bytes, p.spec.dtype});
    }
    reader_.Receive(session_->id(), std::move(params));
    record_.step = header.step();
    return absl::OkStatus();
  }

  // The step's parameters are known and complete: commit once computed.
  //
  // gRPC ends reads with OnReadDone(false) both for a half-close and for a
  // read that failed (a message over --max_message_bytes, one that does not
  // parse); IsCancelled() may turn true only later. So a step ended without
  // StepEnd commits only once an operation started after the end succeeded,
  // which it cannot on a broken call: the initial metadata when nothing was
  // sent yet, else the update NextWriteLocked held back.
  void OnEnd(std::vector<uint32_t> indices, bool by_step_end) {
    Actions actions;
    bool probe = false;
    {
      absl::MutexLock lock(&mu_);
      if (failed_) return;
      ended_ = true;
      reads_ended_ = true;
      if (by_step_end) end_confirmed_ = true;
      expected_ = indices.size();
      step_params_ = std::move(indices);
      receive_seconds_ = absl::ToDoubleSeconds(absl::Now() - start_time_);
      bytes_received_ = reader_.bytes_received();
      ScheduleComputeLocked();
      if (!end_confirmed_ && !wrote_) {
        wrote_ = true;
        probing_ = true;
        probe = true;
      } else {
        NextWriteLocked(&actions);
      }
    }
    if (probe) StartSendInitialMetadata();
    Run(actions);
  }

  void OnSendInitialMetadataDone(bool ok) override {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      probing_ = false;
      if (!ok) {
        FailLocked(
            absl::CancelledError("the step's stream broke before its end; nothing was applied"),
            &actions);
      } else {
        ConfirmEndLocked();
        NextWriteLocked(&actions);
      }
      TryFinishLocked(&actions);
    }
    Run(actions);
  }

  // The stream was whole after its end: the step may commit.
  void ConfirmEndLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (end_confirmed_) return;
    end_confirmed_ = true;
    if (ended_ && !failed_) ScheduleComputeLocked();
  }

  // PARAMETER_SERVER: joins the round of the header's step.
  absl::Status JoinRound(const v1::StepHeader& header) {
    ParameterServerRounds* rounds = RoundsOf(*session_);
    {
      absl::MutexLock lock(&mu_);
      ++refs_;  // the round's, while this stream is registered with it
    }
    // Set before joining, so that a cancel racing with the join leaves the
    // round (Leave is a no-op for a stream it does not hold).
    rounds_ = rounds;
    absl::StatusOr<ParameterServerRounds::Admission> admission =
        rounds->Join(header.step(), header.worker_id(), this);
    if (!admission.ok() || admission->role == ParameterServerRounds::Role::kReplay) {
      rounds_ = nullptr;
      Unref();
    }
    if (!admission.ok()) return admission.status();
    switch (admission->role) {
      case ParameterServerRounds::Role::kReplay:
        replay_ = std::move(admission->replay);
        reader_.Replay();
        return absl::OkStatus();
      case ParameterServerRounds::Role::kWait:
        waiting_for_round_ = true;
        reader_.Replay();  // its chunks are ignored: they are in the round already
        return absl::OkStatus();
      case ParameterServerRounds::Role::kContribute:
        break;
    }
    round_id_ = admission->round;
    std::vector<StepReader::Param> params;
    params.reserve(session_->params().size());
    for (const SessionParam& p : session_->params()) {
      params.push_back({p.spec.name, p.tensor_bytes, p.spec.dtype});
    }
    reader_.Receive(session_->id(), std::move(params));
    round_tensors_.resize(session_->params().size());
    return absl::OkStatus();
  }

  // PARAMETER_SERVER: hands this worker's whole gradient to the round.
  absl::Status Contribute(const std::vector<uint32_t>& indices) {
    const std::vector<SessionParam>& params = session_->params();
    if (indices.size() != params.size()) {
      for (uint32_t i = 0; i < params.size(); ++i) {
        if (!std::binary_search(indices.begin(), indices.end(), i)) {
          return absl::InvalidArgumentError(absl::StrCat(
              "a PARAMETER_SERVER step carries every parameter; parameter ", i, " ('",
              params[i].spec.name, "') is missing"));
        }
      }
    }
    WorkerGradients gradients;
    gradients.worker = header_.worker_id();
    gradients.tensors = std::move(round_tensors_);
    gradients.format.dtype = update_dtype_;
    gradients.format.content = header_.update_content() == v1::UPDATE_CONTENT_UPDATE
                                   ? v1::UPDATE_CONTENT_UPDATE
                                   : v1::UPDATE_CONTENT_WEIGHTS;
    if (header_.has_lr()) gradients.lr = header_.lr();
    if (header_.has_lr_scale()) gradients.lr_scale = header_.lr_scale();
    gradients.measure_orthogonality = header_.measure_orthogonality();
    gradients.bytes_received = reader_.bytes_received();
    {
      absl::MutexLock lock(&mu_);
      ++refs_;
    }
    // Decoding and summing (and, for the last worker, the step) is engine
    // work: off the reactor.
    auto shared = std::make_shared<WorkerGradients>(std::move(gradients));
    env_->pool->Schedule([this, shared] {
      absl::Status status = rounds_.load()->Contribute(round_id_, std::move(*shared));
      if (!status.ok()) Fail(status);
      Unref();
    });
    return absl::OkStatus();
  }

  // PARAMETER_SERVER: this stream no longer waits on its round.
  void LeaveRound() {
    ParameterServerRounds* rounds = rounds_.load();
    if (rounds != nullptr && rounds->Leave(this)) Unref();
  }

  void EnqueueReady(uint32_t index) {
    absl::MutexLock lock(&mu_);
    if (failed_) return;
    ready_.push_back({index, reader_.Take(index), absl::Now()});
    ScheduleComputeLocked();
  }

  // REQUIRES: mu_ held.
  void ScheduleComputeLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (compute_running_) return;
    compute_running_ = true;
    ++refs_;
    env_->pool->Schedule([this] {
      RunCompute();
      Unref();
    });
  }

  void StartReplay() {
    const Durability& durability = env_->sessions->durability();
    if (durability.ReplayNeedsWrite(*session_)) {
      {
        absl::MutexLock lock(&mu_);
        ++refs_;
      }
      env_->pool->Schedule([this, durability = &durability] {
        absl::Status written = durability->WriteBeforeReplay(*session_, replay_->step);
        if (written.ok()) {
          ReplayRecorded();
        } else {
          Fail(written);
        }
        Unref();
      });
      return;
    }
    ReplayRecorded();
  }

  void ReplayRecorded() {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      if (failed_) return;
      const std::vector<StepResponsePtr>& responses = replay_->responses;
      for (size_t i = 0; i + 1 < responses.size(); ++i) writes_.push_back(responses[i]);
      auto summary = std::make_shared<v1::StepResponse>(*responses.back());
      summary->mutable_summary()->set_replayed(true);
      writes_.push_back(std::move(summary));
      finish_requested_ = true;
      replayed_ = true;
      reads_ended_ = true;
      NextWriteLocked(&actions);
      TryFinishLocked(&actions);
    }
    Run(actions);
  }

  // Compute path (pool) ---------------------------------------------------

  void RunCompute() {
    for (;;) {
      std::vector<Ready> batch;
      bool commit = false;
      Actions actions;
      bool stop = false;
      {
        absl::MutexLock lock(&mu_);
        if (failed_) {
          compute_running_ = false;
          ReleaseLocked();
          TryFinishLocked(&actions);
          stop = true;
        } else if (ready_.empty()) {
          if (!ended_ || computed_ != expected_ || committed_ || !end_confirmed_) {
            compute_running_ = false;
            return;
          }
          commit = true;
        } else {
          batch.assign(std::make_move_iterator(ready_.begin()),
                       std::make_move_iterator(ready_.end()));
          ready_.clear();
        }
      }
      if (stop) {
        Run(actions);
        return;
      }
      if (commit) {
        CommitStep();
        return;
      }
      ComputeBatch(std::move(batch));
    }
  }

  void ComputeBatch(std::vector<Ready> batch) {
    const absl::Time start = absl::Now();
    const size_t n = batch.size();
    std::vector<GradientInput> inputs(n);
    std::vector<UpdateOutput> outputs(n);
    std::vector<std::unique_ptr<std::byte[]>> updates(n);
    std::vector<int64_t> update_bytes(n);
    double queue_seconds = 0;
    for (size_t i = 0; i < n; ++i) {
      const SessionParam& p = session_->params()[batch[i].index];
      queue_seconds += absl::ToDoubleSeconds(start - batch[i].complete_time);
      inputs[i].param = p.engine_id;
      inputs[i].dtype = p.spec.dtype;
      inputs[i].bytes = absl::MakeConstSpan(batch[i].gradient.get(), p.tensor_bytes);
      inputs[i].lr = step_inputs_[batch[i].index].lr;
      inputs[i].hyper_params = step_inputs_[batch[i].index].hyper_params;
      const DType out_dtype = update_dtype_.value_or(p.spec.dtype);
      update_bytes[i] = NumElements(p.spec.shape) * static_cast<int64_t>(DTypeSize(out_dtype));
      updates[i].reset(new std::byte[update_bytes[i]]);
      outputs[i].param = p.engine_id;
      outputs[i].dtype = out_dtype;
      outputs[i].bytes = absl::MakeSpan(updates[i].get(), update_bytes[i]);
    }
    StepStats stats;
    absl::Status status = txn_->Compute(inputs, absl::MakeSpan(outputs), &stats);
    const double compute_seconds = absl::ToDoubleSeconds(absl::Now() - start);

    // Build the update chunks outside the lock.
    std::vector<StepResponsePtr> responses;
    if (status.ok()) {
      const int64_t chunk_bytes = ChunkBytes();
      for (size_t i = 0; i < n; ++i) {
        for (int64_t offset = 0; offset < update_bytes[i]; offset += chunk_bytes) {
          auto response = std::make_shared<v1::StepResponse>();
          v1::UpdateChunk* chunk = response->mutable_update();
          chunk->set_param_index(batch[i].index);
          chunk->set_offset(static_cast<uint64_t>(offset));
          chunk->set_data(reinterpret_cast<const char*>(updates[i].get()) + offset,
                          static_cast<size_t>(std::min(chunk_bytes, update_bytes[i] - offset)));
          chunk->set_dtype(DTypeToProto(outputs[i].dtype));
          chunk->set_decay(outputs[i].decay);
          chunk->set_total_bytes(static_cast<uint64_t>(update_bytes[i]));
          chunk->set_content(v1::UPDATE_CONTENT_UPDATE);
          responses.push_back(std::move(response));
        }
      }
    }

    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      if (!status.ok()) {
        FailLocked(status, &actions);
      } else if (!failed_) {
        queue_seconds_ += queue_seconds;
        compute_seconds_ += compute_seconds;
        ns_flops_ += stats.ns_flops;
        computed_ += n;
        for (size_t i = 0; i < n; ++i) {
          bytes_sent_ += update_bytes[i];
          if (measure_orthogonality_ &&
              session_->params()[batch[i].index].spec.kind == OptimizerKind::kMuon) {
            ortho_.emplace_back(batch[i].index, outputs[i].orthogonality_error);
          }
        }
        for (StepResponsePtr& r : responses) {
          record_.responses.push_back(r);
          writes_.push_back(std::move(r));
        }
        NextWriteLocked(&actions);
      }
    }
    Run(actions);
  }

  int64_t ChunkBytes() const {
    // Leave room for the chunk's other fields under the message limit.
    const int64_t limit = env_->options.limits.max_message_bytes - 1024;
    return std::max<int64_t>(1024, std::min<int64_t>(env_->options.update_chunk_bytes, limit));
  }

  void CommitStep() {
    absl::Status status = txn_->Commit();
    std::shared_ptr<const StepRecord> record;
    if (!status.ok()) {
      Actions actions;
      {
        absl::MutexLock lock(&mu_);
        compute_running_ = false;
        FailLocked(status, &actions);
        ReleaseLocked();
        TryFinishLocked(&actions);
      }
      Run(actions);
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      committed_ = true;
      txn_.reset();
      record_.responses.push_back(SummaryLocked());
      record = std::make_shared<const StepRecord>(std::move(record_));
    }
    // Outside mu_: the write may take long, and the stream's reactions need
    // mu_ meanwhile. The session stays held (in flight) until CommitStep.
    absl::Status durable = WriteCheckpointIfDue(record);
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      compute_running_ = false;
      lease_.CommitStep(header_.worker_id(), record);
      if (!durable.ok()) {
        FailLocked(durable, &actions);
        TryFinishLocked(&actions);  // a stream that failed earlier waited for the release
      } else {
        writes_.push_back(record->responses.back());
        finish_requested_ = true;
        NextWriteLocked(&actions);
        TryFinishLocked(&actions);
      }
    }
    Run(actions);
  }

  // The summary of the step just committed in the engine; reports metrics.
  StepResponsePtr SummaryLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto response = std::make_shared<v1::StepResponse>();
    v1::StepSummary* summary = response->mutable_summary();
    summary->set_step(record_.step);
    for (uint32_t i : step_params_) summary->add_param_indices(i);
    StepTimings timings;
    timings.receive = receive_seconds_;
    timings.queue = queue_seconds_;
    timings.compute = compute_seconds_;
    timings.send = send_seconds_;
    timings.total = absl::ToDoubleSeconds(absl::Now() - start_time_);
    v1::StepTimings* t = summary->mutable_timings();
    t->set_receive_seconds(timings.receive);
    t->set_queue_seconds(timings.queue);
    t->set_compute_seconds(timings.compute);
    t->set_send_seconds(timings.send);
    t->set_total_seconds(timings.total);
    env_->step_metrics->StepCommitted(timings, static_cast<int64_t>(step_params_.size()));
    std::sort(ortho_.begin(), ortho_.end());
    for (const auto& [index, error] : ortho_) {
      env_->step_metrics->OrthogonalityError(session_->params()[index].spec.hp.ns_schedule, error);
      // Server-side samples stay out of the reply: the client did not ask.
      if (!header_.measure_orthogonality()) continue;
      v1::OrthogonalityError* e = summary->add_orthogonality_errors();
      e->set_param_index(index);
      e->set_error(error);
    }
    summary->set_bytes_received(static_cast<uint64_t>(bytes_received_));
    summary->set_bytes_sent(static_cast<uint64_t>(bytes_sent_));
    summary->set_ns_flops(ns_flops_);
    return response;
  }

  // Writes the session as of the step just committed in the engine when
  // durability asks for it (session/durability.h says what a failed write
  // means).
  absl::Status WriteCheckpointIfDue(const std::shared_ptr<const StepRecord>& record) {
    Session::Snapshot snapshot = session_->TakeSnapshot();
    snapshot.step = record->step;
    snapshot.last_step_time = absl::Now();
    snapshot.records[header_.worker_id()] = record;
    return env_->sessions->durability().AtCommit(*session_, snapshot);
  }

  // Shared ----------------------------------------------------------------

  void Fail(const absl::Status& status) {
    Actions actions;
    {
      absl::MutexLock lock(&mu_);
      FailLocked(status, &actions);
    }
    Run(actions);
    LeaveRound();
  }

  // The first error wins; a committed or replayed step keeps its OK.
  void FailLocked(const absl::Status& status, Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (failed_ || finish_requested_) return;
    failed_ = true;
    status_ = status;
    ready_.clear();
    // Updates not yet on the wire are dropped; one being written finishes.
    if (writing_) {
      while (writes_.size() > 1) writes_.pop_back();
    } else {
      writes_.clear();
    }
    finish_requested_ = true;
    if (!compute_running_) ReleaseLocked();
    TryFinishLocked(actions);
  }

  // Discards the transaction and frees the session for the next step.
  // REQUIRES: no compute running on txn_.
  void ReleaseLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!lease_.held()) return;
    txn_.reset();
    lease_.Release();
  }

  void NextWriteLocked(Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || probing_ || finished_ || writes_.empty()) return;
    // While the client may still send, one update stays queued, so that a
    // step ended by a half-close has a write left to confirm it (OnEnd).
    if (!reads_ended_ && writes_.size() == 1) return;
    writing_ = true;
    wrote_ = true;
    write_after_end_ = reads_ended_;
    write_start_ = absl::Now();
    actions->write = writes_.front().get();
  }

  // Finishes once everything queued is written and the session is released.
  void TryFinishLocked(Actions* actions) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!finish_requested_ || finished_ || writing_ || probing_ || lease_.held()) return;
    if (!failed_ && !writes_.empty()) return;
    finished_ = true;
    actions->finish = failed_ ? ToGrpcStatus(status_) : grpc::Status::OK;
  }

  const ServiceEnv* const env_;
  DrainGate* const gate_;
  grpc::CallbackServerContext* const ctx_;
  bool stream_open_ = false;
  bool counted_step_ = false;  // set by the read path before OnDone can run
  // Set once, just before Finish.
  grpc::StatusCode final_code_ = grpc::StatusCode::OK;

  // Read path only.
  v1::StepRequest request_;
  StepReader reader_;
  std::shared_ptr<const StepRecord> replay_;
  // PARAMETER_SERVER: this worker's complete gradients, by parameter.
  std::vector<std::unique_ptr<std::byte[]>> round_tensors_;

  // Set by the header before any compute is scheduled; read-only afterwards.
  std::shared_ptr<Session> session_;
  // PARAMETER_SERVER: the round this stream is registered with. Atomic:
  // OnCancel reads it on another thread.
  std::atomic<ParameterServerRounds*> rounds_{nullptr};
  uint64_t round_id_ = 0;  // the round joined to contribute
  bool waiting_for_round_ = false;  // joined as kWait: the round answers
  v1::StepHeader header_;
  // Per parameter: this step's lr and hyper-parameters, from the header.
  std::vector<ParamStepInput> step_inputs_;
  std::optional<DType> update_dtype_;
  bool measure_orthogonality_ = false;  // asked by the client or sampled
  absl::Time start_time_;

  // Driven by the one running compute task (compute_running_).
  std::unique_ptr<StepTransaction> txn_;

  absl::Mutex mu_;
  int refs_ ABSL_GUARDED_BY(mu_) = 1;  // gRPC's, until OnDone; +1 per pool task
  Lease lease_ ABSL_GUARDED_BY(mu_);  // held from a new step's admission to its end
  bool compute_running_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<Ready> ready_ ABSL_GUARDED_BY(mu_);
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
  size_t expected_ ABSL_GUARDED_BY(mu_) = 0;
  size_t computed_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<uint32_t> step_params_ ABSL_GUARDED_BY(mu_);
  bool committed_ ABSL_GUARDED_BY(mu_) = false;
  bool replayed_ ABSL_GUARDED_BY(mu_) = false;
  bool failed_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  std::deque<StepResponsePtr> writes_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  // The end of the client's messages (StepEnd, half-close or failed read)
  // and whether the stream was known whole then (see OnEnd).
  bool reads_ended_ ABSL_GUARDED_BY(mu_) = false;
  bool end_confirmed_ ABSL_GUARDED_BY(mu_) = false;
  bool wrote_ ABSL_GUARDED_BY(mu_) = false;            // initial metadata is on its way
  bool write_after_end_ ABSL_GUARDED_BY(mu_) = false;  // of the write in flight
  bool probing_ ABSL_GUARDED_BY(mu_) = false;          // StartSendInitialMetadata in flight
  absl::Time write_start_ ABSL_GUARDED_BY(mu_);
  bool finish_requested_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  StepRecord record_ ABSL_GUARDED_BY(mu_);
  std::vector<std::pair<uint32_t, double>> ortho_ ABSL_GUARDED_BY(mu_);
  double receive_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  double queue_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  double compute_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  double send_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_received_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_sent_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t ns_flops_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace

grpc::ServerBidiReactor<v1::StepRequest, v1::StepResponse>* NewStepReactor(
    const ServiceEnv* env, DrainGate* gate, grpc::CallbackServerContext* ctx) {
  return new StepReactor(env, gate, ctx);
}

}  // namespace muon::server
