// A parameter-server round's compute: each parameter, once every worker's
// gradient of it is in, is averaged and goes to the engine in fp32, and its
// answer (new weights or the update, in the dtype each worker asked for) is
// cut by the one chunker (step/chunker.h) at once, to go out before the
// commit where the rule allows (ps_round.h); once all are computed the step
// commits.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <iterator>
#include <string>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "muon/kernels/status_macros.h"
#include "ps/ps_round.h"
#include "step/chunker.h"
#include "step/step_header.h"
#include "step/step_summary.h"
#include "wire/convert.h"

namespace muon::server {
namespace {

// Gradients are decoded a block at a time into a small buffer.
constexpr size_t kDecodeBlock = 4096;

// sum += the decoded values; false (sum partly added) at a NaN or Inf.
bool AddDecoded(DType dtype, const std::byte* bytes, size_t count, float* sum) {
  float block[kDecodeBlock];
  const size_t width = DTypeSize(dtype);
  for (size_t start = 0; start < count; start += kDecodeBlock) {
    const size_t n = std::min(kDecodeBlock, count - start);
    DecodeToFloat(dtype, bytes + start * width, n, block);
    for (size_t j = 0; j < n; ++j) {
      if (!std::isfinite(block[j])) return false;
      sum[start + j] += block[j];
    }
  }
  return true;
}

// A reply is encoded on up to this many threads, one per this many bytes.
constexpr int64_t kMaxEncodeThreads = 8;
constexpr int64_t kEncodeBytesPerThread = int64_t{32} << 20;

// Runs work(0 … count−1) on up to kMaxEncodeThreads threads, one per
// kEncodeBytesPerThread of `bytes`: every worker waits for the answers
// (0.5 GB for GPT-2 small in fp32).
template <typename Work>
void ParallelEncode(size_t count, int64_t bytes, const Work& work) {
  const size_t threads = static_cast<size_t>(std::min<int64_t>(
      {kMaxEncodeThreads, static_cast<int64_t>(count), 1 + bytes / kEncodeBytesPerThread}));
  std::atomic<size_t> next{0};
  auto run = [&] {
    for (size_t i = next++; i < count; i = next++) work(i);
  };
  std::vector<std::thread> helpers;
  for (size_t t = 1; t < threads; ++t) helpers.emplace_back(run);
  run();
  for (std::thread& t : helpers) t.join();
}

}  // namespace

// Decoded a block at a time into a small buffer: a worker never holds a
// second, fp32 copy of its whole gradient.
bool ParameterServerRounds::AllFinite(DType dtype, const std::byte* bytes, size_t count) {
  float block[kDecodeBlock];
  const size_t width = DTypeSize(dtype);
  for (size_t start = 0; start < count; start += kDecodeBlock) {
    const size_t n = std::min(kDecodeBlock, count - start);
    DecodeToFloat(dtype, bytes + start * width, n, block);
    if (!std::all_of(block, block + n, [](float v) { return std::isfinite(v); })) return false;
  }
  return true;
}

absl::Status ParameterServerRounds::ComputeBatch(
    const std::vector<Ready>& batch, const std::optional<double>& lr,
    const std::optional<double>& lr_scale, const std::vector<ReplyFormat>& formats,
    std::vector<std::shared_ptr<const Computed>>* out, StepStats* stats, uint32_t* bad_worker,
    size_t* bad) {
  const std::vector<SessionParam>& params = session_->params();
  const size_t n = batch.size();
  const float scale = 1.0f / static_cast<float>(num_workers_);
  std::vector<GradientInput> inputs(n);
  std::vector<UpdateOutput> outputs(n);
  std::vector<Computed> computed(n);
  scratch_.resize(params.size());
  for (size_t k = 0; k < n; ++k) {
    const SessionParam& p = params[batch[k].index];
    const size_t count = static_cast<size_t>(NumElements(p.spec.shape));
    Scratch& scratch = scratch_[batch[k].index];
    // Worker w's gradient of this parameter is not finite: the batch fails.
    const auto non_finite = [&](uint32_t w) {
      *bad_worker = w;
      *bad = k;
      return absl::InvalidArgumentError(
          absl::StrCat("parameter ", batch[k].index, " ('", p.spec.name, "'): worker ", w,
                       "'s gradient contains NaN or Inf; nothing of it was added"));
    };
    inputs[k].param = p.engine_id;
    inputs[k].lr = StepLr(lr, lr_scale, p.spec.hp.lr);
    if (num_workers_ == 1) {
      // The average of one gradient is that gradient: the engine decodes it
      // to the fp32 values an average would hold, without a copy here.
      if (!batch[k].checked && !AllFinite(p.spec.dtype, batch[k].gradients[0].get(), count)) {
        return non_finite(0);
      }
      inputs[k].dtype = p.spec.dtype;
      inputs[k].bytes = absl::MakeConstSpan(batch[k].gradients[0].get(),
                                            static_cast<size_t>(p.tensor_bytes));
    } else {
      std::vector<float>& avg = scratch.average;
      avg.resize(count);
      std::fill(avg.begin(), avg.end(), 0.0f);
      // Summed in worker order, so the average does not depend on which
      // worker's gradient arrived first.
      for (uint32_t w = 0; w < num_workers_; ++w) {
        if (!AddDecoded(p.spec.dtype, batch[k].gradients[w].get(), count, avg.data())) {
          return non_finite(w);
        }
      }
      for (float& v : avg) v *= scale;
      // The average stays fp32, whatever the workers sent: re-encoding it
      // to the registered dtype would round away what averaging gained.
      inputs[k].dtype = DType::kFloat32;
      inputs[k].bytes = absl::MakeConstSpan(reinterpret_cast<const std::byte*>(avg.data()),
                                            avg.size() * sizeof(float));
    }
    scratch.update.resize(count);
    scratch.weights.resize(count);
    computed[k].update = scratch.update.data();
    computed[k].weights = scratch.weights.data();
    computed[k].size = count;
    outputs[k].param = p.engine_id;
    outputs[k].dtype = DType::kFloat32;
    outputs[k].bytes = absl::MakeSpan(reinterpret_cast<std::byte*>(scratch.update.data()),
                                      count * sizeof(float));
  }
  MUON_RETURN_IF_ERROR(txn_->Compute(inputs, absl::MakeSpan(outputs), stats));
  int64_t answer_bytes = 0;
  for (size_t k = 0; k < n; ++k) {
    Computed& c = computed[k];
    c.decay = outputs[k].decay;
    c.orthogonality_error = outputs[k].orthogonality_error;
    // What the commit will make the held weights: answers can go out
    // before it.
    MUON_RETURN_IF_ERROR(txn_->ComputedWeights(
        inputs[k].param, absl::MakeSpan(scratch_[batch[k].index].weights)));
    for (const ReplyFormat& format : formats) {
      c.answers.emplace_back(format, Answer{});
      answer_bytes += static_cast<int64_t>(
          c.size * DTypeSize(format.dtype.value_or(params[batch[k].index].spec.dtype)));
    }
  }
  ParallelEncode(n * formats.size(), answer_bytes, [&](size_t job) {
    Computed& c = computed[job / formats.size()];
    std::pair<ReplyFormat, Answer>& answer = c.answers[job % formats.size()];
    answer.second = Encode(answer.first, batch[job / formats.size()].index, c);
  });
  out->clear();
  for (Computed& c : computed) out->push_back(std::make_shared<const Computed>(std::move(c)));
  return absl::OkStatus();
}

absl::StatusOr<ParameterServerRounds::Committed> ParameterServerRounds::Commit() {
  const std::vector<SessionParam>& params = session_->params();
  const size_t n = params.size();
  // Nothing else changes the round while committing_; taken under mu_ for
  // the analysis.
  std::vector<std::shared_ptr<const Computed>> computed;
  std::vector<ReplyFormat> formats;
  SummaryInput summary;
  absl::Time start;
  bool measured = false;
  {
    absl::MutexLock lock(&mu_);
    computed = std::move(computed_);
    computed_.assign(n, nullptr);
    for (const Worker& w : workers_) {
      formats.push_back(w.contribution.format);
      summary.bytes_received += w.bytes_received;
    }
    summary.step = step_;
    summary.timings.receive = absl::ToDoubleSeconds(all_in_ - start_);
    summary.timings.compute = compute_seconds_;
    summary.reply_orthogonality = measure_asked_;
    summary.ns_flops = stats_.ns_flops;
    summary.timings.device_compute = stats_.device_compute_seconds;
    start = start_;
    measured = txn_measures_;
  }
  MUON_RETURN_IF_ERROR(txn_->Commit());
  // Applied from here on: what follows reports it, and cannot undo it.
  const absl::Time now = absl::Now();
  for (size_t i = 0; i < n; ++i) summary.param_indices.push_back(static_cast<uint32_t>(i));
  summary.timings.total = absl::ToDoubleSeconds(now - start);
  for (size_t i = 0; i < n; ++i) {
    if (measured && params[i].spec.kind == OptimizerKind::kMuon) {
      summary.orthogonality.emplace_back(static_cast<uint32_t>(i),
                                         computed[i]->orthogonality_error);
    }
  }
  const uint64_t step = summary.step;
  const v1::StepResponse summary_response =
      MakeSummary(std::move(summary), *session_, options_.metrics);

  // One answer per distinct format, shared by the workers that asked for it;
  // each parameter's the one its early answers were (AnswerOf).
  Committed committed;
  committed.records.resize(num_workers_);
  for (uint32_t w = 0; w < num_workers_; ++w) {
    if (committed.records[w] != nullptr) continue;
    auto record = std::make_shared<StepRecord>();
    record->step = step;
    for (uint32_t i = 0; i < n; ++i) {
      Answer answer = AnswerOf(formats[w], i, *computed[i]);
      record->responses.insert(record->responses.end(), std::make_move_iterator(answer.begin()),
                               std::make_move_iterator(answer.end()));
    }
    uint64_t bytes_sent = 0;
    for (const auto& r : record->responses) bytes_sent += r->update_data().size();
    v1::StepResponse with_bytes = summary_response;
    with_bytes.mutable_summary()->set_bytes_sent(bytes_sent);
    record->responses.push_back(MakeReply(std::move(with_bytes)));
    std::shared_ptr<const StepRecord> shared = std::move(record);
    for (uint32_t v = w; v < num_workers_; ++v) {
      if (formats[v] == formats[w]) committed.records[v] = shared;
    }
  }
  committed.ack =
      durability_->AtCommit(*session_, Session::Snapshot{step, now, committed.records});
  return committed;
}

ParameterServerRounds::Answer ParameterServerRounds::AnswerOf(const ReplyFormat& format,
                                                              uint32_t index,
                                                              const Computed& computed) const {
  for (const auto& [cut, answer] : computed.answers) {
    if (cut == format) return answer;
  }
  return Encode(format, index, computed);
}

ParameterServerRounds::Answer ParameterServerRounds::Encode(const ReplyFormat& format,
                                                            uint32_t index,
                                                            const Computed& computed) const {
  const SessionParam& param = session_->params()[index];
  const bool send_weights = format.content != v1::UPDATE_CONTENT_UPDATE;
  const DType dtype = format.dtype.value_or(param.spec.dtype);
  const float* values = send_weights ? computed.weights : computed.update;
  const int64_t width = static_cast<int64_t>(DTypeSize(dtype));
  const int64_t total = static_cast<int64_t>(computed.size) * width;
  // Whole elements per chunk, so that each chunk is encoded on its own,
  // straight into its message.
  const int64_t chunk_bytes =
      ChunkPayloadBytes(options_.chunk_bytes, options_.max_message_bytes, width);
  Answer answer;
  for (const ChunkRange& range : CutIntoChunks(total, chunk_bytes)) {
    auto response = std::make_shared<StepReply>();
    v1::UpdateChunk* chunk = response->message.mutable_update();
    chunk->set_param_index(index);
    chunk->set_offset(static_cast<uint64_t>(range.offset));
    if (dtype == DType::kFloat32) {
      // One copy, into memory not zeroed first.
      chunk->set_data(reinterpret_cast<const char*>(values) + range.offset,
                      static_cast<size_t>(range.size));
    } else {
      std::string* data = chunk->mutable_data();
      data->resize(static_cast<size_t>(range.size));
      EncodeFromFloat(dtype, values + range.offset / width,
                      static_cast<size_t>(range.size / width),
                      reinterpret_cast<std::byte*>(data->data()));
    }
    chunk->set_dtype(DTypeToProto(dtype));
    chunk->set_decay(send_weights ? 1.0 : computed.decay);
    chunk->set_total_bytes(static_cast<uint64_t>(total));
    chunk->set_content(send_weights ? v1::UPDATE_CONTENT_WEIGHTS : v1::UPDATE_CONTENT_UPDATE);
    answer.push_back(std::move(response));
  }
  return answer;
}

}  // namespace muon::server
