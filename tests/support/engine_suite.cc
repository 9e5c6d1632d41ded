// The Engine contract (engine.h), for any engine: ten Muon and AdamW steps
// against float64 references, bad inputs, transactions, omitted parameters,
// checkpoints, the memory budget. Inputs are fresh random draws each run;
// a failing test prints its seed (replay with MUON_TEST_SEED=<seed>).
#include "engine_suite.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>

#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "muon/kernels/ns_schedule.h"
#include "reference.h"
#include "status_matchers.h"

namespace muon::testing {

using ::testing::HasSubstr;

double EngineTolerance::MuonFor(ScheduleKind kind) const {
  if (muon_cancelling.has_value() &&
      (kind == ScheduleKind::kJordan || kind == ScheduleKind::kPolarExpress)) {
    return *muon_cancelling;
  }
  return muon;
}

void PrintTo(const EngineUnderTest& engine, std::ostream* os) { *os << engine.name; }
void PrintTo(const MuonCase& c, std::ostream* os) { *os << c.name; }
void PrintTo(const AdamWCase& c, std::ostream* os) { *os << c.name; }
void PrintTo(const BadInputCase& c, std::ostream* os) { *os << c.name; }

std::string EngineName(const ::testing::TestParamInfo<EngineUnderTest>& info) {
  return info.param.name;
}

EngineUnderTest CpuEngineUnderTest() {
  EngineUnderTest e;
  e.name = "cpu";
  e.create = [](const EngineOptions& options) { return CreateCpuEngine(options); };
  return e;
}

namespace {

ParamSpec MuonSpec(std::string name, std::vector<int64_t> shape, DType dtype = DType::kFloat32) {
  ParamSpec spec;
  spec.name = std::move(name);
  spec.shape = std::move(shape);
  spec.dtype = dtype;
  spec.kind = OptimizerKind::kMuon;
  spec.hp.weight_decay = 0.01;
  return spec;
}

ParamSpec AdamWSpec(std::string name, std::vector<int64_t> shape, DType dtype = DType::kFloat32) {
  ParamSpec spec;
  spec.name = std::move(name);
  spec.shape = std::move(shape);
  spec.dtype = dtype;
  spec.kind = OptimizerKind::kAdamW;
  spec.hp.lr = 1e-3;
  spec.hp.weight_decay = 0.05;
  spec.hp.beta1 = 0.85;
  spec.hp.beta2 = 0.99;
  spec.hp.eps = 1e-6;
  return spec;
}

double StepLr(int step) { return 0.01 * (1.0 - step / 20.0); }

}  // namespace

std::vector<MuonCase> MuonCases() {
  std::vector<MuonCase> cases;
  const auto add = [&](std::string name, ParamSpec spec, bool lr_schedule = false,
                       std::optional<DType> update_dtype = std::nullopt) {
    spec.name = name;
    cases.push_back({std::move(name), std::move(spec), lr_schedule, update_dtype});
  };
  // Momentum form × Nesterov × shape scale.
  ParamSpec s = MuonSpec("", {48, 32});
  add("ema_nesterov_spectral_tall", s);
  s = MuonSpec("", {32, 48});
  s.hp.nesterov = false;
  add("ema_plain_spectral_wide", s);
  s = MuonSpec("", {32, 48});
  s.hp.momentum_form = MomentumForm::kSum;
  s.hp.shape_scale = ShapeScale::kRmsMatch;
  s.hp.weight_decay = 0.1;
  add("sum_nesterov_rms_match", s);
  s = MuonSpec("", {40, 40});
  s.hp.momentum_form = MomentumForm::kSum;
  s.hp.nesterov = false;
  s.hp.shape_scale = ShapeScale::kNone;
  s.hp.momentum = 0.9;
  add("sum_plain_none_square", s);
  // Schedules.
  for (auto [kind, steps, shape] :
       {std::tuple{ScheduleKind::kPolarExpress, 5, std::vector<int64_t>{40, 24}},
        std::tuple{ScheduleKind::kDion, 5, std::vector<int64_t>{64, 16}},
        std::tuple{ScheduleKind::kAol, 4, std::vector<int64_t>{24, 40}},
        std::tuple{ScheduleKind::kAolDion, 4, std::vector<int64_t>{40, 24}},
        std::tuple{ScheduleKind::kJordan, 3, std::vector<int64_t>{24, 40}},
        // SVD ignores the step count, which must still be in range.
        std::tuple{ScheduleKind::kSvd, 1, std::vector<int64_t>{20, 30}}}) {
    s = MuonSpec("", shape);
    s.hp.ns_schedule = kind;
    s.hp.ns_steps = steps;
    add(std::string(ScheduleName(kind)) + "_" + std::to_string(steps) + "_steps", s);
  }
  // Custom schedules (one triple repeated, one per step) and eps.
  s = MuonSpec("", {24, 40});
  s.hp.ns_coefficients = {{3.0, -3.2, 1.2}};
  s.hp.ns_steps = 6;
  add("custom_one_triple_6_steps", s);
  s = MuonSpec("", {40, 24});
  s.hp.ns_coefficients = {{4.0848, -6.8946, 2.9270}, {3.9505, -6.3029, 2.6377},
                          {3.4445, -4.7750, 2.0315}};
  s.hp.ns_steps = 3;
  s.hp.ns_eps = 1e-2;
  add("custom_3_steps_eps", s);
  // Shapes of more than two dims, a row vector matrix.
  add("experts_3d", MuonSpec("", {3, 16, 24}));
  add("conv_4d", MuonSpec("", {8, 2, 3, 3}));
  add("row_1xn", MuonSpec("", {1, 50}));
  // Wire dtypes (the reference sees the decoded gradient).
  add("bf16_gradients", MuonSpec("", {32, 32}, DType::kBFloat16));
  add("fp16_gradients", MuonSpec("", {16, 4, 8}, DType::kFloat16));
  // Per-step lr and held weights.
  s = MuonSpec("", {32, 24});
  s.hp.weight_decay = 0.1;
  add("lr_per_step", s, /*lr_schedule=*/true);
  s = MuonSpec("", {24, 16});
  s.hold_weights = true;
  s.hp.weight_decay = 0.1;
  add("held_weights", s, /*lr_schedule=*/true);
  s = MuonSpec("", {2, 12, 8}, DType::kBFloat16);
  s.hold_weights = true;
  add("held_weights_3d_bf16", s);
  // Updates written as bf16 and fp16 (the engine still holds fp32 weights).
  s = MuonSpec("", {24, 40}, DType::kBFloat16);
  s.hold_weights = true;
  add("bf16_updates_held_weights", s, /*lr_schedule=*/true, DType::kBFloat16);
  add("fp16_updates", MuonSpec("", {2, 16, 24}, DType::kFloat16), false, DType::kFloat16);
  return cases;
}

std::vector<AdamWCase> AdamWCases() {
  std::vector<AdamWCase> cases;
  const auto add = [&](std::string name, ParamSpec spec, bool lr_schedule = false,
                       std::optional<DType> update_dtype = std::nullopt) {
    spec.name = name;
    cases.push_back({std::move(name), std::move(spec), lr_schedule, update_dtype});
  };
  add("bias_fp32", AdamWSpec("", {100}));
  add("bias_bf16", AdamWSpec("", {100}, DType::kBFloat16));
  add("norm_fp16", AdamWSpec("", {64}, DType::kFloat16));
  ParamSpec s = AdamWSpec("", {50, 8});
  s.hp = HyperParams{};  // torch.optim.AdamW defaults, no weight decay
  add("embedding_defaults", s);
  s = AdamWSpec("", {40});
  s.hold_weights = true;
  add("held_weights", s, /*lr_schedule=*/true);
  s = AdamWSpec("", {30});
  add("lr_per_step", s, /*lr_schedule=*/true);
  // 1 − β2 = 1e-4 must not be computed as 1.0f − float(0.9999) (1.7e-4 off).
  s = AdamWSpec("", {30});
  s.hp.beta2 = 0.9999;
  add("long_beta2", s);
  add("bf16_updates", AdamWSpec("", {64}, DType::kBFloat16), /*lr_schedule=*/true,
      DType::kBFloat16);
  s = AdamWSpec("", {48});
  s.hold_weights = true;
  add("fp16_updates_held_weights", s, false, DType::kFloat16);
  return cases;
}

// ---------------------------------------------------------------------------
// Harness.

namespace {

// One parameter's wire buffers for a step.
struct Wire {
  std::vector<std::byte> grad;
  std::vector<std::byte> update;
};

std::vector<std::byte> Encode(DType dtype, const std::vector<float>& values) {
  std::vector<std::byte> bytes(values.size() * DTypeSize(dtype));
  EncodeFromFloat(dtype, values.data(), values.size(), bytes.data());
  return bytes;
}

std::vector<float> Decode(DType dtype, const std::vector<std::byte>& bytes) {
  std::vector<float> values(bytes.size() / DTypeSize(dtype));
  DecodeToFloat(dtype, bytes.data(), values.size(), values.data());
  return values;
}

double RelativeDifference(const std::vector<float>& got, const std::vector<float>& want) {
  return RelativeError(got, std::vector<double>(want.begin(), want.end()));
}

// The result of one step.
struct StepResult {
  absl::Status status;
  std::vector<std::vector<float>> updates;  // decoded from each output's dtype
  std::vector<double> decays;
  std::vector<double> orthogonality;
};

// One engine with the parameters of a test, plus its random source.
class Harness {
 public:
  Harness(const EngineUnderTest& e, uint64_t seed) : under_(e), rng_(seed) {}

