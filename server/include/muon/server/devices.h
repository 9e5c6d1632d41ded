#ifndef MUON_SERVER_DEVICES_H_
#define MUON_SERVER_DEVICES_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace muon::server {

// What the operator asked for: each flag as given, or nullopt when absent.
struct DeviceRequest {
  std::optional<std::vector<int>> devices;  // --devices / MUON_DEVICES
  std::optional<int> device;                // --device / MUON_DEVICE
  std::string engine = "auto";              // --engine: auto, cpu or cuda
  int visible = 0;                          // CUDA devices this process sees
};

// The CUDA devices the engine runs on (ServerOptions::devices): --devices as
// listed; else --device alone (one GPU); else every visible device. Empty
// for the CPU engine: --engine=cpu, or auto with no visible device (the
// device flags are then unused, as they always were).
//
// InvalidArgument for an unknown engine, an empty --devices list, an ordinal
// that is negative or not below `visible`, one listed twice, or --device
// given beside a --devices that is not exactly that one device.
// FailedPrecondition for --engine=cuda with no visible device.
absl::StatusOr<std::vector<int>> ResolveDevices(const DeviceRequest& request);

}  // namespace muon::server

#endif  // MUON_SERVER_DEVICES_H_
