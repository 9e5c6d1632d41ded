#include "client_driver.h"

#include <string>
#include <vector>

namespace muon::testing {
namespace {

DType ToDType(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_BFLOAT16:
      return DType::kBFloat16;
    case v1::DTYPE_FLOAT16:
      return DType::kFloat16;
    default:
      return DType::kFloat32;
  }
}

}  // namespace

std::unique_ptr<Client> NewClient(const ServerProcess& server, size_t chunk_bytes,
                                  int max_step_attempts) {
  ClientOptions options;
  options.target = server.address();
  options.chunk_bytes = chunk_bytes;
  // 20 by default: rides out ABORTED while a broken stream is torn down.
  options.max_step_attempts = max_step_attempts;
  absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(options);
  return client.ok() ? std::move(*client) : nullptr;
}

StepResult ClientStep(Client* client, const SessionHandle& session, uint64_t step,
                      const Tensors& grads, const muon::StepCallOptions& options) {
  std::vector<Gradient> gradients;
  for (const auto& [index, bytes] : grads) {
    Gradient g;
    g.param_index = index;
    g.data = bytes;
    gradients.push_back(g);
  }
  StepResult result;
  absl::StatusOr<muon::StepResult> r = client->Step(session, step, gradients, options);
  if (!r.ok()) {
    result.status = grpc::Status(static_cast<grpc::StatusCode>(r.status().code()),
                                 std::string(r.status().message()));
    return result;
  }
  result.status = grpc::Status::OK;
  for (const ParameterUpdate& u : r->updates) {
    result.updates[u.param_index] = u.data;
    result.dtype[u.param_index] = ToDType(u.dtype);
    result.decay[u.param_index] = u.decay;
  }
  result.summary = r->summary;
  return result;
}

}  // namespace muon::testing
