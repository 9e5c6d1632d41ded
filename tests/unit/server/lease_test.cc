#include "session/lease.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <thread>
#include <utility>

#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "session/session.h"
#include "status_matchers.h"

namespace muon::server {
namespace {

using ::muon::testing::IsOk;
using ::muon::testing::StatusIs;
using ::testing::HasSubstr;

std::unique_ptr<Session> NewSession(uint32_t num_workers = 1, uint64_t step = 0) {
  SessionInit init;
  init.id = "s1";
  init.token = "t";
  init.num_workers = num_workers;
  init.mode = num_workers == 1 ? v1::SESSION_MODE_UPDATES : v1::SESSION_MODE_PARAMETER_SERVER;
  init.step = step;
  return std::make_unique<Session>(std::move(init));
}

std::shared_ptr<const StepRecord> Record(uint64_t step) {
  auto record = std::make_shared<StepRecord>();
  record->step = step;
  return record;
}

TEST(LeaseTest, DefaultHoldsNothing) {
  Lease lease;
  EXPECT_FALSE(lease.held());
  lease.Release();  // a no-op
  EXPECT_FALSE(lease.held());
}

TEST(LeaseTest, NewStepHoldsTheSlotUntilDestroyed) {
  auto session = NewSession();
  {
    absl::StatusOr<Session::Admission> admitted = session->AdmitStep(1, 0);
    ASSERT_THAT(admitted, IsOk());
    EXPECT_TRUE(admitted->lease.held());
    EXPECT_EQ(admitted->lease.purpose(), LeasePurpose::kStep);
    EXPECT_EQ(admitted->replay, nullptr);
    EXPECT_THAT(session->AdmitStep(1, 0),
                StatusIs(absl::StatusCode::kAborted, HasSubstr("step 1 in flight")));
    EXPECT_THAT(session->TryLease(LeasePurpose::kWeightsUpload),
                StatusIs(absl::StatusCode::kAborted));
    EXPECT_THAT(session->MarkDeleted(), StatusIs(absl::StatusCode::kFailedPrecondition));
  }
  // Destroyed uncommitted: an abort, the step unchanged and the slot free.
  EXPECT_EQ(session->step(), 0u);
  absl::StatusOr<Session::Admission> again = session->AdmitStep(1, 0);
  ASSERT_THAT(again, IsOk());
  EXPECT_TRUE(again->lease.held());
}

TEST(LeaseTest, CommitStepMovesTheStepAndKeepsTheRecord) {
  auto session = NewSession();
  absl::StatusOr<Session::Admission> admitted = session->AdmitStep(1, 0);
  ASSERT_THAT(admitted, IsOk());
  std::shared_ptr<const StepRecord> record = Record(1);
  admitted->lease.CommitStep(0, record);
  EXPECT_FALSE(admitted->lease.held());
  EXPECT_EQ(session->step(), 1u);

  // A retry of step 1 replays without a lease; step 2 takes the free slot.
  absl::StatusOr<Session::Admission> retry = session->AdmitStep(1, 0);
  ASSERT_THAT(retry, IsOk());
  EXPECT_EQ(retry->replay, record);
  EXPECT_FALSE(retry->lease.held());
  absl::StatusOr<Session::Admission> next = session->AdmitStep(2, 0);
  ASSERT_THAT(next, IsOk());
  EXPECT_TRUE(next->lease.held());
}

TEST(LeaseTest, ReleaseEndsEarlyAndOnlyOnce) {
  auto session = NewSession();
  absl::StatusOr<Lease> lease = session->TryLease(LeasePurpose::kWeightsUpload);
  ASSERT_THAT(lease, IsOk());
  EXPECT_THAT(session->AdmitStep(1, 0),
              StatusIs(absl::StatusCode::kAborted, HasSubstr("weights uploaded")));
  lease->Release();
  EXPECT_FALSE(lease->held());
  absl::StatusOr<Session::Admission> step = session->AdmitStep(1, 0);
  ASSERT_THAT(step, IsOk());
  // A second release of the upload's lease must not free the step's slot.
  lease->Release();
  EXPECT_THAT(session->TryLease(LeasePurpose::kCheckpoint), StatusIs(absl::StatusCode::kAborted));
}

TEST(LeaseTest, MoveTransfersTheSlot) {
  auto session = NewSession();
  absl::StatusOr<Lease> taken = session->TryLease(LeasePurpose::kWeightsUpload);
  ASSERT_THAT(taken, IsOk());
  Lease moved(std::move(*taken));
  EXPECT_FALSE(taken->held());  // NOLINT(bugprone-use-after-move): moved-from is empty
  EXPECT_TRUE(moved.held());
  taken->Release();  // the moved-from lease frees nothing
  EXPECT_THAT(session->TryLease(LeasePurpose::kRound), StatusIs(absl::StatusCode::kAborted));

  Lease assigned;
  assigned = std::move(moved);
  EXPECT_TRUE(assigned.held());
  EXPECT_EQ(assigned.purpose(), LeasePurpose::kWeightsUpload);
  EXPECT_THAT(session->TryLease(LeasePurpose::kRound), StatusIs(absl::StatusCode::kAborted));
  assigned = Lease();  // assigning over a held lease ends it
  EXPECT_THAT(session->TryLease(LeasePurpose::kRound), IsOk());
}

TEST(LeaseTest, CommitRoundSetsEveryWorkersRecord) {
  auto session = NewSession(/*num_workers=*/3);
  absl::StatusOr<Lease> round = session->TryLease(LeasePurpose::kRound);
  ASSERT_THAT(round, IsOk());
  EXPECT_THAT(session->AwaitLease(absl::ZeroDuration()),
              StatusIs(absl::StatusCode::kDeadlineExceeded, HasSubstr("step 1 in flight")));
  std::shared_ptr<const StepRecord> shared = Record(1);
  round->CommitRound(1, {shared, nullptr, shared});
  EXPECT_FALSE(round->held());
  EXPECT_EQ(session->step(), 1u);
  EXPECT_THAT(session->Recorded(1, 0), IsOk());
  EXPECT_THAT(session->Recorded(1, 1), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(*session->Recorded(1, 2), shared);
  Session::Snapshot snapshot = session->TakeSnapshot();
  EXPECT_EQ(snapshot.step, 1u);
  ASSERT_EQ(snapshot.records.size(), 3u);
}

TEST(LeaseTest, CheckpointWaitsForTheHolder) {
  auto session = NewSession();
  absl::StatusOr<Session::Admission> step = session->AdmitStep(1, 0);
  ASSERT_THAT(step, IsOk());
  absl::Notification waiting;
  std::thread checkpoint([&] {
    waiting.Notify();
    absl::StatusOr<Lease> lease = session->AwaitLease(absl::InfiniteDuration());
    ASSERT_THAT(lease, IsOk());
    EXPECT_EQ(lease->purpose(), LeasePurpose::kCheckpoint);
    // The step committed before the checkpoint took the slot.
    EXPECT_EQ(session->step(), 1u);
  });
  waiting.WaitForNotification();
  step->lease.CommitStep(0, Record(1));
  checkpoint.join();
  EXPECT_THAT(session->TryLease(LeasePurpose::kCheckpoint), IsOk());
}

TEST(LeaseTest, DeletedSessionGrantsNoLease) {
  auto session = NewSession();
  ASSERT_THAT(session->MarkDeleted(), IsOk());
  EXPECT_THAT(session->AdmitStep(1, 0), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(session->TryLease(LeasePurpose::kRound), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(session->AwaitLease(absl::Seconds(1)), StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace muon::server
