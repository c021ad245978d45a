// tokensampler-bench: how long the core pipeline takes per row, against the cost of reading
// the row once. Prints one JSON line per chain:
//   {"chain":…, "pipeline":"fast"|"reference", "mode":"row"|"batch", "vocab":…, "dtype":…,
//    "rows":…, "threads":…, "us_per_row_median":…, "us_per_row_mean":…, "floor_us_per_row":…,
//    "ratio_to_floor":…}
// mode "row" times one row per call (latency; --threads 1), "batch" the whole batch per call
// divided by its rows (throughput; --threads N > 1, or --batch). A first untimed pass warms up.
// The floor is a single streaming read (SIMD) of the same rows, measured in the same run the same
// way (rows visited in order, so each row comes from outside the core's caches both times).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "client/cli/random_logits.h"
#include "core/kernels.h"
#include "core/reference.h"
#include "core/sampler.h"
#include "core/tensor.h"
#include "tbb/task_arena.h"
#include "tests/bench/chain.h"
#include "tests/bench/rpc_bench.h"

ABSL_FLAG(std::string, logits, "",
          "raw logits file (row-major); rows = size / (vocab · dtype size)");
ABSL_FLAG(bool, generate, false, "generate DESIGN.md's realistic logits instead of --logits");
ABSL_FLAG(int, rows, 64, "rows to generate");
ABSL_FLAG(int, vocab, 128256, "vocabulary size");
ABSL_FLAG(std::string, dtype, "f32", "f32 | bf16 | f16");
ABSL_FLAG(uint64_t, seed, 1, "seed of the generated logits");
// --chain is repeatable and its value contains commas, which a std::vector<std::string> flag
// would split: main() takes every --chain out of argv before Abseil parses the rest.
ABSL_FLAG(std::string, chain, "",
          "a chain like 'top_k=50,top_p=0.95,temperature=0.8' (repeatable; default: chains a–f "
          "and typical_p=0.9); 'history=N' adds N random output tokens");
ABSL_FLAG(int, threads, 1, "oneTBB threads");
ABSL_FLAG(int, repetitions, 5, "passes over all rows per chain");
ABSL_FLAG(bool, batch, false,
          "time whole batches (throughput per row) also with --threads 1, as with more threads");
ABSL_FLAG(bool, reference, false,
          "time the reference pipeline (core/reference.h, the tests' oracle) instead; one thread");

