// muon::Client against the real muon-server ($MUON_SERVER_BIN, CPU engine):
// steps, replays, errors, and streams cut mid-step by a TCP proxy, compared
// byte for byte with a session that saw no cut.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cutting_proxy.h"
#include "muon/client/client.h"
#include "server_process.h"

namespace muon {
namespace {

using testing::CuttingProxy;
using ::testing::HasSubstr;
using testing::ServerProcess;

// Three parameters: 128×256 Muon fp32 (128 KiB), 64×64 Muon bf16, 300 AdamW.
v1::CreateSessionRequest Model() {
  v1::CreateSessionRequest r;
  r.set_name("client-e2e");
  auto add = [&](const char* name, std::vector<int64_t> shape, v1::DType dtype) {
    v1::ParameterSpec* p = r.add_params();
    p->set_name(name);
    for (int64_t d : shape) p->add_shape(d);
    p->set_dtype(dtype);
  };
  add("w", {128, 256}, v1::DTYPE_FLOAT32);
  add("v", {64, 64}, v1::DTYPE_BFLOAT16);
  add("b", {300}, v1::DTYPE_FLOAT32);
  r.mutable_hyper_params()->set_weight_decay(0.1);
  return r;
}

using Bytes = std::vector<std::byte>;

std::vector<Bytes> RandomGradients(uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  auto fp32 = [&](size_t n) {
    Bytes b(n * 4);
    for (size_t i = 0; i < n; ++i) {
      const float x = normal(rng);
      std::memcpy(b.data() + 4 * i, &x, 4);
    }
    return b;
  };
  Bytes bf16(64 * 64 * 2);
  for (size_t i = 0; i < 64 * 64; ++i) {
    const float x = normal(rng);
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    const uint16_t top = static_cast<uint16_t>(bits >> 16);
    std::memcpy(bf16.data() + 2 * i, &top, 2);
  }
  return {fp32(128 * 256), bf16, fp32(300)};
}

std::vector<Gradient> All(const std::vector<Bytes>& g) {
  std::vector<Gradient> grads;
  for (size_t i = 0; i < g.size(); ++i) grads.push_back({static_cast<uint32_t>(i), g[i]});
  return grads;
}

// Gradients go in 16 KiB chunks, so a cut can fall between two of them.
std::unique_ptr<Client> Connect(const std::string& target) {
  ClientOptions options;
  options.target = target;
  options.chunk_bytes = 16 << 10;
  options.max_step_attempts = 6;
  options.retry_backoff = absl::Milliseconds(20);
  auto client = Client::Create(options);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

class ClientE2eTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::getenv("MUON_SERVER_BIN") == nullptr) GTEST_SKIP() << "MUON_SERVER_BIN not set";
    auto server = ServerProcess::Start({"--engine=cpu"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    client_ = Connect(server_->address());
  }

  SessionHandle NewSession() {
    auto session = client_->CreateSession(Model());
    EXPECT_TRUE(session.ok()) << session.status();
    return session.ok() ? *session : SessionHandle{};
  }

  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<Client> client_;
};

void ExpectSameUpdates(const StepResult& a, const StepResult& b) {
  ASSERT_EQ(a.updates.size(), b.updates.size());
  for (size_t i = 0; i < a.updates.size(); ++i) {
    EXPECT_EQ(a.updates[i].param_index, b.updates[i].param_index);
    EXPECT_EQ(a.updates[i].decay, b.updates[i].decay);
    EXPECT_EQ(a.updates[i].dtype, b.updates[i].dtype);
    EXPECT_TRUE(a.updates[i].data == b.updates[i].data) << "parameter " << i;
  }
}

TEST_F(ClientE2eTest, StepReturnsEveryUpdateAfterTheSummary) {
  SessionHandle session = NewSession();
  EXPECT_EQ(session.step, 0u);
  EXPECT_EQ(session.info.params_size(), 3);
  std::vector<Bytes> g = RandomGradients(1);
  absl::StatusOr<StepResult> r = client_->Step(session, 1, All(g), {.lr = 0.01});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->attempts, 1);
  EXPECT_EQ(r->summary.step(), 1u);
  EXPECT_FALSE(r->summary.replayed());
  ASSERT_EQ(r->updates.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(r->updates[i].param_index, i);
    EXPECT_EQ(r->updates[i].data.size(), g[i].size());
    EXPECT_DOUBLE_EQ(r->updates[i].decay, 1 - 0.01 * 0.1);
  }
  EXPECT_EQ(r->updates[1].dtype, v1::DTYPE_BFLOAT16);
  absl::StatusOr<v1::SessionInfo> info = client_->GetSession(session);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->step(), 1u);
}

