#ifndef MUON_KERNELS_ENGINE_H_
#define MUON_KERNELS_ENGINE_H_

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "muon/kernels/types.h"

namespace muon {

// Handle of a parameter registered with an engine. Never reused by an engine.
using ParamId = uint64_t;

// One parameter's gradient for a step. The bytes are little-endian elements of
// `dtype`, exactly NumElements(shape) of them; the caller keeps them alive
// for the duration of the call.
struct GradientInput {
  ParamId param = 0;
  // The parameter's registered dtype, or fp32 for any parameter (a
  // parameter server's averaged gradient, kept at full precision).
  DType dtype = DType::kFloat32;
  absl::Span<const std::byte> bytes;
  // This step's learning rate (a client's LR schedule); the registered lr
  // when unset.
  std::optional<double> lr;
  // This step's values of the other hyper-parameters a schedule may move
  // (weight_decay; Muon momentum and nesterov; AdamW beta1, beta2, eps),
  // replacing the registered ones; the registered ones when unset. Its lr,
  // Newton–Schulz schedule and steps, momentum form and shape scale are not
  // read: those are `lr` and the registration's.
  std::optional<HyperParams> hyper_params = std::nullopt;
};

// The hyper-parameters a step uses for `grad`: the registered ones with
// grad.lr and grad.hyper_params applied.
HyperParams StepHyperParams(const ParamSpec& spec, const GradientInput& grad);

// Where one parameter's update goes. The engine writes `bytes` (NumElements
// elements of `dtype`) and the two result fields.
//
// The update is the change to apply after decay: the client (or the engine,
// for held weights) sets W ← decay·W + update, where decay = 1 − lr·wd and
// update = −lr·s·O (Muon) or −lr·m̂/(√v̂+ε) (AdamW).
struct UpdateOutput {
  ParamId param = 0;
  DType dtype = DType::kFloat32;
  absl::Span<std::byte> bytes;
  double decay = 1.0;
  // ‖O·Oᵀ − I‖_F/√r averaged over the matrices of the tensor, when the step
  // asked for it and the parameter is a Muon parameter; NaN otherwise.
  double orthogonality_error = std::numeric_limits<double>::quiet_NaN();
};

struct StepOptions {
  bool measure_orthogonality = false;
};

// Wall time of the work one Compute call did, by phase, in seconds.
struct StepStats {
  double stage_seconds = 0;    // decode/copy gradients into engine memory
  double compute_seconds = 0;  // momentum, Newton–Schulz, AdamW, update
  double finish_seconds = 0;   // encode/copy updates out
  int64_t ns_flops = 0;        // by the formula of docs/math.md, "Flops"
  int64_t parameters = 0;
  // From a sharded engine: each engine's compute_seconds, indexed as its
  // list (0 for one given no work); empty from any other engine. Adds up
  // entry by entry.
  std::vector<double> device_compute_seconds = {};

  StepStats& operator+=(const StepStats& other);
};

// Optimizer state of one parameter, for checkpoints. Vectors are fp32 in the
// parameter's row-major layout; those the parameter's kind does not use are
// empty.
struct ParamState {
  int64_t step = 0;                  // steps applied to this parameter
  std::vector<float> momentum;       // Muon
  std::vector<float> exp_avg;        // AdamW first moment
  std::vector<float> exp_avg_sq;     // AdamW second moment
  std::vector<float> weights;        // when the engine holds the weights
};

struct MemoryUsage {
  int64_t used_bytes = 0;
  int64_t budget_bytes = 0;
};

// Called by Compute once per output as soon as outputs[index] is final: its
// bytes, decay and orthogonality_error hold what the call computed, and the
// engine neither reads grads[index] nor writes outputs[index] again in this
// call, so the caller may send the update and reuse both buffers at once.
//
// It runs on whichever thread finished that output (the CPU engine's compute
// threads, the CUDA engine's driving thread, a sharded engine's per-engine
// threads), possibly on several threads at once, and every call returns
// before Compute does. It must be thread-safe, must not throw, must not call
// into the transaction, and should be short: the thread that calls it
// computes nothing meanwhile.
//
// A reported update is final but not yet part of the step: when the Compute
// call fails later (another parameter's NaN, an overflow, a device error),
// nothing of that call is kept, including the updates it already reported,
// whose state is never committed. A caller that has already sent one must
// let its receiver discard it (the server fails the stream, and a client
// applies a step's updates only at its summary: docs/api.md).
using UpdateReadyFn = absl::FunctionRef<void(size_t index)>;

// One step in progress: computes updates into shadow state and makes it
// current only on Commit, so a step that fails part-way changes nothing.
//
// Not thread-safe: one thread drives a transaction. Destroying it without
// Commit discards every update it computed. Extra memory while open: one copy
// of the optimizer state of each parameter computed in it.
class StepTransaction {
 public:
  virtual ~StepTransaction() = default;

