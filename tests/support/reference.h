#ifndef MUON_TESTS_SUPPORT_REFERENCE_H_
#define MUON_TESTS_SUPPORT_REFERENCE_H_

// Float64 references for the engine tests: docs/math.md's formulas written
// out plainly, random matrices with chosen singular values, and LAPACK SVD.

#include <array>
#include <cstdint>
#include <random>
#include <vector>

#include "muon/kernels/types.h"

namespace muon::testing {

// Row-major rows×cols matrix of doubles.
struct Matrix {
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<double> v;
};

Matrix MatMul(const Matrix& a, const Matrix& b, bool transpose_b = false);
Matrix Transpose(const Matrix& a);

// U·diag(s)·Vᵀ with U (rows×r) and V (cols×r) random orthonormal columns,
// r = min(rows, cols) = s.size().
Matrix WithSingularValues(int64_t rows, int64_t cols, const std::vector<double>& s,
                          std::mt19937_64& rng);

// r singular values spread log-uniformly over [lo, hi], both ends included.
std::vector<double> LogSpaced(int64_t r, double lo, double hi);

// Singular values, descending (LAPACK dgesvd).
std::vector<double> SingularValues(const Matrix& m);

// Exact polar factor U·Vᵀ (LAPACK dgesvd).
Matrix Polar(const Matrix& m);

// Newton–Schulz in float64 with the given per-step coefficients, docs/math.md
// (Frobenius normalization by safety·‖M‖_F + eps, or AOL rescaling).
Matrix NewtonSchulz(const Matrix& m, const std::vector<std::array<double, 3>>& steps,
                    double norm_safety, bool aol, double eps = 1e-7);

// Muon for one matrix (or batch of matrices laid end to end), float64.
struct MuonRef {
  HyperParams hp;
  MatrixView view;
  std::vector<double> buf;
  std::vector<std::array<double, 3>> coeffs;
  double norm_safety = 1.0;
  double eps = 1e-7;
  bool aol = false;
  bool svd = false;  // the exact polar factor (LAPACK) instead of Newton–Schulz
  // Returns the update (to add after W ← decay·W); sets decay.
  std::vector<double> Step(const std::vector<double>& grad, double lr, double* decay);
};

struct AdamWRef {
  HyperParams hp;
  std::vector<double> m, v;
  int64_t t = 0;
  std::vector<double> Step(const std::vector<double>& grad, double lr, double* decay);
};

double RelativeError(const std::vector<float>& got, const std::vector<double>& want);
double FrobeniusDistance(const Matrix& a, const Matrix& b);  // ‖a−b‖_F/‖b‖_F

// A MuonRef for a registered spec, with the schedule's coefficients.
MuonRef MakeMuonRef(const ParamSpec& spec);

std::vector<float> RandomNormal(size_t n, std::mt19937_64& rng, double scale = 1.0);

// What `values` become on the wire in `dtype` and back (what an engine sees).
std::vector<double> WireRoundTrip(DType dtype, const std::vector<float>& values);

// A seed for fresh inputs each run: from std::random_device, or from the
// environment variable MUON_TEST_SEED when set (to replay a failure). Tests
// print it when they fail.
uint64_t FreshSeed();

}  // namespace muon::testing

#endif  // MUON_TESTS_SUPPORT_REFERENCE_H_