TEST_F(ClientE2eTest, OmittedParametersGetNoUpdate) {
  SessionHandle session = NewSession();
  std::vector<Bytes> g = RandomGradients(2);
  std::vector<Gradient> some = {{.param_index = 2, .data = g[2]}, {.param_index = 0, .data = g[0]}};
  absl::StatusOr<StepResult> r = client_->Step(session, 1, some);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->updates.size(), 2u);
  EXPECT_EQ(r->updates[0].param_index, 0u);
  EXPECT_EQ(r->updates[1].param_index, 2u);
  absl::StatusOr<StepResult> none = client_->Step(session, 2, {});
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->updates.empty());
  EXPECT_EQ(none->summary.step(), 2u);
}

TEST_F(ClientE2eTest, RetryOfACommittedStepReplaysItAndAWrongStepIsRefused) {
  SessionHandle session = NewSession();
  std::vector<Bytes> g = RandomGradients(3);
  absl::StatusOr<StepResult> first = client_->Step(session, 1, All(g));
  ASSERT_TRUE(first.ok()) << first.status();
  absl::StatusOr<StepResult> again = client_->Step(session, 1, All(g));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->summary.replayed());
  ExpectSameUpdates(*first, *again);
  absl::StatusOr<StepResult> ahead = client_->Step(session, 3, All(g));
  EXPECT_EQ(ahead.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(ahead.status().message(), HasSubstr("2"));
  EXPECT_EQ(client_->GetSession(session)->step(), 1u);
}

TEST_F(ClientE2eTest, ServerErrorsKeepTheirCodeAndChangeNothing) {
  SessionHandle session = NewSession();
  std::vector<Bytes> g = RandomGradients(4);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(g[0].data() + 400, &nan, 4);
  absl::StatusOr<StepResult> r = client_->Step(session, 1, All(g));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->GetSession(session)->step(), 0u);

  std::vector<Bytes> short_grad = {Bytes(100)};
  r = client_->Step(session, 1, All(short_grad));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);

  std::vector<Bytes> bf16_for_fp32 = RandomGradients(5);
  std::vector<Gradient> wrong = {
      {.param_index = 0, .data = bf16_for_fp32[0], .dtype = v1::DTYPE_BFLOAT16}};
  r = client_->Step(session, 1, wrong);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);

  EXPECT_EQ(client_->GetSession({.id = "nope"}).status().code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(client_->DeleteSession(session).ok());
  EXPECT_EQ(client_->DeleteSession(session).code(), absl::StatusCode::kNotFound);
}

TEST_F(ClientE2eTest, HealthAndListSessions) {
  absl::StatusOr<std::string> health = client_->Health();
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, "SERVING");
  SessionHandle session = NewSession();
  absl::StatusOr<std::vector<v1::SessionInfo>> list = client_->ListSessions();
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].session_id(), session.id);
}