  // Computes the updates of `grads` and writes them into `outputs`
  // (outputs[i] belongs to grads[i]). May be called several times with
  // disjoint sets of parameters (the server calls it as gradients complete).
  // Everything is validated before any work: unknown parameter
  // (NotFound), dtype or byte count mismatch, NaN/Inf, a parameter given
  // twice in one step or held by another open transaction (InvalidArgument /
  // FailedPrecondition). On error nothing of this call is kept (its outputs'
  // bytes are unspecified); what earlier calls computed stays in the
  // transaction.
  // `stats`, when not null, is incremented by this call's work.
  // `ready(i)` is called at most once per output, as it becomes final
  // (UpdateReadyFn), before Compute returns: on success for every output, on
  // error for some or none.
  virtual absl::Status Compute(absl::Span<const GradientInput> grads,
                               absl::Span<UpdateOutput> outputs, StepStats* stats,
                               UpdateReadyFn ready) = 0;
  // Compute without being told of each output: all are final at its return.
  absl::Status Compute(absl::Span<const GradientInput> grads, absl::Span<UpdateOutput> outputs,
                       StepStats* stats) {
    return Compute(grads, outputs, stats, [](size_t) {});
  }

  // The new held weights (ParamSpec::hold_weights) of a parameter an earlier
  // Compute call of this transaction computed, before Commit: fp32,
  // NumElements(shape) values, the ones Commit makes current (GetWeights
  // after it returns the same bits). So a parameter server can send a
  // parameter's new weights while the rest of the step computes. Same
  // thread rules as Compute. NotFound for an unknown parameter;
  // FailedPrecondition when it does not hold weights, or is not computed in
  // this open transaction; InvalidArgument for a wrong size.
  virtual absl::Status ComputedWeights(ParamId param, absl::Span<float> values) const = 0;

  // Makes the new state of every parameter computed in this transaction
  // current (and applies updates to held weights). The transaction is spent
  // afterwards.
  virtual absl::Status Commit() = 0;
};

struct EngineOptions {
  // Budget for optimizer state (and, on the GPU, workspaces). Registering
  // past it is ResourceExhausted. 0: the machine's memory, which is the CPU
  // engine's host memory (physical memory, or the cgroup's limit when lower)
  // and the CUDA engine's device memory. Must be >= 0.
  int64_t memory_budget_bytes = 0;
  // What a budget error tells the caller to raise (the server: its flag).
  std::string memory_budget_setting = "EngineOptions::memory_budget_bytes";
  // CUDA device ordinal (CUDA engine only).
  int device = 0;
  // CUDA engine on several devices: one engine per listed ordinal, the
  // parameters placed across them (sharded_engine.h); `device` is then
  // unused. Empty or one entry: one device. Each device gets the whole
  // memory budget.
  std::vector<int> devices = {};
  // CPU engine: OpenBLAS threads per BLAS call (process-wide) when
  // compute_threads is 1; 0 leaves OpenBLAS's default (OPENBLAS_NUM_THREADS,
  // else one per core). With more compute threads BLAS runs on one thread
  // per call, and a value above 1 here is InvalidArgument.
  int blas_threads = 0;
  // CPU engine: threads that compute a step's parameters in parallel
  // (different parameters on different threads, shared by all callers);
  // 0: one per core this process may use. Updates are bit-identical for
  // every value (each parameter is computed on one thread, BLAS on one
  // thread); compute_threads = 1 with blas_threads != 1 is not.
  int compute_threads = 0;
};

// The optimizer's compute: parameters' state and the step over batches of
// them. Implementations: CPU (OpenBLAS) and CUDA (cuBLAS).
//
// Thread-safe. A parameter is in at most one open transaction at a time.
class Engine {
 public:
  virtual ~Engine() = default;

