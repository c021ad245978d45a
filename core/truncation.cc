// Steps 4–6 of the pipeline as the straightforward reference (sorts, one pass per question): the
// fast Sampler (dist.h) must keep the same tokens and draw the same token; tests hold it to that.
// Weights are w_i = ExpF(l_i − max) (kernels.h), summed in double: p_i = w_i / Σ w.
#include <algorithm>
#include <cmath>
#include <limits>

#include "core/kernels.h"
#include "core/stages.h"

namespace tokensampler {
namespace {

constexpr float kPosInf = std::numeric_limits<float>::infinity();

using Pairs = std::vector<std::pair<float, int32_t>>;

// Kept tokens as (logit, id), by descending logit then ascending id.
void SortedKept(absl::Span<const float> logits, Pairs& out) {
  out.clear();
  for (size_t i = 0; i < logits.size(); ++i) {
    if (logits[i] != kNegInf) out.emplace_back(logits[i], static_cast<int32_t>(i));
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
}

// Shannon entropy (nats) of softmax(logits) given its weights and their sum.
double Entropy(absl::Span<const float> logits, const std::vector<double>& weights, float max,
               double total) {
  const double log_total = std::log(total);
  double h = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (weights[i] <= 0.0) continue;
    const double log_q = static_cast<double>(logits[i]) - max - log_total;
    h -= weights[i] / total * log_q;
  }
  return h;
}

// Keeps only the tokens equal to the maximum.
void KeepMax(absl::Span<float> logits) {
  const float max = Argmax(logits).first;
  for (float& l : logits) {
    if (l < max) l = kNegInf;
  }
}

// Removes tokens whose probability is below `cut`; if that would remove all, keeps the maximum.
void CutBelowProbability(absl::Span<float> logits, RowScratch& scratch, double cut) {
  const float max = Argmax(logits).first;
  const double total = Weights(logits, max, scratch.weights);
  if (1.0 / total < cut) {  // even the most likely token (weight 1) is below the cut
    KeepMax(logits);
    return;
  }
  RemoveBelow(logits, scratch.weights, cut * total);
}

}  // namespace

void Temperature::Apply(absl::Span<float> logits, RowScratch& /*scratch*/) const {
  float t = temperature;
  if (range > 0.0f) {
    // llama.cpp temp_ext: T' = T_min + (T_max − T_min) · (H / log n)^exponent over the kept set.
    const int32_t kept = CountKept(logits);
    if (kept <= 1) return;
    const double h = OrderFreeEntropy(logits, Argmax(logits).first);
    const double normalized = h / std::log(static_cast<double>(kept));
    const double t_min = std::max(0.0, static_cast<double>(temperature) - range);
    const double t_max = static_cast<double>(temperature) + range;
    t = static_cast<float>(t_min + (t_max - t_min) * std::pow(normalized, exponent));
    if (!(t >= SamplingParams::kGreedyTemperature)) {
      KeepMax(logits);  // a (near-)zero dynamic temperature is greedy
      return;
    }
  }
  // A temperature below 1 can also push the largest logit below −FLT_MAX (a maximum below
  // −FLT_MAX · T). Every other token lies at least a float spacing below it — about 1e31 there —
  // so its probability, e^((l − max) / T), is 0: the row is uniform over the tokens at the
  // maximum, which would all read −inf once divided.
  const float max = Argmax(logits).first;
  if (std::isfinite(max) && max / t == kNegInf) {
    for (float& l : logits) l = l == max ? 0.0f : kNegInf;
    return;
  }
  bool overflow = false;
  for (float& l : logits) {
    l /= t;
    overflow |= l == kPosInf;
  }
  // A temperature below 1 can push the largest logits past the float range; like +inf logits
  // in the input, they then dominate: the row is uniform over them.
  if (overflow) {
    for (float& l : logits) l = l == kPosInf ? 0.0f : kNegInf;
  }
}

void TopK::Apply(absl::Span<float> logits, RowScratch& scratch) const {
  if (k <= 0) return;
  Pairs& kept = scratch.pairs;
  kept.clear();
  for (size_t i = 0; i < logits.size(); ++i) {
    if (logits[i] != kNegInf) kept.emplace_back(logits[i], static_cast<int32_t>(i));
  }
  if (static_cast<size_t>(k) >= kept.size()) return;
  // Selection, not a sort: the k-th largest logit is the threshold; ties with it stay.
  const auto kth = kept.begin() + (k - 1);
  std::nth_element(kept.begin(), kth, kept.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  const float threshold = kth->first;
  for (float& l : logits) {
    if (l < threshold) l = kNegInf;
  }
}

void TopP::Apply(absl::Span<float> logits, RowScratch& scratch) const {
  if (p >= 1.0f) return;
  const float max = Argmax(logits).first;
  const double total = Weights(logits, max, scratch.weights);
  Pairs& sorted = scratch.pairs;
  SortedKept(logits, sorted);
  // The first position where the cumulative mass reaches p; everything at or above its logit
  // stays (the smallest set with mass ≥ p, ties at the cut included).
  double cumulative = 0.0;
  float threshold = sorted.back().first;
  for (const auto& [logit, id] : sorted) {
    cumulative += scratch.weights[static_cast<size_t>(id)] / total;
    if (cumulative >= static_cast<double>(p)) {
      threshold = logit;
      break;
    }
  }
  for (float& l : logits) {
    if (l < threshold) l = kNegInf;
  }
}

void MinP::Apply(absl::Span<float> logits) const {
  if (min_p <= 0.0f) return;
  const float max = Argmax(logits).first;
  for (float& l : logits) {
    if (kernels::ExpF(l - max) < min_p) l = kNegInf;
  }
}

void TypicalP::Apply(absl::Span<float> logits, RowScratch& scratch) const {
  if (mass >= 1.0f) return;
  const float max = Argmax(logits).first;
  const double total = Weights(logits, max, scratch.weights);
  const double log_total = std::log(total);
  const double h = Entropy(logits, scratch.weights, max, total);
  // HF TypicalLogitsWarper: sort by |−log q − H| ascending, keep the shortest prefix whose mass
  // reaches `mass`, and every token scoring no worse than its last one.
  auto& scored = scratch.scored;
  scored.clear();
  for (size_t i = 0; i < logits.size(); ++i) {
    if (logits[i] == kNegInf) continue;
    const double log_q = static_cast<double>(logits[i]) - max - log_total;
    scored.emplace_back(std::abs(-log_q - h), static_cast<int32_t>(i));
  }
  std::sort(scored.begin(), scored.end());
  double cumulative = 0.0;
  double cutoff = scored.back().first;
  for (const auto& [score, id] : scored) {
    cumulative += scratch.weights[static_cast<size_t>(id)] / total;
    if (cumulative >= static_cast<double>(mass)) {
      cutoff = score;
      break;
    }
  }
  for (const auto& [score, id] : scored) {
    if (score > cutoff) logits[static_cast<size_t>(id)] = kNegInf;
  }
}

void EpsilonCutoff::Apply(absl::Span<float> logits, RowScratch& scratch) const {
  if (epsilon <= 0.0f) return;
  CutBelowProbability(logits, scratch, static_cast<double>(epsilon));
}

void EtaCutoff::Apply(absl::Span<float> logits, RowScratch& scratch) const {
  if (eta <= 0.0f) return;
  const float max = Argmax(logits).first;
  const double total = Weights(logits, max, scratch.weights);
  const double h = Entropy(logits, scratch.weights, max, total);
  const double e = static_cast<double>(eta);
  CutBelowProbability(logits, scratch, std::min(e, std::sqrt(e) * std::exp(-h)));
}

void TopNSigma::Apply(absl::Span<float> logits) const {
  double sum = 0.0;
  size_t count = 0;
  float max = kNegInf;
  for (float l : logits) {
    if (l == kNegInf) continue;
    sum += l;
    ++count;
    max = std::max(max, l);
  }
  const double mean = sum / static_cast<double>(count);
  double squares = 0.0;
  for (float l : logits) {
    if (l != kNegInf) squares += (l - mean) * (l - mean);
  }
  const double sigma = std::sqrt(squares / static_cast<double>(count));
  const double threshold = static_cast<double>(max) - static_cast<double>(n) * sigma;
  for (float& l : logits) {
    if (static_cast<double>(l) < threshold) l = kNegInf;
  }
}

void Xtc::Apply(absl::Span<float> logits, RowScratch& scratch) const {
  if (!(coin < static_cast<double>(probability))) return;
  const float max = Argmax(logits).first;
  const double total = Weights(logits, max, scratch.weights);
  const double cut = static_cast<double>(threshold) * total;
  size_t above = 0;
  double least = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const double w = scratch.weights[i];
    if (w > 0.0 && w >= cut) {
      least = above == 0 ? w : std::min(least, w);
      ++above;
    }
  }
  if (above < 2) return;
  for (size_t i = 0; i < logits.size(); ++i) {
    const double w = scratch.weights[i];
    if (w >= cut && w > least) logits[i] = kNegInf;
  }
}

int32_t Draw(absl::Span<const float> logits, double coin, RowScratch& scratch) {
  const float max = Argmax(logits).first;
  const double total = Weights(logits, max, scratch.weights);
  return DrawFromWeights(scratch.weights.data(), logits.size(), total, coin);
}

size_t Mirostat::KeepV1(absl::Span<const float> top, size_t n) const {
  // Estimate the Zipf exponent s from the top m = 100 tokens, then k from s and μ.
  double sum_ti_bi = 0.0;
  double sum_ti_sq = 0.0;
  for (size_t i = 0; i + 1 < top.size(); ++i) {
    const double t_i = std::log(static_cast<double>(i + 2) / static_cast<double>(i + 1));
    const double b_i = static_cast<double>(top[i]) - top[i + 1];  // log q_i/q_i+1
    sum_ti_bi += t_i * b_i;
    sum_ti_sq += t_i * t_i;
  }
  const double s_hat = sum_ti_bi / sum_ti_sq;
  const double epsilon_hat = s_hat - 1.0;
  const double k = std::pow(epsilon_hat * std::pow(2.0, static_cast<double>(mu)) /
                                (1.0 - std::pow(static_cast<double>(vocab_size), -epsilon_hat)),
                            1.0 / s_hat);
  // Degenerate estimates (a flat head: s = 0, one token) keep every token.
  return std::isfinite(k) ? static_cast<size_t>(std::clamp(k, 1.0, static_cast<double>(n))) : n;
}

bool Mirostat::KeepV2(float l, float max, double log2_total) const {
  // The token's surprise −log2 q is at most μ.
  return -((static_cast<double>(l) - max) / std::log(2.0) - log2_total) <= static_cast<double>(mu);
}

Mirostat::Result Mirostat::DrawKept(absl::Span<const float> logits, double coin,
                                    RowScratch& scratch) const {
  // Draw, and take the drawn token's renormalised probability from the same weights.
  const float max = Argmax(logits).first;
  const double total = Weights(logits, max, scratch.weights);
  const int32_t token = DrawFromWeights(scratch.weights.data(), logits.size(), total, coin);
  const double surprise = -std::log2(scratch.weights[static_cast<size_t>(token)] / total);
  return {token, static_cast<float>(static_cast<double>(mu) -
                                    static_cast<double>(eta) * (surprise - tau))};
}

Mirostat::Result Mirostat::Apply(absl::Span<float> logits, double coin, RowScratch& scratch) const {
  Pairs& sorted = scratch.pairs;
  SortedKept(logits, sorted);
  size_t keep;
  if (mode == 1) {
    std::vector<float>& top = scratch.band_values;
    top.clear();
    for (size_t i = 0; i < std::min<size_t>(100, sorted.size()); ++i) {
      top.push_back(sorted[i].first);
    }
    keep = KeepV1(top, sorted.size());
  } else {
    const float max = sorted.front().first;
    const double log2_total = std::log2(Weights(logits, max, scratch.weights));
    keep = 0;
    while (keep < sorted.size() && KeepV2(sorted[keep].first, max, log2_total)) ++keep;
    keep = std::max<size_t>(keep, 1);
  }
  for (size_t i = keep; i < sorted.size(); ++i) {
    logits[static_cast<size_t>(sorted[i].second)] = kNegInf;
  }
  return DrawKept(logits, coin, scratch);
}

}  // namespace tokensampler
