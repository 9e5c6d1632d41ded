#include "ps/ps_round.h"

#include <algorithm>
#include <cmath>
#include <iostream>
#include <iterator>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "muon/kernels/status_macros.h"
#include "observability/metrics.h"
#include "step/step_header.h"
#include "wire/convert.h"

namespace muon::server {

ParameterServerRounds::ParameterServerRounds(Session* session, Engine* engine,
                                             const Durability* durability, const Options& options)
    : session_(session),
      engine_(engine),
      durability_(durability),
      options_(options),
      num_workers_(session->num_workers()) {}

bool ParameterServerRounds::AgreesLocked(const Contribution& c) const {
  for (const Worker& w : workers_) {
    if (w.state != WorkerState::kAbsent &&
        (w.contribution.lr != c.lr || w.contribution.lr_scale != c.lr_scale)) {
      return false;
    }
  }
  return true;
}

absl::StatusOr<ParameterServerRounds::Admission> ParameterServerRounds::Join(
    uint64_t step, uint32_t worker, RoundWaiter* waiter, const Contribution& contribution) {
  absl::MutexLock lock(&mu_);
  // The session's step only moves under mu_ (lease_.CommitRound), so it is stable
  // here.
  const uint64_t committed = session_->step();
  if (step == 0) {
    return absl::InvalidArgumentError(absl::StrCat("step numbers start at 1; session ",
                                                   session_->id(), " expects step ",
                                                   committed + 1));
  }
  if (step <= committed) {
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<const StepRecord> record,
                          session_->Recorded(step, worker));
    return Admission{Role::kReplay, std::move(record)};
  }
  if (step > committed + 1) {
    return absl::FailedPreconditionError(
        absl::StrCat("step ", step, " is ahead of session ", session_->id(),
                     ": its last committed step is ", committed, ", so the expected step is ",
                     committed + 1));
  }
  if (!open_) {
    MUON_ASSIGN_OR_RETURN(lease_, session_->TryLease(LeasePurpose::kRound));
    open_ = true;
    ++round_;
    step_ = step;
    start_ = absl::Now();
    deadline_ = start_ + options_.worker_timeout;
    workers_.assign(num_workers_, Worker{});
    ended_ = 0;
    measure_asked_ = false;
    const size_t n = session_->params().size();
    arrived_.assign(n, 0);
    computed_.assign(n, nullptr);
    computed_count_ = 0;
    stats_ = StepStats{};
    compute_seconds_ = 0;
    ++epoch_;
  }
  for (const Waiting& w : waiting_) {
    if (w.worker == worker && w.contributing) {
      return absl::AbortedError(absl::StrCat(
          "worker ", worker, " of session ", session_->id(), " already has a stream sending step ",
          step, "; retry once that stream has ended"));
    }
  }
  Worker& state = workers_[worker];
  const bool contribute = state.state == WorkerState::kAbsent && !committing_;
  if (contribute && !AgreesLocked(contribution)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "worker ", worker, " sent step ", step_, " with a different lr or lr_scale than the "
        "workers before it; every worker of a step must send the same schedule values"));
  }
  if (contribute) {
    state.state = WorkerState::kStreaming;
    state.stream = waiter;
    state.contribution = contribution;
    state.gradients.assign(arrived_.size(), nullptr);
    state.checked.assign(arrived_.size(), false);
    state.bytes_received = 0;
    // A transaction begun without measuring cannot add it: compute again.
    if (contribution.measure_orthogonality && !measure_asked_) {
      measure_asked_ = true;
      RestartLocked();
    }
  }
  waiting_.push_back({waiter, worker, contribute, std::vector<bool>(arrived_.size(), false)});
  return Admission{contribute ? Role::kContribute : Role::kWait, nullptr, round_};
}

ParameterServerRounds::Worker* ParameterServerRounds::StreamingLocked(RoundWaiter* stream,
                                                                      uint32_t* worker) {
  if (!open_) return nullptr;
  for (uint32_t w = 0; w < workers_.size(); ++w) {
    if (workers_[w].state == WorkerState::kStreaming && workers_[w].stream == stream) {
      *worker = w;
      return &workers_[w];
    }
  }
  return nullptr;
}

void ParameterServerRounds::RestartLocked() {
  ++epoch_;
  computed_.assign(computed_.size(), nullptr);
  // Only the withdrawing worker's stream, which fails, can have answers of
  // the discarded parameters (AnswerableLocked).
  for (Waiting& w : waiting_) w.answered.assign(w.answered.size(), false);
  computed_count_ = 0;
  stats_ = StepStats{};
  compute_seconds_ = 0;
  // A running driver resets its own transaction when it sees the epoch.
  if (!driving_) txn_.reset();
}

