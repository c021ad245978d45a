// Parsing of benchmark chains: "top_k=50,top_p=0.95,temperature=0.8" → SamplingParams.
// Pure functions: thread-safe.
#ifndef TOKENSAMPLER_TESTS_BENCH_CHAIN_H_
#define TOKENSAMPLER_TESTS_BENCH_CHAIN_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/params.h"

namespace tokensampler::bench {

struct Chain {
  std::string name;
  SamplingParams params;
  int history_tokens = 0;  // random output tokens fed as history (for penalties)
};

// Keys: every scalar SamplingParams field by its proto name, plus `history=N`. Returns
// INVALID_ARGUMENT naming the bad key or value.
absl::StatusOr<Chain> ParseChain(absl::string_view spec);

// The default chains a–f plus typical_p 0.9.
std::vector<std::string> DefaultChains();

}  // namespace tokensampler::bench

#endif  // TOKENSAMPLER_TESTS_BENCH_CHAIN_H_
