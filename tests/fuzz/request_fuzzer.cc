// Fuzz target: a request from arbitrary bytes, through the service's conversion and validation
// and, when valid, the core. The first byte picks the message:
//   even: a SampleRequest — the service's own parse (ReceivedSampleRequest, differential against
//         protobuf's), BatchFromProto (logits view, row count, every row's parameters), then
//         Sampler::Run and ResponseToProto, as SamplerService::Sample does;
//   odd, bit 1 clear (1, 5, 9, …): a SessionRequest applied to a fresh SequenceTable in the
//         stream's order (release, add, fork, step) with the conversions the Session stream uses;
//   odd, bit 1 set (3, 7, 11, …): a VerifyRequest — VerifyBatchFromProto, then Verifier::Run and
//         VerifyResponseToProto, as SamplerService::Verify does (tests/fuzz/verify_fuzzer.cc
//         checks the Verifier's results in depth).
// Whatever the bytes, nothing may crash, errors must be INVALID_ARGUMENT / NOT_FOUND /
// ALREADY_EXISTS / RESOURCE_EXHAUSTED with a message, and a success must hold one result per
// sample (one per verified row, with num_accepted + 1 or, when finished, num_accepted tokens)
// with token ids inside the vocabulary.
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/slice.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "core/sampler.h"
#include "core/session.h"
#include "core/speculative.h"
#include "google/protobuf/stubs/logging.h"
#include "service/convert.h"
#include "service/received_request.h"
#include "tests/fuzz/fuzz_core.h"
#include "tests/fuzz/fuzz_support.h"
#include "tests/testing/proto_testing.h"
#include "tokensampler/v1/sampler.pb.h"

