// The real muonctl binary against the real muon-server on 127.0.0.1:0: each
// command as a user types it, its output and its exit status. The binaries
// are $MUONCTL_BIN and $MUON_SERVER_BIN (set by CTest).

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "server_process.h"

extern char** environ;

namespace muon {
namespace {

using ::testing::ContainsRegex;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::StartsWith;

struct Outcome {
  int exit_code = -1;  // -signal when killed by one
  std::string out;
  std::string err;
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Runs muonctl with `args`, stdout and stderr captured apart.
Outcome Muonctl(const std::vector<std::string>& args) {
  Outcome run;
  const char* bin = std::getenv("MUONCTL_BIN");
  if (bin == nullptr) {
    run.err = "set MUONCTL_BIN";
    return run;
  }
  char dir_template[] = "/tmp/muonctl-test-XXXXXX";
  if (mkdtemp(dir_template) == nullptr) {
    run.err = "mkdtemp failed";
    return run;
  }
  const std::string dir = dir_template;
  const std::string out_path = dir + "/stdout";
  const std::string err_path = dir + "/stderr";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                   0600);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                   0600);
  std::vector<std::string> argv_strings = {bin};
  argv_strings.insert(argv_strings.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_strings) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  const int spawned = posix_spawn(&pid, bin, &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (spawned != 0) {
    run.err = absl::StrCat("cannot start ", bin);
  } else {
    int status = 0;
    waitpid(pid, &status, 0);
    run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    run.out = ReadFile(out_path);
    run.err = ReadFile(err_path);
  }
  std::remove(out_path.c_str());
  std::remove(err_path.c_str());
  rmdir(dir.c_str());
  return run;
}

std::string Describe(const Outcome& run) {
  return absl::StrCat("exit ", run.exit_code, "\n--- stdout\n", run.out, "--- stderr\n", run.err);
}

// The value of the line "key: value" in `text`, or "" when there is none.
std::string Field(const std::string& text, const std::string& key) {
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (absl::ConsumePrefix(&line, key + ": ")) return std::string(line);
  }
  return "";
}

// One server for the whole suite: starting it is the slow part.
class MuonctlTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<std::unique_ptr<testing::ServerProcess>> server =
        testing::ServerProcess::Start();
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override { ASSERT_NE(server_, nullptr) << "the server did not start"; }

  // muonctl --server=<the test server> args...
  static Outcome Ctl(std::vector<std::string> args) {
    args.insert(args.begin(), "--server=" + server_->address());
    return Muonctl(args);
  }

  static testing::ServerProcess* server_;
};

testing::ServerProcess* MuonctlTest::server_ = nullptr;

TEST_F(MuonctlTest, HealthIsServing) {
  const Outcome run = Ctl({"health"});
  EXPECT_EQ(run.exit_code, 0) << Describe(run);
  EXPECT_EQ(run.out, "SERVING\n");
}

TEST(MuonctlNoServerTest, HealthOfAnAbsentServerIsUnavailable) {
  // Port 1 on loopback: nothing listens there.
  const Outcome run = Muonctl({"--server=127.0.0.1:1", "--timeout=10s", "health"});
  EXPECT_EQ(run.exit_code, 1) << Describe(run);
  EXPECT_THAT(run.err, StartsWith("muonctl: UNAVAILABLE: ")) << Describe(run);
  EXPECT_EQ(run.out, "");
}