  absl::Status Start(const EngineOptions& options = {}) {
    absl::StatusOr<std::unique_ptr<Engine>> engine = under_.create(options);
    if (!engine.ok()) return engine.status();
    engine_ = std::move(*engine);
    return absl::OkStatus();
  }

  Engine& engine() { return *engine_; }
  std::mt19937_64& rng() { return rng_; }

  ParamId Register(const ParamSpec& spec) {
    absl::StatusOr<ParamId> id = engine_->Register(spec);
    EXPECT_THAT(id, IsOk()) << spec.name;
    return id.ok() ? *id : 0;
  }

  std::vector<float> Gradient(const ParamSpec& spec, double scale = 1.0) {
    return RandomNormal(NumElements(spec.shape), rng_, scale);
  }

  // A step over (id, spec, gradient) triples, each gradient encoded in its
  // spec's dtype and each update written as `out_dtype` (the spec's when
  // unset).
  StepResult Step(const std::vector<ParamId>& ids, const std::vector<ParamSpec>& specs,
                  const std::vector<std::vector<float>>& grads,
                  std::optional<double> lr = std::nullopt,
                  std::optional<DType> out_dtype = std::nullopt, const StepOptions& options = {}) {
    std::vector<Wire> wire(ids.size());
    std::vector<GradientInput> in;
    std::vector<UpdateOutput> out;
    for (size_t i = 0; i < ids.size(); ++i) {
      const DType od = out_dtype.value_or(specs[i].dtype);
      wire[i].grad = Encode(specs[i].dtype, grads[i]);
      wire[i].update.assign(grads[i].size() * DTypeSize(od), std::byte{0x7f});
      in.push_back({ids[i], specs[i].dtype, wire[i].grad, lr});
      out.push_back({ids[i], od, absl::MakeSpan(wire[i].update)});
    }
    StepResult r;
    r.status = engine_->Step(in, absl::MakeSpan(out), options);
    for (size_t i = 0; i < ids.size(); ++i) {
      r.updates.push_back(Decode(out[i].dtype, wire[i].update));
      r.decays.push_back(out[i].decay);
      r.orthogonality.push_back(out[i].orthogonality_error);
    }
    return r;
  }

  ParamState State(ParamId id) {
    absl::StatusOr<ParamState> s = engine_->ExportState(id);
    EXPECT_THAT(s, IsOk());
    return s.ok() ? *s : ParamState{};
  }

 private:
  EngineUnderTest under_;
  std::mt19937_64 rng_;
  std::unique_ptr<Engine> engine_;
};

// Asserts that two engines' outputs agree: bit for bit on a deterministic
// engine, to its tolerance otherwise.
void ExpectSameUpdates(const EngineTolerance& tol, double relative,
                       const std::vector<std::vector<float>>& got,
                       const std::vector<std::vector<float>>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    if (tol.deterministic) {
      EXPECT_EQ(got[i], want[i]) << "update " << i;
    } else {
      EXPECT_LT(RelativeDifference(got[i], want[i]), relative) << "update " << i;
    }
  }
}

void ExpectSameState(const EngineTolerance& tol, const ParamState& got, const ParamState& want) {
  EXPECT_EQ(got.step, want.step);
  const auto same = [&](const std::vector<float>& a, const std::vector<float>& b,
                        const char* what) {
    ASSERT_EQ(a.size(), b.size()) << what;
    if (tol.deterministic || a.empty()) {
      EXPECT_EQ(a, b) << what;
    } else {
      EXPECT_LT(RelativeDifference(a, b), 1e-6) << what;  // state is fp32 on every engine
    }
  };
  same(got.momentum, want.momentum, "momentum");
  same(got.exp_avg, want.exp_avg, "exp_avg");
  same(got.exp_avg_sq, want.exp_avg_sq, "exp_avg_sq");
  same(got.weights, want.weights, "weights");
}

// Asserts that an update written as `dtype` is the float64 reference `want`
// to `tolerance` (relative Frobenius error). A narrow update is also rounded
// once: each element may then be off by half an ulp of the narrow type, at
// most 2^-8·|x| for bf16 (8 significant bits) and 2^-11·|x| for fp16 plus
// 2^-25 absolute below fp16's normal range, on top of the engine's own error,
// which no element can exceed beyond tolerance·‖want‖.
void ExpectUpdateMatches(DType dtype, const std::vector<float>& got,
                         const std::vector<double>& want, double tolerance) {
  if (dtype == DType::kFloat32) {
    EXPECT_LT(RelativeError(got, want), tolerance);
    return;
  }
  ASSERT_EQ(got.size(), want.size());
  double norm = 0;
  for (double w : want) norm += w * w;
  const double engine_error = tolerance * std::sqrt(norm);
  const double half_ulp = dtype == DType::kBFloat16 ? 1.0 / 256 : 1.0 / 2048;
  const double subnormal = dtype == DType::kFloat16 ? std::ldexp(1.0, -25) : 0.0;
  for (size_t k = 0; k < got.size(); ++k) {
    ASSERT_LE(std::fabs(got[k] - want[k]), std::fabs(want[k]) * half_ulp + subnormal + engine_error)
        << "element " << k << " of " << DTypeName(dtype) << " update";
  }
}

// Per-test seed, in every failure message of the test (a SCOPED_TRACE).
// What a Compute call's UpdateReadyFn was told, in the order it was told,
// from whichever threads.
class ReadyLog {
 public:
  struct Entry {
    size_t index = 0;
    std::vector<std::byte> bytes;  // the output's bytes when reported
    double decay = 0;
    double orthogonality = 0;
  };
  void Add(size_t index, const UpdateOutput& out) {
    absl::MutexLock lock(&mu_);
    entries_.push_back({index, {out.bytes.begin(), out.bytes.end()}, out.decay,
                        out.orthogonality_error});
  }
  std::vector<Entry> Take() {
    absl::MutexLock lock(&mu_);
    return std::exchange(entries_, {});
  }

 private:
  absl::Mutex mu_;
  std::vector<Entry> entries_ ABSL_GUARDED_BY(mu_);
};

struct Seeded {
  uint64_t seed = FreshSeed();
  ::testing::ScopedTrace trace{__FILE__, __LINE__,
                               "seed: MUON_TEST_SEED=" + std::to_string(seed) +
                                   " replays this test's inputs"};
};

#define MUON_START_OR_SKIP(harness, under)                                         \
  do {                                                                              \
    if (!(under).available()) GTEST_SKIP() << (under).name << " engine not usable"; \
    ASSERT_THAT((harness).Start(), IsOk());                                         \
  } while (0)

}  // namespace

// ---------------------------------------------------------------------------
// Ten steps against the float64 references.

TEST_P(EngineMuonReferenceTest, TenStepsMatchFloat64Reference) {
  const auto& [under, c] = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  const ParamSpec& spec = c.spec;
  if (spec.hp.ns_schedule == ScheduleKind::kSvd && !under.supports_svd) {
    EXPECT_THAT(h.engine().Register(spec), StatusIs(absl::StatusCode::kUnimplemented));
    GTEST_SKIP() << under.name << " engine does not offer the svd schedule";
  }
  const ParamId id = h.Register(spec);
  MuonRef ref = MakeMuonRef(spec);
  std::vector<double> weights;
  if (spec.hold_weights) {
    const std::vector<float> w0 = h.Gradient(spec, 0.01);
    ASSERT_THAT(h.engine().SetWeights(id, w0), IsOk());
    weights.assign(w0.begin(), w0.end());
  }
  const double tolerance = under.tolerance.MuonFor(spec.hp.ns_schedule);
  double worst = 0;
  for (int step = 0; step < 10; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    const std::optional<double> lr =
        c.lr_schedule ? std::optional<double>(StepLr(step)) : std::nullopt;
    const std::vector<float> g = h.Gradient(spec);
    const DType update_dtype = c.update_dtype.value_or(DType::kFloat32);
    const StepResult r = h.Step({id}, {spec}, {g}, lr, update_dtype);
    ASSERT_THAT(r.status, IsOk());
    double decay = 0;
    const std::vector<double> want = ref.Step(WireRoundTrip(spec.dtype, g), lr.value_or(spec.hp.lr),
                                              &decay);
    ExpectUpdateMatches(update_dtype, r.updates[0], want, tolerance);
    worst = std::max(worst, RelativeError(r.updates[0], want));
    EXPECT_NEAR(r.decays[0], decay, 1e-15);
    for (size_t k = 0; k < weights.size(); ++k) weights[k] = decay * weights[k] + want[k];
  }
  std::printf("%s muon %s: worst relative error of 10 %s updates %.2e\n", under.name.c_str(),
              c.name.c_str(), std::string(DTypeName(c.update_dtype.value_or(DType::kFloat32))).c_str(),
              worst);
  EXPECT_EQ(h.State(id).step, 10);
  if (spec.hold_weights) {
    std::vector<float> got(weights.size());
    ASSERT_THAT(h.engine().GetWeights(id, absl::MakeSpan(got)), IsOk());
    // The weights sum ten updates, each within `tolerance` of the reference.
    EXPECT_LT(RelativeError(got, weights), tolerance);
  }
}

