#include "wire/convert.h"

#include <cmath>
#include <string>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "muon/kernels/status_macros.h"

namespace muon::server {

absl::StatusOr<DType> DTypeFromProto(v1::DType dtype, DType unset) {
  switch (dtype) {
    case v1::DTYPE_UNSPECIFIED:
      return unset;
    case v1::DTYPE_FLOAT32:
      return DType::kFloat32;
    case v1::DTYPE_BFLOAT16:
      return DType::kBFloat16;
    case v1::DTYPE_FLOAT16:
      return DType::kFloat16;
    default:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype value ", static_cast<int>(dtype),
                   "; use DTYPE_FLOAT32, DTYPE_BFLOAT16 or DTYPE_FLOAT16"));
}

v1::DType DTypeToProto(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return v1::DTYPE_FLOAT32;
    case DType::kBFloat16:
      return v1::DTYPE_BFLOAT16;
    case DType::kFloat16:
      return v1::DTYPE_FLOAT16;
  }
  return v1::DTYPE_UNSPECIFIED;
}

v1::OptimizerKind KindToProto(OptimizerKind kind) {
  return kind == OptimizerKind::kMuon ? v1::OPTIMIZER_KIND_MUON : v1::OPTIMIZER_KIND_ADAMW;
}

namespace {

absl::Status BadEnum(absl::string_view where, absl::string_view field, int value) {
  return absl::InvalidArgumentError(
      absl::StrCat(where, ": unknown ", field, " value ", value, " (see muon/v1/optimizer.proto)"));
}

}  // namespace

absl::StatusOr<HyperParams> ApplyOverrides(const HyperParams& base, const v1::HyperParams& o,
                                           absl::string_view where) {
  HyperParams hp = base;
  if (o.has_lr()) hp.lr = o.lr();
  if (o.has_weight_decay()) hp.weight_decay = o.weight_decay();
  if (o.has_momentum()) hp.momentum = o.momentum();
  if (o.has_nesterov()) hp.nesterov = o.nesterov();
  switch (o.momentum_form()) {
    case v1::MOMENTUM_FORM_UNSPECIFIED:
      break;
    case v1::MOMENTUM_FORM_EMA:
      hp.momentum_form = MomentumForm::kEma;
      break;
    case v1::MOMENTUM_FORM_SUM:
      hp.momentum_form = MomentumForm::kSum;
      break;
    default:
      return BadEnum(where, "momentum_form", o.momentum_form());
  }
  switch (o.ns_schedule()) {
    case v1::NS_SCHEDULE_UNSPECIFIED:
      break;
    case v1::NS_SCHEDULE_JORDAN:
      hp.ns_schedule = ScheduleKind::kJordan;
      break;
    case v1::NS_SCHEDULE_DION:
      hp.ns_schedule = ScheduleKind::kDion;
      break;
    case v1::NS_SCHEDULE_POLAR_EXPRESS:
      hp.ns_schedule = ScheduleKind::kPolarExpress;
      break;
    case v1::NS_SCHEDULE_AOL:
      hp.ns_schedule = ScheduleKind::kAol;
      break;
    case v1::NS_SCHEDULE_AOL_DION:
      hp.ns_schedule = ScheduleKind::kAolDion;
      break;
    case v1::NS_SCHEDULE_SVD:
      hp.ns_schedule = ScheduleKind::kSvd;
      break;
    default:
      return BadEnum(where, "ns_schedule", o.ns_schedule());
  }
  if (o.ns_schedule() != v1::NS_SCHEDULE_UNSPECIFIED && o.ns_schedule() != v1::NS_SCHEDULE_JORDAN) {
    hp.ns_coefficients.clear();
  }
  if (o.has_ns_steps()) hp.ns_steps = o.ns_steps();
  if (o.ns_coefficients_size() > 0) {
    hp.ns_coefficients.clear();
    for (const v1::HyperParams::NsCoefficients& t : o.ns_coefficients()) {
      hp.ns_coefficients.push_back({t.a(), t.b(), t.c()});
    }
    // A per-step list gives the step count when ns_steps is not set here.
    if (o.ns_coefficients_size() > 1 && !o.has_ns_steps()) hp.ns_steps = o.ns_coefficients_size();
  }
  if (o.has_ns_eps()) hp.ns_eps = o.ns_eps();
  switch (o.ns_gram()) {
    case v1::NS_GRAM_UNSPECIFIED:
      break;
    case v1::NS_GRAM_AUTO:
      hp.ns_gram = NsGram::kAuto;
      break;
    case v1::NS_GRAM_OFF:
      hp.ns_gram = NsGram::kOff;
      break;
    case v1::NS_GRAM_ON:
      hp.ns_gram = NsGram::kOn;
      break;
    default:
      return BadEnum(where, "ns_gram", o.ns_gram());
  }
  switch (o.shape_scale()) {
    case v1::SHAPE_SCALE_UNSPECIFIED:
      break;
    case v1::SHAPE_SCALE_SPECTRAL:
      hp.shape_scale = ShapeScale::kSpectral;
      break;
    case v1::SHAPE_SCALE_RMS_MATCH:
      hp.shape_scale = ShapeScale::kRmsMatch;
      break;
    case v1::SHAPE_SCALE_NONE:
      hp.shape_scale = ShapeScale::kNone;
      break;
    default:
      return BadEnum(where, "shape_scale", o.shape_scale());
  }
  if (o.has_adam_beta1()) hp.beta1 = o.adam_beta1();
  if (o.has_adam_beta2()) hp.beta2 = o.adam_beta2();
  if (o.has_adam_eps()) hp.eps = o.adam_eps();
  return hp;
}