// The same steps on two sessions, one through a proxy that cuts the stream
// once per step: the updates must be identical, so the cut attempts changed
// no state and no step was applied twice. Cut while sending, the step never
// committed; cut while receiving updates, the server had often committed it
// already and the retry is answered from its cache (replayed): both are
// covered by the same comparison.
void RunCutSteps(CuttingProxy::Direction direction, size_t cut_after) {
  auto server = ServerProcess::Start({"--engine=cpu"});
  ASSERT_TRUE(server.ok()) << server.status();
  CuttingProxy proxy((*server)->port());
  auto direct = Connect((*server)->address());
  auto cut = Connect(proxy.address());
  ASSERT_NE(direct, nullptr);
  ASSERT_NE(cut, nullptr);
  auto a = direct->CreateSession(Model());
  auto b = cut->CreateSession(Model());
  ASSERT_TRUE(a.ok() && b.ok());
  int replayed = 0;
  // The cut client keeps its result: every step, and every attempt after a
  // cut, assembles into the same update buffers.
  StepResult got;
  std::vector<const std::byte*> buffers;
  for (uint64_t step = 1; step <= 3; ++step) {
    std::vector<Bytes> g = RandomGradients(100 + step);
    absl::StatusOr<StepResult> expected = direct->Step(*a, step, All(g));
    ASSERT_TRUE(expected.ok()) << expected.status();
    proxy.CutAfter(cut_after, direction);
    absl::Status stepped = cut->Step(*b, step, All(g), {}, &got);
    ASSERT_TRUE(stepped.ok()) << stepped;
    EXPECT_GE(got.attempts, 2) << "step " << step;
    EXPECT_EQ(got.summary.step(), step);
    replayed += got.summary.replayed();
    ExpectSameUpdates(*expected, got);
    std::vector<const std::byte*> now;
    for (const ParameterUpdate& u : got.updates) now.push_back(u.data.data());
    if (step > 1) {
      EXPECT_EQ(now, buffers) << "step " << step;
    }
    buffers = now;
  }
  EXPECT_EQ(proxy.cuts(), 3);
  EXPECT_EQ(direct->GetSession(*a)->step(), 3u);
  EXPECT_EQ(cut->GetSession(*b)->step(), 3u);
  // A cut before the server has every gradient leaves nothing to replay.
  if (direction == CuttingProxy::Direction::kUp) {
    EXPECT_EQ(replayed, 0);
  }
}

// Every attempt cut: Step gives up after max_step_attempts streams with the
// transport's UNAVAILABLE, and the step was not applied; once the cuts stop,
// the same step number goes through as a new step.
TEST_F(ClientE2eTest, RetriesAreBoundedAndAStepThatFailedChangedNothing) {
  CuttingProxy proxy(server_->port());
  auto cut = Client::Create({.target = proxy.address(),
                             .chunk_bytes = 16 << 10,
                             .max_step_attempts = 3,
                             .retry_backoff = absl::Milliseconds(1)});
  ASSERT_TRUE(cut.ok()) << cut.status();
  SessionHandle session = NewSession();
  std::vector<Bytes> g = RandomGradients(6);
  proxy.CutAfter(64 << 10, CuttingProxy::Direction::kUp, /*times=*/3);
  absl::StatusOr<StepResult> failed = (*cut)->Step(session, 1, All(g));
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable) << failed.status();
  EXPECT_EQ(proxy.cuts(), 3);
  EXPECT_EQ(client_->GetSession(session)->step(), 0u);

  absl::StatusOr<StepResult> r = (*cut)->Step(session, 1, All(g));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->attempts, 1);
  EXPECT_FALSE(r->summary.replayed());
  EXPECT_EQ(r->updates.size(), 3u);
  EXPECT_EQ(proxy.cuts(), 3);
  EXPECT_EQ(client_->GetSession(session)->step(), 1u);
}

TEST_F(ClientE2eTest, StreamCutWhileSendingGradientsIsRetried) {
  RunCutSteps(CuttingProxy::Direction::kUp, 64 << 10);
}

TEST_F(ClientE2eTest, StreamCutWhileReceivingUpdatesIsRetried) {
  RunCutSteps(CuttingProxy::Direction::kDown, 96 << 10);
}

}  // namespace
}  // namespace muon
