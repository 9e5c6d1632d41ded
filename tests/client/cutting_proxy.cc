#include "cutting_proxy.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace muon::testing {
namespace {

sockaddr_in Loopback(int port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  return addr;
}

bool WriteAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::send(fd, data, size, MSG_NOSIGNAL);
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

CuttingProxy::CuttingProxy(int target_port) : target_port_(target_port) {
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr = Loopback(0);
  ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  ::listen(listen_fd_, 16);
  socklen_t len = sizeof(addr);
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.sin_port);
  acceptor_ = std::thread([this] { Accept(); });
}

CuttingProxy::~CuttingProxy() {
  ::shutdown(listen_fd_, SHUT_RDWR);
  acceptor_.join();
  ::close(listen_fd_);
  std::vector<std::thread> threads;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
    threads.swap(threads_);
  }
  for (std::thread& t : threads) t.join();
  for (int fd : fds_) ::close(fd);
}

std::string CuttingProxy::address() const { return absl::StrCat("127.0.0.1:", port_); }

void CuttingProxy::CutAfter(size_t bytes, Direction direction, int times) {
  std::lock_guard<std::mutex> lock(mu_);
  armed_ = times > 0;
  direction_ = direction;
  remaining_ = bytes;
  bytes_per_cut_ = bytes;
  cuts_left_ = times;
}

int CuttingProxy::cuts() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cuts_;
}

void CuttingProxy::Accept() {
  for (;;) {
    const int client = ::accept(listen_fd_, nullptr, nullptr);
    if (client < 0) return;
    const int server = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr = Loopback(target_port_);
    if (::connect(server, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      ::close(client);
      ::close(server);
      continue;
    }
    const int one = 1;
    ::setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    ::setsockopt(server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    std::lock_guard<std::mutex> lock(mu_);
    fds_.push_back(client);
    fds_.push_back(server);
    threads_.emplace_back([this, client, server] { Pump(client, server, Direction::kUp); });
    threads_.emplace_back([this, client, server] { Pump(server, client, Direction::kDown); });
  }
}

void CuttingProxy::CutLocked() {
  for (int fd : fds_) ::shutdown(fd, SHUT_RDWR);
  ++cuts_;
  armed_ = --cuts_left_ > 0;
  remaining_ = bytes_per_cut_;
}

void CuttingProxy::Pump(int from, int to, Direction direction) {
  char buffer[16384];
  for (;;) {
    const ssize_t n = ::recv(from, buffer, sizeof(buffer), 0);
    if (n <= 0) break;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (armed_ && direction_ == direction) {
        if (static_cast<size_t>(n) > remaining_) {
          CutLocked();
          break;
        }
        remaining_ -= static_cast<size_t>(n);
      }
    }
    if (!WriteAll(to, buffer, static_cast<size_t>(n))) break;
  }
  ::shutdown(from, SHUT_RDWR);
  ::shutdown(to, SHUT_RDWR);
}

}  // namespace muon::testing
