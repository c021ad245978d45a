#include "core/speculative.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "absl/random/distributions.h"
#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "core/dist.h"
#include "core/kernels.h"
#include "core/philox.h"
#include "core/row.h"
#include "core/status_macros.h"
#include "core/stopping.h"
#include "tbb/blocked_range.h"
#include "tbb/enumerable_thread_specific.h"
#include "tbb/parallel_for.h"
#include "tbb/task_arena.h"

namespace tokensampler {

namespace {

// The buffers of one thread's verification (reused; they grow to the largest vocabulary).
struct VerifyScratch {
  std::vector<float> processed;      // the position's target distribution as logits
  std::vector<float> raw;            // the position's row as received (raw logprobs)
  std::vector<double> residual;      // the residual r of the rejection chain (unnormalised)
  std::vector<double> next;          // r − q while it is computed
  std::vector<float> weights;        // the target's weights ExpF(l − max)
  std::vector<float> q;              // one row of draft probabilities, decoded
  std::vector<int32_t> removed;      // point-mass drafts rejected (r is `weights` without them)
  std::vector<int32_t> history;      // output_token_ids ++ the accepted path
  std::vector<int32_t> children;     // node ids grouped by parent (the root's first)
  std::vector<int32_t> child_begin;  // children of node j: [begin[j + 1], begin[j + 2])
  std::vector<int32_t> fill;
  absl::BitGen entropy;  // accept / recover coins of rows without a seed
};

}  // namespace

struct Verifier::Scratch {
  tbb::enumerable_thread_specific<VerifyScratch> per_thread;
};

namespace {

double ToleranceFor(DType dtype) {
  return dtype == DType::kFloat32 ? kDraftProbSumToleranceF32 : kDraftProbSumTolerance16;
}

absl::Status ValidateParents(absl::Span<const int32_t> parents, size_t k) {
  if (parents.empty()) return absl::OkStatus();
  if (parents.size() != k) {
    return absl::InvalidArgumentError(absl::StrCat("draft_parents has ", parents.size(),
                                                   " entries but draft_token_ids has ", k,
                                                   "; give one parent per draft (or none)"));
  }
  const int32_t nodes = static_cast<int32_t>(k);
  for (int32_t j = 0; j < nodes; ++j) {
    const int32_t parent = parents[static_cast<size_t>(j)];
    if (parent < -1 || parent >= nodes) {
      return absl::InvalidArgumentError(
          absl::StrCat("draft_parents[", j, "] = ", parent, " is out of range [-1, ", nodes, ")"));
    }
    if (parent < j) continue;
    // A parent at or after its child: a cycle if following parents comes back to j. The entries
    // after j are not range-checked yet: the walk stops at one out of range (then j's parent is
    // reported as a forward reference).
    std::vector<int32_t> path = {j};
    int32_t node = parent;
    while (node >= 0 && node < nodes && static_cast<int64_t>(path.size()) <= nodes && node != j) {
      path.push_back(node);
      node = parents[static_cast<size_t>(node)];
    }
    if (node == j) {
      path.push_back(j);
      return absl::InvalidArgumentError(
          absl::StrCat("draft_parents[", j, "] = ", parent, " makes a cycle (",
                       absl::StrJoin(path, " -> "), "); parents must come before their children"));
    }
    return absl::InvalidArgumentError(absl::StrCat(
        "draft_parents[", j, "] = ", parent,
        " is a forward reference; parents must come before their children (parent < ", j, ")"));
  }
  return absl::OkStatus();
}

// Returns `status` with "rows[r]" in front; a Sampler error about logits row `row` ("rows[row]…")
// is renamed to the verify row and its target row.
absl::Status ForRow(size_t r, int row, const absl::Status& status) {
  const std::string sampler_prefix = absl::StrCat("rows[", row, "]");
  absl::string_view message = status.message();
  if (absl::ConsumePrefix(&message, sampler_prefix)) {
    return absl::Status(status.code(),
                        absl::StrCat("rows[", r, "] (target logits row ", row, ")", message));
  }
  return status;
}

// Verifies one row (see Verifier::Run); `first_row` is its first target row.
absl::Status VerifyOne(const Sampler& sampler, const LogitsView& logits, size_t r, int first_row,
                       const VerifyRowRequest& request, bool split, VerifyScratch& s,
                       const std::atomic<bool>* cancelled, VerifyResult& out);

}  // namespace

absl::Status ValidateDrafts(const Drafts& drafts, int32_t vocab_size) {
  const size_t k = drafts.token_ids.size();
  for (size_t j = 0; j < k; ++j) {
    const int32_t id = drafts.token_ids[j];
    if (id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("draft_token_ids[", j, "] = ", id,
                                                     " is out of range [0, ", vocab_size, ")"));
    }
  }
  RETURN_IF_ERROR(ValidateParents(drafts.parents, k));
  if (!drafts.probs.has_value()) return absl::OkStatus();
  const LogitsView& q = *drafts.probs;
  if (static_cast<size_t>(q.rows()) != k) {
    return absl::InvalidArgumentError(absl::StrCat("draft_probs.rows is ", q.rows(),
                                                   " but draft_token_ids has ", k,
                                                   " drafts; give one row per draft"));
  }
  if (q.vocab_size() > vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat("draft_probs.vocab_size is ", q.vocab_size(),
                     " but the target vocabulary (logits.vocab_size) is ", vocab_size,
                     "; the draft vocabulary must not be larger"));
  }
  const double tolerance = ToleranceFor(q.dtype());
  std::vector<float> row(static_cast<size_t>(q.vocab_size()));
  for (int j = 0; j < q.rows(); ++j) {
    DecodeRow(q, j, absl::MakeSpan(row));
    double sum = 0.0;
    for (int y = 0; y < q.vocab_size(); ++y) {
      const float v = row[static_cast<size_t>(y)];
      if (!(v >= 0.0f) || std::isinf(v)) {
        return absl::InvalidArgumentError(absl::StrCat("draft_probs row ", j, ", token ", y, " is ",
                                                       v,
                                                       "; probabilities must be finite and ≥ 0"));
      }
      sum += static_cast<double>(v);
    }
    if (std::abs(sum - 1.0) > tolerance) {
      return absl::InvalidArgumentError(absl::StrCat("draft_probs row ", j, " sums to ", sum,
                                                     "; it must sum to 1 within ", tolerance, " (",
                                                     DTypeName(q.dtype()), ")"));
    }
    const int32_t token = drafts.token_ids[static_cast<size_t>(j)];
    if (token >= q.vocab_size() || row[static_cast<size_t>(token)] <= 0.0f) {
      return absl::InvalidArgumentError(
          absl::StrCat("draft_probs row ", j, " gives draft_token_ids[", j, "] = ", token,
                       " probability 0; the draft model cannot have drawn it"));
    }
  }
  return absl::OkStatus();
}

