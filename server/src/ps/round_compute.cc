// A parameter-server round's compute: each parameter, once every worker's
// gradient of it is in, is averaged and goes to the engine in fp32; once all
// are computed the step commits, and each worker's answer (new weights or
// the update, in the dtype it asked for) is cut by the one chunker
// (step/chunker.h).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <iostream>
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

}  // namespace

absl::Status ParameterServerRounds::ComputeBatch(const std::vector<Ready>& batch,
                                                const std::optional<double>& lr,
                                                const std::optional<double>& lr_scale,
                                                std::vector<Computed>* out, StepStats* stats,
                                                uint32_t* bad_worker, size_t* bad) {
  const std::vector<SessionParam>& params = session_->params();
  const size_t n = batch.size();
  const float scale = 1.0f / static_cast<float>(num_workers_);
  std::vector<std::vector<float>> averages(n);
  std::vector<GradientInput> inputs(n);
  std::vector<UpdateOutput> outputs(n);
  out->assign(n, Computed{});
  for (size_t k = 0; k < n; ++k) {
    const SessionParam& p = params[batch[k].index];
    const size_t count = static_cast<size_t>(NumElements(p.spec.shape));
    std::vector<float>& avg = averages[k];
    avg.assign(count, 0.0f);
    // Summed in worker order, so the average does not depend on which
    // worker's gradient arrived first.
    for (uint32_t w = 0; w < num_workers_; ++w) {
      if (!AddDecoded(p.spec.dtype, batch[k].gradients[w].get(), count, avg.data())) {
        *bad_worker = w;
        *bad = k;
        return absl::InvalidArgumentError(
            absl::StrCat("parameter ", batch[k].index, " ('", p.spec.name, "'): worker ", w,
                         "'s gradient contains NaN or Inf; nothing of it was added"));
      }
    }
    for (float& v : avg) v *= scale;
    inputs[k].param = p.engine_id;
    // The average stays fp32, whatever the workers sent: re-encoding it to
    // the registered dtype would round away what averaging gained.
    inputs[k].dtype = DType::kFloat32;
    inputs[k].bytes = absl::MakeConstSpan(reinterpret_cast<const std::byte*>(avg.data()),
                                          avg.size() * sizeof(float));
    inputs[k].lr = StepLr(lr, lr_scale, p.spec.hp.lr);
    std::vector<float>& update = (*out)[k].update;
    update.resize(count);
    outputs[k].param = p.engine_id;
    outputs[k].dtype = DType::kFloat32;
    outputs[k].bytes = absl::MakeSpan(reinterpret_cast<std::byte*>(update.data()),
                                      update.size() * sizeof(float));
  }
  MUON_RETURN_IF_ERROR(txn_->Compute(inputs, absl::MakeSpan(outputs), stats));
  for (size_t k = 0; k < n; ++k) {
    (*out)[k].decay = outputs[k].decay;
    (*out)[k].orthogonality_error = outputs[k].orthogonality_error;
  }
  return absl::OkStatus();
}

absl::StatusOr<ParameterServerRounds::Committed> ParameterServerRounds::Commit() {
  const std::vector<SessionParam>& params = session_->params();
  const size_t n = params.size();
  // Nothing else changes the round while committing_; taken under mu_ for
  // the analysis.
  std::vector<std::optional<Computed>> computed;
  std::vector<ReplyFormat> formats;
  SummaryInput summary;
  absl::Time start;
  bool measured = false;
  {
    absl::MutexLock lock(&mu_);
    computed = std::move(computed_);
    computed_.assign(n, std::nullopt);
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
  std::vector<std::vector<float>> weights(n);
  for (size_t i = 0; i < n; ++i) {
    weights[i].resize(computed[i]->update.size());
    absl::Status got = engine_->GetWeights(params[i].engine_id, absl::MakeSpan(weights[i]));
    if (!got.ok()) {
      std::cerr << "muon-server: reading the weights of session " << session_->id()
                << " after step " << summary.step << ": " << got << std::endl;
    }
  }
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

  // One answer per distinct format, shared by the workers that asked for it.
  Committed committed;
  committed.records.resize(num_workers_);
  for (uint32_t w = 0; w < num_workers_; ++w) {
    if (committed.records[w] != nullptr) continue;
    auto record = std::make_shared<StepRecord>();
    record->step = step;
    record->responses = Responses(formats[w], weights, computed);
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

std::vector<std::shared_ptr<const StepReply>> ParameterServerRounds::Responses(
    const ReplyFormat& format, const std::vector<std::vector<float>>& weights,
    const std::vector<std::optional<Computed>>& computed) const {
  const std::vector<SessionParam>& params = session_->params();
  const bool send_weights = format.content != v1::UPDATE_CONTENT_UPDATE;
  std::vector<std::vector<std::shared_ptr<const StepReply>>> by_param(params.size());
  auto encode = [&](size_t i) {
    const DType dtype = format.dtype.value_or(params[i].spec.dtype);
    const std::vector<float>& values = send_weights ? weights[i] : computed[i]->update;
    const int64_t width = static_cast<int64_t>(DTypeSize(dtype));
    const int64_t total = static_cast<int64_t>(values.size()) * width;
    // Whole elements per chunk, so that each chunk is encoded on its own,
    // straight into its message.
    const int64_t chunk_bytes =
        ChunkPayloadBytes(options_.chunk_bytes, options_.max_message_bytes, width);
    for (const ChunkRange& range : CutIntoChunks(total, chunk_bytes)) {
      auto response = std::make_shared<StepReply>();
      v1::UpdateChunk* chunk = response->message.mutable_update();
      chunk->set_param_index(static_cast<uint32_t>(i));
      chunk->set_offset(static_cast<uint64_t>(range.offset));
      std::string* data = chunk->mutable_data();
      data->resize(static_cast<size_t>(range.size));
      EncodeFromFloat(dtype, values.data() + range.offset / width,
                      static_cast<size_t>(range.size / width),
                      reinterpret_cast<std::byte*>(data->data()));
      chunk->set_dtype(DTypeToProto(dtype));
      chunk->set_decay(send_weights ? 1.0 : computed[i]->decay);
      chunk->set_total_bytes(static_cast<uint64_t>(total));
      chunk->set_content(send_weights ? v1::UPDATE_CONTENT_WEIGHTS : v1::UPDATE_CONTENT_UPDATE);
      by_param[i].push_back(std::move(response));
    }
  };
  int64_t reply_bytes = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    reply_bytes += NumElements(params[i].spec.shape) *
                   static_cast<int64_t>(DTypeSize(format.dtype.value_or(params[i].spec.dtype)));
  }
  // Every worker waits for this (0.5 GB for GPT-2 small in fp32): large
  // replies are encoded on several threads, a parameter at a time.
  const size_t threads = static_cast<size_t>(
      std::min<int64_t>({kMaxEncodeThreads, static_cast<int64_t>(params.size()),
                         1 + reply_bytes / kEncodeBytesPerThread}));
  std::atomic<size_t> next{0};
  auto work = [&] {
    for (size_t i = next++; i < params.size(); i = next++) encode(i);
  };
  std::vector<std::thread> helpers;
  for (size_t t = 1; t < threads; ++t) helpers.emplace_back(work);
  work();
  for (std::thread& t : helpers) t.join();

  std::vector<std::shared_ptr<const StepReply>> out;
  for (auto& chunks : by_param) {
    for (auto& r : chunks) out.push_back(std::move(r));
  }
  return out;
}

}  // namespace muon::server
