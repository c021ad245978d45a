// SequenceTable: server-side sequence state gives exactly what Sample gives with full histories.
#include "core/session.h"

#include <atomic>
#include <map>
#include <random>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/core_testing.h"

namespace tokensampler {
namespace {

using ::testing::HasSubstr;
using ::tokensampler::testing::F32Bytes;

// Row `step` of a toy model for sequence `id`: a deterministic function of (id, step, last token).
std::vector<float> ToyLogits(uint64_t id, size_t step, int32_t last, int vocab) {
  std::vector<float> row(static_cast<size_t>(vocab));
  for (int i = 0; i < vocab; ++i) {
    row[static_cast<size_t>(i)] = static_cast<float>(
        3.0 * std::sin(0.37 * static_cast<double>(i) * static_cast<double>(id % 7 + 1) +
                       0.11 * static_cast<double>(step) + 0.05 * last));
  }
  return row;
}

SamplingParams RandomParams(std::mt19937_64& rng, int vocab) {
  SamplingParams p;
  p.seed = rng();
  switch (rng() % 6) {
    case 0:
      p.temperature = 0.0f;
      break;
    case 1:
      p.top_k = 5;
      p.top_p = 0.9f;
      break;
    case 2:
      p.min_p = 0.1f;
      p.temperature = 0.8f;
      break;
    case 3:
      p.mirostat_mode = static_cast<int32_t>(1 + rng() % 2);
      p.mirostat_tau = 3.0f;
      break;
    case 4:
      p.dry_multiplier = 0.8f;
      p.no_repeat_ngram_size = 3;
      break;
    default:
      p.xtc_probability = 0.5f;
      p.typical_p = 0.8f;
      break;
  }
  p.repetition_penalty = 1.0f + static_cast<float>(rng() % 3) * 0.2f;
  p.frequency_penalty = static_cast<float>(rng() % 3) * 0.3f;
  p.presence_penalty = static_cast<float>(rng() % 2) * 0.5f;
  p.eos_token_ids = {static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab))};
  p.min_tokens = 3;
  p.max_tokens = 50;
  p.logprobs = 2;
  return p;
}

// The acceptance test of issue 5 at the core level: 200 random sequences decoded for up to 50
// steps through a SequenceTable give exactly the tokens of Sample with full histories.
TEST(SequenceTableTest, EquivalentToSampleWithFullHistories) {
  constexpr int kVocab = 64;
  std::mt19937_64 rng(2024);
  SequenceTable table(SessionLimits{});
  Sampler sampler;
  struct Ref {
    SamplingParams params;
    std::vector<int32_t> prompt, output;
    std::optional<float> mu;
    bool done = false;
  };
  std::map<uint64_t, Ref> refs;
  for (uint64_t id = 100; id < 300; ++id) {
    Ref ref;
    ref.params = RandomParams(rng, kVocab);
    for (int i = 0; i < 5; ++i) ref.prompt.push_back(static_cast<int32_t>(rng() % kVocab));
    ASSERT_TRUE(table.Add(id, ref.params, ref.prompt).ok());
    refs[id] = ref;
  }
  int finished = 0;
  for (size_t step = 0; step < 50 && table.size() > 0; ++step) {
    std::vector<uint64_t> ids;
    std::vector<float> logits;
    for (auto& [id, ref] : refs) {
      if (ref.done) continue;
      ids.push_back(id);
      const int32_t last = ref.output.empty() ? ref.prompt.back() : ref.output.back();
      const auto row = ToyLogits(id, step, last, kVocab);
      logits.insert(logits.end(), row.begin(), row.end());
    }
    const auto bytes = F32Bytes(logits);
    auto view =
        LogitsView::Create(DType::kFloat32, static_cast<uint32_t>(ids.size()), kVocab, bytes);
    // Reference: a stateless batch with full histories.
    std::vector<RowRequest> rows;
    for (uint64_t id : ids) {
      const Ref& ref = refs[id];
      rows.push_back({&ref.params, ref.prompt, ref.output, ref.mu});
    }
    auto want = sampler.Run(*view, rows);
    ASSERT_TRUE(want.ok()) << want.status();
    auto got = table.Step(sampler, *view, ids);
    ASSERT_TRUE(got.ok()) << got.status();
    for (size_t i = 0; i < ids.size(); ++i) {
      const SampledToken& w = (*want)[i];
      const SampledToken& g = (*got)[i].token;
      ASSERT_EQ(g.token_id, w.token_id) << "sequence " << ids[i] << " step " << step;
      ASSERT_EQ(g.logprob, w.logprob);
      ASSERT_EQ(g.finish_reason, w.finish_reason);
      ASSERT_EQ(g.mirostat_mu, w.mirostat_mu);
      Ref& ref = refs[ids[i]];
      ref.output.push_back(w.token_id);
      if (w.mirostat_mu) ref.mu = w.mirostat_mu;
      if (w.finish_reason != FinishReason::kNone) {
        ref.done = true;
        ++finished;
        EXPECT_FALSE(table.contains(ids[i]));  // released automatically
      }
    }
  }
  EXPECT_GT(finished, 20);     // EOS and max_tokens both occur
  EXPECT_EQ(table.size(), 0);  // everything finished by max_tokens = 50
}

