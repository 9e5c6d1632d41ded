// PARAMETER_SERVER sessions through the real server: W workers per step,
// fp32 averaging, held weights, timeouts, broken and repeated streams.

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <signal.h>
#include <stdlib.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client_driver.h"
#include "server_process.h"
#include "step_harness.h"

namespace muon::testing {
namespace {

using ::testing::HasSubstr;

constexpr double kWeightDecay = 0.1;

// Gradients on a 1/256 grid, small enough that any sum of a few of them is
// exact in fp32: the server's sum (in arrival order) then equals this
// test's bit for bit.
Tensors GridGradients(const Model& model, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Tensors out;
  for (uint32_t i = 0; i < model.specs.size(); ++i) {
    const ParamSpec& s = model.specs[i];
    const int64_t n = NumElements(s.shape);
    std::vector<float> values(n);
    for (float& v : values) v = std::round(normal(rng) * 256.0f) / 256.0f;
    Bytes bytes(n * DTypeSize(s.dtype));
    EncodeFromFloat(s.dtype, values.data(), n, bytes.data());
    out[i] = std::move(bytes);
  }
  return out;
}

// The fp32 average of the workers' gradients, as the server forms it:
// decoded, summed in fp32 in order, times 1/W, kept in fp32.
Tensors Fp32Average(const Model& model, const std::vector<Tensors>& workers) {
  Tensors out;
  for (uint32_t i = 0; i < model.specs.size(); ++i) {
    const DType dtype = model.specs[i].dtype;
    const size_t n = NumElements(model.specs[i].shape);
    std::vector<float> sum(n, 0.0f), one(n);
    for (const Tensors& w : workers) {
      DecodeToFloat(dtype, w.at(i).data(), n, one.data());
      for (size_t j = 0; j < n; ++j) sum[j] += one[j];
    }
    const float scale = 1.0f / static_cast<float>(workers.size());
    for (float& v : sum) v *= scale;
    Bytes bytes(n * sizeof(float));
    std::memcpy(bytes.data(), sum.data(), bytes.size());
    out[i] = std::move(bytes);
  }
  return out;
}

// The same average back in each parameter's dtype (what a single worker
// would send).
Tensors Average(const Model& model, const std::vector<Tensors>& workers) {
  Tensors out = Fp32Average(model, workers);
  for (auto& [i, bytes] : out) {
    const DType dtype = model.specs[i].dtype;
    const size_t n = bytes.size() / sizeof(float);
    Bytes encoded(n * DTypeSize(dtype));
    EncodeFromFloat(dtype, reinterpret_cast<const float*>(bytes.data()), n, encoded.data());
    bytes = std::move(encoded);
  }
  return out;
}

// Held weights, fp32, by parameter.
using Weights = std::map<uint32_t, std::vector<float>>;

Weights InitialWeights(const Model& model) {
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Weights w;
  for (uint32_t i = 0; i < model.specs.size(); ++i) {
    std::vector<float> v(NumElements(model.specs[i].shape));
    for (float& x : v) x = normal(rng);
    w[i] = std::move(v);
  }
  return w;
}

class ParameterServerTest : public ::testing::Test {
 protected:
  void StartServer(const std::vector<std::string>& flags = {}) {
    auto server = ServerProcess::Start(flags);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    stub_ = v1::Optimizer::NewStub(server_->NewChannel());
  }

  SessionHandle Create(const Model& model, uint32_t workers) {
    v1::CreateSessionRequest request = CreateRequest(model);
    request.set_mode(v1::SESSION_MODE_PARAMETER_SERVER);
    request.set_num_workers(workers);
    request.mutable_hyper_params()->set_weight_decay(kWeightDecay);
    auto client = NewClient(*server_);
    absl::StatusOr<SessionHandle> handle = client->CreateSession(request);
    EXPECT_TRUE(handle.ok()) << handle.status();
    return handle.ok() ? *handle : SessionHandle{};
  }

  grpc::Status Push(const SessionHandle& session, const Weights& weights) {
    grpc::ClientContext ctx;
    v1::PushWeightsResponse response;
    auto writer = stub_->PushWeights(&ctx, &response);
    v1::PushWeightsRequest header;
    header.mutable_header()->set_session_id(session.id);
    header.mutable_header()->set_token(session.token);
    header.mutable_header()->set_dtype(v1::DTYPE_FLOAT32);
    writer->Write(header);
    for (const auto& [index, values] : weights) {
      v1::PushWeightsRequest r;
      r.mutable_weights()->set_param_index(index);
      r.mutable_weights()->set_data(values.data(), values.size() * sizeof(float));
      writer->Write(r);
    }
    writer->WritesDone();
    return writer->Finish();
  }

