#ifndef MUON_KERNELS_CPU_NS_H_
#define MUON_KERNELS_CPU_NS_H_

#include <vector>

#include "absl/status/status.h"
#include "muon/kernels/ns_schedule.h"
#include "muon/kernels/types.h"

namespace muon {

// Orthogonalizes each of view.batch row-major rows×cols fp32 matrices in x in
// place with the given schedule (fp32 on OpenBLAS; kSvd by LAPACK). A zero
// matrix stays zero. Thread-compatible; uses OpenBLAS's threads.
// InvalidArgument for an empty view; Internal if LAPACK fails to converge.
absl::Status OrthogonalizeCpu(const NsCoefficients& coeffs, const MatrixView& view, float* x);

// OrthogonalizeCpu's work matrices, for a caller that keeps them from call
// to call (the CPU engine, one per compute thread): they grow to the largest
// matrix seen and hold nothing a later call reads, so a step allocates and
// zero-fills none of them.
struct NsWorkspace {
  std::vector<float> a, b;        // r×r
  std::vector<float> y;           // r×c
  std::vector<float> gram[6];     // r×r each, Gram Newton–Schulz only
};

// OrthogonalizeCpu on `ws`'s buffers; the same bits.
absl::Status OrthogonalizeCpu(const NsCoefficients& coeffs, const MatrixView& view, float* x,
                              NsWorkspace* ws);

// ‖O·Oᵀ − I‖_F/√r of one row-major rows×cols matrix, on its wide orientation
// (r = min(rows, cols)), in double.
double OrthogonalityError(int64_t rows, int64_t cols, const float* o);

}  // namespace muon

#endif  // MUON_KERNELS_CPU_NS_H_
