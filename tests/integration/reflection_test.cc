// The real server described the way grpcurl does it: through server
// reflection only, with no local copy of the service's proto. Every service
// it serves, grpc.health.v1.Health included, must be describable and
// callable that way.

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/descriptor.pb.h"
#include "google/protobuf/dynamic_message.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"
#include "server_process.h"

namespace muon::testing {
namespace {

namespace reflection = grpc::reflection::v1alpha;

class ReflectionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<ServerProcess>> server = ServerProcess::Start();
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    channel_ = server_->NewChannel();
    stub_ = reflection::ServerReflection::NewStub(channel_);
  }

  // One request on a reflection stream, its one answer.
  reflection::ServerReflectionResponse Ask(const reflection::ServerReflectionRequest& request) {
    grpc::ClientContext ctx;
    auto stream = stub_->ServerReflectionInfo(&ctx);
    reflection::ServerReflectionResponse response;
    EXPECT_TRUE(stream->Write(request));
    stream->WritesDone();
    EXPECT_TRUE(stream->Read(&response));
    const grpc::Status status = stream->Finish();
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  }

  // The files that define the service `symbol`, with their dependencies,
  // built into pool_ as a reflection client does. False when reflection has
  // none.
  bool LoadSymbol(const std::string& symbol) {
    reflection::ServerReflectionRequest request;
    request.set_file_containing_symbol(symbol);
    const reflection::ServerReflectionResponse response = Ask(request);
    if (!response.has_file_descriptor_response()) {
      ADD_FAILURE() << symbol << ": " << response.error_response().error_message();
      return false;
    }
    std::vector<google::protobuf::FileDescriptorProto> files;
    for (const std::string& bytes : response.file_descriptor_response().file_descriptor_proto()) {
      files.emplace_back();
      EXPECT_TRUE(files.back().ParseFromString(bytes));
    }
    // Each file once its imports are built: the answer's order is not
    // promised.
    auto built = [&](const std::string& name) { return pool_.FindFileByName(name) != nullptr; };
    for (size_t round = 0; round < files.size(); ++round) {
      for (const auto& file : files) {
        if (built(file.name())) continue;
        if (std::all_of(file.dependency().begin(), file.dependency().end(), built)) {
          EXPECT_NE(pool_.BuildFile(file), nullptr) << file.name();
        }
      }
    }
    return pool_.FindServiceByName(symbol) != nullptr;
  }

  std::unique_ptr<ServerProcess> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<reflection::ServerReflection::Stub> stub_;
  google::protobuf::DescriptorPool pool_;
};

TEST_F(ReflectionTest, ListsEveryService) {
  reflection::ServerReflectionRequest request;
  request.set_list_services("*");
  const reflection::ServerReflectionResponse response = Ask(request);
  std::vector<std::string> names;
  for (const auto& service : response.list_services_response().service()) {
    names.push_back(service.name());
  }
  EXPECT_THAT(names, ::testing::IsSupersetOf({"muon.v1.Optimizer", "grpc.health.v1.Health"}));
}

TEST_F(ReflectionTest, DescribesTheOptimizer) {
  ASSERT_TRUE(LoadSymbol("muon.v1.Optimizer"));
  const google::protobuf::ServiceDescriptor* service =
      pool_.FindServiceByName("muon.v1.Optimizer");
  ASSERT_NE(service, nullptr);
  EXPECT_NE(service->FindMethodByName("GetServerInfo"), nullptr);
}

TEST_F(ReflectionTest, DescribesAndCallsHealthWithoutALocalProto) {
  ASSERT_TRUE(LoadSymbol("grpc.health.v1.Health"));
  const google::protobuf::ServiceDescriptor* health =
      pool_.FindServiceByName("grpc.health.v1.Health");
  ASSERT_NE(health, nullptr);
  const google::protobuf::MethodDescriptor* check = health->FindMethodByName("Check");
  ASSERT_NE(check, nullptr);
  EXPECT_NE(health->FindMethodByName("Watch"), nullptr);

  // Check, with messages built from the reflected descriptors only.
  google::protobuf::DynamicMessageFactory factory(&pool_);
  std::unique_ptr<google::protobuf::Message> request(
      factory.GetPrototype(check->input_type())->New());
  std::string request_bytes;
  ASSERT_TRUE(request->SerializeToString(&request_bytes));
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request_buffer(&slice, 1);
  grpc::ByteBuffer response_buffer;
  grpc::GenericStub generic(channel_);
  grpc::ClientContext ctx;
  grpc::Status status;
  absl::Notification done;
  generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request_buffer,
                    &response_buffer, [&](grpc::Status s) {
                      status = std::move(s);
                      done.Notify();
                    });
  done.WaitForNotification();
  ASSERT_TRUE(status.ok()) << status.error_message();
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(response_buffer.Dump(&slices).ok());
  std::string response_bytes;
  for (const grpc::Slice& s : slices) {
    response_bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  std::unique_ptr<google::protobuf::Message> response(
      factory.GetPrototype(check->output_type())->New());
  ASSERT_TRUE(response->ParseFromString(response_bytes));
  const google::protobuf::FieldDescriptor* field =
      check->output_type()->FindFieldByName("status");
  ASSERT_NE(field, nullptr);
  EXPECT_EQ(response->GetReflection()->GetEnum(*response, field)->name(), "SERVING");
}

}  // namespace
}  // namespace muon::testing
