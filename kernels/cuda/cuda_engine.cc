// The CUDA engine: fp32 optimizer state in device memory, gradients staged
// through pinned host buffers, fused step kernels, and Newton–Schulz batched
// by shape on cuBLASLt, one stream per shape group so copies, one group's
// products and another's updates overlap.
#include "cuda_engine.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <thread>
#include <memory>
#include <new>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "cuda_check.h"
#include "device_kernels.h"
#include "lt_gemm.h"
#include "muon/kernels/internal/param_table.h"
#include "muon/kernels/internal/step_math.h"
#include "muon/kernels/ns_schedule.h"
#include "muon/kernels/status_macros.h"
#include "ns_cuda.h"

namespace muon::internal {

static_assert(static_cast<int>(DType::kFloat32) == kWireF32);
static_assert(static_cast<int>(DType::kBFloat16) == kWireBF16);
static_assert(static_cast<int>(DType::kFloat16) == kWireF16);

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error for later callers
    return 0;
  }
  return count;
}

namespace {

// Shape groups run on this many streams, round-robin: enough for a copy, a
// group's products and another group's element-wise tail to overlap.
constexpr int kStreams = 4;
constexpr size_t kAlign = 256;
size_t AlignUp(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// cudaMemset and pageable cudaMemcpy H2D may return before the device has
// the data, and the step streams are non-blocking (no implicit ordering with
// the legacy stream): wait before the data can be read by a step.
absl::Status SyncLegacyStream(absl::string_view context) {
  RETURN_IF_CUDA_ERROR(cudaStreamSynchronize(cudaStreamLegacy), context);
  return absl::OkStatus();
}

struct HostCopy {
  void* dst;
  const void* src;
  size_t bytes;
};

// Host copies between the caller's pageable buffers and the pinned staging
// buffers, split into 4 MiB pieces over a few threads: one thread's memcpy
// moved about 6 GB/s on the H100 host, a tenth of the 55 GB/s the pinned
// PCIe copies reach, and was most of a step's time.
void ParallelCopy(absl::Span<const HostCopy> copies) {
  constexpr size_t kPiece = size_t{4} << 20;
  struct Piece {
    char* dst;
    const char* src;
    size_t bytes;
  };
  std::vector<Piece> pieces;
  for (const HostCopy& c : copies) {
    for (size_t off = 0; off < c.bytes; off += kPiece) {
      pieces.push_back({static_cast<char*>(c.dst) + off, static_cast<const char*>(c.src) + off,
                        std::min(kPiece, c.bytes - off)});
    }
  }
  const size_t threads = std::min<size_t>(
      {pieces.size(), std::max(1u, std::thread::hardware_concurrency() / 2), 8});
  std::atomic<size_t> next{0};
  const auto work = [&] {
    for (size_t k = next++; k < pieces.size(); k = next++) {
      std::memcpy(pieces[k].dst, pieces[k].src, pieces[k].bytes);
    }
  };
  std::vector<std::thread> helpers;
  for (size_t t = 1; t < threads; ++t) helpers.emplace_back(work);
  work();
  for (std::thread& t : helpers) t.join();
}

// Owning device allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(o.bytes_) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }

  absl::Status Allocate(size_t bytes, absl::string_view what) {
    *this = DeviceBuffer();
    RETURN_IF_CUDA_ERROR(cudaMalloc(&ptr_, std::max<size_t>(bytes, 1)), what);
    bytes_ = bytes;
    return absl::OkStatus();
  }
  void* get() const { return ptr_; }
  char* bytes() const { return static_cast<char*>(ptr_); }
  size_t size() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Owning pinned host allocation; grows, never shrinks.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
  }
  absl::Status Reserve(size_t bytes) {
    if (bytes <= bytes_) return absl::OkStatus();
    if (ptr_ != nullptr) cudaFreeHost(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
    RETURN_IF_CUDA_ERROR(cudaHostAlloc(&ptr_, bytes, cudaHostAllocDefault), "pinned staging");
    bytes_ = bytes;
    return absl::OkStatus();
  }
  char* bytes() const { return static_cast<char*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

class CudaTransaction;

struct Param {
  ParamSpec spec;
  MatrixView view;
  int64_t size = 0;
  int vectors = 0;        // fp32 state vectors per copy (see StateBytes)
  NsCoefficients coeffs;  // Muon only
  double shape_scale = 1;
  int64_t reserved_bytes = 0;  // charged against the budget
  // Two copies of the state: state[current] is committed, the other is what
  // an open transaction writes; Commit flips `current`. Each copy holds the
  // kind's vectors back to back: Muon [momentum], AdamW [exp_avg, exp_avg_sq],
  // then [weights] when held.
  std::array<DeviceBuffer, 2> state;
  int current = 0;
  int64_t step = 0;
  const StepTransaction* owner = nullptr;

  float* Vector(int copy, int index) const {
    return reinterpret_cast<float*>(state[copy].bytes()) + index * size;
  }
  float* Weights(int copy) const { return spec.hold_weights ? Vector(copy, vectors - 1) : nullptr; }
};

// Device bytes a parameter's step can need beyond its state: its gradient /
// update bytes, its Newton–Schulz input and workspace, alignment slack. The
// engine charges it at Register, so a step never allocates past the budget.
int64_t StepWorkspaceBytes(const ParamSpec& spec, const NsCoefficients& coeffs) {
  const int64_t n = NumElements(spec.shape);
  // Gradient in and update out share one region for Muon (the gradient is
  // consumed before Newton–Schulz); AdamW needs two (see Item::out_offset).
  size_t bytes = (spec.kind == OptimizerKind::kMuon ? 1 : 2) * AlignUp(n * sizeof(float)) +
                 8 * kAlign;
  if (spec.kind == OptimizerKind::kMuon) {
    const MatrixView v = MatrixViewOf(spec.shape);
    NsArgs args;
    args.coeffs = &coeffs;
    args.batch = v.batch;
    args.rows = v.rows;
    args.cols = v.cols;
    bytes += AlignUp(n * sizeof(__nv_bfloat16)) + BatchedNewtonSchulz::WorkspaceBytes(args) +
             AlignUp(v.batch * sizeof(double));
  }
  return static_cast<int64_t>(bytes);
}

class CudaEngine final : public Engine {
 public:
  static absl::StatusOr<std::unique_ptr<CudaEngine>> Create(const EngineOptions& options);

  absl::string_view name() const override { return "cuda"; }
  absl::StatusOr<ParamId> Register(const ParamSpec& spec) override;
  absl::Status Unregister(ParamId id) override;
  absl::StatusOr<ParamSpec> Spec(ParamId id) const override {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, params_.Find(id));
    return p->spec;
  }
  absl::StatusOr<std::unique_ptr<StepTransaction>> BeginStep(const StepOptions& options) override;
  absl::Status SetWeights(ParamId id, absl::Span<const float> values) override;
  absl::Status GetWeights(ParamId id, absl::Span<float> values) const override;
  absl::StatusOr<ParamState> ExportState(ParamId id) const override;
  absl::StatusOr<ParamState> ExportLocked(const Param& p) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ImportState(ParamId id, const ParamState& state) override;
  MemoryUsage Memory() const override {
    absl::MutexLock lock(&mu_);
    return budget_.Usage();
  }

  ~CudaEngine() override;

 private:
  friend class CudaTransaction;
  CudaEngine(const EngineOptions& options, int64_t budget_bytes)
      : options_(options), budget_(budget_bytes, options.memory_budget_setting) {}

  absl::StatusOr<ParamId> RegisterValid(const ParamSpec& spec);
  absl::Status UseDevice() const {
    RETURN_IF_CUDA_ERROR(cudaSetDevice(options_.device), "selecting the CUDA device");
    return absl::OkStatus();
  }
  // Grows the step arena to `bytes`; shrinks it when it exceeds what the
  // registered parameters may need (after Unregister).
  absl::Status ArenaFor(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(compute_mu_);

  const EngineOptions options_;
  mutable absl::Mutex mu_;
  ParamTable<Param> params_ ABSL_GUARDED_BY(mu_);
  MemoryBudget budget_ ABSL_GUARDED_BY(mu_);
  int64_t workspace_reserved_ ABSL_GUARDED_BY(mu_) = 0;

  // Device work is serialized: one step at a time owns the streams, the
  // cuBLASLt plans and the step arena (streams already overlap its groups).
  // Lock order: compute_mu_, then mu_.
  absl::Mutex compute_mu_;
  std::unique_ptr<LtGemm> gemm_ ABSL_GUARDED_BY(compute_mu_);
  std::array<cudaStream_t, kStreams> streams_{};
  std::vector<cudaEvent_t> events_ ABSL_GUARDED_BY(compute_mu_);
  DeviceBuffer gemm_workspace_;  // kStreams × LtGemm::kWorkspaceBytes
  DeviceBuffer arena_ ABSL_GUARDED_BY(compute_mu_);
  PinnedBuffer pinned_in_ ABSL_GUARDED_BY(compute_mu_);
  PinnedBuffer pinned_out_ ABSL_GUARDED_BY(compute_mu_);
  PinnedBuffer pinned_results_ ABSL_GUARDED_BY(compute_mu_);
};

absl::StatusOr<std::unique_ptr<CudaEngine>> CudaEngine::Create(const EngineOptions& options) {
  RETURN_IF_CUDA_ERROR(cudaSetDevice(options.device), "selecting the CUDA device");
  size_t free_bytes = 0, total_bytes = 0;
  RETURN_IF_CUDA_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes), "reading the device's memory");
  MUON_ASSIGN_OR_RETURN(const int64_t budget,
                        ResolveBudget(options, static_cast<int64_t>(total_bytes)));
  auto engine = std::unique_ptr<CudaEngine>(new CudaEngine(options, budget));
  const int64_t fixed = kStreams * static_cast<int64_t>(LtGemm::kWorkspaceBytes);
  {
    absl::MutexLock lock(&engine->mu_);
    MUON_RETURN_IF_ERROR(engine->budget_.Reserve(fixed, "the CUDA engine", "cuBLASLt workspace"));
  }
  absl::MutexLock compute(&engine->compute_mu_);
  MUON_ASSIGN_OR_RETURN(engine->gemm_, LtGemm::Create());
  for (cudaStream_t& s : engine->streams_) {
    RETURN_IF_CUDA_ERROR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "creating streams");
  }
  MUON_RETURN_IF_ERROR(engine->gemm_workspace_.Allocate(fixed, "cuBLASLt workspace"));
  return engine;
}