TEST_F(MuonctlTest, SessionCreateGetListDelete) {
  const Outcome created = Ctl({"session", "create", "--name=cli-lifecycle"});
  ASSERT_EQ(created.exit_code, 0) << Describe(created);
  const std::string id = Field(created.out, "session_id");
  const std::string token = Field(created.out, "token");
  ASSERT_FALSE(id.empty()) << Describe(created);
  EXPECT_FALSE(token.empty()) << Describe(created);
  EXPECT_EQ(Field(created.out, "step"), "0");

  const Outcome got = Ctl({"session", "get", "--session=" + id, "--token=" + token});
  ASSERT_EQ(got.exit_code, 0) << Describe(got);
  EXPECT_EQ(Field(got.out, "session_id"), id);
  EXPECT_EQ(Field(got.out, "name"), "cli-lifecycle");
  EXPECT_EQ(Field(got.out, "step"), "0");
  EXPECT_EQ(Field(got.out, "num_params"), "16");  // the `small` preset

  // Two steps on it (bench on an existing session), then get shows step 2.
  const Outcome bench =
      Ctl({"bench", "--session=" + id, "--token=" + token, "--steps=2", "--warmup=0", "--keep"});
  ASSERT_EQ(bench.exit_code, 0) << Describe(bench);
  EXPECT_THAT(bench.out, HasSubstr(absl::StrCat("kept session ", id)));
  const Outcome stepped = Ctl({"session", "get", "--session=" + id, "--token=" + token});
  ASSERT_EQ(stepped.exit_code, 0) << Describe(stepped);
  EXPECT_EQ(Field(stepped.out, "step"), "2");
  EXPECT_EQ(Field(stepped.out, "next_step"), "3");

  const Outcome listed = Ctl({"session", "list"});
  ASSERT_EQ(listed.exit_code, 0) << Describe(listed);
  EXPECT_THAT(listed.out, HasSubstr(absl::StrCat(id, " name=cli-lifecycle step=2 params=16 ")));

  const Outcome wrong_token = Ctl({"session", "get", "--session=" + id, "--token=not-" + token});
  EXPECT_EQ(wrong_token.exit_code, 1) << Describe(wrong_token);
  EXPECT_THAT(wrong_token.err, StartsWith("muonctl: PERMISSION_DENIED: "));
  const Outcome no_token = Ctl({"session", "get", "--session=" + id});
  EXPECT_EQ(no_token.exit_code, 1) << Describe(no_token);
  EXPECT_THAT(no_token.err, StartsWith("muonctl: UNAUTHENTICATED: "));
  EXPECT_THAT(no_token.err, Not(HasSubstr(token)));

  const Outcome deleted = Ctl({"session", "delete", "--session=" + id, "--token=" + token});
  ASSERT_EQ(deleted.exit_code, 0) << Describe(deleted);
  EXPECT_EQ(deleted.out, absl::StrCat("deleted ", id, "\n"));

  const Outcome gone = Ctl({"session", "get", "--session=" + id});
  EXPECT_EQ(gone.exit_code, 1) << Describe(gone);
  EXPECT_THAT(gone.err, StartsWith("muonctl: NOT_FOUND: ")) << Describe(gone);
  EXPECT_EQ(gone.out, "");
  const Outcome listed_after = Ctl({"session", "list"});
  ASSERT_EQ(listed_after.exit_code, 0) << Describe(listed_after);
  EXPECT_THAT(listed_after.out, Not(HasSubstr(id)));

  const Outcome deleted_again = Ctl({"session", "delete", "--session=" + id});
  EXPECT_EQ(deleted_again.exit_code, 1) << Describe(deleted_again);
  EXPECT_THAT(deleted_again.err, StartsWith("muonctl: NOT_FOUND: "));
}

TEST_F(MuonctlTest, SessionCommandErrors) {
  const Outcome no_id = Ctl({"session", "get"});
  EXPECT_EQ(no_id.exit_code, 1) << Describe(no_id);
  EXPECT_THAT(no_id.err, HasSubstr("INVALID_ARGUMENT: --session=ID is required"));
  const Outcome bad_verb = Ctl({"session", "rename"});
  EXPECT_EQ(bad_verb.exit_code, 1) << Describe(bad_verb);
  EXPECT_THAT(bad_verb.err, StartsWith("muonctl: INVALID_ARGUMENT: "));
  const Outcome bad_model = Ctl({"session", "create", "--model=gpt5"});
  EXPECT_EQ(bad_model.exit_code, 1) << Describe(bad_model);
  EXPECT_THAT(bad_model.err, HasSubstr("INVALID_ARGUMENT: unknown model \"gpt5\""));
  const Outcome bad_command = Ctl({"frobnicate"});
  EXPECT_EQ(bad_command.exit_code, 1) << Describe(bad_command);
  EXPECT_THAT(bad_command.err, HasSubstr("unknown command \"frobnicate\""));
}