Verifier::Verifier(const Sampler& sampler)
    : sampler_(sampler), scratch_(std::make_unique<Scratch>()) {}
Verifier::~Verifier() = default;

absl::StatusOr<std::vector<VerifyResult>> Verifier::Run(const LogitsView& logits,
                                                        absl::Span<const VerifyRowRequest> rows,
                                                        const std::atomic<bool>* cancelled) const {
  if (logits.in_pieces()) {
    return absl::InvalidArgumentError("Verifier::Run needs a contiguous view, not one in pieces");
  }
  const int32_t vocab = logits.vocab_size();
  std::vector<int> first_rows(rows.size());
  size_t needed = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    first_rows[r] = static_cast<int>(needed);
    needed += TargetRows(rows[r].drafts);
  }
  if (needed != static_cast<size_t>(logits.rows())) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits.rows is ", logits.rows(), " but the rows need ", needed,
                     " (len(draft_token_ids) + 1 each: the current position, then one per draft)"));
  }
  for (size_t r = 0; r < rows.size(); ++r) {
    const VerifyRowRequest& req = rows[r];
    const SamplingParams& p = *req.row.params;
    if (p.n != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("rows[", r, "].params.n must be 1 to verify drafts, got ", p.n));
    }
    RETURN_IF_ERROR(CheckHistory(r, "prompt_token_ids", req.row.prompt_token_ids, vocab));
    RETURN_IF_ERROR(CheckHistory(r, "output_token_ids", req.row.output_token_ids, vocab));
    if (p.max_tokens.has_value() &&
        req.row.output_token_ids.size() >= static_cast<size_t>(*p.max_tokens)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "rows[", r, "].output_token_ids has ", req.row.output_token_ids.size(),
          " tokens and max_tokens is ", *p.max_tokens, ": the sequence has already finished"));
    }
    if (absl::Status s = ValidateDrafts(req.drafts, vocab); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("rows[", r, "].", s.message()));
    }
  }

  // Every target row is checked, also those a rejection leaves unread, so that whether a
  // request is valid does not depend on the coins.
  std::vector<float> decoded(logits.dtype() == DType::kFloat32 ? 0 : static_cast<size_t>(vocab));
  for (int row = 0; row < logits.rows(); ++row) {
    const kernels::MaxResult m =
        kernels::DecodeMax(logits.dtype(), logits.RowBytes(row), 0, static_cast<size_t>(vocab),
                           1.0f, decoded.empty() ? nullptr : decoded.data());
    if (m.nan >= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("logits.data is NaN at row ", row, ", token ", m.nan));
    }
  }

  std::vector<VerifyResult> results(rows.size());
  std::vector<absl::Status> statuses(rows.size());
  const bool split = vocab >= static_cast<int32_t>(2 * kBlock) &&
                     rows.size() < static_cast<size_t>(tbb::this_task_arena::max_concurrency());
  tbb::parallel_for(tbb::blocked_range<size_t>(0, rows.size()),
                    [&](const tbb::blocked_range<size_t>& range) {
                      VerifyScratch& local = scratch_->per_thread.local();
                      for (size_t r = range.begin(); r != range.end(); ++r) {
                        statuses[r] = VerifyOne(sampler_, logits, r, first_rows[r], rows[r], split,
                                                local, cancelled, results[r]);
                      }
                    });
  if (cancelled != nullptr && cancelled->load(std::memory_order_relaxed)) {
    return absl::CancelledError("the call was cancelled");
  }
  for (absl::Status& status : statuses) {
    if (!status.ok()) return std::move(status);
  }
  return results;
}

