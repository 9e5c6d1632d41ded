// Parameter-server rounds without gRPC: a registry and the CPU engine in
// this process, workers' streams played by direct Join/Add/End calls.

#include "ps/ps_round.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "muon/kernels/engine.h"
#include "muon/kernels/sharded_engine.h"
#include "observability/metrics.h"
#include "session/registry.h"
#include "status_matchers.h"

namespace muon::server {
namespace {

using ::muon::testing::IsOk;
using ::muon::testing::StatusIs;
using ::testing::HasSubstr;
using Role = ParameterServerRounds::Role;

constexpr absl::Duration kTimeout = absl::Seconds(60);

struct Waiter final : RoundWaiter {
  void RoundDone(absl::StatusOr<std::shared_ptr<const StepRecord>> r) override {
    EXPECT_FALSE(result.has_value()) << "RoundDone called twice";
    EXPECT_EQ(held, 0) << "RoundDone while an Answers delivery holds the waiter";
    result = std::move(r);
  }
  void Answers(std::vector<std::shared_ptr<const StepReply>> responses) override {
    EXPECT_FALSE(result.has_value()) << "Answers after RoundDone";
    EXPECT_GT(held, 0) << "Answers without a Hold";
    for (auto& r : responses) {
      EXPECT_TRUE(r->message.has_update());
      answered.push_back(std::move(r));
    }
  }
  void Hold() override { ++held; }
  void Release() override { --held; }
  // Parameters answered before the commit, in the order they came.
  std::vector<uint32_t> AnsweredParams() const {
    std::vector<uint32_t> out;
    for (const auto& r : answered) {
      if (out.empty() || out.back() != r->message.update().param_index()) {
        out.push_back(r->message.update().param_index());
      }
    }
    return out;
  }
  std::optional<absl::StatusOr<std::shared_ptr<const StepRecord>>> result;
  std::vector<std::shared_ptr<const StepReply>> answered;
  int held = 0;
};

// An 8×4 Muon matrix and a 4-vector (AdamW), fp32.
const std::vector<int64_t> kSizes = {32, 4};

std::vector<std::vector<float>> RandomGradient(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<std::vector<float>> out;
  for (int64_t n : kSizes) {
    std::vector<float> v(n);
    for (float& x : v) x = normal(rng);
    out.push_back(std::move(v));
  }
  return out;
}

using Gradient = std::vector<std::vector<float>>;

std::shared_ptr<const std::byte[]> Bytes(const std::vector<float>& v) {
  auto bytes = std::make_unique<std::byte[]>(v.size() * sizeof(float));
  std::memcpy(bytes.get(), v.data(), v.size() * sizeof(float));
  return std::shared_ptr<const std::byte[]>(std::move(bytes));
}

// What a worker's stream does with one parameter's gradient: hands it to
// the round and drives the round when asked to (the backend schedules it).
void AddParam(ParameterServerRounds* rounds, RoundWaiter* stream, uint32_t index,
              const Gradient& g) {
  if (rounds->Add(stream, index, Bytes(g[index]))) rounds->Drive();
}

// A worker's whole stream: every parameter in order, then its StepEnd.
absl::Status Send(ParameterServerRounds* rounds, RoundWaiter* stream, const Gradient& g) {
  for (uint32_t i = 0; i < g.size(); ++i) AddParam(rounds, stream, i, g);
  return rounds->End(stream, 0);
}

// The weights a record's WEIGHTS chunks carry, fp32, by parameter.
std::vector<std::vector<float>> WeightsOf(const StepRecord& record) {
  std::vector<std::vector<float>> out(kSizes.size());
  for (const auto& r : record.responses) {
    if (!r->message.has_update()) continue;
    const v1::UpdateChunk& u = r->message.update();
    EXPECT_EQ(u.content(), v1::UPDATE_CONTENT_WEIGHTS);
    std::vector<float>& dst = out.at(u.param_index());
    dst.resize(u.total_bytes() / sizeof(float));
    std::memcpy(reinterpret_cast<char*>(dst.data()) + u.offset(), u.data().data(),
                u.data().size());
  }
  return out;
}

class RoundsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    metrics_ = *Metrics::Create("");
    engine_ = MakeEngine();
    RoundOptions rounds;
    rounds.metrics = metrics_->steps();
    rounds.worker_timeout = kTimeout;
    rounds.chunk_bytes = 40;  // several chunks per tensor
    durability_ = std::make_unique<Durability>(DurabilityOptions{}, engine_.get());
    auto make_rounds = [this, rounds](Session* session) -> std::unique_ptr<SessionRounds> {
      return std::make_unique<ParameterServerRounds>(session, engine_.get(), durability_.get(),
                                                     rounds);
    };
    registry_ = std::make_unique<SessionRegistry>(engine_.get(), Limits{}, metrics_->sessions(),
                                                  durability_.get(), make_rounds);
    session_ = NewSession(2);
    rounds_ = RoundsOf(*session_);
  }

