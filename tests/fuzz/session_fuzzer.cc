// Fuzz target: command sequences (add, fork, release, step, cancelled step) against one
// SequenceTable, checked against a model of the table kept here. The model knows which ids are
// live, each sequence's parameters, prompt, output, μ and sample index (forks take the next
// index of their family), so it predicts every status code, and it samples each step with the
// ReferenceSampler over the full history: a step must give exactly those tokens (the
// SequenceTable contract: a step is Sampler::Run of the row with its whole history). A failed
// command must change nothing.
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "core/params.h"
#include "core/reference.h"
#include "core/sampler.h"
#include "core/session.h"
#include "core/tensor.h"
#include "tests/fuzz/fuzz_core.h"
#include "tests/fuzz/fuzz_support.h"

namespace tokensampler::fuzzing {
namespace {

// Few ids, so that adds collide, forks find parents and steps find sequences.
constexpr uint64_t kMaxId = 11;

struct ModelSequence {
  SamplingParams params;
  std::vector<int32_t> prompt;
  std::vector<int32_t> output;
  std::optional<float> mirostat_mu;
  uint32_t sample_index = 0;
  std::shared_ptr<uint32_t> family_samples;
};

class Harness {
 public:
  explicit Harness(FuzzInput& in)
      : in_(in),
        limits_{.max_sequences = in.IntegralInRange<int64_t>(1, 8),
                .max_history_tokens = in.IntegralInRange<int64_t>(1, 40)},
        table_(limits_) {}

  void Run() {
    for (int op = 0; op < 48 && !in_.empty(); ++op) {
      switch (in_.Integral<uint8_t>() % 5) {
        case 0:
          Add();
          break;
        case 1:
          Fork();
          break;
        case 2:
          Release();
          break;
        default:
          Step();
          break;
      }
      CheckLiveIds();
    }
  }

 private:
  uint64_t Id() { return in_.IntegralInRange<uint64_t>(0, kMaxId); }

  void CheckCode(const absl::Status& got, absl::StatusCode want, const char* what) {
    FUZZ_CHECK(got.code() == want, "%s: got %s, the model expects code %d", what,
               got.ToString().c_str(), static_cast<int>(want));
    FUZZ_CHECK(got.ok() || !got.message().empty(), "%s: error without a message", what);
  }

  void CheckLiveIds() {
    FUZZ_CHECK(table_.size() == static_cast<int64_t>(model_.size()), "table %lld, model %zu",
               static_cast<long long>(table_.size()), model_.size());
    for (uint64_t id = 0; id <= kMaxId; ++id) {
      FUZZ_CHECK(table_.contains(id) == model_.contains(id), "id %llu live in one only",
                 static_cast<unsigned long long>(id));
    }
  }

  absl::StatusCode CapacityFor(size_t more) const {
    return static_cast<int64_t>(model_.size() + more) > limits_.max_sequences
               ? absl::StatusCode::kResourceExhausted
               : absl::StatusCode::kOk;
  }

  void Add() {
    const uint64_t id = Id();
    // Vocabularies of the steps are 1..64; params are drawn for one of them.
    SamplingParams params = FuzzParams(in_, in_.IntegralInRange<int32_t>(1, 64));
    std::vector<int32_t> prompt = FuzzTokens(in_, 64, 44);
    absl::StatusCode want = absl::StatusCode::kOk;
    const int32_t bound = params.token_bitmask.empty()
                              ? INT32_MAX
                              : static_cast<int32_t>(params.token_bitmask.size() * 8);
    if (model_.contains(id)) {
      want = absl::StatusCode::kAlreadyExists;
    } else if (!ValidateParams(params, bound).ok() || params.n != 1) {
      want = absl::StatusCode::kInvalidArgument;
    } else if (static_cast<int64_t>(prompt.size()) > limits_.max_history_tokens) {
      want = absl::StatusCode::kResourceExhausted;
    } else {
      want = CapacityFor(1);
    }
    CheckCode(table_.Add(id, params, prompt), want, "Add");
    if (want == absl::StatusCode::kOk) {
      ModelSequence& seq = model_[id];
      seq.params = std::move(params);
      seq.prompt = std::move(prompt);
      seq.family_samples = std::make_shared<uint32_t>(1);
    }
  }

  void Fork() {
    const uint64_t parent = Id();
    std::vector<uint64_t> children(in_.IntegralInRange<size_t>(0, 3));
    for (uint64_t& child : children) child = Id();
    absl::StatusCode want = absl::StatusCode::kOk;
    absl::flat_hash_set<uint64_t> seen;
    if (!model_.contains(parent)) {
      want = absl::StatusCode::kNotFound;
    } else {
      for (uint64_t child : children) {
        if (child == parent || !seen.insert(child).second) {
          want = absl::StatusCode::kInvalidArgument;
          break;
        }
        if (model_.contains(child)) {
          want = absl::StatusCode::kAlreadyExists;
          break;
        }
      }
      if (want == absl::StatusCode::kOk) want = CapacityFor(children.size());
    }
    CheckCode(table_.Fork(parent, children), want, "Fork");
    if (want == absl::StatusCode::kOk) {
      const ModelSequence source = model_[parent];
      for (uint64_t child : children) {
        ModelSequence& seq = model_[child];
        seq = source;
        seq.sample_index = (*source.family_samples)++;
      }
    }
  }

