// The durability policy (session/durability.h) over the CPU engine and a
// checkpoint store in a temporary directory: when a commit is written, what
// a failed write acknowledges under each policy, and what an image holds.

#include "session/durability.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <random>
#include <string>

#include "muon/kernels/sharded_engine.h"
#include "observability/metrics.h"
#include "session/registry.h"
#include "status_matchers.h"
#include "storage/checkpoint_store.h"

namespace muon::server {
namespace {

using ::muon::testing::IsOk;
using ::muon::testing::StatusIs;
using ::testing::HasSubstr;

v1::CreateSessionRequest Request() {
  v1::CreateSessionRequest request;
  request.set_name("durability");
  v1::ParameterSpec* w = request.add_params();
  w->set_name("w");
  w->add_shape(8);
  w->add_shape(4);
  w->set_dtype(v1::DTYPE_FLOAT32);
  v1::ParameterSpec* b = request.add_params();
  b->set_name("b");
  b->add_shape(4);
  b->set_dtype(v1::DTYPE_FLOAT32);
  return request;
}

std::shared_ptr<const StepRecord> Record(uint64_t step) {
  auto record = std::make_shared<StepRecord>();
  record->step = step;
  v1::StepResponse summary;
  summary.mutable_summary()->set_step(step);
  record->responses.push_back(MakeReply(std::move(summary)));
  return record;
}

// One server's worth of parts: engine, store, durability, registry.
class DurabilityTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/muon_durability_test_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    root_ = tmpl;
    dir_ = root_ + "/ckpt";
    absl::StatusOr<std::unique_ptr<Engine>> engine = CreateCpuEngine({});
    ASSERT_THAT(engine, IsOk());
    engine_ = std::move(*engine);
    absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create("");
    ASSERT_THAT(metrics, IsOk());
    metrics_ = std::move(*metrics);
  }
  void TearDown() override {
    registry_.reset();
    ASSERT_EQ(std::system(("rm -rf '" + root_ + "'").c_str()), 0);
  }

  // strict, every_steps as DurabilityOptions; with_store false: no
  // checkpoint directory.
  void Start(bool with_store, bool strict, int every_steps,
             absl::Duration idle_ttl = absl::Hours(24)) {
    DurabilityOptions options;
    if (with_store) {
      absl::StatusOr<std::unique_ptr<CheckpointStore>> store = CheckpointStore::Open(dir_);
      ASSERT_THAT(store, IsOk());
      store_ = std::move(*store);
      options.store = store_.get();
    }
    options.strict = strict;
    options.every_steps = every_steps;
    durability_ = std::make_unique<Durability>(options, engine_.get());
    Limits limits;
    limits.session_idle_ttl = idle_ttl;
    registry_ = std::make_unique<SessionRegistry>(engine_.get(), limits, metrics_->sessions(),
                                                  durability_.get(), nullptr);
    absl::StatusOr<std::shared_ptr<Session>> session = registry_->Create(Request());
    ASSERT_THAT(session, IsOk());
    session_ = std::move(*session);
  }

  // Steps the session's engine state as a step's commit does, holding its
  // lease, and asks the policy what to acknowledge.
  absl::Status Commit(uint64_t step) {
    absl::StatusOr<Session::Admission> admitted = session_->AdmitStep(step, 0);
    if (!admitted.ok()) return admitted.status();
    for (const SessionParam& p : session_->params()) {
      ParamState state = *engine_->ExportState(p.engine_id);
      state.step = static_cast<int64_t>(step);
      if (!state.momentum.empty()) state.momentum[0] = static_cast<float>(step);
      if (!state.exp_avg.empty()) state.exp_avg[0] = static_cast<float>(step);
      EXPECT_THAT(engine_->ImportState(p.engine_id, state), IsOk());
    }
    std::shared_ptr<const StepRecord> record = Record(step);
    Session::Snapshot snapshot = session_->TakeSnapshot();
    snapshot.step = step;
    snapshot.last_step_time = absl::Now();
    snapshot.records[0] = record;
    absl::Status ack = durability_->AtCommit(*session_, snapshot);
    admitted->lease.CommitStep(0, record);
    return ack;
  }

