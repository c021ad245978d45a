// Sampling parameters as core values, their validation, and the named presets.
// All types here are plain values: thread-compatible.
#ifndef TOKENSAMPLER_CORE_PARAMS_H_
#define TOKENSAMPLER_CORE_PARAMS_H_

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace tokensampler {

// What `logprob` / `top_logprobs` report (vLLM's logprobs_mode).
enum class LogprobsMode : uint8_t {
  kRawLogprobs,
  kProcessedLogprobs,
  kRawLogits,
  kProcessedLogits
};

// A reorderable stage of step 4–5 of the pipeline (llama.cpp's --samplers).
enum class Stage : uint8_t {
  kTopK,
  kTopP,
  kMinP,
  kTypicalP,
  kEpsilonCutoff,
  kEtaCutoff,
  kTopNSigma,
  kXtc,
  kTemperature,
};
absl::string_view StageName(Stage stage);

// The default order: temperature, then truncation as DESIGN.md lists it.
absl::Span<const Stage> DefaultStageOrder();

using TokenSequence = std::vector<int32_t>;

// Per-row sampling parameters. Field names, meanings and defaults equal the proto's
// `SamplingParams` (vLLM for the core, llama.cpp for DRY / XTC / mirostat / top_n_sigma /
// dynatemp, HF for typical / epsilon / eta / no_repeat_ngram).
struct SamplingParams {
  // vLLM core.
  float temperature = 1.0f;
  int32_t top_k = 0;  // 0 or -1 = off
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float frequency_penalty = 0.0f;
  float presence_penalty = 0.0f;
  std::optional<uint64_t> seed;
  std::vector<std::pair<int32_t, float>> logit_bias;  // sorted by token id, unique
  std::optional<int32_t> logprobs;                    // -1 = every non-zero token
  LogprobsMode logprobs_mode = LogprobsMode::kRawLogprobs;

  // Truncation and shaping.
  float typical_p = 1.0f;
  float epsilon_cutoff = 0.0f;
  float eta_cutoff = 0.0f;
  std::optional<float> top_n_sigma;
  float xtc_threshold = 0.1f;
  float xtc_probability = 0.0f;
  float dynatemp_range = 0.0f;
  float dynatemp_exponent = 1.0f;

  // Mirostat.
  int32_t mirostat_mode = 0;
  float mirostat_tau = 5.0f;
  float mirostat_eta = 0.1f;

  // Repetition.
  float dry_multiplier = 0.0f;
  float dry_base = 1.75f;
  int32_t dry_allowed_length = 2;
  int32_t dry_penalty_last_n = -1;
  std::vector<TokenSequence> dry_sequence_breakers;
  int32_t no_repeat_ngram_size = 0;
  int32_t penalty_last_n = 0;

  // Masks.
  std::vector<int32_t> allowed_token_ids;
  std::vector<TokenSequence> bad_words;
  std::vector<int32_t> eos_token_ids;
  int32_t min_tokens = 0;
  bool ignore_eos = false;
  std::string token_bitmask;  // empty = off; else ceil(V/8) bytes, bit i (LSB first) = token i

  // Stopping.
  std::optional<int32_t> max_tokens;
  std::vector<int32_t> stop_token_ids;
  std::vector<TokenSequence> stop_token_sequences;

  // Samples and order.
  int32_t n = 1;
  std::vector<Stage> sampler_order;  // empty = DefaultStageOrder()

  // True when the row is sampled greedily (temperature below vLLM's 1e-5 epsilon).
  bool greedy() const { return temperature < kGreedyTemperature; }
  static constexpr float kGreedyTemperature = 1e-5f;
  static constexpr int32_t kMaxSamples = 128;
};

// Checks every field against its range for a vocabulary of `vocab_size` tokens.
// Returns OK or INVALID_ARGUMENT whose message names the field and the value, e.g.
// "top_p must be in (0, 1], got 1.5" (the caller prefixes the row: "rows[3].params.").
absl::Status ValidateParams(const SamplingParams& params, int32_t vocab_size);

// The named presets (README "Presets"): "greedy" (alias "deterministic"), "precise" ("code"),
// "balanced" ("conversation"), "creative", "brainstorm". Returns the preset's parameters, or
// INVALID_ARGUMENT listing the known names.
absl::StatusOr<SamplingParams> PresetParams(absl::string_view name);

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_PARAMS_H_
