// StepMachine driven directly, event by event, with a fake backend: every
// transition and every error of the Step protocol, without gRPC.

#include "step/step_machine.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "status_matchers.h"

namespace muon::server {
namespace {

using ::muon::testing::StatusIs;
using ::testing::HasSubstr;
using Phase = StepMachine::Phase;

// What the machine asked of its backend, and what the test makes it answer.
struct BackendLog {
  absl::StatusOr<StepBackend::Admission> admission;
  absl::Status end_status;
  bool abort_returns = true;
  std::vector<uint32_t> gradients;  // indices, in order
  std::vector<std::vector<uint32_t>> ends;
  int replays = 0;
  int aborts = 0;
  int sent = 0;
  int opened = 0;
};

class FakeBackend final : public StepBackend {
 public:
  explicit FakeBackend(BackendLog* log) : log_(log) {}
  absl::StatusOr<Admission> Admit(const v1::StepHeader&) override { return log_->admission; }
  void Gradient(uint32_t index, std::unique_ptr<std::byte[]> bytes) override {
    EXPECT_NE(bytes, nullptr);
    log_->gradients.push_back(index);
  }
  absl::Status End(std::vector<uint32_t> indices, int64_t, std::optional<double>) override {
    log_->ends.push_back(std::move(indices));
    return log_->end_status;
  }
  void Replay() override { ++log_->replays; }
  bool Abort() override {
    ++log_->aborts;
    return log_->abort_returns;
  }
  void Sent(double) override { ++log_->sent; }

 private:
  BackendLog* const log_;
};

// Two fp32 parameters of 8 bytes each.
StepBackend::Admission Receive() {
  StepBackend::Admission a;
  a.role = StepBackend::Role::kReceive;
  a.session_id = "s";
  a.params = {{"a", 8, DType::kFloat32}, {"b", 8, DType::kFloat32}};
  return a;
}

StepBackend::Admission WithRole(StepBackend::Role role) {
  StepBackend::Admission a;
  a.role = role;
  a.session_id = "s";
  return a;
}

v1::StepRequest Header() {
  v1::StepRequest r;
  r.mutable_header()->set_session_id("s");
  r.mutable_header()->set_step(1);
  return r;
}

v1::StepRequest Chunk(uint32_t index, uint64_t offset, size_t size) {
  v1::StepRequest r;
  r.mutable_gradient()->set_param_index(index);
  r.mutable_gradient()->set_offset(offset);
  r.mutable_gradient()->set_data(std::string(size, '\x01'));
  return r;
}

v1::StepRequest End(std::vector<uint32_t> indices) {
  v1::StepRequest r;
  for (uint32_t i : indices) r.mutable_end()->add_param_indices(i);
  return r;
}

StepResponsePtr Update(uint32_t index) {
  v1::StepResponse r;
  r.mutable_update()->set_param_index(index);
  return MakeReply(std::move(r));
}

StepResponsePtr Summary() {
  v1::StepResponse r;
  r.mutable_summary()->set_step(1);
  return MakeReply(std::move(r));
}

class StepMachineTest : public ::testing::Test {
 protected:
  StepMachineTest()
      : machine_([this](const v1::StepHeader&) -> absl::StatusOr<std::unique_ptr<StepBackend>> {
          ++log_.opened;
          if (!open_status_.ok()) return open_status_;
          return std::make_unique<FakeBackend>(&log_);
        }) {
    log_.admission = Receive();
  }

  StepMachine::Actions Read(const v1::StepRequest& r) { return machine_.ReadDone(r); }

  // Header read and admitted as a new step.
  void StartReceiving() {
    EXPECT_TRUE(machine_.Start().read);
    EXPECT_TRUE(Read(Header()).read);
    ASSERT_EQ(machine_.phase(), Phase::kReceiving);
  }

