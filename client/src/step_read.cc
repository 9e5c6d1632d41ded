#include "step_read.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/support/proto_buffer_reader.h>

#include <cstring>

namespace muon::client_internal {
namespace {

using google::protobuf::internal::WireFormatLite;
using google::protobuf::io::CodedInputStream;

constexpr uint32_t Tag(int field, WireFormatLite::WireType type) {
  return (static_cast<uint32_t>(field) << 3) | static_cast<uint32_t>(type);
}

}  // namespace

bool FindWireUpdate(grpc::ByteBuffer* message, WireUpdate* update) {
  grpc::ProtoBufferReader reader(message);
  if (!reader.status().ok()) return false;
  CodedInputStream in(&reader);
  const uint64_t total = message->Length();
  if (in.ReadTag() !=
      Tag(v1::StepResponse::kUpdateFieldNumber, WireFormatLite::WIRETYPE_LENGTH_DELIMITED)) {
    return false;
  }
  uint32_t length = 0;
  if (!in.ReadVarint32(&length) || in.CurrentPosition() + uint64_t{length} != total) return false;
  WireUpdate u;
  bool seen[8] = {};
  while (static_cast<uint64_t>(in.CurrentPosition()) < total) {
    const uint32_t tag = in.ReadTag();
    const int field = WireFormatLite::GetTagFieldNumber(tag);
    if (field < 1 || field > 7 || seen[field]) return false;
    seen[field] = true;
    uint32_t value32 = 0;
    uint64_t value64 = 0;
    switch (tag) {
      case Tag(v1::UpdateChunk::kParamIndexFieldNumber, WireFormatLite::WIRETYPE_VARINT):
        if (!in.ReadVarint32(&value32)) return false;
        u.chunk.set_param_index(value32);
        break;
      case Tag(v1::UpdateChunk::kOffsetFieldNumber, WireFormatLite::WIRETYPE_VARINT):
        if (!in.ReadVarint64(&value64)) return false;
        u.chunk.set_offset(value64);
        break;
      case Tag(v1::UpdateChunk::kDataFieldNumber, WireFormatLite::WIRETYPE_LENGTH_DELIMITED):
        if (!in.ReadVarint32(&value32)) return false;
        u.data_position = static_cast<uint64_t>(in.CurrentPosition());
        u.data_size = value32;
        if (!in.Skip(static_cast<int>(value32))) return false;
        break;
      // Open enums: any int32 is kept, as protobuf keeps it.
      case Tag(v1::UpdateChunk::kDtypeFieldNumber, WireFormatLite::WIRETYPE_VARINT):
        if (!in.ReadVarint32(&value32)) return false;
        u.chunk.set_dtype(static_cast<v1::DType>(static_cast<int32_t>(value32)));
        break;
      case Tag(v1::UpdateChunk::kContentFieldNumber, WireFormatLite::WIRETYPE_VARINT):
        if (!in.ReadVarint32(&value32)) return false;
        u.chunk.set_content(static_cast<v1::UpdateContent>(static_cast<int32_t>(value32)));
        break;
      case Tag(v1::UpdateChunk::kDecayFieldNumber, WireFormatLite::WIRETYPE_FIXED64): {
        if (!in.ReadLittleEndian64(&value64)) return false;
        double decay = 0;
        std::memcpy(&decay, &value64, sizeof decay);
        u.chunk.set_decay(decay);
        break;
      }
      case Tag(v1::UpdateChunk::kTotalBytesFieldNumber, WireFormatLite::WIRETYPE_VARINT):
        if (!in.ReadVarint64(&value64)) return false;
        u.chunk.set_total_bytes(value64);
        break;
      default:
        return false;  // a field in another wire type: protobuf decides
    }
  }
  if (static_cast<uint64_t>(in.CurrentPosition()) != total) return false;
  *update = std::move(u);
  return true;
}

void CopyWireUpdateData(grpc::ByteBuffer* message, const WireUpdate& update,
                        std::byte* destination) {
  grpc::ProtoBufferReader reader(message);
  CodedInputStream in(&reader);
  in.Skip(static_cast<int>(update.data_position));
  in.ReadRaw(destination, static_cast<int>(update.data_size));
}

}  // namespace muon::client_internal
