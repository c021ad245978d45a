// Sampler.Session end to end, in-process: a real Server, real generated stubs, the real core.
// The reference for every token is the stateless Sample RPC of the same server with the full
// history; the live-session counters come from the service itself.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/server.h"
#include "tests/testing/in_process_server.h"
#include "tests/testing/service_testing.h"
#include "tests/testing/session_testing.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::service {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;
using ::tokensampler::testing::AddSequence;
using ::tokensampler::testing::kToyEos;
using ::tokensampler::testing::kToyStop;
using ::tokensampler::testing::kToyStopSeq0;
using ::tokensampler::testing::kToyStopSeq1;
using ::tokensampler::testing::MakeLogits;
using ::tokensampler::testing::SetDeadline;
using ::tokensampler::testing::SetStep;
using ::tokensampler::testing::TestSession;
using ::tokensampler::testing::ToyModelLogits;
using ::tokensampler::testing::WaitUntil;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

class SessionServiceTest : public ::tokensampler::testing::InProcessServerTest {
 protected:
  int64_t live_sessions() const { return server_->service().live_sessions(); }
  int64_t live_sequences() const { return server_->service().live_sequences(); }

  // Waits until no session stream and no sequence is live.
  void ExpectAllStateFreed() {
    EXPECT_TRUE(WaitUntil([this] { return live_sessions() == 0 && live_sequences() == 0; }))
        << live_sessions() << " sessions, " << live_sequences() << " sequences still live";
  }
};

// What the test knows of a sequence: enough to ask Sample for its next token.
struct Reference {
  v1::SamplingParams params;
  std::vector<int32_t> prompt;
  std::vector<int32_t> output;
  std::optional<float> mirostat_mu;
  bool finished = false;
};

void AddRow(v1::SampleRequest& request, const Reference& ref, int n = 1) {
  v1::SampleRow& row = *request.add_rows();
  *row.mutable_params() = ref.params;
  if (n != 1) row.mutable_params()->set_n(n);
  row.mutable_prompt_token_ids()->Add(ref.prompt.begin(), ref.prompt.end());
  row.mutable_output_token_ids()->Add(ref.output.begin(), ref.output.end());
  if (ref.mirostat_mu.has_value()) row.set_mirostat_mu(*ref.mirostat_mu);
}

// Every field a SequenceResult shares with the SampledToken of the reference.
void ExpectSameToken(const v1::SequenceResult& got, const v1::SampledToken& want,
                     const std::string& where) {
  ASSERT_EQ(got.token_id(), want.token_id()) << where;
  EXPECT_EQ(got.logprob(), want.logprob()) << where;
  ASSERT_EQ(got.top_logprobs_size(), want.top_logprobs_size()) << where;
  for (int k = 0; k < got.top_logprobs_size(); ++k) {
    EXPECT_EQ(got.top_logprobs(k).token_id(), want.top_logprobs(k).token_id()) << where;
    EXPECT_EQ(got.top_logprobs(k).logprob(), want.top_logprobs(k).logprob()) << where;
  }
  EXPECT_EQ(got.finish_reason(), want.finish_reason()) << where;
  EXPECT_EQ(got.has_stop_token_id(), want.has_stop_token_id()) << where;
  EXPECT_EQ(got.stop_token_id(), want.stop_token_id()) << where;
  EXPECT_EQ(got.has_stop_sequence_index(), want.has_stop_sequence_index()) << where;
  EXPECT_EQ(got.stop_sequence_index(), want.stop_sequence_index()) << where;
  EXPECT_EQ(got.has_mirostat_mu(), want.has_mirostat_mu()) << where;
  EXPECT_EQ(got.mirostat_mu(), want.mirostat_mu()) << where;
}

// Random parameters covering the stateful parts: seeds, penalties over the history, DRY,
// no-repeat-ngram, mirostat μ, min_tokens, max_tokens, EOS, stop ids and stop sequences.
v1::SamplingParams RandomParams(std::mt19937_64& rng, uint32_t vocab) {
  v1::SamplingParams p;
  p.set_seed(rng());
  switch (rng() % 7) {
    case 0:
      p.set_temperature(0.0f);
      break;
    case 1:
      p.set_top_k(20);
      p.set_top_p(0.9f);
      break;
    case 2:
      p.set_min_p(0.05f);
      p.set_temperature(0.8f);
      break;
    case 3:
      p.set_mirostat_mode(static_cast<int32_t>(1 + rng() % 2));
      p.set_mirostat_tau(3.0f);
      break;
    case 4:
      p.set_dry_multiplier(0.8f);
      p.set_no_repeat_ngram_size(3);
      break;
    case 5:
      p.set_xtc_probability(0.5f);
      p.set_typical_p(0.8f);
      break;
    default:
      p.set_top_n_sigma(1.5f);
      p.set_temperature(1.3f);
      break;
  }
  if (rng() % 2 == 0) p.set_repetition_penalty(1.0f + static_cast<float>(rng() % 4) * 0.1f);
  if (rng() % 2 == 0) p.set_frequency_penalty(static_cast<float>(rng() % 3) * 0.3f);
  if (rng() % 2 == 0) p.set_presence_penalty(0.5f);
  if (rng() % 4 == 0) p.set_penalty_last_n(8);
  if (rng() % 4 == 0) (*p.mutable_logit_bias())[static_cast<int32_t>(rng() % vocab)] = 3.0f;
  if (rng() % 2 == 0) p.add_eos_token_ids(kToyEos);
  if (rng() % 2 == 0) p.add_stop_token_ids(kToyStop);
  if (rng() % 2 == 0) {
    v1::TokenSequence& stop = *p.add_stop_token_sequences();
    stop.add_token_ids(kToyStopSeq0);
    stop.add_token_ids(kToyStopSeq1);
  }
  p.set_min_tokens(static_cast<int32_t>(rng() % 4));
  if (rng() % 3 != 0) p.set_max_tokens(static_cast<int32_t>(10 + rng() % 60));
  p.set_logprobs(static_cast<int32_t>(rng() % 4));
  p.set_logprobs_mode(static_cast<v1::LogprobsMode>(1 + rng() % 4));
  return p;
}

