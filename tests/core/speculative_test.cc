// Speculative verification (core/speculative.h).
//
// Statistical tests: 40000 replicas of one verification with seeds 0…39999 (drafts drawn by the
// test's own fixed-seed generator), each completed to kLength tokens with Sample; Pearson's
// chi-square test at α = 0.001 of the emitted sequences against the exact target distribution
// computed here in double (penalties and truncation written out independently of core), and a
// z-test at α = 0.001 (|z| < 3.29) of the mean accepted count against its exact value.
#include "core/speculative.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <ostream>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/philox.h"
#include "core/reference.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/core_testing.h"

namespace tokensampler {
namespace {

using ::testing::HasSubstr;
using ::tokensampler::testing::ChiSquareTest;
using ::tokensampler::testing::F32Bytes;
using ::tokensampler::testing::ProcessedProbs;

using History = std::vector<int32_t>;

// Upper α = 0.001 critical value of chi-square with df degrees of freedom (Wilson–Hilferty;
// within 0.5 % of the table for df ≥ 3).
double ChiSquareCritical(int df) {
  const double d = static_cast<double>(df);
  const double z = 3.090232;  // the standard normal's 0.999 quantile
  const double a = 1.0 - 2.0 / (9.0 * d) + z * std::sqrt(2.0 / (9.0 * d));
  return d * a * a * a;
}

// A toy target model: logits depend on the last token of prompt ++ output (a bigram table).
struct ToyModel {
  int vocab;
  std::vector<std::vector<float>> table;  // [last token + 1][token]; row 0 = no history

  ToyModel(int v, uint64_t seed, float scale) : vocab(v) {
    std::mt19937_64 gen(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    table.assign(static_cast<size_t>(v) + 1, std::vector<float>(static_cast<size_t>(v)));
    for (auto& row : table) {
      for (float& l : row) l = static_cast<float>(scale * normal(gen));
    }
  }
  const std::vector<float>& Logits(const History& prompt, const History& output) const {
    const int32_t last = !output.empty() ? output.back() : !prompt.empty() ? prompt.back() : -1;
    return table[static_cast<size_t>(last + 1)];
  }
};

// The target distribution in double, written out from the documented semantics: logit_bias,
// repetition (prompt ∪ output), frequency and presence (output), temperature, top_k, top_p,
// min_p, softmax. Only the parameters these tests use.
std::vector<double> TargetProbs(const std::vector<float>& logits, const SamplingParams& p,
                                const History& prompt, const History& output) {
  const size_t v = logits.size();
  std::vector<double> l(v);
  for (size_t i = 0; i < v; ++i) l[i] = logits[i];
  for (const auto& [id, bias] : p.logit_bias) l[static_cast<size_t>(id)] += bias;
  std::vector<int> count(v, 0), seen(v, 0);
  for (int32_t t : prompt) seen[static_cast<size_t>(t)] = 1;
  for (int32_t t : output) {
    seen[static_cast<size_t>(t)] = 1;
    ++count[static_cast<size_t>(t)];
  }
  for (size_t i = 0; i < v; ++i) {
    if (seen[i]) l[i] = l[i] > 0 ? l[i] / p.repetition_penalty : l[i] * p.repetition_penalty;
    l[i] -= p.frequency_penalty * static_cast<double>(count[i]);
    if (count[i] > 0) l[i] -= p.presence_penalty;
  }
  if (p.greedy()) {
    std::vector<double> out(v, 0.0);
    out[static_cast<size_t>(std::max_element(l.begin(), l.end()) - l.begin())] = 1.0;
    return out;
  }
  for (double& x : l) x /= p.temperature;
  std::vector<size_t> order(v);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return l[a] > l[b]; });
  std::vector<bool> keep(v, true);
  if (p.top_k > 0) {
    for (size_t i = static_cast<size_t>(p.top_k); i < v; ++i) keep[order[i]] = false;
  }
  const auto softmax = [&] {
    std::vector<double> q(v, 0.0);
    double total = 0.0;
    for (size_t i = 0; i < v; ++i) total += q[i] = keep[i] ? std::exp(l[i] - l[order[0]]) : 0.0;
    for (double& x : q) x /= total;
    return q;
  };
  if (p.top_p < 1.0f) {
    const std::vector<double> q = softmax();
    double cum = 0.0;
    for (size_t i : order) {
      if (cum >= p.top_p) keep[i] = false;
      cum += q[i];
    }
  }
  if (p.min_p > 0.0f) {
    const std::vector<double> q = softmax();
    for (size_t i = 0; i < v; ++i) keep[i] = keep[i] && q[i] >= p.min_p * q[order[0]];
  }
  return softmax();
}

std::vector<float> RandomLogits(int rows, int vocab, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> out(static_cast<size_t>(rows * vocab));
  for (float& l : out) l = normal(gen);
  return out;
}

History Concat(const History& a, const History& b) {
  History out = a;
  out.insert(out.end(), b.begin(), b.end());
  return out;
}

// One statistical experiment: a draft tree (parents; a chain when `chain`), drafts from a
// perturbed draft model, either sampled i.i.d. from its distribution per node (with q) or the
// draft's most likely distinct tokens per parent (point masses, no q).
struct Experiment {
  int vocab = 4;
  int length = 3;  // emitted tokens compared (verify, then Sample to complete)
  int replicas = 40000;
  SamplingParams params;
  History prompt = {1};
  History output = {};
  std::vector<int32_t> parents;  // tree shape
  bool chain = false;
  bool point_masses = false;
  bool without_replacement = false;  // siblings drawn without replacement (each its own q)
};

struct Outcome {
  std::vector<int64_t> counts;  // per sequence of `length` tokens (base-vocab number)
  std::vector<double> expected;
  double mean_accepted = 0.0;
  double var_accepted = 0.0;
  std::vector<int64_t> first_counts;  // first emitted token
};

Outcome RunExperiment(const Experiment& e) {
  const ToyModel target(e.vocab, 11, 1.2f);
  const ToyModel draft_noise(e.vocab, 12, 0.8f);
  const size_t v = static_cast<size_t>(e.vocab);
  const size_t k = e.parents.size();
  // The draft's distribution after `history`: softmax(target + noise) at temperature 1.
  const auto draft_q = [&](const History& out) {
    const std::vector<float>& a = target.Logits(e.prompt, out);
    const std::vector<float>& b = draft_noise.Logits(e.prompt, out);
    std::vector<double> q(v);
    double total = 0.0;
    for (size_t i = 0; i < v; ++i) total += q[i] = std::exp(static_cast<double>(a[i] + b[i]));
    for (double& x : q) x /= total;
    return q;
  };
  std::mt19937_64 gen(1234);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);

