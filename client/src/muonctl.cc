// muonctl: health, server info, sessions, a benchmark and a load generator
// for a muon-server, and its Newton–Schulz coefficient tables. It knows only
// the proto and the client library. docs/muonctl.md.

#include <malloc.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>

#include <unistd.h>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "model_presets.h"
#include "muon/client/client.h"
#include "stats.h"

ABSL_FLAG(std::string, server, "127.0.0.1:50051", "Server address HOST:PORT.");
ABSL_FLAG(std::string, admin_token, "",
          "The server's admin token: sent on every call as 'authorization: Bearer', so it "
          "authorizes `session list`, `checkpoint` of every session, and `session get|delete` "
          "without --token.");
ABSL_FLAG(std::string, session, "", "Session id (session get|delete, bench, checkpoint).");
ABSL_FLAG(std::string, token, "",
          "The session's token (session get|delete, bench, checkpoint --session).");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA certificate(s) of the server's certificate; setting any --tls_* flag turns "
          "TLS on (empty: gRPC's default roots).");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate chain, for mutual TLS.");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert.");
ABSL_FLAG(std::string, tls_server_name, "",
          "Name the server's certificate must carry, when not --server's host.");
ABSL_FLAG(std::string, name, "muonctl", "Session name (session create, bench, load).");
ABSL_FLAG(std::string, model, "",
          "Model preset: gpt2-small, gpt2-medium, llama-1b, small-256, small. "
          "Default: gpt2-small for bench, small for load and session create.");
ABSL_FLAG(std::string, dtype, "float32", "Wire dtype of gradients: float32, bfloat16, float16.");
ABSL_FLAG(std::string, schedule, "jordan",
          "Newton-Schulz schedule: jordan, dion, polar_express, aol, aol_dion, svd.");
ABSL_FLAG(std::string, optimizer, "muon",
          "Optimizer of every preset parameter (bench, load, create): muon, adamw (the same bytes "
          "with element-wise compute), or echo (no optimizer: each update is the gradient, for "
          "the wire benchmark; the server needs --allow_benchmark_sessions; docs/performance.md).");
ABSL_FLAG(int, ns_steps, 5,
          "Newton-Schulz iterations of the session (bench, load, create), and the steps info "
          "lists each schedule's coefficients for.");
ABSL_FLAG(double, lr, 0.02, "Learning rate of the session (bench, load, create).");
ABSL_FLAG(int, steps, 10,
          "bench, load: optimizer steps (per client for load). coefficients: NS steps.");
ABSL_FLAG(int, warmup, 1, "bench: steps run first and left out of the figures.");
ABSL_FLAG(bool, keep, false, "bench: keep the session instead of deleting it.");
ABSL_FLAG(bool, measure_orthogonality, false, "bench: ask the server for orthogonality errors.");
ABSL_FLAG(bool, progress, true,
          "bench, load: report progress on stderr while running (bench: each step; load: steps "
          "done so far, every second on a terminal, else every 10 s).");
ABSL_FLAG(int, clients, 4, "load: concurrent sessions, one thread each.");
ABSL_FLAG(int, workers, 1,
          "load: workers per session; above 1, each session is a PARAMETER_SERVER session whose "
          "workers (one thread each) send every step together.");
ABSL_FLAG(bool, parameter_server, false,
          "load: PARAMETER_SERVER sessions even with one worker (the single-worker baseline of "
          "a parameter-server capacity run).");
ABSL_FLAG(absl::Duration, duration_limit, absl::Seconds(60),
          "load: stop starting new steps after this long.");
ABSL_FLAG(absl::Duration, timeout, absl::Seconds(30), "Deadline of each unary call.");
ABSL_FLAG(int, retries, 3, "Step retries after a broken stream.");
ABSL_FLAG(absl::Duration, step_timeout, absl::Minutes(5),
          "bench: deadline of each step attempt (large models on a CPU engine need more); "
          "inf for none.");
ABSL_FLAG(int64_t, chunk_bytes, 1 << 20,
          "Gradient chunk size in bytes (a multiple of 4; under the server's message limit).");

