#ifndef MUON_SERVER_SRC_STORAGE_STEP_REPLY_H_
#define MUON_SERVER_SRC_STORAGE_STEP_REPLY_H_

#include <cstddef>
#include <memory>
#include <string>

#include "absl/types/span.h"
#include "muon/v1/optimizer.pb.h"

namespace muon::server {

// One message a Step stream answers with, as the server keeps it (a step's
// record holds these). An update chunk's data is either in `message`, as
// protobuf holds it (parameter-server replies, records read from a
// checkpoint), or, when `data_owner` is set, in `data`: a range of the
// buffer the engine wrote the update into, which `data_owner` keeps alive,
// so the bytes go to the socket without being copied into a string
// (`message.update().data()` is then empty).
struct StepReply {
  v1::StepResponse message;
  absl::Span<const std::byte> data;
  std::shared_ptr<const void> data_owner;

  // The update chunk's data wherever it lies; empty for other messages.
  absl::Span<const std::byte> update_data() const;
};

// A reply whose message holds everything.
std::shared_ptr<const StepReply> MakeReply(v1::StepResponse message);

// The bytes protobuf serializes the whole message to, the data in it
// (checkpoints).
void SerializeReply(const StepReply& reply, std::string* out);

}  // namespace muon::server

#endif  // MUON_SERVER_SRC_STORAGE_STEP_REPLY_H_
