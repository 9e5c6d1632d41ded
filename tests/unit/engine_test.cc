// The Engine contract on the CPU engine, against float64 references.
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "muon/kernels/engine.h"
#include "muon/kernels/ns_schedule.h"
#include "reference.h"

namespace muon {
namespace {

// fp32 state and fp32 Newton–Schulz against float64: the error is fp32
// rounding (~6e-8) amplified by Newton–Schulz's gain on the smallest singular
// values; 1e-5 is the bound and holds with a margin.
constexpr double kMuonTolerance = 1e-5;
constexpr double kAdamTolerance = 1e-6;

std::vector<double> Decoded(DType dtype, const std::vector<float>& g) {
  std::vector<std::byte> bytes(g.size() * DTypeSize(dtype));
  EncodeFromFloat(dtype, g.data(), g.size(), bytes.data());
  std::vector<float> back(g.size());
  DecodeToFloat(dtype, bytes.data(), g.size(), back.data());
  return std::vector<double>(back.begin(), back.end());
}

// One parameter's wire buffers.
struct Buffers {
  std::vector<std::byte> grad;
  std::vector<std::byte> update;
  std::vector<float> Update(DType dtype) const {
    std::vector<float> out(update.size() / DTypeSize(dtype));
    DecodeToFloat(dtype, update.data(), out.size(), out.data());
    return out;
  }
};

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = testing::FreshSeed();
    rng_.seed(seed_);
    engine_ = *CreateCpuEngine({});
  }

  ParamId Register(const ParamSpec& spec, Engine* engine = nullptr) {
    absl::StatusOr<ParamId> id = (engine ? engine : engine_.get())->Register(spec);
    EXPECT_TRUE(id.ok()) << id.status();
    return *id;
  }

  // Runs one step over (id, spec, gradient) triples; returns the status and
  // fills updates (fp32) and decays.
  absl::Status Step(Engine* engine, const std::vector<ParamId>& ids,
                    const std::vector<ParamSpec>& specs, const std::vector<std::vector<float>>& g,
                    std::vector<std::vector<float>>* updates, std::vector<double>* decays = nullptr,
                    std::optional<double> lr = std::nullopt, DType out_dtype = DType::kFloat32) {
    std::vector<Buffers> buf(ids.size());
    std::vector<GradientInput> in;
    std::vector<UpdateOutput> out;
    for (size_t i = 0; i < ids.size(); ++i) {
      buf[i].grad.resize(g[i].size() * DTypeSize(specs[i].dtype));
      EncodeFromFloat(specs[i].dtype, g[i].data(), g[i].size(), buf[i].grad.data());
      buf[i].update.resize(g[i].size() * DTypeSize(out_dtype));
      in.push_back({ids[i], specs[i].dtype, buf[i].grad, lr});
      out.push_back({ids[i], out_dtype, absl::MakeSpan(buf[i].update)});
    }
    absl::Status s = engine->Step(in, absl::MakeSpan(out));
    if (updates) {
      updates->clear();
      for (auto& b : buf) updates->push_back(b.Update(out_dtype));
    }
    if (decays) {
      decays->clear();
      for (auto& o : out) decays->push_back(o.decay);
    }
    return s;
  }

  std::vector<float> Grad(const ParamSpec& spec) {
    return testing::RandomNormal(NumElements(spec.shape), rng_);
  }

  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
  std::unique_ptr<Engine> engine_;
};

struct MuonCase {
  const char* name;
  std::vector<int64_t> shape;
  HyperParams hp;
  DType dtype = DType::kFloat32;
  std::optional<double> lr;  // per-step override
};

HyperParams Hp(MomentumForm form, bool nesterov, ShapeScale scale, double wd,
               ScheduleKind kind = ScheduleKind::kJordan, int steps = 5) {
  HyperParams hp;
  hp.momentum_form = form;
  hp.nesterov = nesterov;
  hp.shape_scale = scale;
  hp.weight_decay = wd;
  hp.ns_schedule = kind;
  hp.ns_steps = steps;
  return hp;
}

