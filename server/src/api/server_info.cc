#include "api/server_info.h"

#include <unistd.h>

#include <string>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/strip.h"
#include "absl/strings/str_cat.h"
#include "muon/kernels/ns_schedule.h"
#include "muon/kernels/sharded_engine.h"
#include "muon/kernels/status_macros.h"
#include "muon/kernels/types.h"
#include "session/registry.h"
#include "step/chunker.h"
#include "storage/session_image.h"

#ifndef MUON_VERSION
#error "MUON_VERSION is set by server/CMakeLists.txt from the project's version"
#endif

namespace muon::server {
namespace {

void SetDuration(absl::Duration d, google::protobuf::Duration* out) {
  const int64_t ns = absl::ToInt64Nanoseconds(d);
  out->set_seconds(ns / 1000000000);
  out->set_nanos(static_cast<int32_t>(ns % 1000000000));
}

int64_t PhysicalMemoryBytes() {
  const long pages = sysconf(_SC_PHYS_PAGES);
  const long page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page : 0;
}

// Every schedule of the API (the proto's NsSchedule values), its
// coefficients from the engine's construction.
absl::Status AddSchedules(int32_t ns_steps, v1::ServerInfo* info) {
  const google::protobuf::EnumDescriptor* schedules = v1::NsSchedule_descriptor();
  constexpr absl::string_view kPrefix = "NS_SCHEDULE_";
  for (int i = 0; i < schedules->value_count(); ++i) {
    const google::protobuf::EnumValueDescriptor* value = schedules->value(i);
    if (value->number() == v1::NS_SCHEDULE_UNSPECIFIED) continue;
    const std::string name = absl::AsciiStrToLower(
        absl::StripPrefix(absl::string_view(value->name()), kPrefix));
    MUON_ASSIGN_OR_RETURN(ScheduleKind kind, ParseSchedule(name));
    MUON_ASSIGN_OR_RETURN(NsCoefficients c, MakeNsCoefficients(kind, ns_steps));
    v1::ScheduleInfo* out = info->add_schedules();
    out->set_schedule(static_cast<v1::NsSchedule>(value->number()));
    out->set_name(name);
    for (const std::array<double, 3>& step : c.steps) {
      v1::NsStep* s = out->add_steps();
      s->set_a(step[0]);
      s->set_b(step[1]);
      s->set_c(step[2]);
    }
    out->set_norm_safety(c.norm_safety);
    out->set_aol(c.aol);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<v1::ServerInfo> DescribeServer(const ServiceEnv& env, int32_t ns_steps) {
  if (ns_steps < 0 || ns_steps > kMaxNsSteps) {
    return absl::InvalidArgumentError(absl::StrCat("ns_steps is ", ns_steps, "; use 1 to ",
                                                   kMaxNsSteps, ", or 0 for the default"));
  }
  if (ns_steps == 0) ns_steps = HyperParams().ns_steps;
  const ServerOptions& o = env.options;
  v1::ServerInfo info;
  info.set_version(MUON_VERSION);
  const std::string engine(env.engine->name());
  info.set_engine(engine);

  const MemoryUsage memory = env.engine->Memory();
  if (absl::StatusOr<std::vector<ShardLoad>> loads = ShardLoads(*env.engine); loads.ok()) {
    for (size_t i = 0; i < loads->size(); ++i) {
      const ShardLoad& load = (*loads)[i];
      v1::DeviceInfo* device = info.add_devices();
      device->set_kind(engine);
      device->set_ordinal(i < o.devices.size() ? o.devices[i] : static_cast<int32_t>(i));
      device->set_memory_used_bytes(load.memory.used_bytes);
      device->set_memory_budget_bytes(load.memory.budget_bytes);
      device->set_parameters(static_cast<uint32_t>(load.parameters));
      device->set_state_bytes(load.state_bytes);
      device->set_estimated_step_seconds(load.cost_seconds);
    }
  } else {
    v1::DeviceInfo* device = info.add_devices();
    device->set_kind(engine);
    if (engine == "cpu") {
      device->set_cores(std::thread::hardware_concurrency());
      device->set_memory_bytes(PhysicalMemoryBytes());
    } else {
      device->set_ordinal(o.devices.size() == 1 ? o.devices.front() : o.device);
    }
    device->set_memory_used_bytes(memory.used_bytes);
    device->set_memory_budget_bytes(memory.budget_bytes);
    int64_t parameters = 0, state_bytes = 0;
    double seconds = 0;
    for (const std::shared_ptr<Session>& session : env.sessions->List()) {
      for (const SessionParam& p : session->params()) {
        ++parameters;
        state_bytes += p.state_bytes;
        seconds += PlacementCost(p.spec);
      }
    }
    device->set_parameters(static_cast<uint32_t>(parameters));
    device->set_state_bytes(state_bytes);
    device->set_estimated_step_seconds(seconds);
  }

  v1::ServerLimits* limits = info.mutable_limits();
  limits->set_max_sessions(static_cast<uint32_t>(o.limits.max_sessions));
  limits->set_max_params_per_session(static_cast<uint32_t>(o.limits.max_params_per_session));
  limits->set_max_bytes_per_session(o.limits.max_bytes_per_session);
  limits->set_max_message_bytes(o.limits.max_message_bytes);
  limits->set_max_concurrent_streams(static_cast<uint32_t>(o.limits.max_concurrent_streams));
  limits->set_memory_budget_bytes(memory.budget_bytes);
  // Before rounding down to whole elements of the update's dtype.
  limits->set_update_chunk_bytes(
      ChunkPayloadBytes(o.update_chunk_bytes, o.limits.max_message_bytes, /*element_size=*/1));
  SetDuration(o.limits.session_idle_ttl, limits->mutable_session_idle_ttl());
  limits->set_max_workers(kMaxWorkers);
  SetDuration(o.worker_timeout, limits->mutable_worker_timeout());
  limits->set_max_ns_steps(kMaxNsSteps);

  v1::DurabilityInfo* durability = info.mutable_durability();
  if (!env.sessions->durability().enabled()) {
    durability->set_mode("off");
  } else {
    durability->set_mode(env.sessions->durability().strict() ? "strict" : "relaxed");
    durability->set_checkpoint_every_steps(static_cast<uint32_t>(o.checkpoint_every_steps));
  }

  info.set_ns_steps(ns_steps);
  MUON_RETURN_IF_ERROR(AddSchedules(ns_steps, &info));
  info.set_admin_token_required(!o.admin_token.empty());
  info.set_orthogonality_sample_every(static_cast<uint32_t>(o.orthogonality_sample_every));
  return info;
}

}  // namespace muon::server
