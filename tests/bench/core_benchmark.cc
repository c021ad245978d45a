// Google Benchmark suites for the core pipeline: one per SIMD kernel (on one row in cache) and
// one per chain and vocabulary, on DESIGN.md's realistic rows. Run:
// build/tests/bench/core_benchmark --benchmark_filter=…
#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "benchmark/benchmark.h"
#include "client/cli/random_logits.h"
#include "core/kernels.h"
#include "core/sampler.h"
#include "core/speculative.h"
#include "core/tensor.h"
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
                           absl::MakeConstSpan(bytes.data() + static_cast<size_t>(row) *
                                                                  static_cast<size_t>(vocab) * 4,
                                               static_cast<size_t>(vocab) * 4));
    const RowRequest req{&chain.params, {}, history, std::nullopt};
    benchmark::DoNotOptimize(sampler.Run(*view, {&req, 1}));
    row = (row + 1) % kRows;
  }
  state.SetItemsProcessed(state.iterations());
}

// Speculative verification of one sequence with k = 4 drafts, realistic rows: the drafts are the
// target rows' argmaxes (mostly accepted: up to 5 positions run the pipeline) or token 0 (the
// first is rejected: one position plus the residual draw). Point-mass drafts.
void BM_Verify(benchmark::State& state, bool accepted, float temperature) {
  const int vocab = static_cast<int>(state.range(0));
  constexpr int kDrafts = 4;
  const std::vector<float> values =
      cli::RandomLogits(kDrafts + 1, static_cast<uint32_t>(vocab), /*seed=*/5);
  std::vector<uint8_t> bytes(values.size() * 4);
  std::memcpy(bytes.data(), values.data(), bytes.size());
  std::vector<int32_t> drafts(kDrafts, 0);
  if (accepted) {
    for (int j = 0; j < kDrafts; ++j) {
      const auto row = values.begin() + static_cast<std::ptrdiff_t>(j) * vocab;
      drafts[static_cast<size_t>(j)] =
          static_cast<int32_t>(std::max_element(row, row + vocab) - row);
    }
  }
  SamplingParams params;
  params.temperature = temperature;
  params.top_p = 0.95f;
  params.seed = 1;
  const auto view =
      LogitsView::Create(DType::kFloat32, kDrafts + 1, static_cast<uint32_t>(vocab), bytes);
  Sampler sampler;
  Verifier verifier(sampler);
  VerifyRowRequest row;
  row.row = RowRequest{&params, {}, {}, std::nullopt};
  row.drafts.token_ids = drafts;
  int64_t emitted = 0;
  for (auto _ : state) {
    auto result = verifier.Run(*view, {&row, 1});
    emitted += static_cast<int64_t>((*result)[0].tokens.size());
    benchmark::DoNotOptimize(result);
  }
  state.counters["tokens"] =
      benchmark::Counter(static_cast<double>(emitted), benchmark::Counter::kAvgIterations);
}

// One realistic row in L2 (the state after pass 1), for the kernels.
struct KernelRow {
  explicit KernelRow(size_t vocab)
      : values(cli::RandomLogits(1, static_cast<uint32_t>(vocab), /*seed=*/3)),
        work(values),
        weights(vocab),
        ids(vocab) {
    for (float v : values) max = std::max(max, v);
  }
  std::vector<float> values, work, weights;
  std::vector<int32_t> ids;
  float max = -1e30f;
};

void BM_DecodeMax(benchmark::State& state, DType dtype, float divisor) {
  const size_t vocab = static_cast<size_t>(state.range(0));
  KernelRow row(vocab);
  std::vector<uint8_t> bytes(vocab * DTypeSize(dtype));
  for (size_t i = 0; i < vocab; ++i) {
    if (dtype == DType::kFloat32) {
      std::memcpy(bytes.data() + 4 * i, &row.values[i], 4);
    } else {
      const uint16_t h =
          dtype == DType::kBFloat16 ? FloatToBf16(row.values[i]) : FloatToFp16(row.values[i]);
      std::memcpy(bytes.data() + 2 * i, &h, 2);
    }
  }
  for (auto _ : state) {
    benchmark::DoNotOptimize(
        kernels::DecodeMax(dtype, bytes.data(), 0, vocab, divisor, row.work.data()));
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(bytes.size()));
}

