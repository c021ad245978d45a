// Beam search (core/beam.h) through SequenceTable, against the independent reference of
// tests/testing/beam_testing.h on toy models whose logits depend on the whole prefix.
#include "core/beam.h"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/session.h"
#include "core/speculative.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/beam_testing.h"
#include "tests/testing/core_testing.h"

namespace tokensampler {
namespace {

using ::testing::HasSubstr;
using ::tokensampler::testing::F32Bytes;
using ::tokensampler::testing::RefConfig;
using ::tokensampler::testing::RefResult;
using ::tokensampler::testing::RefStopping;
using ::tokensampler::testing::ToyBeamModel;

// Decisive comparisons closer than this are treated as ties the float pipeline may order
// either way; such a case is skipped (and counted).
constexpr double kMargin = 1e-5;

struct CoreRun {
  std::vector<std::vector<BeamSlot>> steps;
  BeamStep last;
};

BeamParams ToBeamParams(const RefConfig& c) {
  BeamParams b;
  b.beam_width = c.width;
  b.length_penalty = static_cast<float>(c.length_penalty);
  b.early_stopping = c.stopping == RefStopping::kTrue    ? EarlyStopping::kTrue
                     : c.stopping == RefStopping::kNever ? EarlyStopping::kNever
                                                         : EarlyStopping::kHeuristic;
  b.num_return_sequences = c.num_return;
  b.num_beam_groups = c.groups;
  b.diversity_penalty = static_cast<float>(c.diversity);
  b.do_sample = c.do_sample;
  return b;
}

SamplingParams ToSamplingParams(const ToyBeamModel& model, const RefConfig& c) {
  SamplingParams p;
  p.eos_token_ids = {model.eos};
  p.max_tokens = c.max_tokens;
  p.min_tokens = c.min_tokens;
  if (c.stop_token >= 0) p.stop_token_ids = {c.stop_token};
  p.repetition_penalty = static_cast<float>(c.repetition_penalty);
  p.temperature = static_cast<float>(c.temperature);
  p.top_k = c.top_k;
  p.seed = c.seed;
  return p;
}

// Plays the model worker: keeps each live beam's history (reordered by parent_beam, as a worker
// reorders its KV cache), sends one row per live beam, until the search is over.
CoreRun RunCore(const ToyBeamModel& model, const std::vector<int32_t>& prompt, const RefConfig& c) {
  CoreRun run;
  SequenceTable table(SessionLimits{});
  Sampler sampler;
  const absl::Status added = table.Add(7, ToSamplingParams(model, c), prompt, ToBeamParams(c));
  EXPECT_TRUE(added.ok()) << added;
  std::vector<std::vector<int32_t>> histories = {{}};
  for (int step = 0; step < 1000; ++step) {
    std::vector<float> logits;
    for (const auto& h : histories) {
      const std::vector<float> row = model.Logits(prompt, h);
      logits.insert(logits.end(), row.begin(), row.end());
    }
    const std::vector<uint8_t> bytes = F32Bytes(logits);
    auto view = LogitsView::Create(DType::kFloat32, static_cast<uint32_t>(histories.size()),
                                   static_cast<uint32_t>(model.vocab), bytes);
    EXPECT_TRUE(view.ok());
    auto got = table.Step(sampler, *view, std::vector<uint64_t>{7});
    EXPECT_TRUE(got.ok()) << got.status();
    if (!got.ok()) return run;
    EXPECT_EQ((*got).size(), 1u);
    const BeamStep& beam = *(*got)[0].beam;
    run.steps.push_back(beam.beams);
    std::vector<std::vector<int32_t>> next;
    for (const BeamSlot& slot : beam.beams) {
      std::vector<int32_t> h = histories.at(slot.parent_beam);
      h.push_back(slot.token_id);
      next.push_back(std::move(h));
    }
    histories = std::move(next);
    if (beam.finished) {
      run.last = beam;
      EXPECT_FALSE(table.contains(7));  // released when the search is over
      EXPECT_EQ(table.units(), 0);
      return run;
    }
  }
  ADD_FAILURE() << "the search did not end";
  return run;
}

// Compares a core run with the reference; returns false when the case is too close to call.
bool ExpectSameAsReference(const ToyBeamModel& model, const std::vector<int32_t>& prompt,
                           const RefConfig& c, const std::string& name) {
  const RefResult want = testing::ReferenceBeamSearch(model, prompt, c);
  if (want.min_margin < kMargin) return false;
  const CoreRun got = RunCore(model, prompt, c);
  EXPECT_EQ(got.steps.size(), want.steps.size()) << name;
  for (size_t s = 0; s < std::min(got.steps.size(), want.steps.size()); ++s) {
    EXPECT_EQ(got.steps[s].size(), want.steps[s].size()) << name << " step " << s;
    for (size_t i = 0; i < std::min(got.steps[s].size(), want.steps[s].size()); ++i) {
      EXPECT_EQ(got.steps[s][i].parent_beam, want.steps[s][i].parent) << name << " step " << s;
      EXPECT_EQ(got.steps[s][i].token_id, want.steps[s][i].token) << name << " step " << s;
      EXPECT_NEAR(got.steps[s][i].cumulative_score, want.steps[s][i].score, 1e-4)
          << name << " step " << s;
    }
  }
  EXPECT_TRUE(got.last.finished) << name;
  EXPECT_TRUE(got.last.beams.empty()) << name;
  EXPECT_EQ(got.last.hypotheses.size(), want.hypotheses.size()) << name;
  for (size_t i = 0; i < std::min(got.last.hypotheses.size(), want.hypotheses.size()); ++i) {
    const BeamHypothesis& g = got.last.hypotheses[i];
    EXPECT_EQ(g.token_ids, want.hypotheses[i].tokens) << name << " hypothesis " << i;
    EXPECT_NEAR(g.score, want.hypotheses[i].score, 1e-4) << name << " hypothesis " << i;
    const FinishReason reason = want.hypotheses[i].eos    ? FinishReason::kEos
                                : want.hypotheses[i].stop ? FinishReason::kStop
                                                          : FinishReason::kLength;
    EXPECT_EQ(g.finish_reason, reason) << name << " hypothesis " << i;
    if (want.hypotheses[i].stop) {
      EXPECT_EQ(g.stop_token_id, c.stop_token) << name;
    }
  }
  if (!got.last.hypotheses.empty()) {
    EXPECT_EQ(got.last.finish_reason, got.last.hypotheses[0].finish_reason) << name;
  }
  return true;
}

std::string Name(const RefConfig& c, uint64_t seed) {
  return "width " + std::to_string(c.width) + " lp " + std::to_string(c.length_penalty) +
         " stopping " + std::to_string(static_cast<int>(c.stopping)) + " return " +
         std::to_string(c.num_return) + " groups " + std::to_string(c.groups) + " model " +
         std::to_string(seed);
}

TEST(BeamSearchTest, MatchesReferenceForEveryWidthModeAndLengthPenalty) {
  int compared = 0;
  int skipped = 0;
  int eos_depths_seen = 0;
  std::vector<bool> depth_seen(16, false);
  for (int32_t width = 1; width <= 8; ++width) {
    for (RefStopping stopping :
         {RefStopping::kTrue, RefStopping::kHeuristic, RefStopping::kNever}) {
      for (double lp : {0.0, 1.0, 2.0}) {
        for (uint64_t seed = 1; seed <= 3; ++seed) {
          ToyBeamModel model;
          model.seed = seed * 1000 + static_cast<uint64_t>(width);
          model.vocab = 30 + static_cast<int32_t>(seed) * 7;
          model.eos = static_cast<int32_t>(seed);
          model.eos_slope = 0.3 + 0.4 * static_cast<double>(seed);
          RefConfig c;
          c.width = width;
          c.length_penalty = lp;
          c.stopping = stopping;
          c.num_return = seed == 2 ? width : std::max(1, width / 2);
          c.max_tokens = 6 + static_cast<int32_t>(seed) * 2;
          c.min_tokens = seed == 3 ? 2 : 0;
          c.repetition_penalty = seed == 1 ? 1.3 : 1.0;
          const std::vector<int32_t> prompt = {5, 6, static_cast<int32_t>(seed + 7)};
          if (ExpectSameAsReference(model, prompt, c, Name(c, model.seed))) {
            ++compared;
            const RefResult want = testing::ReferenceBeamSearch(model, prompt, c);
            for (const auto& h : want.hypotheses) {
              if (h.eos) depth_seen[std::min<size_t>(h.tokens.size(), 15)] = true;
            }
          } else {
            ++skipped;
          }
        }
      }
    }
  }
  for (bool seen : depth_seen) eos_depths_seen += seen ? 1 : 0;
  EXPECT_GE(eos_depths_seen, 5);  // EOS ends hypotheses at several depths
  EXPECT_LE(skipped, compared / 20) << compared << " compared";
  EXPECT_GE(compared, 200);
}

TEST(BeamSearchTest, StopTokensFinishHypothesesAndWidenTheCandidates) {
  // A stop token next to the EOS: hypotheses end with STOP too, and K = 3·S continuations.
  int compared = 0;
  int stopped = 0;
  for (int32_t width : {1, 2, 4, 6}) {
    for (RefStopping stopping :
         {RefStopping::kTrue, RefStopping::kHeuristic, RefStopping::kNever}) {
      for (uint64_t seed = 1; seed <= 4; ++seed) {
        ToyBeamModel model;
        model.seed = seed * 31 + static_cast<uint64_t>(width);
        model.vocab = 12;  // small: the stop token ranks high often
        model.eos = 0;
        model.eos_slope = 0.2;
        RefConfig c;
        c.width = width;
        c.stopping = stopping;
        c.stop_token = 5;
        c.num_return = width;
        c.max_tokens = 7;
        c.min_tokens = seed == 4 ? 2 : 0;
        if (ExpectSameAsReference(model, {1}, c, Name(c, model.seed))) {
          ++compared;
          for (const auto& h : testing::ReferenceBeamSearch(model, {1}, c).hypotheses) {
            stopped += h.stop ? 1 : 0;
          }
        }
      }
    }
  }
  EXPECT_GE(compared, 40);
  EXPECT_GE(stopped, 5);

  // EOS and the stop token boosted so that finishing continuations crowd the top ranks: more
  // than S of the best 2·S finish at some steps, and only the 3·S kept continuations give S
  // live beams.
  int crowded = 0;
  for (int32_t width : {3, 4, 6}) {
    for (double boost : {3.0, 5.0}) {
      for (uint64_t seed = 1; seed <= 6; ++seed) {
        ToyBeamModel model;
        model.seed = seed * 101 + static_cast<uint64_t>(width);
        model.vocab = 16;
        model.eos = 0;
        model.eos_slope = 0.0;
        model.boosted = 5;
        model.boost = boost;
        RefConfig c;
        c.width = width;
        c.stop_token = 5;
        c.num_return = width;
        c.max_tokens = 6;
        c.length_penalty = 0.0;
        c.stopping = RefStopping::kNever;
        if (ExpectSameAsReference(model, {1}, c, Name(c, model.seed))) ++crowded;
      }
    }
  }
  EXPECT_GE(crowded, 30);
}

TEST(BeamSearchTest, DiverseBeamSearchMatchesGroupBeamSearchReference) {
  int compared = 0;
  int skipped = 0;
  for (int32_t width : {2, 4, 6, 8}) {
    for (int32_t groups : {2, 4}) {
      if (width % groups != 0 || groups > width) continue;
      for (double diversity : {0.5, 3.0}) {
        for (RefStopping stopping :
             {RefStopping::kTrue, RefStopping::kHeuristic, RefStopping::kNever}) {
          for (uint64_t seed = 1; seed <= 2; ++seed) {
            ToyBeamModel model;
            model.seed = seed * 77 + static_cast<uint64_t>(width * groups);
            model.vocab = 25;
            model.eos = 3;
            model.eos_slope = 0.6;
            RefConfig c;
            c.width = width;
            c.groups = groups;
            c.diversity = diversity;
            c.stopping = stopping;
            c.length_penalty = seed == 1 ? 1.0 : 0.0;
            c.num_return = width;
            c.max_tokens = 9;
            const std::vector<int32_t> prompt = {1, 2};
            if (ExpectSameAsReference(model, prompt, c, Name(c, model.seed))) {
              ++compared;
            } else {
              ++skipped;
            }
          }
        }
      }
    }
  }
  EXPECT_LE(skipped, compared / 20 + 1) << compared << " compared";
  EXPECT_GE(compared, 50);
}

TEST(BeamSearchTest, DiversityPenaltySpreadsGroups) {
  // With a large penalty, the first tokens of different groups differ at the first step.
  ToyBeamModel model;
  model.seed = 4242;
  model.vocab = 30;
  RefConfig c;
  c.width = 4;
  c.groups = 4;
  c.diversity = 100.0;
  c.max_tokens = 3;
  const CoreRun got = RunCore(model, {1}, c);
  ASSERT_FALSE(got.steps.empty());
  std::vector<int32_t> first;
  for (const BeamSlot& slot : got.steps[0]) first.push_back(slot.token_id);
  ASSERT_EQ(first.size(), 4u);
  std::sort(first.begin(), first.end());
  EXPECT_EQ(std::unique(first.begin(), first.end()), first.end());
}

TEST(BeamSearchTest, BeamSamplingMatchesReferenceAndIsReproducible) {
  int compared = 0;
  for (int32_t width : {1, 2, 3, 5, 8}) {
    for (uint64_t seed = 11; seed <= 14; ++seed) {
      ToyBeamModel model;
      model.seed = seed;
      model.vocab = 30;
      model.eos = 2;
      model.eos_slope = 0.7;
      RefConfig c;
      c.width = width;
      c.do_sample = true;
      c.temperature = 0.7;
      c.top_k = seed % 2 == 0 ? 6 : 0;
      c.seed = seed * 31;
      c.num_return = width;
      c.max_tokens = 8;
      if (ExpectSameAsReference(model, {4, 4}, c, Name(c, model.seed))) ++compared;
      // The same seed gives the same search.
      const CoreRun a = RunCore(model, {4, 4}, c);
      const CoreRun b = RunCore(model, {4, 4}, c);
      ASSERT_EQ(a.last.hypotheses.size(), b.last.hypotheses.size());
      for (size_t i = 0; i < a.last.hypotheses.size(); ++i) {
        EXPECT_EQ(a.last.hypotheses[i].token_ids, b.last.hypotheses[i].token_ids);
      }
    }
  }
  EXPECT_GE(compared, 18);
}

TEST(BeamSearchTest, BeamSamplingDiffersFromDeterministicSearch) {
  // Sampling is not the deterministic search in disguise: over several seeds some step picks a
  // continuation that is not among the deterministic top ranks.
  ToyBeamModel model;
  model.seed = 99;
  model.vocab = 30;
  RefConfig c;
  c.width = 3;
  c.max_tokens = 6;
  const CoreRun deterministic = RunCore(model, {1}, c);
  int different = 0;
  for (uint64_t seed = 1; seed <= 8; ++seed) {
    c.do_sample = true;
    c.seed = seed;
    const CoreRun sampled = RunCore(model, {1}, c);
    if (sampled.last.hypotheses.empty() || deterministic.last.hypotheses.empty()) continue;
    if (sampled.last.hypotheses[0].token_ids != deterministic.last.hypotheses[0].token_ids) {
      ++different;
    }
  }
  EXPECT_GE(different, 4);
}

TEST(BeamSearchTest, WidthOneEqualsGreedy) {
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    ToyBeamModel model;
    model.seed = seed;
    model.vocab = 50;
    model.eos = 0;
    model.eos_slope = 0.5;
    const std::vector<int32_t> prompt = {3};
    // Greedy through a plain session sequence.
    SequenceTable table(SessionLimits{});
    Sampler sampler;
    SamplingParams p;
    p.temperature = 0.0f;
    p.eos_token_ids = {0};
    p.max_tokens = 15;
    p.repetition_penalty = 1.2f;
    ASSERT_TRUE(table.Add(1, p, prompt).ok());
    std::vector<int32_t> greedy;
    FinishReason reason = FinishReason::kNone;
    while (reason == FinishReason::kNone) {
      const std::vector<uint8_t> bytes = F32Bytes(model.Logits(prompt, greedy));
      auto view = LogitsView::Create(DType::kFloat32, 1, 50, bytes);
      auto got = table.Step(sampler, *view, std::vector<uint64_t>{1});
      ASSERT_TRUE(got.ok()) << got.status();
      greedy.push_back((*got)[0].token.token_id);
      reason = (*got)[0].token.finish_reason;
    }
    for (RefStopping stopping : {RefStopping::kTrue, RefStopping::kHeuristic}) {
      for (double lp : {0.0, 1.0, 2.0}) {
        RefConfig c;
        c.width = 1;
        c.stopping = stopping;
        c.length_penalty = lp;
        c.max_tokens = 15;
        c.repetition_penalty = 1.2;
        const CoreRun beam = RunCore(model, prompt, c);
        ASSERT_EQ(beam.last.hypotheses.size(), 1u);
        EXPECT_EQ(beam.last.hypotheses[0].token_ids, greedy) << "seed " << seed;
        EXPECT_EQ(beam.last.finish_reason, reason);
        EXPECT_EQ(beam.steps.size(), greedy.size());
      }
    }
  }
}

TEST(BeamSearchTest, LengthPenaltyCountsGeneratedTokensWithEos) {
  // Hand-checked, width 1, length_penalty 2, vocabulary {0 = EOS, 1, 2}. Step 1 makes token 1
  // (p = 3/4); step 2 ends with EOS (p = 1/2). The hypothesis [1, EOS] has length 2 (the EOS
  // counts, the prompt does not): score = (ln 3/4 + ln 1/2) / 2².
  SequenceTable table(SessionLimits{});
  Sampler sampler;
  SamplingParams p;
  p.eos_token_ids = {0};
  p.max_tokens = 4;
  BeamParams b;
  b.beam_width = 1;
  b.length_penalty = 2.0f;
  ASSERT_TRUE(table.Add(1, p, {1, 2, 1}, b).ok());
  const float kMasked = -std::numeric_limits<float>::infinity();
  const std::vector<uint8_t> row1 = F32Bytes({kMasked, std::log(3.0f), 0.0f});
  auto view1 = LogitsView::Create(DType::kFloat32, 1, 3, row1);
  auto got1 = table.Step(sampler, *view1, std::vector<uint64_t>{1});
  ASSERT_TRUE(got1.ok()) << got1.status();
  ASSERT_FALSE((*got1)[0].beam->finished);
  ASSERT_EQ((*got1)[0].beam->beams.size(), 1u);
  EXPECT_EQ((*got1)[0].beam->beams[0].token_id, 1);
  EXPECT_NEAR((*got1)[0].beam->beams[0].cumulative_score, std::log(0.75), 1e-6);
  const std::vector<uint8_t> row2 = F32Bytes({std::log(2.0f), 0.0f, 0.0f});
  auto view2 = LogitsView::Create(DType::kFloat32, 1, 3, row2);
  auto got2 = table.Step(sampler, *view2, std::vector<uint64_t>{1});
  ASSERT_TRUE(got2.ok()) << got2.status();
  const BeamStep& step = *(*got2)[0].beam;
  ASSERT_TRUE(step.finished);
  ASSERT_EQ(step.hypotheses.size(), 1u);
  EXPECT_EQ(step.hypotheses[0].token_ids, (std::vector<int32_t>{1, 0}));
  EXPECT_NEAR(step.hypotheses[0].sum_logprobs, std::log(0.75) + std::log(0.5), 1e-6);
  EXPECT_NEAR(step.hypotheses[0].score, (std::log(0.75) + std::log(0.5)) / 4.0, 1e-6);
  EXPECT_EQ(step.finish_reason, FinishReason::kEos);
  EXPECT_FALSE(table.contains(1));
}

TEST(BeamSearchTest, ValidationNamesFieldAndValue) {
  SamplingParams p;
  p.max_tokens = 10;
  struct Case {
    BeamParams beam;
    SamplingParams params;
    const char* message;
  };
  std::vector<Case> cases;
  auto with = [&](auto edit, const char* message) {
    Case c{BeamParams{}, p, message};
    c.beam.beam_width = 4;
    edit(c);
    cases.push_back(c);
  };
  with([](Case& c) { c.beam.beam_width = 0; },
       "beam.beam_width must be in [1, 16] (the server's --max_beam_width), got 0");
  with([](Case& c) { c.beam.beam_width = 17; },
       "beam.beam_width must be in [1, 16] (the server's --max_beam_width), got 17");
  with([](Case& c) { c.beam.num_return_sequences = 5; },
       "beam.num_return_sequences must be in [1, beam_width = 4], got 5");
  with([](Case& c) { c.beam.num_return_sequences = 0; },
       "beam.num_return_sequences must be in [1, beam_width = 4], got 0");
  with([](Case& c) { c.beam.num_beam_groups = 3; },
       "beam.num_beam_groups must divide beam_width = 4, got 3");
  with([](Case& c) { c.beam.num_beam_groups = 0; },
       "beam.num_beam_groups must divide beam_width = 4, got 0");
  with([](Case& c) { c.beam.diversity_penalty = -1.0f; },
       "beam.diversity_penalty must be finite and >= 0, got -1");
  with([](Case& c) { c.beam.diversity_penalty = 0.5f; },
       "beam.diversity_penalty 0.5 needs beam.num_beam_groups > 1 (it acts between groups), "
       "got 1");
  with([](Case& c) { c.beam.length_penalty = std::nanf(""); },
       "beam.length_penalty must be finite, got nan");
  with(
      [](Case& c) {
        c.beam.do_sample = true;
        c.beam.num_beam_groups = 2;
      },
      "beam.do_sample cannot be combined with diverse beam search, got beam.num_beam_groups 2");
  with(
      [](Case& c) {
        c.beam.do_sample = true;
        c.params.temperature = 0.0f;
      },
      "params.temperature must be > 0 with beam.do_sample, got 0");
  with(
      [](Case& c) {
        c.beam.early_stopping = EarlyStopping::kNever;
        c.params.max_tokens.reset();
      },
      "beam.early_stopping EARLY_STOPPING_NEVER with beam.length_penalty 1 > 0 needs "
      "params.max_tokens (the longest a hypothesis can get), got none");
  with([](Case& c) { c.params.mirostat_mode = 2; },
       "params.mirostat_mode must be 0 with beam search, got 2");
  with([](Case& c) { c.params.logprobs = 3; },
       "params.logprobs must be unset with beam search (each beam slot reports its token's "
       "logprob and cumulative score), got 3");
  for (const Case& c : cases) {
    const absl::Status status = ValidateBeamParams(c.beam, c.params, 16);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_EQ(status.message(), c.message);
  }
  BeamParams ok;
  ok.beam_width = 16;
  ok.early_stopping = EarlyStopping::kNever;
  ok.length_penalty = 0.0f;  // no max_tokens needed with lp <= 0
  SamplingParams no_max;
  EXPECT_TRUE(ValidateBeamParams(ok, no_max, 16).ok());
}

TEST(BeamSearchTest, RowsMustMatchLiveBeams) {
  SequenceTable table(SessionLimits{});
  Sampler sampler;
  SamplingParams p;
  p.max_tokens = 5;
  BeamParams b;
  b.beam_width = 4;
  ASSERT_TRUE(table.Add(12, p, {1}, b).ok());
  ASSERT_TRUE(table.Add(3, p, {1}).ok());
  constexpr int kVocab = 20;
  ToyBeamModel model;
  model.vocab = kVocab;
  auto rows = [&](int n) {
    std::vector<float> logits;
    for (int i = 0; i < n; ++i) {
      const auto row = model.Logits({1}, {static_cast<int32_t>(i)});
      logits.insert(logits.end(), row.begin(), row.end());
    }
    return F32Bytes(logits);
  };
  // First step: one row for the beam search (the prompt) + one for sequence 3.
  auto bytes3 = rows(3);
  auto view3 = LogitsView::Create(DType::kFloat32, 3, kVocab, bytes3);
  auto bad = table.Step(sampler, *view3, std::vector<uint64_t>{12, 3});
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message(),
            "logits.rows is 3 but the stepped sequences need 2 (sequence 12: 1 live beam)");
  auto bytes2 = rows(2);
  auto view2 = LogitsView::Create(DType::kFloat32, 2, kVocab, bytes2);
  auto first = table.Step(sampler, *view2, std::vector<uint64_t>{12, 3});
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(first->size(), 2u);
  ASSERT_TRUE((*first)[0].beam.has_value());
  EXPECT_EQ((*first)[0].beam->beams.size(), 4u);
  EXPECT_FALSE((*first)[1].beam.has_value());
  // Now 4 live beams + 1: 2 rows is wrong, and nothing changed.
  auto again = table.Step(sampler, *view2, std::vector<uint64_t>{12, 3});
  EXPECT_EQ(again.status().message(),
            "logits.rows is 2 but the stepped sequences need 5 (sequence 12: 4 live beams)");
  auto bytes5 = rows(5);
  auto view5 = LogitsView::Create(DType::kFloat32, 5, kVocab, bytes5);
  EXPECT_TRUE(table.Step(sampler, *view5, std::vector<uint64_t>{3, 12}).ok());
}

