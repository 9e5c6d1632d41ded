#include "storage/checkpoint_format.h"

#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "muon/kernels/status_macros.h"
#include "muon/storage/checkpoint.pb.h"

namespace muon::server {
namespace {

constexpr char kMagic[8] = {'M', 'U', 'O', 'N', 'C', 'K', 'P', 'T'};
constexpr char kEndMagic[8] = {'M', 'U', 'O', 'N', 'E', 'N', 'D', '1'};
constexpr uint32_t kFormatVersion = 1;
constexpr size_t kPreambleBytes = 16;  // magic, version, 0
// meta offset, meta bytes, crc, 0, end magic.
constexpr size_t kFooterBytes = 8 + 8 + 4 + 4 + 8;

void SetTimestamp(absl::Time t, google::protobuf::Timestamp* ts) {
  const int64_t ns = absl::ToUnixNanos(t);
  ts->set_seconds(ns / 1000000000);
  ts->set_nanos(static_cast<int32_t>(ns % 1000000000));
}

absl::Time FromTimestamp(const google::protobuf::Timestamp& ts) {
  return absl::FromUnixSeconds(ts.seconds()) + absl::Nanoseconds(ts.nanos());
}

// zlib's crc32 takes 32-bit lengths; tensors can be larger.
uLong Crc32(uLong crc, const char* p, size_t bytes) {
  for (size_t done = 0; done < bytes;) {
    const size_t n = std::min<size_t>(bytes - done, 1u << 30);
    crc = crc32(crc, reinterpret_cast<const Bytef*>(p + done), static_cast<uInt>(n));
    done += n;
  }
  return crc;
}

// Appends to the sink, keeping the offset and the running CRC-32.
class Appender {
 public:
  explicit Appender(ByteSink& sink) : sink_(sink) {}

