#ifndef MUON_SERVER_SRC_METRICS_H_
#define MUON_SERVER_SRC_METRICS_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace prometheus {
class Counter;
class Exposer;
class Gauge;
class Registry;
}  // namespace prometheus

namespace muon::server {

// The one owner of every Prometheus family the server exports: names and
// help texts live in metrics.cc. Thread-safe.
class Metrics {
 public:
  // listen: HOST:PORT serving /metrics; empty: collect but do not serve.
  // Unavailable when the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(const std::string& listen);
  ~Metrics();

  void SessionCreated();
  void SessionDeleted();
  void StepCommitted();
  void StepReplayed();
  void StepFailed();
  void StreamOpened();
  void StreamClosed();

 private:
  Metrics();

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  prometheus::Counter* sessions_created_ = nullptr;
  prometheus::Gauge* sessions_ = nullptr;
  prometheus::Counter* steps_committed_ = nullptr;
  prometheus::Counter* steps_replayed_ = nullptr;
  prometheus::Counter* steps_failed_ = nullptr;
  prometheus::Gauge* streams_ = nullptr;
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_METRICS_H_