// A step with drafts (StepWithDrafts, the Verifier) advances a beam search exactly as Step does,
// with a drafted plain sequence in the same step; drafts for a beam search are refused.
TEST(BeamSearchTest, StepWithDraftsAdvancesBeamsAsStep) {
  constexpr int kVocab = 20;
  ToyBeamModel model;
  model.vocab = kVocab;
  Sampler sampler;
  Verifier verifier(sampler);
  for (const bool do_sample : {false, true}) {
    SCOPED_TRACE(do_sample ? "do_sample" : "greedy beams");
    SequenceTable with_drafts(SessionLimits{});
    SequenceTable plain(SessionLimits{});
    SamplingParams p;
    p.max_tokens = 5;
    p.eos_token_ids = {model.eos};
    p.repetition_penalty = 1.3f;
    p.seed = 11;
    if (do_sample) {
      p.temperature = 0.9f;
      p.top_k = 8;
    }
    BeamParams b;
    b.beam_width = 3;
    b.num_return_sequences = 2;
    b.do_sample = do_sample;
    const std::vector<int32_t> prompt = {1, 2};
    ASSERT_TRUE(with_drafts.Add(12, p, prompt, b).ok());
    ASSERT_TRUE(plain.Add(12, p, prompt, b).ok());
    SamplingParams q;
    q.seed = 4;
    q.temperature = 0.8f;
    ASSERT_TRUE(with_drafts.Add(3, q, {7}).ok());
    const std::vector<int32_t> draft_tokens = {5, 6};
    Drafts d;
    d.token_ids = draft_tokens;
    const std::vector<uint64_t> ids = {12, 3};

    std::vector<std::vector<int32_t>> beams = {{}};  // each live beam's output
    std::vector<int32_t> output3;                    // sequence 3's output
    for (int step = 0; !beams.empty(); ++step) {
      ASSERT_LT(step, 10);
      std::vector<float> beam_rows;
      for (const auto& h : beams) {
        const auto row = model.Logits(prompt, h);
        beam_rows.insert(beam_rows.end(), row.begin(), row.end());
      }
      std::vector<float> rows = beam_rows;
      for (size_t j = 0; j <= draft_tokens.size(); ++j) {  // sequence 3: k + 1 rows
        std::vector<int32_t> path = output3;
        path.insert(path.end(), draft_tokens.begin(),
                    draft_tokens.begin() + static_cast<std::ptrdiff_t>(j));
        const auto row = model.Logits({7}, path);
        rows.insert(rows.end(), row.begin(), row.end());
      }
      const auto rows_bytes = F32Bytes(rows);
      const auto beam_bytes = F32Bytes(beam_rows);
      const LogitsView view = *LogitsView::Create(
          DType::kFloat32, static_cast<uint32_t>(rows.size() / kVocab), kVocab, rows_bytes);
      const LogitsView beam_view = *LogitsView::Create(
          DType::kFloat32, static_cast<uint32_t>(beams.size()), kVocab, beam_bytes);
      if (step == 1) {
        // Drafts for the beam search: refused, naming it, and nothing changes.
        auto refused = with_drafts.StepWithDrafts(verifier, view, ids, {SequenceDrafts{12, d}});
        EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
        EXPECT_EQ(refused.status().message(),
                  "drafts[0]: sequence 12 is a beam search; drafts apply to plain sequences "
                  "only");
        // A row count off by one names both kinds of multi-row sequence.
        const LogitsView short_view = *LogitsView::Create(
            DType::kFloat32, static_cast<uint32_t>(view.rows() - 1), kVocab,
            absl::MakeConstSpan(rows_bytes).subspan(0, rows_bytes.size() - sizeof(float) * kVocab));
        auto short_step =
            with_drafts.StepWithDrafts(verifier, short_view, ids, {SequenceDrafts{3, d}});
        EXPECT_EQ(short_step.status().message(),
                  absl::StrCat("logits.rows is ", view.rows() - 1,
                               " but the stepped sequences need ", view.rows(), " (sequence 12: ",
                               beams.size(), " live beams, sequence 3: 2 drafts)"));
      }
      auto got = with_drafts.StepWithDrafts(verifier, view, ids, {SequenceDrafts{3, d}});
      ASSERT_TRUE(got.ok()) << got.status();
      auto want = plain.Step(sampler, beam_view, std::vector<uint64_t>{12});
      ASSERT_TRUE(want.ok()) << want.status();
      ASSERT_EQ(got->size(), 2u);
      const SequenceStep& g = (*got)[0];
      const SequenceStep& w = (*want)[0];
      ASSERT_TRUE(g.beam.has_value());
      EXPECT_FALSE(g.verify.has_value());
      ASSERT_EQ(g.beam->beams.size(), w.beam->beams.size()) << "step " << step;
      for (size_t j = 0; j < w.beam->beams.size(); ++j) {
        EXPECT_EQ(g.beam->beams[j].parent_beam, w.beam->beams[j].parent_beam);
        EXPECT_EQ(g.beam->beams[j].token_id, w.beam->beams[j].token_id);
        EXPECT_EQ(g.beam->beams[j].logprob, w.beam->beams[j].logprob);
        EXPECT_EQ(g.beam->beams[j].cumulative_score, w.beam->beams[j].cumulative_score);
      }
      EXPECT_EQ(g.beam->finished, w.beam->finished);
      ASSERT_EQ(g.beam->hypotheses.size(), w.beam->hypotheses.size());
      for (size_t j = 0; j < w.beam->hypotheses.size(); ++j) {
        EXPECT_EQ(g.beam->hypotheses[j].token_ids, w.beam->hypotheses[j].token_ids);
        EXPECT_EQ(g.beam->hypotheses[j].score, w.beam->hypotheses[j].score);
      }
      // The drafted plain sequence was verified and its history advanced.
      const SequenceStep& three = (*got)[1];
      ASSERT_TRUE(three.verify.has_value());
      EXPECT_FALSE(three.beam.has_value());
      EXPECT_EQ(three.token.token_id, three.verify->tokens.back().token_id);
      for (const SampledToken& t : three.verify->tokens) output3.push_back(t.token_id);

      std::vector<std::vector<int32_t>> next;
      for (const BeamSlot& slot : w.beam->beams) {
        next.push_back(beams[slot.parent_beam]);
        next.back().push_back(slot.token_id);
      }
      beams = next;
    }
    EXPECT_FALSE(with_drafts.contains(12));
    EXPECT_TRUE(with_drafts.contains(3));
  }
}

