#include "core/session.h"

#include <algorithm>
#include <limits>
#include <string>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "core/status_macros.h"

namespace tokensampler {

namespace {

// Row-level errors of the Sampler start with "rows[i]"; in a session, name the sequence too.
// `owners[i]` is the sequence of row i.
absl::Status NameSequence(const absl::Status& status, absl::Span<const uint64_t> owners) {
  absl::string_view message = status.message();
  size_t row = 0;
  if (absl::ConsumePrefix(&message, "rows[")) {
    const size_t close = message.find(']');
    if (close != absl::string_view::npos && absl::SimpleAtoi(message.substr(0, close), &row) &&
        row < owners.size()) {
      return absl::Status(status.code(), absl::StrCat("sequence ", owners[row], ", rows[",
                                                      status.message().substr(5)));
    }
  }
  return status;
}

}  // namespace

size_t SequenceTable::StepRows(const Sequence* seq, const Drafts* drafts) {
  if (seq != nullptr && seq->beam.has_value()) return static_cast<size_t>(seq->beam->rows());
  return drafts == nullptr ? 1 : TargetRows(*drafts);
}

int64_t SequenceTable::UnitsOf(const Sequence& seq) {
  return seq.beam.has_value() ? seq.beam->beam_params().beam_width : 1;
}

absl::Status SequenceTable::CheckCapacity(int64_t more) const {
  if (units_ + more > limits_.max_sequences) {
    return absl::ResourceExhaustedError(
        absl::StrCat("the session would hold ", units_ + more, " sequences; the limit is ",
                     limits_.max_sequences, " (a beam search counts as beam_width sequences)"));
  }
  return absl::OkStatus();
}

void SequenceTable::Erase(uint64_t id) {
  const auto it = sequences_.find(id);
  if (it == sequences_.end()) return;
  units_ -= UnitsOf(it->second);
  sequences_.erase(it);
}

absl::Status SequenceTable::Add(uint64_t id, SamplingParams params, std::vector<int32_t> prompt,
                                std::optional<BeamParams> beam) {
  if (sequences_.contains(id)) {
    return absl::AlreadyExistsError(absl::StrCat("sequence ", id, " already exists"));
  }
  // Token ids are checked against the real vocabulary at the first step; until then the bound
  // is the largest vocabulary the params allow (a bitmask fixes it to within 8 tokens).
  const int32_t vocab_bound =
      params.token_bitmask.empty()
          ? std::numeric_limits<int32_t>::max()
          : static_cast<int32_t>(std::min<size_t>(params.token_bitmask.size() * 8,
                                                  std::numeric_limits<int32_t>::max()));
  RETURN_IF_ERROR(ValidateParams(params, vocab_bound));
  if (params.n != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "n must be 1 in a session (fork the sequence for more samples), got ", params.n));
  }
  if (static_cast<int64_t>(prompt.size()) > limits_.max_history_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat("prompt_token_ids has ", prompt.size(),
                                                     " tokens; the limit is ",
                                                     limits_.max_history_tokens));
  }
  if (beam.has_value()) {
    RETURN_IF_ERROR(ValidateBeamParams(*beam, params, limits_.max_beam_width));
  }
  RETURN_IF_ERROR(CheckCapacity(beam.has_value() ? beam->beam_width : 1));
  Sequence& seq = sequences_[id];
  if (beam.has_value()) {
    const uint64_t seed =
        params.seed.has_value() ? *params.seed : absl::Uniform<uint64_t>(entropy_);
    seq.beam.emplace(*beam, params, seed);
  }
  seq.params = std::move(params);
  seq.prompt = std::move(prompt);
  seq.family_samples = std::make_shared<uint32_t>(1);
  units_ += UnitsOf(seq);
  return absl::OkStatus();
}

absl::Status SequenceTable::Fork(uint64_t parent, absl::Span<const uint64_t> children) {
  const auto it = sequences_.find(parent);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("sequence ", parent, " is not in this session"));
  }
  absl::flat_hash_set<uint64_t> seen;
  for (uint64_t child : children) {
    if (child == parent || !seen.insert(child).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("fork of ", parent, " lists child ", child, " twice or as the parent"));
    }
    if (sequences_.contains(child)) {
      return absl::AlreadyExistsError(absl::StrCat("sequence ", child, " already exists"));
    }
  }
  RETURN_IF_ERROR(CheckCapacity(static_cast<int64_t>(children.size()) * UnitsOf(it->second)));
  const Sequence source = it->second;  // copy: inserting may rehash
  for (uint64_t child : children) {
    Sequence& seq = sequences_[child];
    seq = source;
    seq.sample_index = (*source.family_samples)++;
    units_ += UnitsOf(seq);
  }
  return absl::OkStatus();
}