  virtual std::unique_ptr<Engine> MakeEngine() { return *CreateCpuEngine(EngineOptions{}); }

  std::shared_ptr<Session> NewSession(uint32_t workers) {
    v1::CreateSessionRequest request;
    request.set_mode(v1::SESSION_MODE_PARAMETER_SERVER);
    request.set_num_workers(workers);
    v1::ParameterSpec* w = request.add_params();
    w->set_name("w");
    w->add_shape(8);
    w->add_shape(4);
    v1::ParameterSpec* b = request.add_params();
    b->set_name("b");
    b->add_shape(4);
    absl::StatusOr<std::shared_ptr<Session>> session = registry_->Create(request);
    EXPECT_THAT(session, IsOk());
    return *session;
  }

  uint64_t Join(ParameterServerRounds* rounds, uint64_t step, uint32_t worker, Waiter* waiter,
                Role want = Role::kContribute, const Contribution& contribution = {}) {
    absl::StatusOr<ParameterServerRounds::Admission> a =
        rounds->Join(step, worker, waiter, contribution);
    EXPECT_THAT(a, IsOk());
    if (!a.ok()) return 0;
    EXPECT_EQ(a->role, want);
    return a->round;
  }

  // The weights after one step fed the fp32 average of `workers` (summed
  // in worker order, as the unpipelined round did for workers arriving in
  // that order), computed the unpipelined way: fresh engine parameters of
  // the session's specs, every parameter in one Engine::Step.
  std::vector<std::vector<float>> WeightsAfterAverage(const std::vector<Gradient>& workers) {
    const std::vector<SessionParam>& params = session_->params();
    std::vector<std::vector<float>> average(params.size());
    std::vector<std::vector<float>> updates(params.size());
    std::vector<GradientInput> inputs(params.size());
    std::vector<UpdateOutput> outputs(params.size());
    std::vector<ParamId> ids;
    const float scale = 1.0f / static_cast<float>(workers.size());
    for (size_t i = 0; i < params.size(); ++i) {
      absl::StatusOr<ParamSpec> spec = engine_->Spec(params[i].engine_id);
      EXPECT_THAT(spec, IsOk());
      absl::StatusOr<ParamId> id = engine_->Register(*spec);
      EXPECT_THAT(id, IsOk());
      ids.push_back(*id);
      average[i].assign(workers[0][i].size(), 0.0f);
      for (const Gradient& g : workers) {
        for (size_t j = 0; j < g[i].size(); ++j) average[i][j] += g[i][j];
      }
      for (float& v : average[i]) v *= scale;
      updates[i].resize(average[i].size());
      inputs[i].param = *id;
      inputs[i].dtype = DType::kFloat32;
      inputs[i].bytes = absl::MakeConstSpan(reinterpret_cast<const std::byte*>(average[i].data()),
                                            average[i].size() * sizeof(float));
      outputs[i].param = *id;
      outputs[i].bytes = absl::MakeSpan(reinterpret_cast<std::byte*>(updates[i].data()),
                                        updates[i].size() * sizeof(float));
    }
    EXPECT_THAT(engine_->Step(inputs, absl::MakeSpan(outputs)), IsOk());
    std::vector<std::vector<float>> weights(params.size());
    for (size_t i = 0; i < params.size(); ++i) {
      weights[i].resize(average[i].size());
      EXPECT_THAT(engine_->GetWeights(ids[i], absl::MakeSpan(weights[i])), IsOk());
      EXPECT_THAT(engine_->Unregister(ids[i]), IsOk());
    }
    return weights;
  }

  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Durability> durability_;
  std::unique_ptr<SessionRegistry> registry_;
  std::shared_ptr<Session> session_;
  ParameterServerRounds* rounds_ = nullptr;
};

