#ifndef MUON_SERVER_SRC_PS_ROUND_H_
#define MUON_SERVER_SRC_PS_ROUND_H_

// PARAMETER_SERVER steps: the W workers of a session each stream their
// gradients for step N; once all W are in, the server averages them in fp32,
// applies one step to the weights it holds and answers every worker with
// the new weights (or the update). docs/parameter-server.md.

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "muon/kernels/engine.h"
#include "muon/v1/optimizer.pb.h"
#include "session/durability.h"
#include "session/session.h"

namespace muon::server {

class StepReporter;

// How PARAMETER_SERVER rounds run.
struct RoundOptions {
  StepReporter* metrics = nullptr;
  // How long a round waits for all its workers, from its first stream.
  absl::Duration worker_timeout = absl::Seconds(120);
  // Largest UpdateChunk payload asked for, and the message limit it must
  // fit in (step/chunker.h).
  int64_t chunk_bytes = 1 << 20;
  int64_t max_message_bytes = 4 << 20;
  // Every Nth step is measured for the orthogonality histogram (0: never).
  int orthogonality_sample_every = 0;
};

// A worker's stream waiting for its round to end.
class RoundWaiter {
 public:
  virtual ~RoundWaiter() = default;
  // Called once, with no lock held: the worker's record of the committed
  // step, or why the round failed (nothing applied).
  virtual void RoundDone(absl::StatusOr<std::shared_ptr<const StepRecord>> result) = 0;
};

// What a worker asks to get back.
struct ReplyFormat {
  std::optional<DType> dtype;  // unset: each parameter's dtype
  v1::UpdateContent content = v1::UPDATE_CONTENT_WEIGHTS;
  bool operator==(const ReplyFormat& other) const {
    return dtype == other.dtype && content == other.content;
  }
};

// One worker's whole gradient for a round.
struct WorkerGradients {
  uint32_t worker = 0;
  // By parameter index: every parameter, raw bytes in its registered dtype.
  std::vector<std::unique_ptr<std::byte[]>> tensors;
  ReplyFormat format;
  std::optional<double> lr;
  std::optional<double> lr_scale;
  bool measure_orthogonality = false;
  int64_t bytes_received = 0;
};

// The rounds of one PARAMETER_SERVER session. Thread-safe.
class ParameterServerRounds final : public SessionRounds {
 public:
  using Options = RoundOptions;

  // Everything outlives the rounds; `session` owns them.
  ParameterServerRounds(Session* session, Engine* engine, const Durability* durability,
                        const Options& options);

  enum class Role {
    kContribute,  // send the gradients with Contribute
    kWait,        // already contributed (a resend): ignore the chunks, wait
    kReplay,      // an old step: answer with `replay`
  };
  struct Admission {
    Role role = Role::kContribute;
    std::shared_ptr<const StepRecord> replay;
    // Names the round joined, for Contribute.
    uint64_t round = 0;
  };

  // A worker's stream for `step`. For kContribute and kWait `waiter` is
  // registered and told how the round ends, unless it Leaves first.
  // FailedPrecondition for a step ahead or long gone; Aborted when the
  // worker already has a live stream for the step, or the session is held.
  absl::StatusOr<Admission> Join(uint64_t step, uint32_t worker, RoundWaiter* waiter);

  // The waiter's stream ended. True when it was still registered (it will
  // not be called); false when its RoundDone has been or is being called.
  bool Leave(RoundWaiter* waiter);

  // Adds a worker's gradients to `round` (from its Join); workers add in
  // parallel, each parameter under its own lock. The last of the W computes
  // and commits the step on the calling thread and calls every waiter.
  // InvalidArgument when they disagree with the round's (lr, lr_scale) or
  // hold NaN/Inf; Aborted when the round is gone (timed out).
  absl::Status Contribute(uint64_t round, WorkerGradients gradients);

  // Fails the round when its workers did not all arrive by its deadline.
  void ExpireIfLate(absl::Time now) override;

 private:
  struct Waiting {
    RoundWaiter* waiter;
    uint32_t worker;
    bool contributing;  // a live stream that has not contributed yet
  };

  // What the round's compute needs, taken from it under mu_.
  struct Gathered {
    uint64_t step = 0;
    std::vector<std::vector<float>> sums;
    std::vector<ReplyFormat> formats;
    std::optional<double> lr;
    std::optional<double> lr_scale;
    bool measure_orthogonality = false;
    int64_t bytes_received = 0;
    absl::Time start;
  };
  struct Computed {
    std::vector<std::shared_ptr<const StepRecord>> records;  // per worker
    // Not ok when strict durability could not write the applied step.
    absl::Status ack;
  };

  // REQUIRES: mu_ held, a round open. Ends it; returns its waiters and
  // their workers.
  std::vector<std::pair<RoundWaiter*, uint32_t>> CloseRoundLocked()
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Averages, steps the engine, writes a checkpoint when due, builds every
  // worker's answer. Runs without mu_ (computing_ keeps the round).
  absl::StatusOr<Computed> Compute(Gathered round);
  std::vector<std::shared_ptr<const v1::StepResponse>> Responses(
      const ReplyFormat& format, const std::vector<std::vector<float>>& weights,
      const std::vector<std::vector<float>>& updates, const std::vector<double>& decay) const;

  Session* const session_;
  Engine* const engine_;
  const Durability* const durability_;
  const Options options_;
  const uint32_t num_workers_;

  absl::Mutex mu_;
  bool open_ ABSL_GUARDED_BY(mu_) = false;
  // The session's in-flight slot, held while a round is open.
  Lease lease_ ABSL_GUARDED_BY(mu_);
  // Counts rounds opened, so a contribution for an abandoned round is not
  // added to its successor of the same step.
  uint64_t round_ ABSL_GUARDED_BY(mu_) = 0;
  bool computing_ ABSL_GUARDED_BY(mu_) = false;
  uint64_t step_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time start_ ABSL_GUARDED_BY(mu_);
  absl::Time deadline_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> contributed_ ABSL_GUARDED_BY(mu_);
  uint32_t contributions_ ABSL_GUARDED_BY(mu_) = 0;
  // Workers adding their gradients into sums_ outside mu_. While any is,
  // the round is neither closed nor computed, so sums_ stays in place.
  std::vector<bool> adding_ ABSL_GUARDED_BY(mu_);
  uint32_t adders_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<ReplyFormat> formats_ ABSL_GUARDED_BY(mu_);
  std::optional<double> lr_ ABSL_GUARDED_BY(mu_);
  std::optional<double> lr_scale_ ABSL_GUARDED_BY(mu_);
  bool measure_orthogonality_ ABSL_GUARDED_BY(mu_) = false;
  int64_t bytes_received_ ABSL_GUARDED_BY(mu_) = 0;
  // Sum of the contributed gradients, fp32, by parameter; the average once
  // computing. The vectors are made and taken under mu_; their elements are
  // added to under sum_mu_[i], so workers add different parameters at once.
  std::vector<std::vector<float>> sums_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<absl::Mutex[]> sum_mu_;
  std::vector<Waiting> waiting_ ABSL_GUARDED_BY(mu_);
};

// The rounds of a PARAMETER_SERVER session (the only SessionRounds there
// is); null in UPDATES mode.
inline ParameterServerRounds* RoundsOf(const Session& session) {
  return static_cast<ParameterServerRounds*>(session.rounds());
}

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_PS_ROUND_H_
