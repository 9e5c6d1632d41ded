#ifndef MUON_KERNELS_INTERNAL_WORKER_POOL_H_
#define MUON_KERNELS_INTERNAL_WORKER_POOL_H_

#include <cstddef>
#include <deque>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/synchronization/mutex.h"

namespace muon::internal {

// A fixed set of threads for the CPU engine's step tasks. Several callers may
// run ParallelFor at once (one per session stepping): their tasks share the
// workers, so the engine never runs more compute threads than it was given
// plus its callers, and each caller works on its own tasks too.
class WorkerPool {
 public:
  // `threads` >= 1 compute threads: threads − 1 workers, and the caller of
  // each ParallelFor.
  explicit WorkerPool(int threads);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs task(0), …, task(n − 1), each once, on the workers and the calling
  // thread, in order of index as threads free up; returns when all are done.
  // A task must not throw.
  void ParallelFor(size_t n, absl::FunctionRef<void(size_t)> task);

 private:
  struct Job {
    absl::FunctionRef<void(size_t)> task;
    size_t n = 0;
    size_t next = 0;  // first index not yet claimed
    size_t done = 0;
  };

  // Claims the next index of `job` into *index (false when none is left);
  // drops the job from the queue once its last index is claimed.
  bool Claim(Job* job, size_t* index) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Finish(Job* job);
  void Work();

  absl::Mutex mu_;
  absl::CondVar work_;      // a job was queued, or stop_
  absl::CondVar finished_;  // some job's last task finished
  std::deque<Job*> jobs_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> workers_;
};

}  // namespace muon::internal

#endif  // MUON_KERNELS_INTERNAL_WORKER_POOL_H_