TEST_F(RoundsTest, TwoWorkersCommitTheStepOfTheirAverage) {
  const auto g0 = RandomGradient(1), g1 = RandomGradient(2);
  Waiter w0, w1;
  const uint64_t round = Join(rounds_, 1, 0, &w0);
  EXPECT_EQ(Join(rounds_, 1, 1, &w1), round);
  ASSERT_THAT(Send(rounds_, &w0, g0), IsOk());
  EXPECT_FALSE(w0.result.has_value());  // waits for worker 1
  EXPECT_EQ(session_->step(), 0u);
  ASSERT_THAT(Send(rounds_, &w1, g1), IsOk());
  ASSERT_TRUE(w0.result.has_value() && w1.result.has_value());
  ASSERT_THAT(*w0.result, IsOk());
  ASSERT_THAT(*w1.result, IsOk());
  EXPECT_EQ(session_->step(), 1u);
  const StepRecord& record = ***w0.result;
  EXPECT_EQ(record.step, 1u);
  ASSERT_TRUE(record.responses.back()->message.has_summary());
  EXPECT_THAT(record.responses.back()->message.summary().param_indices(),
              ::testing::ElementsAre(0, 1));
  for (const auto& r : record.responses) {
    if (r->message.has_update()) {
      EXPECT_LE(r->update_data().size(), 40u);
    }
  }

  // The unpipelined step of the fp32 average gives the same weights, bit
  // for bit.
  EXPECT_EQ(WeightsOf(***w0.result), WeightsAfterAverage({g0, g1}));
}

// The fp32 values of a parameter's WEIGHTS chunks among `responses`.
std::vector<float> WeightsIn(const std::vector<std::shared_ptr<const StepReply>>& responses,
                             uint32_t index) {
  std::vector<float> out;
  for (const auto& r : responses) {
    if (!r->message.has_update() || r->message.update().param_index() != index) continue;
    const v1::UpdateChunk& u = r->message.update();
    EXPECT_EQ(u.content(), v1::UPDATE_CONTENT_WEIGHTS);
    out.resize(u.total_bytes() / sizeof(float));
    std::memcpy(reinterpret_cast<char*>(out.data()) + u.offset(), r->update_data().data(),
                r->update_data().size());
  }
  return out;
}

// `waiter` was answered with `want`'s weights of parameters 0 and 1.
void ExpectAnsweredWith(const Waiter& waiter, const std::vector<std::vector<float>>& want) {
  EXPECT_EQ(WeightsIn(waiter.answered, 0), want[0]);
  EXPECT_EQ(WeightsIn(waiter.answered, 1), want[1]);
}

