#include "muon/kernels/sharded_engine.h"

#include <algorithm>
#include <atomic>
#include <numeric>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "muon/kernels/status_macros.h"

namespace muon {
namespace {

struct Placement {
  int shard = 0;
  ParamId inner = 0;
  double cost = 0;
  int64_t state_bytes = 0;
};

class ShardedEngine final : public Engine {
 public:
  explicit ShardedEngine(std::vector<std::unique_ptr<Engine>> engines)
      : engines_(std::move(engines)), load_(engines_.size()) {}

  absl::string_view name() const override { return engines_.front()->name(); }

  absl::StatusOr<ParamId> Register(const ParamSpec& spec) override {
    // A bad spec fails here, the same way whatever engine would have taken it.
    MUON_RETURN_IF_ERROR(ValidateSpec(spec));
    std::vector<int> order(engines_.size());
    std::iota(order.begin(), order.end(), 0);
    {
      absl::MutexLock lock(&mu_);
      std::stable_sort(order.begin(), order.end(),
                       [&](int a, int b) { return load_[a].cost_seconds < load_[b].cost_seconds; });
    }
    absl::Status full;
    for (int shard : order) {
      absl::StatusOr<ParamId> id = RegisterOn(spec, shard);
      if (id.ok() || id.status().code() != absl::StatusCode::kResourceExhausted) return id;
      full = id.status();
    }
    return full;
  }

  absl::StatusOr<ParamId> RegisterOn(const ParamSpec& spec, int shard) {
    if (shard < 0 || shard >= shards()) {
      return absl::OutOfRangeError(
          absl::StrCat("device index ", shard, " does not exist; this engine has ", shards()));
    }
    MUON_ASSIGN_OR_RETURN(const ParamId inner, engines_[shard]->Register(spec));
    const double cost = PlacementCost(spec);
    absl::MutexLock lock(&mu_);
    load_[shard].parameters += 1;
    load_[shard].state_bytes += StateBytes(spec);
    load_[shard].cost_seconds += cost;
    const ParamId id = next_id_++;
    params_[id] = {shard, inner, cost, StateBytes(spec)};
    return id;
  }

  std::vector<ShardLoad> Loads() const {
    std::vector<ShardLoad> loads;
    {
      absl::MutexLock lock(&mu_);
      loads = load_;
    }
    for (size_t i = 0; i < loads.size(); ++i) loads[i].memory = engines_[i]->Memory();
    return loads;
  }

  absl::Status Unregister(ParamId id) override {
    MUON_ASSIGN_OR_RETURN(const Placement p, Find(id));
    MUON_RETURN_IF_ERROR(engines_[p.shard]->Unregister(p.inner));
    absl::MutexLock lock(&mu_);
    load_[p.shard].parameters -= 1;
    load_[p.shard].state_bytes -= p.state_bytes;
    load_[p.shard].cost_seconds -= p.cost;
    params_.erase(id);
    return absl::OkStatus();
  }

  absl::StatusOr<ParamSpec> Spec(ParamId id) const override {
    MUON_ASSIGN_OR_RETURN(const Placement p, Find(id));
    return engines_[p.shard]->Spec(p.inner);
  }

  absl::StatusOr<std::unique_ptr<StepTransaction>> BeginStep(const StepOptions& options) override;

  absl::Status SetWeights(ParamId id, absl::Span<const float> values) override {
    MUON_ASSIGN_OR_RETURN(const Placement p, Find(id));
    return engines_[p.shard]->SetWeights(p.inner, values);
  }
  absl::Status GetWeights(ParamId id, absl::Span<float> values) const override {
    MUON_ASSIGN_OR_RETURN(const Placement p, Find(id));
    return engines_[p.shard]->GetWeights(p.inner, values);
  }
  absl::StatusOr<ParamState> ExportState(ParamId id) const override {
    MUON_ASSIGN_OR_RETURN(const Placement p, Find(id));
    return engines_[p.shard]->ExportState(p.inner);
  }
  absl::Status ImportState(ParamId id, const ParamState& state) override {
    MUON_ASSIGN_OR_RETURN(const Placement p, Find(id));
    return engines_[p.shard]->ImportState(p.inner, state);
  }

  MemoryUsage Memory() const override {
    MemoryUsage total;
    bool unbudgeted = false;
    for (const auto& e : engines_) {
      const MemoryUsage m = e->Memory();
      total.used_bytes += m.used_bytes;
      total.budget_bytes += m.budget_bytes;
      unbudgeted |= m.budget_bytes == 0;
    }
    if (unbudgeted) total.budget_bytes = 0;
    return total;
  }

