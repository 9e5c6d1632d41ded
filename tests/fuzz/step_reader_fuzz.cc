// libFuzzer target over the Step read path (StepReader on StepAssembler, and
// StepMachine over them, the code the Step reactor runs) and the
// CreateSession validator (SpecsFromRequest).
//
// Input: one mode byte, then records of a 2-byte little-endian length and
// that many bytes.
// - mode even: a Step stream on a fixed session of four parameters of every
//   dtype. Each record is a serialized StepRequest (records that do not parse
//   are dropped, as gRPC drops them before the reactor); the input's end is
//   the client's half-close, which must be refused unless StepEnd came first.
//   Mode bit 1 answers the header as a retry of a committed step (replay)
//   instead of a new step. Mode bit 2 drives StepMachine with a fake backend
//   instead of StepReader alone.
// - mode odd: the first record is a serialized CreateSessionRequest.
// Every event is checked against a shadow copy of the accepted bytes.

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "wire/convert.h"
#include "google/protobuf/stubs/logging.h"
#include "muon/kernels/types.h"
#include "muon/v1/optimizer.pb.h"
#include "step/step_machine.h"
#include "step/step_reader.h"

namespace muon::server {
namespace {

#define FUZZ_CHECK(cond)                                                                \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                     \
    }                                                                                   \
  } while (0)

const std::vector<StepReader::Param>& SessionParams() {
  static const auto* params = new std::vector<StepReader::Param>{
      {"w", 4 * 3 * 4, DType::kFloat32},      // 4×3 fp32
      {"h", 5 * 2, DType::kBFloat16},         // 5 bf16
      {"f", 2 * 2 * 3 * 2, DType::kFloat16},  // 2×2×3 fp16
      {"one", 4, DType::kFloat32},            // a scalar
  };
  return *params;
}

// Splits the records after the mode byte.
std::vector<std::string> Records(const uint8_t* data, size_t size) {
  std::vector<std::string> out;
  size_t pos = 1;
  while (pos + 2 <= size) {
    const size_t len = data[pos] | (size_t{data[pos + 1]} << 8);
    pos += 2;
    const size_t take = len < size - pos ? len : size - pos;
    out.emplace_back(reinterpret_cast<const char*>(data + pos), take);
    pos += take;
  }
  return out;
}

void CheckError(const absl::Status& status) {
  FUZZ_CHECK(!status.ok());
  FUZZ_CHECK(status.code() == absl::StatusCode::kInvalidArgument ||
             status.code() == absl::StatusCode::kNotFound);
  FUZZ_CHECK(!status.message().empty());
}

// What the reader must have done, tracked independently of it.
class Shadow {
 public:
  explicit Shadow(const std::vector<StepReader::Param>& params) : params_(params) {
    for (const StepReader::Param& p : params) {
      bytes_.emplace_back(p.bytes);
      have_.emplace_back(p.bytes, false);
    }
    started_.assign(params.size(), false);
    complete_.assign(params.size(), false);
  }

  // A chunk the reader accepted: it must lie inside its tensor, be aligned
  // and cover only bytes not received before.
  void Accept(const v1::TensorChunk& chunk) {
    const uint32_t i = chunk.param_index();
    FUZZ_CHECK(i < params_.size());
    FUZZ_CHECK(!complete_[i]);
    const uint64_t size = chunk.data().size();
    const uint64_t total = static_cast<uint64_t>(params_[i].bytes);
    const uint64_t element = DTypeSize(params_[i].dtype);
    FUZZ_CHECK(size > 0);
    FUZZ_CHECK(chunk.offset() < total && size <= total - chunk.offset());
    FUZZ_CHECK(chunk.offset() % element == 0 && size % element == 0);
    for (uint64_t k = 0; k < size; ++k) {
      FUZZ_CHECK(!have_[i][chunk.offset() + k]);
      have_[i][chunk.offset() + k] = true;
      bytes_[i][chunk.offset() + k] = static_cast<std::byte>(chunk.data()[k]);
    }
    started_[i] = true;
    received_ += static_cast<int64_t>(size);
  }

  // The reader says parameter i is whole and hands over its bytes.
  void Complete(uint32_t i, std::unique_ptr<std::byte[]> data) {
    FUZZ_CHECK(i < params_.size());
    FUZZ_CHECK(!complete_[i]);
    for (bool b : have_[i]) FUZZ_CHECK(b);
    FUZZ_CHECK(data != nullptr);
    FUZZ_CHECK(std::memcmp(data.get(), bytes_[i].data(), bytes_[i].size()) == 0);
    complete_[i] = true;
  }

