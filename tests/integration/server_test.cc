// End-to-end: the real muon-server binary on 127.0.0.1:0, driven over gRPC.
// Pins down the step semantics of docs/api.md.

#include <gmock/gmock.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "client_driver.h"
#include "server_process.h"
#include "step_harness.h"

namespace muon::testing {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

#define EXPECT_CODE(result_status, code, substring)                           \
  do {                                                                        \
    const grpc::Status& s_ = (result_status);                                 \
    EXPECT_EQ(s_.error_code(), grpc::StatusCode::code) << s_.error_message(); \
    EXPECT_THAT(s_.error_message(), HasSubstr(substring));                    \
  } while (0)

// ‖a − b‖/‖b‖ of two tensors of `dtype`.
double RelativeError(DType dtype, const Bytes& a, const Bytes& b) {
  const size_t n = b.size() / DTypeSize(dtype);
  std::vector<float> x(n), y(n);
  DecodeToFloat(dtype, a.data(), n, x.data());
  DecodeToFloat(dtype, b.data(), n, y.data());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < n; ++i) {
    diff += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
    norm += double(y[i]) * y[i];
  }
  return std::sqrt(diff / std::max(norm, 1e-30));
}

// Updates and decays equal the CPU engine's: bit for bit on the CPU engine;
// on another engine (MUON_TEST_ENGINE=cuda, bf16 Newton–Schulz) within 5%
// in relative Frobenius norm, which still tells a right state from a wrong one.
void ExpectSameUpdates(const StepResult& got, const StepResult& want) {
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  ASSERT_EQ(got.updates.size(), want.updates.size());
  const bool exact = TestEngine() == "cpu";
  for (const auto& [index, bytes] : want.updates) {
    auto it = got.updates.find(index);
    ASSERT_NE(it, got.updates.end()) << "no update for parameter " << index;
    if (exact) {
      EXPECT_TRUE(it->second == bytes) << "parameter " << index << " differs";
    } else {
      ASSERT_EQ(it->second.size(), bytes.size()) << "parameter " << index;
      EXPECT_LT(RelativeError(want.dtype.at(index), it->second, bytes), 0.05)
          << "parameter " << index;
    }
    EXPECT_DOUBLE_EQ(got.decay.at(index), want.decay.at(index));
  }
}

class ServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto server = ServerProcess::Start({"--update_chunk_bytes=4096"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = server->release();
  }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(server_, nullptr);
    stub_ = v1::Optimizer::NewStub(server_->NewChannel());
    client_ = NewClient(*server_);
    ASSERT_NE(client_, nullptr);
  }

  // A session made through the client; its handle is kept by id.
  std::string NewSession(const Model& model) {
    absl::StatusOr<SessionHandle> handle = client_->CreateSession(CreateRequest(model));
    EXPECT_TRUE(handle.ok()) << handle.status();
    if (!handle.ok()) return "";
    token_ = handle->token;
    handles_[handle->id] = *handle;
    return handle->id;
  }

  // One whole step through the real client (chunks, StepEnd, retries,
  // updates held until the summary).
  StepResult Good(const std::string& session, uint64_t step, const Tensors& grads,
                  const muon::StepCallOptions& options = {}) {
    SessionHandle handle = handles_[session];
    handle.id = session;
    return ClientStep(client_.get(), handle, step, grads, options);
  }

  uint64_t SessionStep(const std::string& id) {
    absl::StatusOr<v1::SessionInfo> info = client_->GetSession(handles_[id]);
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? info->step() : ~uint64_t{0};
  }

  StepCall Call(const std::string& session, uint64_t step) {
    StepCall call;
    call.header.set_session_id(session);
    call.header.set_token(handles_[session].token);
    call.header.set_step(step);
    return call;
  }

  static ServerProcess* server_;
  std::unique_ptr<v1::Optimizer::Stub> stub_;  // for requests no client would send
  std::unique_ptr<Client> client_;
  std::map<std::string, SessionHandle> handles_;
  std::string token_;
};

ServerProcess* ServerTest::server_ = nullptr;

TEST_F(ServerTest, CreateSessionResolvesDefaults) {
  const Model model = SmallModel();
  absl::StatusOr<SessionHandle> handle = client_->CreateSession(CreateRequest(model));
  ASSERT_TRUE(handle.ok()) << handle.status();
  EXPECT_FALSE(handle->id.empty());
  EXPECT_GE(handle->token.size(), 16u);
  EXPECT_EQ(handle->step, 0u);
  v1::CreateSessionResponse response;
  *response.mutable_session() = handle->info;
  EXPECT_EQ(response.session().next_step(), 1u);
  ASSERT_EQ(response.session().params_size(), 5);
  EXPECT_EQ(response.session().params(0).kind(), v1::OPTIMIZER_KIND_MUON);
  EXPECT_EQ(response.session().params(2).kind(), v1::OPTIMIZER_KIND_ADAMW);
  EXPECT_EQ(response.session().params(3).kind(), v1::OPTIMIZER_KIND_ADAMW);  // 1-D default
  EXPECT_EQ(response.session().params(3).dtype(), v1::DTYPE_FLOAT32);
  EXPECT_EQ(response.session().params(4).tensor_bytes(), 32 * 64 * 2);
  EXPECT_DOUBLE_EQ(response.session().params(0).hyper_params().lr(), 0.02);
  EXPECT_EQ(response.session().params(0).hyper_params().ns_schedule(), v1::NS_SCHEDULE_JORDAN);
  EXPECT_EQ(response.session().params(0).hyper_params().ns_gram(), v1::NS_GRAM_OFF);
}

TEST_F(ServerTest, CreateSessionTakesNsGram) {
  const Model model = SmallModel();
  v1::CreateSessionRequest request = CreateRequest(model);
  request.mutable_hyper_params()->set_ns_gram(v1::NS_GRAM_AUTO);
  request.mutable_params(0)->mutable_overrides()->set_ns_gram(v1::NS_GRAM_ON);
  absl::StatusOr<SessionHandle> handle = client_->CreateSession(request);
  ASSERT_TRUE(handle.ok()) << handle.status();
  EXPECT_EQ(handle->info.params(0).hyper_params().ns_gram(), v1::NS_GRAM_ON);
  EXPECT_EQ(handle->info.params(1).hyper_params().ns_gram(), v1::NS_GRAM_AUTO);
}

TEST_F(ServerTest, FullStepsThroughTheClientEqualTheCpuEngineBitForBit) {
  const Model model = SmallModel();
  const std::string session = NewSession(model);
  Reference reference(model);
  for (uint64_t step = 1; step <= 3; ++step) {
    const Tensors grads = RandomGradients(model, 200 + step);
    muon::StepCallOptions options;
    options.measure_orthogonality = true;
    if (step == 3) options.lr_scale = 0.5;
    StepResult got = Good(session, step, grads, options);
    ExpectSameUpdates(got, reference.Step(grads, options.lr_scale));
    ASSERT_TRUE(got.summary.has_value());
    EXPECT_EQ(got.summary->step(), step);
    EXPECT_FALSE(got.summary->replayed());
    EXPECT_THAT(got.summary->param_indices(), ElementsAre(0, 1, 2, 3, 4));
    EXPECT_EQ(got.summary->orthogonality_errors_size(), 3);  // the Muon parameters
    EXPECT_EQ(SessionStep(session), step);
  }
}

