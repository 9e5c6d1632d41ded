#include "muon/kernels/internal/param_table.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "muon/kernels/status_macros.h"

namespace muon::internal {
namespace {

// A cgroup memory limit file's value: bytes, or "max" / absent for none.
int64_t CgroupLimit(const char* path) {
  std::ifstream in(path);
  std::string text;
  if (!(in >> text)) return 0;
  int64_t bytes = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(text), &bytes) || bytes <= 0) return 0;
  return bytes;
}

absl::Status CheckVector(const ParamSpec& spec, const std::vector<float>& values, size_t want,
                         absl::string_view what) {
  if (values.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("state of ", Who(spec), ": ", what, " has ",
                                                   values.size(), " values, expected ", want));
  }
  if (!std::all_of(values.begin(), values.end(), [](float v) { return std::isfinite(v); })) {
    return absl::InvalidArgumentError(
        absl::StrCat("state of ", Who(spec), ": ", what, " holds NaN or Inf"));
  }
  return absl::OkStatus();
}

}  // namespace

std::string Who(const ParamSpec& spec) {
  return absl::StrCat("parameter '", spec.name, "' ", ShapeString(spec.shape));
}

absl::Status InStepError(const ParamSpec& spec) {
  return absl::FailedPreconditionError(absl::StrCat(Who(spec), " is in a step in progress"));
}

absl::Status CheckWeightHolder(const ParamSpec& spec, size_t values) {
  if (!spec.hold_weights) {
    return absl::FailedPreconditionError(absl::StrCat(Who(spec), " does not hold weights"));
  }
  const int64_t size = NumElements(spec.shape);
  if (values != static_cast<size_t>(size)) {
    return absl::InvalidArgumentError(
        absl::StrCat(Who(spec), " has ", size, " weights, not ", values));
  }
  return absl::OkStatus();
}

absl::Status CheckImport(const ParamSpec& spec, const ParamState& state) {
  const size_t n = static_cast<size_t>(NumElements(spec.shape));
  const bool muon = spec.kind == OptimizerKind::kMuon;
  MUON_RETURN_IF_ERROR(CheckVector(spec, state.momentum, muon ? n : 0, "momentum"));
  MUON_RETURN_IF_ERROR(CheckVector(spec, state.exp_avg, muon ? 0 : n, "exp_avg"));
  MUON_RETURN_IF_ERROR(CheckVector(spec, state.exp_avg_sq, muon ? 0 : n, "exp_avg_sq"));
  MUON_RETURN_IF_ERROR(CheckVector(spec, state.weights, spec.hold_weights ? n : 0, "weights"));
  if (state.step < 0) {
    return absl::InvalidArgumentError(absl::StrCat("state of ", Who(spec), ": step must be >= 0"));
  }
  return absl::OkStatus();
}

absl::Status OutOfHostMemory(absl::string_view what) {
  return absl::ResourceExhaustedError(
      absl::StrCat("out of host memory ", what, "; free sessions or run on a larger machine"));
}

absl::Status MemoryBudget::Reserve(int64_t bytes, absl::string_view who, absl::string_view what) {
  if (bytes > budget_ - used_) {
    return absl::ResourceExhaustedError(
        absl::StrCat(who, " needs ", bytes, " bytes of ", what, "; ", used_, " of the ", budget_,
                     "-byte memory budget are in use (raise ", setting_,
                     "; its default is the machine's memory)"));
  }
  used_ += bytes;
  return absl::OkStatus();
}

absl::StatusOr<int64_t> ResolveBudget(const EngineOptions& options, int64_t machine_bytes) {
  if (options.memory_budget_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        options.memory_budget_setting, " must be >= 0 (0: the machine's memory)"));
  }
  if (options.memory_budget_bytes > 0) return options.memory_budget_bytes;
  if (machine_bytes <= 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot read this machine's memory size; set ", options.memory_budget_setting));
  }
  return machine_bytes;
}

int64_t HostMemoryBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page_size = sysconf(_SC_PAGE_SIZE);
  int64_t bytes = pages > 0 && page_size > 0 ? static_cast<int64_t>(pages) * page_size : 0;
  // cgroup v2, then v1: a container's limit, where lower than the host's memory.
  for (const char* path :
       {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    const int64_t limit = CgroupLimit(path);
    if (limit > 0 && (bytes == 0 || limit < bytes)) bytes = limit;
  }
  return bytes;
}

}  // namespace muon::internal
