#include "muon/kernels/cpu_ns.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"

namespace muon {
namespace {

// The wide r×c X (r ≤ c) of a row-major rows×cols matrix, read in place: a
// wide matrix is row-major X (ld c); a tall one is Xᵀ row-major, that is X
// column-major (ld r). BLAS reads either through its layout argument, so no
// matrix is transposed into a copy and back. The r×r work matrices stay
// row-major whatever X's layout, so their products are the same calls for
// both orientations.
struct WideX {
  CBLAS_ORDER order;
  int ld;
  // BLAS transpose of a row-major r×r operand under `order`.
  CBLAS_TRANSPOSE square() const { return order == CblasRowMajor ? CblasNoTrans : CblasTrans; }
  // syrk's triangle under `order` that fills the row-major upper one.
  CBLAS_UPLO upper() const { return order == CblasRowMajor ? CblasUpper : CblasLower; }
  // Row i of X: its start and the stride between its elements.
  int64_t row(int i) const { return order == CblasRowMajor ? static_cast<int64_t>(i) * ld : i; }
  int row_stride() const { return order == CblasRowMajor ? 1 : ld; }
};

WideX WideOf(int64_t rows, int64_t cols) {
  return rows <= cols ? WideX{CblasRowMajor, static_cast<int>(cols)}
                      : WideX{CblasColMajor, static_cast<int>(cols)};
}

// A = X·Xᵀ for X (r×c, laid out as `w` says) into row-major A (r×r, ld r), both triangles.
void Gram(const WideX& w, const float* x, int r, int c, float* a) {
  cblas_ssyrk(w.order, w.upper(), CblasNoTrans, r, c, 1.0f, x, w.ld, 0.0f, a, r);
  for (int i = 0; i < r; ++i) {
    for (int j = 0; j < i; ++j) a[i * r + j] = a[j * r + i];
  }
}

// Normalizes the wide r×c x in place for the first step: AOL row scaling
// (leaving the scaled Gram matrix in a, r×r; returns true) or division by
// norm_safety·‖x‖_F + eps (returns false).
bool Normalize(const NsCoefficients& coeffs, const WideX& w, int r, int c, float* x, float* a) {
  const int64_t rc = static_cast<int64_t>(r) * c;
  if (!coeffs.aol) {
    const double norm = cblas_snrm2(static_cast<int>(rc), x, 1);
    cblas_sscal(static_cast<int>(rc), static_cast<float>(1.0 / (coeffs.norm_safety * norm + coeffs.eps)),
                x, 1);
    return false;
  }
  // AOL: scale row i by d_i = 1/sqrt(Σ_j |A_ij|); the scaled Gram matrix
  // diag(d)·A·diag(d) is the first iteration's A.
  Gram(w, x, r, c, a);
  std::vector<float> d(r);
  for (int i = 0; i < r; ++i) {
    double sum = 0;
    for (int j = 0; j < r; ++j) sum += std::fabs(a[i * r + j]);
    d[i] = static_cast<float>(1.0 / std::sqrt(std::max(sum, 1e-7)));
  }
  for (int i = 0; i < r; ++i) {
    cblas_sscal(c, d[i], x + w.row(i), w.row_stride());
    for (int j = 0; j < r; ++j) a[i * r + j] *= d[i] * d[j];
  }
  return true;
}

// Newton–Schulz on one wide r×c matrix in place. Work buffers: a, b (r×r), y (r×c).
void NewtonSchulzWide(const NsCoefficients& coeffs, const WideX& w, int r, int c, float* x,
                      float* a, float* b, float* y) {
  const int64_t rc = static_cast<int64_t>(r) * c;
  bool gram_ready = Normalize(coeffs, w, r, c, x, a);
  for (const auto& [ca, cb, cc] : coeffs.steps) {
    if (!gram_ready) Gram(w, x, r, c, a);
    gram_ready = false;
    // B = cb·A + cc·A·A (A symmetric, r×r, ld r).
    std::copy(a, a + static_cast<int64_t>(r) * r, b);
    cblas_ssymm(CblasRowMajor, CblasLeft, CblasUpper, r, r, static_cast<float>(cc), a, r, a, r,
                static_cast<float>(cb), b, r);
    // Y = ca·X + B·X: B r×r (ld r), X and Y r×c in X's layout.
    std::copy(x, x + rc, y);
    cblas_sgemm(w.order, w.square(), CblasNoTrans, r, c, r, 1.0f, b, r, x, w.ld,
                static_cast<float>(ca), y, w.ld);
    std::copy(y, y + rc, x);
  }
}

// D = alpha·A·B + beta·C for r×r row-major matrices (D may not alias A or B).
void Square(int r, float alpha, const float* a, const float* b, float beta, const float* c,
            float* d) {
  const int64_t rr = static_cast<int64_t>(r) * r;
  if (c != d) std::copy(c, c + rr, d);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r, r, r, alpha, a, r, b, r, beta, d, r);
}

// Gram Newton–Schulz (NsCoefficients::gram) on one wide r×c matrix in
// place. Per step, with R the current Gram matrix:
//   Z = b·R + c·R²            (so Q = a·I + Z)
//   P = a·I + Z on a segment's first step, else P ← a·P + P·Z  (P·Q)
//   R ← a²·R + (Z² + 2a·Z)·R  (Q²·R) on all but a segment's last step
// and X ← P·X at the end of each segment. Work: six r×r buffers in g, y (r×c).
void GramNewtonSchulzWide(const NsCoefficients& coeffs, const WideX& wx, int r, int c, float* x,
                          std::vector<float>* g, float* y) {
  const int64_t rr = static_cast<int64_t>(r) * r, rc = static_cast<int64_t>(r) * c;
  float* rm = g[0].data();
  float* rn = g[1].data();
  float* z = g[2].data();
  float* w = g[3].data();
  float* pm = g[4].data();
  float* pn = g[5].data();
  bool gram_ready = Normalize(coeffs, wx, r, c, x, rm);
  const int steps = static_cast<int>(coeffs.steps.size());
  for (int first = 0; first < steps;) {
    int end = steps;
    for (int k : coeffs.gram_restarts) {
      if (k > first && k < end) end = k;
    }
    if (!gram_ready) Gram(wx, x, r, c, rm);
    gram_ready = false;
    for (int j = first; j < end; ++j) {
      const auto& [ca, cb, cc] = coeffs.steps[j];
      const float a = static_cast<float>(ca);
      Square(r, static_cast<float>(cc), rm, rm, static_cast<float>(cb), rm, z);
      if (j == first) {
        std::copy(z, z + rr, pm);
        for (int i = 0; i < r; ++i) pm[i * r + i] += a;
      } else {
        Square(r, 1.0f, pm, z, a, pm, pn);
        std::swap(pm, pn);
      }
      if (j + 1 < end) {
        Square(r, 1.0f, z, z, 2 * a, z, w);
        Square(r, 1.0f, w, rm, a * a, rm, rn);
        std::swap(rm, rn);
      }
    }
    // Y = P·X: P r×r (ld r), X and Y r×c in X's layout.
    cblas_sgemm(wx.order, wx.square(), CblasNoTrans, r, c, r, 1.0f, pm, r, x, wx.ld, 0.0f, y,
                wx.ld);
    std::copy(y, y + rc, x);
    first = end;
  }
}

// Exact polar factor U·Vᵀ of a wide r×c matrix (laid out as `w` says) in
// float64, with singular values that are zero to working precision mapped to
// 0 (as NS maps them).
absl::Status PolarSvdWide(const WideX& w, int r, int c, float* x) {
  const int lapack_order = w.order == CblasRowMajor ? LAPACK_ROW_MAJOR : LAPACK_COL_MAJOR;
  std::vector<double> m(x, x + static_cast<int64_t>(r) * c);
  std::vector<double> s(r), u(static_cast<int64_t>(r) * r), vt(static_cast<int64_t>(r) * c);
  const int info =
      LAPACKE_dgesdd(lapack_order, 'S', r, c, m.data(), w.ld, s.data(), u.data(), r, vt.data(),
                     w.ld);
  if (info != 0) {
    return absl::InternalError(absl::StrCat("LAPACK dgesdd failed to converge (info ", info, ")"));
  }
  const double tol = s[0] * std::max(r, c) * std::numeric_limits<double>::epsilon();
  for (int k = 0; k < r; ++k) {
    const double keep = s[k] > tol ? 1.0 : 0.0;
    for (int i = 0; i < r; ++i) u[w.order == CblasRowMajor ? i * r + k : k * r + i] *= keep;
  }
  std::vector<double> o(static_cast<int64_t>(r) * c);
  cblas_dgemm(w.order, CblasNoTrans, CblasNoTrans, r, c, r, 1.0, u.data(), r, vt.data(), w.ld,
              0.0, o.data(), w.ld);
  std::transform(o.begin(), o.end(), x, [](double v) { return static_cast<float>(v); });
  return absl::OkStatus();
}

}  // namespace

