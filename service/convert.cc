#include "service/convert.h"

#include <algorithm>
#include <limits>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "core/status_macros.h"

namespace tokensampler::service {
namespace {

// Returns `status` with `prefix` in front of its message (same code).
absl::Status Prefixed(absl::string_view prefix, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat(prefix, status.message()));
}

// Copies a repeated int32 field.
std::vector<int32_t> ToVector(const google::protobuf::RepeatedField<int32_t>& ids) {
  return std::vector<int32_t>(ids.begin(), ids.end());
}

std::vector<TokenSequence> ToSequences(
    const google::protobuf::RepeatedPtrField<v1::TokenSequence>& seqs) {
  std::vector<TokenSequence> out;
  out.reserve(static_cast<size_t>(seqs.size()));
  for (const v1::TokenSequence& seq : seqs) out.push_back(ToVector(seq.token_ids()));
  return out;
}

// A borrowed span over a repeated int32 field (no copy).
absl::Span<const int32_t> SpanOf(const google::protobuf::RepeatedField<int32_t>& ids) {
  return absl::Span<const int32_t>(ids.data(), static_cast<size_t>(ids.size()));
}

absl::StatusOr<LogprobsMode> LogprobsModeFromProto(int mode) {
  switch (mode) {
    case v1::RAW_LOGPROBS:
      return LogprobsMode::kRawLogprobs;
    case v1::PROCESSED_LOGPROBS:
      return LogprobsMode::kProcessedLogprobs;
    case v1::RAW_LOGITS:
      return LogprobsMode::kRawLogits;
    case v1::PROCESSED_LOGITS:
      return LogprobsMode::kProcessedLogits;
    default:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("logprobs_mode must be one of RAW_LOGPROBS, PROCESSED_LOGPROBS, RAW_LOGITS, "
                   "PROCESSED_LOGITS, got ",
                   mode));
}

absl::StatusOr<Stage> StageFromProto(int stage, int index) {
  switch (stage) {
    case v1::SAMPLER_STAGE_TOP_K:
      return Stage::kTopK;
    case v1::SAMPLER_STAGE_TOP_P:
      return Stage::kTopP;
    case v1::SAMPLER_STAGE_MIN_P:
      return Stage::kMinP;
    case v1::SAMPLER_STAGE_TYPICAL_P:
      return Stage::kTypicalP;
    case v1::SAMPLER_STAGE_EPSILON_CUTOFF:
      return Stage::kEpsilonCutoff;
    case v1::SAMPLER_STAGE_ETA_CUTOFF:
      return Stage::kEtaCutoff;
    case v1::SAMPLER_STAGE_TOP_N_SIGMA:
      return Stage::kTopNSigma;
    case v1::SAMPLER_STAGE_XTC:
      return Stage::kXtc;
    case v1::SAMPLER_STAGE_TEMPERATURE:
      return Stage::kTemperature;
    default:
      break;
  }
  const std::string value = stage == v1::SAMPLER_STAGE_UNSPECIFIED
                                ? std::string("SAMPLER_STAGE_UNSPECIFIED")
                                : absl::StrCat(stage);
  return absl::InvalidArgumentError(absl::StrCat("sampler_order[", index,
                                                 "] must be a SamplerStage other than ",
                                                 "SAMPLER_STAGE_UNSPECIFIED, got ", value));
}

// Copies every field of `proto` that is explicitly set into `p`; converts enums.
absl::Status MergeExplicitFields(const v1::SamplingParams& proto, SamplingParams& p) {
  // The vLLM core.
  if (proto.has_temperature()) p.temperature = proto.temperature();
  if (proto.has_top_k()) p.top_k = proto.top_k();
  if (proto.has_top_p()) p.top_p = proto.top_p();
  if (proto.has_min_p()) p.min_p = proto.min_p();
  if (proto.has_repetition_penalty()) p.repetition_penalty = proto.repetition_penalty();
  if (proto.has_frequency_penalty()) p.frequency_penalty = proto.frequency_penalty();
  if (proto.has_presence_penalty()) p.presence_penalty = proto.presence_penalty();
  if (proto.has_seed()) p.seed = proto.seed();
  if (!proto.logit_bias().empty()) {
    // A proto map has unique keys in unspecified order; core wants them sorted.
    p.logit_bias.clear();
    p.logit_bias.reserve(proto.logit_bias().size());
    for (const auto& [token, bias] : proto.logit_bias()) p.logit_bias.emplace_back(token, bias);
    std::sort(p.logit_bias.begin(), p.logit_bias.end());
  }
  if (proto.has_logprobs()) p.logprobs = proto.logprobs();
  if (proto.logprobs_mode() != v1::LOGPROBS_MODE_UNSPECIFIED) {
    ASSIGN_OR_RETURN(p.logprobs_mode, LogprobsModeFromProto(proto.logprobs_mode()));
  }

  // Truncation and shaping.
  if (proto.has_typical_p()) p.typical_p = proto.typical_p();
  if (proto.has_epsilon_cutoff()) p.epsilon_cutoff = proto.epsilon_cutoff();
  if (proto.has_eta_cutoff()) p.eta_cutoff = proto.eta_cutoff();
  if (proto.has_top_n_sigma()) p.top_n_sigma = proto.top_n_sigma();
  if (proto.has_xtc_threshold()) p.xtc_threshold = proto.xtc_threshold();
  if (proto.has_xtc_probability()) p.xtc_probability = proto.xtc_probability();
  if (proto.has_dynatemp_range()) p.dynatemp_range = proto.dynatemp_range();
  if (proto.has_dynatemp_exponent()) p.dynatemp_exponent = proto.dynatemp_exponent();

  // Mirostat.
  if (proto.has_mirostat_mode()) p.mirostat_mode = proto.mirostat_mode();
  if (proto.has_mirostat_tau()) p.mirostat_tau = proto.mirostat_tau();
  if (proto.has_mirostat_eta()) p.mirostat_eta = proto.mirostat_eta();

  // Repetition.
  if (proto.has_dry_multiplier()) p.dry_multiplier = proto.dry_multiplier();
  if (proto.has_dry_base()) p.dry_base = proto.dry_base();
  if (proto.has_dry_allowed_length()) p.dry_allowed_length = proto.dry_allowed_length();
  if (proto.has_dry_penalty_last_n()) p.dry_penalty_last_n = proto.dry_penalty_last_n();
  if (!proto.dry_sequence_breakers().empty()) {
    p.dry_sequence_breakers = ToSequences(proto.dry_sequence_breakers());
  }
  if (proto.has_no_repeat_ngram_size()) p.no_repeat_ngram_size = proto.no_repeat_ngram_size();
  if (proto.has_penalty_last_n()) p.penalty_last_n = proto.penalty_last_n();

  // Masks.
  if (!proto.allowed_token_ids().empty()) p.allowed_token_ids = ToVector(proto.allowed_token_ids());
  if (!proto.bad_words().empty()) p.bad_words = ToSequences(proto.bad_words());
  if (!proto.eos_token_ids().empty()) p.eos_token_ids = ToVector(proto.eos_token_ids());
  if (proto.has_min_tokens()) p.min_tokens = proto.min_tokens();
  if (proto.has_ignore_eos()) p.ignore_eos = proto.ignore_eos();
  if (!proto.token_bitmask().empty()) p.token_bitmask = proto.token_bitmask();

  // Stopping.
  if (proto.has_max_tokens()) p.max_tokens = proto.max_tokens();
  if (!proto.stop_token_ids().empty()) p.stop_token_ids = ToVector(proto.stop_token_ids());
  if (!proto.stop_token_sequences().empty()) {
    p.stop_token_sequences = ToSequences(proto.stop_token_sequences());
  }

  // Samples and order.
  if (proto.has_n()) p.n = proto.n();
  if (!proto.sampler_order().empty()) {
    p.sampler_order.clear();
    p.sampler_order.reserve(static_cast<size_t>(proto.sampler_order_size()));
    for (int i = 0; i < proto.sampler_order_size(); ++i) {
      ASSIGN_OR_RETURN(Stage stage, StageFromProto(proto.sampler_order(i), i));
      p.sampler_order.push_back(stage);
    }
  }
  return absl::OkStatus();
}

// The validated parameters of each row (SampleRow or VerifyRow) into `params`; errors are
// prefixed "rows[i].params.". Shared by Sample and Verify so both check rows alike.
template <typename Row>
absl::Status RowParamsFromProto(const google::protobuf::RepeatedPtrField<Row>& rows,
                                int32_t vocab_size, std::vector<SamplingParams>& params) {
  params.reserve(static_cast<size_t>(rows.size()));
  for (int i = 0; i < rows.size(); ++i) {
    absl::StatusOr<SamplingParams> row_params = ParamsFromProto(rows.Get(i).params(), vocab_size);
    if (!row_params.ok()) {
      return Prefixed(absl::StrCat("rows[", i, "].params."), row_params.status());
    }
    params.push_back(*std::move(row_params));
  }
  return absl::OkStatus();
}

// The history fields a SampleRow and a VerifyRow share; `params` must stay where it is.
template <typename Row>
void RowFromProto(const Row& row, const SamplingParams& params, RowRequest& out) {
  out.params = &params;
  out.prompt_token_ids = SpanOf(row.prompt_token_ids());
  out.output_token_ids = SpanOf(row.output_token_ids());
  if (row.has_mirostat_mu()) out.mirostat_mu = row.mirostat_mu();
}

v1::FinishReason FinishReasonToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return v1::FINISH_REASON_UNSPECIFIED;
    case FinishReason::kEos:
      return v1::FINISH_REASON_EOS;
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

// Fills the finish fields that v1::SampledToken, v1::SequenceResult and v1::VerifyResult share
// (same names): the finish reason, the matched stop and mirostat's μ.
template <typename Proto>
void SetFinishFields(const SampledToken& token, Proto& out) {
  out.set_finish_reason(FinishReasonToProto(token.finish_reason));
  if (token.stop_token_id.has_value()) {
    out.set_stop_token_id(*token.stop_token_id);
  } else if (token.stop_sequence_index.has_value()) {
    out.set_stop_sequence_index(*token.stop_sequence_index);
  }
  if (token.mirostat_mu.has_value()) out.set_mirostat_mu(*token.mirostat_mu);
}

// Fills the fields that v1::SampledToken and v1::SequenceResult share (same names).
template <typename Proto>
void SetTokenFields(const SampledToken& token, Proto& out) {
  out.set_token_id(token.token_id);
  out.set_logprob(token.logprob);
  out.mutable_top_logprobs()->Reserve(static_cast<int>(token.top_logprobs.size()));
  for (const TokenLogprob& top : token.top_logprobs) {
    v1::TokenLogprob& top_out = *out.add_top_logprobs();
    top_out.set_token_id(top.token_id);
    top_out.set_logprob(top.logprob);
  }
  SetFinishFields(token, out);
}

}  // namespace