TEST_F(RoundsTest, OneWorkersAnswersLeaveAsEachParameterIsComputed) {
  std::shared_ptr<Session> single = NewSession(1);
  ParameterServerRounds* rounds = RoundsOf(*single);
  session_ = single;
  const auto g = RandomGradient(5);
  Waiter only;
  Join(rounds, 1, 0, &only);
  AddParam(rounds, &only, 0, g);
  // Only this stream can still withdraw it: its new weights go out now,
  // before its StepEnd and before anything is applied.
  EXPECT_THAT(only.AnsweredParams(), ::testing::ElementsAre(0));
  EXPECT_EQ(single->step(), 0u);
  AddParam(rounds, &only, 1, g);
  EXPECT_THAT(only.AnsweredParams(), ::testing::ElementsAre(0, 1));
  EXPECT_FALSE(only.result.has_value());
  ASSERT_THAT(rounds->End(&only, 0), IsOk());
  ASSERT_TRUE(only.result.has_value());
  ASSERT_THAT(*only.result, IsOk());
  EXPECT_EQ(only.held, 0);
  // The record still holds every answer (for a replay), the same ones.
  const StepRecord& record = ***only.result;
  const std::vector<std::vector<float>> want = WeightsAfterAverage({g});
  EXPECT_EQ(WeightsOf(record), want);
  ExpectAnsweredWith(only, want);
}

// One worker's gradient goes to the engine as sent (the average of one):
// a NaN in it is still found before anything of it counts.
TEST_F(RoundsTest, OneWorkersNonFiniteGradientFailsItsStreamAndAppliesNothing) {
  std::shared_ptr<Session> single = NewSession(1);
  ParameterServerRounds* rounds = RoundsOf(*single);
  auto bad = RandomGradient(5);
  bad[0][7] = std::numeric_limits<float>::quiet_NaN();
  Waiter first;
  Join(rounds, 1, 0, &first);
  AddParam(rounds, &first, 0, bad);
  ASSERT_TRUE(first.result.has_value());
  EXPECT_THAT(*first.result, StatusIs(absl::StatusCode::kInvalidArgument,
                                      HasSubstr("('w'): worker 0's gradient contains NaN")));
  EXPECT_TRUE(first.answered.empty());
  EXPECT_EQ(rounds->ComputedParameters(), 0u);
  const auto g = RandomGradient(6);
  Waiter again;
  Join(rounds, 1, 0, &again);
  ASSERT_THAT(Send(rounds, &again, g), IsOk());
  ASSERT_TRUE(again.result.has_value());
  ASSERT_THAT(*again.result, IsOk());
  EXPECT_EQ(single->step(), 1u);
  session_ = single;
  EXPECT_EQ(WeightsOf(***again.result), WeightsAfterAverage({g}));
}

TEST_F(RoundsTest, AnswersGoOnlyWhereNoOtherWorkerCanWithdrawThem) {
  const auto g0 = RandomGradient(1), g1 = RandomGradient(2);
  Waiter w0, w1;
  Join(rounds_, 1, 0, &w0);
  Join(rounds_, 1, 1, &w1);
  AddParam(rounds_, &w0, 0, g0);
  AddParam(rounds_, &w1, 0, g1);
  ASSERT_EQ(rounds_->ComputedParameters(), 1u);
  // Either stream could still break and withdraw its half of the average.
  EXPECT_TRUE(w0.answered.empty());
  EXPECT_TRUE(w1.answered.empty());
  AddParam(rounds_, &w0, 1, g0);
  ASSERT_THAT(rounds_->End(&w0, 0), IsOk());
  // Worker 0 counts now: only worker 1's own stream can still withdraw.
  EXPECT_THAT(w1.AnsweredParams(), ::testing::ElementsAre(0));
  EXPECT_TRUE(w0.answered.empty());
  AddParam(rounds_, &w1, 1, g1);
  EXPECT_THAT(w1.AnsweredParams(), ::testing::ElementsAre(0, 1));
  EXPECT_TRUE(w0.answered.empty());
  ASSERT_THAT(rounds_->End(&w1, 0), IsOk());
  // Worker 0's come once worker 1 has ended, before the summary.
  EXPECT_THAT(w0.AnsweredParams(), ::testing::ElementsAre(0, 1));
  ASSERT_TRUE(w0.result.has_value() && w1.result.has_value());
  ASSERT_THAT(*w0.result, IsOk());
  const std::vector<std::vector<float>> want = WeightsAfterAverage({g0, g1});
  for (const Waiter* w : {&w0, &w1}) ExpectAnsweredWith(*w, want);
}

