// Google Benchmark suites for the core pipeline, one per chain and vocabulary, on DESIGN.md's
// realistic rows. Run: build/tests/bench/core_benchmark --benchmark_filter=…
#include <cstring>
#include <vector>

#include "benchmark/benchmark.h"
#include "client/cli/random_logits.h"
#include "core/sampler.h"
#include "tests/bench/chain.h"

namespace tokensampler::bench {
namespace {

void BM_Chain(benchmark::State& state, const std::string& spec) {
  const int vocab = static_cast<int>(state.range(0));
  constexpr int kRows = 64;
  const std::vector<float> values =
      cli::RandomLogits(kRows, static_cast<uint32_t>(vocab), /*seed=*/1);
  std::vector<uint8_t> bytes(values.size() * 4);
  std::memcpy(bytes.data(), values.data(), bytes.size());
  const Chain chain = *ParseChain(spec);
  const std::vector<int32_t> history(static_cast<size_t>(chain.history_tokens), 7);
  Sampler sampler;
  int row = 0;
  for (auto _ : state) {
    auto view =
        LogitsView::Create(DType::kFloat32, 1, static_cast<uint32_t>(vocab),
                           absl::MakeConstSpan(bytes.data() + static_cast<size_t>(row) * vocab * 4,
                                               static_cast<size_t>(vocab) * 4));
    const RowRequest req{&chain.params, {}, history, std::nullopt};
    benchmark::DoNotOptimize(sampler.Run(*view, {&req, 1}));
    row = (row + 1) % kRows;
  }
  state.SetItemsProcessed(state.iterations());
}

void Register() {
  for (const std::string& spec : DefaultChains()) {
    benchmark::RegisterBenchmark(("chain/" + spec).c_str(),
                                 [spec](benchmark::State& s) { BM_Chain(s, spec); })
        ->Arg(32000)
        ->Arg(128256)
        ->Unit(benchmark::kMicrosecond);
  }
}

}  // namespace
}  // namespace tokensampler::bench

int main(int argc, char** argv) {
  tokensampler::bench::Register();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  return 0;
}
