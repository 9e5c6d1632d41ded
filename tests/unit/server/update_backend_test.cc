// UpdateStepBackend with the CPU engine and a fake StepEvents whose pool is a
// queue the test runs by hand: every task boundary is a point where the test
// can cancel.

#include "step/update_backend.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "muon/kernels/sharded_engine.h"
#include "muon/kernels/status_macros.h"
#include "observability/metrics.h"
#include "step/grad_scale.h"
#include "session/registry.h"
#include "status_matchers.h"

namespace muon::server {
namespace {

using ::muon::testing::IsOk;
using ::muon::testing::StatusIs;
using ::testing::HasSubstr;

class FakeEvents final : public StepEvents {
 public:
  void Schedule(absl::AnyInvocable<void() &&> work) override { tasks.push_back(std::move(work)); }
  void Pin() override { ++pins; }
  void Unpin() override { --pins; }
  // From the engine's compute threads, several at once (StepEvents is
  // thread-safe); the test reads `updates` once the task has returned.
  void Updates(std::vector<StepResponsePtr> responses) override {
    absl::MutexLock lock(updates_mu.get());
    for (StepResponsePtr& r : responses) updates.push_back(std::move(r));
  }
  size_t UpdateCount() const {
    absl::MutexLock lock(updates_mu.get());
    return updates.size();
  }
  void Committed(std::vector<StepResponsePtr> responses, bool replayed_step) override {
    EXPECT_FALSE(terminal());
    committed = std::move(responses);
    replayed = replayed_step;
  }
  void Failed(absl::Status status) override {
    EXPECT_FALSE(terminal());
    failed = std::move(status);
  }

  void RunAll() {
    while (!tasks.empty()) {
      absl::AnyInvocable<void() &&> task = std::move(tasks.front());
      tasks.pop_front();
      std::move(task)();
    }
  }
  bool terminal() const { return committed.has_value() || failed.has_value(); }

  std::deque<absl::AnyInvocable<void() &&>> tasks;
  int pins = 0;
  std::unique_ptr<absl::Mutex> updates_mu = std::make_unique<absl::Mutex>();
  std::vector<StepResponsePtr> updates;
  std::optional<std::vector<StepResponsePtr>> committed;
  bool replayed = false;
  std::optional<absl::Status> failed;
};

// A 16×8 Muon matrix and an 8-vector (AdamW), fp32.
std::unique_ptr<std::byte[]> Gradient(int64_t n, float value) {
  auto bytes = std::make_unique<std::byte[]>(n * sizeof(float));
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = value * static_cast<float>(i % 7 - 3);
  std::memcpy(bytes.get(), v.data(), n * sizeof(float));
  return bytes;
}

class UpdateBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    metrics_ = *Metrics::Create("");
    engine_ = MakeEngine();
    durability_ = std::make_unique<Durability>(DurabilityOptions{}, engine_.get());
    registry_ = std::make_unique<SessionRegistry>(engine_.get(), Limits{}, metrics_->sessions(),
                                                  durability_.get(), nullptr);
    v1::CreateSessionRequest request;
    v1::ParameterSpec* w = request.add_params();
    w->set_name("w");
    w->add_shape(16);
    w->add_shape(8);
    v1::ParameterSpec* b = request.add_params();
    b->set_name("b");
    b->add_shape(8);
    session_ = *registry_->Create(request);
    request_ = request;
    env_.engine = engine_.get();
    env_.durability = durability_.get();
    env_.metrics = metrics_->steps();
    env_.update_chunk_bytes = 1030;  // no element size divides it
  }

  virtual std::unique_ptr<Engine> MakeEngine() { return *CreateCpuEngine(EngineOptions{}); }

  std::unique_ptr<UpdateStepBackend> Backend() {
    return std::make_unique<UpdateStepBackend>(env_, session_, &events_);
  }

  static v1::StepHeader Header(uint64_t step) {
    v1::StepHeader h;
    h.set_step(step);
    return h;
  }

  // Step `step` whole on `backend` (every element of w's gradient `w`, of
  // b's `b`), its tasks run: it commits, and events_ holds what it sent.
  void CommitWholeStep(UpdateStepBackend& backend, uint64_t step, float w, float b) {
    ASSERT_THAT(backend.Admit(Header(step)), IsOk());
    backend.Gradient(0, Gradient(128, w));
    backend.Gradient(1, Gradient(8, b));
    ASSERT_THAT(backend.End({0, 1}, 544, std::nullopt), IsOk());
    events_.RunAll();
    ASSERT_TRUE(events_.committed.has_value());
  }