  // The reader ended the step with these parameters.
  void End(const std::vector<uint32_t>& indices) {
    for (size_t k = 0; k < indices.size(); ++k) {
      FUZZ_CHECK(indices[k] < params_.size());
      if (k > 0) FUZZ_CHECK(indices[k - 1] < indices[k]);
      FUZZ_CHECK(complete_[indices[k]]);
    }
    for (uint32_t i = 0; i < params_.size(); ++i) {
      if (!started_[i]) continue;
      bool listed = false;
      for (uint32_t j : indices) listed = listed || j == i;
      FUZZ_CHECK(listed);
    }
  }

  int64_t received() const { return received_; }
  int64_t total() const {
    int64_t sum = 0;
    for (const StepReader::Param& p : params_) sum += p.bytes;
    return sum;
  }

 private:
  const std::vector<StepReader::Param>& params_;
  std::vector<std::vector<std::byte>> bytes_;
  std::vector<std::vector<bool>> have_;
  std::vector<bool> started_;
  std::vector<bool> complete_;
  int64_t received_ = 0;
};

void FuzzStep(uint8_t mode, const std::vector<std::string>& records) {
  const bool replay = (mode & 2) != 0;
  const std::vector<StepReader::Param>& params = SessionParams();
  StepReader reader;
  Shadow shadow(params);
  bool receiving = false;
  // Returns false when the stream is over (an error, the end, a replay).
  auto handle = [&](const absl::StatusOr<StepReader::Event>& event,
                    const v1::StepRequest* request) {
    if (!event.ok()) {
      CheckError(event.status());
      return false;
    }
    using Kind = StepReader::Event::Kind;
    switch (event->kind) {
      case Kind::kHeader:
        FUZZ_CHECK(request != nullptr && request->has_header());
        FUZZ_CHECK(event->header == &request->header());
        if (replay) {
          reader.Replay();
        } else {
          reader.Receive("fuzz", params);
          receiving = true;
        }
        FUZZ_CHECK(!reader.expects_header());
        return true;
      case Kind::kNone:
        if (receiving && request != nullptr && request->has_gradient()) {
          shadow.Accept(request->gradient());
        }
        break;
      case Kind::kComplete:
        FUZZ_CHECK(receiving && request != nullptr && request->has_gradient());
        FUZZ_CHECK(event->index == request->gradient().param_index());
        shadow.Accept(request->gradient());
        shadow.Complete(event->index, reader.Take(event->index));
        break;
      case Kind::kEnd:
        FUZZ_CHECK(receiving);
        shadow.End(event->indices);
        return false;
      case Kind::kReplay:
        FUZZ_CHECK(replay);
        return false;
    }
    FUZZ_CHECK(reader.bytes_received() == shadow.received());
    FUZZ_CHECK(reader.bytes_received() <= shadow.total());
    return true;
  };
  for (const std::string& record : records) {
    v1::StepRequest request;
    if (!request.ParseFromString(record)) continue;
    if (!handle(reader.Read(request), &request)) return;
  }
  // Still reading: the step never ended, so the half-close must refuse it.
  const absl::StatusOr<StepReader::Event> half_close = reader.HalfClose();
  FUZZ_CHECK(!half_close.ok());
  CheckError(half_close.status());
}

// A backend that accepts everything the machine hands it and checks what it
// is handed.
class FuzzBackend final : public StepBackend {
 public:
  FuzzBackend(bool replay, const std::vector<StepReader::Param>& params, bool* ended)
      : replay_(replay), params_(params), ended_(ended), given_(params.size(), false) {}
  absl::StatusOr<Admission> Admit(const v1::StepHeader&) override {
    Admission a;
    a.role = replay_ ? Role::kReplay : Role::kReceive;
    a.session_id = "fuzz";
    if (!replay_) a.params = params_;
    return a;
  }
  void Gradient(uint32_t index, std::unique_ptr<std::byte[]> bytes) override {
    FUZZ_CHECK(!replay_ && !*ended_);
    FUZZ_CHECK(index < params_.size() && !given_[index] && bytes != nullptr);
    given_[index] = true;
  }
  absl::Status End(std::vector<uint32_t> indices, int64_t bytes_received,
                   std::optional<double>) override {
    FUZZ_CHECK(!replay_ && !*ended_);
    for (size_t k = 0; k < indices.size(); ++k) {
      FUZZ_CHECK(indices[k] < params_.size() && given_[indices[k]]);
      if (k > 0) FUZZ_CHECK(indices[k - 1] < indices[k]);
    }
    FUZZ_CHECK(bytes_received >= 0);
    *ended_ = true;
    return absl::OkStatus();
  }
  void Replay() override {
    FUZZ_CHECK(replay_ && !*ended_);
    *ended_ = true;
  }
  bool Abort() override {
    FUZZ_CHECK(!*ended_);  // a step the fuzzer never commits is never aborted after its end
    return true;
  }
  void Sent(double) override {}

