#include "util/constant_time.h"

#include <algorithm>

namespace muon::server {

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  // Every byte of the longer input is read and folded in, whatever was
  // found before; a length mismatch is folded in the same way.
  size_t diff = a.size() ^ b.size();
  const size_t n = std::max(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<size_t>(x ^ y);
  }
  return diff == 0;
}

}  // namespace muon::server