absl::StatusOr<DType> DTypeFromProto(v1::DType dtype) {
  switch (dtype) {
    case v1::DTYPE_FLOAT32:
      return DType::kFloat32;
    case v1::DTYPE_BFLOAT16:
      return DType::kBFloat16;
    case v1::DTYPE_FLOAT16:
      return DType::kFloat16;
    case v1::DTYPE_UNSPECIFIED:
      return absl::InvalidArgumentError("logits.dtype must be set, got DTYPE_UNSPECIFIED");
    default:
      break;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("logits.dtype must be one of DTYPE_FLOAT32, DTYPE_BFLOAT16, DTYPE_FLOAT16, got ",
                   static_cast<int>(dtype)));
}

absl::StatusOr<LogitsView> LogitsFromProto(const v1::Logits& logits) {
  return LogitsFromProto(logits, {});
}

absl::StatusOr<LogitsView> LogitsFromProto(const v1::Logits& logits,
                                           absl::Span<const LogitsView::Piece> data_pieces) {
  if (logits.source_case() == v1::Logits::kSharedMemory) {
    return absl::InvalidArgumentError(
        "logits.shared_memory is not accepted here; send the logits as bytes (data)");
  }
  if (logits.source_case() == v1::Logits::kSparse) {
    return absl::InvalidArgumentError(
        "logits.sparse is not accepted here; send dense logits (data)");
  }
  ASSIGN_OR_RETURN(const DType dtype, DTypeFromProto(logits.dtype()));
  if (!data_pieces.empty()) {
    return LogitsView::CreateFromPieces(dtype, logits.rows(), logits.vocab_size(), data_pieces);
  }
  const std::string& data = logits.data();
  return LogitsView::Create(
      dtype, logits.rows(), logits.vocab_size(),
      absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(data.data()), data.size()));
}

