// Fuzz target: beam steps. Command sequences (add a beam search or a plain sequence, fork,
// release, step, cancelled step) against one SequenceTable, with arbitrary BeamSearchParams
// (widths 0 / beyond --max_beam_width, num_return_sequences > width, groups that do not divide
// the width, diversity, do_sample, length penalties negative / huge / non-finite, every early
// stopping mode, max / min tokens, EOS ids) and arbitrary logits (NaN, ±Inf, denormals, huge).
// A small model of the table knows each live id and how many rows its next step takes (1 for a
// plain sequence and before a search's first step, then one per live beam), so it predicts the
// step's row check exactly: a step whose rows match the model must not fail on the row count,
// one that does not must — which also shows that a failed step changed nothing. Successful
// steps must be well formed: parent_beam among the step's input rows, tokens in the
// vocabulary, scores not NaN, at most beam_width live beams, hypotheses best first and at most
// num_return_sequences, finished searches released; sizes and units always match the model.
// (The exact beam decisions are checked against tests/testing/beam_testing.h's reference in
// core_beam_test, on toy models; here the oracle is the contract on any input.)
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "core/beam.h"
#include "core/params.h"
#include "core/sampler.h"
#include "core/session.h"
#include "core/tensor.h"
#include "tests/fuzz/fuzz_core.h"
#include "tests/fuzz/fuzz_support.h"
#include "tests/testing/beam_testing.h"
#include "tests/testing/core_testing.h"

namespace tokensampler::fuzzing {
namespace {

constexpr uint64_t kMaxId = 7;

struct ModelSequence {
  std::optional<BeamParams> beam;
  size_t rows = 1;  // rows of the next step
};

class Harness {
 public:
  explicit Harness(FuzzInput& in)
      : in_(in),
        limits_{.max_sequences = in.IntegralInRange<int64_t>(1, 24),
                .max_history_tokens = in.IntegralInRange<int64_t>(1, 40),
                .max_beam_width = in.IntegralInRange<int32_t>(1, 8)},
        table_(limits_),
        vocab_(in.IntegralInRange<int32_t>(1, 48)) {}

  void Run() {
    for (int op = 0; op < 40 && !in_.empty(); ++op) {
      switch (in_.Integral<uint8_t>() % 7) {
        case 0:
        case 1:
          Add();
          break;
        case 2:
          Fork();
          break;
        case 3:
          Release();
          break;
        case 4:
          if (references_++ < 2) {
            CompareWithReference();
            break;
          }
          [[fallthrough]];
        default:
          Step();
          break;
      }
      CheckModel();
    }
  }

 private:
  uint64_t Id() { return in_.IntegralInRange<uint64_t>(0, kMaxId); }

  static void CheckError(const absl::Status& got, const char* what) {
    FUZZ_CHECK(got.ok() || !got.message().empty(), "%s: error without a message", what);
  }

  static int64_t UnitsOf(const ModelSequence& seq) {
    return seq.beam.has_value() ? seq.beam->beam_width : 1;
  }

  int64_t Units() const {
    int64_t units = 0;
    for (const auto& [id, seq] : model_) units += UnitsOf(seq);
    return units;
  }

  void CheckModel() {
    FUZZ_CHECK(table_.size() == static_cast<int64_t>(model_.size()), "table %lld, model %zu",
               static_cast<long long>(table_.size()), model_.size());
    FUZZ_CHECK(table_.units() == Units(), "table units %lld, model %lld",
               static_cast<long long>(table_.units()), static_cast<long long>(Units()));
    for (uint64_t id = 0; id <= kMaxId; ++id) {
      FUZZ_CHECK(table_.contains(id) == model_.contains(id), "id %llu live in one only",
                 static_cast<unsigned long long>(id));
    }
  }

