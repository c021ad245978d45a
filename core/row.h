// Internal: the working buffers of one row and the numeric helpers the pipeline stages share.
// A RowScratch belongs to one thread at a time (thread-compatible); buffers grow to the largest
// vocabulary seen and are then reused, so steady state allocates nothing per row.
#ifndef TOKENSAMPLER_CORE_ROW_H_
#define TOKENSAMPLER_CORE_ROW_H_

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "absl/random/random.h"
#include "absl/types/span.h"
#include "core/sampler.h"
#include "core/tensor.h"

namespace tokensampler {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct RowScratch {
  std::vector<float> logits;    // the processed row (steps 1–2), then the working copy for n = 1
  std::vector<float> work;      // per-sample copy of `logits` when n > 1
  std::vector<int32_t> counts;  // all zero between uses (penalties reset what they touch)
  std::vector<uint8_t> marks;   // all zero between uses
  std::vector<std::pair<float, int32_t>> pairs;    // selection / sort scratch
  std::vector<double> weights;                     // exp(l - max) per token
  std::vector<int32_t> ints;                       // DRY: Z-function
  std::vector<int32_t> touched;                    // DRY: tokens with a penalty
  std::vector<std::pair<double, int32_t>> scored;  // typical_p: (score, id)
  std::vector<TokenLogprob> raw_top;               // raw-mode top-N, shared by the row's samples
  absl::BitGen entropy;                            // seeds for rows without a seed

  // Sizes the per-vocabulary buffers for `vocab_size` (only ever grows).
  void Reserve(int vocab_size);
};

// Decodes `row` of `view` into `out` (size vocab). Returns the first NaN position, or -1.
int DecodeRow(const LogitsView& view, int row, absl::Span<float> out);

// Largest finite-or-infinite value (kNegInf when all are -inf) and its lowest index (-1 if none).
std::pair<float, int32_t> Argmax(absl::Span<const float> logits);

// log Σ exp(l_i) over the row, computed in double with `max` subtracted. REQUIRES: max finite.
double LogSumExp(absl::Span<const float> logits, float max);

// Fills scratch.weights[i] = exp(l_i - max) for every token (0 for -inf) and returns their sum
// (summed in token order, so the result does not depend on threads). REQUIRES: max finite.
double Weights(absl::Span<const float> logits, float max, std::vector<double>& weights);

// Number of tokens that are not -inf.
int32_t CountKept(absl::Span<const float> logits);

// Removes (sets to -inf) every token whose weight is below `threshold`.
void RemoveBelow(absl::Span<float> logits, const std::vector<double>& weights, double threshold);

// log-softmax of a row: log p_i = l_i - max - log Σ exp(l_j - max), with +inf logits taken as
// their limit (uniform over the +inf tokens) and an all -inf row giving -inf everywhere.
struct Normalizer {
  float max = kNegInf;
  double log_total = 0.0;
  int32_t inf_count = 0;

  static Normalizer Of(absl::Span<const float> logits);
  float LogProb(float logit) const;
};

// The `n` largest values of `map(values[i])` that are not -inf, as (id, mapped value), by
// descending value then ascending id. n < 0 = all of them. `map` must be non-decreasing.
template <typename Map>
void TopValues(absl::Span<const float> values, int32_t n, Map map,
               std::vector<std::pair<float, int32_t>>& scratch, std::vector<TokenLogprob>& out) {
  out.clear();
  if (n == 0) return;
  scratch.clear();
  for (size_t i = 0; i < values.size(); ++i) {
    const float mapped = map(values[i]);
    if (mapped != kNegInf) scratch.emplace_back(mapped, static_cast<int32_t>(i));
  }
  const auto before = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  size_t take = scratch.size();
  if (n > 0 && static_cast<size_t>(n) < take) {
    take = static_cast<size_t>(n);
    std::nth_element(scratch.begin(), scratch.begin() + static_cast<std::ptrdiff_t>(take),
                     scratch.end(), before);
    scratch.resize(take);
  }
  std::sort(scratch.begin(), scratch.end(), before);
  out.reserve(take);
  for (const auto& [value, id] : scratch) out.push_back({id, value});
}

// The inverse-CDF draw: the first token (in id order) whose cumulative weight exceeds u · total.
// REQUIRES: some weight > 0, 0 <= u < 1.
int32_t DrawFromWeights(const std::vector<double>& weights, size_t vocab_size, double total,
                        double u);

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_ROW_H_
