#ifndef MUON_SERVER_SRC_UTIL_CONSTANT_TIME_H_
#define MUON_SERVER_SRC_UTIL_CONSTANT_TIME_H_

#include "absl/strings/string_view.h"

namespace muon::server {

// True when a and b hold the same bytes. Its time depends only on the
// lengths, never on where the bytes differ, so a caller probing a token
// learns nothing from how long a wrong guess takes.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_UTIL_CONSTANT_TIME_H_