  BeamParams FuzzBeam() {
    BeamParams b;
    b.beam_width = in_.Percent(10) ? in_.OneOf<int32_t>({-1, 0, 9, 17, INT32_MAX})
                                   : in_.IntegralInRange<int32_t>(1, 8);
    b.length_penalty =
        in_.Percent(10) ? in_.Float() : in_.OneOf({1.0f, 0.0f, 2.0f, -1.0f, 0.5f, -30.0f, 1e30f});
    b.early_stopping =
        in_.OneOf({EarlyStopping::kHeuristic, EarlyStopping::kTrue, EarlyStopping::kNever});
    b.num_return_sequences = in_.Percent(10) ? in_.OneOf<int32_t>({-1, 0, 9, 100})
                                             : in_.IntegralInRange<int32_t>(1, b.beam_width);
    if (in_.Percent(30)) {
      b.num_beam_groups = in_.OneOf<int32_t>({0, 1, 2, 3, 4, 8, -2});
      b.diversity_penalty = in_.Percent(10) ? in_.Float() : in_.OneOf({0.0f, 0.5f, 3.0f, 1e30f});
    }
    b.do_sample = in_.Percent(25);
    return b;
  }

  // Beam-friendly params most of the time (the fields beam search rejects stay unset), any
  // params sometimes.
  SamplingParams FuzzBeamSamplingParams() {
    if (in_.Percent(15)) return FuzzParams(in_, vocab_);
    SamplingParams p;
    p.seed = in_.Integral<uint64_t>();
    if (in_.Bool()) p.temperature = in_.OneOf({0.0f, 0.5f, 1.0f, 2.0f});
    if (in_.Percent(30)) p.top_k = in_.OneOf<int32_t>({1, 2, 5, 50});
    if (in_.Percent(20)) p.top_p = in_.OneOf({0.1f, 0.9f, 1.0f});
    if (in_.Percent(20)) p.repetition_penalty = in_.OneOf({0.5f, 1.3f, 3.0f});
    if (in_.Percent(15)) p.no_repeat_ngram_size = in_.OneOf<int32_t>({1, 2, 3});
    if (in_.Bool()) {
      p.eos_token_ids = FuzzTokens(in_, vocab_, 3);
      p.min_tokens = in_.OneOf<int32_t>({0, 1, 3, 100});
      p.ignore_eos = in_.Percent(10);
    }
    if (in_.Percent(20)) p.stop_token_ids = FuzzTokens(in_, vocab_, 2);
    if (in_.Percent(10)) p.stop_token_sequences = FuzzSequences(in_, vocab_);
    if (in_.Percent(85)) p.max_tokens = in_.OneOf<int32_t>({0, 1, 2, 3, 5, 8});
    return p;
  }

  void Add() {
    const uint64_t id = Id();
    const bool beam = in_.Percent(75);
    std::optional<BeamParams> beam_params;
    SamplingParams params;
    if (beam) {
      beam_params = FuzzBeam();
      params = FuzzBeamSamplingParams();
    } else {
      params = FuzzParams(in_, vocab_);
    }
    std::vector<int32_t> prompt = FuzzTokens(in_, vocab_, 8);
    const int32_t bound = params.token_bitmask.empty()
                              ? INT32_MAX
                              : static_cast<int32_t>(params.token_bitmask.size() * 8);
    const int64_t units = beam ? beam_params->beam_width : 1;
    absl::StatusCode want = absl::StatusCode::kOk;
    if (model_.contains(id)) {
      want = absl::StatusCode::kAlreadyExists;
    } else if (!ValidateParams(params, bound).ok() || params.n != 1) {
      want = absl::StatusCode::kInvalidArgument;
    } else if (static_cast<int64_t>(prompt.size()) > limits_.max_history_tokens) {
      want = absl::StatusCode::kResourceExhausted;  // (checked before the beam params)
    } else if (beam && !ValidateBeamParams(*beam_params, params, limits_.max_beam_width).ok()) {
      want = absl::StatusCode::kInvalidArgument;
    } else if (Units() + units > limits_.max_sequences) {
      want = absl::StatusCode::kResourceExhausted;
    }
    const absl::Status got = table_.Add(id, params, prompt, beam_params);
    FUZZ_CHECK(got.code() == want, "Add: got %s, the model expects code %d", got.ToString().c_str(),
               static_cast<int>(want));
    CheckError(got, "Add");
    if (got.ok()) model_[id] = {beam_params, 1};
  }

