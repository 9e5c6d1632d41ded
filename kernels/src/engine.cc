#include "muon/kernels/engine.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "muon/kernels/sharded_engine.h"
#include "muon/kernels/status_macros.h"

#ifdef MUON_HAVE_CUDA
#include "cuda_engine.h"
#endif

namespace muon {

StepStats& StepStats::operator+=(const StepStats& other) {
  stage_seconds += other.stage_seconds;
  compute_seconds += other.compute_seconds;
  finish_seconds += other.finish_seconds;
  ns_flops += other.ns_flops;
  parameters += other.parameters;
  if (device_compute_seconds.size() < other.device_compute_seconds.size()) {
    device_compute_seconds.resize(other.device_compute_seconds.size());
  }
  for (size_t i = 0; i < other.device_compute_seconds.size(); ++i) {
    device_compute_seconds[i] += other.device_compute_seconds[i];
  }
  return *this;
}

absl::Status Engine::Step(absl::Span<const GradientInput> grads, absl::Span<UpdateOutput> outputs,
                          const StepOptions& options, StepStats* stats) {
  MUON_ASSIGN_OR_RETURN(std::unique_ptr<StepTransaction> txn, BeginStep(options));
  MUON_RETURN_IF_ERROR(txn->Compute(grads, outputs, stats));
  return txn->Commit();
}

bool CudaAvailable() { return CudaDeviceCount() > 0; }

int CudaDeviceCount() {
#ifdef MUON_HAVE_CUDA
  return internal::CudaDeviceCount();
#else
  return 0;
#endif
}

absl::StatusOr<std::unique_ptr<Engine>> CreateCudaEngine(const EngineOptions& options) {
#ifdef MUON_HAVE_CUDA
  const int devices = internal::CudaDeviceCount();
  if (devices <= 0) {
    return absl::FailedPreconditionError("no usable CUDA device; run with --engine=cpu");
  }
  const std::vector<int> ordinals =
      options.devices.empty() ? std::vector<int>{options.device} : options.devices;
  for (size_t i = 0; i < ordinals.size(); ++i) {
    if (ordinals[i] < 0 || ordinals[i] >= devices) {
      return absl::InvalidArgumentError(absl::StrCat(
          "CUDA device ", ordinals[i], " does not exist; this machine has ", devices));
    }
    if (std::find(ordinals.begin(), ordinals.begin() + i, ordinals[i]) != ordinals.begin() + i) {
      return absl::InvalidArgumentError(
          absl::StrCat("CUDA device ", ordinals[i], " is listed twice"));
    }
  }
  if (ordinals.size() == 1) {
    EngineOptions one = options;
    one.device = ordinals.front();
    return internal::CreateCudaEngineImpl(one);
  }
  std::vector<std::unique_ptr<Engine>> engines;
  for (int ordinal : ordinals) {
    EngineOptions one = options;
    one.device = ordinal;
    one.devices.clear();
    MUON_ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine, internal::CreateCudaEngineImpl(one));
    engines.push_back(std::move(engine));
  }
  return CreateShardedEngine(std::move(engines));
#else
  (void)options;
  return absl::FailedPreconditionError(
      "this build has no CUDA engine (built with MUON_CUDA=OFF or without nvcc); "
      "run with --engine=cpu");
#endif
}

absl::StatusOr<std::unique_ptr<Engine>> CreateEngine(absl::string_view kind,
                                                     const EngineOptions& options) {
  if (kind == "cpu") return CreateCpuEngine(options);
  if (kind == "cuda") return CreateCudaEngine(options);
  if (kind == "auto") return CudaAvailable() ? CreateCudaEngine(options) : CreateCpuEngine(options);
  return absl::InvalidArgumentError(
      absl::StrCat("unknown engine '", kind, "'; expected auto, cpu or cuda"));
}

absl::Status CheckStepInput(const ParamSpec& spec, const GradientInput& grad,
                            const UpdateOutput& output) {
  const auto bad = [&](auto&&... what) {
    return absl::InvalidArgumentError(
        absl::StrCat("parameter '", spec.name, "' ", ShapeString(spec.shape), what...));
  };
  const size_t elements = static_cast<size_t>(NumElements(spec.shape));
  if (grad.dtype != spec.dtype && grad.dtype != DType::kFloat32) {
    return bad(": gradient dtype ", DTypeName(grad.dtype), ", registered as ",
               DTypeName(spec.dtype), " (send it in that dtype or in fp32)");
  }
  const size_t want = elements * DTypeSize(grad.dtype);
  if (grad.bytes.size() != want) {
    return bad(": gradient has ", grad.bytes.size(), " bytes, expected ", want);
  }
  if (output.param != grad.param || output.bytes.size() != elements * DTypeSize(output.dtype)) {
    return bad(": update output does not match the gradient's parameter or size");
  }
  if (grad.lr.has_value()) {
    if (!(std::isfinite(*grad.lr) && *grad.lr >= 0)) {
      return bad(": this step's lr is ", *grad.lr, "; it must be finite and >= 0");
    }
    if (!std::isfinite(*grad.lr * spec.hp.weight_decay)) {
      return bad(": this step's lr·weight_decay (", *grad.lr, "·", spec.hp.weight_decay,
                 ") overflows");
    }
  }
  if (grad.hyper_params.has_value()) {
    ParamSpec stepped = spec;
    stepped.hp = StepHyperParams(spec, grad);
    MUON_RETURN_IF_ERROR(ValidateSpec(stepped));
  }
  return absl::OkStatus();
}

HyperParams StepHyperParams(const ParamSpec& spec, const GradientInput& grad) {
  HyperParams hp = spec.hp;
  if (grad.hyper_params.has_value()) {
    const HyperParams& step = *grad.hyper_params;
    hp.weight_decay = step.weight_decay;
    hp.momentum = step.momentum;
    hp.nesterov = step.nesterov;
    hp.beta1 = step.beta1;
    hp.beta2 = step.beta2;
    hp.eps = step.eps;
  }
  hp.lr = grad.lr.value_or(spec.hp.lr);
  return hp;
}

int64_t StateBytes(const ParamSpec& spec) {
  const int64_t n = NumElements(spec.shape);
  const int64_t vectors = (spec.kind == OptimizerKind::kMuon ? 1 : 2) + (spec.hold_weights ? 1 : 0);
  return vectors * n * static_cast<int64_t>(sizeof(float));
}

int64_t NsFlops(const MatrixView& view, int steps) {
  const int64_t r = std::min(view.rows, view.cols);
  const int64_t c = std::max(view.rows, view.cols);
  return steps * view.batch * (4 * r * r * c + 2 * r * r * r);
}

}  // namespace muon
