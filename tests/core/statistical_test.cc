// Statistical tests: the tokens drawn follow the processed distribution. Each test draws 20000
// tokens with fixed seeds (0…19999) and applies Pearson's chi-square test at α = 0.001 against
// an exact reference distribution computed here in double, independently of core's code.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/core_testing.h"

namespace tokensampler {
namespace {

using ::tokensampler::testing::ChiSquareCritical001;
using ::tokensampler::testing::ChiSquareTest;
using ::tokensampler::testing::DrawCounts;

constexpr int kDraws = 20000;
const std::vector<float> kRow = {2.0f, 1.5f, 1.2f, 1.0f, 0.5f, 0.3f, 0.0f, -0.5f, -1.0f, -2.0f};

std::vector<double> Softmax(const std::vector<float>& logits, double t,
                            const std::vector<bool>& keep) {
  std::vector<double> p(logits.size(), 0.0);
  double total = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (keep[i]) total += p[i] = std::exp(static_cast<double>(logits[i]) / t);
  }
  for (double& x : p) x /= total;
  return p;
}
std::vector<double> Softmax(const std::vector<float>& logits, double t) {
  return Softmax(logits, t, std::vector<bool>(logits.size(), true));
}

// Reference top-p by a full sort (kRow has no ties).
std::vector<bool> TopPKeep(const std::vector<double>& q, double top_p) {
  std::vector<size_t> order(q.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return q[a] > q[b]; });
  std::vector<bool> keep(q.size(), false);
  double cum = 0.0;
  for (size_t i : order) {
    keep[i] = true;
    cum += q[i];
    if (cum >= top_p) break;
  }
  return keep;
}

void ExpectFollows(const std::vector<int64_t>& counts, const std::vector<double>& probs) {
  ASSERT_EQ(counts.size(), probs.size());
  const auto chi = ChiSquareTest(counts, probs);
  ASSERT_GE(chi.df, 1);
  EXPECT_LT(chi.statistic, ChiSquareCritical001(chi.df))
      << "chi-square " << chi.statistic << " with " << chi.df << " degrees of freedom";
}

TEST(ChiSquareTest, Temperature) {
  SamplingParams p;
  p.temperature = 0.7f;
  ExpectFollows(DrawCounts(kRow, p, kDraws), Softmax(kRow, 0.7));
}

TEST(ChiSquareTest, TopK) {
  SamplingParams p;
  p.top_k = 4;
  std::vector<bool> keep(kRow.size(), false);
  keep[0] = keep[1] = keep[2] = keep[3] = true;
  ExpectFollows(DrawCounts(kRow, p, kDraws), Softmax(kRow, 1.0, keep));
}

TEST(ChiSquareTest, TopPWithTemperature) {
  SamplingParams p;
  p.top_p = 0.8f;
  p.temperature = 1.3f;
  const auto keep = TopPKeep(Softmax(kRow, 1.3), 0.8);
  ExpectFollows(DrawCounts(kRow, p, kDraws), Softmax(kRow, 1.3, keep));
}

TEST(ChiSquareTest, MinP) {
  SamplingParams p;
  p.min_p = 0.2f;
  std::vector<bool> keep(kRow.size());
  for (size_t i = 0; i < kRow.size(); ++i) keep[i] = std::exp(kRow[i] - 2.0) >= 0.2;
  ExpectFollows(DrawCounts(kRow, p, kDraws), Softmax(kRow, 1.0, keep));
}

TEST(ChiSquareTest, XtcIsAMixture) {
  SamplingParams p;
  p.xtc_threshold = 0.1f;
  p.xtc_probability = 0.5f;
  // With probability 0.5 every token with q ≥ 0.1 but the least likely of them is removed.
  const std::vector<double> q = Softmax(kRow, 1.0);
  double least = 1.0;
  for (double x : q) {
    if (x >= 0.1) least = std::min(least, x);
  }
  std::vector<bool> keep(q.size());
  for (size_t i = 0; i < q.size(); ++i) keep[i] = !(q[i] >= 0.1 && q[i] > least);
  const std::vector<double> cut = Softmax(kRow, 1.0, keep);
  std::vector<double> mixture(q.size());
  for (size_t i = 0; i < q.size(); ++i) mixture[i] = 0.5 * q[i] + 0.5 * cut[i];
  ExpectFollows(DrawCounts(kRow, p, kDraws), mixture);
}