  BackendLog log_;
  absl::Status open_status_;
  StepMachine machine_;
};

TEST_F(StepMachineTest, AWholeStepReadsComputesCommitsAndFinishesOk) {
  StartReceiving();
  EXPECT_TRUE(Read(Chunk(0, 0, 4)).read);
  EXPECT_TRUE(log_.gradients.empty());
  StepMachine::Actions a = Read(Chunk(0, 4, 4));
  EXPECT_TRUE(a.read);
  EXPECT_EQ(log_.gradients, std::vector<uint32_t>{0});

  // The update goes out at once, while the client still sends: nothing is
  // held back for the end.
  const StepResponsePtr u0 = Update(0);
  a = machine_.Updates({u0});
  EXPECT_EQ(a.write.get(), u0.get());
  EXPECT_FALSE(a.finish.has_value());
  EXPECT_FALSE(machine_.WriteDone(true).finish.has_value());
  EXPECT_EQ(log_.sent, 1);

  EXPECT_TRUE(Read(Chunk(1, 0, 8)).read);
  a = Read(End({1, 0}));
  EXPECT_FALSE(a.read);  // nothing is read after StepEnd
  EXPECT_EQ(machine_.phase(), Phase::kEnded);
  ASSERT_EQ(log_.ends.size(), 1u);
  EXPECT_EQ(log_.ends[0], (std::vector<uint32_t>{0, 1}));
  EXPECT_EQ(machine_.bytes_received(), 16);

  const StepResponsePtr u1 = Update(1);
  EXPECT_EQ(machine_.Updates({u1}).write.get(), u1.get());
  const StepResponsePtr summary = Summary();
  a = machine_.Committed({summary}, /*replayed=*/false);
  EXPECT_EQ(a.write, nullptr);  // u1 is still being written
  EXPECT_EQ(machine_.phase(), Phase::kFinishing);
  EXPECT_EQ(machine_.WriteDone(true).write.get(), summary.get());
  a = machine_.WriteDone(true);
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_TRUE(a.finish->ok());
  EXPECT_EQ(machine_.phase(), Phase::kDone);
  EXPECT_TRUE(machine_.committed());
  EXPECT_FALSE(machine_.replayed());
  EXPECT_EQ(log_.aborts, 0);
}

TEST_F(StepMachineTest, AHalfCloseWithoutStepEndAbortsNamingStepEnd) {
  StartReceiving();
  Read(Chunk(0, 0, 8));
  Read(Chunk(1, 0, 8));  // every byte is in, but the step never ended
  StepMachine::Actions a = machine_.ReadsEnded();
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("StepEnd")));
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kInvalidArgument,
                                  HasSubstr("nothing was applied")));
  EXPECT_TRUE(log_.ends.empty());
  EXPECT_EQ(log_.aborts, 1);
  EXPECT_FALSE(machine_.committed());
}

TEST_F(StepMachineTest, AHalfCloseBeforeTheHeaderIsInvalid) {
  machine_.Start();
  StepMachine::Actions a = machine_.ReadsEnded();
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish,
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("before its StepHeader")));
  EXPECT_EQ(log_.opened, 0);
}

TEST_F(StepMachineTest, AMessageBeforeTheHeaderIsInvalid) {
  machine_.Start();
  StepMachine::Actions a = Read(Chunk(0, 0, 8));
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_FALSE(a.read);
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("StepHeader")));
}

TEST_F(StepMachineTest, OpenerErrorsEndTheStream) {
  open_status_ = absl::PermissionDeniedError("wrong token");
  machine_.Start();
  StepMachine::Actions a = Read(Header());
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_EQ(log_.aborts, 0);
}

TEST_F(StepMachineTest, AdmissionErrorsEndTheStreamWithoutAbort) {
  log_.admission = absl::FailedPreconditionError("step 3 is ahead");
  machine_.Start();
  StepMachine::Actions a = Read(Header());
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_EQ(log_.aborts, 0);  // an unadmitted backend holds nothing
}

TEST_F(StepMachineTest, ASecondHeaderIsInvalidAndAborts) {
  StartReceiving();
  StepMachine::Actions a = Read(Header());
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("second")));
  EXPECT_EQ(log_.aborts, 1);
}

TEST_F(StepMachineTest, ABadChunkAbortsAndDropsQueuedUpdates) {
  StartReceiving();
  Read(Chunk(0, 0, 8));
  const StepResponsePtr u0 = Update(0);
  machine_.Updates({u0});            // being written
  machine_.Updates({Update(0)});     // queued
  StepMachine::Actions a = Read(Chunk(1, 2, 4));  // misaligned
  EXPECT_FALSE(a.read);
  EXPECT_FALSE(a.finish.has_value());  // waits for the write under way
  EXPECT_EQ(log_.aborts, 1);
  a = machine_.WriteDone(true);
  EXPECT_EQ(a.write, nullptr);  // the queued update is dropped
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(StepMachineTest, AnIncompleteParameterAtStepEndIsInvalid) {
  StartReceiving();
  Read(Chunk(0, 0, 4));
  StepMachine::Actions a = Read(End({0}));
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("missing")));
  EXPECT_TRUE(log_.ends.empty());
  EXPECT_EQ(log_.aborts, 1);
}

