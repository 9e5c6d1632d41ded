#ifndef MUON_SERVER_SRC_PS_ROUND_H_
#define MUON_SERVER_SRC_PS_ROUND_H_

// PARAMETER_SERVER steps: the W workers of a session each stream their
// gradients for step N; once all W are in, the server averages them in fp32,
// applies one step to the weights it holds and answers every worker with
// the new weights (or the update). docs/parameter-server.md.

#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "muon/kernels/engine.h"
#include "muon/v1/optimizer.pb.h"
#include "session/durability.h"
#include "session/session.h"
#include "storage/step_reply.h"

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
  // Answers (UpdateChunks in the worker's format) of parameters that no
  // withdrawal but this waiter's own stream's can discard any more
  // (docs/parameter-server.md, "Answers before the commit"), to send ahead
  // of RoundDone's record, which holds them too. Each parameter comes once;
  // called by the round's driver with no lock held, between a Hold and its
  // Release, never after RoundDone.
  virtual void Answers(std::vector<std::shared_ptr<const StepReply>> responses) = 0;
  // Keeps the waiter alive until the matching Release, even when it Leaves
  // meanwhile. Called under the round's lock: must not call the round.
  virtual void Hold() = 0;
  virtual void Release() = 0;
};

// What a worker asks to get back.
struct ReplyFormat {
  std::optional<DType> dtype;  // unset: each parameter's dtype
  v1::UpdateContent content = v1::UPDATE_CONTENT_WEIGHTS;
  bool operator==(const ReplyFormat& other) const {
    return dtype == other.dtype && content == other.content;
  }
};

// What a worker's stream says about its contribution, from its header.
struct Contribution {
  ReplyFormat format;
  std::optional<double> lr;
  std::optional<double> lr_scale;
  bool measure_orthogonality = false;
};

// The rounds of one PARAMETER_SERVER session. Thread-safe.
//
// A round is pipelined per parameter, like an UPDATES step: each worker's
// gradient of parameter i is held as it completes, and once all W workers'
// are in, the driver (Drive) averages them and computes that parameter in
// the round's engine transaction while the rest still arrive. A worker's
// gradients count once its StepEnd is checked (End); a stream that ends
// before that withdraws them, and when some were already computed the
// transaction is discarded and the round computes again as gradients
// return (nothing is applied before every worker has ended and every
// parameter is computed). A computed parameter's answer goes to a waiter
// before the commit once every worker but the waiter's own has ended: then
// only the waiter's own stream can still withdraw it (RoundWaiter::Answers).
class ParameterServerRounds final : public SessionRounds {
 public:
  using Options = RoundOptions;

  // Everything outlives the rounds; `session` owns them.
  ParameterServerRounds(Session* session, Engine* engine, const Durability* durability,
                        const Options& options);

  enum class Role {
    kContribute,  // send the gradients with Add, then End
    kWait,        // already contributed (a resend): ignore the chunks, wait
    kReplay,      // an old step: answer with `replay`
  };
  struct Admission {
    Role role = Role::kContribute;
    std::shared_ptr<const StepRecord> replay;
    // Names the round joined.
    uint64_t round = 0;
  };

  // A worker's stream for `step`. For kContribute and kWait `waiter` is
  // registered and told how the round ends, unless it Leaves first; for
  // kContribute it is also the stream's name for Add and End.
  // FailedPrecondition for a step ahead or long gone; Aborted when the
  // worker already has a live stream for the step, or the session is held;
  // InvalidArgument when a contributing stream's (lr, lr_scale) differ from
  // the round's (nothing registered).
  absl::StatusOr<Admission> Join(uint64_t step, uint32_t worker, RoundWaiter* waiter,
                                 const Contribution& contribution = {});

  // The waiter's stream ended. True when it was still registered (it will
  // not be called); false when its RoundDone has been or is being called.
  // A contributing stream that has not ended withdraws its gradients.
  bool Leave(RoundWaiter* waiter);