  void Fork() {
    const uint64_t parent = Id();
    std::vector<uint64_t> children(in_.IntegralInRange<size_t>(0, 2));
    for (uint64_t& child : children) child = Id();
    const absl::Status got = table_.Fork(parent, children);
    CheckError(got, "Fork");
    if (!model_.contains(parent)) {
      FUZZ_CHECK(got.code() == absl::StatusCode::kNotFound, "Fork: %s", got.ToString().c_str());
      return;
    }
    const int64_t more = static_cast<int64_t>(children.size()) * UnitsOf(model_[parent]);
    if (got.code() == absl::StatusCode::kResourceExhausted) {
      FUZZ_CHECK(Units() + more > limits_.max_sequences, "Fork: %s", got.ToString().c_str());
    }
    if (!got.ok()) return;  // nothing changed: CheckModel
    FUZZ_CHECK(Units() + more <= limits_.max_sequences, "Fork beyond max_sequences");
    const ModelSequence source = model_[parent];
    for (uint64_t child : children) {
      FUZZ_CHECK(!model_.contains(child), "Fork into live %llu",
                 static_cast<unsigned long long>(child));
      model_[child] = source;
    }
  }

  void Release() {
    const uint64_t id = Id();
    const absl::Status got = table_.Release(id);
    CheckError(got, "Release");
    FUZZ_CHECK(
        got.code() == (model_.erase(id) == 1 ? absl::StatusCode::kOk : absl::StatusCode::kNotFound),
        "Release: %s", got.ToString().c_str());
  }

  void Step() {
    std::vector<uint64_t> ids(in_.IntegralInRange<size_t>(0, 3));
    for (uint64_t& id : ids) id = Id();
    const bool cancel = in_.Percent(4);
    // Usually the step's vocabulary, sometimes another one (params and histories are checked
    // against it).
    const int32_t vocab = in_.Percent(90) ? vocab_ : in_.IntegralInRange<int32_t>(1, 48);
    const DType dtype = in_.OneOf({DType::kFloat32, DType::kBFloat16, DType::kFloat16});
    bool distinct = true;
    size_t needed = 0;
    {
      absl::flat_hash_set<uint64_t> seen;
      for (uint64_t id : ids) {
        distinct = distinct && seen.insert(id).second;
        const auto it = model_.find(id);
        needed += it == model_.end() ? 1 : it->second.rows;
      }
    }
    // The row count is usually right, sometimes off by one either way.
    int rows = static_cast<int>(needed);
    if (in_.Percent(8)) rows += in_.Bool() ? 1 : -1;
    if (rows <= 0) return;  // a step has at least one row (the service checks the tensor)
    const std::vector<uint8_t> bytes = FuzzLogits(in_, dtype, rows, vocab);
    absl::StatusOr<LogitsView> view =
        LogitsView::Create(dtype, static_cast<uint32_t>(rows), static_cast<uint32_t>(vocab), bytes);
    FUZZ_CHECK(view.ok(), "LogitsView::Create: %s", view.status().ToString().c_str());

    const std::atomic<bool> cancelled{cancel};
    const absl::StatusOr<std::vector<SequenceStep>> got =
        table_.Step(sampler_, *view, ids, &cancelled);
    CheckError(got.status(), "Step");
    const bool row_error = got.status().code() == absl::StatusCode::kInvalidArgument &&
                           got.status().message().find("logits.rows is") != absl::string_view::npos;
    if (distinct) {
      // The model's row count is the table's: a failed step before this one changed nothing.
      FUZZ_CHECK(row_error == (needed != static_cast<size_t>(rows)),
                 "Step: %s (the model needs %zu rows, the step has %d)",
                 got.status().ToString().c_str(), needed, rows);
    } else {
      FUZZ_CHECK(got.status().code() == absl::StatusCode::kInvalidArgument, "Step: %s",
                 got.status().ToString().c_str());
    }
    if (!got.ok()) {
      const absl::StatusCode code = got.status().code();
      FUZZ_CHECK(
          code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kNotFound ||
              code == absl::StatusCode::kResourceExhausted || code == absl::StatusCode::kCancelled,
          "Step: undocumented %s", got.status().ToString().c_str());
      return;  // nothing changed: CheckModel, and the next step's row check
    }
    FUZZ_CHECK(!cancel, "a cancelled step succeeded");
    FUZZ_CHECK(got->size() == ids.size(), "%zu results for %zu ids", got->size(), ids.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      const SequenceStep& result = (*got)[i];
      FUZZ_CHECK(result.sequence_id == ids[i], "result %zu is for %llu", i,
                 static_cast<unsigned long long>(result.sequence_id));
      ModelSequence& seq = model_.at(ids[i]);
      if (!seq.beam.has_value()) {
        FUZZ_CHECK(!result.beam.has_value(), "a plain sequence got a beam result");
        CheckResultInvariants({result.token}, vocab);
        if (result.token.finish_reason != FinishReason::kNone) model_.erase(ids[i]);
        continue;
      }
      FUZZ_CHECK(result.beam.has_value(), "a beam search got no beam result");
      CheckBeamStep(*result.beam, *seq.beam, seq.rows, vocab);
      if (result.beam->finished) {
        FUZZ_CHECK(result.token.finish_reason == result.beam->finish_reason,
                   "finish reasons differ");
        model_.erase(ids[i]);
      } else {
        seq.rows = result.beam->beams.size();
      }
    }
  }