absl::StatusOr<SamplingParams> UnvalidatedParamsFromProto(const v1::SamplingParams& proto) {
  SamplingParams params;
  if (!proto.preset().empty()) {
    ASSIGN_OR_RETURN(params, PresetParams(proto.preset()));
  }
  RETURN_IF_ERROR(MergeExplicitFields(proto, params));
  return params;
}

absl::StatusOr<SamplingParams> ParamsFromProto(const v1::SamplingParams& proto,
                                               int32_t vocab_size) {
  ASSIGN_OR_RETURN(SamplingParams params, UnvalidatedParamsFromProto(proto));
  RETURN_IF_ERROR(ValidateParams(params, vocab_size));
  return params;
}

absl::StatusOr<Batch> BatchFromProto(const v1::SampleRequest& request) {
  ASSIGN_OR_RETURN(const LogitsView logits, LogitsFromProto(request.logits()));
  return BatchFromProto(request, logits);
}

absl::StatusOr<Batch> BatchFromProto(const v1::SampleRequest& request, const LogitsView& logits) {
  Batch batch;
  batch.logits = logits;
  const size_t num_rows = static_cast<size_t>(request.rows_size());
  if (num_rows != request.logits().rows()) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows has ", num_rows, " entries but logits.rows is ", request.logits().rows(),
                     "; they must be equal"));
  }
  RETURN_IF_ERROR(RowParamsFromProto(request.rows(), logits.vocab_size(), batch.params));
  // Only now that `params` has its final size are pointers into it stable.
  batch.rows.reserve(num_rows);
  for (int i = 0; i < request.rows_size(); ++i) {
    RowFromProto(request.rows(i), batch.params[static_cast<size_t>(i)], batch.rows.emplace_back());
  }
  return batch;
}