TEST(ChiSquareTest, MirostatV2AtFixedMu) {
  SamplingParams p;
  p.mirostat_mode = 2;
  // μ = 3: keep tokens whose surprise −log2 q ≤ 3, i.e. q ≥ 1/8.
  const std::vector<double> q = Softmax(kRow, 1.0);
  std::vector<bool> keep(q.size());
  for (size_t i = 0; i < q.size(); ++i) keep[i] = -std::log2(q[i]) <= 3.0;
  ExpectFollows(DrawCounts(kRow, p, kDraws, 3.0f), Softmax(kRow, 1.0, keep));
}

TEST(ChiSquareTest, MirostatV1AtFixedMu) {
  SamplingParams p;
  p.mirostat_mode = 1;
  p.temperature = 0.8f;
  // Reference: Zipf exponent from consecutive log-ratios of the (sorted) top tokens, then
  // k = (ε̂ 2^μ / (1 − V^−ε̂))^(1/ŝ), keep the k most likely.
  const double mu = 4.0;
  std::vector<float> tempered(kRow.size());
  for (size_t i = 0; i < kRow.size(); ++i) tempered[i] = kRow[i] / 0.8f;
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i + 1 < tempered.size(); ++i) {
    const double d = static_cast<double>(i);
    const double t = std::log((d + 2.0) / (d + 1.0));
    num += t * (static_cast<double>(tempered[i]) - tempered[i + 1]);
    den += t * t;
  }
  const double s = num / den;
  const double e = s - 1.0;
  const double k = std::pow(e * std::pow(2.0, mu) / (1.0 - std::pow(10.0, -e)), 1.0 / s);
  const size_t keep_n = static_cast<size_t>(std::clamp(k, 1.0, 10.0));
  ASSERT_GE(keep_n, 2u);
  ASSERT_LT(keep_n, 10u);
  std::vector<bool> keep(kRow.size(), false);
  for (size_t i = 0; i < keep_n; ++i) keep[i] = true;  // kRow is sorted descending
  ExpectFollows(DrawCounts(kRow, p, kDraws, static_cast<float>(mu)), Softmax(kRow, 0.8, keep));
}

// Mirostat is a feedback loop on surprise: fed back its own μ over a long run, the mean
// observed surprise approaches τ (the sum of errors telescopes to (μ0 − μT)/η).
TEST(MirostatFeedbackTest, MeanSurpriseApproachesTau) {
  std::vector<float> zipf(2000);
  for (size_t i = 0; i < zipf.size(); ++i) zipf[i] = -1.1f * std::log(static_cast<float>(i + 1));
  for (int mode : {1, 2}) {
    SamplingParams p;
    p.mirostat_mode = mode;
    p.mirostat_tau = 4.0f;
    p.mirostat_eta = 0.1f;
    p.seed = 77;
    p.logprobs = 0;
    p.logprobs_mode = LogprobsMode::kProcessedLogprobs;
    std::optional<float> mu;
    std::vector<int32_t> output;
    double surprise = 0.0;
    constexpr int kSteps = 3000;
    for (int step = 0; step < kSteps; ++step) {
      auto result = testing::SampleRow(zipf, p, {}, output, mu);
      ASSERT_TRUE(result.ok()) << result.status();
      const SampledToken& t = (*result)[0];
      surprise += -static_cast<double>(t.logprob) / std::log(2.0);
      mu = t.mirostat_mu;
      output.push_back(0);  // the RNG step advances; the history itself plays no role here
    }
    EXPECT_NEAR(surprise / kSteps, 4.0, 0.05) << "mode " << mode;
  }
}

}  // namespace
}  // namespace tokensampler
