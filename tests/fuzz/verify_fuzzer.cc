// Fuzz target: speculative verification (core/speculative.h) with arbitrary inputs — 1–3
// sequences, each with fuzzed parameters (penalties, truncation, temperature 0, stops, EOS,
// max_tokens, logprobs modes, mirostat, ...), a history with out-of-range ids, k ≤ 8 drafts as a
// chain or a tree (parents sometimes invalid: out of range, forward references, cycles, the wrong
// count), target logits with NaN / ±Inf / denormals / extremes and optional draft probabilities
// (fp32 / bf16 / fp16; usually a distribution, sometimes negative, NaN, not summing to 1, larger
// than the target vocabulary, or 0 at the draft's token). Drafts are often the target's argmax or
// drawn from q, so that long accepted paths are reached.
//
// The oracle:
// - an error is INVALID_ARGUMENT with a message, and the same on a second run;
// - on success, per sequence: num_accepted ≤ k; the accepted nodes form a path from the root of
//   the tree (a chain prefix); each accepted token is its node's draft; the tokens are the
//   accepted ones plus one more, unless an accepted draft finished the sequence (then it is the
//   last, with its finish reason); only the last token may finish; every token and top logprob
//   is in the vocabulary and not NaN; token i comes from the target row after node i − 1;
// - a second run (same seeds) gives the same results bit for bit;
// - k = 0 for every sequence: the results are Sampler::Run's for the same batch, bit for bit;
// - temperature 0: each token is what the ReferenceSampler gives for its target row with the
//   history extended by the tokens before it (greedy decoding step by step), bit for bit.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "core/params.h"
#include "core/reference.h"
#include "core/row.h"
#include "core/sampler.h"
#include "core/speculative.h"
#include "core/tensor.h"
#include "oneapi/tbb/task_arena.h"
#include "tests/fuzz/fuzz_core.h"
#include "tests/fuzz/fuzz_support.h"
#include "tests/testing/core_testing.h"