// ---------------------------------------------------------------------------------------------
// The acceptance test of issue 5.

TEST_F(SessionServiceTest, TwoHundredSequencesFiftyStepsGiveExactlyTheTokensOfSample) {
  constexpr int kSequences = 200;
  constexpr int kSteps = 50;
  constexpr uint32_t kVocab = 512;
  constexpr uint64_t kModelSeed = 77;
  std::mt19937_64 rng(2024);
  std::map<uint64_t, Reference> refs;
  for (int i = 0; i < kSequences; ++i) {
    Reference ref;
    ref.params = RandomParams(rng, kVocab);
    const size_t prompt_size = 1 + rng() % 8;
    for (size_t t = 0; t < prompt_size; ++t) {
      ref.prompt.push_back(static_cast<int32_t>(5 + rng() % (kVocab - 5)));
    }
    refs[1000 + static_cast<uint64_t>(i) * 7] = ref;  // ids need not be dense
  }

  TestSession session(*stub_);
  const v1::DType dtypes[] = {v1::DTYPE_FLOAT32, v1::DTYPE_BFLOAT16, v1::DTYPE_FLOAT16};
  std::map<v1::FinishReason, int> finishes;
  int stop_sequences = 0;
  for (int step = 0; step < kSteps; ++step) {
    v1::SessionRequest request;
    // Half of the sequences join at step 0, the other half at step 10, in the step's request.
    for (auto& [id, ref] : refs) {
      const bool early = (id / 7) % 2 == 0;
      if ((step == 0 && early) || (step == 10 && !early)) {
        AddSequence(request, id, ref.params, ref.prompt);
      }
    }
    std::vector<uint64_t> ids;
    for (const auto& [id, ref] : refs) {
      const bool early = (id / 7) % 2 == 0;
      if (!ref.finished && (early || step >= 10)) ids.push_back(id);
    }
    std::shuffle(ids.begin(), ids.end(), rng);  // rows in a new order every step
    std::vector<std::vector<float>> rows;
    v1::SampleRequest reference;
    for (uint64_t id : ids) {
      const Reference& ref = refs[id];
      rows.push_back(ToyModelLogits(kModelSeed + id, ref.prompt, ref.output, kVocab));
      AddRow(reference, ref);
    }
    const v1::DType dtype = dtypes[step % 3];
    SetStep(request, rows, ids, dtype);
    *reference.mutable_logits() = MakeLogits(rows, dtype);

    const v1::SessionResponse got = session.CallOk(request);
    const v1::SampleResponse want = SampleOk(reference);
    ASSERT_EQ(got.results_size(), static_cast<int>(ids.size())) << "step " << step;
    ASSERT_EQ(want.results_size(), static_cast<int>(ids.size())) << "step " << step;
    int live = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      const v1::SequenceResult& result = got.results(static_cast<int>(i));
      const v1::SampledToken& expected = want.results(static_cast<int>(i));
      ASSERT_EQ(result.sequence_id(), ids[i]);
      ExpectSameToken(result, expected, absl::StrCat("sequence ", ids[i], " step ", step));
      Reference& ref = refs[ids[i]];
      ref.output.push_back(expected.token_id());
      if (expected.has_mirostat_mu()) ref.mirostat_mu = expected.mirostat_mu();
      if (expected.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
        ref.finished = true;
        ++finishes[expected.finish_reason()];
        if (expected.has_stop_sequence_index()) ++stop_sequences;
      } else {
        ++live;
      }
    }
    // Finished sequences are released by the server itself.
    EXPECT_EQ(live_sequences(), live) << "step " << step;
  }
  // Every way to end occurred, and some sequences are still going after 50 steps.
  EXPECT_GT(finishes[v1::FINISH_REASON_EOS], 0);
  EXPECT_GT(finishes[v1::FINISH_REASON_STOP], stop_sequences);  // stop token ids
  EXPECT_GT(stop_sequences, 0);
  EXPECT_GT(finishes[v1::FINISH_REASON_LENGTH], 0);
  EXPECT_GT(live_sequences(), 0);
  EXPECT_TRUE(session.Close().ok());
  ExpectAllStateFreed();
}

// ---------------------------------------------------------------------------------------------
// Fork, release, finish reasons.

v1::SamplingParams SeededParams(uint64_t seed) {
  v1::SamplingParams p;
  p.set_seed(seed);
  p.set_top_k(40);
  p.set_repetition_penalty(1.2f);
  p.set_presence_penalty(0.4f);
  p.set_logprobs(1);
  return p;
}

