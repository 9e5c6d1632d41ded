// The CPU engine: fp32 state in host memory, Newton–Schulz on OpenBLAS.
// It is the reference every other engine is tested against.
#include <cblas.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstdint>
#include <cmath>
#include <memory>
#include <new>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "muon/kernels/cpu_ns.h"
#include "muon/kernels/engine.h"
#include "muon/kernels/internal/param_table.h"
#include "muon/kernels/internal/step_math.h"
#include "muon/kernels/internal/worker_pool.h"
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
// budget bounds the engine's peak: its state, the copy a step writes (kept
// allocated between steps), and, as a bound on the workspace a step of it
// can take, its fp32 buffers (for Muon the momentum output that
// Newton–Schulz works on, Y and two r×r matrices; workspaces are per compute
// thread and reused). One more fp32 copy is still charged, the wide copy
// OrthogonalizeCpu no longer makes: lowering it changes what every budget
// admits, a change of its own.
int64_t ChargedBytes(const ParamSpec& spec) {
  const int64_t n = NumElements(spec.shape);
  int64_t step_floats = 0;
  if (spec.kind == OptimizerKind::kMuon) {
    const MatrixView v = MatrixViewOf(spec.shape);
    const int64_t r = std::min(v.rows, v.cols);
    step_floats += 3 * n + 2 * r * r;
  }
  return 2 * StateBytes(spec) + step_floats * static_cast<int64_t>(sizeof(float));
}

// Optimizer state vectors: the current ones and the ones a step writes,
// swapped at Commit. Both are allocated at Register, so a step allocates no
// state.
struct StateBuffers {
  std::vector<float> momentum;
  std::vector<float> exp_avg;
  std::vector<float> exp_avg_sq;
  std::vector<float> weights;

  void Swap(StateBuffers& other) {
    momentum.swap(other.momentum);
    exp_avg.swap(other.exp_avg);
    exp_avg_sq.swap(other.exp_avg_sq);
    weights.swap(other.weights);
  }
};

struct Param {
  ParamSpec spec;
  MatrixView view;
  int64_t size = 0;
  NsCoefficients coeffs;  // Muon only
  // State; replaced only at Commit by the transaction that owns the parameter.
  int64_t step = 0;
  StateBuffers state;
  // Written by the open transaction that owns the parameter.
  StateBuffers next;
  // The open transaction computing this parameter, if any.
  const StepTransaction* owner = nullptr;
};

// A compute thread's scratch for one Muon parameter: the Newton–Schulz input
// M, orthogonalized in place, and the iteration's work matrices. Reused from
// step to step; grows to the largest parameter it served.
struct Workspace {
  std::vector<float> m;
  NsWorkspace ns;
};

// Workspaces not in use by a task. Tasks at once are bounded by the compute
// threads plus the engine's callers, and so is the number of workspaces.
class WorkspacePool {
 public:
  std::unique_ptr<Workspace> Take() {
    absl::MutexLock lock(&mu_);
    if (free_.empty()) return std::make_unique<Workspace>();
    std::unique_ptr<Workspace> ws = std::move(free_.back());
    free_.pop_back();
    return ws;
  }
  void Give(std::unique_ptr<Workspace> ws) {
    absl::MutexLock lock(&mu_);
    free_.push_back(std::move(ws));
  }

 private:
  absl::Mutex mu_;
  std::vector<std::unique_ptr<Workspace>> free_ ABSL_GUARDED_BY(mu_);
};

// Element-wise work runs on this many elements at a time, in buffers on the
// stack: no full-size fp32 copy of a gradient or update exists.
constexpr int64_t kChunk = 4096;

