// The reporters against a Metrics that serves nothing: what each call adds to
// the exposition text a scrape would read.

#include "observability/metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace muon::server {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::unique_ptr<Metrics> NewMetrics() {
  absl::StatusOr<std::unique_ptr<Metrics>> metrics = Metrics::Create("");
  EXPECT_TRUE(metrics.ok()) << metrics.status();
  return std::move(*metrics);
}

TEST(MetricsTest, StepReporterFillsEveryStepFamily) {
  std::unique_ptr<Metrics> metrics = NewMetrics();
  StepReporter* steps = metrics->steps();
  steps->StreamOpened();
  steps->BytesReceived(1000);
  steps->BytesSent(400);
  steps->StepCommitted(
      {.receive = 0.0007, .queue = 0, .compute = 0.02, .send = 0.001, .total = 0.03},
      /*parameters=*/5);
  steps->OrthogonalityError(ScheduleKind::kPolarExpress, 0.03);
  steps->OrthogonalityError(ScheduleKind::kJordan, std::numeric_limits<double>::quiet_NaN());
  steps->StepEnded(StepOutcome::kOk);
  steps->StepEnded(StepOutcome::kRetried);
  steps->StreamClosed();

  const std::string text = metrics->Text();
  EXPECT_THAT(text, HasSubstr("muon_steps_total{outcome=\"ok\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("muon_steps_total{outcome=\"retried\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("muon_steps_total{outcome=\"invalid\"} 0\n"));
  EXPECT_THAT(text, HasSubstr("muon_received_bytes_total 1000\n"));
  EXPECT_THAT(text, HasSubstr("muon_sent_bytes_total 400\n"));
  EXPECT_THAT(text, HasSubstr("muon_parameters_updated_total 5\n"));
  EXPECT_THAT(text, HasSubstr("muon_active_streams 0\n"));
  // 0.7 ms falls in the 1 ms bucket, not the 0.5 ms one.
  EXPECT_THAT(text,
              HasSubstr("muon_step_duration_seconds_bucket{phase=\"receive\",le=\"0.0005\"} 0\n"));
  EXPECT_THAT(text,
              HasSubstr("muon_step_duration_seconds_bucket{phase=\"receive\",le=\"0.001\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("muon_step_duration_seconds_count{phase=\"total\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("muon_orthogonality_error_count{schedule=\"polar_express\"} 1\n"));
  // NaN (not measured) is dropped, not observed.
  EXPECT_THAT(text, HasSubstr("muon_orthogonality_error_count{schedule=\"jordan\"} 0\n"));
}

TEST(MetricsTest, RpcMethodLabelsStayBounded) {
  std::unique_ptr<Metrics> metrics = NewMetrics();
  RpcReporter* rpcs = metrics->rpcs();
  rpcs->RequestDone("/muon.v1.Optimizer/Step", grpc::StatusCode::OK);
  rpcs->RequestDone("/muon.v1.Optimizer/Step", grpc::StatusCode::OK);
  rpcs->RequestDone("/grpc.health.v1.Health/Check", grpc::StatusCode::OK);
  rpcs->RequestDone("/muon.v1.Optimizer/NoSuchMethod", grpc::StatusCode::UNIMPLEMENTED);
  rpcs->RequestDone("/attacker.Service/x1", grpc::StatusCode::UNIMPLEMENTED);
  const std::string text = metrics->Text();
  EXPECT_THAT(text, HasSubstr("muon_grpc_requests_total{code=\"OK\",method=\"Step\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("muon_grpc_requests_total{code=\"OK\",method=\"grpc.health.v1."
                              "Health/Check\"} 1\n"));
  EXPECT_THAT(text,
              HasSubstr("muon_grpc_requests_total{code=\"UNIMPLEMENTED\",method=\"other\"} 2\n"));
  EXPECT_THAT(text, Not(HasSubstr("NoSuchMethod")));
  EXPECT_THAT(text, Not(HasSubstr("attacker")));
}

TEST(MetricsTest, SessionsAndMemoryProbe) {
  std::unique_ptr<Metrics> metrics = NewMetrics();
  metrics->sessions()->SessionCreated();
  metrics->sessions()->SessionCreated();
  metrics->sessions()->SessionDeleted();
  EXPECT_THAT(metrics->Text(), HasSubstr("muon_engine_memory_bytes{kind=\"used\"} 0\n"));
  metrics->SetMemoryProbe([] { return MemoryUsage{.used_bytes = 123, .budget_bytes = 4096}; });
  const std::string text = metrics->Text();
  EXPECT_THAT(text, HasSubstr("muon_sessions 1\n"));
  EXPECT_THAT(text, HasSubstr("muon_sessions_created_total 2\n"));
  EXPECT_THAT(text, HasSubstr("muon_engine_memory_bytes{kind=\"used\"} 123\n"));
  EXPECT_THAT(text, HasSubstr("muon_engine_memory_bytes{kind=\"budget\"} 4096\n"));
}

// Several devices: each device's placement gauges carry its ordinal, read
// from the probe at each scrape; one device (no probe) exports none.
TEST(MetricsTest, DeviceGaugesAreLabelledByDevice) {
  std::unique_ptr<Metrics> metrics = NewMetrics();
  EXPECT_THAT(metrics->Text(), Not(HasSubstr("muon_device_parameters{")));
  std::vector<ShardLoad> loads(2);
  loads[0] = {.parameters = 3, .state_bytes = 4096, .cost_seconds = 0.25,
              .memory = {.used_bytes = 8192, .budget_bytes = 1 << 20}};
  loads[1] = {.parameters = 1, .state_bytes = 512, .cost_seconds = 0.125,
              .memory = {.used_bytes = 1024, .budget_bytes = 1 << 20}};
  metrics->SetDeviceProbe({"2", "5"}, [&loads] { return loads; });
  std::string text = metrics->Text();
  EXPECT_THAT(text, HasSubstr("muon_device_parameters{device=\"2\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("muon_device_parameters{device=\"5\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("muon_device_state_bytes{device=\"2\"} 4096\n"));
  EXPECT_THAT(text, HasSubstr("muon_device_memory_bytes{device=\"5\",kind=\"used\"} 1024\n"));
  EXPECT_THAT(text,
              HasSubstr("muon_device_memory_bytes{device=\"2\",kind=\"budget\"} 1048576\n"));
  EXPECT_THAT(text, HasSubstr("muon_device_estimated_step_seconds{device=\"5\"} 0.125\n"));
  loads[1].parameters = 7;
  EXPECT_THAT(metrics->Text(), HasSubstr("muon_device_parameters{device=\"5\"} 7\n"));
}

// Several devices: each committed step's compute seconds per device, one
// series per device of the probe; without a probe (one device) none.
TEST(MetricsTest, DeviceComputeSecondsPerDevice) {
  std::unique_ptr<Metrics> metrics = NewMetrics();
  StepTimings step{.compute = 0.02, .total = 0.03, .device_compute = {0.02, 0.004}};
  metrics->steps()->StepCommitted(step, /*parameters=*/4);
  EXPECT_THAT(metrics->Text(), Not(HasSubstr("muon_device_compute_seconds_count{")));
  metrics->SetDeviceProbe({"2", "5"}, [] { return std::vector<ShardLoad>(2); });
  metrics->steps()->StepCommitted(step, 4);
  step.device_compute = {0.5, 0};
  metrics->steps()->StepCommitted(step, 4);
  const std::string text = metrics->Text();
  EXPECT_THAT(text, HasSubstr("muon_device_compute_seconds_count{device=\"2\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("muon_device_compute_seconds_sum{device=\"2\"} 0.52\n"));
  EXPECT_THAT(text, HasSubstr("muon_device_compute_seconds_count{device=\"5\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("muon_device_compute_seconds_sum{device=\"5\"} 0.004\n"));
  EXPECT_THAT(text, HasSubstr("muon_device_compute_seconds_bucket{device=\"5\",le=\"0.0001\"} 1\n"));
}

TEST(MetricsTest, FailedStepOutcomes) {
  EXPECT_EQ(OutcomeOfFailure(grpc::StatusCode::INVALID_ARGUMENT), StepOutcome::kInvalid);
  EXPECT_EQ(OutcomeOfFailure(grpc::StatusCode::FAILED_PRECONDITION), StepOutcome::kInvalid);
  EXPECT_EQ(OutcomeOfFailure(grpc::StatusCode::RESOURCE_EXHAUSTED), StepOutcome::kInvalid);
  EXPECT_EQ(OutcomeOfFailure(grpc::StatusCode::NOT_FOUND), StepOutcome::kInvalid);
  EXPECT_EQ(OutcomeOfFailure(grpc::StatusCode::CANCELLED), StepOutcome::kAborted);
  EXPECT_EQ(OutcomeOfFailure(grpc::StatusCode::ABORTED), StepOutcome::kAborted);
  EXPECT_EQ(OutcomeOfFailure(grpc::StatusCode::UNAVAILABLE), StepOutcome::kAborted);
  EXPECT_EQ(OutcomeOfFailure(grpc::StatusCode::INTERNAL), StepOutcome::kAborted);
}

// The bucket of `family`{label} that holds its single observation, as (lower
// bound, upper bound); upper is +Inf for the overflow bucket.
std::pair<double, double> BucketOf(const std::string& text, const std::string& family,
                                   const std::string& label) {
  const std::string prefix = absl::StrCat(family, "_bucket{", label, ",le=\"");
  double lower = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, prefix)) continue;
    const std::vector<absl::string_view> parts = absl::StrSplit(line, "\"} ");
    if (parts.size() != 2) continue;
    double upper = std::numeric_limits<double>::infinity();
    if (parts[0] != "+Inf") {
      EXPECT_TRUE(absl::SimpleAtod(parts[0], &upper)) << parts[0];
    }
    double count = 0;
    EXPECT_TRUE(absl::SimpleAtod(parts[1], &count)) << parts[1];
    if (count >= 1) return {lower, upper};
    lower = upper;
  }
  ADD_FAILURE() << "no bucket of " << family << "{" << label << "} holds the observation";
  return {0, 0};
}

// The queue phase of a step whose parameters waited in parallel: the sum
// over parameters (StepSummary) is far above the step's own length and
// overflowed the buckets; the histogram observes the longest single wait.
TEST(MetricsTest, QueuePhaseObservesTheLongestWaitNotTheSum) {
  std::unique_ptr<Metrics> metrics = NewMetrics();
  // GPT-2 small on the CPU engine, measured: 48 parameters' waits summed to
  // 43.8 s in a 40.2 s step; the longest one was 0.9 s.
  metrics->steps()->StepCommitted(
      {.receive = 0.62, .queue = 43.8, .queue_longest = 0.9, .compute = 39.8, .send = 0.09,
       .total = 40.2},
      /*parameters=*/48);
  const std::string text = metrics->Text();
  EXPECT_THAT(text, HasSubstr("muon_step_duration_seconds_sum{phase=\"queue\"} 0.9\n"));
  EXPECT_EQ(BucketOf(text, "muon_step_duration_seconds", "phase=\"queue\""),
            std::make_pair(0.5, 1.0));
}

// Phase values measured on the 2-core CPU test machine (docs/metrics.md,
// "Buckets"): each lands in a finite bucket at most 2.5x wide.
TEST(MetricsTest, MeasuredStepPhasesLandInNarrowFiniteBuckets) {
  for (double seconds : {0.00018, 0.00042, 0.0008, 0.0053, 0.044, 0.27, 1.07, 40.2, 90.3, 129.9}) {
    std::unique_ptr<Metrics> metrics = NewMetrics();
    metrics->steps()->StepCommitted({.receive = seconds,
                                     .queue = seconds,
                                     .queue_longest = seconds,
                                     .compute = seconds,
                                     .send = seconds,
                                     .total = seconds},
                                    1);
    const std::string text = metrics->Text();
    for (const char* phase : {"receive", "queue", "compute", "send", "total"}) {
      const auto [lower, upper] = BucketOf(text, "muon_step_duration_seconds",
                                           absl::StrCat("phase=\"", phase, "\""));
      EXPECT_LT(upper, std::numeric_limits<double>::infinity()) << phase << " " << seconds;
      EXPECT_LE(upper, 2.5 * lower + 1e-12) << phase << " " << seconds;
    }
  }
}

// Each schedule's measured mean error (docs/metrics.md, "Buckets") in a
// bucket of its own at most 1.5x wide; the exact SVD in the first bucket.
TEST(MetricsTest, MeasuredOrthogonalityErrorsAreResolvedBySchedule) {
  const std::pair<ScheduleKind, double> measured[] = {
      {ScheduleKind::kAolDion, 0.0401}, {ScheduleKind::kDion, 0.0540},
      {ScheduleKind::kAol, 0.0947},     {ScheduleKind::kPolarExpress, 0.179},
      {ScheduleKind::kJordan, 0.373},
  };
  std::unique_ptr<Metrics> metrics = NewMetrics();
  for (const auto& [schedule, error] : measured) {
    metrics->steps()->OrthogonalityError(schedule, error);
  }
  metrics->steps()->OrthogonalityError(ScheduleKind::kSvd, 2.3e-8);
  const std::string text = metrics->Text();
  std::vector<double> uppers;
  for (const auto& [schedule, error] : measured) {
    const auto [lower, upper] =
        BucketOf(text, "muon_orthogonality_error",
                 absl::StrCat("schedule=\"", ScheduleName(schedule), "\""));
    EXPECT_LE(upper, 1.5 * lower + 1e-12) << ScheduleName(schedule);
    for (double other : uppers) EXPECT_NE(upper, other) << ScheduleName(schedule);
    uppers.push_back(upper);
  }
  EXPECT_EQ(BucketOf(text, "muon_orthogonality_error", "schedule=\"svd\"").first, 0.0);
}

}  // namespace
}  // namespace muon::server
