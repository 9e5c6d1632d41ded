#include "ns_cuda.h"

#include <algorithm>
#include <array>
#include <limits>
#include <utility>
#include <vector>

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
  size_t pong, a, b, scalars, gram, total;  // byte offsets into the workspace
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
  l.gram = l.scalars + AlignUp(args.batch * l.r * sizeof(float));
  const bool gram = args.coeffs != nullptr && args.coeffs->gram;
  l.total = l.gram + (gram ? 4 * AlignUp(args.batch * l.r * l.r * bf16) : 0);
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

// One product of the half-Gram path: a GemmDesc plus the element offsets of
// its operands inside each batch member.
struct Block {
  GemmDesc desc;
  int64_t a = 0, b = 0, cd = 0;
};

GemmDesc Batched(int64_t batch, cublasOperation_t ta, cublasOperation_t tb,
                 int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                 int64_t stride_a, int64_t stride_b, int64_t stride_c) {
  GemmDesc d;
  d.trans_a = ta;
  d.trans_b = tb;
  d.m = m;
  d.n = n;
  d.k = k;
  d.lda = lda;
  d.ldb = ldb;
  d.ldc = ldc;
  d.stride_a = stride_a;
  d.stride_b = stride_b;
  d.stride_c = stride_c;
  d.batch = batch;
  return d;
}

// A[0:h, :] and A[h:r, h:r] of A = X·Xᵀ (A column-major r×r, ld r).
std::array<Block, 2> HalfGram(const Layout& l, int64_t batch) {
  const int64_t r = l.r, c = l.c, h = r / 2, rc = r * c, rr = r * r;
  if (l.rows_contiguous) {
    // X stored as P = Xᵀ (c×r, ld c); rows of X are columns of P.
    // Top: A operand P[:, 0:h] (c×h, ld c, transposed → h×c); B operand P
    //      (c×r, ld c); D = A[0:h, 0:r] (ld r).
    // Bottom: A and B operands P[:, h:r] (offset h·c, ld c); D = A[h:r, h:r]
    //      (offset h + h·r, ld r).
    return {Block{Batched(batch, CUBLAS_OP_T, CUBLAS_OP_N, h, r, c, c, c, r, rc, rc, rr), 0, 0,
                  0},
            Block{Batched(batch, CUBLAS_OP_T, CUBLAS_OP_N, h, h, c, c, c, r, rc, rc, rr),
                  h * c, h * c, h + h * r}};
  }
  // X stored as Q = X (r×c, ld r); rows of X are rows of Q.
  // Top: A operand Q[0:h, :] (h×c, ld r); B operand Q (r×c, ld r, transposed →
  //      c×r); D = A[0:h, 0:r] (ld r).
  // Bottom: A and B operands Q[h:r, :] (offset h, ld r); D = A[h:r, h:r].
  return {Block{Batched(batch, CUBLAS_OP_N, CUBLAS_OP_T, h, r, c, r, r, r, rc, rc, rr), 0, 0, 0},
          Block{Batched(batch, CUBLAS_OP_N, CUBLAS_OP_T, h, h, c, r, r, r, rc, rc, rr), h, h,
                h + h * r}};
}

// D = F·S (+ C) on the same three blocks, for symmetric F and S whose product
// is symmetric (B = c·A·A + b·A; Gram Newton–Schulz's polynomials of R),
// from their complete blocks only: F_top = F[0:h, :] (h×r, ld r) and
// S_right = S[:, h:r] (r×h, offset h·r, ld r), and the same of S and F.
//   D[0:h, 0:h] = F_top·S_topᵀ     (A operand F_top; B operand S_top transposed)
//   D[0:h, h:r] = F_top·S_right    (A operand F_top; B operand S_right)
//   D[h:r, h:r] = F_rightᵀ·S_right (A operand F_right transposed; B operand S_right)
// C and D at the block's offset, ld r.
std::array<Block, 3> HalfSquare(const Layout& l, int64_t batch) {
  const int64_t r = l.r, h = r / 2, rr = r * r;
  return {
      Block{Batched(batch, CUBLAS_OP_N, CUBLAS_OP_T, h, h, r, r, r, r, rr, rr, rr), 0, 0, 0},
      Block{Batched(batch, CUBLAS_OP_N, CUBLAS_OP_N, h, h, r, r, r, r, rr, rr, rr), 0, h * r,
            h * r},
      Block{Batched(batch, CUBLAS_OP_T, CUBLAS_OP_N, h, h, r, r, r, r, rr, rr, rr), h * r,
            h * r, h + h * r}};
}

