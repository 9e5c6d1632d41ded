// The CPU engine: fp32 state in host memory, Newton–Schulz on OpenBLAS.
// It is the reference every other engine is tested against.
#include <cblas.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstdint>
#include <cmath>
#include <map>
#include <memory>
#include <new>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "muon/kernels/cpu_ns.h"
#include "muon/kernels/engine.h"
#include "muon/kernels/internal/param_table.h"
#include "muon/kernels/internal/step_math.h"
#include "muon/kernels/ns_schedule.h"
#include "muon/kernels/status_macros.h"

namespace muon {
namespace {

using internal::ParamTable;

// Whether every value added was finite, kept as the largest exponent field
// seen: an integer max, which the compiler vectorizes along with the loop
// (a bool chain of isfinite kept the loops scalar).
class FiniteTracker {
 public:
  void Add(float x) {
    max_exponent_ = std::max(max_exponent_, std::bit_cast<uint32_t>(x) & kExponent);
  }
  bool all_finite() const { return max_exponent_ != kExponent; }

 private:
  static constexpr uint32_t kExponent = 0x7f800000u;
  uint32_t max_exponent_ = 0;
};

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// Host bytes a parameter can hold at once, charged at Register so that the
// budget bounds the engine's peak: its state, the shadow copy a step writes,
// and the step's fp32 buffers (decoded gradient and update; for Muon also
// the Newton–Schulz batch copy and OrthogonalizeCpu's wide copy, Y and two
// r×r matrices).
int64_t ChargedBytes(const ParamSpec& spec) {
  const int64_t n = NumElements(spec.shape);
  int64_t step_floats = 2 * n;
  if (spec.kind == OptimizerKind::kMuon) {
    const MatrixView v = MatrixViewOf(spec.shape);
    const int64_t r = std::min(v.rows, v.cols);
    step_floats += 3 * n + 2 * r * r;
  }
  return 2 * StateBytes(spec) + step_floats * static_cast<int64_t>(sizeof(float));
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
  const StepTransaction* owner = nullptr;
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
  CpuEngine(int64_t budget_bytes, const EngineOptions& options)
      : budget_(budget_bytes, options.memory_budget_setting) {}

  absl::string_view name() const override { return "cpu"; }

  absl::StatusOr<ParamId> Register(const ParamSpec& spec) override {
    MUON_RETURN_IF_ERROR(ValidateSpec(spec));
    try {
      return RegisterValid(spec);
    } catch (const std::bad_alloc&) {
      return internal::OutOfHostMemory(
          absl::StrCat("for the optimizer state of ", internal::Who(spec)));
    }
  }

  absl::Status Unregister(ParamId id) override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, params_.Remove(id));
    budget_.Release(ChargedBytes(p->spec));
    return absl::OkStatus();
  }

