#include "step/step_options.h"

#include "absl/strings/str_cat.h"
#include "muon/kernels/status_macros.h"
#include "step/step_header.h"
#include "wire/convert.h"

namespace muon::server {

absl::StatusOr<std::vector<ParamStepInput>> StepInputsFromHeader(
    const v1::StepHeader& header, absl::Span<const ParamSpec* const> specs) {
  std::vector<ParamStepInput> inputs(specs.size());
  std::vector<const v1::HyperParams*> options(specs.size(), nullptr);
  for (const v1::ParamStepOptions& o : header.param_options()) {
    if (o.param_index() >= specs.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("StepHeader.param_options names parameter ", o.param_index(),
                       "; the session has ", specs.size(), " (indices 0..", specs.size() - 1,
                       ")"));
    }
    if (options[o.param_index()] != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "StepHeader.param_options names parameter ", o.param_index(), " twice"));
    }
    const v1::HyperParams& hp = o.hyper_params();
    if (hp.momentum_form() != v1::MOMENTUM_FORM_UNSPECIFIED ||
        hp.ns_schedule() != v1::NS_SCHEDULE_UNSPECIFIED || hp.has_ns_steps() ||
        hp.shape_scale() != v1::SHAPE_SCALE_UNSPECIFIED || hp.ns_coefficients_size() > 0 ||
        hp.has_ns_eps()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "StepHeader.param_options for parameter ", o.param_index(), " ('",
          specs[o.param_index()]->name,
          "') sets momentum_form, ns_schedule, ns_steps, ns_coefficients, ns_eps or shape_scale; "
          "those are fixed when "
          "the session is created"));
    }
    options[o.param_index()] = &hp;
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    const ParamSpec& spec = *specs[i];
    const v1::HyperParams* o = options[i];
    std::optional<double> lr = header.has_lr() ? std::optional<double>(header.lr()) : std::nullopt;
    if (o != nullptr && o->has_lr()) lr = o->lr();
    inputs[i].lr = StepLr(lr, header.has_lr_scale() ? std::optional<double>(header.lr_scale())
                                                    : std::nullopt,
                          spec.hp.lr);
    if (o == nullptr) continue;
    MUON_ASSIGN_OR_RETURN(
        HyperParams hp,
        ApplyOverrides(spec.hp, *o, absl::StrCat("StepHeader.param_options for parameter ", i)));
    ParamSpec stepped = spec;
    stepped.hp = hp;
    if (inputs[i].lr.has_value()) stepped.hp.lr = *inputs[i].lr;
    if (absl::Status valid = ValidateSpec(stepped); !valid.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("StepHeader.param_options for parameter ",
                                                     i, ": ", valid.message()));
    }
    inputs[i].hyper_params = hp;
  }
  return inputs;
}

}  // namespace muon::server
