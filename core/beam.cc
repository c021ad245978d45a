#include "core/beam.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "core/philox.h"
#include "core/stopping.h"

namespace tokensampler {

namespace {

absl::Status Invalid(absl::string_view field, absl::string_view rule, absl::string_view got) {
  return absl::InvalidArgumentError(absl::StrCat(field, " must ", rule, ", got ", got));
}

absl::string_view EarlyStoppingName(EarlyStopping mode) {
  switch (mode) {
    case EarlyStopping::kTrue:
      return "EARLY_STOPPING_TRUE";
    case EarlyStopping::kNever:
      return "EARLY_STOPPING_NEVER";
    case EarlyStopping::kHeuristic:
      break;
  }
  return "EARLY_STOPPING_HEURISTIC";
}

// Tokens that can end a sequence by themselves (HF's count of eos_token_id, which decides how
// many continuations are kept so that enough of them go on).
int32_t TerminalTokens(const SamplingParams& p) {
  return static_cast<int32_t>((p.ignore_eos ? 0 : p.eos_token_ids.size()) +
                              p.stop_token_ids.size());
}

}  // namespace

absl::Status ValidateBeamParams(const BeamParams& beam, const SamplingParams& params,
                                int32_t max_beam_width) {
  if (beam.beam_width < 1 || beam.beam_width > max_beam_width) {
    return Invalid("beam.beam_width",
                   absl::StrCat("be in [1, ", max_beam_width, "] (the server's --max_beam_width)"),
                   absl::StrCat(beam.beam_width));
  }
  if (!std::isfinite(beam.length_penalty)) {
    return Invalid("beam.length_penalty", "be finite", absl::StrCat(beam.length_penalty));
  }
  if (beam.num_return_sequences < 1 || beam.num_return_sequences > beam.beam_width) {
    return Invalid("beam.num_return_sequences",
                   absl::StrCat("be in [1, beam_width = ", beam.beam_width, "]"),
                   absl::StrCat(beam.num_return_sequences));
  }
  if (beam.num_beam_groups < 1 || beam.num_beam_groups > beam.beam_width ||
      beam.beam_width % beam.num_beam_groups != 0) {
    return Invalid("beam.num_beam_groups", absl::StrCat("divide beam_width = ", beam.beam_width),
                   absl::StrCat(beam.num_beam_groups));
  }
  if (!std::isfinite(beam.diversity_penalty) || beam.diversity_penalty < 0.0f) {
    return Invalid("beam.diversity_penalty", "be finite and >= 0",
                   absl::StrCat(beam.diversity_penalty));
  }
  if (beam.diversity_penalty > 0.0f && beam.num_beam_groups == 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("beam.diversity_penalty ", beam.diversity_penalty,
                     " needs beam.num_beam_groups > 1 (it acts between groups), got 1"));
  }
  if (beam.do_sample && beam.num_beam_groups > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("beam.do_sample cannot be combined with diverse beam search, got "
                     "beam.num_beam_groups ",
                     beam.num_beam_groups));
  }
  if (beam.do_sample && params.greedy()) {
    return Invalid("params.temperature", "be > 0 with beam.do_sample",
                   absl::StrCat(params.temperature));
  }
  if (beam.early_stopping == EarlyStopping::kNever && beam.length_penalty > 0.0f &&
      !params.max_tokens.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat("beam.early_stopping ", EarlyStoppingName(beam.early_stopping),
                     " with beam.length_penalty ", beam.length_penalty,
                     " > 0 needs params.max_tokens (the longest a hypothesis can get), got none"));
  }
  if (params.mirostat_mode != 0) {
    return Invalid("params.mirostat_mode", "be 0 with beam search",
                   absl::StrCat(params.mirostat_mode));
  }
  if (params.logprobs.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat("params.logprobs must be unset with beam search (each beam slot reports "
                     "its token's logprob and cumulative score), got ",
                     *params.logprobs));
  }
  return absl::OkStatus();
}

