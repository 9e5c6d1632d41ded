#ifndef MUON_SERVER_SERVER_H_
#define MUON_SERVER_SERVER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace muon::server {

// Limits that keep one client from exhausting the server. Over a limit is
// RESOURCE_EXHAUSTED with a message naming the limit and its flag.
struct Limits {
  int max_sessions = 1024;
  int max_params_per_session = 100000;
  // Optimizer state plus one in-flight gradient and update copy per session.
  // 0: no limit.
  int64_t max_bytes_per_session = 0;
  // Largest gRPC message received or sent (gRPC's own default: 4 MiB).
  int max_message_bytes = 4 << 20;
  // Step streams open at once (all sessions).
  int max_concurrent_streams = 256;
  // A session its client has not used for this long is checkpointed (with a
  // checkpoint directory) and removed, freeing its memory. Zero: never.
  absl::Duration session_idle_ttl = absl::Hours(24);
  // CreateSession may ask for benchmark_echo (updates that are the
  // gradients): off, so no training session gets it by accident.
  bool allow_benchmark_sessions = false;
};

struct ServerOptions {
  // HOST:PORT to serve gRPC on; port 0 picks a free port (see Server::port).
  std::string listen = "127.0.0.1:50051";
  // HOST:PORT for Prometheus' /metrics; empty: no metrics endpoint.
  std::string metrics_listen = "127.0.0.1:9464";
  // "auto", "cpu" or "cuda" (muon::CreateEngine).
  std::string engine = "auto";
  // Engine memory budget (EngineOptions::memory_budget_bytes); 0: the machine's memory.
  int64_t memory_budget_bytes = 0;
  // CUDA device ordinal.
  int device = 0;
  // CUDA engine on these devices (EngineOptions::devices): one engine each,
  // more than one behind the sharded engine; empty: `device` alone.
  // muon-server fills it from its flags with ResolveDevices (devices.h).
  std::vector<int> devices;
  // CPU engine with compute_threads = 1: OpenBLAS threads per call; 0:
  // OpenBLAS's default. With more compute threads it must be 1: each
  // thread calls BLAS single-threaded, since a multi-threaded OpenBLAS
  // called from several threads at once spins against itself
  // (docs/performance.md, "Load").
  int blas_threads = 1;
  // CPU engine: threads computing a step's parameters in parallel, shared
  // by all sessions; 0: one per core.
  int compute_threads = 0;
  Limits limits;
  // Directory for checkpoints; empty: checkpoints disabled. Sessions found
  // there are restored at start.
  std::string checkpoint_dir;
  // "relaxed": checkpoints every checkpoint_every_steps steps, on the
  // Checkpoint call and at shutdown. "strict": also every step, before the
  // step is acknowledged. Needs checkpoint_dir.
  std::string durability = "relaxed";
  // Relaxed durability: checkpoint a session at every Nth step; 0: never.
  int checkpoint_every_steps = 100;
  // PARAMETER_SERVER: how long a step waits for all its workers before it
  // fails for all of them, unapplied.
  absl::Duration worker_timeout = absl::Seconds(120);
  // Threads that run engine work; 0: one per core.
  int scheduler_threads = 0;
  // Largest UpdateChunk payload; clamped below max_message_bytes.
  int update_chunk_bytes = 1 << 20;
  // The server measures the orthogonality error (muon_orthogonality_error)
  // on every Nth step of each session; 0: only when a client asks.
  int orthogonality_sample_every = 100;
  // The operator's token; empty: none. When set, ListSessions and Checkpoint
  // of every session require it, and GetSession, DeleteSession and
  // Checkpoint of one session accept it in place of the session's token.
  std::string admin_token;
  // PEM files of the server's certificate chain and private key: both set,
  // the gRPC port speaks TLS; both empty, plaintext. The /metrics endpoint
  // stays plain HTTP either way.
  std::string tls_cert_file;
  std::string tls_key_file;
  // PEM file of the CA that signs client certificates: set, clients must
  // present a certificate it signed (mutual TLS). Requires the two above.
  std::string tls_client_ca_file;
};

class ServerImpl;

// The running muon-server: gRPC service, health, reflection, metrics.
// Thread-safe.
class Server {
 public:
  // Creates the engine, binds the ports and starts serving.
  // InvalidArgument for bad options or an unreadable TLS file; Unavailable
  // when a port cannot be bound; whatever the engine factory returns.
  static absl::StatusOr<std::unique_ptr<Server>> Create(const ServerOptions& options);
  ~Server();

  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // The bound gRPC port.
  int port() const;

  // Stops accepting new steps and sessions (UNAVAILABLE), marks health
  // NOT_SERVING, waits up to `timeout` for in-flight steps to finish, then
  // shuts the gRPC server down. Returns true when everything drained in time.
  bool Drain(absl::Duration timeout);

  // Blocks until the server has shut down.
  void Wait();

  // Sessions restored from checkpoint_dir at start.
  int restored_sessions() const;

  // Writes every session to checkpoint_dir (after Drain, at shutdown).
  // FailedPrecondition without checkpoint_dir.
  absl::StatusOr<int> CheckpointAll();

 private:
  explicit Server(std::unique_ptr<ServerImpl> impl);
  std::unique_ptr<ServerImpl> impl_;
};

}  // namespace muon::server

#endif  // MUON_SERVER_SERVER_H_
