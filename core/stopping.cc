#include "core/stopping.h"

#include <algorithm>

namespace tokensampler {

Finish CheckFinish(const SamplingParams& p, absl::Span<const int32_t> output, int32_t token) {
  Finish finish;
  const size_t length = output.size() + 1;                        // with the new token
  if (length < static_cast<size_t>(p.min_tokens)) return finish;  // ≤ max_tokens (validated)
  const auto contains = [token](const std::vector<int32_t>& ids) {
    return std::find(ids.begin(), ids.end(), token) != ids.end();
  };
  if (!p.ignore_eos && contains(p.eos_token_ids)) {
    finish.reason = FinishReason::kEos;
    return finish;
  }
  if (contains(p.stop_token_ids)) {
    finish.reason = FinishReason::kStop;
    finish.stop_token_id = token;
    return finish;
  }
  for (size_t i = 0; i < p.stop_token_sequences.size(); ++i) {
    const TokenSequence& seq = p.stop_token_sequences[i];
    if (seq.size() > length || seq.back() != token) continue;
    // The rest of the sequence must be the end of the output.
    if (std::equal(seq.begin(), seq.end() - 1,
                   output.end() - static_cast<ptrdiff_t>(seq.size() - 1))) {
      finish.reason = FinishReason::kStop;
      finish.stop_sequence_index = static_cast<uint32_t>(i);
      return finish;
    }
  }
  if (p.max_tokens.has_value() && length >= static_cast<size_t>(*p.max_tokens)) {
    finish.reason = FinishReason::kLength;
  }
  return finish;
}

}  // namespace tokensampler
