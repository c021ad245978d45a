// The Sampler as a whole: greedy, errors, determinism across layouts and threads, logprob
// modes, n samples, finish reasons, dtypes.
#include "core/sampler.h"

#include <atomic>
#include <cmath>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tbb/task_arena.h"
#include "tests/testing/core_testing.h"

namespace tokensampler {
namespace {

using ::tokensampler::testing::F32Bytes;
using ::tokensampler::testing::Half16Bytes;
using ::tokensampler::testing::SampleRow;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();
const std::vector<float> kRamp = {1.0f, 2.0f, 3.0f, 4.0f};

SampledToken One(const std::vector<float>& logits, const SamplingParams& p,
                 const std::vector<int32_t>& prompt = {}, const std::vector<int32_t>& output = {}) {
  auto result = SampleRow(logits, p, prompt, output);
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? (*result)[0] : SampledToken{};
}

TEST(GreedyTest, TiesGoToLowestId) {
  SamplingParams p;
  p.temperature = 0.0f;
  EXPECT_EQ(One({1.0f, 5.0f, 5.0f, 2.0f}, p).token_id, 1);
  EXPECT_EQ(One({kNegInf, 7.0f, 7.0f, 7.0f}, p).token_id, 1);
}

TEST(GreedyTest, BelowVllmEpsilonIsGreedy) {
  SamplingParams p;
  p.temperature = 1e-6f;
  EXPECT_TRUE(p.greedy());
  EXPECT_EQ(One({0.0f, 0.1f, 0.0f}, p).token_id, 1);
}

TEST(GreedyTest, ArgmaxOfProcessedLogits) {
  SamplingParams p;
  p.temperature = 0.0f;
  p.repetition_penalty = 4.0f;
  // Token 3 (4.0) is repeated: 4 / 4 = 1 < 3.
  EXPECT_EQ(One(kRamp, p, {3}, {}).token_id, 2);
}

TEST(SamplerErrorsTest, NaNLogits) {
  SamplingParams p;
  auto result = SampleRow({1.0f, std::nanf(""), 2.0f}, p);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(result.status().message(), "logits.data is NaN at row 0, token 1");
}

TEST(SamplerErrorsTest, EveryTokenMasked) {
  SamplingParams p;
  p.allowed_token_ids = {2};
  p.logit_bias = {{2, kNegInf}};
  auto result = SampleRow(kRamp, p);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(result.status().message()),
              ::testing::StartsWith("rows[0]: every token is masked"));
  EXPECT_EQ(SampleRow({kNegInf, kNegInf}, SamplingParams{}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(SamplerErrorsTest, HistoryOutOfRange) {
  SamplingParams p;
  EXPECT_EQ(SampleRow(kRamp, p, {0, 4}, {}).status().message(),
            "rows[0].prompt_token_ids[1] = 4 is out of range [0, 4)");
  EXPECT_EQ(SampleRow(kRamp, p, {}, {-1}).status().message(),
            "rows[0].output_token_ids[0] = -1 is out of range [0, 4)");
}

TEST(SamplerErrorsTest, FinishedSequence) {
  SamplingParams p;
  p.max_tokens = 2;
  EXPECT_EQ(SampleRow(kRamp, p, {}, {1, 2}).status().message(),
            "rows[0].output_token_ids has 2 tokens and max_tokens is 2: the sequence has "
            "already finished");
}

TEST(SamplerErrorsTest, RowsMismatchAndFirstBadRowReported) {
  const std::vector<float> logits = {1, 2, 3, 4, 5, 6};
  const std::vector<uint8_t> bytes = F32Bytes(logits);
  auto view = LogitsView::Create(DType::kFloat32, 3, 2, bytes);
  ASSERT_TRUE(view.ok());
  SamplingParams p;
  RowRequest row{&p, {}, {}, std::nullopt};
  Sampler sampler;
  EXPECT_EQ(sampler.Run(*view, {&row, 1}).status().message(),
            "rows has 1 entries but logits.rows is 3");
  const std::vector<int32_t> bad = {7};
  std::vector<RowRequest> rows = {row, {&p, bad, {}, std::nullopt}, {&p, {}, bad, std::nullopt}};
  EXPECT_EQ(sampler.Run(*view, rows).status().message(),
            "rows[1].prompt_token_ids[0] = 7 is out of range [0, 2)");
}

TEST(SamplerErrorsTest, CancelledCallStopsWork) {
  const std::vector<float> logits = {1, 2, 3, 4, 5, 6};
  const std::vector<uint8_t> bytes = F32Bytes(logits);
  auto view = LogitsView::Create(DType::kFloat32, 3, 2, bytes);
  ASSERT_TRUE(view.ok());
  SamplingParams p;
  const std::vector<RowRequest> rows(3, RowRequest{&p, {}, {}, std::nullopt});
  Sampler sampler;
  std::atomic<bool> cancelled{false};
  ASSERT_TRUE(sampler.Run(*view, rows, &cancelled).ok());
  cancelled = true;
  EXPECT_EQ(sampler.Run(*view, rows, &cancelled).status().code(), absl::StatusCode::kCancelled);
}

TEST(SamplerTest, PositiveInfinityDominates) {
  SamplingParams p;
  p.logprobs = -1;
  p.logprobs_mode = LogprobsMode::kProcessedLogprobs;
  std::set<int32_t> seen;
  for (uint64_t seed = 0; seed < 64; ++seed) {
    p.seed = seed;
    const SampledToken t = One({1.0f, kPosInf, 3.0f, kPosInf}, p);
    seen.insert(t.token_id);
    EXPECT_NEAR(t.logprob, -std::log(2.0), 1e-6);
  }
  EXPECT_EQ(seen, (std::set<int32_t>{1, 3}));
}

// A batch of rows with varied parameters, all seeded.
struct Batch {
  std::vector<float> logits;
  std::vector<SamplingParams> params;
  std::vector<std::vector<int32_t>> outputs;
  int vocab = 0;
};

Batch MakeBatch(int rows, int vocab) {
  Batch b;
  b.vocab = vocab;
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < vocab; ++i) {
      b.logits.push_back(static_cast<float>(std::sin(r * 7.1 + i * 0.37) * 3.0));
    }
    SamplingParams p;
    p.seed = static_cast<uint64_t>(1000 + r);
    p.temperature = 0.5f + 0.1f * static_cast<float>(r % 7);
    if (r % 3 == 0) p.top_k = 5 + r;
    if (r % 4 == 1) p.top_p = 0.9f;
    if (r % 5 == 2) p.min_p = 0.05f;
    if (r % 6 == 3) p.xtc_probability = 0.5f;
    if (r % 7 == 4) p.n = 3;
    if (r % 8 == 5) p.repetition_penalty = 1.3f;
    b.params.push_back(p);
    b.outputs.push_back(std::vector<int32_t>(static_cast<size_t>(r % 4), r % vocab));
  }
  return b;
}

// Samples rows `order` of the batch (in that order) as one request; returns tokens per row.
std::vector<std::vector<int32_t>> RunRows(const Batch& b, const std::vector<int>& order) {
  std::vector<float> logits;
  std::vector<RowRequest> rows;
  for (int r : order) {
    const auto begin = b.logits.begin() + static_cast<ptrdiff_t>(r) * b.vocab;
    logits.insert(logits.end(), begin, begin + b.vocab);
    rows.push_back(
        {&b.params[static_cast<size_t>(r)], {}, b.outputs[static_cast<size_t>(r)], std::nullopt});
  }
  const std::vector<uint8_t> bytes = F32Bytes(logits);
  auto view = LogitsView::Create(DType::kFloat32, static_cast<uint32_t>(order.size()),
                                 static_cast<uint32_t>(b.vocab), bytes);
  Sampler sampler;
  auto result = sampler.Run(*view, rows);
  EXPECT_TRUE(result.ok()) << result.status();
  std::vector<std::vector<int32_t>> tokens(b.params.size());
  for (const SampledToken& t : *result) {
    tokens[static_cast<size_t>(order[t.row_index])].push_back(t.token_id);
  }
  return tokens;
}

TEST(DeterminismTest, SameTokensWhateverBatchLayoutOrThreads) {
  const Batch b = MakeBatch(40, 300);
  std::vector<int> all(40);
  for (int r = 0; r < 40; ++r) all[static_cast<size_t>(r)] = r;
  const auto reference = RunRows(b, all);

  std::vector<int> reversed(all.rbegin(), all.rend());
  EXPECT_EQ(RunRows(b, reversed), reference);

  std::vector<std::vector<int32_t>> alone(40);
  for (int r = 0; r < 40; ++r)
    alone[static_cast<size_t>(r)] = RunRows(b, {r})[static_cast<size_t>(r)];
  EXPECT_EQ(alone, reference);

  for (int threads : {1, 2, 4, 8}) {
    tbb::task_arena arena(threads);
    std::vector<std::vector<int32_t>> got;
    arena.execute([&] { got = RunRows(b, all); });
    EXPECT_EQ(got, reference) << threads << " threads";
  }
}

TEST(DeterminismTest, UnseededRowsUseFreshEntropy) {
  SamplingParams p;
  const std::vector<float> flat(1000, 0.0f);
  std::set<int32_t> seen;
  for (int i = 0; i < 20; ++i) seen.insert(One(flat, p).token_id);
  EXPECT_GT(seen.size(), 10u);  // 20 uniform draws from 1000: P(≤ 10 distinct) < 1e-20
}

TEST(DeterminismTest, StepChangesTheDraw) {
  SamplingParams p;
  p.seed = 5;
  const std::vector<float> flat(1000, 0.0f);
  std::set<int32_t> seen;
  for (int len = 0; len < 20; ++len) {
    seen.insert(One(flat, p, {}, std::vector<int32_t>(static_cast<size_t>(len), 0)).token_id);
  }
  EXPECT_GT(seen.size(), 10u);
}

TEST(LogprobsTest, AllFourModes) {
  SamplingParams p;
  p.top_k = 2;
  p.temperature = 0.5f;
  p.seed = 3;
  p.logprobs = 3;
  const double lse = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0) + std::exp(4.0));