v1::SampleResponse ResponseToProto(absl::Span<const SampledToken> tokens) {
  v1::SampleResponse response;
  response.mutable_results()->Reserve(static_cast<int>(tokens.size()));
  for (const SampledToken& token : tokens) {
    v1::SampledToken& out = *response.add_results();
    SetTokenFields(token, out);
    out.set_row_index(token.row_index);
    out.set_sample_index(token.sample_index);
  }
  return response;
}

absl::StatusOr<BeamParams> BeamParamsFromProto(const v1::BeamSearchParams& proto) {
  constexpr uint32_t kMaxCount = static_cast<uint32_t>(std::numeric_limits<int32_t>::max());
  const auto count = [&](absl::string_view field, uint32_t value) -> absl::StatusOr<int32_t> {
    if (value > kMaxCount) {
      return absl::InvalidArgumentError(
          absl::StrCat("beam.", field, " must be at most ", kMaxCount, ", got ", value));
    }
    return static_cast<int32_t>(value);
  };
  BeamParams beam;
  ASSIGN_OR_RETURN(beam.beam_width, count("beam_width", proto.beam_width()));
  if (proto.has_length_penalty()) beam.length_penalty = proto.length_penalty();
  switch (proto.early_stopping()) {
    case v1::EARLY_STOPPING_UNSPECIFIED:
    case v1::EARLY_STOPPING_HEURISTIC:
      beam.early_stopping = EarlyStopping::kHeuristic;
      break;
    case v1::EARLY_STOPPING_TRUE:
      beam.early_stopping = EarlyStopping::kTrue;
      break;
    case v1::EARLY_STOPPING_NEVER:
      beam.early_stopping = EarlyStopping::kNever;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "beam.early_stopping must be one of EARLY_STOPPING_TRUE, EARLY_STOPPING_HEURISTIC, "
          "EARLY_STOPPING_NEVER, got ",
          static_cast<int>(proto.early_stopping())));
  }
  if (proto.has_num_return_sequences()) {
    ASSIGN_OR_RETURN(beam.num_return_sequences,
                     count("num_return_sequences", proto.num_return_sequences()));
  }
  if (proto.has_num_beam_groups()) {
    ASSIGN_OR_RETURN(beam.num_beam_groups, count("num_beam_groups", proto.num_beam_groups()));
  }
  if (proto.has_diversity_penalty()) beam.diversity_penalty = proto.diversity_penalty();
  beam.do_sample = proto.do_sample();
  return beam;
}

