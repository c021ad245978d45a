// Sparse logits: per row, the k largest logits (ids + values, computed by the model worker) and
// the log-sum-exp of all the other tokens' logits. SparseBatch turns them into a dense tensor
// with -inf outside the candidates, and decides per row whether sampling that dense row gives
// exactly what the full row would give.
//
// Why densify with -inf, and when it is exact. A dense row with -inf outside the candidates is
// the full row with the rest's probability mass removed. Everything that only ranks tokens or
// compares a token with the row's maximum is unchanged by that removal as long as the tokens it
// keeps are candidates: greedy, top_k ≤ k, min_p (its threshold is relative to the maximum).
// top_p is relative to the total mass: the full row keeps the smallest prefix holding p of the
// total Z = Z_cand + Z_rest, which on the candidates alone is the prefix holding
// p' = p · Z / Z_cand of Z_cand — so the row's top_p is rewritten to p' (≤ 1 exactly when the
// candidates hold ≥ p of the mass). Z_rest is known only at temperature 1 (rest_logsumexp is a
// temperature-1 sum), so top_p must run before any temperature. Once a stage has kept only
// candidates, every later stage sees exactly the full row's kept set. Raw logprobs are shifted
// by log(Z_cand / Z). What cannot be made exact (mirostat, typical_p / entropy-based stages or
// dynamic temperature first, masks and penalties that touch non-candidates, sampling the whole
// vocabulary, logprobs of every token) is rejected: the distribution is never silently changed.
// The core's pipeline is untouched, so the sparse path inherits its exactness and speed.
//
// Thread-compatible: Create and Prepare from one thread; view() may be read from many threads.
#ifndef TOKENSAMPLER_CORE_SPARSE_H_
#define TOKENSAMPLER_CORE_SPARSE_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/params.h"
#include "core/sampler.h"
#include "core/tensor.h"

namespace tokensampler {

// Sparse rows as they arrive: borrowed bytes, little-endian.
struct SparseRows {
  DType dtype = DType::kFloat32;
  uint32_t rows = 0;
  uint32_t vocab_size = 0;
  uint32_t k = 0;                          // candidates per row
  absl::Span<const uint8_t> token_ids;     // rows × k int32
  absl::Span<const uint8_t> values;        // rows × k elements of dtype
  absl::Span<const float> rest_logsumexp;  // rows entries; -inf = no mass outside
};

class SparseBatch {
 public:
  // Validates `sparse` and builds the dense tensor (in sparse.dtype; rows run in parallel with
  // oneTBB in the caller's arena). Returns INVALID_ARGUMENT naming the field ("logits.sparse.k",
  // "logits.sparse.token_ids", ...) and the value: k outside [1, vocab_size], sizes that do not
  // match rows × k, an id outside [0, vocab_size) or twice in a row, a NaN value, a NaN or +inf
  // rest_logsumexp, a finite rest_logsumexp with k == vocab_size.
  static absl::StatusOr<SparseBatch> Create(const SparseRows& sparse);

  SparseBatch(SparseBatch&&) = default;
  SparseBatch& operator=(SparseBatch&&) = default;
  SparseBatch(const SparseBatch&) = delete;
  SparseBatch& operator=(const SparseBatch&) = delete;

  // The dense [rows × vocab_size] tensor: candidates' values, -inf elsewhere. Valid while this
  // batch lives.
  const LogitsView& view() const { return view_; }

  // Checks that sampling row `row` of view() with `params` (already validated) gives the full
  // row's distribution, and rewrites `params.top_p` where that makes it so (see the header
  // comment). `prompt` and `output` are the row's history (penalties, min_tokens). Returns OK,
  // or INVALID_ARGUMENT "rows[i].params.<field> ..." for a combination that cannot be exact,
  // or "rows[i]: sparse logits: ..." when the row's data puts the kept set outside the
  // candidates (naming the mass the candidates hold or the logits involved).
  absl::Status Prepare(int row, SamplingParams& params, absl::Span<const int32_t> prompt,
                       absl::Span<const int32_t> output) const;

  // Corrects what the core computed from the dense row: raw logprobs (and their top-N) are
  // shifted by log(Z_cand / Z) so that they include the rest's mass. REQUIRES: `token` was
  // sampled from row token.row_index of view() with `params`.
  void FixLogprobs(const SamplingParams& params, SampledToken& token) const;

  // Fraction of row `row`'s probability mass (temperature 1) held by its candidates.
  double CandidateMass(int row) const;

 private:
  struct RowStats {
    double lse = 0.0;    // log Σ exp over the candidates
    double rest = 0.0;   // rest_logsumexp
    float max = 0.0f;    // largest candidate
    float bound = 0.0f;  // no non-candidate logit exceeds it: min(smallest candidate, rest)
  };

  SparseBatch() = default;
  bool IsCandidate(int row, int32_t token) const;
  float Value(int row, int32_t token) const { return view_.At(row, token); }

  uint32_t k_ = 0;
  std::vector<uint8_t> dense_;
  std::vector<uint64_t> members_;  // rows × ceil(V / 64) bits: token is a candidate
  size_t words_per_row_ = 0;
  std::vector<RowStats> stats_;
  std::vector<int32_t> ids_;  // rows × k candidate ids, as received
  LogitsView view_;
};

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_SPARSE_H_