  absl::Status Append(const void* data, size_t bytes) {
    crc_ = Crc32(crc_, static_cast<const char*>(data), bytes);
    MUON_RETURN_IF_ERROR(sink_.Append(data, bytes));
    offset_ += bytes;
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status AppendValue(T value) {
    return Append(&value, sizeof(value));
  }

  absl::StatusOr<storage::Blob> AppendBlob(const void* data, size_t bytes) {
    storage::Blob blob;
    blob.set_offset(offset_);
    blob.set_bytes(bytes);
    MUON_RETURN_IF_ERROR(Append(data, bytes));
    return blob;
  }

  absl::Status AppendFloats(const std::vector<float>& values, storage::Blob* blob) {
    if (values.empty()) return absl::OkStatus();
    MUON_ASSIGN_OR_RETURN(*blob, AppendBlob(values.data(), values.size() * sizeof(float)));
    return absl::OkStatus();
  }

  uint64_t offset() const { return offset_; }
  uint32_t crc() const { return static_cast<uint32_t>(crc_); }

 private:
  ByteSink& sink_;
  uint64_t offset_ = 0;
  uLong crc_ = crc32(0, nullptr, 0);
};

bool IsSessionId(absl::string_view id) {
  if (id.empty() || id.size() > 64) return false;
  return std::all_of(id.begin(), id.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

template <typename T>
T LoadValue(absl::string_view data, size_t offset) {
  T value;
  std::memcpy(&value, data.data() + offset, sizeof(value));
  return value;
}

// Reads one verified file's blobs; blobs lie before the metadata.
class BlobReader {
 public:
  BlobReader(absl::string_view data, absl::string_view name) : data_(data), name_(name) {}

  absl::Status Corrupt(absl::string_view what) const {
    return absl::DataLossError(absl::StrCat("checkpoint ", name_, ": ", what));
  }

  // The blob's bytes; an unset blob is empty.
  absl::StatusOr<absl::string_view> Bytes(const storage::Blob& blob) const {
    if (blob.bytes() == 0) return absl::string_view();
    const uint64_t end = data_.size();
    if (blob.offset() < kPreambleBytes || blob.offset() > end ||
        blob.bytes() > end - blob.offset()) {
      return Corrupt(absl::StrCat("a blob [", blob.offset(), ", +", blob.bytes(),
                                  ") lies outside the data section"));
    }
    return data_.substr(blob.offset(), blob.bytes());
  }

  absl::StatusOr<std::vector<float>> Floats(const storage::Blob& blob) const {
    MUON_ASSIGN_OR_RETURN(absl::string_view bytes, Bytes(blob));
    if (bytes.size() % sizeof(float) != 0) {
      return Corrupt(absl::StrCat("a tensor blob of ", bytes.size(),
                                  " bytes is not a whole number of floats"));
    }
    std::vector<float> values(bytes.size() / sizeof(float));
    std::memcpy(values.data(), bytes.data(), bytes.size());
    return values;
  }

 private:
  const absl::string_view data_;
  const absl::string_view name_;
};

absl::StatusOr<std::shared_ptr<const StepRecord>> DecodeRecord(const BlobReader& blobs,
                                                               const storage::WorkerRecord& r) {
  auto record = std::make_shared<StepRecord>();
  record->step = r.step();
  for (const storage::Blob& blob : r.responses()) {
    MUON_ASSIGN_OR_RETURN(absl::string_view bytes, blobs.Bytes(blob));
    v1::StepResponse response;
    if (!response.ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
      return blobs.Corrupt("a recorded step response does not parse");
    }
    record->responses.push_back(MakeReply(std::move(response)));
  }
  if (record->responses.empty() || !record->responses.back()->message.has_summary()) {
    return blobs.Corrupt("a step record without its summary");
  }
  return record;
}

}  // namespace

absl::StatusOr<uint64_t> EncodeImage(const SessionImage& image, absl::Time write_time,
                                     ByteSink& sink) {
  Appender out(sink);
  MUON_RETURN_IF_ERROR(out.Append(kMagic, sizeof(kMagic)));
  MUON_RETURN_IF_ERROR(out.AppendValue<uint32_t>(kFormatVersion));
  MUON_RETURN_IF_ERROR(out.AppendValue<uint32_t>(0));
  storage::CheckpointMeta meta;
  meta.set_session_id(image.session_id);
  meta.set_token(image.token);
  *meta.mutable_config() = image.config;
  meta.set_step(image.step);
  SetTimestamp(image.create_time, meta.mutable_create_time());
  if (image.last_step_time != absl::InfinitePast()) {
    SetTimestamp(image.last_step_time, meta.mutable_last_step_time());
  }
  SetTimestamp(write_time, meta.mutable_write_time());
  if (!image.devices.empty() && image.devices.size() != image.params.size()) {
    return absl::InternalError(absl::StrCat("a session image with ", image.params.size(),
                                            " parameters places ", image.devices.size()));
  }
  for (size_t i = 0; i < image.params.size(); ++i) {
    const ParamState& state = image.params[i];
    storage::ParamStateBlobs* blobs = meta.add_params();
    blobs->set_step(state.step);
    if (!image.devices.empty()) blobs->set_device(image.devices[i]);
    MUON_RETURN_IF_ERROR(out.AppendFloats(state.momentum, blobs->mutable_momentum()));
    MUON_RETURN_IF_ERROR(out.AppendFloats(state.exp_avg, blobs->mutable_exp_avg()));
    MUON_RETURN_IF_ERROR(out.AppendFloats(state.exp_avg_sq, blobs->mutable_exp_avg_sq()));
    MUON_RETURN_IF_ERROR(out.AppendFloats(state.weights, blobs->mutable_weights()));
  }
  std::string bytes;
  for (size_t w = 0; w < image.records.size(); ++w) {
    const std::shared_ptr<const StepRecord>& record = image.records[w];
    if (record == nullptr) continue;
    storage::WorkerRecord* r = meta.add_records();
    r->set_worker(static_cast<uint32_t>(w));
    r->set_step(record->step);
    for (const auto& response : record->responses) {
      bytes.clear();
      SerializeReply(*response, &bytes);
      MUON_ASSIGN_OR_RETURN(*r->add_responses(), out.AppendBlob(bytes.data(), bytes.size()));
    }
  }
  const uint64_t meta_offset = out.offset();
  bytes.clear();
  if (!meta.SerializeToString(&bytes)) {
    return absl::InternalError(
        absl::StrCat("cannot serialize the checkpoint metadata of session ", image.session_id));
  }
  MUON_RETURN_IF_ERROR(out.Append(bytes.data(), bytes.size()));
  MUON_RETURN_IF_ERROR(out.AppendValue<uint64_t>(meta_offset));
  MUON_RETURN_IF_ERROR(out.AppendValue<uint64_t>(bytes.size()));
  MUON_RETURN_IF_ERROR(out.AppendValue<uint32_t>(out.crc()));
  MUON_RETURN_IF_ERROR(out.AppendValue<uint32_t>(0));
  MUON_RETURN_IF_ERROR(out.Append(kEndMagic, sizeof(kEndMagic)));
  return out.offset();
}

absl::StatusOr<SessionImage> DecodeImage(std::string contents, absl::string_view name) {
  const absl::string_view data = contents;
  BlobReader whole(data, name);
  if (data.size() < kPreambleBytes + kFooterBytes) {
    return whole.Corrupt(absl::StrCat("only ", data.size(), " bytes (truncated?)"));
  }
  if (std::memcmp(data.data(), kMagic, sizeof(kMagic)) != 0) {
    return whole.Corrupt("not a muon-server checkpoint (bad magic)");
  }
  const uint32_t version = LoadValue<uint32_t>(data, 8);
  if (version != kFormatVersion) {
    return whole.Corrupt(absl::StrCat("format version ", version,
                                      "; this server reads version ", kFormatVersion));
  }
  const size_t footer = data.size() - kFooterBytes;
  if (std::memcmp(data.data() + data.size() - sizeof(kEndMagic), kEndMagic, sizeof(kEndMagic)) !=
      0) {
    return whole.Corrupt("no end marker (truncated by a crash mid-write?)");
  }
  if (LoadValue<uint32_t>(data, footer + 20) != 0) {
    return whole.Corrupt("the footer's reserved word is not zero");
  }
  const uint32_t stored_crc = LoadValue<uint32_t>(data, footer + 16);
  if (static_cast<uint32_t>(Crc32(crc32(0, nullptr, 0), data.data(), footer + 16)) != stored_crc) {
    return whole.Corrupt("checksum mismatch (the file was changed or damaged)");
  }
  const uint64_t meta_offset = LoadValue<uint64_t>(data, footer);
  const uint64_t meta_bytes = LoadValue<uint64_t>(data, footer + 8);
  if (meta_offset < kPreambleBytes || meta_offset > footer || meta_bytes != footer - meta_offset) {
    return whole.Corrupt("the metadata section is out of place");
  }
  storage::CheckpointMeta meta;
  if (!meta.ParseFromArray(data.data() + meta_offset, static_cast<int>(meta_bytes))) {
    return whole.Corrupt("the metadata does not parse");
  }
  if (!IsSessionId(meta.session_id())) return whole.Corrupt("bad session id in the metadata");
  if (meta.token().empty()) return whole.Corrupt("no token in the metadata");
  if (meta.params_size() != meta.config().params_size()) {
    return whole.Corrupt(absl::StrCat("state for ", meta.params_size(), " parameters but ",
                                      meta.config().params_size(), " configured"));
  }
  if (meta.config().num_workers() > kMaxWorkers) {
    return whole.Corrupt(absl::StrCat("num_workers ", meta.config().num_workers(),
                                      " is over the most a session may have, ", kMaxWorkers));
  }
  const BlobReader blobs(data.substr(0, meta_offset), name);
  SessionImage image;
  image.session_id = meta.session_id();
  image.token = meta.token();
  image.config = meta.config();
  image.create_time = FromTimestamp(meta.create_time());
  image.step = meta.step();
  if (meta.has_last_step_time()) image.last_step_time = FromTimestamp(meta.last_step_time());
  image.params.resize(meta.params_size());
  for (int i = 0; i < meta.params_size(); ++i) {
    const storage::ParamStateBlobs& p = meta.params(i);
    ParamState& state = image.params[i];
    state.step = p.step();
    MUON_ASSIGN_OR_RETURN(state.momentum, blobs.Floats(p.momentum()));
    MUON_ASSIGN_OR_RETURN(state.exp_avg, blobs.Floats(p.exp_avg()));
    MUON_ASSIGN_OR_RETURN(state.exp_avg_sq, blobs.Floats(p.exp_avg_sq()));
    MUON_ASSIGN_OR_RETURN(state.weights, blobs.Floats(p.weights()));
    if (p.has_device()) {
      if (p.device() < 0 || (i > 0 && image.devices.empty())) {
        return blobs.Corrupt(absl::StrCat("the device of parameter ", i));
      }
      image.devices.push_back(p.device());
    } else if (!image.devices.empty()) {
      return blobs.Corrupt(absl::StrCat("the device of parameter ", i));
    }
  }
  image.records.resize(std::max<uint32_t>(1, meta.config().num_workers()));
  for (const storage::WorkerRecord& r : meta.records()) {
    if (r.worker() >= image.records.size() || image.records[r.worker()] != nullptr) {
      return blobs.Corrupt(absl::StrCat("a step record for worker ", r.worker()));
    }
    MUON_ASSIGN_OR_RETURN(image.records[r.worker()], DecodeRecord(blobs, r));
  }
  return image;
}

}  // namespace muon::server
