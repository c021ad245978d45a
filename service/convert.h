// Conversions between the wire contract (tokensampler.v1 messages) and core values.
//
// Everything here is a pure function over its arguments: thread-safe. Nothing copies logits or
// token histories: the core values returned borrow from the request message, which must outlive
// them (see each function's ownership note).
#ifndef TOKENSAMPLER_SERVICE_CONVERT_H_
#define TOKENSAMPLER_SERVICE_CONVERT_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/beam.h"
#include "core/params.h"
#include "core/sampler.h"
#include "core/session.h"
#include "core/speculative.h"
#include "core/tensor.h"
#include "tokensampler/v1/sampler.pb.h"

namespace tokensampler::service {

// Returns the core dtype of `dtype`, or INVALID_ARGUMENT
// "logits.dtype must be set, got DTYPE_UNSPECIFIED" (or naming an unknown number).
absl::StatusOr<DType> DTypeFromProto(v1::DType dtype);

// Returns a view over `logits.data()` (no copy), or INVALID_ARGUMENT naming the `logits.` field
// and value: dtype unset, vocab_size 0, data size != rows × vocab_size × dtype size, or a
// shared_memory / sparse source (RequestLogits resolves those, service/request_logits.h).
// Ownership: the view borrows `logits.data()`; `logits` must outlive it and stay unmodified.
absl::StatusOr<LogitsView> LogitsFromProto(const v1::Logits& logits);
// The same with the bytes of `data` in pieces (`data` itself left empty) when `data_pieces` is
// not empty (ReceivedSampleRequest).
absl::StatusOr<LogitsView> LogitsFromProto(const v1::Logits& logits,
                                           absl::Span<const LogitsView::Piece> data_pieces);

// Returns the core parameters of `proto` for a vocabulary of `vocab_size` tokens, validated with
// ValidateParams(). Built from PresetParams(proto.preset()) when a preset is named, else from the
// defaults; every explicitly set field (proto3 `optional` present, repeated/map/bytes non-empty,
// enum not UNSPECIFIED) then overrides it. LOGPROBS_MODE_UNSPECIFIED keeps the preset's mode
// (raw logprobs by default).
// Returns INVALID_ARGUMENT whose message is the field path relative to SamplingParams plus the
// value ("top_p must be in (0, 1], got 1.5"); callers prefix the path of the message
// ("rows[3].params.").
absl::StatusOr<SamplingParams> ParamsFromProto(const v1::SamplingParams& proto, int32_t vocab_size);

// ParamsFromProto without the range validation, for callers that validate later themselves
// (SequenceTable::Add validates before it stores a sequence). Returns INVALID_ARGUMENT only for
// an unknown preset or enum value.
absl::StatusOr<SamplingParams> UnvalidatedParamsFromProto(const v1::SamplingParams& proto);

// A SampleRequest converted to what Sampler::Run takes.
// Ownership: `logits` and the spans in `rows` borrow from the SampleRequest it was made from,
// which must outlive it; `rows[i].params` points into `params`, so the batch is move-only (a move
// keeps the vector's buffer, a copy would dangle).
struct Batch {
  Batch() = default;
  Batch(Batch&&) = default;
  Batch& operator=(Batch&&) = default;
  Batch(const Batch&) = delete;
  Batch& operator=(const Batch&) = delete;

