#ifndef MUON_SERVER_SRC_CONVERT_H_
#define MUON_SERVER_SRC_CONVERT_H_

#include <vector>

#include "absl/status/statusor.h"
#include "muon/kernels/types.h"
#include "muon/v1/optimizer.pb.h"

namespace muon::server {

// Proto ⇄ kernels types. Errors are InvalidArgument naming the field.

// DTYPE_UNSPECIFIED maps to `unset`.
absl::StatusOr<DType> DTypeFromProto(v1::DType dtype, DType unset);
v1::DType DTypeToProto(DType dtype);
v1::OptimizerKind KindToProto(OptimizerKind kind);

// `base` with the fields set in `overrides` replaced. `where` prefixes errors
// ("session hyper_params", "parameter 'w' overrides").
absl::StatusOr<HyperParams> ApplyOverrides(const HyperParams& base,
                                           const v1::HyperParams& overrides,
                                           absl::string_view where);
void HyperParamsToProto(const HyperParams& hp, v1::HyperParams* out);

// A StepHeader's own fields: lr and lr_scale finite and >= 0 (their product
// too), update_dtype and update_content defined values. InvalidArgument
// naming the field. Session-dependent checks (worker_id, content WEIGHTS
// outside PARAMETER_SERVER mode) are the step's.
absl::Status ValidateStepHeader(const v1::StepHeader& header);

// The engine specs of a CreateSession request, every default resolved and
// every spec validated, and the session's hyper_params and adamw_hyper_params
// in range even where no parameter uses them. InvalidArgument naming the
// parameter or the field.
absl::StatusOr<std::vector<ParamSpec>> SpecsFromRequest(const v1::CreateSessionRequest& request);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_CONVERT_H_
