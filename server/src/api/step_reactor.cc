// The Step stream's gRPC reactor: a thin adapter over StepMachine
// (step/step_machine.h), in the manner of gRPC's route_guide callback
// server. Step is a raw method: a gradient chunk's data is copied from
// gRPC's slices straight into its parameter's buffer (api/step_wire.h);
// every other message is parsed by protobuf, as the generated method would;
// an update chunk's data goes out as a slice of the buffer the engine wrote
// it into. Each reaction takes mu_, hands its event to the machine and runs
// the actions it returns after releasing mu_: StartRead, StartWrite and
// Finish may run a reaction inline. The backend (UPDATES or
// PARAMETER_SERVER) does its work on the server's pool and reports back
// through StepEvents, the same way.

#include <atomic>
#include <memory>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "api/auth.h"
#include "api/service.h"
#include "api/step_wire.h"
#include "muon/kernels/status_macros.h"
#include "muon/server/status_util.h"
#include "observability/metrics.h"
#include "ps/round_backend.h"
#include "session/registry.h"
#include "step/step_header.h"
#include "step/step_machine.h"
#include "step/update_backend.h"
#include "util/thread_pool.h"

namespace muon::server {
namespace {

class StepReactor final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>,
                          public StepEvents,
                          public DrainGate::Stream {
 public:
  StepReactor(const ServiceEnv* env, DrainGate* gate, grpc::CallbackServerContext* ctx)
      : env_(env),
        gate_(gate),
        ctx_(ctx),
        backend_env_{env->engine,
                     &env->sessions->durability(),
                     env->step_metrics,
                     env->options.orthogonality_sample_every,
                     env->options.update_chunk_bytes,
                     env->options.limits.max_message_bytes},
        machine_([this](const v1::StepHeader& header) { return Open(header); }) {
    absl::Status open = gate_->OpenStream(env_->options.limits.max_concurrent_streams, this);
    if (!open.ok()) {
      Finish(ToGrpcStatus(open));
      return;
    }
    stream_open_ = true;
    env_->step_metrics->StreamOpened();
    StepMachine::Actions actions;
    {
      absl::MutexLock lock(&mu_);
      actions = machine_.Start();
    }
    Run(actions);
  }

  // The stream ------------------------------------------------------------

  void OnReadDone(bool ok) override {
    StepMachine::Actions actions;
    {
      absl::MutexLock lock(&mu_);
      if (ok) {
        const int64_t before = machine_.bytes_received();
        actions = ReadLocked();
        env_->step_metrics->BytesReceived(machine_.bytes_received() - before);
      } else if (ctx_->IsCancelled()) {
        actions = CancelledLocked();
      } else {
        actions = machine_.ReadsEnded();
      }
    }
    Run(actions);
  }

  void OnWriteDone(bool ok) override {
    if (ok && writing_->message.has_update()) {
      env_->step_metrics->BytesSent(static_cast<int64_t>(writing_->update_data().size()));
    }
    StepMachine::Actions actions;
    {
      absl::MutexLock lock(&mu_);
      actions = machine_.WriteDone(ok);
    }
    Run(actions);
  }

  void OnCancel() override {
    StepMachine::Actions actions;
    {
      absl::MutexLock lock(&mu_);
      actions = CancelledLocked();
    }
    Run(actions);
  }

  void OnDone() override {
    if (counted_step_) gate_->EndStep();
    if (stream_open_) {
      gate_->CloseStream(this);
      env_->step_metrics->StreamClosed();
    }
    Unpin();  // gRPC's
  }

  // DrainGate::Stream -----------------------------------------------------

  void Stop() override {
    StepMachine::Actions actions;
    {
      absl::MutexLock lock(&mu_);
      actions = machine_.ShuttingDown();
    }
    Run(actions);
  }

  void Pin() override { refs_.fetch_add(1, std::memory_order_relaxed); }

  void Unpin() override {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  // StepEvents ------------------------------------------------------------

  void Schedule(absl::AnyInvocable<void() &&> work) override {
    Pin();
    env_->pool->Schedule([this, work = std::move(work)]() mutable {
      std::move(work)();
      Unpin();
    });
  }

  void Updates(std::vector<StepResponsePtr> responses) override {
    Deliver([&] { return machine_.Updates(std::move(responses)); });
  }

  void Committed(std::vector<StepResponsePtr> responses, bool replayed) override {
    Deliver([&] { return machine_.Committed(std::move(responses), replayed); });
  }

  void Failed(absl::Status status) override {
    Deliver([&] { return machine_.Failed(std::move(status)); });
  }

 private:
  ~StepReactor() override = default;

  template <typename Event>
  void Deliver(Event event) {
    StepMachine::Actions actions;
    {
      absl::MutexLock lock(&mu_);
      actions = event();
    }
    Run(actions);
  }

  // The message just read, to the machine.
  StepMachine::Actions ReadLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    WireChunk chunk;
    if (FindWireChunk(&read_buffer_, &chunk)) {
      StepMachine::Actions actions = machine_.ReadGradientDone(
          chunk.param_index, chunk.offset, chunk.dtype,
          StepAssembler::ChunkBytes{chunk.data_size, [&](std::byte* destination) {
                                      CopyWireChunkData(&read_buffer_, chunk, destination);
                                    }});
      read_buffer_.Clear();
      return actions;
    }
    // Deserialize releases the buffer.
    if (!grpc::SerializationTraits<v1::StepRequest>::Deserialize(&read_buffer_, &request_).ok()) {
      return machine_.ReadMalformed();
    }
    return machine_.ReadDone(request_);
  }

  // A cancel while the server drains is its shutdown cutting the stream.
  StepMachine::Actions CancelledLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return gate_->draining() ? machine_.ShuttingDown() : machine_.Cancelled();
  }