void SessionResultsToProto(absl::Span<const SequenceStep> steps, v1::SessionResponse& response) {
  response.mutable_results()->Reserve(static_cast<int>(steps.size()));
  for (const SequenceStep& step : steps) {
    v1::SequenceResult& out = *response.add_results();
    out.set_sequence_id(step.sequence_id);
    if (!step.beam.has_value()) {
      SetTokenFields(step.token, out);
      if (step.verify.has_value()) VerifyResultToProto(*step.verify, *out.mutable_verify());
      continue;
    }
    const BeamStep& beam = *step.beam;
    out.set_finish_reason(FinishReasonToProto(beam.finish_reason));
    out.mutable_beams()->Reserve(static_cast<int>(beam.beams.size()));
    for (const BeamSlot& slot : beam.beams) {
      v1::BeamSlot& slot_out = *out.add_beams();
      slot_out.set_parent_beam(slot.parent_beam);
      slot_out.set_token_id(slot.token_id);
      slot_out.set_logprob(slot.logprob);
      slot_out.set_cumulative_score(slot.cumulative_score);
    }
    for (const BeamHypothesis& h : beam.hypotheses) {
      v1::BeamHypothesis& h_out = *out.add_hypotheses();
      h_out.mutable_token_ids()->Add(h.token_ids.begin(), h.token_ids.end());
      h_out.set_score(h.score);
      h_out.set_sum_logprobs(h.sum_logprobs);
      h_out.set_finish_reason(FinishReasonToProto(h.finish_reason));
      if (h.stop_token_id.has_value()) {
        h_out.set_stop_token_id(*h.stop_token_id);
      } else if (h.stop_sequence_index.has_value()) {
        h_out.set_stop_sequence_index(*h.stop_sequence_index);
      }
    }
  }
}

// --- Speculative decoding ---