  std::string PathOfSession() const { return dir_ + "/" + session_->id() + ".ckpt"; }
  bool OnDisk() const { return ::access(PathOfSession().c_str(), F_OK) == 0; }
  uint64_t StepOnDisk() const {
    absl::StatusOr<SessionImage> image = store_->Read(PathOfSession());
    EXPECT_THAT(image, IsOk());
    return image.ok() ? image->step : 0;
  }
  void BreakDirectory() { ASSERT_EQ(std::system(("rm -rf '" + dir_ + "'").c_str()), 0); }
  void RepairDirectory() { ASSERT_EQ(::mkdir(dir_.c_str(), 0700), 0); }

  std::string root_, dir_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<CheckpointStore> store_;
  std::unique_ptr<Durability> durability_;
  std::unique_ptr<SessionRegistry> registry_;
  std::shared_ptr<Session> session_;
};

TEST_F(DurabilityTest, NoDirectoryWritesNothingAndSaysHowToGetOne) {
  Start(/*with_store=*/false, /*strict=*/false, /*every_steps=*/1);
  EXPECT_FALSE(durability_->enabled());
  EXPECT_FALSE(durability_->strict());
  EXPECT_FALSE(durability_->DueAtCommit(1));
  EXPECT_THAT(Commit(1), IsOk());
  EXPECT_THAT(durability_->AfterUpload(*session_), IsOk());
  EXPECT_THAT(durability_->Checkpoint(*session_, absl::ZeroDuration()),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("--checkpoint_dir")));
  EXPECT_THAT(durability_->Forget(session_->id()), IsOk());
}

TEST_F(DurabilityTest, EveryNthStepIsWrittenAtCommit) {
  Start(/*with_store=*/true, /*strict=*/false, /*every_steps=*/3);
  EXPECT_FALSE(durability_->DueAtCommit(1));
  EXPECT_FALSE(durability_->DueAtCommit(2));
  EXPECT_TRUE(durability_->DueAtCommit(3));
  EXPECT_TRUE(durability_->DueAtCommit(6));
  EXPECT_FALSE(durability_->DueAtCommit(7));
  ASSERT_THAT(Commit(1), IsOk());
  ASSERT_THAT(Commit(2), IsOk());
  EXPECT_FALSE(OnDisk());
  ASSERT_THAT(Commit(3), IsOk());
  EXPECT_EQ(StepOnDisk(), 3u);
  ASSERT_THAT(Commit(4), IsOk());
  EXPECT_EQ(StepOnDisk(), 3u);
}

TEST_F(DurabilityTest, ZeroEveryStepsWritesOnlyOnRequest) {
  Start(/*with_store=*/true, /*strict=*/false, /*every_steps=*/0);
  for (uint64_t step = 1; step <= 4; ++step) {
    EXPECT_FALSE(durability_->DueAtCommit(step));
    ASSERT_THAT(Commit(step), IsOk());
  }
  EXPECT_FALSE(OnDisk());
  absl::StatusOr<v1::SessionCheckpoint> written =
      durability_->Checkpoint(*session_, absl::ZeroDuration());
  ASSERT_THAT(written, IsOk());
  EXPECT_EQ(written->step(), 4u);
  EXPECT_EQ(StepOnDisk(), 4u);
}

TEST_F(DurabilityTest, RelaxedFailedWriteIsStillAcknowledged) {
  Start(/*with_store=*/true, /*strict=*/false, /*every_steps=*/1);
  BreakDirectory();
  EXPECT_THAT(Commit(1), IsOk());
  EXPECT_FALSE(durability_->ReplayNeedsWrite(*session_));
  RepairDirectory();
  ASSERT_THAT(Commit(2), IsOk());  // the next due step tries again
  EXPECT_EQ(StepOnDisk(), 2u);
}