  std::vector<float> logits;
  std::vector<float> probs;
  std::vector<History> tokens(static_cast<size_t>(e.replicas));
  std::vector<SamplingParams> params(static_cast<size_t>(e.replicas), e.params);
  std::vector<VerifyRowRequest> rows(static_cast<size_t>(e.replicas));
  std::vector<std::vector<uint8_t>> prob_bytes(static_cast<size_t>(e.replicas));
  for (int n = 0; n < e.replicas; ++n) {
    const size_t ni = static_cast<size_t>(n);
    params[ni].seed = static_cast<uint64_t>(n);
    History& drafts = tokens[ni];
    drafts.assign(k, 0);
    probs.clear();
    std::vector<History> paths(k);
    std::map<int32_t, int> rank;  // point masses: children seen per parent
    for (size_t j = 0; j < k; ++j) {
      const int32_t parent = e.parents[j];
      const History before = parent < 0 ? History{} : paths[static_cast<size_t>(parent)];
      std::vector<double> q = draft_q(Concat(e.output, before));
      if (e.without_replacement) {
        // Siblings drawn without replacement: the earlier siblings' tokens removed from q.
        for (size_t i = 0; i < j; ++i) {
          if (e.parents[i] == parent) q[static_cast<size_t>(drafts[i])] = 0.0;
        }
        double total = 0.0;
        for (double qy : q) total += qy;
        for (double& qy : q) qy /= total;
      }
      int32_t x = 0;
      if (e.point_masses) {
        std::vector<int32_t> order(v);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
          return q[static_cast<size_t>(a)] > q[static_cast<size_t>(b)];
        });
        x = order[static_cast<size_t>(rank[parent]++)];
      } else {
        double u = uniform(gen), cum = 0.0;
        x = static_cast<int32_t>(v) - 1;
        for (size_t y = 0; y < v; ++y) {
          cum += q[y];
          if (u < cum) {
            x = static_cast<int32_t>(y);
            break;
          }
        }
        for (double qy : q) probs.push_back(static_cast<float>(qy));
      }
      drafts[j] = x;
      paths[j] = before;
      paths[j].push_back(x);
    }
    // Target rows: the current position, then one per node (after its path).
    const std::vector<float>& root = target.Logits(e.prompt, e.output);
    logits.insert(logits.end(), root.begin(), root.end());
    for (size_t j = 0; j < k; ++j) {
      const std::vector<float>& row = target.Logits(e.prompt, Concat(e.output, paths[j]));
      logits.insert(logits.end(), row.begin(), row.end());
    }
    prob_bytes[ni] = F32Bytes(probs);
  }
  const std::vector<uint8_t> bytes = F32Bytes(logits);
  const LogitsView view = *LogitsView::Create(
      DType::kFloat32, static_cast<uint32_t>(static_cast<size_t>(e.replicas) * (k + 1)),
      static_cast<uint32_t>(v), bytes);
  for (int n = 0; n < e.replicas; ++n) {
    const size_t ni = static_cast<size_t>(n);
    VerifyRowRequest& row = rows[ni];
    row.row = RowRequest{&params[ni], e.prompt, e.output, std::nullopt};
    row.drafts.token_ids = tokens[ni];
    if (!e.chain) row.drafts.parents = e.parents;
    if (!e.point_masses && k > 0) {
      row.drafts.probs = *LogitsView::Create(DType::kFloat32, static_cast<uint32_t>(k),
                                             static_cast<uint32_t>(v), prob_bytes[ni]);
    }
  }
  Sampler sampler;
  Verifier verifier(sampler);
  auto results = verifier.Run(view, rows);
  EXPECT_TRUE(results.ok()) << results.status();
  if (!results.ok()) return {};

  Outcome out;
  out.first_counts.assign(v, 0);
  double sum = 0.0, sum_sq = 0.0;
  std::vector<History> emitted(static_cast<size_t>(e.replicas));
  for (int n = 0; n < e.replicas; ++n) {
    const VerifyResult& result = (*results)[static_cast<size_t>(n)];
    EXPECT_EQ(result.tokens.size(), result.num_accepted() + 1);
    for (const SampledToken& t : result.tokens)
      emitted[static_cast<size_t>(n)].push_back(t.token_id);
    ++out.first_counts[static_cast<size_t>(result.tokens[0].token_id)];
    const double a = static_cast<double>(result.num_accepted());
    sum += a;
    sum_sq += a * a;
  }
  out.mean_accepted = sum / e.replicas;
  out.var_accepted = sum_sq / e.replicas - out.mean_accepted * out.mean_accepted;

  // Complete every replica to `length` tokens with Sample (seeded: the steps after the verify).
  for (;;) {
    std::vector<size_t> open;
    for (size_t n = 0; n < emitted.size(); ++n) {
      if (emitted[n].size() < static_cast<size_t>(e.length)) open.push_back(n);
    }
    if (open.empty()) break;
    std::vector<float> more;
    std::vector<History> outputs(open.size());
    std::vector<RowRequest> requests(open.size());
    for (size_t i = 0; i < open.size(); ++i) {
      outputs[i] = Concat(e.output, emitted[open[i]]);
      const std::vector<float>& row = target.Logits(e.prompt, outputs[i]);
      more.insert(more.end(), row.begin(), row.end());
      requests[i] = RowRequest{&params[open[i]], e.prompt, outputs[i], std::nullopt};
    }
    const std::vector<uint8_t> more_bytes = F32Bytes(more);
    auto sampled =
        sampler.Run(*LogitsView::Create(DType::kFloat32, static_cast<uint32_t>(open.size()),
                                        static_cast<uint32_t>(v), more_bytes),
                    requests);
    EXPECT_TRUE(sampled.ok()) << sampled.status();
    if (!sampled.ok()) return {};
    for (size_t i = 0; i < open.size(); ++i) emitted[open[i]].push_back((*sampled)[i].token_id);
  }
  size_t bins = 1;
  for (int i = 0; i < e.length; ++i) bins *= v;
  out.counts.assign(bins, 0);
  for (const History& seq : emitted) {
    size_t index = 0;
    for (int i = 0; i < e.length; ++i)
      index = index * v + static_cast<size_t>(seq[static_cast<size_t>(i)]);
    ++out.counts[index];
  }
  out.expected.assign(bins, 0.0);
  for (size_t index = 0; index < bins; ++index) {
    History seq(static_cast<size_t>(e.length));
    size_t rest = index;
    for (int i = e.length - 1; i >= 0; --i) {
      seq[static_cast<size_t>(i)] = static_cast<int32_t>(rest % v);
      rest /= v;
    }
    double prob = 1.0;
    History out_so_far = e.output;
    for (int32_t t : seq) {
      prob *= TargetProbs(target.Logits(e.prompt, out_so_far), e.params, e.prompt,
                          out_so_far)[static_cast<size_t>(t)];
      out_so_far.push_back(t);
    }
    out.expected[index] = prob;
  }
  return out;
}

