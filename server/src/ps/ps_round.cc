#include "ps/ps_round.h"

#include <algorithm>
#include <cmath>
#include <iostream>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "wire/convert.h"
#include "observability/metrics.h"
#include "muon/kernels/status_macros.h"

namespace muon::server {

ParameterServerRounds::ParameterServerRounds(Session* session, Engine* engine,
                                             const Durability* durability, const Options& options)
    : session_(session),
      engine_(engine),
      durability_(durability),
      options_(options),
      num_workers_(session->num_workers()),
      sum_mu_(new absl::Mutex[session->params().size()]) {}

absl::StatusOr<ParameterServerRounds::Admission> ParameterServerRounds::Join(uint64_t step,
                                                                             uint32_t worker,
                                                                             RoundWaiter* waiter) {
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
    contributed_.assign(num_workers_, false);
    contributions_ = 0;
    adding_.assign(num_workers_, false);
    formats_.assign(num_workers_, ReplyFormat{});
    lr_.reset();
    lr_scale_.reset();
    measure_orthogonality_ = false;
    bytes_received_ = 0;
    sums_.clear();
    for (const SessionParam& p : session_->params()) {
      sums_.emplace_back(static_cast<size_t>(NumElements(p.spec.shape)), 0.0f);
    }
  }
  for (const Waiting& w : waiting_) {
    if (w.worker == worker && w.contributing) {
      return absl::AbortedError(absl::StrCat(
          "worker ", worker, " of session ", session_->id(), " already has a stream sending step ",
          step, "; retry once that stream has ended"));
    }
  }
  const bool contribute = !contributed_[worker] && !adding_[worker] && !computing_;
  waiting_.push_back({waiter, worker, contribute});
  return Admission{contribute ? Role::kContribute : Role::kWait, nullptr, round_};
}

bool ParameterServerRounds::Leave(RoundWaiter* waiter) {
  absl::MutexLock lock(&mu_);
  auto it = std::find_if(waiting_.begin(), waiting_.end(),
                         [waiter](const Waiting& w) { return w.waiter == waiter; });
  if (it == waiting_.end()) return false;
  waiting_.erase(it);
  // A round nobody contributed to and nobody waits on holds the session
  // for nothing: give it back now rather than at the timeout.
  if (open_ && !computing_ && contributions_ == 0 && adders_ == 0 && waiting_.empty()) {
    CloseRoundLocked();
  }
  return true;
}

namespace {

// Gradients are decoded a block at a time into a small buffer: a worker
// never holds a second, fp32 copy of its whole gradient.
constexpr size_t kDecodeBlock = 4096;

// Calls fn(first_index, block, n) over `count` values decoded kDecodeBlock at
// a time; stops early when fn returns false. False when it stopped early.
template <typename Fn>
bool ForEachDecodedBlock(DType dtype, const std::byte* bytes, size_t count, Fn fn) {
  float block[kDecodeBlock];
  const size_t width = DTypeSize(dtype);
  for (size_t start = 0; start < count; start += kDecodeBlock) {
    const size_t n = std::min(kDecodeBlock, count - start);
    DecodeToFloat(dtype, bytes + start * width, n, block);
    if (!fn(start, block, n)) return false;
  }
  return true;
}

bool AllFinite(DType dtype, const std::byte* bytes, size_t count) {
  return ForEachDecodedBlock(dtype, bytes, count, [](size_t, const float* block, size_t n) {
    return std::all_of(block, block + n, [](float v) { return std::isfinite(v); });
  });
}

void AddDecoded(DType dtype, const std::byte* bytes, size_t count, float* sum) {
  ForEachDecodedBlock(dtype, bytes, count, [sum](size_t first, const float* block, size_t n) {
    for (size_t j = 0; j < n; ++j) sum[first + j] += block[j];
    return true;
  });
}

}  // namespace