class CpuEngine final : public Engine {
 public:
  CpuEngine(int64_t budget_bytes, const EngineOptions& options, int compute_threads)
      : budget_(budget_bytes, options.memory_budget_setting), pool_(compute_threads) {}

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
    std::copy(values.begin(), values.end(), p->state.weights.begin());
    return absl::OkStatus();
  }

  absl::Status GetWeights(ParamId id, absl::Span<float> values) const override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p,
                          params_.FindHolder(id, values.size(), /*idle=*/false));
    std::copy(p->state.weights.begin(), p->state.weights.end(), values.begin());
    return absl::OkStatus();
  }

  absl::StatusOr<ParamState> ExportState(ParamId id) const override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, params_.Find(id));
    try {
      return ParamState{p->step, p->state.momentum, p->state.exp_avg, p->state.exp_avg_sq, p->state.weights};
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
    std::copy(state.momentum.begin(), state.momentum.end(), p->state.momentum.begin());
    std::copy(state.exp_avg.begin(), state.exp_avg.end(), p->state.exp_avg.begin());
    std::copy(state.exp_avg_sq.begin(), state.exp_avg_sq.end(), p->state.exp_avg_sq.begin());
    std::copy(state.weights.begin(), state.weights.end(), p->state.weights.begin());
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
      for (StateBuffers* b : {&param->state, &param->next}) {
        if (spec.kind == OptimizerKind::kMuon) {
          b->momentum.assign(param->size, 0.0f);
        } else {
          b->exp_avg.assign(param->size, 0.0f);
          b->exp_avg_sq.assign(param->size, 0.0f);
        }
        if (spec.hold_weights) b->weights.assign(param->size, 0.0f);
      }
    } catch (const std::bad_alloc&) {
      budget_.Release(bytes);
      throw;
    }
    return params_.Add(std::move(param));
  }

  mutable absl::Mutex mu_;
  ParamTable<Param> params_ ABSL_GUARDED_BY(mu_);
  internal::MemoryBudget budget_ ABSL_GUARDED_BY(mu_);
  internal::WorkerPool pool_;
  WorkspacePool workspaces_;
};

class CpuTransaction final : public StepTransaction {
 public:
  CpuTransaction(CpuEngine* engine, const StepOptions& options)
      : engine_(engine), options_(options) {}

  ~CpuTransaction() override {
    absl::MutexLock lock(&engine_->mu_);
    for (const std::shared_ptr<Param>& p : computed_) p->owner = nullptr;
  }

  absl::Status Compute(absl::Span<const GradientInput> grads, absl::Span<UpdateOutput> outputs,
                       StepStats* stats, UpdateReadyFn ready) override {
    if (committed_) return absl::FailedPreconditionError("step already committed");
    return internal::ClaimAndCompute(
        engine_->mu_, engine_->params_, this, grads, outputs,
        [&](const std::vector<std::shared_ptr<Param>>& params) {
          return ComputeClaimed(params, grads, outputs, stats, ready);
        });
  }

  absl::Status ComputedWeights(ParamId param, absl::Span<float> values) const override {
    std::shared_ptr<Param> p;
    {
      absl::MutexLock lock(&engine_->mu_);
      MUON_ASSIGN_OR_RETURN(p, engine_->params_.FindComputed(this, param, values.size()));
    }
    // Only this transaction's Compute calls, which are over, write it.
    std::copy(p->next.weights.begin(), p->next.weights.end(), values.begin());
    return absl::OkStatus();
  }

  absl::Status Commit() override {
    absl::MutexLock lock(&engine_->mu_);
    if (committed_) return absl::FailedPreconditionError("step already committed");
    for (const std::shared_ptr<Param>& p : computed_) {
      p->step += 1;
      p->state.Swap(p->next);
      p->owner = nullptr;
    }
    computed_.clear();
    committed_ = true;
    return absl::OkStatus();
  }

 private:
  // The work of Compute on claimed parameters. On error the caller releases
  // them; nothing of this call is kept.
  absl::Status ComputeClaimed(const std::vector<std::shared_ptr<Param>>& params,
                              absl::Span<const GradientInput> grads,
                              absl::Span<UpdateOutput> outputs, StepStats* stats,
                              UpdateReadyFn ready);

