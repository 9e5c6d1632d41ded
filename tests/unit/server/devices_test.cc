// ResolveDevices: which CUDA devices muon-server's flags select, for every
// combination of --devices, --device, --engine and the visible device count.

#include "muon/server/devices.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <optional>
#include <vector>

namespace muon::server {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

DeviceRequest Request(std::string engine, int visible,
                      std::optional<std::vector<int>> devices = std::nullopt,
                      std::optional<int> device = std::nullopt) {
  DeviceRequest r;
  r.engine = std::move(engine);
  r.visible = visible;
  r.devices = std::move(devices);
  r.device = device;
  return r;
}

TEST(ResolveDevices, DefaultIsEveryVisibleDevice) {
  for (const char* engine : {"auto", "cuda"}) {
    SCOPED_TRACE(engine);
    EXPECT_THAT(*ResolveDevices(Request(engine, 1)), ElementsAre(0));
    EXPECT_THAT(*ResolveDevices(Request(engine, 2)), ElementsAre(0, 1));
    EXPECT_THAT(*ResolveDevices(Request(engine, 4)), ElementsAre(0, 1, 2, 3));
  }
}

TEST(ResolveDevices, DeviceAloneIsOneGpu) {
  EXPECT_THAT(*ResolveDevices(Request("cuda", 4, std::nullopt, 2)), ElementsAre(2));
  EXPECT_THAT(*ResolveDevices(Request("auto", 4, std::nullopt, 0)), ElementsAre(0));
  EXPECT_THAT(*ResolveDevices(Request("auto", 1, std::nullopt, 0)), ElementsAre(0));
}

TEST(ResolveDevices, DevicesAsListedInTheirOrder) {
  EXPECT_THAT(*ResolveDevices(Request("cuda", 4, std::vector<int>{3, 1})), ElementsAre(3, 1));
  EXPECT_THAT(*ResolveDevices(Request("auto", 2, std::vector<int>{1})), ElementsAre(1));
}

TEST(ResolveDevices, DeviceAndDevicesMayAgreeOnOneGpu) {
  EXPECT_THAT(*ResolveDevices(Request("cuda", 2, std::vector<int>{1}, 1)), ElementsAre(1));
}

TEST(ResolveDevices, DeviceAndDevicesDisagreeing) {
  for (const std::vector<int>& list : {std::vector<int>{0}, std::vector<int>{1, 0}}) {
    absl::StatusOr<std::vector<int>> got = ResolveDevices(Request("cuda", 2, list, 1));
    ASSERT_FALSE(got.ok());
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(got.status().message(), HasSubstr("disagree"));
  }
}

TEST(ResolveDevices, OrdinalNotVisible) {
  const DeviceRequest bad[] = {
      Request("cuda", 2, std::vector<int>{0, 2}), Request("cuda", 2, std::vector<int>{-1}),
      Request("auto", 1, std::nullopt, 1),        Request("cuda", 3, std::nullopt, -1),
      Request("auto", 2, std::vector<int>{5}, 5),
  };
  for (const DeviceRequest& r : bad) {
    absl::StatusOr<std::vector<int>> got = ResolveDevices(r);
    ASSERT_FALSE(got.ok());
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(got.status().message(), HasSubstr("this process sees"));
  }
  EXPECT_THAT(ResolveDevices(Request("cuda", 2, std::vector<int>{2})).status().message(),
              HasSubstr("ordinals 0 to 1"));
}

TEST(ResolveDevices, DuplicateOrdinal) {
  absl::StatusOr<std::vector<int>> got = ResolveDevices(Request("cuda", 4, std::vector<int>{1, 2, 1}));
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(got.status().message(), HasSubstr("device 1 twice"));
}

TEST(ResolveDevices, EmptyListIsAnError) {
  absl::StatusOr<std::vector<int>> got = ResolveDevices(Request("cuda", 2, std::vector<int>{}));
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ResolveDevices, CpuEngineUsesNoDevice) {
  // As before: the device flags are unused by the CPU engine, whatever they say.
  EXPECT_THAT(*ResolveDevices(Request("cpu", 0)), IsEmpty());
  EXPECT_THAT(*ResolveDevices(Request("cpu", 2)), IsEmpty());
  EXPECT_THAT(*ResolveDevices(Request("cpu", 2, std::vector<int>{7, 7}, 3)), IsEmpty());
  EXPECT_THAT(*ResolveDevices(Request("auto", 0)), IsEmpty());
  EXPECT_THAT(*ResolveDevices(Request("auto", 0, std::vector<int>{0, 1}, 0)), IsEmpty());
}

TEST(ResolveDevices, CudaWithoutDevice) {
  for (const DeviceRequest& r : {Request("cuda", 0), Request("cuda", 0, std::nullopt, 0),
                                 Request("cuda", 0, std::vector<int>{0, 1})}) {
    absl::StatusOr<std::vector<int>> got = ResolveDevices(r);
    ASSERT_FALSE(got.ok());
    EXPECT_EQ(got.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(got.status().message(), HasSubstr("--engine=cpu"));
  }
}

TEST(ResolveDevices, UnknownEngine) {
  absl::StatusOr<std::vector<int>> got = ResolveDevices(Request("tpu", 2));
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(got.status().message(), HasSubstr("unknown engine 'tpu'"));
}

}  // namespace
}  // namespace muon::server
