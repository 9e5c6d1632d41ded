#include "storage/step_reply.h"

#include <utility>

namespace muon::server {

absl::Span<const std::byte> StepReply::update_data() const {
  if (data_owner != nullptr) return data;
  if (!message.has_update()) return {};
  const std::string& bytes = message.update().data();
  return absl::MakeConstSpan(reinterpret_cast<const std::byte*>(bytes.data()), bytes.size());
}

std::shared_ptr<const StepReply> MakeReply(v1::StepResponse message) {
  auto reply = std::make_shared<StepReply>();
  reply->message = std::move(message);
  return reply;
}

void SerializeReply(const StepReply& reply, std::string* out) {
  if (reply.data_owner == nullptr) {
    reply.message.SerializeToString(out);
    return;
  }
  v1::StepResponse whole = reply.message;
  whole.mutable_update()->set_data(reinterpret_cast<const char*>(reply.data.data()),
                                   reply.data.size());
  whole.SerializeToString(out);
}

}  // namespace muon::server
