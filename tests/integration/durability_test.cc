// Checkpoints with real processes: kill -9 under --durability=strict, restore
// at start, corrupt files, the Checkpoint call, shutdown checkpoints.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "muon/client/client.h"
#include "server_process.h"

namespace muon::testing {
namespace {

using ::testing::HasSubstr;

// A fresh directory under /tmp, removed with everything in it.
class TempDir {
 public:
  TempDir() {
    char dir_template[] = "/tmp/muon-durability-XXXXXX";
    path_ = mkdtemp(dir_template) == nullptr ? "" : dir_template;
  }
  ~TempDir() {
    std::error_code ignored;
    if (!path_.empty()) std::filesystem::remove_all(path_, ignored);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct ParamShape {
  std::string name;
  std::vector<int64_t> shape;
  v1::OptimizerKind kind;
};

const std::vector<ParamShape>& Params() {
  static const auto* params = new std::vector<ParamShape>{
      {"w1", {48, 32}, v1::OPTIMIZER_KIND_MUON},
      {"w2", {2, 16, 24}, v1::OPTIMIZER_KIND_MUON},
      {"emb", {40, 8}, v1::OPTIMIZER_KIND_ADAMW},
      {"b", {32}, v1::OPTIMIZER_KIND_ADAMW},
  };
  return *params;
}

constexpr double kCustomSchedule[3][3] = {
    {4.0848, -6.8946, 2.9270}, {3.9505, -6.3029, 2.6377}, {3.4445, -4.7750, 2.0315}};
constexpr double kNsEps = 1e-5;

v1::CreateSessionRequest Request() {
  v1::CreateSessionRequest request;
  request.set_name("durability");
  request.mutable_hyper_params()->set_weight_decay(0.1);
  // A custom Newton–Schulz schedule and eps, which restored sessions keep.
  for (const auto& [a, b, c] : kCustomSchedule) {
    v1::HyperParams::NsCoefficients* t = request.mutable_hyper_params()->add_ns_coefficients();
    t->set_a(a);
    t->set_b(b);
    t->set_c(c);
  }
  request.mutable_hyper_params()->set_ns_eps(kNsEps);
  for (const ParamShape& p : Params()) {
    v1::ParameterSpec* spec = request.add_params();
    spec->set_name(p.name);
    for (int64_t d : p.shape) spec->add_shape(d);
    spec->set_kind(p.kind);
  }
  return request;
}

// A client-side training loop: weights held here, gradients of
// ½‖W − T‖² plus per-step noise, so each step depends on every earlier one.
class Trainer {
 public:
  Trainer() {
    std::mt19937_64 rng(7);
    std::normal_distribution<float> normal;
    for (const ParamShape& p : Params()) {
      int64_t n = 1;
      for (int64_t d : p.shape) n *= d;
      std::vector<float> w(n), t(n);
      for (float& v : w) v = normal(rng);
      for (float& v : t) v = normal(rng);
      weights_.push_back(std::move(w));
      targets_.push_back(std::move(t));
    }
  }

  std::vector<std::vector<float>> Gradients(uint64_t step) const {
    std::mt19937_64 rng(1000 + step);
    std::normal_distribution<float> normal;
    std::vector<std::vector<float>> grads;
    for (size_t i = 0; i < weights_.size(); ++i) {
      std::vector<float> g(weights_[i].size());
      for (size_t j = 0; j < g.size(); ++j) g[j] = weights_[i][j] - targets_[i][j] + normal(rng);
      grads.push_back(std::move(g));
    }
    return grads;
  }

  // One step through the client; applies the updates only when committed.
  absl::Status Step(Client* client, const SessionHandle& session, uint64_t step,
                    bool* replayed = nullptr) {
    const std::vector<std::vector<float>> grads = Gradients(step);
    std::vector<Gradient> gradients;
    for (size_t i = 0; i < grads.size(); ++i) {
      Gradient g;
      g.param_index = static_cast<uint32_t>(i);
      g.data = absl::MakeConstSpan(reinterpret_cast<const std::byte*>(grads[i].data()),
                                   grads[i].size() * sizeof(float));
      gradients.push_back(g);
    }
    absl::StatusOr<StepResult> result = client->Step(session, step, gradients);
    if (!result.ok()) return result.status();
    if (replayed != nullptr) *replayed = result->summary.replayed();
    for (const ParameterUpdate& u : result->updates) {
      std::vector<float>& w = weights_[u.param_index];
      if (u.data.size() != w.size() * sizeof(float)) {
        return absl::InternalError(absl::StrCat("update of parameter ", u.param_index,
                                                " has ", u.data.size(), " bytes"));
      }
      const float* update = reinterpret_cast<const float*>(u.data.data());
      for (size_t j = 0; j < w.size(); ++j) {
        w[j] = static_cast<float>(u.decay * w[j] + update[j]);
      }
    }
    return absl::OkStatus();
  }

  const std::vector<std::vector<float>>& weights() const { return weights_; }

 private:
  std::vector<std::vector<float>> weights_;
  std::vector<std::vector<float>> targets_;
};

std::unique_ptr<Client> ClientOf(const ServerProcess& server, int attempts = 4) {
  ClientOptions options;
  options.target = server.address();
  options.chunk_bytes = 1024;
  options.max_step_attempts = attempts;
  options.retry_backoff = absl::Milliseconds(10);
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(options);
  return client.ok() ? std::move(*client) : nullptr;
}

std::unique_ptr<ServerProcess> Start(const std::vector<std::string>& flags,
                                     bool capture_stderr = false) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start(flags, capture_stderr);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? std::move(*server) : nullptr;
}

// `muonctl session get` as an operator runs it: its stdout.
std::string MuonctlSessionGet(const ServerProcess& server, const SessionHandle& session) {
  const char* bin = std::getenv("MUONCTL_BIN");
  if (bin == nullptr) return "set MUONCTL_BIN";
  const std::string command = absl::StrCat(bin, " session get --server=", server.address(),
                                           " --session=", session.id, " --token=", session.token);
  std::string out;
  if (FILE* pipe = popen(command.c_str(), "r")) {
    char buffer[4096];
    size_t n;
    while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) out.append(buffer, n);
    pclose(pipe);
  }
  return out;
}

uint64_t SessionStep(Client* client, const SessionHandle& session) {
  absl::StatusOr<v1::SessionInfo> info = client->GetSession(session);
  EXPECT_TRUE(info.ok()) << info.status();
  return info.ok() ? info->step() : ~uint64_t{0};
}

constexpr uint64_t kSteps = 30;

TEST(DurabilityTest, KillNineUnderStrictDurabilityLosesNoAcknowledgedStep) {
  // The uninterrupted run.
  TempDir ref_dir;
  Trainer reference;
  {
    auto server = Start({"--checkpoint_dir=" + ref_dir.path(), "--durability=strict"});
    ASSERT_NE(server, nullptr);
    auto client = ClientOf(*server);
    absl::StatusOr<SessionHandle> session = client->CreateSession(Request());
    ASSERT_TRUE(session.ok()) << session.status();
    for (uint64_t step = 1; step <= kSteps; ++step) {
      ASSERT_TRUE(reference.Step(client.get(), *session, step).ok());
    }
  }

  TempDir dir;
  const std::vector<std::string> flags = {"--checkpoint_dir=" + dir.path(), "--durability=strict"};
  Trainer trainer;
  auto server = Start(flags);
  ASSERT_NE(server, nullptr);
  auto client = ClientOf(*server);
  absl::StatusOr<SessionHandle> created = client->CreateSession(Request());
  ASSERT_TRUE(created.ok()) << created.status();
  const SessionHandle session = *created;
  uint64_t acknowledged = 0;
  for (; acknowledged < 8; ++acknowledged) {
    ASSERT_TRUE(trainer.Step(client.get(), session, acknowledged + 1).ok());
  }

  // Between steps: the restarted server is exactly at the last acknowledged
  // step, and says so to an operator.
  server->Signal(SIGKILL);
  ASSERT_EQ(server->WaitForExit(10), -SIGKILL);
  server = Start(flags);
  ASSERT_NE(server, nullptr);
  EXPECT_THAT(MuonctlSessionGet(*server, session), HasSubstr("\nstep: 8\n"));
  client = ClientOf(*server);
  EXPECT_EQ(SessionStep(client.get(), session), acknowledged);

  // Mid-step: kill while a step is on the wire or being written, at several
  // delays. The killed step is retried with the same gradients against the
  // restarted server, which either applies it or, when it was already on
  // disk, replays it.
  const std::vector<int> kill_after_us = {0, 300, 1000, 2000, 2500, 3000, 3500, 4000, 8000};
  for (int delay : kill_after_us) {
    ASSERT_TRUE(trainer.Step(client.get(), session, acknowledged + 1).ok());
    ++acknowledged;
    client = ClientOf(*server, /*attempts=*/1);
    std::thread killer([&server, delay] {
      std::this_thread::sleep_for(std::chrono::microseconds(delay));
      server->Signal(SIGKILL);
    });
    const absl::Status killed_step = trainer.Step(client.get(), session, acknowledged + 1);
    killer.join();
    if (killed_step.ok()) ++acknowledged;
    ASSERT_EQ(server->WaitForExit(10), -SIGKILL);
    server = Start(flags);
    ASSERT_NE(server, nullptr);
    client = ClientOf(*server);
    const uint64_t restored = SessionStep(client.get(), session);
    // Never behind what was acknowledged; at most the one unacknowledged step
    // ahead (written, its summary lost with the process).
    EXPECT_GE(restored, acknowledged) << "kill after " << delay << " us";
    EXPECT_LE(restored, acknowledged + 1) << "kill after " << delay << " us";
    if (!killed_step.ok()) {
      bool replayed = false;
      ASSERT_TRUE(trainer.Step(client.get(), session, acknowledged + 1, &replayed).ok());
      EXPECT_EQ(replayed, restored == acknowledged + 1);
      ++acknowledged;
    }
  }
  for (; acknowledged < kSteps; ++acknowledged) {
    ASSERT_TRUE(trainer.Step(client.get(), session, acknowledged + 1).ok());
  }
  ASSERT_EQ(trainer.weights().size(), reference.weights().size());
  for (size_t i = 0; i < reference.weights().size(); ++i) {
    EXPECT_TRUE(trainer.weights()[i] == reference.weights()[i])
        << "parameter " << i << " differs from the uninterrupted run";
  }
}

TEST(DurabilityTest, CheckpointCallAndShutdownWriteWhatTheNextStartRestores) {
  TempDir dir;
  const std::vector<std::string> flags = {"--checkpoint_dir=" + dir.path(),
                                          "--checkpoint_every_steps=0"};
  Trainer trainer;
  auto server = Start(flags);
  ASSERT_NE(server, nullptr);
  auto client = ClientOf(*server);
  absl::StatusOr<SessionHandle> a = client->CreateSession(Request());
  absl::StatusOr<SessionHandle> b = client->CreateSession(Request());
  ASSERT_TRUE(a.ok() && b.ok());
  for (uint64_t step = 1; step <= 3; ++step) ASSERT_TRUE(trainer.Step(client.get(), *a, step).ok());

  absl::StatusOr<std::vector<v1::SessionCheckpoint>> written = client->Checkpoint(&*a);
  ASSERT_TRUE(written.ok()) << written.status();
  ASSERT_EQ(written->size(), 1u);
  EXPECT_EQ((*written)[0].step(), 3u);
  EXPECT_EQ((*written)[0].path(), dir.path() + "/" + a->id + ".ckpt");
  struct stat st;
  ASSERT_EQ(stat((*written)[0].path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u) << "the file holds the session's token";
  EXPECT_EQ(static_cast<int64_t>(st.st_size), (*written)[0].bytes());

  // A relaxed server writes at SIGTERM after draining: step 5 of a, step 0
  // of b, both back after the restart.
  for (uint64_t step = 4; step <= 5; ++step) ASSERT_TRUE(trainer.Step(client.get(), *a, step).ok());
  server->Signal(SIGTERM);
  ASSERT_EQ(server->WaitForExit(30), 0);
  server = Start(flags);
  ASSERT_NE(server, nullptr);
  client = ClientOf(*server);
  EXPECT_EQ(SessionStep(client.get(), *a), 5u);
  EXPECT_EQ(SessionStep(client.get(), *b), 0u);
  absl::StatusOr<v1::SessionInfo> restored = client->GetSession(*a);
  ASSERT_TRUE(restored.ok()) << restored.status();
  const v1::HyperParams& hp = restored->params(0).hyper_params();
  ASSERT_EQ(hp.ns_coefficients_size(), 3);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(hp.ns_coefficients(i).a(), kCustomSchedule[i][0]);
    EXPECT_EQ(hp.ns_coefficients(i).b(), kCustomSchedule[i][1]);
    EXPECT_EQ(hp.ns_coefficients(i).c(), kCustomSchedule[i][2]);
  }
  EXPECT_EQ(hp.ns_steps(), 3);
  EXPECT_EQ(hp.ns_eps(), kNsEps);

  // The last step is still answered exactly once after the restart.
  Trainer replay = trainer;
  bool replayed = false;
  ASSERT_TRUE(replay.Step(client.get(), *a, 5, &replayed).ok());
  EXPECT_TRUE(replayed);

  // Training goes on from the restored state; a deleted session's file goes.
  ASSERT_TRUE(trainer.Step(client.get(), *a, 6).ok());
  ASSERT_TRUE(client->DeleteSession(*b).ok());
  EXPECT_FALSE(std::filesystem::exists(dir.path() + "/" + b->id + ".ckpt"));
}

TEST(DurabilityTest, CorruptOrForeignFilesAreSkippedWithALoggedError) {
  TempDir dir;
  const std::vector<std::string> flags = {"--checkpoint_dir=" + dir.path()};
  std::string good_id, truncated_id, flipped_id;
  {
    auto server = Start(flags);
    ASSERT_NE(server, nullptr);
    auto client = ClientOf(*server);
    Trainer trainer;
    std::vector<SessionHandle> sessions;
    for (int i = 0; i < 3; ++i) {
      absl::StatusOr<SessionHandle> s = client->CreateSession(Request());
      ASSERT_TRUE(s.ok());
      ASSERT_TRUE(trainer.Step(client.get(), *s, 1).ok());
      sessions.push_back(*s);
    }
    ASSERT_TRUE(client->Checkpoint(nullptr).ok());
    good_id = sessions[0].id;
    truncated_id = sessions[1].id;
    flipped_id = sessions[2].id;
    server->Signal(SIGKILL);
    server->WaitForExit(10);
  }
  const std::string truncated = dir.path() + "/" + truncated_id + ".ckpt";
  std::filesystem::resize_file(truncated, std::filesystem::file_size(truncated) / 2);
  const std::string flipped = dir.path() + "/" + flipped_id + ".ckpt";
  {
    std::fstream f(flipped, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(100);
    char c;
    f.get(c);
    f.seekp(100);
    f.put(static_cast<char>(c ^ 0x10));
  }
  std::ofstream(dir.path() + "/junk.ckpt") << "not a checkpoint";
  std::ofstream(dir.path() + "/empty.ckpt");

  auto server = Start(flags, /*capture_stderr=*/true);
  ASSERT_NE(server, nullptr);
  auto client = ClientOf(*server);
  absl::StatusOr<std::vector<v1::SessionInfo>> listed = client->ListSessions();
  ASSERT_TRUE(listed.ok()) << listed.status();
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].session_id(), good_id);
  EXPECT_EQ((*listed)[0].step(), 1u);
  const std::string text = server->Stderr();
  EXPECT_THAT(text, HasSubstr("skipping checkpoint " + truncated));
  EXPECT_THAT(text, HasSubstr("skipping checkpoint " + flipped));
  EXPECT_THAT(text, HasSubstr("checksum mismatch"));
  EXPECT_THAT(text, HasSubstr("junk.ckpt"));
  EXPECT_THAT(text, HasSubstr("1 session(s) restored"));
  // Left for an operator to inspect, not deleted.
  EXPECT_TRUE(std::filesystem::exists(truncated));
}

// A session nobody uses for --session_idle_ttl is checkpointed and removed;
// a restart brings it back from its checkpoint, at the step it had.
TEST(DurabilityTest, IdleSessionIsCheckpointedThenRemoved) {
  TempDir dir;
  const std::vector<std::string> flags = {"--checkpoint_dir=" + dir.path(),
                                          "--checkpoint_every_steps=0", "--session_idle_ttl=1s"};
  Trainer trainer;
  SessionHandle session;
  {
    auto server = Start(flags, /*capture_stderr=*/true);
    ASSERT_NE(server, nullptr);
    auto client = ClientOf(*server);
    absl::StatusOr<SessionHandle> created = client->CreateSession(Request());
    ASSERT_TRUE(created.ok()) << created.status();
    session = *created;
    for (uint64_t step = 1; step <= 3; ++step) {
      ASSERT_TRUE(trainer.Step(client.get(), session, step).ok());
    }
    absl::StatusOr<v1::SessionInfo> info = client->GetSession(session);
    ASSERT_TRUE(info.ok()) << info.status();
    ASSERT_TRUE(info->has_last_activity_time());
    EXPECT_GE(info->last_activity_time().seconds(), info->last_step_time().seconds());
    // Polled, not timed: the session goes once it has idled for 1 s.
    for (int i = 0; i < 600; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      absl::StatusOr<std::vector<v1::SessionInfo>> listed = client->ListSessions();
      ASSERT_TRUE(listed.ok()) << listed.status();
      if (listed->empty()) break;
    }
    absl::StatusOr<v1::SessionInfo> gone = client->GetSession(session);
    EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound) << gone.status();
    EXPECT_THAT(gone.status().message(), HasSubstr("--session_idle_ttl"));
    EXPECT_THAT(server->Stderr(), HasSubstr("removed session " + session.id));
    EXPECT_TRUE(std::filesystem::exists(dir.path() + "/" + session.id + ".ckpt"));
  }
  auto server = Start({"--checkpoint_dir=" + dir.path(), "--session_idle_ttl=0"});
  ASSERT_NE(server, nullptr);
  auto client = ClientOf(*server);
  EXPECT_EQ(SessionStep(client.get(), session), 3u);
  ASSERT_TRUE(trainer.Step(client.get(), session, 4).ok());
}

TEST(DurabilityTest, BadSessionIdleTtlStopsStartUp) {
  absl::StatusOr<std::unique_ptr<ServerProcess>> server =
      ServerProcess::Start({"--session_idle_ttl=-1s"}, /*capture_stderr=*/true);
  ASSERT_FALSE(server.ok());
  EXPECT_THAT(server.status().message(), HasSubstr("--session_idle_ttl must be >= 0"));
}

TEST(DurabilityTest, BadDurabilityFlagsStopStartUpAndNoDirectoryRefusesCheckpoints) {
  EXPECT_FALSE(ServerProcess::Start({"--durability=strict"}).ok())
      << "strict durability without a directory must not start";
  EXPECT_FALSE(ServerProcess::Start({"--durability=sometimes"}).ok());
  auto server = Start({});
  ASSERT_NE(server, nullptr);
  auto client = ClientOf(*server);
  absl::StatusOr<std::vector<v1::SessionCheckpoint>> written = client->Checkpoint(nullptr);
  EXPECT_EQ(written.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(written.status().message(), HasSubstr("--checkpoint_dir"));
}

}  // namespace
}  // namespace muon::testing