BeamSearch::BeamSearch(const BeamParams& beam, const SamplingParams& params, uint64_t seed)
    : beam_(beam),
      row_params_(params),
      params_(params),
      seed_(seed),
      group_size_(beam.beam_width / beam.num_beam_groups),
      keep_(static_cast<size_t>(std::max(2, 1 + TerminalTokens(params)) *
                                (beam.beam_width / beam.num_beam_groups))),
      beams_(1),
      groups_(1, -1),
      group_state_(static_cast<size_t>(beam.num_beam_groups)) {
  // Each row is run through the whole pipeline for its processed log-probabilities: without
  // sampling, those of steps 1–2 (the greedy path stops there); with sampling, of the
  // distribution that would be sampled from.
  row_params_.logprobs_mode = LogprobsMode::kProcessedLogprobs;
  if (beam.do_sample) {
    row_params_.logprobs = -1;  // every token with non-zero probability
  } else {
    row_params_.temperature = 0.0f;
    // The K best continuations of a group lie within each beam's K best tokens; a diversity
    // penalty can lower at most (beams of earlier groups) tokens below them.
    row_params_.logprobs = static_cast<int32_t>(keep_) +
                           (beam.num_beam_groups > 1 ? beam.beam_width - group_size_ : 0);
  }
}

int32_t BeamSearch::rows() const { return static_cast<int32_t>(beams_.size()); }

void BeamSearch::AppendRows(absl::Span<const int32_t> prompt, std::vector<RowRequest>& rows) const {
  for (const Beam& b : beams_) {
    rows.push_back({&row_params_, prompt, b.output, std::nullopt, 0});
  }
}

void BeamSearch::Rank(std::vector<Candidate>& candidates, size_t keep, uint32_t sample_index,
                      uint32_t group) const {
  const auto by_position = [](const Candidate& a, const Candidate& b) {
    return a.flat_rank != b.flat_rank ? a.flat_rank < b.flat_rank : a.token < b.token;
  };
  const auto by_score = [&](const Candidate& a, const Candidate& b) {
    return a.score != b.score ? a.score > b.score : by_position(a, b);
  };
  if (!beam_.do_sample) {
    if (candidates.size() > keep) {
      std::partial_sort(candidates.begin(), candidates.begin() + static_cast<ptrdiff_t>(keep),
                        candidates.end(), by_score);
      candidates.resize(keep);
    } else {
      std::sort(candidates.begin(), candidates.end(), by_score);
    }
    return;
  }
  // Beam sampling: `keep` draws without replacement from softmax(score) over the candidates in
  // (beam, token) order, each an inverse-CDF draw over what is left; then ranked by score.
  std::sort(candidates.begin(), candidates.end(), by_position);
  double max = -std::numeric_limits<double>::infinity();
  for (const Candidate& c : candidates) max = std::max(max, c.score);
  std::vector<double> weights(candidates.size());
  for (size_t i = 0; i < candidates.size(); ++i) weights[i] = std::exp(candidates[i].score - max);
  std::vector<Candidate> drawn;
  const size_t draws = std::min(keep, candidates.size());
  drawn.reserve(draws);
  for (size_t k = 0; k < draws; ++k) {
    double total = 0.0;
    for (double w : weights) total += w;
    const double u = UniformDouble(seed_, length_, sample_index, DrawPurpose::kBeamCandidates,
                                   static_cast<uint32_t>(group * keep + k));
    const double target = u * total;
    size_t pick = candidates.size();
    double cumulative = 0.0;
    for (size_t i = 0; i < weights.size(); ++i) {
      if (weights[i] <= 0.0) continue;
      cumulative += weights[i];
      pick = i;  // the last positive weight takes any rounding remainder
      if (cumulative > target) break;
    }
    if (pick == candidates.size()) break;  // nothing left with a positive weight
    drawn.push_back(candidates[pick]);
    weights[pick] = 0.0;
  }
  std::sort(drawn.begin(), drawn.end(), by_score);
  candidates = std::move(drawn);
}

void BeamSearch::AddHypothesis(Group& group, BeamHypothesis hypothesis) const {
  const size_t capacity = static_cast<size_t>(group_size_);
  if (group.hypotheses.size() >= capacity && !(hypothesis.score > group.hypotheses.back().score)) {
    return;
  }
  // After every hypothesis with a score ≥ the new one's: ties keep the older first.
  const auto at =
      std::upper_bound(group.hypotheses.begin(), group.hypotheses.end(), hypothesis.score,
                       [](double score, const BeamHypothesis& h) { return score > h.score; });
  group.hypotheses.insert(at, std::move(hypothesis));
  if (group.hypotheses.size() > capacity) group.hypotheses.pop_back();
}

bool BeamSearch::GroupDone(const Group& group, double best_running) const {
  if (best_running == -std::numeric_limits<double>::infinity()) return true;  // no live beam
  if (group.hypotheses.size() < static_cast<size_t>(group_size_)) return false;
  if (beam_.early_stopping == EarlyStopping::kTrue) return true;
  const double length = beam_.early_stopping == EarlyStopping::kNever && beam_.length_penalty > 0
                            ? static_cast<double>(*params_.max_tokens)
                            : static_cast<double>(length_ + 1);
  const double attainable = best_running / std::pow(length, beam_.length_penalty);
  return group.hypotheses.back().score >= attainable;
}

