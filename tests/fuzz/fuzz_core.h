// What the core fuzz targets share: sampling parameters and logits rows made from fuzz input,
// and the exact comparison of two samplers' results (the fast Sampler against the
// ReferenceSampler oracle).
//
// Thread-compatible.
#ifndef TOKENSAMPLER_TESTS_FUZZ_FUZZ_CORE_H_
#define TOKENSAMPLER_TESTS_FUZZ_FUZZ_CORE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/params.h"
#include "core/sampler.h"
#include "core/tensor.h"
#include "tests/fuzz/fuzz_support.h"
#include "tests/testing/core_testing.h"

namespace tokensampler::fuzzing {

// A token id: usually in [0, vocab), sometimes just outside (the validation's boundaries).
inline int32_t FuzzToken(FuzzInput& in, int32_t vocab) {
  if (in.Percent(3)) return in.OneOf<int32_t>({-1, vocab, vocab + 1, INT32_MAX, INT32_MIN});
  return in.IntegralInRange<int32_t>(0, vocab - 1);
}

inline std::vector<int32_t> FuzzTokens(FuzzInput& in, int32_t vocab, size_t max_len) {
  std::vector<int32_t> out(in.IntegralInRange<size_t>(0, max_len));
  for (int32_t& t : out) t = FuzzToken(in, vocab);
  return out;
}

inline std::vector<TokenSequence> FuzzSequences(FuzzInput& in, int32_t vocab) {
  std::vector<TokenSequence> out(in.IntegralInRange<size_t>(0, 3));
  for (TokenSequence& s : out) s = FuzzTokens(in, vocab, 4);
  return out;
}

// A float parameter: mostly from `typical` (in range), sometimes any float (NaN, ±Inf, ...).
inline float FuzzParam(FuzzInput& in, std::initializer_list<float> typical) {
  return in.Percent(6) ? in.Float() : in.OneOf(typical);
}

// Parameters for a vocabulary of `vocab` tokens: every field may be set; most values are in
// range, some are not (the caller validates). Always seeded: the oracle needs reproducible
// draws, and an unseeded row draws fresh entropy. Only the groups in `allowed_groups` (bits as
// below) may be set.
inline SamplingParams FuzzParams(FuzzInput& in, int32_t vocab, uint32_t allowed_groups = ~0u) {
  SamplingParams p;
  p.seed = in.Integral<uint64_t>();
  // One byte of flags picks which groups are set; each group consumes its own bytes.
  const uint32_t groups = in.Integral<uint32_t>() & allowed_groups;
  const auto on = [groups](int bit) { return ((groups >> bit) & 1u) != 0; };
  if (on(0)) p.temperature = FuzzParam(in, {0.0f, 1e-6f, 0.3f, 0.8f, 1.0f, 1.7f, 40.0f});
  if (on(1)) p.top_k = in.OneOf<int32_t>({-2, -1, 0, 1, 2, 5, 50, 1000, vocab, vocab + 1});
  if (on(2)) p.top_p = FuzzParam(in, {1e-6f, 0.1f, 0.5f, 0.9f, 0.95f, 0.999f, 1.0f});
  if (on(3)) p.min_p = FuzzParam(in, {0.0f, 1e-6f, 0.01f, 0.05f, 0.2f, 0.99f, 1.0f});
  if (on(4)) {
    p.repetition_penalty = FuzzParam(in, {0.5f, 1.0f, 1.2f, 3.0f});
    p.frequency_penalty = FuzzParam(in, {-2.0f, -0.5f, 0.0f, 0.5f, 2.0f});
    p.presence_penalty = FuzzParam(in, {-2.0f, 0.0f, 0.3f, 2.0f});
    p.penalty_last_n = in.OneOf<int32_t>({0, 1, 3, 64});
  }
  if (on(5)) {
    const size_t n = in.IntegralInRange<size_t>(1, 4);
    for (size_t i = 0; i < n; ++i) {
      p.logit_bias.emplace_back(FuzzToken(in, vocab),
                                FuzzParam(in, {-INFINITY, -100.0f, -1.0f, 2.5f, 100.0f}));
    }
    std::sort(p.logit_bias.begin(), p.logit_bias.end());
    p.logit_bias.erase(std::unique(p.logit_bias.begin(), p.logit_bias.end(),
                                   [](const auto& a, const auto& b) { return a.first == b.first; }),
                       p.logit_bias.end());
  }
  if (on(6)) {
    p.logprobs = in.OneOf<int32_t>({-2, -1, 0, 1, 5, 20});
    p.logprobs_mode = in.OneOf({LogprobsMode::kRawLogprobs, LogprobsMode::kProcessedLogprobs,
                                LogprobsMode::kRawLogits, LogprobsMode::kProcessedLogits});
  }
  if (on(7)) p.typical_p = FuzzParam(in, {0.2f, 0.9f, 0.99f, 1.0f});
  if (on(8)) p.epsilon_cutoff = FuzzParam(in, {0.0f, 3e-5f, 3e-4f, 0.2f, 1.0f});
  if (on(9)) p.eta_cutoff = FuzzParam(in, {0.0f, 2e-4f, 1e-3f, 0.5f});
  if (on(10)) p.top_n_sigma = FuzzParam(in, {0.1f, 0.5f, 1.0f, 2.5f, 100.0f});
  if (on(11)) {
    p.xtc_probability = FuzzParam(in, {0.0f, 0.5f, 1.0f});
    p.xtc_threshold = FuzzParam(in, {0.0f, 0.05f, 0.1f, 0.3f, 0.5f, 1.0f});
  }
  if (on(12)) {
    p.dynatemp_range = FuzzParam(in, {0.0f, 0.5f, 1.0f, 5.0f});
    p.dynatemp_exponent = FuzzParam(in, {0.5f, 1.0f, 2.0f});
  }
  if (on(13)) {
    p.mirostat_mode = in.OneOf<int32_t>({0, 1, 2, 3});
    p.mirostat_tau = FuzzParam(in, {0.5f, 2.0f, 5.0f, 8.0f});
    p.mirostat_eta = FuzzParam(in, {0.01f, 0.1f, 1.0f});
  }
  if (on(14)) {
    p.dry_multiplier = FuzzParam(in, {0.0f, 0.8f, 2.0f});
    p.dry_base = FuzzParam(in, {1.0f, 1.75f, 3.0f});
    p.dry_allowed_length = in.OneOf<int32_t>({0, 1, 2, 4});
    p.dry_penalty_last_n = in.OneOf<int32_t>({-2, -1, 0, 3, 64});
    p.dry_sequence_breakers = FuzzSequences(in, vocab);
  }
  if (on(15)) p.no_repeat_ngram_size = in.OneOf<int32_t>({-1, 0, 1, 2, 3});
  if (on(16)) p.allowed_token_ids = FuzzTokens(in, vocab, 6);
  if (on(17)) p.bad_words = FuzzSequences(in, vocab);
  if (on(18)) {
    p.eos_token_ids = FuzzTokens(in, vocab, 3);
    p.min_tokens = in.OneOf<int32_t>({-1, 0, 1, 3, 100});
    p.ignore_eos = in.Bool();
  }
  if (on(19)) {
    // Usually the right size, sometimes not; bits from the input (zeros when it runs out).
    // The input's bytes start the mask; the rest allows every token.
    const size_t bytes = (static_cast<size_t>(vocab) + 7) / 8 + (in.Percent(5) ? 1 : 0);
    const std::string head = in.Bytes(in.IntegralInRange<size_t>(0, 16));
    p.token_bitmask.assign(bytes, '\xff');
    p.token_bitmask.replace(0, std::min(head.size(), bytes), head, 0, std::min(head.size(), bytes));
  }
  if (on(20)) p.max_tokens = in.OneOf<int32_t>({0, 1, 2, 5, 100});
  if (on(21)) {
    p.stop_token_ids = FuzzTokens(in, vocab, 3);
    p.stop_token_sequences = FuzzSequences(in, vocab);
  }
  if (on(22)) p.n = in.OneOf<int32_t>({0, 1, 2, 3, 8, 129});
  if (on(23)) {
    constexpr Stage kAll[] = {Stage::kTopK,      Stage::kTopP,          Stage::kMinP,
                              Stage::kTypicalP,  Stage::kEpsilonCutoff, Stage::kEtaCutoff,
                              Stage::kTopNSigma, Stage::kXtc,           Stage::kTemperature};
    const size_t n = in.IntegralInRange<size_t>(1, 10);
    for (size_t i = 0; i < n; ++i) p.sampler_order.push_back(kAll[in.IntegralInRange(0, 8)]);
  }
  return p;
}

// A [rows × vocab] tensor of `dtype` bytes: a bulk from a seeded generator (normal-ish,
// constant, ties or masked, at a scale from 1e-30 to 1e30), then up to 16 positions overwritten
// with fuzz floats (NaN, ±Inf, denormals, extremes, raw bits).
inline std::vector<uint8_t> FuzzLogits(FuzzInput& in, DType dtype, int rows, int32_t vocab) {
  const size_t count = static_cast<size_t>(rows) * static_cast<size_t>(vocab);
  std::vector<float> values(count);
  SplitMix gen(in.Integral<uint64_t>());
  const float scale = in.OneOf({1.0f, 2.5f, 1e-30f, 1e-3f, 30.0f, 1e30f});
  const uint8_t shape = in.Integral<uint8_t>() % 4;
  for (float& x : values) {
    // Sum of uniforms: a cheap bell curve.
    const double u = gen.Uniform() + gen.Uniform() + gen.Uniform() - 1.5;
    switch (shape) {
      case 0:
        x = static_cast<float>(u * 2.0) * scale;
        break;
      case 1:
        x = scale;
        break;
      case 2:
        x = std::round(static_cast<float>(u * 4.0)) * scale;
        break;
      default:
        x = gen.Uniform() < 0.8 ? -INFINITY : static_cast<float>(u) * scale;
        break;
    }
  }
  const size_t patches = in.IntegralInRange<size_t>(0, 16);
  for (size_t i = 0; i < patches; ++i) {
    values[in.IntegralInRange<size_t>(0, count - 1)] = in.Percent(70) ? in.Float() : 40.0f;
  }
  return dtype == DType::kFloat32 ? testing::F32Bytes(values) : testing::Half16Bytes(values, dtype);
}

inline bool SameFloat(float a, float b) { return a == b || (std::isnan(a) && std::isnan(b)); }

// Aborts unless both runs ended alike: the same status (code and message), or the same results
// bit for bit (tokens, logprobs, top lists, finish reasons and their stops, μ).
inline void CheckSameResults(const absl::StatusOr<std::vector<SampledToken>>& fast,
                             const absl::StatusOr<std::vector<SampledToken>>& ref) {
  FUZZ_CHECK(fast.ok() == ref.ok(), "fast: %s / reference: %s", fast.status().ToString().c_str(),
             ref.status().ToString().c_str());
  if (!fast.ok()) {
    FUZZ_CHECK(fast.status() == ref.status(), "fast: %s / reference: %s",
               fast.status().ToString().c_str(), ref.status().ToString().c_str());
    return;
  }
  FUZZ_CHECK(fast->size() == ref->size(), "%zu vs %zu results", fast->size(), ref->size());
  for (size_t i = 0; i < fast->size(); ++i) {
    const SampledToken& a = (*fast)[i];
    const SampledToken& b = (*ref)[i];
    FUZZ_CHECK(a.token_id == b.token_id, "result %zu: token %d vs reference %d", i, a.token_id,
               b.token_id);
    FUZZ_CHECK(SameFloat(a.logprob, b.logprob), "result %zu: logprob %.9g vs reference %.9g", i,
               static_cast<double>(a.logprob), static_cast<double>(b.logprob));
    FUZZ_CHECK(a.finish_reason == b.finish_reason && a.stop_token_id == b.stop_token_id &&
                   a.stop_sequence_index == b.stop_sequence_index,
               "result %zu: finish differs", i);
    FUZZ_CHECK(a.row_index == b.row_index && a.sample_index == b.sample_index,
               "result %zu: indexes differ", i);
    FUZZ_CHECK(a.mirostat_mu.has_value() == b.mirostat_mu.has_value() &&
                   (!a.mirostat_mu || SameFloat(*a.mirostat_mu, *b.mirostat_mu)),
               "result %zu: mirostat mu %.9g vs reference %.9g", i,
               static_cast<double>(a.mirostat_mu.value_or(-1)),
               static_cast<double>(b.mirostat_mu.value_or(-1)));
    FUZZ_CHECK(a.top_logprobs.size() == b.top_logprobs.size(),
               "result %zu: %zu top logprobs vs reference %zu", i, a.top_logprobs.size(),
               b.top_logprobs.size());
    for (size_t j = 0; j < a.top_logprobs.size(); ++j) {
      FUZZ_CHECK(a.top_logprobs[j].token_id == b.top_logprobs[j].token_id &&
                     SameFloat(a.top_logprobs[j].logprob, b.top_logprobs[j].logprob),
                 "result %zu top #%zu: %d:%.9g vs reference %d:%.9g", i, j,
                 a.top_logprobs[j].token_id, static_cast<double>(a.top_logprobs[j].logprob),
                 b.top_logprobs[j].token_id, static_cast<double>(b.top_logprobs[j].logprob));
    }
  }
}

// Invariants of any successful result for `vocab` tokens: ids in range, no NaN logprob.
inline void CheckResultInvariants(const std::vector<SampledToken>& tokens, int32_t vocab) {
  for (const SampledToken& t : tokens) {
    FUZZ_CHECK(t.token_id >= 0 && t.token_id < vocab, "token %d of vocab %d", t.token_id, vocab);
    FUZZ_CHECK(!std::isnan(t.logprob), "NaN logprob for token %d", t.token_id);
    for (const TokenLogprob& top : t.top_logprobs) {
      FUZZ_CHECK(top.token_id >= 0 && top.token_id < vocab, "top token %d of vocab %d",
                 top.token_id, vocab);
      FUZZ_CHECK(!std::isnan(top.logprob), "NaN top logprob for token %d", top.token_id);
    }
  }
}

}  // namespace tokensampler::fuzzing

#endif  // TOKENSAMPLER_TESTS_FUZZ_FUZZ_CORE_H_