  // One whole committed step 1.
  void CommitStepOne() {
    ASSERT_NO_FATAL_FAILURE(CommitWholeStep(*Backend(), 1, 0.5f, 0.25f));
    events_ = FakeEvents();
  }

  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Durability> durability_;
  std::unique_ptr<SessionRegistry> registry_;
  std::shared_ptr<Session> session_;
  v1::CreateSessionRequest request_;
  StepBackendEnv env_;
  FakeEvents events_;
};

TEST_F(UpdateBackendTest, UpdatesStreamInWholeElementsAndTheSummaryCommits) {
  auto backend = Backend();
  absl::StatusOr<StepBackend::Admission> admission = backend->Admit(Header(1));
  ASSERT_THAT(admission, IsOk());
  EXPECT_EQ(admission->role, StepBackend::Role::kReceive);
  ASSERT_EQ(admission->params.size(), 2u);
  EXPECT_EQ(admission->params[0].bytes, 512);

  backend->Gradient(0, Gradient(128, 0.5f));
  events_.RunAll();
  ASSERT_EQ(events_.updates.size(), 1u);  // 512 bytes, one chunk
  EXPECT_EQ(session_->step(), 0u);        // computed, not committed
  backend->Gradient(1, Gradient(8, 0.25f));
  ASSERT_THAT(backend->End({0, 1}, 544, std::nullopt), IsOk());
  events_.RunAll();
  ASSERT_TRUE(events_.committed.has_value());
  EXPECT_FALSE(events_.replayed);
  ASSERT_EQ(events_.committed->size(), 1u);
  const v1::StepSummary& summary = events_.committed->front()->message.summary();
  EXPECT_EQ(summary.step(), 1u);
  EXPECT_EQ(summary.bytes_received(), 544u);
  EXPECT_EQ(summary.bytes_sent(), 544u);
  EXPECT_EQ(session_->step(), 1u);
  for (const StepResponsePtr& r : events_.updates) {
    EXPECT_EQ(r->update_data().size() % 4, 0u);
    EXPECT_LE(r->update_data().size(), 1028u);
  }
}

// The session's two parameters on two CPU engines behind a sharded engine,
// as on two GPUs.
class ShardedUpdateBackendTest : public UpdateBackendTest {
 protected:
  std::unique_ptr<Engine> MakeEngine() override {
    std::vector<std::unique_ptr<Engine>> engines;
    engines.push_back(*CreateCpuEngine(EngineOptions{}));
    engines.push_back(*CreateCpuEngine(EngineOptions{}));
    return *CreateShardedEngine(std::move(engines));
  }
};

