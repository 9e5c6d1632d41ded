#ifndef MUON_SERVER_STATUS_UTIL_H_
#define MUON_SERVER_STATUS_UTIL_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace muon::server {

// The one mapping from absl::Status to grpc::Status at the RPC edge. The
// canonical codes are the same; the message is kept as is.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace muon::server

#endif  // MUON_SERVER_STATUS_UTIL_H_