void BM_Weights(benchmark::State& state) {
  const size_t vocab = static_cast<size_t>(state.range(0));
  KernelRow row(vocab);
  for (auto _ : state) {
    benchmark::DoNotOptimize(
        kernels::Weights(row.work.data(), nullptr, row.weights.data(), 0, vocab, 1.0f, row.max));
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(vocab));
}

void BM_SumExp(benchmark::State& state, float divisor) {
  // The normaliser alone (the draw of a row nothing truncates: weights summed, not stored); with a
  // divisor, the draw of chain b, whose temperature is still pending on a float32 row.
  const size_t vocab = static_cast<size_t>(state.range(0));
  KernelRow row(vocab);
  for (auto _ : state) {
    benchmark::DoNotOptimize(
        kernels::SumExp(row.work.data(), 0, vocab, divisor, row.max / divisor));
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(vocab));
}

void BM_WeightedLogits(benchmark::State& state, bool fused) {
  // typical_p's and eta's Σ w·(v − max): in the weights pass (fused) against weights and then a
  // pass of its own.
  const size_t vocab = static_cast<size_t>(state.range(0));
  KernelRow row(vocab);
  double weighted = 0.0;
  for (auto _ : state) {
    size_t count = 0;
    if (fused) {
      benchmark::DoNotOptimize(kernels::WeightsAndHead(row.work.data(), nullptr, row.weights.data(),
                                                       0, vocab, 1.0f, row.max, 0.0f, nullptr,
                                                       &count, &weighted));
    } else {
      benchmark::DoNotOptimize(
          kernels::Weights(row.work.data(), nullptr, row.weights.data(), 0, vocab, 1.0f, row.max));
      weighted = kernels::WeightedLogits(row.work.data(), row.weights.data(), 0, vocab, row.max);
    }
    benchmark::DoNotOptimize(weighted);
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(vocab));
}

void BM_CutWeightBelow(benchmark::State& state) {
  const size_t vocab = static_cast<size_t>(state.range(0));
  KernelRow row(vocab);
  kernels::Weights(row.work.data(), nullptr, row.weights.data(), 0, vocab, 1.0f, row.max);
  for (auto _ : state) {
    // A threshold nothing is below: the pass runs whole every time without changing the row.
    benchmark::DoNotOptimize(kernels::CutWeightBelow(row.work.data(), row.work.data(),
                                                     row.weights.data(), 0, vocab, 0.0f));
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(vocab));
}

void BM_MassInRanges(benchmark::State& state) {
  // The bracketing pass of top_p / typical_p: mass and count of tokens in each value range.
  const size_t vocab = static_cast<size_t>(state.range(0));
  const int ranges = static_cast<int>(state.range(1));
  KernelRow row(vocab);
  kernels::Weights(row.work.data(), nullptr, row.weights.data(), 0, vocab, 1.0f, row.max);
  std::vector<float> from(static_cast<size_t>(ranges)), to(from.size(), row.max);
  std::vector<double> sums(from.size());
  std::vector<int64_t> counts(from.size());
  for (int j = 0; j < ranges; ++j)
    from[static_cast<size_t>(j)] = row.max - 1.0f - 0.5f * static_cast<float>(j);
  for (auto _ : state) {
    kernels::MassInRanges(row.work.data(), row.weights.data(), 0, vocab, from.data(), to.data(),
                          ranges, sums.data(), counts.data());
    benchmark::DoNotOptimize(sums.data());
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(vocab));
}