  static void CheckBeamStep(const BeamStep& step, const BeamParams& beam, size_t input_rows,
                            int32_t vocab) {
    if (step.finished) {
      FUZZ_CHECK(step.beams.empty(), "a finished search has %zu live beams", step.beams.size());
      FUZZ_CHECK(step.finish_reason != FinishReason::kNone, "finished without a reason");
      FUZZ_CHECK(!step.hypotheses.empty(), "finished without a hypothesis");
    } else {
      FUZZ_CHECK(!step.beams.empty(), "a live search without live beams");
      FUZZ_CHECK(step.hypotheses.empty(), "hypotheses before the end");
    }
    FUZZ_CHECK(step.beams.size() <= static_cast<size_t>(beam.beam_width), "%zu beams of width %d",
               step.beams.size(), beam.beam_width);
    for (const BeamSlot& slot : step.beams) {
      FUZZ_CHECK(slot.parent_beam < input_rows, "parent_beam %u of %zu rows", slot.parent_beam,
                 input_rows);
      FUZZ_CHECK(slot.token_id >= 0 && slot.token_id < vocab, "beam token %d of vocab %d",
                 slot.token_id, vocab);
      FUZZ_CHECK(!std::isnan(slot.logprob) && slot.logprob <= 0.0f, "beam logprob %.9g",
                 static_cast<double>(slot.logprob));
      FUZZ_CHECK(std::isfinite(slot.cumulative_score), "cumulative score %.17g",
                 slot.cumulative_score);
    }
    FUZZ_CHECK(step.hypotheses.size() <= static_cast<size_t>(beam.num_return_sequences),
               "%zu hypotheses, num_return_sequences %d", step.hypotheses.size(),
               beam.num_return_sequences);
    for (size_t h = 0; h < step.hypotheses.size(); ++h) {
      const BeamHypothesis& hyp = step.hypotheses[h];
      FUZZ_CHECK(!std::isnan(hyp.score) && !std::isnan(hyp.sum_logprobs), "NaN hypothesis score");
      FUZZ_CHECK(hyp.finish_reason != FinishReason::kNone, "hypothesis without a finish reason");
      FUZZ_CHECK(!hyp.token_ids.empty(), "empty hypothesis");
      for (int32_t t : hyp.token_ids) {
        FUZZ_CHECK(t >= 0 && t < vocab, "hypothesis token %d of vocab %d", t, vocab);
      }
      if (h > 0) {
        FUZZ_CHECK(step.hypotheses[h - 1].score >= hyp.score, "hypotheses not best first");
      }
    }
  }