void ParameterServerRounds::WithdrawLocked(uint32_t worker) {
  Worker& w = workers_[worker];
  // A running driver may be computing any of them: its batch is dropped too.
  bool restart = false;
  for (size_t i = 0; i < w.gradients.size(); ++i) {
    if (w.gradients[i] == nullptr) continue;
    w.gradients[i] = nullptr;
    --arrived_[i];
    restart = restart || driving_ || computed_[i] != nullptr;
  }
  w = Worker{};
  if (restart) RestartLocked();
}

bool ParameterServerRounds::Leave(RoundWaiter* waiter) {
  absl::MutexLock lock(&mu_);
  auto it = std::find_if(waiting_.begin(), waiting_.end(),
                         [waiter](const Waiting& w) { return w.waiter == waiter; });
  if (it == waiting_.end()) return false;
  const uint32_t worker = it->worker;
  const bool contributing = it->contributing;
  waiting_.erase(it);
  // A stream that breaks before its StepEnd adds nothing.
  if (contributing && open_ && workers_[worker].state == WorkerState::kStreaming) {
    WithdrawLocked(worker);
  }
  // A round nobody contributes to and nobody waits on holds the session
  // for nothing: give it back now rather than at the timeout.
  const bool anyone = std::any_of(workers_.begin(), workers_.end(), [](const Worker& w) {
    return w.state != WorkerState::kAbsent;
  });
  if (open_ && !committing_ && !driving_ && !anyone && waiting_.empty()) CloseRoundLocked();
  return true;
}

bool ParameterServerRounds::Add(RoundWaiter* stream, uint32_t index,
                                std::shared_ptr<const std::byte[]> bytes) {
  absl::MutexLock lock(&mu_);
  uint32_t worker = 0;
  Worker* w = StreamingLocked(stream, &worker);
  if (w == nullptr || index >= w->gradients.size() || w->gradients[index] != nullptr) return false;
  w->gradients[index] = std::move(bytes);
  return ++arrived_[index] == num_workers_ && !driving_;
}

namespace {

// What End answers a stream whose round went on without it.
absl::Status AbandonedError(uint64_t step, absl::string_view session) {
  return absl::AbortedError(absl::StrCat(
      "step ", step, " of session ", session,
      " was abandoned (a worker timed out or the step failed) before these gradients counted; "
      "send it again"));
}

}  // namespace

absl::Status ParameterServerRounds::End(RoundWaiter* stream, int64_t bytes_received) {
  const std::vector<SessionParam>& params = session_->params();
  std::vector<std::shared_ptr<const std::byte[]>> gradients;
  std::vector<bool> checked;
  uint32_t worker = 0;
  {
    absl::MutexLock lock(&mu_);
    Worker* w = StreamingLocked(stream, &worker);
    if (w == nullptr) {
      return AbandonedError(step_, session_->id());
    }
    gradients = w->gradients;
    checked = w->checked;
  }
  // Checked before they count, so a refused gradient adds nothing.
  for (size_t i = 0; i < params.size(); ++i) {
    if (gradients[i] == nullptr || checked[i] ||
        AllFinite(params[i].spec.dtype, gradients[i].get(),
                  static_cast<size_t>(NumElements(params[i].spec.shape)))) {
      continue;
    }
    absl::MutexLock lock(&mu_);
    if (StreamingLocked(stream, &worker) != nullptr) WithdrawLocked(worker);
    return absl::InvalidArgumentError(
        absl::StrCat("parameter ", i, " ('", params[i].spec.name, "'): worker ", worker,
                     "'s gradient contains NaN or Inf; nothing of it was added"));
  }
  {
    absl::MutexLock lock(&mu_);
    Worker* w = StreamingLocked(stream, &worker);
    if (w == nullptr) {
      return AbandonedError(step_, session_->id());
    }
    w->state = WorkerState::kEnded;
    w->stream = nullptr;
    w->bytes_received = bytes_received;
    // The ones checked above, unchanged since (this stream's Adds are over).
    for (size_t i = 0; i < w->gradients.size(); ++i) {
      if (w->gradients[i] != nullptr) w->checked[i] = true;
    }
    ++ended_;
    all_in_ = absl::Now();
    for (Waiting& entry : waiting_) {
      if (entry.waiter == stream) entry.contributing = false;
    }
  }
  Drive();
  return absl::OkStatus();
}