// The raw stub: chunks of odd sizes in shuffled order, StepEnd or half-close.
TEST_F(ServerTest, ChunksInAnyOrderAndSizeEqualTheCpuEngineBitForBit) {
  const Model model = SmallModel();
  const std::string session = NewSession(model);
  Reference reference(model);
  for (uint64_t step = 1; step <= 3; ++step) {
    const Tensors grads = RandomGradients(model, 100 + step);
    StepCall call = Call(session, step);
    call.header.set_token(token_);
    call.header.set_measure_orthogonality(true);
    if (step == 3) call.header.set_lr_scale(0.5);
    call.body = GradientMessages(grads, 772 * step, step);  // odd sizes, 4-byte aligned
    if (step == 2) call.body.push_back(EndMessage({4, 3, 2, 1, 0}));
    StepResult got = RunStep(stub_.get(), call);
    StepResult want = reference.Step(grads, step == 3 ? std::optional<double>(0.5) : std::nullopt);
    ExpectSameUpdates(got, want);
    ASSERT_TRUE(got.summary.has_value());
    EXPECT_EQ(got.summary->step(), step);
    EXPECT_FALSE(got.summary->replayed());
    EXPECT_THAT(got.summary->param_indices(), ElementsAre(0, 1, 2, 3, 4));
    EXPECT_EQ(got.summary->orthogonality_errors_size(), 3);  // the Muon parameters
    EXPECT_GT(got.summary->ns_flops(), 0);
    EXPECT_GT(got.update_messages, 5);  // 4 KiB update chunks
    EXPECT_EQ(SessionStep(session), step);
  }
}

TEST_F(ServerTest, UpdatesMayBeRequestedInAnotherDtype) {
  const Model model = SmallModel();
  const std::string session = NewSession(model);
  StepCall call = Call(session, 1);
  call.header.set_update_dtype(v1::DTYPE_FLOAT16);
  call.body = GradientMessages(RandomGradients(model, 5), 4096, 0);
  StepResult got = RunStep(stub_.get(), call);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  EXPECT_EQ(got.updates.at(0).size(), 64u * 32 * 2);
}

TEST_F(ServerTest, BadGradientChangesNoState) {
  const Model model = SmallModel();
  const std::string session = NewSession(model);
  Reference reference(model);
  const Tensors g1 = RandomGradients(model, 1);
  ExpectSameUpdates(Good(session, 1, g1), reference.Step(g1));

  // Step 2 with a NaN in the last parameter: updates of other parameters may
  // already have streamed back, but nothing is committed.
  Tensors bad = RandomGradients(model, 2);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::memcpy(bad[1].data() + 40, &nan, sizeof nan);
  StepCall call = Call(session, 2);
  call.body = GradientMessages(bad, 1000, 0);
  EXPECT_CODE(RunStep(stub_.get(), call).status, INVALID_ARGUMENT, "NaN");
  EXPECT_EQ(SessionStep(session), 1u);

  const Tensors g2 = RandomGradients(model, 3);
  ExpectSameUpdates(Good(session, 2, g2), reference.Step(g2));
}

TEST_F(ServerTest, BrokenStreamChangesNoState) {
  const Model model = SmallModel();
  const std::string session = NewSession(model);
  Reference reference(model);
  const Tensors g1 = RandomGradients(model, 11);

  // Everything but the last chunks, in order, so the early parameters are
  // computed server-side before the stream breaks.
  StepCall broken = Call(session, 1);
  broken.body = GradientMessages(RandomGradients(model, 99), 1000, 0);
  broken.cancel_after = broken.body.size() - 2;
  EXPECT_EQ(RunStep(stub_.get(), broken).status.error_code(), grpc::StatusCode::CANCELLED);

  // Same with every chunk sent but no end of step: still not a step.
  StepCall unfinished = Call(session, 1);
  unfinished.body = GradientMessages(RandomGradients(model, 98), 1000, 0);
  unfinished.cancel_after = unfinished.body.size();
  EXPECT_EQ(RunStep(stub_.get(), unfinished).status.error_code(), grpc::StatusCode::CANCELLED);

  // Every chunk sent and a half-close, but no StepEnd: refused, not a step.
  StepCall no_end = Call(session, 1);
  no_end.body = GradientMessages(RandomGradients(model, 97), 1000, 0);
  no_end.send_end = false;
  EXPECT_CODE(RunStep(stub_.get(), no_end).status, INVALID_ARGUMENT, "without a StepEnd");
  EXPECT_EQ(SessionStep(session), 0u);

  ExpectSameUpdates(Good(session, 1, g1), reference.Step(g1));
  EXPECT_EQ(SessionStep(session), 1u);
}

// A client may read every update before it ends the step: nothing is held
// back for the end of the stream, and StepEnd alone commits.
TEST_F(ServerTest, EveryUpdateArrivesBeforeTheStepEnds) {
  const Model model = SmallModel();
  const std::string session = NewSession(model);
  Reference reference(model);
  const Tensors grads = RandomGradients(model, 83);
  grpc::ClientContext ctx;
  // Only a bound on a broken server, which would hold an update back.
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  auto stream = stub_->Step(&ctx);
  v1::StepRequest header;
  *header.mutable_header() = Call(session, 1).header;
  ASSERT_TRUE(stream->Write(header));
  for (const v1::StepRequest& m : GradientMessages(grads, 1000, 0)) ASSERT_TRUE(stream->Write(m));
  StepResult got;
  std::map<uint32_t, uint64_t> received;
  auto complete = [&] {
    if (received.size() != grads.size()) return false;
    for (const auto& [index, bytes] : got.updates) {
      if (received[index] != bytes.size()) return false;
    }
    return true;
  };
  v1::StepResponse response;
  while (!complete()) {
    ASSERT_TRUE(stream->Read(&response)) << stream->Finish().error_message();
    ASSERT_TRUE(response.has_update());
    const v1::UpdateChunk& u = response.update();
    Bytes& dst = got.updates[u.param_index()];
    dst.resize(u.total_bytes());
    std::memcpy(dst.data() + u.offset(), u.data().data(), u.data().size());
    got.decay[u.param_index()] = u.decay();
    received[u.param_index()] += u.data().size();
  }
  EXPECT_EQ(SessionStep(session), 0u);  // computed, not committed
  ASSERT_TRUE(stream->Write(EndMessage({0, 1, 2, 3, 4})));
  stream->WritesDone();
  ASSERT_TRUE(stream->Read(&response));
  ASSERT_TRUE(response.has_summary());
  got.summary = response.summary();
  EXPECT_FALSE(stream->Read(&response));
  got.status = stream->Finish();
  ExpectSameUpdates(got, reference.Step(grads));
}

