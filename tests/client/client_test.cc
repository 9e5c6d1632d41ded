// The client's chunking and update reassembly, muonctl's model presets and
// percentiles. No server: tests/integration drives muon::Client against one.

#include "muon/client/client.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "chunking.h"
#include "step_read.h"
#include "step_write.h"
#include "model_presets.h"
#include "stats.h"

namespace muon {
namespace {

using client_internal::ByteRange;
using client_internal::EffectiveChunkBytes;
using client_internal::SplitIntoChunks;
using client_internal::UpdateAssembler;
using muonctl::ModelPreset;
using muonctl::PresetParam;
using muonctl::Samples;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// --- Chunking -------------------------------------------------------------

TEST(ChunkingTest, CutsIntoChunksThatCoverTheTensorExactly) {
  EXPECT_THAT(SplitIntoChunks(10, 4),
              ElementsAre(ByteRange{0, 4}, ByteRange{4, 4}, ByteRange{8, 2}));
  EXPECT_THAT(SplitIntoChunks(8, 4), ElementsAre(ByteRange{0, 4}, ByteRange{4, 4}));
  EXPECT_THAT(SplitIntoChunks(3, 1 << 20), ElementsAre(ByteRange{0, 3}));
  EXPECT_TRUE(SplitIntoChunks(0, 1 << 20).empty());
}

TEST(ChunkingTest, ChunkSizeIsAMultipleOfEveryElementSize) {
  EXPECT_EQ(EffectiveChunkBytes(1 << 20), size_t{1} << 20);
  EXPECT_EQ(EffectiveChunkBytes(1001), 1000u);
  EXPECT_EQ(EffectiveChunkBytes(3), 4u);
  EXPECT_EQ(EffectiveChunkBytes(0), 4u);
  // 2304×768 fp32 = 7 077 888 bytes: 7 chunks of 1 MiB (no message nears 4 MiB).
  const std::vector<ByteRange> ranges = SplitIntoChunks(2304 * 768 * 4, 1 << 20);
  ASSERT_EQ(ranges.size(), 7u);
  size_t next = 0;
  for (const ByteRange& r : ranges) {
    EXPECT_EQ(r.offset, next);
    EXPECT_LE(r.size, size_t{1} << 20);
    EXPECT_EQ(r.size % 4, 0u);
    next += r.size;
  }
  EXPECT_EQ(next, 2304u * 768 * 4);
}

// --- Update reassembly ----------------------------------------------------

v1::UpdateChunk Chunk(uint32_t index, uint64_t offset, const std::string& data, uint64_t total,
                      double decay = 0.5) {
  v1::UpdateChunk c;
  c.set_param_index(index);
  c.set_offset(offset);
  c.set_data(data);
  c.set_total_bytes(total);
  c.set_decay(decay);
  c.set_dtype(v1::DTYPE_FLOAT32);
  return c;
}

v1::StepSummary Summary(std::vector<uint32_t> indices) {
  v1::StepSummary s;
  s.set_step(3);
  for (uint32_t i : indices) s.add_param_indices(i);
  return s;
}

std::string Text(const std::vector<std::byte>& bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

TEST(UpdateAssemblerTest, ReassemblesChunksInAnyOrderAndSortsByIndex) {
  UpdateAssembler a;
  ASSERT_TRUE(a.Add(Chunk(5, 4, "efgh", 8)).ok());
  ASSERT_TRUE(a.Add(Chunk(2, 0, "wxyz", 4, 1.0)).ok());
  ASSERT_TRUE(a.Add(Chunk(5, 0, "abcd", 8)).ok());
  absl::StatusOr<std::vector<ParameterUpdate>> updates = a.Finish(Summary({2, 5}));
  ASSERT_TRUE(updates.ok()) << updates.status();
  ASSERT_EQ(updates->size(), 2u);
  EXPECT_EQ((*updates)[0].param_index, 2u);
  EXPECT_EQ(Text((*updates)[0].data), "wxyz");
  EXPECT_EQ((*updates)[0].decay, 1.0);
  EXPECT_EQ((*updates)[1].param_index, 5u);
  EXPECT_EQ(Text((*updates)[1].data), "abcdefgh");
  EXPECT_EQ((*updates)[1].decay, 0.5);
  EXPECT_EQ((*updates)[1].content, v1::UPDATE_CONTENT_UPDATE);
  EXPECT_EQ((*updates)[1].dtype, v1::DTYPE_FLOAT32);
}

TEST(UpdateAssemblerTest, RejectsOverlappingOrOutOfBoundsChunks) {
  UpdateAssembler a;
  ASSERT_TRUE(a.Add(Chunk(0, 0, "abcd", 12)).ok());
  ASSERT_TRUE(a.Add(Chunk(0, 8, "ijkl", 12)).ok());
  EXPECT_EQ(a.Add(Chunk(0, 2, "cdef", 12)).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(a.Add(Chunk(0, 6, "ghij", 12)).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(a.Add(Chunk(0, 10, "klmn", 12)).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(a.Add(Chunk(0, 4, "efgh", 16)).code(), absl::StatusCode::kDataLoss);        // total
  EXPECT_EQ(a.Add(Chunk(0, 4, "efgh", 12, 0.25)).code(), absl::StatusCode::kDataLoss);  // decay
  ASSERT_TRUE(a.Add(Chunk(0, 4, "efgh", 12)).ok());
  absl::StatusOr<std::vector<ParameterUpdate>> updates = a.Finish(Summary({0}));
  ASSERT_TRUE(updates.ok()) << updates.status();
  EXPECT_EQ(Text((*updates)[0].data), "abcdefghijkl");
}

TEST(UpdateAssemblerTest, FinishChecksAgainstTheSummary) {
  {
    UpdateAssembler a;
    ASSERT_TRUE(a.Add(Chunk(1, 0, "abcd", 8)).ok());
    absl::StatusOr<std::vector<ParameterUpdate>> u = a.Finish(Summary({1}));
    EXPECT_EQ(u.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(u.status().message(), HasSubstr("incomplete (4 of 8 bytes)"));
  }
  {
    UpdateAssembler a;
    absl::StatusOr<std::vector<ParameterUpdate>> u = a.Finish(Summary({1}));
    EXPECT_EQ(u.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(u.status().message(), HasSubstr("no update came"));
  }
  {
    UpdateAssembler a;
    ASSERT_TRUE(a.Add(Chunk(4, 0, "abcd", 4)).ok());
    absl::StatusOr<std::vector<ParameterUpdate>> u = a.Finish(Summary({}));
    EXPECT_EQ(u.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(u.status().message(), HasSubstr("does not list"));
  }
  {
    UpdateAssembler a;  // a step with no parameters
    absl::StatusOr<std::vector<ParameterUpdate>> u = a.Finish(Summary({}));
    ASSERT_TRUE(u.ok());
    EXPECT_TRUE(u->empty());
  }
}

TEST(ClientTest, CreateRejectsBadOptions) {
  EXPECT_EQ(Client::Create({}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Client::Create({.target = "127.0.0.1:1", .chunk_bytes = 2}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(Client::Create({.target = "127.0.0.1:1"}).ok());
  EXPECT_TRUE(Client::Create(Client::Options{.target = "127.0.0.1:1"}).ok());
}

TEST(ClientTest, UnreachableServerIsUnavailable) {
  auto client = Client::Create({.target = "127.0.0.1:1",
                                .max_step_attempts = 2,
                                .retry_backoff = absl::Milliseconds(1),
                                .call_timeout = absl::Seconds(5)});
  ASSERT_TRUE(client.ok());
  EXPECT_EQ((*client)->Health().status().code(), absl::StatusCode::kUnavailable);
  SessionHandle session{.id = "s", .token = "t"};
  absl::StatusOr<StepResult> r = (*client)->Step(session, 1, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
}

TEST(ClientTest, StepRejectsAGradientGivenTwice) {
  auto client = Client::Create({.target = "127.0.0.1:1"});
  ASSERT_TRUE(client.ok());
  std::vector<std::byte> bytes(8);
  std::vector<Gradient> grads = {{.param_index = 1, .data = bytes},
                                 {.param_index = 1, .data = bytes}};
  absl::StatusOr<StepResult> r = (*client)->Step({.id = "s"}, 1, grads);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("parameter 1 has more than one gradient"));
}

TEST(ClientTest, KeepsTheGrpcCodeAndMessage) {
  absl::Status s = FromGrpcStatus(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "step 7"));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.message(), "step 7");
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok());
}

// --- Presets (docs/performance.md, "Workloads") ----------------------------

int64_t Elements(const std::vector<PresetParam>& params) {
  int64_t n = 0;
  for (const PresetParam& p : params) n += p.rows * p.cols;
  return n;
}

TEST(ModelPresetTest, ShapesOfDesignSection5) {
  auto gpt2 = ModelPreset("gpt2-small");
  ASSERT_TRUE(gpt2.ok());
  ASSERT_EQ(gpt2->size(), 48u);
  EXPECT_EQ((*gpt2)[0].rows, 768);
  EXPECT_EQ((*gpt2)[0].cols, 2304);
  EXPECT_EQ((*gpt2)[1].rows, 768);
  EXPECT_EQ((*gpt2)[1].cols, 768);
  EXPECT_EQ((*gpt2)[2].rows, 3072);
  EXPECT_EQ((*gpt2)[2].cols, 768);
  EXPECT_EQ((*gpt2)[3].rows, 768);
  EXPECT_EQ((*gpt2)[3].cols, 3072);
  EXPECT_EQ(Elements(*gpt2), 12 * 12 * 768 * 768);

  auto medium = ModelPreset("gpt2-medium");
  ASSERT_TRUE(medium.ok());
  EXPECT_EQ(medium->size(), 96u);
  EXPECT_EQ(Elements(*medium), 24 * 12 * 1024 * 1024);

  auto llama = ModelPreset("llama-1b");
  ASSERT_TRUE(llama.ok());
  EXPECT_EQ(llama->size(), 112u);
  EXPECT_EQ(Elements(*llama),
            16 * (2 * 2048 * 2048 + 2 * 512 * 2048 + 2 * 8192 * 2048 + 2048 * 8192));

  auto small256 = ModelPreset("small-256");
  ASSERT_TRUE(small256.ok());
  EXPECT_EQ(small256->size(), 512u);
  for (const PresetParam& p : *small256) {
    EXPECT_EQ(p.rows, 256);
    EXPECT_EQ(p.cols, 256);
  }
}

TEST(ModelPresetTest, FlopsMatchTheDesignTable) {
  // docs/performance.md, "Workloads": GFLOP of 5 Newton-Schulz steps over each model.
  EXPECT_NEAR(muonctl::NsFlops(*ModelPreset("gpt2-small"), 5) / 1e9, 1522, 1);
  EXPECT_NEAR(muonctl::NsFlops(*ModelPreset("gpt2-medium"), 5) / 1e9, 7216, 1);
  EXPECT_NEAR(muonctl::NsFlops(*ModelPreset("llama-1b"), 5) / 1e9, 45741, 1);
  EXPECT_NEAR(muonctl::NsFlops(*ModelPreset("small-256"), 5) / 1e9, 258, 1);
}

TEST(ModelPresetTest, NamesAreUniqueAndUnknownModelsAreRejected) {
  for (const std::string& name : muonctl::ModelPresetNames()) {
    auto params = ModelPreset(name);
    ASSERT_TRUE(params.ok()) << name;
    std::set<std::string> names;
    for (const PresetParam& p : *params) names.insert(p.name);
    EXPECT_EQ(names.size(), params->size()) << name;
  }
  auto bad = ModelPreset("gpt5");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("gpt2-small"));
}

// --- Percentiles ------------------------------------------------------------

TEST(SamplesTest, PercentilesInterpolateBetweenRanks) {
  Samples s;
  EXPECT_EQ(s.Percentile(50), 0.0);
  for (int i = 100; i >= 1; --i) s.Add(i);  // 1..100, unsorted
  EXPECT_DOUBLE_EQ(s.Percentile(0), 1);
  EXPECT_DOUBLE_EQ(s.Percentile(100), 100);
  EXPECT_DOUBLE_EQ(s.Percentile(50), 50.5);
  EXPECT_DOUBLE_EQ(s.Percentile(99), 99.01);
  EXPECT_DOUBLE_EQ(s.Mean(), 50.5);
  Samples one;
  one.Add(3);
  EXPECT_DOUBLE_EQ(one.Percentile(99), 3);
  Samples merged;
  merged.Merge(s);
  merged.Merge(one);
  EXPECT_EQ(merged.count(), 101u);
  EXPECT_DOUBLE_EQ(merged.Sum(), 5053);
}

// A gradient chunk goes to gRPC as its framing plus one slice of its data:
// the message parses as the StepRequest set_data would have built.
TEST(StepWriteTest, AChunkParsesAsItsStepRequest) {
  std::vector<std::byte> gradient(3000);
  for (size_t i = 0; i < gradient.size(); ++i) gradient[i] = static_cast<std::byte>(i * 7);
  client_internal::StepWrite write;
  write.param_index = 5;
  write.offset = 1000;
  write.dtype = v1::DTYPE_BFLOAT16;
  write.data = absl::MakeConstSpan(gradient).subspan(1000, 1500);
  grpc::ByteBuffer buffer;
  ASSERT_TRUE(client_internal::EncodeStepWrite(write, &buffer).ok());
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(buffer.Dump(&slices).ok());
  ASSERT_EQ(slices.size(), 2u);
  EXPECT_EQ(slices[1].size(), 1500u);  // the data, in one piece
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  v1::StepRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(bytes));
  v1::StepRequest want;
  want.mutable_gradient()->set_param_index(5);
  want.mutable_gradient()->set_offset(1000);
  want.mutable_gradient()->set_dtype(v1::DTYPE_BFLOAT16);
  want.mutable_gradient()->set_data(gradient.data() + 1000, 1500);
  EXPECT_EQ(parsed.SerializeAsString(), want.SerializeAsString());
}

TEST(StepWriteTest, AWholeMessageIsSerializedAsIs) {
  v1::StepRequest end;
  end.mutable_end()->add_param_indices(3);
  grpc::ByteBuffer buffer;
  ASSERT_TRUE(
      client_internal::EncodeStepWrite(client_internal::StepWrite::Whole(end), &buffer).ok());
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(buffer.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  EXPECT_EQ(bytes, end.SerializeAsString());
}

// A message split over several slices, as gRPC may receive it.
grpc::ByteBuffer InPieces(const std::string& bytes, size_t piece) {
  std::vector<grpc::Slice> slices;
  for (size_t at = 0; at < bytes.size(); at += piece) {
    slices.emplace_back(bytes.data() + at, std::min(piece, bytes.size() - at));
  }
  return grpc::ByteBuffer(slices.data(), slices.size());
}

// An update chunk is read where it lies: every field as protobuf parses it,
// the data copied straight out of the slices.
TEST(StepReadTest, AnUpdateChunkIsReadOffTheSlicesAsProtobufParsesIt) {
  std::mt19937 rng(::testing::UnitTest::GetInstance()->random_seed());
  v1::StepResponse sent;
  v1::UpdateChunk* chunk = sent.mutable_update();
  chunk->set_param_index(rng() % 1000);
  chunk->set_offset(uint64_t{rng()} << 8);
  chunk->set_dtype(v1::DTYPE_BFLOAT16);
  chunk->set_decay(std::uniform_real_distribution<double>(0.9, 1.0)(rng));
  chunk->set_total_bytes(uint64_t{1} << 40);
  chunk->set_content(v1::UPDATE_CONTENT_WEIGHTS);
  std::string data(5000, '\0');
  for (char& c : data) c = static_cast<char>(rng());
  chunk->set_data(data);
  grpc::ByteBuffer message = InPieces(sent.SerializeAsString(), 777);
  client_internal::WireUpdate update;
  ASSERT_TRUE(client_internal::FindWireUpdate(&message, &update));
  EXPECT_EQ(update.data_size, data.size());
  std::string copied(update.data_size, '\0');
  client_internal::CopyWireUpdateData(&message, update,
                                      reinterpret_cast<std::byte*>(copied.data()));
  EXPECT_EQ(copied, data);
  update.chunk.set_data(copied);
  EXPECT_EQ(update.chunk.SerializeAsString(), chunk->SerializeAsString());
}

TEST(StepReadTest, AnyOtherMessageIsLeftToProtobuf) {
  v1::StepResponse summary;
  summary.mutable_summary()->set_step(4);
  client_internal::WireUpdate update;
  grpc::ByteBuffer message = InPieces(summary.SerializeAsString(), 3);
  EXPECT_FALSE(client_internal::FindWireUpdate(&message, &update));
  // A field twice (valid protobuf: the last wins) is not the plain encoding:
  // StepResponse{update: {param_index: 1, param_index: 2}}.
  const std::string bytes("\x0a\x04\x08\x01\x08\x02", 6);
  v1::StepResponse parsed;
  ASSERT_TRUE(parsed.ParseFromString(bytes));
  EXPECT_EQ(parsed.update().param_index(), 2u);
  grpc::ByteBuffer repeated = InPieces(bytes, 100);
  EXPECT_FALSE(client_internal::FindWireUpdate(&repeated, &update));
}

// Updates passed back in are assembled in place: the same memory, no
// allocation, also after an attempt that failed.
TEST(UpdateAssemblerTest, AssemblesIntoTheBuffersOfAnEarlierResult) {
  UpdateAssembler first;
  ASSERT_TRUE(first.Add(Chunk(3, 0, "abcd", 8)).ok());
  ASSERT_TRUE(first.Add(Chunk(3, 4, "efgh", 8)).ok());
  ASSERT_TRUE(first.Add(Chunk(1, 0, "wxyz", 4)).ok());
  absl::StatusOr<std::vector<ParameterUpdate>> updates = first.Finish(Summary({1, 3}));
  ASSERT_TRUE(updates.ok());
  const std::byte* kept = (*updates)[1].data.data();

  UpdateAssembler failed(std::move(*updates));
  ASSERT_TRUE(failed.Add(Chunk(3, 4, "EFGH", 8)).ok());
  UpdateAssembler second(failed.Release());  // the retry
  ASSERT_TRUE(second.Add(Chunk(3, 4, "mnop", 8)).ok());
  const std::string head = "ijkl";
  ASSERT_TRUE(second
                  .Add(Chunk(3, 0, "", 8), head.size(),
                       [&](std::byte* to) { std::memcpy(to, head.data(), head.size()); })
                  .ok());
  absl::StatusOr<std::vector<ParameterUpdate>> again = second.Finish(Summary({3}));
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_EQ(again->size(), 1u);
  EXPECT_EQ((*again)[0].data.data(), kept);
  EXPECT_EQ(Text((*again)[0].data), "ijklmnop");
}

}  // namespace
}  // namespace muon
