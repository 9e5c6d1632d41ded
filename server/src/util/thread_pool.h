#ifndef MUON_SERVER_SRC_THREAD_POOL_H_
#define MUON_SERVER_SRC_THREAD_POOL_H_

#include <deque>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/any_invocable.h"
#include "absl/synchronization/mutex.h"

namespace muon::server {

// Fixed pool of threads running scheduled closures in FIFO order. The
// scheduler's engine work runs here so that gRPC reactions never block.
// Thread-safe. The destructor runs what is queued, then joins.
class ThreadPool {
 public:
  // REQUIRES: threads >= 1.
  explicit ThreadPool(int threads);
  ~ThreadPool();

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  void Schedule(absl::AnyInvocable<void() &&> fn);

 private:
  void Loop();

  absl::Mutex mu_;
  std::deque<absl::AnyInvocable<void() &&>> queue_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_THREAD_POOL_H_