CudaEngine::~CudaEngine() {
  cudaSetDevice(options_.device);
  for (cudaStream_t s : streams_) {
    if (s != nullptr) cudaStreamDestroy(s);
  }
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
}

absl::StatusOr<ParamId> CudaEngine::Register(const ParamSpec& spec) {
  MUON_RETURN_IF_ERROR(ValidateSpec(spec));
  try {
    return RegisterValid(spec);
  } catch (const std::bad_alloc&) {
    return OutOfHostMemory(absl::StrCat("registering ", Who(spec)));
  }
}

absl::StatusOr<ParamId> CudaEngine::RegisterValid(const ParamSpec& spec) {
  auto p = std::make_shared<Param>();
  p->spec = spec;
  p->size = NumElements(spec.shape);
  p->vectors = (spec.kind == OptimizerKind::kMuon ? 1 : 2) + (spec.hold_weights ? 1 : 0);
  if (spec.kind == OptimizerKind::kMuon) {
    p->view = MatrixViewOf(spec.shape);
    MUON_ASSIGN_OR_RETURN(p->coeffs, MakeNsCoefficients(spec.hp, p->view));
    NsArgs probe;
    probe.coeffs = &p->coeffs;
    probe.batch = p->view.batch;
    probe.rows = p->view.rows;
    probe.cols = p->view.cols;
    probe.d_x = reinterpret_cast<__nv_bfloat16*>(kAlign);  // shape check only
    probe.d_gemm_workspace = probe.d_x;
    if (absl::Status s = BatchedNewtonSchulz::CanImplement(probe); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("parameter '", spec.name, "': ", s.message()));
    }
    p->shape_scale = internal::ShapeScaleFactor(spec.hp.shape_scale, p->view);
  }
  const int64_t workspace = StepWorkspaceBytes(spec, p->coeffs);
  p->reserved_bytes = 2 * StateBytes(spec) + workspace;
  {
    absl::MutexLock lock(&mu_);
    MUON_RETURN_IF_ERROR(budget_.Reserve(
        p->reserved_bytes, Who(spec),
        "GPU memory (2 copies of its optimizer state and its step workspace)"));
    workspace_reserved_ += workspace;
  }
  const auto unreserve = [&] {
    absl::MutexLock lock(&mu_);
    budget_.Release(p->reserved_bytes);
    workspace_reserved_ -= workspace;
  };
  const std::string what = absl::StrCat("optimizer state of parameter '", spec.name, "'");
  for (DeviceBuffer& copy : p->state) {
    absl::Status s = UseDevice();
    if (s.ok()) s = copy.Allocate(StateBytes(spec), what);
    if (s.ok()) {
      s = [&]() -> absl::Status {
        RETURN_IF_CUDA_ERROR(cudaMemset(copy.get(), 0, copy.size()), what);
        return SyncLegacyStream(what);
      }();
    }
    if (!s.ok()) {
      unreserve();
      return s;
    }
  }
  absl::MutexLock lock(&mu_);
  return params_.Add(std::move(p));
}

