// Gradient chunks read straight off a message's slices (api/step_wire.h):
// the fields and data protobuf would parse, wherever the slices split, and
// anything unusual left to protobuf.

#include "api/step_wire.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace muon::server {
namespace {

// `bytes` as a message of slices cut at `cuts`.
grpc::ByteBuffer Message(const std::string& bytes, std::vector<size_t> cuts) {
  std::vector<grpc::Slice> slices;
  size_t start = 0;
  cuts.push_back(bytes.size());
  for (size_t cut : cuts) {
    slices.emplace_back(bytes.data() + start, cut - start);
    start = cut;
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

v1::StepRequest Chunk(uint32_t index, uint64_t offset, std::string data, v1::DType dtype) {
  v1::StepRequest request;
  v1::TensorChunk* chunk = request.mutable_gradient();
  chunk->set_param_index(index);
  chunk->set_offset(offset);
  chunk->set_data(std::move(data));
  chunk->set_dtype(dtype);
  return request;
}

TEST(StepWireTest, AChunkIsFoundAndItsDataCopiedWhereverTheSlicesSplit) {
  std::mt19937_64 rng(std::random_device{}());
  std::string data(70000, '\0');
  for (char& c : data) c = static_cast<char>(rng());
  const std::string bytes = Chunk(7, 1u << 20, data, v1::DTYPE_BFLOAT16).SerializeAsString();
  for (std::vector<size_t> cuts :
       std::vector<std::vector<size_t>>{{}, {1}, {3}, {5, 6}, {100, 65536}, {bytes.size() - 1}}) {
    grpc::ByteBuffer message = Message(bytes, cuts);
    WireChunk chunk;
    ASSERT_TRUE(FindWireChunk(&message, &chunk));
    EXPECT_EQ(chunk.param_index, 7u);
    EXPECT_EQ(chunk.offset, 1u << 20);
    EXPECT_EQ(chunk.dtype, v1::DTYPE_BFLOAT16);
    ASSERT_EQ(chunk.data_size, data.size());
    std::string copied(data.size(), '\0');
    CopyWireChunkData(&message, chunk, reinterpret_cast<std::byte*>(copied.data()));
    EXPECT_TRUE(copied == data);
  }
}

TEST(StepWireTest, DefaultFieldsAreZeroAndFieldsMayComeInAnyOrder) {
  // param_index 0, offset 0 and dtype unspecified are not on the wire.
  const std::string plain = Chunk(0, 0, "abcd", v1::DTYPE_UNSPECIFIED).SerializeAsString();
  grpc::ByteBuffer message = Message(plain, {});
  WireChunk chunk;
  ASSERT_TRUE(FindWireChunk(&message, &chunk));
  EXPECT_EQ(chunk.param_index, 0u);
  EXPECT_EQ(chunk.offset, 0u);
  EXPECT_EQ(chunk.dtype, v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(chunk.data_size, 4u);
  // data first, then dtype, offset, param_index: the same chunk.
  v1::TensorChunk data_only;
  data_only.set_data("wxyz");
  v1::TensorChunk rest;
  rest.set_dtype(v1::DTYPE_FLOAT32);
  rest.set_offset(8);
  rest.set_param_index(2);
  const std::string inner = data_only.SerializeAsString() + rest.SerializeAsString();
  std::string reordered = "\x12";
  reordered.push_back(static_cast<char>(inner.size()));
  reordered += inner;
  v1::StepRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(reordered));
  grpc::ByteBuffer other = Message(reordered, {2});
  ASSERT_TRUE(FindWireChunk(&other, &chunk));
  EXPECT_EQ(chunk.param_index, 2u);
  EXPECT_EQ(chunk.offset, 8u);
  EXPECT_EQ(chunk.dtype, v1::DTYPE_FLOAT32);
  std::string copied(4, '\0');
  CopyWireChunkData(&other, chunk, reinterpret_cast<std::byte*>(copied.data()));
  EXPECT_EQ(copied, parsed.gradient().data());
}

TEST(StepWireTest, AnythingButAPlainChunkIsLeftToProtobuf) {
  std::vector<std::string> messages;
  v1::StepRequest header;
  header.mutable_header()->set_step(3);
  messages.push_back(header.SerializeAsString());
  v1::StepRequest end;
  end.mutable_end()->add_param_indices(1);
  messages.push_back(end.SerializeAsString());
  const std::string chunk = Chunk(1, 4, "data", v1::DTYPE_FLOAT32).SerializeAsString();
  std::string two = chunk;
  two.append(chunk);
  messages.push_back(two);  // two chunks in one message: the last wins
  std::string mixed = chunk;
  mixed.append(header.SerializeAsString());
  messages.push_back(mixed);
  v1::TensorChunk twice;
  twice.set_data("ab");
  const std::string inner = twice.SerializeAsString() + twice.SerializeAsString();
  std::string framed = "\x12";
  framed.push_back(static_cast<char>(inner.size()));
  framed.append(inner);
  messages.push_back(framed);
  v1::StepRequest unknown = Chunk(1, 4, "data", v1::DTYPE_FLOAT32);
  unknown.mutable_gradient()
      ->GetReflection()
      ->MutableUnknownFields(unknown.mutable_gradient())
      ->AddVarint(9, 1);
  messages.push_back(unknown.SerializeAsString());
  messages.push_back(chunk.substr(0, chunk.size() - 1));  // truncated
  messages.push_back("");
  for (size_t i = 0; i < messages.size(); ++i) {
    grpc::ByteBuffer message = Message(messages[i], {});
    WireChunk found;
    EXPECT_FALSE(FindWireChunk(&message, &found)) << "message " << i;
  }
}

// The bytes of `message`, one string.
std::string Bytes(grpc::ByteBuffer* message) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(message->Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  return bytes;
}

// Encodes `response`, whose update data starts at `data` and is kept alive
// by what `alive` watches: the message must be `want`'s bytes, its data the
// second slice pointing at `data` itself (not a copy), and the slice must be
// what holds `alive` until the message is cleared.
template <typename Held>
void ExpectSentInPlace(StepResponsePtr response, const void* data,
                       const std::weak_ptr<Held>& alive, const std::string& want) {
  grpc::ByteBuffer message;
  ASSERT_TRUE(EncodeStepResponse(std::move(response), &message).ok());
  EXPECT_FALSE(alive.expired());  // held by the slice, through the reply
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(message.Dump(&slices).ok());
  ASSERT_EQ(slices.size(), 2u);
  EXPECT_EQ(static_cast<const void*>(slices[1].begin()), data);  // not a copy
  slices.clear();
  v1::StepResponse parsed;
  ASSERT_TRUE(parsed.ParseFromString(Bytes(&message)));
  EXPECT_EQ(parsed.SerializeAsString(), want);
  message.Clear();
  EXPECT_TRUE(alive.expired());  // the last slice released it
}

// An update chunk goes out as protobuf would send it, its data a slice of
// the response's own string that keeps the response alive.
TEST(StepWireTest, AnUpdateIsSentFromItsOwnStringAndKeptAliveByItsSlice) {
  // A field added to UpdateChunk must be added to EncodeStepResponse too.
  ASSERT_EQ(v1::UpdateChunk::descriptor()->field_count(), 7);
  auto response = std::make_shared<StepReply>();
  v1::UpdateChunk* update = response->message.mutable_update();
  update->set_param_index(4);
  update->set_offset(1024);
  update->set_data(std::string(5000, 'u'));
  update->set_dtype(v1::DTYPE_FLOAT16);
  update->set_decay(0.999);
  update->set_total_bytes(9000);
  update->set_content(v1::UPDATE_CONTENT_WEIGHTS);
  const std::string want = response->message.SerializeAsString();
  const void* data = update->data().data();
  std::weak_ptr<StepReply> alive = response;
  ASSERT_NO_FATAL_FAILURE(ExpectSentInPlace(std::move(response), data, alive, want));
}

// An update whose data lies in the engine's update buffer goes out as
// protobuf would send the whole message, its data a slice of that buffer,
// which the slice keeps alive after every other holder let go.
TEST(StepWireTest, AnUpdateIsSentFromItsBufferAndTheSliceKeepsTheBufferAlive) {
  std::mt19937 rng(::testing::UnitTest::GetInstance()->random_seed());
  std::shared_ptr<std::byte[]> buffer(new std::byte[6000]);
  for (size_t i = 0; i < 6000; ++i) buffer[i] = static_cast<std::byte>(rng());
  auto response = std::make_shared<StepReply>();
  v1::UpdateChunk* update = response->message.mutable_update();
  update->set_param_index(2);
  update->set_offset(1000);
  update->set_dtype(v1::DTYPE_BFLOAT16);
  update->set_decay(0.98);
  update->set_total_bytes(6000);
  update->set_content(v1::UPDATE_CONTENT_UPDATE);
  response->data = absl::MakeConstSpan(buffer.get() + 1000, 5000);
  response->data_owner = buffer;
  std::string want;
  SerializeReply(*response, &want);
  v1::StepResponse whole;
  ASSERT_TRUE(whole.ParseFromString(want));
  EXPECT_EQ(whole.update().data(),
            std::string(reinterpret_cast<const char*>(buffer.get()) + 1000, 5000));
  const void* data = buffer.get() + 1000;
  std::weak_ptr<std::byte[]> alive = buffer;
  buffer.reset();
  ASSERT_NO_FATAL_FAILURE(
      ExpectSentInPlace(std::move(response), data, alive, whole.SerializeAsString()));
}

TEST(StepWireTest, ASummaryIsSerializedAsIs) {
  v1::StepResponse summary;
  summary.mutable_summary()->set_step(12);
  const std::string want = summary.SerializeAsString();
  grpc::ByteBuffer message;
  ASSERT_TRUE(EncodeStepResponse(MakeReply(summary), &message).ok());
  EXPECT_EQ(Bytes(&message), want);
}

}  // namespace
}  // namespace muon::server