namespace muon::muonctl {
namespace {

constexpr char kUsage[] = R"(muonctl [flags] COMMAND

Commands:
  health                            the server's grpc.health.v1 status
  session create [--model=small]    register a preset model; prints id, token, step
  session get --session=ID --token=T
                                    one session, its step and parameters
  session list [--admin_token=A]    every session
  session delete --session=ID --token=T
  checkpoint [--session=ID]         write checkpoints on the server
  bench --model=NAME --steps=N [--session=ID --keep]
                                    steps/s, bytes/s, latency by phase
  load --clients=K --steps=S [--workers=W] [--parameter_server] [--model=small]
       [--duration_limit=60s]
                                    K concurrent sessions, one connection per
                                    client and worker; p50/p99 step latency
  info [--ns_steps=N]               the server's version, engine, devices, limits,
                                    durability and schedules (GetServerInfo)
  coefficients --schedule=NAME --steps=N
                                    the server's Newton-Schulz (a, b, c) per step

Every command talks to --server (default 127.0.0.1:50051),
over TLS when any --tls_* flag is set. --admin_token stands in for --token.
Errors print the status code and message and exit 1.)";

// A failure of a command: printed as CODE: message, exit status 1.
int Fail(const absl::Status& status) {
  absl::FPrintF(stderr, "muonctl: %s: %s\n", absl::StatusCodeToString(status.code()),
                status.message());
  return 1;
}

absl::StatusOr<std::unique_ptr<Client>> Connect(bool dedicated_connection = false) {
  ClientOptions options;
  options.dedicated_connection = dedicated_connection;
  options.target = absl::GetFlag(FLAGS_server);
  options.bearer_token = absl::GetFlag(FLAGS_admin_token);
  options.tls.ca_file = absl::GetFlag(FLAGS_tls_ca);
  options.tls.cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls.key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls.server_name = absl::GetFlag(FLAGS_tls_server_name);
  options.tls.enabled = !options.tls.server_name.empty();
  options.call_timeout = absl::GetFlag(FLAGS_timeout);
  options.max_step_attempts = 1 + std::max(0, absl::GetFlag(FLAGS_retries));
  options.chunk_bytes = static_cast<size_t>(std::max<int64_t>(0, absl::GetFlag(FLAGS_chunk_bytes)));
  return Client::Create(options);
}

absl::StatusOr<SessionHandle> SessionFromFlags() {
  if (absl::GetFlag(FLAGS_session).empty()) {
    return absl::InvalidArgumentError("--session=ID is required");
  }
  SessionHandle handle;
  handle.id = absl::GetFlag(FLAGS_session);
  handle.token = absl::GetFlag(FLAGS_token);
  return handle;
}

// ---------------------------------------------------------------------------
// Sessions from presets.

struct WireType {
  v1::DType dtype;
  size_t size;
};

absl::StatusOr<WireType> ParseWireType(const std::string& name) {
  if (name == "float32") return WireType{v1::DTYPE_FLOAT32, 4};
  if (name == "bfloat16") return WireType{v1::DTYPE_BFLOAT16, 2};
  if (name == "float16") return WireType{v1::DTYPE_FLOAT16, 2};
  return absl::InvalidArgumentError(
      absl::StrCat("unknown --dtype=", name, "; known: float32, bfloat16, float16"));
}

absl::StatusOr<v1::CreateSessionRequest> PresetRequest(const std::string& model,
                                                       const std::string& name) {
  absl::StatusOr<std::vector<PresetParam>> params = ModelPreset(model);
  if (!params.ok()) return params.status();
  absl::StatusOr<WireType> wire = ParseWireType(absl::GetFlag(FLAGS_dtype));
  if (!wire.ok()) return wire.status();
  v1::NsSchedule schedule = v1::NS_SCHEDULE_UNSPECIFIED;
  if (!v1::NsSchedule_Parse(absl::AsciiStrToUpper("NS_SCHEDULE_" + absl::GetFlag(FLAGS_schedule)),
                            &schedule)) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown --schedule=", absl::GetFlag(FLAGS_schedule),
                     "; known: jordan, dion, polar_express, aol, aol_dion, svd"));
  }
  const std::string optimizer = absl::GetFlag(FLAGS_optimizer);
  if (optimizer != "muon" && optimizer != "adamw" && optimizer != "echo") {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown --optimizer=", optimizer, "; known: muon, adamw, echo"));
  }
  v1::CreateSessionRequest request;
  request.set_name(name);
  request.mutable_hyper_params()->set_lr(absl::GetFlag(FLAGS_lr));
  request.mutable_hyper_params()->set_ns_schedule(schedule);
  request.mutable_hyper_params()->set_ns_steps(absl::GetFlag(FLAGS_ns_steps));
  request.set_benchmark_echo(optimizer == "echo");
  for (const PresetParam& p : *params) {
    v1::ParameterSpec* spec = request.add_params();
    spec->set_name(p.name);
    spec->add_shape(p.rows);
    spec->add_shape(p.cols);
    spec->set_dtype(wire->dtype);
    spec->set_kind(optimizer == "adamw" ? v1::OPTIMIZER_KIND_ADAMW : v1::OPTIMIZER_KIND_MUON);
  }
  return request;
}

// ---------------------------------------------------------------------------
// Fresh random gradients without generating gigabytes per step: per wire
// dtype, one pool of random non-zero values a little larger than the largest
// tensor, and each step each parameter's gradient is its dtype's pool seen
// from a random element offset.