void ExpectTargetDistribution(const Outcome& out) {
  const auto chi = ChiSquareTest(out.counts, out.expected);
  ASSERT_GE(chi.df, 1);
  EXPECT_LT(chi.statistic, ChiSquareCritical(chi.df))
      << "chi-square " << chi.statistic << " with " << chi.df << " degrees of freedom";
}

std::vector<int32_t> ChainParents(int k) {
  std::vector<int32_t> parents(static_cast<size_t>(k));
  for (int j = 0; j < k; ++j) parents[static_cast<size_t>(j)] = j - 1;
  return parents;
}

// The exact mean number of accepted drafts of a chain: Σ_i P(the first i accepted), where
// P(first i accepted) = Σ over x_1…x_i of Π_j min(q_j(x_j), p_j(x_j)), both after x_<j.
double ExactMeanAccepted(const Experiment& e, int k) {
  const ToyModel target(e.vocab, 11, 1.2f);
  const ToyModel draft_noise(e.vocab, 12, 0.8f);
  const size_t v = static_cast<size_t>(e.vocab);
  std::function<double(const History&, double, int)> walk = [&](const History& path, double mass,
                                                                int depth) -> double {
    if (depth == k) return 0.0;
    const History out = Concat(e.output, path);
    const std::vector<double> p =
        TargetProbs(target.Logits(e.prompt, out), e.params, e.prompt, out);
    const std::vector<float>& a = target.Logits(e.prompt, out);
    const std::vector<float>& b = draft_noise.Logits(e.prompt, out);
    std::vector<double> q(v);
    double total = 0.0;
    for (size_t i = 0; i < v; ++i) total += q[i] = std::exp(static_cast<double>(a[i] + b[i]));
    double sum = 0.0;
    for (size_t x = 0; x < v; ++x) {
      const double m = mass * std::min(q[x] / total, p[x]);
      History next = path;
      next.push_back(static_cast<int32_t>(x));
      sum += m + walk(next, m, depth + 1);
    }
    return sum;
  };
  return walk({}, 1.0, 0);
}

void ExpectMeanAccepted(const Outcome& out, double exact, int replicas) {
  const double z = (out.mean_accepted - exact) / std::sqrt(out.var_accepted / replicas);
  EXPECT_LT(std::abs(z), 3.29) << "mean accepted " << out.mean_accepted << ", exact " << exact;
}

TEST(SpeculativeStatisticsTest, ChainWithDraftProbsKeepsTheTargetDistribution) {
  Experiment e;
  e.params.temperature = 1.0f;
  e.parents = ChainParents(3);
  e.chain = true;
  const Outcome out = RunExperiment(e);
  ExpectTargetDistribution(out);
  // The first token alone is distributed as p.
  const auto p0 = TargetProbs(ToyModel(e.vocab, 11, 1.2f).Logits(e.prompt, e.output), e.params,
                              e.prompt, e.output);
  const auto chi = ChiSquareTest(out.first_counts, p0);
  EXPECT_LT(chi.statistic, ChiSquareCritical(std::max(chi.df, 3)));
  ExpectMeanAccepted(out, ExactMeanAccepted(e, 3), e.replicas);
}

TEST(SpeculativeStatisticsTest, ChainWithPenaltiesAndTruncation) {
  Experiment e;
  e.vocab = 5;
  e.length = 3;
  e.params.temperature = 0.8f;
  e.params.repetition_penalty = 1.3f;
  e.params.frequency_penalty = 0.4f;
  e.params.presence_penalty = 0.3f;
  e.params.top_k = 4;
  e.params.top_p = 0.97f;
  e.params.min_p = 0.02f;
  e.params.logit_bias = {{2, 0.7f}};
  e.prompt = {0, 2};
  e.output = {3};
  e.parents = ChainParents(3);
  e.chain = true;
  // The test's own target equals the distribution Sample draws from, for every history used.
  const ToyModel target(e.vocab, 11, 1.2f);
  for (const History& extra :
       {History{}, History{1}, History{1, 4}, History{3, 3}, History{2, 0, 1}}) {
    const History out = Concat(e.output, extra);
    const std::vector<double> mine =
        TargetProbs(target.Logits(e.prompt, out), e.params, e.prompt, out);
    const std::vector<double> sampled =
        ProcessedProbs(target.Logits(e.prompt, out), e.params, e.prompt, out);
    ASSERT_EQ(sampled.size(), mine.size());
    for (size_t i = 0; i < mine.size(); ++i) EXPECT_NEAR(mine[i], sampled[i], 1e-5);
  }
  const Outcome out = RunExperiment(e);
  ExpectTargetDistribution(out);
  ExpectMeanAccepted(out, ExactMeanAccepted(e, 3), e.replicas);
}

