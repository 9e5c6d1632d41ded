#include "step_harness.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>

#include "muon/kernels/engine.h"
#include "muon/kernels/types.h"

namespace muon::testing {
namespace {

v1::ParameterSpec Param(const std::string& name, std::vector<int64_t> shape, v1::DType dtype,
                        v1::OptimizerKind kind = v1::OPTIMIZER_KIND_UNSPECIFIED) {
  v1::ParameterSpec p;
  p.set_name(name);
  for (int64_t d : shape) p.add_shape(d);
  p.set_dtype(dtype);
  p.set_kind(kind);
  return p;
}

ParamSpec Spec(const std::string& name, std::vector<int64_t> shape, DType dtype,
               OptimizerKind kind) {
  ParamSpec s;
  s.name = name;
  s.shape = std::move(shape);
  s.dtype = dtype;
  s.kind = kind;
  return s;
}

std::optional<DType> DTypeFromWire(v1::DType dtype) {
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

Model SmallModel() {
  Model m;
  m.params = {Param("w1", {64, 32}, v1::DTYPE_FLOAT32), Param("w2", {2, 16, 24}, v1::DTYPE_FLOAT32),
              Param("emb", {40, 8}, v1::DTYPE_FLOAT32, v1::OPTIMIZER_KIND_ADAMW),
              Param("b", {32}, v1::DTYPE_UNSPECIFIED), Param("w3", {32, 64}, v1::DTYPE_BFLOAT16)};
  m.specs = {Spec("w1", {64, 32}, DType::kFloat32, OptimizerKind::kMuon),
             Spec("w2", {2, 16, 24}, DType::kFloat32, OptimizerKind::kMuon),
             Spec("emb", {40, 8}, DType::kFloat32, OptimizerKind::kAdamW),
             Spec("b", {32}, DType::kFloat32, OptimizerKind::kAdamW),
             Spec("w3", {32, 64}, DType::kBFloat16, OptimizerKind::kMuon)};
  return m;
}

Tensors RandomGradients(const Model& model, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Tensors out;
  for (uint32_t i = 0; i < model.specs.size(); ++i) {
    const ParamSpec& s = model.specs[i];
    const int64_t n = NumElements(s.shape);
    std::vector<float> values(n);
    for (float& v : values) v = normal(rng);
    Bytes bytes(n * DTypeSize(s.dtype));
    EncodeFromFloat(s.dtype, values.data(), n, bytes.data());
    out[i] = std::move(bytes);
  }
  return out;
}

v1::CreateSessionRequest CreateRequest(const Model& model, const std::string& name) {
  v1::CreateSessionRequest request;
  request.set_name(name);
  for (const v1::ParameterSpec& p : model.params) *request.add_params() = p;
  return request;
}

Reference::Reference(const Model& model) : specs_(model.specs) {
  // The server's default BLAS thread count: OpenBLAS chooses its kernels
  // (small-matrix paths on AVX-512 machines among them) by thread count, so
  // bit equality needs the same count on both sides.
  EngineOptions options;
  options.blas_threads = 1;
  engine_ = *CreateCpuEngine(options);
  for (const ParamSpec& s : specs_) ids_.push_back(*engine_->Register(s));
}

Reference::~Reference() = default;

StepResult Reference::Step(const Tensors& grads, std::optional<double> lr_scale) {
  return Run(grads, lr_scale, std::nullopt);
}

StepResult Reference::StepFp32(const Tensors& grads) {
  return Run(grads, std::nullopt, DType::kFloat32);
}

StepResult Reference::Run(const Tensors& grads, std::optional<double> lr_scale,
                          std::optional<DType> wire) {
  std::vector<GradientInput> in;
  std::vector<UpdateOutput> out;
  StepResult result;
  for (const auto& [index, bytes] : grads) {
    const ParamSpec& s = specs_[index];
    GradientInput g;
    g.param = ids_[index];
    g.dtype = wire.value_or(s.dtype);
    g.bytes = absl::MakeConstSpan(bytes);
    if (lr_scale.has_value()) g.lr = s.hp.lr * *lr_scale;
    in.push_back(g);
    result.updates[index].resize(bytes.size());
    result.dtype[index] = g.dtype;
  }
  for (const auto& [index, bytes] : grads) {
    UpdateOutput o;
    o.param = ids_[index];
    o.dtype = wire.value_or(specs_[index].dtype);
    o.bytes = absl::MakeSpan(result.updates[index]);
    out.push_back(o);
  }
  result.status = grpc::Status::OK;
  absl::Status s = engine_->Step(in, absl::MakeSpan(out));
  if (!s.ok()) result.status = grpc::Status(grpc::StatusCode::INTERNAL, std::string(s.message()));
  size_t k = 0;
  for (const auto& [index, bytes] : grads) result.decay[index] = out[k++].decay;
  return result;
}

v1::StepRequest ChunkMessage(uint32_t index, uint64_t offset, const Bytes& data) {
  v1::StepRequest r;
  v1::TensorChunk* c = r.mutable_gradient();
  c->set_param_index(index);
  c->set_offset(offset);
  c->set_data(reinterpret_cast<const char*>(data.data()), data.size());
  return r;
}

std::vector<v1::StepRequest> GradientMessages(const Tensors& grads, size_t chunk_bytes,
                                              uint64_t seed) {
  std::vector<v1::StepRequest> out;
  for (const auto& [index, bytes] : grads) {
    for (size_t off = 0; off < bytes.size(); off += chunk_bytes) {
      const size_t n = std::min(chunk_bytes, bytes.size() - off);
      out.push_back(ChunkMessage(index, off, Bytes(bytes.begin() + off, bytes.begin() + off + n)));
    }
  }
  if (seed != 0) std::shuffle(out.begin(), out.end(), std::mt19937_64(seed));
  return out;
}

v1::StepRequest EndMessage(const std::vector<uint32_t>& indices) {
  v1::StepRequest r;
  for (uint32_t i : indices) r.mutable_end()->add_param_indices(i);
  return r;
}

StepResult RunStep(v1::Optimizer::Stub* stub, const StepCall& call) {
  StepResult result;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto stream = stub->Step(&ctx);
  bool ok = true;
  if (call.send_header) {
    v1::StepRequest header;
    *header.mutable_header() = call.header;
    ok = stream->Write(header);
  }
  std::vector<v1::StepRequest> body = call.body;
  const bool has_end = std::any_of(body.begin(), body.end(),
                                   [](const v1::StepRequest& r) { return r.has_end(); });
  if (call.send_end && !has_end) {
    std::vector<uint32_t> indices;
    for (const v1::StepRequest& r : body) {
      if (r.has_gradient() && std::find(indices.begin(), indices.end(),
                                        r.gradient().param_index()) == indices.end()) {
        indices.push_back(r.gradient().param_index());
      }
    }
    body.push_back(EndMessage(indices));
  }
  for (size_t i = 0; ok && i < body.size(); ++i) {
    if (call.cancel_after.has_value() && i == *call.cancel_after) break;
    ok = stream->Write(body[i]);
  }
  if (call.cancel_after.has_value()) {
    // Give the server time to take in what was sent, then break the stream.
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    ctx.TryCancel();
    result.status = stream->Finish();
    return result;
  }
  if (ok) stream->WritesDone();
  v1::StepResponse response;
  while (stream->Read(&response)) {
    if (response.has_update()) {
      const v1::UpdateChunk& u = response.update();
      Bytes& dst = result.updates[u.param_index()];
      dst.resize(u.total_bytes());
      std::memcpy(dst.data() + u.offset(), u.data().data(), u.data().size());
      result.decay[u.param_index()] = u.decay();
      result.dtype[u.param_index()] = *DTypeFromWire(u.dtype());
      ++result.update_messages;
    } else if (response.has_summary()) {
      result.summary = response.summary();
    }
  }
  result.status = stream->Finish();
  return result;
}

StepResult RunStepRetrying(v1::Optimizer::Stub* stub, const StepCall& call) {
  for (int attempt = 0;; ++attempt) {
    StepResult r = RunStep(stub, call);
    if (r.status.error_code() != grpc::StatusCode::ABORTED || attempt == 50) return r;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

StepResult GoodStep(v1::Optimizer::Stub* stub, const std::string& session, const std::string& token,
                    uint64_t step, const Tensors& grads) {
  StepCall call;
  call.header.set_session_id(session);
  call.header.set_token(token);
  call.header.set_step(step);
  call.body = GradientMessages(grads, 1000, step * 7919 + 1);
  return RunStepRetrying(stub, call);
}

}  // namespace muon::testing
