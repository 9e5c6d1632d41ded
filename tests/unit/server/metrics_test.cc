// The reporters against a Metrics that serves nothing: what each call adds to
// the exposition text a scrape would read.

#include "observability/metrics.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>

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

}  // namespace
}  // namespace muon::server
