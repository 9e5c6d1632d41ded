// Times the CUDA engine's batched Newton–Schulz on the docs/performance.md
// workloads, and the cuBLAS bf16 GEMM rate, on the current GPU.
//
//   ns_bench [--iters N] [--warmup N] [--json FILE]
//
// Each workload runs one BatchedNewtonSchulz per shape group, groups spread
// over 4 streams (as the engine does), timed with CUDA events from the fork to
// the join; the inputs are refilled with fresh random data before every
// timed run. Each workload and schedule runs in several variants (Variant:
// fp16 or bf16 operands, plain or Gram Newton–Schulz, with or without its
// restart, half-Gram products on or off), and the engine's Gram-auto choice
// also as a CUDA-graph replay; the median of each is reported. Then whole
// engine steps (ns_gram off and auto), and the accuracy of each variant
// against the CPU engine's fp32 plain iteration. Benchmark code: failures exit.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "lt_gemm.h"
#include "muon/kernels/cpu_ns.h"
#include "muon/kernels/engine.h"
#include "muon/kernels/ns_schedule.h"
#include "ns_cuda.h"
#include "random_fill.h"

namespace muon::bench {
namespace {

using internal::BatchedNewtonSchulz;
using internal::GemmDesc;
using internal::LtGemm;
using internal::NsArgs;

void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}
void Check(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, std::string(s.message()).c_str());
    std::exit(1);
  }
}

struct Shape {
  int64_t rows, cols, count;
};
struct Workload {
  std::string name;
  std::vector<Shape> shapes;
};

// docs/performance.md, "Workloads".
std::vector<Workload> Workloads() {
  const auto gpt2 = [](std::string name, int64_t d, int64_t layers) {
    return Workload{std::move(name),
                    {{d, 3 * d, layers}, {d, d, layers}, {4 * d, d, layers}, {d, 4 * d, layers}}};
  };
  return {gpt2("gpt2-small", 768, 12),
          gpt2("gpt2-medium", 1024, 24),
          {"llama-1b", {{2048, 2048, 32}, {512, 2048, 32}, {8192, 2048, 32}, {2048, 8192, 16}}},
          {"512x256^2", {{256, 256, 512}}}};
}

struct Schedule {
  std::string name;
  ScheduleKind kind;
  int steps;
};

constexpr int kStreams = 4;

// Column width of a variant's timings: its name's, at least 8.
int Width(const char* name) { return std::max(8, static_cast<int>(std::strlen(name))); }

double Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// How one timed run orthogonalizes: operand type, where Gram Newton–Schulz
// runs, its restarts (unset: MakeNsCoefficients's), the half-Gram threshold.
struct Variant {
  const char* name;
  internal::NsType type = internal::NsType::kF16;
  NsGram gram = NsGram::kOff;
  std::optional<std::vector<int>> restarts;
  int64_t symmetric_min_rank = NsArgs::kDefaultSymmetricMinRank;
};

