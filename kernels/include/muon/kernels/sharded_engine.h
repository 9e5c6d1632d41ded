#ifndef MUON_KERNELS_SHARDED_ENGINE_H_
#define MUON_KERNELS_SHARDED_ENGINE_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "muon/kernels/engine.h"

namespace muon {

// Placement cost of one parameter, in estimated seconds of device work per
// step: its Newton–Schulz flops (docs/math.md) at kShardFlopRate plus its
// state read and written at kShardByteRate (an H200's measured Newton–Schulz
// rate and device-copy bandwidth, docs/performance.md).
inline constexpr double kShardFlopRate = 5.9e14;
inline constexpr double kShardByteRate = 4.3e12;
double PlacementCost(const ParamSpec& spec);

// An Engine over several engines of one kind (one per GPU: EngineOptions::
// devices). Each parameter lives on one of them, chosen at Register as the
// one with the least placement cost so far that accepts it (a full one's
// ResourceExhausted moves on to the next). A transaction's Compute hands each
// engine its share at once, one thread per engine with work, passes each
// update on to its caller's UpdateReadyFn as that engine reports it (from
// that engine's thread; none after a share has failed), and Commit commits
// every engine's share.
//
// Each Compute call opens its own transaction on each engine it uses, so
// that a call which fails on one engine keeps nothing of that call on the
// others either (the Engine contract). The inner engines' Commit cannot fail
// for a transaction that is open, so a commit never lands on some engines
// and not others.
//
// Memory: the sum over the engines (budget: the sum of theirs, 0 if any is
// unbudgeted). StepStats: counts add up; phase seconds are the longest
// engine's, the engines running at the same time; device_compute_seconds
// holds each engine's own.
//
// InvalidArgument for an empty list or a null engine.
absl::StatusOr<std::unique_ptr<Engine>> CreateShardedEngine(
    std::vector<std::unique_ptr<Engine>> engines);

// For placement reports: the index (into CreateShardedEngine's list) of the
// engine that holds `param`, when `engine` came from CreateShardedEngine.
// NotFound for an unknown parameter; InvalidArgument for another engine.
absl::StatusOr<int> ShardOf(const Engine& engine, ParamId param);

// What one engine of a sharded engine holds now: its parameters, their
// optimizer state (StateBytes), their summed PlacementCost (the estimated
// seconds of one step's work on that device), and its Memory().
struct ShardLoad {
  int64_t parameters = 0;
  int64_t state_bytes = 0;
  double cost_seconds = 0;
  MemoryUsage memory;
};

// One ShardLoad per engine of CreateShardedEngine's list, in its order.
// InvalidArgument for another engine.
absl::StatusOr<std::vector<ShardLoad>> ShardLoads(const Engine& engine);

// Registers `spec` on the engine at index `shard` of a sharded engine (a
// restore keeping a checkpoint's placement); its errors are that engine's
// (a full one's ResourceExhausted does not move on). OutOfRange for a shard
// the engine does not have; InvalidArgument for another engine.
absl::StatusOr<ParamId> RegisterOnShard(Engine& engine, const ParamSpec& spec, int shard);

}  // namespace muon

#endif  // MUON_KERNELS_SHARDED_ENGINE_H_
