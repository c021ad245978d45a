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
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "core/kernels.h"
#include "core/params.h"
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

  // The fast pipeline (dist.h).
  std::vector<float> wf;                         // float weights per token
  std::vector<int32_t> ids;                      // selected token ids (kernels::SelectRanges)
  std::vector<int32_t> sparse_ids;               // the kept tokens once few remain, by id
  std::vector<float> sparse_values;              // and their values
  std::vector<double> block_sums;                // Σ w per block of the row
  std::vector<int64_t> block_counts;             // kept tokens per block
  std::vector<double> keys;                      // sampled keys / band keys
  std::vector<std::pair<double, int32_t>> band;  // (key, id) of the tokens around a cut
  std::vector<float> band_values, band_weights;  // the tokens between two pivots, gathered
  std::vector<int32_t> band_ids, band_picks;
  std::vector<int32_t> list_ids;  // the tokens with key ≤ a cut's upper pivot (Dist::FindCut)
  std::vector<float> list_values, list_weights;
  std::vector<int32_t> head_ids;   // tokens near the maximum (Dist::kHeadMin)
  std::vector<double> pivot_sums;  // per block × pivot
  std::vector<int64_t> pivot_counts;
  std::vector<double> pivots;  // FindCut's pivots of one pass
  std::vector<double> block_sums_scratch;
  std::vector<float> cand_values;  // top_k's candidates' values (Dist::TopK)
  // The row's largest values, kept by pass 1 for a small top_k (valid for the row when streamed).
  kernels::TopStream stream;
  bool streamed = false;
  std::vector<int32_t> stream_ids;
  std::vector<float> stream_values, stream_scratch;
  // Penalised tokens of a row that was only read (SampleRow): their ids and new values.
  std::vector<int32_t> patch_ids;
  std::vector<float> patch_values;
  std::vector<kernels::MaxResult> block_max;  // per-block maxima of pass 1
  std::vector<float> staged;  // a row of a view in pieces, copied whole (Sampler::Run)
  // A second read of a row in shared memory found other values than pass 1 (Dist::Materialize):
  // the client wrote its region during the call. SampleRow fails the row.
  bool source_changed = false;

  // Sizes the per-vocabulary buffers for `vocab_size` (only ever grows).
  void Reserve(int vocab_size);
};

// The checks of a row's history against the vocabulary (messages name rows[row].field[i]).
absl::Status CheckHistory(size_t row, absl::string_view field, absl::Span<const int32_t> ids,
                          int32_t vocab_size);

// Whether steps 1–2 (masks, biases, penalties) can change any logit of this row.
bool StepsOneTwoActive(const SamplingParams& p, absl::Span<const int32_t> output);
// Whether the only active step is Penalties (repetition, frequency, presence), which changes no
// token outside prompt ∪ output.
bool OnlyPenaltiesActive(const SamplingParams& p, absl::Span<const int32_t> output);

// Decodes `row` of `view` into `out` (size vocab). Returns the first NaN position, or -1.
int DecodeRow(const LogitsView& view, int row, absl::Span<float> out);

// Largest finite-or-infinite value (kNegInf when all are -inf) and its lowest index (-1 if none).
std::pair<float, int32_t> Argmax(absl::Span<const float> logits);

// log Σ exp(l_i) over the row, computed in double with `max` subtracted. REQUIRES: max finite.
double LogSumExp(absl::Span<const float> logits, float max);

// Fills weights[i] = ExpF(l_i - max) (kernels.h; 0 for -inf) for every token and returns their
// sum (in token order, so the result does not depend on threads). REQUIRES: max finite.
double Weights(absl::Span<const float> logits, float max, std::vector<double>& weights);

// Number of tokens that are not -inf.
int32_t CountKept(absl::Span<const float> logits);

// The entropy (nats) of softmax(logits) over the finite entries, as dynamic temperature uses it:
// H = log Σw − Σ w·(l − max) / Σw with w = ExpF(l − max), where each term (w, and w·(l − max),
// exact in double) is truncated to a multiple of 2^-62 and the terms are summed as 128-bit
// integers — exact, so the sums do not depend on the order or grouping of the tokens — and
// rounded to double once. The temperature depends on H's last bits (a uniform row sits exactly
// at the top of the range), so the fast sampler, on blocks or on its short list, and the
// reference, on the whole row, must get the same bits; ordinary double sums in different
// orders do not. Truncation costs < n·2^-62 relative (the max token has w = 1). `max` is the
// largest finite logit.
struct EntropySums {
  unsigned __int128 weights = 0;   // Σ w · 2^62, terms truncated
  unsigned __int128 weighted = 0;  // Σ −w·(l − max) · 2^62, terms truncated
  int64_t kept = 0;                // tokens that are not −inf
  void Add(const EntropySums& other) {
    weights += other.weights;
    weighted += other.weighted;
    kept += other.kept;
  }
  double Entropy() const;
};
// The terms of logits[begin, end). `weights`, when given, holds ExpF(l − max) for each token
// (kernels::Weights computes the same bits); null = computed here.
EntropySums EntropyTerms(const float* logits, const float* weights, size_t begin, size_t end,
                         float max);