TEST_P(EngineAdamWReferenceTest, TenStepsMatchFloat64Reference) {
  const auto& [under, c] = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  const ParamSpec& spec = c.spec;
  const ParamId id = h.Register(spec);
  AdamWRef ref{spec.hp, {}, {}, 0};
  std::vector<double> weights;
  if (spec.hold_weights) {
    const std::vector<float> w0 = h.Gradient(spec, 0.01);
    ASSERT_THAT(h.engine().SetWeights(id, w0), IsOk());
    weights.assign(w0.begin(), w0.end());
  }
  double worst = 0;
  for (int step = 0; step < 10; ++step) {
    SCOPED_TRACE(::testing::Message() << "step " << step);
    const std::optional<double> lr =
        c.lr_schedule ? std::optional<double>(StepLr(step) / 10) : std::nullopt;
    const std::vector<float> g = h.Gradient(spec);
    const DType update_dtype = c.update_dtype.value_or(DType::kFloat32);
    const StepResult r = h.Step({id}, {spec}, {g}, lr, update_dtype);
    ASSERT_THAT(r.status, IsOk());
    EXPECT_TRUE(std::isnan(r.orthogonality[0]));  // not a Muon parameter
    double decay = 0;
    const std::vector<double> want = ref.Step(WireRoundTrip(spec.dtype, g), lr.value_or(spec.hp.lr),
                                              &decay);
    ExpectUpdateMatches(update_dtype, r.updates[0], want, under.tolerance.adamw);
    worst = std::max(worst, RelativeError(r.updates[0], want));
    EXPECT_NEAR(r.decays[0], decay, 1e-15);
    for (size_t k = 0; k < weights.size(); ++k) weights[k] = decay * weights[k] + want[k];
  }
  std::printf("%s adamw %s: worst relative error of 10 %s updates %.2e\n", under.name.c_str(),
              c.name.c_str(), std::string(DTypeName(c.update_dtype.value_or(DType::kFloat32))).c_str(),
              worst);
  const ParamState state = h.State(id);
  EXPECT_EQ(state.step, 10);
  EXPECT_TRUE(state.momentum.empty());
  EXPECT_LT(RelativeError(state.exp_avg, ref.m), under.tolerance.adamw);
  EXPECT_LT(RelativeError(state.exp_avg_sq, ref.v), under.tolerance.adamw);
  if (spec.hold_weights) {
    std::vector<float> got(weights.size());
    ASSERT_THAT(h.engine().GetWeights(id, absl::MakeSpan(got)), IsOk());
    EXPECT_LT(RelativeError(got, weights), under.tolerance.adamw);
  }
}

// ---------------------------------------------------------------------------
// Bad inputs: the specific code, and no state change, proven by the next good
// step matching that of a twin engine that never saw the bad call.

// A valid call over the test's four parameters, for a case to spoil.
struct BadCall {
  ParamId w = 0, wb = 0, wh = 0, bias = 0;  // fp32, bf16, fp16 (3-D) Muon; fp32 AdamW
  ParamId unregistered = 0;                 // registered, then unregistered
  std::vector<GradientInput> grads;         // in the order w, wb, wh, bias
  std::vector<UpdateOutput> outputs;
  std::vector<std::vector<std::byte>> storage;  // bytes the spoiled call points into
  std::function<void()> open_other_step;    // opens a step holding w until the call is done

  BadCall() { storage.reserve(64); }  // Own() must not move buffers already handed out

  std::vector<std::byte>& Own(std::vector<std::byte> bytes) {
    storage.push_back(std::move(bytes));
    return storage.back();
  }
  // Replaces w's fp32 gradient bytes with a copy where element k is `value`.
  void SetW(size_t k, float value) {
    std::vector<std::byte> bytes(grads[0].bytes.begin(), grads[0].bytes.end());
    std::memcpy(bytes.data() + 4 * k, &value, 4);
    grads[0].bytes = Own(std::move(bytes));
  }
  void SetHalf(size_t which, size_t k, uint16_t bits) {
    std::vector<std::byte> bytes(grads[which].bytes.begin(), grads[which].bytes.end());
    std::memcpy(bytes.data() + 2 * k, &bits, 2);
    grads[which].bytes = Own(std::move(bytes));
  }
  void ResizeW(size_t bytes) {
    std::vector<std::byte> b(bytes, std::byte{0x3c});
    const size_t keep = std::min(bytes, grads[0].bytes.size());
    std::copy(grads[0].bytes.begin(), grads[0].bytes.begin() + keep, b.begin());
    grads[0].bytes = Own(std::move(b));
  }
};

std::vector<BadInputCase> BadInputs() {
  using Code = absl::StatusCode;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  return {
      {"nan_fp32", Code::kInvalidArgument, [=](BadCall& c) { c.SetW(17, nan); }},
      {"inf_fp32", Code::kInvalidArgument, [=](BadCall& c) { c.SetW(0, inf); }},
      {"minus_inf_fp32", Code::kInvalidArgument, [=](BadCall& c) { c.SetW(191, -inf); }},
      {"nan_bf16", Code::kInvalidArgument, [](BadCall& c) { c.SetHalf(1, 5, 0x7fc0); }},
      {"inf_fp16", Code::kInvalidArgument, [](BadCall& c) { c.SetHalf(2, 9, 0x7c00); }},
      {"nan_fp16", Code::kInvalidArgument, [](BadCall& c) { c.SetHalf(2, 0, 0xfe00); }},
      {"nan_in_adamw_gradient", Code::kInvalidArgument,
       [=](BadCall& c) {
         std::vector<std::byte> b(c.grads[3].bytes.begin(), c.grads[3].bytes.end());
         std::memcpy(b.data() + 4, &nan, 4);
         c.grads[3].bytes = c.Own(std::move(b));
       }},
      {"dtype_mismatch", Code::kInvalidArgument,
       [](BadCall& c) {  // bf16 bytes of the right count for an fp32 parameter
         c.grads[0].dtype = DType::kBFloat16;
         c.ResizeW(c.grads[0].bytes.size() / 2);
       }},
      {"byte_count_one_element_short", Code::kInvalidArgument,
       [](BadCall& c) { c.ResizeW(c.grads[0].bytes.size() - 4); }},
      {"byte_count_one_element_long", Code::kInvalidArgument,
       [](BadCall& c) { c.ResizeW(c.grads[0].bytes.size() + 4); }},
      {"byte_count_not_whole_elements", Code::kInvalidArgument,
       [](BadCall& c) { c.ResizeW(c.grads[0].bytes.size() - 1); }},
      {"shape_mismatch", Code::kInvalidArgument,
       [](BadCall& c) { c.ResizeW(16 * 13 * 4); }},  // a 16×13 gradient for 16×12
      {"empty_tensor", Code::kInvalidArgument, [](BadCall& c) { c.grads[0].bytes = {}; }},
      {"unknown_parameter", Code::kNotFound,
       [](BadCall& c) {
         c.grads[0].param = c.outputs[0].param = 0x7fff'ffff'ffffULL;
       }},
      {"unregistered_parameter", Code::kNotFound,
       [](BadCall& c) { c.grads[0].param = c.outputs[0].param = c.unregistered; }},
      {"parameter_given_twice", Code::kInvalidArgument,
       [](BadCall& c) {
         c.grads.push_back(c.grads[0]);
         std::vector<std::byte>& out = c.Own(std::vector<std::byte>(c.outputs[0].bytes.size()));
         c.outputs.push_back({c.w, DType::kFloat32, absl::MakeSpan(out)});
       }},
      {"update_output_wrong_size", Code::kInvalidArgument,
       [](BadCall& c) { c.outputs[1].bytes = c.outputs[1].bytes.subspan(2); }},
      {"update_output_for_another_parameter", Code::kInvalidArgument,
       [](BadCall& c) { std::swap(c.outputs[0].param, c.outputs[3].param); }},
      {"fewer_outputs_than_gradients", Code::kInvalidArgument,
       [](BadCall& c) { c.outputs.pop_back(); }},
      {"negative_lr", Code::kInvalidArgument, [](BadCall& c) { c.grads[0].lr = -1e-3; }},
      {"nan_lr", Code::kInvalidArgument,
       [](BadCall& c) { c.grads[3].lr = std::numeric_limits<double>::quiet_NaN(); }},
      {"parameter_in_another_open_step", Code::kFailedPrecondition,
       [](BadCall& c) { c.open_other_step(); }},
  };
}