  // Parameter `index`'s whole gradient from the contributing stream
  // `stream` (raw bytes in the registered dtype). Cheap: holds the bytes.
  // True when the parameter is now in from every worker and no driver runs:
  // the caller then runs Drive, off its own locks. Ignored (false) when the
  // stream is no longer contributing (its round failed or expired).
  bool Add(RoundWaiter* stream, uint32_t index, std::shared_ptr<const std::byte[]> bytes);

  // The contributing stream's StepEnd (every parameter was Added): checks
  // its gradients are finite, makes them count, then drives the round (the
  // last worker's call may compute and commit it). InvalidArgument for NaN
  // or Inf (its gradients withdrawn); Aborted when the round is gone.
  absl::Status End(RoundWaiter* stream, int64_t bytes_received);

  // Computes every parameter whose gradients are all in, and commits the
  // step once every worker has ended and every parameter is computed; calls
  // the waiters when the round ends. One driver at a time: returns at once
  // while another runs (that one picks the work up).
  void Drive();

  // Fails the round when its workers did not all arrive by its deadline.
  void ExpireIfLate(absl::Time now) override;

  // Parameters of the open round computed so far (0 when none is open).
  size_t ComputedParameters();

 private:
  struct Waiting {
    RoundWaiter* waiter;
    uint32_t worker;
    bool contributing;  // a live stream that has not ended yet
    // By parameter: its answer went out by Answers.
    std::vector<bool> answered;
  };
  enum class WorkerState { kAbsent, kStreaming, kEnded };
  struct Worker {
    WorkerState state = WorkerState::kAbsent;
    RoundWaiter* stream = nullptr;  // kStreaming
    Contribution contribution;
    // By parameter: the gradients in so far, in the registered dtype.
    std::vector<std::shared_ptr<const std::byte[]>> gradients;
    // By parameter: found finite by the driver, so End need not decode it
    // again.
    std::vector<bool> checked;
    int64_t bytes_received = 0;
  };
  using Answer = std::vector<std::shared_ptr<const StepReply>>;
  // Per parameter, what the driver computes into, kept from round to round
  // so that a step writes into pages already mapped (util/buffer_shelf.h
  // says why). Driver-owned.
  struct Scratch {
    std::vector<float> average;  // W > 1
    std::vector<float> update;
    std::vector<float> weights;  // the new held weights
  };
  // One parameter's computed step, kept for the commit. Immutable once
  // made: the driver reads it without the lock.
  struct Computed {
    // In the parameter's Scratch, valid until the driver computes the
    // parameter again (only the driver reads them).
    const float* update = nullptr;
    const float* weights = nullptr;
    size_t size = 0;
    double decay = 1.0;
    double orthogonality_error = 0;
    // Its answer in each format the round's workers had asked for when it
    // was computed.
    std::vector<std::pair<ReplyFormat, Answer>> answers;
  };
  // Answers due to one waiter (AnswersDueLocked), held for the delivery.
  struct Delivery {
    RoundWaiter* waiter = nullptr;
    ReplyFormat format;
    std::vector<std::pair<uint32_t, std::shared_ptr<const Computed>>> params;
  };
  // A batch for the driver: parameters and every worker's gradient of each.
  struct Ready {
    uint32_t index = 0;
    std::vector<std::shared_ptr<const std::byte[]>> gradients;  // by worker
    bool checked = false;  // every worker's found finite already (End)
  };
  struct Committed {
    std::vector<std::shared_ptr<const StepRecord>> records;  // per worker
    // Not ok when strict durability could not write the applied step.
    absl::Status ack;
  };