TEST(SpeculativeStatisticsTest, ChainOfPointMasses) {
  Experiment e;
  e.params.temperature = 1.3f;
  e.params.top_k = 3;
  e.parents = ChainParents(2);
  e.chain = true;
  e.point_masses = true;
  ExpectTargetDistribution(RunExperiment(e));
}

// Width 3 at the root, 2 below, depth 3:  root → {0, 1, 2}; 0 → {3, 4}; 1 → {5}; 3 → {6, 7}.
const std::vector<int32_t> kTree = {-1, -1, -1, 0, 0, 1, 3, 3};

TEST(SpeculativeStatisticsTest, TreeWithDraftProbsKeepsTheTargetDistribution) {
  Experiment e;
  e.params.temperature = 0.9f;
  e.parents = kTree;
  ExpectTargetDistribution(RunExperiment(e));
}

TEST(SpeculativeStatisticsTest, TreeWithSiblingsDrawnWithoutReplacement) {
  Experiment e;
  e.params.temperature = 1.2f;
  e.params.min_p = 0.05f;
  e.parents = kTree;
  e.without_replacement = true;
  ExpectTargetDistribution(RunExperiment(e));
}

TEST(SpeculativeStatisticsTest, TreeOfDistinctPointMassesWithPenalties) {
  Experiment e;
  e.params.temperature = 1.1f;
  e.params.repetition_penalty = 1.5f;
  e.params.presence_penalty = 0.5f;
  e.params.top_p = 0.95f;
  e.parents = kTree;
  e.point_masses = true;
  ExpectTargetDistribution(RunExperiment(e));
}

// Every other processor: the first emitted token of a chain (k = 2, drafts from a random q) follows
// the distribution the reference pipeline (ReferenceSampler, PROCESSED_LOGPROBS) samples from for
// the same row and history — DRY, no-repeat-ngram, typical_p, epsilon / eta cutoff, top_n_sigma,
// dynamic temperature, min_tokens, bad_words, allowed_token_ids, custom stage orders.
TEST(SpeculativeStatisticsTest, FirstTokenFollowsTheReferencePipelineForEveryProcessor) {
  constexpr int kVocab = 8, kDrafts = 2, kReplicas = 20000;
  const History prompt = {1, 2, 3, 1, 2}, output = {3, 1};
  std::vector<SamplingParams> configs(6);
  configs[0].dry_multiplier = 1.5f;  // the history ends in 3 1 after 1 2 3 1 2 3 1: DRY bites
  configs[0].dry_allowed_length = 1;
  configs[0].typical_p = 0.9f;
  configs[1].no_repeat_ngram_size = 2;
  configs[1].eta_cutoff = 0.05f;
  configs[2].top_n_sigma = 1.0f;
  configs[2].min_tokens = 5;
  configs[2].eos_token_ids = {0};
  configs[3].dynatemp_range = 0.5f;
  configs[3].epsilon_cutoff = 0.03f;
  configs[3].bad_words = {{1, 4}};
  configs[4].allowed_token_ids = {0, 2, 4, 5, 6, 7};
  configs[4].sampler_order = {Stage::kMinP, Stage::kTemperature, Stage::kTopK};
  configs[4].min_p = 0.05f;
  configs[4].top_k = 4;
  configs[4].temperature = 1.5f;
  configs[5].penalty_last_n = 2;
  configs[5].repetition_penalty = 2.0f;
  configs[5].token_bitmask = std::string(1, static_cast<char>(0xef));  // token 4 not allowed
  std::mt19937_64 gen(99);
  const std::vector<float> target = RandomLogits(kDrafts + 1, kVocab, 31);
  for (size_t c = 0; c < configs.size(); ++c) {
    SamplingParams& base = configs[c];
    // The reference's distribution at position 0.
    SamplingParams reference_params = base;
    reference_params.seed = 1;
    reference_params.logprobs = -1;
    reference_params.logprobs_mode = LogprobsMode::kProcessedLogprobs;
    const std::vector<uint8_t> row0 =
        F32Bytes(std::vector<float>(target.begin(), target.begin() + kVocab));
    const RowRequest reference_row{&reference_params, prompt, output, std::nullopt};
    auto reference = ReferenceSampler().Run(*LogitsView::Create(DType::kFloat32, 1, kVocab, row0),
                                            {&reference_row, 1});
    ASSERT_TRUE(reference.ok()) << reference.status();
    std::vector<double> p0(kVocab, 0.0);
    for (const TokenLogprob& t : (*reference)[0].top_logprobs) {
      p0[static_cast<size_t>(t.token_id)] = std::exp(static_cast<double>(t.logprob));
    }
    // Random draft distributions and drafts.
    std::vector<float> q(static_cast<size_t>(kDrafts * kVocab));
    std::uniform_real_distribution<float> uniform(0.05f, 1.0f);
    for (int j = 0; j < kDrafts; ++j) {
      float total = 0.0f;
      for (int y = 0; y < kVocab; ++y)
        total += q[static_cast<size_t>(j * kVocab + y)] = uniform(gen);
      for (int y = 0; y < kVocab; ++y) q[static_cast<size_t>(j * kVocab + y)] /= total;
    }
    std::vector<float> logits;
    std::vector<History> drafts(kReplicas);
    std::vector<SamplingParams> params(kReplicas, base);
    std::vector<VerifyRowRequest> rows(kReplicas);
    const std::vector<uint8_t> q_bytes = F32Bytes(q);
    const LogitsView q_view = *LogitsView::Create(DType::kFloat32, kDrafts, kVocab, q_bytes);
    for (int n = 0; n < kReplicas; ++n) {
      const size_t ni = static_cast<size_t>(n);
      params[ni].seed = static_cast<uint64_t>(n);
      for (int j = 0; j < kDrafts; ++j) {
        std::discrete_distribution<int32_t> draw(q.begin() + j * kVocab,
                                                 q.begin() + (j + 1) * kVocab);
        drafts[ni].push_back(draw(gen));
      }
      logits.insert(logits.end(), target.begin(), target.end());
      rows[ni].row = RowRequest{&params[ni], prompt, output, std::nullopt};
      rows[ni].drafts.token_ids = drafts[ni];
      rows[ni].drafts.probs = q_view;
    }
    const std::vector<uint8_t> bytes = F32Bytes(logits);
    Sampler sampler;
    Verifier verifier(sampler);
    auto results = verifier.Run(
        *LogitsView::Create(DType::kFloat32, kReplicas * (kDrafts + 1), kVocab, bytes), rows);
    ASSERT_TRUE(results.ok()) << results.status();
    std::vector<int64_t> first(kVocab, 0);
    for (const VerifyResult& r : *results) ++first[static_cast<size_t>(r.tokens[0].token_id)];
    const auto chi = ChiSquareTest(first, p0);
    ASSERT_GE(chi.df, 1) << "config " << c;
    EXPECT_LT(chi.statistic, testing::ChiSquareCritical001(chi.df))
        << "config " << c << ": chi-square " << chi.statistic << " with " << chi.df << " df";
  }
}