absl::Status SequenceTable::Release(uint64_t id) {
  if (!sequences_.contains(id)) {
    return absl::NotFoundError(absl::StrCat("sequence ", id, " is not in this session"));
  }
  Erase(id);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<SequenceTable::Sequence*>> SequenceTable::StepSequences(
    const LogitsView& logits, absl::Span<const uint64_t> ids,
    absl::Span<const Drafts* const> drafts) {
  // The row count is checked before the ids are (an unknown id counts as a plain sequence), so
  // that a malformed step is INVALID_ARGUMENT whatever its ids.
  std::vector<Sequence*> stepped;  // nullptr for an unknown id
  stepped.reserve(ids.size());
  absl::flat_hash_set<uint64_t> seen;
  size_t needed = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!seen.insert(ids[i]).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("step.sequence_ids lists sequence ", ids[i], " twice"));
    }
    const auto it = sequences_.find(ids[i]);
    stepped.push_back(it == sequences_.end() ? nullptr : &it->second);
    needed += StepRows(stepped.back(), drafts[i]);
  }
  if (needed != static_cast<size_t>(logits.rows())) {
    // Name the sequences that do not take one plain row (a few of them).
    constexpr int kNamed = 4;
    std::string detail;
    int named = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      const bool beam = stepped[i] != nullptr && stepped[i]->beam.has_value();
      if (!beam && drafts[i] == nullptr) continue;
      if (named++ == kNamed) {
        absl::StrAppend(&detail, ", ...");
        break;
      }
      const size_t rows = StepRows(stepped[i], drafts[i]);
      const size_t count = beam ? rows : rows - 1;
      absl::StrAppend(&detail, named == 1 ? " (" : ", ", "sequence ", ids[i], ": ", count,
                      beam ? " live beam" : " draft", count == 1 ? "" : "s");
    }
    if (!detail.empty()) detail += ")";
    return absl::InvalidArgumentError(absl::StrCat(
        "logits.rows is ", logits.rows(), " but the stepped sequences need ", needed, detail));
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    if (stepped[i] == nullptr) {
      return absl::NotFoundError(absl::StrCat(
          "sequence ", ids[i], " is not in this session (never added, released or finished)"));
    }
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    Sequence& seq = *stepped[i];
    if (seq.validated_vocab != logits.vocab_size()) {
      if (absl::Status s = ValidateParams(seq.params, logits.vocab_size()); !s.ok()) {
        return absl::Status(s.code(), absl::StrCat("sequence ", ids[i], ": params.", s.message()));
      }
    }
    // Up to one token per row the sequence takes is appended (per beam for a beam search).
    const size_t history = seq.beam.has_value()
                               ? seq.beam->NextHistoryTokens(seq.prompt.size())
                               : seq.prompt.size() + seq.output.size() + StepRows(&seq, drafts[i]);
    if (static_cast<int64_t>(history) > limits_.max_history_tokens) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "sequence ", ids[i], " would exceed ", limits_.max_history_tokens, " history tokens"));
    }
  }
  return stepped;
}

absl::StatusOr<std::vector<SequenceStep>> SequenceTable::Step(const Sampler& sampler,
                                                              const LogitsView& logits,
                                                              absl::Span<const uint64_t> ids,
                                                              const std::atomic<bool>* cancelled) {
  const std::vector<const Drafts*> no_drafts(ids.size(), nullptr);
  return Run(&sampler, nullptr, logits, ids, no_drafts, cancelled);
}

absl::StatusOr<std::vector<SequenceStep>> SequenceTable::StepWithDrafts(
    const Verifier& verifier, const LogitsView& logits, absl::Span<const uint64_t> ids,
    absl::Span<const SequenceDrafts> drafts, const std::atomic<bool>* cancelled) {
  std::vector<const Drafts*> by_id(ids.size(), nullptr);
  for (size_t d = 0; d < drafts.size(); ++d) {
    const uint64_t id = drafts[d].sequence_id;
    const auto it = std::find(ids.begin(), ids.end(), id);
    if (it == ids.end()) {
      return absl::InvalidArgumentError(absl::StrCat("drafts[", d, "].sequence_id ", id,
                                                     " is not stepped (not in step.sequence_ids)"));
    }
    const Drafts*& slot = by_id[static_cast<size_t>(it - ids.begin())];
    if (slot != nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("drafts[", d, "]: sequence ", id, " has more than one drafts entry"));
    }
    // A beam search scores every continuation of every live beam; a draft chain has no place in
    // that, so drafts are for plain sequences only.
    if (const auto seq = sequences_.find(id);
        seq != sequences_.end() && seq->second.beam.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("drafts[", d, "]: sequence ", id,
                       " is a beam search; drafts apply to plain sequences only"));
    }
    if (absl::Status s = ValidateDrafts(drafts[d].drafts, logits.vocab_size()); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("drafts[", d, "].", s.message()));
    }
    slot = &drafts[d].drafts;
  }
  return Run(nullptr, &verifier, logits, ids, by_id, cancelled);
}

