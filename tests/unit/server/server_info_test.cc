// GetServerInfo's devices (api/server_info.h): one entry per device, each
// with the parameters placed on it, their state bytes and estimated work;
// over a sharded engine of CPU engines (as the CUDA engine on several GPUs).

#include "api/server_info.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "muon/kernels/sharded_engine.h"
#include "observability/metrics.h"
#include "session/durability.h"
#include "session/registry.h"
#include "status_matchers.h"

namespace muon::server {
namespace {

using ::muon::testing::IsOk;

v1::CreateSessionRequest Request() {
  v1::CreateSessionRequest request;
  request.set_name("placement");
  for (const char* name : {"big", "small", "bias"}) {
    v1::ParameterSpec* p = request.add_params();
    p->set_name(name);
    p->add_shape(name[0] == 'b' && name[1] == 'i' ? 16 : (name[0] == 'b' ? 512 : 64));
    if (name[1] != 'i') p->add_shape(name[0] == 'b' ? 1024 : 64);
    p->set_dtype(v1::DTYPE_FLOAT32);
  }
  return request;
}

struct Described {
  v1::ServerInfo info;
  std::vector<int> devices;  // ShardOf per parameter, on a sharded engine
  std::vector<ParamSpec> specs;
};

Described Describe(std::unique_ptr<Engine> engine, std::vector<int> ordinals) {
  std::unique_ptr<Metrics> metrics = *Metrics::Create("");
  Durability durability(DurabilityOptions(), engine.get());
  SessionRegistry registry(engine.get(), Limits(), metrics->sessions(), &durability, nullptr);
  absl::StatusOr<std::shared_ptr<Session>> session = registry.Create(Request());
  EXPECT_THAT(session, IsOk());
  ServiceEnv env;
  env.engine = engine.get();
  env.sessions = &registry;
  env.options.devices = std::move(ordinals);
  Described d;
  absl::StatusOr<v1::ServerInfo> info = DescribeServer(env, 0);
  EXPECT_THAT(info, IsOk());
  if (info.ok()) d.info = std::move(*info);
  if (session.ok()) {
    for (const SessionParam& p : (*session)->params()) {
      absl::StatusOr<int> device = ShardOf(*engine, p.engine_id);
      if (device.ok()) d.devices.push_back(*device);
      d.specs.push_back(p.spec);
    }
  }
  return d;
}

TEST(ServerInfoTest, ShowsEachDevicesParametersStateAndWork) {
  std::vector<std::unique_ptr<Engine>> engines;
  for (int i = 0; i < 3; ++i) engines.push_back(*CreateCpuEngine({}));
  const Described d = Describe(*CreateShardedEngine(std::move(engines)), {4, 6, 7});
  ASSERT_EQ(d.info.devices_size(), 3);
  ASSERT_EQ(d.devices.size(), 3u);
  int64_t parameters = 0;
  for (int device = 0; device < 3; ++device) {
    const v1::DeviceInfo& info = d.info.devices(device);
    EXPECT_EQ(info.ordinal(), std::vector<int>({4, 6, 7})[device]);
    int64_t count = 0, bytes = 0;
    double seconds = 0;
    for (size_t i = 0; i < d.specs.size(); ++i) {
      if (d.devices[i] != device) continue;
      ++count;
      bytes += StateBytes(d.specs[i]);
      seconds += PlacementCost(d.specs[i]);
    }
    EXPECT_EQ(info.parameters(), count) << device;
    EXPECT_EQ(info.state_bytes(), bytes) << device;
    EXPECT_DOUBLE_EQ(info.estimated_step_seconds(), seconds) << device;
    EXPECT_GE(info.memory_used_bytes(), bytes) << device;
    parameters += info.parameters();
  }
  EXPECT_EQ(parameters, 3);
  // Three parameters by cost on three fresh devices: one each.
  EXPECT_THAT(d.devices, ::testing::UnorderedElementsAre(0, 1, 2));
}

TEST(ServerInfoTest, OneDeviceCountsEverySession) {
  const Described d = Describe(*CreateCpuEngine({}), {});
  ASSERT_EQ(d.info.devices_size(), 1);
  const v1::DeviceInfo& info = d.info.devices(0);
  EXPECT_EQ(info.kind(), "cpu");
  EXPECT_EQ(info.parameters(), 3u);
  int64_t bytes = 0;
  double seconds = 0;
  for (const ParamSpec& spec : d.specs) {
    bytes += StateBytes(spec);
    seconds += PlacementCost(spec);
  }
  EXPECT_EQ(info.state_bytes(), bytes);
  EXPECT_DOUBLE_EQ(info.estimated_step_seconds(), seconds);
  EXPECT_GT(seconds, 0);
}

}  // namespace
}  // namespace muon::server
