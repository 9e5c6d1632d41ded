// AddParameters: a live UPDATES session gains parameters between steps.

#include <memory>
#include <string>

#include "api/auth.h"
#include "api/service.h"
#include "muon/server/status_util.h"
#include "session/registry.h"
#include "session/session.h"
#include "util/thread_pool.h"

namespace muon::server {

void StartAddParameters(const ServiceEnv* env, grpc::CallbackServerContext* ctx,
                        const v1::AddParametersRequest* request,
                        v1::AddParametersResponse* response, grpc::ServerUnaryReactor* reactor) {
  // Registration allocates and zeroes state, and a checkpoint writes to
  // disk: off the reactor.
  env->pool->Schedule([env, reactor, request, response,
                       token = RequestToken(request->token(), *ctx)] {
    absl::StatusOr<std::shared_ptr<Session>> session =
        env->sessions->Get(request->session_id(), token);
    if (!session.ok()) {
      reactor->Finish(ToGrpcStatus(session.status()));
      return;
    }
    absl::StatusOr<uint32_t> first = env->sessions->AddParams(**session, request->params());
    if (!first.ok()) {
      reactor->Finish(ToGrpcStatus(first.status()));
      return;
    }
    response->set_first_index(*first);
    (*session)->FillInfo(/*with_params=*/true, response->mutable_session());
    reactor->Finish(grpc::Status::OK);
  });
}

}  // namespace muon::server