  // A whole search, on its own table, with a fuzzed configuration of the reference's scope
  // (toy model, EOS, stop token, min / max tokens, repetition penalty, groups and diversity,
  // beam sampling): the worker's loop of core_beam_test (histories reordered by parent_beam),
  // and every step's (parent, token, score) and the hypotheses must be the reference's. Cases
  // too close to call in float (the reference's min_margin) are skipped, as in core_beam_test.
  void CompareWithReference() {
    using testing::RefConfig;
    using testing::RefStopping;
    testing::ToyBeamModel model;
    model.seed = in_.Integral<uint64_t>();
    model.vocab = in_.IntegralInRange<int32_t>(2, 40);
    model.eos = in_.IntegralInRange<int32_t>(0, model.vocab - 1);
    model.eos_slope = in_.OneOf({0.0, 0.5, 1.5});
    RefConfig c;
    c.width = in_.IntegralInRange<int32_t>(1, 6);
    c.length_penalty = in_.OneOf({1.0, 0.0, 2.0, -1.0, 0.5});
    c.stopping = in_.OneOf({RefStopping::kHeuristic, RefStopping::kTrue, RefStopping::kNever});
    c.num_return = in_.IntegralInRange<int32_t>(1, c.width);
    c.max_tokens = in_.IntegralInRange<int32_t>(1, 8);
    c.min_tokens = in_.IntegralInRange<int32_t>(0, std::min(3, c.max_tokens));
    c.repetition_penalty = in_.OneOf({1.0, 1.3});
    if (model.vocab > 2 && in_.Bool()) {
      c.stop_token = (model.eos + in_.IntegralInRange<int32_t>(1, model.vocab - 1)) % model.vocab;
      if (in_.Bool()) {
        model.boosted = c.stop_token;
        model.boost = in_.OneOf({2.0, 6.0});
      }
    }
    if (in_.Percent(30)) {
      c.do_sample = true;
      c.temperature = in_.OneOf({0.7, 1.0, 1.5});
      c.top_k = in_.OneOf<int32_t>({0, 3});
      c.seed = in_.Integral<uint64_t>();
    } else if (c.width > 1 && in_.Percent(40)) {
      const int32_t groups = in_.IntegralInRange<int32_t>(2, c.width);
      if (c.width % groups == 0) {
        c.groups = groups;
        c.diversity = in_.OneOf({0.0, 0.5, 3.0});
      }
    }
    const std::vector<int32_t> prompt = FuzzTokens(in_, model.vocab, 4);
    for (int32_t t : prompt) {
      if (t < 0 || t >= model.vocab) return;  // the toy model's prompts are in the vocabulary
    }
    const testing::RefResult want = testing::ReferenceBeamSearch(model, prompt, c);
    if (want.min_margin < 1e-5) return;

    BeamParams beam;
    beam.beam_width = c.width;
    beam.length_penalty = static_cast<float>(c.length_penalty);
    beam.early_stopping = c.stopping == RefStopping::kTrue    ? EarlyStopping::kTrue
                          : c.stopping == RefStopping::kNever ? EarlyStopping::kNever
                                                              : EarlyStopping::kHeuristic;
    beam.num_return_sequences = c.num_return;
    beam.num_beam_groups = c.groups;
    beam.diversity_penalty = static_cast<float>(c.diversity);
    beam.do_sample = c.do_sample;
    SamplingParams params;
    params.eos_token_ids = {model.eos};
    params.max_tokens = c.max_tokens;
    params.min_tokens = c.min_tokens;
    if (c.stop_token >= 0) params.stop_token_ids = {c.stop_token};
    params.repetition_penalty = static_cast<float>(c.repetition_penalty);
    params.temperature = static_cast<float>(c.temperature);
    params.top_k = c.top_k;
    params.seed = c.seed;
    SequenceTable table(SessionLimits{});
    const absl::Status added = table.Add(1, params, prompt, beam);
    FUZZ_CHECK(added.ok(), "reference case: Add: %s", added.ToString().c_str());
    std::vector<std::vector<int32_t>> histories = {{}};
    for (size_t step = 0;; ++step) {
      FUZZ_CHECK(step < want.steps.size(),
                 "reference case: the search outlives the reference's %zu steps",
                 want.steps.size());
      std::vector<float> logits;
      for (const std::vector<int32_t>& h : histories) {
        const std::vector<float> row = model.Logits(prompt, h);
        logits.insert(logits.end(), row.begin(), row.end());
      }
      const std::vector<uint8_t> bytes = testing::F32Bytes(logits);
      const absl::StatusOr<LogitsView> view =
          LogitsView::Create(DType::kFloat32, static_cast<uint32_t>(histories.size()),
                             static_cast<uint32_t>(model.vocab), bytes);
      FUZZ_CHECK(view.ok(), "reference case: %s", view.status().ToString().c_str());
      const absl::StatusOr<std::vector<SequenceStep>> got =
          table.Step(sampler_, *view, std::vector<uint64_t>{1});
      FUZZ_CHECK(got.ok() && got->size() == 1 && (*got)[0].beam.has_value(),
                 "reference case step %zu: %s", step, got.status().ToString().c_str());
      const BeamStep& result = *(*got)[0].beam;
      CheckBeamStep(result, beam, histories.size(), model.vocab);
      const std::vector<testing::RefSlot>& slots = want.steps[step];
      FUZZ_CHECK(result.beams.size() == slots.size(),
                 "reference case step %zu: %zu beams, want %zu", step, result.beams.size(),
                 slots.size());
      std::vector<std::vector<int32_t>> next;
      for (size_t i = 0; i < slots.size(); ++i) {
        const BeamSlot& slot = result.beams[i];
        FUZZ_CHECK(slot.parent_beam == slots[i].parent && slot.token_id == slots[i].token &&
                       std::fabs(slot.cumulative_score - slots[i].score) <= 1e-4,
                   "reference case step %zu beam %zu: (%u, %d, %.9g), want (%u, %d, %.9g)", step, i,
                   slot.parent_beam, slot.token_id, slot.cumulative_score, slots[i].parent,
                   slots[i].token, slots[i].score);
        std::vector<int32_t> h = histories[slot.parent_beam];
        h.push_back(slot.token_id);
        next.push_back(std::move(h));
      }
      histories = std::move(next);
      if (!result.finished) continue;
      FUZZ_CHECK(step + 1 == want.steps.size(), "reference case: ended after %zu steps, want %zu",
                 step + 1, want.steps.size());
      FUZZ_CHECK(!table.contains(1) && table.units() == 0, "reference case: not released");
      FUZZ_CHECK(result.hypotheses.size() == want.hypotheses.size(),
                 "reference case: %zu hypotheses, want %zu", result.hypotheses.size(),
                 want.hypotheses.size());
      for (size_t i = 0; i < want.hypotheses.size(); ++i) {
        const BeamHypothesis& h = result.hypotheses[i];
        const testing::RefHypothesis& w = want.hypotheses[i];
        const FinishReason reason = w.eos    ? FinishReason::kEos
                                    : w.stop ? FinishReason::kStop
                                             : FinishReason::kLength;
        FUZZ_CHECK(h.token_ids == w.tokens && std::fabs(h.score - w.score) <= 1e-4 &&
                       h.finish_reason == reason,
                   "reference case: hypothesis %zu differs (score %.9g, want %.9g)", i, h.score,
                   w.score);
      }
      return;
    }
  }

  FuzzInput& in_;
  int references_ = 0;
  const SessionLimits limits_;
  SequenceTable table_;
  const int32_t vocab_;
  std::map<uint64_t, ModelSequence> model_;
  const Sampler sampler_;
};

}  // namespace
}  // namespace tokensampler::fuzzing

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tokensampler::fuzzing::FuzzInput in(data, size);
  tokensampler::fuzzing::Harness harness(in);
  harness.Run();
  return 0;
}