absl::StatusOr<Drafts> DraftsFromProto(const google::protobuf::RepeatedField<int32_t>& token_ids,
                                       const v1::Logits& probs, bool has_probs,
                                       const google::protobuf::RepeatedField<int32_t>& parents) {
  Drafts drafts;
  drafts.token_ids = SpanOf(token_ids);
  drafts.parents = SpanOf(parents);
  // An empty Logits (no rows, no dtype) is "absent", as an unset one.
  if (has_probs && (probs.rows() > 0 || probs.dtype() != v1::DTYPE_UNSPECIFIED)) {
    absl::StatusOr<LogitsView> view = LogitsFromProto(probs);
    if (!view.ok()) {
      // LogitsFromProto names "logits.<field>"; here the tensor is draft_probs.
      absl::string_view message = view.status().message();
      absl::ConsumePrefix(&message, "logits.");
      return absl::Status(view.status().code(), absl::StrCat("draft_probs.", message));
    }
    drafts.probs = *view;
  }
  return drafts;
}

absl::StatusOr<VerifyBatch> VerifyBatchFromProto(const v1::VerifyRequest& request) {
  ASSIGN_OR_RETURN(const LogitsView logits, LogitsFromProto(request.logits()));
  return VerifyBatchFromProto(request, logits);
}

absl::StatusOr<VerifyBatch> VerifyBatchFromProto(const v1::VerifyRequest& request,
                                                 const LogitsView& logits) {
  VerifyBatch batch;
  batch.logits = logits;
  RETURN_IF_ERROR(RowParamsFromProto(request.rows(), logits.vocab_size(), batch.params));
  batch.rows.reserve(static_cast<size_t>(request.rows_size()));
  for (int i = 0; i < request.rows_size(); ++i) {
    const v1::VerifyRow& row = request.rows(i);
    VerifyRowRequest& out = batch.rows.emplace_back();
    RowFromProto(row, batch.params[static_cast<size_t>(i)], out.row);
    absl::StatusOr<Drafts> drafts = DraftsFromProto(row.draft_token_ids(), row.draft_probs(),
                                                    row.has_draft_probs(), row.draft_parents());
    if (!drafts.ok()) return Prefixed(absl::StrCat("rows[", i, "]."), drafts.status());
    out.drafts = *drafts;
  }
  return batch;
}

void VerifyResultToProto(const VerifyResult& result, v1::VerifyResult& out) {
  out.set_num_accepted(static_cast<uint32_t>(result.num_accepted()));
  for (const SampledToken& token : result.tokens) {
    out.add_token_ids(token.token_id);
    if (!result.has_logprobs) continue;
    out.add_logprobs(token.logprob);
    v1::TopLogprobs& top = *out.add_top_logprobs();
    top.mutable_top_logprobs()->Reserve(static_cast<int>(token.top_logprobs.size()));
    for (const TokenLogprob& entry : token.top_logprobs) {
      v1::TokenLogprob& entry_out = *top.add_top_logprobs();
      entry_out.set_token_id(entry.token_id);
      entry_out.set_logprob(entry.logprob);
    }
  }
  for (int32_t node : result.accepted_nodes) out.add_accepted_draft_indices(node);
  if (!result.tokens.empty()) SetFinishFields(result.tokens.back(), out);
}

v1::VerifyResponse VerifyResponseToProto(absl::Span<const VerifyResult> results) {
  v1::VerifyResponse response;
  response.mutable_results()->Reserve(static_cast<int>(results.size()));
  for (const VerifyResult& result : results) VerifyResultToProto(result, *response.add_results());
  return response;
}

absl::StatusOr<std::vector<SequenceDrafts>> StepDraftsFromProto(const v1::Step& step) {
  std::vector<SequenceDrafts> out;
  out.reserve(static_cast<size_t>(step.drafts_size()));
  for (int i = 0; i < step.drafts_size(); ++i) {
    const v1::SequenceDrafts& d = step.drafts(i);
    absl::StatusOr<Drafts> drafts = DraftsFromProto(d.draft_token_ids(), d.draft_probs(),
                                                    d.has_draft_probs(), d.draft_parents());
    if (!drafts.ok()) return Prefixed(absl::StrCat("drafts[", i, "]."), drafts.status());
    out.push_back({d.sequence_id(), *drafts});
  }
  return out;
}

}  // namespace tokensampler::service
