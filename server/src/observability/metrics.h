#ifndef MUON_SERVER_SRC_METRICS_H_
#define MUON_SERVER_SRC_METRICS_H_

#include <grpcpp/support/status.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "muon/kernels/engine.h"
#include "muon/kernels/sharded_engine.h"
#include "muon/kernels/types.h"

namespace prometheus {
class Counter;
class Exposer;
class Gauge;
class Histogram;
class Registry;
template <typename T>
class Family;
}  // namespace prometheus

namespace muon::server {

// How a Step stream ended, for muon_steps_total{outcome}.
enum class StepOutcome {
  kOk,       // committed
  kInvalid,  // rejected: the request was wrong (bad shape, unknown session,
             // wrong step, limit)
  kAborted,  // nothing applied for another reason: broken/cancelled stream,
             // ABORTED, server error
  kRetried,  // a retry of the last committed step, answered from its record
};

// Outcome of a failed step from its final status code.
StepOutcome OutcomeOfFailure(grpc::StatusCode code);

// Per-step timings, seconds: StepSummary.timings, and the queue wait the
// histogram observes.
struct StepTimings {
  double receive = 0;
  // Complete gradients' wait for the engine, summed over parameters
  // (StepSummary): grows with the parameter count, so it can exceed total.
  double queue = 0;
  // The longest any one parameter's complete gradient waited: at most
  // total, so it fits the latency buckets. muon_step_duration_seconds
  // {phase="queue"} observes this.
  double queue_longest = 0;
  double compute = 0;
  double send = 0;
  double total = 0;
  // On an engine of several devices: each device's compute seconds,
  // summed over the step's batches (StepStats::device_compute_seconds), for
  // muon_device_compute_seconds; empty on one device.
  std::vector<double> device_compute = {};
};

// What the Step reactor reports. Thread-safe; the metrics it points to
// belong to the Metrics that made it and live as long as it does.
class StepReporter {
 public:
  void StreamOpened();
  void StreamClosed();
  // Once per stream, when it is done.
  void StepEnded(StepOutcome outcome);
  // At commit: the step's phase timings and the number of parameters
  // updated. Each device's compute seconds go to its series once the
  // Metrics has a device probe; without one they are not exported.
  void StepCommitted(const StepTimings& timings, int64_t parameters);
  // Gradient payload bytes as chunks arrive; update payload bytes as written.
  void BytesReceived(int64_t bytes);
  void BytesSent(int64_t bytes);
  void OrthogonalityError(ScheduleKind schedule, double error);

 private:
  friend class Metrics;
  StepReporter() = default;

  prometheus::Gauge* streams_ = nullptr;
  prometheus::Counter* outcome_[4] = {};
  prometheus::Histogram* phase_[5] = {};
  prometheus::Counter* parameters_ = nullptr;
  prometheus::Counter* received_ = nullptr;
  prometheus::Counter* sent_ = nullptr;
  prometheus::Histogram* ortho_[6] = {};  // by ScheduleKind
  prometheus::Family<prometheus::Histogram>* device_compute_family_ = nullptr;
  absl::Mutex device_mu_;
  // One per device of the device probe, in its order.
  std::vector<prometheus::Histogram*> device_compute_ ABSL_GUARDED_BY(device_mu_);
};

// What the session registry reports. Thread-safe.
class SessionReporter {
 public:
  void SessionCreated();
  // A session restored from a checkpoint at start-up: live, not new.
  void SessionRestored();
  void SessionDeleted();

 private:
  friend class Metrics;
  SessionReporter() = default;

  prometheus::Counter* created_ = nullptr;
  prometheus::Gauge* sessions_ = nullptr;
};

// What the gRPC edge reports: every finished RPC. Thread-safe.
class RpcReporter {
 public:
  // method: the full path ("/muon.v1.Optimizer/Step"); paths of services
  // this server does not serve become "other", so a client cannot grow the
  // label set.
  void RequestDone(absl::string_view method, grpc::StatusCode code);

 private:
  friend class Metrics;
  RpcReporter() = default;

  prometheus::Family<prometheus::Counter>* requests_ = nullptr;
};

// The one owner of every Prometheus family the server exports: names, help
// texts, labels and buckets live in metrics.cc (docs/metrics.md explains
// them). Components get a reporter. Thread-safe.
class Metrics {
 public:
  // listen: HOST:PORT serving /metrics; empty: collect but do not serve.
  // Unavailable when the endpoint cannot start.
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(const std::string& listen);
  ~Metrics();

  // Read at every scrape for muon_engine_memory_bytes; until set, the gauges
  // stay 0. The probe must stay callable until the Metrics is destroyed or
  // the probe replaced.
  void SetMemoryProbe(std::function<MemoryUsage()> probe);

  // On an engine of several devices: read at every scrape for the
  // muon_device_* gauges, one label value per device (`names`, in the
  // probe's order: the device ordinals), which also label the
  // muon_device_compute_seconds series StepCommitted fills. Same lifetime
  // rule as the memory probe; unset, there are no muon_device_* series.
  void SetDeviceProbe(std::vector<std::string> names,
                      std::function<std::vector<ShardLoad>()> probe);

  StepReporter* steps() { return &steps_; }
  SessionReporter* sessions() { return &sessions_; }
  RpcReporter* rpcs() { return &rpcs_; }

  // The text exposition format of everything, as a scrape would see it.
  std::string Text() const;

 private:
  class ScrapeCollectable;
  Metrics();
  void RefreshMemory() const;

  std::shared_ptr<prometheus::Registry> registry_;
  std::shared_ptr<ScrapeCollectable> collectable_;
  StepReporter steps_;
  SessionReporter sessions_;
  RpcReporter rpcs_;
  prometheus::Gauge* memory_used_ = nullptr;
  prometheus::Gauge* memory_budget_ = nullptr;
  prometheus::Family<prometheus::Gauge>* device_parameters_ = nullptr;
  prometheus::Family<prometheus::Gauge>* device_state_bytes_ = nullptr;
  prometheus::Family<prometheus::Gauge>* device_memory_ = nullptr;
  prometheus::Family<prometheus::Gauge>* device_work_ = nullptr;
  mutable absl::Mutex probe_mu_;
  std::function<MemoryUsage()> probe_ ABSL_GUARDED_BY(probe_mu_);
  std::vector<std::string> device_names_ ABSL_GUARDED_BY(probe_mu_);
  std::function<std::vector<ShardLoad>()> device_probe_ ABSL_GUARDED_BY(probe_mu_);
  // Last: destroyed first, so no scrape runs while the rest goes away.
  std::unique_ptr<prometheus::Exposer> exposer_;
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_METRICS_H_
