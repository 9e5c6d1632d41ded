#include "api/auth.h"

#include "absl/strings/match.h"

namespace muon::server {

std::string RequestToken(absl::string_view field, const grpc::ServerContextBase& ctx) {
  if (!field.empty()) return std::string(field);
  constexpr absl::string_view kScheme = "bearer ";
  for (const auto& [key, value] : ctx.client_metadata()) {
    if (absl::string_view(key.data(), key.size()) != "authorization") continue;
    absl::string_view v(value.data(), value.size());
    // The scheme is case-insensitive (RFC 6750).
    if (absl::StartsWithIgnoreCase(v, kScheme)) return std::string(v.substr(kScheme.size()));
  }
  return "";
}

}  // namespace muon::server
