// Beam search through Sampler.Session end to end, in-process: a real Server, real generated
// stubs, the real core. The reference is the independent beam search of
// tests/testing/beam_testing.h; the test plays a model worker that reorders its per-beam state
// by parent_beam and sends one row per live beam, several sequences (beam and plain) per step.
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/server.h"
#include "tests/testing/beam_testing.h"
#include "tests/testing/in_process_server.h"
#include "tests/testing/session_testing.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::service {
namespace {

using ::testing::HasSubstr;
using ::tokensampler::testing::AddSequence;
using ::tokensampler::testing::RefConfig;
using ::tokensampler::testing::RefResult;
using ::tokensampler::testing::RefStopping;
using ::tokensampler::testing::SetStep;
using ::tokensampler::testing::TestSession;
using ::tokensampler::testing::ToyBeamModel;

using BeamSessionTest = ::tokensampler::testing::InProcessServerTest;

v1::BeamSearchParams BeamProto(const RefConfig& c) {
  v1::BeamSearchParams beam;
  beam.set_beam_width(static_cast<uint32_t>(c.width));
  beam.set_length_penalty(static_cast<float>(c.length_penalty));
  beam.set_early_stopping(c.stopping == RefStopping::kTrue    ? v1::EARLY_STOPPING_TRUE
                          : c.stopping == RefStopping::kNever ? v1::EARLY_STOPPING_NEVER
                                                              : v1::EARLY_STOPPING_UNSPECIFIED);
  beam.set_num_return_sequences(static_cast<uint32_t>(c.num_return));
  if (c.groups > 1) {
    beam.set_num_beam_groups(static_cast<uint32_t>(c.groups));
    beam.set_diversity_penalty(static_cast<float>(c.diversity));
  }
  beam.set_do_sample(c.do_sample);
  return beam;
}

v1::SamplingParams ParamsProto(const ToyBeamModel& model, const RefConfig& c) {
  v1::SamplingParams p;
  p.add_eos_token_ids(model.eos);
  p.set_max_tokens(c.max_tokens);
  p.set_min_tokens(c.min_tokens);
  if (c.repetition_penalty != 1.0)
    p.set_repetition_penalty(static_cast<float>(c.repetition_penalty));
  if (c.do_sample) {
    p.set_temperature(static_cast<float>(c.temperature));
    p.set_top_k(c.top_k);
    p.set_seed(c.seed);
  }
  return p;
}

// One search of the worker: its model, config, and the live beams' histories.
struct Search {
  uint64_t id;
  ToyBeamModel model;
  std::vector<int32_t> prompt;
  RefConfig config;
  RefResult want;
  std::vector<std::vector<int32_t>> histories = {{}};
  size_t step = 0;
  bool done = false;
};

TEST_F(BeamSessionTest, ManySearchesInOneStreamMatchTheReference) {
  std::vector<Search> searches;
  uint64_t id = 100;
  for (int32_t width : {1, 2, 3, 4, 5, 8}) {
    for (RefStopping stopping :
         {RefStopping::kTrue, RefStopping::kHeuristic, RefStopping::kNever}) {
      for (double lp : {0.0, 1.0, 2.0}) {
        Search s;
        s.id = id++;
        s.model.seed = s.id * 13;
        s.model.vocab = 48;  // one shared vocabulary per step
        s.model.eos = static_cast<int32_t>(s.id % 5);
        s.model.eos_slope = 0.4 + 0.1 * static_cast<double>(s.id % 7);
        s.prompt = {7, static_cast<int32_t>(s.id % 40)};
        s.config.width = width;
        s.config.stopping = stopping;
        s.config.length_penalty = lp;
        s.config.num_return = (s.id % 2 == 0) ? width : 1;
        s.config.max_tokens = 7 + static_cast<int32_t>(s.id % 5);
        s.config.repetition_penalty = s.id % 3 == 0 ? 1.25 : 1.0;
        s.want = testing::ReferenceBeamSearch(s.model, s.prompt, s.config);
        if (s.want.min_margin < 1e-5) continue;  // too close to call in float
        searches.push_back(s);
      }
    }
  }
  // Diverse beam search and beam sampling too.
  for (int32_t groups : {2, 4}) {
    Search s;
    s.id = id++;
    s.model.seed = s.id;
    s.model.vocab = 48;
    s.model.eos = 0;
    s.prompt = {3};
    s.config.width = 8;
    s.config.groups = groups;
    s.config.diversity = 1.5;
    s.config.num_return = 8;
    s.config.max_tokens = 8;
    s.want = testing::ReferenceBeamSearch(s.model, s.prompt, s.config);
    if (s.want.min_margin >= 1e-5) searches.push_back(s);
  }
  {
    Search s;
    s.id = id++;
    s.model.seed = 5;
    s.model.vocab = 48;
    s.prompt = {9};
    s.config.width = 4;
    s.config.do_sample = true;
    s.config.temperature = 0.8;
    s.config.top_k = 10;
    s.config.seed = 77;
    s.config.num_return = 4;
    s.config.max_tokens = 8;
    s.want = testing::ReferenceBeamSearch(s.model, s.prompt, s.config);
    if (s.want.min_margin >= 1e-5) searches.push_back(s);
  }
  ASSERT_GE(searches.size(), 50u);

  TestSession session(*stub_);
  v1::SessionRequest add;
  for (const Search& s : searches) {
    AddSequence(add, s.id, ParamsProto(s.model, s.config), s.prompt);
    *add.mutable_add()->rbegin()->mutable_beam() = BeamProto(s.config);
  }
  // A plain greedy sequence rides along in every step.
  v1::SamplingParams greedy;
  greedy.set_temperature(0.0f);
  AddSequence(add, 1, greedy, {1, 2});
  session.CallOk(add);
  ToyBeamModel plain_model;
  plain_model.vocab = 48;
  plain_model.eos = -1;
  std::vector<int32_t> plain_output;

  size_t live = searches.size();
  int steps = 0;
  while (live > 0) {
    ASSERT_LT(++steps, 100);
    v1::SessionRequest request;
    std::vector<std::vector<float>> rows;
    std::vector<uint64_t> ids;
    // Alternate the plain sequence's position in the step.
    if (steps % 2 == 0) {
      ids.push_back(1);
      rows.push_back(plain_model.Logits({1, 2}, plain_output));
    }
    for (const Search& s : searches) {
      if (s.done) continue;
      ids.push_back(s.id);
      for (const auto& h : s.histories) rows.push_back(s.model.Logits(s.prompt, h));
    }
    if (steps % 2 == 1) {
      ids.push_back(1);
      rows.push_back(plain_model.Logits({1, 2}, plain_output));
    }
    SetStep(request, rows, ids);
    const v1::SessionResponse response = session.CallOk(request);
    ASSERT_EQ(response.results_size(), static_cast<int>(ids.size()));
    std::map<uint64_t, const v1::SequenceResult*> by_id;
    for (const v1::SequenceResult& r : response.results()) by_id[r.sequence_id()] = &r;
    // The plain sequence: greedy argmax of its row.
    {
      const std::vector<float> row = plain_model.Logits({1, 2}, plain_output);
      const int32_t argmax =
          static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
      EXPECT_EQ(by_id.at(1)->token_id(), argmax);
      EXPECT_EQ(by_id.at(1)->beams_size(), 0);
      plain_output.push_back(argmax);
    }
    for (Search& s : searches) {
      if (s.done) continue;
      const v1::SequenceResult& r = *by_id.at(s.id);
      const std::string name =
          "sequence " + std::to_string(s.id) + " step " + std::to_string(s.step);
      ASSERT_LT(s.step, s.want.steps.size()) << name;
      const auto& want = s.want.steps[s.step];
      ASSERT_EQ(r.beams_size(), static_cast<int>(want.size())) << name;
      std::vector<std::vector<int32_t>> next;
      for (int i = 0; i < r.beams_size(); ++i) {
        const v1::BeamSlot& slot = r.beams(i);
        EXPECT_EQ(slot.parent_beam(), want[static_cast<size_t>(i)].parent) << name;
        EXPECT_EQ(slot.token_id(), want[static_cast<size_t>(i)].token) << name;
        EXPECT_NEAR(slot.cumulative_score(), want[static_cast<size_t>(i)].score, 1e-4) << name;
        // Reorder by parent_beam, then append: what a worker does with its KV cache.
        std::vector<int32_t> h = s.histories.at(slot.parent_beam());
        h.push_back(slot.token_id());
        next.push_back(std::move(h));
      }
      s.histories = std::move(next);
      ++s.step;
      if (r.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
        s.done = true;
        --live;
        EXPECT_EQ(s.step, s.want.steps.size()) << name;
        ASSERT_EQ(r.hypotheses_size(), static_cast<int>(s.want.hypotheses.size())) << name;
        for (int i = 0; i < r.hypotheses_size(); ++i) {
          const auto& w = s.want.hypotheses[static_cast<size_t>(i)];
          EXPECT_EQ(std::vector<int32_t>(r.hypotheses(i).token_ids().begin(),
                                         r.hypotheses(i).token_ids().end()),
                    w.tokens)
              << name;
          EXPECT_NEAR(r.hypotheses(i).score(), w.score, 1e-4) << name;
          EXPECT_EQ(r.hypotheses(i).finish_reason(),
                    w.eos ? v1::FINISH_REASON_EOS : v1::FINISH_REASON_LENGTH)
              << name;
        }
        EXPECT_EQ(r.finish_reason(), r.hypotheses(0).finish_reason()) << name;
      } else {
        EXPECT_EQ(r.hypotheses_size(), 0) << name;
      }
    }
  }
  // Finished searches are released: stepping one is NOT_FOUND.
  v1::SessionRequest again;
  SetStep(again, {plain_model.Logits({1, 2}, plain_output)}, {searches[0].id});
  EXPECT_EQ(session.Call(again).error().code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(server_->service().live_sequences(), 1);  // the plain sequence
  EXPECT_TRUE(session.Close().ok());
}

struct BeamErrorCase {
  std::string name;
  std::function<void(v1::SessionRequest&)> build;  // an add of sequence 9
  grpc::StatusCode code;
  std::string message;
};

TEST_F(BeamSessionTest, BadBeamParamsNameFieldAndValue) {
  const auto add = [](std::function<void(v1::BeamSearchParams&, v1::SamplingParams&)> edit) {
    return [edit](v1::SessionRequest& request) {
      v1::SamplingParams params;
      params.set_max_tokens(10);
      v1::BeamSearchParams beam;
      beam.set_beam_width(4);
      edit(beam, params);
      AddSequence(request, 9, params, {1});
      *request.mutable_add(0)->mutable_beam() = beam;
    };
  };
  const std::vector<BeamErrorCase> cases = {
      {"WidthZero", add([](auto& b, auto&) { b.set_beam_width(0); }),
       grpc::StatusCode::INVALID_ARGUMENT,
       "add[0].beam.beam_width must be in [1, 16] (the server's --max_beam_width), got 0"},
      {"WidthOverLimit", add([](auto& b, auto&) { b.set_beam_width(17); }),
       grpc::StatusCode::INVALID_ARGUMENT,
       "add[0].beam.beam_width must be in [1, 16] (the server's --max_beam_width), got 17"},
      {"WidthHuge", add([](auto& b, auto&) { b.set_beam_width(4000000000u); }),
       grpc::StatusCode::INVALID_ARGUMENT,
       "add[0].beam.beam_width must be at most 2147483647, got 4000000000"},
      {"ReturnMoreThanWidth", add([](auto& b, auto&) { b.set_num_return_sequences(5); }),
       grpc::StatusCode::INVALID_ARGUMENT,
       "add[0].beam.num_return_sequences must be in [1, beam_width = 4], got 5"},
      {"GroupsNotDividing", add([](auto& b, auto&) { b.set_num_beam_groups(3); }),
       grpc::StatusCode::INVALID_ARGUMENT,
       "add[0].beam.num_beam_groups must divide beam_width = 4, got 3"},
      {"UnknownEarlyStopping",
       add([](auto& b, auto&) { b.set_early_stopping(static_cast<v1::EarlyStopping>(9)); }),
       grpc::StatusCode::INVALID_ARGUMENT,
       "add[0].beam.early_stopping must be one of EARLY_STOPPING_TRUE, "
       "EARLY_STOPPING_HEURISTIC, EARLY_STOPPING_NEVER, got 9"},
      {"SampleGreedy", add([](auto& b, auto& p) {
         b.set_do_sample(true);
         p.set_temperature(0.0f);
       }),
       grpc::StatusCode::INVALID_ARGUMENT,
       "add[0].params.temperature must be > 0 with beam.do_sample, got 0"},
      {"NeverWithoutMaxTokens", add([](auto& b, auto& p) {
         b.set_early_stopping(v1::EARLY_STOPPING_NEVER);
         p.clear_max_tokens();
       }),
       grpc::StatusCode::INVALID_ARGUMENT,
       "add[0].beam.early_stopping EARLY_STOPPING_NEVER with beam.length_penalty 1 > 0 needs "
       "params.max_tokens (the longest a hypothesis can get), got none"},
      {"BadSamplingParam", add([](auto&, auto& p) { p.set_top_p(0.0f); }),
       grpc::StatusCode::INVALID_ARGUMENT, "add[0].params.top_p must be in (0, 1], got 0"},
  };
  TestSession session(*stub_);
  for (const BeamErrorCase& c : cases) {
    v1::SessionRequest request;
    c.build(request);
    const v1::SessionResponse response = session.Call(request);
    EXPECT_EQ(response.error().code(), c.code) << c.name;
    EXPECT_EQ(response.error().message(), c.message) << c.name;
  }
  // The stream goes on: a good add and a step work.
  v1::SessionRequest good;
  add([](auto&, auto&) {})(good);
  session.CallOk(good);
  EXPECT_TRUE(session.Close().ok());
}

// Adds beam search 12 (width 4, `beam_params`) and plain sequence 3 (`plain_params`), both with
// prompt {1}.
void AddBeamAndPlain(TestSession& session, const v1::SamplingParams& beam_params,
                     const v1::SamplingParams& plain_params) {
  v1::SessionRequest add;
  AddSequence(add, 12, beam_params, {1});
  add.mutable_add(0)->mutable_beam()->set_beam_width(4);
  AddSequence(add, 3, plain_params, {1});
  session.CallOk(add);
}

// `n` rows of a toy model (vocabulary 32, no EOS).
std::vector<std::vector<float>> ToyRows(int n) {
  ToyBeamModel model;
  model.vocab = 32;
  model.eos = -1;
  std::vector<std::vector<float>> out;
  for (int i = 0; i < n; ++i) out.push_back(model.Logits({1}, {i}));
  return out;
}

TEST_F(BeamSessionTest, RowsMustMatchLiveBeams) {
  TestSession session(*stub_);
  v1::SamplingParams params;
  params.set_max_tokens(6);
  AddBeamAndPlain(session, params, params);
  v1::SessionRequest too_many;
  SetStep(too_many, ToyRows(3), {12, 3});
  v1::SessionResponse bad = session.Call(too_many);
  EXPECT_EQ(bad.error().code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(bad.error().message(),
            "step: logits.rows is 3 but the stepped sequences need 2 (sequence 12: 1 live beam)");
  v1::SessionRequest first;
  SetStep(first, ToyRows(2), {12, 3});
  const v1::SessionResponse ok = session.CallOk(first);
  ASSERT_EQ(ok.results_size(), 2);
  EXPECT_EQ(ok.results(0).beams_size(), 4);
  v1::SessionRequest few;
  SetStep(few, ToyRows(2), {12, 3});
  bad = session.Call(few);
  EXPECT_EQ(bad.error().message(),
            "step: logits.rows is 2 but the stepped sequences need 5 (sequence 12: 4 live beams)");
  v1::SessionRequest right;
  SetStep(right, ToyRows(5), {12, 3});
  EXPECT_EQ(session.CallOk(right).results(0).beams_size(), 4);
  EXPECT_TRUE(session.Close().ok());
}

// Beam searches and drafted plain sequences share a step: the beam search still takes one row
// per live beam and reports beams, the drafted sequence k + 1 rows and reports `verify`; drafts
// for a beam search are refused, and a row-count error names both.
TEST_F(BeamSessionTest, DraftsNextToBeamSearch) {
  TestSession session(*stub_);
  v1::SamplingParams params;
  params.set_max_tokens(6);
  v1::SamplingParams greedy = params;
  greedy.set_temperature(0.0f);
  AddBeamAndPlain(session, params, greedy);
  const auto drafts = [](v1::SessionRequest& request, uint64_t id) {
    v1::SequenceDrafts& d = *request.mutable_step()->add_drafts();
    d.set_sequence_id(id);
    d.add_draft_token_ids(5);
    d.add_draft_token_ids(6);
  };
  // First step: 1 row (the prompt) for the beam search, 2 drafts + 1 for sequence 3.
  v1::SessionRequest first;
  SetStep(first, ToyRows(4), {12, 3});
  drafts(first, 3);
  const v1::SessionResponse ok = session.CallOk(first);
  ASSERT_EQ(ok.results_size(), 2);
  EXPECT_EQ(ok.results(0).sequence_id(), 12u);
  EXPECT_EQ(ok.results(0).beams_size(), 4);
  EXPECT_FALSE(ok.results(0).has_verify());
  EXPECT_EQ(ok.results(1).sequence_id(), 3u);
  EXPECT_EQ(ok.results(1).beams_size(), 0);
  ASSERT_TRUE(ok.results(1).has_verify());
  EXPECT_GE(ok.results(1).verify().token_ids_size(), 1);
  EXPECT_EQ(ok.results(1).token_id(),
            ok.results(1).verify().token_ids(ok.results(1).verify().token_ids_size() - 1));

  v1::SessionRequest beam_drafts;
  SetStep(beam_drafts, ToyRows(7), {12, 3});
  drafts(beam_drafts, 12);
  v1::SessionResponse bad = session.Call(beam_drafts);
  EXPECT_EQ(bad.error().code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(bad.error().message(),
            "step: drafts[0]: sequence 12 is a beam search; drafts apply to plain sequences only");
  v1::SessionRequest short_step;
  SetStep(short_step, ToyRows(6), {12, 3});
  drafts(short_step, 3);
  bad = session.Call(short_step);
  EXPECT_EQ(bad.error().code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(bad.error().message(),
            "step: logits.rows is 6 but the stepped sequences need 7 (sequence 12: 4 live beams, "
            "sequence 3: 2 drafts)");
  // Nothing changed: the right step works.
  v1::SessionRequest right;
  SetStep(right, ToyRows(7), {12, 3});
  drafts(right, 3);
  const v1::SessionResponse second = session.CallOk(right);
  EXPECT_EQ(second.results(0).beams_size(), 4);
  EXPECT_TRUE(second.results(1).has_verify());
  EXPECT_TRUE(session.Close().ok());
}

TEST_F(BeamSessionTest, LimitsFlagsCountBeams) {
  ServerOptions options;
  options.session.limits.max_beam_width = 4;
  options.session.limits.max_sequences = 6;
  StartServer(options);
  TestSession session(*stub_);
  v1::SamplingParams params;
  v1::SessionRequest wide;
  AddSequence(wide, 1, params, {1});
  wide.mutable_add(0)->mutable_beam()->set_beam_width(5);
  EXPECT_EQ(session.Call(wide).error().message(),
            "add[0].beam.beam_width must be in [1, 4] (the server's --max_beam_width), got 5");
  v1::SessionRequest four;
  AddSequence(four, 1, params, {1});
  four.mutable_add(0)->mutable_beam()->set_beam_width(4);
  session.CallOk(four);
  v1::SessionRequest three;
  AddSequence(three, 2, params, {1});
  three.mutable_add(0)->mutable_beam()->set_beam_width(3);
  const v1::SessionResponse full = session.Call(three);
  EXPECT_EQ(full.error().code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(full.error().message(), HasSubstr("would hold 7 sequences; the limit is 6"));
  v1::SessionRequest two;
  AddSequence(two, 2, params, {1});
  two.mutable_add(0)->mutable_beam()->set_beam_width(2);
  session.CallOk(two);
  EXPECT_EQ(server_->service().live_sequences(), 2);
  v1::SessionRequest release;
  release.add_release(1);
  release.add_release(2);
  session.CallOk(release);
  EXPECT_EQ(server_->service().live_sequences(), 0);
  EXPECT_TRUE(session.Close().ok());

  options.session.limits.max_beam_width = 0;
  EXPECT_EQ(Server::Start(options).status().message(), "session max_beam_width must be > 0, got 0");
}

}  // namespace
}  // namespace tokensampler::service
