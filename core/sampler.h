// Sampler: runs the whole logits pipeline for a batch of rows and returns the drawn tokens.
//
// Thread-safety: a Sampler is thread-safe; Run() may be called concurrently from many threads.
// It creates no threads: rows run with oneTBB inside whatever task_arena the caller is in
// (the service's arena). Scratch buffers are per thread and reused (no per-row allocation in
// steady state beyond the results).
#ifndef TOKENSAMPLER_CORE_SAMPLER_H_
#define TOKENSAMPLER_CORE_SAMPLER_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/params.h"
#include "core/tensor.h"

namespace tokensampler {

enum class FinishReason : uint8_t { kNone, kEos, kStop, kLength };

// One row of a batch: its parameters and history. Borrows everything; the caller keeps the
// pointed-to values alive for the duration of Run().
struct RowRequest {
  const SamplingParams* params = nullptr;  // REQUIRES: non-null and validated (ValidateParams)
  absl::Span<const int32_t> prompt_token_ids;
  absl::Span<const int32_t> output_token_ids;  // its length is the RNG step
  std::optional<float> mirostat_mu;            // unset = 2·tau
  uint32_t first_sample_index = 0;  // sample s of the row draws with index first + s (forks)
};

struct TokenLogprob {
  int32_t token_id = 0;
  float logprob = 0.0f;
};

// One drawn token.
struct SampledToken {
  int32_t token_id = 0;
  float logprob = 0.0f;                    // in the row's logprobs_mode
  std::vector<TokenLogprob> top_logprobs;  // by descending value, ties by ascending id
  FinishReason finish_reason = FinishReason::kNone;
  std::optional<int32_t> stop_token_id;         // finish_reason == kStop by a stop token id
  std::optional<uint32_t> stop_sequence_index;  // finish_reason == kStop by a stop sequence
  uint32_t row_index = 0;
  uint32_t sample_index = 0;
  std::optional<float> mirostat_mu;  // updated μ, mirostat rows only
};

class Sampler {
 public:
  Sampler();
  ~Sampler();
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  // Samples every row of `logits` with the matching entry of `rows`. A view in pieces
  // (LogitsView::CreateFromPieces) is sampled row by row from a contiguous copy of each row in
  // per-thread scratch; the other entry points (RunRow, Verifier, Session) take contiguous views.
  // Returns Σ n results, row-major (all samples of row 0, then row 1, …), or
  //   INVALID_ARGUMENT  rows.size() != logits.rows(), a token id out of [0, vocab_size) in a
  //                     history, NaN logits, every token of a row masked, a finished sequence
  //                     (output already at max_tokens). Messages start with "rows[i]" or name
  //                     the logits position. The first failing row (lowest index) is reported.
  //   CANCELLED         `cancelled` became true before every row was done (checked between
  //                     rows; the caller sets it when its call is cancelled or past its deadline).
  // REQUIRES: every params pointer is non-null and passed ValidateParams for this vocab size.
  absl::StatusOr<std::vector<SampledToken>> Run(const LogitsView& logits,
                                                absl::Span<const RowRequest> rows,
                                                const std::atomic<bool>* cancelled = nullptr) const;

  // For speculative verification (core/speculative.h). Samples row `row` of `logits` for
  // `request` exactly as Run does (the same token, logprobs, finish reason and μ; errors as Run's,
  // naming "rows[row]"), on the calling thread — its blocks spread over the arena when `split` —
  // and, when `processed` is not empty, copies into it the distribution that sample is drawn
  // from: the row after every stage as logits, removed tokens −inf (for greedy rows, the row
  // after masks, biases and penalties). Softmax of it (ExpF weights, as the draw) is the target
  // distribution of the position.
  // REQUIRES: request.params->n == 1 and validated; `processed` empty or of size vocab_size.
  absl::StatusOr<SampledToken> RunRow(const LogitsView& logits, int row, const RowRequest& request,
                                      bool split, absl::Span<float> processed) const;

 private:
  struct Scratch;
  std::unique_ptr<Scratch> scratch_;  // per-thread buffers (enumerable_thread_specific)
};

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_SAMPLER_H_