class Runner {
 public:
  Runner(LtGemm* gemm, const Workload& w, const NsCoefficients& coeffs, char* d_gemm_ws,
         std::vector<cudaStream_t> streams, const Variant& variant)
      : gemm_(gemm), d_gemm_ws_(d_gemm_ws), streams_(std::move(streams)) {
    const int steps = static_cast<int>(coeffs.steps.size());
    for (const Shape& s : w.shapes) {
      Group g;
      g.coeffs = std::make_unique<NsCoefficients>(coeffs);
      if (variant.restarts) g.coeffs->gram_restarts = *variant.restarts;
      g.coeffs->gram = variant.gram == NsGram::kOn ||
                       (variant.gram == NsGram::kAuto &&
                        GramNsPays(s.rows, s.cols, steps, g.coeffs->gram_restarts));
      g.args.coeffs = g.coeffs.get();
      g.args.type = variant.type;
      g.args.batch = s.count;
      g.args.rows = s.rows;
      g.args.cols = s.cols;
      g.args.symmetric_min_rank = variant.symmetric_min_rank;
      g.elements = s.count * s.rows * s.cols;
      Check(cudaMalloc(&g.args.d_x, g.elements * sizeof(__nv_bfloat16)), "cudaMalloc x");
      Check(cudaMalloc(&g.d_ws, BatchedNewtonSchulz::WorkspaceBytes(g.args)), "cudaMalloc ws");
      flops_ += NsFlops({s.count, s.rows, s.cols}, steps);
      groups_.push_back(std::move(g));
    }
    // Largest groups first, so the long products start early.
    std::sort(groups_.begin(), groups_.end(),
              [](const Group& a, const Group& b) { return a.elements > b.elements; });
    for (size_t i = 0; i < groups_.size(); ++i) {
      groups_[i].args.d_gemm_workspace = d_gemm_ws_ + (i % kStreams) * LtGemm::kWorkspaceBytes;
      Check(BatchedNewtonSchulz::CanImplement(groups_[i].args), "CanImplement");
    }
    Check(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming), "event");
    for (int s = 0; s < kStreams; ++s) {
      cudaEvent_t e;
      Check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event");
      joins_.push_back(e);
    }
  }
  ~Runner() {
    for (Group& g : groups_) {
      cudaFree(g.args.d_x);
      cudaFree(g.d_ws);
    }
    if (graph_exec_ != nullptr) cudaGraphExecDestroy(graph_exec_);
  }

  void Fill(uint64_t seed, cudaStream_t main) {
    for (size_t i = 0; i < groups_.size(); ++i) {
      Check(LaunchRandomFill(groups_[i].args.d_x, groups_[i].elements, seed * 131 + i, main),
            "fill");
    }
  }

  // Fork from `main` to the streams, one NS per group, join back to `main`.
  void Enqueue(cudaStream_t main) {
    Check(cudaEventRecord(fork_, main), "record");
    for (cudaStream_t s : streams_) Check(cudaStreamWaitEvent(s, fork_), "wait");
    BatchedNewtonSchulz ns(gemm_);
    for (size_t i = 0; i < groups_.size(); ++i) {
      Check(ns.Run(groups_[i].args, groups_[i].d_ws, streams_[i % kStreams]), "ns");
    }
    for (int s = 0; s < kStreams; ++s) {
      Check(cudaEventRecord(joins_[s], streams_[s]), "record");
      Check(cudaStreamWaitEvent(main, joins_[s]), "wait");
    }
  }

  void Capture(cudaStream_t main) {
    cudaGraph_t graph;
    Check(cudaStreamBeginCapture(main, cudaStreamCaptureModeThreadLocal), "capture");
    Enqueue(main);
    Check(cudaStreamEndCapture(main, &graph), "end capture");
    Check(cudaGraphInstantiate(&graph_exec_, graph, 0), "instantiate");
    cudaGraphDestroy(graph);
  }
  void Replay(cudaStream_t main) { Check(cudaGraphLaunch(graph_exec_, main), "graph launch"); }

  int64_t flops() const { return flops_; }

 private:
  struct Group {
    std::unique_ptr<NsCoefficients> coeffs;  // stable address for args.coeffs
    NsArgs args;
    int64_t elements = 0;
    void* d_ws = nullptr;
  };
  LtGemm* gemm_;
  char* d_gemm_ws_;
  std::vector<cudaStream_t> streams_;
  std::vector<Group> groups_;
  int64_t flops_ = 0;
  cudaEvent_t fork_;
  std::vector<cudaEvent_t> joins_;
  cudaGraphExec_t graph_exec_ = nullptr;
};

