#ifndef MUON_KERNELS_CUDA_NS_CUDA_H_
#define MUON_KERNELS_CUDA_NS_CUDA_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "lt_gemm.h"
#include "muon/kernels/ns_schedule.h"

namespace muon::internal {

// One batched Newton–Schulz run over `batch` row-major rows×cols bf16
// matrices stored back to back in d_x (in: M, out: O ≈ U·Vᵀ, same layout).
struct NsArgs {
  const NsCoefficients* coeffs = nullptr;
  int64_t batch = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  __nv_bfloat16* d_x = nullptr;
  // When not null: d_error[b] += Σ(O·Oᵀ − I)² of matrix b on its wide
  // orientation (the caller zeroes it; error = sqrt(d_error[b] / r)).
  double* d_error = nullptr;
  // LtGemm::kWorkspaceBytes that no concurrent product uses.
  void* d_gemm_workspace = nullptr;
};

// Orthogonalizes a batch of same-shape matrices on one stream: bf16
// operands, fp32 accumulation, strided-batched cuBLASLt products.
//
// The matrices are never transposed: a row-major m×n matrix is, to cuBLAS,
// the column-major n×m matrix Mᵀ, so the wide orientation X (r×c, r ≤ c) is
// either stored with ld c (m ≤ n) or with ld r (m > n), and only the GEMMs'
// transpose flags differ. Each step is three products:
//   A = X·Xᵀ (r×r),  B = c·A·A + b·A (C ≠ D: no copy of A),  X' = a·X + B·X.
// The buffers ping-pong between d_x and the workspace, starting so that the
// last step writes d_x.
//
// Thread-compatible: Run uses `gemm`, which callers serialize.
class BatchedNewtonSchulz {
 public:
  explicit BatchedNewtonSchulz(LtGemm* gemm) : gemm_(gemm) {}

  // InvalidArgument for empty or oversized shapes; Unimplemented for kSvd
  // (the exact polar factor is CPU-only).
  static absl::Status CanImplement(const NsArgs& args);
  // Device workspace Run needs: a second X, A and B, and per-row scalars.
  static size_t WorkspaceBytes(const NsArgs& args);
  // REQUIRES: CanImplement(args).ok(); d_workspace 256-byte aligned with
  // WorkspaceBytes(args) bytes.
  absl::Status Run(const NsArgs& args, void* d_workspace, cudaStream_t stream);

 private:
  LtGemm* gemm_;
};

}  // namespace muon::internal

#endif  // MUON_KERNELS_CUDA_NS_CUDA_H_