size_t ElementSize(v1::DType dtype) { return dtype == v1::DTYPE_FLOAT32 ? 4 : 2; }

// One parameter as a step sees it.
struct TensorWire {
  size_t bytes = 0;
  v1::DType dtype = v1::DTYPE_FLOAT32;
};

class GradientPool {
 public:
  static constexpr size_t kSlackElements = 1 << 16;

  GradientPool(size_t max_tensor_bytes, v1::DType dtype, uint64_t seed)
      : size_(ElementSize(dtype)) {
    const size_t elements = max_tensor_bytes / size_ + kSlackElements;
    bytes_.resize(elements * size_);
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> magnitude(1e-3f, 1.0f);
    for (size_t i = 0; i < elements; ++i) {
      const float x = (rng() & 1) ? magnitude(rng) : -magnitude(rng);
      uint32_t bits;
      std::memcpy(&bits, &x, 4);
      std::byte* out = bytes_.data() + i * size_;
      if (dtype == v1::DTYPE_FLOAT32) {
        std::memcpy(out, &bits, 4);
      } else {
        const uint16_t half = dtype == v1::DTYPE_BFLOAT16 ? Bf16(bits) : Fp16(bits);
        std::memcpy(out, &half, 2);
      }
    }
  }

  absl::Span<const std::byte> Sample(size_t bytes, uint64_t random) const {
    const size_t offset = (random % kSlackElements) * size_;
    return absl::MakeConstSpan(bytes_).subspan(offset, bytes);
  }

 private:
  static uint16_t Bf16(uint32_t bits) { return static_cast<uint16_t>(bits >> 16); }
  // |x| in [1e-3, 1]: always a normal fp16 number.
  static uint16_t Fp16(uint32_t bits) {
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const uint32_t exponent = ((bits >> 23) & 0xffu) - 127 + 15;
    return static_cast<uint16_t>(sign | (exponent << 10) | ((bits >> 13) & 0x3ffu));
  }

  size_t size_;
  std::vector<std::byte> bytes_;
};

// Gradients for every parameter of a model. Read-only once made: threads
// share one and draw with their own generators.
class GradientSource {
 public:
  explicit GradientSource(std::vector<TensorWire> tensors) : tensors_(std::move(tensors)) {
    for (v1::DType dtype : {v1::DTYPE_FLOAT32, v1::DTYPE_BFLOAT16, v1::DTYPE_FLOAT16}) {
      size_t max_bytes = 0;
      bool used = false;
      for (const TensorWire& t : tensors_) {
        if (t.dtype != dtype) continue;
        used = true;
        max_bytes = std::max(max_bytes, t.bytes);
      }
      if (used) pools_.emplace(dtype, GradientPool(max_bytes, dtype, 42 + dtype));
    }
  }

  size_t StepBytes() const {
    size_t total = 0;
    for (const TensorWire& t : tensors_) total += t.bytes;
    return total;
  }
  size_t count() const { return tensors_.size(); }

  std::vector<Gradient> Draw(std::mt19937_64& rng) const {
    std::vector<Gradient> grads;
    grads.reserve(tensors_.size());
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const TensorWire& t = tensors_[i];
      grads.push_back(
          {static_cast<uint32_t>(i), pools_.at(t.dtype).Sample(t.bytes, rng()), t.dtype});
    }
    return grads;
  }

 private:
  std::vector<TensorWire> tensors_;
  std::map<v1::DType, GradientPool> pools_;
};

std::vector<TensorWire> TensorsOf(const v1::SessionInfo& info) {
  std::vector<TensorWire> tensors;
  for (const v1::ParameterInfo& p : info.params()) {
    tensors.push_back({static_cast<size_t>(p.tensor_bytes()),
                       p.dtype() == v1::DTYPE_UNSPECIFIED ? v1::DTYPE_FLOAT32 : p.dtype()});
  }
  return tensors;
}

struct Workload {
  SessionHandle session;
  uint64_t next_step = 1;
};

// A session made from a preset, or (with --session) the existing one.
absl::StatusOr<Workload> OpenWorkload(Client& client, const std::string& model,
                                      const std::string& name, bool existing) {
  Workload w;
  if (existing) {
    absl::StatusOr<SessionHandle> handle = SessionFromFlags();
    if (!handle.ok()) return handle.status();
    w.session = std::move(*handle);
    absl::StatusOr<v1::SessionInfo> info = client.GetSession(w.session);
    if (!info.ok()) return info.status();
    w.session.info = std::move(*info);
    w.session.step = w.session.info.step();
    w.next_step = w.session.info.next_step();
    return w;
  }
  absl::StatusOr<v1::CreateSessionRequest> request = PresetRequest(model, name);
  if (!request.ok()) return request.status();
  absl::StatusOr<SessionHandle> created = client.CreateSession(*request);
  if (!created.ok()) return created.status();
  w.session = std::move(*created);
  w.next_step = w.session.step + 1;
  return w;
}

