#ifndef MUON_CLIENT_SRC_STEP_READ_H_
#define MUON_CLIENT_SRC_STEP_READ_H_

// How the client reads a Step stream's update chunks with one copy: the
// chunk's fields are read where they lie in gRPC's slices, and its data is
// copied once, straight into the update's buffer, instead of into an
// UpdateChunk's string by protobuf's parse and then again by the assembler
// (the server reads gradient chunks the same way, server/src/api/step_wire.h).
// Any other message (the summary, a chunk in an unusual encoding) is parsed
// by protobuf.

#include <grpcpp/grpcpp.h>

#include <cstddef>
#include <cstdint>

#include "muon/v1/optimizer.pb.h"

namespace muon::client_internal {

// One message of a Step stream as the client reads it: its bytes, as gRPC
// received them.
struct StepRead {
  grpc::ByteBuffer message;
};

// A StepResponse{update: UpdateChunk} whose data is still in its buffer.
struct WireUpdate {
  v1::UpdateChunk chunk;       // every field but data
  uint64_t data_position = 0;  // of the data's first byte in the message
  uint64_t data_size = 0;
};

// True with *update set when `message` is a StepResponse holding an update
// chunk in the plain encoding (each UpdateChunk field at most once, nothing
// else); false for anything else, to be parsed by protobuf.
bool FindWireUpdate(grpc::ByteBuffer* message, WireUpdate* update);

// Copies the chunk's data out of `message` into `destination`
// (update.data_size bytes). REQUIRES: FindWireUpdate gave `update` for it.
void CopyWireUpdateData(grpc::ByteBuffer* message, const WireUpdate& update,
                        std::byte* destination);

}  // namespace muon::client_internal

// gRPC hands a StepRead the received bytes as they are; the client never
// writes one.
template <>
class grpc::SerializationTraits<muon::client_internal::StepRead, void> {
 public:
  static grpc::Status Serialize(const muon::client_internal::StepRead&, grpc::ByteBuffer*,
                                bool*) {
    return grpc::Status(grpc::StatusCode::INTERNAL, "a StepRead is never written");
  }
  static grpc::Status Deserialize(grpc::ByteBuffer* buffer,
                                  muon::client_internal::StepRead* read) {
    read->message.Clear();
    read->message.Swap(buffer);
    return grpc::Status::OK;
  }
};

#endif  // MUON_CLIENT_SRC_STEP_READ_H_
