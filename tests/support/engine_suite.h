#ifndef MUON_TESTS_SUPPORT_ENGINE_SUITE_H_
#define MUON_TESTS_SUPPORT_ENGINE_SUITE_H_

// The Engine contract as value-parameterized tests over an engine factory, so
// every engine runs the same suite. The tests live in the CMake OBJECT library
// `muon_engine_suite`; a test target links it and instantiates the suite for
// its engine once:
//
//   #include "engine_suite.h"
//   MUON_INSTANTIATE_ENGINE_SUITE(Cpu, ::muon::testing::CpuEngineUnderTest());
//
// The CPU instantiation is in tests/unit/engine_test.cc. A GPU target gives a
// factory for the CUDA engine, `available` so the tests skip where no device
// is usable, and its own tolerances, e.g. for bf16 Newton–Schulz:
//
//   ::muon::testing::EngineUnderTest Cuda() {
//     ::muon::testing::EngineUnderTest e;
//     e.name = "cuda";
//     e.create = [](const muon::EngineOptions& o) { return muon::CreateCudaEngine(o); };
//     e.available = [] { return muon::CudaAvailable(); };
//     // bf16 products (2^-9 rounding). Measured on an H100 over five runs:
//     // dion and AOL schedules up to 1.09e-2, jordan and polar_express (whose
//     // b·A + c·A² cancels near σ = 1) up to 3.2e-2.
//     e.tolerance.muon = 2e-2;
//     e.tolerance.muon_cancelling = 5e-2;
//     e.tolerance.adamw = 1e-5;
//     e.tolerance.orthogonality = 1e-2;
//     e.supports_svd = false;
//     return e;
//   }
//   MUON_INSTANTIATE_ENGINE_SUITE(Cuda, Cuda());
//
// and links the CMake target `muon_engine_suite`.

#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "gtest/gtest.h"
#include "muon/kernels/engine.h"
#include "muon/kernels/types.h"

namespace muon::testing {

// How closely an engine must agree with the float64 references, as the
// relative Frobenius error ‖got − want‖/‖want‖ of a whole update. The defaults
// are the CPU engine's (fp32 throughout); see the comments for why.
struct EngineTolerance {
  // Muon updates. fp32 Newton–Schulz against float64: each product rounds at
  // 2^-24 ≈ 6e-8 relative, and five steps of three products with polynomial
  // gains of at most ~3 (dion, jordan) or ~8 (polar_express's first step)
  // amplify that to a few 1e-7; 1e-5 leaves a margin of more than 10×.
  // A bf16 engine sets about 1e-2 (bf16 rounds at 2^-9 ≈ 2e-3).
  double muon = 1e-5;
  // Override for jordan and polar_express, whose b·A + c·A² nearly cancels
  // near σ = 1 and amplifies the rounding of A (bf16 engines need ~2.5e-2).
  std::optional<double> muon_cancelling;
  // AdamW updates: element-wise fp32 (m, v) against float64. The quotient
  // m̂/(√v̂+ε) carries a few fp32 roundings (~1e-7 each); 1e-6 is 10× that.
  double adamw = 1e-6;
  // Absolute error of StepOptions::measure_orthogonality's figure against
  // ‖O·Oᵀ − I‖_F/√r recomputed in float64 from the update it came with.
  double orthogonality = 1e-4;
  // Same inputs give bit-identical outputs (replays, restored checkpoints,
  // twins that never saw a rejected input). Otherwise those comparisons use
  // the tolerances above.
  bool deterministic = true;

