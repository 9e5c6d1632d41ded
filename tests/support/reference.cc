#include "reference.h"

#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>

#include "muon/kernels/ns_schedule.h"

namespace muon::testing {

Matrix MatMul(const Matrix& a, const Matrix& b, bool transpose_b) {
  const int64_t inner = a.cols;
  const int64_t cols = transpose_b ? b.rows : b.cols;
  Matrix c{a.rows, cols, std::vector<double>(a.rows * cols, 0.0)};
  for (int64_t i = 0; i < a.rows; ++i) {
    for (int64_t k = 0; k < inner; ++k) {
      const double aik = a.v[i * inner + k];
      if (transpose_b) {
        for (int64_t j = 0; j < cols; ++j) c.v[i * cols + j] += aik * b.v[j * b.cols + k];
      } else {
        for (int64_t j = 0; j < cols; ++j) c.v[i * cols + j] += aik * b.v[k * b.cols + j];
      }
    }
  }
  return c;
}

Matrix Transpose(const Matrix& a) {
  Matrix t{a.cols, a.rows, std::vector<double>(a.v.size())};
  for (int64_t i = 0; i < a.rows; ++i) {
    for (int64_t j = 0; j < a.cols; ++j) t.v[j * a.rows + i] = a.v[i * a.cols + j];
  }
  return t;
}

namespace {

// n×r matrix with orthonormal columns: QR of a Gaussian matrix.
Matrix RandomOrthonormal(int64_t n, int64_t r, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  Matrix q{n, r, std::vector<double>(n * r)};
  for (double& x : q.v) x = normal(rng);
  std::vector<double> tau(r);
  LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, static_cast<int>(n), static_cast<int>(r), q.v.data(),
                 static_cast<int>(r), tau.data());
  LAPACKE_dorgqr(LAPACK_ROW_MAJOR, static_cast<int>(n), static_cast<int>(r), static_cast<int>(r),
                 q.v.data(), static_cast<int>(r), tau.data());
  return q;
}

void Svd(Matrix m, std::vector<double>* s, Matrix* u, Matrix* vt) {
  const int64_t r = std::min(m.rows, m.cols);
  s->assign(r, 0.0);
  *u = Matrix{m.rows, r, std::vector<double>(m.rows * r)};
  *vt = Matrix{r, m.cols, std::vector<double>(r * m.cols)};
  std::vector<double> superb(r);
  LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'S', 'S', static_cast<int>(m.rows), static_cast<int>(m.cols),
                 m.v.data(), static_cast<int>(m.cols), s->data(), u->v.data(), static_cast<int>(r),
                 vt->v.data(), static_cast<int>(m.cols), superb.data());
}

}  // namespace

Matrix WithSingularValues(int64_t rows, int64_t cols, const std::vector<double>& s,
                          std::mt19937_64& rng) {
  const int64_t r = static_cast<int64_t>(s.size());
  Matrix u = RandomOrthonormal(rows, r, rng);
  const Matrix v = RandomOrthonormal(cols, r, rng);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t k = 0; k < r; ++k) u.v[i * r + k] *= s[k];
  }
  return MatMul(u, v, /*transpose_b=*/true);
}

std::vector<double> LogSpaced(int64_t r, double lo, double hi) {
  std::vector<double> s(r);
  for (int64_t i = 0; i < r; ++i) {
    const double t = r == 1 ? 1.0 : static_cast<double>(i) / static_cast<double>(r - 1);
    s[i] = std::exp(std::log(lo) + t * (std::log(hi) - std::log(lo)));
  }
  return s;
}

std::vector<double> SingularValues(const Matrix& m) {
  std::vector<double> s;
  Matrix u, vt;
  Svd(m, &s, &u, &vt);
  return s;
}

Matrix Polar(const Matrix& m) {
  std::vector<double> s;
  Matrix u, vt;
  Svd(m, &s, &u, &vt);
  return MatMul(u, vt);
}

Matrix NewtonSchulz(const Matrix& m, const std::vector<std::array<double, 3>>& steps,
                    double norm_safety, bool aol, double eps) {
  Matrix x = m.rows > m.cols ? Transpose(m) : m;
  Matrix a;
  bool gram_ready = false;
  if (aol) {
    a = MatMul(x, x, true);
    std::vector<double> d(x.rows);
    for (int64_t i = 0; i < x.rows; ++i) {
      double sum = 0;
      for (int64_t j = 0; j < x.rows; ++j) sum += std::fabs(a.v[i * x.rows + j]);
      d[i] = 1.0 / std::sqrt(std::max(sum, 1e-7));
    }
    for (int64_t i = 0; i < x.rows; ++i) {
      for (int64_t j = 0; j < x.cols; ++j) x.v[i * x.cols + j] *= d[i];
      for (int64_t j = 0; j < x.rows; ++j) a.v[i * x.rows + j] *= d[i] * d[j];
    }
    gram_ready = true;
  } else {
    double norm = 0;
    for (double e : x.v) norm += e * e;
    const double scale = 1.0 / (norm_safety * std::sqrt(norm) + eps);
    for (double& e : x.v) e *= scale;
  }
  for (const auto& [ca, cb, cc] : steps) {
    if (!gram_ready) a = MatMul(x, x, true);
    gram_ready = false;
    Matrix b = MatMul(a, a);
    for (size_t i = 0; i < b.v.size(); ++i) b.v[i] = cb * a.v[i] + cc * b.v[i];
    const Matrix bx = MatMul(b, x);
    for (size_t i = 0; i < x.v.size(); ++i) x.v[i] = ca * x.v[i] + bx.v[i];
  }
  return m.rows > m.cols ? Transpose(x) : x;
}

