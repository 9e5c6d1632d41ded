#include "step_write.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/impl/codegen/proto_utils.h>

#include <string>

namespace muon::client_internal {

using google::protobuf::internal::WireFormatLite;
using google::protobuf::io::CodedOutputStream;

grpc::Status EncodeStepWrite(const StepWrite& write, grpc::ByteBuffer* out) {
  out->Clear();
  if (write.message != nullptr) {
    bool own = false;
    return grpc::SerializationTraits<v1::StepRequest>::Serialize(*write.message, out, &own);
  }
  v1::TensorChunk meta;
  meta.set_param_index(write.param_index);
  meta.set_offset(write.offset);
  meta.set_dtype(write.dtype);
  const uint64_t size = write.data.size();
  const uint32_t data_tag = WireFormatLite::MakeTag(v1::TensorChunk::kDataFieldNumber,
                                                    WireFormatLite::WIRETYPE_LENGTH_DELIMITED);
  const size_t meta_bytes = meta.ByteSizeLong();
  const uint64_t chunk_bytes = meta_bytes + CodedOutputStream::VarintSize32(data_tag) +
                               CodedOutputStream::VarintSize64(size) + size;
  std::string head;
  {
    google::protobuf::io::StringOutputStream stream(&head);
    CodedOutputStream coded(&stream);
    coded.WriteTag(WireFormatLite::MakeTag(v1::StepRequest::kGradientFieldNumber,
                                           WireFormatLite::WIRETYPE_LENGTH_DELIMITED));
    coded.WriteVarint64(chunk_bytes);
    meta.SerializeWithCachedSizes(&coded);
    coded.WriteTag(data_tag);
    coded.WriteVarint64(size);
  }
  grpc::Slice slices[2] = {grpc::Slice(head), grpc::Slice(write.data.data(), size)};
  const size_t count = size > 0 ? 2 : 1;
  *out = grpc::ByteBuffer(slices, count);
  return grpc::Status::OK;
}

}  // namespace muon::client_internal