// Each device's compute seconds, summed over the step's batches, reach
// muon_device_compute_seconds once per committed step.
TEST_F(ShardedUpdateBackendTest, CommittedStepReportsComputeSecondsPerDevice) {
  ASSERT_NE(*ShardOf(*engine_, session_->params()[0].engine_id),
            *ShardOf(*engine_, session_->params()[1].engine_id));
  metrics_->SetDeviceProbe({"0", "1"}, [] { return std::vector<ShardLoad>(2); });
  CommitStepOne();
  const std::string text = metrics_->Text();
  EXPECT_THAT(text, HasSubstr("muon_device_compute_seconds_count{device=\"0\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("muon_device_compute_seconds_count{device=\"1\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("muon_step_duration_seconds_count{phase=\"compute\"} 1\n"));
}

// A CPU engine on one compute thread (the parameters run one after another,
// largest first, on the caller's thread) that notes, each time it reports an
// update, how many update chunks the stream had been handed by then.
class WatchedEngine final : public Engine {
 public:
  explicit WatchedEngine(const FakeEvents* events)
      : inner_(*CreateCpuEngine({.blas_threads = 1, .compute_threads = 1})), events_(events) {}

  absl::string_view name() const override { return inner_->name(); }
  absl::StatusOr<ParamId> Register(const ParamSpec& spec) override {
    return inner_->Register(spec);
  }
  absl::Status Unregister(ParamId id) override { return inner_->Unregister(id); }
  absl::StatusOr<ParamSpec> Spec(ParamId id) const override { return inner_->Spec(id); }
  absl::StatusOr<std::unique_ptr<StepTransaction>> BeginStep(const StepOptions& options) override {
    MUON_ASSIGN_OR_RETURN(std::unique_ptr<StepTransaction> txn, inner_->BeginStep(options));
    return std::unique_ptr<StepTransaction>(new Transaction(std::move(txn), this));
  }
  absl::Status SetWeights(ParamId id, absl::Span<const float> values) override {
    return inner_->SetWeights(id, values);
  }
  absl::Status GetWeights(ParamId id, absl::Span<float> values) const override {
    return inner_->GetWeights(id, values);
  }
  absl::StatusOr<ParamState> ExportState(ParamId id) const override {
    return inner_->ExportState(id);
  }
  absl::Status ImportState(ParamId id, const ParamState& state) override {
    return inner_->ImportState(id, state);
  }
  MemoryUsage Memory() const override { return inner_->Memory(); }

  // Per reported update, in order: the chunks sent before it was reported.
  std::vector<size_t> chunks_before_report;

 private:
  class Transaction final : public StepTransaction {
   public:
    Transaction(std::unique_ptr<StepTransaction> inner, WatchedEngine* engine)
        : inner_(std::move(inner)), engine_(engine) {}
    absl::Status Compute(absl::Span<const GradientInput> grads, absl::Span<UpdateOutput> outputs,
                         StepStats* stats, UpdateReadyFn ready) override {
      return inner_->Compute(grads, outputs, stats, [&](size_t i) {
        engine_->chunks_before_report.push_back(engine_->events_->UpdateCount());
        ready(i);
      });
    }
    absl::Status ComputedWeights(ParamId param, absl::Span<float> values) const override {
      return inner_->ComputedWeights(param, values);
    }
    absl::Status Commit() override { return inner_->Commit(); }

   private:
    std::unique_ptr<StepTransaction> inner_;
    WatchedEngine* engine_;
  };

  std::unique_ptr<Engine> inner_;
  const FakeEvents* events_;
};

class WatchedUpdateBackendTest : public UpdateBackendTest {
 protected:
  std::unique_ptr<Engine> MakeEngine() override {
    auto engine = std::make_unique<WatchedEngine>(&events_);
    watched_ = engine.get();
    return engine;
  }
  WatchedEngine* watched_ = nullptr;
};

// Both gradients are in before the task runs, so the engine gets them in one
// call; the first update's chunk still goes out before the second parameter
// is done, not after the whole call.
TEST_F(WatchedUpdateBackendTest, TheFirstUpdateIsSentBeforeTheLastParameterIsComputed) {
  ASSERT_NO_FATAL_FAILURE(CommitWholeStep(*Backend(), 1, 0.5f, 0.25f));
  // w (the larger) is reported first; when b is, w's one chunk was sent.
  EXPECT_EQ(watched_->chunks_before_report, (std::vector<size_t>{0, 1}));
  ASSERT_EQ(events_.updates.size(), 2u);
  EXPECT_EQ(events_.updates[0]->message.update().param_index(), 0u);
  EXPECT_EQ(events_.updates[1]->message.update().param_index(), 1u);
  EXPECT_EQ(events_.committed->back()->message.summary().bytes_sent(), 544u);
  // The record answers a retry with every chunk, the summary last.
  events_ = FakeEvents();
  auto retry = Backend();
  ASSERT_THAT(retry->Admit(Header(1)), IsOk());
  retry->Replay();
  events_.RunAll();
  ASSERT_TRUE(events_.committed.has_value());
  ASSERT_EQ(events_.committed->size(), 3u);
  EXPECT_TRUE(events_.committed->back()->message.has_summary());
}

// An update sent before a later parameter of the same engine call fails
// belongs to a step that fails: nothing is committed (the client discards
// what it buffered, docs/api.md), and the session is free for the step.
TEST_F(WatchedUpdateBackendTest, AFailureAfterAnUpdateWasSentFailsTheStep) {
  auto backend = Backend();
  ASSERT_THAT(backend->Admit(Header(1)), IsOk());
  std::unique_ptr<std::byte[]> bad = Gradient(8, 1.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(bad.get() + 4, &nan, sizeof nan);
  backend->Gradient(0, Gradient(128, 0.5f));
  backend->Gradient(1, std::move(bad));
  events_.RunAll();
  EXPECT_EQ(events_.updates.size(), 1u);  // w's, sent before b failed
  ASSERT_TRUE(events_.failed.has_value());
  EXPECT_THAT(*events_.failed, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("NaN")));
  EXPECT_FALSE(events_.committed.has_value());
  EXPECT_EQ(session_->step(), 0u);
  EXPECT_TRUE(backend->Abort());
  events_ = FakeEvents();
  CommitStepOne();
}

// A computed step gives its gradient buffers back to the session, and the
// next step's stream assembles into the kept gradient buffer; its update
// buffers are sent and recorded from, so they are not free yet.
TEST_F(UpdateBackendTest, AStepKeepsItsBuffersForTheNextStep) {
  auto backend = Backend();
  absl::StatusOr<StepBackend::Admission> admission = backend->Admit(Header(1));
  ASSERT_THAT(admission, IsOk());
  EXPECT_EQ(admission->gradient_buffers, &session_->gradient_buffers());
  std::unique_ptr<std::byte[]> gradient = Gradient(128, 0.5f);
  const std::byte* kept = gradient.get();
  backend->Gradient(0, std::move(gradient));
  backend->Gradient(1, Gradient(8, 0.25f));
  ASSERT_THAT(backend->End({0, 1}, 544, std::nullopt), IsOk());
  events_.RunAll();
  ASSERT_TRUE(events_.committed.has_value());
  EXPECT_EQ(session_->gradient_buffers().kept_bytes(), 512 + 32);
  EXPECT_EQ(session_->update_buffers().kept_bytes(), 0);
  EXPECT_EQ(session_->gradient_buffers().Take(0, 512).get(), kept);
}

// Each parameter's update bytes, from the chunks in `responses`.
std::vector<std::string> Assemble(const std::vector<StepResponsePtr>& responses) {
  std::vector<std::string> out(2);
  for (const StepResponsePtr& r : responses) {
    if (!r->message.has_update()) continue;
    const v1::UpdateChunk& chunk = r->message.update();
    const absl::Span<const std::byte> data = r->update_data();
    std::string& buf = out[chunk.param_index()];
    buf.resize(chunk.total_bytes());
    buf.replace(chunk.offset(), data.size(), reinterpret_cast<const char*>(data.data()),
                data.size());
  }
  return out;
}

// Where update `index`'s first chunk lies.
const std::byte* DataOf(const std::vector<StepResponsePtr>& responses, uint32_t index) {
  for (const StepResponsePtr& r : responses) {
    if (r->message.has_update() && r->message.update().param_index() == index &&
        r->message.update().offset() == 0) {
      return r->update_data().data();
    }
  }
  return nullptr;
}

// An update chunk is sent from the buffer the engine wrote, not a copy; the
// next step writes into another while the record holds it, and the buffer
// is reused once nothing holds it any more.
TEST_F(UpdateBackendTest, UpdatesAreSentFromABufferReusedOnceNothingHoldsIt) {
  CommitStepOne();
  std::shared_ptr<const StepRecord> first = *session_->Recorded(1, 0);
  const std::byte* first_buffer = DataOf(first->responses, 0);
  ASSERT_NE(first_buffer, nullptr);
  EXPECT_EQ(session_->update_buffers().kept_bytes(), 0);

  ASSERT_NO_FATAL_FAILURE(CommitWholeStep(*Backend(), 2, -0.5f, 0.75f));
  const std::byte* second_buffer = DataOf(events_.updates, 0);
  EXPECT_NE(second_buffer, first_buffer);
  // Step 2's record replaced step 1's, but `first` still holds its buffers.
  EXPECT_EQ(session_->update_buffers().kept_bytes(), 0);
  first.reset();
  EXPECT_EQ(session_->update_buffers().kept_bytes(), 512 + 32);
  events_ = FakeEvents();

  auto third = Backend();
  ASSERT_THAT(third->Admit(Header(3)), IsOk());
  third->Gradient(0, Gradient(128, 0.25f));
  events_.RunAll();
  EXPECT_EQ(DataOf(events_.updates, 0), first_buffer);
  EXPECT_TRUE(third->Abort());
}

// A retry of a committed step answers with its own bytes even after the next
// step computed updates (into other buffers) and failed.
TEST_F(UpdateBackendTest, AReplayAfterTheNextStepComputedAnswersTheCommittedBytes) {
  ASSERT_NO_FATAL_FAILURE(CommitWholeStep(*Backend(), 1, 0.5f, 0.25f));
  const std::vector<std::string> committed = Assemble(events_.updates);
  events_ = FakeEvents();

  auto next = Backend();
  ASSERT_THAT(next->Admit(Header(2)), IsOk());
  next->Gradient(0, Gradient(128, -3.0f));
  next->Gradient(1, Gradient(8, 2.0f));
  events_.RunAll();
  ASSERT_EQ(events_.updates.size(), 2u);
  EXPECT_NE(Assemble(events_.updates), committed);
  EXPECT_TRUE(next->Abort());
  events_ = FakeEvents();

  auto retry = Backend();
  absl::StatusOr<StepBackend::Admission> admission = retry->Admit(Header(1));
  ASSERT_THAT(admission, IsOk());
  ASSERT_EQ(admission->role, StepBackend::Role::kReplay);
  retry->Replay();
  events_.RunAll();
  ASSERT_TRUE(events_.committed.has_value());
  EXPECT_EQ(Assemble(*events_.committed), committed);
  EXPECT_EQ(session_->step(), 1u);
}

TEST_F(UpdateBackendTest, AnAbortWhileATaskIsPendingEndsWithFailedAndFreesTheSession) {
  auto backend = Backend();
  ASSERT_THAT(backend->Admit(Header(1)), IsOk());
  backend->Gradient(0, Gradient(128, 0.5f));
  EXPECT_FALSE(backend->Abort());  // its task is scheduled
  EXPECT_FALSE(events_.terminal());
  events_.RunAll();
  ASSERT_TRUE(events_.failed.has_value());
  EXPECT_THAT(*events_.failed, StatusIs(absl::StatusCode::kAborted));
  EXPECT_TRUE(events_.updates.empty());
  EXPECT_EQ(session_->step(), 0u);
  events_ = FakeEvents();
  CommitStepOne();  // the session is free for the same step
}

TEST_F(UpdateBackendTest, AnAbortWithNothingRunningFreesTheSessionAtOnce) {
  auto backend = Backend();
  ASSERT_THAT(backend->Admit(Header(1)), IsOk());
  EXPECT_TRUE(backend->Abort());
  EXPECT_TRUE(events_.tasks.empty());
  CommitStepOne();
}

TEST_F(UpdateBackendTest, ASecondStepWhileOneIsInFlightIsAborted) {
  auto first = Backend();
  ASSERT_THAT(first->Admit(Header(1)), IsOk());
  EXPECT_THAT(Backend()->Admit(Header(1)), StatusIs(absl::StatusCode::kAborted));
  EXPECT_TRUE(first->Abort());
}

TEST_F(UpdateBackendTest, AnEngineErrorFailsTheStepAndFreesTheSession) {
  auto backend = Backend();
  ASSERT_THAT(backend->Admit(Header(1)), IsOk());
  std::unique_ptr<std::byte[]> bad = Gradient(8, 1.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(bad.get() + 4, &nan, sizeof nan);
  backend->Gradient(1, std::move(bad));
  events_.RunAll();
  ASSERT_TRUE(events_.failed.has_value());
  EXPECT_THAT(*events_.failed, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("NaN")));
  EXPECT_TRUE(backend->Abort());  // nothing left to let go
  events_ = FakeEvents();
  CommitStepOne();
}

TEST_F(UpdateBackendTest, ARetryOfTheCommittedStepIsReplayed) {
  CommitStepOne();
  auto backend = Backend();
  absl::StatusOr<StepBackend::Admission> admission = backend->Admit(Header(1));
  ASSERT_THAT(admission, IsOk());
  EXPECT_EQ(admission->role, StepBackend::Role::kReplay);
  backend->Replay();
  EXPECT_FALSE(events_.terminal());  // answered off the caller's thread
  events_.RunAll();
  ASSERT_TRUE(events_.committed.has_value());
  EXPECT_TRUE(events_.replayed);
  EXPECT_TRUE(events_.committed->back()->message.summary().replayed());
  EXPECT_EQ(events_.committed->size(), 3u);  // two updates, then the summary
  EXPECT_EQ(session_->step(), 1u);
  EXPECT_THAT(Backend()->Admit(Header(3)),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("expected step is 2")));
}

std::unique_ptr<std::byte[]> Scaled(const std::unique_ptr<std::byte[]>& bytes, int64_t n,
                                    float scale) {
  std::vector<float> v(n);
  std::memcpy(v.data(), bytes.get(), n * sizeof(float));
  for (float& x : v) x *= scale;
  auto out = std::make_unique<std::byte[]>(n * sizeof(float));
  std::memcpy(out.get(), v.data(), n * sizeof(float));
  return out;
}

TEST_F(UpdateBackendTest, DeferredComputeWaitsForStepEndAndScalesEveryGradientFirst) {
  const float scale = 0.3712f;
  auto backend = Backend();
  v1::StepHeader header = Header(1);
  header.set_defer_compute(true);
  ASSERT_THAT(backend->Admit(header), IsOk());
  backend->Gradient(0, Gradient(128, 0.5f));
  backend->Gradient(1, Gradient(8, 0.25f));
  EXPECT_TRUE(events_.tasks.empty());  // nothing computed before StepEnd
  ASSERT_THAT(backend->End({0, 1}, 544, double{scale}), IsOk());
  events_.RunAll();
  ASSERT_TRUE(events_.committed.has_value());
  const std::vector<std::string> deferred = Assemble(events_.updates);

  // The same step, not deferred, on gradients scaled here in fp32.
  request_.set_name("reference");
  std::shared_ptr<Session> reference = *registry_->Create(request_);
  FakeEvents events;
  UpdateStepBackend plain(env_, reference, &events);
  ASSERT_THAT(plain.Admit(Header(1)), IsOk());
  plain.Gradient(0, Scaled(Gradient(128, 0.5f), 128, scale));
  plain.Gradient(1, Scaled(Gradient(8, 0.25f), 8, scale));
  ASSERT_THAT(plain.End({0, 1}, 544, std::nullopt), IsOk());
  events.RunAll();
  ASSERT_TRUE(events.committed.has_value());
  const std::vector<std::string> expected = Assemble(events.updates);
  ASSERT_EQ(deferred[0].size(), 512u);
  ASSERT_EQ(deferred[1].size(), 32u);
  EXPECT_EQ(deferred, expected);

  // The unscaled step differs: the factor was applied.
  FakeEvents unscaled_events;
  request_.set_name("unscaled");
  UpdateStepBackend unscaled(env_, *registry_->Create(request_), &unscaled_events);
  ASSERT_THAT(unscaled.Admit(Header(1)), IsOk());
  unscaled.Gradient(0, Gradient(128, 0.5f));
  unscaled.Gradient(1, Gradient(8, 0.25f));
  ASSERT_THAT(unscaled.End({0, 1}, 544, std::nullopt), IsOk());
  unscaled_events.RunAll();
  EXPECT_NE(Assemble(unscaled_events.updates), deferred);
}

TEST_F(UpdateBackendTest, ABadGradScaleIsRefusedAndNothingIsApplied) {
  for (double bad : {0.0, -0.5, std::numeric_limits<double>::quiet_NaN(),
                     std::numeric_limits<double>::infinity()}) {
    auto backend = Backend();
    v1::StepHeader header = Header(1);
    header.set_defer_compute(true);
    ASSERT_THAT(backend->Admit(header), IsOk());
    backend->Gradient(0, Gradient(128, 0.5f));
    EXPECT_THAT(backend->End({0}, 512, bad),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("finite and > 0")));
    EXPECT_TRUE(backend->Abort());  // nothing was scheduled
    EXPECT_TRUE(events_.updates.empty());
    EXPECT_EQ(session_->step(), 0u);
  }
  CommitStepOne();
}