  Weights Pull(const SessionHandle& session, uint64_t* step = nullptr) {
    grpc::ClientContext ctx;
    v1::PullWeightsRequest r;
    r.set_session_id(session.id);
    r.set_token(session.token);
    r.set_dtype(v1::DTYPE_FLOAT32);
    auto reader = stub_->PullWeights(&ctx, r);
    Weights out;
    v1::PullWeightsResponse response;
    while (reader->Read(&response)) {
      std::vector<float>& dst = out[response.weights().param_index()];
      dst.resize(response.total_bytes() / sizeof(float));
      std::memcpy(reinterpret_cast<char*>(dst.data()) + response.weights().offset(),
                  response.weights().data().data(), response.weights().data().size());
      if (step != nullptr) *step = response.step();
    }
    EXPECT_TRUE(reader->Finish().ok());
    return out;
  }

  // Every worker's step in its own thread and client.
  std::vector<StepResult> AllWorkers(const SessionHandle& session, uint64_t step,
                                     const std::vector<Tensors>& grads, int attempts = 20) {
    std::vector<StepResult> results(grads.size());
    std::vector<std::thread> threads;
    for (size_t w = 0; w < grads.size(); ++w) {
      threads.emplace_back([&, w] {
        auto client = NewClient(*server_, 1000, attempts);
        muon::StepCallOptions options;
        options.worker_id = static_cast<uint32_t>(w);
        results[w] = ClientStep(client.get(), session, step, grads[w], options);
      });
    }
    for (std::thread& t : threads) t.join();
    return results;
  }

