#ifndef MUON_KERNELS_CUDA_LT_GEMM_H_
#define MUON_KERNELS_CUDA_LT_GEMM_H_

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace muon::internal {

// One strided-batched product in cuBLAS's column-major terms:
//   D_b = alpha·op(A_b)·op(B_b) + beta·C_b,  b < batch,
// op(A) m×k, op(B) k×n, C and D m×n with leading dimension ldc (C and D may
// be different buffers of the same layout). A and B are bf16 or fp16
// (ab_type); C and D are ab_type or fp32 (c_type); accumulation is fp32.
struct GemmDesc {
  cublasOperation_t trans_a = CUBLAS_OP_N;
  cublasOperation_t trans_b = CUBLAS_OP_N;
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldc = 0;
  int64_t stride_a = 0, stride_b = 0, stride_c = 0;  // elements between batch members
  int64_t batch = 1;
  cudaDataType_t ab_type = CUDA_R_16BF;
  cudaDataType_t c_type = CUDA_R_16BF;

  auto Key() const {
    return std::tuple(trans_a, trans_b, m, n, k, lda, ldb, ldc, stride_a, stride_b, stride_c,
                      batch, ab_type, c_type);
  }
};

// cuBLASLt matmuls with their descriptors and the heuristic's algorithm cached
// per GemmDesc, so a repeated shape costs one cublasLtMatmul call.
// Not thread-safe: callers serialize (the engine runs under its compute lock).
class LtGemm {
 public:
  // Recommended cuBLASLt workspace on Hopper (cuBLAS docs): some of the
  // fastest algorithms need it. One per stream that runs products concurrently.
  static constexpr size_t kWorkspaceBytes = size_t{32} << 20;

  static absl::StatusOr<std::unique_ptr<LtGemm>> Create();
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // Enqueues one product on `stream`. d_workspace: kWorkspaceBytes of device
  // memory no other concurrent product uses.
  absl::Status Run(const GemmDesc& desc, float alpha, const void* d_a, const void* d_b, float beta,
                   const void* d_c, void* d_d, void* d_workspace, cudaStream_t stream);

 private:
  struct Plan;
  explicit LtGemm(cublasLtHandle_t handle);
  absl::StatusOr<const Plan*> PlanFor(const GemmDesc& desc);

  cublasLtHandle_t handle_;
  std::map<decltype(GemmDesc{}.Key()), std::unique_ptr<Plan>> plans_;
};

}  // namespace muon::internal

#endif  // MUON_KERNELS_CUDA_LT_GEMM_H_
