// The C++ client's side of the Go client test (tests/go/client_test.go): creates a
// session of reference_step's parameters on --server, runs one step with
// fresh random gradients through muon::Client, and writes into --out what
// the Go test repeats and compares: grad_<i>.bin (the gradient sent),
// update_<i>.bin and decay_<i>.txt (the committed update), then deletes the
// session. Exit 1 with the gRPC status on any failure.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "muon/client/client.h"

ABSL_FLAG(std::string, server, "", "host:port of the muon-server");
ABSL_FLAG(std::string, out, "", "folder for grad_<i>.bin, update_<i>.bin, decay_<i>.txt");

namespace {

// The same parameters, in the same order, as ../client_test.go's sessionRequest.
muon::v1::CreateSessionRequest SessionRequest() {
  muon::v1::CreateSessionRequest request;
  request.set_name("go-reference");
  struct Spec {
    const char* name;
    std::vector<int64_t> shape;
    muon::v1::OptimizerKind kind;
  };
  for (const Spec& spec : {Spec{"tall", {96, 40}, muon::v1::OPTIMIZER_KIND_MUON},
                           Spec{"wide", {24, 200}, muon::v1::OPTIMIZER_KIND_MUON},
                           Spec{"bias", {40}, muon::v1::OPTIMIZER_KIND_ADAMW}}) {
    muon::v1::ParameterSpec* p = request.add_params();
    p->set_name(spec.name);
    for (int64_t d : spec.shape) p->add_shape(d);
    p->set_dtype(muon::v1::DTYPE_FLOAT32);
    p->set_kind(spec.kind);
  }
  request.mutable_hyper_params()->set_lr(0.02);
  request.mutable_hyper_params()->set_weight_decay(0.1);
  request.mutable_adamw_hyper_params()->set_lr(3e-4);
  return request;
}

bool Write(const std::string& path, const void* data, size_t size) {
  std::ofstream f(path, std::ios::binary);
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(size));
  return static_cast<bool>(f);
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "reference_step: %s\n", status.ToString().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string out = absl::GetFlag(FLAGS_out);
  if (absl::GetFlag(FLAGS_server).empty() || out.empty()) {
    return Fail(absl::InvalidArgumentError("pass --server=HOST:PORT and --out=DIR"));
  }
  muon::ClientOptions options;
  options.target = absl::GetFlag(FLAGS_server);
  auto client = muon::Client::Create(options);
  if (!client.ok()) return Fail(client.status());
  const muon::v1::CreateSessionRequest request = SessionRequest();
  auto session = (*client)->CreateSession(request);
  if (!session.ok()) return Fail(session.status());

  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.0F, 1.0F);
  std::vector<std::vector<float>> grads;
  std::vector<muon::Gradient> step;
  for (int i = 0; i < request.params_size(); ++i) {
    int64_t n = 1;
    for (int64_t d : request.params(i).shape()) n *= d;
    std::vector<float>& g = grads.emplace_back(static_cast<size_t>(n));
    for (float& v : g) v = normal(rng);
    if (!Write(absl::StrCat(out, "/grad_", i, ".bin"), g.data(), g.size() * sizeof(float))) {
      return Fail(absl::InternalError(absl::StrCat("cannot write into ", out)));
    }
  }
  for (size_t i = 0; i < grads.size(); ++i) {
    muon::Gradient& g = step.emplace_back();
    g.param_index = static_cast<uint32_t>(i);
    g.data = absl::MakeConstSpan(reinterpret_cast<const std::byte*>(grads[i].data()),
                                 grads[i].size() * sizeof(float));
  }
  auto result = (*client)->Step(*session, session->step + 1, step);
  if (!result.ok()) return Fail(result.status());
  for (const muon::ParameterUpdate& u : result->updates) {
    char decay[32];
    const int length = std::snprintf(decay, sizeof(decay), "%.17g", u.decay);
    if (!Write(absl::StrCat(out, "/update_", u.param_index, ".bin"), u.data.data(), u.data.size()) ||
        !Write(absl::StrCat(out, "/decay_", u.param_index, ".txt"), decay,
               static_cast<size_t>(length))) {
      return Fail(absl::InternalError(absl::StrCat("cannot write into ", out)));
    }
  }
  absl::Status deleted = (*client)->DeleteSession(*session);
  if (!deleted.ok()) return Fail(deleted);
  return 0;
}
