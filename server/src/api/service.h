#ifndef MUON_SERVER_SRC_SERVICE_H_
#define MUON_SERVER_SRC_SERVICE_H_

#include <memory>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "muon/kernels/engine.h"
#include "muon/server/server.h"
#include "muon/v1/optimizer.grpc.pb.h"

namespace muon::server {

class SessionRegistry;
class StepReporter;
class ThreadPool;

// What the service's reactors share. Everything outlives the service.
struct ServiceEnv {
  Engine* engine = nullptr;
  SessionRegistry* sessions = nullptr;
  ThreadPool* pool = nullptr;
  StepReporter* step_metrics = nullptr;
  ServerOptions options;
};

// Tracks open streams and in-flight steps, and refuses new work while
// draining. Thread-safe.
class DrainGate {
 public:
  // An open Step stream, which the gate stops when the server shuts down.
  class Stream {
   public:
    // The server is shutting down: finish now (UNAVAILABLE unless done).
    virtual void Stop() = 0;
    // Keep the stream alive across a Stop; one Unpin per Pin.
    virtual void Pin() = 0;
    virtual void Unpin() = 0;

   protected:
    ~Stream() = default;
  };

  // Unavailable while draining; ResourceExhausted over max_streams.
  absl::Status OpenStream(int max_streams, Stream* stream);
  void CloseStream(Stream* stream);
  // Unavailable while draining; otherwise counts a step stream in flight
  // until EndStep (when the stream is done).
  absl::Status StartStep();
  void EndStep();
  // Refuses new streams and steps from now on.
  void StartDraining();
  bool draining() const;
  // Waits until no step is in flight; false on timeout.
  bool WaitForSteps(absl::Duration timeout);
  // Stops every open stream, so that each answers UNAVAILABLE before gRPC's
  // shutdown cancels what is left.
  void StopStreams();

 private:
  mutable absl::Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  absl::flat_hash_set<Stream*> streams_ ABSL_GUARDED_BY(mu_);
  int steps_ ABSL_GUARDED_BY(mu_) = 0;
};

// muon.v1.Optimizer on the gRPC callback API. Reactions validate and hand
// engine work to the ThreadPool; none blocks.
// v1::Optimizer::CallbackService with Step raw (api/step_wire.h): every
// other method as generated. A new RPC must be added here too, or it
// answers UNIMPLEMENTED (muon_server_integration_test calls each one).
namespace optimizer_methods {
using O = v1::Optimizer;
using Base = O::WithCallbackMethod_CreateSession<O::WithRawCallbackMethod_Step<
    O::WithCallbackMethod_GetSession<O::WithCallbackMethod_ListSessions<
        O::WithCallbackMethod_DeleteSession<O::WithCallbackMethod_Checkpoint<
            O::WithCallbackMethod_PushWeights<O::WithCallbackMethod_PullWeights<
                O::WithCallbackMethod_GetServerInfo<O::WithCallbackMethod_ExportState<
                    O::WithCallbackMethod_ImportState<
                        O::WithCallbackMethod_AddParameters<O::Service>>>>>>>>>>>>;
}  // namespace optimizer_methods

class OptimizerService final : public optimizer_methods::Base {
 public:
  explicit OptimizerService(ServiceEnv env) : env_(std::move(env)) {}

  DrainGate& gate() { return gate_; }

  grpc::ServerUnaryReactor* CreateSession(grpc::CallbackServerContext* ctx,
                                          const v1::CreateSessionRequest* request,
                                          v1::CreateSessionResponse* response) override;
  // Step is a raw method: its reactor reads gradient chunks off gRPC's
  // slices (api/step_wire.h).
  grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Step(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* GetSession(grpc::CallbackServerContext* ctx,
                                       const v1::GetSessionRequest* request,
                                       v1::SessionInfo* response) override;
  grpc::ServerUnaryReactor* ListSessions(grpc::CallbackServerContext* ctx,
                                         const v1::ListSessionsRequest* request,
                                         v1::ListSessionsResponse* response) override;
  grpc::ServerUnaryReactor* DeleteSession(grpc::CallbackServerContext* ctx,
                                          const v1::DeleteSessionRequest* request,
                                          v1::DeleteSessionResponse* response) override;
  grpc::ServerUnaryReactor* Checkpoint(grpc::CallbackServerContext* ctx,
                                       const v1::CheckpointRequest* request,
                                       v1::CheckpointResponse* response) override;
  grpc::ServerReadReactor<v1::PushWeightsRequest>* PushWeights(
      grpc::CallbackServerContext* ctx, v1::PushWeightsResponse* response) override;
  grpc::ServerWriteReactor<v1::PullWeightsResponse>* PullWeights(
      grpc::CallbackServerContext* ctx, const v1::PullWeightsRequest* request) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx,
                                          const v1::GetServerInfoRequest* request,
                                          v1::ServerInfo* response) override;
  grpc::ServerWriteReactor<v1::ExportStateResponse>* ExportState(
      grpc::CallbackServerContext* ctx, const v1::ExportStateRequest* request) override;
  grpc::ServerReadReactor<v1::ImportStateRequest>* ImportState(
      grpc::CallbackServerContext* ctx, v1::ImportStateResponse* response) override;
  grpc::ServerUnaryReactor* AddParameters(grpc::CallbackServerContext* ctx,
                                          const v1::AddParametersRequest* request,
                                          v1::AddParametersResponse* response) override;

 private:
  ServiceEnv env_;
  DrainGate gate_;
};

// The Step stream's reactor (step_reactor.cc).
grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* NewStepReactor(
    const ServiceEnv* env, DrainGate* gate, grpc::CallbackServerContext* ctx);

// PushWeights and PullWeights reactors (weights_reactors.cc).
grpc::ServerReadReactor<v1::PushWeightsRequest>* NewPushWeightsReactor(
    const ServiceEnv* env, grpc::CallbackServerContext* ctx, v1::PushWeightsResponse* response);
grpc::ServerWriteReactor<v1::PullWeightsResponse>* NewPullWeightsReactor(
    const ServiceEnv* env, grpc::CallbackServerContext* ctx, const v1::PullWeightsRequest* request);

// ExportState and ImportState reactors (state_reactors.cc).
grpc::ServerWriteReactor<v1::ExportStateResponse>* NewExportStateReactor(
    const ServiceEnv* env, grpc::CallbackServerContext* ctx, const v1::ExportStateRequest* request);
grpc::ServerReadReactor<v1::ImportStateRequest>* NewImportStateReactor(
    const ServiceEnv* env, grpc::CallbackServerContext* ctx, v1::ImportStateResponse* response);

// AddParameters (add_params.cc): runs the call and finishes `reactor`.
void StartAddParameters(const ServiceEnv* env, grpc::CallbackServerContext* ctx,
                        const v1::AddParametersRequest* request,
                        v1::AddParametersResponse* response, grpc::ServerUnaryReactor* reactor);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_SERVICE_H_