std::string Bytes(double bytes) {
  if (bytes >= 1e9) return absl::StrFormat("%.2f GB", bytes / 1e9);
  if (bytes >= 1e6) return absl::StrFormat("%.2f MB", bytes / 1e6);
  if (bytes >= 1e3) return absl::StrFormat("%.2f kB", bytes / 1e3);
  return absl::StrFormat("%.0f B", bytes);
}

std::string Ms(const Samples& s) {
  return absl::StrFormat("p50 %8.3f  p99 %8.3f  mean %8.3f ms", 1e3 * s.Percentile(50),
                         1e3 * s.Percentile(99), 1e3 * s.Mean());
}

// ---------------------------------------------------------------------------
// Commands.

int Health(Client& client) {
  absl::StatusOr<std::string> status = client.Health();
  if (!status.ok()) return Fail(status.status());
  absl::PrintF("%s\n", *status);
  return *status == "SERVING" ? 0 : 1;
}

void PrintSession(const v1::SessionInfo& info) {
  absl::PrintF(
      "session_id: %s\nname: %s\nmode: %s\nstep: %d\nnext_step: %d\nnum_params: %d\n"
      "state_bytes: %d\nlast_activity: %s\n",
      info.session_id(), info.name(), v1::SessionMode_Name(info.mode()), info.step(),
      info.next_step(), info.num_params(), info.state_bytes(),
      absl::FormatTime(absl::RFC3339_sec,
                       absl::FromUnixSeconds(info.last_activity_time().seconds()),
                       absl::UTCTimeZone()));
  for (const v1::ParameterInfo& p : info.params()) {
    absl::PrintF("param %d: %s [%s] %s %s lr=%g\n", p.index(), p.name(),
                 absl::StrJoin(p.shape(), "x"), v1::DType_Name(p.dtype()),
                 v1::OptimizerKind_Name(p.kind()), p.hyper_params().lr());
  }
}

int SessionCommand(Client& client, const std::vector<char*>& args) {
  const std::string verb = args.size() > 2 ? args[2] : "";
  if (verb == "create") {
    const std::string model =
        absl::GetFlag(FLAGS_model).empty() ? "small" : absl::GetFlag(FLAGS_model);
    absl::StatusOr<v1::CreateSessionRequest> request =
        PresetRequest(model, absl::GetFlag(FLAGS_name));
    if (!request.ok()) return Fail(request.status());
    absl::StatusOr<SessionHandle> session = client.CreateSession(*request);
    if (!session.ok()) return Fail(session.status());
    absl::PrintF("session_id: %s\ntoken: %s\nstep: %d\n", session->id, session->token,
                 session->step);
    return 0;
  }
  if (verb == "get") {
    absl::StatusOr<SessionHandle> handle = SessionFromFlags();
    if (!handle.ok()) return Fail(handle.status());
    absl::StatusOr<v1::SessionInfo> info = client.GetSession(*handle);
    if (!info.ok()) return Fail(info.status());
    PrintSession(*info);
    return 0;
  }
  if (verb == "list") {
    absl::StatusOr<std::vector<v1::SessionInfo>> sessions = client.ListSessions();
    if (!sessions.ok()) return Fail(sessions.status());
    for (const v1::SessionInfo& s : *sessions) {
      absl::PrintF("%s name=%s step=%d params=%d state_bytes=%d\n", s.session_id(), s.name(),
                   s.step(), s.num_params(), s.state_bytes());
    }
    return 0;
  }
  if (verb == "delete") {
    absl::StatusOr<SessionHandle> handle = SessionFromFlags();
    if (!handle.ok()) return Fail(handle.status());
    absl::Status status = client.DeleteSession(*handle);
    if (!status.ok()) return Fail(status);
    absl::PrintF("deleted %s\n", handle->id);
    return 0;
  }
  return Fail(absl::InvalidArgumentError(
      absl::StrCat("session needs create, get, list or delete, got \"", verb, "\"")));
}

int CheckpointCommand(Client& client) {
  std::optional<SessionHandle> handle;
  if (!absl::GetFlag(FLAGS_session).empty()) handle = *SessionFromFlags();
  auto checkpoints = client.Checkpoint(handle.has_value() ? &*handle : nullptr);
  if (!checkpoints.ok()) return Fail(checkpoints.status());
  for (const v1::SessionCheckpoint& c : *checkpoints) {
    absl::PrintF("%s step=%d bytes=%d path=%s\n", c.session_id(), c.step(), c.bytes(), c.path());
  }
  return 0;
}

