// Table-driven exact tests of every stage of steps 4–5, through the real Sampler: each case
// gives a row, parameters and the hand-derived kept set (with the temperature that applies),
// and compares the processed distribution with softmax over that set, to 1e-5.
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/testing/core_testing.h"

namespace tokensampler {
namespace {

using ::tokensampler::testing::ProcessedProbs;
using ::tokensampler::testing::SoftmaxOver;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// q = softmax({1,2,3,4}) = {0.0320586, 0.0871443, 0.2368828, 0.6439142}; entropy 0.9475369.
const std::vector<float> kRamp = {1.0f, 2.0f, 3.0f, 4.0f};

struct StageCase {
  std::string name;
  std::vector<float> logits;
  std::function<void(SamplingParams&)> set;
  std::vector<int32_t> kept;  // the tokens that must survive
  double temperature = 1.0;   // the temperature the kept logits are divided by
};

class StageTest : public ::testing::TestWithParam<StageCase> {};

TEST_P(StageTest, KeepsExactlyTheExpectedDistribution) {
  const StageCase& c = GetParam();
  SamplingParams params;
  c.set(params);
  ASSERT_TRUE(ValidateParams(params, static_cast<int32_t>(c.logits.size())).ok());
  const std::vector<double> got = ProcessedProbs(c.logits, params);
  const std::vector<double> want = SoftmaxOver(c.logits, c.kept, c.temperature);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_NEAR(got[i], want[i], 1e-5) << "token " << i;
  }
}

// clang-format off
INSTANTIATE_TEST_SUITE_P(Temperature, StageTest, ::testing::Values(
    StageCase{"default_is_plain_softmax", kRamp, [](auto&) {}, {0, 1, 2, 3}},
    StageCase{"half", kRamp, [](auto& p) { p.temperature = 0.5f; }, {0, 1, 2, 3}, 0.5},
    StageCase{"two", kRamp, [](auto& p) { p.temperature = 2.0f; }, {0, 1, 2, 3}, 2.0},
    StageCase{"neg_inf_inputs_stay_out", {kNegInf, 0.0f, kNegInf, 1.0f},
              [](auto& p) { p.temperature = 0.7f; }, {1, 3}, 0.7},
    // H / ln 4 = 0.6835044 → T = 0.5 + 1.0 · 0.6835044.
    StageCase{"dynatemp", kRamp, [](auto& p) { p.dynatemp_range = 0.5f; }, {0, 1, 2, 3},
              1.1835044},
    // exponent 2: T = 0.5 + 1.0 · 0.6835044² = 0.9671783.
    StageCase{"dynatemp_exponent", kRamp,
              [](auto& p) { p.dynatemp_range = 0.5f; p.dynatemp_exponent = 2.0f; },
              {0, 1, 2, 3}, 0.9671783}),
    [](const auto& test_info) { return test_info.param.name; });

INSTANTIATE_TEST_SUITE_P(TopK, StageTest, ::testing::Values(
    StageCase{"two", kRamp, [](auto& p) { p.top_k = 2; }, {2, 3}},
    StageCase{"one", kRamp, [](auto& p) { p.top_k = 1; }, {3}},
    StageCase{"off_minus_one", kRamp, [](auto& p) { p.top_k = -1; }, {0, 1, 2, 3}},
    StageCase{"larger_than_vocab", kRamp, [](auto& p) { p.top_k = 50; }, {0, 1, 2, 3}},
    StageCase{"ties_at_cut_stay", {1.0f, 3.0f, 3.0f, 2.0f}, [](auto& p) { p.top_k = 1; }, {1, 2}},
    StageCase{"all_equal", {2.0f, 2.0f, 2.0f, 2.0f}, [](auto& p) { p.top_k = 2; },
              {0, 1, 2, 3}},
    StageCase{"neg_inf_inputs", {kNegInf, 1.0f, 2.0f, kNegInf}, [](auto& p) { p.top_k = 3; },
              {1, 2}},
    StageCase{"with_temperature", kRamp, [](auto& p) { p.top_k = 3; p.temperature = 0.5f; },
              {1, 2, 3}, 0.5}),
    [](const auto& test_info) { return test_info.param.name; });

INSTANTIATE_TEST_SUITE_P(TopP, StageTest, ::testing::Values(
    StageCase{"one_is_off", kRamp, [](auto& p) { p.top_p = 1.0f; }, {0, 1, 2, 3}},
    // 0.6439 < 0.8 ≤ 0.6439 + 0.2369.
    StageCase{"point_eight", kRamp, [](auto& p) { p.top_p = 0.8f; }, {2, 3}},
    StageCase{"point_nine", kRamp, [](auto& p) { p.top_p = 0.9f; }, {1, 2, 3}},
    StageCase{"tiny_keeps_one", kRamp, [](auto& p) { p.top_p = 1e-6f; }, {3}},
    StageCase{"mass_exactly_at_top", {0.0f, 0.0f}, [](auto& p) { p.top_p = 0.5f; }, {0, 1}},
    StageCase{"ties_at_cut_stay", {0.0f, 0.0f, 0.0f, 0.0f}, [](auto& p) { p.top_p = 0.3f; },
              {0, 1, 2, 3}},
    StageCase{"single_token_left", {5.0f, kNegInf, kNegInf}, [](auto& p) { p.top_p = 0.5f; },
              {0}},
    // After T = 0.5 the top token alone holds 0.8668 ≥ 0.8.
    StageCase{"after_temperature", kRamp, [](auto& p) { p.top_p = 0.8f; p.temperature = 0.5f; },
              {3}, 0.5},
    // top_k first: over {2,3} the top token has 0.7311 < 0.75, so both stay.
    StageCase{"after_top_k", kRamp, [](auto& p) { p.top_k = 2; p.top_p = 0.75f; }, {2, 3}}),
    [](const auto& test_info) { return test_info.param.name; });

INSTANTIATE_TEST_SUITE_P(MinP, StageTest, ::testing::Values(
    // p/p_max = e^(l−4): e^−1 = 0.368 ≥ 0.3 > e^−2.
    StageCase{"point_three", kRamp, [](auto& p) { p.min_p = 0.3f; }, {2, 3}},
    StageCase{"one_keeps_max_and_ties", {1.0f, 4.0f, 4.0f, 3.0f}, [](auto& p) { p.min_p = 1.0f; },
              {1, 2}},
    StageCase{"zero_is_off", kRamp, [](auto& p) { p.min_p = 0.0f; }, {0, 1, 2, 3}},
    StageCase{"all_equal", {2.0f, 2.0f, 2.0f}, [](auto& p) { p.min_p = 0.9f; }, {0, 1, 2}},
    // After T = 2: e^(−1/2) = 0.607 ≥ 0.5 > e^−1.
    StageCase{"after_temperature", kRamp, [](auto& p) { p.min_p = 0.5f; p.temperature = 2.0f; },
              {2, 3}, 2.0}),
    [](const auto& test_info) { return test_info.param.name; });

INSTANTIATE_TEST_SUITE_P(TypicalP, StageTest, ::testing::Values(
    // Scores |−ln q − H|: {2.4927, 1.4927, 0.4927, 0.5073}: token 2 is the most typical.
    StageCase{"keeps_most_typical_first", kRamp, [](auto& p) { p.typical_p = 0.2f; }, {2}},
    StageCase{"half", kRamp, [](auto& p) { p.typical_p = 0.5f; }, {2, 3}},
    StageCase{"point_nine", kRamp, [](auto& p) { p.typical_p = 0.9f; }, {1, 2, 3}},
    StageCase{"one_is_off", kRamp, [](auto& p) { p.typical_p = 1.0f; }, {0, 1, 2, 3}},
    StageCase{"all_equal_ties_stay", {1.0f, 1.0f, 1.0f}, [](auto& p) { p.typical_p = 0.1f; },
              {0, 1, 2}}),
    [](const auto& test_info) { return test_info.param.name; });

INSTANTIATE_TEST_SUITE_P(EpsilonEta, StageTest, ::testing::Values(
    StageCase{"epsilon", kRamp, [](auto& p) { p.epsilon_cutoff = 0.05f; }, {1, 2, 3}},
    StageCase{"epsilon_keeps_max", kRamp, [](auto& p) { p.epsilon_cutoff = 0.9f; }, {3}},
    // η = 0.1: min(0.1, √0.1 · e^−H = 0.1226) = 0.1.
    StageCase{"eta", kRamp, [](auto& p) { p.eta_cutoff = 0.1f; }, {2, 3}},
    // η = 0.5: min(0.5, √0.5 · e^−H = 0.2741) = 0.2741.
    StageCase{"eta_entropy_bound", kRamp, [](auto& p) { p.eta_cutoff = 0.5f; }, {3}}),
    [](const auto& test_info) { return test_info.param.name; });

INSTANTIATE_TEST_SUITE_P(TopNSigma, StageTest, ::testing::Values(
    // mean 2.5, σ = √1.25 = 1.1180: n = 1 keeps l ≥ 2.882, n = 2 keeps l ≥ 1.764.
    StageCase{"one", kRamp, [](auto& p) { p.top_n_sigma = 1.0f; }, {2, 3}},
    StageCase{"two", kRamp, [](auto& p) { p.top_n_sigma = 2.0f; }, {1, 2, 3}},
    StageCase{"ignores_neg_inf", {kNegInf, 1.0f, 2.0f, 3.0f, 4.0f},
              [](auto& p) { p.top_n_sigma = 1.0f; }, {3, 4}},
    StageCase{"all_equal", {3.0f, 3.0f, 3.0f}, [](auto& p) { p.top_n_sigma = 0.5f; },
              {0, 1, 2}}),
    [](const auto& test_info) { return test_info.param.name; });

INSTANTIATE_TEST_SUITE_P(Xtc, StageTest, ::testing::Values(
    // q ≥ 0.2: tokens 2 (0.2369) and 3 (0.6439): all but the least likely go.
    StageCase{"removes_all_but_least_likely", kRamp,
              [](auto& p) { p.xtc_probability = 1.0f; p.xtc_threshold = 0.2f; }, {0, 1, 2}},
    StageCase{"one_above_threshold_is_noop", kRamp,
              [](auto& p) { p.xtc_probability = 1.0f; p.xtc_threshold = 0.5f; }, {0, 1, 2, 3}},
    StageCase{"probability_zero_is_off", kRamp,
              [](auto& p) { p.xtc_probability = 0.0f; p.xtc_threshold = 0.01f; }, {0, 1, 2, 3}},
    StageCase{"ties_at_least_likely_stay", {1.0f, 3.0f, 3.0f, 4.0f},
              [](auto& p) { p.xtc_probability = 1.0f; p.xtc_threshold = 0.15f; }, {0, 1, 2}}),
    [](const auto& test_info) { return test_info.param.name; });

INSTANTIATE_TEST_SUITE_P(Order, StageTest, ::testing::Values(
    // llama.cpp order (temperature last): top_p sees the untempered row, keeps {2, 3}.
    StageCase{"temperature_last", kRamp,
              [](auto& p) {
                p.top_p = 0.8f;
                p.temperature = 0.5f;
                p.sampler_order = {Stage::kTopP, Stage::kTemperature};
              },
              {2, 3}, 0.5},
    // min_p 0.3 first keeps {2, 3}; top_k 3 then changes nothing.
    StageCase{"min_p_before_top_k", kRamp,
              [](auto& p) {
                p.min_p = 0.3f;
                p.top_k = 3;
                p.sampler_order = {Stage::kMinP, Stage::kTopK};
              },
              {2, 3}},
    // top_p 0.6 over the full row keeps {3}... unless top_k 2 runs after it: still {3}; and
    // top_k 2 first then top_p 0.6 over {2, 3}: 0.7311 ≥ 0.6 keeps {3}. Equal either way here;
    // typical first then top_k 1 shows order matters: typical 0.2 keeps {2}.
    StageCase{"typical_before_top_k", kRamp,
              [](auto& p) {
                p.typical_p = 0.2f;
                p.top_k = 1;
                p.sampler_order = {Stage::kTypicalP, Stage::kTopK};
              },
              {2}}),
    [](const auto& test_info) { return test_info.param.name; });
// clang-format on

TEST(GreedyTest, TemperatureZeroIgnoresTruncationAndReportsProcessedRow) {
  SamplingParams p;
  p.temperature = 0.0f;
  p.top_k = 1;
  p.top_p = 0.1f;
  // vLLM: greedy rows report log_softmax of the processed (pre-temperature) logits.
  const std::vector<double> got = ProcessedProbs(kRamp, p);
  const std::vector<double> want = SoftmaxOver(kRamp, {0, 1, 2, 3});
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-6);
}

}  // namespace
}  // namespace tokensampler
