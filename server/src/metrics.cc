#include "metrics.h"

#include <CivetServer.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/registry.h>

#include <exception>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

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

}  // namespace

Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {
  auto& sessions_created = prometheus::BuildCounter()
                               .Name("muon_sessions_created_total")
                               .Help("Sessions created since start.")
                               .Register(*registry_);
  sessions_created_ = &sessions_created.Add({});
  auto& sessions =
      prometheus::BuildGauge().Name("muon_sessions").Help("Sessions alive.").Register(*registry_);
  sessions_ = &sessions.Add({});
  auto& steps = prometheus::BuildCounter()
                    .Name("muon_steps_total")
                    .Help(
                        "Step streams by outcome: committed, replayed (a retry of the last "
                        "committed step answered from cache), failed (nothing applied).")
                    .Register(*registry_);
  steps_committed_ = &steps.Add({{"outcome", "committed"}});
  steps_replayed_ = &steps.Add({{"outcome", "replayed"}});
  steps_failed_ = &steps.Add({{"outcome", "failed"}});
  auto& streams = prometheus::BuildGauge()
                      .Name("muon_step_streams")
                      .Help("Step streams open now.")
                      .Register(*registry_);
  streams_ = &streams.Add({});
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
  metrics->exposer_->RegisterCollectable(metrics->registry_);
  return metrics;
}

void Metrics::SessionCreated() {
  sessions_created_->Increment();
  sessions_->Increment();
}
void Metrics::SessionDeleted() { sessions_->Decrement(); }
void Metrics::StepCommitted() { steps_committed_->Increment(); }
void Metrics::StepReplayed() { steps_replayed_->Increment(); }
void Metrics::StepFailed() { steps_failed_->Increment(); }
void Metrics::StreamOpened() { streams_->Increment(); }
void Metrics::StreamClosed() { streams_->Decrement(); }

}  // namespace muon::server
