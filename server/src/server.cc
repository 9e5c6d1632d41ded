#include "muon/server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/server_interceptor.h>

#include <fstream>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "storage/checkpoint_store.h"
#include "observability/metrics.h"
#include "muon/kernels/engine.h"
#include "muon/kernels/sharded_engine.h"
#include "muon/kernels/status_macros.h"
#include "api/service.h"
#include "ps/ps_round.h"
#include "session/durability.h"
#include "session/registry.h"
#include "util/thread_pool.h"

namespace muon::server {

// Owns everything; members are destroyed bottom-up: the gRPC server first
// (no reaction runs afterwards), then the pool (its tasks finish), then the
// sessions and the engine.
class ServerImpl {
 public:
  std::unique_ptr<Engine> engine;
  std::unique_ptr<Metrics> metrics;
  std::unique_ptr<CheckpointStore> checkpoints;
  std::unique_ptr<Durability> durability;
  std::unique_ptr<ThreadPool> pool;
  std::unique_ptr<SessionRegistry> sessions;
  std::unique_ptr<OptimizerService> service;
  std::unique_ptr<grpc::Server> grpc_server;
  // Fails parameter-server rounds whose workers are late; removes idle
  // sessions.
  std::thread watchdog;
  absl::Notification stop_watchdog;
  int port = 0;
  int restored = 0;

  ~ServerImpl() {
    if (watchdog.joinable()) {
      stop_watchdog.Notify();
      watchdog.join();
    }
    if (grpc_server != nullptr) {
      grpc_server->Shutdown(std::chrono::system_clock::now());
      grpc_server->Wait();
      grpc_server.reset();
    }
    pool.reset();
    service.reset();
    sessions.reset();
  }
};

namespace {

// Counts every RPC of every service at the edge, by the status the server
// sends, so calls refused before any handler ran are counted too.
class RpcCountingInterceptor final : public grpc::experimental::Interceptor {
 public:
  RpcCountingInterceptor(const char* method, RpcReporter* reporter)
      : method_(method == nullptr ? "" : method), reporter_(reporter) {}

  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      reporter_->RequestDone(method_, methods->GetSendStatus().error_code());
    }
    methods->Proceed();
  }

 private:
  const std::string method_;
  RpcReporter* const reporter_;
};

class RpcCountingFactory final : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit RpcCountingFactory(RpcReporter* reporter) : reporter_(reporter) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new RpcCountingInterceptor(info->method(), reporter_);
  }

 private:
  RpcReporter* const reporter_;
};

absl::Status ValidateOptions(const ServerOptions& o) {
  if (o.listen.empty()) return absl::InvalidArgumentError("--listen is empty; use HOST:PORT");
  if (o.memory_budget_bytes < 0) {
    return absl::InvalidArgumentError(
        "--memory_budget_bytes must be >= 0 (0: the machine's memory)");
  }
  if (o.limits.max_sessions < 1) return absl::InvalidArgumentError("--max_sessions must be >= 1");
  if (o.limits.max_message_bytes < 64 * 1024) {
    return absl::InvalidArgumentError("--max_message_bytes must be at least 65536");
  }
  if (o.scheduler_threads < 0) {
    return absl::InvalidArgumentError("--scheduler_threads must be >= 0 (0: one per core)");
  }
  if (o.orthogonality_sample_every < 0) {
    return absl::InvalidArgumentError("--orthogonality_sample_every must be >= 0 (0: off)");
  }
  if (o.update_chunk_bytes < 1024) {
    return absl::InvalidArgumentError("--update_chunk_bytes must be at least 1024");
  }
  if (o.durability != "relaxed" && o.durability != "strict") {
    return absl::InvalidArgumentError(
        absl::StrCat("--durability=", o.durability, " is not a mode; use relaxed or strict"));
  }
  if (o.durability == "strict" && o.checkpoint_dir.empty()) {
    return absl::InvalidArgumentError(
        "--durability=strict needs --checkpoint_dir=DIR to write each step to");
  }
  if (o.limits.session_idle_ttl < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--session_idle_ttl must be >= 0 (0: never)");
  }
  if (o.worker_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--worker_timeout_seconds must be > 0");
  }
  if (o.checkpoint_every_steps < 0) {
    return absl::InvalidArgumentError("--checkpoint_every_steps must be >= 0 (0: never)");
  }
  if (o.tls_cert_file.empty() != o.tls_key_file.empty()) {
    return absl::InvalidArgumentError(
        "TLS needs both --tls_cert and --tls_key (the server's certificate chain and its private "
        "key, PEM); only one is set");
  }
  if (!o.tls_client_ca_file.empty() && o.tls_cert_file.empty()) {
    return absl::InvalidArgumentError(
        "--tls_client_ca (mutual TLS) needs --tls_cert and --tls_key too");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadPemFile(const std::string& path, absl::string_view flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in.is_open()) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot read ", flag, "=", path, " (missing or not readable by the server)"));
  }
  std::stringstream contents;
  contents << in.rdbuf();
  if (contents.str().find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, "=", path, " is not a PEM file (no -----BEGIN line)"));
  }
  return contents.str();
}