std::vector<uint8_t> FlatRows(int rows, int vocab) {
  std::vector<float> logits(static_cast<size_t>(rows * vocab), 0.0f);
  return F32Bytes(logits);
}

TEST(SequenceTableTest, ForkedChildrenAreTheNSamplesOfSample) {
  constexpr int kVocab = 1000;
  SamplingParams p;
  p.seed = 31;
  SequenceTable table(SessionLimits{});
  Sampler sampler;
  ASSERT_TRUE(table.Add(1, p, {3, 4}).ok());
  ASSERT_TRUE(table.Fork(1, std::vector<uint64_t>{2, 3, 4}).ok());
  const auto bytes = FlatRows(4, kVocab);
  auto view = LogitsView::Create(DType::kFloat32, 4, kVocab, bytes);
  const std::vector<uint64_t> ids = {1, 2, 3, 4};
  auto got = table.Step(sampler, *view, ids);
  ASSERT_TRUE(got.ok());
  SamplingParams n4 = p;
  n4.n = 4;
  const std::vector<int32_t> prompt = {3, 4};
  auto want = testing::SampleRow(std::vector<float>(kVocab, 0.0f), n4, prompt, {});
  ASSERT_TRUE(want.ok());
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ((*got)[i].token.token_id, (*want)[i].token_id) << i;
}

