// BeamSearch: the server-side state of one beam search (HF `generate(num_beams=...)` semantics),
// advanced one step at a time from the processed log-probabilities of each live beam's row.
//
// Definitions (HF transformers' vectorised `GenerationMixin._beam_search`, 4.57; diverse beam
// search as HF's `_group_beam_search` with `HammingDiversityLogitsProcessor`):
//  - A beam's token scores are the log-softmax of its row after steps 1–2 of the pipeline
//    (masks, biases, min_tokens, penalties, DRY, no-repeat-ngram) with the beam's own history.
//    With do_sample they are the log-probabilities of the distribution the row would be sampled
//    from (temperature and truncation too: PROCESSED_LOGPROBS), renormalised.
//  - A beam's cumulative score is the sum of its tokens' scores (minus diversity penalties).
//  - Each step, per group of beam_width / num_beam_groups = S beams, the K = max(2, 1 + E) · S
//    best (beam, token) continuations by cumulative score are taken (E = the number of
//    eos_token_ids, unless ignore_eos, plus stop_token_ids); ties by beam slot, then token id.
//    With do_sample the K are drawn without replacement from softmax(cumulative scores) over
//    every (beam, token) of the group (Philox, keyed by seed, generated length, the sequence's
//    sample index and lane = group · K + draw), then ranked by score.
//  - In rank order: a continuation whose token finishes the sequence (EOS, a stop token or stop
//    sequence, or max_tokens reached: the finish reasons of `Sample`) becomes a finished
//    hypothesis if its rank is below S; otherwise it becomes a new live beam, until S live beams.
//  - A finished hypothesis's score is sum_logprobs / length^length_penalty, where length is the
//    number of generated tokens including the final one (EOS included; the prompt is not
//    counted) — HF's `cur_len + 1 - decoder_prompt_len`. Each group keeps its S best
//    hypotheses (a new one must beat the worst to enter a full group; ties keep the older).
//  - A group is done when it has no live beam left, or it holds S hypotheses and
//      EARLY_STOPPING_TRUE: always;
//      HEURISTIC: its worst hypothesis ≥ best live beam's cumulative score / L^length_penalty,
//        L = generated tokens so far (HF's default `early_stopping=False`);
//      NEVER: the same with L = max_tokens when length_penalty > 0 (the best score a live beam
//        could still reach), else the current length (canonical beam search).
//    A done group has no live beams: the worker stops sending rows for them.
//  - Diverse beam search: groups are processed in order within a step; group g's token scores
//    are lowered by diversity_penalty × (how many of the new live beams of groups < g chose
//    that token this step). Every group starts from the prompt row.
//  - The search ends when every group is done; the hypotheses of all groups, best first, are
//    the result (num_return_sequences of them).
//
// Thread-compatible: one BeamSearch belongs to one sequence of one session.
#ifndef TOKENSAMPLER_CORE_BEAM_H_
#define TOKENSAMPLER_CORE_BEAM_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "core/params.h"
#include "core/sampler.h"