void HyperParamsToProto(const HyperParams& hp, v1::HyperParams* out) {
  out->set_lr(hp.lr);
  out->set_weight_decay(hp.weight_decay);
  out->set_momentum(hp.momentum);
  out->set_nesterov(hp.nesterov);
  out->set_momentum_form(hp.momentum_form == MomentumForm::kEma ? v1::MOMENTUM_FORM_EMA
                                                                : v1::MOMENTUM_FORM_SUM);
  switch (hp.ns_schedule) {
    case ScheduleKind::kJordan:
      out->set_ns_schedule(v1::NS_SCHEDULE_JORDAN);
      break;
    case ScheduleKind::kDion:
      out->set_ns_schedule(v1::NS_SCHEDULE_DION);
      break;
    case ScheduleKind::kPolarExpress:
      out->set_ns_schedule(v1::NS_SCHEDULE_POLAR_EXPRESS);
      break;
    case ScheduleKind::kAol:
      out->set_ns_schedule(v1::NS_SCHEDULE_AOL);
      break;
    case ScheduleKind::kAolDion:
      out->set_ns_schedule(v1::NS_SCHEDULE_AOL_DION);
      break;
    case ScheduleKind::kSvd:
      out->set_ns_schedule(v1::NS_SCHEDULE_SVD);
      break;
  }
  out->set_ns_steps(hp.ns_steps);
  for (const auto& [a, b, c] : hp.ns_coefficients) {
    v1::HyperParams::NsCoefficients* t = out->add_ns_coefficients();
    t->set_a(a);
    t->set_b(b);
    t->set_c(c);
  }
  out->set_ns_eps(hp.ns_eps);
  switch (hp.ns_gram) {
    case NsGram::kAuto:
      out->set_ns_gram(v1::NS_GRAM_AUTO);
      break;
    case NsGram::kOff:
      out->set_ns_gram(v1::NS_GRAM_OFF);
      break;
    case NsGram::kOn:
      out->set_ns_gram(v1::NS_GRAM_ON);
      break;
  }
  switch (hp.shape_scale) {
    case ShapeScale::kSpectral:
      out->set_shape_scale(v1::SHAPE_SCALE_SPECTRAL);
      break;
    case ShapeScale::kRmsMatch:
      out->set_shape_scale(v1::SHAPE_SCALE_RMS_MATCH);
      break;
    case ShapeScale::kNone:
      out->set_shape_scale(v1::SHAPE_SCALE_NONE);
      break;
  }
  out->set_adam_beta1(hp.beta1);
  out->set_adam_beta2(hp.beta2);
  out->set_adam_eps(hp.eps);
}

