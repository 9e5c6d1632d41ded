#include "muon/client/sharded_client.h"

#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"

namespace muon {

uint64_t RendezvousScore(absl::string_view server, absl::string_view name) {
  uint64_t h = 0xCBF29CE484222325ull;
  const auto mix = [&h](unsigned char byte) { h = (h ^ byte) * 0x100000001B3ull; };
  for (char c : server) mix(static_cast<unsigned char>(c));
  mix(0);
  for (char c : name) mix(static_cast<unsigned char>(c));
  h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ull;
  h = (h ^ (h >> 27)) * 0x94D049BB133111EBull;
  return h ^ (h >> 31);
}

size_t PlaceParameter(absl::Span<const std::string> servers, absl::string_view name) {
  size_t best = 0;
  uint64_t best_score = RendezvousScore(servers[0], name);
  for (size_t i = 1; i < servers.size(); ++i) {
    const uint64_t score = RendezvousScore(servers[i], name);
    if (score > best_score) best = i, best_score = score;
  }
  return best;
}

ShardedClient::ShardedClient(std::vector<std::string> servers,
                             std::vector<std::unique_ptr<Client>> clients)
    : servers_(std::move(servers)), clients_(std::move(clients)) {}

absl::StatusOr<std::unique_ptr<ShardedClient>> ShardedClient::Create(
    std::vector<std::string> servers, const ClientOptions& base) {
  if (servers.empty()) return absl::InvalidArgumentError("ShardedClient needs at least one server");
  std::vector<std::unique_ptr<Client>> clients;
  for (const std::string& server : servers) {
    ClientOptions options = base;
    options.target = server;
    absl::StatusOr<std::unique_ptr<Client>> client = Client::Create(options);
    if (!client.ok()) return client.status();
    clients.push_back(std::move(*client));
  }
  return std::unique_ptr<ShardedClient>(new ShardedClient(std::move(servers), std::move(clients)));
}

absl::StatusOr<ShardedSession> ShardedClient::CreateSession(
    const v1::CreateSessionRequest& request) {
  ShardedSession session;
  session.shards.resize(servers_.size());
  session.global_index.resize(servers_.size());
  std::vector<v1::CreateSessionRequest> parts(servers_.size());
  for (int i = 0; i < request.params_size(); ++i) {
    const size_t k = PlaceParameter(servers_, request.params(i).name());
    session.global_index[k].push_back(static_cast<uint32_t>(i));
    *parts[k].add_params() = request.params(i);
  }
  for (size_t k = 0; k < servers_.size(); ++k) {
    if (parts[k].params_size() == 0) continue;
    v1::CreateSessionRequest part = request;
    part.clear_params();
    *part.mutable_params() = parts[k].params();
    absl::StatusOr<SessionHandle> handle = clients_[k]->CreateSession(part);
    if (!handle.ok()) {
      DeleteSession(session).IgnoreError();  // best effort: the error below matters
      return absl::Status(handle.status().code(),
                          absl::StrCat(servers_[k], ": ", handle.status().message()));
    }
    session.shards[k] = std::move(*handle);
  }
  return session;
}

absl::StatusOr<ShardedStepResult> ShardedClient::Step(ShardedSession& session, uint64_t step,
                                                      absl::Span<const Gradient> gradients,
                                                      const StepCallOptions& options) {
  // Where each of the request's parameters lives: (shard, local index).
  std::vector<std::pair<size_t, uint32_t>> where;
  for (size_t k = 0; k < session.global_index.size(); ++k) {
    for (uint32_t local = 0; local < session.global_index[k].size(); ++local) {
      const uint32_t global = session.global_index[k][local];
      if (where.size() <= global) where.resize(global + 1, {SIZE_MAX, 0});
      where[global] = {k, local};
    }
  }
  std::vector<std::vector<Gradient>> per_shard(servers_.size());
  for (const Gradient& g : gradients) {
    if (g.param_index >= where.size() || where[g.param_index].first == SIZE_MAX) {
      return absl::NotFoundError(
          absl::StrCat("parameter index ", g.param_index, " is not in this session"));
    }
    Gradient local = g;
    local.param_index = where[g.param_index].second;
    per_shard[where[g.param_index].first].push_back(local);
  }
  std::vector<absl::StatusOr<StepResult>> results(servers_.size(), absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (size_t k = 0; k < servers_.size(); ++k) {
    if (session.shards[k].id.empty()) continue;
    threads.emplace_back(
        [&, k] { results[k] = clients_[k]->Step(session.shards[k], step, per_shard[k], options); });
  }
  for (std::thread& t : threads) t.join();

  ShardedStepResult out;
  for (size_t k = 0; k < servers_.size(); ++k) {
    if (session.shards[k].id.empty()) continue;
    if (!results[k].ok()) {
      return absl::Status(results[k].status().code(),
                          absl::StrCat(servers_[k], ": ", results[k].status().message()));
    }
  }
  for (size_t k = 0; k < servers_.size(); ++k) {
    if (session.shards[k].id.empty()) continue;
    for (ParameterUpdate& u : results[k]->updates) {
      u.param_index = session.global_index[k][u.param_index];
      out.updates.push_back(std::move(u));
    }
    out.summaries.push_back(std::move(results[k]->summary));
  }
  session.step = step;
  return out;
}

absl::Status ShardedClient::DeleteSession(const ShardedSession& session) {
  absl::Status first;
  for (size_t k = 0; k < session.shards.size(); ++k) {
    if (session.shards[k].id.empty()) continue;
    absl::Status s = clients_[k]->DeleteSession(session.shards[k]);
    if (first.ok() && !s.ok()) first = s;
  }
  return first;
}

}  // namespace muon
