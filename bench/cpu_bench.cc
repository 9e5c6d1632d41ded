// CPU engine benchmarks: Newton–Schulz on OpenBLAS and a full Muon step,
// next to OpenBLAS's own sgemm rate measured in the same run. GFLOP/s count
// the flops of docs/math.md (muon::NsFlops), so ours/sgemm is the efficiency.
// Every benchmark uses wall-clock time (UseRealTime): the default CPU time is
// the main thread's only, and OpenBLAS works on its own threads too.
#include <cblas.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "benchmark/benchmark.h"
#include "muon/kernels/cpu_ns.h"
#include "muon/kernels/engine.h"
#include "muon/kernels/ns_schedule.h"

namespace {

std::vector<float> RandomNormal(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

void Check(const absl::Status& s) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    std::exit(1);
  }
}

// args: batch, rows, cols, schedule, steps
void BM_NewtonSchulz(benchmark::State& state) {
  const muon::MatrixView view{state.range(0), state.range(1), state.range(2)};
  const auto kind = static_cast<muon::ScheduleKind>(state.range(3));
  const int steps = static_cast<int>(state.range(4));
  const muon::NsCoefficients coeffs = *muon::MakeNsCoefficients(kind, steps);
  const std::vector<float> input = RandomNormal(view.batch * view.rows * view.cols, 1);
  std::vector<float> x;
  for (auto _ : state) {
    state.PauseTiming();
    x = input;
    state.ResumeTiming();
    Check(muon::OrthogonalizeCpu(coeffs, view, x.data()));
    benchmark::DoNotOptimize(x.data());
  }
  state.SetLabel(std::string(muon::ScheduleName(kind)));
  state.counters["GFLOP/s"] =
      benchmark::Counter(static_cast<double>(muon::NsFlops(view, steps)) * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}

// args: m, n, k
void BM_Sgemm(benchmark::State& state) {
  const int m = static_cast<int>(state.range(0));
  const int n = static_cast<int>(state.range(1));
  const int k = static_cast<int>(state.range(2));
  const std::vector<float> a = RandomNormal(static_cast<size_t>(m) * k, 2);
  const std::vector<float> b = RandomNormal(static_cast<size_t>(k) * n, 3);
  std::vector<float> c(static_cast<size_t>(m) * n);
  for (auto _ : state) {
    // A m×k (ld k), B k×n (ld n), C m×n (ld n), all row-major.
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a.data(), k, b.data(), n,
                0.0f, c.data(), n);
    benchmark::DoNotOptimize(c.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * m * n * k * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// One full Muon step through the Engine for the GPT-2-small shapes
// (docs/performance.md). args: schedule, compute threads (0: one per core).
void BM_Gpt2SmallStep(benchmark::State& state) {
  const auto kind = static_cast<muon::ScheduleKind>(state.range(0));
  const int d = 768, layers = 12;
  muon::EngineOptions options;
  options.compute_threads = static_cast<int>(state.range(1));
  options.blas_threads = 1;
  auto engine = *muon::CreateCpuEngine(options);
  std::vector<std::vector<float>> grads, updates;
  std::vector<muon::GradientInput> in;
  std::vector<muon::UpdateOutput> out;
  int64_t flops = 0;
  for (int l = 0; l < layers; ++l) {
    for (auto [rows, cols] : {std::pair{d, 3 * d}, {d, d}, {4 * d, d}, {d, 4 * d}}) {
      muon::ParamSpec spec;
      spec.name = "w";
      spec.shape = {rows, cols};
      spec.hp.ns_schedule = kind;
      const muon::ParamId id = *engine->Register(spec);
      grads.push_back(
          RandomNormal(static_cast<size_t>(rows) * cols, static_cast<uint32_t>(grads.size())));
      updates.emplace_back(grads.back().size());
      flops += muon::NsFlops({1, rows, cols}, spec.hp.ns_steps);
      in.push_back(
          {id,
           muon::DType::kFloat32,
           absl::Span<const std::byte>(reinterpret_cast<const std::byte*>(grads.back().data()),
                                       grads.back().size() * 4),
           {}});
      out.push_back({id, muon::DType::kFloat32,
                     absl::Span<std::byte>(reinterpret_cast<std::byte*>(updates.back().data()),
                                           updates.back().size() * 4)});
    }
  }
  for (auto _ : state) Check(engine->Step(in, absl::MakeSpan(out)));
  state.SetLabel(absl::StrCat(muon::ScheduleName(kind), ", ", state.range(1), " threads"));
  state.counters["GFLOP/s"] = benchmark::Counter(static_cast<double>(flops) * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

constexpr int64_t kJordan = static_cast<int64_t>(muon::ScheduleKind::kJordan);
constexpr int64_t kPolar = static_cast<int64_t>(muon::ScheduleKind::kPolarExpress);
constexpr int64_t kAol = static_cast<int64_t>(muon::ScheduleKind::kAol);

void NsArgs(benchmark::internal::Benchmark* b) {
  for (auto [batch, rows, cols] : {std::tuple{1, 768, 2304}, {1, 1024, 4096}, {64, 256, 256}}) {
    b->Args({batch, rows, cols, kJordan, 5});
    b->Args({batch, rows, cols, kPolar, 5});
    b->Args({batch, rows, cols, kAol, 4});
  }
}

// sgemm references: 4096³; r×r×c, the shape of X·Xᵀ for 768×2304 and 1024×4096;
// 256³ for the batch of small matrices.
BENCHMARK(BM_Sgemm)
    ->Args({4096, 4096, 4096})
    ->Args({768, 768, 2304})
    ->Args({1024, 1024, 4096})
    ->Args({256, 256, 256})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(0.5);
BENCHMARK(BM_NewtonSchulz)
    ->Apply(NsArgs)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(0.5);
// About 10 s per run on 2 cores: one iteration each.
BENCHMARK(BM_NewtonSchulz)
    ->Args({1, 4096, 4096, kJordan, 5})
    ->Args({1, 4096, 4096, kPolar, 5})
    ->Args({1, 4096, 4096, kAol, 4})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(1);
// Compute threads 1 and 2 (this machine's cores); 0 is one per core.
BENCHMARK(BM_Gpt2SmallStep)
    ->Args({kJordan, 1})
    ->Args({kJordan, 2})
    ->Args({kPolar, 2})
    ->Args({kAol, 2})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(1);

}  // namespace

BENCHMARK_MAIN();
