// ReferenceSampler: the pipeline written the straightforward way (a full sort where a stage
// needs an order, one pass per question, scalar), with the same semantics as Sampler. It is the
// oracle of the tests (the fast Sampler must give the same tokens, kept sets and logprobs) and
// the baseline of tokensampler-bench --reference.
//
// Thread-compatible (its scratch is shared between calls): one thread at a time.
#ifndef TOKENSAMPLER_CORE_REFERENCE_H_
#define TOKENSAMPLER_CORE_REFERENCE_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/sampler.h"
#include "core/tensor.h"

namespace tokensampler {

class ReferenceSampler {
 public:
  ReferenceSampler();
  ~ReferenceSampler();
  ReferenceSampler(const ReferenceSampler&) = delete;
  ReferenceSampler& operator=(const ReferenceSampler&) = delete;

  // As Sampler::Run (same results and errors), serially.
  absl::StatusOr<std::vector<SampledToken>> Run(const LogitsView& logits,
                                                absl::Span<const RowRequest> rows) const;

 private:
  struct Scratch;
  std::unique_ptr<Scratch> scratch_;
};

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_REFERENCE_H_
