#include "muon/kernels/types.h"

#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace muon {
namespace {

template <typename Enum, size_t N>
absl::StatusOr<Enum> ParseName(absl::string_view what, absl::string_view name,
                               const std::array<std::pair<absl::string_view, Enum>, N>& table) {
  std::string known;
  for (const auto& [n, e] : table) {
    if (n == name) return e;
    absl::StrAppend(&known, known.empty() ? "" : ", ", n);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown ", what, " '", name, "'; expected one of: ", known));
}

template <typename Enum, size_t N>
absl::string_view NameOf(Enum value, const std::array<std::pair<absl::string_view, Enum>, N>& table) {
  for (const auto& [n, e] : table) {
    if (e == value) return n;
  }
  return "?";
}

constexpr std::array<std::pair<absl::string_view, DType>, 3> kDTypes = {{
    {"float32", DType::kFloat32}, {"bfloat16", DType::kBFloat16}, {"float16", DType::kFloat16}}};
constexpr std::array<std::pair<absl::string_view, ScheduleKind>, 6> kSchedules = {{
    {"jordan", ScheduleKind::kJordan},
    {"dion", ScheduleKind::kDion},
    {"polar_express", ScheduleKind::kPolarExpress},
    {"aol", ScheduleKind::kAol},
    {"aol_dion", ScheduleKind::kAolDion},
    {"svd", ScheduleKind::kSvd}}};
constexpr std::array<std::pair<absl::string_view, ShapeScale>, 3> kShapeScales = {{
    {"spectral", ShapeScale::kSpectral}, {"rms_match", ShapeScale::kRmsMatch}, {"none", ShapeScale::kNone}}};
constexpr std::array<std::pair<absl::string_view, NsGram>, 3> kNsGrams = {{
    {"auto", NsGram::kAuto}, {"off", NsGram::kOff}, {"on", NsGram::kOn}}};
constexpr std::array<std::pair<absl::string_view, MomentumForm>, 2> kMomentumForms = {{
    {"ema", MomentumForm::kEma}, {"sum", MomentumForm::kSum}}};

uint16_t FloatToBFloat16(float f) {
  uint32_t bits = std::bit_cast<uint32_t>(f);
  if (std::isnan(f)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  // Round to nearest, ties to even.
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

float BFloat16ToFloat(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F;
  const uint32_t mant = h & 0x3FF;
  if (exp == 0) {
    // Zero or subnormal: mant·2⁻²⁴.
    const float v = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7F800000 | (mant << 13));
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t FloatToHalf(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  const float a = std::fabs(f);
  if (std::isnan(f)) return sign | 0x7E00;
  if (a >= 65520.0f) return sign | 0x7C00;  // rounds to infinity
  if (a < 6.103515625e-05f) {
    // Subnormal half: round a·2²⁴ to the nearest integer, ties to even.
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));
  }
  uint32_t abits = std::bit_cast<uint32_t>(a);
  abits += 0xFFF + ((abits >> 13) & 1);
  return sign | static_cast<uint16_t>(((abits >> 23) - 112) << 10 | ((abits >> 13) & 0x3FF));
}

}  // namespace

absl::string_view DTypeName(DType dtype) { return NameOf(dtype, kDTypes); }
absl::StatusOr<DType> ParseDType(absl::string_view name) { return ParseName("dtype", name, kDTypes); }
size_t DTypeSize(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

absl::string_view ScheduleName(ScheduleKind kind) { return NameOf(kind, kSchedules); }
absl::StatusOr<ScheduleKind> ParseSchedule(absl::string_view name) {
  return ParseName("Newton-Schulz schedule", name, kSchedules);
}
absl::string_view ShapeScaleName(ShapeScale scale) { return NameOf(scale, kShapeScales); }
absl::StatusOr<ShapeScale> ParseShapeScale(absl::string_view name) {
  return ParseName("shape scale", name, kShapeScales);
}
absl::string_view NsGramName(NsGram mode) { return NameOf(mode, kNsGrams); }
absl::StatusOr<NsGram> ParseNsGram(absl::string_view name) {
  return ParseName("Gram Newton-Schulz mode", name, kNsGrams);
}
absl::string_view MomentumFormName(MomentumForm form) { return NameOf(form, kMomentumForms); }
absl::StatusOr<MomentumForm> ParseMomentumForm(absl::string_view name) {
  return ParseName("momentum form", name, kMomentumForms);
}

MatrixView MatrixViewOf(const std::vector<int64_t>& shape) {
  if (shape.size() == 3) return {shape[0], shape[1], shape[2]};
  int64_t cols = 1;
  for (size_t i = 1; i < shape.size(); ++i) cols *= shape[i];
  return {1, shape[0], cols};
}

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status ValidateSpec(const ParamSpec& spec) {
  const auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("parameter '", spec.name, "' ",
                                                   ShapeString(spec.shape), ": ", why));
  };
  if (spec.shape.empty()) return bad("shape has no dimensions; a scalar is shape [1]");
  // Bounded so element counts and byte sizes never overflow int64.
  constexpr int64_t kMaxElements = int64_t{1} << 40;
  int64_t n = 1;
  for (int64_t d : spec.shape) {
    if (d <= 0) return bad("every dimension must be positive");
    if (d > kMaxElements || n > kMaxElements / d) return bad("too many elements");
    n *= d;
  }
  if (spec.kind == OptimizerKind::kMuon && spec.shape.size() < 2) {
    return bad("Muon needs a tensor of 2 or more dimensions; use AdamW for vectors");
  }
  if (NameOf(spec.dtype, kDTypes) == "?") return bad("unknown dtype");
  if (spec.kind != OptimizerKind::kMuon && spec.kind != OptimizerKind::kAdamW) {
    return bad("unknown optimizer kind");
  }
  if (absl::Status s = ValidateHyperParams(spec.hp); !s.ok()) return bad(s.message());
  return absl::OkStatus();
}

absl::Status ValidateHyperParams(const HyperParams& hp) {
  const auto bad = [](absl::string_view field, auto value, absl::string_view range) {
    return absl::InvalidArgumentError(absl::StrCat(field, " is ", value, "; it must be ", range));
  };
  // Every field is checked whichever optimizer the parameter uses: a value
  // out of range is a mistake even where it has no effect.
  if (!(std::isfinite(hp.lr) && hp.lr >= 0)) return bad("lr", hp.lr, "finite and >= 0");
  if (!(std::isfinite(hp.weight_decay) && hp.weight_decay >= 0)) {
    return bad("weight_decay", hp.weight_decay, "finite and >= 0");
  }
  if (!std::isfinite(hp.lr * hp.weight_decay)) {
    return absl::InvalidArgumentError(absl::StrCat("lr·weight_decay (", hp.lr, "·",
                                                   hp.weight_decay, ") overflows; lower either"));
  }
  if (!(hp.momentum >= 0 && hp.momentum < 1)) return bad("momentum", hp.momentum, "in [0, 1)");
  if (MomentumFormName(hp.momentum_form) == "?") {
    return bad("momentum_form", static_cast<int>(hp.momentum_form), "ema or sum");
  }
  if (ScheduleName(hp.ns_schedule) == "?") {
    return bad("ns_schedule", static_cast<int>(hp.ns_schedule), "a known schedule");
  }
  if (hp.ns_steps < kMinNsSteps || hp.ns_steps > kMaxNsSteps) {
    return bad("ns_steps", hp.ns_steps, absl::StrCat("in [", kMinNsSteps, ", ", kMaxNsSteps, "]"));
  }
  if (!hp.ns_coefficients.empty()) {
    const size_t n = hp.ns_coefficients.size();
    if (n > static_cast<size_t>(kMaxNsSteps)) {
      return bad("ns_coefficients' length", n, absl::StrCat("in [1, ", kMaxNsSteps, "]"));
    }
    for (size_t i = 0; i < n; ++i) {
      for (double v : hp.ns_coefficients[i]) {
        if (!std::isfinite(v)) {
          return absl::InvalidArgumentError(absl::StrCat(
              "ns_coefficients step ", i, " is (", absl::StrJoin(hp.ns_coefficients[i], ", "),
              "); every coefficient must be finite"));
        }
      }
    }
    if (n > 1 && static_cast<size_t>(hp.ns_steps) != n) {
      return absl::InvalidArgumentError(
          absl::StrCat("ns_coefficients has ", n, " per-step triples but ns_steps is ",
                       hp.ns_steps, "; give one triple (repeated) or ns_steps triples"));
    }
    if (hp.ns_schedule != ScheduleKind::kJordan) {
      return absl::InvalidArgumentError(
          absl::StrCat("ns_coefficients replaces the schedule's coefficients, but ns_schedule is ",
                       ScheduleName(hp.ns_schedule), "; leave ns_schedule unset (jordan)"));
    }
  }
  if (!(std::isfinite(hp.ns_eps) && hp.ns_eps > 0)) {
    return bad("ns_eps", hp.ns_eps, "finite and > 0");
  }
  if (ShapeScaleName(hp.shape_scale) == "?") {
    return bad("shape_scale", static_cast<int>(hp.shape_scale), "spectral, rms_match or none");
  }
  if (!(hp.beta1 >= 0 && hp.beta1 < 1)) return bad("adam_beta1", hp.beta1, "in [0, 1)");
  if (!(hp.beta2 >= 0 && hp.beta2 < 1)) return bad("adam_beta2", hp.beta2, "in [0, 1)");
  if (!(std::isfinite(hp.eps) && hp.eps > 0)) return bad("adam_eps", hp.eps, "finite and > 0");
  return absl::OkStatus();
}

void DecodeToFloat(DType dtype, const std::byte* bytes, size_t count, float* out) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(out, bytes, count * sizeof(float));
      return;
    case DType::kBFloat16:
    case DType::kFloat16:
      for (size_t i = 0; i < count; ++i) {
        uint16_t h;
        std::memcpy(&h, bytes + 2 * i, 2);
        out[i] = dtype == DType::kBFloat16 ? BFloat16ToFloat(h) : HalfToFloat(h);
      }
      return;
  }
}

void EncodeFromFloat(DType dtype, const float* in, size_t count, std::byte* bytes) {
  switch (dtype) {
    case DType::kFloat32:
      std::memcpy(bytes, in, count * sizeof(float));
      return;
    case DType::kBFloat16:
    case DType::kFloat16:
      for (size_t i = 0; i < count; ++i) {
        const uint16_t h = dtype == DType::kBFloat16 ? FloatToBFloat16(in[i]) : FloatToHalf(in[i]);
        std::memcpy(bytes + 2 * i, &h, 2);
      }
      return;
  }
}

}  // namespace muon
