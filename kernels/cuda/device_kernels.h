#ifndef MUON_KERNELS_CUDA_DEVICE_KERNELS_H_
#define MUON_KERNELS_CUDA_DEVICE_KERNELS_H_

// Launchers of the element-wise and reduction kernels cuBLAS has no call for.
// One plain params struct per kernel, passed by value; every launcher enqueues
// on `stream` and returns the launch error (cudaGetLastError), never blocks.
// Matrices are batches of `batch` contiguous matrices; "wide" r×c (r ≤ c) is
// the orientation Newton–Schulz works on.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "muon/kernels/internal/step_math.h"

namespace muon::internal {

// Wire dtypes as the kernels see them; engine code static_asserts these
// against muon::DType.
enum WireType : int { kWireF32 = 0, kWireBF16 = 1, kWireF16 = 2 };

// Element type of Newton–Schulz's operands: X, A = X·Xᵀ, B and the Gram
// path's matrices (ns_cuda.h). Its input M is always bf16.
enum class NsType { kBF16, kF16 };

// Bits the step kernels OR into a parameter's d_nonfinite flag.
enum NonFiniteBits : int {
  kNonFiniteGradient = 1,  // the gradient holds NaN/Inf
  kNonFiniteResult = 2,    // new state, update or weights would not be finite
};

// MomentumStep (step_math.h) per element: the shadow buffer B' and the
// Newton–Schulz input M, cast to bf16. ORs NonFiniteBits into *d_nonfinite.
struct MomentumParams {
  const void* d_grad = nullptr;  // n elements of grad_type
  int grad_type = kWireF32;
  const float* d_momentum = nullptr;  // current state
  float* d_momentum_out = nullptr;    // shadow state
  __nv_bfloat16* d_m = nullptr;       // Newton–Schulz input
  int64_t n = 0;
  MomentumCoefficients coeffs;
  int* d_nonfinite = nullptr;
};
cudaError_t LaunchMomentum(const MomentumParams& p, cudaStream_t stream);

// AdamWStep (step_math.h, in float) per element, then the common tail: held
// weights W' = decay·W + u and u encoded to out_type. ORs NonFiniteBits into
// *d_nonfinite.
struct AdamWParams {
  const void* d_grad = nullptr;
  int grad_type = kWireF32;
  const float* d_m = nullptr;
  const float* d_v = nullptr;
  float* d_m_out = nullptr;
  float* d_v_out = nullptr;
  int64_t n = 0;
  AdamWCoefficients<float> coeffs;
  const float* d_weights = nullptr;  // null when the engine holds no weights
  float* d_weights_out = nullptr;
  float decay = 1;
  void* d_out = nullptr;  // n elements of out_type
  int out_type = kWireF32;
  int* d_nonfinite = nullptr;
};
cudaError_t LaunchAdamW(const AdamWParams& p, cudaStream_t stream);

// u = MuonUpdate(scale, O) (O from Newton–Schulz), held weights
// W' = decay·W + u, u encoded to out_type. ORs kNonFiniteResult into
// *d_nonfinite when u or W' is not finite.
struct MuonFinishParams {
  const void* d_o = nullptr;  // o_type elements
  NsType o_type = NsType::kF16;
  int64_t n = 0;
  float scale = 0;  // MuonUpdateScale: −lr·shape scale
  const float* d_weights = nullptr;
  float* d_weights_out = nullptr;
  float decay = 1;
  void* d_out = nullptr;
  int out_type = kWireF32;
  int* d_nonfinite = nullptr;
};
cudaError_t LaunchMuonFinish(const MuonFinishParams& p, cudaStream_t stream);

// d_sumsq[b] += Σ x² over matrix b (the caller zeroes d_sumsq).
struct SumSquaresParams {
  const __nv_bfloat16* d_x = nullptr;
  int64_t batch = 0;
  int64_t n = 0;  // elements per matrix
  float* d_sumsq = nullptr;
};
cudaError_t LaunchSumSquares(const SumSquaresParams& p, cudaStream_t stream);

// y_b = x_b / (safety·sqrt(d_sumsq[b]) + eps), y of y_type; y may equal x
// (each element is read and written by one thread).
struct NormalizeParams {
  const __nv_bfloat16* d_x = nullptr;
  void* d_y = nullptr;
  NsType y_type = NsType::kF16;
  int64_t batch = 0;
  int64_t n = 0;
  const float* d_sumsq = nullptr;
  float safety = 1;
  float eps = 1e-7f;
};
cudaError_t LaunchNormalize(const NormalizeParams& p, cudaStream_t stream);

// AOL: d_i = 1/sqrt(max(Σ_j |A_ij|, 1e-7)) for each symmetric r×r A, then
// Y = diag(d)·X and A ← diag(d)·A·diag(d) in place. X, Y are the wide r×c
// matrices stored either column-major with ld c (`x_rows_contiguous`: row i of
// the wide matrix is contiguous) or column-major with ld r.
struct AolParams {
  NsType type = NsType::kF16;  // of X, Y and A
  const void* d_x = nullptr;
  void* d_y = nullptr;  // may equal d_x
  void* d_a = nullptr;
  int64_t batch = 0;
  int64_t r = 0, c = 0;
  bool x_rows_contiguous = true;
  // 0: A is complete. h > 0: only A[0:h, :] and A[h:r, h:r] hold values (the
  // half-Gram products of ns_cuda.cc); the rest is neither read nor written.
  int64_t upper_rows = 0;
  float* d_scale = nullptr;  // batch·r floats of workspace
};
cudaError_t LaunchAol(const AolParams& p, cudaStream_t stream);

// D_b = X_b + shift·I for each r×r X_b (Gram Newton–Schulz's P = a·I + Z).
struct AddIdentityParams {
  NsType type = NsType::kF16;
  const void* d_x = nullptr;
  void* d_d = nullptr;
  int64_t batch = 0;
  int64_t r = 0;
  float shift = 0;
};
cudaError_t LaunchAddIdentity(const AddIdentityParams& p, cudaStream_t stream);

// d_error[b] += Σ_ij (G_ij − δ_ij)² for each fp32 r×r G (the caller zeroes it).
struct OrthoErrorParams {
  const float* d_gram = nullptr;
  int64_t batch = 0;
  int64_t r = 0;
  double* d_error = nullptr;
};
cudaError_t LaunchOrthoError(const OrthoErrorParams& p, cudaStream_t stream);

}  // namespace muon::internal

#endif  // MUON_KERNELS_CUDA_DEVICE_KERNELS_H_