TEST_F(EngineTest, TenMuonStepsMatchFloat64Reference) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  constexpr DType f32 = DType::kFloat32;
  const std::optional<double> same;
  const MuonCase cases[] = {
      {"ema_nesterov_spectral", {48, 32}, Hp(MomentumForm::kEma, true, ShapeScale::kSpectral, 0),
       f32, same},
      {"sum_plain_rms_wd", {32, 48}, Hp(MomentumForm::kSum, false, ShapeScale::kRmsMatch, 0.1),
       f32, same},
      {"none_polar", {40, 40},
       Hp(MomentumForm::kEma, true, ShapeScale::kNone, 0.01, ScheduleKind::kPolarExpress), f32,
       same},
      {"dion_tall", {64, 16},
       Hp(MomentumForm::kEma, true, ShapeScale::kSpectral, 0, ScheduleKind::kDion), f32, same},
      {"aol", {24, 40},
       Hp(MomentumForm::kEma, true, ShapeScale::kSpectral, 0, ScheduleKind::kAol, 4), f32, same},
      {"batch3d", {3, 16, 24}, Hp(MomentumForm::kEma, true, ShapeScale::kSpectral, 0), f32, same},
      {"conv4d", {8, 2, 3, 3}, Hp(MomentumForm::kEma, true, ShapeScale::kSpectral, 0), f32, same},
      {"bf16", {32, 32}, Hp(MomentumForm::kEma, true, ShapeScale::kSpectral, 0),
       DType::kBFloat16, same},
      {"fp16", {32, 32}, Hp(MomentumForm::kEma, true, ShapeScale::kSpectral, 0), DType::kFloat16,
       same},
      {"lr_override", {32, 24}, Hp(MomentumForm::kEma, true, ShapeScale::kSpectral, 0.1), f32,
       0.005},
  };

  for (const MuonCase& c : cases) {
    SCOPED_TRACE(c.name);
    ParamSpec spec{c.name, c.shape, c.dtype, OptimizerKind::kMuon, c.hp, false};
    const ParamId id = Register(spec);
    const NsCoefficients coeffs = *MakeNsCoefficients(c.hp.ns_schedule, c.hp.ns_steps);
    testing::MuonRef ref{c.hp, MatrixViewOf(c.shape), {}, coeffs.steps, coeffs.norm_safety,
                         coeffs.aol};
    for (int step = 0; step < 10; ++step) {
      const std::vector<float> g = Grad(spec);
      std::vector<std::vector<float>> updates;
      std::vector<double> decays;
      ASSERT_TRUE(Step(engine_.get(), {id}, {spec}, {g}, &updates, &decays, c.lr).ok());
      double decay = 0;
      const std::vector<double> want =
          ref.Step(Decoded(c.dtype, g), c.lr.value_or(c.hp.lr), &decay);
      EXPECT_LT(testing::RelativeError(updates[0], want), kMuonTolerance) << "step " << step;
      EXPECT_DOUBLE_EQ(decays[0], decay);
    }
  }
}

TEST_F(EngineTest, TenAdamWStepsMatchFloat64Reference) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  HyperParams hp;
  hp.lr = 1e-3;
  hp.weight_decay = 0.05;
  hp.beta1 = 0.85;
  hp.beta2 = 0.99;
  hp.eps = 1e-6;
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    ParamSpec spec{"bias", {100}, dtype, OptimizerKind::kAdamW, hp, false};
    const ParamId id = Register(spec);
    testing::AdamWRef ref{hp, {}, {}, 0};
    for (int step = 0; step < 10; ++step) {
      const std::vector<float> g = Grad(spec);
      std::vector<std::vector<float>> updates;
      std::vector<double> decays;
      ASSERT_TRUE(Step(engine_.get(), {id}, {spec}, {g}, &updates, &decays).ok());
      double decay = 0;
      const std::vector<double> want = ref.Step(Decoded(dtype, g), hp.lr, &decay);
      EXPECT_LT(testing::RelativeError(updates[0], want), kAdamTolerance) << "step " << step;
      EXPECT_DOUBLE_EQ(decays[0], decay);
    }
  }
}