TEST_F(DurabilityTest, StrictFailedWriteIsUnavailableUntilAWriteSucceeds) {
  Start(/*with_store=*/true, /*strict=*/true, /*every_steps=*/0);
  EXPECT_TRUE(durability_->strict());
  EXPECT_TRUE(durability_->DueAtCommit(1));
  ASSERT_THAT(Commit(1), IsOk());
  EXPECT_EQ(StepOnDisk(), 1u);
  BreakDirectory();
  EXPECT_THAT(Commit(2), StatusIs(absl::StatusCode::kUnavailable,
                                  HasSubstr("--durability=strict")));
  EXPECT_EQ(session_->step(), 2u);  // applied in memory, not acknowledged
  EXPECT_TRUE(durability_->ReplayNeedsWrite(*session_));
  EXPECT_THAT(durability_->WriteBeforeReplay(*session_, 2),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("still not on disk")));
  EXPECT_TRUE(durability_->ReplayNeedsWrite(*session_));
  RepairDirectory();
  ASSERT_THAT(durability_->WriteBeforeReplay(*session_, 2), IsOk());
  EXPECT_FALSE(durability_->ReplayNeedsWrite(*session_));
  EXPECT_EQ(StepOnDisk(), 2u);
}

TEST_F(DurabilityTest, UploadIsWrittenWheneverCheckpointsAreOn) {
  Start(/*with_store=*/true, /*strict=*/false, /*every_steps=*/0);
  {
    absl::StatusOr<Lease> lease = session_->TryLease(LeasePurpose::kWeightsUpload);
    ASSERT_THAT(lease, IsOk());
    ASSERT_THAT(durability_->AfterUpload(*session_), IsOk());
  }
  EXPECT_TRUE(OnDisk());
  BreakDirectory();
  absl::StatusOr<Lease> lease = session_->TryLease(LeasePurpose::kWeightsUpload);
  ASSERT_THAT(lease, IsOk());
  EXPECT_THAT(durability_->AfterUpload(*session_), StatusIs(absl::StatusCode::kUnavailable));
}

TEST_F(DurabilityTest, CheckpointWaitsForTheLeaseAndImagesTheEngineState) {
  Start(/*with_store=*/true, /*strict=*/false, /*every_steps=*/0);
  ASSERT_THAT(Commit(1), IsOk());
  {
    absl::StatusOr<Session::Admission> step = session_->AdmitStep(2, 0);
    ASSERT_THAT(step, IsOk());
    EXPECT_THAT(durability_->Checkpoint(*session_, absl::ZeroDuration()),
                StatusIs(absl::StatusCode::kDeadlineExceeded));
  }
  ASSERT_THAT(durability_->Checkpoint(*session_, absl::ZeroDuration()), IsOk());
  absl::StatusOr<SessionImage> image = store_->Read(PathOfSession());
  ASSERT_THAT(image, IsOk());
  EXPECT_EQ(image->session_id, session_->id());
  EXPECT_EQ(image->token, session_->token());
  EXPECT_EQ(image->config.SerializeAsString(), session_->config().SerializeAsString());
  EXPECT_EQ(image->step, 1u);
  ASSERT_EQ(image->records.size(), 1u);
  ASSERT_NE(image->records[0], nullptr);
  EXPECT_EQ(image->records[0]->step, 1u);
  ASSERT_EQ(image->params.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    ParamState live = *engine_->ExportState(session_->params()[i].engine_id);
    EXPECT_EQ(image->params[i].step, live.step);
    EXPECT_EQ(image->params[i].momentum, live.momentum);
    EXPECT_EQ(image->params[i].exp_avg, live.exp_avg);
    EXPECT_EQ(image->params[i].exp_avg_sq, live.exp_avg_sq);
  }
  ASSERT_THAT(durability_->Forget(session_->id()), IsOk());
  EXPECT_FALSE(OnDisk());
}