absl::Status CudaEngine::Unregister(ParamId id) {
  std::shared_ptr<Param> p;
  {
    absl::MutexLock lock(&mu_);
    MUON_ASSIGN_OR_RETURN(p, params_.Remove(id));
    budget_.Release(p->reserved_bytes);
    workspace_reserved_ -= p->reserved_bytes - 2 * StateBytes(p->spec);
  }
  MUON_RETURN_IF_ERROR(UseDevice());
  p.reset();  // frees the device state outside the lock
  return absl::OkStatus();
}

absl::Status CudaEngine::SetWeights(ParamId id, absl::Span<const float> values) {
  MUON_RETURN_IF_ERROR(UseDevice());
  absl::MutexLock lock(&mu_);
  MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p,
                        params_.FindHolder(id, values.size(), /*idle=*/true));
  RETURN_IF_CUDA_ERROR(cudaMemcpy(p->Weights(p->current), values.data(), p->size * sizeof(float),
                                  cudaMemcpyHostToDevice),
                       absl::StrCat("setting weights of '", p->spec.name, "'"));
  return SyncLegacyStream("setting weights");
}

absl::Status CudaEngine::GetWeights(ParamId id, absl::Span<float> values) const {
  MUON_RETURN_IF_ERROR(UseDevice());
  absl::MutexLock lock(&mu_);
  MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p,
                        params_.FindHolder(id, values.size(), /*idle=*/false));
  RETURN_IF_CUDA_ERROR(cudaMemcpy(values.data(), p->Weights(p->current), p->size * sizeof(float),
                                  cudaMemcpyDeviceToHost),
                       absl::StrCat("reading weights of '", p->spec.name, "'"));
  return absl::OkStatus();
}

