#ifndef MUON_KERNELS_INTERNAL_PARAM_TABLE_H_
#define MUON_KERNELS_INTERNAL_PARAM_TABLE_H_

// The bookkeeping every engine shares: the table of registered parameters,
// the claims a step transaction holds on them, the memory budget, and the
// checks of weights and imported state. For engine implementations only.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "muon/kernels/engine.h"
#include "muon/kernels/internal/step_math.h"

namespace muon::internal {

// The shape scale s of docs/math.md for a Muon parameter viewed as `view`.
inline double ShapeScaleFactor(ShapeScale scale, const MatrixView& view) {
  switch (scale) {
    case ShapeScale::kSpectral:
      return ShapeScaleOf(ShapeScaleForm::kSpectral, view.rows, view.cols);
    case ShapeScale::kRmsMatch:
      return ShapeScaleOf(ShapeScaleForm::kRmsMatch, view.rows, view.cols);
    case ShapeScale::kNone:
      break;
  }
  return ShapeScaleOf(ShapeScaleForm::kNone, view.rows, view.cols);
}

// "parameter 'w' [64, 32]", how every engine error names a parameter.
std::string Who(const ParamSpec& spec);

// FailedPrecondition: the parameter is in an open step transaction.
absl::Status InStepError(const ParamSpec& spec);

// FailedPrecondition unless the parameter holds weights; InvalidArgument
// unless `values` is its element count.
absl::Status CheckWeightHolder(const ParamSpec& spec, size_t values);

// ImportState's checks, before anything changes: each vector sized as the
// spec's kind and hold_weights need (others empty), every value finite, and
// step >= 0. InvalidArgument naming the parameter and the vector.
absl::Status CheckImport(const ParamSpec& spec, const ParamState& state);

// ResourceExhausted for a host allocation that failed (std::bad_alloc) while
// doing `what`.
absl::Status OutOfHostMemory(absl::string_view what);

// The budget an engine's registrations are charged against.
// Not thread-safe: the engine guards it with its mutex.
class MemoryBudget {
 public:
  // `budget_bytes` > 0. `setting` names where the budget is set, for errors
  // (EngineOptions::memory_budget_setting).
  MemoryBudget(int64_t budget_bytes, std::string setting)
      : budget_(budget_bytes), setting_(std::move(setting)) {}

  // Charges `bytes`, or ResourceExhausted when they do not fit: the message
  // names `who`, what the bytes are for and the budget's setting.
  absl::Status Reserve(int64_t bytes, absl::string_view who, absl::string_view what);
  void Release(int64_t bytes) { used_ -= bytes; }
  MemoryUsage Usage() const { return {used_, budget_}; }

 private:
  const int64_t budget_;
  const std::string setting_;
  int64_t used_ = 0;
};

// The parameters of one engine by id. `Param` is the engine's record; it has
// `ParamSpec spec` and `const StepTransaction* owner` (the open transaction
// computing it, or null). Not thread-safe: the engine guards the table and
// every Param's owner with one mutex.
template <typename Param>
class ParamTable {
 public:
  using Ptr = std::shared_ptr<Param>;

  ParamId Add(Ptr param) {
    const ParamId id = next_id_++;
    params_.emplace(id, std::move(param));
    return id;
  }

  // NotFound for an unknown id.
  absl::StatusOr<Ptr> Find(ParamId id) const {
    auto it = params_.find(id);
    if (it == params_.end()) return absl::NotFoundError(absl::StrCat("unknown parameter id ", id));
    return it->second;
  }

  // Find, and FailedPrecondition while the parameter is in a step.
  absl::StatusOr<Ptr> FindIdle(ParamId id) const {
    absl::StatusOr<Ptr> p = Find(id);
    if (p.ok() && (*p)->owner != nullptr) return InStepError((*p)->spec);
    return p;
  }

  // Find (FindIdle when `idle`), then CheckWeightHolder.
  absl::StatusOr<Ptr> FindHolder(ParamId id, size_t values, bool idle) const {
    absl::StatusOr<Ptr> p = idle ? FindIdle(id) : Find(id);
    if (!p.ok()) return p;
    if (absl::Status s = CheckWeightHolder((*p)->spec, values); !s.ok()) return s;
    return p;
  }