// Progress of bench and load on stderr (stdout keeps the report): on a
// terminal one line rewritten in place, otherwise a line per report.
class Progress {
 public:
  Progress() : enabled_(absl::GetFlag(FLAGS_progress)), terminal_(isatty(STDERR_FILENO) == 1) {}
  ~Progress() {
    if (shown_ && terminal_) absl::FPrintF(stderr, "\n");
  }
  bool terminal() const { return terminal_; }
  void Report(const std::string& line) {
    if (!enabled_) return;
    shown_ = true;
    if (terminal_) {
      absl::FPrintF(stderr, "\r\033[K%s", line);  // \033[K: clear the rest of the line
    } else {
      absl::FPrintF(stderr, "%s\n", line);
    }
    std::fflush(stderr);
  }

 private:
  const bool enabled_;
  const bool terminal_;
  bool shown_ = false;
};

int Bench(Client& client) {
  const bool existing = !absl::GetFlag(FLAGS_session).empty();
  const std::string model =
      absl::GetFlag(FLAGS_model).empty() ? "gpt2-small" : absl::GetFlag(FLAGS_model);
  const int steps = absl::GetFlag(FLAGS_steps);
  const int warmup = std::max(0, absl::GetFlag(FLAGS_warmup));
  if (steps < 1) return Fail(absl::InvalidArgumentError("--steps must be at least 1"));
  absl::StatusOr<Workload> w = OpenWorkload(client, model, absl::GetFlag(FLAGS_name), existing);
  if (!w.ok()) return Fail(w.status());
  const GradientSource source(TensorsOf(w->session.info));
  absl::PrintF("session %s: %s, %d parameters, %s of gradients per step\n", w->session.id,
               existing ? "existing" : model, source.count(), Bytes(source.StepBytes()));

  // Delete the session on every way out, unless asked to keep it.
  auto finish = [&](int code) {
    if (absl::GetFlag(FLAGS_keep)) {
      absl::PrintF("kept session %s (token %s), step %d\n", w->session.id, w->session.token,
                   w->next_step - 1);
      return code;
    }
    absl::Status status = client.DeleteSession(w->session);
    if (!status.ok()) {
      // After a failed step the server may still be computing it
      // (FAILED_PRECONDITION): say how to delete the session later.
      absl::FPrintF(stderr,
                    "muonctl: session %s left on the server (%s: %s); delete it with: muonctl "
                    "session delete --session=%s --token=%s\n",
                    w->session.id, absl::StatusCodeToString(status.code()), status.message(),
                    w->session.id, w->session.token);
      return code != 0 ? code : 1;
    }
    absl::PrintF("deleted session %s\n", w->session.id);
    return code;
  };

  std::mt19937_64 rng(7);
  StepCallOptions options;
  options.measure_orthogonality = absl::GetFlag(FLAGS_measure_orthogonality);
  options.timeout = absl::GetFlag(FLAGS_step_timeout);
  Samples wall, receive, queue, compute, send, total, ortho;
  double bytes = 0, flops = 0;
  int retried = 0;
  int64_t parameter_updates = 0;  // over the measured steps
  std::optional<Progress> progress(std::in_place);
  const absl::Time bench_start = absl::Now();
  // Kept across steps: each step's updates land in the last step's buffers,
  // as in a training loop that keeps its result.
  StepResult kept;
  StepResult* r = &kept;
  for (int i = 0; i < warmup + steps; ++i) {
    const std::vector<Gradient> grads = source.Draw(rng);
    const absl::Time start = absl::Now();
    const absl::Status stepped = client.Step(w->session, w->next_step, grads, options, r);
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    if (!stepped.ok()) {
      progress.reset();
      return finish(Fail(stepped));
    }
    ++w->next_step;
    progress->Report(absl::StrFormat(
        "bench: step %d/%d%s %.2f s, %.0f s elapsed, about %.0f s left", i + 1, warmup + steps,
        i < warmup ? " (warm-up)" : "", seconds,
        absl::ToDoubleSeconds(absl::Now() - bench_start),
        seconds * (warmup + steps - i - 1)));
    if (i < warmup) continue;
    const v1::StepTimings& t = r->summary.timings();
    wall.Add(seconds);
    receive.Add(t.receive_seconds());
    queue.Add(t.queue_seconds());
    compute.Add(t.compute_seconds());
    send.Add(t.send_seconds());
    total.Add(t.total_seconds());
    for (const v1::OrthogonalityError& e : r->summary.orthogonality_errors()) ortho.Add(e.error());
    bytes += r->summary.bytes_received() + r->summary.bytes_sent();
    flops += r->summary.ns_flops();
    retried += r->attempts - 1;
    parameter_updates += r->summary.param_indices_size();
  }
  progress.reset();
  const double elapsed = wall.Sum();
  absl::PrintF("steps: %d (+%d warm-up) in %.3f s, retried streams: %d\n", steps, warmup, elapsed,
               retried);
  absl::PrintF("steps/s: %.3f\n", steps / elapsed);
  absl::PrintF("bytes/s: %s/s (gradients in + updates out)\n", Bytes(bytes / elapsed));
  absl::PrintF("ns TFLOP/s: %.3f (server-side Newton-Schulz work over client wall time)\n",
               flops / elapsed / 1e12);
  absl::PrintF("latency client step  %s\n", Ms(wall));
  absl::PrintF("latency server total %s\n", Ms(total));
  absl::PrintF("phase receive        %s\n", Ms(receive));
  // queue and compute are sums over the step's parameters (StepTimings):
  // with many parameters they exceed the step; the mean per parameter reads
  // as a latency.
  const double per_parameter = parameter_updates > 0 ? 1e3 / parameter_updates : 0;
  absl::PrintF("phase queue          %s (summed over parameters; %.3f ms per parameter)\n",
               Ms(queue), queue.Sum() * per_parameter);
  absl::PrintF("phase compute        %s (summed over parameters; %.3f ms per parameter)\n",
               Ms(compute), compute.Sum() * per_parameter);
  absl::PrintF("phase send           %s (summed over messages)\n", Ms(send));
  if (ortho.count() > 0) {
    absl::PrintF("orthogonality error  p50 %.4f  p99 %.4f\n", ortho.Percentile(50),
                 ortho.Percentile(99));
  }
  return finish(0);
}