// --tls_ca and --admin_token against a TLS server with an admin token; the
// certificate is self-signed, so it is its own CA.
TEST(MuonctlSecurityTest, TlsAndAdminToken) {
  char dir[] = "/tmp/muonctl-tls-XXXXXX";
  ASSERT_NE(mkdtemp(dir), nullptr);
  const std::string cert = absl::StrCat(dir, "/server.pem");
  const std::string key = absl::StrCat(dir, "/server.key");
  ASSERT_EQ(
      std::system(absl::StrCat("openssl req -x509 -newkey ec -pkeyopt "
                               "ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost "
                               "-addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout ",
                               key, " -out ", cert, " >/dev/null 2>&1")
                      .c_str()),
      0);
  auto server = testing::ServerProcess::Start(
      {"--tls_cert=" + cert, "--tls_key=" + key, "--admin_token=ops-secret"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto ctl = [&](std::vector<std::string> args) {
    args.insert(args.begin(), "--server=" + (*server)->address());
    return Muonctl(args);
  };

  const Outcome plain = ctl({"session", "list", "--admin_token=ops-secret"});
  EXPECT_EQ(plain.exit_code, 1) << Describe(plain);
  EXPECT_THAT(plain.err, StartsWith("muonctl: UNAVAILABLE: "));

  const Outcome created = ctl({"--tls_ca=" + cert, "session", "create", "--name=tls"});
  ASSERT_EQ(created.exit_code, 0) << Describe(created);
  const std::string id = Field(created.out, "session_id");
  const std::string token = Field(created.out, "token");

  const Outcome no_admin = ctl({"--tls_ca=" + cert, "session", "list"});
  EXPECT_EQ(no_admin.exit_code, 1) << Describe(no_admin);
  EXPECT_THAT(no_admin.err, StartsWith("muonctl: UNAUTHENTICATED: "));
  const Outcome wrong_admin = ctl({"--tls_ca=" + cert, "session", "list", "--admin_token=nope"});
  EXPECT_EQ(wrong_admin.exit_code, 1) << Describe(wrong_admin);
  EXPECT_THAT(wrong_admin.err, StartsWith("muonctl: PERMISSION_DENIED: "));
  const Outcome listed = ctl({"--tls_ca=" + cert, "--tls_server_name=localhost", "session", "list",
                              "--admin_token=ops-secret"});
  ASSERT_EQ(listed.exit_code, 0) << Describe(listed);
  EXPECT_THAT(listed.out, HasSubstr(id));

  const Outcome got =
      ctl({"--tls_ca=" + cert, "session", "get", "--session=" + id, "--token=" + token});
  EXPECT_EQ(got.exit_code, 0) << Describe(got);
  // The admin token stands in for the session's token.
  const Outcome deleted =
      ctl({"--tls_ca=" + cert, "session", "delete", "--session=" + id, "--admin_token=ops-secret"});
  EXPECT_EQ(deleted.exit_code, 0) << Describe(deleted);
  std::remove(cert.c_str());
  std::remove(key.c_str());
  rmdir(dir);
}

TEST_F(MuonctlTest, BenchSmall256PrintsRatesAndPhasesAndDeletesItsSession) {
  const Outcome run = Ctl({"bench", "--model=small-256", "--steps=3", "--name=cli-bench"});
  ASSERT_EQ(run.exit_code, 0) << Describe(run);
  const std::vector<std::string> lines = absl::StrSplit(run.out, '\n');
  ASSERT_GE(lines.size(), 2u) << Describe(run);
  // "session ID: small-256, 512 parameters, 134.22 MB of gradients per step"
  std::vector<std::string> first = absl::StrSplit(lines[0], ' ');
  ASSERT_GE(first.size(), 2u) << Describe(run);
  const std::string id(absl::StripSuffix(first[1], ":"));
  EXPECT_THAT(lines[0], HasSubstr("small-256, 512 parameters, 134.22 MB of gradients per step"));
  EXPECT_THAT(run.out, HasSubstr("steps: 3 (+1 warm-up)"));
  double steps_per_second = 0;
  ASSERT_TRUE(absl::SimpleAtod(Field(run.out, "steps/s"), &steps_per_second)) << Describe(run);
  EXPECT_GT(steps_per_second, 0);
  EXPECT_THAT(run.out, HasSubstr("bytes/s: "));
  for (const char* phase : {"phase receive", "phase queue", "phase compute", "phase send"}) {
    EXPECT_THAT(run.out, HasSubstr(phase));
  }
  // queue and compute are sums over the 512 parameters; each also per parameter.
  EXPECT_THAT(run.out, ContainsRegex("phase queue .* ms per parameter\\)"));
  EXPECT_THAT(run.out, ContainsRegex("phase compute .* ms per parameter\\)"));
  EXPECT_THAT(run.out, HasSubstr(absl::StrCat("deleted session ", id, "\n")));
  const Outcome listed = Ctl({"session", "list"});
  ASSERT_EQ(listed.exit_code, 0) << Describe(listed);
  EXPECT_THAT(listed.out, Not(HasSubstr(id)));
}

TEST_F(MuonctlTest, BenchStepPastItsDeadlineExitsNonZero) {
  // A deadline of 1 ns has passed before the stream opens: no timing involved.
  const Outcome run = Ctl({"bench", "--model=small", "--steps=1", "--step_timeout=1ns"});
  EXPECT_EQ(run.exit_code, 1) << Describe(run);
  EXPECT_THAT(run.err, StartsWith("muonctl: DEADLINE_EXCEEDED: ")) << Describe(run);
  EXPECT_THAT(run.out, Not(HasSubstr("steps/s")));
}

TEST_F(MuonctlTest, LoadRunsEveryStepOfEveryClientAndDeletesTheSessions) {
  // A generous limit: the assertion is on what was done, not on time.
  const Outcome run =
      Ctl({"load", "--clients=4", "--steps=5", "--name=cli-load", "--duration_limit=600s"});
  ASSERT_EQ(run.exit_code, 0) << Describe(run);
  EXPECT_THAT(run.out, HasSubstr("clients: 4, workers: 1, model small, 20 steps done of 20 in "));
  EXPECT_THAT(run.out, Not(HasSubstr("cut off")));
  EXPECT_THAT(run.out, HasSubstr("throughput: "));
  EXPECT_THAT(run.out, HasSubstr("step latency: p50 "));
  EXPECT_THAT(run.out, HasSubstr(" ms, p99 "));
  EXPECT_THAT(run.out, HasSubstr("server, p50: gradients in "));
  EXPECT_THAT(run.out, Not(HasSubstr("committed 0.000 ms"))) << "server timings not collected";
  const Outcome listed = Ctl({"session", "list"});
  ASSERT_EQ(listed.exit_code, 0) << Describe(listed);
  EXPECT_THAT(listed.out, Not(HasSubstr("name=cli-load-")));
}

TEST_F(MuonctlTest, LoadStepsParameterServerSessionsWithEveryWorker) {
  for (const std::vector<std::string>& flags :
       {std::vector<std::string>{"--workers=3"},
        std::vector<std::string>{"--workers=1", "--parameter_server"}}) {
    std::vector<std::string> args = {"load", "--clients=2", "--steps=3", "--name=cli-ps-load",
                                     "--duration_limit=600s"};
    args.insert(args.end(), flags.begin(), flags.end());
    const Outcome run = Ctl(args);
    ASSERT_EQ(run.exit_code, 0) << Describe(run);
    EXPECT_THAT(run.out, HasSubstr("clients: 2, workers: " + flags[0].substr(10) +
                                   " (parameter server), model small, 6 steps done of 6 in "));
    EXPECT_THAT(run.out, Not(HasSubstr("cut off")));
  }
  const Outcome listed = Ctl({"session", "list"});
  ASSERT_EQ(listed.exit_code, 0) << Describe(listed);
  EXPECT_THAT(listed.out, Not(HasSubstr("name=cli-ps-load-")));
}

TEST_F(MuonctlTest, LoadReportsTheServersErrorAndExitsNonZero) {
  // The server refuses a negative learning rate at CreateSession.
  const Outcome run = Ctl({"load", "--clients=2", "--steps=1", "--lr=-1", "--name=cli-bad-load"});
  EXPECT_EQ(run.exit_code, 1) << Describe(run);
  EXPECT_THAT(run.err, HasSubstr("muonctl: INVALID_ARGUMENT: "));
  EXPECT_THAT(run.err, HasSubstr("lr is -1; it must be finite and >= 0"));
  EXPECT_THAT(run.out, Not(HasSubstr("step latency")));
  const Outcome listed = Ctl({"session", "list"});
  ASSERT_EQ(listed.exit_code, 0) << Describe(listed);
  EXPECT_THAT(listed.out, Not(HasSubstr("name=cli-bad-load")));
}

TEST(MuonctlNoServerTest, CoefficientsOfPolarExpress) {
  const Outcome run = Muonctl({"coefficients", "--schedule=polar_express", "--steps=5"});
  ASSERT_EQ(run.exit_code, 0) << Describe(run);
  const std::vector<std::string> lines = absl::StrSplit(run.out, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), 5u) << Describe(run);
  // docs/math.md, exactly to 10 decimals; the first column is the step.
  EXPECT_EQ(lines[0], "1 8.2373124905 -23.1577474146 16.6805684114");
  EXPECT_EQ(lines[4], "5 2.3200073129 -1.6862169730 0.4206802734");
}

TEST(MuonctlNoServerTest, CoefficientsOfJordanAndUnknownSchedules) {
  const Outcome jordan = Muonctl({"coefficients", "--schedule=jordan", "--steps=2"});
  ASSERT_EQ(jordan.exit_code, 0) << Describe(jordan);
  EXPECT_EQ(jordan.out,
            "1 3.4445000000 -4.7750000000 2.0315000000\n"
            "2 3.4445000000 -4.7750000000 2.0315000000\n");
  const Outcome unknown = Muonctl({"coefficients", "--schedule=newton", "--steps=5"});
  EXPECT_EQ(unknown.exit_code, 1) << Describe(unknown);
  EXPECT_THAT(unknown.err, StartsWith("muonctl: INVALID_ARGUMENT: "));
  EXPECT_EQ(unknown.out, "");
}

}  // namespace
}  // namespace muon
