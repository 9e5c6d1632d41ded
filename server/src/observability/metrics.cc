#include "observability/metrics.h"

#include <CivetServer.h>
#include <google/protobuf/descriptor.h>
#include <prometheus/collectable.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/family.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include <exception>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "muon/v1/optimizer.pb.h"

namespace muon::server {
namespace {

// civetweb's own words for a failed start (CivetServer's exception says only
// "null context"), kept for the error message.
std::string* CivetLastError() {
  static std::string* last = new std::string();
  return last;
}

int CivetLog(const mg_connection* /*conn*/, const char* message) {
  *CivetLastError() = message;
  return 1;
}

// Step phases, measured (docs/metrics.md, "Buckets"): a small model's send
// and queue take 0.1-0.5 ms on loopback, a GPT-2 medium step on the CPU
// engine minutes. 1-2.5-5 per decade, 0.1 ms..5 min.
const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* buckets = new prometheus::Histogram::BucketBoundaries{
      0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
      0.25,   0.5,     1,      2.5,   5,      10,    25,   60,    120,  300};
  return *buckets;
}

// ‖O·Oᵀ − I‖_F/√r, measured by schedule (docs/metrics.md, "Buckets"): SVD
// about 2e-8, the tuned quintic schedules between 0.04 (aol_dion) and 0.37
// (jordan), each in a bucket of its own; 1 and above means the
// orthogonalization failed.
const prometheus::Histogram::BucketBoundaries& OrthogonalityBuckets() {
  static const auto* buckets = new prometheus::Histogram::BucketBoundaries{
      1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075,
      0.1,  0.15, 0.2,  0.25, 0.3,  0.4,  0.5,  0.75, 1};
  return *buckets;
}

constexpr const char* kOutcomeNames[] = {"ok", "invalid", "aborted", "retried"};
constexpr const char* kPhaseNames[] = {"receive", "queue", "compute", "send", "total"};
constexpr ScheduleKind kSchedules[] = {ScheduleKind::kJordan,       ScheduleKind::kDion,
                                       ScheduleKind::kPolarExpress, ScheduleKind::kAol,
                                       ScheduleKind::kAolDion,      ScheduleKind::kSvd};

// grpc::StatusCode's canonical name, as gRPC and Prometheus users know it.
const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN";
  }
}

// The `method` label: the method name for muon.v1.Optimizer's methods, the
// full path for the health and reflection services, "other" for anything
// else (a client can send any path; the label set must stay bounded).
std::string MethodLabel(absl::string_view path) {
  constexpr absl::string_view kOptimizer = "/muon.v1.Optimizer/";
  if (absl::StartsWith(path, kOptimizer)) {
    // Through a message of the same file, so the descriptor is linked in
    // (a name lookup in the generated pool finds nothing if it is not).
    static const google::protobuf::ServiceDescriptor* service =
        v1::StepRequest::descriptor()->file()->FindServiceByName("Optimizer");
    const absl::string_view name = path.substr(kOptimizer.size());
    if (service != nullptr && service->FindMethodByName(std::string(name)) != nullptr) {
      return std::string(name);
    }
    return "other";
  }
  for (absl::string_view known : {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                                  "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                  "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"}) {
    if (path == known) return std::string(path.substr(1));
  }
  return "other";
}

}  // namespace

StepOutcome OutcomeOfFailure(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::NOT_FOUND:
    case grpc::StatusCode::ALREADY_EXISTS:
    case grpc::StatusCode::FAILED_PRECONDITION:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::PERMISSION_DENIED:
    case grpc::StatusCode::UNIMPLEMENTED:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return StepOutcome::kInvalid;
    default:
      // CANCELLED, ABORTED, DEADLINE_EXCEEDED, UNAVAILABLE (draining) and
      // server errors: the request may have been fine; a retry may succeed.
      return StepOutcome::kAborted;
  }
}

void StepReporter::StreamOpened() { streams_->Increment(); }
void StepReporter::StreamClosed() { streams_->Decrement(); }
void StepReporter::StepEnded(StepOutcome outcome) {
  outcome_[static_cast<int>(outcome)]->Increment();
}
void StepReporter::StepCommitted(const StepTimings& t, int64_t parameters) {
  phase_[0]->Observe(t.receive);
  phase_[1]->Observe(t.queue_longest);
  phase_[2]->Observe(t.compute);
  phase_[3]->Observe(t.send);
  phase_[4]->Observe(t.total);
  parameters_->Increment(static_cast<double>(parameters));
  absl::MutexLock lock(&device_mu_);
  for (size_t i = 0; i < device_compute_.size() && i < t.device_compute.size(); ++i) {
    device_compute_[i]->Observe(t.device_compute[i]);
  }
}
void StepReporter::BytesReceived(int64_t bytes) {
  received_->Increment(static_cast<double>(bytes));
}
void StepReporter::BytesSent(int64_t bytes) { sent_->Increment(static_cast<double>(bytes)); }
void StepReporter::OrthogonalityError(ScheduleKind schedule, double error) {
  const int i = static_cast<int>(schedule);
  if (i < 0 || i >= static_cast<int>(std::size(kSchedules)) || error != error) return;  // NaN
  ortho_[i]->Observe(error);
}