// Median milliseconds of `run` between two events on `main`, after `warmup`
// untimed runs; `fill` refreshes the inputs before each run, outside the events.
template <typename Fill, typename Run>
double TimeMedian(cudaStream_t main, int warmup, int iters, Fill fill, Run run) {
  cudaEvent_t start, stop;
  Check(cudaEventCreate(&start), "event");
  Check(cudaEventCreate(&stop), "event");
  std::vector<float> ms;
  for (int i = 0; i < warmup + iters; ++i) {
    fill(i);
    Check(cudaEventRecord(start, main), "record");
    run();
    Check(cudaEventRecord(stop, main), "record");
    Check(cudaEventSynchronize(stop), "sync");
    float t = 0;
    Check(cudaEventElapsedTime(&t, start, stop), "elapsed");
    if (i >= warmup) ms.push_back(t);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return Median(ms);
}

double GemmTflops(LtGemm& gemm, char* d_ws, cudaStream_t main) {
  const int64_t n = 8192;
  __nv_bfloat16 *d_a, *d_b, *d_c;
  Check(cudaMalloc(&d_a, n * n * 2), "malloc");
  Check(cudaMalloc(&d_b, n * n * 2), "malloc");
  Check(cudaMalloc(&d_c, n * n * 2), "malloc");
  Check(LaunchRandomFill(d_a, n * n, 1, main), "fill");
  Check(LaunchRandomFill(d_b, n * n, 2, main), "fill");
  // C = A·B, all n×n column-major with ld n (random data: zeros run faster).
  GemmDesc d;
  d.m = d.n = d.k = n;
  d.lda = d.ldb = d.ldc = n;
  d.stride_a = d.stride_b = d.stride_c = n * n;
  const double ms = TimeMedian(
      main, 3, 20, [](int) {},
      [&] { Check(gemm.Run(d, 1.0f, d_a, d_b, 0.0f, d_c, d_c, d_ws, main), "gemm"); });
  cudaFree(d_a);
  cudaFree(d_b);
  cudaFree(d_c);
  return 2.0 * n * n * n / (ms * 1e-3) / 1e12;
}

// A whole engine step (gradients from pageable host memory in, momentum,
// Newton–Schulz, updates out) for every matrix of a workload, bf16 on the
// wire: wall-clock median and the engine's phase split. The wire bytes over
// the measured host↔device copy rate bound it from below.
void EngineStep(const Workload& w, int iters, NsGram gram) {
  auto engine = CreateCudaEngine({});
  Check(engine.status(), "CreateCudaEngine");
  std::vector<ParamId> ids;
  std::vector<std::vector<std::byte>> grads, outs;
  std::vector<GradientInput> in;
  std::vector<UpdateOutput> out;
  int64_t bytes = 0;
  uint32_t state = 12345;
  for (const Shape& s : w.shapes) {
    for (int64_t k = 0; k < s.count; ++k) {
      ParamSpec spec;
      spec.name = w.name + "." + std::to_string(ids.size());
      spec.shape = {s.rows, s.cols};
      spec.dtype = DType::kBFloat16;
      spec.hp.ns_gram = gram;
      auto id = (*engine)->Register(spec);
      Check(id.status(), "Register");
      ids.push_back(*id);
      std::vector<std::byte> g(s.rows * s.cols * 2);
      for (size_t i = 0; i < g.size(); i += 2) {
        state = state * 1664525u + 1013904223u;
        // bf16 in [-1, 1): sign, exponent 126 or less, random mantissa.
        const uint16_t v = static_cast<uint16_t>(((state >> 16) & 0x807f) | 0x3c00);
        std::memcpy(&g[i], &v, 2);
      }
      bytes += 2 * static_cast<int64_t>(g.size());
      grads.push_back(std::move(g));
      outs.emplace_back(grads.back().size());
    }
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    in.push_back({ids[i], DType::kBFloat16, grads[i], std::nullopt});
    out.push_back({ids[i], DType::kBFloat16, absl::MakeSpan(outs[i])});
  }
  std::vector<double> wall;
  StepStats last;
  for (int it = 0; it < iters + 2; ++it) {
    StepStats stats;
    const auto t0 = std::chrono::steady_clock::now();
    Check((*engine)->Step(in, absl::MakeSpan(out), {}, &stats), "Step");
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (it >= 2) wall.push_back(ms);
    last = stats;
  }
  std::sort(wall.begin(), wall.end());
  std::printf("engine step %-12s gram %-4s %zu matrices, %.0f MB in+out (bf16): median %.2f ms "
              "(last step: stage %.2f, compute %.2f, finish %.2f ms)\n",
              w.name.c_str(), std::string(NsGramName(gram)).c_str(), ids.size(), bytes / 1e6,
              wall[wall.size() / 2],
              last.stage_seconds * 1e3, last.compute_seconds * 1e3, last.finish_seconds * 1e3);
}

// Pinned host → device copy rate, GB/s (the wire the engine's staging uses).
double CopyRate(cudaStream_t main) {
  const size_t n = size_t{256} << 20;
  void *h, *d;
  Check(cudaHostAlloc(&h, n, cudaHostAllocDefault), "host alloc");
  Check(cudaMalloc(&d, n), "malloc");
  std::memset(h, 1, n);
  const double ms = TimeMedian(main, 2, 5, [](int) {}, [&] {
    Check(cudaMemcpyAsync(d, h, n, cudaMemcpyHostToDevice, main), "copy");
  });
  cudaFreeHost(h);
  cudaFree(d);
  return n / (ms * 1e-3) / 1e9;
}

// Accuracy of each way of running Newton–Schulz on the GPU against the CPU
// engine's fp32 plain iteration on the same bf16 input (a Gaussian matrix
// per shape): relative Frobenius difference of O, and ‖O·Oᵀ − I‖_F/√r.
void Accuracy(LtGemm* gemm, char* d_gemm_ws, cudaStream_t main) {
  struct AccVariant {
    const char* name;
    internal::NsType type;
    bool gram;
    std::optional<std::vector<int>> restarts;
    int64_t symmetric_min_rank = NsArgs::kDefaultSymmetricMinRank;
  };
  const AccVariant variants[] = {
      {"plain bf16", internal::NsType::kBF16, false, std::nullopt},
      {"plain fp16", internal::NsType::kF16, false, std::nullopt},
      {"gram bf16", internal::NsType::kBF16, true, std::nullopt},
      {"gram fp16", internal::NsType::kF16, true, std::nullopt},
      {"gram fp16 no restart", internal::NsType::kF16, true, std::vector<int>{}},
      {"gram fp16 every step", internal::NsType::kF16, true, std::vector<int>{1, 2, 3, 4}},
      {"gram fp16 half512", internal::NsType::kF16, true, std::nullopt, 512},
      {"gram fp16 full", internal::NsType::kF16, true, std::nullopt,
       std::numeric_limits<int64_t>::max()},
  };
  const Shape shapes[] = {{768, 3072, 1}, {3072, 768, 1}, {768, 2304, 1}, {1024, 4096, 1},
                          {256, 256, 1}};
  const Schedule schedules[] = {{"jordan", ScheduleKind::kJordan, 5},
                                {"polar_express", ScheduleKind::kPolarExpress, 5},
                                {"dion", ScheduleKind::kDion, 5},
                                {"aol", ScheduleKind::kAol, 4},
                                {"aol_dion", ScheduleKind::kAolDion, 4}};
  std::printf("\naccuracy vs the CPU engine (fp32, plain), Gaussian input in bf16: "
              "relative difference of O / orthogonality error\n");
  std::printf("%-10s %-14s", "shape", "schedule");
  for (const AccVariant& v : variants) std::printf(" %22s", v.name);
  std::printf(" %10s\n", "cpu ortho");
  std::mt19937_64 rng(2026);
  for (const Shape& shape : shapes) {
    const int64_t n = shape.rows * shape.cols, r = std::min(shape.rows, shape.cols);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> input(n);
    for (float& v : input) v = normal(rng);
    std::vector<std::byte> bf16(n * 2);
    EncodeFromFloat(DType::kBFloat16, input.data(), n, bf16.data());
    DecodeToFloat(DType::kBFloat16, bf16.data(), n, input.data());
    __nv_bfloat16* d_x;
    double* d_err;
    Check(cudaMalloc(&d_x, n * 2), "malloc");
    Check(cudaMalloc(&d_err, sizeof(double)), "malloc");
    for (const Schedule& sch : schedules) {
      NsCoefficients plain = *MakeNsCoefficients(sch.kind, sch.steps);
      std::vector<float> want = input;
      Check(OrthogonalizeCpu(plain, {1, shape.rows, shape.cols}, want.data()), "cpu ns");
      double want_norm = 0;
      for (float v : want) want_norm += static_cast<double>(v) * v;
      std::printf("%5ldx%-4ld %-14s", static_cast<long>(shape.rows), static_cast<long>(shape.cols),
                  sch.name.c_str());
      for (const AccVariant& v : variants) {
        NsCoefficients co = plain;
        co.gram = v.gram;
        if (v.restarts) co.gram_restarts = *v.restarts;
        NsArgs args;
        args.coeffs = &co;
        args.type = v.type;
        args.batch = 1;
        args.rows = shape.rows;
        args.cols = shape.cols;
        args.d_x = d_x;
        args.d_error = d_err;
        args.d_gemm_workspace = d_gemm_ws;
        args.symmetric_min_rank = v.symmetric_min_rank;
        void* d_ws;
        Check(cudaMalloc(&d_ws, BatchedNewtonSchulz::WorkspaceBytes(args)), "malloc");
        Check(cudaMemcpyAsync(d_x, bf16.data(), n * 2, cudaMemcpyHostToDevice, main), "copy");
        Check(cudaMemsetAsync(d_err, 0, sizeof(double), main), "memset");
        BatchedNewtonSchulz ns(gemm);
        Check(ns.Run(args, d_ws, main), "ns");
        std::vector<std::byte> out(n * 2);
        double err_sum = 0;
        Check(cudaMemcpyAsync(out.data(), d_x, n * 2, cudaMemcpyDeviceToHost, main), "copy");
        Check(cudaMemcpyAsync(&err_sum, d_err, sizeof(double), cudaMemcpyDeviceToHost, main),
              "copy");
        Check(cudaStreamSynchronize(main), "sync");
        cudaFree(d_ws);
        std::vector<float> got(n);
        DecodeToFloat(v.type == internal::NsType::kF16 ? DType::kFloat16 : DType::kBFloat16,
                      out.data(), n, got.data());
        double diff = 0;
        for (int64_t i = 0; i < n; ++i) {
          const double d = static_cast<double>(got[i]) - want[i];
          diff += d * d;
        }
        std::printf("      %7.2e / %7.4f", std::sqrt(diff / want_norm),
                    std::sqrt(err_sum / static_cast<double>(r)));
      }
      std::printf(" %10.4f\n", OrthogonalityError(shape.rows, shape.cols, want.data()));
    }
    cudaFree(d_x);
    cudaFree(d_err);
  }
}

int Main(int argc, char** argv) {
  int iters = 30, warmup = 5;
  std::string json_path;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--iters" && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else if (a == "--warmup" && i + 1 < argc) {
      warmup = std::atoi(argv[++i]);
    } else if (a == "--json" && i + 1 < argc) {
      json_path = argv[++i];
    } else {
      std::fprintf(stderr, "usage: ns_bench [--iters N] [--warmup N] [--json FILE]\n");
      return 2;
    }
  }
  cudaDeviceProp prop;
  Check(cudaGetDeviceProperties(&prop, 0), "device");
  auto gemm = LtGemm::Create();
  Check(gemm.status(), "cuBLASLt");
  char* d_gemm_ws;
  Check(cudaMalloc(&d_gemm_ws, kStreams * LtGemm::kWorkspaceBytes), "malloc");
  cudaStream_t main;
  Check(cudaStreamCreateWithFlags(&main, cudaStreamNonBlocking), "stream");
  std::vector<cudaStream_t> streams(kStreams);
  for (cudaStream_t& s : streams) Check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");

  const double tflops = GemmTflops(**gemm, d_gemm_ws, main);
  std::printf("GPU %s; cuBLASLt bf16 8192^3 GEMM: %.0f TFLOP/s\n", prop.name, tflops);

  const std::vector<Schedule> schedules = {{"jordan", ScheduleKind::kJordan, 5},
                                           {"polar_express", ScheduleKind::kPolarExpress, 5},
                                           {"aol", ScheduleKind::kAol, 4}};
  std::string json = std::string("{\"gpu\": \"") + prop.name + "\", \"gemm_tflops\": " +
                     std::to_string(tflops) + ", \"rows\": [";
  bool first = true;
  // The engine's default is "gram auto" (fp16, Gram where GramNsPays).
  constexpr int64_t kHalf = NsArgs::kDefaultSymmetricMinRank;
  constexpr int64_t kFull = std::numeric_limits<int64_t>::max();
  constexpr auto kF16 = internal::NsType::kF16;
  const Variant variants[] = {
      {"plain", kF16, NsGram::kOff, std::nullopt, kHalf},
      {"plain_bf16", internal::NsType::kBF16, NsGram::kOff, std::nullopt, kHalf},
      {"gram_auto", kF16, NsGram::kAuto, std::nullopt, kHalf},
      {"gram_all", kF16, NsGram::kOn, std::nullopt, kHalf},
      {"gram_auto_no_restart", kF16, NsGram::kAuto, std::vector<int>{}, kHalf},
      {"plain_full_gram", kF16, NsGram::kOff, std::nullopt, kFull},
      {"gram_auto_full", kF16, NsGram::kAuto, std::nullopt, kFull},
      {"plain_half256", kF16, NsGram::kOff, std::nullopt, 256},
      {"gram_auto_half256", kF16, NsGram::kAuto, std::nullopt, 256},
  };
  constexpr int kVariants = sizeof(variants) / sizeof(variants[0]);
  std::printf("%-12s %-14s %5s %8s", "workload", "schedule", "steps", "GFLOP");
  for (const Variant& v : variants) std::printf(" %*s", Width(v.name), v.name);
  std::printf(" %12s\n", "graph(auto)");
  for (const Workload& w : Workloads()) {
    for (const Schedule& s : schedules) {
      auto coeffs = MakeNsCoefficients(s.kind, s.steps);
      Check(coeffs.status(), "coefficients");
      double ms[kVariants + 1];
      int64_t flops = 0;
      for (int v = 0; v < kVariants; ++v) {
        Runner runner(gemm->get(), w, *coeffs, d_gemm_ws, streams, variants[v]);
        const auto fill = [&](int i) { runner.Fill(static_cast<uint64_t>(i) + 1, main); };
        ms[v] = TimeMedian(main, warmup, iters, fill, [&] { runner.Enqueue(main); });
        if (std::strcmp(variants[v].name, "gram_auto") == 0) {
          runner.Capture(main);
          ms[kVariants] = TimeMedian(main, warmup, iters, fill, [&] { runner.Replay(main); });
        }
        Check(cudaStreamSynchronize(main), "sync");
        flops = runner.flops();
      }
      std::printf("%-12s %-14s %5d %8.0f", w.name.c_str(), s.name.c_str(), s.steps, flops / 1e9);
      for (int v = 0; v < kVariants; ++v) std::printf(" %*.3f", Width(variants[v].name), ms[v]);
      std::printf(" %12.3f", ms[kVariants]);
      std::printf("\n");
      std::string row = std::string(first ? "" : ", ") + "{\"workload\": \"" + w.name +
                        "\", \"schedule\": \"" + s.name + "\", \"steps\": " +
                        std::to_string(s.steps) + ", \"gflop\": " + std::to_string(flops / 1e9);
      for (int v = 0; v < kVariants; ++v) {
        row += std::string(", \"") + variants[v].name + "_ms\": " + std::to_string(ms[v]);
      }
      row += ", \"graph_ms\": " + std::to_string(ms[kVariants]) + "}";
      json += row;
      first = false;
    }
  }
  json += "]}\n";
  std::printf("pinned host->device copy: %.1f GB/s\n", CopyRate(main));
  for (const Workload& w : Workloads()) {
    EngineStep(w, 10, NsGram::kOff);
    EngineStep(w, 10, NsGram::kAuto);
  }
  Accuracy(gemm->get(), d_gemm_ws, main);
  if (!json_path.empty()) {
    FILE* f = std::fopen(json_path.c_str(), "w");
    if (f == nullptr) {
      std::perror(json_path.c_str());
      return 1;
    }
    std::fputs(json.c_str(), f);
    std::fclose(f);
  }
  return 0;
}

}  // namespace
}  // namespace muon::bench

int main(int argc, char** argv) { return muon::bench::Main(argc, argv); }
