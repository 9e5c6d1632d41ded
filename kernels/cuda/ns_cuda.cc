#include "ns_cuda.h"

#include <algorithm>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cuda_check.h"
#include "device_kernels.h"
#include "muon/kernels/status_macros.h"

namespace muon::internal {
namespace {

constexpr size_t kAlign = 256;
size_t AlignUp(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

struct Layout {
  int64_t r, c;
  bool rows_contiguous;  // the wide matrix is stored with ld c (rows ≤ cols)
  size_t pong, a, b, scalars, total;  // byte offsets into the workspace
};

Layout LayoutOf(const NsArgs& args) {
  Layout l;
  l.r = std::min(args.rows, args.cols);
  l.c = std::max(args.rows, args.cols);
  l.rows_contiguous = args.rows <= args.cols;
  const size_t bf16 = sizeof(__nv_bfloat16);
  l.pong = 0;
  l.a = l.pong + AlignUp(args.batch * l.r * l.c * bf16);
  l.b = l.a + AlignUp(args.batch * l.r * l.r * bf16);
  l.scalars = l.b + AlignUp(args.batch * l.r * l.r * bf16);
  l.total = l.scalars + AlignUp(args.batch * l.r * sizeof(float));
  return l;
}

// A = X·Xᵀ for the wide X (r×c) of every batch member, in `c_type`.
GemmDesc GramDesc(const Layout& l, int64_t batch, cudaDataType_t c_type) {
  GemmDesc d;
  if (l.rows_contiguous) {
    // X stored column-major as P = Xᵀ (c×r, ld c): A = Pᵀ·P.
    // A operand: P, stored c×r, ld c, transposed → r×c.
    // B operand: P, stored c×r, ld c.
    // D: A, r×r, ld r.
    d.trans_a = CUBLAS_OP_T;
    d.trans_b = CUBLAS_OP_N;
    d.lda = d.ldb = l.c;
  } else {
    // X stored column-major as Q = X (r×c, ld r): A = Q·Qᵀ.
    // A operand: Q, stored r×c, ld r.
    // B operand: Q, stored r×c, ld r, transposed → c×r.
    // D: A, r×r, ld r.
    d.trans_a = CUBLAS_OP_N;
    d.trans_b = CUBLAS_OP_T;
    d.lda = d.ldb = l.r;
  }
  d.m = d.n = l.r;
  d.k = l.c;
  d.ldc = l.r;
  d.stride_a = d.stride_b = l.r * l.c;
  d.stride_c = l.r * l.r;
  d.batch = batch;
  d.c_type = c_type;
  return d;
}

// B = c·A·A + b·A: A operand A (r×r, ld r), B operand A (r×r, ld r), C = A and
// D = B (r×r, ld r). A is symmetric, so no transpose question arises.
GemmDesc SquareDesc(const Layout& l, int64_t batch) {
  GemmDesc d;
  d.m = d.n = d.k = l.r;
  d.lda = d.ldb = d.ldc = l.r;
  d.stride_a = d.stride_b = d.stride_c = l.r * l.r;
  d.batch = batch;
  return d;
}

// X' = a·X + B·X.
GemmDesc UpdateDesc(const Layout& l, int64_t batch) {
  GemmDesc d;
  if (l.rows_contiguous) {
    // P' = a·P + P·B (P = Xᵀ, B symmetric):
    // A operand: P, stored c×r, ld c. B operand: B, r×r, ld r.
    // C = P, D = P', c×r, ld c.
    d.m = l.c;
    d.n = l.r;
    d.lda = l.c;
    d.ldb = l.r;
    d.ldc = l.c;
    d.stride_a = l.r * l.c;
    d.stride_b = l.r * l.r;
  } else {
    // Q' = a·Q + B·Q:
    // A operand: B, r×r, ld r. B operand: Q, stored r×c, ld r.
    // C = Q, D = Q', r×c, ld r.
    d.m = l.r;
    d.n = l.c;
    d.lda = l.r;
    d.ldb = l.r;
    d.ldc = l.r;
    d.stride_a = l.r * l.r;
    d.stride_b = l.r * l.c;
  }
  d.k = l.r;
  d.stride_c = l.r * l.c;
  d.batch = batch;
  return d;
}

// Grids put the batch in blockIdx.y, which CUDA bounds by 65535.
constexpr int64_t kMaxChunk = 65535;

}  // namespace

absl::Status BatchedNewtonSchulz::CanImplement(const NsArgs& args) {
  if (args.coeffs == nullptr) return absl::InvalidArgumentError("no Newton-Schulz coefficients");
  if (args.coeffs->kind == ScheduleKind::kSvd) {
    return absl::UnimplementedError(
        "the svd schedule (exact polar factor) is not implemented on the CUDA engine; use the "
        "CPU engine or a Newton-Schulz schedule");
  }
  if (args.coeffs->steps.empty()) return absl::InvalidArgumentError("schedule has no steps");
  if (args.batch < 1 || args.rows < 1 || args.cols < 1) {
    return absl::InvalidArgumentError("cannot orthogonalize an empty matrix");
  }
  constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();
  if (args.rows > kMaxDim || args.cols > kMaxDim) {
    return absl::InvalidArgumentError(
        absl::StrCat("matrix ", args.rows, "x", args.cols, " exceeds cuBLAS's int32 dimensions"));
  }
  if (args.d_x == nullptr || args.d_gemm_workspace == nullptr) {
    return absl::InvalidArgumentError("Newton-Schulz needs device buffers");
  }
  return absl::OkStatus();
}

size_t BatchedNewtonSchulz::WorkspaceBytes(const NsArgs& args) {
  NsArgs chunk = args;
  chunk.batch = std::min(args.batch, kMaxChunk);
  return LayoutOf(chunk).total;
}

absl::Status BatchedNewtonSchulz::Run(const NsArgs& args, void* d_workspace, cudaStream_t stream) {
  MUON_RETURN_IF_ERROR(CanImplement(args));
  const NsCoefficients& co = *args.coeffs;
  const int steps = static_cast<int>(co.steps.size());
  for (int64_t first = 0; first < args.batch; first += kMaxChunk) {
    const int64_t batch = std::min(kMaxChunk, args.batch - first);
    NsArgs chunk = args;
    chunk.batch = batch;
    const Layout l = LayoutOf(chunk);
    auto* base = static_cast<char*>(d_workspace);
    __nv_bfloat16* d_x = args.d_x + first * l.r * l.c;
    auto* d_pong = reinterpret_cast<__nv_bfloat16*>(base + l.pong);
    auto* d_a = reinterpret_cast<__nv_bfloat16*>(base + l.a);
    auto* d_b = reinterpret_cast<__nv_bfloat16*>(base + l.b);
    auto* d_scalars = reinterpret_cast<float*>(base + l.scalars);
    const int64_t n = l.r * l.c;
    const std::string context =
        absl::StrCat("Newton-Schulz on ", batch, " matrices ", args.rows, "x", args.cols);

    // Each step moves X to the other buffer; start where the last step then
    // lands in d_x.
    __nv_bfloat16* d_cur = steps % 2 == 0 ? d_x : d_pong;
    __nv_bfloat16* d_next = steps % 2 == 0 ? d_pong : d_x;
    bool gram_ready = false;
    if (co.aol) {
      MUON_RETURN_IF_ERROR(gemm_->Run(GramDesc(l, batch, CUDA_R_16BF), 1.0f, d_x, d_x, 0.0f, d_a,
                                      d_a, args.d_gemm_workspace, stream));
      AolParams p;
      p.d_x = d_x;
      p.d_y = d_cur;
      p.d_a = d_a;
      p.batch = batch;
      p.r = l.r;
      p.c = l.c;
      p.x_rows_contiguous = l.rows_contiguous;
      p.d_scale = d_scalars;
      RETURN_IF_CUDA_ERROR(LaunchAol(p, stream), context);
      gram_ready = true;
    } else {
      RETURN_IF_CUDA_ERROR(cudaMemsetAsync(d_scalars, 0, batch * sizeof(float), stream), context);
      RETURN_IF_CUDA_ERROR(LaunchSumSquares({d_x, batch, n, d_scalars}, stream), context);
      RETURN_IF_CUDA_ERROR(LaunchNormalize({d_x, d_cur, batch, n, d_scalars,
                                            static_cast<float>(co.norm_safety)},
                                           stream),
                           context);
    }
    const GemmDesc gram = GramDesc(l, batch, CUDA_R_16BF);
    const GemmDesc square = SquareDesc(l, batch);
    const GemmDesc update = UpdateDesc(l, batch);
    for (const auto& [ca, cb, cc] : co.steps) {
      if (!gram_ready) {
        MUON_RETURN_IF_ERROR(gemm_->Run(gram, 1.0f, d_cur, d_cur, 0.0f, d_a, d_a,
                                        args.d_gemm_workspace, stream));
      }
      gram_ready = false;
      MUON_RETURN_IF_ERROR(gemm_->Run(square, static_cast<float>(cc), d_a, d_a,
                                      static_cast<float>(cb), d_a, d_b, args.d_gemm_workspace,
                                      stream));
      if (l.rows_contiguous) {
        MUON_RETURN_IF_ERROR(gemm_->Run(update, 1.0f, d_cur, d_b, static_cast<float>(ca), d_cur,
                                        d_next, args.d_gemm_workspace, stream));
      } else {
        MUON_RETURN_IF_ERROR(gemm_->Run(update, 1.0f, d_b, d_cur, static_cast<float>(ca), d_cur,
                                        d_next, args.d_gemm_workspace, stream));
      }
      std::swap(d_cur, d_next);
    }
    if (args.d_error != nullptr) {
      // O·Oᵀ in fp32 (the error is a difference from I: bf16 would round it
      // away), in the A and B buffers, which together hold batch·r² floats.
      auto* d_gram = reinterpret_cast<float*>(d_a);
      MUON_RETURN_IF_ERROR(gemm_->Run(GramDesc(l, batch, CUDA_R_32F), 1.0f, d_x, d_x, 0.0f,
                                      d_gram, d_gram, args.d_gemm_workspace, stream));
      RETURN_IF_CUDA_ERROR(LaunchOrthoError({d_gram, batch, l.r, args.d_error + first}, stream),
                           context);
    }
  }
  return absl::OkStatus();
}

}  // namespace muon::internal