  // One worker's step in a thread of its own, which must succeed; `grads`
  // must outlive the thread.
  std::thread StepExpectingOk(const SessionHandle& session, uint64_t step, uint32_t worker,
                              const Tensors& grads) {
    return std::thread([this, session, step, worker, &grads] {
      auto client = NewClient(*server_);
      muon::StepCallOptions options;
      options.worker_id = worker;
      StepResult r = ClientStep(client.get(), session, step, grads, options);
      EXPECT_TRUE(r.status.ok()) << "worker " << worker << ": " << r.status.error_message();
    });
  }

  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<v1::Optimizer::Stub> stub_;
};

// SmallModel without its bf16 parameter (the reference's updates are then
// the fp32 values the server applies to its weights), with weight decay.
Model Fp32Model() {
  Model model = SmallModel();
  model.params.pop_back();
  model.specs.pop_back();
  for (ParamSpec& spec : model.specs) spec.hp.weight_decay = kWeightDecay;
  return model;
}

// Held weights after a step against the reference's: bit for bit on the CPU
// engine; on another engine (bf16 Newton–Schulz) the step each side applied
// to its own weights, after − before, within 5% in relative Frobenius norm.
void ExpectSameStep(const Weights& got, const Weights& got_before, const Weights& want,
                    const Weights& want_before, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (const auto& [i, w] : want) {
    const std::vector<float>& g = got.at(i);
    ASSERT_EQ(g.size(), w.size()) << what << " parameter " << i;
    if (TestEngine() == "cpu") {
      EXPECT_TRUE(g == w) << what << " parameter " << i;
      continue;
    }
    double diff = 0.0, norm = 0.0;
    for (size_t j = 0; j < w.size(); ++j) {
      const double got_step = double{g[j]} - got_before.at(i)[j];
      const double want_step = double{w[j]} - want_before.at(i)[j];
      diff += (got_step - want_step) * (got_step - want_step);
      norm += want_step * want_step;
    }
    EXPECT_LT(std::sqrt(diff / norm), 0.05) << what << " parameter " << i;
  }
}

// W ← decay·W + update in fp32, as the engine applies it to held weights,
// with the CPU engine's update for `grads` (`fp32`: fp32 gradients, for any
// parameter dtype).
void ApplyReference(const Model& model, Reference& reference, const Tensors& grads,
                    Weights& weights, bool fp32 = false) {
  StepResult want = fp32 ? reference.StepFp32(grads) : reference.Step(grads);
  ASSERT_TRUE(want.status.ok());
  for (uint32_t i = 0; i < model.specs.size(); ++i) {
    const size_t n = weights[i].size();
    std::vector<float> update(n);
    DecodeToFloat(want.dtype.at(i), want.updates.at(i).data(), n, update.data());
    const float decay = static_cast<float>(want.decay.at(i));
    for (size_t j = 0; j < n; ++j) weights[i][j] = decay * weights[i][j] + update[j];
  }
}

TEST_F(ParameterServerTest, ThreeWorkersEqualOneWorkerFeedingTheAverage) {
  // Replies in several chunks per parameter, of a size no dtype divides.
  StartServer({"--update_chunk_bytes=1030"});
  const Model model = Fp32Model();
  const SessionHandle session = Create(model, 3);
  Weights expected = InitialWeights(model);
  ASSERT_TRUE(Push(session, expected).ok());
  Weights held = expected;
  Reference reference(model);
  for (uint64_t step = 1; step <= 4; ++step) {
    std::vector<Tensors> grads;
    for (uint64_t w = 0; w < 3; ++w) grads.push_back(GridGradients(model, 100 * step + w));
    std::vector<StepResult> results = AllWorkers(session, step, grads);
    const Weights expected_before = expected;
    ApplyReference(model, reference, Average(model, grads), expected);
    for (size_t w = 0; w < results.size(); ++w) {
      ASSERT_TRUE(results[w].status.ok()) << "worker " << w << ": "
                                          << results[w].status.error_message();
      ASSERT_TRUE(results[w].summary.has_value());
      EXPECT_EQ(results[w].summary->step(), step);
      // Every worker gets the same new weights.
      EXPECT_TRUE(results[w].updates == results[0].updates) << "step " << step << " worker " << w;
    }
    // The model is all fp32, so the answers are the held weights' bytes.
    Weights returned;
    for (uint32_t i = 0; i < model.specs.size(); ++i) {
      const Bytes& bytes = results[0].updates.at(i);
      returned[i].resize(bytes.size() / sizeof(float));
      std::memcpy(returned[i].data(), bytes.data(), bytes.size());
    }
    ExpectSameStep(returned, held, expected, expected_before, absl::StrCat("step ", step));
    held = std::move(returned);
  }
  uint64_t pulled_step = 0;
  const Weights pulled = Pull(session, &pulled_step);
  EXPECT_EQ(pulled_step, 4u);
  EXPECT_TRUE(pulled == held) << "PullWeights must give the weights the last step returned";

  // A worker resending the committed step is answered from the cache.
  auto client = NewClient(*server_);
  muon::StepCallOptions options;
  options.worker_id = 1;
  StepResult replay = ClientStep(client.get(), session, 4, GridGradients(model, 999), options);
  ASSERT_TRUE(replay.status.ok()) << replay.status.error_message();
  EXPECT_TRUE(replay.summary->replayed());
  EXPECT_TRUE(Pull(session) == held) << "a replay must not apply again";
}

// A worker's Step stream by hand: its header and every gradient, without
// the StepEnd, so that the test sees what comes back before it.
class HandDrivenWorker {
 public:
  HandDrivenWorker(v1::Optimizer::Stub* stub, const SessionHandle& session, uint64_t step,
                   uint32_t worker, const Tensors& grads) {
    // Before the server answered ahead of the commit, ReadAnswers waited
    // for the StepEnd this stream never sends: this deadline ends it.
    ctx_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    stream_ = stub->Step(&ctx_);
    v1::StepRequest header;
    header.mutable_header()->set_session_id(session.id);
    header.mutable_header()->set_token(session.token);
    header.mutable_header()->set_step(step);
    header.mutable_header()->set_worker_id(worker);
    stream_->Write(header);
    for (const v1::StepRequest& r : GradientMessages(grads, 1000, 0)) stream_->Write(r);
    for (const auto& [index, bytes] : grads) indices_.push_back(index);
  }