  CpuEngine* const engine_;
  const StepOptions options_;
  // Parameters whose next state this transaction wrote.
  std::vector<std::shared_ptr<Param>> computed_;
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

absl::Status GradientNotFinite(const Param& p) {
  return absl::InvalidArgumentError(
      absl::StrCat("parameter '", p.spec.name, "': gradient contains NaN or Inf"));
}

// Seconds one parameter's task spent by phase.
struct TaskTimes {
  double stage = 0, compute = 0, finish = 0;
};

// One Muon parameter's step into p.next and `out`, on the calling thread:
// decode into the workspace, momentum, Newton–Schulz in place, the scaled
// update, held weights, encode.
absl::Status StepMuon(Param& p, const GradientInput& grad, UpdateOutput& out, bool measure,
                      Workspace* ws, TaskTimes* t) {
  auto start = std::chrono::steady_clock::now();
  const int64_t n = p.size;
  if (ws->m.size() < static_cast<size_t>(n)) ws->m.resize(n);
  float* m = ws->m.data();
  DecodeToFloat(grad.dtype, grad.bytes.data(), n, m);
  FiniteTracker gradient;
  for (int64_t k = 0; k < n; ++k) gradient.Add(m[k]);
  if (!gradient.all_finite()) return GradientNotFinite(p);
  t->stage = Seconds(start);
  start = std::chrono::steady_clock::now();

  const HyperParams hp = StepHyperParams(p.spec, grad);
  const internal::MomentumCoefficients c = internal::MakeMomentumCoefficients(
      hp.momentum, hp.momentum_form == MomentumForm::kEma, hp.nesterov);
  const float* b = p.state.momentum.data();
  float* b_new = p.next.momentum.data();
  FiniteTracker momentum;
  for (int64_t k = 0; k < n; ++k) {
    m[k] = internal::MomentumStep(c, b[k], m[k], &b_new[k]);
    momentum.Add(b_new[k]);
    momentum.Add(m[k]);
  }
  if (!momentum.all_finite()) return Overflow(p, "momentum");
  MUON_RETURN_IF_ERROR(OrthogonalizeCpu(p.coeffs, p.view, m, &ws->ns));
  if (measure) {
    const int64_t size = p.view.rows * p.view.cols;
    double err = 0;
    for (int64_t k = 0; k < p.view.batch; ++k) {
      err += OrthogonalityError(p.view.rows, p.view.cols, m + k * size);
    }
    out.orthogonality_error = err / static_cast<double>(p.view.batch);
  }
  const float scale =
      internal::MuonUpdateScale(hp.lr, internal::ShapeScaleFactor(hp.shape_scale, p.view));
  FiniteTracker update;
  for (int64_t k = 0; k < n; ++k) {
    m[k] = internal::MuonUpdate(scale, m[k]);
    update.Add(m[k]);
  }
  if (!update.all_finite()) return Overflow(p, "update");
  if (p.spec.hold_weights) {
    const float decay = static_cast<float>(out.decay);
    const float* w = p.state.weights.data();
    float* w_new = p.next.weights.data();
    FiniteTracker weights;
    for (int64_t k = 0; k < n; ++k) {
      w_new[k] = internal::DecayedWeight(decay, w[k], m[k]);
      weights.Add(w_new[k]);
    }
    if (!weights.all_finite()) return Overflow(p, "weights");
  }
  t->compute = Seconds(start);
  start = std::chrono::steady_clock::now();
  EncodeFromFloat(out.dtype, m, n, out.bytes.data());
  t->finish = Seconds(start);
  return absl::OkStatus();
}

// One AdamW parameter's step into p.next and `out`, kChunk elements at a
// time (decode, moments, update, held weights, encode): no workspace.
absl::Status StepAdamW(Param& p, const GradientInput& grad, UpdateOutput& out, TaskTimes* t) {
  const auto start = std::chrono::steady_clock::now();
  const HyperParams hp = StepHyperParams(p.spec, grad);
  const auto c =
      internal::MakeAdamWCoefficients<double>(hp.beta1, hp.beta2, hp.eps, hp.lr, p.step + 1);
  const float decay = static_cast<float>(out.decay);
  const size_t in_size = DTypeSize(grad.dtype), out_size = DTypeSize(out.dtype);
  FiniteTracker gradient, moments, weights;
  float g[kChunk], u[kChunk];
  for (int64_t off = 0; off < p.size; off += kChunk) {
    const int64_t len = std::min(kChunk, p.size - off);
    DecodeToFloat(grad.dtype, grad.bytes.data() + off * in_size, len, g);
    for (int64_t k = 0; k < len; ++k) gradient.Add(g[k]);
    const float* m = p.state.exp_avg.data() + off;
    const float* v = p.state.exp_avg_sq.data() + off;
    float* m_new = p.next.exp_avg.data() + off;
    float* v_new = p.next.exp_avg_sq.data() + off;
    // AdamWStep in two loops, so that each vectorizes (step_math.h).
    for (int64_t k = 0; k < len; ++k) {
      internal::AdamWMoments(c, m[k], v[k], g[k], &m_new[k], &v_new[k]);
      moments.Add(m_new[k]);
      moments.Add(v_new[k]);
    }
    for (int64_t k = 0; k < len; ++k) {
      u[k] = internal::AdamWUpdate(c, m_new[k], v_new[k]);
      moments.Add(u[k]);
    }
    if (p.spec.hold_weights) {
      const float* w = p.state.weights.data() + off;
      float* w_new = p.next.weights.data() + off;
      for (int64_t k = 0; k < len; ++k) {
        w_new[k] = internal::DecayedWeight(decay, w[k], u[k]);
        weights.Add(w_new[k]);
      }
    }
    EncodeFromFloat(out.dtype, u, len, out.bytes.data() + off * out_size);
  }
  if (!gradient.all_finite()) return GradientNotFinite(p);
  if (!moments.all_finite()) return Overflow(p, "AdamW moments or update");
  if (!weights.all_finite()) return Overflow(p, "weights");
  t->compute = Seconds(start);
  return absl::OkStatus();
}

absl::Status CpuTransaction::ComputeClaimed(const std::vector<std::shared_ptr<Param>>& params,
                                            absl::Span<const GradientInput> grads,
                                            absl::Span<UpdateOutput> outputs, StepStats* stats,
                                            UpdateReadyFn ready) {
  const auto start = std::chrono::steady_clock::now();
  const size_t count = params.size();
  // Largest first, so that the last tasks to start are short ones.
  std::vector<int64_t> cost(count);
  for (size_t i = 0; i < count; ++i) {
    const Param& p = *params[i];
    cost[i] = p.spec.kind == OptimizerKind::kMuon
                  ? NsFlops(p.view, static_cast<int>(p.coeffs.steps.size()))
                  : p.size;
    const HyperParams hp = StepHyperParams(p.spec, grads[i]);
    outputs[i].decay = internal::DecayFactor(hp.lr, hp.weight_decay);
    outputs[i].orthogonality_error = std::numeric_limits<double>::quiet_NaN();
  }
  std::vector<size_t> order(count);
  for (size_t i = 0; i < count; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return cost[a] > cost[b]; });