TEST_F(EngineTest, HeldWeightsFollowDecayAndUpdate) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  ParamSpec spec{"w", {24, 16}, DType::kFloat32, OptimizerKind::kMuon,
                 Hp(MomentumForm::kEma, true, ShapeScale::kSpectral, 0.1), true};
  const ParamId id = Register(spec);
  std::vector<float> w = Grad(spec);
  ASSERT_TRUE(engine_->SetWeights(id, w).ok());
  std::vector<double> want(w.begin(), w.end());
  for (int step = 0; step < 10; ++step) {
    std::vector<std::vector<float>> updates;
    std::vector<double> decays;
    ASSERT_TRUE(Step(engine_.get(), {id}, {spec}, {Grad(spec)}, &updates, &decays).ok());
    for (size_t k = 0; k < want.size(); ++k) want[k] = decays[0] * want[k] + updates[0][k];
  }
  std::vector<float> got(w.size());
  ASSERT_TRUE(engine_->GetWeights(id, absl::MakeSpan(got)).ok());
  EXPECT_LT(testing::RelativeError(got, want), 1e-6);
}

TEST_F(EngineTest, Bfloat16UpdatesAreRoundedFp32Updates) {
  ParamSpec spec{"w", {32, 32}, DType::kFloat32, OptimizerKind::kMuon, HyperParams{}, false};
  auto twin = *CreateCpuEngine({});
  const ParamId a = Register(spec), b = Register(spec, twin.get());
  const std::vector<float> g = Grad(spec);
  std::vector<std::vector<float>> full, half;
  ASSERT_TRUE(Step(engine_.get(), {a}, {spec}, {g}, &full).ok());
  ASSERT_TRUE(Step(twin.get(), {b}, {spec}, {g}, &half, nullptr, std::nullopt,
                   DType::kBFloat16).ok());
  for (size_t k = 0; k < full[0].size(); ++k) {
    EXPECT_LE(std::fabs(half[0][k] - full[0][k]), std::fabs(full[0][k]) / 256) << k;
  }
}

