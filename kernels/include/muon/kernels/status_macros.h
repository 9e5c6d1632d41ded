#ifndef MUON_KERNELS_STATUS_MACROS_H_
#define MUON_KERNELS_STATUS_MACROS_H_

#include "absl/status/status.h"

// Debian 12's Abseil has no public RETURN_IF_ERROR; this is the one copy.
#define MUON_RETURN_IF_ERROR(expr)                  \
  do {                                              \
    ::absl::Status muon_status_ = (expr);           \
    if (!muon_status_.ok()) return muon_status_;    \
  } while (0)

#define MUON_STATUS_CONCAT_INNER_(a, b) a##b
#define MUON_STATUS_CONCAT_(a, b) MUON_STATUS_CONCAT_INNER_(a, b)

// MUON_ASSIGN_OR_RETURN(auto x, MakeX()); returns the error status if any.
#define MUON_ASSIGN_OR_RETURN(lhs, rexpr) \
  MUON_ASSIGN_OR_RETURN_IMPL_(MUON_STATUS_CONCAT_(muon_statusor_, __LINE__), lhs, rexpr)
#define MUON_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                \
  if (!statusor.ok()) return statusor.status();           \
  lhs = std::move(statusor).value()

#endif  // MUON_KERNELS_STATUS_MACROS_H_