  p.logprobs_mode = LogprobsMode::kRawLogprobs;
  SampledToken t = One(kRamp, p);
  ASSERT_TRUE(t.token_id == 2 || t.token_id == 3);
  EXPECT_NEAR(t.logprob, kRamp[static_cast<size_t>(t.token_id)] - lse, 1e-5);
  ASSERT_EQ(t.top_logprobs.size(), 3u);
  EXPECT_EQ(t.top_logprobs[0].token_id, 3);
  EXPECT_NEAR(t.top_logprobs[0].logprob, 4.0 - lse, 1e-5);
  EXPECT_EQ(t.top_logprobs[2].token_id, 1);
  EXPECT_NEAR(t.top_logprobs[2].logprob, 2.0 - lse, 1e-5);

  p.logprobs_mode = LogprobsMode::kRawLogits;
  t = One(kRamp, p);
  EXPECT_EQ(t.logprob, kRamp[static_cast<size_t>(t.token_id)]);
  ASSERT_EQ(t.top_logprobs.size(), 3u);
  EXPECT_EQ(t.top_logprobs[1].token_id, 2);
  EXPECT_EQ(t.top_logprobs[1].logprob, 3.0f);

  // Processed: top_k 2 then T = 0.5 → logits {6, 8} on tokens {2, 3}; the rest removed.
  p.logprobs_mode = LogprobsMode::kProcessedLogits;
  t = One(kRamp, p);
  EXPECT_EQ(t.logprob, kRamp[static_cast<size_t>(t.token_id)] / 0.5f);
  ASSERT_EQ(t.top_logprobs.size(), 2u);  // only tokens with non-zero probability
  EXPECT_EQ(t.top_logprobs[0].token_id, 3);
  EXPECT_EQ(t.top_logprobs[0].logprob, 8.0f);