  void Release() {
    const uint64_t id = Id();
    CheckCode(table_.Release(id),
              model_.erase(id) == 1 ? absl::StatusCode::kOk : absl::StatusCode::kNotFound,
              "Release");
  }

  void Step() {
    std::vector<uint64_t> ids(in_.IntegralInRange<size_t>(0, 4));
    for (uint64_t& id : ids) id = Id();
    const bool cancel = in_.Percent(5);
    const int32_t vocab = in_.IntegralInRange<int32_t>(1, 64);
    const DType dtype = in_.OneOf({DType::kFloat32, DType::kBFloat16, DType::kFloat16});
    // The row count is usually right, sometimes one off.
    const int rows = static_cast<int>(ids.size()) + (in_.Percent(5) ? 1 : 0);
    if (rows == 0) return;  // a step has at least one row (the service checks the tensor)
    const std::vector<uint8_t> bytes = FuzzLogits(in_, dtype, rows, vocab);
    absl::StatusOr<LogitsView> view =
        LogitsView::Create(dtype, static_cast<uint32_t>(rows), static_cast<uint32_t>(vocab), bytes);
    FUZZ_CHECK(view.ok(), "LogitsView::Create: %s", view.status().ToString().c_str());

    // The model: the same checks in the table's order, then the reference sampler.
    absl::StatusCode want = absl::StatusCode::kOk;
    std::vector<RowRequest> requests;
    absl::flat_hash_set<uint64_t> seen;
    // The table checks: every id once and the row count (INVALID_ARGUMENT), then that every id is
    // live (NOT_FOUND), then each sequence's params and history in order.
    if (ids.size() != static_cast<size_t>(rows)) want = absl::StatusCode::kInvalidArgument;
    for (const uint64_t id : ids) {
      if (!seen.insert(id).second) want = absl::StatusCode::kInvalidArgument;
    }
    for (size_t i = 0; want == absl::StatusCode::kOk && i < ids.size(); ++i) {
      if (!model_.contains(ids[i])) want = absl::StatusCode::kNotFound;
    }
    for (size_t i = 0; want == absl::StatusCode::kOk && i < ids.size(); ++i) {
      const auto it = model_.find(ids[i]);
      if (!ValidateParams(it->second.params, vocab).ok()) {
        want = absl::StatusCode::kInvalidArgument;
      } else if (static_cast<int64_t>(it->second.prompt.size() + it->second.output.size()) + 1 >
                 limits_.max_history_tokens) {
        want = absl::StatusCode::kResourceExhausted;
      } else {
        const ModelSequence& seq = it->second;
        requests.push_back(
            {&seq.params, seq.prompt, seq.output, seq.mirostat_mu, seq.sample_index});
      }
    }
    absl::StatusOr<std::vector<SampledToken>> expected = absl::UnknownError("not run");
    if (want == absl::StatusCode::kOk) {
      // A step cancelled before it starts samples nothing, whatever its rows hold.
      expected = reference_.Run(*view, requests);
      want = cancel ? absl::StatusCode::kCancelled : expected.status().code();
    }

    const std::atomic<bool> cancelled{cancel};
    const absl::StatusOr<std::vector<SequenceStep>> steps =
        table_.Step(sampler_, *view, ids, &cancelled);
    CheckCode(steps.status(), want, "Step");
    if (want != absl::StatusCode::kOk) return;  // and nothing changed (checked by the next step)
    // Plain sequences only here (beam searches: beam_fuzzer.cc): one token per id, in order.
    std::vector<SampledToken> got;
    for (size_t i = 0; i < steps->size(); ++i) {
      const SequenceStep& step = (*steps)[i];
      FUZZ_CHECK(step.sequence_id == ids[i] && !step.beam.has_value() && !step.verify.has_value(),
                 "Step: result %zu is not the plain token of id %llu", i,
                 static_cast<unsigned long long>(ids[i]));
      got.push_back(step.token);
    }
    CheckSameResults(got, expected);
    for (size_t i = 0; i < ids.size(); ++i) {
      ModelSequence& seq = model_[ids[i]];
      const SampledToken& token = (*expected)[i];
      seq.output.push_back(token.token_id);
      if (token.mirostat_mu.has_value()) seq.mirostat_mu = token.mirostat_mu;
      if (token.finish_reason != FinishReason::kNone) model_.erase(ids[i]);
    }
  }

  FuzzInput& in_;
  const SessionLimits limits_;
  SequenceTable table_;
  std::map<uint64_t, ModelSequence> model_;
  // Per input (see pipeline_fuzzer.cc: oneTBB-allocated scratch); reused by every step of it.
  const Sampler sampler_;
  ReferenceSampler reference_;
};

}  // namespace
}  // namespace tokensampler::fuzzing

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tokensampler::fuzzing::FuzzInput in(data, size);
  tokensampler::fuzzing::Harness harness(in);
  harness.Run();
  return 0;
}