TEST_P(EngineBadInputTest, IsRejectedAndChangesNothing) {
  const auto& [under, bad] = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  Harness twin(under, 0);
  ASSERT_THAT(twin.Start(), IsOk());
  const std::vector<ParamSpec> specs = {MuonSpec("w", {16, 12}),
                                        MuonSpec("wb", {12, 16}, DType::kBFloat16),
                                        MuonSpec("wh", {2, 6, 8}, DType::kFloat16),
                                        AdamWSpec("bias", {12})};
  std::vector<ParamId> ids, twin_ids;
  for (const ParamSpec& s : specs) ids.push_back(h.Register(s));
  for (const ParamSpec& s : specs) twin_ids.push_back(twin.Register(s));
  BadCall call;
  call.unregistered = h.Register(MuonSpec("gone", {16, 12}));
  ASSERT_THAT(h.engine().Unregister(call.unregistered), IsOk());
  // One good step on both, so that the state is not zero.
  std::vector<std::vector<float>> grads;
  for (const ParamSpec& s : specs) grads.push_back(h.Gradient(s));
  ASSERT_THAT(h.Step(ids, specs, grads).status, IsOk());
  ASSERT_THAT(twin.Step(twin_ids, specs, grads).status, IsOk());

  // The bad call: a valid step over all four parameters, spoiled.
  call.w = ids[0], call.wb = ids[1], call.wh = ids[2], call.bias = ids[3];
  for (size_t i = 0; i < specs.size(); ++i) {
    std::vector<std::byte>& g = call.Own(Encode(specs[i].dtype, h.Gradient(specs[i])));
    std::vector<std::byte>& u =
        call.Own(std::vector<std::byte>(g.size() / DTypeSize(specs[i].dtype) * 4));
    call.grads.push_back({ids[i], specs[i].dtype, g, std::nullopt});
    call.outputs.push_back({ids[i], DType::kFloat32, absl::MakeSpan(u)});
  }
  std::unique_ptr<StepTransaction> other;
  std::vector<std::byte> other_update(16 * 12 * 4);
  call.open_other_step = [&] {
    absl::StatusOr<std::unique_ptr<StepTransaction>> txn = h.engine().BeginStep({});
    ASSERT_THAT(txn, IsOk());
    other = std::move(*txn);
    const std::vector<std::byte> g = Encode(DType::kFloat32, h.Gradient(specs[0]));
    UpdateOutput out{ids[0], DType::kFloat32, absl::MakeSpan(other_update)};
    GradientInput in{ids[0], DType::kFloat32, g, std::nullopt};
    ASSERT_THAT(other->Compute({&in, 1}, {&out, 1}, nullptr), IsOk());
  };
  bad.spoil(call);
  EXPECT_THAT(h.engine().Step(call.grads, absl::MakeSpan(call.outputs)), StatusIs(bad.code));
  other.reset();  // the other step is abandoned: it changes nothing either

  // The same good step on both engines.
  grads.clear();
  for (const ParamSpec& s : specs) grads.push_back(h.Gradient(s));
  const StepResult got = h.Step(ids, specs, grads);
  const StepResult want = twin.Step(twin_ids, specs, grads);
  ASSERT_THAT(got.status, IsOk());
  ASSERT_THAT(want.status, IsOk());
  ExpectSameUpdates(under.tolerance, under.tolerance.muon, got.updates, want.updates);
  for (size_t i = 0; i < ids.size(); ++i) {
    SCOPED_TRACE(specs[i].name);
    ExpectSameState(under.tolerance, h.State(ids[i]), twin.State(twin_ids[i]));
  }
}

// ---------------------------------------------------------------------------
// The contract, engine by engine.

TEST_P(EngineContractTest, RejectedErrorsNameTheParameterAndTheProblem) {
  const EngineUnderTest& under = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  const ParamSpec spec = MuonSpec("layers.3.attn.qkv", {8, 6});
  const ParamId id = h.Register(spec);
  std::vector<float> g = h.Gradient(spec);
  g[3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THAT(h.Step({id}, {spec}, {g}).status,
              StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::AllOf(HasSubstr("layers.3.attn.qkv"), HasSubstr("NaN"))));
  std::vector<std::byte> bytes(10);
  std::vector<std::byte> out(8 * 6 * 4);
  GradientInput in{id, DType::kFloat32, bytes, std::nullopt};
  UpdateOutput o{id, DType::kFloat32, absl::MakeSpan(out)};
  EXPECT_THAT(h.engine().Step({&in, 1}, {&o, 1}),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       ::testing::AllOf(HasSubstr("layers.3.attn.qkv"), HasSubstr("10 bytes"))));
}

