// muon-server: flags (and MUON_* environment variables), signals, main.

#include <malloc.h>
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "muon/kernels/engine.h"
#include "muon/server/devices.h"
#include "muon/server/server.h"

ABSL_FLAG(std::string, listen, "127.0.0.1:50051",
          "gRPC address HOST:PORT (port 0: any free port; see --port_file). Env MUON_LISTEN.");
ABSL_FLAG(std::string, metrics_listen, "127.0.0.1:9464",
          "Prometheus /metrics address HOST:PORT; empty disables. Env MUON_METRICS_LISTEN.");
ABSL_FLAG(std::string, engine, "auto", "Engine: auto, cpu or cuda. Env MUON_ENGINE.");
ABSL_FLAG(int64_t, memory_budget_bytes, 0,
          "Engine memory budget in bytes (optimizer state; GPU workspaces on CUDA); 0: the "
          "machine's memory (host memory or the cgroup limit for the CPU engine, device memory "
          "for CUDA). Env MUON_MEMORY_BUDGET_BYTES.");
ABSL_FLAG(std::optional<int>, device, std::nullopt,
          "CUDA engine on this one device ordinal (not together with a different --devices). "
          "Env MUON_DEVICE.");
ABSL_FLAG(std::optional<std::vector<std::string>>, devices, std::nullopt,
          "CUDA engine on these devices: comma-separated ordinals, parameters placed across them "
          "by cost (docs/operations.md, \"Several GPUs\"; the speed of two GPUs over one is not "
          "measured yet). Unset (or empty) and no --device: every visible GPU. Env MUON_DEVICES.");
ABSL_FLAG(int, blas_threads, 1,
          "CPU engine with --compute_threads=1: OpenBLAS threads per call; 0: OpenBLAS's default "
          "(OPENBLAS_NUM_THREADS, else one per core). With more compute threads each BLAS call "
          "runs on one thread and this must be 1. Env MUON_BLAS_THREADS.");
ABSL_FLAG(int, compute_threads, 0,
          "CPU engine: threads that compute a step's parameters in parallel, shared by all "
          "sessions; 0: one per core. Updates are bit-identical for every value (at "
          "--blas_threads=1). Env MUON_COMPUTE_THREADS.");
ABSL_FLAG(int, malloc_arenas, 2,
          "glibc malloc arenas; 0: glibc's default (MALLOC_ARENA_MAX, else 8 per core). Steps "
          "allocate large buffers on one gRPC thread and free them on another; with an arena "
          "per thread much of the freed memory stays resident (docs/operations.md). Env "
          "MUON_MALLOC_ARENAS.");
ABSL_FLAG(int, malloc_trim_bytes, 64 << 20,
          "glibc malloc: free memory each arena keeps instead of returning it to the kernel "
          "(M_TRIM_THRESHOLD), with allocations under 32 MiB served from the arenas "
          "(M_MMAP_THRESHOLD). gRPC's message buffers, freed and allocated again every step, "
          "then keep their pages instead of being zero-filled anew (docs/performance.md, "
          "\"Wire\"); 0: glibc's dynamic thresholds. Env MUON_MALLOC_TRIM_BYTES.");
ABSL_FLAG(int, max_sessions, 1024, "Sessions at once. Env MUON_MAX_SESSIONS.");
ABSL_FLAG(int, max_params_per_session, 100000,
          "Parameters per session. Env MUON_MAX_PARAMS_PER_SESSION.");
ABSL_FLAG(int64_t, max_bytes_per_session, 0,
          "Bytes per session (state + one gradient + one update per parameter); 0: no limit. "
          "Env MUON_MAX_BYTES_PER_SESSION.");
ABSL_FLAG(int, max_message_bytes, 4 << 20,
          "Largest gRPC message received or sent. Env MUON_MAX_MESSAGE_BYTES.");