TEST_F(SessionServiceTest, ForkedChildrenAreTheNSamplesOfSampleAtEveryStep) {
  constexpr uint32_t kVocab = 256;
  TestSession session(*stub_);
  std::map<uint64_t, Reference> refs;
  std::map<uint64_t, int> sample_index = {{1, 0}, {2, 1}, {3, 2}, {4, 3}};
  refs[1].params = SeededParams(9);
  refs[1].prompt = {10, 11, 12};
  int family = 4;  // samples of the family handed out so far: 1 and its three children
  for (int step = 0; step < 8; ++step) {
    v1::SessionRequest request;
    if (step == 0) {
      // Add and fork in the request of the first step: Sample with n = 4 at every step.
      AddSequence(request, 1, refs[1].params, refs[1].prompt);
      v1::Fork& fork = *request.add_fork();
      fork.set_parent_id(1);
      fork.add_child_ids(2);
      fork.add_child_ids(3);
      fork.add_child_ids(4);
      for (uint64_t child : {2u, 3u, 4u}) refs[child] = refs[1];
    }
    if (step == 3) {
      // A later fork continues the family's sample indexes: child 5 of 2 is sample 4.
      v1::Fork& fork = *request.add_fork();
      fork.set_parent_id(2);
      fork.add_child_ids(5);
      refs[5] = refs[2];
      sample_index[5] = family++;
    }
    std::vector<uint64_t> ids;
    std::vector<std::vector<float>> rows;
    for (const auto& [id, ref] : refs) {
      ids.push_back(id);
      rows.push_back(ToyModelLogits(5, ref.prompt, ref.output, kVocab));
    }
    SetStep(request, rows, ids);
    const v1::SessionResponse got = session.CallOk(request);
    ASSERT_EQ(got.results_size(), static_cast<int>(ids.size()));
    for (size_t i = 0; i < ids.size(); ++i) {
      // The reference: the sequence's own history with n = family size; take its sample.
      Reference& ref = refs[ids[i]];
      v1::SampleRequest reference;
      *reference.mutable_logits() = MakeLogits({rows[i]});
      AddRow(reference, ref, family);
      const v1::SampleResponse want = SampleOk(reference);
      ASSERT_EQ(want.results_size(), family);
      const v1::SampledToken& expected = want.results(sample_index[ids[i]]);
      ExpectSameToken(got.results(static_cast<int>(i)), expected,
                      absl::StrCat("sequence ", ids[i], " step ", step));
      ref.output.push_back(expected.token_id());
    }
  }
  // The children drew different tokens (independent RNG streams), from the same start.
  EXPECT_NE(refs[2].output, refs[3].output);
  EXPECT_NE(refs[3].output, refs[4].output);
  EXPECT_EQ(live_sequences(), 5);
  EXPECT_TRUE(session.Close().ok());
  ExpectAllStateFreed();
}