TEST(SequenceTableTest, ErrorsChangeNothing) {
  SequenceTable table(SessionLimits{.max_sequences = 3, .max_history_tokens = 6});
  Sampler sampler;
  SamplingParams p;
  p.seed = 1;
  ASSERT_TRUE(table.Add(1, p, {0, 1}).ok());
  EXPECT_EQ(table.Add(1, p, {}).code(), absl::StatusCode::kAlreadyExists);
  SamplingParams bad = p;
  bad.top_p = 2.0f;
  EXPECT_EQ(table.Add(2, bad, {}).message(), "top_p must be in (0, 1], got 2");
  bad = p;
  bad.n = 2;
  EXPECT_THAT(std::string(table.Add(2, bad, {}).message()), HasSubstr("n must be 1 in a session"));
  EXPECT_EQ(table.Add(2, p, std::vector<int32_t>(7, 0)).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(table.Fork(9, std::vector<uint64_t>{5}).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(table.Fork(1, std::vector<uint64_t>{5, 6, 7}).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(table.Fork(1, std::vector<uint64_t>{5, 5}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(table.size(), 1);

  const auto bytes = FlatRows(2, 10);
  auto view2 = LogitsView::Create(DType::kFloat32, 2, 10, bytes);
  auto unknown = table.Step(sampler, *view2, std::vector<uint64_t>{1, 42});
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(unknown.status().message(),
            "sequence 42 is not in this session (never added, released or finished)");
  EXPECT_EQ(table.Step(sampler, *view2, std::vector<uint64_t>{1, 1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(table.Step(sampler, *view2, std::vector<uint64_t>{1}).status().code(),
            absl::StatusCode::kInvalidArgument);

  // Token ids are checked against the real vocabulary at the step.
  SamplingParams big = p;
  big.eos_token_ids = {50};
  ASSERT_TRUE(table.Add(3, big, {}).ok());
  auto view1 =
      LogitsView::Create(DType::kFloat32, 1, 10, absl::MakeConstSpan(bytes).subspan(0, 40));
  EXPECT_EQ(table.Step(sampler, *view1, std::vector<uint64_t>{3}).status().message(),
            "sequence 3: params.eos_token_ids[0] = 50 is out of range [0, 10)");

  // History limit: 2 prompt + 4 outputs = 6, the fifth step would make 7.
  for (int i = 0; i < 4; ++i)
    ASSERT_TRUE(table.Step(sampler, *view1, std::vector<uint64_t>{1}).ok());
  EXPECT_EQ(table.Step(sampler, *view1, std::vector<uint64_t>{1}).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(table.Release(1).ok());
  EXPECT_EQ(table.Release(1).code(), absl::StatusCode::kNotFound);
}

TEST(SequenceTableTest, RowErrorsNameTheSequence) {
  SequenceTable table(SessionLimits{});
  Sampler sampler;
  SamplingParams p;
  p.allowed_token_ids = {1};
  p.logit_bias = {{1, -std::numeric_limits<float>::infinity()}};
  ASSERT_TRUE(table.Add(77, p, {}).ok());
  const auto bytes = FlatRows(1, 4);
  auto view = LogitsView::Create(DType::kFloat32, 1, 4, bytes);
  EXPECT_THAT(std::string(table.Step(sampler, *view, std::vector<uint64_t>{77}).status().message()),
              ::testing::StartsWith("sequence 77, rows[0]: every token is masked"));
  EXPECT_TRUE(table.contains(77));
}

TEST(SequenceTableTest, CancelledStepChangesNothing) {
  SequenceTable table(SessionLimits{});
  Sampler sampler;
  SamplingParams p;
  p.seed = 5;
  p.max_tokens = 1;
  ASSERT_TRUE(table.Add(1, p, {2}).ok());
  const auto bytes = FlatRows(1, 10);
  auto view = LogitsView::Create(DType::kFloat32, 1, 10, bytes);
  const std::atomic<bool> cancelled(true);
  auto step = table.Step(sampler, *view, std::vector<uint64_t>{1}, &cancelled);
  EXPECT_EQ(step.status().code(), absl::StatusCode::kCancelled);
  // Still live with an empty output: the next step is the sequence's first (and, with
  // max_tokens 1, its last).
  const std::atomic<bool> go(false);
  auto again = table.Step(sampler, *view, std::vector<uint64_t>{1}, &go);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)[0].token.finish_reason, FinishReason::kLength);
  EXPECT_FALSE(table.contains(1));
}

// Steps with drafts (issue 7): every stepped sequence, with or without drafts, gives exactly
// what the Verifier gives for the same row with the full history (every processor, mirostat μ
// included); the history advances by all emitted tokens and finished sequences are released.
TEST(SequenceTableDraftsTest, EquivalentToVerifyWithFullHistories) {
  constexpr int kVocab = 48;
  std::mt19937_64 rng(77);
  SequenceTable table(SessionLimits{});
  Sampler sampler;
  Verifier verifier(sampler);
  struct Ref {
    SamplingParams params;
    std::vector<int32_t> prompt, output;
    std::optional<float> mu;
    bool done = false;
  };
  std::map<uint64_t, Ref> refs;
  for (uint64_t id = 1; id <= 80; ++id) {
    Ref ref;
    ref.params = RandomParams(rng, kVocab);
    for (int i = 0; i < 4; ++i) ref.prompt.push_back(static_cast<int32_t>(rng() % kVocab));
    ASSERT_TRUE(table.Add(id, ref.params, ref.prompt).ok());
    refs[id] = ref;
  }
  // The target row after `history` (the toy model of the other tests, keyed by its length).
  const auto target_row = [&](uint64_t id, const Ref& ref, const std::vector<int32_t>& path) {
    const int32_t last = !path.empty()         ? path.back()
                         : !ref.output.empty() ? ref.output.back()
                                               : ref.prompt.back();
    return ToyLogits(id, ref.output.size() + path.size(), last, kVocab);
  };
  int accepted = 0;
  for (int step = 0; step < 30 && table.size() > 0; ++step) {
    std::vector<uint64_t> ids;
    std::vector<float> logits;
    std::vector<std::vector<int32_t>> tokens, parents;
    std::vector<std::vector<float>> probs;
    std::vector<uint64_t> drafted;
    for (auto& [id, ref] : refs) {
      if (ref.done) continue;
      ids.push_back(id);
      const int k = static_cast<int>(rng() % 5);  // 0 = no drafts entry
      const bool tree = k >= 3 && rng() % 2 == 0;
      std::vector<int32_t> node_tokens, node_parents;
      std::vector<std::vector<int32_t>> paths;
      std::vector<float> q;
      const auto row0 = target_row(id, ref, {});
      logits.insert(logits.end(), row0.begin(), row0.end());
      for (int j = 0; j < k; ++j) {
        const int32_t parent = tree ? (j < 2 ? -1 : static_cast<int32_t>(rng() % 2)) : j - 1;
        std::vector<int32_t> path =
            parent < 0 ? std::vector<int32_t>{} : paths[static_cast<size_t>(parent)];
        // Drafts: the target's own argmax half of the time (so some are accepted), else random.
        const auto before = target_row(id, ref, path);
        const int32_t x = rng() % 2 == 0
                              ? static_cast<int32_t>(
                                    std::max_element(before.begin(), before.end()) - before.begin())
                              : static_cast<int32_t>(rng() % kVocab);
        node_tokens.push_back(x);
        node_parents.push_back(parent);
        path.push_back(x);
        paths.push_back(path);
        const auto row = target_row(id, ref, path);
        logits.insert(logits.end(), row.begin(), row.end());
        // Uniform draft probabilities on even ids, point masses on odd ids.
        if (id % 2 == 0) q.insert(q.end(), static_cast<size_t>(kVocab), 1.0f / kVocab);
      }
      if (k > 0) {
        drafted.push_back(id);
        tokens.push_back(node_tokens);
        parents.push_back(tree ? node_parents : std::vector<int32_t>{});
        probs.push_back(q);
      }
    }
    const auto bytes = F32Bytes(logits);
    auto view = LogitsView::Create(DType::kFloat32, static_cast<uint32_t>(logits.size() / kVocab),
                                   kVocab, bytes);
    ASSERT_TRUE(view.ok()) << view.status();
    std::vector<std::vector<uint8_t>> prob_bytes;
    for (const auto& q : probs) prob_bytes.push_back(F32Bytes(q));
    std::vector<SequenceDrafts> drafts;
    std::map<uint64_t, Drafts> by_id;
    for (size_t d = 0; d < drafted.size(); ++d) {
      Drafts one;
      one.token_ids = tokens[d];
      one.parents = parents[d];
      if (!probs[d].empty()) {
        one.probs = *LogitsView::Create(DType::kFloat32, static_cast<uint32_t>(tokens[d].size()),
                                        kVocab, prob_bytes[d]);
      }
      drafts.push_back({drafted[d], one});
      by_id[drafted[d]] = one;
    }
    std::vector<VerifyRowRequest> rows;
    for (uint64_t id : ids) {
      const Ref& ref = refs[id];
      VerifyRowRequest& row = rows.emplace_back();
      row.row = RowRequest{&ref.params, ref.prompt, ref.output, ref.mu};
      if (by_id.contains(id)) row.drafts = by_id[id];
    }
    auto want = verifier.Run(*view, rows);
    ASSERT_TRUE(want.ok()) << want.status();
    auto got = table.StepWithDrafts(verifier, *view, ids, drafts);
    ASSERT_TRUE(got.ok()) << got.status();
    for (size_t i = 0; i < ids.size(); ++i) {
      const VerifyResult& w = (*want)[i];
      ASSERT_EQ((*got)[i].sequence_id, ids[i]);
      ASSERT_TRUE((*got)[i].verify.has_value());
      const VerifyResult& g = *(*got)[i].verify;
      EXPECT_EQ((*got)[i].token.token_id, w.tokens.back().token_id);
      ASSERT_EQ(g.tokens.size(), w.tokens.size()) << "sequence " << ids[i] << " step " << step;
      EXPECT_EQ(g.accepted_nodes, w.accepted_nodes);
      Ref& ref = refs[ids[i]];
      for (size_t t = 0; t < w.tokens.size(); ++t) {
        ASSERT_EQ(g.tokens[t].token_id, w.tokens[t].token_id);
        ASSERT_EQ(g.tokens[t].logprob, w.tokens[t].logprob);
        ASSERT_EQ(g.tokens[t].finish_reason, w.tokens[t].finish_reason);
        ASSERT_EQ(g.tokens[t].mirostat_mu, w.tokens[t].mirostat_mu);
        ref.output.push_back(w.tokens[t].token_id);
        if (w.tokens[t].mirostat_mu) ref.mu = w.tokens[t].mirostat_mu;
      }
      accepted += static_cast<int>(w.num_accepted());
      if (w.tokens.back().finish_reason != FinishReason::kNone) {
        ref.done = true;
        EXPECT_FALSE(table.contains(ids[i]));
      }
    }
  }
  EXPECT_GT(accepted, 100);
}

TEST(SequenceTableDraftsTest, ErrorsChangeNothing) {
  SequenceTable table(SessionLimits{.max_sequences = 8, .max_history_tokens = 6});
  Sampler sampler;
  Verifier verifier(sampler);
  SamplingParams p;
  p.seed = 1;
  ASSERT_TRUE(table.Add(1, p, {0, 1}).ok());
  ASSERT_TRUE(table.Add(2, p, {0}).ok());
  const std::vector<int32_t> three = {1, 2, 3};
  const auto bytes = F32Bytes(std::vector<float>(5 * 4, 0.0f));
  const LogitsView five = *LogitsView::Create(DType::kFloat32, 5, 4, bytes);
  const std::vector<uint64_t> both = {1, 2};
  Drafts d;
  d.token_ids = three;
  // Rows: 3 drafts + 1 + 1 plain = 5.
  {
    auto r = table.StepWithDrafts(verifier, five, both, {SequenceDrafts{3, d}});
    EXPECT_THAT(r.status().message(), HasSubstr("drafts[0].sequence_id 3 is not stepped"));
  }
  {
    auto r =
        table.StepWithDrafts(verifier, five, both, {SequenceDrafts{1, d}, SequenceDrafts{1, d}});
    EXPECT_THAT(r.status().message(),
                HasSubstr("drafts[1]: sequence 1 has more than one drafts entry"));
  }
  {
    const LogitsView four = *LogitsView::Create(DType::kFloat32, 4, 4,
                                                absl::MakeConstSpan(bytes).subspan(0, 4 * 4 * 4));
    auto r = table.StepWithDrafts(verifier, four, both, {SequenceDrafts{1, d}});
    EXPECT_EQ(r.status().message(),
              "logits.rows is 4 but the stepped sequences need 5 (sequence 1: 3 drafts)");
  }
  {
    // History limit 6: sequence 1 has 2 prompt tokens and may append up to 4.
    Drafts four_drafts;
    const std::vector<int32_t> ids4 = {1, 2, 3, 0};
    four_drafts.token_ids = ids4;
    const auto bytes6 = F32Bytes(std::vector<float>(6 * 4, 0.0f));
    const LogitsView six = *LogitsView::Create(DType::kFloat32, 6, 4, bytes6);
    auto r = table.StepWithDrafts(verifier, six, both, {SequenceDrafts{1, four_drafts}});
    EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  }
  auto ok = table.StepWithDrafts(verifier, five, both, {SequenceDrafts{1, d}});
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->size(), 2u);
}

}  // namespace
}  // namespace tokensampler