  // Reads answers until every parameter's is whole; false when the stream
  // ends first.
  bool ReadAnswers(Weights* out) {
    std::map<uint32_t, uint64_t> received;
    size_t whole = 0;
    v1::StepResponse response;
    while (whole < indices_.size() && stream_->Read(&response)) {
      if (!response.has_update()) return false;
      const v1::UpdateChunk& u = response.update();
      EXPECT_EQ(u.content(), v1::UPDATE_CONTENT_WEIGHTS);
      std::vector<float>& dst = (*out)[u.param_index()];
      dst.resize(u.total_bytes() / sizeof(float));
      std::memcpy(reinterpret_cast<char*>(dst.data()) + u.offset(), u.data().data(),
                  u.data().size());
      received[u.param_index()] += u.data().size();
      if (received[u.param_index()] == u.total_bytes()) ++whole;
    }
    return whole == indices_.size();
  }

  // Sends the StepEnd and reads to the end: the summary, and how many
  // update chunks came with it.
  grpc::Status End(std::optional<v1::StepSummary>* summary, int* more_chunks) {
    stream_->Write(EndMessage(indices_));
    stream_->WritesDone();
    v1::StepResponse response;
    while (stream_->Read(&response)) {
      if (response.has_summary()) *summary = response.summary();
      if (response.has_update()) ++*more_chunks;
    }
    return stream_->Finish();
  }

  grpc::Status Cancel() {
    ctx_.TryCancel();
    return stream_->Finish();
  }

 private:
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::StepRequest, v1::StepResponse>> stream_;
  std::vector<uint32_t> indices_;
};

// One worker: nothing but its own stream can withdraw its gradients, so
// each parameter's new weights come back as soon as they are computed,
// before its StepEnd; the summary still commits them.
TEST_F(ParameterServerTest, OneWorkersNewWeightsComeBackBeforeItsStepEnd) {
  StartServer({"--update_chunk_bytes=1030"});
  const Model model = Fp32Model();
  const SessionHandle session = Create(model, 1);
  Weights expected = InitialWeights(model);
  ASSERT_TRUE(Push(session, expected).ok());
  const Tensors grads = GridGradients(model, 7);
  HandDrivenWorker worker(stub_.get(), session, 1, 0, grads);
  Weights answered;
  ASSERT_TRUE(worker.ReadAnswers(&answered));
  uint64_t step = 99;
  EXPECT_TRUE(Pull(session, &step) == expected) << "applied before the summary";
  EXPECT_EQ(step, 0u);
  std::optional<v1::StepSummary> summary;
  int more_chunks = 0;
  const grpc::Status status = worker.End(&summary, &more_chunks);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_TRUE(summary.has_value());
  EXPECT_EQ(summary->step(), 1u);
  EXPECT_EQ(more_chunks, 0);  // every answer came before
  const Weights initial = expected;
  Reference reference(model);
  ApplyReference(model, reference, grads, expected);
  const Weights pulled = Pull(session, &step);
  EXPECT_EQ(step, 1u);
  EXPECT_TRUE(pulled == answered);
  ExpectSameStep(pulled, initial, expected, initial, "step 1");
}

// A worker whose stream got early answers and then broke before its
// StepEnd: nothing of it is applied, and the other worker's answers and the
// weights are those of its resend.
TEST_F(ParameterServerTest, EarlyAnswersOfABrokenStreamAreSupersededByItsResend) {
  StartServer();
  const Model model = Fp32Model();
  const SessionHandle session = Create(model, 2);
  const Weights initial = InitialWeights(model);
  ASSERT_TRUE(Push(session, initial).ok());
  const std::vector<Tensors> grads = {GridGradients(model, 1), GridGradients(model, 2)};
  StepResult first;
  std::thread worker0([&] {
    auto client = NewClient(*server_);
    muon::StepCallOptions options;
    options.worker_id = 0;
    first = ClientStep(client.get(), session, 1, grads[0], options);
  });
  // Once worker 0 has ended, worker 1's stream alone can withdraw: it gets
  // its answers before its StepEnd, computed with gradients it will not
  // send again.
  Weights superseded;
  {
    HandDrivenWorker broken(stub_.get(), session, 1, 1, GridGradients(model, 99));
    EXPECT_TRUE(broken.ReadAnswers(&superseded));  // not ASSERT: worker 0 is to be joined
    EXPECT_EQ(broken.Cancel().error_code(), grpc::StatusCode::CANCELLED);
  }
  auto client = NewClient(*server_);
  muon::StepCallOptions options;
  options.worker_id = 1;
  StepResult resent = ClientStep(client.get(), session, 1, grads[1], options);
  worker0.join();
  ASSERT_TRUE(resent.status.ok()) << resent.status.error_message();
  ASSERT_TRUE(first.status.ok()) << first.status.error_message();

  Weights expected = initial;
  Reference reference(model);
  ApplyReference(model, reference, Average(model, grads), expected);
  const Weights pulled = Pull(session);
  ExpectSameStep(pulled, initial, expected, initial, "after the resend");
  EXPECT_FALSE(pulled == superseded);
  for (const StepResult* r : {&first, &resent}) {
    for (const auto& [i, bytes] : r->updates) {
      std::vector<float> got(bytes.size() / sizeof(float));
      std::memcpy(got.data(), bytes.data(), bytes.size());
      EXPECT_TRUE(got == pulled.at(i)) << "parameter " << i;
    }
  }
}

// Sum of every sample count of muon_orthogonality_error in a /metrics page.
double OrthogonalitySamples(const std::string& metrics) {
  double total = 0;
  std::istringstream lines(metrics);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("muon_orthogonality_error_count", 0) != 0) continue;
    total += std::stod(line.substr(line.rfind(' ') + 1));
  }
  return total;
}

