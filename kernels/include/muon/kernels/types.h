#ifndef MUON_KERNELS_TYPES_H_
#define MUON_KERNELS_TYPES_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace muon {

// Element type of a tensor on the wire. Optimizer state is always fp32.
enum class DType { kFloat32, kBFloat16, kFloat16 };

enum class OptimizerKind { kMuon, kAdamW };

// kEma: B ← β·B + (1−β)·G (reference muon.py). kSum: B ← β·B + G (Moonlight, Dion).
enum class MomentumForm { kEma, kSum };

// s in W ← W·(1 − lr·wd) − lr·s·O, for an m×n matrix:
// kSpectral = sqrt(max(1, m/n)), kRmsMatch = 0.2·sqrt(max(m, n)), kNone = 1.
enum class ShapeScale { kSpectral, kRmsMatch, kNone };

// Newton–Schulz coefficient schedules (docs/math.md). kAol uses the Turbo-Muon
// published tuples; kAolDion uses AOL preconditioning with the last four Dion
// tuples (the later Turbo-Muon version). kSvd is the exact polar factor.
enum class ScheduleKind { kJordan, kDion, kPolarExpress, kAol, kAolDion, kSvd };

// Gram Newton–Schulz (docs/numerics.md): iterate on the r×r Gram matrix of a
// wide r×c matrix instead of on the matrix. kAuto uses it on the shapes where
// it needs fewer flops (GramNsPays in ns_schedule.h). Off by default: on an
// H200 it saved 15–20% of Newton–Schulz's time on GPT-2 and Llama shapes but
// moved updates 3–4× further from the fp32 reference (docs/performance.md).
enum class NsGram { kAuto, kOff, kOn };

absl::string_view DTypeName(DType dtype);
absl::StatusOr<DType> ParseDType(absl::string_view name);
size_t DTypeSize(DType dtype);

absl::string_view ScheduleName(ScheduleKind kind);
absl::StatusOr<ScheduleKind> ParseSchedule(absl::string_view name);
absl::string_view ShapeScaleName(ShapeScale scale);
absl::StatusOr<ShapeScale> ParseShapeScale(absl::string_view name);
absl::string_view NsGramName(NsGram mode);
absl::StatusOr<NsGram> ParseNsGram(absl::string_view name);
absl::string_view MomentumFormName(MomentumForm form);
absl::StatusOr<MomentumForm> ParseMomentumForm(absl::string_view name);

// Hyper-parameters of one parameter. Defaults follow the reference muon.py
// for Muon and torch.optim.AdamW for AdamW.
struct HyperParams {
  double lr = 0.02;
  double weight_decay = 0.0;
  // Muon.
  double momentum = 0.95;
  bool nesterov = true;
  MomentumForm momentum_form = MomentumForm::kEma;
  ScheduleKind ns_schedule = ScheduleKind::kJordan;
  int ns_steps = 5;
  NsGram ns_gram = NsGram::kOff;
  ShapeScale shape_scale = ShapeScale::kSpectral;
  // A custom schedule: per-step (a, b, c), replacing ns_schedule's tuples
  // (which must then be kJordan, the default). One triple repeats for
  // ns_steps steps; more than one gives one per step and ns_steps must equal
  // their count. Empty: ns_schedule's tuples.
  std::vector<std::array<double, 3>> ns_coefficients;
  // Newton–Schulz normalisation: X / (safety·‖X‖_F + ns_eps), as
  // torch.optim.Muon's eps.
  double ns_eps = 1e-7;
  // AdamW.
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
};

// Newton–Schulz steps a schedule may be asked for (kSvd ignores the count but
// it must still be in range).
inline constexpr int kMinNsSteps = 1;
inline constexpr int kMaxNsSteps = 100;

// Checks every field against its range (docs/api.md, "Hyper-parameters"),
// whichever optimizer would use it. InvalidArgument naming the field.
absl::Status ValidateHyperParams(const HyperParams& hp);

// A parameter as registered with an engine.
struct ParamSpec {
  std::string name;             // for error messages only
  std::vector<int64_t> shape;   // ≥ 1 dim for AdamW, ≥ 2 dims for Muon
  DType dtype = DType::kFloat32;  // dtype of gradients in and updates out
  OptimizerKind kind = OptimizerKind::kMuon;
  HyperParams hp;
  // Parameter-server use: the engine holds the weights (fp32) and applies each
  // committed update to them.
  bool hold_weights = false;
};

// How a Muon tensor is viewed as a batch of matrices: (E, m, n) is E matrices
// of m×n; (o, i, kh, kw, …) is one matrix o × (i·kh·kw·…).
struct MatrixView {
  int64_t batch = 1;
  int64_t rows = 0;
  int64_t cols = 0;
};

// REQUIRES: shape has ≥ 2 dims.
MatrixView MatrixViewOf(const std::vector<int64_t>& shape);
int64_t NumElements(const std::vector<int64_t>& shape);
std::string ShapeString(const std::vector<int64_t>& shape);

// Validates a spec: non-empty shape with positive dims, Muon tensors of ≥ 2
// dims, every enum a defined value, ValidateHyperParams. InvalidArgument
// naming the problem.
absl::Status ValidateSpec(const ParamSpec& spec);

// Conversions between wire dtypes and fp32. `bytes` must hold count elements.
void DecodeToFloat(DType dtype, const std::byte* bytes, size_t count, float* out);
void EncodeFromFloat(DType dtype, const float* in, size_t count, std::byte* bytes);

}  // namespace muon

#endif  // MUON_KERNELS_TYPES_H_
