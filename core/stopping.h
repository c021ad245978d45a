// Internal: finish reasons (EOS, stop ids, stop sequences, max_tokens) for a drawn token.
// Pure functions: thread-safe.
#ifndef TOKENSAMPLER_CORE_STOPPING_H_
#define TOKENSAMPLER_CORE_STOPPING_H_

#include <cstdint>
#include <optional>

#include "absl/types/span.h"
#include "core/params.h"
#include "core/sampler.h"

namespace tokensampler {

struct Finish {
  FinishReason reason = FinishReason::kNone;
  std::optional<int32_t> stop_token_id;
  std::optional<uint32_t> stop_sequence_index;
};

// Why the sequence `output ++ [token]` ends, if it does. Nothing ends before min_tokens (vLLM);
// EOS (unless ignore_eos) wins over STOP, and both win over LENGTH. Among stop sequences the
// lowest index that `output ++ [token]` ends with is reported.
Finish CheckFinish(const SamplingParams& params, absl::Span<const int32_t> output, int32_t token);

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_STOPPING_H_
