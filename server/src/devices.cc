#include "muon/server/devices.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace muon::server {
namespace {

absl::Status CheckOrdinal(int ordinal, int visible, absl::string_view flag) {
  if (ordinal >= 0 && ordinal < visible) return absl::OkStatus();
  const std::string seen = visible == 1
                               ? std::string("1 device (ordinal 0)")
                               : absl::StrCat(visible, " devices (ordinals 0 to ", visible - 1, ")");
  return absl::InvalidArgumentError(
      absl::StrCat(flag, " names CUDA device ", ordinal, ", but this process sees ", seen,
                   "; check the ordinals against nvidia-smi and CUDA_VISIBLE_DEVICES"));
}

}  // namespace

absl::StatusOr<std::vector<int>> ResolveDevices(const DeviceRequest& request) {
  if (request.engine != "auto" && request.engine != "cpu" && request.engine != "cuda") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown engine '", request.engine, "'; expected auto, cpu or cuda"));
  }
  if (request.engine == "cpu" || (request.engine == "auto" && request.visible <= 0)) {
    return std::vector<int>();
  }
  if (request.visible <= 0) {
    return absl::FailedPreconditionError(
        "--engine=cuda, but this process sees no CUDA device (no driver, no GPU, an empty "
        "CUDA_VISIBLE_DEVICES, or a build without CUDA); run with --engine=cpu");
  }
  if (request.devices.has_value()) {
    const std::vector<int>& list = *request.devices;
    if (list.empty()) {
      return absl::InvalidArgumentError(
          "--devices lists no device; leave it out for every visible GPU, or list ordinals");
    }
    for (size_t i = 0; i < list.size(); ++i) {
      if (absl::Status ok = CheckOrdinal(list[i], request.visible, "--devices"); !ok.ok()) {
        return ok;
      }
      if (std::find(list.begin(), list.begin() + i, list[i]) != list.begin() + i) {
        return absl::InvalidArgumentError(
            absl::StrCat("--devices lists CUDA device ", list[i], " twice"));
      }
    }
    if (request.device.has_value() && list != std::vector<int>{*request.device}) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--device=", *request.device, " (one GPU) and --devices=", absl::StrJoin(list, ","),
          " disagree; set one of them (or MUON_DEVICE / MUON_DEVICES)"));
    }
    return list;
  }
  if (request.device.has_value()) {
    if (absl::Status ok = CheckOrdinal(*request.device, request.visible, "--device"); !ok.ok()) {
      return ok;
    }
    return std::vector<int>{*request.device};
  }
  std::vector<int> all(static_cast<size_t>(request.visible));
  std::iota(all.begin(), all.end(), 0);
  return all;
}

}  // namespace muon::server