absl::StatusOr<ParamState> CudaEngine::ExportState(ParamId id) const {
  MUON_RETURN_IF_ERROR(UseDevice());
  absl::MutexLock lock(&mu_);
  MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, params_.Find(id));
  try {
    return ExportLocked(*p);
  } catch (const std::bad_alloc&) {
    return OutOfHostMemory(absl::StrCat("exporting the state of ", Who(p->spec)));
  }
}

absl::StatusOr<ParamState> CudaEngine::ExportLocked(const Param& param) const {
  const Param* p = &param;
  ParamState state;
  state.step = p->step;
  const bool muon = p->spec.kind == OptimizerKind::kMuon;
  std::vector<std::vector<float>*> order;
  if (muon) {
    order = {&state.momentum};
  } else {
    order = {&state.exp_avg, &state.exp_avg_sq};
  }
  if (p->spec.hold_weights) order.push_back(&state.weights);
  for (size_t k = 0; k < order.size(); ++k) {
    order[k]->resize(p->size);
    RETURN_IF_CUDA_ERROR(cudaMemcpy(order[k]->data(), p->Vector(p->current, static_cast<int>(k)),
                                    p->size * sizeof(float), cudaMemcpyDeviceToHost),
                         absl::StrCat("exporting state of '", p->spec.name, "'"));
  }
  return state;
}

absl::Status CudaEngine::ImportState(ParamId id, const ParamState& state) {
  MUON_RETURN_IF_ERROR(UseDevice());
  absl::MutexLock lock(&mu_);
  MUON_ASSIGN_OR_RETURN(std::shared_ptr<Param> p, params_.FindIdle(id));
  MUON_RETURN_IF_ERROR(CheckImport(p->spec, state));
  const bool muon = p->spec.kind == OptimizerKind::kMuon;
  const size_t n = static_cast<size_t>(p->size);
  std::vector<const std::vector<float>*> order;
  if (muon) {
    order = {&state.momentum};
  } else {
    order = {&state.exp_avg, &state.exp_avg_sq};
  }
  if (p->spec.hold_weights) order.push_back(&state.weights);
  // Write the spare copy, then flip: a failed copy leaves the state as it was.
  const int spare = 1 - p->current;
  for (size_t k = 0; k < order.size(); ++k) {
    RETURN_IF_CUDA_ERROR(cudaMemcpy(p->Vector(spare, static_cast<int>(k)), order[k]->data(),
                                    n * sizeof(float), cudaMemcpyHostToDevice),
                         absl::StrCat("importing state of '", p->spec.name, "'"));
  }
  MUON_RETURN_IF_ERROR(SyncLegacyStream("importing state"));
  p->current = spare;
  p->step = state.step;
  return absl::OkStatus();
}

absl::Status CudaEngine::ArenaFor(size_t bytes) {
  int64_t bound;
  {
    absl::MutexLock lock(&mu_);
    bound = workspace_reserved_;
  }
  if (arena_.size() >= bytes && arena_.size() <= static_cast<size_t>(bound)) {
    return absl::OkStatus();
  }
  // The old arena may still be read by nothing: every step synchronizes
  // before returning. cudaFree would synchronize anyway.
  return arena_.Allocate(bytes, "step workspace");
}

// One Compute call's plan: which parameters form which Newton–Schulz group,
// and where each one's bytes live in the pinned buffers and the arena.
struct Item {
  std::shared_ptr<Param> param;
  HyperParams hp;  // this step's (StepHyperParams)
  size_t grad_bytes = 0, out_bytes = 0;
  size_t in_offset = 0, out_offset = 0;  // pinned
  size_t grad_offset = 0;                // arena: gradient in
  // Arena: update out. Equal to grad_offset for Muon, whose gradient is read by
  // the momentum kernel long before the update is written; separate for
  // AdamW, whose one kernel reads the gradient and writes the update, of
  // another element size, in the same pass.
  size_t update_offset = 0;
  int64_t matrix_offset = 0;             // first matrix in its group's batch
  size_t flag = 0;                       // its non-finite flag, in group order
  double lr = 0;
  float decay = 1;
};