namespace tokensampler::fuzzing {
namespace {

// One sequence's drafts and the storage its Drafts view borrows.
struct FuzzDrafts {
  std::vector<int32_t> tokens;
  std::vector<int32_t> parents;  // empty = chain
  DType q_dtype = DType::kFloat32;
  int32_t q_vocab = 0;
  std::vector<uint8_t> q_bytes;  // empty = point masses
  std::optional<LogitsView> q;
};

// Parents for k nodes: usually a valid tree (parents[j] in [−1, j)); sometimes bad entries (out
// of range, self / forward references, two-node cycles) or the wrong count.
std::vector<int32_t> FuzzParents(FuzzInput& in, int32_t k) {
  std::vector<int32_t> parents(static_cast<size_t>(k));
  for (int32_t j = 0; j < k; ++j) parents[static_cast<size_t>(j)] = in.IntegralInRange(-1, j - 1);
  // Up to 3 bad entries: a forward reference to a node whose own parent is out of range once
  // read past the end of the parents (found by the request target).
  const int bad = k > 0 && !in.Percent(88) ? in.IntegralInRange(1, 3) : 0;
  for (int b = 0; b < bad; ++b) {
    const size_t j = in.IntegralInRange<size_t>(0, static_cast<size_t>(k) - 1);
    switch (in.IntegralInRange(0, 3)) {
      case 0:
        parents[j] = in.OneOf<int32_t>({-2, k, k + 1, INT32_MAX, INT32_MIN});
        break;
      case 1:
        parents[j] = in.IntegralInRange<int32_t>(static_cast<int32_t>(j), k - 1);
        break;
      case 2: {  // a cycle through j and a node after it
        const size_t other = in.IntegralInRange<size_t>(j, static_cast<size_t>(k) - 1);
        parents[j] = static_cast<int32_t>(other);
        parents[other] = static_cast<int32_t>(j);
        break;
      }
      default:
        parents.resize(in.Bool() ? parents.size() + 1 : parents.size() - 1, -1);
        return parents;
    }
  }
  return parents;
}

int32_t Argmax(absl::Span<const float> row) {
  int32_t best = 0;
  for (size_t y = 1; y < row.size(); ++y) {
    if (row[y] > row[static_cast<size_t>(best)]) best = static_cast<int32_t>(y);
  }
  return best;
}

// Draft tokens (node j's context is target row first_row + parent + 1, decoded in `target`) and
// the draft probabilities, of the kinds listed at the top.
void FuzzDraftValues(FuzzInput& in, const std::vector<std::vector<float>>& target, int first_row,
                     int32_t vocab, FuzzDrafts& d) {
  const size_t k = d.tokens.size();
  const bool with_q = in.Percent(55);
  if (with_q) {
    d.q_dtype = in.OneOf({DType::kFloat32, DType::kBFloat16, DType::kFloat16});
    d.q_vocab =
        in.Percent(85) ? vocab : in.OneOf<int32_t>({1, vocab / 2 + 1, vocab - 1, vocab + 1});
    if (d.q_vocab < 1) d.q_vocab = 1;
  }
  const uint8_t q_shape = in.Integral<uint8_t>() % 4;  // 0: a copy of the target, 1: random,
                                                       // 2: random at a low temperature, 3: one-hot
  SplitMix gen(in.Integral<uint64_t>());
  std::vector<float> q_all;
  for (size_t j = 0; j < k; ++j) {
    int32_t parent = static_cast<int32_t>(j) - 1;
    if (!d.parents.empty() && j < d.parents.size()) parent = d.parents[j];
    // An invalid parent (the call will fail) takes the root's row.
    const int context =
        parent < -1 || parent >= static_cast<int32_t>(k) ? first_row : first_row + 1 + parent;
    const std::vector<float>& t = target[static_cast<size_t>(context)];
    std::vector<double> q(with_q ? static_cast<size_t>(d.q_vocab) : 0);
    if (with_q) {
      double sum = 0.0;
      const float max = t[static_cast<size_t>(Argmax(t))];
      const double hot = static_cast<double>(gen.Next() % static_cast<uint64_t>(d.q_vocab));
      for (size_t y = 0; y < q.size(); ++y) {
        switch (q_shape) {
          case 0: {
            const float x = y < t.size() ? t[y] - max : -INFINITY;
            q[y] = std::isfinite(x) ? std::exp(static_cast<double>(x)) : 0.0;
            break;
          }
          case 1:
            q[y] = gen.Uniform();
            break;
          case 2:
            q[y] = std::exp(8.0 * gen.Uniform());
            break;
          default:
            q[y] = static_cast<double>(y) == hot ? 1.0 : 0.0;
            break;
        }
        sum += q[y];
      }
      for (double& x : q) x = sum > 0.0 ? x / sum : 1.0 / static_cast<double>(q.size());
    }
    // The token: the target's argmax at its context, a draw from q, or any token.
    switch (in.IntegralInRange(0, 2)) {
      case 0:
        d.tokens[j] = Argmax(t);
        break;
      case 1:
        if (with_q) {
          double u = gen.Uniform();
          int32_t y = 0;
          while (y + 1 < d.q_vocab && u >= q[static_cast<size_t>(y)]) {
            u -= q[static_cast<size_t>(y)];
            ++y;
          }
          d.tokens[j] = y;
          break;
        }
        [[fallthrough]];
      default:
        d.tokens[j] = FuzzToken(in, vocab);
        break;
    }
    for (double x : q) q_all.push_back(static_cast<float>(x));
  }
  if (!with_q || k == 0) return;  // a tensor has ≥ 1 row: no drafts, no draft probabilities
  // Sometimes (rarely once the input runs out: Percent is then true) bad values: a few positions
  // overwritten with fuzz floats (NaN, negative, ...), or a row scaled away from sum 1.
  {
    const size_t patches = in.Percent(85) ? 0 : in.IntegralInRange<size_t>(1, 4);
    for (size_t i = 0; i < patches; ++i) {
      q_all[in.IntegralInRange<size_t>(0, q_all.size() - 1)] = in.Float();
    }
    if (!in.Percent(90)) {
      const float scale = in.OneOf({0.0f, 0.5f, 0.995f, 1.005f, 1.02f, 2.0f});
      for (float& x : q_all) x *= scale;
    }
  }
  d.q_bytes = d.q_dtype == DType::kFloat32 ? testing::F32Bytes(q_all)
                                           : testing::Half16Bytes(q_all, d.q_dtype);
  // Sometimes the wrong number of rows.
  uint32_t q_rows = static_cast<uint32_t>(k);
  if (!in.Percent(96)) q_rows = q_rows > 0 && in.Bool() ? q_rows - 1 : q_rows;
  absl::StatusOr<LogitsView> view =
      LogitsView::Create(d.q_dtype, q_rows, static_cast<uint32_t>(d.q_vocab),
                         absl::MakeConstSpan(d.q_bytes.data(), static_cast<size_t>(q_rows) *
                                                                   static_cast<size_t>(d.q_vocab) *
                                                                   DTypeSize(d.q_dtype)));
  if (!view.ok()) {
    FUZZ_CHECK(q_rows == 0, "draft probs view: %s", view.status().ToString().c_str());
    return;  // no tensor of 0 rows: point masses
  }
  d.q = *view;
}

void CheckSameVerify(const absl::StatusOr<std::vector<VerifyResult>>& a,
                     const absl::StatusOr<std::vector<VerifyResult>>& b) {
  FUZZ_CHECK(a.status() == b.status(), "%s / %s", a.status().ToString().c_str(),
             b.status().ToString().c_str());
  if (!a.ok()) return;
  FUZZ_CHECK(a->size() == b->size(), "%zu vs %zu results", a->size(), b->size());
  for (size_t r = 0; r < a->size(); ++r) {
    FUZZ_CHECK((*a)[r].accepted_nodes == (*b)[r].accepted_nodes, "row %zu: accepted nodes differ",
               r);
    FUZZ_CHECK((*a)[r].has_logprobs == (*b)[r].has_logprobs, "row %zu", r);
    CheckSameResults((*a)[r].tokens, (*b)[r].tokens);
  }
}

void Run(FuzzInput& in) {
  const int32_t vocab =
      in.Percent(85) ? in.IntegralInRange<int32_t>(1, 300) : in.IntegralInRange<int32_t>(300, 5000);
  const size_t sequences = in.IntegralInRange<size_t>(1, 3);
  const DType dtype = in.OneOf({DType::kFloat32, DType::kBFloat16, DType::kFloat16});
  const int threads = in.IntegralInRange(1, 2);
  const bool no_drafts = !in.Percent(80);  // k = 0 everywhere: compared with Sampler::Run

  std::vector<SamplingParams> params(sequences);
  std::vector<std::vector<int32_t>> prompts(sequences), outputs(sequences);
  std::vector<FuzzDrafts> drafts(sequences);
  std::vector<VerifyRowRequest> rows(sequences);
  std::vector<int> first_rows(sequences);
  int total_rows = 0;
  for (size_t r = 0; r < sequences; ++r) {
    // Few parameter groups at a time (about 3 of 24): most combinations of many are invalid.
    params[r] = FuzzParams(in, vocab, in.Integral<uint32_t>() & in.Integral<uint32_t>());
    if (in.Percent(30)) params[r].temperature = 0.0f;
    if (in.Percent(70)) params[r].n = 1;  // else often an n != 1 error
    const absl::Status valid = ValidateParams(params[r], vocab);
    if (!valid.ok()) {
      FUZZ_CHECK(valid.code() == absl::StatusCode::kInvalidArgument && !valid.message().empty(),
                 "ValidateParams: %s", valid.ToString().c_str());
      return;  // the service answers this row's error before verifying
    }
    prompts[r] = FuzzTokens(in, vocab, 8);
    outputs[r] = FuzzTokens(in, vocab, 8);
    const int32_t k = no_drafts ? 0 : in.IntegralInRange(0, 8);
    drafts[r].tokens.resize(static_cast<size_t>(k));
    if (in.Percent(50)) drafts[r].parents = FuzzParents(in, k);
    RowRequest& req = rows[r].row;
    req.params = &params[r];
    req.prompt_token_ids = prompts[r];
    req.output_token_ids = outputs[r];
    if (!in.Percent(85)) req.mirostat_mu = in.Float();
    req.first_sample_index = in.Percent(85) ? 0 : in.Integral<uint32_t>();
    first_rows[r] = total_rows;
    total_rows += k + 1;
  }
  // Sometimes a row too many or too few.
  int logits_rows = total_rows;
  if (!in.Percent(97)) logits_rows += in.Bool() ? 1 : -1;
  if (logits_rows < 1) logits_rows = 1;
  const std::vector<uint8_t> bytes = FuzzLogits(in, dtype, logits_rows, vocab);
  absl::StatusOr<LogitsView> logits = LogitsView::Create(dtype, static_cast<uint32_t>(logits_rows),
                                                         static_cast<uint32_t>(vocab), bytes);
  FUZZ_CHECK(logits.ok(), "LogitsView::Create: %s", logits.status().ToString().c_str());
  std::vector<std::vector<float>> target(static_cast<size_t>(std::max(logits_rows, total_rows)),
                                         std::vector<float>(static_cast<size_t>(vocab)));
  for (int row = 0; row < logits_rows; ++row) {
    DecodeRow(*logits, row, absl::MakeSpan(target[static_cast<size_t>(row)]));
  }
  for (size_t r = 0; r < sequences; ++r) {
    FuzzDraftValues(in, target, first_rows[r], vocab, drafts[r]);
    rows[r].drafts.token_ids = drafts[r].tokens;
    rows[r].drafts.parents = drafts[r].parents;
    rows[r].drafts.probs = drafts[r].q;
  }

  // Made per input, as in the pipeline target: per-thread scratch in oneTBB's allocator.
  const Sampler sampler;
  const Verifier verifier(sampler);
  absl::StatusOr<std::vector<VerifyResult>> got, again;
  absl::StatusOr<std::vector<SampledToken>> sampled;
  tbb::task_arena arena(threads);
  arena.execute([&] {
    got = verifier.Run(*logits, rows);
    again = verifier.Run(*logits, rows);
    if (no_drafts && got.ok()) {
      std::vector<RowRequest> plain;
      for (const VerifyRowRequest& row : rows) plain.push_back(row.row);
      sampled = sampler.Run(*logits, plain);
    }
  });
  CheckSameVerify(got, again);
  if (!got.ok()) {
    FUZZ_CHECK(got.status().code() == absl::StatusCode::kInvalidArgument &&
                   !got.status().message().empty(),
               "Verifier::Run: %s", got.status().ToString().c_str());
    return;
  }
  FUZZ_CHECK(got->size() == sequences, "%zu results for %zu sequences", got->size(), sequences);

  const ReferenceSampler reference;
  for (size_t r = 0; r < sequences; ++r) {
    const VerifyResult& result = (*got)[r];
    const FuzzDrafts& d = drafts[r];
    const size_t k = d.tokens.size();
    const size_t accepted = result.num_accepted();
    const auto parent_of = [&](int32_t j) {
      return d.parents.empty() ? j - 1 : d.parents[static_cast<size_t>(j)];
    };
    FUZZ_CHECK(accepted <= k, "row %zu: %zu accepted of %zu drafts", r, accepted, k);
    FUZZ_CHECK(!result.tokens.empty(), "row %zu: no token", r);
    const bool ended_early = result.tokens.size() == accepted;
    FUZZ_CHECK(result.tokens.size() == accepted + 1 ||
                   (ended_early && result.tokens.back().finish_reason != FinishReason::kNone),
               "row %zu: %zu tokens for %zu accepted drafts (last finish %d)", r,
               result.tokens.size(), accepted,
               static_cast<int>(result.tokens.back().finish_reason));
    CheckResultInvariants(result.tokens, vocab);
    int32_t previous = -1;
    for (size_t i = 0; i < result.tokens.size(); ++i) {
      const SampledToken& t = result.tokens[i];
      FUZZ_CHECK(i + 1 == result.tokens.size() || t.finish_reason == FinishReason::kNone,
                 "row %zu: token %zu finished before the last", r, i);
      FUZZ_CHECK(t.row_index == static_cast<uint32_t>(first_rows[r] + previous + 1),
                 "row %zu: token %zu from target row %u, expected %d", r, i, t.row_index,
                 first_rows[r] + previous + 1);
      if (i < accepted) {
        const int32_t node = result.accepted_nodes[i];
        FUZZ_CHECK(node >= 0 && static_cast<size_t>(node) < k, "row %zu: accepted node %d", r,
                   node);
        FUZZ_CHECK(parent_of(node) == previous,
                   "row %zu: accepted node %d has parent %d, not the accepted %d", r, node,
                   parent_of(node), previous);
        FUZZ_CHECK(t.token_id == d.tokens[static_cast<size_t>(node)],
                   "row %zu: accepted token %d but node %d's draft is %d", r, t.token_id, node,
                   d.tokens[static_cast<size_t>(node)]);
        previous = node;
      }
    }
    if (no_drafts) {
      FUZZ_CHECK(sampled.ok(), "Verify succeeded, Sampler::Run: %s",
                 sampled.status().ToString().c_str());
      CheckSameResults(result.tokens, std::vector<SampledToken>{(*sampled)[r]});
    }
    if (params[r].greedy()) {
      // Greedy decoding, one reference step per emitted token.
      std::vector<int32_t> history = outputs[r];
      std::optional<float> mu = rows[r].row.mirostat_mu;
      for (const SampledToken& t : result.tokens) {
        absl::StatusOr<LogitsView> one =
            LogitsView::Create(dtype, 1, static_cast<uint32_t>(vocab),
                               absl::MakeConstSpan(logits->RowBytes(static_cast<int>(t.row_index)),
                                                   static_cast<size_t>(vocab) * DTypeSize(dtype)));
        FUZZ_CHECK(one.ok(), "%s", one.status().ToString().c_str());
        RowRequest step = rows[r].row;
        step.output_token_ids = history;
        step.mirostat_mu = mu;
        absl::StatusOr<std::vector<SampledToken>> want =
            reference.Run(*one, absl::MakeConstSpan(&step, 1));
        FUZZ_CHECK(want.ok(), "row %zu: greedy reference step %zu: %s", r, history.size(),
                   want.status().ToString().c_str());
        (*want)[0].row_index = t.row_index;
        CheckSameResults(std::vector<SampledToken>{t}, *want);
        history.push_back(t.token_id);
        if (t.mirostat_mu.has_value()) mu = t.mirostat_mu;
      }
    }
  }
}

}  // namespace
}  // namespace tokensampler::fuzzing

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tokensampler::fuzzing::FuzzInput in(data, size);
  tokensampler::fuzzing::Run(in);
  return 0;
}
