#include "core/row.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/kernels.h"

namespace tokensampler {
namespace {
constexpr float kPosInfinity = std::numeric_limits<float>::infinity();
}  // namespace

void RowScratch::Reserve(int vocab_size) {
  const size_t v = static_cast<size_t>(vocab_size);
  if (logits.size() < v) {
    logits.resize(v);
    work.resize(v);
    counts.resize(v, 0);
    marks.resize(v, 0);
    weights.resize(v);
    wf.resize(v);
    ids.resize(v);
    head_ids.resize(v);
    cand_values.resize(v);
  }
  stream_ids.resize(kernels::TopStream::kCapacity);
  stream_values.resize(kernels::TopStream::kCapacity);
  stream_scratch.resize(kernels::TopStream::kCapacity);
}

absl::Status CheckHistory(size_t row, absl::string_view field, absl::Span<const int32_t> ids,
                          int32_t vocab_size) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("rows[", row, "].", field, "[", i,
                                                     "] = ", ids[i], " is out of range [0, ",
                                                     vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

namespace {

bool PenaltiesActive(const SamplingParams& p) {
  return p.repetition_penalty != 1.0f || p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f;
}

// Masks, bans, biases, DRY and n-gram bans: every step but Penalties.
bool OtherStepsActive(const SamplingParams& p, absl::Span<const int32_t> output) {
  const bool min_tokens_mask =
      static_cast<int64_t>(output.size()) < p.min_tokens &&
      (!p.stop_token_ids.empty() || (!p.ignore_eos && !p.eos_token_ids.empty()));
  return !p.allowed_token_ids.empty() || !p.bad_words.empty() || min_tokens_mask ||
         !p.token_bitmask.empty() || !p.logit_bias.empty() ||
         (p.dry_multiplier != 0.0f && p.dry_penalty_last_n != 0) || p.no_repeat_ngram_size > 0;
}

}  // namespace

bool StepsOneTwoActive(const SamplingParams& p, absl::Span<const int32_t> output) {
  return PenaltiesActive(p) || OtherStepsActive(p, output);
}

bool OnlyPenaltiesActive(const SamplingParams& p, absl::Span<const int32_t> output) {
  return PenaltiesActive(p) && !OtherStepsActive(p, output);
}

void FillLogprobs(const SamplingParams& p, const LogitsView& view, int row, int32_t token,
                  absl::Span<const float> processed, const Normalizer& raw_norm,
                  RowScratch& scratch, SampledToken& out) {
  const int32_t n = *p.logprobs;
  switch (p.logprobs_mode) {
    case LogprobsMode::kRawLogprobs:
      out.logprob = raw_norm.LogProb(view.At(row, token));
      out.top_logprobs = scratch.raw_top;
      break;
    case LogprobsMode::kRawLogits:
      out.logprob = view.At(row, token);
      out.top_logprobs = scratch.raw_top;
      break;
    case LogprobsMode::kProcessedLogits:
      out.logprob = processed[static_cast<size_t>(token)];
      TopValues(
          processed, n, [](float l) { return l; }, scratch, out.top_logprobs);
      break;
    case LogprobsMode::kProcessedLogprobs: {
      const Normalizer norm = Normalizer::Of(processed);
      out.logprob = norm.LogProb(processed[static_cast<size_t>(token)]);
      TopValues(
          processed, n, [&](float l) { return norm.LogProb(l); }, scratch, out.top_logprobs);
      break;
    }
  }
}

int DecodeRow(const LogitsView& view, int row, absl::Span<float> out) {
  const int v = view.vocab_size();
  const uint8_t* src = view.RowBytes(row);
  switch (view.dtype()) {
    case DType::kFloat32:
      std::memcpy(out.data(), src, static_cast<size_t>(v) * sizeof(float));
      break;
    case DType::kBFloat16:
      for (int i = 0; i < v; ++i) {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * static_cast<size_t>(i), 2);
        out[static_cast<size_t>(i)] = Bf16ToFloat(bits);
      }
      break;
    case DType::kFloat16:
      for (int i = 0; i < v; ++i) {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * static_cast<size_t>(i), 2);
        out[static_cast<size_t>(i)] = Fp16ToFloat(bits);
      }
      break;
  }
  for (int i = 0; i < v; ++i) {
    if (std::isnan(out[static_cast<size_t>(i)])) return i;
  }
  return -1;
}

std::pair<float, int32_t> Argmax(absl::Span<const float> logits) {
  float best = kNegInf;
  int32_t best_id = -1;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (logits[i] > best) {
      best = logits[i];
      best_id = static_cast<int32_t>(i);
    }
  }
  return {best, best_id};
}

double LogSumExp(absl::Span<const float> logits, float max) {
  return static_cast<double>(max) +
         std::log(kernels::SumExp(logits.data(), 0, logits.size(), 1.0f, max));
}