  LogitsView logits;
  std::vector<SamplingParams> params;  // one per row
  std::vector<RowRequest> rows;        // rows[i].params == &params[i]
};

// Converts and validates a whole request: the logits tensor, rows.size() == logits.rows, and
// every row's parameters. Token ids in the histories and NaN logits are checked by the core
// during Sampler::Run (which names the row).
// Returns the batch, or INVALID_ARGUMENT naming the field path and value, e.g.
// "rows[3].params.top_p must be in (0, 1], got 1.5".
// Ownership: the batch borrows from `request` (see Batch).
absl::StatusOr<Batch> BatchFromProto(const v1::SampleRequest& request);

// The same with the logits already resolved to `logits` (a shared-memory region or densified
// sparse candidates, service/request_logits.h); `request.logits()` gives only the row count.
// Ownership: the batch borrows `logits`' bytes and the rows' histories.
absl::StatusOr<Batch> BatchFromProto(const v1::SampleRequest& request, const LogitsView& logits);

// Returns the response holding `tokens` in order (Σ n results, row-major as Sampler::Run returns
// them).
v1::SampleResponse ResponseToProto(absl::Span<const SampledToken> tokens);

// Returns the core beam parameters of `proto` (unset fields = defaults, EARLY_STOPPING_UNSPECIFIED
// = HEURISTIC), not yet validated (ValidateBeamParams), or INVALID_ARGUMENT naming the `beam.`
// field and value for an unknown early_stopping or a count beyond int32.
absl::StatusOr<BeamParams> BeamParamsFromProto(const v1::BeamSearchParams& proto);

// Appends one SequenceResult per stepped sequence to `response.results`, in order: a plain
// sequence's token in the plain fields (the last emitted one, with every emitted token in
// `verify` for a step with drafts), a beam search's `beams` and `hypotheses`.
void SessionResultsToProto(absl::Span<const SequenceStep> steps, v1::SessionResponse& response);

// --- Speculative decoding (Verify, Session steps with drafts) ---

// The core drafts of a proto's draft fields (no copy): `draft_probs` becomes a view when it is
// set with rows or a dtype (else point masses). Returns INVALID_ARGUMENT naming
// `draft_probs.<field>` for a malformed tensor; the values are checked by core (ValidateDrafts).
// Ownership: borrows from the fields, which must outlive the result.
absl::StatusOr<Drafts> DraftsFromProto(const google::protobuf::RepeatedField<int32_t>& token_ids,
                                       const v1::Logits& probs, bool has_probs,
                                       const google::protobuf::RepeatedField<int32_t>& parents);

// A VerifyRequest converted to what Verifier::Run takes (the same ownership rules as Batch).
struct VerifyBatch {
  VerifyBatch() = default;
  VerifyBatch(VerifyBatch&&) = default;
  VerifyBatch& operator=(VerifyBatch&&) = default;
  VerifyBatch(const VerifyBatch&) = delete;
  VerifyBatch& operator=(const VerifyBatch&) = delete;

  LogitsView logits;
  std::vector<SamplingParams> params;  // one per row
  std::vector<VerifyRowRequest> rows;  // rows[i].row.params == &params[i]
};

// Converts and validates a VerifyRequest's tensors and parameters. Returns INVALID_ARGUMENT
// naming the field path and value ("rows[1].params.top_p …", "rows[0].draft_probs.dtype …");
// row counts, token ids, drafts and NaN are checked by Verifier::Run.
absl::StatusOr<VerifyBatch> VerifyBatchFromProto(const v1::VerifyRequest& request);

// The same with the target logits already resolved to `logits` (a shared-memory region,
// service/request_logits.h); `draft_probs` are converted from their bytes as above.
// Ownership: the batch borrows `logits`' bytes and the rows' fields.
absl::StatusOr<VerifyBatch> VerifyBatchFromProto(const v1::VerifyRequest& request,
                                                 const LogitsView& logits);

// Fills `out` with one verified sequence's result.
void VerifyResultToProto(const VerifyResult& result, v1::VerifyResult& out);

// The response for Verifier::Run's results, in order.
v1::VerifyResponse VerifyResponseToProto(absl::Span<const VerifyResult> results);

// The core drafts of a Session step (Step.drafts); INVALID_ARGUMENT names `drafts[i].…`.
// Ownership: borrows from `step`.
absl::StatusOr<std::vector<SequenceDrafts>> StepDraftsFromProto(const v1::Step& step);

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_CONVERT_H_
