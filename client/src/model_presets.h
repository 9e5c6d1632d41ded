#ifndef MUON_CLIENT_SRC_MODEL_PRESETS_H_
#define MUON_CLIENT_SRC_MODEL_PRESETS_H_

// The matrix shapes muonctl registers for `bench` and `load` (docs/performance.md, "Workloads").

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace muon::muonctl {

struct PresetParam {
  std::string name;
  int64_t rows = 0;
  int64_t cols = 0;
};

// gpt2-small, gpt2-medium (per layer d×3d, d×d, 4d×d, d×4d with d, L =
// 768, 12 or 1024, 24), llama-1b (16 layers of 2048×2048 twice, 512×2048
// twice, 8192×2048 twice, 2048×8192 once), small-256 (512 matrices of
// 256×256), small (a GPT-2-shaped model with d = 128, 4 layers: quick runs
// on a CPU engine). INVALID_ARGUMENT for any other name, listing the names.
absl::StatusOr<std::vector<PresetParam>> ModelPreset(absl::string_view name);

// The preset names, in the order above.
std::vector<std::string> ModelPresetNames();

// Newton–Schulz flops of one step over `params` with `ns_steps` iterations:
// per matrix steps·(4·r²·c + 2·r³), r = min, c = max (docs/math.md).
double NsFlops(const std::vector<PresetParam>& params, int ns_steps);

}  // namespace muon::muonctl

#endif  // MUON_CLIENT_SRC_MODEL_PRESETS_H_
