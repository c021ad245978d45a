// Step 1 of the pipeline: masks and biases.
#include <algorithm>

#include "core/stages.h"

namespace tokensampler {
namespace {

bool EndsWith(absl::Span<const int32_t> seq, absl::Span<const int32_t> suffix) {
  return suffix.size() <= seq.size() &&
         std::equal(suffix.begin(), suffix.end(),
                    seq.end() - static_cast<ptrdiff_t>(suffix.size()));
}

}  // namespace

void MaskAndBias::Apply(absl::Span<float> logits, RowScratch& scratch) const {
  const SamplingParams& p = params;
  if (!p.allowed_token_ids.empty()) {
    for (int32_t id : p.allowed_token_ids) scratch.marks[static_cast<size_t>(id)] = 1;
    for (size_t i = 0; i < logits.size(); ++i) {
      if (!scratch.marks[i]) logits[i] = kNegInf;
    }
    for (int32_t id : p.allowed_token_ids) scratch.marks[static_cast<size_t>(id)] = 0;
  }
  // vLLM: a one-token bad word is always banned; a longer one bans its last token when the
  // output ends with the rest.
  for (const TokenSequence& word : p.bad_words) {
    const auto prefix = absl::MakeConstSpan(word).subspan(0, word.size() - 1);
    if (EndsWith(output, prefix)) logits[static_cast<size_t>(word.back())] = kNegInf;
  }
  if (static_cast<int64_t>(output.size()) < p.min_tokens) {
    for (int32_t id : p.stop_token_ids) logits[static_cast<size_t>(id)] = kNegInf;
    if (!p.ignore_eos) {
      for (int32_t id : p.eos_token_ids) logits[static_cast<size_t>(id)] = kNegInf;
    }
  }
  if (!p.token_bitmask.empty()) {
    const auto* mask = reinterpret_cast<const uint8_t*>(p.token_bitmask.data());
    for (size_t i = 0; i < logits.size(); ++i) {
      if (((mask[i >> 3] >> (i & 7)) & 1u) == 0) logits[i] = kNegInf;
    }
  }
  for (const auto& [id, bias] : p.logit_bias) {
    float& l = logits[static_cast<size_t>(id)];
    l = bias == kNegInf ? kNegInf : l + bias;  // assignment: -inf + +inf would be NaN
  }
}

}  // namespace tokensampler