// X' = a·X + B·X in two halves, B's bottom block row read as B_rightᵀ.
// Returned blocks: `a` offsets the first GEMM operand, `b` the second.
std::array<Block, 2> HalfUpdate(const Layout& l, int64_t batch) {
  const int64_t r = l.r, c = l.c, h = r / 2, rc = r * c, rr = r * r;
  if (l.rows_contiguous) {
    // P' = a·P + P·B (P = Xᵀ, c×r, ld c):
    //   P'[:, 0:h] = P·B_topᵀ: A operand P; B operand B_top (h×r, ld r,
    //                transposed → r×h); C/D columns 0:h of P (ld c).
    //   P'[:, h:r] = P·B_right: A operand P; B operand B_right (r×h, offset
    //                h·r, ld r); C/D columns h:r of P (offset h·c, ld c).
    return {Block{Batched(batch, CUBLAS_OP_N, CUBLAS_OP_T, c, h, r, c, r, c, rc, rr, rc), 0, 0,
                  0},
            Block{Batched(batch, CUBLAS_OP_N, CUBLAS_OP_N, c, h, r, c, r, c, rc, rr, rc), 0,
                  h * r, h * c}};
  }
  // Q' = a·Q + B·Q (Q = X, r×c, ld r):
  //   Q'[0:h, :] = B_top·Q: A operand B_top (h×r, ld r); B operand Q; C/D rows
  //                0:h of Q (ld r).
  //   Q'[h:r, :] = B_rightᵀ·Q: A operand B_right (r×h, offset h·r, ld r,
  //                transposed → h×r); B operand Q; C/D rows h:r (offset h).
  return {Block{Batched(batch, CUBLAS_OP_N, CUBLAS_OP_N, h, c, r, r, r, r, rr, rc, rc), 0, 0, 0},
          Block{Batched(batch, CUBLAS_OP_T, CUBLAS_OP_N, h, c, r, r, r, r, rr, rc, rc), h * r, 0,
                h}};
}

