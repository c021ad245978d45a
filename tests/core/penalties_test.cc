// Steps 1–2: masks, biases and penalties, checked on the processed logits (temperature 1).
#include <limits>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/core_testing.h"

namespace tokensampler {
namespace {

using ::testing::ElementsAre;
using ::testing::FloatEq;
using ::tokensampler::testing::ProcessedLogits;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

TEST(RepetitionPenaltyTest, DividesPositiveMultipliesNegative) {
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  // Token 0 (positive) is in the prompt, token 1 (negative) in the output, 2 and 3 unseen.
  EXPECT_THAT(ProcessedLogits({2.0f, -2.0f, 1.0f, 0.5f}, p, {0}, {1}),
              ElementsAre(FloatEq(1.0f), FloatEq(-4.0f), FloatEq(1.0f), FloatEq(0.5f)));
}

TEST(RepetitionPenaltyTest, BelowOneEncouragesRepeats) {
  SamplingParams p;
  p.repetition_penalty = 0.5f;
  EXPECT_THAT(ProcessedLogits({2.0f, -2.0f, 0.0f}, p, {0, 1, 2}, {}),
              ElementsAre(FloatEq(4.0f), FloatEq(-1.0f), FloatEq(0.0f)));
}

TEST(FrequencyPresenceTest, CountOutputOnly) {
  SamplingParams p;
  p.frequency_penalty = 0.5f;
  p.presence_penalty = 0.25f;
  // Token 0 only in the prompt: untouched. Token 2 twice, token 3 once in the output.
  EXPECT_THAT(ProcessedLogits({1.0f, 1.0f, 1.0f, 0.5f}, p, {0}, {2, 2, 3}),
              ElementsAre(FloatEq(1.0f), FloatEq(1.0f), FloatEq(-0.25f), FloatEq(-0.25f)));
}

TEST(FrequencyPresenceTest, NegativeValuesEncourage) {
  SamplingParams p;
  p.frequency_penalty = -1.0f;
  p.presence_penalty = -0.5f;
  EXPECT_THAT(ProcessedLogits({0.0f, 0.0f}, p, {}, {1, 1, 1}),
              ElementsAre(FloatEq(0.0f), FloatEq(3.5f)));
}

TEST(PenaltiesTest, RepetitionThenFrequencyThenPresence) {
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  p.frequency_penalty = 0.5f;
  p.presence_penalty = 0.25f;
  // Token 2: 1 / 2 − 0.5·2 − 0.25 = −0.75. Token 3: 0.5 / 2 − 0.5 − 0.25 = −0.5.
  EXPECT_THAT(ProcessedLogits({1.0f, 1.0f, 1.0f, 0.5f}, p, {0}, {2, 2, 3}),
              ElementsAre(FloatEq(0.5f), FloatEq(1.0f), FloatEq(-0.75f), FloatEq(-0.5f)));
}

TEST(PenaltiesTest, PenaltyLastNWindow) {
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  p.frequency_penalty = 1.0f;
  p.penalty_last_n = 2;
  // History 0 1 | 2 3 3: the window is the last two tokens (3 3).
  EXPECT_THAT(ProcessedLogits({4.0f, 4.0f, 4.0f, 4.0f}, p, {0, 1}, {2, 3, 3}),
              ElementsAre(FloatEq(4.0f), FloatEq(4.0f), FloatEq(4.0f), FloatEq(0.0f)));
  p.penalty_last_n = 4;  // window 1 | 2 3 3: prompt token 1 gets repetition only
  EXPECT_THAT(ProcessedLogits({4.0f, 4.0f, 4.0f, 4.0f}, p, {0, 1}, {2, 3, 3}),
              ElementsAre(FloatEq(4.0f), FloatEq(2.0f), FloatEq(1.0f), FloatEq(0.0f)));
}

TEST(MasksTest, AllowedTokenIds) {
  SamplingParams p;
  p.allowed_token_ids = {1, 3};
  EXPECT_THAT(ProcessedLogits({1.0f, 2.0f, 3.0f, 4.0f}, p),
              ElementsAre(kNegInf, FloatEq(2.0f), kNegInf, FloatEq(4.0f)));
}

TEST(MasksTest, BadWordsSingleAndMultiToken) {
  SamplingParams p;
  p.bad_words = {{2}, {0, 3}, {1, 1, 0}};
  // Output ends with 0: "0 3" bans 3; "1 1 0" needs the output to end with "1 1".
  EXPECT_THAT(ProcessedLogits({1.0f, 1.0f, 1.0f, 1.0f}, p, {1, 1}, {0}),
              ElementsAre(FloatEq(1.0f), FloatEq(1.0f), kNegInf, kNegInf));
  EXPECT_THAT(ProcessedLogits({1.0f, 1.0f, 1.0f, 1.0f}, p, {}, {1, 1}),
              ElementsAre(kNegInf, FloatEq(1.0f), kNegInf, FloatEq(1.0f)));
}

TEST(MasksTest, MinTokensMasksEosAndStopIds) {
  SamplingParams p;
  p.min_tokens = 2;
  p.eos_token_ids = {0};
  p.stop_token_ids = {1};
  EXPECT_THAT(ProcessedLogits({1.0f, 1.0f, 1.0f}, p, {}, {2}),
              ElementsAre(kNegInf, kNegInf, FloatEq(1.0f)));
  // Two output tokens already: nothing masked.
  EXPECT_THAT(ProcessedLogits({1.0f, 1.0f, 1.0f}, p, {}, {2, 2}),
              ElementsAre(FloatEq(1.0f), FloatEq(1.0f), FloatEq(1.0f)));
  p.ignore_eos = true;  // EOS is an ordinary token then
  EXPECT_THAT(ProcessedLogits({1.0f, 1.0f, 1.0f}, p, {}, {2}),
              ElementsAre(FloatEq(1.0f), kNegInf, FloatEq(1.0f)));
}

TEST(MasksTest, TokenBitmask) {
  SamplingParams p;
  // V = 10: bits 0, 2 of byte 0 and bit 1 of byte 1 (token 9).
  p.token_bitmask = std::string("\x05\x02", 2);
  const std::vector<float> logits(10, 1.0f);
  const std::vector<float> got = ProcessedLogits(logits, p);
  for (int i = 0; i < 10; ++i) {
    if (i == 0 || i == 2 || i == 9) {
      EXPECT_EQ(got[static_cast<size_t>(i)], 1.0f) << i;
    } else {
      EXPECT_EQ(got[static_cast<size_t>(i)], kNegInf) << i;
    }
  }
}

TEST(MasksTest, LogitBiasAddsAndBans) {
  SamplingParams p;
  p.logit_bias = {{0, 3.0f}, {1, kNegInf}, {2, -0.5f}};
  EXPECT_THAT(ProcessedLogits({1.0f, std::numeric_limits<float>::infinity(), 1.0f}, p),
              ElementsAre(FloatEq(4.0f), kNegInf, FloatEq(0.5f)));
}

TEST(MasksTest, BiasAfterMasksCannotUnmask) {
  SamplingParams p;
  p.allowed_token_ids = {0};
  p.logit_bias = {{1, 100.0f}};
  EXPECT_THAT(ProcessedLogits({1.0f, 1.0f}, p), ElementsAre(FloatEq(1.0f), kNegInf));
}

// llama.cpp's own example: context "a b c c b c y a b c" (a=0 b=1 c=2 y=3). Emitting c would
// extend "a b c" (length 3), y would extend "b c" (2), b would extend "c" (1 < allowed 2).
TEST(DryTest, PenalisesTokensThatExtendRepeats) {
  SamplingParams p;
  p.dry_multiplier = 0.8f;
  p.dry_base = 1.75f;
  p.dry_allowed_length = 2;
  const std::vector<int32_t> prompt = {0, 1, 2, 2, 1};
  const std::vector<int32_t> output = {2, 3, 0, 1, 2};
  EXPECT_THAT(
      ProcessedLogits({0.0f, 0.0f, 0.0f, 0.0f, 0.0f}, p, prompt, output),
      ElementsAre(FloatEq(0.0f), FloatEq(0.0f), FloatEq(-1.4f), FloatEq(-0.8f), FloatEq(0.0f)));
}

TEST(DryTest, SequenceBreakersLimitAndExempt) {
  SamplingParams p;
  p.dry_multiplier = 0.8f;
  const std::vector<int32_t> prompt = {0, 1, 2, 2, 1, 2, 3, 0, 1, 2};
  // y (3) as a breaker: repeats may not reach past it (limit 3 ≥ "a b c"), and y itself is exempt.
  p.dry_sequence_breakers = {{3}};
  EXPECT_THAT(ProcessedLogits({0.0f, 0.0f, 0.0f, 0.0f}, p, prompt, {}),
              ElementsAre(FloatEq(0.0f), FloatEq(0.0f), FloatEq(-1.4f), FloatEq(0.0f)));
  // a (0) as a breaker: only "b c" may repeat: c and y both get length 2 → 0.8.
  p.dry_sequence_breakers = {{0}};
  EXPECT_THAT(ProcessedLogits({0.0f, 0.0f, 0.0f, 0.0f}, p, prompt, {}),
              ElementsAre(FloatEq(0.0f), FloatEq(0.0f), FloatEq(-0.8f), FloatEq(-0.8f)));
  // A two-token breaker "y a" matches at the end region too.
  p.dry_sequence_breakers = {{3, 0}};
  EXPECT_THAT(ProcessedLogits({0.0f, 0.0f, 0.0f, 0.0f}, p, prompt, {}),
              ElementsAre(FloatEq(0.0f), FloatEq(0.0f), FloatEq(-0.8f), FloatEq(-0.8f)));
}

TEST(DryTest, WindowAndOff) {
  SamplingParams p;
  p.dry_multiplier = 1.0f;
  const std::vector<int32_t> prompt = {0, 1, 2, 2, 1, 2, 3, 0, 1, 2};
  p.dry_penalty_last_n = 0;  // off
  EXPECT_THAT(ProcessedLogits({0.0f, 0.0f, 0.0f, 0.0f}, p, prompt, {}),
              ElementsAre(FloatEq(0.0f), FloatEq(0.0f), FloatEq(0.0f), FloatEq(0.0f)));
  p.dry_penalty_last_n = 4;  // window "y a b c": no earlier repeat inside it
  EXPECT_THAT(ProcessedLogits({0.0f, 0.0f, 0.0f, 0.0f}, p, prompt, {}),
              ElementsAre(FloatEq(0.0f), FloatEq(0.0f), FloatEq(0.0f), FloatEq(0.0f)));
}

TEST(DryTest, LongRepeatGrowsExponentially) {
  SamplingParams p;
  p.dry_multiplier = 1.0f;
  p.dry_base = 2.0f;
  // 5 6 7 8 9 5 6 7 8: emitting 9 would extend a repeat of length 4 → 2^(4−2) = 4.
  EXPECT_THAT(
      ProcessedLogits(std::vector<float>(10, 0.0f), p, {5, 6, 7, 8, 9, 5, 6, 7, 8}, {}),
      ElementsAre(FloatEq(0.0f), FloatEq(0.0f), FloatEq(0.0f), FloatEq(0.0f), FloatEq(0.0f),
                  FloatEq(0.0f), FloatEq(0.0f), FloatEq(0.0f), FloatEq(0.0f), FloatEq(-4.0f)));
}

TEST(NoRepeatNgramTest, BansCompletionsOfSeenNgrams) {
  SamplingParams p;
  const std::vector<float> flat(5, 1.0f);
  p.no_repeat_ngram_size = 3;  // history 1 2 3 1 2: the trigram "1 2 3" is banned next
  EXPECT_THAT(ProcessedLogits(flat, p, {1, 2, 3}, {1, 2}),
              ElementsAre(FloatEq(1.0f), FloatEq(1.0f), FloatEq(1.0f), kNegInf, FloatEq(1.0f)));
  p.no_repeat_ngram_size = 2;  // last token 2: bigram "2 3" seen
  EXPECT_THAT(ProcessedLogits(flat, p, {1, 2, 3}, {1, 2}),
              ElementsAre(FloatEq(1.0f), FloatEq(1.0f), FloatEq(1.0f), kNegInf, FloatEq(1.0f)));
  p.no_repeat_ngram_size = 1;  // every seen token
  EXPECT_THAT(ProcessedLogits(flat, p, {1, 2, 3}, {1, 2}),
              ElementsAre(FloatEq(1.0f), kNegInf, kNegInf, kNegInf, FloatEq(1.0f)));
  p.no_repeat_ngram_size = 6;  // longer than the history + 1: nothing
  EXPECT_THAT(
      ProcessedLogits(flat, p, {1, 2, 3}, {1}),
      ElementsAre(FloatEq(1.0f), FloatEq(1.0f), FloatEq(1.0f), FloatEq(1.0f), FloatEq(1.0f)));
}

}  // namespace
}  // namespace tokensampler