  absl::StatusOr<Placement> Find(ParamId id) const {
    absl::MutexLock lock(&mu_);
    auto it = params_.find(id);
    if (it == params_.end()) return absl::NotFoundError(absl::StrCat("unknown parameter id ", id));
    return it->second;
  }

  Engine& shard(int i) const { return *engines_[i]; }
  int shards() const { return static_cast<int>(engines_.size()); }

 private:
  const std::vector<std::unique_ptr<Engine>> engines_;
  mutable absl::Mutex mu_;
  std::vector<ShardLoad> load_ ABSL_GUARDED_BY(mu_);
  std::unordered_map<ParamId, Placement> params_ ABSL_GUARDED_BY(mu_);
  ParamId next_id_ ABSL_GUARDED_BY(mu_) = 1;
};

class ShardedTransaction final : public StepTransaction {
 public:
  ShardedTransaction(ShardedEngine* engine, const StepOptions& options)
      : engine_(engine), options_(options) {}

  absl::Status Compute(absl::Span<const GradientInput> grads, absl::Span<UpdateOutput> outputs,
                       StepStats* stats, UpdateReadyFn ready) override;

  absl::Status ComputedWeights(ParamId param, absl::Span<float> values) const override {
    MUON_ASSIGN_OR_RETURN(const Placement p, engine_->Find(param));
    auto it = computed_.find(param);
    if (committed_ || it == computed_.end()) {
      MUON_ASSIGN_OR_RETURN(const ParamSpec spec, engine_->shard(p.shard).Spec(p.inner));
      return absl::FailedPreconditionError(absl::StrCat("parameter '", spec.name, "' ",
                                                        ShapeString(spec.shape),
                                                        " is not computed in this open step"));
    }
    return it->second->ComputedWeights(p.inner, values);
  }

  absl::Status Commit() override {
    if (committed_) return absl::FailedPreconditionError("step already committed");
    committed_ = true;
    absl::Status status;
    for (auto& part : parts_) status.Update(part->Commit());
    parts_.clear();
    computed_.clear();
    return status;
  }

