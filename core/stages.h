// Internal: the pipeline stages. Each is a small value with one Apply over a row's logits
// (llama.cpp's llama_sampler_i); the Sampler builds them from a row's SamplingParams and runs
// them in DESIGN.md's order. A removed token is set to -inf; every truncation stage keeps at
// least one token. Stages are thread-compatible values; scratch comes from the caller.
//
// Tie policy: a threshold stage keeps every token tied with the last one it must keep (top_k
// keeps all tokens ≥ the k-th largest, as vLLM and HF do; top_p / typical_p likewise), so no
// result depends on how tokens are ordered.
#ifndef TOKENSAMPLER_CORE_STAGES_H_
#define TOKENSAMPLER_CORE_STAGES_H_

#include <cstdint>

#include "absl/types/span.h"
#include "core/params.h"
#include "core/row.h"

namespace tokensampler {

// --- Step 1: masks and biases -------------------------------------------------------------

// allowed_token_ids, bad_words, min_tokens (EOS / stop ids masked), token_bitmask, logit_bias.
struct MaskAndBias {
  const SamplingParams& params;
  absl::Span<const int32_t> output;
  void Apply(absl::Span<float> logits, RowScratch& scratch) const;
};

// --- Step 2: penalties --------------------------------------------------------------------

// vLLM's repetition (prompt ∪ output), frequency and presence (output) penalties over the last
// penalty_last_n tokens of the history (0 = all). O(history).
struct Penalties {
  const SamplingParams& params;
  absl::Span<const int32_t> prompt;
  absl::Span<const int32_t> output;
  void Apply(absl::Span<float> logits, RowScratch& scratch) const;
};

// llama.cpp's DRY ("don't repeat yourself") over prompt ∪ output. O(history · breakers).
struct Dry {
  const SamplingParams& params;
  absl::Span<const int32_t> prompt;
  absl::Span<const int32_t> output;
  void Apply(absl::Span<float> logits, RowScratch& scratch) const;
};

// HF's no_repeat_ngram_size over prompt ∪ output: bans every token that would repeat an n-gram.
struct NoRepeatNgram {
  int32_t size;
  absl::Span<const int32_t> prompt;
  absl::Span<const int32_t> output;
  void Apply(absl::Span<float> logits) const;
};

// --- Step 4: temperature ------------------------------------------------------------------

// Divides by `temperature`, or with range > 0 by llama.cpp's entropy-scaled dynamic
// temperature in [T − range, T + range]. REQUIRES: temperature ≥ kGreedyTemperature.
struct Temperature {
  float temperature;
  float range;
  float exponent;
  void Apply(absl::Span<float> logits, RowScratch& scratch) const;
};

// --- Step 5: truncation -------------------------------------------------------------------

struct TopK {
  int32_t k;  // ≤ 0 = off
  void Apply(absl::Span<float> logits, RowScratch& scratch) const;
};
struct TopP {
  float p;  // smallest set with mass ≥ p
  void Apply(absl::Span<float> logits, RowScratch& scratch) const;
};
struct MinP {
  float min_p;  // keep p ≥ min_p · p_max
  void Apply(absl::Span<float> logits) const;
};
struct TypicalP {
  float mass;  // HF locally typical sampling
  void Apply(absl::Span<float> logits, RowScratch& scratch) const;
};
struct EpsilonCutoff {
  float epsilon;  // keep p ≥ ε (or the most likely token)
  void Apply(absl::Span<float> logits, RowScratch& scratch) const;
};
struct EtaCutoff {
  float eta;  // keep p ≥ min(η, √η · e^−H) (or the most likely token)
  void Apply(absl::Span<float> logits, RowScratch& scratch) const;
};
struct TopNSigma {
  float n;  // keep l ≥ max − n·σ, σ the population std of the kept logits
  void Apply(absl::Span<float> logits) const;
};
// With probability `probability` (coin < probability), removes every token with p ≥ threshold
// except the least likely of them (all tied at that probability stay).
struct Xtc {
  float threshold;
  float probability;
  double coin;  // uniform [0, 1)
  void Apply(absl::Span<float> logits, RowScratch& scratch) const;
};

// --- Step 6: mirostat ---------------------------------------------------------------------

// llama.cpp's mirostat v1 (mode 1, m = 100) and v2 (mode 2): truncates by the target surprise
// `mu`, draws with `coin`, and returns the token and the updated μ. Removed tokens are -inf in
// `logits` afterwards, so processed logprobs describe the truncated distribution.
struct Mirostat {
  int32_t mode;
  float tau;
  float eta;
  float mu;
  int32_t vocab_size;
  struct Result {
    int32_t token;
    float mu;
  };
  Result Apply(absl::Span<float> logits, double coin, RowScratch& scratch) const;

  // The parts of Apply, shared with the fast pipeline:
  // v1: how many tokens stay, given the largest (up to 100) kept logits in descending order and
  // the number n of kept tokens.
  size_t KeepV1(absl::Span<const float> top, size_t n) const;
  // v2: whether a token of logit l stays, given the kept set's max and log2 of its weight sum
  // (the most likely token stays even when this is false for it).
  bool KeepV2(float l, float max, double log2_total) const;
  // Draws among the kept tokens of `logits` (removed ones −inf) and updates μ.
  Result DrawKept(absl::Span<const float> logits, double coin, RowScratch& scratch) const;
};

// Draws from softmax(logits) with `coin` by inverse CDF in token-id order.
int32_t Draw(absl::Span<const float> logits, double coin, RowScratch& scratch);

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_STAGES_H_
