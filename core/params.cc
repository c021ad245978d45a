#include "core/params.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status_macros.h"

namespace tokensampler {
namespace {

constexpr Stage kDefaultOrder[] = {Stage::kTemperature, Stage::kTopK,      Stage::kTopP,
                                   Stage::kMinP,        Stage::kTypicalP,  Stage::kEpsilonCutoff,
                                   Stage::kEtaCutoff,   Stage::kTopNSigma, Stage::kXtc};

absl::Status Invalid(absl::string_view field, absl::string_view rule, float value) {
  return absl::InvalidArgumentError(absl::StrCat(field, " must be ", rule, ", got ", value));
}
absl::Status Invalid(absl::string_view field, absl::string_view rule, int64_t value) {
  return absl::InvalidArgumentError(absl::StrCat(field, " must be ", rule, ", got ", value));
}

// Range checks; every comparison is written so that NaN fails it.
absl::Status CheckRange(absl::string_view field, float v, float lo, bool lo_open, float hi,
                        bool hi_open) {
  const bool ok_lo = lo_open ? v > lo : v >= lo;
  const bool ok_hi = hi_open ? v < hi : v <= hi;
  if (ok_lo && ok_hi) return absl::OkStatus();
  if (std::isinf(hi)) {
    return Invalid(field, absl::StrCat(lo_open ? "> " : ">= ", lo, " and finite"), v);
  }
  return Invalid(field, absl::StrCat("in ", lo_open ? "(" : "[", lo, ", ", hi, hi_open ? ")" : "]"),
                 v);
}

constexpr float kInf = std::numeric_limits<float>::infinity();

absl::Status CheckToken(absl::string_view field, int32_t id, int32_t vocab_size) {
  if (id >= 0 && id < vocab_size) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(field, " = ", id, " is out of range [0, ", vocab_size, ")"));
}

absl::Status CheckTokens(absl::string_view field, absl::Span<const int32_t> ids,
                         int32_t vocab_size) {
  for (size_t i = 0; i < ids.size(); ++i) {
    RETURN_IF_ERROR(CheckToken(absl::StrCat(field, "[", i, "]"), ids[i], vocab_size));
  }
  return absl::OkStatus();
}

absl::Status CheckSequences(absl::string_view field, absl::Span<const TokenSequence> seqs,
                            int32_t vocab_size) {
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (seqs[i].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, "[", i, "] must not be empty, got 0 tokens"));
    }
    RETURN_IF_ERROR(CheckTokens(absl::StrCat(field, "[", i, "].token_ids"), seqs[i], vocab_size));
  }
  return absl::OkStatus();
}

}  // namespace

absl::string_view StageName(Stage stage) {
  switch (stage) {
    case Stage::kTopK:
      return "top_k";
    case Stage::kTopP:
      return "top_p";
    case Stage::kMinP:
      return "min_p";
    case Stage::kTypicalP:
      return "typical_p";
    case Stage::kEpsilonCutoff:
      return "epsilon_cutoff";
    case Stage::kEtaCutoff:
      return "eta_cutoff";
    case Stage::kTopNSigma:
      return "top_n_sigma";
    case Stage::kXtc:
      return "xtc";
    case Stage::kTemperature:
      return "temperature";
  }
  return "unknown";
}

absl::Span<const Stage> DefaultStageOrder() { return kDefaultOrder; }

