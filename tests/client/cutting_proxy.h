#ifndef MUON_TESTS_CLIENT_CUTTING_PROXY_H_
#define MUON_TESTS_CLIENT_CUTTING_PROXY_H_

#include <cstddef>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace muon::testing {

// A TCP proxy on 127.0.0.1:0 in front of a local port that can cut every open
// connection once a number of bytes went one way, so a test breaks a real
// gRPC stream mid-step. New connections go through again. Thread-safe.
class CuttingProxy {
 public:
  enum class Direction { kUp, kDown };  // client → server, server → client

  // REQUIRES: a server listens on 127.0.0.1:target_port.
  explicit CuttingProxy(int target_port);
  ~CuttingProxy();

  std::string address() const;

  // Once `bytes` more bytes went `direction` (counted from now), closes every
  // open connection, before forwarding the bytes past that count. Does so
  // `times` times in all, counting `bytes` afresh after each cut.
  void CutAfter(size_t bytes, Direction direction, int times = 1);

  // How many times the connections were cut.
  int cuts() const;

 private:
  void Accept();
  void Pump(int from, int to, Direction direction);
  void CutLocked();

  int listen_fd_ = -1;
  int port_ = 0;
  const int target_port_;
  mutable std::mutex mu_;
  std::vector<int> fds_;  // open sockets, both sides
  std::vector<std::thread> threads_;
  bool armed_ = false;
  Direction direction_ = Direction::kUp;
  size_t remaining_ = 0;
  size_t bytes_per_cut_ = 0;
  int cuts_left_ = 0;
  int cuts_ = 0;
  std::thread acceptor_;
};

}  // namespace muon::testing

#endif  // MUON_TESTS_CLIENT_CUTTING_PROXY_H_
