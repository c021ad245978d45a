// Step 2 of the pipeline: repetition / frequency / presence, DRY, no-repeat-ngram.
#include <algorithm>
#include <cmath>

#include "core/stages.h"

namespace tokensampler {
namespace {

// prompt ++ output as one sequence, without copying.
class History {
 public:
  History(absl::Span<const int32_t> prompt, absl::Span<const int32_t> output)
      : prompt_(prompt), output_(output) {}
  size_t size() const { return prompt_.size() + output_.size(); }
  int32_t operator[](size_t i) const {
    return i < prompt_.size() ? prompt_[i] : output_[i - prompt_.size()];
  }

 private:
  absl::Span<const int32_t> prompt_;
  absl::Span<const int32_t> output_;
};

}  // namespace

void Penalties::Apply(absl::Span<float> logits, RowScratch& scratch) const {
  const SamplingParams& p = params;
  const bool repetition = p.repetition_penalty != 1.0f;
  const bool additive = p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f;
  if (!repetition && !additive) return;

  // The window: the last penalty_last_n tokens of prompt ++ output (0 = all of them).
  const size_t total = prompt.size() + output.size();
  const size_t window =
      p.penalty_last_n > 0 ? std::min(total, static_cast<size_t>(p.penalty_last_n)) : total;
  const size_t start = total - window;
  const auto window_prompt = prompt.subspan(std::min(start, prompt.size()));
  const auto window_output = output.subspan(start > prompt.size() ? start - prompt.size() : 0);

  // counts[t] = occurrences of t in the window's output part; marks[t] = t seen in the window.
  std::vector<int32_t>& counts = scratch.counts;
  std::vector<uint8_t>& marks = scratch.marks;
  for (int32_t t : window_output) ++counts[static_cast<size_t>(t)];
  const auto apply_once = [&](int32_t t) {
    const size_t i = static_cast<size_t>(t);
    if (marks[i]) return;
    marks[i] = 1;
    float& l = logits[i];
    if (repetition) l = l > 0.0f ? l / p.repetition_penalty : l * p.repetition_penalty;
    if (counts[i] > 0) {
      l -= p.frequency_penalty * static_cast<float>(counts[i]);
      l -= p.presence_penalty;
    }
  };
  if (repetition) {
    for (int32_t t : window_prompt) apply_once(t);
  }
  for (int32_t t : window_output) apply_once(t);
  for (int32_t t : window_prompt) marks[static_cast<size_t>(t)] = 0;
  for (int32_t t : window_output) {
    marks[static_cast<size_t>(t)] = 0;
    counts[static_cast<size_t>(t)] = 0;
  }
}

// Follows llama.cpp's llama_sampler_dry_apply: (1) the last sequence breaker limits how far back
// a repetition may reach, (2) a Z-function over the reversed window gives, for each earlier
// position, the length of the suffix of the context that also ends there, (3) the token that
// followed each such occurrence would extend the repetition, (4) it is penalised by
// multiplier · base^(length − allowed_length).
void Dry::Apply(absl::Span<float> logits, RowScratch& scratch) const {
  const SamplingParams& p = params;
  if (p.dry_multiplier == 0.0f || p.dry_penalty_last_n == 0) return;
  const History history(prompt, output);
  const size_t total = history.size();
  const size_t n =
      p.dry_penalty_last_n < 0 ? total : std::min(total, static_cast<size_t>(p.dry_penalty_last_n));
  const size_t allowed = static_cast<size_t>(p.dry_allowed_length);
  if (n <= allowed) return;
  const size_t start = total - n;
  // rat(i): the i-th token from the end of the window (0 = the last one).
  const auto rat = [&](size_t i) { return history[start + n - 1 - i]; };

  // (1) Sequence breakers: the nearest one (from the end) caps the repetition length.
  size_t rep_limit = n;
  for (size_t i = 0; i < n; ++i) {
    const int32_t token = rat(i);
    ptrdiff_t longest = -1;
    for (const TokenSequence& breaker : p.dry_sequence_breakers) {
      if (breaker[0] != token) continue;
      const size_t tail = breaker.size() - 1;
      if (static_cast<ptrdiff_t>(tail) <= longest || tail > i) continue;
      bool match = true;
      for (size_t off = 0; off < tail && match; ++off) match = breaker[1 + off] == rat(i - off - 1);
      if (match) longest = static_cast<ptrdiff_t>(tail);
    }
    if (longest >= 0) {
      rep_limit = i - static_cast<size_t>(longest);
      break;
    }
  }
  if (rep_limit < allowed) return;

  // (2) Z-function of the reversed window: z[k] = length of the common prefix of rat(0…) and
  // rat(k…), i.e. how many tokens before position n-1-k repeat the end of the context.
  std::vector<int32_t>& z = scratch.ints;
  z.assign(n, 0);
  for (size_t k = 1, left = 0, right = 0; k < n; ++k) {
    size_t len = 0;
    if (k < right) len = std::min(right - k, static_cast<size_t>(z[k - left]));
    while (k + len < n && rat(len) == rat(k + len)) ++len;
    z[k] = static_cast<int32_t>(len);
    if (k + len > right) {
      left = k;
      right = k + len;
    }
  }

  // (3) For each occurrence ending at window position i = n-1-k, the token at i+1 would extend
  // a repetition of length min(z[k], rep_limit). Keep the longest per token in `counts`.
  std::vector<int32_t>& longest = scratch.counts;
  std::vector<int32_t>& touched = scratch.touched;
  touched.clear();
  for (size_t k = 1; k < n; ++k) {
    const size_t len = std::min(static_cast<size_t>(z[k]), rep_limit);
    if (len < allowed) continue;
    const size_t token = static_cast<size_t>(history[start + n - k]);  // position (n-1-k) + 1
    if (longest[token] == 0) touched.push_back(static_cast<int32_t>(token));
    longest[token] = std::max(longest[token], static_cast<int32_t>(len) + 1);  // +1: 0 = unset
  }

  // (4) Penalise, except single-token breakers; the exponent is capped so pow() stays finite.
  constexpr float kFloatMaxLog = 88.7228391f;
  int32_t max_exponent = 0;
  if (p.dry_base > 1.000001f) {
    max_exponent = static_cast<int32_t>(kFloatMaxLog / std::log(p.dry_base));
  }
  for (int32_t token : touched) {
    const size_t t = static_cast<size_t>(token);
    const int32_t len = longest[t] - 1;
    longest[t] = 0;
    const bool single_breaker =
        std::any_of(p.dry_sequence_breakers.begin(), p.dry_sequence_breakers.end(),
                    [&](const TokenSequence& b) { return b.size() == 1 && b[0] == token; });
    if (single_breaker) continue;
    int32_t exponent = len - p.dry_allowed_length;
    if (max_exponent > 0 && exponent > max_exponent) exponent = max_exponent;
    logits[t] -= p.dry_multiplier * std::pow(p.dry_base, static_cast<float>(exponent));
  }
}

void NoRepeatNgram::Apply(absl::Span<float> logits) const {
  if (size <= 0) return;
  const History history(prompt, output);
  const size_t len = history.size();
  const size_t n = static_cast<size_t>(size);
  if (len + 1 < n) return;
  // Every earlier n-gram whose first n-1 tokens equal the last n-1 tokens bans its last token.
  const size_t prefix_start = len + 1 - n;
  for (size_t start = 0; start + n <= len; ++start) {
    bool match = true;
    for (size_t j = 0; j + 1 < n && match; ++j) {
      match = history[start + j] == history[prefix_start + j];
    }
    if (match) logits[static_cast<size_t>(history[start + n - 1])] = kNegInf;
  }
}

}  // namespace tokensampler