// Averages of bf16 gradients need more bits than bf16 holds: the engine
// gets the average in fp32. The step is sampled for the orthogonality
// histogram as an update step would be, without the client asking.
TEST_F(ParameterServerTest, TheAverageReachesTheEngineInFp32AndIsSampled) {
  const int metrics_port = FreePort();
  StartServer({"--orthogonality_sample_every=1",
               "--metrics_listen=127.0.0.1:" + std::to_string(metrics_port)});
  Model model = SmallModel();  // its last parameter: 32×64 bf16 Muon
  model.params = {model.params.back()};
  model.specs = {model.specs.back()};
  ASSERT_EQ(model.specs[0].dtype, DType::kBFloat16);
  model.specs[0].hp.weight_decay = kWeightDecay;
  const SessionHandle session = Create(model, 2);
  Weights expected = InitialWeights(model);
  ASSERT_TRUE(Push(session, expected).ok());
  const std::vector<Tensors> grads = {RandomGradients(model, 1), RandomGradients(model, 2)};
  // The test can fail: the bf16 rounding of the average changes it.
  EXPECT_FALSE(Fp32Average(model, {Average(model, grads)}) == Fp32Average(model, grads));

  std::vector<StepResult> results = AllWorkers(session, 1, grads);
  for (const StepResult& r : results) {
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_EQ(r.summary->orthogonality_errors_size(), 0);  // not asked: not in the reply
  }
  Weights before = expected;
  Reference reference(model);
  ApplyReference(model, reference, Fp32Average(model, grads), expected, /*fp32=*/true);
  ExpectSameStep(Pull(session), InitialWeights(model), expected, before, "step 1");
  EXPECT_EQ(OrthogonalitySamples(HttpGet(metrics_port, "/metrics")), 1);
}

// PullWeights cuts its chunks like every reply: whole elements, never over
// the maximum asked for, small maxima included.
TEST_F(ParameterServerTest, PullWeightsHonoursTheRequestedChunkSize) {
  StartServer();
  const Model model = Fp32Model();
  const SessionHandle session = Create(model, 1);
  const Weights pushed = InitialWeights(model);
  ASSERT_TRUE(Push(session, pushed).ok());
  struct Case {
    v1::DType dtype;
    uint32_t max_chunk_bytes;
    uint32_t want_chunk_bytes;
  };
  for (const Case& c : {Case{v1::DTYPE_FLOAT32, 100, 100}, Case{v1::DTYPE_FLOAT32, 1030, 1028},
                        Case{v1::DTYPE_FLOAT32, 6, 4}, Case{v1::DTYPE_BFLOAT16, 7, 6},
                        Case{v1::DTYPE_FLOAT16, 2, 2}}) {
    grpc::ClientContext ctx;
    v1::PullWeightsRequest r;
    r.set_session_id(session.id);
    r.set_token(session.token);
    r.set_dtype(c.dtype);
    r.set_max_chunk_bytes(c.max_chunk_bytes);
    auto reader = stub_->PullWeights(&ctx, r);
    std::map<uint32_t, uint64_t> covered;
    v1::PullWeightsResponse response;
    while (reader->Read(&response)) {
      const v1::TensorChunk& chunk = response.weights();
      const uint64_t size = chunk.data().size();
      EXPECT_LE(size, c.want_chunk_bytes) << c.max_chunk_bytes;
      if (chunk.offset() + size < response.total_bytes()) {
        EXPECT_EQ(size, c.want_chunk_bytes) << c.max_chunk_bytes;
      }
      EXPECT_EQ(chunk.offset(), covered[chunk.param_index()]);
      covered[chunk.param_index()] += size;
    }
    EXPECT_TRUE(reader->Finish().ok()) << c.max_chunk_bytes;
    EXPECT_EQ(covered.size(), model.specs.size());
  }
  // Less than one element cannot be honoured.
  grpc::ClientContext ctx;
  v1::PullWeightsRequest r;
  r.set_session_id(session.id);
  r.set_token(session.token);
  r.set_dtype(v1::DTYPE_FLOAT32);
  r.set_max_chunk_bytes(3);
  auto reader = stub_->PullWeights(&ctx, r);
  v1::PullWeightsResponse response;
  while (reader->Read(&response)) {
  }
  const grpc::Status status = reader->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("max_chunk_bytes is 3"));
}

