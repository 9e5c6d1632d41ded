#ifndef MUON_CLIENT_CLIENT_H_
#define MUON_CLIENT_CLIENT_H_

// muon::Client: the C++ client of the muon.v1.Optimizer service
// (proto/muon/v1/optimizer.proto; prose in docs/api.md).
//
// A Client owns one gRPC channel to one server. Sessions are configured with
// the proto's own messages (v1::CreateSessionRequest, v1::HyperParams, ...),
// so every server option is available here as soon as it is in the proto.
// Steps take and return raw tensor bytes; the client cuts gradients into
// chunks, reassembles the updates, holds them back until the step's summary
// (the server's commit) has arrived, and retries a broken stream with the
// same step number (the server answers a retry of a committed step from its
// cache, so a step is applied exactly once).
//
// Errors: every call returns the server's gRPC status as an absl::Status with
// the same code and message (the codes are the same set; docs/api.md lists
// which call returns which code when). Errors found by the client itself:
//   INVALID_ARGUMENT  bad Options, or a gradient given twice in one step;
//   DATA_LOSS         the server's updates do not match its summary
//                     (after the retries are spent);
//   UNAVAILABLE       the server could not be reached (gRPC's own code).
//
// Thread safety: a Client may be used from many threads at once. Calls for
// distinct sessions run concurrently; calls for one session must not overlap
// a Step of that session (the server answers a second concurrent Step of a
// session with ABORTED).
//
// Example:
//   auto client = muon::Client::Create({.target = "127.0.0.1:50051"});
//   if (!client.ok()) return client.status();
//   v1::CreateSessionRequest request;  // parameters, hyper-parameters
//   ...
//   auto session = (*client)->CreateSession(request);
//   std::vector<muon::Gradient> grads = {{.param_index = 0, .data = bytes}};
//   auto result = (*client)->Step(*session, session->step + 1, grads);
//   for (const muon::ParameterUpdate& u : result->updates) apply(u);

#include <grpcpp/grpcpp.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "muon/v1/optimizer.grpc.pb.h"