struct Group {
  std::vector<size_t> items;  // indices into the call's items
  NsArgs ns;                  // d_x etc. filled once the arena is placed
  size_t x_offset = 0, ws_offset = 0, error_offset = 0;
  size_t first_flag = 0;  // its items' flags are consecutive from here
  bool muon = true;
};

// A finite gradient can still overflow fp32 state (values near the fp32
// maximum, or a sum-form momentum that keeps growing); committing it would
// leave Inf/NaN in the state and zero updates from then on.
absl::Status NonFiniteResultError(const ParamSpec& spec) {
  return absl::InvalidArgumentError(absl::StrCat(
      Who(spec), ": this step's gradient would make the optimizer state or the update "
      "non-finite in fp32; the step is refused and the state is unchanged (scale the gradient "
      "down, e.g. clip it)"));
}

class CudaTransaction final : public StepTransaction {
 public:
  CudaTransaction(CudaEngine* engine, const StepOptions& options)
      : engine_(engine), options_(options) {}

  ~CudaTransaction() override {
    absl::MutexLock lock(&engine_->mu_);
    for (const auto& p : computed_) p->owner = nullptr;
  }

  absl::Status Compute(absl::Span<const GradientInput> grads, absl::Span<UpdateOutput> outputs,
                       StepStats* stats, UpdateReadyFn ready) override;

  absl::Status ComputedWeights(ParamId id, absl::Span<float> values) const override;

  absl::Status Commit() override {
    absl::MutexLock lock(&engine_->mu_);
    if (committed_) return absl::FailedPreconditionError("step already committed");
    for (const auto& p : computed_) {
      p->current = 1 - p->current;
      p->step += 1;
      p->owner = nullptr;
    }
    computed_.clear();
    committed_ = true;
    return absl::OkStatus();
  }

 private:
  // Compute on claimed parameters; on error the caller releases them.
  absl::Status ComputeClaimed(const std::vector<std::shared_ptr<Param>>& params,
                              absl::Span<const GradientInput> grads,
                              absl::Span<UpdateOutput> outputs, StepStats* stats,
                              UpdateReadyFn ready);
  absl::Status Run(absl::Span<const GradientInput> grads, absl::Span<UpdateOutput> outputs,
                   std::vector<Item>& items, StepStats& local, UpdateReadyFn ready)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(engine_->compute_mu_);

  CudaEngine* const engine_;
  const StepOptions options_;
  std::vector<std::shared_ptr<Param>> computed_;
  bool committed_ = false;
};

absl::StatusOr<std::unique_ptr<StepTransaction>> CudaEngine::BeginStep(const StepOptions& options) {
  return std::make_unique<CudaTransaction>(this, options);
}

absl::Status CudaTransaction::Compute(absl::Span<const GradientInput> grads,
                                      absl::Span<UpdateOutput> outputs, StepStats* stats,
                                      UpdateReadyFn ready) {
  if (committed_) return absl::FailedPreconditionError("step already committed");
  MUON_RETURN_IF_ERROR(engine_->UseDevice());
  return ClaimAndCompute(engine_->mu_, engine_->params_, this, grads, outputs,
                         [&](const std::vector<std::shared_ptr<Param>>& params) {
                           return ComputeClaimed(params, grads, outputs, stats, ready);
                         });
}

absl::Status CudaTransaction::ComputedWeights(ParamId id, absl::Span<float> values) const {
  MUON_RETURN_IF_ERROR(engine_->UseDevice());
  std::shared_ptr<Param> p;
  int written = 0;
  {
    absl::MutexLock lock(&engine_->mu_);
    MUON_ASSIGN_OR_RETURN(p, engine_->params_.FindComputed(this, id, values.size()));
    written = 1 - p->current;  // the copy Commit makes current
  }
  // Compute waited for its device work before returning.
  RETURN_IF_CUDA_ERROR(cudaMemcpy(values.data(), p->Weights(written), p->size * sizeof(float),
                                  cudaMemcpyDeviceToHost),
                       absl::StrCat("reading the computed weights of '", p->spec.name, "'"));
  return absl::OkStatus();
}