// Bad inputs: the specific code, and no state change (the next good step
// equals that of an engine that never saw the bad one).
TEST_F(EngineTest, BadInputsAreRejectedAndChangeNothing) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  ParamSpec spec{"w", {16, 12}, DType::kFloat32, OptimizerKind::kMuon, HyperParams{}, false};
  ParamSpec bias{"b", {12}, DType::kFloat32, OptimizerKind::kAdamW, HyperParams{}, false};
  auto clean = *CreateCpuEngine({});
  const ParamId w = Register(spec), b = Register(bias);
  const ParamId cw = Register(spec, clean.get()), cb = Register(bias, clean.get());
  std::vector<std::vector<float>> got, want;
  const auto g0 = Grad(spec), b0 = Grad(bias);
  ASSERT_TRUE(Step(engine_.get(), {w, b}, {spec, bias}, {g0, b0}, &got).ok());
  ASSERT_TRUE(Step(clean.get(), {cw, cb}, {spec, bias}, {g0, b0}, &want).ok());

  const std::vector<float> good = Grad(spec), good_b = Grad(bias);
  std::vector<float> nan = good;
  nan[5] = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> inf = good;
  inf[7] = -std::numeric_limits<float>::infinity();
  std::vector<std::byte> gbytes(good.size() * 4), ub(good.size() * 4), short_bytes(10);
  std::memcpy(gbytes.data(), good.data(), gbytes.size());
  const auto run = [&](std::vector<GradientInput> in) {
    std::vector<std::vector<std::byte>> outs(in.size());
    std::vector<UpdateOutput> out;
    for (size_t i = 0; i < in.size(); ++i) {
      outs[i].resize(in[i].param == b ? 12 * 4 : 16 * 12 * 4);
      out.push_back({in[i].param, DType::kFloat32, absl::MakeSpan(outs[i])});
    }
    return engine_->Step(in, absl::MakeSpan(out)).code();
  };
  std::vector<std::byte> nan_bytes(gbytes.size()), inf_bytes(gbytes.size()), bf16(good.size() * 2);
  std::memcpy(nan_bytes.data(), nan.data(), nan_bytes.size());
  std::memcpy(inf_bytes.data(), inf.data(), inf_bytes.size());
  std::vector<std::byte> bbytes(12 * 4);
  std::memcpy(bbytes.data(), good_b.data(), bbytes.size());
  // Each includes the valid bias gradient too: it must not be applied either.
  const GradientInput ok_bias{b, DType::kFloat32, bbytes, {}};
  EXPECT_EQ(run({ok_bias, {w, DType::kFloat32, nan_bytes, {}}}), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(run({ok_bias, {w, DType::kFloat32, inf_bytes, {}}}), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(run({ok_bias, {w, DType::kBFloat16, bf16, {}}}), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(run({ok_bias, {w, DType::kFloat32, short_bytes, {}}}),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(run({ok_bias, {w, DType::kFloat32, {}, {}}}), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(run({ok_bias, {999, DType::kFloat32, gbytes, {}}}), absl::StatusCode::kNotFound);
  EXPECT_EQ(run({ok_bias, {w, DType::kFloat32, gbytes, {}}, {w, DType::kFloat32, gbytes, {}}}),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(run({ok_bias, {w, DType::kFloat32, gbytes, -1.0}}), absl::StatusCode::kInvalidArgument);

  ASSERT_TRUE(Step(engine_.get(), {w, b}, {spec, bias}, {good, good_b}, &got).ok());
  ASSERT_TRUE(Step(clean.get(), {cw, cb}, {spec, bias}, {good, good_b}, &want).ok());
  EXPECT_EQ(got, want);
  EXPECT_EQ(engine_->ExportState(w)->step, 2);
}

TEST_F(EngineTest, BadSpecsAreRejected) {
  const auto code = [&](std::vector<int64_t> shape, OptimizerKind kind, HyperParams hp = {}) {
    return engine_->Register({"p", shape, DType::kFloat32, kind, hp, false}).status().code();
  };
  EXPECT_EQ(code({}, OptimizerKind::kAdamW), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({0, 4}, OptimizerKind::kMuon), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({-3}, OptimizerKind::kAdamW), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({8}, OptimizerKind::kMuon), absl::StatusCode::kInvalidArgument);
  HyperParams hp;
  hp.momentum = 1.5;
  EXPECT_EQ(code({4, 4}, OptimizerKind::kMuon, hp), absl::StatusCode::kInvalidArgument);
  hp = {};
  hp.ns_steps = 0;
  EXPECT_EQ(code({4, 4}, OptimizerKind::kMuon, hp), absl::StatusCode::kInvalidArgument);
  hp = {};
  hp.lr = std::nan("");
  EXPECT_EQ(code({4}, OptimizerKind::kAdamW, hp), absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineTest, ZeroGradientGivesZeroUpdate) {
  for (ScheduleKind kind : {ScheduleKind::kJordan, ScheduleKind::kPolarExpress,
                            ScheduleKind::kAol, ScheduleKind::kSvd}) {
    HyperParams hp;
    hp.ns_schedule = kind;
    hp.ns_steps = 4;
    ParamSpec spec{"w", {8, 6}, DType::kFloat32, OptimizerKind::kMuon, hp, false};
    ParamSpec bias{"b", {6}, DType::kFloat32, OptimizerKind::kAdamW, hp, false};
    const ParamId w = Register(spec), b = Register(bias);
    std::vector<std::vector<float>> updates;
    ASSERT_TRUE(Step(engine_.get(), {w, b}, {spec, bias},
                     {std::vector<float>(48, 0.0f), std::vector<float>(6, 0.0f)}, &updates)
                    .ok());
    for (const auto& u : updates) {
      for (float v : u) EXPECT_EQ(v, 0.0f) << ScheduleName(kind);
    }
  }
}

TEST_F(EngineTest, LeftOutParameterKeepsItsState) {
  ParamSpec spec{"w", {8, 8}, DType::kFloat32, OptimizerKind::kMuon, HyperParams{}, false};
  const ParamId a = Register(spec), b = Register(spec);
  std::vector<std::vector<float>> updates;
  ASSERT_TRUE(Step(engine_.get(), {a, b}, {spec, spec}, {Grad(spec), Grad(spec)}, &updates).ok());
  const ParamState before = *engine_->ExportState(b);
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(Step(engine_.get(), {a}, {spec}, {Grad(spec)}, &updates).ok());
  }
  const ParamState after = *engine_->ExportState(b);
  EXPECT_EQ(after.step, 1);
  EXPECT_EQ(after.momentum, before.momentum);
  EXPECT_EQ(engine_->ExportState(a)->step, 4);
}

TEST_F(EngineTest, UncommittedTransactionChangesNothing) {
  ParamSpec spec{"w", {8, 8}, DType::kFloat32, OptimizerKind::kMuon, HyperParams{}, false};
  const ParamId id = Register(spec);
  std::vector<std::vector<float>> updates;
  ASSERT_TRUE(Step(engine_.get(), {id}, {spec}, {Grad(spec)}, &updates).ok());
  const ParamState before = *engine_->ExportState(id);
  {
    auto txn = *engine_->BeginStep({});
    std::vector<float> g = Grad(spec);
    std::vector<std::byte> out(g.size() * 4);
    GradientInput in{id, DType::kFloat32,
                     absl::Span<const std::byte>(reinterpret_cast<const std::byte*>(g.data()),
                                                 g.size() * 4),
                     {}};
    UpdateOutput o{id, DType::kFloat32, absl::MakeSpan(out)};
    ASSERT_TRUE(txn->Compute({&in, 1}, {&o, 1}, nullptr).ok());
    // While the step is open the parameter is busy for everyone else.
    EXPECT_EQ(engine_->Unregister(id).code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(engine_->ImportState(id, before).code(), absl::StatusCode::kFailedPrecondition);
  }
  const ParamState after = *engine_->ExportState(id);
  EXPECT_EQ(after.step, before.step);
  EXPECT_EQ(after.momentum, before.momentum);
}

TEST_F(EngineTest, ExportImportContinuesBitIdentically) {
  ParamSpec spec{"w", {12, 10}, DType::kFloat32, OptimizerKind::kMuon, HyperParams{}, true};
  ParamSpec bias{"b", {10}, DType::kFloat32, OptimizerKind::kAdamW, HyperParams{}, false};
  const ParamId w = Register(spec), b = Register(bias);
  std::vector<std::vector<float>> updates, restored_updates;
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(Step(engine_.get(), {w, b}, {spec, bias}, {Grad(spec), Grad(bias)}, &updates).ok());
  }
  auto restored = *CreateCpuEngine({});
  const ParamId rw = Register(spec, restored.get()), rb = Register(bias, restored.get());
  ASSERT_TRUE(restored->ImportState(rw, *engine_->ExportState(w)).ok());
  ASSERT_TRUE(restored->ImportState(rb, *engine_->ExportState(b)).ok());
  const auto g = Grad(spec), gb = Grad(bias);
  ASSERT_TRUE(Step(engine_.get(), {w, b}, {spec, bias}, {g, gb}, &updates).ok());
  ASSERT_TRUE(Step(restored.get(), {rw, rb}, {spec, bias}, {g, gb}, &restored_updates).ok());
  EXPECT_EQ(updates, restored_updates);
  EXPECT_EQ(engine_->ExportState(w)->weights, restored->ExportState(rw)->weights);

  ParamState wrong = *engine_->ExportState(w);
  wrong.momentum.pop_back();
  EXPECT_EQ(restored->ImportState(rw, wrong).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineTest, MemoryBudgetIsEnforced) {
  auto small = *CreateCpuEngine({.memory_budget_bytes = 1000});
  ParamSpec spec{"w", {10, 10}, DType::kFloat32, OptimizerKind::kMuon, HyperParams{}, false};
  ASSERT_TRUE(small->Register(spec).ok());  // 400 bytes
  ASSERT_TRUE(small->Register(spec).ok());  // 800
  const absl::Status over = small->Register(spec).status();
  EXPECT_EQ(over.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(over.message().find("budget"), absl::string_view::npos) << over;
  EXPECT_EQ(small->Memory().used_bytes, 800);
  EXPECT_EQ(small->Memory().budget_bytes, 1000);
}

TEST_F(EngineTest, MeasuresOrthogonality) {
  ParamSpec spec{"w", {16, 32}, DType::kFloat32, OptimizerKind::kMuon, HyperParams{}, false};
  const ParamId id = Register(spec);
  std::vector<float> g = Grad(spec);
  std::vector<std::byte> out(g.size() * 4);
  GradientInput in{id, DType::kFloat32,
                   absl::Span<const std::byte>(reinterpret_cast<const std::byte*>(g.data()),
                                               g.size() * 4),
                   {}};
  UpdateOutput o{id, DType::kFloat32, absl::MakeSpan(out)};
  StepStats stats;
  ASSERT_TRUE(engine_->Step({&in, 1}, {&o, 1}, {.measure_orthogonality = true}, &stats).ok());
  EXPECT_GT(o.orthogonality_error, 0.0);
  EXPECT_LT(o.orthogonality_error, 0.5);
  EXPECT_EQ(stats.ns_flops, NsFlops({1, 16, 32}, 5));
  EXPECT_EQ(stats.parameters, 1);
}

}  // namespace
}  // namespace muon
