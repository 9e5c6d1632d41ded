#include "lt_gemm.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "cuda_check.h"
#include "muon/kernels/status_macros.h"

namespace muon::internal {

struct LtGemm::Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};

  ~Plan() {
    if (a != nullptr) cublasLtMatrixLayoutDestroy(a);
    if (b != nullptr) cublasLtMatrixLayoutDestroy(b);
    if (c != nullptr) cublasLtMatrixLayoutDestroy(c);
    if (op != nullptr) cublasLtMatmulDescDestroy(op);
  }
};

namespace {

// Layout of a stored (not transposed) column-major rows×cols batch member.
absl::Status MakeLayout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld,
                        int64_t stride, int64_t batch, cublasLtMatrixLayout_t* layout) {
  RETURN_IF_CUBLAS_ERROR(cublasLtMatrixLayoutCreate(layout, type, rows, cols, ld),
                         "GEMM layout");
  const int32_t count = static_cast<int32_t>(batch);
  RETURN_IF_CUBLAS_ERROR(cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                                                          &count, sizeof(count)),
                         "GEMM layout");
  RETURN_IF_CUBLAS_ERROR(
      cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                       &stride, sizeof(stride)),
      "GEMM layout");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<LtGemm>> LtGemm::Create() {
  cublasLtHandle_t handle = nullptr;
  RETURN_IF_CUBLAS_ERROR(cublasLtCreate(&handle), "creating the cuBLASLt handle");
  return std::unique_ptr<LtGemm>(new LtGemm(handle));
}

LtGemm::LtGemm(cublasLtHandle_t handle) : handle_(handle) {}

LtGemm::~LtGemm() {
  plans_.clear();
  cublasLtDestroy(handle_);
}

absl::StatusOr<const LtGemm::Plan*> LtGemm::PlanFor(const GemmDesc& d) {
  auto it = plans_.find(d.Key());
  if (it != plans_.end()) return it->second.get();
  const std::string context =
      absl::StrCat("GEMM plan m=", d.m, " n=", d.n, " k=", d.k, " batch=", d.batch);
  auto plan = std::make_unique<Plan>();
  RETURN_IF_CUBLAS_ERROR(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F),
                         context);
  RETURN_IF_CUBLAS_ERROR(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA,
                                                        &d.trans_a, sizeof(d.trans_a)),
                         context);
  RETURN_IF_CUBLAS_ERROR(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB,
                                                        &d.trans_b, sizeof(d.trans_b)),
                         context);
  // Stored shapes: A is m×k (k×m when transposed), B is k×n (n×k when transposed).
  const bool ta = d.trans_a != CUBLAS_OP_N, tb = d.trans_b != CUBLAS_OP_N;
  MUON_RETURN_IF_ERROR(MakeLayout(d.ab_type, ta ? d.k : d.m, ta ? d.m : d.k, d.lda,
                                      d.stride_a, d.batch, &plan->a));
  MUON_RETURN_IF_ERROR(MakeLayout(d.ab_type, tb ? d.n : d.k, tb ? d.k : d.n, d.ldb,
                                      d.stride_b, d.batch, &plan->b));
  MUON_RETURN_IF_ERROR(MakeLayout(d.c_type, d.m, d.n, d.ldc, d.stride_c, d.batch, &plan->c));

  cublasLtMatmulPreference_t pref = nullptr;
  RETURN_IF_CUBLAS_ERROR(cublasLtMatmulPreferenceCreate(&pref), context);
  const size_t ws = kWorkspaceBytes;
  cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  if (st == CUBLAS_STATUS_SUCCESS) {
    st = cublasLtMatmulAlgoGetHeuristic(handle_, plan->op, plan->a, plan->b, plan->c, plan->c,
                                        pref, 1, &result, &found);
  }
  cublasLtMatmulPreferenceDestroy(pref);
  RETURN_IF_CUBLAS_ERROR(st, context);
  if (found == 0) {
    return absl::UnimplementedError(absl::StrCat(context, ": cuBLASLt has no algorithm"));
  }
  plan->algo = result.algo;
  const Plan* raw = plan.get();
  plans_.emplace(d.Key(), std::move(plan));
  return raw;
}

absl::Status LtGemm::Run(const GemmDesc& desc, float alpha, const void* d_a, const void* d_b,
                         float beta, const void* d_c, void* d_d, void* d_workspace,
                         cudaStream_t stream) {
  auto plan = PlanFor(desc);
  if (!plan.ok()) return plan.status();
  const Plan& p = **plan;
  RETURN_IF_CUBLAS_ERROR(cublasLtMatmul(handle_, p.op, &alpha, d_a, p.a, d_b, p.b, &beta, d_c,
                                        p.c, d_d, p.c, &p.algo, d_workspace, kWorkspaceBytes,
                                        stream),
                         absl::StrCat("GEMM m=", desc.m, " n=", desc.n, " k=", desc.k,
                                      " batch=", desc.batch));
  return absl::OkStatus();
}

}  // namespace muon::internal