double TopKPivot(absl::Span<const float> values, int32_t k, std::vector<double>& sample) {
  const size_t n = values.size();
  sample.clear();
  const size_t stride = std::max<size_t>(1, n / kTopKSample);
  for (size_t i = stride / 2; i < n; i += stride) {
    if (values[i] != kNegInf) sample.push_back(static_cast<double>(values[i]));
  }
  // The j-th largest sampled value (from 0), j chosen so that about 2k tokens are ≥ it.
  const size_t rank =
      static_cast<size_t>(2.0 * k * static_cast<double>(sample.size()) / static_cast<double>(n)) +
      3;
  if (rank >= sample.size()) return -std::numeric_limits<double>::infinity();
  constexpr size_t kFew = 16;
  if (rank >= kFew) {
    std::nth_element(sample.begin(), sample.begin() + static_cast<ptrdiff_t>(rank), sample.end(),
                     std::greater<>());
    return sample[rank];
  }
  // A small rank (top_k ≲ 500 at 128k tokens): the rank + 1 largest, kept sorted in a small
  // array — one comparison for most samples instead of a selection over all of them.
  std::array<double, kFew> top;
  size_t have = 0;
  for (const double x : sample) {
    if (have == rank + 1 && !(x > top[rank])) continue;
    size_t j = have <= rank ? have++ : rank;
    for (; j > 0 && top[j - 1] < x; --j) top[j] = top[j - 1];
    top[j] = x;
  }
  return top[rank];
}

size_t TopCandidates(absl::Span<const float> values, int32_t n, RowScratch& scratch, float* pivot) {
  const double p = TopKPivot(values, n, scratch.keys);
  if (p == -std::numeric_limits<double>::infinity()) return 0;
  *pivot = static_cast<float>(p);
  if (scratch.ids.size() < values.size()) scratch.ids.resize(values.size());
  const size_t m = kernels::SelectRanges(values.data(), 0, values.size(), *pivot, kPosInfinity,
                                         kPosInfinity, kNegInf, scratch.ids.data());
  return m > static_cast<size_t>(n) ? m : 0;
}

double Weights(absl::Span<const float> logits, float max, std::vector<double>& weights) {
  double sum = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const double w = static_cast<double>(kernels::ExpF(logits[i] - max));
    weights[i] = w;
    sum += w;
  }
  return sum;
}

EntropySums EntropyTerms(const float* logits, const float* weights, size_t begin, size_t end,
                         float max) {
  constexpr double kScale = 4611686018427387904.0;  // 2^62
  EntropySums sums;
  for (size_t i = begin; i < end; ++i) {
    if (logits[i] == kNegInf) continue;
    ++sums.kept;
    const float d = logits[i] - max;
    const float w = weights != nullptr ? weights[i] : kernels::ExpF(d);
    if (w == 0.0f) continue;
    // w ≤ 1 and |w·d| ≤ 1/e (w·d is exact in double): both scaled terms fit in an int64, and
    // the conversion truncates.
    sums.weights += static_cast<uint64_t>(static_cast<int64_t>(static_cast<double>(w) * kScale));
    sums.weighted += static_cast<uint64_t>(
        static_cast<int64_t>(-static_cast<double>(w) * static_cast<double>(d) * kScale));
  }
  return sums;
}

double EntropySums::Entropy() const {
  const double total = std::ldexp(static_cast<double>(weights), -62);
  const double weighted_sum = std::ldexp(static_cast<double>(weighted), -62);
  return std::log(total) + weighted_sum / total;
}

double OrderFreeEntropy(absl::Span<const float> logits, float max) {
  return EntropyTerms(logits.data(), nullptr, 0, logits.size(), max).Entropy();
}

int32_t CountKept(absl::Span<const float> logits) {
  int32_t n = 0;
  for (float l : logits) n += l != kNegInf;
  return n;
}

void RemoveBelow(absl::Span<float> logits, const std::vector<double>& weights, double threshold) {
  for (size_t i = 0; i < logits.size(); ++i) {
    if (weights[i] < threshold) logits[i] = kNegInf;
  }
}

Normalizer Normalizer::Of(absl::Span<const float> logits) {
  Normalizer n;
  n.max = kernels::Max(logits.data(), 0, logits.size()).max;
  if (n.max == std::numeric_limits<float>::infinity()) {
    for (float l : logits) n.inf_count += l == n.max;
    n.log_total = std::log(static_cast<double>(n.inf_count));
  } else if (n.max != kNegInf) {
    n.log_total = LogSumExp(logits, n.max) - static_cast<double>(n.max);
  }
  return n;
}

float Normalizer::LogProb(float logit) const {
  if (max == kNegInf || logit == kNegInf) return kNegInf;
  if (inf_count > 0) return logit == max ? static_cast<float>(-log_total) : kNegInf;
  return static_cast<float>(static_cast<double>(logit) - static_cast<double>(max) - log_total);
}

}  // namespace tokensampler