  // "cpu" or "cuda".
  virtual absl::string_view name() const = 0;

  // Registers a parameter with zeroed state. InvalidArgument for a bad spec,
  // ResourceExhausted when its state would exceed the memory budget.
  virtual absl::StatusOr<ParamId> Register(const ParamSpec& spec) = 0;

  // Frees a parameter's state. NotFound if unknown; FailedPrecondition if it
  // is in an open transaction.
  virtual absl::Status Unregister(ParamId param) = 0;

  virtual absl::StatusOr<ParamSpec> Spec(ParamId param) const = 0;

  virtual absl::StatusOr<std::unique_ptr<StepTransaction>> BeginStep(
      const StepOptions& options) = 0;

  // Begin, Compute and Commit in one call.
  absl::Status Step(absl::Span<const GradientInput> grads,
                    absl::Span<UpdateOutput> outputs,
                    const StepOptions& options = {}, StepStats* stats = nullptr);

  // Held weights (ParamSpec::hold_weights), fp32, NumElements(shape) values.
  // FailedPrecondition if the parameter does not hold weights.
  virtual absl::Status SetWeights(ParamId param, absl::Span<const float> values) = 0;
  virtual absl::Status GetWeights(ParamId param, absl::Span<float> values) const = 0;

  // Checkpoint support. ImportState checks every vector's size against the
  // spec (InvalidArgument) before changing anything.
  virtual absl::StatusOr<ParamState> ExportState(ParamId param) const = 0;
  virtual absl::Status ImportState(ParamId param, const ParamState& state) = 0;

  virtual MemoryUsage Memory() const = 0;
};

absl::StatusOr<std::unique_ptr<Engine>> CreateCpuEngine(const EngineOptions& options);

// FailedPrecondition when the build has no CUDA or no device is usable.
absl::StatusOr<std::unique_ptr<Engine>> CreateCudaEngine(const EngineOptions& options);

// kind: "cpu", "cuda", or "auto" (CUDA when a device is usable, else CPU).
absl::StatusOr<std::unique_ptr<Engine>> CreateEngine(absl::string_view kind,
                                                     const EngineOptions& options);

// True when this build has the CUDA engine and a device is usable.
bool CudaAvailable();

// CUDA devices this process can use (after CUDA_VISIBLE_DEVICES); 0 when the
// build has no CUDA, or there is no driver or device.
int CudaDeviceCount();

// For engine implementations: checks one Compute input against its
// parameter's spec (gradient dtype and byte count, the output's parameter and
// size, a finite lr >= 0 whose lr·weight_decay is finite, per-step
// hyper-parameters in the ranges registration allows). InvalidArgument
// naming the parameter.
absl::Status CheckStepInput(const ParamSpec& spec, const GradientInput& grad,
                            const UpdateOutput& output);

// Bytes of optimizer state an engine keeps for a spec (fp32 state vectors).
int64_t StateBytes(const ParamSpec& spec);

// Newton–Schulz flops of one orthogonalization of `view`, docs/math.md:
// steps·batch·(4·r²·c + 2·r³).
int64_t NsFlops(const MatrixView& view, int steps);

}  // namespace muon

#endif  // MUON_KERNELS_ENGINE_H_