TEST_F(StepMachineTest, ABackendEndErrorFailsTheStep) {
  log_.end_status = absl::InvalidArgumentError("parameter 1 is missing");
  StartReceiving();
  Read(Chunk(0, 0, 8));
  StepMachine::Actions a = Read(End({0}));
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("missing")));
  EXPECT_EQ(log_.aborts, 1);
}

TEST_F(StepMachineTest, ACancelWaitsForTheBackendToLetGo) {
  log_.abort_returns = false;  // a compute task is running
  StartReceiving();
  Read(Chunk(0, 0, 8));
  StepMachine::Actions a = machine_.Cancelled();
  EXPECT_FALSE(a.finish.has_value());
  EXPECT_EQ(log_.aborts, 1);
  EXPECT_EQ(machine_.Updates({Update(0)}).write, nullptr);  // dropped
  a = machine_.Failed(absl::AbortedError("abandoned"));
  ASSERT_TRUE(a.finish.has_value());
  // The cancel came first and wins; it does not promise nothing was applied.
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kCancelled, HasSubstr("exactly once")));
  EXPECT_EQ(log_.aborts, 1);
}

TEST_F(StepMachineTest, ACancelRightAfterStepEndMayFindTheStepCommitted) {
  log_.abort_returns = false;  // the commit is under way
  StartReceiving();
  Read(Chunk(0, 0, 8));
  Read(End({0}));
  EXPECT_FALSE(machine_.Cancelled().finish.has_value());
  StepMachine::Actions a = machine_.Committed({Summary()}, /*replayed=*/false);
  EXPECT_EQ(a.write, nullptr);  // the client is gone: no summary
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kCancelled));
  EXPECT_TRUE(machine_.committed());  // applied all the same
}

TEST_F(StepMachineTest, ShutdownAnswersUnavailableNeverCancelled) {
  StartReceiving();
  StepMachine::Actions a = machine_.ShuttingDown();
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kUnavailable, HasSubstr("shutting down")));
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kUnavailable, HasSubstr("retry")));
  EXPECT_EQ(log_.aborts, 1);
  // The gRPC cancel that follows changes nothing.
  a = machine_.Cancelled();
  EXPECT_FALSE(a.finish.has_value());
  EXPECT_THAT(machine_.status(), StatusIs(absl::StatusCode::kUnavailable));
}

TEST_F(StepMachineTest, ShutdownOfAnIdleStreamIsUnavailable) {
  machine_.Start();
  StepMachine::Actions a = machine_.ShuttingDown();
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kUnavailable));
}

TEST_F(StepMachineTest, AFailedWriteEndsTheStreamCancelled) {
  StartReceiving();
  Read(Chunk(0, 0, 8));
  machine_.Updates({Update(0), Update(0)});
  StepMachine::Actions a = machine_.WriteDone(false);
  EXPECT_EQ(a.write, nullptr);
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kCancelled, HasSubstr("broke")));
  EXPECT_EQ(log_.sent, 0);
  EXPECT_EQ(log_.aborts, 1);
}

TEST_F(StepMachineTest, ABackendFailureEndsTheStepWithoutAbort) {
  StartReceiving();
  Read(Chunk(0, 0, 8));
  Read(End({0}));
  StepMachine::Actions a = machine_.Failed(absl::InvalidArgumentError("gradient contains NaN"));
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("NaN")));
  EXPECT_EQ(log_.aborts, 0);  // it already let go
}

TEST_F(StepMachineTest, AFailureDuringReceivingWaitsForNoMoreReads) {
  StartReceiving();
  StepMachine::Actions a = machine_.Failed(absl::AbortedError("the round timed out"));
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kAborted));
  // The read that was under way comes back after the finish: ignored.
  a = Read(Chunk(0, 0, 8));
  EXPECT_FALSE(a.read);
  EXPECT_FALSE(a.finish.has_value());
  EXPECT_TRUE(log_.gradients.empty());
}

