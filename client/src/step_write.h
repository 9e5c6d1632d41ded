#ifndef MUON_CLIENT_SRC_STEP_WRITE_H_
#define MUON_CLIENT_SRC_STEP_WRITE_H_

// How the client writes a Step stream's gradient chunks without copying
// them: a chunk's bytes go to gRPC as a slice that references the caller's
// gradient, after a few bytes of protobuf framing, instead of being copied
// into a TensorChunk's string and then serialized into a second buffer.

#include <grpcpp/grpcpp.h>

#include <cstddef>
#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "muon/v1/optimizer.pb.h"

namespace muon::client_internal {

// Counts the slices gRPC holds that reference a caller's gradient bytes, so
// that a step returns (and the caller may free its gradients) only once
// gRPC has let go of all of them. Thread-safe.
class LentBytes {
 public:
  ~LentBytes();
  // One more slice references the caller's memory.
  void Lend();
  // A slice's destroy callback: `self` is the LentBytes.
  static void Return(void* self);
  // Blocks until every lent slice is destroyed.
  void AwaitReturned();
  int64_t lent() const;

 private:
  mutable absl::Mutex mu_;
  int64_t lent_ ABSL_GUARDED_BY(mu_) = 0;
};

// One message of a Step stream as the client writes it: a whole StepRequest
// (the header, StepEnd), or a gradient chunk whose `data` is borrowed.
struct StepWrite {
  const v1::StepRequest* message = nullptr;  // set: this message as is
  uint32_t param_index = 0;
  uint64_t offset = 0;
  v1::DType dtype = v1::DTYPE_UNSPECIFIED;
  absl::Span<const std::byte> data;
  LentBytes* lent = nullptr;  // required for a chunk; outlives the slices

  static StepWrite Whole(const v1::StepRequest& message) {
    StepWrite write;
    write.message = &message;
    return write;
  }
};

// The wire bytes of `write`: the same a StepRequest{gradient: TensorChunk}
// serializes to (fields in another order), its data as a slice that
// references `write.data`.
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