namespace muon {
namespace client_internal {
class UpdateAssembler;
}  // namespace client_internal

// TLS to a server started with --tls_cert/--tls_key (and, for mutual TLS,
// --tls_client_ca). Files are PEM, read once by Client::Create.
struct ClientTlsOptions {
  // Speak TLS. Implied by any file below.
  bool enabled = false;
  // CA certificate(s) that signed the server's certificate; empty: gRPC's
  // default roots ($GRPC_DEFAULT_SSL_ROOTS_FILE_PATH or the bundled ones).
  std::string ca_file{};
  // The client's certificate chain and private key, for mutual TLS: both or
  // neither.
  std::string cert_file{};
  std::string key_file{};
  // The name the server's certificate must carry, when it is not the
  // target's host (e.g. connecting by IP to a certificate for a DNS name).
  std::string server_name{};
};

struct ClientOptions {
  // gRPC target: "host:port", "dns:///host:port", "unix:/path". Required.
  std::string target{};
  // TLS settings; plaintext unless enabled or a file is named.
  ClientTlsOptions tls{};
  // Channel credentials of your own (not together with `tls`). Null (the
  // default): what `tls` says.
  std::shared_ptr<grpc::ChannelCredentials> credentials{};
  // When set, sent on every call as the metadata "authorization: Bearer
  // <token>", and as admin_token on ListSessions and on Checkpoint of every
  // session. The server prefers a request's own token field, so session
  // tokens (see SessionHandle) still name their session; a call without one
  // (GetSession, DeleteSession of a hand-made handle with no token) is
  // authorized by this token as the server's admin token.
  std::string bearer_token{};
  // Size of the gradient chunks sent in a step. Rounded down to a multiple
  // of 4 bytes (so it suits every dtype); at least 4. Default 1 MiB, well
  // under the server's 4 MiB message limit.
  size_t chunk_bytes = size_t{1} << 20;
  // Attempts per Step before giving up (1 = no retry). Retried: UNAVAILABLE
  // (a broken connection, a draining server), ABORTED (the server had not
  // yet torn down the previous, broken stream) and DATA_LOSS. Default 4.
  int max_step_attempts = 4;
  // Wait before the first retry; doubles at every further retry. Also the
  // channel's first reconnect delay after a failed connect.
  absl::Duration retry_backoff = absl::Milliseconds(50);
  // Deadline of each unary call (CreateSession, GetSession, ...).
  // absl::InfiniteDuration() for none.
  absl::Duration call_timeout = absl::Seconds(30);
  // Largest message the client accepts. Default 64 MiB (the server sends
  // update chunks of --update_chunk_bytes, 1 MiB by default).
  int max_receive_message_bytes = 64 << 20;
  // gRPC shares one connection among the channels of a process that name the
  // same target with the same settings. True: this client opens its own, as
  // a separate process would (several workers in one process, load tests).
  bool dedicated_connection = false;
};

// What names a session on every call. Returned by CreateSession; a session
// made elsewhere can be named by filling `id` and `token` by hand.
struct SessionHandle {
  std::string id{};
  std::string token{};
  // The last committed step when the handle was made (0 for a new session);
  // the next Step carries step + 1. Not kept up to date by Step.
  uint64_t step = 0;
  // The session as created, every hyper-parameter resolved (empty when the
  // handle was made by hand).
  v1::SessionInfo info{};
};

// One parameter's gradient in one step.
struct Gradient {
  // Index of the parameter: its position in CreateSessionRequest.params.
  uint32_t param_index = 0;
  // Raw little-endian, row-major bytes in the parameter's registered dtype;
  // the whole tensor. Not owned: must stay valid until Step returns.
  absl::Span<const std::byte> data{};
  // When set, every chunk states this dtype and the server rejects it
  // (INVALID_ARGUMENT) unless it is the parameter's registered one.
  v1::DType dtype = v1::DTYPE_UNSPECIFIED;
};

struct StepCallOptions {
  // This step's learning rate for every parameter (an LR schedule); unset:
  // each parameter's configured lr.
  std::optional<double> lr{};
  // Multiplies each parameter's lr this step (after `lr`); unset: 1.
  std::optional<double> lr_scale{};
  // Wire type of the updates; unspecified: each parameter's dtype.
  v1::DType update_dtype = v1::DTYPE_UNSPECIFIED;
  // Ask the server for each Muon parameter's orthogonality error.
  bool measure_orthogonality = false;
  // PARAMETER_SERVER sessions: this worker's id.
  uint32_t worker_id = 0;
  // Deadline of one attempt (the whole stream); DEADLINE_EXCEEDED, not
  // retried, when it passes. A stream that stalls holds its session on the
  // server until it is cancelled (docs/api.md), so there is always one by
  // default: 5 minutes. absl::InfiniteDuration() for none.
  absl::Duration timeout = absl::Minutes(5);
};

// One parameter's committed update: apply W ← decay·W + data (UPDATE), or
// W ← data (WEIGHTS, parameter-server mode).
struct ParameterUpdate {
  uint32_t param_index = 0;
  v1::DType dtype = v1::DTYPE_UNSPECIFIED;
  v1::UpdateContent content = v1::UPDATE_CONTENT_UPDATE;
  double decay = 1.0;
  std::vector<std::byte> data{};  // the whole tensor, in `dtype`
};

struct StepResult {
  // One per parameter of the step, by ascending param_index (the summary's
  // param_indices). Parameters left out of the step get none.
  std::vector<ParameterUpdate> updates{};
  // The server's summary: committed step, timings by phase, bytes, errors.
  v1::StepSummary summary{};
  // Streams opened for this step (1 when nothing had to be retried).
  int attempts = 0;
};

class Client {
 public:
  using Options = ClientOptions;

  // Opens a channel to options.target (lazily: an unreachable server shows
  // up as UNAVAILABLE on the first call). INVALID_ARGUMENT for an empty
  // target, a bad chunk size or attempt count, an unreadable TLS file, only
  // one of tls.cert_file and tls.key_file, or both tls and credentials.
  static absl::StatusOr<std::unique_ptr<Client>> Create(const ClientOptions& options);

  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;
  ~Client();