// --- Exact behaviour ---------------------------------------------------------------------

struct Single {
  std::vector<float> logits;  // (k + 1) × vocab
  int vocab;
  SamplingParams params;
  History prompt, output, drafts;
  std::vector<float> probs;  // k × vocab, empty = point masses
  std::vector<int32_t> parents;
  std::optional<float> mu;
};

absl::StatusOr<VerifyResult> VerifySingle(const Single& s) {
  const std::vector<uint8_t> bytes = F32Bytes(s.logits);
  auto view = LogitsView::Create(
      DType::kFloat32, static_cast<uint32_t>(s.logits.size() / static_cast<size_t>(s.vocab)),
      static_cast<uint32_t>(s.vocab), bytes);
  if (!view.ok()) return view.status();
  const std::vector<uint8_t> prob_bytes = F32Bytes(s.probs);
  VerifyRowRequest row;
  row.row = RowRequest{&s.params, s.prompt, s.output, s.mu};
  row.drafts.token_ids = s.drafts;
  row.drafts.parents = s.parents;
  if (!s.probs.empty()) {
    row.drafts.probs = *LogitsView::Create(
        DType::kFloat32, static_cast<uint32_t>(s.probs.size() / static_cast<size_t>(s.vocab)),
        static_cast<uint32_t>(s.vocab), prob_bytes);
  }
  Sampler sampler;
  Verifier verifier(sampler);
  auto results = verifier.Run(*view, {&row, 1});
  if (!results.ok()) return results.status();
  return (*results)[0];
}

// Greedy: decoding with Sample one token at a time, and verifying drafts (some right, some
// wrong) against the same target, give exactly the same tokens.
TEST(SpeculativeTest, GreedyVerifyGivesTheTokensOfGreedyDecoding) {
  const int vocab = 50;
  const ToyModel target(vocab, 5, 2.0f);
  const ToyModel draft(vocab, 6, 2.0f);
  SamplingParams params;
  params.temperature = 0.0f;
  params.repetition_penalty = 1.4f;
  params.frequency_penalty = 0.2f;
  params.logit_bias = {{7, 1.0f}};
  const History prompt = {3, 9};
  constexpr size_t kTokens = 40;
  History greedy;
  while (greedy.size() < kTokens) {
    auto token = testing::SampleRow(target.Logits(prompt, greedy), params, prompt, greedy);
    ASSERT_TRUE(token.ok()) << token.status();
    greedy.push_back((*token)[0].token_id);
  }
  for (int k : {1, 3, 6}) {
    History decoded;
    int calls = 0;
    while (decoded.size() < kTokens) {
      Single s;
      s.vocab = vocab;
      s.params = params;
      s.prompt = prompt;
      s.output = decoded;
      // Draft: every other call the true continuation's first tokens, else the draft model's
      // argmax chain (mostly wrong).
      History path = decoded;
      for (int j = 0; j < k; ++j) {
        int32_t x;
        if (calls % 2 == 0 && path.size() < greedy.size() && j < 2) {
          x = greedy[path.size()];
        } else {
          const auto& l = draft.Logits(prompt, path);
          x = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
        }
        s.drafts.push_back(x);
        path.push_back(x);
      }
      History context = decoded;
      for (int j = 0; j <= k; ++j) {
        const auto& row = target.Logits(prompt, context);
        s.logits.insert(s.logits.end(), row.begin(), row.end());
        if (j < k) context.push_back(s.drafts[static_cast<size_t>(j)]);
      }
      auto result = VerifySingle(s);
      ASSERT_TRUE(result.ok()) << result.status();
      for (const SampledToken& t : result->tokens) decoded.push_back(t.token_id);
      ++calls;
    }
    decoded.resize(kTokens);
    EXPECT_EQ(decoded, greedy) << "k = " << k;
  }
}

TEST(SpeculativeTest, GreedyTreeAcceptsTheArgmaxPath) {
  // Root argmax is 2; node 1 (token 2) has children 3 (token 0) and 4 (token 1); node 4's row
  // has argmax 3, and node 4 is a leaf: tokens 2, 1, then the bonus 3.
  const int vocab = 4;
  Single s;
  s.vocab = vocab;
  s.params.temperature = 0.0f;
  s.drafts = {1, 2, 3, 0, 1};
  s.parents = {-1, -1, 0, 1, 1};
  s.logits = {0, 0, 5, 0,   // root
              0, 0, 0, 0,   // node 0
              0, 5, 0, 0,   // node 1 (after 2): argmax 1
              0, 0, 0, 0,   // node 2
              0, 0, 0, 0,   // node 3
              0, 0, 0, 5};  // node 4 (after 2, 1): argmax 3
  auto result = VerifySingle(s);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->tokens.size(), 3u);
  EXPECT_EQ(result->tokens[0].token_id, 2);
  EXPECT_EQ(result->tokens[1].token_id, 1);
  EXPECT_EQ(result->tokens[2].token_id, 3);
  EXPECT_EQ(result->accepted_nodes, (std::vector<int32_t>{1, 4}));
  EXPECT_EQ(result->tokens[2].row_index, 5u);
}

