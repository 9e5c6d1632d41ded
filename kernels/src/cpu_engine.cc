// The CPU engine: fp32 state in host memory, Newton–Schulz on OpenBLAS.
// It is the reference every other engine is tested against.
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "muon/kernels/cpu_ns.h"
#include "muon/kernels/engine.h"
#include "muon/kernels/ns_schedule.h"
#include "muon/kernels/status_macros.h"

namespace muon {
namespace {

class CpuTransaction;

double ShapeScaleFactor(ShapeScale scale, const MatrixView& v) {
  switch (scale) {
    case ShapeScale::kSpectral:
      return std::sqrt(std::max(1.0, static_cast<double>(v.rows) / static_cast<double>(v.cols)));
    case ShapeScale::kRmsMatch:
      return 0.2 * std::sqrt(static_cast<double>(std::max(v.rows, v.cols)));
    case ShapeScale::kNone:
      return 1.0;
  }
  return 1.0;
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

struct Param {
  ParamSpec spec;
  MatrixView view;
  int64_t size = 0;
  NsCoefficients coeffs;  // Muon only
  // State; replaced only at Commit by the transaction that owns the parameter.
  int64_t step = 0;
  std::vector<float> momentum;
  std::vector<float> exp_avg;
  std::vector<float> exp_avg_sq;
  std::vector<float> weights;
  // The open transaction computing this parameter, if any.
  const CpuTransaction* owner = nullptr;
};

// The state a transaction computed for one parameter, swapped in at Commit.
struct Shadow {
  std::shared_ptr<Param> param;
  std::vector<float> momentum;
  std::vector<float> exp_avg;
  std::vector<float> exp_avg_sq;
  std::vector<float> weights;
};

class CpuEngine final : public Engine {
 public:
  explicit CpuEngine(const EngineOptions& options) : options_(options) {}

  absl::string_view name() const override { return "cpu"; }

  absl::StatusOr<ParamId> Register(const ParamSpec& spec) override {
    MUON_RETURN_IF_ERROR(ValidateSpec(spec));
    auto param = std::make_shared<Param>();
    param->spec = spec;
    param->size = NumElements(spec.shape);
    if (spec.kind == OptimizerKind::kMuon) {
      param->view = MatrixViewOf(spec.shape);
      MUON_ASSIGN_OR_RETURN(param->coeffs,
                            MakeNsCoefficients(spec.hp.ns_schedule, spec.hp.ns_steps));
    }
    const int64_t bytes = StateBytes(spec);
    absl::MutexLock lock(&mu_);
    if (options_.memory_budget_bytes > 0 && used_bytes_ + bytes > options_.memory_budget_bytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "parameter '", spec.name, "' needs ", bytes, " bytes of optimizer state; ", used_bytes_,
          " of the ", options_.memory_budget_bytes, "-byte memory budget are in use"));
    }
    if (spec.kind == OptimizerKind::kMuon) {
      param->momentum.assign(param->size, 0.0f);
    } else {
      param->exp_avg.assign(param->size, 0.0f);
      param->exp_avg_sq.assign(param->size, 0.0f);
    }
    if (spec.hold_weights) param->weights.assign(param->size, 0.0f);
    used_bytes_ += bytes;
    const ParamId id = next_id_++;
    params_.emplace(id, std::move(param));
    return id;
  }