void BM_SelectRanges(benchmark::State& state) {
  // Selecting the tokens within 8 of the maximum (top_k's candidates, one-sided).
  const size_t vocab = static_cast<size_t>(state.range(0));
  KernelRow row(vocab);
  const float inf = std::numeric_limits<float>::infinity();
  for (auto _ : state) {
    benchmark::DoNotOptimize(kernels::SelectRanges(row.work.data(), 0, vocab, row.max - 8.0f, inf,
                                                   inf, -inf, row.ids.data()));
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(vocab));
}

void BM_SelectBand(benchmark::State& state, bool excluded) {
  // A band of the bulk, as typical_p's cut selects it (two-sided), with or without an inner
  // range left out (FindCut's band gather; its final selection has none).
  const size_t vocab = static_cast<size_t>(state.range(0));
  KernelRow row(vocab);
  const float out_from = excluded ? row.max - 9.0f : 1.0f,
              out_to = excluded ? row.max - 7.0f : 0.0f;
  for (auto _ : state) {
    benchmark::DoNotOptimize(kernels::SelectRanges(row.work.data(), 0, vocab, row.max - 12.0f,
                                                   row.max - 4.0f, out_from, out_to,
                                                   row.ids.data()));
  }
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(vocab));
}

void Register() {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    benchmark::RegisterBenchmark(
        (std::string("kernel/DecodeMax/") + std::string(DTypeName(dtype))).c_str(),
        [dtype](benchmark::State& s) { BM_DecodeMax(s, dtype, 1.0f); })
        ->Arg(128256)
        ->Unit(benchmark::kMicrosecond);
  }
  // Pass 1 with a temperature folded in (chains b, c, e, f in the default order).
  benchmark::RegisterBenchmark("kernel/DecodeMax/float32/temperature",
                               [](benchmark::State& s) { BM_DecodeMax(s, DType::kFloat32, 0.8f); })
      ->Arg(128256)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("kernel/SumExp", [](benchmark::State& s) { BM_SumExp(s, 1.0f); })
      ->Arg(128256)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("kernel/SumExp/temperature",
                               [](benchmark::State& s) { BM_SumExp(s, 0.8f); })
      ->Arg(128256)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("kernel/Weights", BM_Weights)
      ->Arg(128256)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("kernel/Weights/entropy/fused",
                               [](benchmark::State& s) { BM_WeightedLogits(s, true); })
      ->Arg(128256)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("kernel/Weights/entropy/two_passes",
                               [](benchmark::State& s) { BM_WeightedLogits(s, false); })
      ->Arg(128256)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("kernel/CutWeightBelow", BM_CutWeightBelow)
      ->Arg(128256)
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("kernel/MassInRanges", BM_MassInRanges)
      ->Args({128256, 1})
      ->Args({128256, 4})
      ->Args({128256, 16})
      ->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("kernel/SelectRanges", BM_SelectRanges)
      ->Arg(128256)
      ->Unit(benchmark::kMicrosecond);
  for (bool excluded : {false, true}) {
    benchmark::RegisterBenchmark(
        excluded ? "kernel/SelectRanges/band_minus_inner" : "kernel/SelectRanges/band",
        [excluded](benchmark::State& s) { BM_SelectBand(s, excluded); })
        ->Arg(128256)
        ->Unit(benchmark::kMicrosecond);
  }
  for (const auto& [name, accepted, temperature] :
       {std::tuple{"verify/k4_accepted_T0.8_top_p0.95", true, 0.8f},
        std::tuple{"verify/k4_rejected_T0.8_top_p0.95", false, 0.8f},
        std::tuple{"verify/k4_accepted_greedy", true, 0.0f}}) {
    benchmark::RegisterBenchmark(name,
                                 [accepted = accepted, temperature = temperature](
                                     benchmark::State& s) { BM_Verify(s, accepted, temperature); })
        ->Arg(128256)
        ->Unit(benchmark::kMicrosecond);
  }
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
