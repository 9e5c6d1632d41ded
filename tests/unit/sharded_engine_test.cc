// The sharded engine (several engines behind one, as for several GPUs) over
// CPU engines: the same updates and state bit for bit as one CPU engine,
// placement balanced by cost, and a failing call keeps nothing on any shard.
#include "muon/kernels/sharded_engine.h"

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace muon {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<Engine> Sharded(int shards) {
  std::vector<std::unique_ptr<Engine>> engines;
  for (int i = 0; i < shards; ++i) engines.push_back(*CreateCpuEngine({.blas_threads = 1}));
  return *CreateShardedEngine(std::move(engines));
}

std::vector<ParamSpec> Specs() {
  std::vector<ParamSpec> specs;
  const std::vector<std::vector<int64_t>> shapes = {
      {64, 256}, {64, 64}, {256, 64}, {64, 256}, {3, 16, 24}, {32}, {128, 128}, {100}};
  for (size_t i = 0; i < shapes.size(); ++i) {
    ParamSpec s;
    s.name = absl::StrCat("p", i);
    s.shape = shapes[i];
    s.kind = shapes[i].size() >= 2 ? OptimizerKind::kMuon : OptimizerKind::kAdamW;
    s.hp.weight_decay = 0.01;
    s.hold_weights = i % 3 == 0;
    s.hp.ns_schedule = i % 2 == 0 ? ScheduleKind::kJordan : ScheduleKind::kAol;
    s.hp.ns_steps = i % 2 == 0 ? 5 : 4;
    specs.push_back(s);
  }
  return specs;
}

struct Step {
  std::vector<std::vector<float>> grads;
  std::vector<std::vector<std::byte>> bytes, out;
  std::vector<GradientInput> in;
  std::vector<UpdateOutput> up;
};

Step MakeStep(const std::vector<ParamSpec>& specs, const std::vector<ParamId>& ids,
              std::mt19937& rng) {
  Step s;
  std::normal_distribution<float> normal;
  for (size_t i = 0; i < specs.size(); ++i) {
    std::vector<float> g(NumElements(specs[i].shape));
    for (float& v : g) v = normal(rng);
    s.bytes.emplace_back(g.size() * 4);
    std::memcpy(s.bytes.back().data(), g.data(), s.bytes.back().size());
    s.out.emplace_back(g.size() * 4);
    s.grads.push_back(std::move(g));
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    s.in.push_back({ids[i], DType::kFloat32, s.bytes[i], std::nullopt});
    s.up.push_back({ids[i], DType::kFloat32, absl::MakeSpan(s.out[i])});
  }
  return s;
}

std::vector<ParamId> RegisterAll(Engine& engine, const std::vector<ParamSpec>& specs) {
  std::vector<ParamId> ids;
  for (const ParamSpec& s : specs) {
    absl::StatusOr<ParamId> id = engine.Register(s);
    EXPECT_TRUE(id.ok()) << id.status();
    ids.push_back(id.value_or(0));
  }
  return ids;
}

TEST(ShardedEngineTest, MatchesOneEngineBitForBit) {
  const std::vector<ParamSpec> specs = Specs();
  std::unique_ptr<Engine> one = *CreateCpuEngine({.blas_threads = 1});
  std::unique_ptr<Engine> three = Sharded(3);
  EXPECT_EQ(three->name(), "cpu");
  const std::vector<ParamId> a = RegisterAll(*one, specs), b = RegisterAll(*three, specs);
  std::vector<int> used(3, 0);
  for (ParamId id : b) used[*ShardOf(*three, id)] += 1;
  EXPECT_GT(used[0], 0);
  EXPECT_GT(used[1], 0);
  EXPECT_GT(used[2], 0);
  std::mt19937 rng(7);
  for (int step = 0; step < 3; ++step) {
    std::mt19937 twin = rng;
    Step sa = MakeStep(specs, a, rng), sb = MakeStep(specs, b, twin);
    StepStats stats;
    ASSERT_TRUE(one->Step(sa.in, absl::MakeSpan(sa.up), {.measure_orthogonality = true}).ok());
    ASSERT_TRUE(
        three->Step(sb.in, absl::MakeSpan(sb.up), {.measure_orthogonality = true}, &stats).ok());
    EXPECT_EQ(stats.parameters, static_cast<int64_t>(specs.size()));
    for (size_t i = 0; i < specs.size(); ++i) {
      SCOPED_TRACE(specs[i].name);
      EXPECT_EQ(sa.out[i], sb.out[i]);
      EXPECT_EQ(sa.up[i].decay, sb.up[i].decay);
      if (specs[i].kind == OptimizerKind::kMuon) {
        EXPECT_EQ(sa.up[i].orthogonality_error, sb.up[i].orthogonality_error);
      }
    }
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    absl::StatusOr<ParamState> sa = one->ExportState(a[i]), sb = three->ExportState(b[i]);
    ASSERT_TRUE(sa.ok() && sb.ok());
    EXPECT_EQ(sa->step, sb->step);
    EXPECT_EQ(sa->momentum, sb->momentum);
    EXPECT_EQ(sa->exp_avg_sq, sb->exp_avg_sq);
    EXPECT_EQ(sa->weights, sb->weights);
  }
  EXPECT_EQ(three->Memory().used_bytes, one->Memory().used_bytes);
}

TEST(ShardedEngineTest, ComputedWeightsComeFromTheShardThatComputedThem) {
  std::vector<ParamSpec> specs = Specs();
  for (ParamSpec& s : specs) s.hold_weights = true;
  std::unique_ptr<Engine> one = *CreateCpuEngine({.blas_threads = 1});
  std::unique_ptr<Engine> three = Sharded(3);
  const std::vector<ParamId> a = RegisterAll(*one, specs), b = RegisterAll(*three, specs);
  std::mt19937 rng(13);
  std::mt19937 twin = rng;
  Step sa = MakeStep(specs, a, rng), sb = MakeStep(specs, b, twin);
  ASSERT_TRUE(one->Step(sa.in, absl::MakeSpan(sa.up)).ok());
  absl::StatusOr<std::unique_ptr<StepTransaction>> txn = three->BeginStep({});
  ASSERT_TRUE(txn.ok());
  // Two calls, so the parameters' parts are different inner transactions.
  const size_t half = specs.size() / 2;
  ASSERT_TRUE((*txn)->Compute(absl::MakeConstSpan(sb.in).subspan(0, half),
                              absl::MakeSpan(sb.up).subspan(0, half), nullptr)
                  .ok());
  std::vector<float> got(NumElements(specs[half].shape));
  EXPECT_EQ((*txn)->ComputedWeights(b[half], absl::MakeSpan(got)).code(),
            absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE((*txn)->Compute(absl::MakeConstSpan(sb.in).subspan(half),
                              absl::MakeSpan(sb.up).subspan(half), nullptr)
                  .ok());
  for (size_t i = 0; i < specs.size(); ++i) {
    SCOPED_TRACE(specs[i].name);
    std::vector<float> computed(NumElements(specs[i].shape)), want(computed.size());
    ASSERT_TRUE((*txn)->ComputedWeights(b[i], absl::MakeSpan(computed)).ok());
    ASSERT_TRUE(one->GetWeights(a[i], absl::MakeSpan(want)).ok());
    EXPECT_EQ(computed, want);
  }
  EXPECT_EQ((*txn)->ComputedWeights(12345, absl::MakeSpan(got)).code(),
            absl::StatusCode::kNotFound);
  ASSERT_TRUE((*txn)->Commit().ok());
  EXPECT_EQ((*txn)->ComputedWeights(b[0], absl::MakeSpan(got)).code(),
            absl::StatusCode::kFailedPrecondition);
}

// Each engine's reports reach the caller under the caller's indices, with
// the decay and orthogonality error already in the caller's outputs.
TEST(ShardedEngineTest, PassesEachReportedUpdateOnWithItsResults) {
  const std::vector<ParamSpec> specs = Specs();
  std::unique_ptr<Engine> one = *CreateCpuEngine({.blas_threads = 1});
  std::unique_ptr<Engine> three = Sharded(3);
  const std::vector<ParamId> a = RegisterAll(*one, specs), b = RegisterAll(*three, specs);
  std::mt19937 rng(13);
  std::mt19937 twin = rng;
  Step sa = MakeStep(specs, a, rng), sb = MakeStep(specs, b, twin);
  ASSERT_TRUE(one->Step(sa.in, absl::MakeSpan(sa.up), {.measure_orthogonality = true}).ok());
  std::unique_ptr<StepTransaction> txn = *three->BeginStep({.measure_orthogonality = true});
  absl::Mutex mu;
  std::vector<int> times(specs.size(), 0);
  const absl::Status status = txn->Compute(sb.in, absl::MakeSpan(sb.up), nullptr, [&](size_t i) {
    absl::MutexLock lock(&mu);
    times[i] += 1;
    // What the caller sees when told: the one engine's final results.
    EXPECT_EQ(sb.out[i], sa.out[i]) << specs[i].name;
    EXPECT_EQ(sb.up[i].decay, sa.up[i].decay) << specs[i].name;
    if (specs[i].kind == OptimizerKind::kMuon) {
      EXPECT_EQ(sb.up[i].orthogonality_error, sa.up[i].orthogonality_error) << specs[i].name;
    }
  });
  ASSERT_TRUE(status.ok()) << status;
  absl::MutexLock lock(&mu);
  EXPECT_EQ(times, std::vector<int>(specs.size(), 1));
}

TEST(ShardedEngineTest, StatsSplitComputeSecondsByEngine) {
  const std::vector<ParamSpec> specs = Specs();
  std::unique_ptr<Engine> three = Sharded(3);
  const std::vector<ParamId> ids = RegisterAll(*three, specs);
  std::mt19937 rng(11);
  Step s = MakeStep(specs, ids, rng);
  // First call: the parameters of engines 0 and 1; engine 2's in a second.
  std::vector<GradientInput> in_a, in_b;
  std::vector<UpdateOutput> up_a, up_b;
  for (size_t i = 0; i < specs.size(); ++i) {
    const bool last = *ShardOf(*three, ids[i]) == 2;
    (last ? in_b : in_a).push_back(s.in[i]);
    (last ? up_b : up_a).push_back(s.up[i]);
  }
  ASSERT_FALSE(in_a.empty());
  ASSERT_FALSE(in_b.empty());
  std::unique_ptr<StepTransaction> txn = *three->BeginStep({});
  StepStats first;
  ASSERT_TRUE(txn->Compute(in_a, absl::MakeSpan(up_a), &first).ok());
  ASSERT_EQ(first.device_compute_seconds.size(), 3u);
  EXPECT_GT(first.device_compute_seconds[0], 0);
  EXPECT_GT(first.device_compute_seconds[1], 0);
  EXPECT_EQ(first.device_compute_seconds[2], 0);
  // The merged figure is the longest engine's: they run at the same time.
  EXPECT_EQ(first.compute_seconds,
            std::max(first.device_compute_seconds[0], first.device_compute_seconds[1]));

  StepStats both = first;
  StepStats second;
  ASSERT_TRUE(txn->Compute(in_b, absl::MakeSpan(up_b), &second).ok());
  both += second;
  ASSERT_TRUE(txn->Commit().ok());
  ASSERT_EQ(second.device_compute_seconds.size(), 3u);
  EXPECT_EQ(second.device_compute_seconds[0], 0);
  EXPECT_EQ(second.device_compute_seconds[1], 0);
  EXPECT_GT(second.device_compute_seconds[2], 0);
  EXPECT_EQ(second.compute_seconds, second.device_compute_seconds[2]);
  // A step's figures add up entry by entry over its Compute calls.
  for (int d = 0; d < 3; ++d) {
    EXPECT_EQ(both.device_compute_seconds[d],
              first.device_compute_seconds[d] + second.device_compute_seconds[d]);
  }

  // One engine alone reports no per-device split.
  std::unique_ptr<Engine> one = *CreateCpuEngine({.blas_threads = 1});
  const std::vector<ParamId> alone = RegisterAll(*one, specs);
  std::mt19937 again(11);
  Step t = MakeStep(specs, alone, again);
  StepStats plain;
  ASSERT_TRUE(one->Step(t.in, absl::MakeSpan(t.up), {}, &plain).ok());
  EXPECT_GT(plain.compute_seconds, 0);
  EXPECT_TRUE(plain.device_compute_seconds.empty());
}

TEST(ShardedEngineTest, PlacesByCost) {
  std::unique_ptr<Engine> two = Sharded(2);
  ParamSpec big;
  big.name = "big";
  big.shape = {512, 2048};
  ParamSpec small = big;
  small.name = "small";
  small.shape = {64, 256};
  // The big one takes a shard; every small one then goes to the other until
  // their cost adds up to the big one's.
  const ParamId first = *two->Register(big);
  const int big_shard = *ShardOf(*two, first);
  for (int i = 0; i < 5; ++i) {
    const ParamId id = *two->Register(small);
    EXPECT_NE(*ShardOf(*two, id), big_shard) << i;
  }
  EXPECT_GT(PlacementCost(big), 5 * PlacementCost(small));
  EXPECT_THAT(ShardOf(*two, 999).status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(ShardOf(**CreateCpuEngine({}), first).status().code(),
              absl::StatusCode::kInvalidArgument);
}

TEST(ShardedEngineTest, FailingCallKeepsNothingOnAnyShard) {
  const std::vector<ParamSpec> specs = Specs();
  std::unique_ptr<Engine> three = Sharded(3), twin = Sharded(3);
  const std::vector<ParamId> ids = RegisterAll(*three, specs);
  RegisterAll(*twin, specs);
  std::mt19937 rng(11);
  Step bad = MakeStep(specs, ids, rng);
  // A NaN in the last parameter: its shard refuses, the others computed.
  const float nan = std::nanf("");
  std::memcpy(bad.bytes.back().data(), &nan, 4);
  {
    absl::StatusOr<std::unique_ptr<StepTransaction>> txn = three->BeginStep({});
    ASSERT_TRUE(txn.ok());
    EXPECT_EQ((*txn)->Compute(bad.in, absl::MakeSpan(bad.up), nullptr).code(),
              absl::StatusCode::kInvalidArgument);
    // Nothing of the failed call is kept: the same parameters compute again.
    std::mt19937 again(12);
    Step good = MakeStep(specs, ids, again);
    ASSERT_TRUE((*txn)->Compute(good.in, absl::MakeSpan(good.up), nullptr).ok());
    // A parameter twice in one transaction is refused.
    EXPECT_THAT(std::string((*txn)->Compute({&good.in[0], 1}, {&good.up[0], 1}, nullptr).message()),
                HasSubstr("given twice"));
    ASSERT_TRUE((*txn)->Commit().ok());
    EXPECT_EQ((*txn)->Commit().code(), absl::StatusCode::kFailedPrecondition);
  }
  std::mt19937 again(12);
  Step good = MakeStep(specs, ids, again);
  ASSERT_TRUE(twin->Step(good.in, absl::MakeSpan(good.up)).ok());
  for (size_t i = 0; i < specs.size(); ++i) {
    EXPECT_EQ(three->ExportState(ids[i])->momentum, twin->ExportState(ids[i])->momentum);
    EXPECT_EQ(three->ExportState(ids[i])->exp_avg, twin->ExportState(ids[i])->exp_avg);
    EXPECT_EQ(three->ExportState(ids[i])->step, 1);
  }
}

// Each engine's parameters, state bytes and cost follow Register (by cost or
// on a named engine) and Unregister; the placement report is per engine.
TEST(ShardedEngineTest, ReportsLoadPerEngineAndRegistersOnOne) {
  std::unique_ptr<Engine> three = Sharded(3);
  ParamSpec big;
  big.name = "big";
  big.shape = {512, 2048};
  ParamSpec small = big;
  small.name = "small";
  small.shape = {64, 256};
  small.kind = OptimizerKind::kAdamW;
  const ParamId on_two = *RegisterOnShard(*three, big, 2);
  EXPECT_EQ(*ShardOf(*three, on_two), 2);
  // Shard 2 is the busiest now; by cost the next ones go to 0 and 1.
  const ParamId a = *three->Register(small);
  const ParamId b = *three->Register(small);
  EXPECT_NE(*ShardOf(*three, a), 2);
  EXPECT_NE(*ShardOf(*three, b), 2);
  const ParamId also_two = *RegisterOnShard(*three, small, 2);
  std::vector<ShardLoad> loads = *ShardLoads(*three);
  ASSERT_EQ(loads.size(), 3u);
  EXPECT_EQ(loads[2].parameters, 2);
  EXPECT_EQ(loads[2].state_bytes, StateBytes(big) + StateBytes(small));
  EXPECT_DOUBLE_EQ(loads[2].cost_seconds, PlacementCost(big) + PlacementCost(small));
  EXPECT_EQ(loads[2].memory.used_bytes, three->Memory().used_bytes - loads[0].memory.used_bytes -
                                            loads[1].memory.used_bytes);
  EXPECT_GT(loads[2].memory.used_bytes, 0);
  for (int i : {0, 1}) {
    EXPECT_EQ(loads[i].parameters, 1) << i;
    EXPECT_EQ(loads[i].state_bytes, StateBytes(small)) << i;
  }
  ASSERT_TRUE(three->Unregister(on_two).ok());
  ASSERT_TRUE(three->Unregister(also_two).ok());
  loads = *ShardLoads(*three);
  EXPECT_EQ(loads[2].parameters, 0);
  EXPECT_EQ(loads[2].state_bytes, 0);
  EXPECT_NEAR(loads[2].cost_seconds, 0, 1e-12);

  EXPECT_EQ(RegisterOnShard(*three, small, 3).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(RegisterOnShard(*three, small, -1).status().code(), absl::StatusCode::kOutOfRange);
  ParamSpec bad = small;
  bad.shape = {0, 4};
  EXPECT_EQ(RegisterOnShard(*three, bad, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*ShardLoads(*three))[0].parameters, 1);
  std::unique_ptr<Engine> cpu = *CreateCpuEngine({});
  EXPECT_EQ(ShardLoads(*cpu).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RegisterOnShard(*cpu, small, 0).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ShardedEngineTest, ForwardsAndForgets) {
  std::unique_ptr<Engine> two = Sharded(2);
  EXPECT_EQ(CreateShardedEngine({}).status().code(), absl::StatusCode::kInvalidArgument);
  ParamSpec spec;
  spec.name = "w";
  spec.shape = {8, 8};
  spec.hold_weights = true;
  const ParamId id = *two->Register(spec);
  std::vector<float> w(64, 0.5f), back(64);
  ASSERT_TRUE(two->SetWeights(id, w).ok());
  ASSERT_TRUE(two->GetWeights(id, absl::MakeSpan(back)).ok());
  EXPECT_EQ(w, back);
  EXPECT_EQ(two->Spec(id)->name, "w");
  spec.shape = {0, 8};
  EXPECT_EQ(two->Register(spec).status().code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(two->Unregister(id).ok());
  EXPECT_EQ(two->Spec(id).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(two->Unregister(id).code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace muon