// Placement on several devices --------------------------------------------

std::unique_ptr<Engine> ShardedCpu(int devices) {
  std::vector<std::unique_ptr<Engine>> engines;
  for (int i = 0; i < devices; ++i) engines.push_back(*CreateCpuEngine({}));
  return *CreateShardedEngine(std::move(engines));
}

// Restores every checkpoint of dir into a fresh registry over `engine`;
// returns the devices of `id`'s parameters (ShardOf; 0 on one engine) and
// what the restore wrote to stderr.
std::vector<int> RestoredDevices(const std::string& dir, Engine* engine, const std::string& id,
                                 const std::string& token, Metrics* metrics, std::string* log) {
  std::unique_ptr<CheckpointStore> store = *CheckpointStore::Open(dir);
  DurabilityOptions options;
  options.store = store.get();
  Durability durability(options, engine);
  SessionRegistry registry(engine, Limits(), metrics->sessions(), &durability, nullptr);
  ::testing::internal::CaptureStderr();
  const int restored = registry.RestoreAll();
  *log = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(restored, 1);
  std::vector<int> devices;
  absl::StatusOr<std::shared_ptr<Session>> session = registry.Get(id, token);
  if (!session.ok()) {
    ADD_FAILURE() << session.status();
    return devices;
  }
  for (const SessionParam& p : (*session)->params()) {
    absl::StatusOr<int> device = ShardOf(*engine, p.engine_id);
    devices.push_back(device.ok() ? *device : 0);
  }
  return devices;
}

TEST_F(DurabilityTest, CheckpointRecordsPlacementAndRestoreKeepsItWhereTheDeviceExists) {
  engine_ = ShardedCpu(3);
  Start(/*with_store=*/true, /*strict=*/false, /*every_steps=*/0);
  ASSERT_THAT(durability_->Checkpoint(*session_, absl::ZeroDuration()), IsOk());
  SessionImage image = *store_->Read(PathOfSession());
  ASSERT_EQ(image.devices.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(image.devices[i], *ShardOf(*engine_, session_->params()[i].engine_id)) << i;
  }
  const std::string id = session_->id();
  std::string log;

  // Placed by cost, a fresh engine would put them on devices 0 and 1.
  image.devices = {2, 2};
  ASSERT_THAT(store_->Write(image), IsOk());
  std::unique_ptr<Engine> three = ShardedCpu(3);
  EXPECT_EQ(RestoredDevices(dir_, three.get(), id, session_->token(), metrics_.get(), &log), (std::vector<int>{2, 2}));
  EXPECT_EQ(log, "");

  // A device the server lacks: that parameter is placed again, and said so.
  image.devices = {5, 2};
  ASSERT_THAT(store_->Write(image), IsOk());
  three = ShardedCpu(3);
  EXPECT_EQ(RestoredDevices(dir_, three.get(), id, session_->token(), metrics_.get(), &log), (std::vector<int>{0, 2}));
  EXPECT_THAT(log, HasSubstr("session " + id + ": 1 of 2 parameters were on devices this server "
                             "does not have (it has 3); placed again by cost"));

  // One engine: device 0 is kept, the others are not on this server.
  std::unique_ptr<Engine> one = *CreateCpuEngine({});
  EXPECT_EQ(RestoredDevices(dir_, one.get(), id, session_->token(), metrics_.get(), &log), (std::vector<int>{0, 0}));
  EXPECT_THAT(log, HasSubstr("2 of 2 parameters were on devices this server does not have (it "
                             "has 1)"));

  // A checkpoint of one device records no placement.
  image.devices.clear();
  ASSERT_THAT(store_->Write(image), IsOk());
  EXPECT_TRUE(store_->Read(PathOfSession())->devices.empty());
}

// Idle removal ------------------------------------------------------------