// Steps still in flight this long after --duration_limit are cancelled:
// 10% of the limit, at least 1 s.
absl::Duration StepGrace(absl::Duration limit) { return std::max(absl::Seconds(1), limit / 10); }

int Load(Client& client) {
  const int clients = absl::GetFlag(FLAGS_clients);
  const int steps = absl::GetFlag(FLAGS_steps);
  const int workers = absl::GetFlag(FLAGS_workers);
  if (clients < 1 || steps < 1 || workers < 1) {
    return Fail(absl::InvalidArgumentError(
        "--clients, --steps and --workers must be at least 1"));
  }
  const std::string model =
      absl::GetFlag(FLAGS_model).empty() ? "small" : absl::GetFlag(FLAGS_model);
  const absl::Duration limit = absl::GetFlag(FLAGS_duration_limit);
  const absl::Time deadline = absl::Now() + limit;
  const absl::Time hard_deadline = deadline + StepGrace(limit);

  struct Outcome {
    Samples latency;
    Samples server_receive;  // the server's: header to last gradient byte
    Samples server_commit;   // the server's: header to commit
    double bytes = 0;
    int cut_off = 0;  // steps cancelled at the hard deadline
    absl::Status status;
  };
  std::atomic<bool> stop{false};
  // Every client registers the same preset: one gradient source for all.
  absl::StatusOr<std::vector<PresetParam>> params = ModelPreset(model);
  if (!params.ok()) return Fail(params.status());
  absl::StatusOr<WireType> wire = ParseWireType(absl::GetFlag(FLAGS_dtype));
  if (!wire.ok()) return Fail(wire.status());
  std::vector<TensorWire> tensors;
  for (const PresetParam& p : *params) {
    tensors.push_back({static_cast<size_t>(p.rows * p.cols) * wire->size, wire->dtype});
  }
  const GradientSource source(std::move(tensors));

  // Sessions are made before any step: the workers of one session then
  // start together.
  std::vector<Workload> sessions(clients);
  for (int c = 0; c < clients; ++c) {
    absl::StatusOr<v1::CreateSessionRequest> request =
        PresetRequest(model, absl::StrCat(absl::GetFlag(FLAGS_name), "-", c));
    if (!request.ok()) return Fail(request.status());
    if (workers > 1 || absl::GetFlag(FLAGS_parameter_server)) {
      request->set_mode(v1::SESSION_MODE_PARAMETER_SERVER);
      request->set_num_workers(static_cast<uint32_t>(workers));
    }
    absl::StatusOr<SessionHandle> session = client.CreateSession(*request);
    if (!session.ok()) return Fail(session.status());
    sessions[c].session = *session;
  }
  std::vector<Outcome> outcomes(clients * workers);
  const absl::Time start = absl::Now();
  std::atomic<int> steps_done{0};  // by all clients and workers
  absl::Notification all_done;
  std::thread reporter([&] {
    Progress progress;
    const absl::Duration every = progress.terminal() ? absl::Seconds(1) : absl::Seconds(10);
    const int total = clients * workers * steps;
    while (!all_done.WaitForNotificationWithTimeout(every)) {
      const int done = steps_done.load();
      const double elapsed = absl::ToDoubleSeconds(absl::Now() - start);
      progress.Report(absl::StrFormat(
          "load: %d/%d client steps, %.0f s elapsed%s", done, total, elapsed,
          done > 0 ? absl::StrFormat(", about %.0f s left", elapsed * (total - done) / done)
                   : std::string()));
    }
  });
  std::vector<std::thread> threads;
  for (int t = 0; t < clients * workers; ++t) {
    threads.emplace_back([&, t] {
      const int c = t / workers;
      const uint32_t worker = static_cast<uint32_t>(t % workers);
      Outcome& out = outcomes[t];
      // Each its own connection, as separate training processes would have.
      absl::StatusOr<std::unique_ptr<Client>> connected = Connect(/*dedicated_connection=*/true);
      if (!connected.ok()) {
        out.status = connected.status();
        stop = true;
        return;
      }
      Client& own = **connected;
      Workload w = sessions[c];
      std::mt19937_64 rng(1000 + t);
      for (int i = 0; i < steps && !stop && absl::Now() < deadline; ++i) {
        const std::vector<Gradient> grads = source.Draw(rng);
        const absl::Time t0 = absl::Now();
        StepCallOptions options;
        options.timeout = hard_deadline - t0;
        options.worker_id = worker;
        absl::StatusOr<StepResult> r = own.Step(w.session, w.next_step, grads, options);
        if (!r.ok()) {
          if (r.status().code() == absl::StatusCode::kDeadlineExceeded &&
              absl::Now() >= hard_deadline) {
            ++out.cut_off;
          } else {
            out.status = r.status();
            stop = true;
          }
          break;
        }
        out.latency.Add(absl::ToDoubleSeconds(absl::Now() - t0));
        out.server_receive.Add(r->summary.timings().receive_seconds());
        out.server_commit.Add(r->summary.timings().total_seconds());
        out.bytes += r->summary.bytes_received() + r->summary.bytes_sent();
        ++w.next_step;
        ++steps_done;
      }
      if (worker != 0) return;  // worker 0 deletes the shared session
      absl::Status deleted = own.DeleteSession(w.session);
      if (deleted.code() == absl::StatusCode::kFailedPrecondition && out.cut_off > 0) {
        // The server is still computing the cancelled step.
        absl::FPrintF(stderr,
                      "muonctl: session %s left on the server (its cancelled step is still in "
                      "flight); delete it with: muonctl session delete --session=%s --token=%s\n",
                      w.session.id, w.session.id, w.session.token);
      } else if (out.status.ok()) {
        out.status = deleted;
      }
    });
  }
  for (std::thread& t : threads) t.join();
  all_done.Notify();
  reporter.join();
  const double elapsed = absl::ToDoubleSeconds(absl::Now() - start);

  Samples latency, server_receive, server_commit;
  double bytes = 0;
  int cut_off = 0;
  absl::Status first_error;
  for (const Outcome& o : outcomes) {
    latency.Merge(o.latency);
    server_receive.Merge(o.server_receive);
    server_commit.Merge(o.server_commit);
    bytes += o.bytes;
    cut_off += o.cut_off;
    if (first_error.ok()) first_error = o.status;
  }
  // A parameter-server step is one per session, whatever its workers.
  const int done = latency.count() / workers;
  // As the server reports the sessions it made.
  const bool parameter_server =
      sessions[0].session.info.mode() == v1::SESSION_MODE_PARAMETER_SERVER;
  absl::PrintF("clients: %d, workers: %d%s, model %s, %d steps done of %d in %.3f s%s\n", clients,
               workers, parameter_server ? " (parameter server)" : "", model, done,
               clients * steps, elapsed,
               absl::Now() >= deadline ? " (duration limit reached)" : "");
  if (cut_off > 0) {
    absl::PrintF("cut off: %d steps still running %s after the duration limit were cancelled\n",
                 cut_off, absl::FormatDuration(StepGrace(limit)));
  }
  absl::PrintF("throughput: %.3f steps/s, %s/s\n", done / elapsed, Bytes(bytes / elapsed));
  if (!first_error.ok()) return Fail(first_error);
  if (latency.count() == 0) {
    return Fail(absl::DeadlineExceededError(
        absl::StrCat("no step finished within --duration_limit=", absl::FormatDuration(limit))));
  }
  absl::PrintF("step latency: p50 %.3f ms, p99 %.3f ms, mean %.3f ms\n",
               1e3 * latency.Percentile(50), 1e3 * latency.Percentile(99), 1e3 * latency.Mean());
  // The rest of a step's latency is the reply and the network.
  absl::PrintF("server, p50: gradients in %.3f ms, committed %.3f ms after the header\n",
               1e3 * server_receive.Percentile(50), 1e3 * server_commit.Percentile(50));
  return 0;
}

