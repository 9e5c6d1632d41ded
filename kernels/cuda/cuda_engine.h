#ifndef MUON_KERNELS_CUDA_CUDA_ENGINE_H_
#define MUON_KERNELS_CUDA_CUDA_ENGINE_H_

// The entry points engine.cc calls when the build has CUDA. No CUDA type
// appears here, so engine.cc compiles with the plain C++ compiler.

#include <memory>

#include "absl/status/statusor.h"
#include "muon/kernels/engine.h"

namespace muon::internal {

// Number of usable CUDA devices; 0 when there is no driver or no device.
int CudaDeviceCount();

// The CUDA engine on options.device.
// REQUIRES: 0 <= options.device < CudaDeviceCount().
// Optimizer state is fp32 in device memory, double-buffered so a transaction
// writes the second copy and Commit swaps them. Newton–Schulz runs in bf16 on
// cuBLASLt with fp32 accumulation. kSvd is Unimplemented (Register fails).
// Memory accounted against options.memory_budget_bytes (0: the device's
// memory): a fixed 128 MiB of cuBLASLt workspaces, and per parameter 2× its
// state plus the step workspace it can need (docs/performance.md, "Memory").
absl::StatusOr<std::unique_ptr<Engine>> CreateCudaEngineImpl(const EngineOptions& options);

}  // namespace muon::internal

#endif  // MUON_KERNELS_CUDA_CUDA_ENGINE_H_
