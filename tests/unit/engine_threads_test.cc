// The CPU engine's compute threads: updates and state are bit-identical for
// every thread count, a step shared by sessions stepping at once gives each
// session what it alone would get, and the worker pool runs each task once.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "muon/kernels/engine.h"
#include "muon/kernels/internal/step_math.h"
#include "muon/kernels/internal/worker_pool.h"
#include "muon/kernels/types.h"
#include "reference.h"
#include "status_matchers.h"

namespace muon::testing {
namespace {

using ::testing::HasSubstr;

// Muon matrices of several shapes (tall, wide, batched, a narrow dtype, held
// weights, the other schedules) and AdamW parameters, one longer than the
// engine's element chunk.
std::vector<ParamSpec> Specs() {
  std::vector<ParamSpec> specs;
  const auto muon = [&](std::string name, std::vector<int64_t> shape, DType dtype) {
    ParamSpec s;
    s.name = std::move(name);
    s.shape = std::move(shape);
    s.dtype = dtype;
    s.kind = OptimizerKind::kMuon;
    s.hp.weight_decay = 0.01;
    specs.push_back(s);
    return &specs.back();
  };
  muon("tall", {96, 40}, DType::kFloat32);
  muon("wide", {40, 96}, DType::kBFloat16);
  muon("batched", {3, 24, 16}, DType::kFloat16);
  muon("held", {32, 32}, DType::kFloat32)->hold_weights = true;
  muon("aol", {48, 20}, DType::kFloat32)->hp.ns_schedule = ScheduleKind::kAol;
  muon("svd", {20, 30}, DType::kFloat32)->hp.ns_schedule = ScheduleKind::kSvd;
  muon("tall2", {96, 40}, DType::kFloat32)->hp.nesterov = false;
  for (int64_t n : {int64_t{7}, int64_t{10000}}) {
    ParamSpec s;
    s.name = "adamw" + std::to_string(n);
    s.shape = {n};
    s.kind = OptimizerKind::kAdamW;
    s.hp.weight_decay = 0.1;
    s.hold_weights = n == 7;
    specs.push_back(s);
  }
  return specs;
}

struct Outcome {
  std::vector<std::vector<std::byte>> updates;  // every step's, in order
  std::vector<ParamState> states;
};

// Three steps of every spec on a fresh CPU engine with `threads` compute
// threads, on gradients drawn from `seed`.
Outcome Steps(int threads, uint64_t seed) {
  EngineOptions options;
  options.compute_threads = threads;
  options.blas_threads = 1;
  absl::StatusOr<std::unique_ptr<Engine>> engine = CreateCpuEngine(options);
  EXPECT_THAT(engine, IsOk());
  if (!engine.ok()) return {};
  const std::vector<ParamSpec> specs = Specs();
  std::vector<ParamId> ids;
  std::mt19937_64 rng(seed);
  for (const ParamSpec& s : specs) {
    absl::StatusOr<ParamId> id = (*engine)->Register(s);
    EXPECT_THAT(id, IsOk());
    ids.push_back(*id);
    if (s.hold_weights) {
      EXPECT_THAT((*engine)->SetWeights(*id, RandomNormal(NumElements(s.shape), rng)), IsOk());
    }
  }
  Outcome run;
  for (int step = 0; step < 3; ++step) {
    std::vector<std::vector<std::byte>> grads(specs.size());
    std::vector<GradientInput> in;
    std::vector<UpdateOutput> out;
    const size_t first = run.updates.size();
    run.updates.resize(first + specs.size());
    for (size_t i = 0; i < specs.size(); ++i) {
      const int64_t n = NumElements(specs[i].shape);
      const std::vector<float> g = RandomNormal(n, rng);
      grads[i].resize(n * DTypeSize(specs[i].dtype));
      EncodeFromFloat(specs[i].dtype, g.data(), n, grads[i].data());
      run.updates[first + i].resize(n * sizeof(float));
      in.push_back({ids[i], specs[i].dtype, grads[i], 0.02 + 0.01 * step});
      out.push_back({ids[i], DType::kFloat32, absl::MakeSpan(run.updates[first + i])});
    }
    EXPECT_THAT((*engine)->Step(in, absl::MakeSpan(out)), IsOk());
  }
  for (ParamId id : ids) {
    absl::StatusOr<ParamState> state = (*engine)->ExportState(id);
    EXPECT_THAT(state, IsOk());
    run.states.push_back(*std::move(state));
  }
  return run;
}

bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

TEST(CpuEngineThreads, UpdatesAndStateAreBitIdenticalForEveryThreadCount) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed: MUON_TEST_SEED=" + std::to_string(seed));
  const Outcome one = Steps(1, seed);
  ASSERT_FALSE(one.updates.empty());
  for (int threads : {2, 3, 8}) {
    SCOPED_TRACE("compute threads: " + std::to_string(threads));
    const Outcome many = Steps(threads, seed);
    ASSERT_EQ(many.updates.size(), one.updates.size());
    for (size_t i = 0; i < one.updates.size(); ++i) {
      EXPECT_EQ(many.updates[i], one.updates[i]) << "update " << i;
    }
    ASSERT_EQ(many.states.size(), one.states.size());
    for (size_t i = 0; i < one.states.size(); ++i) {
      EXPECT_EQ(many.states[i].step, one.states[i].step);
      EXPECT_TRUE(SameBits(many.states[i].momentum, one.states[i].momentum)) << i;
      EXPECT_TRUE(SameBits(many.states[i].exp_avg, one.states[i].exp_avg)) << i;
      EXPECT_TRUE(SameBits(many.states[i].exp_avg_sq, one.states[i].exp_avg_sq)) << i;
      EXPECT_TRUE(SameBits(many.states[i].weights, one.states[i].weights)) << i;
    }
  }
}

TEST(CpuEngineThreads, SessionsSteppingAtOnceGetWhatEachAloneGets) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed: MUON_TEST_SEED=" + std::to_string(seed));
  // Four callers share one engine's two compute threads, each stepping its
  // own parameters; each must see exactly a lone engine's results.
  EngineOptions options;
  options.compute_threads = 2;
  options.blas_threads = 1;
  absl::StatusOr<std::unique_ptr<Engine>> shared = CreateCpuEngine(options);
  ASSERT_THAT(shared, IsOk());
  const std::vector<ParamSpec> specs = Specs();
  constexpr int kCallers = 4;
  std::vector<std::vector<ParamId>> ids(kCallers);
  for (auto& mine : ids) {
    for (const ParamSpec& s : specs) {
      if (s.hold_weights) continue;  // weights would need seeding per caller
      absl::StatusOr<ParamId> id = (*shared)->Register(s);
      ASSERT_THAT(id, IsOk());
      mine.push_back(*id);
    }
  }
  std::vector<std::vector<std::vector<std::byte>>> got(kCallers);
  std::vector<std::thread> callers;
  std::vector<absl::Status> status(kCallers);
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      std::mt19937_64 rng(seed + c);
      std::vector<std::vector<std::byte>> grads;
      std::vector<GradientInput> in;
      std::vector<UpdateOutput> out;
      got[c].resize(ids[c].size());
      grads.resize(ids[c].size());
      size_t k = 0;
      for (const ParamSpec& s : specs) {
        if (s.hold_weights) continue;
        const int64_t n = NumElements(s.shape);
        const std::vector<float> g = RandomNormal(n, rng);
        grads[k].resize(n * DTypeSize(s.dtype));
        EncodeFromFloat(s.dtype, g.data(), n, grads[k].data());
        got[c][k].resize(n * sizeof(float));
        in.push_back({ids[c][k], s.dtype, grads[k], std::nullopt});
        out.push_back({ids[c][k], DType::kFloat32, absl::MakeSpan(got[c][k])});
        ++k;
      }
      status[c] = (*shared)->Step(in, absl::MakeSpan(out));
    });
  }
  for (std::thread& t : callers) t.join();
  for (int c = 0; c < kCallers; ++c) {
    SCOPED_TRACE("caller " + std::to_string(c));
    ASSERT_THAT(status[c], IsOk());
    options.compute_threads = 1;
    absl::StatusOr<std::unique_ptr<Engine>> alone = CreateCpuEngine(options);
    ASSERT_THAT(alone, IsOk());
    std::mt19937_64 rng(seed + c);
    size_t k = 0;
    for (const ParamSpec& s : specs) {
      if (s.hold_weights) continue;
      absl::StatusOr<ParamId> id = (*alone)->Register(s);
      ASSERT_THAT(id, IsOk());
      const int64_t n = NumElements(s.shape);
      const std::vector<float> g = RandomNormal(n, rng);
      std::vector<std::byte> grad(n * DTypeSize(s.dtype)), want(n * sizeof(float));
      EncodeFromFloat(s.dtype, g.data(), n, grad.data());
      GradientInput in{*id, s.dtype, grad, std::nullopt};
      UpdateOutput out{*id, DType::kFloat32, absl::MakeSpan(want)};
      ASSERT_THAT((*alone)->Step({&in, 1}, {&out, 1}), IsOk());
      EXPECT_EQ(got[c][k], want) << s.name;
      ++k;
    }
  }
}

