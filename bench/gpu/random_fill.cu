#include "random_fill.h"

namespace muon::bench {
namespace {

// splitmix64: a good enough counter-based generator for benchmark inputs.
__device__ uint64_t Mix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__global__ void RandomFillKernel(__nv_bfloat16* x, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const uint64_t bits = Mix(seed * 0x100000001b3ull + static_cast<uint64_t>(i));
    // Box–Muller on two 24-bit uniforms in (0, 1].
    const float u1 = (static_cast<float>(bits & 0xffffff) + 1.0f) / 16777216.0f;
    const float u2 = static_cast<float>((bits >> 24) & 0xffffff) / 16777216.0f;
    x[i] = __float2bfloat16_rn(sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));
  }
}

}  // namespace

cudaError_t LaunchRandomFill(__nv_bfloat16* d_x, int64_t n, uint64_t seed, cudaStream_t stream) {
  RandomFillKernel<<<132 * 8, 256, 0, stream>>>(d_x, n, seed);
  return cudaGetLastError();
}

}  // namespace muon::bench
