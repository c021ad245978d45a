#include "core/params.h"

#include <functional>
#include <string>

#include "gtest/gtest.h"

namespace tokensampler {
namespace {

constexpr int32_t kVocab = 100;

struct InvalidCase {
  std::string name;
  std::function<void(SamplingParams&)> mutate;
  std::string message;
};

class ValidateParamsTest : public ::testing::TestWithParam<InvalidCase> {};

TEST_P(ValidateParamsTest, NamesFieldAndValue) {
  SamplingParams p;
  GetParam().mutate(p);
  const absl::Status status = ValidateParams(p, kVocab);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(), GetParam().message);
}

const float kNaN = std::nanf("");
const float kInf = std::numeric_limits<float>::infinity();

INSTANTIATE_TEST_SUITE_P(
    EveryField, ValidateParamsTest,
    ::testing::Values(
        InvalidCase{"temperature_negative", [](auto& p) { p.temperature = -0.5f; },
                    "temperature must be >= 0 and finite, got -0.5"},
        InvalidCase{"temperature_nan", [](auto& p) { p.temperature = kNaN; },
                    "temperature must be >= 0 and finite, got nan"},
        InvalidCase{"temperature_inf", [](auto& p) { p.temperature = kInf; },
                    "temperature must be >= 0 and finite, got inf"},
        InvalidCase{"top_k", [](auto& p) { p.top_k = -2; },
                    "top_k must be >= -1 (0 or -1 = off), got -2"},
        InvalidCase{"top_p_zero", [](auto& p) { p.top_p = 0.0f; },
                    "top_p must be in (0, 1], got 0"},
        InvalidCase{"top_p_big", [](auto& p) { p.top_p = 1.5f; },
                    "top_p must be in (0, 1], got 1.5"},
        InvalidCase{"min_p", [](auto& p) { p.min_p = -0.1f; },
                    "min_p must be in [0, 1], got -0.1"},
        InvalidCase{"repetition_penalty", [](auto& p) { p.repetition_penalty = 0.0f; },
                    "repetition_penalty must be > 0 and finite, got 0"},
        InvalidCase{"frequency_penalty", [](auto& p) { p.frequency_penalty = 2.5f; },
                    "frequency_penalty must be in [-2, 2], got 2.5"},
        InvalidCase{"presence_penalty", [](auto& p) { p.presence_penalty = -3.0f; },
                    "presence_penalty must be in [-2, 2], got -3"},
        InvalidCase{"logit_bias_id", [](auto& p) { p.logit_bias = {{100, 1.0f}}; },
                    "logit_bias key = 100 is out of range [0, 100)"},
        InvalidCase{"logit_bias_nan", [](auto& p) { p.logit_bias = {{3, kNaN}}; },
                    "logit_bias[3] must be finite or -inf (a ban), got nan"},
        InvalidCase{"logprobs", [](auto& p) { p.logprobs = -2; },
                    "logprobs must be >= -1 (-1 = every token with non-zero probability), got -2"},
        InvalidCase{"typical_p", [](auto& p) { p.typical_p = 0.0f; },
                    "typical_p must be in (0, 1], got 0"},
        InvalidCase{"epsilon_cutoff", [](auto& p) { p.epsilon_cutoff = 1.0f; },
                    "epsilon_cutoff must be in [0, 1), got 1"},
        InvalidCase{"eta_cutoff", [](auto& p) { p.eta_cutoff = -0.1f; },
                    "eta_cutoff must be in [0, 1), got -0.1"},
        InvalidCase{"top_n_sigma", [](auto& p) { p.top_n_sigma = 0.0f; },
                    "top_n_sigma must be > 0 and finite (leave it unset to turn it off), got 0"},
        InvalidCase{"xtc_threshold", [](auto& p) { p.xtc_threshold = 1.5f; },
                    "xtc_threshold must be in [0, 1], got 1.5"},
        InvalidCase{"xtc_probability", [](auto& p) { p.xtc_probability = -1.0f; },
                    "xtc_probability must be in [0, 1], got -1"},
        InvalidCase{"dynatemp_range", [](auto& p) { p.dynatemp_range = -1.0f; },
                    "dynatemp_range must be >= 0 and finite, got -1"},
        InvalidCase{"dynatemp_exponent", [](auto& p) { p.dynatemp_exponent = 0.0f; },
                    "dynatemp_exponent must be > 0 and finite, got 0"},
        InvalidCase{"mirostat_mode", [](auto& p) { p.mirostat_mode = 3; },
                    "mirostat_mode must be 0 (off), 1 or 2, got 3"},
        InvalidCase{"mirostat_tau", [](auto& p) { p.mirostat_tau = 0.0f; },
                    "mirostat_tau must be > 0 and finite, got 0"},
        InvalidCase{"mirostat_eta", [](auto& p) { p.mirostat_eta = -1.0f; },
                    "mirostat_eta must be > 0 and finite, got -1"},
        InvalidCase{"mirostat_with_top_p",
                    [](auto& p) {
                      p.mirostat_mode = 2;
                      p.top_p = 0.9f;
                    },
                    "top_p cannot be combined with mirostat_mode 2: mirostat replaces the "
                    "truncation stages"},
        InvalidCase{"dry_multiplier", [](auto& p) { p.dry_multiplier = -0.8f; },
                    "dry_multiplier must be >= 0 and finite, got -0.8"},
        InvalidCase{"dry_base", [](auto& p) { p.dry_base = 0.5f; },
                    "dry_base must be >= 1 and finite, got 0.5"},
        InvalidCase{"dry_allowed_length", [](auto& p) { p.dry_allowed_length = 0; },
                    "dry_allowed_length must be >= 1, got 0"},
        InvalidCase{"dry_penalty_last_n", [](auto& p) { p.dry_penalty_last_n = -2; },
                    "dry_penalty_last_n must be >= -1 (-1 = whole history, 0 = off), got -2"},
        InvalidCase{"dry_breaker_empty", [](auto& p) { p.dry_sequence_breakers = {{1}, {}}; },
                    "dry_sequence_breakers[1] must not be empty, got 0 tokens"},
        InvalidCase{"dry_breaker_id", [](auto& p) { p.dry_sequence_breakers = {{1, 200}}; },
                    "dry_sequence_breakers[0].token_ids[1] = 200 is out of range [0, 100)"},
        InvalidCase{"no_repeat_ngram_size", [](auto& p) { p.no_repeat_ngram_size = -1; },
                    "no_repeat_ngram_size must be >= 0 (0 = off), got -1"},
        InvalidCase{"penalty_last_n", [](auto& p) { p.penalty_last_n = -1; },
                    "penalty_last_n must be >= 0 (0 = whole history), got -1"},
        InvalidCase{"allowed_token_ids", [](auto& p) { p.allowed_token_ids = {1, -1}; },
                    "allowed_token_ids[1] = -1 is out of range [0, 100)"},
        InvalidCase{"bad_words", [](auto& p) { p.bad_words = {{5, 100}}; },
                    "bad_words[0].token_ids[1] = 100 is out of range [0, 100)"},
        InvalidCase{"eos_token_ids", [](auto& p) { p.eos_token_ids = {100}; },
                    "eos_token_ids[0] = 100 is out of range [0, 100)"},
        InvalidCase{"min_tokens", [](auto& p) { p.min_tokens = -1; },
                    "min_tokens must be >= 0, got -1"},
        InvalidCase{"token_bitmask", [](auto& p) { p.token_bitmask = std::string(12, '\xff'); },
                    "token_bitmask must be ceil(vocab_size / 8) = 13 bytes, got 12"},
        InvalidCase{"max_tokens", [](auto& p) { p.max_tokens = 0; },
                    "max_tokens must be >= 1, got 0"},
        InvalidCase{"min_tokens_above_max",
                    [](auto& p) {
                      p.max_tokens = 4;
                      p.min_tokens = 5;
                    },
                    "min_tokens must be <= max_tokens (4), got 5"},
        InvalidCase{"stop_token_ids", [](auto& p) { p.stop_token_ids = {7, 1000}; },
                    "stop_token_ids[1] = 1000 is out of range [0, 100)"},
        InvalidCase{"stop_token_sequences", [](auto& p) { p.stop_token_sequences = {{}}; },
                    "stop_token_sequences[0] must not be empty, got 0 tokens"},
        InvalidCase{"n_zero", [](auto& p) { p.n = 0; }, "n must be in [1, 128], got 0"},
        InvalidCase{"n_big", [](auto& p) { p.n = 129; }, "n must be in [1, 128], got 129"},
        InvalidCase{"sampler_order_twice",
                    [](auto& p) { p.sampler_order = {Stage::kTopK, Stage::kMinP, Stage::kTopK}; },
                    "sampler_order lists top_k twice (at 0 and 2)"},
        InvalidCase{"sampler_order_missing",
                    [](auto& p) {
                      p.top_p = 0.9f;
                      p.sampler_order = {Stage::kTopK};
                    },
                    "top_p is set but sampler_order does not list it"}),
    [](const auto& test_info) { return test_info.param.name; });

TEST(ValidateParamsTest, DefaultsAndBoundariesAreValid) {
  SamplingParams p;
  EXPECT_TRUE(ValidateParams(p, kVocab).ok());
  p.temperature = 0.0f;
  p.top_k = -1;
  p.top_p = 1.0f;
  p.min_p = 1.0f;
  p.frequency_penalty = -2.0f;
  p.presence_penalty = 2.0f;
  p.logprobs = -1;
  p.logit_bias = {{0, -std::numeric_limits<float>::infinity()}, {99, 100.0f}};
  p.token_bitmask = std::string(13, '\x01');
  p.dry_base = 1.0f;
  p.sampler_order = {Stage::kMinP, Stage::kTemperature};
  EXPECT_TRUE(ValidateParams(p, kVocab).ok()) << ValidateParams(p, kVocab);
}

TEST(PresetTest, KnownPresetsValidateAndAliasesMatch) {
  for (const char* name : {"greedy", "deterministic", "precise", "code", "balanced", "conversation",
                           "creative", "brainstorm"}) {
    auto p = PresetParams(name);
    ASSERT_TRUE(p.ok()) << name;
    EXPECT_TRUE(ValidateParams(*p, kVocab).ok()) << name;
  }
  EXPECT_TRUE(PresetParams("greedy")->greedy());
  EXPECT_EQ(PresetParams("code")->top_p, PresetParams("precise")->top_p);
  EXPECT_EQ(PresetParams("conversation")->temperature, PresetParams("balanced")->temperature);
}

TEST(PresetTest, UnknownPresetListsNames) {
  auto p = PresetParams("wild");
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find("got \"wild\""), std::string::npos);
  EXPECT_NE(p.status().message().find("brainstorm"), std::string::npos);
}

}  // namespace
}  // namespace tokensampler
