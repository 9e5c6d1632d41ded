#ifndef MUON_SERVER_SRC_AUTH_H_
#define MUON_SERVER_SRC_AUTH_H_

#include <grpcpp/server_context.h>

#include <string>

#include "absl/strings/string_view.h"
#include "util/constant_time.h"  // ConstantTimeEquals, for the token checks

namespace muon::server {

// The token a call presents: `field` (the request's token field) when set,
// else the metadata "authorization: Bearer <token>", else empty.
std::string RequestToken(absl::string_view field, const grpc::ServerContextBase& ctx);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_AUTH_H_