absl::Status CudaTransaction::ComputeClaimed(const std::vector<std::shared_ptr<Param>>& params,
                                             absl::Span<const GradientInput> grads,
                                             absl::Span<UpdateOutput> outputs, StepStats* stats,
                                             UpdateReadyFn ready) {
  std::vector<Item> items(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    items[i].hp = StepHyperParams(params[i]->spec, grads[i]);
    const HyperParams& hp = items[i].hp;
    items[i].param = params[i];
    items[i].grad_bytes = grads[i].bytes.size();
    items[i].out_bytes = outputs[i].bytes.size();
    items[i].lr = hp.lr;
    outputs[i].decay = DecayFactor(items[i].lr, hp.weight_decay);
    items[i].decay = static_cast<float>(outputs[i].decay);
  }
  StepStats local;
  absl::Status status;
  {
    absl::MutexLock compute(&engine_->compute_mu_);
    try {
      status = Run(grads, outputs, items, local, ready);
    } catch (const std::bad_alloc&) {
      status = OutOfHostMemory("for the step's plan");
    }
  }
  if (!status.ok()) {
    // Work already enqueued may still touch the arena and pinned buffers the
    // next step reuses; drain it (its own errors add nothing to `status`).
    for (cudaStream_t s : engine_->streams_) cudaStreamSynchronize(s);
    return status;
  }
  local.parameters = static_cast<int64_t>(params.size());
  if (stats != nullptr) *stats += local;
  computed_.insert(computed_.end(), params.begin(), params.end());
  return absl::OkStatus();
}