BeamStep BeamSearch::Advance(absl::Span<const SampledToken> row_results, uint32_t sample_index) {
  BeamStep out;
  std::vector<Beam> next_beams;
  std::vector<int32_t> next_groups;
  // Tokens of the new live beams of the groups processed so far this step (diversity).
  absl::flat_hash_map<int32_t, int32_t> chosen;
  const size_t new_length = length_ + 1;
  const double length_divisor =
      std::pow(static_cast<double>(new_length), static_cast<double>(beam_.length_penalty));
  std::vector<Candidate> candidates;
  for (int32_t g = 0; g < beam_.num_beam_groups; ++g) {
    Group& group = group_state_[static_cast<size_t>(g)];
    if (group.done) continue;
    candidates.clear();
    uint32_t position = 0;
    for (size_t row = 0; row < beams_.size(); ++row) {
      if (groups_[row] != -1 && groups_[row] != g) continue;
      for (const TokenLogprob& t : row_results[row].top_logprobs) {
        if (!std::isfinite(t.logprob)) continue;
        double score = beams_[row].score + static_cast<double>(t.logprob);
        if (beam_.diversity_penalty > 0.0f) {
          const auto it = chosen.find(t.token_id);
          if (it != chosen.end()) {
            score -= static_cast<double>(beam_.diversity_penalty) * it->second;
          }
        }
        candidates.push_back({score, static_cast<uint32_t>(row), position, t.token_id, t.logprob});
      }
      ++position;
    }
    Rank(candidates, keep_, sample_index, static_cast<uint32_t>(g));

    const size_t group_first = next_beams.size();
    double best_running = -std::numeric_limits<double>::infinity();
    for (size_t rank = 0; rank < candidates.size(); ++rank) {
      const Candidate& c = candidates[rank];
      const std::vector<int32_t>& history = beams_[c.parent].output;
      const Finish finish = CheckFinish(params_, history, c.token);
      if (finish.reason != FinishReason::kNone) {
        // Only the S best continuations may finish (HF: the others exist so that S go on).
        if (rank >= static_cast<size_t>(group_size_)) continue;
        BeamHypothesis h;
        h.token_ids.reserve(new_length);
        h.token_ids = history;
        h.token_ids.push_back(c.token);
        h.sum_logprobs = c.score;
        h.score = c.score / length_divisor;
        h.finish_reason = finish.reason;
        h.stop_token_id = finish.stop_token_id;
        h.stop_sequence_index = finish.stop_sequence_index;
        AddHypothesis(group, std::move(h));
        continue;
      }
      if (next_beams.size() == group_first) best_running = c.score;
      Beam b;
      b.output.reserve(new_length);
      b.output = history;
      b.output.push_back(c.token);
      b.score = c.score;
      next_beams.push_back(std::move(b));
      next_groups.push_back(g);
      out.beams.push_back({c.parent, c.token, c.logprob, c.score});
      if (next_beams.size() - group_first == static_cast<size_t>(group_size_)) break;
    }
    for (size_t i = group_first; i < next_beams.size(); ++i) ++chosen[next_beams[i].output.back()];
    group.done = GroupDone(group, best_running);
    if (group.done) {  // its live beams end here
      next_beams.resize(group_first);
      next_groups.resize(group_first);
      out.beams.resize(group_first);
    }
  }
  beams_ = std::move(next_beams);
  groups_ = std::move(next_groups);
  length_ = new_length;
  finished_ = std::all_of(group_state_.begin(), group_state_.end(),
                          [](const Group& group) { return group.done; });
  if (!finished_) return out;

  out.finished = true;
  for (const Group& group : group_state_) {
    out.hypotheses.insert(out.hypotheses.end(), group.hypotheses.begin(), group.hypotheses.end());
  }
  std::stable_sort(
      out.hypotheses.begin(), out.hypotheses.end(),
      [](const BeamHypothesis& a, const BeamHypothesis& b) { return a.score > b.score; });
  if (out.hypotheses.size() > static_cast<size_t>(beam_.num_return_sequences)) {
    out.hypotheses.resize(static_cast<size_t>(beam_.num_return_sequences));
  }
  if (!out.hypotheses.empty()) out.finish_reason = out.hypotheses.front().finish_reason;
  return out;
}

}  // namespace tokensampler
