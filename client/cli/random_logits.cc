#include "client/cli/random_logits.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <numbers>

namespace tokensampler::cli {
namespace {

// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast and good enough for synthetic data.
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t state) : state_(state) {}

  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

  // Uniform in [0, 1) with 53 random bits.
  double Uniform() { return static_cast<double>(Next() >> 11) * 0x1.0p-53; }

  // Uniform in [lo, hi).
  double Uniform(double lo, double hi) { return lo + (hi - lo) * Uniform(); }

  // Exp(1): -ln(1 - u) with 1 - u in (0, 1].
  double Exponential() { return -std::log1p(-Uniform()); }

  // Uniform integer in [0, n). REQUIRES: n > 0. The modulo bias (< n / 2^64) is irrelevant here.
  uint64_t Below(uint64_t n) { return Next() % n; }

 private:
  uint64_t state_;
};

// Fills `out` with standard normal values: Box–Muller, two values per pair of uniforms.
void FillStandardNormal(SplitMix64& rng, float* out, size_t count, float scale) {
  for (size_t i = 0; i < count; i += 2) {
    const double radius = std::sqrt(-2.0 * std::log1p(-rng.Uniform()));  // 1 - u in (0, 1]
    const double angle = 2.0 * std::numbers::pi * rng.Uniform();
    out[i] = static_cast<float>(scale * radius * std::cos(angle));
    if (i + 1 < count) out[i + 1] = static_cast<float>(scale * radius * std::sin(angle));
  }
}

}  // namespace

std::vector<float> RandomLogits(uint32_t rows, uint32_t vocab_size, uint64_t seed) {
  std::vector<float> logits(static_cast<size_t>(rows) * vocab_size);
  const uint64_t row_seed = SplitMix64(seed).Next();
  for (uint32_t row = 0; row < rows; ++row) {
    // An independent stream per row, so row r does not depend on how many rows come before it.
    SplitMix64 rng(SplitMix64(row_seed ^ (uint64_t{row} * 0xd1342543de82ef95ull)).Next());
    float* out = logits.data() + static_cast<size_t>(row) * vocab_size;

    const double sigma = rng.Uniform(2.0, 3.0);
    FillStandardNormal(rng, out, vocab_size, static_cast<float>(sigma));

    const uint64_t peaks = std::min<uint64_t>(1 + rng.Below(8), vocab_size);
    double value =
        std::log(static_cast<double>(vocab_size)) + sigma * sigma / 2.0 + rng.Uniform(-1.0, 6.0);
    std::vector<uint32_t> chosen;
    chosen.reserve(peaks);
    while (chosen.size() < peaks) {
      const auto token = static_cast<uint32_t>(rng.Below(vocab_size));
      if (std::find(chosen.begin(), chosen.end(), token) != chosen.end()) continue;
      chosen.push_back(token);
      out[token] = static_cast<float>(value);
      value -= rng.Exponential();
    }
  }
  return logits;
}

std::vector<float> ToyModelLogits(uint64_t seed, int64_t second_last, int64_t last,
                                  uint32_t vocab_size) {
  SplitMix64 key(seed);
  key = SplitMix64(key.Next() ^ static_cast<uint64_t>(second_last + 1));
  key = SplitMix64(key.Next() ^ (static_cast<uint64_t>(last + 1) * 0x9e3779b97f4a7c15ull));
  return RandomLogits(1, vocab_size, key.Next());
}

std::vector<float> ToyDraftLogits(uint64_t seed, int64_t second_last, int64_t last,
                                  uint32_t vocab_size) {
  std::vector<float> row = ToyModelLogits(seed, second_last, last, vocab_size);
  const std::vector<float> noise =
      ToyModelLogits(seed ^ 0x5bd1e9955bd1e995ull, second_last, last, vocab_size);
  for (size_t i = 0; i < row.size(); ++i) row[i] = 0.8f * row[i] + 0.2f * noise[i];
  return row;
}

}  // namespace tokensampler::cli
