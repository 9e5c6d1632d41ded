#ifndef MUON_KERNELS_CUDA_NS_CUDA_H_
#define MUON_KERNELS_CUDA_NS_CUDA_H_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "device_kernels.h"
#include "lt_gemm.h"
#include "muon/kernels/ns_schedule.h"

namespace muon::internal {

// One batched Newton–Schulz run over `batch` row-major rows×cols matrices
// stored back to back in d_x: in, M as bf16; out, O ≈ U·Vᵀ as `type`
// elements (2 bytes each either way), same layout.
struct NsArgs {
  const NsCoefficients* coeffs = nullptr;
  int64_t batch = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  __nv_bfloat16* d_x = nullptr;
  // The products' operand type. fp16 by default: X, A and B are bounded by
  // the normalization (‖X‖₂ ≤ 1, |A_ij| ≤ 1, |B_ij| ≤ |b| + |c|), so fp16's
  // 3 more mantissa bits cost no range, and its products run at bf16's rate
  // (docs/numerics.md measures both).
  NsType type = NsType::kF16;
  // When not null: d_error[b] += Σ(O·Oᵀ − I)² of matrix b on its wide
  // orientation (the caller zeroes it; error = sqrt(d_error[b] / r)).
  double* d_error = nullptr;
  // LtGemm::kWorkspaceBytes that no concurrent product uses.
  void* d_gemm_workspace = nullptr;
  // Matrices with r = min(rows, cols) ≥ this (and r % 16 == 0) use the
  // half-Gram products: only 3 of the 4 r/2 blocks of the symmetric X·Xᵀ and
  // A·A (Gram Newton–Schulz: of every r×r product) are computed (¾ of their
  // flops). Measured in bench/gpu; see
  // docs/performance.md for the choice of the default.
  int64_t symmetric_min_rank = kDefaultSymmetricMinRank;

  static constexpr int64_t kDefaultSymmetricMinRank = 1024;
};

// Orthogonalizes a batch of same-shape matrices on one stream: fp16 (or
// bf16, NsArgs::type) operands, fp32 accumulation, strided-batched cuBLASLt
// products.
//
// The matrices are never transposed: a row-major m×n matrix is, to cuBLAS,
// the column-major n×m matrix Mᵀ, so the wide orientation X (r×c, r ≤ c) is
// either stored with ld c (m ≤ n) or with ld r (m > n), and only the GEMMs'
// transpose flags differ. Each step is three products:
//   A = X·Xᵀ (r×r),  B = c·A·A + b·A (C ≠ D: no copy of A),  X' = a·X + B·X.
// The buffers ping-pong between d_x and the workspace, starting so that the
// last step writes d_x.
//
// Normalization: M's Frobenius norm (bf16 in, fp32 sums), X = M/(safety·‖M‖ + eps)
// in `type`; AOL then scales X's rows in place (AOL is invariant to a
// scale of M, and the normalized X cannot overflow fp16).
//
// Gram Newton–Schulz (coeffs->gram; ns_schedule.h): per segment R = X·Xᵀ,
// then per step Z = c·R·R + b·R, P = Z + a·I (first step) or
// P' = a·P + P·Z, and, before another step of the segment, W = Z·Z + 2a·Z,
// R' = a²·R + W·R; X' = P·X at the segment's end. All r×r; only R = X·Xᵀ and
// X' = P·X touch the long dimension. Every r×r matrix is a polynomial of R,
// hence symmetric, and they commute, so each product is symmetric as well:
// with the half-Gram products below, every one computes 3 of 4 blocks.
//
// Half-Gram variant (large r): with h = r/2, A = X·Xᵀ is computed as its top
// block row A[0:h, :] and A[h:r, h:r]; A21 stays unwritten and is never read.
// B = c·A·A + b·A is computed the same way from A's complete blocks
// (A[h:r, :] = A[:, h:r]ᵀ by symmetry), and X' = a·X + B·X as two half
// products, B's bottom block row again read as the transpose of its right
// block column.
//
// Thread-compatible: Run uses `gemm`, which callers serialize.
class BatchedNewtonSchulz {
 public:
  explicit BatchedNewtonSchulz(LtGemm* gemm) : gemm_(gemm) {}

  // InvalidArgument for empty or oversized shapes; Unimplemented for kSvd
  // (the exact polar factor is CPU-only).
  static absl::Status CanImplement(const NsArgs& args);
  // Device workspace Run needs: a second X, A and B, per-row scalars, and
  // four more r×r matrices per matrix for Gram Newton–Schulz.
  static size_t WorkspaceBytes(const NsArgs& args);
  // REQUIRES: CanImplement(args).ok(); d_workspace 256-byte aligned with
  // WorkspaceBytes(args) bytes.
  absl::Status Run(const NsArgs& args, void* d_workspace, cudaStream_t stream);

 private:
  LtGemm* gemm_;
};

}  // namespace muon::internal

#endif  // MUON_KERNELS_CUDA_NS_CUDA_H_