TEST_F(DurabilityTest, IdleSessionIsCheckpointedThenRemoved) {
  Start(/*with_store=*/true, /*strict=*/false, /*every_steps=*/0, absl::Hours(1));
  ASSERT_THAT(Commit(1), IsOk());
  const absl::Time active = session_->last_activity();
  EXPECT_EQ(registry_->RemoveIdle(active + absl::Minutes(59)), 0);
  EXPECT_EQ(registry_->List().size(), 1u);
  EXPECT_EQ(registry_->RemoveIdle(active + absl::Hours(1)), 1);
  EXPECT_TRUE(registry_->List().empty());
  EXPECT_THAT(registry_->Get(session_->id(), session_->token()),
              StatusIs(absl::StatusCode::kNotFound, HasSubstr("--session_idle_ttl")));
  EXPECT_THAT(session_->AdmitStep(2, 0), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(StepOnDisk(), 1u);  // the checkpoint stays for a restart
}

TEST_F(DurabilityTest, ActivityPostponesIdleRemoval) {
  Start(/*with_store=*/false, /*strict=*/false, /*every_steps=*/0, absl::Hours(1));
  const absl::Time created = session_->last_activity();
  v1::SessionInfo info;
  session_->FillInfo(/*with_params=*/false, &info);
  EXPECT_TRUE(info.has_last_activity_time());
  ASSERT_THAT(Commit(1), IsOk());
  const absl::Time stepped = session_->last_activity();
  EXPECT_GE(stepped, created);
  ASSERT_THAT(registry_->Get(session_->id(), session_->token()), IsOk());
  EXPECT_GE(session_->last_activity(), stepped);
  // A checkpoint is the server's doing, not the client's.
  { ASSERT_THAT(session_->AwaitLease(absl::ZeroDuration()), IsOk()); }
  const absl::Time before = session_->last_activity();
  { ASSERT_THAT(session_->AwaitLease(absl::ZeroDuration()), IsOk()); }
  EXPECT_EQ(session_->last_activity(), before);
  // Removed without a checkpoint directory too: its memory is what matters.
  EXPECT_EQ(registry_->RemoveIdle(before + absl::Hours(2)), 1);
}

TEST_F(DurabilityTest, BusySessionIsNotIdle) {
  Start(/*with_store=*/false, /*strict=*/false, /*every_steps=*/0, absl::Hours(1));
  absl::StatusOr<Session::Admission> step = session_->AdmitStep(1, 0);
  ASSERT_THAT(step, IsOk());
  EXPECT_EQ(registry_->RemoveIdle(absl::Now() + absl::Hours(2)), 0);
  EXPECT_EQ(registry_->List().size(), 1u);
}

TEST_F(DurabilityTest, FailedCheckpointKeepsTheIdleSession) {
  Start(/*with_store=*/true, /*strict=*/false, /*every_steps=*/0, absl::Hours(1));
  BreakDirectory();
  const absl::Time later = absl::Now() + absl::Hours(2);
  EXPECT_EQ(registry_->RemoveIdle(later), 0);
  ASSERT_EQ(registry_->List().size(), 1u);
  RepairDirectory();
  // Tried again a TTL after the failed try, not at the next tick.
  EXPECT_EQ(registry_->RemoveIdle(absl::Now() + absl::Minutes(30)), 0);
  EXPECT_EQ(registry_->RemoveIdle(absl::Now() + absl::Hours(1)), 1);
  EXPECT_TRUE(OnDisk());
}

TEST_F(DurabilityTest, ZeroTtlNeverRemoves) {
  Start(/*with_store=*/false, /*strict=*/false, /*every_steps=*/0, absl::ZeroDuration());
  EXPECT_EQ(registry_->RemoveIdle(absl::Now() + absl::Hours(24 * 365)), 0);
  EXPECT_EQ(registry_->List().size(), 1u);
}

}  // namespace
}  // namespace muon::server
