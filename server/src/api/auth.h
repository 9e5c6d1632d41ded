#ifndef MUON_SERVER_SRC_AUTH_H_
#define MUON_SERVER_SRC_AUTH_H_

#include <grpcpp/server_context.h>

#include <string>

#include "absl/strings/string_view.h"

namespace muon::server {

// True when a and b hold the same bytes. Its time depends only on the
// lengths, never on where the bytes differ, so a caller probing a token
// learns nothing from how long a wrong guess takes.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

// The token a call presents: `field` (the request's token field) when set,
// else the metadata "authorization: Bearer <token>", else empty.
std::string RequestToken(absl::string_view field, const grpc::ServerContextBase& ctx);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_AUTH_H_
