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
absl::Status NameSequence(const absl::Status& status, absl::Span<const uint64_t> ids) {
  absl::string_view message = status.message();
  size_t row = 0;
  if (absl::ConsumePrefix(&message, "rows[")) {
    const size_t close = message.find(']');
    if (close != absl::string_view::npos && absl::SimpleAtoi(message.substr(0, close), &row) &&
        row < ids.size()) {
      return absl::Status(status.code(), absl::StrCat("sequence ", ids[row], ", rows[",
                                                      status.message().substr(5)));
    }
  }
  return status;
}

}  // namespace

absl::Status SequenceTable::CheckCapacity(int64_t more) const {
  if (size() + more > limits_.max_sequences) {
    return absl::ResourceExhaustedError(absl::StrCat("the session would hold ", size() + more,
                                                     " sequences; the limit is ",
                                                     limits_.max_sequences));
  }
  return absl::OkStatus();
}

absl::Status SequenceTable::Add(uint64_t id, SamplingParams params, std::vector<int32_t> prompt) {
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
  RETURN_IF_ERROR(CheckCapacity(1));
  Sequence& seq = sequences_[id];
  seq.params = std::move(params);
  seq.prompt = std::move(prompt);
  seq.family_samples = std::make_shared<uint32_t>(1);
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
  RETURN_IF_ERROR(CheckCapacity(static_cast<int64_t>(children.size())));
  const Sequence source = it->second;  // copy: inserting may rehash
  for (uint64_t child : children) {
    Sequence& seq = sequences_[child];
    seq = source;
    seq.sample_index = (*source.family_samples)++;
  }
  return absl::OkStatus();
}

absl::Status SequenceTable::Release(uint64_t id) {
  if (sequences_.erase(id) == 0) {
    return absl::NotFoundError(absl::StrCat("sequence ", id, " is not in this session"));
  }
  return absl::OkStatus();
}

size_t StepRows(const Drafts* drafts) { return drafts == nullptr ? 1 : TargetRows(*drafts); }

absl::StatusOr<std::vector<SequenceTable::Sequence*>> SequenceTable::StepSequences(
    const LogitsView& logits, absl::Span<const uint64_t> ids,
    absl::Span<const Drafts* const> drafts) {
  size_t needed = 0;
  std::string example;  // the first sequence that takes more than one row
  for (size_t i = 0; i < ids.size(); ++i) {
    const size_t rows = StepRows(drafts[i]);
    needed += rows;
    if (rows > 1 && example.empty()) {
      example = absl::StrCat(" (sequence ", ids[i], ": ", rows - 1, " drafts)");
    }
  }
  if (needed != static_cast<size_t>(logits.rows())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "logits.rows is ", logits.rows(), " but the stepped sequences need ", needed, example));
  }
  std::vector<Sequence*> rows;
  rows.reserve(ids.size());
  absl::flat_hash_set<uint64_t> seen;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (!seen.insert(ids[i]).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("step.sequence_ids lists sequence ", ids[i], " twice"));
    }
    const auto it = sequences_.find(ids[i]);
    if (it == sequences_.end()) {
      return absl::NotFoundError(absl::StrCat(
          "sequence ", ids[i], " is not in this session (never added, released or finished)"));
    }
    Sequence& seq = it->second;
    if (seq.validated_vocab != logits.vocab_size()) {
      if (absl::Status s = ValidateParams(seq.params, logits.vocab_size()); !s.ok()) {
        return absl::Status(s.code(), absl::StrCat("sequence ", ids[i], ": params.", s.message()));
      }
    }
    // Up to one token per row the sequence takes is appended.
    if (static_cast<int64_t>(seq.prompt.size() + seq.output.size() + StepRows(drafts[i])) >
        limits_.max_history_tokens) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "sequence ", ids[i], " would exceed ", limits_.max_history_tokens, " history tokens"));
    }
    rows.push_back(&seq);
  }
  return rows;
}

absl::StatusOr<std::vector<SampledToken>> SequenceTable::Step(const Sampler& sampler,
                                                              const LogitsView& logits,
                                                              absl::Span<const uint64_t> ids,
                                                              const std::atomic<bool>* cancelled) {
  const std::vector<const Drafts*> no_drafts(ids.size(), nullptr);
  ASSIGN_OR_RETURN(const std::vector<Sequence*> rows, StepSequences(logits, ids, no_drafts));
  std::vector<RowRequest> requests;
  requests.reserve(rows.size());
  for (const Sequence* seq : rows) {
    requests.push_back(
        {&seq->params, seq->prompt, seq->output, seq->mirostat_mu, seq->sample_index});
  }
  absl::StatusOr<std::vector<SampledToken>> results = sampler.Run(logits, requests, cancelled);
  if (!results.ok()) return NameSequence(results.status(), ids);
  for (size_t i = 0; i < rows.size(); ++i) {
    Sequence& seq = *rows[i];
    const SampledToken& token = (*results)[i];
    seq.validated_vocab = logits.vocab_size();
    seq.output.push_back(token.token_id);
    if (token.mirostat_mu.has_value()) seq.mirostat_mu = token.mirostat_mu;
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    if ((*results)[i].finish_reason != FinishReason::kNone) sequences_.erase(ids[i]);
  }
  return results;
}

absl::StatusOr<std::vector<VerifyResult>> SequenceTable::StepWithDrafts(
    const Verifier& verifier, const LogitsView& logits, absl::Span<const uint64_t> ids,
    absl::Span<const SequenceDrafts> drafts, const std::atomic<bool>* cancelled) {
  std::vector<const Drafts*> by_row(ids.size(), nullptr);
  for (size_t d = 0; d < drafts.size(); ++d) {
    const auto it = std::find(ids.begin(), ids.end(), drafts[d].sequence_id);
    if (it == ids.end()) {
      return absl::InvalidArgumentError(absl::StrCat("drafts[", d, "].sequence_id ",
                                                     drafts[d].sequence_id,
                                                     " is not stepped (not in step.sequence_ids)"));
    }
    const Drafts*& slot = by_row[static_cast<size_t>(it - ids.begin())];
    if (slot != nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "drafts[", d, "]: sequence ", drafts[d].sequence_id, " has more than one drafts entry"));
    }
    if (absl::Status s = ValidateDrafts(drafts[d].drafts, logits.vocab_size()); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("drafts[", d, "].", s.message()));
    }
    slot = &drafts[d].drafts;
  }
  ASSIGN_OR_RETURN(const std::vector<Sequence*> rows, StepSequences(logits, ids, by_row));
  std::vector<VerifyRowRequest> requests;
  requests.reserve(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    const Sequence& seq = *rows[i];
    VerifyRowRequest& request = requests.emplace_back();
    request.row = {&seq.params, seq.prompt, seq.output, seq.mirostat_mu, seq.sample_index};
    if (by_row[i] != nullptr) request.drafts = *by_row[i];
  }
  absl::StatusOr<std::vector<VerifyResult>> results = verifier.Run(logits, requests, cancelled);
  if (!results.ok()) return NameSequence(results.status(), ids);
  for (size_t i = 0; i < rows.size(); ++i) {
    Sequence& seq = *rows[i];
    seq.validated_vocab = logits.vocab_size();
    for (const SampledToken& token : (*results)[i].tokens) {
      seq.output.push_back(token.token_id);
      if (token.mirostat_mu.has_value()) seq.mirostat_mu = token.mirostat_mu;
    }
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    if ((*results)[i].tokens.back().finish_reason != FinishReason::kNone) sequences_.erase(ids[i]);
  }
  return results;
}

}  // namespace tokensampler