  double MuonFor(ScheduleKind kind) const;
};

// An engine for the suite.
struct EngineUnderTest {
  std::string name;  // test-name suffix: "cpu", "cuda"
  std::function<absl::StatusOr<std::unique_ptr<Engine>>(const EngineOptions&)> create;
  // False: every test skips (e.g. no CUDA device).
  std::function<bool()> available = [] { return true; };
  // False: the engine rejects the `svd` schedule (a reference-only schedule)
  // with Unimplemented, which the suite then asserts instead of running it.
  bool supports_svd = true;
  EngineTolerance tolerance;
};

void PrintTo(const EngineUnderTest& engine, std::ostream* os);

EngineUnderTest CpuEngineUnderTest();

// Ten Muon steps of one parameter against MuonRef.
struct MuonCase {
  std::string name;
  ParamSpec spec;
  bool lr_schedule = false;  // a different per-step lr (GradientInput::lr) each step
  // The updates' dtype (UpdateOutput::dtype); fp32 when unset.
  std::optional<DType> update_dtype;
};
std::vector<MuonCase> MuonCases();
void PrintTo(const MuonCase& c, std::ostream* os);

// Ten AdamW steps of one parameter against AdamWRef.
struct AdamWCase {
  std::string name;
  ParamSpec spec;
  bool lr_schedule = false;
  // The updates' dtype (UpdateOutput::dtype); fp32 when unset.
  std::optional<DType> update_dtype;
};
std::vector<AdamWCase> AdamWCases();
void PrintTo(const AdamWCase& c, std::ostream* os);

// One kind of bad input to a step: `spoil` turns a valid call into a bad
// one, which must fail with `code` and change nothing.
struct BadCall;
struct BadInputCase {
  std::string name;
  absl::StatusCode code;
  std::function<void(BadCall&)> spoil;
};
std::vector<BadInputCase> BadInputs();
void PrintTo(const BadInputCase& c, std::ostream* os);

// Fixtures (their tests are in engine_suite.cc).
class EngineContractTest : public ::testing::TestWithParam<EngineUnderTest> {};
class EngineMuonReferenceTest
    : public ::testing::TestWithParam<std::tuple<EngineUnderTest, MuonCase>> {};
class EngineAdamWReferenceTest
    : public ::testing::TestWithParam<std::tuple<EngineUnderTest, AdamWCase>> {};
class EngineBadInputTest
    : public ::testing::TestWithParam<std::tuple<EngineUnderTest, BadInputCase>> {};

// Test-name generators.
std::string EngineName(const ::testing::TestParamInfo<EngineUnderTest>& info);
template <typename Case>
std::string EngineCaseName(
    const ::testing::TestParamInfo<std::tuple<EngineUnderTest, Case>>& info) {
  return std::get<0>(info.param).name + "_" + std::get<1>(info.param).name;
}

}  // namespace muon::testing

// Instantiates every suite of this file for one engine, at global namespace
// scope. `prefix` names the instantiation; `engine` is an EngineUnderTest
// expression.
#define MUON_INSTANTIATE_ENGINE_SUITE(prefix, engine)                                          \
  namespace muon::testing {                                                                    \
  INSTANTIATE_TEST_SUITE_P(prefix, EngineContractTest, ::testing::Values(engine),              \
                           ::muon::testing::EngineName);                                       \
  INSTANTIATE_TEST_SUITE_P(                                                                    \
      prefix, EngineMuonReferenceTest,                                                         \
      ::testing::Combine(::testing::Values(engine),                                            \
                         ::testing::ValuesIn(::muon::testing::MuonCases())),                   \
      ::muon::testing::EngineCaseName<::muon::testing::MuonCase>);                             \
  INSTANTIATE_TEST_SUITE_P(                                                                    \
      prefix, EngineAdamWReferenceTest,                                                        \
      ::testing::Combine(::testing::Values(engine),                                            \
                         ::testing::ValuesIn(::muon::testing::AdamWCases())),                  \
      ::muon::testing::EngineCaseName<::muon::testing::AdamWCase>);                            \
  INSTANTIATE_TEST_SUITE_P(                                                                    \
      prefix, EngineBadInputTest,                                                              \
      ::testing::Combine(::testing::Values(engine),                                            \
                         ::testing::ValuesIn(::muon::testing::BadInputs())),                   \
      ::muon::testing::EngineCaseName<::muon::testing::BadInputCase>);                         \
  }  /* namespace muon::testing */                                                             \
  static_assert(true, "")

#endif  // MUON_TESTS_SUPPORT_ENGINE_SUITE_H_