namespace tokensampler::fuzzing {
namespace {

// Requests carry histories and params only; keep the fuzzer's executions quick.
constexpr SessionLimits kLimits{.max_sequences = 64, .max_history_tokens = 4096};

bool ExpectedError(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kNotFound:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kResourceExhausted:
      return !status.message().empty();
    default:
      return false;
  }
}

// One Sampler per input: its per-thread scratch lives in oneTBB's allocator, which
// LeakSanitizer does not scan, so a sampler kept across inputs would look like a leak.
void FuzzSample(v1::SampleRequest& request) {
  const Sampler sampler;
  // Unseeded rows draw fresh entropy: seed them so that an input always runs the same way.
  for (v1::SampleRow& row : *request.mutable_rows()) {
    if (!row.params().has_seed()) row.mutable_params()->set_seed(7);
  }
  absl::StatusOr<service::Batch> batch = service::BatchFromProto(request);
  if (!batch.ok()) {
    FUZZ_CHECK(batch.status().code() == absl::StatusCode::kInvalidArgument &&
                   !batch.status().message().empty(),
               "BatchFromProto: %s", batch.status().ToString().c_str());
    return;
  }
  const absl::StatusOr<std::vector<SampledToken>> tokens = sampler.Run(batch->logits, batch->rows);
  if (!tokens.ok()) {
    FUZZ_CHECK(tokens.status().code() == absl::StatusCode::kInvalidArgument &&
                   !tokens.status().message().empty(),
               "Sampler::Run: %s", tokens.status().ToString().c_str());
    return;
  }
  size_t samples = 0;
  for (const SamplingParams& p : batch->params) samples += static_cast<size_t>(p.n);
  FUZZ_CHECK(tokens->size() == samples, "%zu results for %zu samples", tokens->size(), samples);
  CheckResultInvariants(*tokens, batch->logits.vocab_size());
  const v1::SampleResponse response = service::ResponseToProto(*tokens);
  FUZZ_CHECK(response.results_size() == static_cast<int>(samples), "response has %d results",
             response.results_size());
  std::string wire;
  FUZZ_CHECK(response.SerializeToString(&wire), "response does not serialize");
}

void FuzzVerify(v1::VerifyRequest& request) {
  const Sampler sampler;
  const Verifier verifier(sampler);
  for (v1::VerifyRow& row : *request.mutable_rows()) {
    if (!row.params().has_seed()) row.mutable_params()->set_seed(7);
  }
  absl::StatusOr<service::VerifyBatch> batch = service::VerifyBatchFromProto(request);
  if (!batch.ok()) {
    FUZZ_CHECK(batch.status().code() == absl::StatusCode::kInvalidArgument &&
                   !batch.status().message().empty(),
               "VerifyBatchFromProto: %s", batch.status().ToString().c_str());
    return;
  }
  const absl::StatusOr<std::vector<VerifyResult>> results =
      verifier.Run(batch->logits, batch->rows);
  if (!results.ok()) {
    FUZZ_CHECK(results.status().code() == absl::StatusCode::kInvalidArgument &&
                   !results.status().message().empty(),
               "Verifier::Run: %s", results.status().ToString().c_str());
    return;
  }
  FUZZ_CHECK(results->size() == batch->rows.size(), "%zu results for %zu rows", results->size(),
             batch->rows.size());
  for (size_t r = 0; r < results->size(); ++r) {
    const VerifyResult& result = (*results)[r];
    const size_t accepted = result.num_accepted();
    FUZZ_CHECK(accepted <= batch->rows[r].drafts.token_ids.size(), "row %zu: %zu accepted", r,
               accepted);
    FUZZ_CHECK(result.tokens.size() == accepted + 1 ||
                   (result.tokens.size() == accepted && accepted > 0 &&
                    result.tokens.back().finish_reason != FinishReason::kNone),
               "row %zu: %zu tokens for %zu accepted", r, result.tokens.size(), accepted);
    CheckResultInvariants(result.tokens, batch->logits.vocab_size());
  }
  const v1::VerifyResponse response = service::VerifyResponseToProto(*results);
  FUZZ_CHECK(response.results_size() == static_cast<int>(results->size()),
             "response has %d results", response.results_size());
  std::string wire;
  FUZZ_CHECK(response.SerializeToString(&wire), "response does not serialize");
}

// The parts of one SessionRequest, in the stream's order; returns the first error.
absl::Status ApplySession(const v1::SessionRequest& request, const Sampler& sampler,
                          SequenceTable& table, v1::SessionResponse& response) {
  for (uint64_t id : request.release()) {
    if (absl::Status s = table.Release(id); !s.ok()) return s;
  }
  for (const v1::AddSequence& add : request.add()) {
    absl::StatusOr<SamplingParams> params = service::UnvalidatedParamsFromProto(add.params());
    if (!params.ok()) return params.status();
    if (!params->seed.has_value()) params->seed = 7;
    absl::Status s = table.Add(
        add.sequence_id(), *std::move(params),
        std::vector<int32_t>(add.prompt_token_ids().begin(), add.prompt_token_ids().end()));
    if (!s.ok()) return s;
  }
  for (const v1::Fork& fork : request.fork()) {
    const absl::Status s = table.Fork(
        fork.parent_id(),
        absl::MakeConstSpan(fork.child_ids().data(), static_cast<size_t>(fork.child_ids_size())));
    if (!s.ok()) return s;
  }
  if (!request.has_step()) return absl::OkStatus();
  absl::StatusOr<LogitsView> logits = service::LogitsFromProto(request.step().logits());
  if (!logits.ok()) return logits.status();
  const absl::Span<const uint64_t> ids(request.step().sequence_ids().data(),
                                       static_cast<size_t>(request.step().sequence_ids_size()));
  // Beam searches and drafts are not added here (beam_fuzzer.cc, verify_fuzzer.cc): every
  // sequence is plain, one token per id.
  absl::StatusOr<std::vector<SequenceStep>> steps = table.Step(sampler, *logits, ids);
  if (!steps.ok()) return steps.status();
  FUZZ_CHECK(steps->size() == ids.size(), "%zu results for %zu ids", steps->size(), ids.size());
  std::vector<SampledToken> tokens;
  for (const SequenceStep& step : *steps) tokens.push_back(step.token);
  CheckResultInvariants(tokens, logits->vocab_size());
  service::SessionResultsToProto(*steps, response);
  return absl::OkStatus();
}

void FuzzSession(const v1::SessionRequest& request) {
  const Sampler sampler;
  SequenceTable table(kLimits);
  v1::SessionResponse response;
  const absl::Status status = ApplySession(request, sampler, table, response);
  FUZZ_CHECK(status.ok() || ExpectedError(status), "session request: %s",
             status.ToString().c_str());
  FUZZ_CHECK(table.size() <= kLimits.max_sequences, "%lld sequences",
             static_cast<long long>(table.size()));
}

// The service's own parse of the same bytes, as gRPC would hand them over in slices (of up to
// 1 + (first byte ÷ 4) bytes): it must succeed exactly when protobuf's does and give the same
// message once the logits bytes it left in the slices are put back.
void FuzzReceived(const uint8_t* data, size_t size, uint8_t first, bool parsed,
                  const v1::SampleRequest& want) {
  std::vector<grpc::Slice> slices;
  const size_t max_slice = 1 + first / 4;
  for (size_t at = 0; at < size; at += max_slice) {
    slices.emplace_back(data + at, std::min(max_slice, size - at));
  }
  const grpc::ByteBuffer buffer(slices.data(), slices.size());
  absl::StatusOr<service::ReceivedSampleRequest> got =
      service::ReceivedSampleRequest::Parse(buffer);
  FUZZ_CHECK(got.ok() == parsed, "ReceivedSampleRequest::Parse: %s where protobuf %s",
             got.status().ToString().c_str(), parsed ? "parses" : "does not");
  if (!got.ok()) {
    FUZZ_CHECK(got.status().code() == absl::StatusCode::kInvalidArgument,
               "ReceivedSampleRequest::Parse: %s", got.status().ToString().c_str());
    return;
  }
  v1::SampleRequest whole = got->message();
  if (!got->data_pieces().empty()) {
    std::string& bytes = *whole.mutable_logits()->mutable_data();
    FUZZ_CHECK(bytes.empty(), "data left in the message as well as in pieces");
    for (const LogitsView::Piece& piece : got->data_pieces()) {
      bytes.append(reinterpret_cast<const char*>(piece.bytes.data()), piece.bytes.size());
    }
  }
  // Compared as deterministic bytes: maps in key order, and a NaN parameter equal to itself.
  FUZZ_CHECK(testing::DeterministicBytes(whole) == testing::DeterministicBytes(want),
             "ReceivedSampleRequest::Parse gave another message than protobuf");
}

}  // namespace
}  // namespace tokensampler::fuzzing

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // Parsing arbitrary bytes makes protobuf log (e.g. invalid UTF-8 in a string field) on every
  // other input; the parse result is what counts.
  static const bool quiet = [] {
    google::protobuf::SetLogHandler(nullptr);
    return true;
  }();
  (void)quiet;
  if (size == 0) return 0;
  const bool odd = (data[0] & 1) != 0;
  const int body = static_cast<int>(size - 1);
  if (odd && (data[0] & 2) != 0) {
    tokensampler::v1::VerifyRequest request;
    if (request.ParseFromArray(data + 1, body)) tokensampler::fuzzing::FuzzVerify(request);
  } else if (odd) {
    tokensampler::v1::SessionRequest request;
    if (request.ParseFromArray(data + 1, body)) tokensampler::fuzzing::FuzzSession(request);
  } else {
    tokensampler::v1::SampleRequest request;
    const bool parsed = request.ParseFromArray(data + 1, body);
    tokensampler::fuzzing::FuzzReceived(data + 1, static_cast<size_t>(body), data[0], parsed,
                                        request);
    if (parsed) tokensampler::fuzzing::FuzzSample(request);
  }
  return 0;
}