  p.logprobs_mode = LogprobsMode::kProcessedLogprobs;
  t = One(kRamp, p);
  const double lse2 = std::log(std::exp(6.0) + std::exp(8.0));
  EXPECT_NEAR(t.logprob, 2.0 * kRamp[static_cast<size_t>(t.token_id)] - lse2, 1e-5);
  ASSERT_EQ(t.top_logprobs.size(), 2u);
  EXPECT_NEAR(t.top_logprobs[1].logprob, 6.0 - lse2, 1e-5);
}

TEST(LogprobsTest, CountsAndTies) {
  SamplingParams p;
  p.seed = 1;
  EXPECT_TRUE(One(kRamp, p).top_logprobs.empty());  // unset: none
  p.logprobs = 0;                                   // only the sampled token
  SampledToken t = One(kRamp, p);
  EXPECT_TRUE(t.top_logprobs.empty());
  EXPECT_LT(t.logprob, 0.0f);
  p.logprobs = -1;  // every token with non-zero probability
  EXPECT_EQ(One(kRamp, p).top_logprobs.size(), 4u);
  EXPECT_EQ(One({1.0f, kNegInf, 1.0f}, p).top_logprobs.size(), 2u);
  // Ties by ascending id.
  t = One({2.0f, 5.0f, 2.0f, 5.0f}, p);
  ASSERT_EQ(t.top_logprobs.size(), 4u);
  EXPECT_EQ(t.top_logprobs[0].token_id, 1);
  EXPECT_EQ(t.top_logprobs[1].token_id, 3);
  EXPECT_EQ(t.top_logprobs[2].token_id, 0);
  EXPECT_EQ(t.top_logprobs[3].token_id, 2);
}

TEST(SamplesTest, NSamplesHaveTheirOwnStreams) {
  SamplingParams p;
  p.seed = 9;
  p.n = 8;
  const std::vector<float> flat(1000, 0.0f);
  auto result = SampleRow(flat, p);
  ASSERT_TRUE(result.ok());
  ASSERT_EQ(result->size(), 8u);
  std::set<int32_t> distinct;
  for (uint32_t s = 0; s < 8; ++s) {
    EXPECT_EQ((*result)[s].sample_index, s);
    EXPECT_EQ((*result)[s].row_index, 0u);
    distinct.insert((*result)[s].token_id);
  }
  EXPECT_GE(distinct.size(), 5u);
  p.n = 1;  // sample 0 of n = 8 is the n = 1 draw
  EXPECT_EQ(One(flat, p).token_id, (*result)[0].token_id);
}

