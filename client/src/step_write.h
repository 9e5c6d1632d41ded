#ifndef MUON_CLIENT_SRC_STEP_WRITE_H_
#define MUON_CLIENT_SRC_STEP_WRITE_H_

// How the client writes a Step stream's gradient chunks with one copy: a
// chunk's bytes go once from the caller's gradient into the slice gRPC
// sends, after a few bytes of protobuf framing, instead of into a
// TensorChunk's string and then again into the serialized message. (A slice
// that references the caller's memory would save that copy too, but gRPC
// 1.51 may hold a sent slice after the call ends when a connection breaks,
// and a step cannot wait for that: a broken-stream test hung on it.)

#include <grpcpp/grpcpp.h>

#include <cstddef>
#include <cstdint>

#include "absl/types/span.h"
#include "muon/v1/optimizer.pb.h"

namespace muon::client_internal {

// One message of a Step stream as the client writes it: a whole StepRequest
// (the header, StepEnd), or a gradient chunk of `data`.
struct StepWrite {
  const v1::StepRequest* message = nullptr;  // set: this message as is
  uint32_t param_index = 0;
  uint64_t offset = 0;
  v1::DType dtype = v1::DTYPE_UNSPECIFIED;
  absl::Span<const std::byte> data;

  static StepWrite Whole(const v1::StepRequest& message) {
    StepWrite write;
    write.message = &message;
    return write;
  }
};

// The wire bytes of `write`: the same a StepRequest{gradient: TensorChunk}
// serializes to (fields in another order).
grpc::Status EncodeStepWrite(const StepWrite& write, grpc::ByteBuffer* out);

}  // namespace muon::client_internal

// gRPC serializes a StepWrite through EncodeStepWrite; the client never
// reads one.
template <>
class grpc::SerializationTraits<muon::client_internal::StepWrite, void> {
 public:
  static grpc::Status Serialize(const muon::client_internal::StepWrite& write,
                                grpc::ByteBuffer* buffer, bool* own_buffer) {
    *own_buffer = true;
    return muon::client_internal::EncodeStepWrite(write, buffer);
  }
  static grpc::Status Deserialize(grpc::ByteBuffer*, muon::client_internal::StepWrite*) {
    return grpc::Status(grpc::StatusCode::INTERNAL, "a StepWrite is never read");
  }
};

#endif  // MUON_CLIENT_SRC_STEP_WRITE_H_