  absl::Status Unregister(ParamId id) override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, FindLocked(id));
    if (p->owner != nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("parameter '", p->spec.name, "' is in a step in progress"));
    }
    used_bytes_ -= StateBytes(p->spec);
    params_.erase(id);
    return absl::OkStatus();
  }

  absl::StatusOr<ParamSpec> Spec(ParamId id) const override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, FindLocked(id));
    return p->spec;
  }

  absl::StatusOr<std::unique_ptr<StepTransaction>> BeginStep(const StepOptions& options) override;

  absl::Status SetWeights(ParamId id, absl::Span<const float> values) override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, IdleHolderLocked(id, values.size()));
    p->weights.assign(values.begin(), values.end());
    return absl::OkStatus();
  }

  absl::Status GetWeights(ParamId id, absl::Span<float> values) const override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, FindLocked(id));
    if (!p->spec.hold_weights) {
      return absl::FailedPreconditionError(
          absl::StrCat("parameter '", p->spec.name, "' does not hold weights"));
    }
    if (values.size() != static_cast<size_t>(p->size)) {
      return absl::InvalidArgumentError(absl::StrCat("parameter '", p->spec.name, "' has ",
                                                     p->size, " weights, not ", values.size()));
    }
    std::copy(p->weights.begin(), p->weights.end(), values.begin());
    return absl::OkStatus();
  }

  absl::StatusOr<ParamState> ExportState(ParamId id) const override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, FindLocked(id));
    return ParamState{p->step, p->momentum, p->exp_avg, p->exp_avg_sq, p->weights};
  }

  absl::Status ImportState(ParamId id, const ParamState& state) override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, FindLocked(id));
    if (p->owner != nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("parameter '", p->spec.name, "' is in a step in progress"));
    }
    const auto check = [&](const std::vector<float>& have, const std::vector<float>& want,
                           absl::string_view what) -> absl::Status {
      if (have.size() == want.size()) return absl::OkStatus();
      return absl::InvalidArgumentError(absl::StrCat("state of parameter '", p->spec.name, "': ",
                                                     what, " has ", have.size(),
                                                     " values, expected ", want.size()));
    };
    MUON_RETURN_IF_ERROR(check(state.momentum, p->momentum, "momentum"));
    MUON_RETURN_IF_ERROR(check(state.exp_avg, p->exp_avg, "exp_avg"));
    MUON_RETURN_IF_ERROR(check(state.exp_avg_sq, p->exp_avg_sq, "exp_avg_sq"));
    MUON_RETURN_IF_ERROR(check(state.weights, p->weights, "weights"));
    if (state.step < 0) return absl::InvalidArgumentError("state step must be >= 0");
    p->step = state.step;
    p->momentum = state.momentum;
    p->exp_avg = state.exp_avg;
    p->exp_avg_sq = state.exp_avg_sq;
    p->weights = state.weights;
    return absl::OkStatus();
  }

  MemoryUsage Memory() const override {
    absl::MutexLock lock(&mu_);
    return {used_bytes_, options_.memory_budget_bytes};
  }

 private:
  friend class CpuTransaction;

  absl::StatusOr<std::shared_ptr<Param>> FindLocked(ParamId id) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = params_.find(id);
    if (it == params_.end()) return absl::NotFoundError(absl::StrCat("unknown parameter id ", id));
    return it->second;
  }

  absl::StatusOr<std::shared_ptr<Param>> IdleHolderLocked(ParamId id, size_t values) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, FindLocked(id));
    if (!p->spec.hold_weights) {
      return absl::FailedPreconditionError(
          absl::StrCat("parameter '", p->spec.name, "' does not hold weights"));
    }
    if (p->owner != nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat("parameter '", p->spec.name, "' is in a step in progress"));
    }
    if (values != static_cast<size_t>(p->size)) {
      return absl::InvalidArgumentError(absl::StrCat("parameter '", p->spec.name, "' has ",
                                                     p->size, " weights, not ", values));
    }
    return p;
  }

  const EngineOptions options_;
  mutable absl::Mutex mu_;
  std::unordered_map<ParamId, std::shared_ptr<Param>> params_ ABSL_GUARDED_BY(mu_);
  ParamId next_id_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t used_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

class CpuTransaction final : public StepTransaction {
 public:
  CpuTransaction(CpuEngine* engine, const StepOptions& options)
      : engine_(engine), options_(options) {}

  ~CpuTransaction() override {
    absl::MutexLock lock(&engine_->mu_);
    for (Shadow& s : shadows_) s.param->owner = nullptr;
  }

  absl::Status Compute(absl::Span<const GradientInput> grads, absl::Span<UpdateOutput> outputs,
                       StepStats* stats) override;

  absl::Status Commit() override {
    absl::MutexLock lock(&engine_->mu_);
    if (committed_) return absl::FailedPreconditionError("step already committed");
    for (Shadow& s : shadows_) {
      Param& p = *s.param;
      p.step += 1;
      p.momentum.swap(s.momentum);
      p.exp_avg.swap(s.exp_avg);
      p.exp_avg_sq.swap(s.exp_avg_sq);
      p.weights.swap(s.weights);
      p.owner = nullptr;
    }
    shadows_.clear();
    committed_ = true;
    return absl::OkStatus();
  }

 private:
  // Claims the parameters of one Compute call after validating every input.
  absl::StatusOr<std::vector<std::shared_ptr<Param>>> Claim(absl::Span<const GradientInput> grads,
                                                            absl::Span<UpdateOutput> outputs);
  void Release(const std::vector<std::shared_ptr<Param>>& params);