TEST_F(RoundsTest, AWithdrawalSupersedesOnlyTheWithdrawingStreamsAnswers) {
  const auto g0 = RandomGradient(1), g1 = RandomGradient(2);
  Waiter w0, broken;
  Join(rounds_, 1, 0, &w0);
  Join(rounds_, 1, 1, &broken);
  ASSERT_THAT(Send(rounds_, &w0, g0), IsOk());
  AddParam(rounds_, &broken, 0, RandomGradient(99));  // not what it resends
  ASSERT_THAT(broken.AnsweredParams(), ::testing::ElementsAre(0));
  const std::vector<float> superseded = WeightsIn(broken.answered, 0);
  // Its stream breaks before its StepEnd: the parameter computed with its
  // gradient is discarded, and the only answer of it went down that
  // stream, which the client then discards.
  EXPECT_TRUE(rounds_->Leave(&broken));
  EXPECT_EQ(rounds_->ComputedParameters(), 0u);
  EXPECT_TRUE(w0.answered.empty());
  Waiter resent;
  Join(rounds_, 1, 1, &resent);
  ASSERT_THAT(Send(rounds_, &resent, g1), IsOk());
  ASSERT_TRUE(w0.result.has_value() && resent.result.has_value());
  ASSERT_THAT(*w0.result, IsOk());
  EXPECT_FALSE(broken.result.has_value());
  EXPECT_EQ(session_->step(), 1u);
  const std::vector<std::vector<float>> want = WeightsAfterAverage({g0, g1});
  EXPECT_NE(superseded, want[0]);
  EXPECT_EQ(WeightsOf(***w0.result), want);
  for (const Waiter* w : {&w0, &resent}) {
    EXPECT_THAT(w->AnsweredParams(), ::testing::UnorderedElementsAre(0, 1));
    ExpectAnsweredWith(*w, want);
  }
}

TEST_F(RoundsTest, EachParameterIsComputedOnceEveryWorkersGradientOfItIsIn) {
  const auto g0 = RandomGradient(1), g1 = RandomGradient(2);
  Waiter w0, w1;
  Join(rounds_, 1, 0, &w0);
  Join(rounds_, 1, 1, &w1);
  // Out of order across the workers: 0 sends b then w, 1 sends w then b.
  AddParam(rounds_, &w0, 1, g0);
  AddParam(rounds_, &w1, 0, g1);
  EXPECT_EQ(rounds_->ComputedParameters(), 0u);  // each has one worker's
  AddParam(rounds_, &w0, 0, g0);
  EXPECT_EQ(rounds_->ComputedParameters(), 1u);  // w from both: stepped
  ASSERT_THAT(rounds_->End(&w0, 0), IsOk());
  AddParam(rounds_, &w1, 1, g1);
  EXPECT_EQ(rounds_->ComputedParameters(), 2u);
  // Nothing is applied before the last worker's StepEnd.
  EXPECT_EQ(session_->step(), 0u);
  EXPECT_FALSE(w0.result.has_value());
  ASSERT_THAT(rounds_->End(&w1, 0), IsOk());
  ASSERT_TRUE(w0.result.has_value() && w1.result.has_value());
  ASSERT_THAT(*w0.result, IsOk());
  EXPECT_EQ(session_->step(), 1u);
  EXPECT_EQ(WeightsOf(***w0.result), WeightsAfterAverage({g0, g1}));
  EXPECT_EQ(**w0.result, **w1.result);  // one answer for the same format
}