TEST_P(EngineContractTest, BadSpecsAreRejected) {
  const EngineUnderTest& under = GetParam();
  Harness h(under, 0);
  MUON_START_OR_SKIP(h, under);
  const auto reg = [&](std::vector<int64_t> shape, OptimizerKind kind,
                       const std::function<void(HyperParams&)>& edit = nullptr) {
    ParamSpec spec = kind == OptimizerKind::kMuon ? MuonSpec("p", shape) : AdamWSpec("p", shape);
    if (edit) edit(spec.hp);
    return h.engine().Register(spec);
  };
  const int64_t base = h.engine().Memory().used_bytes;
  const auto invalid = StatusIs(absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(reg({}, OptimizerKind::kAdamW), invalid);
  EXPECT_THAT(reg({0, 4}, OptimizerKind::kMuon), invalid);
  EXPECT_THAT(reg({4, 0}, OptimizerKind::kMuon), invalid);
  EXPECT_THAT(reg({-3}, OptimizerKind::kAdamW), invalid);
  EXPECT_THAT(reg({8}, OptimizerKind::kMuon), invalid);  // Muon needs a matrix
  EXPECT_THAT(reg({4, 4}, OptimizerKind::kMuon, [](HyperParams& hp) { hp.momentum = 1.5; }),
              invalid);
  EXPECT_THAT(reg({4, 4}, OptimizerKind::kMuon, [](HyperParams& hp) { hp.ns_steps = 0; }),
              invalid);
  EXPECT_THAT(reg({4}, OptimizerKind::kAdamW, [](HyperParams& hp) { hp.lr = std::nan(""); }),
              invalid);
  EXPECT_THAT(reg({4}, OptimizerKind::kAdamW, [](HyperParams& hp) { hp.beta2 = 1.0; }), invalid);
  EXPECT_EQ(h.engine().Memory().used_bytes, base);  // nothing was registered
}

// A custom schedule runs its triples with the built-in schedules' code: the
// dion tuples (and one Jordan triple) given as ns_coefficients are the
// built-in schedules bit for bit, plain and Gram.
TEST_P(EngineContractTest, CustomScheduleIsTheEquivalentBuiltInBitForBit) {
  const EngineUnderTest& under = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  const std::vector<std::array<double, 3>> dion = {{4.0848, -6.8946, 2.9270},
                                                   {3.9505, -6.3029, 2.6377},
                                                   {3.7418, -5.5913, 2.3037},
                                                   {2.8769, -3.1427, 1.2046},
                                                   {2.8366, -3.0525, 1.2012}};
  for (NsGram gram : {NsGram::kOff, NsGram::kOn}) {
    for (const auto& [kind, steps, custom] :
         {std::tuple{ScheduleKind::kDion, 5, dion},
          std::tuple{ScheduleKind::kJordan, 4,
                     std::vector<std::array<double, 3>>{{3.4445, -4.7750, 2.0315}}}}) {
      SCOPED_TRACE(::testing::Message() << ScheduleName(kind) << " gram " << NsGramName(gram));
      ParamSpec builtin = MuonSpec("builtin", {24, 40});
      builtin.hp.ns_schedule = kind;
      builtin.hp.ns_steps = steps;
      builtin.hp.ns_gram = gram;
      ParamSpec given = builtin;
      given.name = "custom";
      given.hp.ns_schedule = ScheduleKind::kJordan;
      given.hp.ns_coefficients = custom;
      const ParamId a = h.Register(builtin), b = h.Register(given);
      for (int step = 0; step < 3; ++step) {
        const std::vector<float> g = h.Gradient(builtin);
        const StepResult r = h.Step({a, b}, {builtin, given}, {g, g});
        ASSERT_THAT(r.status, IsOk());
        EXPECT_EQ(r.updates[0], r.updates[1]) << "step " << step;
      }
    }
  }
}

// ns_eps reaches the normalisation: with gradients of about eps's size the
// update follows the float64 reference with that eps, and differs from the
// default's.
TEST_P(EngineContractTest, NsEpsIsTheNormalisationsEpsilon) {
  const EngineUnderTest& under = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  ParamSpec spec = MuonSpec("w", {16, 24});
  spec.hp.ns_eps = 1e-3;
  ParamSpec plain = spec;
  plain.name = "default_eps";
  plain.hp.ns_eps = HyperParams{}.ns_eps;
  const ParamId a = h.Register(spec), b = h.Register(plain);
  MuonRef ref = MakeMuonRef(spec), ref_plain = MakeMuonRef(plain);
  // ‖g‖_F ≈ 1e-4·√384 ≈ 2e-3, about eps.
  const std::vector<float> g = h.Gradient(spec, 1e-4);
  const StepResult r = h.Step({a, b}, {spec, plain}, {g, g});
  ASSERT_THAT(r.status, IsOk());
  double decay = 0;
  const std::vector<double> want = ref.Step(WireRoundTrip(spec.dtype, g), spec.hp.lr, &decay);
  const std::vector<double> want_plain =
      ref_plain.Step(WireRoundTrip(plain.dtype, g), plain.hp.lr, &decay);
  const double tolerance = under.tolerance.MuonFor(ScheduleKind::kJordan);
  EXPECT_LT(RelativeError(r.updates[0], want), tolerance);
  EXPECT_LT(RelativeError(r.updates[1], want_plain), tolerance);
  EXPECT_GT(RelativeError(r.updates[0], want_plain), 10 * tolerance);
}

TEST_P(EngineContractTest, ZeroGradientGivesZeroUpdate) {
  const EngineUnderTest& under = GetParam();
  Harness h(under, 0);
  MUON_START_OR_SKIP(h, under);
  for (ScheduleKind kind : {ScheduleKind::kJordan, ScheduleKind::kPolarExpress, ScheduleKind::kDion,
                            ScheduleKind::kAol, ScheduleKind::kAolDion, ScheduleKind::kSvd}) {
    SCOPED_TRACE(ScheduleName(kind));
    ParamSpec spec = MuonSpec("w", {8, 6});
    spec.hp.ns_schedule = kind;
    spec.hp.ns_steps = 4;
    if (kind == ScheduleKind::kSvd && !under.supports_svd) continue;  // see supports_svd
    const ParamSpec bias = AdamWSpec("b", {6});
    const ParamId w = h.Register(spec), b = h.Register(bias);
    const StepResult r = h.Step({w, b}, {spec, bias},
                                {std::vector<float>(48, 0.0f), std::vector<float>(6, 0.0f)});
    ASSERT_THAT(r.status, IsOk());
    for (const auto& u : r.updates) {
      EXPECT_THAT(u, ::testing::Each(0.0f));  // 0 == -0; NaN fails
    }
  }
}

TEST_P(EngineContractTest, LeftOutParameterKeepsItsState) {
  const EngineUnderTest& under = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  Harness twin(under, 0);
  ASSERT_THAT(twin.Start(), IsOk());
  const ParamSpec spec = MuonSpec("w", {8, 8});
  const ParamSpec bias = AdamWSpec("b", {8});
  const ParamId a = h.Register(spec), b = h.Register(spec), c = h.Register(bias);
  const ParamId tb = twin.Register(spec), tc = twin.Register(bias);
  const auto gb = h.Gradient(spec), gc = h.Gradient(bias);
  ASSERT_THAT(h.Step({a, b, c}, {spec, spec, bias}, {h.Gradient(spec), gb, gc}).status, IsOk());
  ASSERT_THAT(twin.Step({tb, tc}, {spec, bias}, {gb, gc}).status, IsOk());
  const ParamState before_b = h.State(b), before_c = h.State(c);
  for (int i = 0; i < 3; ++i) {
    ASSERT_THAT(h.Step({a}, {spec}, {h.Gradient(spec)}).status, IsOk());
  }
  ExpectSameState(under.tolerance, h.State(b), before_b);
  ExpectSameState(under.tolerance, h.State(c), before_c);
  EXPECT_EQ(h.State(a).step, 4);
  // Its next update is the one it would have had without the other steps
  // (AdamW's bias correction counts the parameter's own steps).
  const auto gb2 = h.Gradient(spec), gc2 = h.Gradient(bias);
  const StepResult got = h.Step({b, c}, {spec, bias}, {gb2, gc2});
  const StepResult want = twin.Step({tb, tc}, {spec, bias}, {gb2, gc2});
  ASSERT_THAT(got.status, IsOk());
  ExpectSameUpdates(under.tolerance, under.tolerance.muon, got.updates, want.updates);
}

TEST_P(EngineContractTest, TransactionDestroyedWithoutCommitChangesNothing) {
  const EngineUnderTest& under = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  ParamSpec spec = MuonSpec("w", {8, 8});
  spec.hold_weights = true;
  const ParamSpec bias = AdamWSpec("b", {8});
  const ParamId w = h.Register(spec), b = h.Register(bias);
  ASSERT_THAT(h.engine().SetWeights(w, h.Gradient(spec)), IsOk());
  ASSERT_THAT(h.Step({w, b}, {spec, bias}, {h.Gradient(spec), h.Gradient(bias)}).status, IsOk());
  const ParamState before_w = h.State(w), before_b = h.State(b);
  {
    absl::StatusOr<std::unique_ptr<StepTransaction>> txn = h.engine().BeginStep({});
    ASSERT_THAT(txn, IsOk());
    const std::vector<std::byte> g = Encode(DType::kFloat32, h.Gradient(spec));
    const std::vector<std::byte> gb = Encode(DType::kFloat32, h.Gradient(bias));
    std::vector<std::byte> out(g.size()), outb(gb.size());
    const GradientInput in[] = {{w, DType::kFloat32, g, std::nullopt},
                                {b, DType::kFloat32, gb, std::nullopt}};
    UpdateOutput o[] = {{w, DType::kFloat32, absl::MakeSpan(out)},
                        {b, DType::kFloat32, absl::MakeSpan(outb)}};
    ASSERT_THAT((*txn)->Compute(in, absl::MakeSpan(o), nullptr), IsOk());
    // While it is open the parameters are busy for everyone else.
    EXPECT_THAT(h.engine().Unregister(w), StatusIs(absl::StatusCode::kFailedPrecondition));
    EXPECT_THAT(h.engine().ImportState(b, before_b),
                StatusIs(absl::StatusCode::kFailedPrecondition));
    EXPECT_THAT(h.engine().SetWeights(w, std::vector<float>(64, 1.0f)),
                StatusIs(absl::StatusCode::kFailedPrecondition));
  }
  ExpectSameState(under.tolerance, h.State(w), before_w);
  ExpectSameState(under.tolerance, h.State(b), before_b);
  // And the parameters are free again.
  EXPECT_THAT(h.Step({w, b}, {spec, bias}, {h.Gradient(spec), h.Gradient(bias)}).status, IsOk());
  EXPECT_EQ(h.State(w).step, 2);
}

TEST_P(EngineContractTest, ComputedWeightsAreReadBeforeCommitAndAreWhatItApplies) {
  const EngineUnderTest& under = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  ParamSpec spec = MuonSpec("w", {12, 8});
  spec.hold_weights = true;
  ParamSpec bias = AdamWSpec("b", {8});
  bias.hold_weights = true;
  ParamSpec failing = MuonSpec("f", {8, 8});
  failing.hold_weights = true;
  const ParamSpec plain = MuonSpec("p", {8, 8});
  const ParamId w = h.Register(spec), b = h.Register(bias), f = h.Register(failing),
                p = h.Register(plain);
  const std::vector<float> w0 = h.Gradient(spec), b0 = h.Gradient(bias);
  ASSERT_THAT(h.engine().SetWeights(w, w0), IsOk());
  ASSERT_THAT(h.engine().SetWeights(b, b0), IsOk());
  ASSERT_THAT(h.engine().SetWeights(f, h.Gradient(failing)), IsOk());

  absl::StatusOr<std::unique_ptr<StepTransaction>> txn = h.engine().BeginStep({});
  ASSERT_THAT(txn, IsOk());
  const auto compute = [&](ParamId id, const std::vector<float>& g) {
    const std::vector<std::byte> in = Encode(DType::kFloat32, g);
    std::vector<std::byte> out(in.size());
    const GradientInput grad{id, DType::kFloat32, in, std::nullopt};
    UpdateOutput update{id, DType::kFloat32, absl::MakeSpan(out)};
    return (*txn)->Compute({&grad, 1}, {&update, 1}, nullptr);
  };
  std::vector<float> new_w(w0.size()), new_b(b0.size()), got(w0.size());
  // Nothing of b is computed yet.
  EXPECT_THAT((*txn)->ComputedWeights(b, absl::MakeSpan(new_b)),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("not computed")));
  ASSERT_THAT(compute(w, h.Gradient(spec)), IsOk());
  ASSERT_THAT((*txn)->ComputedWeights(w, absl::MakeSpan(new_w)), IsOk());
  EXPECT_NE(new_w, w0);
  // The held weights are still the old ones.
  ASSERT_THAT(h.engine().GetWeights(w, absl::MakeSpan(got)), IsOk());
  EXPECT_EQ(got, w0);
  ASSERT_THAT(compute(b, h.Gradient(bias)), IsOk());
  ASSERT_THAT((*txn)->ComputedWeights(b, absl::MakeSpan(new_b)), IsOk());
  EXPECT_NE(new_b, b0);
  // A failed Compute keeps nothing to read.
  std::vector<float> bad = h.Gradient(failing);
  bad[3] = std::numeric_limits<float>::quiet_NaN();
  ASSERT_THAT(compute(f, bad), StatusIs(absl::StatusCode::kInvalidArgument));
  std::vector<float> new_f(bad.size());
  EXPECT_THAT((*txn)->ComputedWeights(f, absl::MakeSpan(new_f)),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  ASSERT_THAT(compute(p, h.Gradient(plain)), IsOk());
  std::vector<float> none(64);
  EXPECT_THAT((*txn)->ComputedWeights(p, absl::MakeSpan(none)),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("does not hold")));
  std::vector<float> short_of_one(new_w.size() - 1);
  EXPECT_THAT((*txn)->ComputedWeights(w, absl::MakeSpan(short_of_one)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT((*txn)->ComputedWeights(9999, absl::MakeSpan(got)),
              StatusIs(absl::StatusCode::kNotFound));

  ASSERT_THAT((*txn)->Commit(), IsOk());
  ASSERT_THAT(h.engine().GetWeights(w, absl::MakeSpan(got)), IsOk());
  EXPECT_EQ(got, new_w);  // bit for bit
  std::vector<float> got_b(b0.size());
  ASSERT_THAT(h.engine().GetWeights(b, absl::MakeSpan(got_b)), IsOk());
  EXPECT_EQ(got_b, new_b);
  EXPECT_THAT((*txn)->ComputedWeights(w, absl::MakeSpan(got)),
              StatusIs(absl::StatusCode::kFailedPrecondition));
}

TEST_P(EngineContractTest, FailedComputeKeepsEarlierWorkOfTheTransaction) {
  const EngineUnderTest& under = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  Harness twin(under, 0);
  ASSERT_THAT(twin.Start(), IsOk());
  const ParamSpec spec = MuonSpec("w", {12, 8});
  const ParamId a = h.Register(spec), b = h.Register(spec);
  const ParamId ta = twin.Register(spec), tb = twin.Register(spec);
  absl::StatusOr<std::unique_ptr<StepTransaction>> txn = h.engine().BeginStep({});
  ASSERT_THAT(txn, IsOk());
  const std::vector<float> ga = h.Gradient(spec);
  std::vector<float> gb = h.Gradient(spec);
  const std::vector<std::byte> ea = Encode(DType::kFloat32, ga);
  gb[0] = std::numeric_limits<float>::infinity();
  const std::vector<std::byte> eb = Encode(DType::kFloat32, gb);
  std::vector<std::byte> ua(ea.size()), ub(eb.size());
  GradientInput in_a{a, DType::kFloat32, ea, std::nullopt};
  GradientInput in_b{b, DType::kFloat32, eb, std::nullopt};
  UpdateOutput out_a{a, DType::kFloat32, absl::MakeSpan(ua)};
  UpdateOutput out_b{b, DType::kFloat32, absl::MakeSpan(ub)};
  ASSERT_THAT((*txn)->Compute({&in_a, 1}, {&out_a, 1}, nullptr), IsOk());
  EXPECT_THAT((*txn)->Compute({&in_b, 1}, {&out_b, 1}, nullptr),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_THAT((*txn)->Commit(), IsOk());
  EXPECT_EQ(h.State(a).step, 1);
  EXPECT_EQ(h.State(b).step, 0);
  // a's update was the twin's first; b's next step is still its first.
  const StepResult first = twin.Step({ta}, {spec}, {ga});
  ASSERT_THAT(first.status, IsOk());
  ExpectSameUpdates(under.tolerance, under.tolerance.muon, {Decode(DType::kFloat32, ua)},
                    first.updates);
  const std::vector<float> g2 = h.Gradient(spec);
  const StepResult got = h.Step({b}, {spec}, {g2});
  const StepResult want = twin.Step({tb}, {spec}, {g2});
  ASSERT_THAT(got.status, IsOk());
  ExpectSameUpdates(under.tolerance, under.tolerance.muon, got.updates, want.updates);
}

TEST_P(EngineContractTest, ExportImportContinuesBitIdentically) {
  const EngineUnderTest& under = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  ParamSpec spec = MuonSpec("w", {12, 10});
  spec.hold_weights = true;
  ParamSpec experts = MuonSpec("e", {2, 6, 10}, DType::kBFloat16);
  experts.hp.momentum_form = MomentumForm::kSum;
  ParamSpec bias = AdamWSpec("b", {10});
  bias.hold_weights = true;
  const std::vector<ParamSpec> specs = {spec, experts, bias};
  std::vector<ParamId> ids;
  for (const ParamSpec& s : specs) ids.push_back(h.Register(s));
  ASSERT_THAT(h.engine().SetWeights(ids[0], h.Gradient(spec)), IsOk());
  ASSERT_THAT(h.engine().SetWeights(ids[2], h.Gradient(bias)), IsOk());
  const auto grads = [&] {
    std::vector<std::vector<float>> g;
    for (const ParamSpec& s : specs) g.push_back(h.Gradient(s));
    return g;
  };
  for (int i = 0; i < 3; ++i) ASSERT_THAT(h.Step(ids, specs, grads()).status, IsOk());

  Harness restored(under, 0);
  ASSERT_THAT(restored.Start(), IsOk());
  std::vector<ParamId> rids;
  for (size_t i = 0; i < specs.size(); ++i) {
    rids.push_back(restored.Register(specs[i]));
    ASSERT_THAT(restored.engine().ImportState(rids[i], h.State(ids[i])), IsOk());
    ExpectSameState(EngineTolerance{}, restored.State(rids[i]), h.State(ids[i]));  // exact copy
  }
  for (int i = 0; i < 2; ++i) {
    const auto g = grads();
    const StepResult got = restored.Step(rids, specs, g);
    const StepResult want = h.Step(ids, specs, g);
    ASSERT_THAT(got.status, IsOk());
    ExpectSameUpdates(under.tolerance, under.tolerance.muon, got.updates, want.updates);
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    ExpectSameState(under.tolerance, restored.State(rids[i]), h.State(ids[i]));
  }

  // A state of the wrong size is refused before anything changes.
  const ParamState good = restored.State(rids[0]);
  ParamState wrong = good;
  wrong.momentum.pop_back();
  EXPECT_THAT(restored.engine().ImportState(rids[0], wrong),
              StatusIs(absl::StatusCode::kInvalidArgument));
  wrong = good;
  wrong.weights.clear();
  wrong.step = 99;
  EXPECT_THAT(restored.engine().ImportState(rids[0], wrong),
              StatusIs(absl::StatusCode::kInvalidArgument));
  wrong = restored.State(rids[2]);
  wrong.momentum.assign(10, 1.0f);  // AdamW has no momentum
  EXPECT_THAT(restored.engine().ImportState(rids[2], wrong),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ExpectSameState(EngineTolerance{}, restored.State(rids[0]), good);
  EXPECT_THAT(restored.engine().ImportState(0x7fff'ffffULL, good),
              StatusIs(absl::StatusCode::kNotFound));
}

TEST_P(EngineContractTest, MemoryBudgetGivesResourceExhausted) {
  const EngineUnderTest& under = GetParam();
  Harness probe(under, 0);
  MUON_START_OR_SKIP(probe, under);
  const ParamSpec spec = MuonSpec("w", {64, 64});
  // What the engine charges for itself and for one parameter, unbudgeted.
  const int64_t base = probe.engine().Memory().used_bytes;
  probe.Register(spec);
  const int64_t per_param = probe.engine().Memory().used_bytes - base;
  EXPECT_GE(per_param, StateBytes(spec));

  Harness h(under, 0);
  ASSERT_THAT(h.Start({.memory_budget_bytes = base + 2 * per_param + per_param / 2}), IsOk());
  const ParamId first = h.Register(spec);
  h.Register(spec);
  const int64_t used = h.engine().Memory().used_bytes;
  EXPECT_EQ(used, base + 2 * per_param);
  EXPECT_THAT(h.engine().Register(spec),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("budget")));
  EXPECT_EQ(h.engine().Memory().used_bytes, used);  // the refusal took nothing
  EXPECT_EQ(h.engine().Memory().budget_bytes, base + 2 * per_param + per_param / 2);
  // A smaller parameter still fits, and freeing one makes room again.
  EXPECT_THAT(h.engine().Register(MuonSpec("small", {8, 8})), IsOk());
  ASSERT_THAT(h.engine().Unregister(first), IsOk());
  EXPECT_THAT(h.engine().Register(spec), IsOk());
}

TEST_P(EngineContractTest, UnregisterFreesAndForgets) {
  const EngineUnderTest& under = GetParam();
  Harness h(under, 0);
  MUON_START_OR_SKIP(h, under);
  const int64_t base = h.engine().Memory().used_bytes;
  const ParamSpec spec = MuonSpec("w", {16, 16});
  const ParamId id = h.Register(spec);
  EXPECT_GT(h.engine().Memory().used_bytes, base);
  ASSERT_THAT(h.engine().Unregister(id), IsOk());
  EXPECT_EQ(h.engine().Memory().used_bytes, base);
  EXPECT_THAT(h.engine().Unregister(id), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(h.engine().Spec(id), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(h.engine().ExportState(id), StatusIs(absl::StatusCode::kNotFound));
  const ParamId again = h.Register(spec);
  EXPECT_NE(again, id);  // ids are never reused
}

TEST_P(EngineContractTest, WeightsOnlyForHolders) {
  const EngineUnderTest& under = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  ParamSpec spec = MuonSpec("w", {4, 5});
  const ParamId plain = h.Register(spec);
  spec.hold_weights = true;
  const ParamId held = h.Register(spec);
  std::vector<float> w = h.Gradient(spec), got(20);
  EXPECT_THAT(h.engine().SetWeights(plain, w), StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(h.engine().GetWeights(plain, absl::MakeSpan(got)),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(h.engine().SetWeights(held, std::vector<float>(19)),
              StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_THAT(h.engine().SetWeights(held, w), IsOk());
  ASSERT_THAT(h.engine().GetWeights(held, absl::MakeSpan(got)), IsOk());
  EXPECT_EQ(got, w);
}

TEST_P(EngineContractTest, NarrowUpdatesAreRoundedFp32Updates) {
  const EngineUnderTest& under = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  const ParamSpec spec = MuonSpec("w", {32, 32});
  const ParamSpec bias = AdamWSpec("b", {32});
  const ParamId w = h.Register(spec), b = h.Register(bias);
  const auto g = h.Gradient(spec), gb = h.Gradient(bias);
  const StepResult full = h.Step({w, b}, {spec, bias}, {g, gb}, std::nullopt, DType::kFloat32);
  ASSERT_THAT(full.status, IsOk());
  for (DType narrow : {DType::kBFloat16, DType::kFloat16}) {
    SCOPED_TRACE(DTypeName(narrow));
    // The same first step on a fresh twin, with updates written narrow.
    Harness t(under, 0);
    ASSERT_THAT(t.Start(), IsOk());
    const ParamId x = t.Register(spec), y = t.Register(bias);
    const StepResult half = t.Step({x, y}, {spec, bias}, {g, gb}, std::nullopt, narrow);
    ASSERT_THAT(half.status, IsOk());
    // Half an ulp is at most 2^-8·|x| for bf16 (8 significant bits) and
    // 2^-11·|x| for fp16, whose subnormals (below 2^-14) are multiples of
    // 2^-24: half of that, absolute.
    const float ulp = narrow == DType::kBFloat16 ? 1.0f / 256 : 1.0f / 2048;
    const float subnormal = narrow == DType::kFloat16 ? std::ldexp(1.0f, -25) : 0.0f;
    for (size_t i = 0; i < 2; ++i) {
      for (size_t k = 0; k < full.updates[i].size(); ++k) {
        const float want = full.updates[i][k];
        // Plus, on a nondeterministic engine, its own difference between runs.
        const float slack = under.tolerance.deterministic ? 0.0f : std::fabs(want) * 1e-2f;
        ASSERT_LE(std::fabs(half.updates[i][k] - want), std::fabs(want) * ulp + subnormal + slack)
            << "param " << i << " element " << k;
      }
    }
  }
}

TEST_P(EngineContractTest, MeasuresOrthogonalityOfMuonUpdates) {
  const EngineUnderTest& under = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  ParamSpec spec = MuonSpec("w", {2, 24, 40});
  spec.hp.shape_scale = ShapeScale::kNone;
  const ParamSpec bias = AdamWSpec("b", {40});
  const ParamId w = h.Register(spec), b = h.Register(bias);
  const StepResult plain = h.Step({w, b}, {spec, bias}, {h.Gradient(spec), h.Gradient(bias)});
  ASSERT_THAT(plain.status, IsOk());
  EXPECT_TRUE(std::isnan(plain.orthogonality[0]));  // not asked for
  StepStats stats;
  const StepResult r = h.Step({w, b}, {spec, bias}, {h.Gradient(spec), h.Gradient(bias)},
                              std::nullopt, DType::kFloat32, {.measure_orthogonality = true});
  ASSERT_THAT(r.status, IsOk());
  EXPECT_TRUE(std::isnan(r.orthogonality[1]));  // AdamW
  // O = −update/lr (shape scale none); the mean over the two matrices of
  // ‖O·Oᵀ − I‖_F/√r, recomputed in float64.
  double want = 0;
  for (int e = 0; e < 2; ++e) {
    Matrix o{24, 40, {}};
    for (int k = 0; k < 24 * 40; ++k) o.v.push_back(-r.updates[0][e * 960 + k] / spec.hp.lr);
    Matrix gram = MatMul(o, o, /*transpose_b=*/true);
    double err = 0;
    for (int i = 0; i < 24; ++i) {
      for (int j = 0; j < 24; ++j) {
        const double d = gram.v[i * 24 + j] - (i == j ? 1.0 : 0.0);
        err += d * d;
      }
    }
    want += std::sqrt(err / 24) / 2;
  }
  EXPECT_GT(want, 1e-3);  // jordan does not converge: a real error to measure
  EXPECT_NEAR(r.orthogonality[0], want, under.tolerance.orthogonality);
}

TEST_P(EngineContractTest, StepStatsCountTheWork) {
  const EngineUnderTest& under = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  const ParamSpec a = MuonSpec("a", {16, 32}), e = MuonSpec("e", {3, 8, 4});
  const ParamSpec bias = AdamWSpec("b", {5});
  const ParamId ia = h.Register(a), ie = h.Register(e), ib = h.Register(bias);
  std::vector<std::vector<std::byte>> g, u;
  std::vector<GradientInput> in;
  std::vector<UpdateOutput> out;
  g.reserve(3);
  u.reserve(3);
  for (auto [id, spec] : {std::pair{ia, a}, std::pair{ie, e}, std::pair{ib, bias}}) {
    g.push_back(Encode(DType::kFloat32, h.Gradient(spec)));
    u.emplace_back(g.back().size());
    in.push_back({id, DType::kFloat32, g.back(), std::nullopt});
    out.push_back({id, DType::kFloat32, absl::MakeSpan(u.back())});
  }
  StepStats stats;
  ASSERT_THAT(h.engine().Step(in, absl::MakeSpan(out), {}, &stats), IsOk());
  EXPECT_EQ(stats.parameters, 3);
  EXPECT_EQ(stats.ns_flops, NsFlops({1, 16, 32}, 5) + NsFlops({3, 8, 4}, 5));
  EXPECT_EQ(NsFlops({1, 16, 32}, 5), 5 * (4 * 16 * 16 * 32 + 2 * 16 * 16 * 16));
}

// Compute's UpdateReadyFn: each output is reported once, before Compute
// returns, and what it holds when reported (bytes, decay, orthogonality
// error) is what the call leaves there, the same as a call told nothing.
TEST_P(EngineContractTest, ComputeReportsEachUpdateOnceWhenItIsFinal) {
  const EngineUnderTest& under = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  Harness twin(under, 0);
  ASSERT_THAT(twin.Start(), IsOk());
  // Two shape groups (one of two matrices) and AdamW parameters.
  const std::vector<ParamSpec> specs = {MuonSpec("a", {24, 40}), MuonSpec("b", {24, 40}),
                                        MuonSpec("c", {2, 16, 12}), AdamWSpec("d", {5000}),
                                        AdamWSpec("e", {7})};
  std::vector<ParamId> ids, twin_ids;
  std::vector<std::vector<float>> grads;
  for (const ParamSpec& spec : specs) {
    ids.push_back(h.Register(spec));
    twin_ids.push_back(twin.Register(spec));
    grads.push_back(h.Gradient(spec));
  }
  const StepOptions options{.measure_orthogonality = true};
  const StepResult want =
      twin.Step(twin_ids, specs, grads, std::nullopt, DType::kFloat32, options);
  ASSERT_THAT(want.status, IsOk());

  std::vector<std::vector<std::byte>> wire(specs.size()), updates(specs.size());
  std::vector<GradientInput> in;
  std::vector<UpdateOutput> out;
  for (size_t i = 0; i < specs.size(); ++i) {
    wire[i] = Encode(DType::kFloat32, grads[i]);
    updates[i].assign(wire[i].size(), std::byte{0x7f});
    in.push_back({ids[i], DType::kFloat32, wire[i], std::nullopt});
    out.push_back({ids[i], DType::kFloat32, absl::MakeSpan(updates[i])});
  }
  ReadyLog log;
  absl::StatusOr<std::unique_ptr<StepTransaction>> txn = h.engine().BeginStep(options);
  ASSERT_THAT(txn, IsOk());
  ASSERT_THAT((*txn)->Compute(in, absl::MakeSpan(out), nullptr,
                              [&](size_t i) { log.Add(i, out[i]); }),
              IsOk());
  const std::vector<ReadyLog::Entry> reported = log.Take();
  ASSERT_EQ(reported.size(), specs.size());  // all before Compute returned
  std::vector<int> times(specs.size(), 0);
  for (const ReadyLog::Entry& r : reported) {
    ASSERT_LT(r.index, specs.size());
    SCOPED_TRACE(specs[r.index].name);
    times[r.index] += 1;
    EXPECT_TRUE(r.bytes == updates[r.index]);
    EXPECT_EQ(r.decay, out[r.index].decay);
    EXPECT_EQ(std::isnan(r.orthogonality), std::isnan(out[r.index].orthogonality_error));
    if (!std::isnan(r.orthogonality)) {
      EXPECT_EQ(r.orthogonality, out[r.index].orthogonality_error);
    }
  }
  EXPECT_THAT(times, ::testing::Each(1));
  EXPECT_TRUE(std::isnan(out[3].orthogonality_error));  // AdamW
  EXPECT_FALSE(std::isnan(out[0].orthogonality_error));
  std::vector<std::vector<float>> got;
  for (size_t i = 0; i < specs.size(); ++i) {
    got.push_back(Decode(DType::kFloat32, updates[i]));
    EXPECT_EQ(out[i].decay, want.decays[i]);
  }
  ExpectSameUpdates(under.tolerance, under.tolerance.muon, got, want.updates);
  ASSERT_THAT((*txn)->Commit(), IsOk());

  // A call that fails never reports the parameter it failed on, nor any
  // output twice.
  for (size_t i = 0; i < specs.size(); ++i) {
    std::vector<float> g = h.Gradient(specs[i]);
    if (i == 3) g[17] = std::numeric_limits<float>::quiet_NaN();
    wire[i] = Encode(DType::kFloat32, g);
    in[i].bytes = wire[i];
  }
  absl::StatusOr<std::unique_ptr<StepTransaction>> failing = h.engine().BeginStep(options);
  ASSERT_THAT(failing, IsOk());
  EXPECT_THAT((*failing)->Compute(in, absl::MakeSpan(out), nullptr,
                                  [&](size_t i) { log.Add(i, out[i]); }),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("NaN")));
  std::fill(times.begin(), times.end(), 0);
  for (const ReadyLog::Entry& r : log.Take()) times[r.index] += 1;
  EXPECT_EQ(times[3], 0);
  EXPECT_THAT(times, ::testing::Each(::testing::Le(1)));
}

TEST_P(EngineContractTest, HyperParametersOutOfRangeAreRejectedWhereUnused) {
  const EngineUnderTest& under = GetParam();
  Harness h(under, 0);
  MUON_START_OR_SKIP(h, under);
  const int64_t base = h.engine().Memory().used_bytes;
  const auto reg = [&](bool muon, const std::function<void(ParamSpec&)>& edit) {
    ParamSpec spec = muon ? MuonSpec("p", {4, 4}) : AdamWSpec("p", {4});
    edit(spec);
    return h.engine().Register(spec);
  };
  const auto invalid = [](const char* field) {
    return StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(field));
  };
  // Muon fields on AdamW parameters and AdamW fields on Muon parameters.
  EXPECT_THAT(reg(false, [](ParamSpec& s) { s.hp.momentum = 1.5; }), invalid("momentum"));
  EXPECT_THAT(reg(false, [](ParamSpec& s) { s.hp.ns_steps = 0; }), invalid("ns_steps"));
  EXPECT_THAT(reg(false, [](ParamSpec& s) { s.hp.ns_steps = 101; }), invalid("ns_steps"));
  EXPECT_THAT(reg(true, [](ParamSpec& s) { s.hp.beta1 = 1.0; }), invalid("adam_beta1"));
  EXPECT_THAT(reg(true, [](ParamSpec& s) { s.hp.beta2 = -0.1; }), invalid("adam_beta2"));
  EXPECT_THAT(reg(true, [](ParamSpec& s) { s.hp.eps = 0; }), invalid("adam_eps"));
  EXPECT_THAT(reg(false, [](ParamSpec& s) { s.hp.ns_eps = 0; }), invalid("ns_eps"));
  EXPECT_THAT(reg(true, [](ParamSpec& s) { s.hp.ns_eps = std::nan(""); }), invalid("ns_eps"));
  EXPECT_THAT(reg(true, [](ParamSpec& s) { s.hp.ns_coefficients = {{3, -3, INFINITY}}; }),
              invalid("ns_coefficients step 0 is (3, -3, inf); every coefficient must be finite"));
  EXPECT_THAT(reg(true, [](ParamSpec& s) { s.hp.ns_coefficients = {{3, -3, 1}, {3, -3, 1}}; }),
              invalid("ns_coefficients has 2 per-step triples but ns_steps is 5"));
  EXPECT_THAT(reg(true, [](ParamSpec& s) { s.hp.ns_coefficients.assign(101, {3, -3, 1}); }),
              invalid("ns_coefficients' length is 101"));
  EXPECT_THAT(reg(true,
                  [](ParamSpec& s) {
                    s.hp.ns_coefficients = {{3, -3, 1}};
                    s.hp.ns_schedule = ScheduleKind::kPolarExpress;
                  }),
              invalid("ns_schedule is polar_express; leave ns_schedule unset"));
  EXPECT_THAT(reg(true, [](ParamSpec& s) {
                s.hp.ns_schedule = ScheduleKind::kSvd;
                s.hp.ns_steps = 0;
              }),
              invalid("ns_steps"));
  EXPECT_THAT(reg(true, [](ParamSpec& s) {
                s.hp.lr = 1e300;
                s.hp.weight_decay = 1e300;
              }),
              invalid("weight_decay"));
  // Enum values outside their definitions (a C++ caller can cast any int).
  EXPECT_THAT(reg(false, [](ParamSpec& s) { s.hp.shape_scale = static_cast<ShapeScale>(7); }),
              invalid("shape_scale"));
  EXPECT_THAT(reg(false, [](ParamSpec& s) { s.hp.momentum_form = static_cast<MomentumForm>(2); }),
              invalid("momentum_form"));
  EXPECT_THAT(reg(false, [](ParamSpec& s) { s.hp.ns_schedule = static_cast<ScheduleKind>(9); }),
              invalid("ns_schedule"));
  EXPECT_THAT(reg(true, [](ParamSpec& s) { s.dtype = static_cast<DType>(3); }), invalid("dtype"));
  EXPECT_THAT(reg(true, [](ParamSpec& s) { s.kind = static_cast<OptimizerKind>(2); }),
              invalid("kind"));
  EXPECT_EQ(h.engine().Memory().used_bytes, base);  // nothing was registered
}

TEST_P(EngineContractTest, DefaultBudgetIsTheMachinesMemory) {
  const EngineUnderTest& under = GetParam();
  Harness h(under, 0);
  MUON_START_OR_SKIP(h, under);
  EXPECT_GT(h.engine().Memory().budget_bytes, 0);
  // 10^12 elements: 8 TB of AdamW state, 4 TB of momentum. Refused, not a
  // crash, and the error says which setting to raise.
  for (const ParamSpec& spec : {AdamWSpec("huge", {1'000'000'000'000}),
                                MuonSpec("huge", {1'000'000, 1'000'000})}) {
    EXPECT_THAT(h.engine().Register(spec),
                StatusIs(absl::StatusCode::kResourceExhausted,
                         HasSubstr("EngineOptions::memory_budget_bytes")));
  }
  EXPECT_THAT(h.engine().Register(MuonSpec("w", {8, 8})), IsOk());
  Harness named(under, 0);
  ASSERT_THAT(named.Start({.memory_budget_setting = "--some_flag"}), IsOk());
  EXPECT_THAT(named.engine().Register(AdamWSpec("huge", {1'000'000'000'000})),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("--some_flag")));
  EXPECT_THAT(under.create({.memory_budget_bytes = -1}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST_P(EngineContractTest, StepThatWouldOverflowTheStateIsRefusedAndChangesNothing) {
  const EngineUnderTest& under = GetParam();
  const Seeded seeded;
  Harness h(under, seeded.seed);
  MUON_START_OR_SKIP(h, under);
  // Finite gradients near the fp32 maximum: the sum-form momentum's Nesterov
  // input g + β·B overflows on the first step, AdamW's g² at once.
  ParamSpec w = MuonSpec("w", {8, 6});
  w.hp.momentum_form = MomentumForm::kSum;
  ParamSpec held = MuonSpec("held", {6, 8});
  held.hold_weights = true;
  const ParamSpec b = AdamWSpec("b", {6});
  const ParamId iw = h.Register(w), iheld = h.Register(held), ib = h.Register(b);
  ASSERT_THAT(h.engine().SetWeights(iheld, std::vector<float>(48, 1.0f)), IsOk());
  // A committed first step, so the refused one has real state to keep.
  ASSERT_THAT(h.Step({iw, iheld, ib}, {w, held, b},
                     {h.Gradient(w), h.Gradient(held), h.Gradient(b)})
                  .status,
              IsOk());
  const ParamState before_w = h.State(iw), before_held = h.State(iheld), before_b = h.State(ib);
  const float big = 0.9f * std::numeric_limits<float>::max();
  const auto overflow = StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("non-finite"));
  EXPECT_THAT(h.Step({iw}, {w}, {std::vector<float>(48, big)}).status, overflow);
  EXPECT_THAT(h.Step({ib}, {b}, {std::vector<float>(6, big)}).status, overflow);
  // A finite update that would overflow the held weights.
  ASSERT_THAT(h.engine().SetWeights(iheld, std::vector<float>(48, big)), IsOk());
  const ParamState big_held = h.State(iheld);
  EXPECT_THAT(h.Step({iheld}, {held}, {h.Gradient(held)}, /*lr=*/1e38).status, overflow);
  ExpectSameState(under.tolerance, h.State(iw), before_w);
  ExpectSameState(under.tolerance, h.State(ib), before_b);
  ExpectSameState(under.tolerance, h.State(iheld), big_held);
  EXPECT_EQ(before_held.step, big_held.step);
  // The parameters stay usable: the next ordinary step commits.
  ASSERT_THAT(h.engine().SetWeights(iheld, std::vector<float>(48, 1.0f)), IsOk());
  const StepResult next = h.Step({iw, iheld, ib}, {w, held, b},
                                 {h.Gradient(w), h.Gradient(held), h.Gradient(b)});
  ASSERT_THAT(next.status, IsOk());
  EXPECT_EQ(h.State(iw).step, before_w.step + 1);
  for (const auto& u : next.updates) {
    EXPECT_TRUE(std::all_of(u.begin(), u.end(), [](float v) { return std::isfinite(v); }));
  }
}

}  // namespace muon::testing
