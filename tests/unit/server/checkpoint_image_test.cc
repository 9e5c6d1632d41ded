// The checkpoint format on strings (round trip; truncated, damaged and
// foreign bytes refused) and the store on a temporary directory.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <random>
#include <string>

#include "status_matchers.h"
#include "storage/checkpoint_format.h"
#include "storage/checkpoint_store.h"
#include "storage/session_image.h"

namespace muon::server {
namespace {

using ::muon::testing::IsOk;
using ::muon::testing::StatusIs;
using ::testing::HasSubstr;

std::vector<float> RandomFloats(std::mt19937& rng, size_t n) {
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

std::shared_ptr<const StepRecord> Record(uint64_t step, int updates) {
  auto record = std::make_shared<StepRecord>();
  record->step = step;
  for (int i = 0; i < updates; ++i) {
    v1::StepResponse update;
    update.mutable_update()->set_param_index(static_cast<uint32_t>(i));
    update.mutable_update()->set_data(std::string(5 + i, static_cast<char>('a' + i)));
    record->responses.push_back(MakeReply(std::move(update)));
  }
  v1::StepResponse summary;
  summary.mutable_summary()->set_step(step);
  record->responses.push_back(MakeReply(std::move(summary)));
  return record;
}

// A PARAMETER_SERVER session of three workers: a Muon matrix with weights,
// an AdamW vector; records for workers 0 and 2.
SessionImage SampleImage() {
  std::mt19937 rng(std::random_device{}());
  SessionImage image;
  image.session_id = "0123456789abcdef";
  image.token = "secret-token";
  image.config.set_name("sample");
  image.config.set_mode(v1::SESSION_MODE_PARAMETER_SERVER);
  image.config.set_num_workers(3);
  v1::ParameterSpec* w = image.config.add_params();
  w->set_name("w");
  w->add_shape(4);
  w->add_shape(3);
  w->set_kind(v1::OPTIMIZER_KIND_MUON);
  v1::ParameterSpec* b = image.config.add_params();
  b->set_name("b");
  b->add_shape(3);
  b->set_kind(v1::OPTIMIZER_KIND_ADAMW);
  image.create_time = absl::FromUnixSeconds(1700000000) + absl::Nanoseconds(123);
  image.step = 7;
  image.last_step_time = absl::FromUnixSeconds(1700000100) + absl::Nanoseconds(456);
  image.params.resize(2);
  image.params[0].step = 7;
  image.params[0].momentum = RandomFloats(rng, 12);
  image.params[0].weights = RandomFloats(rng, 12);
  image.params[1].step = 7;
  image.params[1].exp_avg = RandomFloats(rng, 3);
  image.params[1].exp_avg_sq = RandomFloats(rng, 3);
  image.params[1].weights = RandomFloats(rng, 3);
  image.records = {Record(7, 2), nullptr, Record(7, 1)};
  return image;
}

std::string Encode(const SessionImage& image) {
  StringSink sink;
  absl::StatusOr<uint64_t> bytes = EncodeImage(image, absl::Now(), sink);
  EXPECT_THAT(bytes, IsOk());
  EXPECT_EQ(*bytes, sink.contents().size());
  return sink.contents();
}

void ExpectSameRecord(const std::shared_ptr<const StepRecord>& a,
                      const std::shared_ptr<const StepRecord>& b) {
  ASSERT_EQ(a == nullptr, b == nullptr);
  if (a == nullptr) return;
  EXPECT_EQ(a->step, b->step);
  ASSERT_EQ(a->responses.size(), b->responses.size());
  for (size_t i = 0; i < a->responses.size(); ++i) {
    std::string a_bytes, b_bytes;
    SerializeReply(*a->responses[i], &a_bytes);
    SerializeReply(*b->responses[i], &b_bytes);
    EXPECT_EQ(a_bytes, b_bytes);
  }
}

TEST(CheckpointImageTest, RoundTripKeepsEveryField) {
  const SessionImage image = SampleImage();
  absl::StatusOr<SessionImage> read = DecodeImage(Encode(image), "mem");
  ASSERT_THAT(read, IsOk());
  EXPECT_EQ(read->session_id, image.session_id);
  EXPECT_EQ(read->token, image.token);
  EXPECT_EQ(read->config.SerializeAsString(), image.config.SerializeAsString());
  EXPECT_EQ(read->create_time, image.create_time);
  EXPECT_EQ(read->step, image.step);
  EXPECT_EQ(read->last_step_time, image.last_step_time);
  ASSERT_EQ(read->params.size(), image.params.size());
  for (size_t i = 0; i < image.params.size(); ++i) {
    EXPECT_EQ(read->params[i].step, image.params[i].step);
    EXPECT_EQ(read->params[i].momentum, image.params[i].momentum);  // bit-exact fp32
    EXPECT_EQ(read->params[i].exp_avg, image.params[i].exp_avg);
    EXPECT_EQ(read->params[i].exp_avg_sq, image.params[i].exp_avg_sq);
    EXPECT_EQ(read->params[i].weights, image.params[i].weights);
  }
  ASSERT_EQ(read->records.size(), 3u);
  for (size_t w = 0; w < 3; ++w) ExpectSameRecord(read->records[w], image.records[w]);
}

TEST(CheckpointImageTest, NeverStepped) {
  SessionImage image = SampleImage();
  image.step = 0;
  image.last_step_time = absl::InfinitePast();
  image.records = {nullptr, nullptr, nullptr};
  absl::StatusOr<SessionImage> read = DecodeImage(Encode(image), "mem");
  ASSERT_THAT(read, IsOk());
  EXPECT_EQ(read->last_step_time, absl::InfinitePast());
  EXPECT_EQ(read->records.size(), 3u);
  EXPECT_EQ(read->records[0], nullptr);
}

TEST(CheckpointImageTest, EveryTruncationIsRefused) {
  const std::string bytes = Encode(SampleImage());
  for (size_t n = 0; n < bytes.size(); ++n) {
    EXPECT_THAT(DecodeImage(bytes.substr(0, n), "cut"), StatusIs(absl::StatusCode::kDataLoss))
        << "kept " << n << " of " << bytes.size() << " bytes";
  }
}

TEST(CheckpointImageTest, EveryDamagedByteIsRefused) {
  const std::string bytes = Encode(SampleImage());
  for (size_t i = 0; i < bytes.size(); ++i) {
    std::string damaged = bytes;
    damaged[i] = static_cast<char>(damaged[i] ^ 0x10);
    EXPECT_THAT(DecodeImage(damaged, "damaged"), StatusIs(absl::StatusCode::kDataLoss))
        << "byte " << i << " of " << bytes.size();
  }
}

TEST(CheckpointImageTest, ForeignBytesAreRefusedByName) {
  EXPECT_THAT(DecodeImage("", "/x/empty.ckpt"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("/x/empty.ckpt")));
  std::string other = Encode(SampleImage());
  other.replace(0, 8, "PK\x03\x04zip!");
  EXPECT_THAT(DecodeImage(other, "f"), StatusIs(absl::StatusCode::kDataLoss, HasSubstr("magic")));
  std::string future = Encode(SampleImage());
  future[8] = 2;  // format version 2
  EXPECT_THAT(DecodeImage(future, "f"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("format version 2")));
  std::mt19937 rng(std::random_device{}());
  std::string noise(4096, '\0');
  for (char& c : noise) c = static_cast<char>(rng());
  EXPECT_THAT(DecodeImage(noise, "f"), StatusIs(absl::StatusCode::kDataLoss));
}

// Checksummed, so only a writer could make these; still refused.
TEST(CheckpointImageTest, InconsistentMetadataIsRefused) {
  SessionImage bad_id = SampleImage();
  bad_id.session_id = "../etc";
  EXPECT_THAT(DecodeImage(Encode(bad_id), "f"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("session id")));
  SessionImage no_token = SampleImage();
  no_token.token.clear();
  EXPECT_THAT(DecodeImage(Encode(no_token), "f"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("token")));
  SessionImage missing_state = SampleImage();
  missing_state.params.pop_back();
  EXPECT_THAT(DecodeImage(Encode(missing_state), "f"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("2 configured")));
  SessionImage many_workers = SampleImage();
  many_workers.config.set_num_workers(kMaxWorkers + 1);
  EXPECT_THAT(DecodeImage(Encode(many_workers), "f"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("num_workers")));
  SessionImage stray_record = SampleImage();
  stray_record.records.push_back(Record(7, 0));  // a fourth worker of three
  EXPECT_THAT(DecodeImage(Encode(stray_record), "f"),
              StatusIs(absl::StatusCode::kDataLoss, HasSubstr("worker 3")));
}

class CheckpointStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/muon_ckpt_test_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::string cmd = "rm -rf '" + dir_ + "'";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
  }
  std::string dir_;
};

TEST_F(CheckpointStoreTest, WriteReadListRemove) {
  absl::StatusOr<std::unique_ptr<CheckpointStore>> store = CheckpointStore::Open(dir_ + "/ckpt");
  ASSERT_THAT(store, IsOk());
  const SessionImage image = SampleImage();
  absl::StatusOr<v1::SessionCheckpoint> written = (*store)->Write(image);
  ASSERT_THAT(written, IsOk());
  EXPECT_EQ(written->path(), dir_ + "/ckpt/0123456789abcdef.ckpt");
  EXPECT_EQ(written->step(), 7u);
  struct stat st;
  ASSERT_EQ(::stat(written->path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);  // it holds the token
  EXPECT_EQ(written->bytes(), st.st_size);
  absl::StatusOr<SessionImage> read = (*store)->Read(written->path());
  ASSERT_THAT(read, IsOk());
  EXPECT_EQ(read->params[0].weights, image.params[0].weights);
  EXPECT_THAT((*store)->List(), IsOk());
  EXPECT_EQ((*store)->List()->size(), 1u);
  ASSERT_THAT((*store)->Remove(image.session_id), IsOk());
  EXPECT_TRUE((*store)->List()->empty());
  EXPECT_THAT((*store)->Remove(image.session_id), IsOk());  // none: still Ok
  EXPECT_THAT((*store)->Read(written->path()), StatusIs(absl::StatusCode::kNotFound));
}

TEST_F(CheckpointStoreTest, FailedWriteIsUnavailableNamingThePath) {
  const std::string dir = dir_ + "/gone";
  absl::StatusOr<std::unique_ptr<CheckpointStore>> store = CheckpointStore::Open(dir);
  ASSERT_THAT(store, IsOk());
  ASSERT_EQ(::rmdir(dir.c_str()), 0);
  EXPECT_THAT((*store)->Write(SampleImage()),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr(dir)));
}

TEST_F(CheckpointStoreTest, OpenRefusesAFile) {
  const std::string file = dir_ + "/file";
  ASSERT_EQ(std::system(("touch '" + file + "'").c_str()), 0);
  EXPECT_THAT(CheckpointStore::Open(file),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("not a directory")));
}

}  // namespace
}  // namespace muon::server