TEST_F(RoundsTest, AWorkerFailingAfterParametersWereComputedCommitsNothing) {
  const auto g0 = RandomGradient(1), g1 = RandomGradient(2);
  Waiter w0, broken;
  Join(rounds_, 1, 0, &w0);
  Join(rounds_, 1, 1, &broken);
  AddParam(rounds_, &w0, 0, g0);
  AddParam(rounds_, &broken, 0, RandomGradient(99));  // not what it resends
  ASSERT_EQ(rounds_->ComputedParameters(), 1u);
  // Worker 1's stream breaks before its StepEnd: its gradient is withdrawn
  // and the step computed with it is discarded.
  EXPECT_TRUE(rounds_->Leave(&broken));
  EXPECT_EQ(rounds_->ComputedParameters(), 0u);
  EXPECT_EQ(session_->step(), 0u);
  EXPECT_FALSE(w0.result.has_value());
  // What the broken stream still hands over is ignored.
  EXPECT_FALSE(rounds_->Add(&broken, 1, Bytes(g1[1])));
  EXPECT_THAT(rounds_->End(&broken, 0), StatusIs(absl::StatusCode::kAborted));

  AddParam(rounds_, &w0, 1, g0);
  ASSERT_THAT(rounds_->End(&w0, 0), IsOk());
  Waiter resent;
  Join(rounds_, 1, 1, &resent);
  ASSERT_THAT(Send(rounds_, &resent, g1), IsOk());
  ASSERT_TRUE(w0.result.has_value() && resent.result.has_value());
  ASSERT_THAT(*w0.result, IsOk());
  EXPECT_FALSE(broken.result.has_value());
  EXPECT_EQ(session_->step(), 1u);
  EXPECT_EQ(WeightsOf(***w0.result), WeightsAfterAverage({g0, g1}));
}

TEST_F(RoundsTest, ANonFiniteGradientFoundWhileComputingFailsOnlyItsStream) {
  const auto g0 = RandomGradient(1), g1 = RandomGradient(2);
  auto bad = g1;
  bad[0][5] = std::numeric_limits<float>::quiet_NaN();
  Waiter w0, w1;
  Join(rounds_, 1, 0, &w0);
  Join(rounds_, 1, 1, &w1);
  AddParam(rounds_, &w0, 0, g0);
  AddParam(rounds_, &w1, 0, bad);  // the average of w is computed: refused
  ASSERT_TRUE(w1.result.has_value());
  EXPECT_THAT(*w1.result, StatusIs(absl::StatusCode::kInvalidArgument,
                                   HasSubstr("('w'): worker 1's gradient contains NaN")));
  EXPECT_FALSE(w0.result.has_value());
  EXPECT_EQ(rounds_->ComputedParameters(), 0u);
  EXPECT_FALSE(rounds_->Leave(&w1));  // answered already

  ASSERT_THAT(Send(rounds_, &w0, g0).code(), absl::StatusCode::kOk);
  Waiter resent;
  Join(rounds_, 1, 1, &resent);
  ASSERT_THAT(Send(rounds_, &resent, g1), IsOk());
  ASSERT_TRUE(w0.result.has_value());
  ASSERT_THAT(*w0.result, IsOk());
  EXPECT_EQ(WeightsOf(***w0.result), WeightsAfterAverage({g0, g1}));
}

// The session's two parameters on two CPU engines behind a sharded engine,
// as on two GPUs.
class ShardedRoundsTest : public RoundsTest {
 protected:
  std::unique_ptr<Engine> MakeEngine() override {
    std::vector<std::unique_ptr<Engine>> engines;
    engines.push_back(*CreateCpuEngine(EngineOptions{}));
    engines.push_back(*CreateCpuEngine(EngineOptions{}));
    return *CreateShardedEngine(std::move(engines));
  }
};