ABSL_FLAG(int, max_concurrent_streams, 256,
          "Step streams open at once. Env MUON_MAX_CONCURRENT_STREAMS.");
ABSL_FLAG(bool, allow_benchmark_sessions, false,
          "Accept CreateSession with benchmark_echo (a session whose updates are its gradients, "
          "for wire benchmarks only; docs/performance.md). Env MUON_ALLOW_BENCHMARK_SESSIONS.");
ABSL_FLAG(std::string, checkpoint_dir, "",
          "Directory for session checkpoints, restored at start; empty: none. Env "
          "MUON_CHECKPOINT_DIR.");
ABSL_FLAG(std::string, durability, "relaxed",
          "relaxed: checkpoint every --checkpoint_every_steps steps, on the Checkpoint call and at "
          "shutdown; strict: every step is on disk before it is acknowledged. Env "
          "MUON_DURABILITY.");
ABSL_FLAG(int, checkpoint_every_steps, 100,
          "Relaxed durability: checkpoint each session every N steps; 0: never. Env "
          "MUON_CHECKPOINT_EVERY_STEPS.");
ABSL_FLAG(double, worker_timeout_seconds, 120,
          "PARAMETER_SERVER sessions: how long a step waits for all its workers before it fails "
          "for all of them, unapplied. Env MUON_WORKER_TIMEOUT_SECONDS.");
ABSL_FLAG(absl::Duration, session_idle_ttl, absl::Hours(24),
          "A session its client has not used for this long (e.g. 24h, 90m) is checkpointed, "
          "when --checkpoint_dir is set, and removed; 0: never. Env MUON_SESSION_IDLE_TTL.");
ABSL_FLAG(std::string, port_file, "",
          "Write the bound gRPC port to this file once serving. Env MUON_PORT_FILE.");
ABSL_FLAG(int, scheduler_threads, 0,
          "Threads running engine work; 0: one per core. Env MUON_SCHEDULER_THREADS.");
ABSL_FLAG(int, update_chunk_bytes, 1 << 20,
          "Largest update chunk sent back, in bytes (clamped under --max_message_bytes). Env "
          "MUON_UPDATE_CHUNK_BYTES.");
ABSL_FLAG(int, orthogonality_sample_every, 100,
          "Measure the orthogonality error (muon_orthogonality_error) on every Nth step of each "
          "session; 0: only when a client asks. Env MUON_ORTHOGONALITY_SAMPLE_EVERY.");
ABSL_FLAG(std::string, admin_token, "",
          "Operator token: required by ListSessions and Checkpoint of every session, accepted "
          "for GetSession and DeleteSession of any session; empty: none. Prefer "
          "--admin_token_file or the environment (a command line is visible to every user). Env "
          "MUON_ADMIN_TOKEN.");
ABSL_FLAG(std::string, admin_token_file, "",
          "File holding the admin token (read once at start; a trailing newline is dropped). "
          "Not together with --admin_token. Env MUON_ADMIN_TOKEN_FILE.");
ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of the server: with --tls_key, the gRPC port speaks TLS "
          "(/metrics stays plain HTTP). Env MUON_TLS_CERT.");
ABSL_FLAG(std::string, tls_key, "", "PEM private key for --tls_cert. Env MUON_TLS_KEY.");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA certificate(s): clients must present a certificate signed by one (mutual "
          "TLS). Needs --tls_cert and --tls_key. Env MUON_TLS_CLIENT_CA.");
ABSL_FLAG(double, drain_timeout_seconds, 30,
          "On SIGTERM/SIGINT, how long to wait for in-flight steps. Env "
          "MUON_DRAIN_TIMEOUT_SECONDS.");

