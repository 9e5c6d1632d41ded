#ifndef MUON_SERVER_SRC_API_STEP_WIRE_H_
#define MUON_SERVER_SRC_API_STEP_WIRE_H_

// A Step stream's gradient chunks read straight off gRPC's slices: the
// chunk's fields are parsed where they lie and its data is copied once,
// from the slices into the assembler's buffer, instead of first into a
// TensorChunk's string by protobuf and then again by the assembler. Any
// other message (or a chunk in an unusual encoding) is parsed by protobuf.

#include <grpcpp/grpcpp.h>

#include <cstddef>
#include <cstdint>

#include "muon/v1/optimizer.pb.h"
#include "step/step_backend.h"

namespace muon::server {

// A StepRequest{gradient: TensorChunk} whose data is still in its buffer.
struct WireChunk {
  uint32_t param_index = 0;
  uint64_t offset = 0;
  v1::DType dtype = v1::DTYPE_UNSPECIFIED;
  uint64_t data_position = 0;  // of the data's first byte in the message
  uint64_t data_size = 0;
};

// True with *chunk set when `message` is a StepRequest holding a gradient
// chunk in the plain encoding (each TensorChunk field at most once, nothing
// else); false for anything else, to be parsed by protobuf.
bool FindWireChunk(grpc::ByteBuffer* message, WireChunk* chunk);

// Copies the chunk's data out of `message` into `destination`
// (chunk.data_size bytes). REQUIRES: FindWireChunk gave `chunk` for it.
void CopyWireChunkData(grpc::ByteBuffer* message, const WireChunk& chunk, std::byte* destination);

// `response` as the bytes protobuf would serialize its whole message to
// (fields in another order), except that an update chunk's data is not
// copied: it goes out as a slice that references it where it lies (the
// update buffer, or the message's own string) and keeps the response alive
// until gRPC lets go of it.
grpc::Status EncodeStepResponse(StepResponsePtr response, grpc::ByteBuffer* out);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_API_STEP_WIRE_H_