absl::Status ValidateStepHeader(const v1::StepHeader& header) {
  const auto in_range = [](double v) { return std::isfinite(v) && v >= 0; };
  if (header.has_lr() && !in_range(header.lr())) {
    return absl::InvalidArgumentError(
        absl::StrCat("StepHeader.lr is ", header.lr(), "; it must be finite and >= 0"));
  }
  if (header.has_lr_scale() && !in_range(header.lr_scale())) {
    return absl::InvalidArgumentError(absl::StrCat("StepHeader.lr_scale is ", header.lr_scale(),
                                                   "; it must be finite and >= 0"));
  }
  if (header.has_lr() && header.has_lr_scale() && !in_range(header.lr() * header.lr_scale())) {
    return absl::InvalidArgumentError(absl::StrCat("StepHeader.lr·lr_scale (", header.lr(), "·",
                                                   header.lr_scale(), ") overflows"));
  }
  if (absl::StatusOr<DType> dtype = DTypeFromProto(header.update_dtype(), DType::kFloat32);
      !dtype.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("StepHeader.update_dtype: ", dtype.status().message()));
  }
  switch (header.update_content()) {
    case v1::UPDATE_CONTENT_UNSPECIFIED:
    case v1::UPDATE_CONTENT_UPDATE:
    case v1::UPDATE_CONTENT_WEIGHTS:
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "StepHeader: unknown update_content value ", static_cast<int>(header.update_content()),
          "; use UPDATE_CONTENT_UPDATE or UPDATE_CONTENT_WEIGHTS (see muon/v1/optimizer.proto)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<ParamSpec>> SpecsFromRequest(const v1::CreateSessionRequest& request) {
  if (request.params_size() == 0) {
    return absl::InvalidArgumentError("CreateSession needs at least one parameter in `params`");
  }
  MUON_ASSIGN_OR_RETURN(HyperParams session_hp,
                        ApplyOverrides(HyperParams{}, request.hyper_params(), "hyper_params"));
  MUON_ASSIGN_OR_RETURN(
      HyperParams adamw_hp,
      ApplyOverrides(session_hp, request.adamw_hyper_params(), "adamw_hyper_params"));
  // Checked even where no parameter would use them: a value out of range is a
  // mistake whether or not it takes effect.
  if (absl::Status s = ValidateHyperParams(session_hp); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("hyper_params: ", s.message()));
  }
  if (absl::Status s = ValidateHyperParams(adamw_hp); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("adamw_hyper_params: ", s.message()));
  }
  const bool hold_weights = request.mode() == v1::SESSION_MODE_PARAMETER_SERVER;
  std::vector<ParamSpec> specs;
  specs.reserve(request.params_size());
  absl::flat_hash_set<std::string> names;
  for (int i = 0; i < request.params_size(); ++i) {
    const v1::ParameterSpec& p = request.params(i);
    const std::string who = absl::StrCat("parameter ", i, " ('", p.name(), "')");
    if (p.name().empty()) {
      return absl::InvalidArgumentError(absl::StrCat("parameter ", i, " has no name"));
    }
    if (!names.insert(p.name()).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(who, ": the name is used by an earlier parameter; names must be unique"));
    }
    if (p.shape_size() == 0) {
      return absl::InvalidArgumentError(absl::StrCat(who, " has an empty shape"));
    }
    ParamSpec spec;
    spec.name = p.name();
    spec.shape.assign(p.shape().begin(), p.shape().end());
    for (int64_t d : spec.shape) {
      if (d <= 0) {
        return absl::InvalidArgumentError(absl::StrCat(who, " has shape ", ShapeString(spec.shape),
                                                       "; every dimension must be > 0"));
      }
    }
    MUON_ASSIGN_OR_RETURN(spec.dtype, DTypeFromProto(p.dtype(), DType::kFloat32));
    switch (p.kind()) {
      case v1::OPTIMIZER_KIND_UNSPECIFIED:
        spec.kind = spec.shape.size() >= 2 ? OptimizerKind::kMuon : OptimizerKind::kAdamW;
        break;
      case v1::OPTIMIZER_KIND_MUON:
        spec.kind = OptimizerKind::kMuon;
        break;
      case v1::OPTIMIZER_KIND_ADAMW:
        spec.kind = OptimizerKind::kAdamW;
        break;
      default:
        return BadEnum(who, "kind", p.kind());
    }
    MUON_ASSIGN_OR_RETURN(spec.hp,
                          ApplyOverrides(spec.kind == OptimizerKind::kAdamW ? adamw_hp : session_hp,
                                         p.overrides(), absl::StrCat(who, " overrides")));
    spec.hold_weights = hold_weights;
    absl::Status valid = ValidateSpec(spec);
    if (!valid.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(who, ": ", valid.message()));
    }
    specs.push_back(std::move(spec));
  }
  return specs;
}

}  // namespace muon::server
