#ifndef MUON_TESTS_INTEGRATION_STEP_HARNESS_H_
#define MUON_TESTS_INTEGRATION_STEP_HARNESS_H_

// Test helpers: a small model, random gradients, the in-process CPU engine as
// the reference, and a Step driver on the generated stub that can misbehave
// on purpose (bad chunks, cancel mid-step).

#include <grpcpp/grpcpp.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "muon/kernels/types.h"
#include "muon/v1/optimizer.grpc.pb.h"

// Only step_harness.cc needs the engine's definition.
namespace muon {
class Engine;
}  // namespace muon

namespace muon::testing {

using Bytes = std::vector<std::byte>;
using Tensors = std::map<uint32_t, Bytes>;  // by parameter index

struct Model {
  std::vector<v1::ParameterSpec> params;  // what the client sends
  std::vector<ParamSpec> specs;           // what the engine should see
};

// Five parameters: 64×32 Muon, 2×16×24 Muon (3-D), 40×8 AdamW (explicit),
// 32 AdamW (by default), 32×64 bf16 Muon.
Model SmallModel();

// Random normal gradients for every parameter, in each one's dtype.
Tensors RandomGradients(const Model& model, uint64_t seed);

v1::CreateSessionRequest CreateRequest(const Model& model, const std::string& name = "test");

// What a step returned.
struct StepResult {
  grpc::Status status;
  Tensors updates;
  std::map<uint32_t, DType> dtype;  // of each update
  std::map<uint32_t, double> decay;
  std::optional<v1::StepSummary> summary;
  int update_messages = 0;
};

// The CPU engine in this process, fed the same specs: the expected output.
class Reference {
 public:
  explicit Reference(const Model& model);
  ~Reference();
  // One committed step over `grads` (a subset of the parameters).
  StepResult Step(const Tensors& grads, std::optional<double> lr_scale = std::nullopt);
  // One step with fp32 gradients and fp32 updates, whatever the parameters'
  // dtypes (a parameter server's average, applied to weights it holds).
  StepResult StepFp32(const Tensors& grads);

 private:
  // `wire`: the dtype of gradients and updates; unset: each parameter's.
  StepResult Run(const Tensors& grads, std::optional<double> lr_scale, std::optional<DType> wire);

  std::unique_ptr<Engine> engine_;
  std::vector<ParamSpec> specs_;
  std::vector<uint64_t> ids_;  // muon::ParamId
};

// The gradient chunks of `grads`, `chunk_bytes` each, shuffled by `seed`
// (seed 0: in order).
std::vector<v1::StepRequest> GradientMessages(const Tensors& grads, size_t chunk_bytes,
                                              uint64_t seed);
v1::StepRequest EndMessage(const std::vector<uint32_t>& indices);
v1::StepRequest ChunkMessage(uint32_t index, uint64_t offset, const Bytes& data);

struct StepCall {
  v1::StepHeader header;
  std::vector<v1::StepRequest> body;
  // Cancel the call after writing this many body messages (no half-close).
  std::optional<size_t> cancel_after;
  // Send `header` as the first message (false: start with body[0]).
  bool send_header = true;
  // Unless `body` has a StepEnd, end it with one listing the parameters its
  // chunks name, as every client does (false: half-close without it).
  bool send_end = true;
};

StepResult RunStep(v1::Optimizer::Stub* stub, const StepCall& call);

// RunStep, retried while the server answers ABORTED (the previous stream of
// the session not yet torn down), as a client library would.
StepResult RunStepRetrying(v1::Optimizer::Stub* stub, const StepCall& call);

// A whole good step: all of `grads`, 1000-byte chunks shuffled, StepEnd.
StepResult GoodStep(v1::Optimizer::Stub* stub, const std::string& session, const std::string& token,
                    uint64_t step, const Tensors& grads);

}  // namespace muon::testing

#endif  // MUON_TESTS_INTEGRATION_STEP_HARNESS_H_
