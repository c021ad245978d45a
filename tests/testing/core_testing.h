// Test helpers for core: build a one-row batch, run the real Sampler, read back distributions.
// Thread-compatible.
#ifndef TOKENSAMPLER_TESTS_TESTING_CORE_TESTING_H_
#define TOKENSAMPLER_TESTS_TESTING_CORE_TESTING_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "core/params.h"
#include "core/sampler.h"
#include "core/tensor.h"

namespace tokensampler::testing {

inline std::vector<uint8_t> F32Bytes(const std::vector<float>& values) {
  std::vector<uint8_t> bytes(values.size() * 4);
  // An empty vector's data() may be null, and memcpy from null is undefined even for 0 bytes.
  if (!bytes.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

inline std::vector<uint8_t> Half16Bytes(const std::vector<float>& values, DType dtype) {
  std::vector<uint8_t> bytes(values.size() * 2);
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t h = dtype == DType::kBFloat16 ? FloatToBf16(values[i]) : FloatToFp16(values[i]);
    std::memcpy(bytes.data() + 2 * i, &h, 2);
  }
  return bytes;
}

// Samples one fp32 row with `params` through the real Sampler.
inline absl::StatusOr<std::vector<SampledToken>> SampleRow(
    const std::vector<float>& logits, const SamplingParams& params,
    const std::vector<int32_t>& prompt = {}, const std::vector<int32_t>& output = {},
    std::optional<float> mirostat_mu = std::nullopt) {
  const std::vector<uint8_t> bytes = F32Bytes(logits);
  auto view = LogitsView::Create(DType::kFloat32, 1, static_cast<uint32_t>(logits.size()), bytes);
  if (!view.ok()) return view.status();
  RowRequest row{&params, prompt, output, mirostat_mu};
  Sampler sampler;
  return sampler.Run(*view, {&row, 1});
}

// The distribution the row is sampled from (PROCESSED_LOGPROBS, logprobs = -1), as
// probabilities per token (0 for removed tokens). Fails the test on error.
inline std::vector<double> ProcessedProbs(const std::vector<float>& logits, SamplingParams params,
                                          const std::vector<int32_t>& prompt = {},
                                          const std::vector<int32_t>& output = {}) {
  params.logprobs = -1;
  params.logprobs_mode = LogprobsMode::kProcessedLogprobs;
  if (!params.seed.has_value()) params.seed = 1;
  std::vector<double> probs(logits.size(), 0.0);
  auto result = SampleRow(logits, params, prompt, output);
  if (!result.ok()) return {};
  for (const TokenLogprob& t : (*result)[0].top_logprobs) {
    probs[static_cast<size_t>(t.token_id)] = std::exp(static_cast<double>(t.logprob));
  }
  return probs;
}

// The processed logits of a row at temperature 1 with no truncation (PROCESSED_LOGITS mode):
// the row after steps 1–2 (masks, biases, penalties). Removed tokens are -inf.
inline std::vector<float> ProcessedLogits(const std::vector<float>& logits, SamplingParams params,
                                          const std::vector<int32_t>& prompt = {},
                                          const std::vector<int32_t>& output = {}) {
  params.logprobs = -1;
  params.logprobs_mode = LogprobsMode::kProcessedLogits;
  params.seed = 1;
  std::vector<float> out(logits.size(), -INFINITY);
  auto result = SampleRow(logits, params, prompt, output);
  if (!result.ok()) return {};
  for (const TokenLogprob& t : (*result)[0].top_logprobs) {
    out[static_cast<size_t>(t.token_id)] = t.logprob;
  }
  return out;
}

// Draws `draws` tokens from one row with seeds 0…draws-1 (independent draws) in batches of
// `batch` rows; returns the count per token.
inline std::vector<int64_t> DrawCounts(const std::vector<float>& logits, SamplingParams params,
                                       int draws, std::optional<float> mirostat_mu = std::nullopt,
                                       int batch = 2000) {
  std::vector<int64_t> counts(logits.size(), 0);
  std::vector<float> all;
  Sampler sampler;
  for (int start = 0; start < draws; start += batch) {
    const int rows = std::min(batch, draws - start);
    all.clear();
    for (int r = 0; r < rows; ++r) all.insert(all.end(), logits.begin(), logits.end());
    const std::vector<uint8_t> bytes = F32Bytes(all);
    auto view = LogitsView::Create(DType::kFloat32, static_cast<uint32_t>(rows),
                                   static_cast<uint32_t>(logits.size()), bytes);
    std::vector<SamplingParams> row_params(static_cast<size_t>(rows), params);
    std::vector<RowRequest> requests(static_cast<size_t>(rows));
    for (int r = 0; r < rows; ++r) {
      row_params[static_cast<size_t>(r)].seed = static_cast<uint64_t>(start + r);
      requests[static_cast<size_t>(r)] =
          RowRequest{&row_params[static_cast<size_t>(r)], {}, {}, mirostat_mu};
    }
    auto result = sampler.Run(*view, requests);
    if (!result.ok()) return {};
    for (const SampledToken& t : *result) ++counts[static_cast<size_t>(t.token_id)];
  }
  return counts;
}

// Softmax in double of `logits` / t over `kept` (others 0): the hand-computed reference.
inline std::vector<double> SoftmaxOver(const std::vector<float>& logits,
                                       const std::vector<int32_t>& kept, double t = 1.0) {
  std::vector<double> out(logits.size(), 0.0);
  double total = 0.0;
  for (int32_t id : kept)
    total += std::exp(static_cast<double>(logits[static_cast<size_t>(id)]) / t);
  for (int32_t id : kept) {
    out[static_cast<size_t>(id)] =
        std::exp(static_cast<double>(logits[static_cast<size_t>(id)]) / t) / total;
  }
  return out;
}

// Upper critical values of the chi-square distribution at α = 0.001, df = 1…30.
inline double ChiSquareCritical001(int df) {
  static constexpr double kTable[] = {
      10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588,
      31.264, 32.909, 34.528, 36.123, 37.697, 39.252, 40.790, 42.312, 43.820, 45.315,
      46.797, 48.268, 49.728, 51.179, 52.620, 54.052, 55.476, 56.892, 58.301, 59.703};
  return kTable[df - 1];
}

// Pearson's chi-square statistic of `counts` against `probs` (bins with expected < 5 merged
// into one), and its degrees of freedom. Bins with probability 0 must have count 0: a draw there
// makes the statistic infinite.
struct ChiSquare {
  double statistic = 0.0;
  int df = 0;
};
inline ChiSquare ChiSquareTest(const std::vector<int64_t>& counts,
                               const std::vector<double>& probs) {
  int64_t n = 0;
  for (int64_t c : counts) n += c;
  ChiSquare out;
  double small_expected = 0.0;
  int64_t small_observed = 0;
  int bins = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    const double expected = probs[i] * static_cast<double>(n);
    if (probs[i] == 0.0) {
      if (counts[i] > 0) out.statistic = INFINITY;
      continue;
    }
    if (expected < 5.0) {
      small_expected += expected;
      small_observed += counts[i];
      continue;
    }
    const double d = static_cast<double>(counts[i]) - expected;
    out.statistic += d * d / expected;
    ++bins;
  }
  if (small_expected > 0.0) {
    const double d = static_cast<double>(small_observed) - small_expected;
    out.statistic += d * d / small_expected;
    ++bins;
  }
  out.df = bins - 1;
  return out;
}

}  // namespace tokensampler::testing

#endif  // TOKENSAMPLER_TESTS_TESTING_CORE_TESTING_H_