void SessionReporter::SessionCreated() {
  created_->Increment();
  sessions_->Increment();
}
void SessionReporter::SessionRestored() { sessions_->Increment(); }

void SessionReporter::SessionDeleted() { sessions_->Decrement(); }

void RpcReporter::RequestDone(absl::string_view method, grpc::StatusCode code) {
  // Family::Add returns the existing child for known labels (under the
  // family's lock); the label set is bounded by MethodLabel and CodeName.
  requests_->Add({{"method", MethodLabel(method)}, {"code", CodeName(code)}}).Increment();
}

// The registry, with the memory gauges refreshed first: engine memory
// changes inside steps, so it is read when Prometheus asks.
class Metrics::ScrapeCollectable final : public prometheus::Collectable {
 public:
  explicit ScrapeCollectable(const Metrics* metrics) : metrics_(metrics) {}
  std::vector<prometheus::MetricFamily> Collect() const override {
    metrics_->RefreshMemory();
    return metrics_->registry_->Collect();
  }

 private:
  const Metrics* const metrics_;
};

Metrics::Metrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      collectable_(std::make_shared<ScrapeCollectable>(this)) {
  prometheus::Registry& r = *registry_;

  auto& duration =
      prometheus::BuildHistogram()
          .Name("muon_step_duration_seconds")
          .Help(
              "Committed steps' time by phase, seconds: receive (header to last gradient), queue "
              "(the longest any parameter's complete gradient waited for the engine), compute "
              "(engine, summed over batches), send (writing updates before the summary), total "
              "(header to commit).")
          .Register(r);
  for (int i = 0; i < 5; ++i) {
    steps_.phase_[i] = &duration.Add({{"phase", kPhaseNames[i]}}, LatencyBuckets());
  }
  auto& steps =
      prometheus::BuildCounter()
          .Name("muon_steps_total")
          .Help(
              "Step streams by outcome: ok (committed), invalid (rejected request: "
              "INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, ...), aborted "
              "(nothing applied: stream cancelled or broken, ABORTED, UNAVAILABLE, server error), "
              "retried (a retry of the last committed step, answered from its record).")
          .Register(r);
  for (int i = 0; i < 4; ++i) steps_.outcome_[i] = &steps.Add({{"outcome", kOutcomeNames[i]}});
  steps_.received_ = &prometheus::BuildCounter()
                          .Name("muon_received_bytes_total")
                          .Help("Gradient payload bytes received on Step streams.")
                          .Register(r)
                          .Add({});
  steps_.sent_ = &prometheus::BuildCounter()
                      .Name("muon_sent_bytes_total")
                      .Help("Update payload bytes written on Step streams (replays included).")
                      .Register(r)
                      .Add({});
  steps_.parameters_ = &prometheus::BuildCounter()
                            .Name("muon_parameters_updated_total")
                            .Help("Parameters updated by committed steps.")
                            .Register(r)
                            .Add({});
  auto& ortho =
      prometheus::BuildHistogram()
          .Name("muon_orthogonality_error")
          .Help(
              "||O*O^T - I||_F/sqrt(r) of Muon updates by Newton-Schulz schedule, sampled every "
              "--orthogonality_sample_every steps per session (and on steps whose client asked).")
          .Register(r);
  for (ScheduleKind s : kSchedules) {
    steps_.ortho_[static_cast<int>(s)] =
        &ortho.Add({{"schedule", std::string(ScheduleName(s))}}, OrthogonalityBuckets());
  }
  steps_.device_compute_family_ =
      &prometheus::BuildHistogram()
           .Name("muon_device_compute_seconds")
           .Help(
               "Committed steps' engine compute on each device (--devices), seconds, summed over "
               "the step's batches; 0 on a device that holds none of the step's parameters.")
           .Register(r);
  steps_.streams_ = &prometheus::BuildGauge()
                         .Name("muon_active_streams")
                         .Help("Step streams open now.")
                         .Register(r)
                         .Add({});

  auto& memory = prometheus::BuildGauge()
                     .Name("muon_engine_memory_bytes")
                     .Help(
                         "Engine memory (optimizer state, workspaces; device memory on the CUDA "
                         "engine), bytes: used, and budget (--memory_budget_bytes; by default "
                         "the machine's memory).")
                     .Register(r);
  memory_used_ = &memory.Add({{"kind", "used"}});
  memory_budget_ = &memory.Add({{"kind", "budget"}});
  device_parameters_ = &prometheus::BuildGauge()
                            .Name("muon_device_parameters")
                            .Help("Parameters of every session placed on each device (--devices).")
                            .Register(r);
  device_state_bytes_ = &prometheus::BuildGauge()
                             .Name("muon_device_state_bytes")
                             .Help("Optimizer state of the parameters on each device, bytes.")
                             .Register(r);
  device_memory_ = &prometheus::BuildGauge()
                        .Name("muon_device_memory_bytes")
                        .Help("Each device's engine memory, bytes: used, and budget.")
                        .Register(r);
  device_work_ = &prometheus::BuildGauge()
                      .Name("muon_device_estimated_step_seconds")
                      .Help(
                          "Device work one step of every parameter on each device is estimated "
                          "to take (Newton-Schulz flops and state traffic at an H200's rates), "
                          "seconds: what placement balances.")
                      .Register(r);

  sessions_.created_ = &prometheus::BuildCounter()
                            .Name("muon_sessions_created_total")
                            .Help("Sessions created since start.")
                            .Register(r)
                            .Add({});
  sessions_.sessions_ =
      &prometheus::BuildGauge().Name("muon_sessions").Help("Sessions alive.").Register(r).Add({});

  rpcs_.requests_ = &prometheus::BuildCounter()
                         .Name("muon_grpc_requests_total")
                         .Help("Finished RPCs by method and status code (all services).")
                         .Register(r);
}

