// The straightforward pipeline — one pass (or one sort) per question, one stage at a time —
// kept as the oracle the fast Sampler is tested against. Serial; not for production use.
#include "core/reference.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/random/distributions.h"
#include "absl/strings/str_cat.h"
#include "core/philox.h"
#include "core/row.h"
#include "core/stages.h"
#include "core/status_macros.h"
#include "core/stopping.h"

namespace tokensampler {

struct ReferenceSampler::Scratch {
  RowScratch row;
};

namespace {

constexpr float kPosInf = std::numeric_limits<float>::infinity();

// Steps 4–6 for one sample: temperature and truncation in the row's order, then mirostat or
// the draw. `logits` is the sample's own copy of the processed row and ends as the distribution
// that was sampled from. Returns the token (and μ for mirostat rows).
int32_t SampleOne(const SamplingParams& p, absl::Span<float> logits, uint64_t seed, uint64_t step,
                  uint32_t sample, float mu_in, float* mu_out, RowScratch& scratch) {
  const absl::Span<const Stage> order =
      p.sampler_order.empty() ? DefaultStageOrder() : absl::MakeConstSpan(p.sampler_order);
  const Temperature temperature{p.temperature, p.dynatemp_range, p.dynatemp_exponent};
  // A custom order without temperature still tempers first (the proto's contract).
  if (std::find(order.begin(), order.end(), Stage::kTemperature) == order.end()) {
    temperature.Apply(logits, scratch);
  }
  for (Stage stage : order) {
    switch (stage) {
      case Stage::kTemperature:
        temperature.Apply(logits, scratch);
        break;
      case Stage::kTopK:
        TopK{p.top_k}.Apply(logits, scratch);
        break;
      case Stage::kTopP:
        TopP{p.top_p}.Apply(logits, scratch);
        break;
      case Stage::kMinP:
        MinP{p.min_p}.Apply(logits);
        break;
      case Stage::kTypicalP:
        TypicalP{p.typical_p}.Apply(logits, scratch);
        break;
      case Stage::kEpsilonCutoff:
        EpsilonCutoff{p.epsilon_cutoff}.Apply(logits, scratch);
        break;
      case Stage::kEtaCutoff:
        EtaCutoff{p.eta_cutoff}.Apply(logits, scratch);
        break;
      case Stage::kTopNSigma:
        if (p.top_n_sigma.has_value()) TopNSigma{*p.top_n_sigma}.Apply(logits);
        break;
      case Stage::kXtc:
        if (p.xtc_probability > 0.0f) {
          Xtc{p.xtc_threshold, p.xtc_probability,
              UniformDouble(seed, step, sample, DrawPurpose::kXtc)}
              .Apply(logits, scratch);
        }
        break;
    }
  }
  const double coin = UniformDouble(seed, step, sample, DrawPurpose::kToken);
  if (p.mirostat_mode != 0) {
    const Mirostat mirostat{p.mirostat_mode, p.mirostat_tau, p.mirostat_eta, mu_in,
                            static_cast<int32_t>(logits.size())};
    const Mirostat::Result result = mirostat.Apply(logits, coin, scratch);
    *mu_out = result.mu;
    return result.token;
  }
  return Draw(logits, coin, scratch);
}

absl::Status SampleRow(const LogitsView& view, int row, const RowRequest& req, RowScratch& scratch,
                       SampledToken* results) {
  const SamplingParams& p = *req.params;
  const int32_t vocab = view.vocab_size();
  const size_t r = static_cast<size_t>(row);
  RETURN_IF_ERROR(CheckHistory(r, "prompt_token_ids", req.prompt_token_ids, vocab));
  RETURN_IF_ERROR(CheckHistory(r, "output_token_ids", req.output_token_ids, vocab));
  if (p.max_tokens.has_value() &&
      req.output_token_ids.size() >= static_cast<size_t>(*p.max_tokens)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rows[", r, "].output_token_ids has ", req.output_token_ids.size(),
        " tokens and max_tokens is ", *p.max_tokens, ": the sequence has already finished"));
  }

  scratch.Reserve(vocab);
  const absl::Span<float> logits(scratch.logits.data(), static_cast<size_t>(vocab));
  if (const int nan = DecodeRow(view, row, logits); nan >= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits.data is NaN at row ", row, ", token ", nan));
  }