// With no drafts, Verify is Sample: the same token, logprobs, finish and μ for every processor.
TEST(SpeculativeTest, NoDraftsEqualsSample) {
  const int vocab = 64;
  std::mt19937_64 gen(3);
  for (int i = 0; i < 60; ++i) {
    SamplingParams p;
    p.seed = static_cast<uint64_t>(i);
    p.temperature = 0.5f + 0.1f * static_cast<float>(i % 10);
    p.logprobs = i % 3 == 0 ? -1 : 3;
    p.logprobs_mode = static_cast<LogprobsMode>(i % 4);
    if (i % 5 == 1) p.top_k = 10;
    if (i % 5 == 2) p.top_p = 0.8f;
    if (i % 7 == 3) p.mirostat_mode = 1 + i % 2;
    if (i % 6 == 4) {
      p.xtc_probability = 0.5f;
      p.xtc_threshold = 0.05f;
    }
    if (i % 4 == 1) {
      p.dry_multiplier = 0.8f;
      p.no_repeat_ngram_size = 2;
    }
    if (i % 9 == 0) p.temperature = 0.0f;
    p.eos_token_ids = {5};
    const std::vector<float> logits = RandomLogits(1, vocab, static_cast<uint64_t>(i));
    const History prompt = {1, 2, 3, 1, 2};
    const History output = {4, 1, 2};
    const std::optional<float> mu =
        p.mirostat_mode != 0 ? std::optional<float>(7.5f) : std::nullopt;
    auto sampled = testing::SampleRow(logits, p, prompt, output, mu);
    ASSERT_TRUE(sampled.ok()) << sampled.status();
    Single s{logits, vocab, p, prompt, output, {}, {}, {}, mu};
    auto verified = VerifySingle(s);
    ASSERT_TRUE(verified.ok()) << verified.status();
    ASSERT_EQ(verified->tokens.size(), 1u);
    const SampledToken& a = (*sampled)[0];
    const SampledToken& b = verified->tokens[0];
    EXPECT_EQ(a.token_id, b.token_id) << i;
    EXPECT_EQ(a.logprob, b.logprob) << i;
    EXPECT_EQ(a.top_logprobs.size(), b.top_logprobs.size()) << i;
    EXPECT_EQ(a.finish_reason, b.finish_reason) << i;
    EXPECT_EQ(a.mirostat_mu, b.mirostat_mu) << i;
  }
}

// The emitted tokens' logprobs are those of their own positions, in every mode: equal to what
// Sample reports (top_logprobs, and the value listed for that token) for the same history.
TEST(SpeculativeTest, LogprobsOfEmittedTokensAreTheirPositions) {
  const int vocab = 12;
  for (int mode = 0; mode < 4; ++mode) {
    for (int trial = 0; trial < 10; ++trial) {
      Single s;
      s.vocab = vocab;
      s.params.seed = static_cast<uint64_t>(trial);
      s.params.temperature = 0.9f;
      s.params.top_k = 6;
      s.params.repetition_penalty = 1.2f;
      s.params.logprobs = -1;
      s.params.logprobs_mode = static_cast<LogprobsMode>(mode);
      s.prompt = {1};
      s.drafts = {2, 3, 2};
      s.logits = RandomLogits(4, vocab, 100 + static_cast<uint64_t>(trial));
      // Make the drafts likely so that several are accepted.
      for (int j = 0; j < 3; ++j)
        s.logits[static_cast<size_t>(j * vocab + s.drafts[static_cast<size_t>(j)])] += 4.0f;
      auto result = VerifySingle(s);
      ASSERT_TRUE(result.ok()) << result.status();
      History out;
      for (size_t i = 0; i < result->tokens.size(); ++i) {
        const SampledToken& t = result->tokens[i];
        const std::vector<float> row(s.logits.begin() + static_cast<long>(i) * vocab,
                                     s.logits.begin() + static_cast<long>(i + 1) * vocab);
        auto sampled = testing::SampleRow(row, s.params, s.prompt, out);
        ASSERT_TRUE(sampled.ok());
        const auto& top = (*sampled)[0].top_logprobs;
        ASSERT_EQ(t.top_logprobs.size(), top.size());
        bool listed = false;
        for (const TokenLogprob& entry : top) {
          if (entry.token_id == t.token_id) {
            EXPECT_FLOAT_EQ(t.logprob, entry.logprob) << "mode " << mode << " position " << i;
            listed = true;
          }
        }
        EXPECT_TRUE(listed) << "mode " << mode;
        out.push_back(t.token_id);
      }
    }
  }
}

TEST(SpeculativeTest, EosInsideTheAcceptedRunEndsIt) {
  Single s;
  s.vocab = 4;
  s.params.temperature = 1.0f;
  s.params.seed = 7;
  s.params.eos_token_ids = {3};
  s.params.logprobs = 0;
  s.drafts = {1, 3, 2};
  // Every draft has target probability ≈ 1: all accepted up to the EOS.
  s.logits = {0, 40, 0, 0, 0, 0, 0, 40, 0, 0, 40, 0, 40, 0, 0, 0};
  auto result = VerifySingle(s);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->tokens.size(), 2u);
  EXPECT_EQ(result->num_accepted(), 2u);
  EXPECT_EQ(result->tokens[1].token_id, 3);
  EXPECT_EQ(result->tokens[0].finish_reason, FinishReason::kNone);
  EXPECT_EQ(result->tokens[1].finish_reason, FinishReason::kEos);

  s.params.eos_token_ids = {};
  s.params.stop_token_sequences = {{1, 3}};
  result = VerifySingle(s);
  ASSERT_TRUE(result.ok());
  ASSERT_EQ(result->tokens.size(), 2u);
  EXPECT_EQ(result->tokens[1].finish_reason, FinishReason::kStop);
  EXPECT_EQ(result->tokens[1].stop_sequence_index, 0u);

  s.params.stop_token_sequences = {};
  s.params.max_tokens = 3;
  s.output = {0};
  result = VerifySingle(s);
  ASSERT_TRUE(result.ok());
  ASSERT_EQ(result->tokens.size(), 2u);
  EXPECT_EQ(result->tokens[1].finish_reason, FinishReason::kLength);
}

