#ifndef MUON_SERVER_SRC_API_SERVER_INFO_H_
#define MUON_SERVER_SRC_API_SERVER_INFO_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "api/service.h"
#include "muon/v1/optimizer.pb.h"

namespace muon::server {

// The most Newton–Schulz steps a parameter may ask for (the engine's bound
// on HyperParams.ns_steps).
inline constexpr int32_t kMaxNsSteps = 100;

// GetServerInfo's answer: what `env` runs with, each schedule's coefficients
// for `ns_steps` steps (0: the default). InvalidArgument for ns_steps
// outside [0, kMaxNsSteps].
absl::StatusOr<v1::ServerInfo> DescribeServer(const ServiceEnv& env, int32_t ns_steps);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_API_SERVER_INFO_H_