  CpuEngine* const engine_;
  const StepOptions options_;
  std::vector<Shadow> shadows_;
  bool committed_ = false;
};

absl::StatusOr<std::unique_ptr<StepTransaction>> CpuEngine::BeginStep(const StepOptions& options) {
  return std::make_unique<CpuTransaction>(this, options);
}

absl::StatusOr<std::vector<std::shared_ptr<Param>>> CpuTransaction::Claim(
    absl::Span<const GradientInput> grads, absl::Span<UpdateOutput> outputs) {
  if (committed_) return absl::FailedPreconditionError("step already committed");
  if (grads.size() != outputs.size()) {
    return absl::InvalidArgumentError(absl::StrCat(grads.size(), " gradients but ",
                                                   outputs.size(), " update outputs"));
  }
  absl::MutexLock lock(&engine_->mu_);
  std::vector<std::shared_ptr<Param>> params;
  for (size_t i = 0; i < grads.size(); ++i) {
    const GradientInput& g = grads[i];
    absl::StatusOr<std::shared_ptr<Param>> found = engine_->FindLocked(g.param);
    absl::Status status = found.status();
    if (status.ok()) {
      const Param& p = **found;
      const std::string who =
          absl::StrCat("parameter '", p.spec.name, "' ", ShapeString(p.spec.shape));
      if (p.owner == this) {
        status = absl::InvalidArgumentError(absl::StrCat(who, " is given twice in one step"));
      } else if (p.owner != nullptr) {
        status =
            absl::FailedPreconditionError(absl::StrCat(who, " is in another step in progress"));
      } else {
        status = CheckStepInput(p.spec, g, outputs[i]);
      }
    }
    if (!status.ok()) {
      for (auto& p : params) p->owner = nullptr;
      return status;
    }
    (*found)->owner = this;
    params.push_back(*std::move(found));
  }
  return params;
}

void CpuTransaction::Release(const std::vector<std::shared_ptr<Param>>& params) {
  absl::MutexLock lock(&engine_->mu_);
  for (const auto& p : params) p->owner = nullptr;
}