TEST(SpeculativeTest, MinTokensMasksEosAtDraftPositions) {
  // EOS (3) is the target's favourite everywhere, but min_tokens = 2 masks it at positions 0
  // and 1 (history length 0 and 1): a drafted EOS there is never accepted.
  Single s;
  s.vocab = 4;
  s.params.seed = 1;
  s.params.eos_token_ids = {3};
  s.params.min_tokens = 2;
  s.drafts = {3};
  s.logits = {0, 0, 0, 30, 0, 0, 0, 30};
  for (uint64_t seed = 0; seed < 20; ++seed) {
    s.params.seed = seed;
    auto result = VerifySingle(s);
    ASSERT_TRUE(result.ok());
    EXPECT_EQ(result->num_accepted(), 0u);
    EXPECT_NE(result->tokens[0].token_id, 3);
  }
}

TEST(SpeculativeTest, SeededRowsAreReproducibleAndUseTheDocumentedStreams) {
  Single s;
  s.vocab = 16;
  s.params.seed = 42;
  s.params.temperature = 1.0f;
  s.drafts = {4, 5, 6};
  s.logits = RandomLogits(4, 16, 9);
  s.probs.assign(3 * 16, 1.0f / 16.0f);
  auto a = VerifySingle(s);
  auto b = VerifySingle(s);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(a->tokens.size(), b->tokens.size());
  for (size_t i = 0; i < a->tokens.size(); ++i)
    EXPECT_EQ(a->tokens[i].token_id, b->tokens[i].token_id);
  // Position 0: accepted exactly when the kAccept coin of step 0 is below p(x) / q(x).
  const std::vector<double> p0 =
      ProcessedProbs(std::vector<float>(s.logits.begin(), s.logits.begin() + 16), s.params);
  const double u = UniformDouble(42, 0, 0, DrawPurpose::kAccept, 0);
  EXPECT_EQ(a->num_accepted() > 0, u < p0[4] * 16.0);
}

TEST(SpeculativeTest, MirostatMuFollowsTheEmittedTokens) {
  Single s;
  s.vocab = 8;
  s.params.mirostat_mode = 2;
  s.params.mirostat_tau = 3.0f;
  s.params.mirostat_eta = 0.2f;
  s.drafts = {1, 2};
  s.mu = 6.0f;
  s.logits = RandomLogits(3, 8, 21);
  s.logits[1] += 5.0f;
  s.logits[8 + 2] += 5.0f;
  for (uint64_t seed = 0; seed < 10; ++seed) {
    s.params.seed = seed;
    auto result = VerifySingle(s);
    ASSERT_TRUE(result.ok());
    float mu = *s.mu;
    History out;
    for (size_t i = 0; i < result->tokens.size(); ++i) {
      const std::vector<float> row(s.logits.begin() + static_cast<long>(i) * 8,
                                   s.logits.begin() + static_cast<long>(i + 1) * 8);
      SamplingParams p = s.params;
      p.logprobs = -1;
      p.logprobs_mode = LogprobsMode::kProcessedLogprobs;
      auto sampled = testing::SampleRow(row, p, {}, out, mu);
      ASSERT_TRUE(sampled.ok());
      double prob = 0.0;
      for (const TokenLogprob& t : (*sampled)[0].top_logprobs) {
        if (t.token_id == result->tokens[i].token_id)
          prob = std::exp(static_cast<double>(t.logprob));
      }
      ASSERT_GT(prob, 0.0);
      const double expected = mu - 0.2 * (-std::log2(prob) - 3.0);
      ASSERT_TRUE(result->tokens[i].mirostat_mu.has_value());
      EXPECT_NEAR(*result->tokens[i].mirostat_mu, expected, 1e-4);
      mu = *result->tokens[i].mirostat_mu;
      out.push_back(result->tokens[i].token_id);
    }
  }
}

// --- Errors --------------------------------------------------------------------------------

struct ErrorCase {
  const char* name;
  std::function<void(Single&)> change;
  const char* message;
  friend void PrintTo(const ErrorCase& c, std::ostream* os) { *os << c.name; }
};

class SpeculativeErrorTest : public ::testing::TestWithParam<ErrorCase> {};

TEST_P(SpeculativeErrorTest, NamesTheFieldAndValue) {
  Single s;
  s.vocab = 4;
  s.params.seed = 1;
  s.drafts = {1, 2};
  s.logits = RandomLogits(3, 4, 1);
  s.probs = {0.1f, 0.6f, 0.2f, 0.1f, 0.25f, 0.25f, 0.25f, 0.25f};
  GetParam().change(s);
  auto result = VerifySingle(s);
  ASSERT_FALSE(result.ok());
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(result.status().message(), HasSubstr(GetParam().message));
}

