// A parameter-server round's step, once every worker's gradient is in: the
// average goes to the engine in fp32, the step commits, and each worker's
// answer (new weights or the update, in the dtype it asked for) is cut by
// the one chunker (step/chunker.h).

#include <algorithm>
#include <atomic>
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

// A reply is encoded on up to this many threads, one per this many bytes.
constexpr int64_t kMaxEncodeThreads = 8;
constexpr int64_t kEncodeBytesPerThread = int64_t{32} << 20;

}  // namespace

absl::StatusOr<ParameterServerRounds::Computed> ParameterServerRounds::Compute(Gathered round) {
  const std::vector<SessionParam>& params = session_->params();
  const size_t n = params.size();
  const absl::Time compute_start = absl::Now();
  const float scale = 1.0f / static_cast<float>(num_workers_);
  const bool measure = MeasuresOrthogonality(round.measure_orthogonality, round.step,
                                             options_.orthogonality_sample_every);
  std::vector<GradientInput> inputs(n);
  std::vector<std::vector<float>> updates(n);
  std::vector<UpdateOutput> outputs(n);
  for (size_t i = 0; i < n; ++i) {
    const SessionParam& p = params[i];
    std::vector<float>& avg = round.sums[i];
    for (float& v : avg) v *= scale;
    inputs[i].param = p.engine_id;
    // The average stays fp32, whatever the workers sent: re-encoding it to
    // the registered dtype would round away what averaging gained.
    inputs[i].dtype = DType::kFloat32;
    inputs[i].bytes = absl::MakeConstSpan(reinterpret_cast<const std::byte*>(avg.data()),
                                          avg.size() * sizeof(float));
    inputs[i].lr = StepLr(round.lr, round.lr_scale, p.spec.hp.lr);
    updates[i].resize(avg.size());
    outputs[i].param = p.engine_id;
    outputs[i].dtype = DType::kFloat32;
    outputs[i].bytes = absl::MakeSpan(reinterpret_cast<std::byte*>(updates[i].data()),
                                      updates[i].size() * sizeof(float));
  }
  StepOptions step_options;
  step_options.measure_orthogonality = measure;
  MUON_ASSIGN_OR_RETURN(std::unique_ptr<StepTransaction> txn, engine_->BeginStep(step_options));
  StepStats stats;
  MUON_RETURN_IF_ERROR(txn->Compute(inputs, absl::MakeSpan(outputs), &stats));
  MUON_RETURN_IF_ERROR(txn->Commit());
  // Applied from here on: what follows reports it, and cannot undo it.
  std::vector<std::vector<float>> weights(n);
  std::vector<double> decay(n);
  for (size_t i = 0; i < n; ++i) {
    weights[i].resize(updates[i].size());
    decay[i] = outputs[i].decay;
    absl::Status got = engine_->GetWeights(params[i].engine_id, absl::MakeSpan(weights[i]));
    if (!got.ok()) {
      std::cerr << "muon-server: reading the weights of session " << session_->id()
                << " after step " << round.step << ": " << got << std::endl;
    }
  }
  const absl::Time now = absl::Now();
  SummaryInput summary;
  summary.step = round.step;
  for (size_t i = 0; i < n; ++i) summary.param_indices.push_back(static_cast<uint32_t>(i));
  summary.timings.receive = absl::ToDoubleSeconds(compute_start - round.start);
  summary.timings.compute = absl::ToDoubleSeconds(now - compute_start);
  summary.timings.total = absl::ToDoubleSeconds(now - round.start);
  summary.timings.device_compute = stats.device_compute_seconds;
  for (size_t i = 0; i < n; ++i) {
    if (measure && params[i].spec.kind == OptimizerKind::kMuon) {
      summary.orthogonality.emplace_back(static_cast<uint32_t>(i), outputs[i].orthogonality_error);
    }
  }
  summary.reply_orthogonality = round.measure_orthogonality;
  summary.bytes_received = round.bytes_received;
  summary.ns_flops = stats.ns_flops;
  const std::shared_ptr<const v1::StepResponse> summary_response =
      MakeSummary(std::move(summary), *session_, options_.metrics);

  // One answer per distinct format, shared by the workers that asked for it.
  Computed computed;
  computed.records.resize(num_workers_);
  for (uint32_t w = 0; w < num_workers_; ++w) {
    if (computed.records[w] != nullptr) continue;
    auto record = std::make_shared<StepRecord>();
    record->step = round.step;
    record->responses = Responses(round.formats[w], weights, updates, decay);
    uint64_t bytes_sent = 0;
    for (const auto& r : record->responses) bytes_sent += r->update().data().size();
    auto with_bytes = std::make_shared<v1::StepResponse>(*summary_response);
    with_bytes->mutable_summary()->set_bytes_sent(bytes_sent);
    record->responses.push_back(std::move(with_bytes));
    std::shared_ptr<const StepRecord> shared = std::move(record);
    for (uint32_t v = w; v < num_workers_; ++v) {
      if (round.formats[v] == round.formats[w]) computed.records[v] = shared;
    }
  }
  computed.ack =
      durability_->AtCommit(*session_, Session::Snapshot{round.step, now, computed.records});
  return computed;
}

std::vector<std::shared_ptr<const v1::StepResponse>> ParameterServerRounds::Responses(
    const ReplyFormat& format, const std::vector<std::vector<float>>& weights,
    const std::vector<std::vector<float>>& updates, const std::vector<double>& decay) const {
  const std::vector<SessionParam>& params = session_->params();
  const bool send_weights = format.content != v1::UPDATE_CONTENT_UPDATE;
  std::vector<std::vector<std::shared_ptr<const v1::StepResponse>>> by_param(params.size());
  auto encode = [&](size_t i) {
    const DType dtype = format.dtype.value_or(params[i].spec.dtype);
    const std::vector<float>& values = send_weights ? weights[i] : updates[i];
    const int64_t width = static_cast<int64_t>(DTypeSize(dtype));
    const int64_t total = static_cast<int64_t>(values.size()) * width;
    // Whole elements per chunk, so that each chunk is encoded on its own,
    // straight into its message.
    const int64_t chunk_bytes =
        ChunkPayloadBytes(options_.chunk_bytes, options_.max_message_bytes, width);
    for (const ChunkRange& range : CutIntoChunks(total, chunk_bytes)) {
      auto response = std::make_shared<v1::StepResponse>();
      v1::UpdateChunk* chunk = response->mutable_update();
      chunk->set_param_index(static_cast<uint32_t>(i));
      chunk->set_offset(static_cast<uint64_t>(range.offset));
      std::string* data = chunk->mutable_data();
      data->resize(static_cast<size_t>(range.size));
      EncodeFromFloat(dtype, values.data() + range.offset / width,
                      static_cast<size_t>(range.size / width),
                      reinterpret_cast<std::byte*>(data->data()));
      chunk->set_dtype(DTypeToProto(dtype));
      chunk->set_decay(send_weights ? 1.0 : decay[i]);
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

  std::vector<std::shared_ptr<const v1::StepResponse>> out;
  for (auto& chunks : by_param) {
    for (auto& r : chunks) out.push_back(std::move(r));
  }
  return out;
}

}  // namespace muon::server