  absl::StatusOr<ParamSpec> Spec(ParamId id) const override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, params_.Find(id));
    return p->spec;
  }

  absl::StatusOr<std::unique_ptr<StepTransaction>> BeginStep(const StepOptions& options) override;

  absl::Status SetWeights(ParamId id, absl::Span<const float> values) override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p,
                          params_.FindHolder(id, values.size(), /*idle=*/true));
    std::copy(values.begin(), values.end(), p->weights.begin());
    return absl::OkStatus();
  }

  absl::Status GetWeights(ParamId id, absl::Span<float> values) const override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p,
                          params_.FindHolder(id, values.size(), /*idle=*/false));
    std::copy(p->weights.begin(), p->weights.end(), values.begin());
    return absl::OkStatus();
  }

  absl::StatusOr<ParamState> ExportState(ParamId id) const override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, params_.Find(id));
    try {
      return ParamState{p->step, p->momentum, p->exp_avg, p->exp_avg_sq, p->weights};
    } catch (const std::bad_alloc&) {
      return internal::OutOfHostMemory(
          absl::StrCat("exporting the state of ", internal::Who(p->spec)));
    }
  }

  absl::Status ImportState(ParamId id, const ParamState& state) override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, params_.FindIdle(id));
    MUON_RETURN_IF_ERROR(internal::CheckImport(p->spec, state));
    // Sizes match, so the copies allocate nothing.
    p->step = state.step;
    std::copy(state.momentum.begin(), state.momentum.end(), p->momentum.begin());
    std::copy(state.exp_avg.begin(), state.exp_avg.end(), p->exp_avg.begin());
    std::copy(state.exp_avg_sq.begin(), state.exp_avg_sq.end(), p->exp_avg_sq.begin());
    std::copy(state.weights.begin(), state.weights.end(), p->weights.begin());
    return absl::OkStatus();
  }

  MemoryUsage Memory() const override {
    absl::MutexLock lock(&mu_);
    return budget_.Usage();
  }

 private:
  friend class CpuTransaction;

  absl::StatusOr<ParamId> RegisterValid(const ParamSpec& spec) {
    auto param = std::make_shared<Param>();
    param->spec = spec;
    param->size = NumElements(spec.shape);
    if (spec.kind == OptimizerKind::kMuon) {
      param->view = MatrixViewOf(spec.shape);
      MUON_ASSIGN_OR_RETURN(param->coeffs, MakeNsCoefficients(spec.hp, param->view));
    }
    const int64_t bytes = ChargedBytes(spec);
    absl::MutexLock lock(&mu_);
    MUON_RETURN_IF_ERROR(budget_.Reserve(
        bytes, internal::Who(spec),
        "host memory (its optimizer state, the copy a step writes, and the step's buffers)"));
    try {
      if (spec.kind == OptimizerKind::kMuon) {
        param->momentum.assign(param->size, 0.0f);
      } else {
        param->exp_avg.assign(param->size, 0.0f);
        param->exp_avg_sq.assign(param->size, 0.0f);
      }
      if (spec.hold_weights) param->weights.assign(param->size, 0.0f);
    } catch (const std::bad_alloc&) {
      budget_.Release(bytes);
      throw;
    }
    return params_.Add(std::move(param));
  }

  mutable absl::Mutex mu_;
  ParamTable<Param> params_ ABSL_GUARDED_BY(mu_);
  internal::MemoryBudget budget_ ABSL_GUARDED_BY(mu_);
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
                       StepStats* stats) override {
    if (committed_) return absl::FailedPreconditionError("step already committed");
    return internal::ClaimAndCompute(
        engine_->mu_, engine_->params_, this, grads, outputs,
        [&](const std::vector<std::shared_ptr<Param>>& params) {
          return ComputeClaimed(params, grads, outputs, stats);
        });
  }

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
  // The work of Compute on claimed parameters. On error the caller releases
  // them; nothing of this call is kept.
  absl::Status ComputeClaimed(const std::vector<std::shared_ptr<Param>>& params,
                              absl::Span<const GradientInput> grads,
                              absl::Span<UpdateOutput> outputs, StepStats* stats);

  CpuEngine* const engine_;
  const StepOptions options_;
  std::vector<Shadow> shadows_;
  bool committed_ = false;
};

absl::StatusOr<std::unique_ptr<StepTransaction>> CpuEngine::BeginStep(const StepOptions& options) {
  return std::make_unique<CpuTransaction>(this, options);
}

// A finite gradient can still overflow fp32 state (values near the fp32
// maximum, or a sum-form momentum that keeps growing); committing it would
// leave Inf/NaN in the state and zero updates from then on.
absl::Status Overflow(const Param& p, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(
      internal::Who(p.spec), ": this step's gradient would make the ", what,
      " non-finite in fp32; the step is refused and the state is unchanged (scale the gradient "
      "down, e.g. clip it)"));
}