TEST_F(UpdateBackendTest, AGradScaleWithoutDeferredComputeIsRefused) {
  auto backend = Backend();
  ASSERT_THAT(backend->Admit(Header(1)), IsOk());
  backend->Gradient(0, Gradient(128, 0.5f));
  EXPECT_THAT(backend->End({0}, 512, 0.5),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("defer_compute")));
  EXPECT_FALSE(backend->Abort());  // the gradient's task is scheduled
  events_.RunAll();
  ASSERT_TRUE(events_.failed.has_value());
  EXPECT_EQ(session_->step(), 0u);
  events_ = FakeEvents();
  CommitStepOne();
}

// benchmark_echo: the wire benchmark's session (docs/performance.md, "Wire").
class EchoSessionTest : public UpdateBackendTest {
 protected:
  // The session's request asking for benchmark_echo.
  v1::CreateSessionRequest EchoRequest() const {
    v1::CreateSessionRequest request = request_;
    request.set_name("echo");
    request.set_benchmark_echo(true);
    return request;
  }
  std::unique_ptr<SessionRegistry> AllowingRegistry() {
    Limits limits;
    limits.allow_benchmark_sessions = true;
    return std::make_unique<SessionRegistry>(engine_.get(), limits, metrics_->sessions(),
                                             durability_.get(), nullptr);
  }
};