// On one compute thread the parameters run one after another, largest
// first, and each is reported the moment it is done: when one is reported,
// the outputs of those still to come are untouched.
TEST(CpuEngineThreads, EachUpdateIsReportedAsItsParameterFinishes) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed: MUON_TEST_SEED=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  EngineOptions options;
  options.compute_threads = 1;
  options.blas_threads = 1;
  absl::StatusOr<std::unique_ptr<Engine>> engine = CreateCpuEngine(options);
  ASSERT_THAT(engine, IsOk());
  // Given smallest first; computed (and so reported) largest first.
  const std::vector<std::vector<int64_t>> shapes = {{300}, {8, 8}, {16, 24}, {40, 64}};
  std::vector<std::vector<std::byte>> grads(shapes.size()), outs(shapes.size());
  std::vector<GradientInput> in;
  std::vector<UpdateOutput> out;
  for (size_t i = 0; i < shapes.size(); ++i) {
    ParamSpec s;
    s.name = "p" + std::to_string(i);
    s.shape = shapes[i];
    s.kind = shapes[i].size() == 2 ? OptimizerKind::kMuon : OptimizerKind::kAdamW;
    absl::StatusOr<ParamId> id = (*engine)->Register(s);
    ASSERT_THAT(id, IsOk());
    const int64_t n = NumElements(s.shape);
    const std::vector<float> g = RandomNormal(n, rng);
    grads[i].resize(n * sizeof(float));
    std::memcpy(grads[i].data(), g.data(), grads[i].size());
    outs[i].assign(n * sizeof(float), std::byte{0xff});  // NaN until written
    in.push_back({*id, DType::kFloat32, grads[i], std::nullopt});
    out.push_back({*id, DType::kFloat32, absl::MakeSpan(outs[i])});
  }
  const auto untouched = [&](size_t i) {
    return std::all_of(outs[i].begin(), outs[i].end(),
                       [](std::byte b) { return b == std::byte{0xff}; });
  };
  std::vector<size_t> order;
  std::vector<bool> reported(shapes.size(), false);
  absl::StatusOr<std::unique_ptr<StepTransaction>> txn = (*engine)->BeginStep({});
  ASSERT_THAT(txn, IsOk());
  ASSERT_THAT((*txn)->Compute(in, absl::MakeSpan(out), nullptr,
                              [&](size_t i) {
                                reported[i] = true;
                                for (size_t k = 0; k < shapes.size(); ++k) {
                                  EXPECT_EQ(untouched(k), !reported[k])
                                      << "output " << k << " when " << i << " was reported";
                                }
                                order.push_back(i);
                              }),
              IsOk());
  EXPECT_EQ(order, (std::vector<size_t>{3, 2, 1, 0}));
}

