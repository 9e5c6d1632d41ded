#include "step/grad_scale.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace muon::server {

absl::Status CheckGradScale(double scale, bool deferred) {
  if (!std::isfinite(scale) || !(scale > 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "StepEnd.grad_scale is ", scale,
        "; it must be finite and > 0 (a clipping factor min(1, max_norm/norm)); nothing was "
        "applied"));
  }
  if (!deferred) {
    return absl::InvalidArgumentError(
        "StepEnd.grad_scale needs StepHeader.defer_compute: without it the server computes each "
        "parameter as its gradient arrives, before the factor is known; nothing was applied");
  }
  return absl::OkStatus();
}

std::vector<float> ScaledGradient(DType dtype, absl::Span<const std::byte> bytes, float scale) {
  const size_t n = bytes.size() / DTypeSize(dtype);
  std::vector<float> out(n);
  DecodeToFloat(dtype, bytes.data(), n, out.data());
  for (float& x : out) x *= scale;
  return out;
}

}  // namespace muon::server