TEST_F(ServerTest, UpdatesStreamBeforeTheStepEndsButCommitOnlyAtTheEnd) {
  const Model model = SmallModel();
  const std::string session = NewSession(model);
  Reference reference(model);
  const Tensors grads = RandomGradients(model, 81);

  for (int attempt = 0; attempt < 50; ++attempt) {
    // The first attempt is cancelled; the next ones finish (retrying while
    // the server still tears the cancelled stream down: ABORTED).
    const bool finish = attempt > 0;
    grpc::ClientContext ctx;
    auto stream = stub_->Step(&ctx);
    v1::StepRequest header;
    header.mutable_header()->set_session_id(session);
    header.mutable_header()->set_token(handles_[session].token);
    header.mutable_header()->set_step(1);
    ASSERT_TRUE(stream->Write(header));
    // Parameter 0 whole, parameter 1 in part: parameter 0's update must come
    // back while the client is still sending.
    for (const v1::StepRequest& m : GradientMessages({{0, grads.at(0)}}, 1000, 0)) {
      ASSERT_TRUE(stream->Write(m));
    }
    ASSERT_TRUE(
        stream->Write(ChunkMessage(1, 0, Bytes(grads.at(1).begin(), grads.at(1).begin() + 1000))));
    v1::StepResponse response;
    if (!stream->Read(&response)) {
      const grpc::Status status = stream->Finish();
      ASSERT_EQ(status.error_code(), grpc::StatusCode::ABORTED) << status.error_message();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    ASSERT_TRUE(response.has_update());
    EXPECT_EQ(response.update().param_index(), 0u);
    // Streamed, but not committed.
    EXPECT_EQ(SessionStep(session), 0u);
    if (!finish) {
      ctx.TryCancel();
      EXPECT_EQ(stream->Finish().error_code(), grpc::StatusCode::CANCELLED);
      continue;
    }
    Tensors rest = grads;
    rest[1].erase(rest[1].begin(), rest[1].begin() + 1000);
    for (const auto& [index, bytes] : rest) {
      if (index == 0) continue;
      for (size_t off = 0; off < bytes.size(); off += 1000) {
        const size_t n = std::min<size_t>(1000, bytes.size() - off);
        const uint64_t base = index == 1 ? 1000 : 0;
        ASSERT_TRUE(stream->Write(
            ChunkMessage(index, base + off, Bytes(bytes.begin() + off, bytes.begin() + off + n))));
      }
    }
    ASSERT_TRUE(stream->Write(EndMessage({0, 1, 2, 3, 4})));
    stream->WritesDone();
    StepResult got;
    do {
      if (response.has_update()) {
        const v1::UpdateChunk& u = response.update();
        Bytes& dst = got.updates[u.param_index()];
        dst.resize(u.total_bytes());
        std::memcpy(dst.data() + u.offset(), u.data().data(), u.data().size());
        got.decay[u.param_index()] = u.decay();
      } else if (response.has_summary()) {
        got.summary = response.summary();
      }
    } while (stream->Read(&response));
    got.status = stream->Finish();
    // The cancelled attempt left no trace: this equals a first step.
    ExpectSameUpdates(got, reference.Step(grads));
    EXPECT_EQ(SessionStep(session), 1u);
    return;
  }
  FAIL() << "the session stayed busy after the cancelled step";
}

TEST_F(ServerTest, RetryOfAppliedStepReplaysWithoutApplyingTwice) {
  const Model model = SmallModel();
  const std::string session = NewSession(model);
  Reference reference(model);
  const Tensors g1 = RandomGradients(model, 21);
  const StepResult want1 = reference.Step(g1);
  const StepResult first = Good(session, 1, g1);
  ExpectSameUpdates(first, want1);

  // The client lost the summary and resends step 1 (even with other bytes).
  const StepResult again = Good(session, 1, RandomGradients(model, 22));
  ExpectSameUpdates(again, want1);
  ASSERT_TRUE(again.summary.has_value());
  EXPECT_TRUE(again.summary->replayed());
  EXPECT_EQ(again.summary->step(), 1u);
  EXPECT_EQ(SessionStep(session), 1u);

  const Tensors g2 = RandomGradients(model, 23);
  ExpectSameUpdates(Good(session, 2, g2), reference.Step(g2));

  // Step 1 is no longer the last step: its updates are gone.
  EXPECT_CODE(Good(session, 1, g1).status, FAILED_PRECONDITION, "expected step is 3");
}

TEST_F(ServerTest, StepAheadIsFailedPreconditionNamingTheExpectedStep) {
  const Model model = SmallModel();
  const std::string session = NewSession(model);
  EXPECT_CODE(Good(session, 3, RandomGradients(model, 1)).status, FAILED_PRECONDITION,
              "expected step is 1");
  EXPECT_CODE(Good(session, 0, RandomGradients(model, 1)).status, INVALID_ARGUMENT, "start at 1");
  EXPECT_EQ(SessionStep(session), 0u);
}

TEST_F(ServerTest, OmittedParametersKeepTheirState) {
  const Model model = SmallModel();
  const std::string session = NewSession(model);
  Reference reference(model);

  // Step 1: parameters 0 and 2 only (the client names them in StepEnd).
  Tensors g1 = RandomGradients(model, 31);
  g1.erase(1), g1.erase(3), g1.erase(4);
  StepResult got1 = Good(session, 1, g1);
  ExpectSameUpdates(got1, reference.Step(g1));
  EXPECT_THAT(got1.summary->param_indices(), ElementsAre(0, 2));

  // Step 2: parameter 4 only, named by StepEnd.
  Tensors g2 = RandomGradients(model, 32);
  g2 = {{4, g2[4]}};
  StepCall call = Call(session, 2);
  call.body = GradientMessages(g2, 1000, 3);
  call.body.push_back(EndMessage({4}));
  ExpectSameUpdates(RunStep(stub_.get(), call), reference.Step(g2));

  // Step 3: nothing at all; still a step.
  StepResult empty = Good(session, 3, {});
  ASSERT_TRUE(empty.status.ok()) << empty.status.error_message();
  EXPECT_TRUE(empty.updates.empty());
  EXPECT_EQ(empty.summary->param_indices_size(), 0);

  // Step 4: everything; each parameter continues from its own history.
  const Tensors g4 = RandomGradients(model, 34);
  ExpectSameUpdates(Good(session, 4, g4), reference.Step(g4));
}

TEST_F(ServerTest, BadRequestsGetActionableErrorsAndChangeNothing) {
  const Model model = SmallModel();
  const std::string session = NewSession(model);
  const Tensors grads = RandomGradients(model, 41);
  const Bytes& w1 = grads.at(0);  // 8192 bytes
  auto step = [&](std::vector<v1::StepRequest> body) {
    StepCall call = Call(session, 1);
    call.body = std::move(body);
    return RunStep(stub_.get(), call).status;
  };
  auto part = [&](size_t from, size_t to) { return Bytes(w1.begin() + from, w1.begin() + to); };

  {
    StepCall call = Call("no-such-session", 1);
    EXPECT_CODE(RunStep(stub_.get(), call).status, NOT_FOUND, "no session 'no-such-session'");
  }
  {
    StepCall call = Call(session, 1);
    call.header.set_token("wrong");
    EXPECT_CODE(RunStep(stub_.get(), call).status, PERMISSION_DENIED, "token");
    call.header.clear_token();
    EXPECT_CODE(RunStep(stub_.get(), call).status, UNAUTHENTICATED, "token");
  }
  EXPECT_CODE(step({ChunkMessage(9, 0, part(0, 16))}), NOT_FOUND, "parameter index 9");
  EXPECT_CODE(step({ChunkMessage(0, 8192, part(0, 16))}), INVALID_ARGUMENT, "out of bounds");
  EXPECT_CODE(step({ChunkMessage(0, 8000, part(0, 400))}), INVALID_ARGUMENT, "out of bounds");
  EXPECT_CODE(step({ChunkMessage(0, 2, part(0, 16))}), INVALID_ARGUMENT, "aligned");
  EXPECT_CODE(step({ChunkMessage(0, 0, part(0, 1000)), ChunkMessage(0, 996, part(996, 2000))}),
              INVALID_ARGUMENT, "overlaps");
  EXPECT_CODE(step({ChunkMessage(0, 0, part(0, 1000)), ChunkMessage(0, 2000, part(2000, 8192))}),
              INVALID_ARGUMENT, "missing bytes [1000, 2000)");
  {
    std::vector<v1::StepRequest> body = GradientMessages({{0, w1}}, 1000, 0);
    body.push_back(EndMessage({0, 1}));
    EXPECT_CODE(step(body), INVALID_ARGUMENT, "received 0 of");
  }
  {
    std::vector<v1::StepRequest> body = GradientMessages({{0, w1}, {1, grads.at(1)}}, 1000, 0);
    body.push_back(EndMessage({1}));
    EXPECT_CODE(step(body), INVALID_ARGUMENT, "not listed in StepEnd");
  }
  {
    std::vector<v1::StepRequest> body = GradientMessages({{3, grads.at(3)}}, 1000, 0);
    body.push_back(EndMessage({3, 7}));
    EXPECT_CODE(step(body), NOT_FOUND, "index 7");
  }
  {
    v1::StepRequest bf16 = ChunkMessage(0, 0, part(0, 1000));
    bf16.mutable_gradient()->set_dtype(v1::DTYPE_BFLOAT16);
    EXPECT_CODE(step({bf16}), INVALID_ARGUMENT, "registered as float32");
    v1::StepRequest fp32 = ChunkMessage(0, 0, w1);
    fp32.mutable_gradient()->set_dtype(v1::DTYPE_FLOAT32);  // matches: fine
    EXPECT_CODE(step({fp32, EndMessage({0, 4})}), INVALID_ARGUMENT,
                "parameter 4 ('w3'): received 0");
  }
  {
    Bytes inf = w1;
    const float value = std::numeric_limits<float>::infinity();
    std::memcpy(inf.data() + 4 * 100, &value, sizeof value);
    EXPECT_CODE(step(GradientMessages({{0, inf}}, 1000, 0)), INVALID_ARGUMENT, "Inf");
  }
  {
    StepCall call = Call(session, 1);
    call.send_header = false;
    call.body = GradientMessages({{0, w1}}, 1000, 0);
    EXPECT_CODE(RunStep(stub_.get(), call).status, INVALID_ARGUMENT, "must be a StepHeader");
  }
  {
    StepCall call = Call(session, 1);
    v1::StepRequest second;
    *second.mutable_header() = call.header;
    call.body = {second};
    EXPECT_CODE(RunStep(stub_.get(), call).status, INVALID_ARGUMENT, "second StepHeader");
  }
  {
    StepCall call = Call(session, 1);
    call.header.set_update_dtype(static_cast<v1::DType>(17));
    EXPECT_CODE(RunStep(stub_.get(), call).status, INVALID_ARGUMENT, "dtype");
  }
  {
    StepCall call = Call(session, 1);
    call.header.set_lr(-1);
    EXPECT_CODE(RunStep(stub_.get(), call).status, INVALID_ARGUMENT, "lr");
  }
  {
    StepCall call = Call(session, 1);
    call.header.set_worker_id(1);
    EXPECT_CODE(RunStep(stub_.get(), call).status, INVALID_ARGUMENT, "worker_id");
  }
  EXPECT_EQ(SessionStep(session), 0u);

  // After all that, the session is as new.
  Reference reference(model);
  ExpectSameUpdates(Good(session, 1, grads), reference.Step(grads));
}

TEST_F(ServerTest, FieldsOutOfRangeAreRefusedEvenWhereUnused) {
  auto create = [&](const v1::CreateSessionRequest& request) {
    grpc::ClientContext ctx;
    v1::CreateSessionResponse response;
    return stub_->CreateSession(&ctx, request, &response);
  };
  const v1::CreateSessionRequest request = CreateRequest(SmallModel());
  {
    v1::CreateSessionRequest r = request;  // 'b' is an AdamW parameter: momentum is unused
    r.mutable_params(3)->mutable_overrides()->set_momentum(1.5);
    EXPECT_CODE(create(r), INVALID_ARGUMENT, "momentum is 1.5");
  }
  {
    v1::CreateSessionRequest r = request;  // 'w1' is Muon: eps is unused
    r.mutable_params(0)->mutable_overrides()->set_adam_eps(-1);
    EXPECT_CODE(create(r), INVALID_ARGUMENT, "adam_eps");
  }
  {
    v1::CreateSessionRequest r = request;  // applies to no Muon parameter
    r.mutable_adamw_hyper_params()->set_ns_steps(0);
    EXPECT_CODE(create(r), INVALID_ARGUMENT, "adamw_hyper_params: ns_steps");
  }
  {
    v1::CreateSessionRequest r = request;
    r.mutable_hyper_params()->set_adam_beta2(1.0);
    EXPECT_CODE(create(r), INVALID_ARGUMENT, "hyper_params: adam_beta2");
  }
  {
    v1::CreateSessionRequest r = request;
    r.mutable_hyper_params()->set_shape_scale(static_cast<v1::ShapeScale>(7));
    EXPECT_CODE(create(r), INVALID_ARGUMENT, "shape_scale");
  }
  const std::string session = NewSession(SmallModel());
  {
    StepCall call = Call(session, 1);
    call.header.set_update_content(static_cast<v1::UpdateContent>(9));
    EXPECT_CODE(RunStep(stub_.get(), call).status, INVALID_ARGUMENT, "update_content value 9");
  }
  {
    StepCall call = Call(session, 1);
    call.header.set_lr(1e200);
    call.header.set_lr_scale(1e200);
    EXPECT_CODE(RunStep(stub_.get(), call).status, INVALID_ARGUMENT, "lr_scale");
  }
  EXPECT_EQ(SessionStep(session), 0u);
}

TEST_F(ServerTest, StepThatWouldOverflowTheStateIsRefusedAndTheSessionStaysUsable) {
  const Model model = SmallModel();
  const std::string session = NewSession(model);
  // Finite fp32 gradients near the maximum: AdamW's g² overflows.
  Tensors grads = RandomGradients(model, 43);
  const float big = 0.9f * std::numeric_limits<float>::max();
  Bytes& emb = grads.at(2);
  for (size_t k = 0; k < emb.size(); k += sizeof big) std::memcpy(emb.data() + k, &big, sizeof big);
  EXPECT_CODE(Good(session, 1, grads).status, INVALID_ARGUMENT, "non-finite");
  EXPECT_EQ(SessionStep(session), 0u);
  Reference reference(model);
  const Tensors good = RandomGradients(model, 44);
  ExpectSameUpdates(Good(session, 1, good), reference.Step(good));
}

TEST_F(ServerTest, BadSessionsAreRejected) {
  auto create = [&](const v1::CreateSessionRequest& request) {
    grpc::ClientContext ctx;
    v1::CreateSessionResponse response;
    return stub_->CreateSession(&ctx, request, &response);
  };
  v1::CreateSessionRequest request = CreateRequest(SmallModel());
  EXPECT_CODE(create(v1::CreateSessionRequest()), INVALID_ARGUMENT, "at least one parameter");
  {
    v1::CreateSessionRequest r = request;
    r.mutable_params(3)->set_kind(v1::OPTIMIZER_KIND_MUON);  // 1-D
    EXPECT_CODE(create(r), INVALID_ARGUMENT, "'b'");
  }
  {
    v1::CreateSessionRequest r = request;
    r.mutable_params(1)->set_name("w1");
    EXPECT_CODE(create(r), INVALID_ARGUMENT, "unique");
  }
  {
    v1::CreateSessionRequest r = request;
    r.mutable_params(0)->set_shape(1, 0);
    EXPECT_CODE(create(r), INVALID_ARGUMENT, "every dimension must be > 0");
  }
  {
    v1::CreateSessionRequest r = request;
    r.mutable_params(0)->set_dtype(static_cast<v1::DType>(9));
    EXPECT_CODE(create(r), INVALID_ARGUMENT, "dtype");
  }
  {
    v1::CreateSessionRequest r = request;
    r.mutable_hyper_params()->set_ns_steps(0);
    EXPECT_CODE(create(r), INVALID_ARGUMENT, "");
  }
  {
    v1::CreateSessionRequest r = request;
    r.mutable_hyper_params()->set_ns_gram(static_cast<v1::NsGram>(7));
    EXPECT_CODE(create(r), INVALID_ARGUMENT, "ns_gram");
  }
  {
    v1::CreateSessionRequest r = request;
    r.set_num_workers(2);
    EXPECT_CODE(create(r), INVALID_ARGUMENT, "PARAMETER_SERVER");
  }
}

TEST_F(ServerTest, GetListDeleteSession) {
  const Model model = SmallModel();
  const std::string session = NewSession(model);
  {
    absl::StatusOr<std::vector<v1::SessionInfo>> list = client_->ListSessions();
    ASSERT_TRUE(list.ok()) << list.status();
    bool found = false;
    for (const v1::SessionInfo& s : *list) found |= s.session_id() == session;
    EXPECT_TRUE(found);
  }
  ASSERT_TRUE(client_->DeleteSession(handles_[session]).ok());
  {
    absl::StatusOr<v1::SessionInfo> info = client_->GetSession(handles_[session]);
    EXPECT_EQ(info.status().code(), absl::StatusCode::kNotFound);
    EXPECT_THAT(std::string(info.status().message()), HasSubstr(session));
  }
  EXPECT_CODE(Good(session, 1, RandomGradients(model, 1)).status, NOT_FOUND, session);
}

TEST_F(ServerTest, EightClientsOnEightSessionsMatchSerialRuns) {
  constexpr int kClients = 8;
  constexpr int kSteps = 4;
  const Model model = SmallModel();
  std::vector<std::vector<StepResult>> got(kClients);
  std::vector<std::thread> threads;
  for (int c = 0; c < kClients; ++c) {
    threads.emplace_back([&, c] {
      std::unique_ptr<Client> client = NewClient(*server_);
      absl::StatusOr<SessionHandle> session = client->CreateSession(CreateRequest(model));
      if (!session.ok()) return;
      for (int s = 1; s <= kSteps; ++s) {
        got[c].push_back(
            ClientStep(client.get(), *session, s, RandomGradients(model, 1000 * c + s)));
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int c = 0; c < kClients; ++c) {
    ASSERT_EQ(got[c].size(), static_cast<size_t>(kSteps)) << "client " << c;
    Reference reference(model);
    for (int s = 1; s <= kSteps; ++s) {
      SCOPED_TRACE(::testing::Message() << "client " << c << " step " << s);
      ExpectSameUpdates(got[c][s - 1], reference.Step(RandomGradients(model, 1000 * c + s)));
    }
  }
}

TEST_F(ServerTest, ParameterServerWeightsRoundTrip) {
  const Model model = SmallModel();
  v1::CreateSessionRequest request = CreateRequest(model);
  request.set_mode(v1::SESSION_MODE_PARAMETER_SERVER);
  request.set_num_workers(2);
  v1::CreateSessionResponse created;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub_->CreateSession(&ctx, request, &created).ok());
  }
  const std::string session = created.session_id();
  handles_[session].token = created.token();
  const Tensors weights = RandomGradients(model, 61);  // any finite values

  auto push = [&](const Tensors& tensors, size_t chunk) {
    grpc::ClientContext ctx;
    v1::PushWeightsResponse response;
    auto writer = stub_->PushWeights(&ctx, &response);
    v1::PushWeightsRequest header;
    header.mutable_header()->set_session_id(session);
    header.mutable_header()->set_token(created.token());
    writer->Write(header);
    for (const v1::StepRequest& m : GradientMessages(tensors, chunk, 9)) {
      v1::PushWeightsRequest r;
      *r.mutable_weights() = m.gradient();
      if (!writer->Write(r)) break;
    }
    writer->WritesDone();
    return writer->Finish();
  };
  auto pull = [&](v1::DType dtype, std::vector<uint32_t> indices, grpc::Status* status) {
    grpc::ClientContext ctx;
    v1::PullWeightsRequest r;
    r.set_session_id(session);
    r.set_token(created.token());
    r.set_dtype(dtype);
    r.set_max_chunk_bytes(1024);
    for (uint32_t i : indices) r.add_param_indices(i);
    auto reader = stub_->PullWeights(&ctx, r);
    Tensors out;
    v1::PullWeightsResponse response;
    while (reader->Read(&response)) {
      Bytes& dst = out[response.weights().param_index()];
      dst.resize(response.total_bytes());
      std::memcpy(dst.data() + response.weights().offset(), response.weights().data().data(),
                  response.weights().data().size());
    }
    *status = reader->Finish();
    return out;
  };

  grpc::Status status = push(weights, 1000);
  ASSERT_TRUE(status.ok()) << status.error_message();
  Tensors pulled = pull(v1::DTYPE_UNSPECIFIED, {}, &status);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_TRUE(pulled == weights);

  // fp32 weights pulled as bf16 are the bf16 encoding of the same values.
  pulled = pull(v1::DTYPE_BFLOAT16, {0}, &status);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(pulled.size(), 1u);
  std::vector<float> w0(64 * 32);
  std::memcpy(w0.data(), weights.at(0).data(), weights.at(0).size());
  Bytes bf16(w0.size() * 2);
  EncodeFromFloat(DType::kBFloat16, w0.data(), w0.size(), bf16.data());
  EXPECT_TRUE(pulled.at(0) == bf16);

  // An incomplete or non-finite push changes nothing.
  Tensors partial = {{0, Bytes(weights.at(0).begin(), weights.at(0).begin() + 4096)}};
  partial[0].resize(4096);
  {
    grpc::ClientContext ctx;
    v1::PushWeightsResponse response;
    auto writer = stub_->PushWeights(&ctx, &response);
    v1::PushWeightsRequest header;
    header.mutable_header()->set_session_id(session);
    header.mutable_header()->set_token(created.token());
    writer->Write(header);
    v1::PushWeightsRequest chunk;
    *chunk.mutable_weights() = ChunkMessage(0, 0, partial[0]).gradient();
    writer->Write(chunk);
    writer->WritesDone();
    EXPECT_CODE(writer->Finish(), INVALID_ARGUMENT, "missing");
  }
  Tensors bad = RandomGradients(model, 62);
  const float inf = std::numeric_limits<float>::infinity();
  std::memcpy(bad[2].data(), &inf, sizeof inf);
  EXPECT_CODE(push(bad, 4096), INVALID_ARGUMENT, "NaN or Inf");
  pulled = pull(v1::DTYPE_UNSPECIFIED, {}, &status);
  EXPECT_TRUE(pulled == weights);

  pull(v1::DTYPE_UNSPECIFIED, {9}, &status);
  EXPECT_CODE(status, NOT_FOUND, "parameter index 9");

  // UPDATES sessions hold no weights.
  const std::string updates_session = NewSession(model);
  grpc::ClientContext ctx;
  v1::PullWeightsRequest r;
  r.set_session_id(updates_session);
  r.set_token(handles_[updates_session].token);
  auto reader = stub_->PullWeights(&ctx, r);
  v1::PullWeightsResponse response;
  while (reader->Read(&response)) {
  }
  EXPECT_CODE(reader->Finish(), FAILED_PRECONDITION, "UPDATES mode");
}

// Health: grpc.health.v1.Health/Check with an empty request, by generic call.
int HealthStatus(const std::shared_ptr<grpc::Channel>& channel) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::Slice empty;
  grpc::ByteBuffer request(&empty, 1);
  grpc::ByteBuffer response;
  grpc::Status status;
  auto call = stub.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  call->Finish(&response, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  cq.Next(&tag, &ok);
  if (!status.ok()) return -static_cast<int>(status.error_code());
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return -100;
  std::string bytes;
  for (const grpc::Slice& s : slices)
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  // HealthCheckResponse{status = 1 (SERVING)} is the two bytes 08 01.
  if (bytes.size() == 2 && bytes[0] == 0x08) return bytes[1];
  return 0;  // UNKNOWN (field absent)
}

// Reflection: ServerReflectionInfo with list_services, by generic call; the
// raw response bytes hold the service names.
std::string ReflectionListServices(const std::shared_ptr<grpc::Channel>& channel) {
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  auto call =
      stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag = nullptr;
  bool ok = false;
  auto next = [&] { return cq.Next(&tag, &ok) && ok; };
  call->StartCall(reinterpret_cast<void*>(1));
  if (!next()) return "";
  const char list_services[] = {0x3a, 0x00};  // field 7 (list_services) = ""
  grpc::Slice slice(list_services, sizeof list_services);
  grpc::ByteBuffer request(&slice, 1);
  call->Write(request, reinterpret_cast<void*>(2));
  if (!next()) return "";
  call->WritesDone(reinterpret_cast<void*>(3));
  if (!next()) return "";
  grpc::ByteBuffer response;
  call->Read(&response, reinterpret_cast<void*>(4));
  if (!next()) return "";
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  next();
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return "";
  std::string bytes;
  for (const grpc::Slice& s : slices) {
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return bytes;
}

TEST_F(ServerTest, ReflectionListsTheServices) {
  const std::string services = ReflectionListServices(server_->NewChannel());
  EXPECT_THAT(services, HasSubstr("muon.v1.Optimizer"));
  EXPECT_THAT(services, HasSubstr("grpc.health.v1.Health"));
}

TEST_F(ServerTest, HealthIsServing) {
  EXPECT_EQ(HealthStatus(server_->NewChannel()), 1);
  absl::StatusOr<std::string> health = client_->Health();
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, "SERVING");
}

TEST(ServerLimitsTest, LimitsGiveResourceExhausted) {
  auto server = ServerProcess::Start({"--max_sessions=2", "--max_message_bytes=65536"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Optimizer::NewStub((*server)->NewChannel());
  Model model = SmallModel();
  // A parameter whose update (128 KiB) needs several messages under the limit.
  v1::ParameterSpec big;
  big.set_name("big");
  big.add_shape(128);
  big.add_shape(256);
  model.params.push_back(big);
  ParamSpec big_spec;
  big_spec.name = "big";
  big_spec.shape = {128, 256};
  model.specs.push_back(big_spec);

  std::string session;
  std::string token;
  for (int i = 0; i < 2; ++i) {
    grpc::ClientContext ctx;
    v1::CreateSessionResponse response;
    ASSERT_TRUE(stub->CreateSession(&ctx, CreateRequest(model), &response).ok());
    session = response.session_id();
    token = response.token();
  }
  {
    grpc::ClientContext ctx;
    v1::CreateSessionResponse response;
    EXPECT_CODE(stub->CreateSession(&ctx, CreateRequest(model), &response), RESOURCE_EXHAUSTED,
                "--max_sessions");
  }
  const Tensors grads = RandomGradients(model, 7);
  StepCall call;
  call.header.set_session_id(session);
  call.header.set_token(token);
  call.header.set_step(1);
  call.body = GradientMessages(grads, 100000, 0);  // over the 64 KiB limit
  EXPECT_CODE(RunStep(stub.get(), call).status, RESOURCE_EXHAUSTED,
              "larger than max (100010 vs. 65536)");
  // The five parameters before the oversized chunk were whole, but the
  // broken stream must not have committed them (gRPC ends its reads as if
  // the client had half-closed).
  {
    grpc::ClientContext ctx;
    v1::GetSessionRequest get;
    get.set_session_id(session);
    get.set_token(token);
    v1::SessionInfo info;
    ASSERT_TRUE(stub->GetSession(&ctx, get, &info).ok());
    EXPECT_EQ(info.step(), 0u);
  }

  Reference reference(model);
  call.body = GradientMessages(grads, 60000, 0);
  StepResult got = RunStepRetrying(stub.get(), call);
  ExpectSameUpdates(got, reference.Step(grads));
  EXPECT_GE(got.update_messages, 3);
}

TEST(ServerMetricsTest, MetricsCountSessionsAndSteps) {
  const int metrics_port = FreePort();
  auto server =
      ServerProcess::Start({"--metrics_listen=127.0.0.1:" + std::to_string(metrics_port)});
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Optimizer::NewStub((*server)->NewChannel());
  const Model model = SmallModel();
  grpc::ClientContext ctx;
  v1::CreateSessionResponse created;
  ASSERT_TRUE(stub->CreateSession(&ctx, CreateRequest(model), &created).ok());
  ASSERT_TRUE(
      GoodStep(stub.get(), created.session_id(), created.token(), 1, RandomGradients(model, 1))
          .status.ok());
  ASSERT_TRUE(
      GoodStep(stub.get(), created.session_id(), created.token(), 1, RandomGradients(model, 1))
          .status.ok());
  EXPECT_FALSE(
      GoodStep(stub.get(), created.session_id(), created.token(), 5, RandomGradients(model, 1))
          .status.ok());
  // The stream gauge drops when gRPC is done with the stream, just after
  // the client has its status.
  std::string metrics;
  for (int i = 0; i < 100; ++i) {
    metrics = HttpGet(metrics_port, "/metrics");
    if (metrics.find("muon_active_streams 0") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_THAT(metrics, HasSubstr("muon_sessions_created_total 1"));
  EXPECT_THAT(metrics, HasSubstr("muon_sessions 1"));
  EXPECT_THAT(metrics, HasSubstr("muon_active_streams 0"));
  EXPECT_THAT(metrics, HasSubstr("muon_steps_total{outcome=\"ok\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("muon_steps_total{outcome=\"retried\"} 1"));
  // Step 5 of a session at step 1: FAILED_PRECONDITION, a rejected request.
  EXPECT_THAT(metrics, HasSubstr("muon_steps_total{outcome=\"invalid\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("muon_steps_total{outcome=\"aborted\"} 0"));
  // Only the committed step is timed.
  EXPECT_THAT(metrics, HasSubstr("muon_step_duration_seconds_count{phase=\"total\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("muon_step_duration_seconds_count{phase=\"compute\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("muon_parameters_updated_total 5"));
  EXPECT_THAT(metrics,
              HasSubstr("muon_grpc_requests_total{code=\"OK\",method=\"CreateSession\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("muon_grpc_requests_total{code=\"OK\",method=\"Step\"} 2"));
  EXPECT_THAT(metrics, HasSubstr("muon_grpc_requests_total{code=\"FAILED_PRECONDITION\","
                                 "method=\"Step\"} 1"));
  // The default budget is the machine's memory, never 0.
  EXPECT_THAT(metrics, HasSubstr("muon_engine_memory_bytes{kind=\"budget\"} "));
  EXPECT_THAT(metrics, Not(HasSubstr("muon_engine_memory_bytes{kind=\"budget\"} 0\n")));
  EXPECT_THAT(metrics, Not(HasSubstr("muon_engine_memory_bytes{kind=\"used\"} 0\n")));
}

TEST(ServerLimitsTest, SessionShapeAndMemoryLimits) {
  // SmallModel: 5 parameters; state 64·32·4 + 2·16·24·4 + 40·8·8 + 32·8 + 32·64·4 bytes.
  // The budget check needs an engine whose fixed overhead fits 200 kB: the
  // CPU engine's (the CUDA engine reserves its GEMM workspace first), which
  // charges a 64×64 Muon parameter 16 KiB of state, 16 KiB for the copy a
  // step writes and 7·16 KiB of step buffers (144 KiB).
  const bool budget = TestEngine() == "cpu";
  std::vector<std::string> flags = {"--max_params_per_session=4", "--max_bytes_per_session=100000",
                                    "--max_concurrent_streams=2"};
  if (budget) flags.push_back("--memory_budget_bytes=200000");
  auto server = ServerProcess::Start(flags);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Optimizer::NewStub((*server)->NewChannel());
  auto create = [&](const v1::CreateSessionRequest& request) {
    grpc::ClientContext ctx;
    v1::CreateSessionResponse response;
    return stub->CreateSession(&ctx, request, &response);
  };
  const v1::CreateSessionRequest five = CreateRequest(SmallModel());
  EXPECT_CODE(create(five), RESOURCE_EXHAUSTED, "--max_params_per_session");

  v1::CreateSessionRequest huge;
  huge.add_params()->set_name("huge");
  huge.mutable_params(0)->add_shape(512);
  huge.mutable_params(0)->add_shape(512);
  EXPECT_CODE(create(huge), RESOURCE_EXHAUSTED, "--max_bytes_per_session");

  // Each fits the per-session limit; together they pass the engine's budget.
  v1::CreateSessionRequest medium;
  medium.add_params()->set_name("m");
  medium.mutable_params(0)->add_shape(64);
  medium.mutable_params(0)->add_shape(64);  // 16 KiB of momentum
  EXPECT_TRUE(create(medium).ok());
  if (budget) EXPECT_CODE(create(medium), RESOURCE_EXHAUSTED, "registering parameter 0 ('m')");

  // Two Step streams may be open; a third is refused.
  grpc::ClientContext c1, c2, c3;
  auto s1 = stub->Step(&c1);
  auto s2 = stub->Step(&c2);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto s3 = stub->Step(&c3);
  s3->WritesDone();
  EXPECT_CODE(s3->Finish(), RESOURCE_EXHAUSTED, "--max_concurrent_streams");
  c1.TryCancel();
  c2.TryCancel();
  s1->Finish();
  s2->Finish();
}

TEST(ServerConfigTest, EnvironmentSetsFlagsAndBadFlagsStopStartUp) {
  setenv("MUON_MAX_SESSIONS", "1", 1);
  auto server = ServerProcess::Start();
  unsetenv("MUON_MAX_SESSIONS");
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Optimizer::NewStub((*server)->NewChannel());
  for (int i = 0; i < 2; ++i) {
    grpc::ClientContext ctx;
    v1::CreateSessionResponse response;
    grpc::Status status = stub->CreateSession(&ctx, CreateRequest(SmallModel()), &response);
    if (i == 0) {
      EXPECT_TRUE(status.ok()) << status.error_message();
    } else {
      EXPECT_CODE(status, RESOURCE_EXHAUSTED, "--max_sessions=1");
    }
  }
  // The command line wins over the environment; bad values stop start-up.
  setenv("MUON_ENGINE", "cpu", 1);
  EXPECT_FALSE(ServerProcess::Start({"--engine=abacus"}).ok());
  unsetenv("MUON_ENGINE");
  setenv("MUON_MAX_SESSIONS", "many", 1);
  EXPECT_FALSE(ServerProcess::Start().ok());
  unsetenv("MUON_MAX_SESSIONS");
  EXPECT_FALSE(ServerProcess::Start({"--malloc_arenas=-1"}).ok());
  EXPECT_TRUE(ServerProcess::Start({"--malloc_arenas=0"}).ok());
  EXPECT_FALSE(ServerProcess::Start({"--malloc_trim_bytes=-1"}).ok());
  EXPECT_TRUE(ServerProcess::Start({"--malloc_trim_bytes=0"}).ok());
}

TEST(ServerRobustnessTest, GarbageNeverCrashesTheServer) {
  auto server = ServerProcess::Start();
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Optimizer::NewStub((*server)->NewChannel());
  const Model model = SmallModel();
  grpc::ClientContext ctx;
  v1::CreateSessionResponse created;
  ASSERT_TRUE(stub->CreateSession(&ctx, CreateRequest(model), &created).ok());
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    StepCall call;
    call.header.set_session_id(created.session_id());
    call.header.set_token(created.token());
    call.header.set_step(rng() % 3);
    call.send_header = rng() % 8 != 0;
    const int messages = static_cast<int>(rng() % 6);
    for (int m = 0; m < messages; ++m) {
      const int kind = static_cast<int>(rng() % 5);
      if (kind == 0) {
        call.body.push_back(EndMessage({static_cast<uint32_t>(rng() % 7)}));
      } else if (kind == 1) {
        v1::StepRequest header;
        *header.mutable_header() = call.header;
        call.body.push_back(header);
      } else {
        Bytes data(rng() % 9000);
        for (std::byte& b : data) b = static_cast<std::byte>(rng());
        call.body.push_back(ChunkMessage(static_cast<uint32_t>(rng() % 7), rng() % 9000, data));
      }
    }
    if (rng() % 10 == 0) call.cancel_after = call.body.size() / 2;
    RunStepRetrying(stub.get(), call);
  }
  // Still serving, and a good step is still exact.
  Reference reference(model);
  grpc::ClientContext get_ctx;
  v1::GetSessionRequest get;
  get.set_session_id(created.session_id());
  get.set_token(created.token());
  v1::SessionInfo info;
  ASSERT_TRUE(stub->GetSession(&get_ctx, get, &info).ok());
  const Tensors grads = RandomGradients(model, 71);
  if (info.step() == 0) {
    ExpectSameUpdates(GoodStep(stub.get(), created.session_id(), created.token(), 1, grads),
                      reference.Step(grads));
  } else {
    // Random bytes happened to form a whole valid step: the server must still answer.
    EXPECT_TRUE(GoodStep(stub.get(), created.session_id(), created.token(), info.step() + 1, grads)
                    .status.ok());
  }
}

TEST(ServerRobustnessTest, StateThatCannotBeAllocatedIsResourceExhaustedNamingTheFlag) {
  auto server = ServerProcess::Start();  // default flags: the machine's memory is the budget
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Optimizer::NewStub((*server)->NewChannel());
  auto create = [&](const v1::CreateSessionRequest& request) {
    grpc::ClientContext ctx;
    v1::CreateSessionResponse response;
    return stub->CreateSession(&ctx, request, &response);
  };
  for (const std::vector<int64_t>& shape :
       {std::vector<int64_t>{1'000'000, 1'000'000}, std::vector<int64_t>{1'000'000'000'000}}) {
    v1::CreateSessionRequest huge;
    huge.add_params()->set_name("huge");
    for (int64_t d : shape) huge.mutable_params(0)->add_shape(d);
    EXPECT_CODE(create(huge), RESOURCE_EXHAUSTED, "--memory_budget_bytes");
  }
  // Still serving.
  EXPECT_TRUE(create(CreateRequest(SmallModel())).ok());
}

// The header of step 1 of a session just created.
v1::StepRequest FirstHeader(const v1::CreateSessionResponse& created) {
  v1::StepRequest header;
  header.mutable_header()->set_session_id(created.session_id());
  header.mutable_header()->set_token(created.token());
  header.mutable_header()->set_step(1);
  return header;
}

TEST(ServerSignalTest, SigtermDrainsTheInFlightStepAndExitsZero) {
  auto server = ServerProcess::Start();
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Optimizer::NewStub((*server)->NewChannel());
  const Model model = SmallModel();
  grpc::ClientContext create_ctx;
  v1::CreateSessionResponse created;
  ASSERT_TRUE(stub->CreateSession(&create_ctx, CreateRequest(model), &created).ok());
  ASSERT_EQ(HealthStatus((*server)->NewChannel()), 1);

  const Tensors grads = RandomGradients(model, 51);
  std::vector<v1::StepRequest> body = GradientMessages(grads, 1000, 0);
  grpc::ClientContext ctx;
  auto stream = stub->Step(&ctx);
  ASSERT_TRUE(stream->Write(FirstHeader(created)));
  const size_t half = body.size() / 2;
  for (size_t i = 0; i < half; ++i) ASSERT_TRUE(stream->Write(body[i]));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));

  (*server)->Signal(SIGTERM);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  {
    // Draining: no new sessions, health says NOT_SERVING (2).
    grpc::ClientContext c;
    v1::CreateSessionResponse r;
    EXPECT_CODE(stub->CreateSession(&c, CreateRequest(model), &r), UNAVAILABLE, "shutting down");
    EXPECT_EQ(HealthStatus((*server)->NewChannel()), 2);
  }
  for (size_t i = half; i < body.size(); ++i) ASSERT_TRUE(stream->Write(body[i]));
  ASSERT_TRUE(stream->Write(EndMessage({0, 1, 2, 3, 4})));
  stream->WritesDone();
  v1::StepResponse response;
  std::optional<v1::StepSummary> summary;
  while (stream->Read(&response)) {
    if (response.has_summary()) summary = response.summary();
  }
  grpc::Status status = stream->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  ASSERT_TRUE(summary.has_value());
  EXPECT_EQ(summary->step(), 1u);
  EXPECT_EQ((*server)->WaitForExit(30), 0);
}

// A step the drain does not wait out is cut with UNAVAILABLE, which a
// client retries, never CANCELLED; and it is not applied.
TEST(ServerSignalTest, AStepCutByShutdownAnswersUnavailable) {
  auto server = ServerProcess::Start({"--drain_timeout_seconds=0.2"});
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Optimizer::NewStub((*server)->NewChannel());
  const Model model = SmallModel();
  grpc::ClientContext create_ctx;
  v1::CreateSessionResponse created;
  ASSERT_TRUE(stub->CreateSession(&create_ctx, CreateRequest(model), &created).ok());

  grpc::ClientContext ctx;
  auto stream = stub->Step(&ctx);
  ASSERT_TRUE(stream->Write(FirstHeader(created)));
  const std::vector<v1::StepRequest> body = GradientMessages(RandomGradients(model, 52), 1000, 0);
  for (size_t i = 0; i < body.size() / 2; ++i) ASSERT_TRUE(stream->Write(body[i]));
  // An idle stream (no header yet) is cut the same way.
  grpc::ClientContext idle_ctx;
  auto idle = stub->Step(&idle_ctx);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));

  (*server)->Signal(SIGTERM);
  v1::StepResponse response;
  while (stream->Read(&response)) {
    EXPECT_FALSE(response.has_summary());
  }
  EXPECT_CODE(stream->Finish(), UNAVAILABLE, "shutting down");
  while (idle->Read(&response)) {
  }
  EXPECT_CODE(idle->Finish(), UNAVAILABLE, "shutting down");
  EXPECT_EQ((*server)->WaitForExit(30), 0);
}

}  // namespace
}  // namespace muon::testing