// Plaintext unless options name a certificate and key; mutual TLS with a
// client CA.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> Credentials(const ServerOptions& o) {
  if (o.tls_cert_file.empty()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions ssl(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  MUON_ASSIGN_OR_RETURN(pair.cert_chain, ReadPemFile(o.tls_cert_file, "--tls_cert"));
  MUON_ASSIGN_OR_RETURN(pair.private_key, ReadPemFile(o.tls_key_file, "--tls_key"));
  ssl.pem_key_cert_pairs.push_back(std::move(pair));
  if (!o.tls_client_ca_file.empty()) {
    MUON_ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadPemFile(o.tls_client_ca_file, "--tls_client_ca"));
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::Create(const ServerOptions& options) {
  MUON_RETURN_IF_ERROR(ValidateOptions(options));
  MUON_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials, Credentials(options));
  auto impl = std::make_unique<ServerImpl>();
  EngineOptions engine_options;
  engine_options.memory_budget_bytes = options.memory_budget_bytes;
  engine_options.memory_budget_setting = "--memory_budget_bytes";
  engine_options.device = options.device;
  engine_options.devices = options.devices;
  engine_options.blas_threads = options.blas_threads;
  engine_options.compute_threads = options.compute_threads;
  // The /metrics endpoint starts before the engine: its threads then do not
  // compete with whatever the engine (the CUDA runtime) reserves, and a bad
  // --metrics_listen fails fast without initializing a device.
  MUON_ASSIGN_OR_RETURN(impl->metrics, Metrics::Create(options.metrics_listen));
  MUON_ASSIGN_OR_RETURN(impl->engine, CreateEngine(options.engine, engine_options));
  impl->metrics->SetMemoryProbe([engine = impl->engine.get()] { return engine->Memory(); });
  if (absl::StatusOr<std::vector<ShardLoad>> loads = ShardLoads(*impl->engine); loads.ok()) {
    std::vector<std::string> names;
    for (size_t i = 0; i < loads->size(); ++i) {
      names.push_back(absl::StrCat(i < options.devices.size() ? options.devices[i]
                                                              : static_cast<int>(i)));
    }
    impl->metrics->SetDeviceProbe(std::move(names), [engine = impl->engine.get()] {
      absl::StatusOr<std::vector<ShardLoad>> now = ShardLoads(*engine);
      return now.ok() ? *std::move(now) : std::vector<ShardLoad>();
    });
  }
  int threads = options.scheduler_threads;
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  impl->pool = std::make_unique<ThreadPool>(threads);
  DurabilityOptions durability;
  if (!options.checkpoint_dir.empty()) {
    MUON_ASSIGN_OR_RETURN(impl->checkpoints, CheckpointStore::Open(options.checkpoint_dir));
    durability.store = impl->checkpoints.get();
    durability.strict = options.durability == "strict";
    durability.every_steps = options.checkpoint_every_steps;
  }
  RoundOptions rounds;
  rounds.metrics = impl->metrics->steps();
  rounds.worker_timeout = options.worker_timeout;
  rounds.chunk_bytes = options.update_chunk_bytes;
  rounds.max_message_bytes = options.limits.max_message_bytes;
  rounds.orthogonality_sample_every = options.orthogonality_sample_every;
  impl->durability = std::make_unique<Durability>(durability, impl->engine.get());
  auto make_rounds = [engine = impl->engine.get(), durability = impl->durability.get(),
                      rounds](Session* session) -> std::unique_ptr<SessionRounds> {
    return std::make_unique<ParameterServerRounds>(session, engine, durability, rounds);
  };
  impl->sessions = std::make_unique<SessionRegistry>(impl->engine.get(), options.limits,
                                                     impl->metrics->sessions(),
                                                     impl->durability.get(), make_rounds,
                                                     options.admin_token);
  // Before the port opens, so no client sees a server without its sessions.
  impl->restored = impl->sessions->RestoreAll();
  ServiceEnv env;
  env.engine = impl->engine.get();
  env.sessions = impl->sessions.get();
  env.pool = impl->pool.get();
  env.step_metrics = impl->metrics->steps();
  env.options = options;
  impl->service = std::make_unique<OptimizerService>(std::move(env));

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, credentials, &impl->port);
  builder.RegisterService(impl->service.get());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<RpcCountingFactory>(impl->metrics->rpcs()));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  builder.SetMaxReceiveMessageSize(options.limits.max_message_bytes);
  builder.SetMaxSendMessageSize(options.limits.max_message_bytes);
  // Keepalive pings find a client whose host vanished (crash, partition)
  // within about a minute, cancelling its stream and freeing its session for
  // the retry; without them the TCP timeout takes a quarter of an hour.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 30 * 1000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20 * 1000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // Clients may ping as often as every 10 s.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10 * 1000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  impl->grpc_server = builder.BuildAndStart();
  if (impl->grpc_server == nullptr || impl->port == 0) {
    impl->grpc_server.reset();
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen,
                     " (address in use or not local? with TLS, do --tls_cert and --tls_key "
                     "match?); pick another with --listen=HOST:PORT"));
  }
  impl->grpc_server->GetHealthCheckService()->SetServingStatus(true);
  impl->watchdog = std::thread([sessions = impl->sessions.get(), stop = &impl->stop_watchdog] {
    while (!stop->WaitForNotificationWithTimeout(absl::Milliseconds(100))) {
      const absl::Time now = absl::Now();
      sessions->ExpireRounds(now);
      sessions->RemoveIdle(now);
    }
  });
  return std::unique_ptr<Server>(new Server(std::move(impl)));
}

Server::Server(std::unique_ptr<ServerImpl> impl) : impl_(std::move(impl)) {}
Server::~Server() = default;

int Server::port() const { return impl_->port; }

bool Server::Drain(absl::Duration timeout) {
  impl_->service->gate().StartDraining();
  impl_->grpc_server->GetHealthCheckService()->SetServingStatus(false);
  const bool drained = impl_->service->gate().WaitForSteps(timeout);
  // Open streams (idle ones, a step that did not drain) answer UNAVAILABLE,
  // never CANCELLED: the client retries them elsewhere or after the restart.
  impl_->service->gate().StopStreams();
  // What is still open after that is cancelled.
  impl_->grpc_server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  return drained;
}

void Server::Wait() { impl_->grpc_server->Wait(); }

int Server::restored_sessions() const { return impl_->restored; }

absl::StatusOr<int> Server::CheckpointAll() {
  if (!impl_->sessions->durability().enabled()) {
    return absl::FailedPreconditionError("no --checkpoint_dir");
  }
  MUON_ASSIGN_OR_RETURN(std::vector<v1::SessionCheckpoint> written,
                        impl_->sessions->CheckpointAll(absl::Seconds(1)));
  return static_cast<int>(written.size());
}

}  // namespace muon::server
