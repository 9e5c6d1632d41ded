#ifndef MUON_BENCH_GPU_RANDOM_FILL_H_
#define MUON_BENCH_GPU_RANDOM_FILL_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace muon::bench {

// Fills d_x with n standard-normal bf16 values from a counter hash of
// (seed, index): fresh data per seed at device-bandwidth speed.
cudaError_t LaunchRandomFill(__nv_bfloat16* d_x, int64_t n, uint64_t seed, cudaStream_t stream);

}  // namespace muon::bench

#endif  // MUON_BENCH_GPU_RANDOM_FILL_H_