namespace {

absl::Status VerifyOne(const Sampler& sampler, const LogitsView& logits, size_t r, int first_row,
                       const VerifyRowRequest& request, bool split, VerifyScratch& s,
                       const std::atomic<bool>* cancelled, VerifyResult& out) {
  const SamplingParams& p = *request.row.params;
  const Drafts& drafts = request.drafts;
  const int32_t k = static_cast<int32_t>(drafts.token_ids.size());
  const size_t v = static_cast<size_t>(logits.vocab_size());

  // Children of every node in node order, grouped by parent (a counting sort; −1 = the root).
  s.child_begin.assign(static_cast<size_t>(k) + 2, 0);
  const auto parent_of = [&](int32_t j) {
    return drafts.parents.empty() ? j - 1 : drafts.parents[static_cast<size_t>(j)];
  };
  for (int32_t j = 0; j < k; ++j) ++s.child_begin[static_cast<size_t>(parent_of(j) + 2)];
  for (size_t i = 1; i < s.child_begin.size(); ++i) s.child_begin[i] += s.child_begin[i - 1];
  s.children.assign(static_cast<size_t>(k), 0);
  s.fill.assign(s.child_begin.begin(), s.child_begin.end() - 1);
  for (int32_t j = 0; j < k; ++j) {
    s.children[static_cast<size_t>(s.fill[static_cast<size_t>(parent_of(j) + 1)]++)] = j;
  }

  const bool greedy = p.greedy();
  if (!greedy) {
    s.processed.resize(v);
    s.residual.resize(v);
    s.next.resize(v);
    s.weights.resize(v);
    s.q.resize(drafts.probs.has_value() ? static_cast<size_t>(drafts.probs->vocab_size()) : 0);
  }
  s.history.assign(request.row.output_token_ids.begin(), request.row.output_token_ids.end());
  // A row without a seed gets a fresh one for its accept and recover coins (the Sampler draws
  // its own for the positions' XTC and token coins).
  const uint64_t seed = p.seed.has_value() ? *p.seed : absl::Uniform<uint64_t>(s.entropy);
  const uint32_t sample = request.row.first_sample_index;
  std::optional<float> mu = request.row.mirostat_mu;

  out.has_logprobs = p.logprobs.has_value();
  int32_t node = -1;  // the last accepted node (−1 = none yet)
  for (;;) {
    if (cancelled != nullptr && cancelled->load(std::memory_order_relaxed)) {
      return absl::CancelledError(
          absl::StrCat("the call was cancelled before rows[", r, "] was verified"));
    }
    const int row = first_row + node + 1;
    const uint64_t step = s.history.size();
    RowRequest position = request.row;
    position.output_token_ids = s.history;
    position.mirostat_mu = mu;
    absl::StatusOr<SampledToken> sampled =
        sampler.RunRow(logits, row, position, split,
                       greedy ? absl::Span<float>() : absl::MakeSpan(s.processed.data(), v));
    if (!sampled.ok()) return ForRow(r, row, sampled.status());
    sampled->row_index = static_cast<uint32_t>(row);
    const size_t begin = static_cast<size_t>(s.child_begin[static_cast<size_t>(node + 1)]);
    const size_t end = static_cast<size_t>(s.child_begin[static_cast<size_t>(node + 2)]);

    int32_t accepted = -1;
    std::optional<int32_t> emitted;
    if (greedy) {
      // The target is a point mass on the argmax: accept the first child that is it.
      for (size_t i = begin; i < end && accepted < 0; ++i) {
        const int32_t c = s.children[i];
        if (drafts.token_ids[static_cast<size_t>(c)] == sampled->token_id) accepted = c;
      }
      if (accepted < 0) emitted = sampled->token_id;
    } else if (begin == end) {
      emitted = sampled->token_id;  // the bonus token: the draw Sample makes at this step
    } else {
      // Multi-candidate rejection sampling: r = p; for each child c in order, accept its token x
      // with probability min(1, r(x) / q_c(x)), else r ← normalise(max(0, r − q_c)); when all
      // are rejected, draw from r. r starts as the draw's own weights (SIMD ExpF, the same
      // values as the scalar one); it is written out in double only once a draft with
      // probabilities is rejected — a rejected point mass only removes its token.
      float* processed = s.processed.data();
      const float max = kernels::Max(processed, 0, v).max;
      double total = kernels::Weights(processed, nullptr, s.weights.data(), 0, v, 1.0f, max);
      bool dense = false;  // r is s.residual (else s.weights without the `removed` tokens)
      s.removed.clear();
      const auto r_at = [&](int32_t y) {
        if (dense) return s.residual[static_cast<size_t>(y)];
        return std::find(s.removed.begin(), s.removed.end(), y) != s.removed.end()
                   ? 0.0
                   : static_cast<double>(s.weights[static_cast<size_t>(y)]);
      };
      const auto make_dense = [&] {
        if (dense) return;
        for (size_t y = 0; y < v; ++y) s.residual[y] = static_cast<double>(s.weights[y]);
        for (int32_t y : s.removed) s.residual[static_cast<size_t>(y)] = 0.0;
        dense = true;
      };
      for (size_t i = begin; i < end; ++i) {
        const int32_t c = s.children[i];
        const int32_t x = drafts.token_ids[static_cast<size_t>(c)];
        const double u = UniformDouble(seed, step, sample, DrawPurpose::kAccept,
                                       static_cast<uint32_t>(i - begin));
        const double rx = r_at(x);
        if (!drafts.probs.has_value()) {
          // q = δ_x: accept with probability r(x); else r loses x (max(0, r/R − δ_x)).
          if (u * total < rx) {
            accepted = c;
            break;
          }
          if (total - rx > 0.0) {  // else r = δ_x up to rounding: keep r (see below)
            if (dense) {
              s.residual[static_cast<size_t>(x)] = 0.0;
            } else {
              s.removed.push_back(x);
            }
            total -= rx;
          }
          continue;
        }
        const LogitsView& q = *drafts.probs;
        DecodeRow(q, c, absl::MakeSpan(s.q.data(), static_cast<size_t>(q.vocab_size())));
        double row_sum = 0.0;
        for (int y = 0; y < q.vocab_size(); ++y)
          row_sum += static_cast<double>(s.q[static_cast<size_t>(y)]);
        const double qx = static_cast<double>(s.q[static_cast<size_t>(x)]) / row_sum;
        if (u * qx * total < rx) {
          accepted = c;
          break;
        }
        make_dense();
        double next_total = 0.0;
        for (size_t y = 0; y < v; ++y) {
          const double qy =
              y < static_cast<size_t>(q.vocab_size()) ? static_cast<double>(s.q[y]) / row_sum : 0.0;
          const double d = std::max(0.0, s.residual[y] / total - qy);
          s.next[y] = d;
          next_total += d;
        }
        // No mass left means r ≤ q everywhere up to rounding, where a rejection has probability
        // ~0; the residual before this subtraction is then kept.
        if (next_total > 0.0) {
          std::swap(s.residual, s.next);
          total = next_total;
        }
      }
      if (accepted < 0) {
        make_dense();
        const double u = UniformDouble(seed, step, sample, DrawPurpose::kRecover);
        emitted = DrawFromWeights(s.residual.data(), v, total, u);
      }
    }
    const int32_t token =
        accepted >= 0 ? drafts.token_ids[static_cast<size_t>(accepted)] : *emitted;

    SampledToken t;
    if (token == sampled->token_id) {
      t = *std::move(sampled);  // the same token at the same position: everything is identical
    } else {
      t.token_id = token;
      t.row_index = static_cast<uint32_t>(row);
      t.sample_index = sample;
      const absl::Span<const float> processed(s.processed.data(), v);
      if (p.logprobs.has_value()) {
        t.top_logprobs = std::move(sampled->top_logprobs);
        switch (p.logprobs_mode) {
          case LogprobsMode::kRawLogprobs: {
            s.raw.resize(v);
            DecodeRow(logits, row, absl::MakeSpan(s.raw));
            t.logprob = Normalizer::Of(s.raw).LogProb(logits.At(row, token));
            break;
          }
          case LogprobsMode::kRawLogits:
            t.logprob = logits.At(row, token);
            break;
          case LogprobsMode::kProcessedLogits:
            t.logprob = processed[static_cast<size_t>(token)];
            break;
          case LogprobsMode::kProcessedLogprobs:
            t.logprob = Normalizer::Of(processed).LogProb(processed[static_cast<size_t>(token)]);
            break;
        }
      }
      if (p.mirostat_mode != 0) {
        // μ after `token`, as mirostat's own draw updates it: from the token's probability in
        // the truncated distribution of this position.
        const float max = Argmax(processed).first;
        const double total = Weights(processed, max, s.next);
        const double surprise = -std::log2(s.next[static_cast<size_t>(token)] / total);
        const float mu_in = mu.value_or(2.0f * p.mirostat_tau);
        t.mirostat_mu = static_cast<float>(static_cast<double>(mu_in) -
                                           static_cast<double>(p.mirostat_eta) *
                                               (surprise - static_cast<double>(p.mirostat_tau)));
      }
      const Finish finish = CheckFinish(p, s.history, token);
      t.finish_reason = finish.reason;
      t.stop_token_id = finish.stop_token_id;
      t.stop_sequence_index = finish.stop_sequence_index;
    }
    if (t.mirostat_mu.has_value()) mu = t.mirostat_mu;
    const bool finished = t.finish_reason != FinishReason::kNone;
    out.tokens.push_back(std::move(t));
    if (accepted < 0) return absl::OkStatus();
    out.accepted_nodes.push_back(accepted);
    if (finished) return absl::OkStatus();
    s.history.push_back(token);
    node = accepted;
  }
}

}  // namespace

}  // namespace tokensampler