absl::Status CudaTransaction::Run(absl::Span<const GradientInput> grads,
                                  absl::Span<UpdateOutput> outputs, std::vector<Item>& items,
                                  StepStats& local, UpdateReadyFn ready) {
  const auto start = std::chrono::steady_clock::now();
  CudaEngine& e = *engine_;
  // Group Muon parameters by (rows, cols, schedule, steps, Gram, custom
  // coefficients, eps): each group is one strided batch with one NsCoefficients. AdamW parameters form one group of element-wise work.
  std::map<std::tuple<int64_t, int64_t, ScheduleKind, int, bool,
                      std::vector<std::array<double, 3>>, double>, Group> by_shape;
  Group adamw;
  adamw.muon = false;
  for (size_t i = 0; i < items.size(); ++i) {
    const Param& p = *items[i].param;
    if (p.spec.kind == OptimizerKind::kMuon) {
      by_shape[{p.view.rows, p.view.cols, p.spec.hp.ns_schedule, p.spec.hp.ns_steps,
                p.coeffs.gram, p.spec.hp.ns_coefficients, p.spec.hp.ns_eps}]
          .items.push_back(i);
    } else {
      adamw.items.push_back(i);
    }
  }
  std::vector<Group> groups;
  for (auto& [key, g] : by_shape) groups.push_back(std::move(g));
  if (!adamw.items.empty()) groups.push_back(std::move(adamw));

  // Place everything: pinned in/out, and the arena (io per item; X, NS
  // workspace and error sums per group; one flag per item).
  size_t in_total = 0, out_total = 0, arena = 0;
  for (Item& it : items) {
    it.in_offset = in_total;
    in_total += AlignUp(it.grad_bytes);
    it.out_offset = out_total;
    out_total += AlignUp(it.out_bytes);
    it.grad_offset = arena;
    if (it.param->spec.kind == OptimizerKind::kMuon) {
      it.update_offset = arena;
      arena += AlignUp(std::max(it.grad_bytes, it.out_bytes));
    } else {
      it.update_offset = arena + AlignUp(it.grad_bytes);
      arena += AlignUp(it.grad_bytes) + AlignUp(it.out_bytes);
    }
  }
  for (Group& g : groups) {
    if (!g.muon) continue;
    const Param& first = *items[g.items.front()].param;
    int64_t batch = 0;
    for (size_t i : g.items) {
      items[i].matrix_offset = batch;
      batch += items[i].param->view.batch;
    }
    g.ns.coeffs = &first.coeffs;
    g.ns.batch = batch;
    g.ns.rows = first.view.rows;
    g.ns.cols = first.view.cols;
    g.x_offset = arena;
    arena += AlignUp(batch * first.view.rows * first.view.cols * sizeof(__nv_bfloat16));
    g.ws_offset = arena;
    arena += BatchedNewtonSchulz::WorkspaceBytes(g.ns);
    g.error_offset = arena;
    arena += AlignUp(batch * sizeof(double));
  }
  // One flag per item, a group's side by side, so that each group's come
  // back to the host in one copy when the group is done.
  size_t flag = 0;
  for (Group& g : groups) {
    g.first_flag = flag;
    for (size_t i : g.items) items[i].flag = flag++;
  }
  const size_t flags_offset = arena;
  const size_t flags_bytes = items.size() * sizeof(int);
  arena += AlignUp(flags_bytes);

  MUON_RETURN_IF_ERROR(e.ArenaFor(arena));
  MUON_RETURN_IF_ERROR(e.pinned_in_.Reserve(std::max<size_t>(in_total, 1)));
  MUON_RETURN_IF_ERROR(e.pinned_out_.Reserve(std::max<size_t>(out_total, 1)));
  MUON_RETURN_IF_ERROR(e.pinned_results_.Reserve(AlignUp(flags_bytes)));
  while (e.events_.size() < groups.size() + 1) {
    cudaEvent_t ev;
    RETURN_IF_CUDA_ERROR(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "step events");
    e.events_.push_back(ev);
  }
  char* d_arena = e.arena_.bytes();
  int* d_flags = reinterpret_cast<int*>(d_arena + flags_offset);
  const std::string context = "step";

  // Fork: stream 0 zeroes the flags; the others wait for that.
  RETURN_IF_CUDA_ERROR(cudaMemsetAsync(d_flags, 0, flags_bytes, e.streams_[0]), context);
  cudaEvent_t forked = e.events_.back();
  RETURN_IF_CUDA_ERROR(cudaEventRecord(forked, e.streams_[0]), context);
  for (int s = 1; s < kStreams; ++s) {
    RETURN_IF_CUDA_ERROR(cudaStreamWaitEvent(e.streams_[s], forked), context);
  }

  double stage_seconds = 0;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    Group& g = groups[gi];
    cudaStream_t stream = e.streams_[gi % kStreams];
    // Stage this group's gradients: pageable → pinned on the host while the
    // previous group's copies and products run, then one async copy each.
    std::vector<HostCopy> copies;
    for (size_t i : g.items) {
      copies.push_back({e.pinned_in_.bytes() + items[i].in_offset, grads[i].bytes.data(),
                        items[i].grad_bytes});
    }
    const auto copy_start = std::chrono::steady_clock::now();
    ParallelCopy(copies);
    stage_seconds += Seconds(copy_start);
    for (size_t i : g.items) {
      Item& it = items[i];
      RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(d_arena + it.grad_offset,
                                           e.pinned_in_.bytes() + it.in_offset, it.grad_bytes,
                                           cudaMemcpyHostToDevice, stream),
                           context);
    }
    if (g.muon) {
      auto* d_x = reinterpret_cast<__nv_bfloat16*>(d_arena + g.x_offset);
      const int64_t matrix = g.ns.rows * g.ns.cols;
      for (size_t i : g.items) {
        const Item& it = items[i];
        const Param& p = *it.param;
        const HyperParams& hp = it.hp;
        MomentumParams mp;
        mp.d_grad = d_arena + it.grad_offset;
        mp.grad_type = static_cast<int>(grads[i].dtype);
        mp.d_momentum = p.Vector(p.current, 0);
        mp.d_momentum_out = p.Vector(1 - p.current, 0);
        mp.d_m = d_x + it.matrix_offset * matrix;
        mp.n = p.size;
        mp.coeffs = MakeMomentumCoefficients(hp.momentum, hp.momentum_form == MomentumForm::kEma,
                                             hp.nesterov);
        mp.d_nonfinite = d_flags + it.flag;
        RETURN_IF_CUDA_ERROR(LaunchMomentum(mp, stream), context);
      }
      g.ns.d_x = d_x;
      g.ns.d_gemm_workspace =
          e.gemm_workspace_.bytes() + (gi % kStreams) * LtGemm::kWorkspaceBytes;
      g.ns.d_error = nullptr;
      if (options_.measure_orthogonality) {
        g.ns.d_error = reinterpret_cast<double*>(d_arena + g.error_offset);
        RETURN_IF_CUDA_ERROR(
            cudaMemsetAsync(g.ns.d_error, 0, g.ns.batch * sizeof(double), stream), context);
      }
      BatchedNewtonSchulz ns(e.gemm_.get());
      MUON_RETURN_IF_ERROR(ns.Run(g.ns, d_arena + g.ws_offset, stream));
      local.ns_flops += NsFlops({g.ns.batch, g.ns.rows, g.ns.cols},
                                static_cast<int>(g.ns.coeffs->steps.size()));
      for (size_t i : g.items) {
        const Item& it = items[i];
        const Param& p = *it.param;
        MuonFinishParams fp;
        fp.d_o = d_x + it.matrix_offset * matrix;
        fp.o_type = g.ns.type;
        fp.n = p.size;
        fp.scale = MuonUpdateScale(it.lr, p.shape_scale);
        fp.d_weights = p.Weights(p.current);
        fp.d_weights_out = p.Weights(1 - p.current);
        fp.decay = it.decay;
        fp.d_out = d_arena + it.update_offset;
        fp.out_type = static_cast<int>(outputs[i].dtype);
        fp.d_nonfinite = d_flags + it.flag;
        RETURN_IF_CUDA_ERROR(LaunchMuonFinish(fp, stream), context);
      }
    } else {
      for (size_t i : g.items) {
        const Item& it = items[i];
        const Param& p = *it.param;
        const HyperParams& hp = it.hp;
        AdamWParams ap;
        ap.d_grad = d_arena + it.grad_offset;
        ap.grad_type = static_cast<int>(grads[i].dtype);
        ap.d_m = p.Vector(p.current, 0);
        ap.d_v = p.Vector(p.current, 1);
        ap.d_m_out = p.Vector(1 - p.current, 0);
        ap.d_v_out = p.Vector(1 - p.current, 1);
        ap.n = p.size;
        ap.coeffs =
            MakeAdamWCoefficients<float>(hp.beta1, hp.beta2, hp.eps, it.lr, p.step + 1);
        ap.d_weights = p.Weights(p.current);
        ap.d_weights_out = p.Weights(1 - p.current);
        ap.decay = it.decay;
        ap.d_out = d_arena + it.update_offset;
        ap.out_type = static_cast<int>(outputs[i].dtype);
        ap.d_nonfinite = d_flags + it.flag;
        RETURN_IF_CUDA_ERROR(LaunchAdamW(ap, stream), context);
      }
    }
    for (size_t i : g.items) {
      const Item& it = items[i];
      RETURN_IF_CUDA_ERROR(cudaMemcpyAsync(e.pinned_out_.bytes() + it.out_offset,
                                           d_arena + it.update_offset, it.out_bytes,
                                           cudaMemcpyDeviceToHost, stream),
                           context);
    }
    RETURN_IF_CUDA_ERROR(
        cudaMemcpyAsync(e.pinned_results_.bytes() + g.first_flag * sizeof(int),
                        d_flags + g.first_flag, g.items.size() * sizeof(int),
                        cudaMemcpyDeviceToHost, stream),
        context);
    RETURN_IF_CUDA_ERROR(cudaEventRecord(e.events_[gi], stream), context);
  }

  // Join, in group order: as soon as a group is done and none of its flags
  // is raised, copy its updates out, read its orthogonality errors and
  // report them. After a raised flag the call fails: nothing more is
  // reported, and the flags of every group say which error it is.
  const int* flags = reinterpret_cast<const int*>(e.pinned_results_.bytes());
  bool raised = false;
  double finish_seconds = 0;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const Group& g = groups[gi];
    RETURN_IF_CUDA_ERROR(cudaEventSynchronize(e.events_[gi]), context);
    for (size_t i : g.items) raised = raised || flags[items[i].flag] != 0;
    if (raised) continue;
    std::vector<HostCopy> copies;
    for (size_t i : g.items) {
      copies.push_back({outputs[i].bytes.data(), e.pinned_out_.bytes() + items[i].out_offset,
                        items[i].out_bytes});
    }
    const auto copy_start = std::chrono::steady_clock::now();
    ParallelCopy(copies);
    finish_seconds += Seconds(copy_start);
    for (size_t i : g.items) {
      outputs[i].orthogonality_error = std::numeric_limits<double>::quiet_NaN();
    }
    if (options_.measure_orthogonality && g.muon) {
      std::vector<double> sums(g.ns.batch);
      RETURN_IF_CUDA_ERROR(cudaMemcpy(sums.data(), g.ns.d_error, sums.size() * sizeof(double),
                                      cudaMemcpyDeviceToHost),
                           context);
      const double r = static_cast<double>(std::min(g.ns.rows, g.ns.cols));
      for (size_t i : g.items) {
        const Item& it = items[i];
        double err = 0;
        for (int64_t k = 0; k < it.param->view.batch; ++k) {
          err += std::sqrt(sums[it.matrix_offset + k] / r);
        }
        outputs[i].orthogonality_error = err / static_cast<double>(it.param->view.batch);
      }
    }
    for (size_t i : g.items) ready(i);
  }
  for (size_t i = 0; i < items.size(); ++i) {
    if ((flags[items[i].flag] & kNonFiniteGradient) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "parameter '", items[i].param->spec.name, "': gradient contains NaN or Inf"));
    }
  }
  for (size_t i = 0; i < items.size(); ++i) {
    if (flags[items[i].flag] != 0) return NonFiniteResultError(items[i].param->spec);
  }
  local.stage_seconds = stage_seconds;
  local.finish_seconds = finish_seconds;
  local.compute_seconds = std::max(0.0, Seconds(start) - stage_seconds - finish_seconds);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Engine>> CreateCudaEngineImpl(const EngineOptions& options) {
  MUON_ASSIGN_OR_RETURN(std::unique_ptr<CudaEngine> engine, CudaEngine::Create(options));
  return std::unique_ptr<Engine>(std::move(engine));
}

}  // namespace muon::internal
