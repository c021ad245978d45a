// SparseBatch without a network: the dense row it builds, the rest's mass, the top_p rewrite and
// the raw-logprob shift, against hand-computed values.
#include "core/sparse.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokensampler {
namespace {

using ::testing::HasSubstr;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Rows {
  std::vector<int32_t> ids;
  std::vector<float> values;
  std::vector<float> rest;
  SparseRows View(uint32_t vocab, uint32_t k) const {
    return SparseRows{DType::kFloat32,
                      static_cast<uint32_t>(rest.size()),
                      vocab,
                      k,
                      {reinterpret_cast<const uint8_t*>(ids.data()), ids.size() * 4},
                      {reinterpret_cast<const uint8_t*>(values.data()), values.size() * 4},
                      rest};
  }
};

TEST(SparseBatchTest, DensifiesWithNegativeInfinity) {
  const Rows rows{{4, 1, 0, 2}, {2.0f, 1.0f, 0.5f, 3.0f}, {0.0f, kNegInf}};
  absl::StatusOr<SparseBatch> batch = SparseBatch::Create(rows.View(6, 2));
  ASSERT_TRUE(batch.ok()) << batch.status();
  const LogitsView& view = batch->view();
  EXPECT_EQ(view.rows(), 2);
  EXPECT_EQ(view.vocab_size(), 6);
  const std::vector<float> row0 = {kNegInf, 1.0f, kNegInf, kNegInf, 2.0f, kNegInf};
  const std::vector<float> row1 = {0.5f, kNegInf, 3.0f, kNegInf, kNegInf, kNegInf};
  for (int t = 0; t < 6; ++t) {
    EXPECT_EQ(view.At(0, t), row0[static_cast<size_t>(t)]) << t;
    EXPECT_EQ(view.At(1, t), row1[static_cast<size_t>(t)]) << t;
  }
  // Mass of the candidates: (e^2 + e^1) / (e^2 + e^1 + e^0); no rest in row 1.
  EXPECT_NEAR(batch->CandidateMass(0),
              (std::exp(2.0) + std::exp(1.0)) / (std::exp(2.0) + std::exp(1.0) + 1.0), 1e-12);
  EXPECT_EQ(batch->CandidateMass(1), 1.0);
}

TEST(SparseBatchTest, TopPIsRewrittenToTheCandidatesShare) {
  const Rows rows{{0, 1}, {2.0f, 1.0f}, {-1.0f}};
  absl::StatusOr<SparseBatch> batch = SparseBatch::Create(rows.View(10, 2));
  ASSERT_TRUE(batch.ok());
  const double mass = batch->CandidateMass(0);
  SamplingParams p;
  p.top_p = 0.5f;
  ASSERT_TRUE(batch->Prepare(0, p, {}, {}).ok());
  EXPECT_NEAR(p.top_p, 0.5 / mass, 1e-6);
  p = SamplingParams();
  p.top_p = 0.99f;  // more than the candidates hold
  const absl::Status status = batch->Prepare(0, p, {}, {});
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("rows[0]: sparse logits: top_p 0.99 needs tokens "
                                          "outside the 2 candidates"));
}

TEST(SparseBatchTest, RawLogprobsIncludeTheRest) {
  const Rows rows{{3, 5}, {2.0f, 1.0f}, {0.0f}};
  absl::StatusOr<SparseBatch> batch = SparseBatch::Create(rows.View(10, 2));
  ASSERT_TRUE(batch.ok());
  SamplingParams p;
  p.temperature = 0.0f;
  p.logprobs = 1;
  SampledToken token;
  token.row_index = 0;
  token.token_id = 3;
  // What the core computes on the dense row: log-softmax over the candidates only.
  const double lse_candidates = std::log(std::exp(2.0) + std::exp(1.0));
  token.logprob = static_cast<float>(2.0 - lse_candidates);
  token.top_logprobs = {{3, token.logprob}};
  batch->FixLogprobs(p, token);
  const double expected = 2.0 - std::log(std::exp(2.0) + std::exp(1.0) + 1.0);
  EXPECT_NEAR(token.logprob, expected, 1e-6);
  EXPECT_NEAR(token.top_logprobs[0].logprob, expected, 1e-6);
  // Raw logits are not touched.
  p.logprobs_mode = LogprobsMode::kRawLogits;
  token.logprob = 2.0f;
  batch->FixLogprobs(p, token);
  EXPECT_EQ(token.logprob, 2.0f);
}

TEST(SparseBatchTest, ValidatesItsInput) {
  const Rows dup{{1, 1}, {1.0f, 2.0f}, {0.0f}};
  EXPECT_THAT(SparseBatch::Create(dup.View(4, 2)).status().message(),
              HasSubstr("logits.sparse.token_ids[0] holds token 1 twice"));
  const Rows range{{1, 4}, {1.0f, 2.0f}, {0.0f}};
  EXPECT_THAT(SparseBatch::Create(range.View(4, 2)).status().message(),
              HasSubstr("logits.sparse.token_ids[0][1] must be in [0, 4), got 4"));
  EXPECT_THAT(SparseBatch::Create(range.View(4, 0)).status().message(),
              HasSubstr("logits.sparse.k must be in [1, vocab_size = 4], got 0"));
}

TEST(SparseBatchTest, MinPNeedsItsThresholdAboveTheRest) {
  // Candidates 5 and 4.9; the rest's log-sum-exp 4 bounds every other token by 4.
  const Rows rows{{0, 1}, {5.0f, 4.9f}, {4.0f}};
  absl::StatusOr<SparseBatch> batch = SparseBatch::Create(rows.View(100, 2));
  ASSERT_TRUE(batch.ok());
  SamplingParams p;
  p.min_p = 0.5f;  // keeps l ≥ 5 + ln 0.5 = 4.31 > 4: exact
  EXPECT_TRUE(batch->Prepare(0, p, {}, {}).ok());
  p.min_p = 0.3f;  // l ≥ 5 + ln 0.3 = 3.80 ≤ 4: tokens outside may be kept
  EXPECT_THAT(batch->Prepare(0, p, {}, {}).message(), HasSubstr("min_p 0.3 keeps logits ≥"));
  p.min_p = 0.5f;
  p.temperature = 2.0f;  // l ≥ 5 + 2 ln 0.5 = 3.61: not exact any more
  EXPECT_FALSE(batch->Prepare(0, p, {}, {}).ok());
}

}  // namespace
}  // namespace tokensampler