  // Raw logprobs are taken before any stage touches the row.
  const bool wants_logprobs = p.logprobs.has_value();
  const bool raw_mode =
      p.logprobs_mode == LogprobsMode::kRawLogprobs || p.logprobs_mode == LogprobsMode::kRawLogits;
  Normalizer raw_norm;
  if (wants_logprobs && raw_mode) {
    if (p.logprobs_mode == LogprobsMode::kRawLogprobs) {
      raw_norm = Normalizer::Of(logits);
      TopValues(
          logits, *p.logprobs, [&](float l) { return raw_norm.LogProb(l); }, scratch,
          scratch.raw_top);
    } else {
      TopValues(
          logits, *p.logprobs, [](float l) { return l; }, scratch, scratch.raw_top);
    }
  }

  // Steps 1–2.
  MaskAndBias{p, req.output_token_ids}.Apply(logits, scratch);
  Penalties{p, req.prompt_token_ids, req.output_token_ids}.Apply(logits, scratch);
  Dry{p, req.prompt_token_ids, req.output_token_ids}.Apply(logits, scratch);
  NoRepeatNgram{p.no_repeat_ngram_size, req.prompt_token_ids, req.output_token_ids}.Apply(logits);

  const auto [max, argmax] = Argmax(logits);
  if (argmax < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows[", r,
                     "]: every token is masked (by the logits themselves, allowed_token_ids, "
                     "bad_words, min_tokens, token_bitmask, logit_bias or no_repeat_ngram_size)"));
  }
  if (max == kPosInf) {
    // +inf logits dominate: the row is uniform over them.
    for (float& l : logits) l = l == kPosInf ? 0.0f : kNegInf;
  }

  const uint64_t seed = p.seed.has_value() ? *p.seed : absl::Uniform<uint64_t>(scratch.entropy);
  const uint64_t step = req.output_token_ids.size();
  const float mu_in = req.mirostat_mu.value_or(2.0f * p.mirostat_tau);
  for (int32_t s = 0; s < p.n; ++s) {
    SampledToken& out = results[s];
    out.row_index = static_cast<uint32_t>(row);
    out.sample_index = req.first_sample_index + static_cast<uint32_t>(s);
    absl::Span<const float> processed = logits;
    float mu = mu_in;
    if (p.greedy()) {
      out.token_id = argmax;
    } else {
      absl::Span<float> work = logits;
      if (p.n > 1) {
        work = absl::Span<float>(scratch.work.data(), logits.size());
        std::copy(logits.begin(), logits.end(), work.begin());
      }
      out.token_id = SampleOne(p, work, seed, step, out.sample_index, mu_in, &mu, scratch);
      processed = work;
    }
    if (p.mirostat_mode != 0) out.mirostat_mu = mu;
    if (wants_logprobs) FillLogprobs(p, view, row, out.token_id, processed, raw_norm, scratch, out);
    const Finish finish = CheckFinish(p, req.output_token_ids, out.token_id);
    out.finish_reason = finish.reason;
    out.stop_token_id = finish.stop_token_id;
    out.stop_sequence_index = finish.stop_sequence_index;
  }
  return absl::OkStatus();
}

}  // namespace

ReferenceSampler::ReferenceSampler() : scratch_(std::make_unique<Scratch>()) {}
ReferenceSampler::~ReferenceSampler() = default;

absl::StatusOr<std::vector<SampledToken>> ReferenceSampler::Run(
    const LogitsView& logits, absl::Span<const RowRequest> rows) const {
  if (logits.in_pieces()) {
    return absl::InvalidArgumentError("the reference sampler needs a contiguous view");
  }
  if (rows.size() != static_cast<size_t>(logits.rows())) {
    return absl::InvalidArgumentError(
        absl::StrCat("rows has ", rows.size(), " entries but logits.rows is ", logits.rows()));
  }
  size_t total = 0;
  for (const RowRequest& row : rows) total += static_cast<size_t>(row.params->n);
  std::vector<SampledToken> results(total);
  size_t offset = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    RETURN_IF_ERROR(
        SampleRow(logits, static_cast<int>(r), rows[r], scratch_->row, results.data() + offset));
    offset += static_cast<size_t>(rows[r].params->n);
  }
  return results;
}

}  // namespace tokensampler
