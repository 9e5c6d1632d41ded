// ShardedClient: placement by rendezvous hashing (the same function as the
// Python client's), and a run over three real servers equal to one server's.
#include "muon/client/sharded_client.h"

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "server_process.h"

namespace muon {
namespace {

using testing::ServerProcess;

TEST(RendezvousTest, MatchesThePythonClient) {
  // Values printed by muon_client.client.rendezvous_score / place.
  EXPECT_EQ(RendezvousScore("127.0.0.1:50051", "layers.0.attn.weight"), 7520900168620744069ull);
  EXPECT_EQ(RendezvousScore("muon-1.muon-headless:50051", "w"), 11037888464406635457ull);
  const std::vector<std::string> servers = {"a:1", "b:1", "c:1"};
  const size_t want[] = {1, 2, 0, 2, 0, 0, 0, 0, 2, 1, 1, 1};
  for (int i = 0; i < 12; ++i) {
    EXPECT_EQ(PlaceParameter(servers, absl::StrCat("p", i)), want[i]) << i;
  }
}

TEST(RendezvousTest, AddingAServerMovesOnlyParametersToIt) {
  const std::vector<std::string> three = {"s0:1", "s1:1", "s2:1"};
  std::vector<std::string> four = three;
  four.push_back("s3:1");
  int moved = 0;
  for (int i = 0; i < 400; ++i) {
    const std::string name = absl::StrCat("layer", i, ".weight");
    const size_t before = PlaceParameter(three, name), after = PlaceParameter(four, name);
    if (before != after) {
      EXPECT_EQ(after, 3u) << name;
      ++moved;
    }
  }
  EXPECT_GT(moved, 60);  // about a quarter of 400
  EXPECT_LT(moved, 140);
}

v1::CreateSessionRequest Model() {
  v1::CreateSessionRequest request;
  const std::vector<std::vector<int64_t>> shapes = {{32, 16}, {16, 16}, {64, 16}, {16, 64},
                                                    {16},     {24, 8},  {8, 8},   {32}};
  for (size_t i = 0; i < shapes.size(); ++i) {
    v1::ParameterSpec* p = request.add_params();
    p->set_name(absl::StrCat("layer", i));
    for (int64_t d : shapes[i]) p->add_shape(d);
    p->set_dtype(v1::DTYPE_FLOAT32);
  }
  request.mutable_hyper_params()->set_weight_decay(0.01);
  return request;
}

TEST(ShardedClientTest, ThreeServersEqualOne) {
  if (std::getenv("MUON_SERVER_BIN") == nullptr) GTEST_SKIP() << "MUON_SERVER_BIN not set";
  std::vector<std::unique_ptr<ServerProcess>> servers;
  std::vector<std::string> addresses;
  for (int i = 0; i < 3; ++i) {
    auto server = ServerProcess::Start({"--engine=cpu"});
    ASSERT_TRUE(server.ok()) << server.status();
    addresses.push_back((*server)->address());
    servers.push_back(std::move(*server));
  }
  auto sharded = ShardedClient::Create(addresses, {});
  auto single = ShardedClient::Create({addresses[0]}, {});
  ASSERT_TRUE(sharded.ok() && single.ok());
  const v1::CreateSessionRequest model = Model();
  auto a = (*sharded)->CreateSession(model);
  auto b = (*single)->CreateSession(model);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  int used = 0;
  for (const auto& shard : a->shards) used += shard.id.empty() ? 0 : 1;
  EXPECT_GE(used, 2);  // really spread

  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> normal;
  for (uint64_t step = 1; step <= 3; ++step) {
    std::vector<std::vector<float>> data;
    std::vector<Gradient> grads;
    for (int i = 0; i < model.params_size(); ++i) {
      if (step == 2 && i == 3) continue;  // a parameter left out, on whichever shard
      int64_t n = 1;
      for (int64_t d : model.params(i).shape()) n *= d;
      data.emplace_back(n);
      for (float& x : data.back()) x = normal(rng);
    }
    size_t next = 0;
    for (int i = 0; i < model.params_size(); ++i) {
      if (step == 2 && i == 3) continue;
      const auto& d = data[next++];
      grads.push_back({static_cast<uint32_t>(i),
                       {reinterpret_cast<const std::byte*>(d.data()), d.size() * sizeof(float)},
                       v1::DTYPE_FLOAT32});
    }
    auto ra = (*sharded)->Step(*a, step, grads);
    auto rb = (*single)->Step(*b, step, grads);
    ASSERT_TRUE(ra.ok()) << ra.status();
    ASSERT_TRUE(rb.ok()) << rb.status();
    ASSERT_EQ(ra->updates.size(), rb->updates.size());
    std::vector<const ParameterUpdate*> by_index(model.params_size(), nullptr);
    for (const auto& u : ra->updates) by_index[u.param_index] = &u;
    for (const auto& u : rb->updates) {
      ASSERT_NE(by_index[u.param_index], nullptr) << u.param_index;
      EXPECT_EQ(by_index[u.param_index]->decay, u.decay);
      EXPECT_TRUE(by_index[u.param_index]->data == u.data) << "parameter " << u.param_index;
    }
  }
  EXPECT_EQ(a->step, 3u);
  EXPECT_TRUE((*sharded)->DeleteSession(*a).ok());
}

}  // namespace
}  // namespace muon
