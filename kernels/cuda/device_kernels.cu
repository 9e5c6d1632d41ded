#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "device_kernels.h"

namespace muon::internal {
namespace {

constexpr int kThreads = 256;
// Enough blocks of a grid-stride loop to fill an H100 (132 SMs × 8 blocks);
// more only adds scheduling.
constexpr int64_t kMaxBlocks = 132 * 8;

int BlocksFor(int64_t work) {
  return static_cast<int>(std::clamp<int64_t>((work + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

__device__ __forceinline__ float Decode(const void* p, int type, int64_t i) {
  switch (type) {
    case kWireBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case kWireF16:
      return __half2float(static_cast<const __half*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void Encode(void* p, int type, int64_t i, float v) {
  switch (type) {
    case kWireBF16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      return;
    case kWireF16:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
      return;
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// Newton–Schulz operand element types (NsType) to and from fp32.
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }
template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}

// Sum over the block; the result is valid in thread 0.
template <typename T>
__device__ T BlockSum(T v) {
  __shared__ T partial[kThreads / 32];
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = 0;
  if (warp == 0) {
    v = lane < kThreads / 32 ? partial[lane] : T(0);
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

// ORs the block's NonFiniteBits into *flag. Every thread of the block calls it.
__device__ void ReportNonFinite(bool bad_gradient, bool bad_result, int* flag) {
  const int bits = (__syncthreads_or(bad_gradient) ? kNonFiniteGradient : 0) |
                   (__syncthreads_or(bad_result) ? kNonFiniteResult : 0);
  if (bits != 0 && threadIdx.x == 0) atomicOr(flag, bits);
}

__global__ void MomentumKernel(MomentumParams p) {
  bool bad_gradient = false, bad_result = false;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < p.n;
       i += int64_t{gridDim.x} * kThreads) {
    const float g = Decode(p.d_grad, p.grad_type, i);
    float b;
    // M in bf16 can round to Inf where the fp32 value was finite.
    const __nv_bfloat16 m = __float2bfloat16_rn(MomentumStep(p.coeffs, p.d_momentum[i], g, &b));
    p.d_momentum_out[i] = b;
    p.d_m[i] = m;
    bad_gradient |= !isfinite(g);
    bad_result |= !isfinite(b) || !isfinite(__bfloat162float(m));
  }
  ReportNonFinite(bad_gradient, bad_result, p.d_nonfinite);
}

__global__ void AdamWKernel(AdamWParams p) {
  bool bad_gradient = false, bad_result = false;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < p.n;
       i += int64_t{gridDim.x} * kThreads) {
    const float g = Decode(p.d_grad, p.grad_type, i);
    float m, v;
    const float u = AdamWStep(p.coeffs, p.d_m[i], p.d_v[i], g, &m, &v);
    p.d_m_out[i] = m;
    p.d_v_out[i] = v;
    bad_gradient |= !isfinite(g);
    bad_result |= !isfinite(m) || !isfinite(v) || !isfinite(u);
    if (p.d_weights != nullptr) {
      const float w = DecayedWeight(p.decay, p.d_weights[i], u);
      p.d_weights_out[i] = w;
      bad_result |= !isfinite(w);
    }
    Encode(p.d_out, p.out_type, i, u);
  }
  ReportNonFinite(bad_gradient, bad_result, p.d_nonfinite);
}

template <typename T>
__global__ void MuonFinishKernel(MuonFinishParams p) {
  const T* o = static_cast<const T*>(p.d_o);
  bool bad_result = false;
  for (int64_t i = blockIdx.x * int64_t{kThreads} + threadIdx.x; i < p.n;
       i += int64_t{gridDim.x} * kThreads) {
    const float u = MuonUpdate(p.scale, ToFloat(o[i]));
    bad_result |= !isfinite(u);
    if (p.d_weights != nullptr) {
      const float w = DecayedWeight(p.decay, p.d_weights[i], u);
      p.d_weights_out[i] = w;
      bad_result |= !isfinite(w);
    }
    Encode(p.d_out, p.out_type, i, u);
  }
  ReportNonFinite(false, bad_result, p.d_nonfinite);
}

// Eight bf16 in one 16-byte access: the batched kernels below are bound by
// memory bandwidth, and 16-byte loads are what reaches it.
union Pack8 {
  uint4 raw;
  __nv_bfloat162 h2[4];
};

// grid (blocks, batch). Uses 16-byte accesses when n % 8 == 0 (every matrix
// then starts 16-byte aligned), scalar ones otherwise.
__global__ void SumSquaresKernel(SumSquaresParams p) {
  const __nv_bfloat16* x = p.d_x + blockIdx.y * p.n;
  const int64_t start = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  float sum = 0;
  if (p.n % 8 == 0) {
    const uint4* x8 = reinterpret_cast<const uint4*>(x);
    for (int64_t i = start; i < p.n / 8; i += stride) {
      Pack8 v;
      v.raw = x8[i];
      for (int k = 0; k < 4; ++k) {
        const float2 f = __bfloat1622float2(v.h2[k]);
        sum += f.x * f.x + f.y * f.y;
      }
    }
  } else {
    for (int64_t i = start; i < p.n; i += stride) {
      const float f = __bfloat162float(x[i]);
      sum += f * f;
    }
  }
  sum = BlockSum(sum);
  if (threadIdx.x == 0) atomicAdd(p.d_sumsq + blockIdx.y, sum);
}

// Eight values of T from eight fp32, as one 16-byte store.
template <typename T>
__device__ __forceinline__ uint32_t PackPair(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t PackPair<__nv_bfloat16>(float lo, float hi) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(lo)) |
         (uint32_t{__bfloat16_as_ushort(__float2bfloat16_rn(hi))} << 16);
}
template <>
__device__ __forceinline__ uint32_t PackPair<__half>(float lo, float hi) {
  return __half_as_ushort(__float2half_rn(lo)) |
         (uint32_t{__half_as_ushort(__float2half_rn(hi))} << 16);
}
template <typename T>
__device__ __forceinline__ uint4 Pack(const float (&f)[8]) {
  return make_uint4(PackPair<T>(f[0], f[1]), PackPair<T>(f[2], f[3]), PackPair<T>(f[4], f[5]),
                    PackPair<T>(f[6], f[7]));
}

template <typename T>
__global__ void NormalizeKernel(NormalizeParams p) {
  const __nv_bfloat16* x = p.d_x + blockIdx.y * p.n;
  T* y = static_cast<T*>(p.d_y) + blockIdx.y * p.n;
  const float s = 1.0f / (p.safety * sqrtf(p.d_sumsq[blockIdx.y]) + p.eps);
  const int64_t start = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  const int64_t stride = int64_t{gridDim.x} * kThreads;
  if (p.n % 8 == 0) {
    const uint4* x8 = reinterpret_cast<const uint4*>(x);
    uint4* y8 = reinterpret_cast<uint4*>(y);
    for (int64_t i = start; i < p.n / 8; i += stride) {
      Pack8 v;
      v.raw = x8[i];
      float f[8];
      for (int k = 0; k < 4; ++k) {
        // Multiply in fp32: s itself need not be representable in bf16.
        const float2 g = __bfloat1622float2(v.h2[k]);
        f[2 * k] = g.x * s;
        f[2 * k + 1] = g.y * s;
      }
      y8[i] = Pack<T>(f);
    }
  } else {
    for (int64_t i = start; i < p.n; i += stride) {
      y[i] = FromFloat<T>(__bfloat162float(x[i]) * s);
    }
  }
}

// One warp per column j ≥ first of A: by symmetry Σ_i |A_ij| is row j's sum,
// read contiguously. d_j = 1/sqrt(max(Σ, 1e-7)).
template <typename T>
__global__ void AolColumnScaleKernel(AolParams p, int64_t first) {
  const int64_t col = first + blockIdx.x * int64_t{kThreads / 32} + threadIdx.x / 32;
  if (col >= p.r) return;
  const T* a = static_cast<const T*>(p.d_a) + blockIdx.y * p.r * p.r + col * p.r;
  float sum = 0;
  for (int64_t i = threadIdx.x % 32; i < p.r; i += 32) sum += fabsf(ToFloat(a[i]));
  for (int off = 16; off > 0; off /= 2) sum += __shfl_down_sync(0xffffffffu, sum, off);
  if (threadIdx.x % 32 == 0) p.d_scale[blockIdx.y * p.r + col] = rsqrtf(fmaxf(sum, 1e-7f));
}

// One thread per row i < upper_rows, summing along the row (consecutive
// threads read consecutive elements of each column): the rows whose columns
// are incomplete when only the upper block row was computed.
template <typename T>
__global__ void AolRowScaleKernel(AolParams p) {
  const int64_t row = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (row >= p.upper_rows) return;
  const T* a = static_cast<const T*>(p.d_a) + blockIdx.y * p.r * p.r + row;
  float sum = 0;
  // Unrolled so several independent loads are in flight per thread; one at a
  // time, each iteration would wait out a full memory latency.
#pragma unroll 8
  for (int64_t j = 0; j < p.r; ++j) sum += fabsf(ToFloat(a[j * p.r]));
  p.d_scale[blockIdx.y * p.r + row] = rsqrtf(fmaxf(sum, 1e-7f));
}

// Y = diag(d)·X, one block per memory column at a time: X is column-major,
// so a memory column is either one row of the wide matrix (x_rows_contiguous:
// one scale for the whole column) or one column of it (scale d[k] for its
// k-th element). No per-element division: 64-bit div/mod per element cost as
// much as the memory traffic here.
template <typename T>
__global__ void AolScaleXKernel(AolParams p) {
  const int64_t columns = p.x_rows_contiguous ? p.r : p.c;
  const int64_t length = p.x_rows_contiguous ? p.c : p.r;
  const float* d = p.d_scale + blockIdx.y * p.r;
  const T* x = static_cast<const T*>(p.d_x) + blockIdx.y * p.r * p.c;
  T* y = static_cast<T*>(p.d_y) + blockIdx.y * p.r * p.c;
  for (int64_t col = blockIdx.x; col < columns; col += gridDim.x) {
    const T* xc = x + col * length;
    T* yc = y + col * length;
    for (int64_t k = threadIdx.x; k < length; k += kThreads) {
      const float s = p.x_rows_contiguous ? d[col] : d[k];
      yc[k] = FromFloat<T>(ToFloat(xc[k]) * s);
    }
  }
}

// A ← diag(d)·A·diag(d), column by column (A column-major r×r), skipping the
// block left empty by the half-Gram products.
template <typename T>
__global__ void AolScaleAKernel(AolParams p) {
  const float* d = p.d_scale + blockIdx.y * p.r;
  T* a = static_cast<T*>(p.d_a) + blockIdx.y * p.r * p.r;
  for (int64_t j = blockIdx.x; j < p.r; j += gridDim.x) {
    const int64_t rows = j < p.upper_rows ? p.upper_rows : p.r;
    for (int64_t i = threadIdx.x; i < rows; i += kThreads) {
      a[i + j * p.r] = FromFloat<T>(ToFloat(a[i + j * p.r]) * d[i] * d[j]);
    }
  }
}

// One block per column at a time (r×r column-major matrices).
template <typename T>
__global__ void AddIdentityKernel(AddIdentityParams p) {
  const T* x = static_cast<const T*>(p.d_x) + blockIdx.y * p.r * p.r;
  T* d = static_cast<T*>(p.d_d) + blockIdx.y * p.r * p.r;
  for (int64_t j = blockIdx.x; j < p.r; j += gridDim.x) {
    for (int64_t i = threadIdx.x; i < p.r; i += kThreads) {
      const float v = ToFloat(x[i + j * p.r]);
      d[i + j * p.r] = FromFloat<T>(i == j ? v + p.shift : v);
    }
  }
}

__global__ void OrthoErrorKernel(OrthoErrorParams p) {
  const float* g = p.d_gram + blockIdx.y * p.r * p.r;
  double sum = 0;
  for (int64_t e = blockIdx.x * int64_t{kThreads} + threadIdx.x; e < p.r * p.r;
       e += int64_t{gridDim.x} * kThreads) {
    const double v = g[e] - (e % p.r == e / p.r ? 1.0 : 0.0);
    sum += v * v;
  }
  sum = BlockSum(sum);
  if (threadIdx.x == 0) atomicAdd(p.d_error + blockIdx.y, sum);
}

// Blocks per matrix of a batched kernel: the whole batch together fills the
// GPU, and no block is left with nothing to do.
dim3 BatchedGrid(int64_t work_per_matrix, int64_t batch) {
  const int64_t want = std::max<int64_t>(1, kMaxBlocks / batch);
  const int64_t useful = (work_per_matrix + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned>(std::clamp<int64_t>(useful, 1, want)),
              static_cast<unsigned>(batch));
}

}  // namespace

cudaError_t LaunchMomentum(const MomentumParams& p, cudaStream_t stream) {
  MomentumKernel<<<BlocksFor(p.n), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchAdamW(const AdamWParams& p, cudaStream_t stream) {
  AdamWKernel<<<BlocksFor(p.n), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchMuonFinish(const MuonFinishParams& p, cudaStream_t stream) {
  if (p.o_type == NsType::kF16) {
    MuonFinishKernel<__half><<<BlocksFor(p.n), kThreads, 0, stream>>>(p);
  } else {
    MuonFinishKernel<__nv_bfloat16><<<BlocksFor(p.n), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t LaunchSumSquares(const SumSquaresParams& p, cudaStream_t stream) {
  SumSquaresKernel<<<BatchedGrid(p.n % 8 == 0 ? p.n / 8 : p.n, p.batch), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchNormalize(const NormalizeParams& p, cudaStream_t stream) {
  const dim3 grid = BatchedGrid(p.n % 8 == 0 ? p.n / 8 : p.n, p.batch);
  if (p.y_type == NsType::kF16) {
    NormalizeKernel<__half><<<grid, kThreads, 0, stream>>>(p);
  } else {
    NormalizeKernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchAolTyped(const AolParams& p, cudaStream_t stream) {
  if (p.upper_rows > 0) {
    const dim3 grid(static_cast<unsigned>((p.upper_rows + kThreads - 1) / kThreads),
                    static_cast<unsigned>(p.batch));
    AolRowScaleKernel<T><<<grid, kThreads, 0, stream>>>(p);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  const int64_t columns = p.r - p.upper_rows;
  const dim3 grid(static_cast<unsigned>((columns + kThreads / 32 - 1) / (kThreads / 32)),
                  static_cast<unsigned>(p.batch));
  AolColumnScaleKernel<T><<<grid, kThreads, 0, stream>>>(p, p.upper_rows);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  const auto column_grid = [&](int64_t columns) {
    const int64_t want = std::max<int64_t>(1, kMaxBlocks / p.batch);
    return dim3(static_cast<unsigned>(std::min(columns, want)), static_cast<unsigned>(p.batch));
  };
  AolScaleXKernel<T><<<column_grid(p.x_rows_contiguous ? p.r : p.c), kThreads, 0, stream>>>(p);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  AolScaleAKernel<T><<<column_grid(p.r), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchAol(const AolParams& p, cudaStream_t stream) {
  return p.type == NsType::kF16 ? LaunchAolTyped<__half>(p, stream)
                                : LaunchAolTyped<__nv_bfloat16>(p, stream);
}

cudaError_t LaunchAddIdentity(const AddIdentityParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(std::min(p.r, std::max<int64_t>(1, kMaxBlocks / p.batch))),
                  static_cast<unsigned>(p.batch));
  if (p.type == NsType::kF16) {
    AddIdentityKernel<__half><<<grid, kThreads, 0, stream>>>(p);
  } else {
    AddIdentityKernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t LaunchOrthoError(const OrthoErrorParams& p, cudaStream_t stream) {
  OrthoErrorKernel<<<BatchedGrid(p.r * p.r, p.batch), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace muon::internal
