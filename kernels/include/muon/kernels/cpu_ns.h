#ifndef MUON_KERNELS_CPU_NS_H_
#define MUON_KERNELS_CPU_NS_H_

#include "absl/status/status.h"
#include "muon/kernels/ns_schedule.h"
#include "muon/kernels/types.h"

namespace muon {

// Orthogonalizes each of view.batch row-major rows×cols fp32 matrices in x in
// place with the given schedule (fp32 on OpenBLAS; kSvd by LAPACK). A zero
// matrix stays zero. Thread-compatible; uses OpenBLAS's threads.
// InvalidArgument for an empty view; Internal if LAPACK fails to converge.
absl::Status OrthogonalizeCpu(const NsCoefficients& coeffs, const MatrixView& view, float* x);

// ‖O·Oᵀ − I‖_F/√r of one row-major rows×cols matrix, on its wide orientation
// (r = min(rows, cols)), in double.
double OrthogonalityError(int64_t rows, int64_t cols, const float* o);

}  // namespace muon

#endif  // MUON_KERNELS_CPU_NS_H_