  // FindHolder, then FailedPrecondition unless `txn` has computed it (it
  // holds the parameter's claim).
  absl::StatusOr<Ptr> FindComputed(const StepTransaction* txn, ParamId id, size_t values) const {
    absl::StatusOr<Ptr> p = FindHolder(id, values, /*idle=*/false);
    if (p.ok() && (*p)->owner != txn) {
      return absl::FailedPreconditionError(
          absl::StrCat(Who((*p)->spec), " is not computed in this open step"));
    }
    return p;
  }

  // Removes an idle parameter and returns it.
  absl::StatusOr<Ptr> Remove(ParamId id) {
    absl::StatusOr<Ptr> p = FindIdle(id);
    if (p.ok()) params_.erase(id);
    return p;
  }

  // Claims the parameters of one Compute call for `txn` after checking every
  // input (unknown id, a parameter given twice or held by another
  // transaction, CheckStepInput). On error nothing is claimed.
  absl::StatusOr<std::vector<Ptr>> Claim(const StepTransaction* txn,
                                         absl::Span<const GradientInput> grads,
                                         absl::Span<UpdateOutput> outputs) {
    if (grads.size() != outputs.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(grads.size(), " gradients but ", outputs.size(), " update outputs"));
    }
    std::vector<Ptr> claimed;
    claimed.reserve(grads.size());  // the loop then allocates nothing
    for (size_t i = 0; i < grads.size(); ++i) {
      absl::StatusOr<Ptr> found = Find(grads[i].param);
      absl::Status status = found.status();
      if (status.ok()) {
        const Param& p = **found;
        if (p.owner == txn) {
          status =
              absl::InvalidArgumentError(absl::StrCat(Who(p.spec), " is given twice in one step"));
        } else if (p.owner != nullptr) {
          status = absl::FailedPreconditionError(
              absl::StrCat(Who(p.spec), " is in another step in progress"));
        } else {
          status = CheckStepInput(p.spec, grads[i], outputs[i]);
        }
      }
      if (!status.ok()) {
        Release(claimed);
        return status;
      }
      (*found)->owner = txn;
      claimed.push_back(*std::move(found));
    }
    return claimed;
  }

  static void Release(const std::vector<Ptr>& params) {
    for (const Ptr& p : params) p->owner = nullptr;
  }

 private:
  std::unordered_map<ParamId, Ptr> params_;
  ParamId next_id_ = 1;
};

// One StepTransaction::Compute call: claims the inputs' parameters for `txn`
// under `mu` (ParamTable::Claim), runs `compute(claimed)`, and releases the
// claims again when it fails. std::bad_alloc anywhere is ResourceExhausted.
template <typename Param, typename ComputeFn>
absl::Status ClaimAndCompute(absl::Mutex& mu, ParamTable<Param>& table,
                             const StepTransaction* txn, absl::Span<const GradientInput> grads,
                             absl::Span<UpdateOutput> outputs, ComputeFn compute) {
  std::vector<std::shared_ptr<Param>> claimed;
  absl::Status status;
  try {
    {
      absl::MutexLock lock(&mu);
      absl::StatusOr<std::vector<std::shared_ptr<Param>>> got = table.Claim(txn, grads, outputs);
      if (!got.ok()) return got.status();
      claimed = *std::move(got);
    }
    status = compute(claimed);
  } catch (const std::bad_alloc&) {
    status = OutOfHostMemory("for a step's buffers");
  }
  if (!status.ok()) {
    absl::MutexLock lock(&mu);
    ParamTable<Param>::Release(claimed);
  }
  return status;
}

// The budget an engine gets when EngineOptions::memory_budget_bytes is 0 and
// `machine_bytes` is what the machine has; also checks the options' ranges.
absl::StatusOr<int64_t> ResolveBudget(const EngineOptions& options, int64_t machine_bytes);

// Physical memory of this host, or the cgroup's memory limit when that is
// lower (a container's share); 0 when neither can be read.
int64_t HostMemoryBytes();

}  // namespace muon::internal

#endif  // MUON_KERNELS_INTERNAL_PARAM_TABLE_H_
