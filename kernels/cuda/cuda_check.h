#ifndef MUON_KERNELS_CUDA_CUDA_CHECK_H_
#define MUON_KERNELS_CUDA_CUDA_CHECK_H_

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace muon::internal {

// Out-of-memory becomes ResourceExhausted (the caller can shed load or free
// state); every other CUDA failure is Internal.
inline absl::Status CudaStatus(cudaError_t error, absl::string_view context,
                               absl::string_view call) {
  const std::string message = absl::StrCat(context, ": ", call, " failed: ",
                                           cudaGetErrorName(error), " (",
                                           cudaGetErrorString(error), ")");
  if (error == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

inline absl::Status CublasStatus(cublasStatus_t error, absl::string_view context,
                                 absl::string_view call) {
  const std::string message =
      absl::StrCat(context, ": ", call, " failed: ", cublasLtGetStatusName(error), " (",
                   cublasLtGetStatusString(error), ")");
  if (error == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(message);
  if (error == CUBLAS_STATUS_NOT_SUPPORTED) return absl::UnimplementedError(message);
  return absl::InternalError(message);
}

}  // namespace muon::internal

// RETURN_IF_CUDA_ERROR(cudaMalloc(...), "registering 'w1'"): returns a Status
// naming the context, the call and CUDA's error from the enclosing function.
#define RETURN_IF_CUDA_ERROR(expr, context)                                      \
  do {                                                                           \
    const cudaError_t muon_cuda_error_ = (expr);                                 \
    if (muon_cuda_error_ != cudaSuccess) {                                       \
      return ::muon::internal::CudaStatus(muon_cuda_error_, (context), #expr);   \
    }                                                                            \
  } while (0)

#define RETURN_IF_CUBLAS_ERROR(expr, context)                                    \
  do {                                                                           \
    const cublasStatus_t muon_cublas_error_ = (expr);                            \
    if (muon_cublas_error_ != CUBLAS_STATUS_SUCCESS) {                           \
      return ::muon::internal::CublasStatus(muon_cublas_error_, (context), #expr); \
    }                                                                            \
  } while (0)

#endif  // MUON_KERNELS_CUDA_CUDA_CHECK_H_