INSTANTIATE_TEST_SUITE_P(
    All, SpeculativeErrorTest,
    ::testing::Values(
        ErrorCase{"MissingTargetRow", [](Single& s) { s.logits.resize(8); },
                  "logits.rows is 2 but the rows need 3"},
        ErrorCase{"ExtraTargetRow", [](Single& s) { s.logits.resize(16, 0.0f); },
                  "logits.rows is 4 but the rows need 3"},
        ErrorCase{"DraftProbsRows", [](Single& s) { s.probs.resize(4); },
                  "rows[0].draft_probs.rows is 1 but draft_token_ids has 2 drafts"},
        ErrorCase{"DraftIdOutOfRange", [](Single& s) { s.drafts[1] = 4; },
                  "rows[0].draft_token_ids[1] = 4 is out of range [0, 4)"},
        ErrorCase{"NegativeDraftId", [](Single& s) { s.drafts[0] = -1; },
                  "rows[0].draft_token_ids[0] = -1 is out of range [0, 4)"},
        ErrorCase{
            "NegativeProbability",
            [](Single& s) {
              s.probs[2] = -0.2f;
              s.probs[3] = 0.5f;
            },
            "rows[0].draft_probs row 0, token 2 is -0.2; probabilities must be finite and ≥ 0"},
        ErrorCase{"NaNProbability", [](Single& s) { s.probs[5] = NAN; },
                  "rows[0].draft_probs row 1, token 1 is nan"},
        ErrorCase{"NotSummingToOne", [](Single& s) { s.probs[7] = 0.3f; },
                  "rows[0].draft_probs row 1 sums to 1.05; it must sum to 1 within 0.001"},
        ErrorCase{"ZeroProbabilityForItsDraft",
                  [](Single& s) {
                    s.probs[1] = 0.0f;
                    s.probs[0] = 0.7f;
                  },
                  "rows[0].draft_probs row 0 gives draft_token_ids[0] = 1 probability 0"},
        ErrorCase{"ParentsCount", [](Single& s) { s.parents = {-1}; },
                  "rows[0].draft_parents has 1 entries but draft_token_ids has 2"},
        ErrorCase{"ParentOutOfRange",
                  [](Single& s) {
                    s.parents = {-1, 2};
                  },
                  "rows[0].draft_parents[1] = 2 is out of range [-1, 2)"},
        ErrorCase{"ParentBelowRoot",
                  [](Single& s) {
                    s.parents = {-2, 0};
                  },
                  "rows[0].draft_parents[0] = -2 is out of range [-1, 2)"},
        ErrorCase{"ForwardReference",
                  [](Single& s) {
                    s.drafts = {1, 2, 3};
                    s.parents = {1, -1, 0};
                    s.logits.resize(16, 0.0f);
                    s.probs.clear();
                  },
                  "rows[0].draft_parents[0] = 1 is a forward reference"},
        // The cycle check follows parents[1] = 41 before the loop has range-checked it: it
        // read past the end of the parents (found by fuzzing, tests/fuzz/request_fuzzer.cc).
        ErrorCase{"ForwardReferenceToAnOutOfRangeParent",
                  [](Single& s) {
                    s.drafts = {1, 2, 3};
                    s.parents = {1, 41, -1};
                    s.logits.resize(16, 0.0f);
                    s.probs.clear();
                  },
                  "rows[0].draft_parents[0] = 1 is a forward reference"},
        ErrorCase{"SelfParent",
                  [](Single& s) {
                    s.parents = {-1, 1};
                  },
                  "rows[0].draft_parents[1] = 1 makes a cycle (1 -> 1)"},
        ErrorCase{"Cycle",
                  [](Single& s) {
                    s.parents = {1, 0};
                  },
                  "rows[0].draft_parents[0] = 1 makes a cycle (0 -> 1 -> 0)"},
        ErrorCase{"NMustBeOne", [](Single& s) { s.params.n = 2; },
                  "rows[0].params.n must be 1 to verify drafts, got 2"},
        ErrorCase{"HistoryOutOfRange", [](Single& s) { s.output = {9}; },
                  "rows[0].output_token_ids[0] = 9 is out of range [0, 4)"},
        ErrorCase{"AlreadyFinished",
                  [](Single& s) {
                    s.params.max_tokens = 1;
                    s.output = {0};
                  },
                  "rows[0].output_token_ids has 1 tokens and max_tokens is 1"},
        ErrorCase{"NaNTarget", [](Single& s) { s.logits[9] = NAN; },
                  "logits.data is NaN at row 2, token 1"},
        ErrorCase{"EveryTokenMasked",
                  [](Single& s) {
                    s.params.allowed_token_ids = {1};
                    s.params.no_repeat_ngram_size = 1;
                    s.output = {1};
                    s.drafts = {0, 0};
                    s.probs.clear();
                  },
                  "rows[0] (target logits row 0): every token is masked"}),
    [](const ::testing::TestParamInfo<ErrorCase>& param) { return std::string(param.param.name); });

TEST(SpeculativeTest, DraftVocabularySmallerThanTheTarget) {
  Single s;
  s.vocab = 4;
  s.params.seed = 3;
  s.drafts = {1};
  s.logits = RandomLogits(2, 4, 2);
  const std::vector<float> probs = {0.5f, 0.5f};  // a 2-token draft vocabulary
  const std::vector<uint8_t> bytes = F32Bytes(s.logits);
  const std::vector<uint8_t> prob_bytes = F32Bytes(probs);
  VerifyRowRequest row;
  row.row = RowRequest{&s.params, {}, {}, std::nullopt};
  row.drafts.token_ids = s.drafts;
  row.drafts.probs = *LogitsView::Create(DType::kFloat32, 1, 2, prob_bytes);
  Sampler sampler;
  Verifier verifier(sampler);
  auto ok = verifier.Run(*LogitsView::Create(DType::kFloat32, 2, 4, bytes), {&row, 1});
  ASSERT_TRUE(ok.ok()) << ok.status();
  row.drafts.probs = *LogitsView::Create(DType::kFloat32, 1, 2, prob_bytes);
  const std::vector<float> wide(8, 0.125f);
  const std::vector<uint8_t> wide_bytes = F32Bytes(wide);
  row.drafts.probs = *LogitsView::Create(DType::kFloat32, 1, 8, wide_bytes);
  auto bad = verifier.Run(*LogitsView::Create(DType::kFloat32, 2, 4, bytes), {&row, 1});
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(),
              HasSubstr("rows[0].draft_probs.vocab_size is 8 but the target vocabulary"));
}

TEST(SpeculativeTest, CancelledBeforeTheRowsRan) {
  Single s;
  s.vocab = 4;
  s.drafts = {1};
  s.logits = RandomLogits(2, 4, 2);
  const std::vector<uint8_t> bytes = F32Bytes(s.logits);
  VerifyRowRequest row;
  row.row = RowRequest{&s.params, {}, {}, std::nullopt};
  row.drafts.token_ids = s.drafts;
  Sampler sampler;
  Verifier verifier(sampler);
  std::atomic<bool> cancelled{true};
  auto result =
      verifier.Run(*LogitsView::Create(DType::kFloat32, 2, 4, bytes), {&row, 1}, &cancelled);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled);
}

}  // namespace
}  // namespace tokensampler
