// Fuzz target: the core pipeline with arbitrary parameters and logits (NaN, ±Inf, ±0, denormals,
// ±FLT_MAX, raw bits; fp32, bf16 and fp16), histories with out-of-range ids, mirostat μ and fork
// sample indexes. Parameters that fail ValidateParams must fail with INVALID_ARGUMENT naming a
// field; valid ones run through the fast Sampler (in a 1- or 2-thread arena, so rows are split
// over threads too) twice and through the ReferenceSampler, which must all agree exactly — the
// same error, or the same tokens, logprobs, top lists, finish reasons and μ, bit for bit.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "core/params.h"
#include "core/reference.h"
#include "core/sampler.h"
#include "core/tensor.h"
#include "oneapi/tbb/task_arena.h"
#include "tests/fuzz/fuzz_core.h"
#include "tests/fuzz/fuzz_support.h"

namespace tokensampler::fuzzing {
namespace {

void Run(FuzzInput& in) {
  // Mostly small vocabularies (fast executions); sometimes large enough for the SIMD blocks, the
  // sampled pivots (≥ 8192 tokens) and rows split over threads (≥ 2 blocks of 4096).
  const int32_t vocab = in.Percent(85) ? in.IntegralInRange<int32_t>(1, 600)
                                       : in.IntegralInRange<int32_t>(600, 20000);
  const int rows = in.IntegralInRange(1, 3);
  const DType dtype = in.OneOf({DType::kFloat32, DType::kBFloat16, DType::kFloat16});
  const int threads = in.IntegralInRange(1, 2);

  std::vector<SamplingParams> params(static_cast<size_t>(rows));
  std::vector<std::vector<int32_t>> prompts(params.size()), outputs(params.size());
  std::vector<RowRequest> requests(params.size());
  for (size_t r = 0; r < params.size(); ++r) {
    params[r] = FuzzParams(in, vocab);
    const absl::Status valid = ValidateParams(params[r], vocab);
    if (!valid.ok()) {
      FUZZ_CHECK(valid.code() == absl::StatusCode::kInvalidArgument && !valid.message().empty(),
                 "ValidateParams: %s", valid.ToString().c_str());
      return;  // the service answers this row's error before any sampling
    }
    prompts[r] = FuzzTokens(in, vocab, 12);
    outputs[r] = FuzzTokens(in, vocab, 12);
    RowRequest& req = requests[r];
    req.params = &params[r];
    req.prompt_token_ids = prompts[r];
    req.output_token_ids = outputs[r];
    if (in.Percent(20)) req.mirostat_mu = in.Float();
    req.first_sample_index = in.Percent(80) ? 0 : in.Integral<uint32_t>();
  }
  const std::vector<uint8_t> bytes = FuzzLogits(in, dtype, rows, vocab);
  absl::StatusOr<LogitsView> view =
      LogitsView::Create(dtype, static_cast<uint32_t>(rows), static_cast<uint32_t>(vocab), bytes);
  FUZZ_CHECK(view.ok(), "LogitsView::Create: %s", view.status().ToString().c_str());

  // The fast sampler runs the batch twice: the second run finds the scratch the first one left
  // (a stale buffer would show as a difference). Its per-thread scratch lives in oneTBB's
  // allocator, which LeakSanitizer does not scan, so the sampler is made per input and destroyed
  // (a sampler kept across inputs would look like a leak).
  const Sampler fast;
  const ReferenceSampler reference;
  absl::StatusOr<std::vector<SampledToken>> got, again;
  tbb::task_arena arena(threads);
  arena.execute([&] {
    got = fast.Run(*view, requests);
    again = fast.Run(*view, requests);
  });
  const absl::StatusOr<std::vector<SampledToken>> want = reference.Run(*view, requests);
  CheckSameResults(again, got);
  CheckSameResults(got, want);
  if (got.ok()) {
    CheckResultInvariants(*got, vocab);
  } else {
    FUZZ_CHECK(got.status().code() == absl::StatusCode::kInvalidArgument, "unexpected error %s",
               got.status().ToString().c_str());
  }
}

}  // namespace
}  // namespace tokensampler::fuzzing

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  tokensampler::fuzzing::FuzzInput in(data, size);
  tokensampler::fuzzing::Run(in);
  return 0;
}