TEST_F(SessionServiceTest, ReleasedSequencesAreGoneAndOthersUntouched) {
  constexpr uint32_t kVocab = 64;
  TestSession session(*stub_);
  Reference a, b;
  a.params = SeededParams(1);
  b.params = SeededParams(2);
  v1::SessionRequest add;
  AddSequence(add, 1, a.params);
  AddSequence(add, 2, b.params);
  session.CallOk(add);
  EXPECT_EQ(live_sequences(), 2);

  auto step = [&](uint64_t id, Reference& ref) {
    const std::vector<float> row = ToyModelLogits(3, ref.prompt, ref.output, kVocab);
    v1::SessionRequest request;
    SetStep(request, {row}, {id});
    const v1::SessionResponse got = session.Call(request);
    if (got.error().code() != 0) return got;
    v1::SampleRequest reference;
    *reference.mutable_logits() = MakeLogits({row});
    AddRow(reference, ref);
    const v1::SampleResponse want = SampleOk(reference);
    ExpectSameToken(got.results(0), want.results(0), absl::StrCat("sequence ", id));
    ref.output.push_back(want.results(0).token_id());
    return got;
  };
  step(1, a);
  step(2, b);

  v1::SessionRequest release;
  release.add_release(1);
  const v1::SessionResponse released = session.CallOk(release);
  EXPECT_EQ(released.results_size(), 0);
  EXPECT_EQ(live_sequences(), 1);

  const v1::SessionResponse gone = step(1, a);
  EXPECT_EQ(gone.error().code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(gone.error().message(),
            "step: sequence 1 is not in this session (never added, released or finished)");
  EXPECT_EQ(gone.results_size(), 0);
  // Sequence 2 goes on exactly as if nothing had happened.
  EXPECT_EQ(step(2, b).error().code(), 0);
  EXPECT_EQ(step(2, b).error().code(), 0);

  const v1::SessionResponse twice = session.Call(release);
  EXPECT_EQ(twice.error().code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(twice.error().message(), "release[0]: sequence 1 is not in this session");

  // A released id can be used again, for a new sequence.
  Reference again;
  again.params = SeededParams(1);
  v1::SessionRequest re_add;
  AddSequence(re_add, 1, again.params);
  session.CallOk(re_add);
  EXPECT_EQ(step(1, again).error().code(), 0);
  EXPECT_EQ(again.output.size(), 1u);
  EXPECT_EQ(live_sequences(), 2);
  EXPECT_TRUE(session.Close().ok());
  ExpectAllStateFreed();
}

// A row of `vocab` logits whose order is `ranking` first (descending), everything else -5.
std::vector<float> Ranked(std::initializer_list<int> ranking, int vocab = 8) {
  std::vector<float> row(static_cast<size_t>(vocab), -5.0f);
  float value = 5.0f;
  for (int token : ranking) {
    row[static_cast<size_t>(token)] = value;
    value -= 1.0f;
  }
  return row;
}

TEST_F(SessionServiceTest, FinishReasonsReleaseTheSequenceAutomatically) {
  TestSession session(*stub_);
  v1::SessionRequest add;
  v1::SamplingParams greedy;
  greedy.set_temperature(0.0f);
  v1::SamplingParams length = greedy;
  length.set_max_tokens(2);
  AddSequence(add, 10, length);
  v1::SamplingParams eos = greedy;
  eos.add_eos_token_ids(3);
  AddSequence(add, 11, eos);
  v1::SamplingParams stop = greedy;
  stop.add_stop_token_ids(4);
  stop.add_stop_token_ids(6);
  AddSequence(add, 12, stop);
  v1::SamplingParams stop_sequence = greedy;
  stop_sequence.add_stop_token_sequences()->add_token_ids(7);  // never completed
  v1::TokenSequence& five_six = *stop_sequence.add_stop_token_sequences();
  five_six.add_token_ids(5);
  five_six.add_token_ids(6);
  AddSequence(add, 13, stop_sequence);
  v1::SamplingParams late_eos = eos;
  late_eos.set_min_tokens(1);
  AddSequence(add, 14, late_eos);
  session.CallOk(add);
  EXPECT_EQ(live_sequences(), 5);

  // Step 1: 10 goes on (1 of 2 tokens), 11 ends on EOS, 12 on stop id 6, 13 sees the 5 of "5 6",
  // 14 may not end yet (min_tokens) so its EOS is masked and 1 is drawn.
  v1::SessionRequest first;
  SetStep(first, {Ranked({0}), Ranked({3}), Ranked({6}), Ranked({5}), Ranked({3, 1})},
          {10, 11, 12, 13, 14});
  const v1::SessionResponse one = session.CallOk(first);
  ASSERT_EQ(one.results_size(), 5);
  EXPECT_EQ(one.results(0).finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
  EXPECT_EQ(one.results(1).finish_reason(), v1::FINISH_REASON_EOS);
  EXPECT_EQ(one.results(2).finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(one.results(2).stop_token_id(), 6);
  EXPECT_EQ(one.results(3).token_id(), 5);
  EXPECT_EQ(one.results(3).finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
  EXPECT_EQ(one.results(4).token_id(), 1);
  EXPECT_EQ(one.results(4).finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
  EXPECT_EQ(live_sequences(), 3);

  // The finished ones are gone: stepping one is NOT_FOUND and changes nothing else.
  v1::SessionRequest finished;
  SetStep(finished, {Ranked({0}), Ranked({0})}, {10, 11});
  const v1::SessionResponse not_found = session.Call(finished);
  EXPECT_EQ(not_found.error().code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(not_found.error().message(), HasSubstr("sequence 11 is not in this session"));

  // Step 2: 10 reaches max_tokens, 13 completes "5 6" (index 1), 14 ends on EOS now.
  v1::SessionRequest second;
  SetStep(second, {Ranked({2}), Ranked({6}), Ranked({3})}, {10, 13, 14});
  const v1::SessionResponse two = session.CallOk(second);
  ASSERT_EQ(two.results_size(), 3);
  EXPECT_EQ(two.results(0).finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(two.results(1).finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(two.results(1).stop_sequence_index(), 1u);
  EXPECT_EQ(two.results(2).finish_reason(), v1::FINISH_REASON_EOS);
  EXPECT_EQ(live_sequences(), 0);
  EXPECT_EQ(live_sessions(), 1);
  EXPECT_TRUE(session.Close().ok());
  ExpectAllStateFreed();
}

// ---------------------------------------------------------------------------------------------
// Every per-request error: reported in the response, the stream stays usable, the state is as
// documented (the failing entry and what follows it did not happen).

struct ErrorCase {
  std::string name;
  std::function<void(v1::SessionRequest&)> build;
  grpc::StatusCode code;
  std::string message;  // the error message starts with this
  int live_after;       // sequences live afterwards (1 and 2 before)
};

void PrintTo(const ErrorCase& error_case, std::ostream* os) { *os << error_case.name; }

v1::SamplingParams Plain() {
  v1::SamplingParams p;
  p.set_seed(4);
  return p;
}

const ErrorCase kErrorCases[] = {
    {"StepUnknownId",
     [](v1::SessionRequest& r) {
       SetStep(r, {Ranked({1}), Ranked({1})}, {1, 99});
     },
     grpc::StatusCode::NOT_FOUND,
     "step: sequence 99 is not in this session (never added, released or finished)", 2},
    {"ReleaseUnknownId", [](v1::SessionRequest& r) { r.add_release(99); },
     grpc::StatusCode::NOT_FOUND, "release[0]: sequence 99 is not in this session", 2},
    {"ReleaseSecondUnknownKeepsTheFirst",
     [](v1::SessionRequest& r) {
       r.add_release(2);
       r.add_release(98);
     },
     grpc::StatusCode::NOT_FOUND, "release[1]: sequence 98 is not in this session", 1},
    {"ForkUnknownParent",
     [](v1::SessionRequest& r) {
       v1::Fork& f = *r.add_fork();
       f.set_parent_id(99);
       f.add_child_ids(5);
     },
     grpc::StatusCode::NOT_FOUND, "fork[0]: sequence 99 is not in this session", 2},
    {"DuplicateAdd", [](v1::SessionRequest& r) { AddSequence(r, 1, Plain()); },
     grpc::StatusCode::ALREADY_EXISTS, "add[0]: sequence 1 already exists", 2},
    {"DuplicateAddAfterAGoodOne",
     [](v1::SessionRequest& r) {
       AddSequence(r, 3, Plain());
       AddSequence(r, 3, Plain());
     },
     grpc::StatusCode::ALREADY_EXISTS, "add[1]: sequence 3 already exists", 3},
    {"ForkIntoALiveId",
     [](v1::SessionRequest& r) {
       v1::Fork& f = *r.add_fork();
       f.set_parent_id(1);
       f.add_child_ids(2);
     },
     grpc::StatusCode::ALREADY_EXISTS, "fork[0]: sequence 2 already exists", 2},
    {"ForkChildTwice",
     [](v1::SessionRequest& r) {
       v1::Fork& f = *r.add_fork();
       f.set_parent_id(1);
       f.add_child_ids(5);
       f.add_child_ids(5);
     },
     grpc::StatusCode::INVALID_ARGUMENT, "fork[0]: fork of 1 lists child 5 twice or as the parent",
     2},
    {"AddBadParams",
     [](v1::SessionRequest& r) {
       v1::SamplingParams p = Plain();
       p.set_top_p(0.0f);
       AddSequence(r, 3, p);
     },
     grpc::StatusCode::INVALID_ARGUMENT, "add[0].params.top_p must be in (0, 1], got 0", 2},
    {"AddWithN",
     [](v1::SessionRequest& r) {
       v1::SamplingParams p = Plain();
       p.set_n(2);
       AddSequence(r, 3, p);
     },
     grpc::StatusCode::INVALID_ARGUMENT, "add[0].params.n must be 1 in a session", 2},
    {"AddUnknownPreset",
     [](v1::SessionRequest& r) {
       v1::SamplingParams p = Plain();
       p.set_preset("wild");
       AddSequence(r, 3, p);
     },
     grpc::StatusCode::INVALID_ARGUMENT, "add[0].params.preset", 2},
    {"StepWithoutDType",
     [](v1::SessionRequest& r) {
       SetStep(r, {Ranked({1})}, {1});
       r.mutable_step()->mutable_logits()->set_dtype(v1::DTYPE_UNSPECIFIED);
     },
     grpc::StatusCode::INVALID_ARGUMENT, "step.logits.dtype must be set, got DTYPE_UNSPECIFIED", 2},
    {"StepIdsAndRowsDiffer",
     [](v1::SessionRequest& r) {
       SetStep(r, {Ranked({1})}, {1, 2});
     },
     grpc::StatusCode::INVALID_ARGUMENT, "step: logits.rows is 1 but the stepped sequences need 2",
     2},
    {"StepSameIdTwice",
     [](v1::SessionRequest& r) {
       SetStep(r, {Ranked({1}), Ranked({1})}, {1, 1});
     },
     grpc::StatusCode::INVALID_ARGUMENT, "step: step.sequence_ids lists sequence 1 twice", 2},
    {"StepNaN",
     [](v1::SessionRequest& r) {
       std::vector<float> nan = Ranked({1});
       nan[3] = std::numeric_limits<float>::quiet_NaN();
       SetStep(r, {Ranked({1}), nan}, {1, 2});
     },
     grpc::StatusCode::INVALID_ARGUMENT, "step: logits.data is NaN at row 1, token 3", 2},
    {"PromptTokenOutsideTheVocabulary",
     [](v1::SessionRequest& r) {
       AddSequence(r, 3, Plain(), {100});  // checked at its first step: the add takes effect
       SetStep(r, {Ranked({1}), Ranked({1})}, {1, 3});
     },
     grpc::StatusCode::INVALID_ARGUMENT, "step: sequence 3, rows[1]", 3},
    {"ParamsOutsideTheVocabulary",
     [](v1::SessionRequest& r) {
       v1::SamplingParams p = Plain();
       p.add_stop_token_ids(50);
       AddSequence(r, 3, p);
       SetStep(r, {Ranked({1})}, {3});
     },
     grpc::StatusCode::INVALID_ARGUMENT,
     "step: sequence 3: params.stop_token_ids[0] = 50 is out of range [0, 8)", 3},
    {"EveryTokenMasked",
     [](v1::SessionRequest& r) {
       v1::SamplingParams p = Plain();
       p.add_allowed_token_ids(1);
       (*p.mutable_logit_bias())[1] = kNegInf;
       AddSequence(r, 3, p);
       SetStep(r, {Ranked({1}), Ranked({1})}, {1, 3});
     },
     grpc::StatusCode::INVALID_ARGUMENT, "step: sequence 3, rows[1]: every token is masked", 3},
    {"TooManySequences",
     [](v1::SessionRequest& r) {
       AddSequence(r, 3, Plain());
       AddSequence(r, 4, Plain());
       AddSequence(r, 5, Plain());
     },
     grpc::StatusCode::RESOURCE_EXHAUSTED,
     "add[2]: the session would hold 5 sequences; the limit is 4", 4},
    {"ForkBeyondTheLimit",
     [](v1::SessionRequest& r) {
       v1::Fork& f = *r.add_fork();
       f.set_parent_id(1);
       f.add_child_ids(5);
       f.add_child_ids(6);
       f.add_child_ids(7);
     },
     grpc::StatusCode::RESOURCE_EXHAUSTED,
     "fork[0]: the session would hold 5 sequences; the limit is 4", 2},
    {"PromptTooLong",
     [](v1::SessionRequest& r) { AddSequence(r, 3, Plain(), std::vector<int32_t>(41, 1)); },
     grpc::StatusCode::RESOURCE_EXHAUSTED,
     "add[0]: prompt_token_ids has 41 tokens; the limit is 40", 2},
};

class SessionErrorTest : public SessionServiceTest,
                         public ::testing::WithParamInterface<ErrorCase> {
 protected:
  void SetUp() override {
    ServerOptions options;
    options.session.limits.max_sequences = 4;
    options.session.limits.max_history_tokens = 40;
    StartServer(options);
  }
};

TEST_P(SessionErrorTest, ReportedInTheResponseAndTheStreamGoesOn) {
  TestSession session(*stub_);
  // Sequences 1 and 2, stepped twice, their history known.
  Reference a, b;
  a.params = SeededParams(1);
  b.params = SeededParams(2);
  a.prompt = {1, 2, 3};
  v1::SessionRequest add;
  AddSequence(add, 1, a.params, a.prompt);
  AddSequence(add, 2, b.params, b.prompt);
  session.CallOk(add);
  for (int i = 0; i < 2; ++i) {
    v1::SessionRequest request;
    SetStep(request, {Ranked({1, 2, 3}), Ranked({4, 5, 6})}, {1, 2});
    const v1::SessionResponse response = session.CallOk(request);
    ASSERT_EQ(response.results_size(), 2);
    a.output.push_back(response.results(0).token_id());
    b.output.push_back(response.results(1).token_id());
  }

  v1::SessionRequest bad;
  bad.set_request_id(4242);
  GetParam().build(bad);
  const v1::SessionResponse response = session.Call(bad);
  EXPECT_EQ(response.request_id(), 4242u);
  EXPECT_EQ(response.error().code(), GetParam().code) << response.error().message();
  EXPECT_THAT(response.error().message(), StartsWith(GetParam().message));
  EXPECT_EQ(response.results_size(), 0);
  EXPECT_EQ(live_sequences(), GetParam().live_after);

  // Sequence 1 was not touched: its next token is the one Sample gives for its history.
  const std::vector<float> row = Ranked({1, 2, 3, 4, 5, 6, 7, 0});
  v1::SessionRequest next;
  SetStep(next, {row}, {1});
  const v1::SessionResponse got = session.CallOk(next);
  v1::SampleRequest reference;
  *reference.mutable_logits() = MakeLogits({row});
  AddRow(reference, a);
  const v1::SampleResponse want = SampleOk(reference);
  ASSERT_EQ(got.results_size(), 1);
  ExpectSameToken(got.results(0), want.results(0), "sequence 1 after the error");
  EXPECT_TRUE(session.Close().ok());
  ExpectAllStateFreed();
}

INSTANTIATE_TEST_SUITE_P(AllErrors, SessionErrorTest, ::testing::ValuesIn(kErrorCases),
                         [](const ::testing::TestParamInfo<ErrorCase>& param) {
                           return param.param.name;
                         });

TEST_F(SessionErrorTest, HistoryLimitStopsAStepAndChangesNoSequence) {
  TestSession session(*stub_);
  v1::SessionRequest add;
  AddSequence(add, 1, Plain(), std::vector<int32_t>(38, 1));
  v1::SamplingParams three = Plain();
  three.set_max_tokens(3);
  AddSequence(add, 2, three);
  session.CallOk(add);
  for (int i = 0; i < 2; ++i) {  // 38 + 2 = 40 tokens: at the limit
    v1::SessionRequest step;
    SetStep(step, {Ranked({1}), Ranked({1})}, {1, 2});
    session.CallOk(step);
  }
  v1::SessionRequest over;
  SetStep(over, {Ranked({1}), Ranked({1})}, {2, 1});
  const v1::SessionResponse response = session.Call(over);
  EXPECT_EQ(response.error().code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(response.error().message(), "step: sequence 1 would exceed 40 history tokens");
  // Sequence 2 did not advance either (a failed step changes no sequence): its next token is
  // its third, which reaches max_tokens 3.
  v1::SessionRequest two;
  SetStep(two, {Ranked({1})}, {2});
  const v1::SessionResponse third = session.CallOk(two);
  ASSERT_EQ(third.results_size(), 1);
  EXPECT_EQ(third.results(0).finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(live_sequences(), 1);
  EXPECT_TRUE(session.Close().ok());
  ExpectAllStateFreed();
}

TEST_F(SessionServiceTest, EmptyRequestIsAnsweredWithAnEmptyResponse) {
  TestSession session(*stub_);
  v1::SessionRequest ping;
  ping.set_request_id(7);
  const v1::SessionResponse pong = session.CallOk(ping);
  EXPECT_EQ(pong.request_id(), 7u);
  EXPECT_EQ(pong.results_size(), 0);
  EXPECT_FALSE(pong.has_error());
  EXPECT_TRUE(session.Close().ok());
}

// ---------------------------------------------------------------------------------------------
// Order, concurrency, and the end of a stream.

TEST_F(SessionServiceTest, PipelinedRequestsAreAnsweredInOrder) {
  constexpr int kRequests = 60;
  TestSession session(*stub_);
  v1::SamplingParams greedy;
  greedy.set_temperature(0.0f);
  // Written back to back by one thread while this one reads (the server reads ahead and pushes
  // back through flow control): add, step, release of a new sequence in turn, each request's
  // answer in place.
  std::thread writer([&session, &greedy] {
    for (int i = 0; i < kRequests; ++i) {
      v1::SessionRequest request;
      request.set_request_id(static_cast<uint64_t>(1000 + i));
      const uint64_t id = static_cast<uint64_t>(i / 3);
      switch (i % 3) {
        case 0:
          AddSequence(request, id, greedy);
          break;
        case 1:
          SetStep(request, {Ranked({static_cast<int>(id % 8)})}, {id});
          break;
        default:
          request.add_release(id);
          break;
      }
      ASSERT_TRUE(session.Write(request));
    }
  });
  for (int i = 0; i < kRequests; ++i) {
    const std::optional<v1::SessionResponse> response = session.Read();
    ASSERT_TRUE(response.has_value()) << i;
    EXPECT_EQ(response->request_id(), static_cast<uint64_t>(1000 + i));
    EXPECT_FALSE(response->has_error()) << response->error().message();
    if (i % 3 == 1) {
      ASSERT_EQ(response->results_size(), 1);
      EXPECT_EQ(response->results(0).sequence_id(), static_cast<uint64_t>(i / 3));
      EXPECT_EQ(response->results(0).token_id(), (i / 3) % 8);
    }
  }
  writer.join();
  EXPECT_TRUE(session.Close().ok());
  ExpectAllStateFreed();
}

TEST_F(SessionServiceTest, ManyConcurrentStreamsEachMatchSample) {
  constexpr int kStreams = 12;
  constexpr int kSequences = 10;
  constexpr int kSteps = 15;
  constexpr uint32_t kVocab = 128;
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  absl::Notification all_open;
  std::atomic<int> open{0};
  for (int s = 0; s < kStreams; ++s) {
    threads.emplace_back([&, s] {
      std::mt19937_64 rng(static_cast<uint64_t>(s));
      TestSession session(*stub_);
      std::map<uint64_t, Reference> refs;
      v1::SessionRequest add;
      for (uint64_t id = 0; id < kSequences; ++id) {
        Reference& ref = refs[id];
        ref.params = RandomParams(rng, kVocab);
        ref.prompt = {static_cast<int32_t>(10 + id)};
        AddSequence(add, id, ref.params, ref.prompt);
      }
      session.CallOk(add);
      if (++open == kStreams) all_open.Notify();
      all_open.WaitForNotificationWithTimeout(absl::Seconds(20));
      for (int step = 0; step < kSteps; ++step) {
        v1::SessionRequest request;
        v1::SampleRequest reference;
        std::vector<uint64_t> ids;
        std::vector<std::vector<float>> rows;
        for (const auto& [id, ref] : refs) {
          if (ref.finished) continue;
          ids.push_back(id);
          rows.push_back(ToyModelLogits(static_cast<uint64_t>(s), ref.prompt, ref.output, kVocab));
          AddRow(reference, ref);
        }
        if (ids.empty()) break;
        SetStep(request, rows, ids);
        *reference.mutable_logits() = MakeLogits(rows);
        const v1::SessionResponse got = session.CallOk(request);
        const v1::SampleResponse want = SampleOk(reference);
        if (got.results_size() != static_cast<int>(ids.size()) ||
            want.results_size() != static_cast<int>(ids.size())) {
          ++failures;
          return;
        }
        for (size_t i = 0; i < ids.size(); ++i) {
          const v1::SampledToken& expected = want.results(static_cast<int>(i));
          if (got.results(static_cast<int>(i)).token_id() != expected.token_id()) ++failures;
          Reference& ref = refs[ids[i]];
          ref.output.push_back(expected.token_id());
          if (expected.has_mirostat_mu()) ref.mirostat_mu = expected.mirostat_mu();
          ref.finished = expected.finish_reason() != v1::FINISH_REASON_UNSPECIFIED;
        }
      }
      if (!session.Close().ok()) ++failures;
    });
  }
  // While they run, every stream is counted.
  EXPECT_TRUE(all_open.WaitForNotificationWithTimeout(absl::Seconds(60)));
  EXPECT_GE(live_sessions(), 1);
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(failures.load(), 0);
  ExpectAllStateFreed();
}

TEST_F(SessionServiceTest, CancellingTheStreamFreesItsState) {
  TestSession session(*stub_);
  v1::SessionRequest add;
  for (uint64_t id = 0; id < 10; ++id) AddSequence(add, id, Plain(), {1, 2, 3});
  session.CallOk(add);
  EXPECT_EQ(live_sessions(), 1);
  EXPECT_EQ(live_sequences(), 10);
  EXPECT_EQ(session.Cancel().error_code(), grpc::StatusCode::CANCELLED);
  ExpectAllStateFreed();
}

TEST_F(SessionServiceTest, HalfCloseAnswersEverythingThenEndsOk) {
  TestSession session(*stub_);
  v1::SessionRequest add;
  AddSequence(add, 1, Plain());
  ASSERT_TRUE(session.Write(add));
  v1::SessionRequest step;
  SetStep(step, {Ranked({2})}, {1});
  ASSERT_TRUE(session.Write(step));
  // No read yet: half-close first, the two answers still come, then OK.
  const std::optional<v1::SessionResponse> first = session.Read();
  const std::optional<v1::SessionResponse> second = session.Read();
  ASSERT_TRUE(first.has_value() && second.has_value());
  EXPECT_EQ(second->results_size(), 1);
  EXPECT_TRUE(session.Close().ok());
  ExpectAllStateFreed();
}

// A server whose steps wait in a test hook until the test lets them go (or the stream is
// cancelled).
class HeldStepTest : public SessionServiceTest {
 protected:
  void StartWithHook(absl::Duration idle_timeout) {
    ServerOptions options;
    options.session.idle_timeout = idle_timeout;
    options.session.before_step_for_testing = [this](const std::atomic<bool>& cancelled) {
      step_started_.Notify();
      // Bounded: a broken test must not hang the server.
      WaitUntil([&] { return cancelled.load() || release_step_.HasBeenNotified(); });
    };
    StartServer(options);
  }

  absl::Notification step_started_;
  absl::Notification release_step_;
};

TEST_F(HeldStepTest, CancellingDuringAStepStopsTheStepAndFreesTheState) {
  StartWithHook(absl::Minutes(5));
  TestSession session(*stub_);
  v1::SessionRequest request;
  for (uint64_t id = 0; id < 5; ++id) AddSequence(request, id, Plain());
  SetStep(request, std::vector<std::vector<float>>(5, Ranked({1})), {0, 1, 2, 3, 4});
  ASSERT_TRUE(session.Write(request));
  ASSERT_TRUE(step_started_.WaitForNotificationWithTimeout(absl::Seconds(20)));
  EXPECT_EQ(live_sessions(), 1);
  EXPECT_EQ(session.Cancel().error_code(), grpc::StatusCode::CANCELLED);
  ExpectAllStateFreed();
  // The step saw the cancellation and stopped (Sampler::Run returned CANCELLED).
  EXPECT_EQ(server_->service().cancelled_session_steps(), 1);
}

TEST_F(HeldStepTest, IdleStreamEndsWithResourceExhaustedButARunningStepIsNotIdle) {
  StartWithHook(absl::Milliseconds(100));
  TestSession session(*stub_);
  v1::SessionRequest request;
  for (uint64_t id = 0; id < 3; ++id) AddSequence(request, id, Plain());
  SetStep(request, std::vector<std::vector<float>>(3, Ranked({1})), {0, 1, 2});
  ASSERT_TRUE(session.Write(request));
  ASSERT_TRUE(step_started_.WaitForNotificationWithTimeout(absl::Seconds(20)));
  // The step runs for longer than the idle timeout: the stream is busy, not idle.
  absl::SleepFor(absl::Milliseconds(500));
  release_step_.Notify();
  const std::optional<v1::SessionResponse> response = session.Read();
  ASSERT_TRUE(response.has_value());
  EXPECT_EQ(response->results_size(), 3);
  // Now nothing comes: the server ends the stream and frees its sequences.
  const grpc::Status status = session.AwaitEnd();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(status.error_message(),
              HasSubstr("idle for more than 100ms (--session_idle_timeout_seconds); its 3 "
                        "sequences are released"));
  ExpectAllStateFreed();
}

TEST_F(SessionServiceTest, ShutdownEndsOpenStreamsWithUnavailable) {
  // Over TCP: the in-process transport may close before a finished call's status is delivered.
  ServerOptions options;
  options.listen_addresses = {"127.0.0.1:0"};
  StartServer(options);
  stub_ = v1::Sampler::NewStub(
      ::tokensampler::testing::CreateTestChannel(server_->bound_addresses()[0]));
  TestSession session(*stub_);
  v1::SessionRequest add;
  AddSequence(add, 1, Plain());
  session.CallOk(add);
  std::thread shutdown([this] { server_->Shutdown(absl::Now() + absl::Seconds(20)); });
  const grpc::Status status = session.AwaitEnd();
  shutdown.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(status.error_message(), HasSubstr("shutting down"));
  EXPECT_EQ(live_sessions(), 0);
  EXPECT_EQ(live_sequences(), 0);
}

TEST_F(SessionServiceTest, OversizeRequestEndsTheStreamWithResourceExhausted) {
  ServerOptions options;
  options.max_message_bytes = 64 * 1024;
  StartServer(options);
  TestSession session(*stub_);
  v1::SessionRequest add;
  AddSequence(add, 1, Plain());
  session.CallOk(add);
  v1::SessionRequest big;
  SetStep(big, {std::vector<float>(32 * 1024, 0.5f)}, {1});  // 128 KiB of logits
  ASSERT_TRUE(session.Write(big));
  const grpc::Status status = session.AwaitEnd();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();
  ExpectAllStateFreed();
}

TEST(SessionServerOptionsTest, RejectsBadLimits) {
  ServerOptions options;
  options.session.limits.max_sequences = 0;
  EXPECT_EQ(Server::Start(options).status().message(), "session max_sequences must be > 0, got 0");
  options = ServerOptions{};
  options.session.limits.max_history_tokens = -1;
  EXPECT_EQ(Server::Start(options).status().message(),
            "session max_history_tokens must be > 0, got -1");
  options = ServerOptions{};
  options.session.idle_timeout = absl::ZeroDuration();
  EXPECT_EQ(Server::Start(options).status().code(), absl::StatusCode::kInvalidArgument);
  options = ServerOptions{};
  options.keepalive.time = absl::Seconds(-1);
  EXPECT_EQ(Server::Start(options).status().code(), absl::StatusCode::kInvalidArgument);
}

// A message that is not a SessionRequest ends the stream with INVALID_ARGUMENT naming it, after
// the answers to the requests before it; nothing after it is read (gRPC's typed stream would take
// it for the client's half-close and end with OK). The server keeps serving.
TEST_F(SessionServiceTest, UnparsableMessageEndsTheStreamWithInvalidArgument) {
  v1::SessionRequest first;
  first.set_request_id(7);
  AddSequence(first, 1, v1::SamplingParams(), {5, 6});
  v1::SessionRequest third;
  third.set_request_id(9);
  third.add_release(1);
  const std::string bad("\x0a\xff\xff\xff\x0f", 5);
  grpc::ChannelArguments args;
  std::vector<std::string> responses;
  const grpc::Status status = tokensampler::testing::RawStreamExchange(
      server_->InProcessChannel(args), "/tokensampler.v1.Sampler/Session",
      {first.SerializeAsString(), bad, third.SerializeAsString()}, &responses);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(),
              StartsWith("message 2 of the stream is not a tokensampler.v1.SessionRequest: "
                         "protobuf cannot parse its 5 bytes; the stream ends here"));
  ASSERT_EQ(responses.size(), 1u);
  v1::SessionResponse answered;
  ASSERT_TRUE(answered.ParseFromString(responses[0]));
  EXPECT_EQ(answered.request_id(), 7u);
  EXPECT_EQ(answered.error().code(), 0) << answered.error().message();
  ExpectAllStateFreed();

  TestSession session(*stub_);
  v1::SessionRequest add;
  AddSequence(add, 1, v1::SamplingParams());
  session.CallOk(add);
}

}  // namespace
}  // namespace tokensampler::service