  // REQUIRES: mu_ held, a round open. Ends it; returns its waiters and
  // their workers.
  std::vector<std::pair<RoundWaiter*, uint32_t>> CloseRoundLocked()
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops worker w's gradients; when any was computed, the transaction is
  // discarded (its parameters compute again).
  void WithdrawLocked(uint32_t worker) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RestartLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The contributing worker streaming as `stream`, or null.
  Worker* StreamingLocked(RoundWaiter* stream, uint32_t* worker)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool AgreesLocked(const Contribution& c) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether a computed parameter's answer may go to a waiter of `worker`
  // before the commit: every other worker has ended, so that only this
  // worker's stream can still withdraw gradients (and that stream fails
  // when it does, its answers with it).
  bool AnswerableLocked(uint32_t worker) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The answers now due (AnswerableLocked), marked answered; each
  // delivery's waiter is held.
  std::vector<Delivery> AnswersDueLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Sends them (RoundWaiter::Answers) and releases the waiters. Without mu_.
  void Deliver(std::vector<Delivery> due) const;
  // The formats the round's workers asked for.
  std::vector<ReplyFormat> FormatsLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Averages a batch in fp32 (worker order; one worker's gradient goes as
  // it is), computes it in txn_, reads its new weights and cuts its
  // answers in `formats`. Runs without mu_,
  // on the driver. On a non-finite gradient sets *bad_worker and *bad (its
  // place in the batch), InvalidArgument.
  absl::Status ComputeBatch(const std::vector<Ready>& batch, const std::optional<double>& lr,
                            const std::optional<double>& lr_scale,
                            const std::vector<ReplyFormat>& formats,
                            std::vector<std::shared_ptr<const Computed>>* out, StepStats* stats,
                            uint32_t* bad_worker, size_t* bad);
  // Whether `count` elements of `dtype` are all finite.
  static bool AllFinite(DType dtype, const std::byte* bytes, size_t count);
  // Commits txn_, builds every worker's answer, writes a checkpoint when
  // due. Runs without mu_ (committing_ keeps the round).
  absl::StatusOr<Committed> Commit();
  // Parameter `index`'s answer in `format`: the one cut when it was
  // computed, else cut now.
  Answer AnswerOf(const ReplyFormat& format, uint32_t index, const Computed& computed) const;
  Answer Encode(const ReplyFormat& format, uint32_t index, const Computed& computed) const;

  Session* const session_;
  Engine* const engine_;
  const Durability* const durability_;
  const Options options_;
  const uint32_t num_workers_;

  absl::Mutex mu_;
  bool open_ ABSL_GUARDED_BY(mu_) = false;
  // The session's in-flight slot, held while a round is open.
  Lease lease_ ABSL_GUARDED_BY(mu_);
  // Counts rounds opened, so a driver's work for an abandoned round is not
  // kept in its successor.
  uint64_t round_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t step_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Time start_ ABSL_GUARDED_BY(mu_);
  absl::Time deadline_ ABSL_GUARDED_BY(mu_);
  absl::Time all_in_ ABSL_GUARDED_BY(mu_);  // the last End
  std::vector<Worker> workers_ ABSL_GUARDED_BY(mu_);
  uint32_t ended_ ABSL_GUARDED_BY(mu_) = 0;
  bool measure_asked_ ABSL_GUARDED_BY(mu_) = false;
  // By parameter: workers whose gradient is in, and the computed step.
  std::vector<uint32_t> arrived_ ABSL_GUARDED_BY(mu_);
  std::vector<std::shared_ptr<const Computed>> computed_ ABSL_GUARDED_BY(mu_);
  size_t computed_count_ ABSL_GUARDED_BY(mu_) = 0;
  StepStats stats_ ABSL_GUARDED_BY(mu_);
  double compute_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  // Bumped when computed work is discarded (a withdrawal); a driver's
  // batch of an older epoch is dropped.
  uint64_t epoch_ ABSL_GUARDED_BY(mu_) = 0;
  bool driving_ ABSL_GUARDED_BY(mu_) = false;
  bool committing_ ABSL_GUARDED_BY(mu_) = false;
  // The engine transaction of the round's computed parameters. Driven by
  // the one driver; made and reset under mu_ while no driver runs or by
  // the driver itself.
  std::unique_ptr<StepTransaction> txn_;
  uint64_t txn_epoch_ = 0;  // the epoch txn_ belongs to (driver-owned)
  std::vector<Scratch> scratch_;  // by parameter (driver-owned)
  bool txn_measures_ = false;
  std::vector<Waiting> waiting_ ABSL_GUARDED_BY(mu_);
};

// The rounds of a PARAMETER_SERVER session (the only SessionRounds there
// is); null in UPDATES mode.
inline ParameterServerRounds* RoundsOf(const Session& session) {
  return static_cast<ParameterServerRounds*>(session.rounds());
}

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_PS_ROUND_H_