 private:
  ShardedEngine* const engine_;
  const StepOptions options_;
  std::vector<std::unique_ptr<StepTransaction>> parts_;
  // Each computed parameter and the part (of parts_) that computed it.
  std::unordered_map<ParamId, const StepTransaction*> computed_;
  bool committed_ = false;
};

absl::StatusOr<std::unique_ptr<StepTransaction>> ShardedEngine::BeginStep(
    const StepOptions& options) {
  return std::make_unique<ShardedTransaction>(this, options);
}

absl::Status ShardedTransaction::Compute(absl::Span<const GradientInput> grads,
                                         absl::Span<UpdateOutput> outputs, StepStats* stats,
                                         UpdateReadyFn ready) {
  if (committed_) return absl::FailedPreconditionError("step already committed");
  if (grads.size() != outputs.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(grads.size(), " gradients but ", outputs.size(), " update outputs"));
  }
  const int n = engine_->shards();
  struct Share {
    std::vector<size_t> items;  // indices into grads / outputs
    std::vector<GradientInput> grads;
    std::vector<UpdateOutput> outputs;
    std::unique_ptr<StepTransaction> txn;
    StepStats stats;
    absl::Status status;
  };
  std::vector<Share> shares(n);
  std::unordered_set<ParamId> seen;
  for (size_t i = 0; i < grads.size(); ++i) {
    MUON_ASSIGN_OR_RETURN(const Placement p, engine_->Find(grads[i].param));
    if (computed_.count(grads[i].param) > 0 || !seen.insert(grads[i].param).second) {
      MUON_ASSIGN_OR_RETURN(const ParamSpec spec, engine_->shard(p.shard).Spec(p.inner));
      return absl::InvalidArgumentError(absl::StrCat("parameter '", spec.name, "' ",
                                                     ShapeString(spec.shape),
                                                     " is given twice in one step"));
    }
    if (outputs[i].param != grads[i].param) {
      return absl::InvalidArgumentError(absl::StrCat("update output ", i, " is for parameter ",
                                                     outputs[i].param, ", its gradient for ",
                                                     grads[i].param));
    }
    Share& s = shares[p.shard];
    s.items.push_back(i);
    GradientInput g = grads[i];
    g.param = p.inner;
    s.grads.push_back(g);
    UpdateOutput o = outputs[i];
    o.param = p.inner;
    s.outputs.push_back(o);
  }
  // Once one engine's share has failed the call fails: the others' updates
  // are no longer reported.
  std::atomic<bool> failed{false};
  const auto run = [&](Share& s, int shard) {
    absl::StatusOr<std::unique_ptr<StepTransaction>> txn =
        engine_->shard(shard).BeginStep(options_);
    if (!txn.ok()) {
      s.status = txn.status();
      failed = true;
      return;
    }
    s.txn = *std::move(txn);
    // The bytes are already in the caller's buffers; the results are not.
    s.status = s.txn->Compute(s.grads, absl::MakeSpan(s.outputs), &s.stats, [&](size_t k) {
      UpdateOutput& out = outputs[s.items[k]];
      out.decay = s.outputs[k].decay;
      out.orthogonality_error = s.outputs[k].orthogonality_error;
      if (!failed) ready(s.items[k]);
    });
    if (!s.status.ok()) failed = true;
  };
  std::vector<std::thread> threads;
  int first = -1;
  for (int shard = 0; shard < n; ++shard) {
    if (shares[shard].items.empty()) continue;
    if (first < 0) {
      first = shard;
    } else {
      threads.emplace_back(run, std::ref(shares[shard]), shard);
    }
  }
  if (first >= 0) run(shares[first], first);
  for (std::thread& t : threads) t.join();
  // A failure anywhere discards every engine's share of this call (their
  // transactions are destroyed uncommitted).
  for (const Share& s : shares) {
    if (!s.items.empty() && !s.status.ok()) return s.status;
  }
  StepStats merged;
  merged.device_compute_seconds.assign(static_cast<size_t>(n), 0.0);
  for (int shard = 0; shard < n; ++shard) {
    Share& s = shares[shard];
    if (s.items.empty()) continue;
    merged.device_compute_seconds[shard] = s.stats.compute_seconds;
    for (size_t k : s.items) computed_.emplace(outputs[k].param, s.txn.get());
    merged.stage_seconds = std::max(merged.stage_seconds, s.stats.stage_seconds);
    merged.compute_seconds = std::max(merged.compute_seconds, s.stats.compute_seconds);
    merged.finish_seconds = std::max(merged.finish_seconds, s.stats.finish_seconds);
    merged.ns_flops += s.stats.ns_flops;
    merged.parameters += s.stats.parameters;
    parts_.push_back(std::move(s.txn));
  }
  if (stats != nullptr) *stats += merged;
  return absl::OkStatus();
}

}  // namespace

double PlacementCost(const ParamSpec& spec) {
  double seconds = 2.0 * static_cast<double>(StateBytes(spec)) / kShardByteRate;
  if (spec.kind == OptimizerKind::kMuon && spec.shape.size() >= 2) {
    const int steps = spec.hp.ns_schedule == ScheduleKind::kSvd ? 1 : spec.hp.ns_steps;
    seconds += static_cast<double>(NsFlops(MatrixViewOf(spec.shape), steps)) / kShardFlopRate;
  }
  return seconds;
}

absl::StatusOr<std::unique_ptr<Engine>> CreateShardedEngine(
    std::vector<std::unique_ptr<Engine>> engines) {
  if (engines.empty()) return absl::InvalidArgumentError("a sharded engine needs an engine");
  for (const auto& e : engines) {
    if (e == nullptr) return absl::InvalidArgumentError("a sharded engine's engine is null");
  }
  return std::make_unique<ShardedEngine>(std::move(engines));
}

absl::StatusOr<int> ShardOf(const Engine& engine, ParamId param) {
  const auto* sharded = dynamic_cast<const ShardedEngine*>(&engine);
  if (sharded == nullptr) return absl::InvalidArgumentError("not a sharded engine");
  MUON_ASSIGN_OR_RETURN(const Placement p, sharded->Find(param));
  return p.shard;
}

absl::StatusOr<std::vector<ShardLoad>> ShardLoads(const Engine& engine) {
  const auto* sharded = dynamic_cast<const ShardedEngine*>(&engine);
  if (sharded == nullptr) return absl::InvalidArgumentError("not a sharded engine");
  return sharded->Loads();
}

absl::StatusOr<ParamId> RegisterOnShard(Engine& engine, const ParamSpec& spec, int shard) {
  auto* sharded = dynamic_cast<ShardedEngine*>(&engine);
  if (sharded == nullptr) return absl::InvalidArgumentError("not a sharded engine");
  MUON_RETURN_IF_ERROR(ValidateSpec(spec));
  return sharded->RegisterOn(spec, shard);
}

}  // namespace muon