void ParameterServerRounds::Drive() {
  const std::vector<SessionParam>& params = session_->params();
  {
    absl::MutexLock lock(&mu_);
    if (driving_ || !open_ || committing_) return;
    driving_ = true;
  }
  for (;;) {
    std::vector<Ready> batch;
    std::vector<Delivery> due;
    std::vector<ReplyFormat> formats;
    uint64_t epoch = 0;
    uint64_t round = 0;
    uint64_t step = 0;
    std::optional<double> lr, lr_scale;
    bool measure = false;
    {
      absl::MutexLock lock(&mu_);
      if (!open_) {
        txn_.reset();
        driving_ = false;
        return;
      }
      if (txn_ != nullptr && txn_epoch_ != epoch_) txn_.reset();
      due = AnswersDueLocked();
      for (uint32_t i = 0; i < arrived_.size(); ++i) {
        if (arrived_[i] != num_workers_ || computed_[i] != nullptr) continue;
        Ready ready{i, {}, true};
        for (const Worker& w : workers_) {
          ready.gradients.push_back(w.gradients[i]);
          ready.checked = ready.checked && w.checked[i];
        }
        batch.push_back(std::move(ready));
      }
      if (batch.empty() && due.empty()) {
        if (computed_count_ < params.size() || ended_ < num_workers_) {
          driving_ = false;
          return;
        }
        committing_ = true;  // the driver commits, still driving
        break;
      }
      epoch = epoch_;
      round = round_;
      step = step_;
      // Every contributing worker agreed on them (Join).
      for (const Worker& w : workers_) {
        if (w.state == WorkerState::kAbsent) continue;
        lr = w.contribution.lr;
        lr_scale = w.contribution.lr_scale;
      }
      measure = MeasuresOrthogonality(measure_asked_, step, options_.orthogonality_sample_every);
      formats = FormatsLocked();
    }
    Deliver(std::move(due));
    if (batch.empty()) continue;
    absl::Status status;
    if (txn_ == nullptr) {
      StepOptions step_options;
      step_options.measure_orthogonality = measure;
      absl::StatusOr<std::unique_ptr<StepTransaction>> txn = engine_->BeginStep(step_options);
      if (txn.ok()) {
        txn_ = std::move(*txn);
        txn_epoch_ = epoch;
        txn_measures_ = measure;
      } else {
        status = txn.status();
      }
    }
    std::vector<std::shared_ptr<const Computed>> out;
    StepStats stats;
    uint32_t bad_worker = num_workers_;
    size_t bad = 0;
    const absl::Time started = absl::Now();
    if (status.ok()) {
      status = ComputeBatch(batch, lr, lr_scale, formats, &out, &stats, &bad_worker, &bad);
    }
    const double seconds = absl::ToDoubleSeconds(absl::Now() - started);
    std::vector<std::pair<RoundWaiter*, uint32_t>> failed;
    {
      absl::MutexLock lock(&mu_);
      if (!open_ || round_ != round) continue;  // abandoned meanwhile
      if (epoch_ != epoch) continue;            // withdrawn meanwhile: compute again
      if (!status.ok() && bad_worker < num_workers_) {
        // One worker's gradient is not finite: only its stream fails (unless
        // it was withdrawn meanwhile and this gradient is gone).
        if (workers_[bad_worker].gradients.empty() ||
            workers_[bad_worker].gradients[batch[bad].index] != batch[bad].gradients[bad_worker]) {
          continue;
        }
        for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {
          if (it->worker == bad_worker && it->contributing) {
            failed.emplace_back(it->waiter, bad_worker);
            waiting_.erase(it);
            break;
          }
        }
        WithdrawLocked(bad_worker);
      } else if (!status.ok()) {
        driving_ = false;
        txn_.reset();
        failed = CloseRoundLocked();
      } else {
        for (size_t k = 0; k < batch.size(); ++k) {
          computed_[batch[k].index] = std::move(out[k]);
          for (Worker& w : workers_) w.checked[batch[k].index] = true;
        }
        computed_count_ += batch.size();
        stats_ += stats;
        compute_seconds_ += seconds;
      }
    }
    for (const auto& [waiter, worker] : failed) waiter->RoundDone(status);
    if (!status.ok() && bad_worker >= num_workers_) return;
  }
  const uint64_t step = [&] {
    absl::MutexLock lock(&mu_);
    return step_;
  }();
  absl::StatusOr<Committed> committed = Commit();
  std::vector<std::pair<RoundWaiter*, uint32_t>> waiters;
  {
    absl::MutexLock lock(&mu_);
    txn_.reset();  // spent, or failed to commit: nothing applied
    driving_ = false;
    if (committed.ok()) lease_.CommitRound(step, committed->records);
    waiters = CloseRoundLocked();
  }
  for (const auto& [waiter, w] : waiters) {
    if (!committed.ok()) {
      waiter->RoundDone(committed.status());
    } else if (!committed->ack.ok()) {
      waiter->RoundDone(committed->ack);
    } else {
      waiter->RoundDone(committed->records[w]);
    }
  }
}