absl::Status CpuTransaction::Compute(absl::Span<const GradientInput> grads,
                                     absl::Span<UpdateOutput> outputs, StepStats* stats) {
  MUON_ASSIGN_OR_RETURN(std::vector<std::shared_ptr<Param>> params, Claim(grads, outputs));
  StepStats local;
  auto start = std::chrono::steady_clock::now();

  // Stage: decode gradients to fp32 and reject NaN/Inf before any state moves.
  std::vector<std::vector<float>> g(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const Param& p = *params[i];
    g[i].resize(p.size);
    DecodeToFloat(p.spec.dtype, grads[i].bytes.data(), p.size, g[i].data());
    if (!std::all_of(g[i].begin(), g[i].end(), [](float v) { return std::isfinite(v); })) {
      Release(params);
      return absl::InvalidArgumentError(absl::StrCat("parameter '", p.spec.name,
                                                     "': gradient contains NaN or Inf"));
    }
  }
  local.stage_seconds = Seconds(start);
  start = std::chrono::steady_clock::now();

  std::vector<Shadow> shadows(params.size());
  std::vector<std::vector<float>> update(params.size());  // fp32, before encoding
  // Muon parameters grouped by (rows, cols, schedule, steps): each group is
  // one batch of same-shape matrices for Newton–Schulz.
  std::map<std::tuple<int64_t, int64_t, ScheduleKind, int>, std::vector<size_t>> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    const Param& p = *params[i];
    const HyperParams hp = StepHyperParams(p.spec, grads[i]);
    Shadow& s = shadows[i];
    s.param = params[i];
    const double lr = hp.lr;
    outputs[i].decay = 1.0 - lr * hp.weight_decay;
    outputs[i].orthogonality_error = std::numeric_limits<double>::quiet_NaN();
    update[i].resize(p.size);
    if (p.spec.kind == OptimizerKind::kMuon) {
      const float beta = static_cast<float>(hp.momentum);
      const bool ema = hp.momentum_form == MomentumForm::kEma;
      // 1 − β in double: 1.0f − float(β) loses β's rounding (2.4e-7 relative for 0.95).
      const float gain = ema ? static_cast<float>(1.0 - hp.momentum) : 1.0f;  // weight of G
      s.momentum.resize(p.size);
      for (int64_t k = 0; k < p.size; ++k) {
        const float b = beta * p.momentum[k] + gain * g[i][k];
        s.momentum[k] = b;
        update[i][k] = hp.nesterov ? gain * g[i][k] + beta * b : b;
      }
      groups[{p.view.rows, p.view.cols, hp.ns_schedule, hp.ns_steps}].push_back(i);
    } else {
      const double t = static_cast<double>(p.step + 1);
      const double bc1 = 1.0 - std::pow(hp.beta1, t);
      const double bc2 = 1.0 - std::pow(hp.beta2, t);
      const float b1 = static_cast<float>(hp.beta1), b2 = static_cast<float>(hp.beta2);
      // 1 − β in double: 1.0f − float(0.999) is 1.3e-5 off (1.7e-4 for 0.9999).
      const float c1 = static_cast<float>(1.0 - hp.beta1), c2 = static_cast<float>(1.0 - hp.beta2);
      s.exp_avg.resize(p.size);
      s.exp_avg_sq.resize(p.size);
      for (int64_t k = 0; k < p.size; ++k) {
        const float gk = g[i][k];
        const float m = b1 * p.exp_avg[k] + c1 * gk;
        const float v = b2 * p.exp_avg_sq[k] + c2 * gk * gk;
        s.exp_avg[k] = m;
        s.exp_avg_sq[k] = v;
        const double denom = std::sqrt(v / bc2) + hp.eps;
        update[i][k] = static_cast<float>(-lr * (m / bc1) / denom);
      }
    }
  }

  for (const auto& [key, members] : groups) {
    const Param& first = *params[members.front()];
    const MatrixView& v = first.view;
    const int64_t size = v.rows * v.cols;
    const int64_t per_param = v.batch * size;
    std::vector<float> batch(per_param * members.size());
    for (size_t j = 0; j < members.size(); ++j) {
      std::copy(update[members[j]].begin(), update[members[j]].end(),
                batch.begin() + j * per_param);
    }
    const MatrixView all{v.batch * static_cast<int64_t>(members.size()), v.rows, v.cols};
    if (absl::Status s = OrthogonalizeCpu(first.coeffs, all, batch.data()); !s.ok()) {
      Release(params);
      return s;
    }
    local.ns_flops += NsFlops(all, static_cast<int>(first.coeffs.steps.size()));
    for (size_t j = 0; j < members.size(); ++j) {
      const size_t i = members[j];
      const Param& p = *params[i];
      const float* o = batch.data() + j * per_param;
      if (options_.measure_orthogonality) {
        double err = 0;
        for (int64_t k = 0; k < v.batch; ++k) err += OrthogonalityError(v.rows, v.cols, o + k * size);
        outputs[i].orthogonality_error = err / static_cast<double>(v.batch);
      }
      const double lr = StepHyperParams(p.spec, grads[i]).lr;
      const float scale = static_cast<float>(-lr * ShapeScaleFactor(p.spec.hp.shape_scale, v));
      for (int64_t k = 0; k < p.size; ++k) update[i][k] = scale * o[k];
    }
  }

  for (size_t i = 0; i < params.size(); ++i) {
    const Param& p = *params[i];
    if (p.spec.hold_weights) {
      const float decay = static_cast<float>(outputs[i].decay);
      shadows[i].weights.resize(p.size);
      for (int64_t k = 0; k < p.size; ++k) {
        shadows[i].weights[k] = decay * p.weights[k] + update[i][k];
      }
    }
  }
  local.compute_seconds = Seconds(start);
  start = std::chrono::steady_clock::now();

  for (size_t i = 0; i < params.size(); ++i) {
    EncodeFromFloat(outputs[i].dtype, update[i].data(), update[i].size(),
                    outputs[i].bytes.data());
  }
  local.finish_seconds = Seconds(start);
  local.parameters = static_cast<int64_t>(params.size());
  if (stats != nullptr) *stats += local;

  for (Shadow& s : shadows) shadows_.push_back(std::move(s));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> CreateCpuEngine(const EngineOptions& options) {
  if (options.memory_budget_bytes < 0) {
    return absl::InvalidArgumentError("memory budget must be >= 0 (0: no budget)");
  }
  if (options.blas_threads < 0) {
    return absl::InvalidArgumentError("BLAS threads must be >= 0 (0: OpenBLAS's default)");
  }
  // Process-wide: OpenBLAS has one thread count.
  if (options.blas_threads > 0) openblas_set_num_threads(options.blas_threads);
  return std::make_unique<CpuEngine>(options);
}

}  // namespace muon
