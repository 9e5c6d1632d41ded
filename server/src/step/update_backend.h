#ifndef MUON_SERVER_SRC_STEP_UPDATE_BACKEND_H_
#define MUON_SERVER_SRC_STEP_UPDATE_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "muon/kernels/engine.h"
#include "observability/metrics.h"
#include "session/durability.h"
#include "session/lease.h"
#include "session/session.h"
#include "step/step_backend.h"
#include "step/step_options.h"

namespace muon::server {

// What the step backends share. Everything outlives them.
struct StepBackendEnv {
  Engine* engine = nullptr;
  const Durability* durability = nullptr;
  StepReporter* metrics = nullptr;
  int orthogonality_sample_every = 0;  // ServerOptions
  int64_t update_chunk_bytes = 1 << 20;
  int64_t max_message_bytes = 4 << 20;
};

// UPDATES mode: each parameter's update is computed in a transaction as soon
// as its gradient is whole, and sent back the moment the engine has it (not
// when the rest of its engine call is done); StepEnd commits the step once
// every listed parameter is computed. A header with defer_compute holds the
// gradients until StepEnd, whose grad_scale multiplies them first. Work runs
// one task at a time on the pool (a StepTransaction is driven by one thread
// at a time); the updates are reported from the engine's threads. A
// benchmark_echo session runs no optimizer: each update is its gradient.
// Thread-safe; its tasks keep the stream (and so this) alive.
class UpdateStepBackend final : public StepBackend {
 public:
  UpdateStepBackend(const StepBackendEnv& env, std::shared_ptr<Session> session,
                    StepEvents* events);
  ~UpdateStepBackend() override;

  absl::StatusOr<Admission> Admit(const v1::StepHeader& header) override;
  void Gradient(uint32_t index, std::unique_ptr<std::byte[]> bytes) override;
  absl::Status End(std::vector<uint32_t> indices, int64_t bytes_received,
                   std::optional<double> grad_scale) override;
  void Replay() override;
  bool Abort() override;
  void Sent(double seconds) override;

 private:
  struct Ready {
    uint32_t index = 0;
    std::unique_ptr<std::byte[]> gradient;
    absl::Time complete_time;
  };

  void ScheduleLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The task: computes what is ready, then commits once all is.
  void Run();
  // Computes `batch` in the transaction and reports each update's chunks as
  // the engine finishes it. `scale`: StepEnd.grad_scale, applied to each
  // gradient first.
  absl::Status Compute(std::vector<Ready> batch, std::optional<float> scale);
  void Commit();
  // Discards the transaction and ends the lease (the session's step
  // unchanged). REQUIRES: no task using the transaction.
  void ReleaseLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const StepBackendEnv env_;
  const std::shared_ptr<Session> session_;
  StepEvents* const events_;

  // Set by Admit, read-only afterwards.
  v1::StepHeader header_;
  // Per parameter: this step's lr and hyper-parameters, from the header.
  std::vector<ParamStepInput> step_inputs_;
  std::optional<DType> update_dtype_;
  bool measure_orthogonality_ = false;
  absl::Time start_time_;
  std::shared_ptr<const StepRecord> replay_;

  // Driven by the one running task.
  std::unique_ptr<StepTransaction> txn_;

  absl::Mutex mu_;
  Lease lease_ ABSL_GUARDED_BY(mu_);  // held from a new step's admission to its end
  bool running_ ABSL_GUARDED_BY(mu_) = false;   // a task is scheduled or running
  bool aborted_ ABSL_GUARDED_BY(mu_) = false;
  std::deque<Ready> ready_ ABSL_GUARDED_BY(mu_);
  bool ended_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<uint32_t> step_params_ ABSL_GUARDED_BY(mu_);
  std::optional<float> grad_scale_ ABSL_GUARDED_BY(mu_);
  size_t computed_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<StepResponsePtr> responses_ ABSL_GUARDED_BY(mu_);  // for the record
  std::vector<std::pair<uint32_t, double>> ortho_ ABSL_GUARDED_BY(mu_);
  StepTimings timings_ ABSL_GUARDED_BY(mu_);
  int64_t bytes_received_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_sent_ ABSL_GUARDED_BY(mu_) = 0;
  // What the engine reported over this step's Compute calls.
  StepStats engine_stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STEP_UPDATE_BACKEND_H_