absl::Status OrthogonalizeCpu(const NsCoefficients& coeffs, const MatrixView& view, float* x) {
  NsWorkspace ws;
  return OrthogonalizeCpu(coeffs, view, x, &ws);
}

absl::Status OrthogonalizeCpu(const NsCoefficients& coeffs, const MatrixView& view, float* x,
                              NsWorkspace* ws) {
  if (view.batch < 1 || view.rows < 1 || view.cols < 1) {
    return absl::InvalidArgumentError("cannot orthogonalize an empty matrix");
  }
  if (view.rows > std::numeric_limits<int>::max() || view.cols > std::numeric_limits<int>::max()) {
    return absl::InvalidArgumentError("matrix dimension exceeds BLAS's int range");
  }
  const int r = static_cast<int>(std::min(view.rows, view.cols));
  const int c = static_cast<int>(std::max(view.rows, view.cols));
  const int64_t size = view.rows * view.cols;
  const WideX w = WideOf(view.rows, view.cols);
  // Every element is written before it is read (BLAS with beta = 0 does
  // not read its output), so what an earlier call left does not matter.
  const auto at_least = [](std::vector<float>& v, int64_t n) {
    if (v.size() < static_cast<size_t>(n)) v.resize(n);
  };
  const int64_t rr = static_cast<int64_t>(r) * r;
  if (coeffs.kind != ScheduleKind::kSvd) at_least(ws->y, size);
  if (coeffs.gram) {
    for (std::vector<float>& g : ws->gram) at_least(g, rr);
  } else if (coeffs.kind != ScheduleKind::kSvd) {
    at_least(ws->a, rr);
    at_least(ws->b, rr);
  }
  for (int64_t k = 0; k < view.batch; ++k) {
    float* mat = x + k * size;
    if (coeffs.kind == ScheduleKind::kSvd) {
      const bool zero = std::all_of(mat, mat + size, [](float v) { return v == 0; });
      if (!zero) {
        if (absl::Status s = PolarSvdWide(w, r, c, mat); !s.ok()) return s;
      }
    } else if (coeffs.gram) {
      GramNewtonSchulzWide(coeffs, w, r, c, mat, ws->gram, ws->y.data());
    } else {
      NewtonSchulzWide(coeffs, w, r, c, mat, ws->a.data(), ws->b.data(), ws->y.data());
    }
  }
  return absl::OkStatus();
}

double OrthogonalityError(int64_t rows, int64_t cols, const float* o) {
  const int r = static_cast<int>(std::min(rows, cols));
  const int c = static_cast<int>(std::max(rows, cols));
  const WideX wx = WideOf(rows, cols);
  const std::vector<double> w(o, o + rows * cols);
  std::vector<double> g(static_cast<int64_t>(r) * r);
  cblas_dsyrk(wx.order, wx.upper(), CblasNoTrans, r, c, 1.0, w.data(), wx.ld, 0.0, g.data(), r);
  double sum = 0;
  for (int i = 0; i < r; ++i) {
    for (int j = i; j < r; ++j) {
      const double e = g[i * r + j] - (i == j ? 1.0 : 0.0);
      sum += (i == j ? 1.0 : 2.0) * e * e;
    }
  }
  return std::sqrt(sum / r);
}

}  // namespace muon