TEST(FinishTest, Reasons) {
  SamplingParams p;
  p.temperature = 0.0f;
  p.eos_token_ids = {3};
  EXPECT_EQ(One(kRamp, p).finish_reason, FinishReason::kEos);
  p.ignore_eos = true;
  EXPECT_EQ(One(kRamp, p).finish_reason, FinishReason::kNone);
  p.stop_token_ids = {3};
  SampledToken t = One(kRamp, p);
  EXPECT_EQ(t.finish_reason, FinishReason::kStop);
  EXPECT_EQ(t.stop_token_id, 3);
  p.stop_token_ids = {};
  p.stop_token_sequences = {{0, 3}, {1, 2, 3}, {1, 2, 3}};
  t = One(kRamp, p, {}, {1, 2});
  EXPECT_EQ(t.finish_reason, FinishReason::kStop);
  EXPECT_EQ(t.stop_sequence_index, 1u);
  EXPECT_FALSE(t.stop_token_id.has_value());
  EXPECT_EQ(One(kRamp, p, {}, {2, 2}).finish_reason, FinishReason::kNone);
  p.max_tokens = 3;
  EXPECT_EQ(One(kRamp, p, {}, {2, 2}).finish_reason, FinishReason::kLength);
  // EOS wins over LENGTH; nothing ends before min_tokens.
  p.ignore_eos = false;
  EXPECT_EQ(One(kRamp, p, {}, {2, 2}).finish_reason, FinishReason::kEos);
  p.eos_token_ids = {};
  p.max_tokens = std::nullopt;
  p.min_tokens = 5;
  EXPECT_EQ(One(kRamp, p, {}, {1, 2}).finish_reason, FinishReason::kNone);
  p.min_tokens = 3;
  EXPECT_EQ(One(kRamp, p, {}, {1, 2}).finish_reason, FinishReason::kStop);
}

TEST(DtypeTest, HalfPrecisionRowsSampleLikeTheirFloatValues) {
  std::vector<float> logits;
  for (int i = 0; i < 2 * 500; ++i) logits.push_back(static_cast<float>(std::cos(i * 0.7) * 4.0));
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    const std::vector<uint8_t> half = Half16Bytes(logits, dtype);
    std::vector<float> decoded(logits.size());
    for (size_t i = 0; i < logits.size(); ++i) {
      uint16_t h;
      std::memcpy(&h, half.data() + 2 * i, 2);
      decoded[i] = dtype == DType::kBFloat16 ? Bf16ToFloat(h) : Fp16ToFloat(h);
    }
    const std::vector<uint8_t> full = F32Bytes(decoded);
    SamplingParams p;
    p.top_p = 0.9f;
    p.logprobs = 5;
    std::vector<RowRequest> rows;
    std::vector<SamplingParams> params(2, p);
    for (size_t r = 0; r < 2; ++r) {
      params[r].seed = r + 11;
      rows.push_back({&params[r], {}, {}, std::nullopt});
    }
    Sampler sampler;
    auto a = sampler.Run(*LogitsView::Create(dtype, 2, 500, half), rows);
    auto b = sampler.Run(*LogitsView::Create(DType::kFloat32, 2, 500, full), rows);
    ASSERT_TRUE(a.ok() && b.ok());
    for (size_t r = 0; r < 2; ++r) {
      EXPECT_EQ((*a)[r].token_id, (*b)[r].token_id);
      EXPECT_EQ((*a)[r].logprob, (*b)[r].logprob);
      EXPECT_EQ((*a)[r].top_logprobs.size(), 5u);
    }
  }
}

TEST(MirostatTest, ReturnsUpdatedMu) {
  SamplingParams p;
  p.mirostat_mode = 2;
  p.mirostat_tau = 3.0f;
  p.mirostat_eta = 0.1f;
  p.seed = 4;
  auto result = SampleRow(kRamp, p, {}, {}, std::nullopt);
  ASSERT_TRUE(result.ok());
  const SampledToken& t = (*result)[0];
  ASSERT_TRUE(t.mirostat_mu.has_value());
  // μ starts at 2τ = 6 (keeps every token here); μ' = μ − η(−log2 q − τ).
  const double q = std::exp(static_cast<double>(kRamp[static_cast<size_t>(t.token_id)])) /
                   (std::exp(1.0) + std::exp(2.0) + std::exp(3.0) + std::exp(4.0));
  EXPECT_NEAR(*t.mirostat_mu, 6.0 - 0.1 * (-std::log2(q) - 3.0), 1e-5);
  SamplingParams plain;
  EXPECT_FALSE(One(kRamp, plain).mirostat_mu.has_value());
}

}  // namespace
}  // namespace tokensampler