std::string FormatDuration(const google::protobuf::Duration& d) {
  return absl::FormatDuration(absl::Seconds(d.seconds()) + absl::Nanoseconds(d.nanos()));
}

// The server's own coefficients, as its engine computes them.
int Coefficients(Client& client) {
  const std::string name = absl::GetFlag(FLAGS_schedule);
  absl::StatusOr<v1::ServerInfo> info = client.GetServerInfo(absl::GetFlag(FLAGS_steps));
  if (!info.ok()) return Fail(info.status());
  std::vector<std::string> known;
  for (const v1::ScheduleInfo& schedule : info->schedules()) {
    known.push_back(schedule.name());
    if (schedule.name() != name) continue;
    for (int i = 0; i < schedule.steps_size(); ++i) {
      const v1::NsStep& s = schedule.steps(i);
      absl::PrintF("%d %.10f %.10f %.10f\n", i + 1, s.a(), s.b(), s.c());
    }
    return 0;
  }
  return Fail(absl::InvalidArgumentError(absl::StrCat("unknown --schedule=", name,
                                                      "; the server knows ",
                                                      absl::StrJoin(known, ", "))));
}

int Info(Client& client) {
  absl::StatusOr<v1::ServerInfo> info = client.GetServerInfo(absl::GetFlag(FLAGS_ns_steps));
  if (!info.ok()) return Fail(info.status());
  absl::PrintF("version: %s\nengine: %s\n", info->version(), info->engine());
  for (const v1::DeviceInfo& d : info->devices()) {
    absl::PrintF(
        "device: %s %d cores=%d memory_bytes=%d used_bytes=%d budget_bytes=%d parameters=%d "
        "state_bytes=%d estimated_step_seconds=%.3g\n",
        d.kind(), d.ordinal(), d.cores(), d.memory_bytes(), d.memory_used_bytes(),
        d.memory_budget_bytes(), d.parameters(), d.state_bytes(), d.estimated_step_seconds());
  }
  const v1::ServerLimits& l = info->limits();
  absl::PrintF(
      "max_sessions: %d\nmax_params_per_session: %d\nmax_bytes_per_session: %d\n"
      "max_message_bytes: %d\nmax_concurrent_streams: %d\nmemory_budget_bytes: %d\n"
      "update_chunk_bytes: %d\nsession_idle_ttl: %s\nmax_workers: %d\nworker_timeout: %s\n"
      "max_ns_steps: %d\n",
      l.max_sessions(), l.max_params_per_session(), l.max_bytes_per_session(),
      l.max_message_bytes(), l.max_concurrent_streams(), l.memory_budget_bytes(),
      l.update_chunk_bytes(), FormatDuration(l.session_idle_ttl()), l.max_workers(),
      FormatDuration(l.worker_timeout()), l.max_ns_steps());
  absl::PrintF("durability: %s checkpoint_every_steps=%d\n", info->durability().mode(),
               info->durability().checkpoint_every_steps());
  absl::PrintF("admin_token_required: %s\northogonality_sample_every: %d\n",
               info->admin_token_required() ? "true" : "false",
               info->orthogonality_sample_every());
  for (const v1::ScheduleInfo& s : info->schedules()) {
    std::vector<std::string> steps;
    for (const v1::NsStep& t : s.steps()) {
      steps.push_back(absl::StrFormat("(%.4f, %.4f, %.4f)", t.a(), t.b(), t.c()));
    }
    absl::PrintF("schedule %s: %s%s\n", s.name(), s.aol() ? "aol " : "",
                 steps.empty() ? "exact (SVD)" : absl::StrJoin(steps, " "));
  }
  return 0;
}

int Main(int argc, char** argv) {
  // As muon-server does (--malloc_trim_bytes): gRPC's message buffers, freed
  // and allocated again every step, keep their pages instead of being
  // returned to the kernel and zero-filled anew.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 64 << 20);
  absl::SetProgramUsageMessage(kUsage);
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() < 2) {
    absl::FPrintF(stderr, "%s\n", kUsage);
    return 2;
  }
  const std::string command = args[1];
  if (command != "health" && command != "info" && command != "session" &&
      command != "checkpoint" && command != "bench" && command != "load" &&
      command != "coefficients") {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("unknown command \"", command, "\"; run muonctl --help")));
  }
  absl::StatusOr<std::unique_ptr<Client>> client = Connect();
  if (!client.ok()) return Fail(client.status());
  if (command == "health") return Health(**client);
  if (command == "info") return Info(**client);
  if (command == "coefficients") return Coefficients(**client);
  if (command == "session") return SessionCommand(**client, args);
  if (command == "checkpoint") return CheckpointCommand(**client);
  if (command == "bench") return Bench(**client);
  return Load(**client);
}

}  // namespace
}  // namespace muon::muonctl

int main(int argc, char** argv) { return muon::muonctl::Main(argc, argv); }