// A server not started with --allow_benchmark_sessions never makes one, so
// no training session gets updates that are its gradients by accident.
TEST_F(EchoSessionTest, IsRefusedUnlessTheServerAllowsIt) {
  EXPECT_THAT(registry_->Create(EchoRequest()),
              StatusIs(absl::StatusCode::kFailedPrecondition,
                       HasSubstr("--allow_benchmark_sessions")));
  v1::CreateSessionRequest ps = EchoRequest();
  ps.set_mode(v1::SESSION_MODE_PARAMETER_SERVER);
  EXPECT_THAT(AllowingRegistry()->Create(ps),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("SESSION_MODE_UPDATES")));
  absl::StatusOr<std::shared_ptr<Session>> allowed = AllowingRegistry()->Create(EchoRequest());
  ASSERT_THAT(allowed, IsOk());
  v1::SessionInfo info;
  (*allowed)->FillInfo(false, &info);
  EXPECT_TRUE(info.benchmark_echo());
  session_->FillInfo(false, &info);
  EXPECT_FALSE(info.benchmark_echo());
}

// Each update is the gradient itself, in the update dtype, with decay 1, and
// the step commits.
TEST_F(EchoSessionTest, UpdatesAreTheGradients) {
  std::unique_ptr<SessionRegistry> registry = AllowingRegistry();
  std::shared_ptr<Session> session = *registry->Create(EchoRequest());
  std::mt19937 rng(::testing::UnitTest::GetInstance()->random_seed());
  std::normal_distribution<float> normal;
  std::vector<float> w(128), b(8);
  for (float& x : w) x = normal(rng);
  for (float& x : b) x = normal(rng);
  auto bytes_of = [](const std::vector<float>& v) {
    auto out = std::make_unique<std::byte[]>(v.size() * sizeof(float));
    std::memcpy(out.get(), v.data(), v.size() * sizeof(float));
    return out;
  };
  for (v1::DType update_dtype : {v1::DTYPE_UNSPECIFIED, v1::DTYPE_BFLOAT16}) {
    FakeEvents events;
    UpdateStepBackend backend(env_, session, &events);
    v1::StepHeader header = Header(session->step() + 1);
    header.set_update_dtype(update_dtype);
    ASSERT_THAT(backend.Admit(header), IsOk());
    backend.Gradient(0, bytes_of(w));
    backend.Gradient(1, bytes_of(b));
    ASSERT_THAT(backend.End({0, 1}, 544, std::nullopt), IsOk());
    events.RunAll();
    ASSERT_TRUE(events.committed.has_value());
    for (const StepResponsePtr& r : events.updates) EXPECT_EQ(r->message.update().decay(), 1.0);
    const std::vector<std::string> got = Assemble(events.updates);
    const bool bf16 = update_dtype == v1::DTYPE_BFLOAT16;
    std::vector<std::string> expected;
    for (const std::vector<float>* v : {&w, &b}) {
      std::string e(v->size() * (bf16 ? 2 : 4), '\0');
      EncodeFromFloat(bf16 ? DType::kBFloat16 : DType::kFloat32, v->data(), v->size(),
                      reinterpret_cast<std::byte*>(e.data()));
      expected.push_back(std::move(e));
    }
    EXPECT_EQ(got, expected);
  }
  EXPECT_EQ(session->step(), 2u);
}

TEST(GradScaleTest, ScaledGradientDecodesThenMultipliesInFloat32) {
  // bf16 1.5, -2.0 and 3.0 (the top halves of their fp32 bits).
  const uint16_t bits[] = {0x3FC0, 0xC000, 0x4040};
  std::vector<std::byte> bytes(sizeof bits);
  std::memcpy(bytes.data(), bits, sizeof bits);
  const std::vector<float> out = ScaledGradient(DType::kBFloat16, bytes, 0.1f);
  EXPECT_EQ(out, (std::vector<float>{1.5f * 0.1f, -2.0f * 0.1f, 3.0f * 0.1f}));
}

}  // namespace
}  // namespace muon::server
