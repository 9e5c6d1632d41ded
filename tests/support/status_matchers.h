#ifndef MUON_TESTS_SUPPORT_STATUS_MATCHERS_H_
#define MUON_TESTS_SUPPORT_STATUS_MATCHERS_H_

// gMock matchers for absl::Status and absl::StatusOr<T> (Debian 12's Abseil
// ships none):
//   EXPECT_THAT(engine->Register(spec), StatusIs(absl::StatusCode::kNotFound));
//   EXPECT_THAT(status, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("NaN")));
//   ASSERT_THAT(engine->Step(...), IsOk());
// On a mismatch the actual code and message are printed.

#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gmock/gmock.h"

namespace muon::testing {

inline const absl::Status& GetStatus(const absl::Status& status) { return status; }

template <typename T>
const absl::Status& GetStatus(const absl::StatusOr<T>& status_or) {
  return status_or.status();
}

MATCHER_P2(StatusIs, code, message_matcher,
           std::string(negation ? "isn't" : "is") + " a status with code " +
               std::string(absl::StatusCodeToString(code)) + " and a message that " +
               ::testing::DescribeMatcher<std::string>(message_matcher, negation)) {
  const absl::Status& status = ::muon::testing::GetStatus(arg);
  *result_listener << "whose status is " << status;
  return status.code() == code &&
         ::testing::Matches(message_matcher)(std::string(status.message()));
}

inline auto StatusIs(absl::StatusCode code) { return StatusIs(code, ::testing::_); }

MATCHER(IsOk, negation ? "isn't OK" : "is OK") {
  const absl::Status& status = ::muon::testing::GetStatus(arg);
  *result_listener << "whose status is " << status;
  return status.ok();
}

}  // namespace muon::testing

#endif  // MUON_TESTS_SUPPORT_STATUS_MATCHERS_H_