TEST(BeamSearchTest, LimitsCountEveryBeam) {
  SessionLimits limits;
  limits.max_sequences = 10;
  limits.max_history_tokens = 4;
  limits.max_beam_width = 8;
  SequenceTable table(limits);
  SamplingParams p;
  BeamParams b;
  b.beam_width = 8;
  ASSERT_TRUE(table.Add(1, p, {1}, b).ok());
  EXPECT_EQ(table.units(), 8);
  EXPECT_TRUE(table.Add(2, p, {1}).ok());
  EXPECT_TRUE(table.Add(3, p, {1}).ok());
  const absl::Status full = table.Add(4, p, {1});
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(full.message()), HasSubstr("would hold 11 sequences"));
  ASSERT_TRUE(table.Release(2).ok());
  BeamParams b2;
  b2.beam_width = 2;
  EXPECT_EQ(table.Add(5, p, {1}, b2).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(table.Fork(1, std::vector<uint64_t>{9}).code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(table.Release(1).ok());
  EXPECT_EQ(table.units(), 1);
  b.beam_width = 9;
  EXPECT_EQ(table.Add(6, p, {1}, b).message(),
            "beam.beam_width must be in [1, 8] (the server's --max_beam_width), got 9");

  // History: every beam's prompt + output counts against max_history_tokens (4 here).
  b.beam_width = 2;
  ASSERT_TRUE(table.Add(7, p, {1, 2}, b).ok());
  Sampler sampler;
  ToyBeamModel model;
  model.vocab = 10;
  std::vector<std::vector<int32_t>> histories = {{}};
  for (int step = 0; step < 2; ++step) {
    std::vector<float> logits;
    for (const auto& h : histories) {
      const auto row = model.Logits({1, 2}, h);
      logits.insert(logits.end(), row.begin(), row.end());
    }
    auto bytes = F32Bytes(logits);
    auto view =
        LogitsView::Create(DType::kFloat32, static_cast<uint32_t>(histories.size()), 10, bytes);
    auto got = table.Step(sampler, *view, std::vector<uint64_t>{7});
    ASSERT_TRUE(got.ok()) << got.status();
    std::vector<std::vector<int32_t>> next;
    for (const BeamSlot& s : (*got)[0].beam->beams) {
      next.push_back(histories[s.parent_beam]);
      next.back().push_back(s.token_id);
    }
    histories = next;
  }
  std::vector<float> logits(histories.size() * 10, 0.0f);
  auto bytes = F32Bytes(logits);
  auto view =
      LogitsView::Create(DType::kFloat32, static_cast<uint32_t>(histories.size()), 10, bytes);
  EXPECT_EQ(table.Step(sampler, *view, std::vector<uint64_t>{7}).status().message(),
            "sequence 7 would exceed 4 history tokens");
}

TEST(BeamSearchTest, ForkedBeamSearchesDrawIndependently) {
  SequenceTable table(SessionLimits{});
  Sampler sampler;
  SamplingParams p;
  p.seed = 5;
  p.max_tokens = 3;
  BeamParams b;
  b.beam_width = 2;
  b.do_sample = true;
  ASSERT_TRUE(table.Add(1, p, {1}, b).ok());
  ASSERT_TRUE(table.Fork(1, std::vector<uint64_t>{2}).ok());
  EXPECT_EQ(table.units(), 4);
  // Flat logits over 1000 tokens: the two searches pick different tokens.
  auto bytes = F32Bytes(std::vector<float>(2000, 0.0f));
  auto view = LogitsView::Create(DType::kFloat32, 2, 1000, bytes);
  auto got = table.Step(sampler, *view, std::vector<uint64_t>{1, 2});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_NE((*got)[0].beam->beams[0].token_id, (*got)[1].beam->beams[0].token_id);
}

}  // namespace
}  // namespace tokensampler
