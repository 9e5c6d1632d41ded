#include "muon/client/client.h"

#include <grpcpp/generic/generic_stub.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "chunking.h"
#include "step_read.h"
#include "step_write.h"

namespace muon {
namespace {

using client_internal::CopyWireUpdateData;
using client_internal::FindWireUpdate;
using client_internal::SplitIntoChunks;
using client_internal::StepRead;
using client_internal::StepWrite;
using client_internal::UpdateAssembler;
using client_internal::WireUpdate;

bool Retryable(absl::StatusCode code) {
  return code == absl::StatusCode::kUnavailable || code == absl::StatusCode::kAborted ||
         code == absl::StatusCode::kDataLoss;
}

// The grpc.health.v1.HealthCheckResponse.ServingStatus names.
std::string ServingStatusName(uint64_t value) {
  switch (value) {
    case 1:
      return "SERVING";
    case 2:
      return "NOT_SERVING";
    case 3:
      return "SERVICE_UNKNOWN";
    default:
      return "UNKNOWN";
  }
}

// HealthCheckResponse is { ServingStatus status = 1; }: the tag byte 0x08 and
// a varint, or nothing at all for UNKNOWN (0).
absl::StatusOr<uint64_t> ParseHealthResponse(const std::string& bytes) {
  if (bytes.empty()) return 0;
  if (bytes[0] != 0x08) {
    return absl::DataLossError("unexpected grpc.health.v1.HealthCheckResponse encoding");
  }
  uint64_t value = 0;
  for (size_t i = 1, shift = 0; i < bytes.size() && shift < 64; ++i, shift += 7) {
    value |= uint64_t{static_cast<unsigned char>(bytes[i]) & 0x7fu} << shift;
    if ((static_cast<unsigned char>(bytes[i]) & 0x80u) == 0) return value;
  }
  return absl::DataLossError("truncated grpc.health.v1.HealthCheckResponse");
}

absl::StatusOr<std::string> ReadFile(const std::string& path, absl::string_view field) {
  std::ifstream in(path, std::ios::binary);
  if (!in.is_open()) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read ClientOptions.tls.", field, " '",
                                                   path, "' (missing or not readable)"));
  }
  std::stringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> Credentials(
    const ClientOptions& options) {
  const ClientTlsOptions& tls = options.tls;
  const bool use_tls =
      tls.enabled || !tls.ca_file.empty() || !tls.cert_file.empty() || !tls.key_file.empty();
  if (options.credentials != nullptr) {
    if (use_tls) {
      return absl::InvalidArgumentError(
          "set ClientOptions.credentials or ClientOptions.tls, not both");
    }
    return options.credentials;
  }
  if (!use_tls) return grpc::InsecureChannelCredentials();
  if (tls.cert_file.empty() != tls.key_file.empty()) {
    return absl::InvalidArgumentError(
        "mutual TLS needs both ClientOptions.tls.cert_file and key_file; only one is set");
  }
  grpc::SslCredentialsOptions ssl;
  if (!tls.ca_file.empty()) {
    absl::StatusOr<std::string> ca = ReadFile(tls.ca_file, "ca_file");
    if (!ca.ok()) return ca.status();
    ssl.pem_root_certs = std::move(*ca);
  }
  if (!tls.cert_file.empty()) {
    absl::StatusOr<std::string> cert = ReadFile(tls.cert_file, "cert_file");
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key = ReadFile(tls.key_file, "key_file");
    if (!key.ok()) return key.status();
    ssl.pem_cert_chain = std::move(*cert);
    ssl.pem_private_key = std::move(*key);
  }
  return grpc::SslCredentials(ssl);
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

absl::StatusOr<std::unique_ptr<Client>> Client::Create(const ClientOptions& options) {
  if (options.target.empty()) return absl::InvalidArgumentError("ClientOptions.target is empty");
  if (options.chunk_bytes < 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("ClientOptions.chunk_bytes must be at least 4, got ", options.chunk_bytes));
  }
  if (options.max_step_attempts < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ClientOptions.max_step_attempts must be at least 1, got ", options.max_step_attempts));
  }
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> credentials = Credentials(options);
  if (!credentials.ok()) return credentials.status();
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(options.max_receive_message_bytes);
  if (!options.tls.server_name.empty()) args.SetSslTargetNameOverride(options.tls.server_name);
  if (options.dedicated_connection) args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  // After a failed connect gRPC waits 1 s before trying again and fails every
  // call at once meanwhile, so Step's retries (retry_backoff, doubling) would
  // all fail on one bad connect. Debian's gRPC 1.51 reports a loopback connect
  // as failed now and then (it reads connect's errno after other calls).
  const int64_t reconnect_ms =
      std::max<int64_t>(1, absl::ToInt64Milliseconds(options.retry_backoff));
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, static_cast<int>(reconnect_ms));
  auto channel = grpc::CreateCustomChannel(options.target, *credentials, args);
  return std::unique_ptr<Client>(new Client(options, std::move(channel)));
}