namespace tokensampler {

enum class EarlyStopping : uint8_t { kHeuristic, kTrue, kNever };

// The proto's BeamSearchParams as core values (defaults: HF's).
struct BeamParams {
  int32_t beam_width = 1;
  float length_penalty = 1.0f;
  EarlyStopping early_stopping = EarlyStopping::kHeuristic;
  int32_t num_return_sequences = 1;
  int32_t num_beam_groups = 1;
  float diversity_penalty = 0.0f;
  bool do_sample = false;
};

// Checks `beam` (and the sampling params it is combined with) for a server allowing beams up to
// `max_beam_width`. Returns OK or INVALID_ARGUMENT naming the field and the value; fields of
// `beam` are named `beam.<field>`, sampling fields `params.<field>`.
absl::Status ValidateBeamParams(const BeamParams& beam, const SamplingParams& params,
                                int32_t max_beam_width);

// A live beam after a step: where it comes from and its new token.
struct BeamSlot {
  uint32_t parent_beam = 0;  // slot of the parent among the step's input rows (0 at the first)
  int32_t token_id = 0;
  float logprob = 0.0f;           // the token's score (before any diversity penalty)
  double cumulative_score = 0.0;  // the beam's cumulative score with this token
};

// A finished hypothesis.
struct BeamHypothesis {
  std::vector<int32_t> token_ids;  // generated tokens, the final (EOS / stop) one included
  double score = 0.0;              // sum_logprobs / length^length_penalty
  double sum_logprobs = 0.0;
  FinishReason finish_reason = FinishReason::kNone;
  std::optional<int32_t> stop_token_id;
  std::optional<uint32_t> stop_sequence_index;
};

// The outcome of one step of one beam search.
struct BeamStep {
  // The live beams after the step, in slot order (group 0's first): the rows of the next step.
  std::vector<BeamSlot> beams;
  bool finished = false;  // the search is over (beams is then empty)
  // When finished: the best hypothesis's finish reason, and the best num_return_sequences
  // hypotheses over all groups, best first (ties: lower group, then older).
  FinishReason finish_reason = FinishReason::kNone;
  std::vector<BeamHypothesis> hypotheses;
};

class BeamSearch {
 public:
  // REQUIRES: ValidateBeamParams(beam, params, ·) is OK. `seed` keys the do_sample draws (the
  // params' seed if set, else fresh entropy chosen by the caller).
  BeamSearch(const BeamParams& beam, const SamplingParams& params, uint64_t seed);

  // Rows the next step needs: 1 before the first step, then one per live beam.
  int32_t rows() const;
  bool finished() const { return finished_; }
  const BeamParams& beam_params() const { return beam_; }

  // Appends one RowRequest per row of the next step (slot order), pointing at this object's
  // state and at `prompt` (keep both alive and unchanged until the Sampler has run).
  void AppendRows(absl::Span<const int32_t> prompt, std::vector<RowRequest>& rows) const;

  // The longest history (prompt + output) a beam has after the next step.
  size_t NextHistoryTokens(size_t prompt_tokens) const { return prompt_tokens + length_ + 1; }

  // Advances the search with the Sampler's results for the rows of AppendRows (one each, in
  // the same order). `sample_index` keys the do_sample draws (the sequence's RNG stream, so
  // forked copies draw differently). REQUIRES: !finished(), row_results.size() == rows().
  BeamStep Advance(absl::Span<const SampledToken> row_results, uint32_t sample_index);

 private:
  struct Beam {
    std::vector<int32_t> output;
    double score = 0.0;
  };
  struct Candidate {
    double score;        // cumulative, with the diversity penalty
    uint32_t parent;     // input row
    uint32_t flat_rank;  // position of the parent within its group (the tie-break)
    int32_t token;
    float logprob;
  };
  struct Group {
    std::vector<BeamHypothesis> hypotheses;  // best first, at most group_size_
    bool done = false;
  };

  void Rank(std::vector<Candidate>& candidates, size_t keep, uint32_t sample_index,
            uint32_t group) const;
  void AddHypothesis(Group& group, BeamHypothesis hypothesis) const;
  bool GroupDone(const Group& group, double best_running) const;

  BeamParams beam_;
  SamplingParams row_params_;  // the params the Sampler runs each beam's row with
  SamplingParams params_;      // the sequence's own params (finish rules)
  uint64_t seed_;
  int32_t group_size_;
  size_t keep_;                  // K continuations per group
  std::vector<Beam> beams_;      // live beams, slot order; one empty beam before the first step
  std::vector<int32_t> groups_;  // group of each live beam (before the first step: -1 = all)
  std::vector<Group> group_state_;
  size_t length_ = 0;  // generated tokens per live beam
  bool finished_ = false;
};

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_BEAM_H_
