#include "api/service.h"

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/auth.h"
#include "api/server_info.h"
#include "observability/metrics.h"
#include "muon/server/status_util.h"
#include "session/registry.h"
#include "util/thread_pool.h"

namespace muon::server {

absl::Status DrainGate::OpenStream(int max_streams, Stream* stream) {
  absl::MutexLock lock(&mu_);
  if (draining_) {
    return absl::UnavailableError(
        "the server is shutting down and takes no new steps; retry after it restarts or against "
        "another replica");
  }
  if (max_streams > 0 && static_cast<int>(streams_.size()) >= max_streams) {
    return absl::ResourceExhaustedError(
        absl::StrCat("this server already has ", streams_.size(), " Step streams open, its limit",
                     " (--max_concurrent_streams=", max_streams, "); retry later"));
  }
  streams_.insert(stream);
  return absl::OkStatus();
}

void DrainGate::CloseStream(Stream* stream) {
  absl::MutexLock lock(&mu_);
  streams_.erase(stream);
}

void DrainGate::StopStreams() {
  std::vector<Stream*> open;
  {
    absl::MutexLock lock(&mu_);
    for (Stream* s : streams_) {
      s->Pin();
      open.push_back(s);
    }
  }
  // Outside mu_: a stream that finishes closes itself here.
  for (Stream* s : open) {
    s->Stop();
    s->Unpin();
  }
}

absl::Status DrainGate::StartStep() {
  absl::MutexLock lock(&mu_);
  if (draining_) {
    return absl::UnavailableError(
        "the server is shutting down and takes no new steps; retry after it restarts or against "
        "another replica");
  }
  ++steps_;
  return absl::OkStatus();
}

void DrainGate::EndStep() {
  absl::MutexLock lock(&mu_);
  --steps_;
}

void DrainGate::StartDraining() {
  absl::MutexLock lock(&mu_);
  draining_ = true;
}

bool DrainGate::draining() const {
  absl::MutexLock lock(&mu_);
  return draining_;
}

bool DrainGate::WaitForSteps(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithTimeout(absl::Condition(
                                  +[](int* steps) { return *steps == 0; }, &steps_),
                              timeout);
}

namespace {

// How long a Checkpoint call waits for a session's step in flight.
constexpr absl::Duration kCheckpointWait = absl::Seconds(30);

absl::Status Draining() {
  return absl::UnavailableError(
      "the server is shutting down; retry after it restarts or against another replica");
}

}  // namespace

grpc::ServerUnaryReactor* OptimizerService::CreateSession(grpc::CallbackServerContext* ctx,
                                                          const v1::CreateSessionRequest* request,
                                                          v1::CreateSessionResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (gate_.draining()) {
    reactor->Finish(ToGrpcStatus(Draining()));
    return reactor;
  }
  // Registration allocates and zeroes state: engine work, so off the reactor.
  env_.pool->Schedule([this, reactor, request, response] {
    absl::StatusOr<std::shared_ptr<Session>> session = env_.sessions->Create(*request);
    if (!session.ok()) {
      reactor->Finish(ToGrpcStatus(session.status()));
      return;
    }
    response->set_session_id((*session)->id());
    response->set_token((*session)->token());
    response->set_step((*session)->step());
    (*session)->FillInfo(/*with_params=*/true, response->mutable_session());
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* OptimizerService::Step(
    grpc::CallbackServerContext* ctx) {
  return NewStepReactor(&env_, &gate_, ctx);
}

grpc::ServerUnaryReactor* OptimizerService::GetSession(grpc::CallbackServerContext* ctx,
                                                       const v1::GetSessionRequest* request,
                                                       v1::SessionInfo* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  // The admin token is accepted in place of the session's, so an operator
  // can inspect any session.
  const std::string token = RequestToken(request->token(), *ctx);
  absl::StatusOr<std::shared_ptr<Session>> session =
      env_.sessions->GetAuthorized(request->session_id(), token, token);
  if (session.ok()) (*session)->FillInfo(/*with_params=*/true, response);
  reactor->Finish(ToGrpcStatus(session.status()));
  return reactor;
}

grpc::ServerUnaryReactor* OptimizerService::ListSessions(grpc::CallbackServerContext* ctx,
                                                         const v1::ListSessionsRequest* request,
                                                         v1::ListSessionsResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::Status allowed = env_.sessions->CheckAdmin(RequestToken(request->admin_token(), *ctx));
  if (!allowed.ok()) {
    reactor->Finish(ToGrpcStatus(allowed));
    return reactor;
  }
  std::vector<std::shared_ptr<Session>> sessions = env_.sessions->List();
  std::sort(sessions.begin(), sessions.end(),
            [](const auto& a, const auto& b) { return a->id() < b->id(); });
  for (const auto& s : sessions) s->FillInfo(/*with_params=*/false, response->add_sessions());
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* OptimizerService::DeleteSession(grpc::CallbackServerContext* ctx,
                                                          const v1::DeleteSessionRequest* request,
                                                          v1::DeleteSessionResponse* /*response*/) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  env_.pool->Schedule([this, reactor, request, token = RequestToken(request->token(), *ctx)] {
    reactor->Finish(ToGrpcStatus(env_.sessions->Delete(request->session_id(), token)));
  });
  return reactor;
}

grpc::ServerUnaryReactor* OptimizerService::Checkpoint(grpc::CallbackServerContext* ctx,
                                                       const v1::CheckpointRequest* request,
                                                       v1::CheckpointResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (!env_.sessions->durability().enabled()) {
    reactor->Finish(ToGrpcStatus(absl::FailedPreconditionError(
        "this server has no checkpoint directory; start it with --checkpoint_dir=DIR")));
    return reactor;
  }
  const std::string token = RequestToken(request->token(), *ctx);
  const std::string admin_token = RequestToken(request->admin_token(), *ctx);
  // Writing waits for steps in flight and for the disk: off the reactor.
  env_.pool->Schedule([this, reactor, request, response, token, admin_token] {
    absl::Status status;
    if (request->session_id().empty()) {
      status = env_.sessions->CheckAdmin(admin_token);
      absl::StatusOr<std::vector<v1::SessionCheckpoint>> all =
          status.ok() ? env_.sessions->CheckpointAll(kCheckpointWait)
                      : absl::StatusOr<std::vector<v1::SessionCheckpoint>>(status);
      if (all.ok()) {
        for (v1::SessionCheckpoint& c : *all) *response->add_checkpoints() = std::move(c);
      }
      status = all.status();
    } else {
      absl::StatusOr<std::shared_ptr<Session>> session =
          env_.sessions->GetAuthorized(request->session_id(), token, admin_token);
      absl::StatusOr<v1::SessionCheckpoint> one =
          session.ok() ? env_.sessions->durability().Checkpoint(**session, kCheckpointWait) : session.status();
      if (one.ok()) *response->add_checkpoints() = std::move(*one);
      status = one.status();
    }
    reactor->Finish(ToGrpcStatus(status));
  });
  return reactor;
}

grpc::ServerReadReactor<v1::PushWeightsRequest>* OptimizerService::PushWeights(
    grpc::CallbackServerContext* ctx, v1::PushWeightsResponse* response) {
  return NewPushWeightsReactor(&env_, ctx, response);
}

grpc::ServerWriteReactor<v1::PullWeightsResponse>* OptimizerService::PullWeights(
    grpc::CallbackServerContext* ctx, const v1::PullWeightsRequest* request) {
  return NewPullWeightsReactor(&env_, ctx, request);
}

grpc::ServerUnaryReactor* OptimizerService::GetServerInfo(grpc::CallbackServerContext* ctx,
                                                          const v1::GetServerInfoRequest* request,
                                                          v1::ServerInfo* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  absl::StatusOr<v1::ServerInfo> info = DescribeServer(env_, request->ns_steps());
  if (info.ok()) *response = std::move(*info);
  reactor->Finish(ToGrpcStatus(info.status()));
  return reactor;
}

grpc::ServerWriteReactor<v1::ExportStateResponse>* OptimizerService::ExportState(
    grpc::CallbackServerContext* ctx, const v1::ExportStateRequest* request) {
  return NewExportStateReactor(&env_, ctx, request);
}

grpc::ServerReadReactor<v1::ImportStateRequest>* OptimizerService::ImportState(
    grpc::CallbackServerContext* ctx, v1::ImportStateResponse* response) {
  return NewImportStateReactor(&env_, ctx, response);
}

grpc::ServerUnaryReactor* OptimizerService::AddParameters(grpc::CallbackServerContext* ctx,
                                                          const v1::AddParametersRequest* request,
                                                          v1::AddParametersResponse* response) {
  grpc::ServerUnaryReactor* reactor = ctx->DefaultReactor();
  if (gate_.draining()) {
    reactor->Finish(ToGrpcStatus(Draining()));
  } else {
    StartAddParameters(&env_, ctx, request, response, reactor);
  }
  return reactor;
}

}  // namespace muon::server
