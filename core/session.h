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
#include "absl/random/random.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/beam.h"
#include "core/params.h"
#include "core/sampler.h"
#include "core/speculative.h"
#include "core/tensor.h"

namespace tokensampler {

struct SessionLimits {
  int64_t max_sequences = 4096;          // live sequences per table (a beam search counts as
                                         // beam_width sequences)
  int64_t max_history_tokens = 1 << 20;  // prompt + output tokens per sequence (per beam)
  int32_t max_beam_width = 16;           // largest beam_width of a beam search
};

// The outcome of one step for one stepped sequence.
struct SequenceStep {
  uint64_t sequence_id = 0;
  // A plain sequence: the sampled token (finish_reason set when it ends the sequence).
  SampledToken token;
  // A beam search: its new live beams and, when the search is over, its hypotheses
  // (token.finish_reason is then beam->finish_reason as well).
  std::optional<BeamStep> beam;
  // A plain sequence of a step with drafts (StepWithDrafts): every token emitted (`token` is the
  // last of them).
  std::optional<VerifyResult> verify;
};

// The drafts of one sequence in a step.
struct SequenceDrafts {
  uint64_t sequence_id = 0;
  Drafts drafts;
};

class SequenceTable {
 public:
  explicit SequenceTable(SessionLimits limits) : limits_(limits) {}
  SequenceTable(const SequenceTable&) = delete;
  SequenceTable& operator=(const SequenceTable&) = delete;

  // Adds a sequence; with `beam`, a beam search (core/beam.h). Returns ALREADY_EXISTS for a
  // live id; INVALID_ARGUMENT for bad params (ranges; token ids are checked against the
  // vocabulary at each step), n != 1 (fork instead) or bad beam params (ValidateBeamParams,
  // against max_beam_width); RESOURCE_EXHAUSTED beyond max_sequences or max_history_tokens.
  absl::Status Add(uint64_t id, SamplingParams params, std::vector<int32_t> prompt,
                   std::optional<BeamParams> beam = std::nullopt);

  // Copies the state of `parent` into each of `children`. Each child draws from its own RNG
  // stream (a new sample index of the parent's family), so forking a sequence into k children
  // before a step gives the tokens of `Sample` with n = k + 1. Returns NOT_FOUND (parent),
  // ALREADY_EXISTS / INVALID_ARGUMENT (a child id that is live, repeated or the parent),
  // RESOURCE_EXHAUSTED beyond max_sequences. On error nothing changes.
  absl::Status Fork(uint64_t parent, absl::Span<const uint64_t> children);

  // Drops a sequence. Returns NOT_FOUND when it is not live.
  absl::Status Release(uint64_t id);

  // Steps each sequence of `ids` once. The rows of `logits` are consumed in the order of `ids`:
  // StepRows() rows each (a plain sequence 1, a beam search one per live beam in slot
  // order). A plain sequence samples its row, appends the token to its output and advances μ;
  // a beam search advances (BeamSearch::Advance). A sequence that finishes (its token ends it,
  // or its search is over) is released. Returns one result per id, in order, or on error
  // changes nothing: INVALID_ARGUMENT (the rows the ids need != logits.rows, an id twice, params
  // or history vs the vocabulary, NaN, every token masked), NOT_FOUND naming the first unknown
  // id, RESOURCE_EXHAUSTED when a history would exceed max_history_tokens, CANCELLED when
  // `cancelled` (passed to Sampler::Run) became true before every row was sampled.
  absl::StatusOr<std::vector<SequenceStep>> Step(const Sampler& sampler, const LogitsView& logits,
                                                 absl::Span<const uint64_t> ids,
                                                 const std::atomic<bool>* cancelled = nullptr);

  // Step with drafts: the rows of `logits` go to the ids as for Step, a plain sequence with
  // drafts taking StepRows() of them. Every plain sequence is verified (core/speculative.h) — one
  // listed in `drafts` against its drafts, the others with none, which gives exactly Step's
  // token — and its history advances by every emitted token (SequenceStep::verify); a beam search
  // advances as in Step. Returns one result per id, or on error changes nothing: the errors of
  // Step, plus INVALID_ARGUMENT for bad drafts ("drafts[i].…"), a drafts entry whose sequence is
  // not stepped, listed twice or a beam search.
  absl::StatusOr<std::vector<SequenceStep>> StepWithDrafts(
      const Verifier& verifier, const LogitsView& logits, absl::Span<const uint64_t> ids,
      absl::Span<const SequenceDrafts> drafts, const std::atomic<bool>* cancelled = nullptr);

  // Live sequence ids.
  int64_t size() const { return static_cast<int64_t>(sequences_.size()); }
  // What max_sequences counts: each live sequence once, a beam search beam_width times.
  int64_t units() const { return units_; }
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
    std::optional<BeamSearch> beam;            // set for a beam search
  };

  // The logits rows a stepped sequence takes (the Step row-mapping rule, in one place): a plain
  // sequence 1, with k drafts k + 1 (a tree of N nodes N + 1), a beam search one per live beam
  // (1 at its first step). `seq` null (an unknown id) counts as a plain sequence.
  static size_t StepRows(const Sequence* seq, const Drafts* drafts);
  // What `seq` counts towards max_sequences.
  static int64_t UnitsOf(const Sequence& seq);

  absl::Status CheckCapacity(int64_t more) const;
  // The checks every step makes before it samples: the rows the ids need (drafts[i] = the
  // drafts of ids[i] or null) against logits.rows, ids unique and live, params valid for the
  // vocabulary, histories within the limit. Returns the sequences, in the order of `ids`.
  absl::StatusOr<std::vector<Sequence*>> StepSequences(const LogitsView& logits,
                                                       absl::Span<const uint64_t> ids,
                                                       absl::Span<const Drafts* const> drafts);
  // Step and StepWithDrafts: one Sampler::Run over every row (no verifier), or one Verifier::Run.
  absl::StatusOr<std::vector<SequenceStep>> Run(const Sampler* sampler, const Verifier* verifier,
                                                const LogitsView& logits,
                                                absl::Span<const uint64_t> ids,
                                                absl::Span<const Drafts* const> drafts,
                                                const std::atomic<bool>* cancelled);
  void Erase(uint64_t id);

  SessionLimits limits_;
  absl::flat_hash_map<uint64_t, Sequence> sequences_;
  int64_t units_ = 0;
  absl::BitGen entropy_;  // seeds of unseeded beam sampling
};

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_SESSION_H_