absl::Status CpuTransaction::ComputeClaimed(const std::vector<std::shared_ptr<Param>>& params,
                                            absl::Span<const GradientInput> grads,
                                            absl::Span<UpdateOutput> outputs, StepStats* stats) {
  StepStats local;
  auto start = std::chrono::steady_clock::now();

  // Stage: decode gradients to fp32 and reject NaN/Inf before any state moves.
  std::vector<std::vector<float>> g(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const Param& p = *params[i];
    g[i].resize(p.size);
    DecodeToFloat(grads[i].dtype, grads[i].bytes.data(), p.size, g[i].data());
    if (!std::all_of(g[i].begin(), g[i].end(), [](float v) { return std::isfinite(v); })) {
      return absl::InvalidArgumentError(absl::StrCat("parameter '", p.spec.name,
                                                     "': gradient contains NaN or Inf"));
    }
  }
  local.stage_seconds = Seconds(start);
  start = std::chrono::steady_clock::now();

  std::vector<Shadow> shadows(params.size());
  std::vector<std::vector<float>> update(params.size());  // fp32, before encoding
  // Muon parameters grouped by (rows, cols, schedule, steps, Gram, custom
  // coefficients, eps): each group is one batch of same-shape matrices for
  // Newton–Schulz with one NsCoefficients.
  std::map<std::tuple<int64_t, int64_t, ScheduleKind, int, bool,
                      std::vector<std::array<double, 3>>, double>, std::vector<size_t>> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    const Param& p = *params[i];
    const HyperParams hp = StepHyperParams(p.spec, grads[i]);
    Shadow& s = shadows[i];
    s.param = params[i];
    const double lr = hp.lr;
    outputs[i].decay = internal::DecayFactor(lr, hp.weight_decay);
    outputs[i].orthogonality_error = std::numeric_limits<double>::quiet_NaN();
    update[i].resize(p.size);
    FiniteTracker finite;
    if (p.spec.kind == OptimizerKind::kMuon) {
      const internal::MomentumCoefficients c = internal::MakeMomentumCoefficients(
          hp.momentum, hp.momentum_form == MomentumForm::kEma, hp.nesterov);
      s.momentum.resize(p.size);
      for (int64_t k = 0; k < p.size; ++k) {
        update[i][k] = internal::MomentumStep(c, p.momentum[k], g[i][k], &s.momentum[k]);
        finite.Add(s.momentum[k]);
        finite.Add(update[i][k]);
      }
      if (!finite.all_finite()) return Overflow(p, "momentum");
      groups[{p.view.rows, p.view.cols, hp.ns_schedule, hp.ns_steps, p.coeffs.gram,
              hp.ns_coefficients, hp.ns_eps}]
          .push_back(i);
    } else {
      const auto c = internal::MakeAdamWCoefficients<double>(hp.beta1, hp.beta2, hp.eps, lr,
                                                             p.step + 1);
      s.exp_avg.resize(p.size);
      s.exp_avg_sq.resize(p.size);
      for (int64_t k = 0; k < p.size; ++k) {
        update[i][k] = internal::AdamWStep(c, p.exp_avg[k], p.exp_avg_sq[k], g[i][k],
                                           &s.exp_avg[k], &s.exp_avg_sq[k]);
        finite.Add(s.exp_avg[k]);
        finite.Add(s.exp_avg_sq[k]);
        finite.Add(update[i][k]);
      }
      if (!finite.all_finite()) return Overflow(p, "AdamW moments or update");
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
    MUON_RETURN_IF_ERROR(OrthogonalizeCpu(first.coeffs, all, batch.data()));
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
      const float scale =
          internal::MuonUpdateScale(lr, internal::ShapeScaleFactor(p.spec.hp.shape_scale, v));
      FiniteTracker finite;
      for (int64_t k = 0; k < p.size; ++k) {
        update[i][k] = internal::MuonUpdate(scale, o[k]);
        finite.Add(update[i][k]);
      }
      if (!finite.all_finite()) return Overflow(p, "update");
    }
  }

  for (size_t i = 0; i < params.size(); ++i) {
    const Param& p = *params[i];
    if (p.spec.hold_weights) {
      const float decay = static_cast<float>(outputs[i].decay);
      shadows[i].weights.resize(p.size);
      FiniteTracker finite;
      for (int64_t k = 0; k < p.size; ++k) {
        shadows[i].weights[k] = internal::DecayedWeight(decay, p.weights[k], update[i][k]);
        finite.Add(shadows[i].weights[k]);
      }
      if (!finite.all_finite()) return Overflow(p, "weights");
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

  shadows_.reserve(shadows_.size() + shadows.size());
  for (Shadow& s : shadows) shadows_.push_back(std::move(s));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> CreateCpuEngine(const EngineOptions& options) {
  MUON_ASSIGN_OR_RETURN(const int64_t budget,
                        internal::ResolveBudget(options, internal::HostMemoryBytes()));
  if (options.blas_threads < 0) {
    return absl::InvalidArgumentError("BLAS threads must be >= 0 (0: OpenBLAS's default)");
  }
  // Process-wide: OpenBLAS has one thread count.
  if (options.blas_threads > 0) openblas_set_num_threads(options.blas_threads);
  return std::make_unique<CpuEngine>(budget, options);
}

}  // namespace muon