Metrics::~Metrics() = default;

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(const std::string& listen) {
  std::unique_ptr<Metrics> metrics(new Metrics());
  if (listen.empty()) return metrics;
  // prometheus-cpp reports a bind failure by throwing; this is the one place
  // an exception is caught and turned into a Status.
  CivetCallbacks callbacks;
  callbacks.log_message = CivetLog;
  try {
    metrics->exposer_ = std::make_unique<prometheus::Exposer>(listen, 2, &callbacks);
  } catch (const std::exception& e) {
    const std::string& civet = *CivetLastError();
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", listen, ": ", e.what(),
                                               civet.empty() ? "" : " (civetweb: ", civet,
                                               civet.empty() ? "" : ")",
                                               "; set --metrics_listen, or empty to disable"));
  }
  metrics->exposer_->RegisterCollectable(metrics->collectable_);
  return metrics;
}

void Metrics::SetMemoryProbe(std::function<MemoryUsage()> probe) {
  absl::MutexLock lock(&probe_mu_);
  probe_ = std::move(probe);
}

void Metrics::SetDeviceProbe(std::vector<std::string> names,
                             std::function<std::vector<ShardLoad>()> probe) {
  {
    absl::MutexLock lock(&steps_.device_mu_);
    steps_.device_compute_.clear();
    for (const std::string& name : names) {
      steps_.device_compute_.push_back(
          &steps_.device_compute_family_->Add({{"device", name}}, LatencyBuckets()));
    }
  }
  absl::MutexLock lock(&probe_mu_);
  device_names_ = std::move(names);
  device_probe_ = std::move(probe);
}

void Metrics::RefreshMemory() const {
  MemoryUsage usage;
  std::vector<ShardLoad> loads;
  std::vector<std::string> names;
  bool have_memory = false;
  {
    absl::MutexLock lock(&probe_mu_);
    if (probe_) {
      usage = probe_();
      have_memory = true;
    }
    if (device_probe_) {
      loads = device_probe_();
      names = device_names_;
    }
  }
  if (have_memory) {
    memory_used_->Set(static_cast<double>(usage.used_bytes));
    memory_budget_->Set(static_cast<double>(usage.budget_bytes));
  }
  // Family::Add returns the existing child for a known label set; the set is
  // bounded by the device list.
  for (size_t i = 0; i < loads.size() && i < names.size(); ++i) {
    const ShardLoad& l = loads[i];
    device_parameters_->Add({{"device", names[i]}}).Set(static_cast<double>(l.parameters));
    device_state_bytes_->Add({{"device", names[i]}}).Set(static_cast<double>(l.state_bytes));
    device_memory_->Add({{"device", names[i]}, {"kind", "used"}})
        .Set(static_cast<double>(l.memory.used_bytes));
    device_memory_->Add({{"device", names[i]}, {"kind", "budget"}})
        .Set(static_cast<double>(l.memory.budget_bytes));
    device_work_->Add({{"device", names[i]}}).Set(l.cost_seconds);
  }
}

std::string Metrics::Text() const {
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, collectable_->Collect());
  return out.str();
}

}  // namespace muon::server