// On several compute threads each update is reported once, from whichever
// thread finished it.
TEST(CpuEngineThreads, EveryUpdateIsReportedOnceFromTheComputeThreads) {
  EngineOptions options;
  options.compute_threads = 3;
  options.blas_threads = 1;
  absl::StatusOr<std::unique_ptr<Engine>> engine = CreateCpuEngine(options);
  ASSERT_THAT(engine, IsOk());
  const std::vector<ParamSpec> specs = Specs();
  std::mt19937_64 rng(FreshSeed());
  std::vector<std::vector<std::byte>> grads(specs.size()), outs(specs.size());
  std::vector<GradientInput> in;
  std::vector<UpdateOutput> out;
  for (size_t i = 0; i < specs.size(); ++i) {
    absl::StatusOr<ParamId> id = (*engine)->Register(specs[i]);
    ASSERT_THAT(id, IsOk());
    const int64_t n = NumElements(specs[i].shape);
    const std::vector<float> g = RandomNormal(n, rng);
    grads[i].resize(n * DTypeSize(specs[i].dtype));
    EncodeFromFloat(specs[i].dtype, g.data(), n, grads[i].data());
    outs[i].resize(n * sizeof(float));
    in.push_back({*id, specs[i].dtype, grads[i], std::nullopt});
    out.push_back({*id, DType::kFloat32, absl::MakeSpan(outs[i])});
  }
  std::vector<std::atomic<int>> times(specs.size());
  absl::StatusOr<std::unique_ptr<StepTransaction>> txn = (*engine)->BeginStep({});
  ASSERT_THAT(txn, IsOk());
  ASSERT_THAT(
      (*txn)->Compute(in, absl::MakeSpan(out), nullptr, [&](size_t i) { times[i] += 1; }),
      IsOk());
  for (size_t i = 0; i < specs.size(); ++i) EXPECT_EQ(times[i].load(), 1) << specs[i].name;
}

