#ifndef MUON_KERNELS_INTERNAL_STEP_MATH_H_
#define MUON_KERNELS_INTERNAL_STEP_MATH_H_

// The element-wise optimizer math, written once for the CPU engine and the
// CUDA kernels (docs/math.md gives the derivations). Plain structs and inline
// functions only: this header is compiled by the host compiler and by nvcc,
// so it includes nothing but <cmath> and <cstdint>.
//
// Each formula is evaluated in the order written; the CPU engine's results
// are bit-for-bit those of these functions (the tests compare bits), and the
// CUDA kernels compile the same expressions for the device.

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MUON_HOST_DEVICE __host__ __device__
#else
#define MUON_HOST_DEVICE
#endif

namespace muon::internal {

// Correctly rounded square roots and the finiteness test, from CUDA's math
// library in device code and <cmath> on the host.
#if defined(__CUDA_ARCH__)
MUON_HOST_DEVICE inline float Sqrt(float x) { return sqrtf(x); }
MUON_HOST_DEVICE inline double Sqrt(double x) { return sqrt(x); }
MUON_HOST_DEVICE inline bool Finite(float x) { return isfinite(x); }
#else
inline float Sqrt(float x) { return std::sqrt(x); }
inline double Sqrt(double x) { return std::sqrt(x); }
inline bool Finite(float x) { return std::isfinite(x); }
#endif

// Muon momentum with β = momentum, g the gradient, B the momentum buffer:
//   EMA form  B ← β·B + (1−β)·g   (reference muon.py)
//   sum form  B ← β·B + g         (Moonlight, Dion)
// and the Newton–Schulz input
//   M = nesterov ? gain·g + β·B : B      (gain = 1−β for EMA, 1 for sum).
struct MomentumCoefficients {
  float beta = 0;
  float gain = 0;  // weight of g
  bool nesterov = true;
};

// 1 − β is rounded once from double: 1.0f − float(β) carries β's rounding
// (2.4e-7 relative for 0.95).
inline MomentumCoefficients MakeMomentumCoefficients(double beta, bool ema_form, bool nesterov) {
  return {static_cast<float>(beta), ema_form ? static_cast<float>(1.0 - beta) : 1.0f, nesterov};
}

// Writes the new buffer to *b_new and returns M.
MUON_HOST_DEVICE inline float MomentumStep(const MomentumCoefficients& c, float b, float g,
                                           float* b_new) {
  const float b1 = c.beta * b + c.gain * g;
  *b_new = b1;
  return c.nesterov ? c.gain * g + c.beta * b1 : b1;
}

// AdamW at step t (1-based) with moments m, v:
//   m ← β1·m + (1−β1)·g
//   v ← β2·v + (1−β2)·g²
//   u = −lr · (m / (1−β1ᵗ)) / (√(v / (1−β2ᵗ)) + ε)
// The moments are fp32; the bias-corrected quotient is evaluated in Real:
// double on the CPU engine (the reference), float in the CUDA kernels.
template <typename Real>
struct AdamWCoefficients {
  float beta1 = 0, beta2 = 0;
  // 1 − β rounded once from double: 1.0f − float(0.999) is 1.3e-5 off.
  float one_minus_beta1 = 0, one_minus_beta2 = 0;
  Real lr = 0;
  Real bias_correction1 = 1, bias_correction2 = 1;  // 1 − βᵗ
  Real eps = 0;
};

template <typename Real>
AdamWCoefficients<Real> MakeAdamWCoefficients(double beta1, double beta2, double eps, double lr,
                                              int64_t step) {
  const double t = static_cast<double>(step);
  AdamWCoefficients<Real> c;
  c.beta1 = static_cast<float>(beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.lr = static_cast<Real>(lr);
  c.bias_correction1 = static_cast<Real>(1.0 - std::pow(beta1, t));
  c.bias_correction2 = static_cast<Real>(1.0 - std::pow(beta2, t));
  c.eps = static_cast<Real>(eps);
  return c;
}

// The new moments m1, v1 (in float).
template <typename Real>
MUON_HOST_DEVICE inline void AdamWMoments(const AdamWCoefficients<Real>& c, float m, float v,
                                          float g, float* m_new, float* v_new) {
  *m_new = c.beta1 * m + c.one_minus_beta1 * g;
  *v_new = c.beta2 * v + c.one_minus_beta2 * g * g;
}

// u from the new moments (the quotient in Real).
template <typename Real>
MUON_HOST_DEVICE inline float AdamWUpdate(const AdamWCoefficients<Real>& c, float m1, float v1) {
  const Real denom = Sqrt(static_cast<Real>(v1) / c.bias_correction2) + c.eps;
  return static_cast<float>(-c.lr * (static_cast<Real>(m1) / c.bias_correction1) / denom);
}

// Writes the new moments to *m_new, *v_new and returns u. The CPU engine
// runs the two halves as separate loops: the float and the double half each
// vectorize, the two together do not (GCC 12).
template <typename Real>
MUON_HOST_DEVICE inline float AdamWStep(const AdamWCoefficients<Real>& c, float m, float v, float g,
                                        float* m_new, float* v_new) {
  float m1, v1;
  AdamWMoments(c, m, v, g, &m1, &v1);
  *m_new = m1;
  *v_new = v1;
  return AdamWUpdate(c, m1, v1);
}

// Shape scale s of an m×n matrix (rows × cols):
//   spectral   s = sqrt(max(1, m/n))      (reference muon.py)
//   rms_match  s = 0.2·sqrt(max(m, n))    (Moonlight: update RMS ≈ AdamW's)
//   none       s = 1
enum class ShapeScaleForm { kSpectral, kRmsMatch, kNone };

MUON_HOST_DEVICE inline double ShapeScaleOf(ShapeScaleForm form, int64_t rows, int64_t cols) {
  switch (form) {
    case ShapeScaleForm::kSpectral: {
      const double ratio = static_cast<double>(rows) / static_cast<double>(cols);
      return Sqrt(ratio > 1.0 ? ratio : 1.0);
    }
    case ShapeScaleForm::kRmsMatch:
      return 0.2 * Sqrt(static_cast<double>(rows > cols ? rows : cols));
    case ShapeScaleForm::kNone:
      return 1.0;
  }
  return 1.0;
}

// The Muon update from the orthogonalized O: u = −lr·s·O, with the factor
// −lr·s rounded once to float.
inline float MuonUpdateScale(double lr, double shape_scale) {
  return static_cast<float>(-lr * shape_scale);
}
MUON_HOST_DEVICE inline float MuonUpdate(float scale, float o) { return scale * o; }

// Decoupled weight decay on held weights: W ← decay·W + u, decay = 1 − lr·wd.
inline double DecayFactor(double lr, double weight_decay) { return 1.0 - lr * weight_decay; }
MUON_HOST_DEVICE inline float DecayedWeight(float decay, float w, float u) { return decay * w + u; }

}  // namespace muon::internal

#endif  // MUON_KERNELS_INTERNAL_STEP_MATH_H_