bool ParameterServerRounds::AnswerableLocked(uint32_t worker) const {
  for (uint32_t w = 0; w < workers_.size(); ++w) {
    if (w != worker && workers_[w].state != WorkerState::kEnded) return false;
  }
  return true;
}

std::vector<ParameterServerRounds::Delivery> ParameterServerRounds::AnswersDueLocked() {
  std::vector<Delivery> due;
  if (computed_count_ == 0) return due;
  for (Waiting& entry : waiting_) {
    if (!AnswerableLocked(entry.worker)) continue;
    // The format of the record the waiter gets at the commit.
    Delivery delivery{entry.waiter, workers_[entry.worker].contribution.format, {}};
    for (uint32_t i = 0; i < computed_.size(); ++i) {
      if (computed_[i] == nullptr || entry.answered[i]) continue;
      entry.answered[i] = true;
      delivery.params.emplace_back(i, computed_[i]);
    }
    if (delivery.params.empty()) continue;
    entry.waiter->Hold();
    due.push_back(std::move(delivery));
  }
  return due;
}

void ParameterServerRounds::Deliver(std::vector<Delivery> due) const {
  for (Delivery& d : due) {
    Answer responses;
    for (const auto& [index, computed] : d.params) {
      Answer answer = AnswerOf(d.format, index, *computed);
      responses.insert(responses.end(), std::make_move_iterator(answer.begin()),
                       std::make_move_iterator(answer.end()));
    }
    d.waiter->Answers(std::move(responses));
    d.waiter->Release();
  }
}

std::vector<ReplyFormat> ParameterServerRounds::FormatsLocked() const {
  std::vector<ReplyFormat> formats;
  for (const Worker& w : workers_) {
    if (w.state == WorkerState::kAbsent) continue;
    if (std::find(formats.begin(), formats.end(), w.contribution.format) == formats.end()) {
      formats.push_back(w.contribution.format);
    }
  }
  return formats;
}

size_t ParameterServerRounds::ComputedParameters() {
  absl::MutexLock lock(&mu_);
  return computed_count_;
}

std::vector<std::pair<RoundWaiter*, uint32_t>> ParameterServerRounds::CloseRoundLocked() {
  std::vector<std::pair<RoundWaiter*, uint32_t>> waiters;
  for (const Waiting& w : waiting_) waiters.emplace_back(w.waiter, w.worker);
  waiting_.clear();
  // Nothing of an abandoned round is applied; dropped before the session
  // is free again, so that nothing else finds its parameters in a
  // transaction. (Only the driver itself closes a round while it runs, and
  // it has dropped the transaction first.)
  if (!driving_) txn_.reset();
  lease_.Release();  // unless committed first: the step stays the session's
  open_ = false;
  committing_ = false;
  ++epoch_;
  workers_.clear();
  ended_ = 0;
  arrived_.clear();
  computed_.clear();
  computed_count_ = 0;
  return waiters;
}

void ParameterServerRounds::ExpireIfLate(absl::Time now) {
  std::vector<std::pair<RoundWaiter*, uint32_t>> waiters;
  std::string missing;
  uint64_t step = 0;
  {
    absl::MutexLock lock(&mu_);
    // A driver holds the transaction and a commit is under way once every
    // worker has ended: the next tick expires a round still open.
    if (!open_ || committing_ || driving_ || ended_ == num_workers_ || now < deadline_) return;
    std::vector<uint32_t> absent;
    for (uint32_t w = 0; w < num_workers_; ++w) {
      if (workers_[w].state != WorkerState::kEnded) absent.push_back(w);
    }
    missing = absl::StrJoin(absent, ", ");
    step = step_;
    waiters = CloseRoundLocked();
  }
  const absl::Status status = absl::AbortedError(absl::StrCat(
      "step ", step, " of session ", session_->id(), " waited ",
      absl::FormatDuration(options_.worker_timeout),
      " (--worker_timeout_seconds) for worker(s) ", missing,
      " and was abandoned; nothing was applied. Every worker must send step ", step, " again"));
  std::cerr << "muon-server: " << status.message() << std::endl;
  for (const auto& [waiter, worker] : waiters) waiter->RoundDone(status);
}

}  // namespace muon::server
