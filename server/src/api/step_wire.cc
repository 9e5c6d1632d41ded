#include "api/step_wire.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/support/proto_buffer_reader.h>

#include <string>
#include <utility>

namespace muon::server {
namespace {

using google::protobuf::internal::WireFormatLite;
using google::protobuf::io::CodedInputStream;
using google::protobuf::io::CodedOutputStream;

constexpr uint32_t Tag(int field, WireFormatLite::WireType type) {
  return (static_cast<uint32_t>(field) << 3) | static_cast<uint32_t>(type);
}

// A data slice's destroy callback: drops its hold on the response.
void ReleaseResponse(void* hold) { delete static_cast<StepResponsePtr*>(hold); }

}  // namespace

bool FindWireChunk(grpc::ByteBuffer* message, WireChunk* chunk) {
  grpc::ProtoBufferReader reader(message);
  if (!reader.status().ok()) return false;
  CodedInputStream in(&reader);
  const uint64_t total = message->Length();
  if (in.ReadTag() !=
      Tag(v1::StepRequest::kGradientFieldNumber, WireFormatLite::WIRETYPE_LENGTH_DELIMITED)) {
    return false;
  }
  uint32_t length = 0;
  if (!in.ReadVarint32(&length) || in.CurrentPosition() + uint64_t{length} != total) return false;
  WireChunk c;
  bool seen[5] = {};
  while (static_cast<uint64_t>(in.CurrentPosition()) < total) {
    const uint32_t tag = in.ReadTag();
    const int field = WireFormatLite::GetTagFieldNumber(tag);
    if (field < 1 || field > 4 || seen[field]) return false;
    seen[field] = true;
    uint32_t value32 = 0;
    switch (tag) {
      case Tag(v1::TensorChunk::kParamIndexFieldNumber, WireFormatLite::WIRETYPE_VARINT):
        if (!in.ReadVarint32(&c.param_index)) return false;
        break;
      case Tag(v1::TensorChunk::kOffsetFieldNumber, WireFormatLite::WIRETYPE_VARINT):
        if (!in.ReadVarint64(&c.offset)) return false;
        break;
      case Tag(v1::TensorChunk::kDtypeFieldNumber, WireFormatLite::WIRETYPE_VARINT):
        // An open enum: any int32 is kept, as protobuf keeps it.
        if (!in.ReadVarint32(&value32)) return false;
        c.dtype = static_cast<v1::DType>(static_cast<int32_t>(value32));
        break;
      case Tag(v1::TensorChunk::kDataFieldNumber, WireFormatLite::WIRETYPE_LENGTH_DELIMITED):
        if (!in.ReadVarint32(&value32)) return false;
        c.data_position = static_cast<uint64_t>(in.CurrentPosition());
        c.data_size = value32;
        if (!in.Skip(static_cast<int>(value32))) return false;
        break;
      default:
        return false;  // a field in another wire type: protobuf decides
    }
  }
  if (static_cast<uint64_t>(in.CurrentPosition()) != total) return false;
  *chunk = c;
  return true;
}

void CopyWireChunkData(grpc::ByteBuffer* message, const WireChunk& chunk, std::byte* destination) {
  grpc::ProtoBufferReader reader(message);
  CodedInputStream in(&reader);
  in.Skip(static_cast<int>(chunk.data_position));
  in.ReadRaw(destination, static_cast<int>(chunk.data_size));
}

grpc::Status EncodeStepResponse(StepResponsePtr response, grpc::ByteBuffer* out) {
  out->Clear();  // Serialize wants it empty
  const absl::Span<const std::byte> data = response->update_data();
  if (data.empty()) {
    bool own = false;
    return grpc::SerializationTraits<v1::StepResponse>::Serialize(response->message, out, &own);
  }
  const v1::UpdateChunk& update = response->message.update();
  // Every field but data (step_wire_test checks that none is missed).
  v1::UpdateChunk meta;
  meta.set_param_index(update.param_index());
  meta.set_offset(update.offset());
  meta.set_dtype(update.dtype());
  meta.set_decay(update.decay());
  meta.set_total_bytes(update.total_bytes());
  meta.set_content(update.content());
  const uint32_t data_tag =
      Tag(v1::UpdateChunk::kDataFieldNumber, WireFormatLite::WIRETYPE_LENGTH_DELIMITED);
  const size_t meta_bytes = meta.ByteSizeLong();
  const uint64_t chunk_bytes = meta_bytes + CodedOutputStream::VarintSize32(data_tag) +
                               CodedOutputStream::VarintSize64(data.size()) + data.size();
  std::string head;
  {
    google::protobuf::io::StringOutputStream stream(&head);
    CodedOutputStream coded(&stream);
    coded.WriteTag(
        Tag(v1::StepResponse::kUpdateFieldNumber, WireFormatLite::WIRETYPE_LENGTH_DELIMITED));
    coded.WriteVarint64(chunk_bytes);
    meta.SerializeWithCachedSizes(&coded);
    coded.WriteTag(data_tag);
    coded.WriteVarint64(data.size());
  }
  // gRPC only reads the data; the cast is its API's.
  void* bytes = const_cast<std::byte*>(data.data());
  const size_t size = data.size();
  auto* hold = new StepResponsePtr(std::move(response));
  grpc::Slice slices[2] = {grpc::Slice(head), grpc::Slice(bytes, size, &ReleaseResponse, hold)};
  *out = grpc::ByteBuffer(slices, 2);
  return grpc::Status::OK;
}

}  // namespace muon::server
