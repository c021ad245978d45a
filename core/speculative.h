// Speculative decoding: verifies a draft model's tokens against the target model's logits so that
// the emitted tokens are distributed exactly as if the target had sampled them one by one
// (Leviathan et al. 2023; Chen et al. 2023), for chains of drafts and for draft trees
// (SpecInfer's multi-candidate rejection sampling). docs/speculative.md has the math.
//
// The target distribution at every position is the one `Sampler::Run` draws from for that row
// with the history extended by the drafts before the position: masks, biases, penalties, DRY,
// no-repeat-ngram, min_tokens, temperature, every truncation stage, XTC and mirostat all apply.
//
// Random streams of a seeded row (Philox, core/philox.h), with step = the number of output
// tokens before the position (output_token_ids.size() + depth) and the row's sample index:
//   kToken   (step)           the draw `Sample` makes at that step: the bonus token;
//   kXtc     (step)           XTC's coin, as in `Sample`;
//   kAccept  (step, lane j)   the accept coin of the j-th child tried at that position;
//   kRecover (step)           the draw from the residual after every child was rejected.
// Every purpose is its own Philox counter, so no two uses share bits; a call only uses the steps
// of the tokens it emits, so the next call (which starts after them) never reuses a counter.
// With no drafts, Verify returns exactly the token `Sample` gives.
//
// Thread-safe: a Verifier may be used from many threads at once (its scratch is per thread).
#ifndef TOKENSAMPLER_CORE_SPECULATIVE_H_
#define TOKENSAMPLER_CORE_SPECULATIVE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/params.h"
#include "core/sampler.h"
#include "core/tensor.h"

namespace tokensampler {

// The drafts of one sequence. A chain when `parents` is empty (node j follows node j − 1);
// otherwise a tree: parents[j] is node j's parent node, −1 for a child of the current position
// (the root), and parents come before their children. Borrows everything.
struct Drafts {
  absl::Span<const int32_t> token_ids;  // k nodes
  // The probabilities the draft model drew each node's token from: row j for node j (its parent's
  // context). Unset = point masses (n-gram or greedy drafters). Its vocabulary may be smaller
  // than the target's (tokens beyond it have probability 0); rows are renormalised to sum 1.
  std::optional<LogitsView> probs;
  absl::Span<const int32_t> parents;  // empty = chain; else k entries
};

// |Σ row − 1| allowed in a row of draft probabilities (the sum taken in double): the rounding of
// a softmax in float32, or of its conversion to bfloat16 / float16 over a large vocabulary.
constexpr double kDraftProbSumToleranceF32 = 1e-3;
constexpr double kDraftProbSumTolerance16 = 1e-2;

// Checks drafts against a target vocabulary of `vocab_size` tokens: token ids in range; parents
// of the right count, in [−1, k), before their children, no cycle; probs with k rows, a
// vocabulary ≤ vocab_size, every value finite and ≥ 0, each row summing to 1 within the
// tolerance, and giving its own node's token a probability > 0. Returns OK or INVALID_ARGUMENT
// whose message starts with the field (`draft_token_ids[2] = 9 is out of range [0, 8)`); the
// caller prefixes the row.
absl::Status ValidateDrafts(const Drafts& drafts, int32_t vocab_size);

// The target rows a sequence with `drafts` consumes: the current position, then one per node.
inline size_t TargetRows(const Drafts& drafts) { return drafts.token_ids.size() + 1; }

// One sequence to verify: a Sample row plus its drafts. Borrows everything.
struct VerifyRowRequest {
  RowRequest row;  // REQUIRES: row.params validated for the vocabulary, n == 1
  Drafts drafts;
};

// The outcome for one sequence.
struct VerifyResult {
  // The accepted drafts, then one recovered (after a rejection) or bonus (all accepted) token —
  // unless an accepted draft finished the sequence, which then ends there. Each token carries its
  // logprob and top_logprobs in the row's logprobs_mode at its own position (processed modes: the
  // target distribution of that position), its finish fields (set only on the last) and, for
  // mirostat rows, μ after it. row_index is the token's target row in the request's logits.
  std::vector<SampledToken> tokens;
  // The accepted draft nodes, root first (for a chain, 0 … num_accepted − 1): the KV entries the
  // worker keeps.
  std::vector<int32_t> accepted_nodes;
  bool has_logprobs = false;  // params.logprobs was set: the tokens' logprob fields are meaningful

  size_t num_accepted() const { return accepted_nodes.size(); }
};

class Verifier {
 public:
  // `sampler` computes every position's target distribution; borrowed, must outlive the Verifier.
  explicit Verifier(const Sampler& sampler);
  ~Verifier();
  Verifier(const Verifier&) = delete;
  Verifier& operator=(const Verifier&) = delete;

  // Verifies every row. Row r's target logits are the TargetRows(rows[r].drafts) consecutive rows
  // of `logits` after those of rows 0 … r − 1. Returns one result per row, or
  //   INVALID_ARGUMENT  the rows need a different number of logits rows than logits.rows; a
  //                     history token or draft out of range; bad drafts (ValidateDrafts); n != 1;
  //                     a finished sequence; NaN target logits; every token masked. Messages
  //                     start with "rows[r]" (or name logits.rows / the logits row).
  //   CANCELLED         `cancelled` became true before every row was done.
  absl::StatusOr<std::vector<VerifyResult>> Run(const LogitsView& logits,
                                                absl::Span<const VerifyRowRequest> rows,
                                                const std::atomic<bool>* cancelled = nullptr) const;

 private:
  struct Scratch;

  const Sampler& sampler_;
  std::unique_ptr<Scratch> scratch_;
};

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_SPECULATIVE_H_
