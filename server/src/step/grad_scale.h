#ifndef MUON_SERVER_SRC_STEP_GRAD_SCALE_H_
#define MUON_SERVER_SRC_STEP_GRAD_SCALE_H_

#include <cstddef>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "muon/kernels/types.h"

namespace muon::server {

// StepEnd.grad_scale: finite and > 0 (a factor of 0 or below, NaN or inf
// would wipe or poison the momentum), and only on a step whose header asked
// for deferred compute (the others computed as gradients arrived).
// InvalidArgument naming the value.
absl::Status CheckGradScale(double scale, bool deferred);

// One gradient of wire `dtype` as fp32, each element multiplied by `scale`
// in fp32: the product torch's clip_grad_norm_ forms (grad.mul_(coef) with
// a float32 coef), so a clipped remote step matches a clipped local one bit
// for bit on fp32 wire.
std::vector<float> ScaledGradient(DType dtype, absl::Span<const std::byte> bytes, float scale);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STEP_GRAD_SCALE_H_