TEST(CpuEngineThreads, BadThreadSettingsAreRejected) {
  EngineOptions options;
  options.compute_threads = -1;
  EXPECT_THAT(CreateCpuEngine(options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("compute threads")));
  options.compute_threads = 2;
  options.blas_threads = 2;
  EXPECT_THAT(CreateCpuEngine(options),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("BLAS threads to 1")));
  options.compute_threads = 1;
  EXPECT_THAT(CreateCpuEngine(options), IsOk());
}

TEST(WorkerPool, RunsEveryTaskOnceForCallersAtOnce) {
  internal::WorkerPool pool(3);
  EXPECT_EQ(pool.threads(), 3);
  constexpr int kCallers = 5;
  constexpr size_t kTasks = 200;
  std::vector<std::vector<std::atomic<int>>> runs(kCallers);
  for (auto& r : runs) r = std::vector<std::atomic<int>>(kTasks);
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      for (int round = 0; round < 10; ++round) {
        pool.ParallelFor(kTasks, [&](size_t i) { runs[c][i].fetch_add(1); });
      }
    });
  }
  for (std::thread& t : callers) t.join();
  for (int c = 0; c < kCallers; ++c) {
    for (size_t i = 0; i < kTasks; ++i) EXPECT_EQ(runs[c][i].load(), 10) << c << " " << i;
  }
}

// The engine runs AdamW's float moments and its double quotient as two
// vectorized loops (step_math.h); every bit must still be what the scalar
// AdamWStep gives, element by element, over a length that is no multiple of
// the vector width or of the engine's chunk.
TEST(CpuEngineThreads, AdamWIsBitIdenticalToTheScalarStep) {
  const uint64_t seed = FreshSeed();
  SCOPED_TRACE("seed: MUON_TEST_SEED=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  EngineOptions options;
  options.compute_threads = 1;
  absl::StatusOr<std::unique_ptr<Engine>> engine = CreateCpuEngine(options);
  ASSERT_THAT(engine, IsOk());
  ParamSpec spec;
  spec.name = "adamw";
  spec.shape = {10007};
  spec.kind = OptimizerKind::kAdamW;
  absl::StatusOr<ParamId> id = (*engine)->Register(spec);
  ASSERT_THAT(id, IsOk());
  const int64_t n = NumElements(spec.shape);
  std::vector<float> m(n, 0.0f), v(n, 0.0f);
  for (int step = 1; step <= 3; ++step) {
    const double lr = 0.01 * step;
    const std::vector<float> g = RandomNormal(n, rng);
    std::vector<std::byte> update(n * sizeof(float));
    const GradientInput in{*id, DType::kFloat32,
                           {reinterpret_cast<const std::byte*>(g.data()), g.size() * sizeof(float)},
                           lr};
    UpdateOutput out{*id, DType::kFloat32, absl::MakeSpan(update)};
    ASSERT_THAT((*engine)->Step({&in, 1}, {&out, 1}), IsOk());
    const auto c = internal::MakeAdamWCoefficients<double>(spec.hp.beta1, spec.hp.beta2,
                                                           spec.hp.eps, lr, step);
    std::vector<float> want(n);
    for (int64_t k = 0; k < n; ++k) {
      want[k] = internal::AdamWStep(c, m[k], v[k], g[k], &m[k], &v[k]);
    }
    EXPECT_EQ(std::memcmp(update.data(), want.data(), update.size()), 0) << "step " << step;
  }
  absl::StatusOr<ParamState> state = (*engine)->ExportState(*id);
  ASSERT_THAT(state, IsOk());
  EXPECT_TRUE(SameBits(state->exp_avg, m));
  EXPECT_TRUE(SameBits(state->exp_avg_sq, v));
}

}  // namespace
}  // namespace muon::testing
