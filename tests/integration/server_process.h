#ifndef MUON_TESTS_INTEGRATION_SERVER_PROCESS_H_
#define MUON_TESTS_INTEGRATION_SERVER_PROCESS_H_

#include <grpcpp/grpcpp.h>
#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace muon::testing {

// The engine the server under test runs: $MUON_TEST_ENGINE, default "cpu".
// The reference is always the CPU engine, so only "cpu" is bit-exact.
std::string TestEngine();

// The real muon-server binary as a child process on 127.0.0.1:0, its port
// read from --port_file. The binary is $MUON_SERVER_BIN. The destructor
// kills the process if it is still running.
// A free TCP port on 127.0.0.1 (bound, read, closed).
int FreePort();

// GET http://127.0.0.1:port/path; the whole response, headers included;
// empty when nothing listens there.
std::string HttpGet(int port, const std::string& path);

class ServerProcess {
 public:
  // capture_stderr: the server's stderr goes to a file (see Stderr) instead
  // of the test's; a start-up failure then carries it in its message.
  static absl::StatusOr<std::unique_ptr<ServerProcess>> Start(
      const std::vector<std::string>& extra_flags = {}, bool capture_stderr = false);
  ~ServerProcess();

  // What the server wrote to stderr so far; empty unless captured.
  std::string Stderr() const;

  int port() const { return port_; }
  std::string address() const;
  std::shared_ptr<grpc::Channel> NewChannel() const;

  // Sends `signal`; returns immediately.
  void Signal(int signal) const;
  // Waits for the process to exit; its exit code, or -signal if killed by
  // one; -1000 on timeout.
  int WaitForExit(double timeout_seconds);

 private:
  ServerProcess() = default;
  pid_t pid_ = -1;
  int port_ = 0;
  std::string dir_;
  std::string stderr_path_;
};

}  // namespace muon::testing

#endif  // MUON_TESTS_INTEGRATION_SERVER_PROCESS_H_
