// Synthetic next-token logits for the CLI (`tokensampler sample --random`), shaped like real
// model output as DESIGN.md's "Benchmark data" describes: per row, bulk values σ·N(0,1) with σ
// drawn from U[2, 3), plus 1–8 peaked tokens, the top one at ln V + σ²/2 + U[-1, 6) and each next
// one lower by an Exp(1) gap.
// Reproducible: the values depend only on (seed, row, vocab_size), through our own generator
// (SplitMix64) and our own bits → uniform / normal / exponential conversions, never on
// standard-library distributions (whose output differs between implementations). Row r is the
// same whatever the number of rows.
// Pure functions: thread-safe.
#ifndef TOKENSAMPLER_CLIENT_CLI_RANDOM_LOGITS_H_
#define TOKENSAMPLER_CLIENT_CLI_RANDOM_LOGITS_H_

#include <cstdint>
#include <vector>

namespace tokensampler::cli {

// Returns rows × vocab_size logits, row-major. REQUIRES: vocab_size > 0.
std::vector<float> RandomLogits(uint32_t rows, uint32_t vocab_size, uint64_t seed);

// A toy trigram "language model" for demos (`tokensampler decode`): the next-token logits after
// the tokens `second_last`, `last` (-1 where the history is shorter) are one row of RandomLogits
// keyed by (seed, second_last, last). The same history always gives the same row.
// REQUIRES: vocab_size > 0.
std::vector<float> ToyModelLogits(uint64_t seed, int64_t second_last, int64_t last,
                                  uint32_t vocab_size);

// The draft model of `tokensampler decode --speculative`: a weaker copy of the toy model,
// 0.8 × its row + 0.2 × an unrelated row (the toy model with another seed) for the same history
// (smoothed and perturbed). REQUIRES: vocab_size > 0.
std::vector<float> ToyDraftLogits(uint64_t seed, int64_t second_last, int64_t last,
                                  uint32_t vocab_size);

}  // namespace tokensampler::cli

#endif  // TOKENSAMPLER_CLIENT_CLI_RANDOM_LOGITS_H_