TEST_F(StepMachineTest, ARetryIgnoresChunksAndReplaysAtStepEnd) {
  log_.admission = WithRole(StepBackend::Role::kReplay);
  machine_.Start();
  Read(Header());
  EXPECT_EQ(machine_.phase(), Phase::kReplayPending);
  EXPECT_TRUE(Read(Chunk(0, 0, 3)).read);  // not even checked
  EXPECT_EQ(log_.replays, 0);
  StepMachine::Actions a = Read(End({0}));
  EXPECT_FALSE(a.read);
  EXPECT_EQ(log_.replays, 1);
  const StepResponsePtr u = Update(0);
  const StepResponsePtr s = Summary();
  a = machine_.Committed({u, s}, /*replayed=*/true);
  EXPECT_EQ(a.write.get(), u.get());
  EXPECT_EQ(machine_.WriteDone(true).write.get(), s.get());
  a = machine_.WriteDone(true);
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_TRUE(a.finish->ok());
  EXPECT_TRUE(machine_.replayed());
  EXPECT_FALSE(machine_.committed());
}

TEST_F(StepMachineTest, ARetryWithoutStepEndIsInvalid) {
  log_.admission = WithRole(StepBackend::Role::kReplay);
  machine_.Start();
  Read(Header());
  StepMachine::Actions a = machine_.ReadsEnded();
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("StepEnd")));
  EXPECT_EQ(log_.replays, 0);
}

TEST_F(StepMachineTest, AWaitingResendFinishesWhenItsRoundCommits) {
  log_.admission = WithRole(StepBackend::Role::kWait);
  machine_.Start();
  Read(Header());
  EXPECT_EQ(machine_.phase(), Phase::kAwaitingRound);
  EXPECT_TRUE(Read(Chunk(0, 0, 8)).read);
  EXPECT_TRUE(log_.gradients.empty());
  // The round ends before this stream's StepEnd: it answers at once.
  const StepResponsePtr s = Summary();
  StepMachine::Actions a = machine_.Committed({s}, /*replayed=*/false);
  EXPECT_EQ(a.write.get(), s.get());
  a = machine_.WriteDone(true);
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_TRUE(a.finish->ok());
  EXPECT_TRUE(machine_.committed());
  EXPECT_FALSE(Read(End({0})).read);  // the read that was under way
  EXPECT_EQ(log_.replays, 0);
}

TEST_F(StepMachineTest, AWaitingResendSendsItsRoundsEarlyAnswers) {
  log_.admission = WithRole(StepBackend::Role::kWait);
  machine_.Start();
  Read(Header());
  ASSERT_EQ(machine_.phase(), Phase::kAwaitingRound);
  // A parameter-server round answers parameters before it commits.
  const StepResponsePtr u = Update(1);
  StepMachine::Actions a = machine_.Updates({u});
  EXPECT_EQ(a.write.get(), u.get());
  const StepResponsePtr s = Summary();
  machine_.Committed({s}, /*replayed=*/false);
  a = machine_.WriteDone(true);
  EXPECT_EQ(a.write.get(), s.get());
  a = machine_.WriteDone(true);
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_TRUE(a.finish->ok());
}

TEST_F(StepMachineTest, AWaitingResendEndedByStepEndWaitsForItsRound) {
  log_.admission = WithRole(StepBackend::Role::kWait);
  machine_.Start();
  Read(Header());
  StepMachine::Actions a = Read(End({0, 1}));
  EXPECT_FALSE(a.read);
  EXPECT_FALSE(a.finish.has_value());
  EXPECT_EQ(log_.replays, 0);
  a = machine_.Failed(absl::AbortedError("a worker timed out"));
  ASSERT_TRUE(a.finish.has_value());
  EXPECT_THAT(*a.finish, StatusIs(absl::StatusCode::kAborted));
}

TEST_F(StepMachineTest, EveryEventAfterTheFinishIsIgnored) {
  machine_.Start();
  ASSERT_TRUE(machine_.ShuttingDown().finish.has_value());
  for (StepMachine::Actions a :
       {machine_.Cancelled(), machine_.ReadsEnded(), machine_.ReadDone(Header()),
        machine_.Updates({Update(0)}), machine_.Committed({Summary()}, false),
        machine_.Failed(absl::InternalError("x")), machine_.WriteDone(true)}) {
    EXPECT_FALSE(a.read);
    EXPECT_EQ(a.write, nullptr);
    EXPECT_FALSE(a.finish.has_value());
  }
  EXPECT_EQ(machine_.phase(), Phase::kDone);
}

}  // namespace
}  // namespace muon::server