TEST_F(ParameterServerTest, WorkerThatBreaksMidStepAndResendsGivesTheSameResult) {
  StartServer();
  const Model model = Fp32Model();
  const SessionHandle session = Create(model, 2);
  Weights expected = InitialWeights(model);
  ASSERT_TRUE(Push(session, expected).ok());
  const std::vector<Tensors> grads = {GridGradients(model, 1), GridGradients(model, 2)};

  // Worker 1's first stream breaks after a few chunks; worker 0 waits.
  std::thread worker0 = StepExpectingOk(session, 1, 0, grads[0]);
  StepCall broken;
  broken.header.set_session_id(session.id);
  broken.header.set_token(session.token);
  broken.header.set_step(1);
  broken.header.set_worker_id(1);
  broken.body = GradientMessages(grads[1], 1000, 3);
  broken.cancel_after = 5;
  EXPECT_FALSE(RunStep(stub_.get(), broken).status.ok());

  auto client = NewClient(*server_);
  muon::StepCallOptions options;
  options.worker_id = 1;
  StepResult resent = ClientStep(client.get(), session, 1, grads[1], options);
  worker0.join();
  ASSERT_TRUE(resent.status.ok()) << resent.status.error_message();
  EXPECT_FALSE(resent.summary->replayed());

  const Weights initial = expected;
  Reference reference(model);
  ApplyReference(model, reference, Average(model, grads), expected);
  ExpectSameStep(Pull(session), initial, expected, initial, "after the resend");
}

TEST_F(ParameterServerTest, NonFiniteGradientIsRefusedAndNothingOfItIsAdded) {
  StartServer();
  // An extra fp32 Muon parameter of 6144 elements: the NaN lies past the
  // first block the server checks at a time.
  Model model = Fp32Model();
  model.params.push_back(model.params[0]);
  model.params.back().set_name("big");
  model.params.back().clear_shape();
  model.params.back().add_shape(96);
  model.params.back().add_shape(64);
  model.specs.push_back(model.specs[0]);
  model.specs.back().name = "big";
  model.specs.back().shape = {96, 64};
  const uint32_t big = static_cast<uint32_t>(model.specs.size() - 1);
  const SessionHandle session = Create(model, 2);
  Weights expected = InitialWeights(model);
  ASSERT_TRUE(Push(session, expected).ok());
  const std::vector<Tensors> grads = {GridGradients(model, 31), GridGradients(model, 32)};

  std::thread worker0 = StepExpectingOk(session, 1, 0, grads[0]);
  Tensors bad = grads[1];
  const float nan = std::nanf("");
  std::memcpy(bad.at(big).data() + 5000 * sizeof(float), &nan, sizeof(float));
  auto client = NewClient(*server_);
  muon::StepCallOptions options;
  options.worker_id = 1;
  StepResult refused = ClientStep(client.get(), session, 1, bad, options);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(refused.status.error_message(),
              HasSubstr("'big'): worker 1's gradient contains NaN"));
  StepResult resent = ClientStep(client.get(), session, 1, grads[1], options);
  worker0.join();
  ASSERT_TRUE(resent.status.ok()) << resent.status.error_message();

  const Weights initial = expected;
  Reference reference(model);
  ApplyReference(model, reference, Average(model, grads), expected);
  ExpectSameStep(Pull(session), initial, expected, initial, "after the refused gradient");
}