std::vector<double> MuonRef::Step(const std::vector<double>& grad, double lr, double* decay) {
  const size_t n = grad.size();
  if (buf.empty()) buf.assign(n, 0.0);
  const double beta = hp.momentum;
  const double gain = hp.momentum_form == MomentumForm::kEma ? 1.0 - beta : 1.0;
  std::vector<double> m(n);
  for (size_t k = 0; k < n; ++k) {
    buf[k] = beta * buf[k] + gain * grad[k];
    m[k] = hp.nesterov ? gain * grad[k] + beta * buf[k] : buf[k];
  }
  double s = 1.0;
  if (hp.shape_scale == ShapeScale::kSpectral) {
    s = std::sqrt(std::max(1.0, static_cast<double>(view.rows) / static_cast<double>(view.cols)));
  } else if (hp.shape_scale == ShapeScale::kRmsMatch) {
    s = 0.2 * std::sqrt(static_cast<double>(std::max(view.rows, view.cols)));
  }
  const int64_t size = view.rows * view.cols;
  std::vector<double> update(n);
  for (int64_t b = 0; b < view.batch; ++b) {
    Matrix mat{view.rows, view.cols,
               std::vector<double>(m.begin() + b * size, m.begin() + (b + 1) * size)};
    const Matrix o = svd ? Polar(mat) : NewtonSchulz(mat, coeffs, norm_safety, aol, eps);
    for (int64_t k = 0; k < size; ++k) update[b * size + k] = -lr * s * o.v[k];
  }
  *decay = 1.0 - lr * hp.weight_decay;
  return update;
}

std::vector<double> AdamWRef::Step(const std::vector<double>& grad, double lr, double* decay) {
  const size_t n = grad.size();
  if (m.empty()) m.assign(n, 0.0), v.assign(n, 0.0);
  ++t;
  const double bc1 = 1.0 - std::pow(hp.beta1, static_cast<double>(t));
  const double bc2 = 1.0 - std::pow(hp.beta2, static_cast<double>(t));
  std::vector<double> update(n);
  for (size_t k = 0; k < n; ++k) {
    m[k] = hp.beta1 * m[k] + (1 - hp.beta1) * grad[k];
    v[k] = hp.beta2 * v[k] + (1 - hp.beta2) * grad[k] * grad[k];
    update[k] = -lr * (m[k] / bc1) / (std::sqrt(v[k] / bc2) + hp.eps);
  }
  *decay = 1.0 - lr * hp.weight_decay;
  return update;
}

double RelativeError(const std::vector<float>& got, const std::vector<double>& want) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return std::sqrt(diff / norm);
}

double FrobeniusDistance(const Matrix& a, const Matrix& b) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < b.v.size(); ++i) {
    diff += (a.v[i] - b.v[i]) * (a.v[i] - b.v[i]);
    norm += b.v[i] * b.v[i];
  }
  return std::sqrt(diff / norm);
}

std::vector<float> RandomNormal(size_t n, std::mt19937_64& rng, double scale) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(normal(rng));
  return v;
}

MuonRef MakeMuonRef(const ParamSpec& spec) {
  const NsCoefficients c = *MakeNsCoefficients(spec.hp.ns_schedule, spec.hp.ns_steps);
  MuonRef ref;
  ref.hp = spec.hp;
  ref.view = MatrixViewOf(spec.shape);
  ref.coeffs = c.steps;
  // A custom schedule, from the hyper-parameters (types.h's HyperParams).
  if (spec.hp.ns_coefficients.size() == 1) {
    ref.coeffs.assign(spec.hp.ns_steps, spec.hp.ns_coefficients[0]);
  } else if (!spec.hp.ns_coefficients.empty()) {
    ref.coeffs = spec.hp.ns_coefficients;
  }
  ref.norm_safety = c.norm_safety;
  ref.eps = spec.hp.ns_eps;
  ref.aol = c.aol;
  ref.svd = spec.hp.ns_schedule == ScheduleKind::kSvd;
  return ref;
}

std::vector<double> WireRoundTrip(DType dtype, const std::vector<float>& values) {
  std::vector<std::byte> bytes(values.size() * DTypeSize(dtype));
  EncodeFromFloat(dtype, values.data(), values.size(), bytes.data());
  std::vector<float> back(values.size());
  DecodeToFloat(dtype, bytes.data(), values.size(), back.data());
  return std::vector<double>(back.begin(), back.end());
}

uint64_t FreshSeed() {
  if (const char* env = std::getenv("MUON_TEST_SEED"); env != nullptr && *env != '\0') {
    return std::stoull(env);
  }
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

}  // namespace muon::testing
