// SequenceTable: the server-side state of the sequences of one `Session` stream — parameters,
// prompt, output so far, mirostat μ and the RNG stream — so that a step only needs this step's
// logits and the ids of the sequences they belong to. Stepping a sequence gives exactly the
// token `Sampler::Run` gives for the same row with the full history.
//
// Thread-compatible: one stream drives one table, one request at a time.
#ifndef TOKENSAMPLER_CORE_SESSION_H_
#define TOKENSAMPLER_CORE_SESSION_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/params.h"
#include "core/sampler.h"
#include "core/speculative.h"
#include "core/tensor.h"

namespace tokensampler {

struct SessionLimits {
  int64_t max_sequences = 4096;          // live sequences per table
  int64_t max_history_tokens = 1 << 20;  // prompt + output tokens per sequence
};

// The drafts of one sequence in a step.
struct SequenceDrafts {
  uint64_t sequence_id = 0;
  Drafts drafts;
};

// The rows of a step's logits one stepped sequence takes: 1, or with drafts one for the current
// position plus one per draft node. (The one place that knows; beam sequences extend it.)
size_t StepRows(const Drafts* drafts);

class SequenceTable {
 public:
  explicit SequenceTable(SessionLimits limits) : limits_(limits) {}
  SequenceTable(const SequenceTable&) = delete;
  SequenceTable& operator=(const SequenceTable&) = delete;

  // Adds a sequence. Returns ALREADY_EXISTS for a live id; INVALID_ARGUMENT for bad params
  // (ranges; token ids are checked against the vocabulary at each step) or n != 1 (fork
  // instead); RESOURCE_EXHAUSTED beyond max_sequences or max_history_tokens.
  absl::Status Add(uint64_t id, SamplingParams params, std::vector<int32_t> prompt);

  // Copies the state of `parent` into each of `children`. Each child draws from its own RNG
  // stream (a new sample index of the parent's family), so forking a sequence into k children
  // before a step gives the tokens of `Sample` with n = k + 1. Returns NOT_FOUND (parent),
  // ALREADY_EXISTS / INVALID_ARGUMENT (a child id that is live, repeated or the parent),
  // RESOURCE_EXHAUSTED beyond max_sequences. On error nothing changes.
  absl::Status Fork(uint64_t parent, absl::Span<const uint64_t> children);

  // Drops a sequence. Returns NOT_FOUND when it is not live.
  absl::Status Release(uint64_t id);

  // Samples row i of `logits` for sequence ids[i], appends the token to its output and advances
  // μ; a sequence whose token finishes it is released. Returns one result per row, or on error
  // changes nothing: INVALID_ARGUMENT (ids.size() != rows, an id twice, params or history vs the
  // vocabulary, NaN, every token masked), NOT_FOUND naming the first unknown id,
  // RESOURCE_EXHAUSTED when a history would exceed max_history_tokens, CANCELLED when
  // `cancelled` (passed to Sampler::Run) became true before every row was sampled.
  absl::StatusOr<std::vector<SampledToken>> Step(const Sampler& sampler, const LogitsView& logits,
                                                 absl::Span<const uint64_t> ids,
                                                 const std::atomic<bool>* cancelled = nullptr);

  // Step with drafts: every stepped sequence is verified (core/speculative.h) — a sequence
  // listed in `drafts` against its drafts, the others with none, which gives exactly Step's
  // token — and its history advances by every emitted token. Rows of `logits` go to the ids in
  // order, StepRows() each. Returns one result per id, or on error changes nothing: the errors of
  // Step, plus INVALID_ARGUMENT for bad drafts ("drafts[i].…") or a drafts entry whose sequence is
  // not stepped or listed twice.
  absl::StatusOr<std::vector<VerifyResult>> StepWithDrafts(
      const Verifier& verifier, const LogitsView& logits, absl::Span<const uint64_t> ids,
      absl::Span<const SequenceDrafts> drafts, const std::atomic<bool>* cancelled = nullptr);

  int64_t size() const { return static_cast<int64_t>(sequences_.size()); }
  bool contains(uint64_t id) const { return sequences_.contains(id); }

 private:
  struct Sequence {
    SamplingParams params;
    std::vector<int32_t> prompt;
    std::vector<int32_t> output;
    std::optional<float> mirostat_mu;
    uint32_t sample_index = 0;
    std::shared_ptr<uint32_t> family_samples;  // sample indexes handed out in this family
    int32_t validated_vocab = 0;               // params already validated for this vocabulary size
  };

  absl::Status CheckCapacity(int64_t more) const;
  // The checks every step makes before it samples: the rows the ids need (drafts[i] = the
  // drafts of ids[i] or null) against logits.rows, ids unique and live, params valid for the
  // vocabulary, histories within the limit. Returns the sequences, in the order of `ids`.
  absl::StatusOr<std::vector<Sequence*>> StepSequences(const LogitsView& logits,
                                                       absl::Span<const uint64_t> ids,
                                                       absl::Span<const Drafts* const> drafts);

  SessionLimits limits_;
  absl::flat_hash_map<uint64_t, Sequence> sequences_;
};

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_SESSION_H_