  std::vector<absl::Status> status(count);
  std::vector<TaskTimes> times(count);
  // Once a task has failed the call fails: later updates are not reported
  // (they would be discarded), though every task still runs, so that the
  // error returned is the same whichever thread finished first.
  std::atomic<bool> failed{false};
  engine_->pool_.ParallelFor(count, [&](size_t task) {
    const size_t i = order[task];
    Param& p = *params[i];
    try {
      if (p.spec.kind == OptimizerKind::kMuon) {
        std::unique_ptr<Workspace> ws = engine_->workspaces_.Take();
        status[i] = StepMuon(p, grads[i], outputs[i], options_.measure_orthogonality, ws.get(),
                             &times[i]);
        engine_->workspaces_.Give(std::move(ws));
      } else {
        status[i] = StepAdamW(p, grads[i], outputs[i], &times[i]);
      }
    } catch (const std::bad_alloc&) {
      status[i] = internal::OutOfHostMemory("for a step's buffers");
    }
    if (!status[i].ok()) {
      failed = true;
    } else if (!failed) {
      ready(i);
    }
  });
  for (const absl::Status& s : status) MUON_RETURN_IF_ERROR(s);

  // Phases overlap across threads: the call's wall time is split by each
  // phase's share of the tasks' time.
  StepStats local;
  TaskTimes sum;
  for (size_t i = 0; i < count; ++i) {
    sum.stage += times[i].stage;
    sum.compute += times[i].compute;
    sum.finish += times[i].finish;
    const Param& p = *params[i];
    if (p.spec.kind == OptimizerKind::kMuon) {
      local.ns_flops += NsFlops(p.view, static_cast<int>(p.coeffs.steps.size()));
    }
  }
  const double busy = sum.stage + sum.compute + sum.finish;
  const double share = busy > 0 ? Seconds(start) / busy : 0;
  local.stage_seconds = sum.stage * share;
  local.compute_seconds = sum.compute * share;
  local.finish_seconds = sum.finish * share;
  local.parameters = static_cast<int64_t>(count);
  if (stats != nullptr) *stats += local;
  computed_.insert(computed_.end(), params.begin(), params.end());
  return absl::OkStatus();
}

// The cores this process may run on (its affinity mask), at least 1.
int UsableCores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> CreateCpuEngine(const EngineOptions& options) {
  MUON_ASSIGN_OR_RETURN(const int64_t budget,
                        internal::ResolveBudget(options, internal::HostMemoryBytes()));
  if (options.blas_threads < 0) {
    return absl::InvalidArgumentError("BLAS threads must be >= 0 (0: OpenBLAS's default)");
  }
  if (options.compute_threads < 0) {
    return absl::InvalidArgumentError("compute threads must be >= 0 (0: one per core)");
  }
  const int threads = options.compute_threads > 0 ? options.compute_threads : UsableCores();
  // Process-wide: OpenBLAS has one thread count. Compute threads call it
  // single-threaded; a multi-threaded OpenBLAS called from several threads
  // at once spins against itself (docs/performance.md).
  if (threads > 1) {
    if (options.blas_threads > 1) {
      return absl::InvalidArgumentError(absl::StrCat(
          options.blas_threads, " BLAS threads per call need a single compute thread (",
          threads, " set or found); with several compute threads BLAS runs on one thread each: "
          "set BLAS threads to 1, or compute threads to 1"));
    }
    openblas_set_num_threads(1);
  } else if (options.blas_threads > 0) {
    openblas_set_num_threads(options.blas_threads);
  }
  return std::make_unique<CpuEngine>(budget, options, threads);
}

}  // namespace muon
