#ifndef MUON_CLIENT_SHARDED_CLIENT_H_
#define MUON_CLIENT_SHARDED_CLIENT_H_

// Scale-out across several muon-servers: each parameter lives on one server,
// chosen by rendezvous hashing of its name, and a step fans out to all of
// them in parallel. Python's RemoteMuon(server=[...]) places parameters by the
// same function, so both clients agree on where a parameter lives.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "muon/client/client.h"

namespace muon {

// The weight of `server` for parameter `name`: FNV-1a (64-bit) over server,
// a zero byte and name, then the splitmix64 finalizer.
uint64_t RendezvousScore(absl::string_view server, absl::string_view name);

// Index of the server holding `name`: the highest score (lowest index on a
// tie). Adding a server moves only the parameters the new server wins.
// REQUIRES: !servers.empty().
size_t PlaceParameter(absl::Span<const std::string> servers, absl::string_view name);

// A session spread over the servers. shards[k] is the session on server k
// (empty id when no parameter landed there).
struct ShardedSession {
  std::vector<SessionHandle> shards{};
  // global_index[k][local]: the request's parameter index of shard k's
  // parameter `local`.
  std::vector<std::vector<uint32_t>> global_index{};
  uint64_t step = 0;  // last step committed on every shard
};

struct ShardedStepResult {
  std::vector<ParameterUpdate> updates{};    // param_index: the request's index
  std::vector<v1::StepSummary> summaries{};  // one per shard with a session
};

// Thread-safe for distinct sessions, as Client is.
class ShardedClient {
 public:
  // `servers` are HOST:PORT targets (e.g. a StatefulSet's stable pod names);
  // `base` gives every other client option. INVALID_ARGUMENT for no servers.
  static absl::StatusOr<std::unique_ptr<ShardedClient>> Create(std::vector<std::string> servers,
                                                               const ClientOptions& base);

  // Splits request.params by PlaceParameter(name) and creates one session per
  // server that got any. On error the sessions already created are deleted.
  absl::StatusOr<ShardedSession> CreateSession(const v1::CreateSessionRequest& request);

  // Runs step `step` on every shard in parallel (gradients by the request's
  // parameter indices) and returns the updates only when every shard has
  // committed. On error nothing is returned; calling Step again with the same
  // step number and gradients completes it exactly once everywhere (shards
  // that had committed replay their updates). session.step advances on
  // success.
  absl::StatusOr<ShardedStepResult> Step(ShardedSession& session, uint64_t step,
                                         absl::Span<const Gradient> gradients,
                                         const StepCallOptions& options = {});

  absl::Status DeleteSession(const ShardedSession& session);

  const std::vector<std::string>& servers() const { return servers_; }

 private:
  ShardedClient(std::vector<std::string> servers, std::vector<std::unique_ptr<Client>> clients);

  const std::vector<std::string> servers_;
  const std::vector<std::unique_ptr<Client>> clients_;
};

}  // namespace muon

#endif  // MUON_CLIENT_SHARDED_CLIENT_H_