TEST_F(ParameterServerTest, MissingWorkerFailsTheStepForAllAndChangesNothing) {
  StartServer({"--worker_timeout_seconds=1"});
  const Model model = SmallModel();
  const SessionHandle session = Create(model, 3);
  const Weights initial = InitialWeights(model);
  ASSERT_TRUE(Push(session, initial).ok());
  std::vector<Tensors> two = {GridGradients(model, 1), GridGradients(model, 2)};
  std::vector<StepResult> results = AllWorkers(session, 1, two, /*attempts=*/1);
  for (const StepResult& r : results) {
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::ABORTED) << r.status.error_message();
    EXPECT_THAT(r.status.error_message(), HasSubstr("worker(s) 2"));
    EXPECT_THAT(r.status.error_message(), HasSubstr("nothing was applied"));
  }
  uint64_t step = 99;
  const Weights pulled = Pull(session, &step);
  EXPECT_EQ(step, 0u);
  EXPECT_TRUE(pulled == initial);

  // All three again: the step goes through.
  two.push_back(GridGradients(model, 3));
  for (const StepResult& r : AllWorkers(session, 1, two)) {
    EXPECT_TRUE(r.status.ok()) << r.status.error_message();
  }
}

TEST_F(ParameterServerTest, HeldWeightsSurviveKillNineUnderStrictDurability) {
  char dir_template[] = "/tmp/muon-ps-ckpt-XXXXXX";
  ASSERT_NE(mkdtemp(dir_template), nullptr);
  const std::string dir = dir_template;
  const std::vector<std::string> flags = {"--checkpoint_dir=" + dir, "--durability=strict"};
  StartServer(flags);
  const Model model = Fp32Model();
  const SessionHandle session = Create(model, 2);
  Weights expected = InitialWeights(model);
  ASSERT_TRUE(Push(session, expected).ok());
  const Weights initial = expected;
  Reference reference(model);
  const std::vector<Tensors> step1 = {GridGradients(model, 11), GridGradients(model, 12)};
  for (const StepResult& r : AllWorkers(session, 1, step1)) ASSERT_TRUE(r.status.ok());
  ApplyReference(model, reference, Average(model, step1), expected);
  const Weights acknowledged = Pull(session);
  ExpectSameStep(acknowledged, initial, expected, initial, "step 1");

  server_->Signal(SIGKILL);
  ASSERT_EQ(server_->WaitForExit(10), -SIGKILL);
  StartServer(flags);
  uint64_t step = 0;
  const Weights restored = Pull(session, &step);
  EXPECT_EQ(step, 1u);
  ASSERT_EQ(restored.size(), model.specs.size()) << "the session was not restored";
  EXPECT_TRUE(restored == acknowledged) << "the restored weights differ from the acknowledged";
  // The optimizer state came back too: the next step equals the reference's.
  const std::vector<Tensors> step2 = {GridGradients(model, 21), GridGradients(model, 22)};
  for (const StepResult& r : AllWorkers(session, 2, step2)) ASSERT_TRUE(r.status.ok());
  const Weights expected_before = expected;
  ApplyReference(model, reference, Average(model, step2), expected);
  ExpectSameStep(Pull(session), restored, expected, expected_before, "step 2 after the restart");
  std::error_code ignored;
  std::filesystem::remove_all(dir, ignored);
}

TEST_F(ParameterServerTest, BadParameterServerStepsAreRejected) {
  StartServer();
  const Model model = SmallModel();
  const SessionHandle session = Create(model, 2);
  auto client = NewClient(*server_);
  muon::StepCallOptions options;
  options.worker_id = 2;
  Tensors grads = GridGradients(model, 1);
  StepResult r = ClientStep(client.get(), session, 1, grads, options);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(r.status.error_message(), HasSubstr("worker_id 2 is out of range"));

  options.worker_id = 0;
  Tensors partial = {{0, grads.at(0)}};
  r = ClientStep(client.get(), session, 1, partial, options);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(r.status.error_message(), HasSubstr("carries every parameter"));

  r = ClientStep(client.get(), session, 2, grads, options);
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(r.status.error_message(), HasSubstr("expected step is 1"));
}

}  // namespace
}  // namespace muon::testing