namespace {

// Environment variables set flag values; the command line overrides them.
template <typename T>
bool FromEnv(absl::Flag<T>* flag, const char* env) {
  const char* value = std::getenv(env);
  if (value == nullptr) return true;
  T parsed;
  std::string error;
  if (!absl::ParseFlag(absl::string_view(value), &parsed, &error)) {
    std::cerr << "muon-server: bad " << env << "='" << value << "'"
              << (error.empty() ? " (not a value of the flag's type)" : ": " + error) << "\n";
    return false;
  }
  absl::SetFlag(flag, parsed);
  return true;
}

bool FlagsFromEnv() {
  return FromEnv(&FLAGS_listen, "MUON_LISTEN") &&
         FromEnv(&FLAGS_metrics_listen, "MUON_METRICS_LISTEN") &&
         FromEnv(&FLAGS_engine, "MUON_ENGINE") &&
         FromEnv(&FLAGS_memory_budget_bytes, "MUON_MEMORY_BUDGET_BYTES") &&
         FromEnv(&FLAGS_device, "MUON_DEVICE") &&
         FromEnv(&FLAGS_devices, "MUON_DEVICES") &&
         FromEnv(&FLAGS_blas_threads, "MUON_BLAS_THREADS") &&
         FromEnv(&FLAGS_compute_threads, "MUON_COMPUTE_THREADS") &&
         FromEnv(&FLAGS_malloc_arenas, "MUON_MALLOC_ARENAS") &&
         FromEnv(&FLAGS_malloc_trim_bytes, "MUON_MALLOC_TRIM_BYTES") &&
         FromEnv(&FLAGS_max_sessions, "MUON_MAX_SESSIONS") &&
         FromEnv(&FLAGS_max_params_per_session, "MUON_MAX_PARAMS_PER_SESSION") &&
         FromEnv(&FLAGS_max_bytes_per_session, "MUON_MAX_BYTES_PER_SESSION") &&
         FromEnv(&FLAGS_max_message_bytes, "MUON_MAX_MESSAGE_BYTES") &&
         FromEnv(&FLAGS_max_concurrent_streams, "MUON_MAX_CONCURRENT_STREAMS") &&
         FromEnv(&FLAGS_allow_benchmark_sessions, "MUON_ALLOW_BENCHMARK_SESSIONS") &&
         FromEnv(&FLAGS_checkpoint_dir, "MUON_CHECKPOINT_DIR") &&
         FromEnv(&FLAGS_durability, "MUON_DURABILITY") &&
         FromEnv(&FLAGS_checkpoint_every_steps, "MUON_CHECKPOINT_EVERY_STEPS") &&
         FromEnv(&FLAGS_worker_timeout_seconds, "MUON_WORKER_TIMEOUT_SECONDS") &&
         FromEnv(&FLAGS_session_idle_ttl, "MUON_SESSION_IDLE_TTL") &&
         FromEnv(&FLAGS_port_file, "MUON_PORT_FILE") &&
         FromEnv(&FLAGS_scheduler_threads, "MUON_SCHEDULER_THREADS") &&
         FromEnv(&FLAGS_update_chunk_bytes, "MUON_UPDATE_CHUNK_BYTES") &&
         FromEnv(&FLAGS_orthogonality_sample_every, "MUON_ORTHOGONALITY_SAMPLE_EVERY") &&
         FromEnv(&FLAGS_drain_timeout_seconds, "MUON_DRAIN_TIMEOUT_SECONDS") &&
         FromEnv(&FLAGS_admin_token, "MUON_ADMIN_TOKEN") &&
         FromEnv(&FLAGS_admin_token_file, "MUON_ADMIN_TOKEN_FILE") &&
         FromEnv(&FLAGS_tls_cert, "MUON_TLS_CERT") && FromEnv(&FLAGS_tls_key, "MUON_TLS_KEY") &&
         FromEnv(&FLAGS_tls_client_ca, "MUON_TLS_CLIENT_CA");
}

// The admin token from --admin_token or --admin_token_file (never both);
// false after printing why.
bool AdminToken(std::string* token) {
  const std::string value = absl::GetFlag(FLAGS_admin_token);
  const std::string path = absl::GetFlag(FLAGS_admin_token_file);
  if (!value.empty() && !path.empty()) {
    std::cerr << "muon-server: set one of --admin_token and --admin_token_file (or "
                 "MUON_ADMIN_TOKEN and MUON_ADMIN_TOKEN_FILE), not both\n";
    return false;
  }
  if (path.empty()) {
    *token = value;
    return true;
  }
  std::ifstream in(path, std::ios::binary);
  if (!in.is_open()) {
    std::cerr << "muon-server: cannot read --admin_token_file=" << path << "\n";
    return false;
  }
  std::stringstream contents;
  contents << in.rdbuf();
  *token = contents.str();
  // Files written by editors and `echo` end with a newline that is no part
  // of the token.
  while (!token->empty() && (token->back() == '\n' || token->back() == '\r')) token->pop_back();
  if (token->empty()) {
    std::cerr << "muon-server: --admin_token_file=" << path
              << " is empty; put the token in it, or leave the flag unset for no admin token\n";
    return false;
  }
  return true;
}

// Written to a temporary name and renamed, so a reader never sees half a port.
bool WritePortFile(const std::string& path, int port) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << port << "\n";
    if (!out.good()) return false;
  }
  return std::rename(tmp.c_str(), path.c_str()) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "muon-server: the Muon optimizer as a gRPC service (muon.v1.Optimizer).\n"
      "Flags may also be set by MUON_<FLAG> environment variables.");
  if (!FlagsFromEnv()) return 2;
  absl::ParseCommandLine(argc, argv);
  // Before any thread starts: arenas are made as threads first allocate.
  const int arenas = absl::GetFlag(FLAGS_malloc_arenas);
  if (arenas < 0) {
    std::cerr << "muon-server: --malloc_arenas=" << arenas
              << " must be >= 0 (0: glibc's default)\n";
    return 2;
  }
  if (arenas > 0 && mallopt(M_ARENA_MAX, arenas) != 1) {
    std::cerr << "muon-server: glibc refused --malloc_arenas=" << arenas << "\n";
    return 2;
  }
  const int trim = absl::GetFlag(FLAGS_malloc_trim_bytes);
  if (trim < 0) {
    std::cerr << "muon-server: --malloc_trim_bytes=" << trim
              << " must be >= 0 (0: glibc's default)\n";
    return 2;
  }
  if (trim > 0 &&
      (mallopt(M_MMAP_THRESHOLD, 32 << 20) != 1 || mallopt(M_TRIM_THRESHOLD, trim) != 1)) {
    std::cerr << "muon-server: glibc refused --malloc_trim_bytes=" << trim << "\n";
    return 2;
  }

  // Block the stop signals in every thread; main waits for them below.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  muon::server::ServerOptions options;
  options.listen = absl::GetFlag(FLAGS_listen);
  options.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  options.engine = absl::AsciiStrToLower(absl::GetFlag(FLAGS_engine));
  options.memory_budget_bytes = absl::GetFlag(FLAGS_memory_budget_bytes);
  muon::server::DeviceRequest devices;
  devices.engine = options.engine;
  devices.device = absl::GetFlag(FLAGS_device);
  if (const auto listed = absl::GetFlag(FLAGS_devices); listed.has_value()) {
    devices.devices.emplace();
    for (const std::string& d : *listed) {
      int ordinal = 0;
      if (!absl::SimpleAtoi(d, &ordinal)) {
        std::cerr << "muon-server: bad --devices entry '" << d << "' (want a device ordinal)\n";
        return 2;
      }
      devices.devices->push_back(ordinal);
    }
  }
  // Only counts the devices (no context is made on any); --engine=cpu never
  // touches the CUDA runtime.
  if (options.engine != "cpu") devices.visible = muon::CudaDeviceCount();
  absl::StatusOr<std::vector<int>> resolved = muon::server::ResolveDevices(devices);
  if (!resolved.ok()) {
    std::cerr << "muon-server: " << resolved.status().message() << "\n";
    return 2;
  }
  options.devices = *std::move(resolved);
  if (!options.devices.empty()) options.device = options.devices.front();
  options.blas_threads = absl::GetFlag(FLAGS_blas_threads);
  options.compute_threads = absl::GetFlag(FLAGS_compute_threads);
  options.limits.max_sessions = absl::GetFlag(FLAGS_max_sessions);
  options.limits.max_params_per_session = absl::GetFlag(FLAGS_max_params_per_session);
  options.limits.max_bytes_per_session = absl::GetFlag(FLAGS_max_bytes_per_session);
  options.limits.max_message_bytes = absl::GetFlag(FLAGS_max_message_bytes);
  options.limits.max_concurrent_streams = absl::GetFlag(FLAGS_max_concurrent_streams);
  options.limits.session_idle_ttl = absl::GetFlag(FLAGS_session_idle_ttl);
  options.limits.allow_benchmark_sessions = absl::GetFlag(FLAGS_allow_benchmark_sessions);
  options.checkpoint_dir = absl::GetFlag(FLAGS_checkpoint_dir);
  options.durability = absl::AsciiStrToLower(absl::GetFlag(FLAGS_durability));
  options.checkpoint_every_steps = absl::GetFlag(FLAGS_checkpoint_every_steps);
  options.worker_timeout = absl::Seconds(absl::GetFlag(FLAGS_worker_timeout_seconds));
  options.scheduler_threads = absl::GetFlag(FLAGS_scheduler_threads);
  options.update_chunk_bytes = absl::GetFlag(FLAGS_update_chunk_bytes);
  options.orthogonality_sample_every = absl::GetFlag(FLAGS_orthogonality_sample_every);
  if (!AdminToken(&options.admin_token)) return 2;
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);

  absl::StatusOr<std::unique_ptr<muon::server::Server>> server =
      muon::server::Server::Create(options);
  if (!server.ok()) {
    std::cerr << "muon-server: " << server.status() << "\n";
    return 1;
  }
  const std::string port_file = absl::GetFlag(FLAGS_port_file);
  if (!port_file.empty() && !WritePortFile(port_file, (*server)->port())) {
    std::cerr << "muon-server: cannot write --port_file=" << port_file << "\n";
    return 1;
  }
  std::cerr << "muon-server: serving muon.v1.Optimizer on port " << (*server)->port() << " (engine "
            << options.engine << ", "
            << (options.tls_cert_file.empty()        ? "plaintext"
                : options.tls_client_ca_file.empty() ? "TLS"
                                                     : "mutual TLS")
            << (options.admin_token.empty() ? ", no admin token" : ", admin token set") << ")";
  if (!options.checkpoint_dir.empty()) {
    std::cerr << "; " << (*server)->restored_sessions() << " session(s) restored from "
              << options.checkpoint_dir << ", durability " << options.durability;
  }
  std::cerr << std::endl;

  int signal = 0;
  sigwait(&stop_signals, &signal);
  std::cerr << "muon-server: signal " << signal << ", draining in-flight steps" << std::endl;
  const bool drained = (*server)->Drain(absl::Seconds(absl::GetFlag(FLAGS_drain_timeout_seconds)));
  if (!options.checkpoint_dir.empty()) {
    absl::StatusOr<int> written = (*server)->CheckpointAll();
    if (written.ok()) {
      std::cerr << "muon-server: wrote " << *written << " checkpoint(s) to "
                << options.checkpoint_dir << std::endl;
    } else {
      std::cerr << "muon-server: checkpoint at shutdown failed: " << written.status() << std::endl;
    }
  }
  server->reset();
  std::cerr << "muon-server: " << (drained ? "drained, exiting" : "drain timed out, exiting")
            << std::endl;
  return 0;
}
