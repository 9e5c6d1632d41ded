#include "muon/kernels/internal/worker_pool.h"

#include <algorithm>

namespace muon::internal {

WorkerPool::WorkerPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { Work(); });
}

WorkerPool::~WorkerPool() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    work_.SignalAll();
  }
  for (std::thread& t : workers_) t.join();
}

bool WorkerPool::Claim(Job* job, size_t* index) {
  if (job->next == job->n) return false;
  *index = job->next++;
  if (job->next == job->n) jobs_.erase(std::find(jobs_.begin(), jobs_.end(), job));
  return true;
}

void WorkerPool::Finish(Job* job) {
  absl::MutexLock lock(&mu_);
  if (++job->done == job->n) finished_.SignalAll();
}

void WorkerPool::Work() {
  for (;;) {
    Job* job = nullptr;
    size_t index = 0;
    {
      absl::MutexLock lock(&mu_);
      while (!stop_ && jobs_.empty()) work_.Wait(&mu_);
      if (stop_) return;
      job = jobs_.front();
      Claim(job, &index);  // a queued job has an unclaimed index
    }
    // The job outlives this task: its caller waits for every task's Finish.
    job->task(index);
    Finish(job);
  }
}

void WorkerPool::ParallelFor(size_t n, absl::FunctionRef<void(size_t)> task) {
  if (workers_.empty() || n <= 1) {
    for (size_t i = 0; i < n; ++i) task(i);
    return;
  }
  Job job{task, n};
  {
    absl::MutexLock lock(&mu_);
    jobs_.push_back(&job);
    work_.SignalAll();
  }
  for (;;) {
    size_t index = 0;
    {
      absl::MutexLock lock(&mu_);
      if (!Claim(&job, &index)) break;
    }
    task(index);
    Finish(&job);
  }
  absl::MutexLock lock(&mu_);
  while (job.done != job.n) finished_.Wait(&mu_);
}

}  // namespace muon::internal