 private:
  const bool replay_;
  const std::vector<StepReader::Param>& params_;
  bool* const ended_;
  std::vector<bool> given_;
};

void FuzzMachine(uint8_t mode, const std::vector<std::string>& records) {
  const bool replay = (mode & 2) != 0;
  bool ended = false;
  StepMachine machine([&](const v1::StepHeader&) -> absl::StatusOr<std::unique_ptr<StepBackend>> {
    return std::make_unique<FuzzBackend>(replay, SessionParams(), &ended);
  });
  bool finished = false;
  bool reading = machine.Start().read;
  auto after = [&](const StepMachine::Actions& a) {
    FUZZ_CHECK(!finished || (!a.read && a.write == nullptr && !a.finish.has_value()));
    FUZZ_CHECK(a.write == nullptr);  // the fake backend sends nothing
    if (a.finish.has_value()) {
      finished = true;
      FUZZ_CHECK(!a.finish->ok());  // nothing is committed here
      FUZZ_CHECK(!a.finish->message().empty());
    }
    reading = a.read;
  };
  for (const std::string& record : records) {
    if (!reading) break;
    v1::StepRequest request;
    if (!request.ParseFromString(record)) continue;
    after(machine.ReadDone(request));
  }
  if (reading) {
    FUZZ_CHECK(!ended);
    after(machine.ReadsEnded());
    FUZZ_CHECK(finished);  // a half-close before StepEnd ends the stream
    CheckError(machine.status());
  } else if (ended) {
    FUZZ_CHECK(!finished && machine.phase() == StepMachine::Phase::kEnded);
    after(machine.Failed(absl::InvalidArgumentError("fuzz: the backend refuses the step")));
    FUZZ_CHECK(finished);
  } else {
    FUZZ_CHECK(finished);
    CheckError(machine.status());
  }
  FUZZ_CHECK(machine.phase() == StepMachine::Phase::kDone);
}

void FuzzCreateSession(const std::vector<std::string>& records) {
  if (records.empty()) return;
  v1::CreateSessionRequest request;
  if (!request.ParseFromString(records[0])) return;
  absl::StatusOr<std::vector<ParamSpec>> specs = SpecsFromRequest(request);
  if (!specs.ok()) {
    FUZZ_CHECK(specs.status().code() == absl::StatusCode::kInvalidArgument);
    FUZZ_CHECK(!specs.status().message().empty());
    return;
  }
  FUZZ_CHECK(static_cast<int>(specs->size()) == request.params_size());
  FUZZ_CHECK(!specs->empty());
  absl::flat_hash_set<std::string> names;
  for (const ParamSpec& spec : *specs) {
    FUZZ_CHECK(!spec.name.empty());
    FUZZ_CHECK(names.insert(spec.name).second);
    FUZZ_CHECK(ValidateSpec(spec).ok());
    // Sizes the server then allocates by stay far from overflow.
    FUZZ_CHECK(NumElements(spec.shape) > 0 && NumElements(spec.shape) <= (int64_t{1} << 40));
  }
}

}  // namespace
}  // namespace muon::server

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Invalid UTF-8 in string fields is logged on every such parse: noise here.
  google::protobuf::SetLogHandler(nullptr);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::vector<std::string> records = muon::server::Records(data, size);
  if (data[0] & 1) {
    muon::server::FuzzCreateSession(records);
  } else if (data[0] & 4) {
    muon::server::FuzzMachine(data[0], records);
  } else {
    muon::server::FuzzStep(data[0], records);
  }
  return 0;
}