// A committed round reports each device's compute seconds once.
TEST_F(ShardedRoundsTest, CommittedRoundReportsComputeSecondsPerDevice) {
  metrics_->SetDeviceProbe({"0", "1"}, [] { return std::vector<ShardLoad>(2); });
  std::shared_ptr<Session> single = NewSession(1);
  ASSERT_NE(*ShardOf(*engine_, single->params()[0].engine_id),
            *ShardOf(*engine_, single->params()[1].engine_id));
  Waiter only;
  Join(RoundsOf(*single), 1, 0, &only);
  ASSERT_THAT(Send(RoundsOf(*single), &only, RandomGradient(3)), IsOk());
  ASSERT_TRUE(only.result.has_value());
  ASSERT_THAT(*only.result, IsOk());
  const std::string text = metrics_->Text();
  EXPECT_THAT(text, HasSubstr("muon_device_compute_seconds_count{device=\"0\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("muon_device_compute_seconds_count{device=\"1\"} 1\n"));
}

TEST_F(RoundsTest, AResentWorkerWaitsAndIsNotAddedTwice) {
  Waiter first, resent, other;
  Join(rounds_, 1, 0, &first);
  ASSERT_THAT(Send(rounds_, &first, RandomGradient(1)), IsOk());
  EXPECT_TRUE(rounds_->Leave(&first));  // its stream broke after its StepEnd
  Join(rounds_, 1, 0, &resent, Role::kWait);
  Join(rounds_, 1, 1, &other);
  ASSERT_THAT(Send(rounds_, &other, RandomGradient(2)), IsOk());
  EXPECT_FALSE(first.result.has_value());
  ASSERT_TRUE(resent.result.has_value() && other.result.has_value());
  EXPECT_THAT(*resent.result, IsOk());
  EXPECT_EQ(session_->step(), 1u);
}

TEST_F(RoundsTest, ASecondLiveStreamOfAWorkerIsAborted) {
  Waiter a, b;
  Join(rounds_, 1, 0, &a);
  EXPECT_THAT(rounds_->Join(1, 0, &b),
              StatusIs(absl::StatusCode::kAborted, HasSubstr("already has a stream")));
  EXPECT_TRUE(rounds_->Leave(&a));
}

TEST_F(RoundsTest, WorkersMustAgreeOnTheLearningRate) {
  Waiter w0, w1;
  Contribution first;
  first.lr = 0.1;
  Join(rounds_, 1, 0, &w0, Role::kContribute, first);
  Contribution other;
  other.lr = 0.2;
  EXPECT_THAT(rounds_->Join(1, 1, &w1, other),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("same schedule values")));
  ASSERT_THAT(Send(rounds_, &w0, RandomGradient(1)), IsOk());
  EXPECT_FALSE(w0.result.has_value());
  // Worker 1 resends with the round's lr: the step goes through.
  Join(rounds_, 1, 1, &w1, Role::kContribute, first);
  ASSERT_THAT(Send(rounds_, &w1, RandomGradient(2)), IsOk());
  ASSERT_TRUE(w0.result.has_value());
  EXPECT_THAT(*w0.result, IsOk());
}

TEST_F(RoundsTest, ANonFiniteGradientIsRefusedAndAddsNothing) {
  Waiter w0, w1;
  Join(rounds_, 1, 0, &w0);
  Join(rounds_, 1, 1, &w1);
  auto bad = RandomGradient(1);
  bad[1][2] = std::numeric_limits<float>::infinity();
  EXPECT_THAT(Send(rounds_, &w0, bad),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("NaN or Inf")));
  EXPECT_TRUE(rounds_->Leave(&w0));
  const auto g0 = RandomGradient(3), g1 = RandomGradient(4);
  Waiter again;
  Join(rounds_, 1, 0, &again);
  ASSERT_THAT(Send(rounds_, &again, g0), IsOk());
  ASSERT_THAT(Send(rounds_, &w1, g1), IsOk());
  ASSERT_TRUE(again.result.has_value());
  ASSERT_THAT(*again.result, IsOk());

  EXPECT_EQ(WeightsOf(***again.result), WeightsAfterAverage({g0, g1}));
}