namespace tokensampler::bench {
namespace {

using Clock = std::chrono::steady_clock;

double Micros(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

// The floor: every byte read once with the widest SIMD loads the machine has (kernels.h).
uint64_t StreamingRead(const uint8_t* data, size_t bytes) {
  return kernels::StreamingRead(data, bytes);
}

struct Stats {
  double median = 0.0;
  double mean = 0.0;
};
Stats Summarise(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  Stats s;
  s.median = v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
  for (double x : v) s.mean += x;
  s.mean /= static_cast<double>(v.size());
  return s;
}

std::vector<std::string>& Chains() {
  static std::vector<std::string> chains;
  return chains;
}

int Main() {
  const int vocab = absl::GetFlag(FLAGS_vocab);
  const std::string dtype_name = absl::GetFlag(FLAGS_dtype);
  DType dtype;
  if (dtype_name == "f32")
    dtype = DType::kFloat32;
  else if (dtype_name == "bf16")
    dtype = DType::kBFloat16;
  else if (dtype_name == "f16")
    dtype = DType::kFloat16;
  else {
    std::cerr << "error: --dtype must be f32, bf16 or f16, got " << dtype_name << "\n";
    return 2;
  }
  if (vocab <= 0) {
    std::cerr << "error: --vocab must be > 0\n";
    return 2;
  }
  const size_t row_bytes = static_cast<size_t>(vocab) * DTypeSize(dtype);
  std::vector<uint8_t> bytes;
  if (absl::GetFlag(FLAGS_generate)) {
    const std::vector<float> values =
        cli::RandomLogits(static_cast<uint32_t>(absl::GetFlag(FLAGS_rows)),
                          static_cast<uint32_t>(vocab), absl::GetFlag(FLAGS_seed));
    bytes.resize(values.size() * DTypeSize(dtype));
    for (size_t i = 0; i < values.size(); ++i) {
      if (dtype == DType::kFloat32) {
        std::memcpy(bytes.data() + 4 * i, &values[i], 4);
      } else {
        const uint16_t h =
            dtype == DType::kBFloat16 ? FloatToBf16(values[i]) : FloatToFp16(values[i]);
        std::memcpy(bytes.data() + 2 * i, &h, 2);
      }
    }
  } else if (!absl::GetFlag(FLAGS_logits).empty()) {
    std::ifstream in(absl::GetFlag(FLAGS_logits), std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
    if (!in.good() && !in.eof()) {
      std::cerr << "error: cannot read " << absl::GetFlag(FLAGS_logits) << "\n";
      return 2;
    }
    if (bytes.empty() || bytes.size() % row_bytes != 0) {
      std::cerr << "error: " << absl::GetFlag(FLAGS_logits) << " has " << bytes.size()
                << " bytes, not a whole number of rows of " << row_bytes << " bytes\n";
      return 2;
    }
  } else {
    std::cerr << "error: give --logits FILE or --generate\n";
    return 2;
  }
  const int rows = static_cast<int>(bytes.size() / row_bytes);
  const int threads = absl::GetFlag(FLAGS_threads);
  const int reps = std::max(1, absl::GetFlag(FLAGS_repetitions));
  std::vector<std::string> specs = Chains();
  if (specs.empty()) specs = DefaultChains();

  const bool reference = absl::GetFlag(FLAGS_reference);
  const bool batch_mode = absl::GetFlag(FLAGS_batch);
  if (reference && (threads != 1 || batch_mode)) {
    std::cerr << "error: --reference runs row by row on one thread (--threads 1, no --batch)\n";
    return 2;
  }
  tbb::task_arena arena(threads);
  Sampler sampler;
  ReferenceSampler reference_sampler;
  volatile uint64_t sink = 0;
  for (const std::string& spec : specs) {
    absl::StatusOr<Chain> chain = ParseChain(spec);
    if (!chain.ok()) {
      std::cerr << "error: " << chain.status().message() << "\n";
      return 2;
    }
    if (absl::Status s = ValidateParams(chain->params, vocab); !s.ok()) {
      std::cerr << "error: chain " << spec << ": " << s.message() << "\n";
      return 2;
    }
    std::vector<int32_t> history(static_cast<size_t>(chain->history_tokens));
    for (size_t i = 0; i < history.size(); ++i) {
      history[i] = static_cast<int32_t>((i * 2654435761u) % static_cast<size_t>(vocab));
    }
    std::vector<double> floor_us, sample_us;
    // Repetition 0 warms up (scratch buffers grow, pages fault in) and is not timed.
    for (int rep = -1; rep < reps; ++rep) {
      const size_t floor_mark = floor_us.size(), sample_mark = sample_us.size();
      for (int r = 0; r < rows; ++r) {
        const auto t0 = Clock::now();
        sink = sink ^ StreamingRead(bytes.data() + static_cast<size_t>(r) * row_bytes, row_bytes);
        floor_us.push_back(Micros(Clock::now() - t0));
      }
      if (threads == 1 && !batch_mode) {
        // One row at a time: per-row latency, rows visited in order like the floor.
        for (int r = 0; r < rows; ++r) {
          auto view = LogitsView::Create(
              dtype, 1, static_cast<uint32_t>(vocab),
              absl::MakeConstSpan(bytes.data() + static_cast<size_t>(r) * row_bytes, row_bytes));
          const RowRequest row{&chain->params, {}, history, std::nullopt};
          absl::StatusOr<std::vector<SampledToken>> out;
          const auto t0 = Clock::now();
          if (reference) {
            out = reference_sampler.Run(*view, {&row, 1});
          } else {
            arena.execute([&] { out = sampler.Run(*view, {&row, 1}); });
          }
          sample_us.push_back(Micros(Clock::now() - t0));
          if (!out.ok()) {
            std::cerr << "error: " << out.status().message() << "\n";
            return 1;
          }
          sink = sink + static_cast<uint64_t>((*out)[0].token_id);
        }
      } else {
        // The whole batch in parallel: throughput per row.
        auto view = LogitsView::Create(dtype, static_cast<uint32_t>(rows),
                                       static_cast<uint32_t>(vocab), bytes);
        const std::vector<RowRequest> batch(static_cast<size_t>(rows),
                                            RowRequest{&chain->params, {}, history, std::nullopt});
        absl::StatusOr<std::vector<SampledToken>> out;
        const auto t0 = Clock::now();
        arena.execute([&] { out = sampler.Run(*view, batch); });
        sample_us.push_back(Micros(Clock::now() - t0) / rows);
        if (!out.ok()) {
          std::cerr << "error: " << out.status().message() << "\n";
          return 1;
        }
      }
      if (rep < 0) {
        floor_us.resize(floor_mark);
        sample_us.resize(sample_mark);
      }
    }
    const Stats sample = Summarise(sample_us);
    const Stats floor = Summarise(floor_us);
    std::printf(
        "{\"chain\":\"%s\",\"pipeline\":\"%s\",\"mode\":\"%s\",\"vocab\":%d,\"dtype\":\"%s\","
        "\"rows\":%d,\"threads\":%d,"
        "\"us_per_row_median\":%.2f,\"us_per_row_mean\":%.2f,\"floor_us_per_row\":%.2f,"
        "\"ratio_to_floor\":%.2f}\n",
        spec.c_str(), reference ? "reference" : "fast",
        threads == 1 && !batch_mode ? "row" : "batch", vocab, dtype_name.c_str(), rows, threads,
        sample.median, sample.mean, floor.median, sample.median / floor.median);
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace
}  // namespace tokensampler::bench

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "tokensampler-bench (--generate --rows 64 --vocab V --seed S | --logits FILE --vocab V "
      "--dtype f32|bf16|f16) [--chain SPEC]... [--threads N]\n"
      "tokensampler-bench rpc [--paths tcp,uds,shm,sparse] [--batches 32,64] "
      "[--vocabs 128256,151936] [--dtypes f32,bf16] [--steps N] [--threads N]\n"
      "tokensampler-bench rpc --load [--load_rpc sample|session] [--concurrency N] "
      "[--duration S] [--paths P] [--rows R --vocab V --dtype D]");
  // `tokensampler-bench rpc ...`: the service through its transports (rpc_bench.cc).
  const bool rpc = argc > 1 && std::string(argv[1]) == "rpc";
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    if (rpc && i == 1) continue;
    const std::string arg = argv[i];
    if (arg == "--chain" && i + 1 < argc) {
      tokensampler::bench::Chains().push_back(argv[++i]);
    } else if (arg.rfind("--chain=", 0) == 0) {
      tokensampler::bench::Chains().push_back(arg.substr(8));
    } else {
      rest.push_back(argv[i]);
    }
  }
  absl::ParseCommandLine(static_cast<int>(rest.size()), rest.data());
  return rpc ? tokensampler::bench::RpcMain() : tokensampler::bench::Main();
}