cudaDataType_t CudaType(NsType t) { return t == NsType::kF16 ? CUDA_R_16F : CUDA_R_16BF; }

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

    const cudaDataType_t type = CudaType(args.type);
    // D = alpha·op(first + off.a)·op(second + off.b) + beta·(c + off.cd) into d + off.cd.
    const auto run = [&](const Block& off, float alpha, const __nv_bfloat16* first,
                         const __nv_bfloat16* second, float beta, const __nv_bfloat16* c,
                         __nv_bfloat16* d) {
      GemmDesc desc = off.desc;
      desc.ab_type = desc.c_type = type;
      return gemm_->Run(desc, alpha, first + off.a, second + off.b, beta, c + off.cd, d + off.cd,
                        args.d_gemm_workspace, stream);
    };
    // X' = alpha·(B·X) + beta·X for an r×r B (symmetric) and the wide X.
    const auto update = [&](float alpha, const __nv_bfloat16* d_bm, float beta,
                            const __nv_bfloat16* d_in, __nv_bfloat16* d_out) {
      return l.rows_contiguous ? run({UpdateDesc(l, batch)}, alpha, d_in, d_bm, beta, d_in, d_out)
                               : run({UpdateDesc(l, batch)}, alpha, d_bm, d_in, beta, d_in, d_out);
    };
    const bool half = l.r >= args.symmetric_min_rank && l.r % 16 == 0;
    const Block gram_full{GramDesc(l, batch, CUDA_R_16BF)};
    const Block square{SquareDesc(l, batch)};
    // A = X·Xᵀ into d_out: its three complete blocks when `half`, else whole.
    const auto gram_of = [&](const __nv_bfloat16* d_in, __nv_bfloat16* d_out) -> absl::Status {
      if (!half) return run(gram_full, 1.0f, d_in, d_in, 0.0f, d_out, d_out);
      for (const Block& blk : HalfGram(l, batch)) {
        MUON_RETURN_IF_ERROR(run(blk, 1.0f, d_in, d_in, 0.0f, d_out, d_out));
      }
      return absl::OkStatus();
    };
    // D = alpha·F·S + beta·C for symmetric, commuting r×r F, S, C (polynomials
    // of one Gram matrix, so F·S is symmetric too): three blocks when `half`.
    const auto sym = [&](float alpha, const __nv_bfloat16* d_f, const __nv_bfloat16* d_s,
                         float beta, const __nv_bfloat16* d_c,
                         __nv_bfloat16* d_d) -> absl::Status {
      if (!half) return run(square, alpha, d_f, d_s, beta, d_c, d_d);
      for (const Block& blk : HalfSquare(l, batch)) {
        MUON_RETURN_IF_ERROR(run(blk, alpha, d_f, d_s, beta, d_c, d_d));
      }
      return absl::OkStatus();
    };
    // X' = alpha·(B·X) + beta·X for a symmetric r×r B: two halves when `half`.
    const auto apply = [&](float alpha, const __nv_bfloat16* d_bm, float beta,
                           const __nv_bfloat16* d_in, __nv_bfloat16* d_out) -> absl::Status {
      if (!half) return update(alpha, d_bm, beta, d_in, d_out);
      for (const Block& blk : HalfUpdate(l, batch)) {
        MUON_RETURN_IF_ERROR(l.rows_contiguous
                                 ? run(blk, alpha, d_in, d_bm, beta, d_in, d_out)
                                 : run(blk, alpha, d_bm, d_in, beta, d_in, d_out));
      }
      return absl::OkStatus();
    };

    // Segments of the Gram iteration: the steps after which X is formed.
    std::vector<int> ends;
    if (co.gram) {
      for (int k : co.gram_restarts) {
        if (k > 0 && k < steps) ends.push_back(k);
      }
      std::sort(ends.begin(), ends.end());
      ends.erase(std::unique(ends.begin(), ends.end()), ends.end());
      ends.push_back(steps);
    }
    // Each step (each segment, for Gram) moves X to the other buffer; start
    // where the last one then lands in d_x.
    const int moves = co.gram ? static_cast<int>(ends.size()) : steps;
    __nv_bfloat16* d_cur = moves % 2 == 0 ? d_x : d_pong;
    __nv_bfloat16* d_next = moves % 2 == 0 ? d_pong : d_x;

    RETURN_IF_CUDA_ERROR(cudaMemsetAsync(d_scalars, 0, batch * sizeof(float), stream), context);
    RETURN_IF_CUDA_ERROR(LaunchSumSquares({d_x, batch, n, d_scalars}, stream), context);
    NormalizeParams np;
    np.d_x = d_x;
    np.d_y = d_cur;
    np.y_type = args.type;
    np.batch = batch;
    np.n = n;
    np.d_sumsq = d_scalars;
    np.safety = co.aol ? 1.0f : static_cast<float>(co.norm_safety);
    np.eps = static_cast<float>(co.eps);
    RETURN_IF_CUDA_ERROR(LaunchNormalize(np, stream), context);
    bool gram_ready = false;
    if (co.aol) {
      MUON_RETURN_IF_ERROR(gram_of(d_cur, d_a));
      AolParams p;
      p.type = args.type;
      p.d_x = d_cur;
      p.d_y = d_cur;
      p.d_a = d_a;
      p.batch = batch;
      p.r = l.r;
      p.c = l.c;
      p.x_rows_contiguous = l.rows_contiguous;
      p.upper_rows = half ? l.r / 2 : 0;
      p.d_scale = d_scalars;
      RETURN_IF_CUDA_ERROR(LaunchAol(p, stream), context);
      gram_ready = true;
    }
    if (co.gram) {
      const size_t rr_bytes = AlignUp(batch * l.r * l.r * sizeof(__nv_bfloat16));
      __nv_bfloat16* d_r = d_a;
      __nv_bfloat16* d_z = d_b;
      __nv_bfloat16* d_r2 = reinterpret_cast<__nv_bfloat16*>(base + l.gram);
      __nv_bfloat16* d_w = reinterpret_cast<__nv_bfloat16*>(base + l.gram + rr_bytes);
      __nv_bfloat16* d_p = reinterpret_cast<__nv_bfloat16*>(base + l.gram + 2 * rr_bytes);
      __nv_bfloat16* d_p2 = reinterpret_cast<__nv_bfloat16*>(base + l.gram + 3 * rr_bytes);
      int first_step = 0;
      for (int end : ends) {
        if (!gram_ready) MUON_RETURN_IF_ERROR(gram_of(d_cur, d_r));
        gram_ready = false;
        for (int j = first_step; j < end; ++j) {
          const auto& [ca, cb, cc] = co.steps[j];
          const float a = static_cast<float>(ca);
          MUON_RETURN_IF_ERROR(sym(static_cast<float>(cc), d_r, d_r, static_cast<float>(cb), d_r,
                                   d_z));
          if (j == first_step) {
            // Whole-matrix copy: with `half`, Z's unwritten block is copied
            // along and, like Z's, never read.
            RETURN_IF_CUDA_ERROR(LaunchAddIdentity({args.type, d_z, d_p, batch, l.r, a}, stream),
                                 context);
          } else {
            MUON_RETURN_IF_ERROR(sym(1.0f, d_p, d_z, a, d_p, d_p2));
            std::swap(d_p, d_p2);
          }
          if (j + 1 < end) {
            MUON_RETURN_IF_ERROR(sym(1.0f, d_z, d_z, 2 * a, d_z, d_w));
            MUON_RETURN_IF_ERROR(sym(1.0f, d_w, d_r, a * a, d_r, d_r2));
            std::swap(d_r, d_r2);
          }
        }
        MUON_RETURN_IF_ERROR(apply(1.0f, d_p, 0.0f, d_cur, d_next));
        std::swap(d_cur, d_next);
        first_step = end;
      }
    }
    for (int step = 0; !co.gram && step < steps; ++step) {
      const auto& [ca, cb, cc] = co.steps[step];
      const float a = static_cast<float>(ca), b = static_cast<float>(cb),
                  c = static_cast<float>(cc);
      if (!gram_ready) MUON_RETURN_IF_ERROR(gram_of(d_cur, d_a));
      MUON_RETURN_IF_ERROR(sym(c, d_a, d_a, b, d_a, d_b));
      MUON_RETURN_IF_ERROR(apply(1.0f, d_b, a, d_cur, d_next));
      gram_ready = false;
      std::swap(d_cur, d_next);
    }
    if (args.d_error != nullptr) {
      // O·Oᵀ in fp32 (the error is a difference from I: bf16 would round it
      // away), in the A and B buffers, which together hold batch·r² floats.
      auto* d_gram = reinterpret_cast<float*>(d_a);
      GemmDesc desc = GramDesc(l, batch, CUDA_R_32F);
      desc.ab_type = type;
      MUON_RETURN_IF_ERROR(gemm_->Run(desc, 1.0f, d_x, d_x, 0.0f, d_gram, d_gram,
                                      args.d_gemm_workspace, stream));
      RETURN_IF_CUDA_ERROR(LaunchOrthoError({d_gram, batch, l.r, args.d_error + first}, stream),
                           context);
    }
  }
  return absl::OkStatus();
}

}  // namespace muon::internal