double OrderFreeEntropy(absl::Span<const float> logits, float max);

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

// Tokens sampled to choose a pivot for the k largest values.
constexpr size_t kTopKSample = 1024;

// A value with about 2k of `values` at or above it, from a strided sample of kTopKSample of
// them (−inf: too few values to choose one). `sample` is scratch.
double TopKPivot(absl::Span<const float> values, int32_t k, std::vector<double>& sample);

// For TopValues: ids (in scratch.ids, id order) of the tokens with value ≥ *pivot, a pivot from
// a sample chosen so that more than n tokens qualify; returns their count, or 0 when no such
// pivot was found (then every token is a candidate).
size_t TopCandidates(absl::Span<const float> values, int32_t n, RowScratch& scratch, float* pivot);

// The `n` largest values of `map(values[i])` that are not -inf, as (id, mapped value), by
// descending value then ascending id. n < 0 = all of them. `map` must be non-decreasing.
// Few of many: only the candidates above a sampled pivot are ranked (the same result, as long as
// the n-th of them maps strictly above the pivot; otherwise every token is ranked).
template <typename Map>
void TopValues(absl::Span<const float> values, int32_t n, Map map, RowScratch& scratch,
               std::vector<TokenLogprob>& out) {
  out.clear();
  if (n == 0) return;
  std::vector<std::pair<float, int32_t>>& pairs = scratch.pairs;
  const auto before = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  const auto rank = [&](size_t take) {
    if (take < pairs.size()) {
      std::nth_element(pairs.begin(), pairs.begin() + static_cast<std::ptrdiff_t>(take),
                       pairs.end(), before);
      pairs.resize(take);
    }
    std::sort(pairs.begin(), pairs.end(), before);
  };
  float pivot = 0.0f;
  const size_t few =
      n > 0 && n <= 1024 && values.size() >= 8192 ? TopCandidates(values, n, scratch, &pivot) : 0;
  bool done = false;
  if (few > 0) {
    pairs.clear();
    for (size_t i = 0; i < few; ++i) {
      const int32_t id = scratch.ids[i];
      const float mapped = map(values[static_cast<size_t>(id)]);
      if (mapped != kNegInf) pairs.emplace_back(mapped, id);
    }
    if (pairs.size() > static_cast<size_t>(n)) {
      rank(static_cast<size_t>(n));
      done = pairs.back().first > map(pivot);
    }
  }
  if (!done) {
    pairs.clear();
    for (size_t i = 0; i < values.size(); ++i) {
      const float mapped = map(values[i]);
      if (mapped != kNegInf) pairs.emplace_back(mapped, static_cast<int32_t>(i));
    }
    rank(n > 0 ? static_cast<size_t>(n) : pairs.size());
  }
  out.reserve(pairs.size());
  for (const auto& [value, id] : pairs) out.push_back({id, value});
}

// Fills `out.logprob` and `out.top_logprobs` for `token` in the row's mode. `processed` is the
// distribution sampled from (removed tokens −inf); `raw_norm` / scratch.raw_top describe the row
// as received.
void FillLogprobs(const SamplingParams& p, const LogitsView& view, int row, int32_t token,
                  absl::Span<const float> processed, const Normalizer& raw_norm,
                  RowScratch& scratch, SampledToken& out);

// The inverse-CDF draw over weights[0, n) (double, or the float weights of the SIMD kernels,
// added in double): the first token (in id order) whose cumulative weight exceeds u · total.
// REQUIRES: some weight > 0, 0 <= u < 1.
template <typename W>
int32_t DrawFromWeights(const W* weights, size_t n, double total, double u) {
  const double target = u * total;
  double cumulative = 0.0;
  int32_t last_positive = -1;
  for (size_t i = 0; i < n; ++i) {
    if (weights[i] <= W{0}) continue;
    cumulative += static_cast<double>(weights[i]);
    last_positive = static_cast<int32_t>(i);
    if (cumulative > target) return last_positive;
  }
  return last_positive;  // rounding left target ≥ the running sum: the last kept token
}

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CORE_ROW_H_