Client::Client(const ClientOptions& options, std::shared_ptr<grpc::Channel> channel)
    : options_(options),
      channel_(std::move(channel)),
      stub_(v1::Optimizer::NewStub(channel_)),
      step_method_("/muon.v1.Optimizer/Step", grpc::internal::RpcMethod::BIDI_STREAMING,
                   channel_) {}

Client::~Client() = default;

void Client::Prepare(grpc::ClientContext* context, absl::Duration timeout) const {
  if (!options_.bearer_token.empty()) {
    context->AddMetadata("authorization", absl::StrCat("Bearer ", options_.bearer_token));
  }
  if (timeout != absl::InfiniteDuration()) {
    context->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  }
}

absl::StatusOr<std::string> Client::Health() {
  grpc::GenericStub stub(channel_);
  grpc::CompletionQueue cq;
  grpc::ClientContext context;
  Prepare(&context, options_.call_timeout);
  grpc::Slice empty;  // HealthCheckRequest{service = ""}: no bytes
  grpc::ByteBuffer request(&empty, 1);
  grpc::ByteBuffer response;
  grpc::Status status;
  auto call = stub.PrepareUnaryCall(&context, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  call->Finish(&response, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  cq.Next(&tag, &ok);
  if (!status.ok()) return FromGrpcStatus(status);
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return absl::DataLossError("unreadable health response");
  std::string bytes;
  for (const grpc::Slice& s : slices) {
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  absl::StatusOr<uint64_t> value = ParseHealthResponse(bytes);
  if (!value.ok()) return value.status();
  return ServingStatusName(*value);
}

absl::StatusOr<SessionHandle> Client::CreateSession(const v1::CreateSessionRequest& request) {
  grpc::ClientContext context;
  Prepare(&context, options_.call_timeout);
  v1::CreateSessionResponse response;
  grpc::Status status = stub_->CreateSession(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  SessionHandle handle;
  handle.id = response.session_id();
  handle.token = response.token();
  handle.step = response.step();
  handle.info = std::move(*response.mutable_session());
  return handle;
}

absl::StatusOr<v1::SessionInfo> Client::GetSession(const SessionHandle& session) {
  grpc::ClientContext context;
  Prepare(&context, options_.call_timeout);
  v1::GetSessionRequest request;
  request.set_session_id(session.id);
  request.set_token(session.token);
  v1::SessionInfo info;
  grpc::Status status = stub_->GetSession(&context, request, &info);
  if (!status.ok()) return FromGrpcStatus(status);
  return info;
}

absl::StatusOr<std::vector<v1::SessionInfo>> Client::ListSessions() {
  grpc::ClientContext context;
  Prepare(&context, options_.call_timeout);
  v1::ListSessionsRequest request;
  request.set_admin_token(options_.bearer_token);
  v1::ListSessionsResponse response;
  grpc::Status status = stub_->ListSessions(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return std::vector<v1::SessionInfo>(std::make_move_iterator(response.mutable_sessions()->begin()),
                                      std::make_move_iterator(response.mutable_sessions()->end()));
}

absl::StatusOr<v1::ServerInfo> Client::GetServerInfo(int32_t ns_steps) {
  grpc::ClientContext context;
  Prepare(&context, options_.call_timeout);
  v1::GetServerInfoRequest request;
  request.set_ns_steps(ns_steps);
  v1::ServerInfo info;
  grpc::Status status = stub_->GetServerInfo(&context, request, &info);
  if (!status.ok()) return FromGrpcStatus(status);
  return info;
}

absl::Status Client::DeleteSession(const SessionHandle& session) {
  grpc::ClientContext context;
  Prepare(&context, options_.call_timeout);
  v1::DeleteSessionRequest request;
  request.set_session_id(session.id);
  request.set_token(session.token);
  v1::DeleteSessionResponse response;
  return FromGrpcStatus(stub_->DeleteSession(&context, request, &response));
}

absl::StatusOr<v1::AddParametersResponse> Client::AddParameters(
    const SessionHandle& session, absl::Span<const v1::ParameterSpec> params) {
  grpc::ClientContext context;
  Prepare(&context, options_.call_timeout);
  v1::AddParametersRequest request;
  request.set_session_id(session.id);
  request.set_token(session.token);
  for (const v1::ParameterSpec& p : params) *request.add_params() = p;
  v1::AddParametersResponse response;
  grpc::Status status = stub_->AddParameters(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<std::vector<v1::SessionCheckpoint>> Client::Checkpoint(
    const SessionHandle* session) {
  grpc::ClientContext context;
  Prepare(&context, options_.call_timeout);
  v1::CheckpointRequest request;
  if (session != nullptr) {
    request.set_session_id(session->id);
    request.set_token(session->token);
  }
  request.set_admin_token(options_.bearer_token);
  v1::CheckpointResponse response;
  grpc::Status status = stub_->Checkpoint(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return std::vector<v1::SessionCheckpoint>(
      std::make_move_iterator(response.mutable_checkpoints()->begin()),
      std::make_move_iterator(response.mutable_checkpoints()->end()));
}

absl::StatusOr<StepResult> Client::Step(const SessionHandle& session, uint64_t step,
                                        absl::Span<const Gradient> gradients,
                                        const StepCallOptions& options) {
  StepResult result;
  absl::Status status = Step(session, step, gradients, options, &result);
  if (!status.ok()) return status;
  return result;
}

absl::Status Client::Step(const SessionHandle& session, uint64_t step,
                          absl::Span<const Gradient> gradients, const StepCallOptions& options,
                          StepResult* result) {
  std::vector<ParameterUpdate> recycled = std::move(result->updates);
  *result = StepResult{};
  absl::flat_hash_set<uint32_t> seen;
  for (const Gradient& g : gradients) {
    if (!seen.insert(g.param_index).second) {
      return absl::InvalidArgumentError(absl::StrCat("step ", step, ": parameter ", g.param_index,
                                                     " has more than one gradient"));
    }
  }
  absl::Status last;
  absl::Duration backoff = options_.retry_backoff;
  for (int attempt = 1; attempt <= options_.max_step_attempts; ++attempt) {
    if (attempt > 1) {
      absl::SleepFor(backoff);
      backoff *= 2;
    }
    UpdateAssembler assembler(std::move(recycled));
    last = StepOnce(session, step, gradients, options, assembler, result);
    if (last.ok()) {
      result->attempts = attempt;
      return last;
    }
    recycled = assembler.Release();
    if (!Retryable(last.code())) break;
  }
  return last;
}

absl::Status Client::StepOnce(const SessionHandle& session, uint64_t step,
                              absl::Span<const Gradient> gradients, const StepCallOptions& options,
                              UpdateAssembler& assembler, StepResult* result) {
  grpc::ClientContext context;
  Prepare(&context, options.timeout);
  // The generated stub's Step, but writing StepWrites and reading StepReads:
  // each gradient chunk's bytes are copied once, into the slice gRPC sends
  // (step_write.h), and each update chunk's once, from gRPC's slices into
  // its update (step_read.h).
  std::unique_ptr<grpc::ClientReaderWriter<StepWrite, StepRead>> stream(
      grpc::internal::ClientReaderWriterFactory<StepWrite, StepRead>::Create(
          channel_.get(), step_method_, &context));

  // Sending and reading go on at once: the server streams updates back while
  // gradients are still coming in. One thread may Write while another Reads.
  std::thread writer([&] {
    v1::StepRequest request;
    v1::StepHeader* header = request.mutable_header();
    header->set_session_id(session.id);
    header->set_token(session.token);
    header->set_step(step);
    header->set_worker_id(options.worker_id);
    if (options.lr.has_value()) header->set_lr(*options.lr);
    if (options.lr_scale.has_value()) header->set_lr_scale(*options.lr_scale);
    header->set_update_dtype(options.update_dtype);
    header->set_measure_orthogonality(options.measure_orthogonality);
    if (!stream->Write(StepWrite::Whole(request))) return;
    for (const Gradient& g : gradients) {
      for (const client_internal::ByteRange& r :
           SplitIntoChunks(g.data.size(), options_.chunk_bytes)) {
        const StepWrite chunk{nullptr, g.param_index, r.offset, g.dtype,
                              g.data.subspan(r.offset, r.size)};
        if (!stream->Write(chunk)) return;
      }
    }
    // StepEnd makes the end explicit: a stream cut after the last chunk is
    // never taken for a finished step.
    v1::StepEnd* end = request.mutable_end();
    for (const Gradient& g : gradients) end->add_param_indices(g.param_index);
    stream->WriteLast(StepWrite::Whole(request), grpc::WriteOptions());
  });

  std::optional<v1::StepSummary> summary;
  absl::Status client_error;
  StepRead read;
  v1::StepResponse response;
  while (stream->Read(&read)) {
    WireUpdate update;
    if (FindWireUpdate(&read.message, &update)) {
      if (summary.has_value()) {
        client_error = absl::DataLossError("an update chunk came after the step summary");
        break;
      }
      client_error = assembler.Add(update.chunk, update.data_size, [&](std::byte* destination) {
        CopyWireUpdateData(&read.message, update, destination);
      });
      read.message.Clear();
      if (!client_error.ok()) break;
      continue;
    }
    // Deserialize releases the buffer.
    if (!grpc::SerializationTraits<v1::StepResponse>::Deserialize(&read.message, &response)
             .ok()) {
      client_error = absl::DataLossError("a step response does not parse");
      break;
    }
    if (response.has_update()) {
      if (summary.has_value()) {
        client_error = absl::DataLossError("an update chunk came after the step summary");
        break;
      }
      client_error = assembler.Add(response.update());
      if (!client_error.ok()) break;
    } else if (response.has_summary()) {
      summary = std::move(*response.mutable_summary());
    }
  }
  if (!client_error.ok()) context.TryCancel();  // unblocks the writer
  writer.join();
  grpc::Status status = stream->Finish();
  if (!client_error.ok()) return client_error;
  // The summary is the commit: once it is here the step is applied on the
  // server, whatever happens to the rest of the stream.
  if (!summary.has_value()) {
    if (!status.ok()) return FromGrpcStatus(status);
    return absl::UnavailableError(
        absl::StrCat("step ", step, ": the stream ended without a step summary"));
  }
  absl::StatusOr<std::vector<ParameterUpdate>> updates = assembler.Finish(*summary);
  if (!updates.ok()) return updates.status();
  result->updates = std::move(*updates);
  result->summary = std::move(*summary);
  return absl::OkStatus();
}

}  // namespace muon
