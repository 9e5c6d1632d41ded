#include "model_presets.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace muon::muonctl {
namespace {

std::vector<PresetParam> Gpt2(int64_t d, int layers) {
  std::vector<PresetParam> params;
  for (int l = 0; l < layers; ++l) {
    const std::string p = absl::StrCat("h.", l, ".");
    params.push_back({p + "attn.c_attn", d, 3 * d});
    params.push_back({p + "attn.c_proj", d, d});
    params.push_back({p + "mlp.c_fc", 4 * d, d});
    params.push_back({p + "mlp.c_proj", d, 4 * d});
  }
  return params;
}

std::vector<PresetParam> Llama1b() {
  std::vector<PresetParam> params;
  for (int l = 0; l < 16; ++l) {
    const std::string p = absl::StrCat("layers.", l, ".");
    params.push_back({p + "attn.q_proj", 2048, 2048});
    params.push_back({p + "attn.o_proj", 2048, 2048});
    params.push_back({p + "attn.k_proj", 512, 2048});
    params.push_back({p + "attn.v_proj", 512, 2048});
    params.push_back({p + "mlp.gate_proj", 8192, 2048});
    params.push_back({p + "mlp.up_proj", 8192, 2048});
    params.push_back({p + "mlp.down_proj", 2048, 8192});
  }
  return params;
}

std::vector<PresetParam> Small256() {
  std::vector<PresetParam> params;
  for (int i = 0; i < 512; ++i) params.push_back({absl::StrCat("m.", i), 256, 256});
  return params;
}

}  // namespace

std::vector<std::string> ModelPresetNames() {
  return {"gpt2-small", "gpt2-medium", "llama-1b", "small-256", "small"};
}

absl::StatusOr<std::vector<PresetParam>> ModelPreset(absl::string_view name) {
  if (name == "gpt2-small") return Gpt2(768, 12);
  if (name == "gpt2-medium") return Gpt2(1024, 24);
  if (name == "llama-1b") return Llama1b();
  if (name == "small-256") return Small256();
  if (name == "small") return Gpt2(128, 4);
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown model \"", name, "\"; known: ", absl::StrJoin(ModelPresetNames(), ", ")));
}

double NsFlops(const std::vector<PresetParam>& params, int ns_steps) {
  double flops = 0;
  for (const PresetParam& p : params) {
    const double r = static_cast<double>(std::min(p.rows, p.cols));
    const double c = static_cast<double>(std::max(p.rows, p.cols));
    flops += ns_steps * (4 * r * r * c + 2 * r * r * r);
  }
  return flops;
}

}  // namespace muon::muonctl