  void Run(const StepMachine::Actions& actions) {
    if (actions.read) StartRead(&read_buffer_);
    if (actions.write != nullptr) {
      writing_ = actions.write;
      // Its own message, so it serializes; a failure would be a bug of ours.
      grpc::Status serialized = EncodeStepResponse(writing_, &write_buffer_);
      if (!serialized.ok()) {
        OnWriteDone(/*ok=*/false);  // the stream fails as after a broken write
        return;
      }
      StartWrite(&write_buffer_);
    }
    if (actions.finish.has_value()) {
      // Counted before Finish, so a client that has its status sees it.
      env_->step_metrics->StepEnded(Outcome(*actions.finish));
      Finish(ToGrpcStatus(*actions.finish));
    }
  }

  // For muon_steps_total. A committed step counts as ok even when its
  // summary could not be delivered: it was applied.
  StepOutcome Outcome(const absl::Status& status) {
    absl::MutexLock lock(&mu_);
    if (machine_.committed()) return StepOutcome::kOk;
    if (machine_.replayed()) return StepOutcome::kRetried;
    return OutcomeOfFailure(static_cast<grpc::StatusCode>(status.code()));
  }

  // The machine's Opener: runs under mu_, from a read reaction.
  absl::StatusOr<std::unique_ptr<StepBackend>> Open(const v1::StepHeader& header) {
    MUON_ASSIGN_OR_RETURN(
        std::shared_ptr<Session> session,
        env_->sessions->Get(header.session_id(), RequestToken(header.token(), *ctx_)));
    MUON_RETURN_IF_ERROR(CheckStepHeader(header, *session));
    // From here until OnDone the stream counts as a step in flight, so a
    // drain that begins now waits for its summary to be written.
    MUON_RETURN_IF_ERROR(gate_->StartStep());
    counted_step_ = true;
    if (RoundsOf(*session) != nullptr) {
      return std::make_unique<RoundStepBackend>(backend_env_, std::move(session), this);
    }
    return std::make_unique<UpdateStepBackend>(backend_env_, std::move(session), this);
  }

  const ServiceEnv* const env_;
  DrainGate* const gate_;
  grpc::CallbackServerContext* const ctx_;
  const StepBackendEnv backend_env_;
  bool stream_open_ = false;
  bool counted_step_ = false;  // set by the read path before OnDone can run
  // Read and write reactions are each serialized.
  grpc::ByteBuffer read_buffer_;
  v1::StepRequest request_;  // a message other than a plain gradient chunk
  StepResponsePtr writing_;
  grpc::ByteBuffer write_buffer_;  // writing_, encoded
  // gRPC's reference until OnDone, and one per task or round holding this.
  std::atomic<int> refs_{1};

  absl::Mutex mu_;
  StepMachine machine_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* NewStepReactor(
    const ServiceEnv* env, DrainGate* gate, grpc::CallbackServerContext* ctx) {
  return new StepReactor(env, gate, ctx);
}

}  // namespace muon::server
