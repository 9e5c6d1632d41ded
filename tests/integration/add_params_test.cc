// AddParameters against the real binary: parameters added to a live session
// step like those of a fresh session, bad calls change nothing, limits and
// tokens hold, and a restart keeps them.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "muon/client/client.h"
#include "muon/v1/optimizer.grpc.pb.h"
#include "server_process.h"

namespace muon::testing {
namespace {

using ::testing::HasSubstr;

v1::ParameterSpec Spec(const std::string& name, std::vector<int64_t> shape,
                       v1::OptimizerKind kind) {
  v1::ParameterSpec spec;
  spec.set_name(name);
  for (int64_t d : shape) spec.add_shape(d);
  spec.set_kind(kind);
  return spec;
}

// The first two live from the start; the last two are added after step 3.
std::vector<v1::ParameterSpec> Initial() {
  return {Spec("w1", {24, 16}, v1::OPTIMIZER_KIND_MUON),
          Spec("b1", {16}, v1::OPTIMIZER_KIND_ADAMW)};
}
std::vector<v1::ParameterSpec> Added() {
  return {Spec("w2", {2, 8, 12}, v1::OPTIMIZER_KIND_MUON),
          Spec("emb", {20, 6}, v1::OPTIMIZER_KIND_ADAMW)};
}

v1::CreateSessionRequest Request(const std::vector<v1::ParameterSpec>& params) {
  v1::CreateSessionRequest request;
  request.set_name("add-params");
  request.mutable_hyper_params()->set_weight_decay(0.1);
  for (const v1::ParameterSpec& p : params) *request.add_params() = p;
  return request;
}

int64_t Elements(const v1::ParameterSpec& spec) {
  int64_t n = 1;
  for (int64_t d : spec.shape()) n *= d;
  return n;
}

// Fresh random gradients, the same for a parameter's name and step in every
// session, so that two sessions holding it can be compared.
std::vector<float> GradientOf(const v1::ParameterSpec& spec, uint64_t step) {
  std::seed_seq seed(spec.name().begin(), spec.name().end());
  std::mt19937_64 rng(seed);
  rng.discard(step * 7919);
  std::normal_distribution<float> normal;
  std::vector<float> g(Elements(spec));
  for (float& v : g) v = normal(rng);
  return g;
}

// One step of `session` with a gradient for each of `params` (in session
// order); the updates by parameter name.
absl::StatusOr<std::map<std::string, std::vector<float>>> Step(
    Client* client, const SessionHandle& session, uint64_t step,
    const std::vector<v1::ParameterSpec>& params, uint64_t grad_step) {
  std::vector<std::vector<float>> grads;
  std::vector<Gradient> gradients;
  for (const v1::ParameterSpec& p : params) grads.push_back(GradientOf(p, grad_step));
  for (size_t i = 0; i < params.size(); ++i) {
    Gradient g;
    g.param_index = static_cast<uint32_t>(i);
    g.data = absl::MakeConstSpan(reinterpret_cast<const std::byte*>(grads[i].data()),
                                 grads[i].size() * sizeof(float));
    gradients.push_back(g);
  }
  absl::StatusOr<StepResult> result = client->Step(session, step, gradients);
  if (!result.ok()) return result.status();
  std::map<std::string, std::vector<float>> updates;
  for (const ParameterUpdate& u : result->updates) {
    std::vector<float>& out = updates[params[u.param_index].name()];
    out.resize(u.data.size() / sizeof(float));
    std::memcpy(out.data(), u.data.data(), u.data.size());
  }
  return updates;
}

std::unique_ptr<ServerProcess> Start(const std::vector<std::string>& flags = {}) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start(flags);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? std::move(*server) : nullptr;
}

std::unique_ptr<Client> ClientOf(const ServerProcess& server) {
  ClientOptions options;
  options.target = server.address();
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(options);
  EXPECT_TRUE(client.ok()) << client.status();
  return client.ok() ? std::move(*client) : nullptr;
}

std::vector<v1::ParameterSpec> Concat(std::vector<v1::ParameterSpec> a,
                                      const std::vector<v1::ParameterSpec>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

uint32_t NumParams(Client* client, const SessionHandle& session) {
  absl::StatusOr<v1::SessionInfo> info = client->GetSession(session);
  EXPECT_TRUE(info.ok()) << info.status();
  return info.ok() ? info->num_params() : 0;
}

// Added parameters step exactly as in a session that had them from the
// start (zeroed state, AdamW's bias correction from their own first step);
// the earlier parameters are not disturbed.
TEST(AddParamsTest, AddedParametersStepLikeAFreshSessionsAndTheOthersDoNotNotice) {
  auto server = Start();
  ASSERT_NE(server, nullptr);
  auto client = ClientOf(*server);
  absl::StatusOr<SessionHandle> live = client->CreateSession(Request(Initial()));
  absl::StatusOr<SessionHandle> same = client->CreateSession(Request(Initial()));
  absl::StatusOr<SessionHandle> fresh = client->CreateSession(Request(Added()));
  ASSERT_TRUE(live.ok() && same.ok() && fresh.ok());
  for (uint64_t step = 1; step <= 3; ++step) {
    ASSERT_TRUE(Step(client.get(), *live, step, Initial(), step).ok());
    ASSERT_TRUE(Step(client.get(), *same, step, Initial(), step).ok());
  }
  const std::vector<v1::ParameterSpec> added = Added();
  absl::StatusOr<v1::AddParametersResponse> response = client->AddParameters(*live, added);
  ASSERT_TRUE(response.ok()) << response.status();
  EXPECT_EQ(response->first_index(), 2u);
  ASSERT_EQ(response->session().params_size(), 4);
  EXPECT_EQ(response->session().params(2).name(), "w2");
  EXPECT_EQ(response->session().params(3).kind(), v1::OPTIMIZER_KIND_ADAMW);
  EXPECT_DOUBLE_EQ(response->session().params(3).hyper_params().weight_decay(), 0.1)
      << "the session's hyper_params apply to added parameters";
  EXPECT_EQ(response->session().step(), 3u);

  const std::vector<v1::ParameterSpec> all = Concat(Initial(), added);
  for (uint64_t step = 4; step <= 6; ++step) {
    auto got = Step(client.get(), *live, step, all, step);
    auto old = Step(client.get(), *same, step, Initial(), step);
    auto now = Step(client.get(), *fresh, step - 3, added, step);
    ASSERT_TRUE(got.ok() && old.ok() && now.ok()) << got.status() << old.status() << now.status();
    for (const std::string name : {"w1", "b1"}) EXPECT_EQ((*got)[name], (*old)[name]) << name;
    for (const std::string name : {"w2", "emb"}) {
      ASSERT_FALSE((*got)[name].empty()) << name;
      EXPECT_EQ((*got)[name], (*now)[name]) << name << " at step " << step;
    }
  }
}

TEST(AddParamsTest, BadCallsChangeNothing) {
  auto server = Start();
  ASSERT_NE(server, nullptr);
  auto client = ClientOf(*server);
  absl::StatusOr<SessionHandle> session = client->CreateSession(Request(Initial()));
  ASSERT_TRUE(session.ok());
  ASSERT_TRUE(Step(client.get(), *session, 1, Initial(), 1).ok());

  struct Case {
    std::vector<v1::ParameterSpec> params;
    absl::StatusCode code;
    std::string message;
  };
  v1::ParameterSpec nan_lr = Spec("w3", {4, 4}, v1::OPTIMIZER_KIND_MUON);
  nan_lr.mutable_overrides()->set_lr(std::nan(""));
  const std::vector<Case> cases = {
      {{}, absl::StatusCode::kInvalidArgument, "at least one parameter"},
      {{Spec("w3", {4, 4}, v1::OPTIMIZER_KIND_MUON), Spec("w1", {4, 4}, v1::OPTIMIZER_KIND_MUON)},
       absl::StatusCode::kInvalidArgument, "parameter 3 ('w1')"},
      {{Spec("w3", {4, 4}, v1::OPTIMIZER_KIND_MUON), Spec("v", {8}, v1::OPTIMIZER_KIND_MUON)},
       absl::StatusCode::kInvalidArgument, "parameter 3 ('v')"},
      {{Spec("w3", {4, 0}, v1::OPTIMIZER_KIND_MUON)}, absl::StatusCode::kInvalidArgument,
       "parameter 2 ('w3')"},
      {{Spec("", {4, 4}, v1::OPTIMIZER_KIND_MUON)}, absl::StatusCode::kInvalidArgument, "no name"},
      {{nan_lr}, absl::StatusCode::kInvalidArgument, "lr"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<v1::AddParametersResponse> r = client->AddParameters(*session, c.params);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), c.code) << r.status();
    EXPECT_THAT(r.status().message(), HasSubstr(c.message));
    EXPECT_EQ(NumParams(client.get(), *session), 2u) << r.status();
  }
  // The failed calls registered nothing: the names are free, and the
  // session steps on with its two parameters, refusing an index 2.
  absl::StatusOr<StepResult> bad =
      client->Step(*session, 2, {Gradient{2, {}}});
  EXPECT_FALSE(bad.ok());
  ASSERT_TRUE(Step(client.get(), *session, 2, Initial(), 2).ok());
  std::vector<v1::ParameterSpec> w3 = {Spec("w3", {4, 4}, v1::OPTIMIZER_KIND_MUON)};
  ASSERT_TRUE(client->AddParameters(*session, w3).ok());
  // A repeat is refused: the name is taken.
  absl::StatusOr<v1::AddParametersResponse> again = client->AddParameters(*session, w3);
  EXPECT_EQ(again.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(NumParams(client.get(), *session), 3u);
}

TEST(AddParamsTest, LimitsCountTheWholeSessionAndNameTheirFlags) {
  // Initial(): 24·16 + 16 elements; w1 alone needs 24·16·4·3 bytes.
  auto server = Start({"--max_params_per_session=3", "--max_bytes_per_session=20000"});
  ASSERT_NE(server, nullptr);
  auto client = ClientOf(*server);
  absl::StatusOr<SessionHandle> session = client->CreateSession(Request(Initial()));
  ASSERT_TRUE(session.ok()) << session.status();
  absl::StatusOr<v1::AddParametersResponse> r = client->AddParameters(*session, Added());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(r.status().message(), HasSubstr("--max_params_per_session"));
  std::vector<v1::ParameterSpec> big = {Spec("big", {64, 64}, v1::OPTIMIZER_KIND_MUON)};
  r = client->AddParameters(*session, big);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(r.status().message(), HasSubstr("--max_bytes_per_session"));
  EXPECT_EQ(NumParams(client.get(), *session), 2u);
  std::vector<v1::ParameterSpec> small = {Spec("small", {4, 4}, v1::OPTIMIZER_KIND_MUON)};
  EXPECT_TRUE(client->AddParameters(*session, small).ok());

  auto tight = Start({"--memory_budget_bytes=40000"});
  ASSERT_NE(tight, nullptr);
  auto tight_client = ClientOf(*tight);
  absl::StatusOr<SessionHandle> s = tight_client->CreateSession(Request(Initial()));
  ASSERT_TRUE(s.ok()) << s.status();
  r = tight_client->AddParameters(*s, big);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(r.status().message(), HasSubstr("--memory_budget_bytes"));
  EXPECT_EQ(NumParams(tight_client.get(), *s), 2u);
}

TEST(AddParamsTest, TokensAreCheckedAndParameterServerSessionsRefuse) {
  auto server = Start();
  ASSERT_NE(server, nullptr);
  auto client = ClientOf(*server);
  absl::StatusOr<SessionHandle> session = client->CreateSession(Request(Initial()));
  ASSERT_TRUE(session.ok());
  SessionHandle wrong = *session;
  wrong.token = std::string(wrong.token.size(), '0');
  EXPECT_EQ(client->AddParameters(wrong, Added()).status().code(),
            absl::StatusCode::kPermissionDenied);
  SessionHandle none = *session;
  none.token.clear();
  EXPECT_EQ(client->AddParameters(none, Added()).status().code(),
            absl::StatusCode::kUnauthenticated);
  SessionHandle unknown = *session;
  unknown.id = "0000000000000000";
  EXPECT_EQ(client->AddParameters(unknown, Added()).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(NumParams(client.get(), *session), 2u);

  v1::CreateSessionRequest ps = Request(Initial());
  ps.set_mode(v1::SESSION_MODE_PARAMETER_SERVER);
  ps.set_num_workers(2);
  absl::StatusOr<SessionHandle> ps_session = client->CreateSession(ps);
  ASSERT_TRUE(ps_session.ok()) << ps_session.status();
  absl::StatusOr<v1::AddParametersResponse> r = client->AddParameters(*ps_session, Added());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("PARAMETER_SERVER"));
}

// The call writes the session before it returns: a kill -9 right after it,
// with no step checkpoints, still restores the added parameters and their
// (zeroed) state, and training continues as on a server never restarted.
TEST(AddParamsTest, AddedParametersSurviveAKillAndRestart) {
  char dir_template[] = "/tmp/muon-addparams-XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  const std::vector<std::string> flags = {"--checkpoint_dir=" + dir,
                                          "--checkpoint_every_steps=0"};
  auto server = Start(flags);
  auto steady = Start();
  ASSERT_NE(server, nullptr);
  ASSERT_NE(steady, nullptr);
  auto client = ClientOf(*server);
  auto steady_client = ClientOf(*steady);
  absl::StatusOr<SessionHandle> session = client->CreateSession(Request(Initial()));
  absl::StatusOr<SessionHandle> reference = steady_client->CreateSession(Request(Initial()));
  ASSERT_TRUE(session.ok() && reference.ok());
  ASSERT_TRUE(client->Checkpoint(&*session).ok());
  for (uint64_t step = 1; step <= 2; ++step) {
    ASSERT_TRUE(Step(client.get(), *session, step, Initial(), step).ok());
    ASSERT_TRUE(Step(steady_client.get(), *reference, step, Initial(), step).ok());
  }
  ASSERT_TRUE(client->AddParameters(*session, Added()).ok());
  ASSERT_TRUE(steady_client->AddParameters(*reference, Added()).ok());

  server->Signal(SIGKILL);
  server->WaitForExit(30);
  server = Start(flags);
  ASSERT_NE(server, nullptr);
  client = ClientOf(*server);
  absl::StatusOr<v1::SessionInfo> info = client->GetSession(*session);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->step(), 2u);
  ASSERT_EQ(info->params_size(), 4);
  EXPECT_EQ(info->params(3).name(), "emb");

  const std::vector<v1::ParameterSpec> all = Concat(Initial(), Added());
  for (uint64_t step = 3; step <= 4; ++step) {
    auto got = Step(client.get(), *session, step, all, step);
    auto want = Step(steady_client.get(), *reference, step, all, step);
    ASSERT_TRUE(got.ok() && want.ok()) << got.status() << want.status();
    for (const v1::ParameterSpec& p : all) {
      EXPECT_EQ((*got)[p.name()], (*want)[p.name()]) << p.name() << " at step " << step;
    }
  }
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
}

}  // namespace
}  // namespace muon::testing