absl::StatusOr<std::vector<SequenceStep>> SequenceTable::Run(const Sampler* sampler,
                                                             const Verifier* verifier,
                                                             const LogitsView& logits,
                                                             absl::Span<const uint64_t> ids,
                                                             absl::Span<const Drafts* const> drafts,
                                                             const std::atomic<bool>* cancelled) {
  ASSIGN_OR_RETURN(const std::vector<Sequence*> stepped, StepSequences(logits, ids, drafts));
  // One request per plain sequence (with its drafts, if any) and one per live beam, in the order
  // of the rows.
  std::vector<RowRequest> requests;
  std::vector<uint64_t> owners;  // the sequence of each request
  for (size_t i = 0; i < ids.size(); ++i) {
    const Sequence& seq = *stepped[i];
    if (seq.beam.has_value()) {
      seq.beam->AppendRows(seq.prompt, requests);
    } else {
      requests.push_back({&seq.params, seq.prompt, seq.output, seq.mirostat_mu, seq.sample_index});
    }
    owners.resize(requests.size(), ids[i]);
  }
  // The whole step is one parallel run: the Sampler's, or with drafts the Verifier's, which gives
  // a request without drafts exactly the Sampler's token (so beams and plain rows are unchanged).
  std::vector<SampledToken> sampled;   // per request, without a verifier
  std::vector<VerifyResult> verified;  // per request, with one
  if (verifier != nullptr) {
    std::vector<VerifyRowRequest> verify_requests(requests.size());
    size_t r = 0;
    for (size_t i = 0; i < ids.size(); ++i) {
      const size_t n = StepRows(stepped[i], nullptr);  // 1, or one per live beam
      for (size_t b = 0; b < n; ++b, ++r) {
        verify_requests[r].row = requests[r];
        if (drafts[i] != nullptr) verify_requests[r].drafts = *drafts[i];
      }
    }
    absl::StatusOr<std::vector<VerifyResult>> results =
        verifier->Run(logits, verify_requests, cancelled);
    if (!results.ok()) return NameSequence(results.status(), owners);
    verified = *std::move(results);
  } else {
    absl::StatusOr<std::vector<SampledToken>> results = sampler->Run(logits, requests, cancelled);
    if (!results.ok()) return NameSequence(results.status(), owners);
    sampled = *std::move(results);
  }
  std::vector<SequenceStep> out(ids.size());
  std::vector<SampledToken> beam_tokens;
  size_t r = 0;  // the first request of sequence i
  for (size_t i = 0; i < ids.size(); ++i) {
    Sequence& seq = *stepped[i];
    SequenceStep& result = out[i];
    result.sequence_id = ids[i];
    seq.validated_vocab = logits.vocab_size();
    if (seq.beam.has_value()) {
      const size_t rows = StepRows(&seq, nullptr);
      absl::Span<const SampledToken> tokens;
      if (verifier != nullptr) {
        beam_tokens.clear();
        for (size_t b = 0; b < rows; ++b) beam_tokens.push_back(verified[r + b].tokens.front());
        tokens = beam_tokens;
      } else {
        tokens = absl::MakeConstSpan(sampled).subspan(r, rows);
      }
      result.beam = seq.beam->Advance(tokens, seq.sample_index);
      result.token.finish_reason = result.beam->finish_reason;
      r += rows;
      continue;
    }
    if (verifier != nullptr) {
      result.verify = std::move(verified[r]);
      for (const SampledToken& token : result.verify->tokens) {
        seq.output.push_back(token.token_id);
        if (token.mirostat_mu.has_value()) seq.mirostat_mu = token.mirostat_mu;
      }
      result.token = result.verify->tokens.back();
    } else {
      result.token = std::move(sampled[r]);
      seq.output.push_back(result.token.token_id);
      if (result.token.mirostat_mu.has_value()) seq.mirostat_mu = result.token.mirostat_mu;
    }
    ++r;
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    const bool done = out[i].beam.has_value() ? out[i].beam->finished
                                              : out[i].token.finish_reason != FinishReason::kNone;
    if (done) Erase(ids[i]);
  }
  return out;
}

}  // namespace tokensampler
