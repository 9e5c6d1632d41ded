#ifndef MUON_SERVER_SRC_STORAGE_SESSION_IMAGE_H_
#define MUON_SERVER_SRC_STORAGE_SESSION_IMAGE_H_

// A plain image of one session: what a checkpoint file holds and what a
// restore starts from. storage/ writes and reads images only, never a live
// session (session/ builds an image under the session's lease and restores
// one into a new session).

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "muon/kernels/engine.h"
#include "muon/v1/optimizer.pb.h"
#include "storage/step_reply.h"

namespace muon::server {

// The most workers a PARAMETER_SERVER session may have.
inline constexpr uint32_t kMaxWorkers = 4096;

// The responses of a committed step (update chunks, then the summary), kept
// to answer a retry of that step without applying it again. Its update
// chunks may reference the step's update buffers (StepReply), which the
// record then keeps from being reused.
struct StepRecord {
  uint64_t step = 0;
  std::vector<std::shared_ptr<const StepReply>> responses;
};

struct SessionImage {
  std::string session_id;  // lowercase hex
  std::string token;       // the session's secret
  // The request that created it: its parameters, their order, every
  // hyper-parameter, the mode and the number of workers.
  v1::CreateSessionRequest config;
  absl::Time create_time;
  uint64_t step = 0;  // the last committed step
  absl::Time last_step_time = absl::InfinitePast();
  // One per parameter, in config.params order: optimizer state and, in
  // PARAMETER_SERVER mode, the weights.
  std::vector<ParamState> params;
  // On an engine of several devices: per parameter (config.params order),
  // the index of the device that holds it (ShardOf); empty on one device.
  std::vector<int> devices;
  // Per worker (null where none): the last committed step's responses.
  std::vector<std::shared_ptr<const StepRecord>> records;
};

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STORAGE_SESSION_IMAGE_H_