absl::Status ValidateParams(const SamplingParams& p, int32_t vocab_size) {
  RETURN_IF_ERROR(CheckRange("temperature", p.temperature, 0.0f, false, kInf, true));
  if (p.top_k < -1) return Invalid("top_k", ">= -1 (0 or -1 = off)", int64_t{p.top_k});
  RETURN_IF_ERROR(CheckRange("top_p", p.top_p, 0.0f, true, 1.0f, false));
  RETURN_IF_ERROR(CheckRange("min_p", p.min_p, 0.0f, false, 1.0f, false));
  RETURN_IF_ERROR(CheckRange("repetition_penalty", p.repetition_penalty, 0.0f, true, kInf, true));
  RETURN_IF_ERROR(CheckRange("frequency_penalty", p.frequency_penalty, -2.0f, false, 2.0f, false));
  RETURN_IF_ERROR(CheckRange("presence_penalty", p.presence_penalty, -2.0f, false, 2.0f, false));
  for (size_t i = 0; i < p.logit_bias.size(); ++i) {
    const auto& [id, bias] = p.logit_bias[i];
    RETURN_IF_ERROR(CheckToken("logit_bias key", id, vocab_size));
    if (std::isnan(bias) || bias == kInf) {
      return absl::InvalidArgumentError(
          absl::StrCat("logit_bias[", id, "] must be finite or -inf (a ban), got ", bias));
    }
  }
  if (p.logprobs.has_value() && *p.logprobs < -1) {
    return Invalid("logprobs", ">= -1 (-1 = every token with non-zero probability)",
                   int64_t{*p.logprobs});
  }

  RETURN_IF_ERROR(CheckRange("typical_p", p.typical_p, 0.0f, true, 1.0f, false));
  RETURN_IF_ERROR(CheckRange("epsilon_cutoff", p.epsilon_cutoff, 0.0f, false, 1.0f, true));
  RETURN_IF_ERROR(CheckRange("eta_cutoff", p.eta_cutoff, 0.0f, false, 1.0f, true));
  if (p.top_n_sigma.has_value() && !(*p.top_n_sigma > 0.0f && std::isfinite(*p.top_n_sigma))) {
    return Invalid("top_n_sigma", "> 0 and finite (leave it unset to turn it off)", *p.top_n_sigma);
  }
  RETURN_IF_ERROR(CheckRange("xtc_threshold", p.xtc_threshold, 0.0f, false, 1.0f, false));
  RETURN_IF_ERROR(CheckRange("xtc_probability", p.xtc_probability, 0.0f, false, 1.0f, false));
  RETURN_IF_ERROR(CheckRange("dynatemp_range", p.dynatemp_range, 0.0f, false, kInf, true));
  RETURN_IF_ERROR(CheckRange("dynatemp_exponent", p.dynatemp_exponent, 0.0f, true, kInf, true));

  if (p.mirostat_mode < 0 || p.mirostat_mode > 2) {
    return Invalid("mirostat_mode", "0 (off), 1 or 2", int64_t{p.mirostat_mode});
  }
  RETURN_IF_ERROR(CheckRange("mirostat_tau", p.mirostat_tau, 0.0f, true, kInf, true));
  RETURN_IF_ERROR(CheckRange("mirostat_eta", p.mirostat_eta, 0.0f, true, kInf, true));
  if (p.mirostat_mode != 0) {
    // Mirostat replaces truncation and the draw (llama.cpp); a truncation setting next to it
    // would be ignored there. Here it is an error instead of a silent drop.
    const SamplingParams defaults;
    const std::pair<absl::string_view, bool> conflicts[] = {
        {"top_k", p.top_k > 0},
        {"top_p", p.top_p != defaults.top_p},
        {"min_p", p.min_p != defaults.min_p},
        {"typical_p", p.typical_p != defaults.typical_p},
        {"epsilon_cutoff", p.epsilon_cutoff != defaults.epsilon_cutoff},
        {"eta_cutoff", p.eta_cutoff != defaults.eta_cutoff},
        {"top_n_sigma", p.top_n_sigma.has_value()},
        {"xtc_probability", p.xtc_probability != defaults.xtc_probability},
    };
    for (const auto& [name, set] : conflicts) {
      if (set) {
        return absl::InvalidArgumentError(
            absl::StrCat(name, " cannot be combined with mirostat_mode ", p.mirostat_mode,
                         ": mirostat replaces the truncation stages"));
      }
    }
  }

  RETURN_IF_ERROR(CheckRange("dry_multiplier", p.dry_multiplier, 0.0f, false, kInf, true));
  RETURN_IF_ERROR(CheckRange("dry_base", p.dry_base, 1.0f, false, kInf, true));
  if (p.dry_allowed_length < 1) {
    return Invalid("dry_allowed_length", ">= 1", int64_t{p.dry_allowed_length});
  }
  if (p.dry_penalty_last_n < -1) {
    return Invalid("dry_penalty_last_n", ">= -1 (-1 = whole history, 0 = off)",
                   int64_t{p.dry_penalty_last_n});
  }
  RETURN_IF_ERROR(CheckSequences("dry_sequence_breakers", p.dry_sequence_breakers, vocab_size));
  if (p.no_repeat_ngram_size < 0) {
    return Invalid("no_repeat_ngram_size", ">= 0 (0 = off)", int64_t{p.no_repeat_ngram_size});
  }
  if (p.penalty_last_n < 0) {
    return Invalid("penalty_last_n", ">= 0 (0 = whole history)", int64_t{p.penalty_last_n});
  }

  RETURN_IF_ERROR(CheckTokens("allowed_token_ids", p.allowed_token_ids, vocab_size));
  RETURN_IF_ERROR(CheckSequences("bad_words", p.bad_words, vocab_size));
  RETURN_IF_ERROR(CheckTokens("eos_token_ids", p.eos_token_ids, vocab_size));
  if (p.min_tokens < 0) return Invalid("min_tokens", ">= 0", int64_t{p.min_tokens});
  if (!p.token_bitmask.empty()) {
    const size_t expected = (static_cast<size_t>(vocab_size) + 7) / 8;
    if (p.token_bitmask.size() != expected) {
      return absl::InvalidArgumentError(
          absl::StrCat("token_bitmask must be ceil(vocab_size / 8) = ", expected, " bytes, got ",
                       p.token_bitmask.size()));
    }
  }

  if (p.max_tokens.has_value() && *p.max_tokens < 1) {
    return Invalid("max_tokens", ">= 1", int64_t{*p.max_tokens});
  }
  if (p.max_tokens.has_value() && p.min_tokens > *p.max_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("min_tokens must be <= max_tokens (", *p.max_tokens, "), got ", p.min_tokens));
  }
  RETURN_IF_ERROR(CheckTokens("stop_token_ids", p.stop_token_ids, vocab_size));
  RETURN_IF_ERROR(CheckSequences("stop_token_sequences", p.stop_token_sequences, vocab_size));

  if (p.n < 1 || p.n > SamplingParams::kMaxSamples) {
    return Invalid("n", absl::StrCat("in [1, ", SamplingParams::kMaxSamples, "]"), int64_t{p.n});
  }
  if (!p.sampler_order.empty()) {
    // A stage that is configured but left out of a custom order would be dropped silently.
    const std::pair<Stage, bool> configured[] = {
        {Stage::kTopK, p.top_k > 0},
        {Stage::kTopP, p.top_p < 1.0f},
        {Stage::kMinP, p.min_p > 0.0f},
        {Stage::kTypicalP, p.typical_p < 1.0f},
        {Stage::kEpsilonCutoff, p.epsilon_cutoff > 0.0f},
        {Stage::kEtaCutoff, p.eta_cutoff > 0.0f},
        {Stage::kTopNSigma, p.top_n_sigma.has_value()},
        {Stage::kXtc, p.xtc_probability > 0.0f},
    };
    for (const auto& [stage, set] : configured) {
      if (set && std::find(p.sampler_order.begin(), p.sampler_order.end(), stage) ==
                     p.sampler_order.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(StageName(stage), " is set but sampler_order does not list it"));
      }
    }
  }
  for (size_t i = 0; i < p.sampler_order.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (p.sampler_order[i] == p.sampler_order[j]) {
        return absl::InvalidArgumentError(absl::StrCat("sampler_order lists ",
                                                       StageName(p.sampler_order[i]), " twice (at ",
                                                       j, " and ", i, ")"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<SamplingParams> PresetParams(absl::string_view name) {
  SamplingParams p;
  if (name == "greedy" || name == "deterministic") {
    p.temperature = 0.0f;
  } else if (name == "precise" || name == "code") {
    p.temperature = 0.2f;
    p.top_p = 0.1f;
  } else if (name == "balanced" || name == "conversation") {
    p.temperature = 0.7f;
    p.top_p = 0.9f;
    p.repetition_penalty = 1.1f;
  } else if (name == "creative") {
    p.temperature = 1.0f;
    p.min_p = 0.05f;
    p.presence_penalty = 0.3f;
  } else if (name == "brainstorm") {
    p.temperature = 1.3f;
    p.min_p = 0.1f;
    p.presence_penalty = 0.6f;
    p.frequency_penalty = 0.3f;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(
        "preset must be one of greedy, deterministic, precise, code, balanced, conversation, "
        "creative, brainstorm; got \"",
        name, "\""));
  }
  return p;
}

}  // namespace tokensampler