  // The grpc.health.v1 status of the whole server: SERVING, NOT_SERVING
  // (draining) or UNKNOWN.
  absl::StatusOr<std::string> Health();

  // Registers request.params with their hyper-parameters (see the proto for
  // every field and default). Returns the session's id, token and step (0).
  absl::StatusOr<SessionHandle> CreateSession(const v1::CreateSessionRequest& request);

  // One optimizer step: sends `gradients` (any subset of the parameters,
  // each whole, at most once) under step number `step`, and returns the
  // updates once the server has committed the step. Updates that arrive
  // before the summary are buffered and returned only with it, so a failed
  // Step returns an error and no update: nothing of the step was applied,
  // and calling Step again with the same arguments is safe.
  // `step` is the session's step + 1 for a new step; the number of the last
  // committed step replays it (summary.replayed, nothing applied twice).
  // A broken stream is retried with the same number, up to
  // options.max_step_attempts streams in all.
  // REQUIRES: no other Step of the same session is in flight.
  absl::StatusOr<StepResult> Step(const SessionHandle& session, uint64_t step,
                                  absl::Span<const Gradient> gradients,
                                  const StepCallOptions& options = {});

  // The same, into `*result`: each update is assembled in the buffer
  // `result->updates` already holds for its parameter (the last step's
  // result, passed back in), so a training loop's steps allocate and
  // zero-fill no update memory once they run. On error `*result` holds no
  // update (nothing of the step was applied).
  absl::Status Step(const SessionHandle& session, uint64_t step,
                    absl::Span<const Gradient> gradients, const StepCallOptions& options,
                    StepResult* result);

  // The session with its parameters, resolved hyper-parameters and step.
  absl::StatusOr<v1::SessionInfo> GetSession(const SessionHandle& session);

  // Every session on the server, without their parameters.
  absl::StatusOr<std::vector<v1::SessionInfo>> ListSessions();

  // What the server is and allows: version, engine, devices, limits,
  // durability, and each Newton–Schulz schedule's coefficients for
  // `ns_steps` steps (0: the default, 5).
  absl::StatusOr<v1::ServerInfo> GetServerInfo(int32_t ns_steps = 0);

  // Frees the session's state on the server. NOT_FOUND if unknown.
  absl::Status DeleteSession(const SessionHandle& session);

  // UPDATES mode: adds `params` to the session between steps, with zeroed
  // state; they take the indices after the existing ones (the response's
  // first_index) from the next step on. All or nothing (see the proto).
  // Not retried: a repeat of a call that did succeed is refused, since the
  // names are then taken.
  absl::StatusOr<v1::AddParametersResponse> AddParameters(
      const SessionHandle& session, absl::Span<const v1::ParameterSpec> params);

  // Writes the session's state (or, with a null session, every session's) to
  // the server's checkpoint directory. FAILED_PRECONDITION on a server
  // without --checkpoint_dir.
  absl::StatusOr<std::vector<v1::SessionCheckpoint>> Checkpoint(const SessionHandle* session);

  // The generated stub on this client's channel, for calls this class does
  // not wrap (PushWeights, PullWeights). Owned by the client.
  v1::Optimizer::Stub* stub() { return stub_.get(); }

 private:
  Client(const ClientOptions& options, std::shared_ptr<grpc::Channel> channel);

  // A context carrying the bearer token and, when finite, a deadline.
  void Prepare(grpc::ClientContext* context, absl::Duration timeout) const;

  // One attempt of Step: one stream, its updates assembled by `assembler`.
  absl::Status StepOnce(const SessionHandle& session, uint64_t step,
                        absl::Span<const Gradient> gradients, const StepCallOptions& options,
                        client_internal::UpdateAssembler& assembler, StepResult* result);

  const ClientOptions options_;
  const std::shared_ptr<grpc::Channel> channel_;
  const std::unique_ptr<v1::Optimizer::Stub> stub_;
  // Optimizer.Step, called with the client's own request type (StepOnce).
  const grpc::internal::RpcMethod step_method_;
};

// The gRPC status as an absl::Status: same code, same message.
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace muon

#endif  // MUON_CLIENT_CLIENT_H_