absl::Status ParameterServerRounds::Contribute(uint64_t round_id, WorkerGradients gradients) {
  const std::vector<SessionParam>& params = session_->params();
  const uint32_t worker = gradients.worker;
  // All checked before anything is added, so a refused gradient adds nothing.
  for (size_t i = 0; i < params.size(); ++i) {
    if (!AllFinite(params[i].spec.dtype, gradients.tensors[i].get(),
                   static_cast<size_t>(NumElements(params[i].spec.shape)))) {
      return absl::InvalidArgumentError(
          absl::StrCat("parameter ", i, " ('", params[i].spec.name, "'): worker ", worker,
                       "'s gradient contains NaN or Inf; nothing of it was added"));
    }
  }
  std::vector<std::vector<float>>* sums = nullptr;
  {
    absl::MutexLock lock(&mu_);
    if (!open_ || round_ != round_id || computing_) {
      return absl::AbortedError(absl::StrCat(
          "step ", step_, " of session ", session_->id(),
          " was abandoned (a worker timed out) before these gradients arrived; send it again"));
    }
    if (contributed_[worker] || adding_[worker]) return absl::OkStatus();
    if (contributions_ + adders_ > 0 && (gradients.lr != lr_ || gradients.lr_scale != lr_scale_)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "worker ", worker, " sent step ", step_, " with a different lr or lr_scale than the "
          "workers before it; every worker of a step must send the same schedule values"));
    }
    lr_ = gradients.lr;
    lr_scale_ = gradients.lr_scale;
    adding_[worker] = true;
    ++adders_;
    sums = &sums_;
  }
  // Each worker starts at its own parameter, so that workers arriving
  // together mostly add different parameters.
  const size_t n = params.size();
  for (size_t k = 0; k < n; ++k) {
    const size_t i = (k + worker) % n;
    absl::MutexLock lock(&sum_mu_[i]);
    AddDecoded(params[i].spec.dtype, gradients.tensors[i].get(), (*sums)[i].size(),
               (*sums)[i].data());
  }
  Gathered round;
  {
    absl::MutexLock lock(&mu_);
    adding_[worker] = false;
    --adders_;
    contributed_[worker] = true;
    ++contributions_;
    formats_[worker] = gradients.format;
    measure_orthogonality_ = measure_orthogonality_ || gradients.measure_orthogonality;
    bytes_received_ += gradients.bytes_received;
    for (Waiting& w : waiting_) {
      if (w.worker == worker) w.contributing = false;
    }
    if (contributions_ < num_workers_) return absl::OkStatus();
    computing_ = true;
    round.step = step_;
    round.sums = std::move(sums_);
    round.formats = formats_;
    round.lr = lr_;
    round.lr_scale = lr_scale_;
    round.measure_orthogonality = measure_orthogonality_;
    round.bytes_received = bytes_received_;
    round.start = start_;
  }
  gradients.tensors.clear();
  // The last worker's thread does the step; the others' streams wait.
  const uint64_t step = round.step;
  absl::StatusOr<Computed> computed = Compute(std::move(round));
  std::vector<std::pair<RoundWaiter*, uint32_t>> waiters;
  {
    absl::MutexLock lock(&mu_);
    if (computed.ok()) lease_.CommitRound(step, computed->records);
    waiters = CloseRoundLocked();
  }
  for (const auto& [waiter, w] : waiters) {
    if (!computed.ok()) {
      waiter->RoundDone(computed.status());
    } else if (!computed->ack.ok()) {
      waiter->RoundDone(computed->ack);
    } else {
      waiter->RoundDone(computed->records[w]);
    }
  }
  return absl::OkStatus();
}

std::vector<std::pair<RoundWaiter*, uint32_t>> ParameterServerRounds::CloseRoundLocked() {
  std::vector<std::pair<RoundWaiter*, uint32_t>> waiters;
  for (const Waiting& w : waiting_) waiters.emplace_back(w.waiter, w.worker);
  waiting_.clear();
  lease_.Release();  // unless committed first: the step stays the session's
  open_ = false;
  computing_ = false;
  sums_.clear();
  contributed_.clear();
  contributions_ = 0;
  adding_.clear();
  return waiters;
}

void ParameterServerRounds::ExpireIfLate(absl::Time now) {
  std::vector<std::pair<RoundWaiter*, uint32_t>> waiters;
  std::string missing;
  uint64_t step = 0;
  {
    absl::MutexLock lock(&mu_);
    // Adders finish soon, and hold sums_: the next tick expires the round.
    if (!open_ || computing_ || adders_ > 0 || now < deadline_) return;
    std::vector<uint32_t> absent;
    for (uint32_t w = 0; w < num_workers_; ++w) {
      if (!contributed_[w]) absent.push_back(w);
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