TEST_F(RoundsTest, ALateRoundExpiresForEveryWaiterAndAppliesNothing) {
  Waiter w0;
  const uint64_t round = Join(rounds_, 1, 0, &w0);
  ASSERT_THAT(Send(rounds_, &w0, RandomGradient(1)), IsOk());
  rounds_->ExpireIfLate(absl::Now());  // not late yet
  EXPECT_FALSE(w0.result.has_value());
  rounds_->ExpireIfLate(absl::Now() + 2 * kTimeout);
  ASSERT_TRUE(w0.result.has_value());
  EXPECT_THAT(*w0.result, StatusIs(absl::StatusCode::kAborted, HasSubstr("worker(s) 1")));
  EXPECT_EQ(session_->step(), 0u);
  // A stream of the abandoned round adds nothing to its successor.
  Waiter late, stale;
  const uint64_t next = Join(rounds_, 1, 1, &late);
  EXPECT_NE(next, round);
  EXPECT_FALSE(rounds_->Add(&stale, 0, Bytes(RandomGradient(2)[0])));
  EXPECT_THAT(rounds_->End(&stale, 0),
              StatusIs(absl::StatusCode::kAborted, HasSubstr("abandoned")));
  EXPECT_TRUE(rounds_->Leave(&late));
}

TEST_F(RoundsTest, ACommittedStepIsReplayedAndAStepAheadRefused) {
  Waiter w0, w1;
  Join(rounds_, 1, 0, &w0);
  Join(rounds_, 1, 1, &w1);
  ASSERT_THAT(Send(rounds_, &w0, RandomGradient(1)), IsOk());
  ASSERT_THAT(Send(rounds_, &w1, RandomGradient(2)), IsOk());
  Waiter retry;
  absl::StatusOr<ParameterServerRounds::Admission> replay = rounds_->Join(1, 1, &retry);
  ASSERT_THAT(replay, IsOk());
  EXPECT_EQ(replay->role, Role::kReplay);
  EXPECT_EQ(replay->replay, **w1.result);
  EXPECT_THAT(rounds_->Join(3, 0, &retry),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("expected step is 2")));
  EXPECT_THAT(rounds_->Join(0, 0, &retry), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_F(RoundsTest, TheLastWaiterLeavingAnEmptyRoundFreesTheSession) {
  Waiter w0;
  Join(rounds_, 1, 0, &w0);
  EXPECT_THAT(session_->TryLease(LeasePurpose::kWeightsUpload),
              StatusIs(absl::StatusCode::kAborted));
  EXPECT_TRUE(rounds_->Leave(&w0));
  EXPECT_FALSE(rounds_->Leave(&w0));  // not registered any more
  EXPECT_THAT(session_->TryLease(LeasePurpose::kWeightsUpload), IsOk());
}

TEST_F(RoundsTest, AskedOrthogonalityIsInTheSummaryForMuonParameters) {
  Waiter w0, w1;
  Join(rounds_, 1, 0, &w0);
  Join(rounds_, 1, 1, &w1);
  AddParam(rounds_, &w0, 0, RandomGradient(1));
  AddParam(rounds_, &w1, 0, RandomGradient(2));
  ASSERT_EQ(rounds_->ComputedParameters(), 1u);
  // A worker asking after parameters were computed without measuring: they
  // are computed again, measured.
  Waiter asking;
  EXPECT_TRUE(rounds_->Leave(&w1));
  Contribution measure;
  measure.measure_orthogonality = true;
  Join(rounds_, 1, 1, &asking, Role::kContribute, measure);
  ASSERT_THAT(Send(rounds_, &asking, RandomGradient(2)), IsOk());
  AddParam(rounds_, &w0, 1, RandomGradient(1));
  ASSERT_THAT(rounds_->End(&w0, 0), IsOk());
  ASSERT_TRUE(asking.result.has_value());
  ASSERT_THAT(*asking.result, IsOk());
  const v1::StepSummary& summary = (**asking.result)->responses.back()->message.summary();
  ASSERT_EQ(summary.orthogonality_errors_size(), 1);
  EXPECT_EQ(summary.orthogonality_errors(0).param_index(), 0u);
  EXPECT_TRUE(std::isfinite(summary.orthogonality_errors(0).error()));
}

}  // namespace
}  // namespace muon::server
