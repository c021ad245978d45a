// The fast pipeline (SIMD kernels, sampled pivots, sparse tail, split rows) against the reference
// pipeline kept as the oracle: for random rows and random parameters of every kind they must
// agree exactly — the same token, the same logprob and the same processed distribution (every
// kept token and its value, via PROCESSED_LOGITS / PROCESSED_LOGPROBS with logprobs = -1) — and
// the fast one must give the same bits with 1 and 2 threads. Plus the kernels' own contracts.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/dist.h"
#include "core/kernels.h"
#include "core/reference.h"
#include "core/row.h"
#include "core/sampler.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tbb/task_arena.h"
#include "tests/testing/core_testing.h"

namespace tokensampler {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// DESIGN.md's realistic rows (bulk σ·N(0,1), σ ∈ [2,3); 1–8 peaked tokens) and harder shapes.
enum class Shape { kRealistic, kFlat, kTies, kMasked, kPosInf, kPeaked, kHuge };

std::vector<float> MakeRow(Shape shape, size_t vocab, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<float> row(vocab);
  const float sigma = 2.0f + uniform(rng);
  for (float& x : row) x = sigma * normal(rng);
  std::uniform_int_distribution<size_t> pick(0, vocab - 1);
  switch (shape) {
    case Shape::kRealistic: {
      float top =
          std::log(static_cast<float>(vocab)) + sigma * sigma / 2 - 1.0f + 7.0f * uniform(rng);
      const int peaks = 1 + static_cast<int>(uniform(rng) * 8);
      std::exponential_distribution<float> gap(1.0f);
      for (int i = 0; i < peaks; ++i, top -= gap(rng)) row[pick(rng)] = top;
      break;
    }
    case Shape::kFlat:
      for (float& x : row) x = 0.1f * normal(rng);
      break;
    case Shape::kTies:
      for (float& x : row) x = std::round(x * 2.0f) / 2.0f;  // few distinct values
      break;
    case Shape::kMasked:
      for (float& x : row) {
        if (uniform(rng) < 0.7f) x = -kInf;
      }
      row[pick(rng)] = 3.0f;
      break;
    case Shape::kPosInf:
      for (int i = 0; i < 3; ++i) row[pick(rng)] = kInf;
      break;
    case Shape::kPeaked:
      row[pick(rng)] = 60.0f;  // almost all the mass on one token
      break;
    case Shape::kHuge:
      // Near the float range: a temperature below 1 pushes some past it (to +inf), not all.
      for (float big : {3.3e38f, 3.0e38f, 2.5e38f, 1.0e38f, -3.0e38f}) row[pick(rng)] = big;
      break;
  }
  return row;
}

SamplingParams RandomParams(std::mt19937_64& rng, int32_t vocab) {
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  const auto one_of = [&](std::initializer_list<float> xs) {
    return *(xs.begin() + static_cast<ptrdiff_t>(u(rng) * static_cast<float>(xs.size()) * 0.999f));
  };
  SamplingParams p;
  p.seed = rng();
  p.temperature = one_of({0.0f, 0.3f, 0.8f, 1.0f, 1.0f, 1.7f});
  if (u(rng) < 0.15f) {
    p.mirostat_mode = u(rng) < 0.5f ? 1 : 2;
    p.mirostat_tau = one_of({2.0f, 5.0f, 8.0f});
    p.mirostat_eta = 0.1f;
  } else {
    if (u(rng) < 0.5f) p.top_k = static_cast<int32_t>(one_of({1, 5, 50, 1000, 40000, 200000}));
    if (u(rng) < 0.5f) p.top_p = one_of({0.3f, 0.9f, 0.95f, 0.999f});
    if (u(rng) < 0.3f) p.min_p = one_of({0.01f, 0.05f, 0.2f});
    if (u(rng) < 0.2f) p.typical_p = one_of({0.2f, 0.9f, 0.99f});
    if (u(rng) < 0.15f) p.epsilon_cutoff = one_of({3e-5f, 3e-4f, 0.2f});
    if (u(rng) < 0.15f) p.eta_cutoff = one_of({2e-4f, 1e-3f});
    if (u(rng) < 0.15f) p.top_n_sigma = one_of({0.5f, 1.0f, 2.5f});
    if (u(rng) < 0.15f) {
      p.xtc_probability = one_of({0.5f, 1.0f});
      p.xtc_threshold = one_of({0.05f, 0.1f, 0.3f});
    }
    if (u(rng) < 0.1f) {
      p.dynatemp_range = 0.5f;
      p.temperature = std::max(p.temperature, 0.5f);
    }
    if (u(rng) < 0.15f) {  // a custom order: a random permutation of every stage
      p.sampler_order = {Stage::kTemperature, Stage::kTopK,      Stage::kTopP,
                         Stage::kMinP,        Stage::kTypicalP,  Stage::kEpsilonCutoff,
                         Stage::kEtaCutoff,   Stage::kTopNSigma, Stage::kXtc};
      std::shuffle(p.sampler_order.begin(), p.sampler_order.end(), rng);
    }
  }
  if (u(rng) < 0.2f) {
    p.repetition_penalty = 1.2f;
    p.frequency_penalty = 0.5f;
    p.presence_penalty = 0.3f;
  }
  if (u(rng) < 0.1f) p.logit_bias = {{0, 5.0f}, {vocab - 1, -kInf}};
  if (u(rng) < 0.2f) p.n = 3;
  const float mode = u(rng);
  p.logprobs = -1;
  p.logprobs_mode = mode < 0.45f   ? LogprobsMode::kProcessedLogits
                    : mode < 0.9f  ? LogprobsMode::kProcessedLogprobs
                    : mode < 0.95f ? LogprobsMode::kRawLogprobs
                                   : LogprobsMode::kRawLogits;
  return p;
}

struct Case {
  Shape shape;
  size_t vocab;
  int rows;
  uint64_t seed;
};

std::string Describe(const SamplingParams& p) {
  return absl::StrCat("T=", p.temperature, " top_k=", p.top_k, " top_p=", p.top_p,
                      " min_p=", p.min_p, " typical=", p.typical_p, " eps=", p.epsilon_cutoff,
                      " eta=", p.eta_cutoff, " nsigma=", p.top_n_sigma.value_or(0),
                      " xtc=", p.xtc_probability, "/", p.xtc_threshold, " dyn=", p.dynatemp_range,
                      " miro=", p.mirostat_mode, " order=", p.sampler_order.size(), " n=", p.n,
                      " mode=", static_cast<int>(p.logprobs_mode));
}

void ExpectSame(const std::vector<SampledToken>& fast, const std::vector<SampledToken>& ref,
                const std::string& where) {
  ASSERT_EQ(fast.size(), ref.size()) << where;
  for (size_t i = 0; i < fast.size(); ++i) {
    const SampledToken& a = fast[i];
    const SampledToken& b = ref[i];
    ASSERT_EQ(a.token_id, b.token_id) << where << " result " << i;
    ASSERT_EQ(a.logprob, b.logprob) << where << " result " << i;
    ASSERT_EQ(a.mirostat_mu, b.mirostat_mu) << where << " result " << i;
    ASSERT_EQ(a.finish_reason, b.finish_reason) << where;
    ASSERT_EQ(a.top_logprobs.size(), b.top_logprobs.size()) << where << " result " << i;
    for (size_t j = 0; j < a.top_logprobs.size(); ++j) {
      ASSERT_EQ(a.top_logprobs[j].token_id, b.top_logprobs[j].token_id) << where << " #" << j;
      ASSERT_EQ(a.top_logprobs[j].logprob, b.top_logprobs[j].logprob) << where << " #" << j;
    }
  }
}

// The fast sampler on `threads` threads: with 1 a row runs whole on its thread (pass 1 can stream
// top_k), with 2 a single large row is split over both.
absl::StatusOr<std::vector<SampledToken>> RunOn(int threads, const Sampler& fast,
                                                const LogitsView& view,
                                                absl::Span<const RowRequest> rows) {
  tbb::task_arena arena(threads);
  absl::StatusOr<std::vector<SampledToken>> got;
  arena.execute([&] { got = fast.Run(view, rows); });
  return got;
}

// One request through the reference and through the fast sampler on 1 and 2 threads: the same
// results.
void ExpectFastMatchesReference(const LogitsView& view, const RowRequest& req,
                                const std::string& where) {
  const Sampler fast;
  const ReferenceSampler reference;
  const auto want = reference.Run(view, {&req, 1});
  ASSERT_TRUE(want.ok()) << want.status();
  for (int threads : {1, 2}) {
    const auto got = RunOn(threads, fast, view, {&req, 1});
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectSame(*got, *want, absl::StrCat(where, " threads ", threads));
  }
}

void RunCase(const Case& c) {
  std::mt19937_64 rng(c.seed);
  const int32_t vocab = static_cast<int32_t>(c.vocab);
  std::vector<float> values;
  std::vector<SamplingParams> params(static_cast<size_t>(c.rows));
  for (auto& p : params) p = RandomParams(rng, vocab);
  for (int r = 0; r < c.rows; ++r) {
    const std::vector<float> row = MakeRow(c.shape, c.vocab, rng);
    values.insert(values.end(), row.begin(), row.end());
  }
  std::vector<int32_t> history(64);
  for (size_t i = 0; i < history.size(); ++i) {
    history[i] = static_cast<int32_t>((i * 2654435761u) % c.vocab);
  }
  std::vector<RowRequest> rows;
  for (const SamplingParams& p : params) {
    ASSERT_TRUE(ValidateParams(p, vocab).ok()) << Describe(p);
    rows.push_back({&p, history, {history.data(), 8}, std::nullopt});
  }
  const std::vector<uint8_t> bytes = testing::F32Bytes(values);
  auto view = LogitsView::Create(DType::kFloat32, static_cast<uint32_t>(c.rows),
                                 static_cast<uint32_t>(c.vocab), bytes);
  ASSERT_TRUE(view.ok());
  const Sampler fast;
  const ReferenceSampler reference;
  // Row by row, so that a failure names the parameters.
  for (size_t r = 0; r < rows.size(); ++r) {
    auto one = LogitsView::Create(DType::kFloat32, 1, static_cast<uint32_t>(c.vocab),
                                  absl::MakeConstSpan(bytes.data() + r * c.vocab * 4, c.vocab * 4));
    ASSERT_TRUE(one.ok());
    const auto want = reference.Run(*one, {&rows[r], 1});
    ASSERT_TRUE(want.ok()) << want.status();
    for (int threads : {1, 2}) {
      tbb::task_arena arena(threads);
      absl::StatusOr<std::vector<SampledToken>> got;
      arena.execute([&] { got = fast.Run(*one, {&rows[r], 1}); });
      ASSERT_TRUE(got.ok()) << got.status();
      ExpectSame(*got, *want,
                 absl::StrCat("vocab ", c.vocab, " row ", r, " threads ", threads, ": ",
                              Describe(params[r])));
    }
  }
  // The whole batch at once, with rows spread over threads.
  const auto want = reference.Run(*view, rows);
  ASSERT_TRUE(want.ok());
  tbb::task_arena arena(2);
  absl::StatusOr<std::vector<SampledToken>> got;
  arena.execute([&] { got = fast.Run(*view, rows); });
  ASSERT_TRUE(got.ok());
  ExpectSame(*got, *want, "batch");
  // The samples read float32 rows where they are and never write them.
  EXPECT_EQ(bytes, testing::F32Bytes(values));
}

void PrintTo(const Case& c, std::ostream* os) {
  *os << "shape " << static_cast<int>(c.shape) << ", vocab " << c.vocab << ", " << c.rows
      << " rows, seed " << c.seed;
}

class FastEqualsReferenceTest : public ::testing::TestWithParam<Case> {};

TEST_P(FastEqualsReferenceTest, SameTokensLogprobsAndKeptSets) { RunCase(GetParam()); }

INSTANTIATE_TEST_SUITE_P(
    Shapes, FastEqualsReferenceTest,
    ::testing::Values(Case{Shape::kRealistic, 128256, 24, 1}, Case{Shape::kRealistic, 32000, 60, 2},
                      Case{Shape::kRealistic, 5000, 300, 3}, Case{Shape::kFlat, 32000, 30, 4},
                      Case{Shape::kFlat, 3000, 200, 5}, Case{Shape::kTies, 32000, 30, 6},
                      Case{Shape::kTies, 2000, 300, 7}, Case{Shape::kMasked, 20000, 40, 8},
                      Case{Shape::kPosInf, 9000, 40, 9}, Case{Shape::kPeaked, 50000, 30, 10},
                      Case{Shape::kRealistic, 37, 300, 11}, Case{Shape::kTies, 100, 300, 12},
                      Case{Shape::kHuge, 20000, 80, 13}, Case{Shape::kHuge, 50, 400, 14}),
    [](const ::testing::TestParamInfo<Case>& param) {
      return absl::StrCat("case", param.index, "_vocab", param.param.vocab);
    });

// `rows` realistic rows of `vocab` tokens, one after the other.
std::vector<float> RealisticRows(int rows, size_t vocab, std::mt19937_64& rng) {
  std::vector<float> values;
  for (int r = 0; r < rows; ++r) {
    const std::vector<float> row = MakeRow(Shape::kRealistic, vocab, rng);
    values.insert(values.end(), row.begin(), row.end());
  }
  return values;
}

// A float32 row is read where it is only when that is safe: rows not aligned for float reads
// and rows in another process's memory (shared) are copied by pass 1 instead. Every kind of
// view gives the same results (under the sanitizers, a misaligned float read would fail here).
TEST(FastTest, UnalignedAndSharedRowsSampleAlike) {
  std::mt19937_64 rng(31);
  constexpr size_t kVocab = 9000;
  constexpr int kRows = 3;
  const std::vector<float> values = RealisticRows(kRows, kVocab, rng);
  const std::vector<uint8_t> bytes = testing::F32Bytes(values);
  std::vector<uint8_t> shifted(bytes.size() + 1);
  std::copy(bytes.begin(), bytes.end(), shifted.begin() + 1);
  const auto aligned = LogitsView::Create(DType::kFloat32, kRows, kVocab, bytes);
  const auto unaligned =
      LogitsView::Create(DType::kFloat32, kRows, kVocab, absl::MakeConstSpan(shifted).subspan(1));
  const auto shared = LogitsView::Create(DType::kFloat32, kRows, kVocab, bytes, /*shared=*/true);
  ASSERT_TRUE(aligned.ok() && unaligned.ok() && shared.ok());
  // 16-bit rows at an odd address too (a request's bytes inside gRPC's slices can lie anywhere).
  const std::vector<uint8_t> halves = testing::Half16Bytes(values, DType::kBFloat16);
  std::vector<uint8_t> shifted_halves(halves.size() + 1);
  std::copy(halves.begin(), halves.end(), shifted_halves.begin() + 1);
  const auto halves_aligned = LogitsView::Create(DType::kBFloat16, kRows, kVocab, halves);
  const auto halves_unaligned = LogitsView::Create(DType::kBFloat16, kRows, kVocab,
                                                   absl::MakeConstSpan(shifted_halves).subspan(1));
  ASSERT_TRUE(halves_aligned.ok() && halves_unaligned.ok());
  const Sampler fast;
  for (int i = 0; i < 40; ++i) {
    const SamplingParams p = RandomParams(rng, kVocab);
    std::vector<RowRequest> rows(kRows, RowRequest{&p, {}, {}, std::nullopt});
    const auto want = RunOn(1, fast, *aligned, rows);
    ASSERT_TRUE(want.ok()) << want.status();
    for (const LogitsView* view : {&*unaligned, &*shared}) {
      const auto got = RunOn(1, fast, *view, rows);
      ASSERT_TRUE(got.ok()) << got.status();
      ExpectSame(*got, *want,
                 absl::StrCat(view == &*shared ? "shared " : "unaligned ", Describe(p)));
    }
    const auto want_halves = RunOn(1, fast, *halves_aligned, rows);
    const auto got_halves = RunOn(1, fast, *halves_unaligned, rows);
    ASSERT_TRUE(want_halves.ok() && got_halves.ok()) << got_halves.status();
    ExpectSame(*got_halves, *want_halves, absl::StrCat("unaligned bf16 ", Describe(p)));
  }
}

// A view in pieces (as the service receives requests: gRPC slices, rows straddling them) samples
// each row from a contiguous copy: the same results as the contiguous view, on one thread and on
// two (where a single row's blocks are split over both), and errors that name the request's row.
TEST(FastTest, RowsInPiecesSampleAsContiguousRows) {
  std::mt19937_64 rng(57);
  constexpr size_t kVocab = 9000;
  constexpr int kRows = 3;
  const std::vector<float> values = RealisticRows(kRows, kVocab, rng);
  const std::vector<uint8_t> bytes = testing::F32Bytes(values);
  // Pieces of 1 to 40000 bytes (most not a whole number of floats), and a few empty ones.
  std::vector<LogitsView::Piece> pieces;
  for (size_t at = 0; at < bytes.size();) {
    const size_t n =
        std::min<size_t>(bytes.size() - at, rng() % 5 == 0 ? rng() % 3 : rng() % 40000);
    pieces.push_back({at, absl::MakeConstSpan(bytes).subspan(at, n)});
    at += n;
  }
  const auto contiguous = LogitsView::Create(DType::kFloat32, kRows, kVocab, bytes);
  const auto in_pieces = LogitsView::CreateFromPieces(DType::kFloat32, kRows, kVocab, pieces);
  ASSERT_TRUE(contiguous.ok() && in_pieces.ok()) << in_pieces.status();
  ASSERT_TRUE(in_pieces->in_pieces());
  std::vector<uint8_t> copied(contiguous->RowSize());
  for (int r = 0; r < kRows; ++r) {
    in_pieces->CopyRow(r, copied.data());
    EXPECT_TRUE(std::equal(copied.begin(), copied.end(), contiguous->RowBytes(r))) << r;
  }
  const Sampler fast;
  for (int i = 0; i < 40; ++i) {
    const SamplingParams p = RandomParams(rng, kVocab);
    std::vector<RowRequest> rows(kRows, RowRequest{&p, {}, {}, std::nullopt});
    const auto want = RunOn(1, fast, *contiguous, rows);
    ASSERT_TRUE(want.ok()) << want.status();
    const auto got = RunOn(1, fast, *in_pieces, rows);
    ASSERT_TRUE(got.ok()) << got.status();
    ExpectSame(*got, *want, absl::StrCat("in pieces ", Describe(p)));
    // One row on two threads: its blocks are spread over both.
    std::vector<LogitsView::Piece> first_row;
    for (const LogitsView::Piece& piece : pieces) {
      if (piece.offset >= contiguous->RowSize()) break;
      first_row.push_back(piece);
      first_row.back().bytes = piece.bytes.subspan(
          0, std::min(piece.bytes.size(), contiguous->RowSize() - piece.offset));
    }
    const auto row0 = LogitsView::CreateFromPieces(DType::kFloat32, 1, kVocab, first_row);
    const auto row0_contiguous = LogitsView::Create(
        DType::kFloat32, 1, kVocab, absl::MakeConstSpan(bytes).subspan(0, contiguous->RowSize()));
    ASSERT_TRUE(row0.ok() && row0_contiguous.ok()) << row0.status();
    const auto want_split = RunOn(2, fast, *row0_contiguous, {rows.data(), 1});
    const auto got_split = RunOn(2, fast, *row0, {rows.data(), 1});
    ASSERT_TRUE(want_split.ok() && got_split.ok()) << got_split.status();
    ExpectSame(*got_split, *want_split, absl::StrCat("one row in pieces ", Describe(p)));
  }
  // A NaN in the last row is reported at that row of the request, not of the copy.
  std::vector<float> with_nan = values;
  with_nan[2 * kVocab + 17] = std::numeric_limits<float>::quiet_NaN();
  const std::vector<uint8_t> nan_bytes = testing::F32Bytes(with_nan);
  const std::vector<LogitsView::Piece> halves = {
      {0, absl::MakeConstSpan(nan_bytes).subspan(0, 50001)},
      {50001, absl::MakeConstSpan(nan_bytes).subspan(50001)}};
  const auto nan_view = LogitsView::CreateFromPieces(DType::kFloat32, kRows, kVocab, halves);
  ASSERT_TRUE(nan_view.ok());
  const SamplingParams plain;
  std::vector<RowRequest> rows(kRows, RowRequest{&plain, {}, {}, std::nullopt});
  const auto failed = RunOn(1, fast, *nan_view, rows);
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(failed.status().message(), ::testing::HasSubstr("NaN at row 2, token 17"));
}

// Penalties that only lower logits keep pass 1's maximum (unless they hit its token) and its
// top-k stream (after dropping what fell under the threshold). Here the history holds the
// maximum's token and many of the largest tokens, so both fix-ups are exercised, and rewards
// (negative penalties, a positive bias) that can raise tokens take the general way.
TEST(FastTest, PenaltiesOnTheLargestTokensKeepTopKExact) {
  std::mt19937_64 rng(41);
  constexpr size_t kVocab = 20000;
  for (int trial = 0; trial < 60; ++trial) {
    std::vector<float> row =
        MakeRow(trial % 2 == 0 ? Shape::kRealistic : Shape::kTies, kVocab, rng);
    std::vector<int32_t> order(kVocab);
    for (size_t i = 0; i < kVocab; ++i) order[i] = static_cast<int32_t>(i);
    std::partial_sort(order.begin(), order.begin() + 300, order.end(), [&](int32_t a, int32_t b) {
      return row[static_cast<size_t>(a)] > row[static_cast<size_t>(b)] ||
             (row[static_cast<size_t>(a)] == row[static_cast<size_t>(b)] && a < b);
    });
    // The history: the maximum's token (or not), and a random third of the largest 300 — or all
    // of them, which leaves fewer than k tokens above the stream's threshold.
    std::vector<int32_t> history;
    if (trial % 3 != 0) history.push_back(order[0]);
    for (size_t i = 1; i < 300; ++i) {
      if (trial % 6 == 5 || rng() % 3 == 0) history.push_back(order[i]);
    }
    const std::vector<uint8_t> bytes = testing::F32Bytes(row);
    auto view = LogitsView::Create(DType::kFloat32, 1, kVocab, bytes);
    ASSERT_TRUE(view.ok());
    SamplingParams p;
    p.seed = static_cast<uint64_t>(trial);
    p.temperature = std::vector<float>{1.0f, 0.8f, 0.8f, 0.0f}[static_cast<size_t>(trial) % 4];
    p.top_k = std::vector<int32_t>{1, 3, 50, 200, 256}[static_cast<size_t>(trial) % 5];
    p.repetition_penalty = 1.5f;
    p.presence_penalty = trial % 5 == 4 ? -1.0f : 2.0f;  // a reward sometimes
    if (trial % 7 == 6) p.logit_bias = {{order[400], 50.0f}};
    p.logprobs = -1;
    p.logprobs_mode = LogprobsMode::kProcessedLogits;
    const RowRequest req{&p, {}, history, std::nullopt};
    ExpectFastMatchesReference(*view, req,
                               absl::StrCat("trial ", trial, " k ", p.top_k, " T ", p.temperature));
  }
}

// With penalties on, the temperature is not applied in pass 1 but left pending, and top_k then
// selects by the undivided values and divides only its candidates. Dividing by 0.7 here merges
// neighbouring floats ([1.5, 1.5024) in steps of 2^-23 lands in [2.14, 2.15) in steps of 2^-22),
// so the k-th value often ties with the next one after division: every k must keep exactly the
// reference's set, including such ties (and a division to −inf is a removed token).
TEST(FastTest, TopKUnderAPendingTemperatureKeepsTheTiesDivisionMakes) {
  constexpr size_t kVocab = 20000;
  std::vector<float> row(kVocab);
  for (size_t i = 0; i < kVocab; ++i) row[i] = 1.5f + static_cast<float>(i) * 0x1.0p-23f;
  std::mt19937_64 rng(21);
  std::shuffle(row.begin(), row.end(), rng);
  // The largest values where top_k's pivot sample looks (every 19th token from the 9th), so that
  // for small k the candidates are exactly the few largest and the next one, outside, can tie.
  std::vector<float> top = row, sampled(kVocab);
  std::sort(top.begin(), top.end(), std::greater<>());
  std::vector<bool> at(kVocab);
  size_t next = 0;
  for (size_t i = 9; i < kVocab; i += kVocab / 1024) {
    sampled[i] = top[next++];
    at[i] = true;
  }
  std::shuffle(top.begin() + static_cast<ptrdiff_t>(next), top.end(), rng);
  for (size_t i = 0; i < kVocab; ++i) {
    if (!at[i]) sampled[i] = top[next++];
  }
  std::vector<float> overflowing = row;  // and one whose bulk divides to −inf
  for (size_t i = 0; i < kVocab; i += 2) overflowing[i] = -3e38f;
  for (const std::vector<float>* values : {&row, &sampled, &overflowing}) {
    // Penalised: token 7, and the 2nd and 5th largest tokens (not the maximum's: that takes the
    // general way), which leave the candidates — also when top_k has to divide the whole row and
    // select again (Dist::Materialize).
    std::vector<int32_t> by_value(kVocab);
    for (size_t i = 0; i < kVocab; ++i) by_value[i] = static_cast<int32_t>(i);
    std::partial_sort(
        by_value.begin(), by_value.begin() + 5, by_value.end(), [&](int32_t a, int32_t b) {
          return (*values)[static_cast<size_t>(a)] > (*values)[static_cast<size_t>(b)];
        });
    const std::vector<int32_t> history = {7, by_value[1], by_value[4]};
    const std::vector<uint8_t> bytes = testing::F32Bytes(*values);
    auto view = LogitsView::Create(DType::kFloat32, 1, kVocab, bytes);
    ASSERT_TRUE(view.ok());
    for (int32_t k : {1,  2,   3,   4,   5,    6,    7,    8,    40,    41,    50,   51,
                      99, 100, 101, 999, 1000, 1001, 4000, 9999, 10000, 10001, 15000}) {
      for (float temperature : {0.7f, 0.3f, 1e-30f, 1.3f}) {
        SamplingParams p;
        p.seed = 5;
        p.temperature = temperature;
        p.top_k = k;
        p.presence_penalty = 0.5f;
        p.logprobs = -1;
        p.logprobs_mode = LogprobsMode::kProcessedLogits;
        const RowRequest req{&p, {}, history, std::nullopt};
        ExpectFastMatchesReference(*view, req, absl::StrCat("k ", k, " T ", temperature));
      }
    }
  }
}

// A temperature below 1 can push the largest logits past the float range. They become +inf and
// then, as +inf input logits do, take the whole mass, uniformly: here T = 0.5 overflows 3e38 and
// 2e38 (not 1e38), so only tokens 3 and 7 can be drawn, each with probability 1/2, in the fast
// sampler and in the reference alike, static or dynamic temperature, with any stage after it.
// (The fast sampler once read before its kept list here: the pipeline fuzzer found it.)
TEST(FastTest, LogitsATemperaturePushesPastTheFloatRangeTakeTheMassUniformly) {
  std::vector<float> row(64, 1.0f);
  row[3] = 3.0e38f;
  row[7] = 2.0e38f;
  row[9] = 1.0e38f;
  const std::vector<uint8_t> bytes = testing::F32Bytes(row);
  auto view = LogitsView::Create(DType::kFloat32, 1, 64, bytes);
  ASSERT_TRUE(view.ok());
  const Sampler fast;
  const ReferenceSampler reference;
  for (const bool dynamic : {false, true}) {
    for (const float typical : {1.0f, 0.9f}) {
      std::set<int32_t> drawn;
      for (uint64_t seed = 0; seed < 200; ++seed) {
        SamplingParams p;
        p.temperature = 0.5f;
        if (dynamic) {
          p.temperature = 0.45f;
          p.dynatemp_range = 0.05f;  // T in [0.4, 0.5]: both overflow either way
        }
        p.typical_p = typical;
        p.seed = seed;
        p.logprobs = 0;
        p.logprobs_mode = LogprobsMode::kProcessedLogprobs;
        ASSERT_TRUE(ValidateParams(p, 64).ok());
        const RowRequest request{&p, {}, {}, std::nullopt};
        const auto want = reference.Run(*view, {&request, 1});
        absl::StatusOr<std::vector<SampledToken>> got;
        tbb::task_arena arena(2);
        arena.execute([&] { got = fast.Run(*view, {&request, 1}); });
        ASSERT_TRUE(want.ok()) << want.status();
        ASSERT_TRUE(got.ok()) << got.status();
        ExpectSame(*got, *want, absl::StrCat("dynamic ", dynamic, " typical ", typical));
        const SampledToken& token = (*got)[0];
        ASSERT_TRUE(token.token_id == 3 || token.token_id == 7) << token.token_id;
        EXPECT_FLOAT_EQ(token.logprob, std::log(0.5f));
        drawn.insert(token.token_id);
      }
      EXPECT_EQ(drawn, (std::set<int32_t>{3, 7})) << "200 seeds draw both tokens";
    }
  }
}

// The other side: a temperature below 1 can push the largest logit below −FLT_MAX, and every
// logit reads −inf once divided. Every token below the maximum lies at least a float spacing
// (≈ 1e31 here) below it, so its probability e^((l − max) / T) is 0: the row is uniform over the
// tokens at the maximum. Here tokens 3 and 7 hold −2e38 (÷ 0.5 = −4e38), token 9 −2.5e38 and the
// rest −3e38: only 3 and 7 can be drawn, each with probability 1/2 — in float32 (the pending
// temperature), bf16 (divided while decoding, then decoded again undivided), with a dynamic
// temperature, after typical_p, and with top_k first (the sparse path). (The pipeline fuzzer
// found an empty kept set here: the fast sampler then read before its list.)
TEST(FastTest, AMaximumATemperaturePushesBelowTheFloatRangeKeepsItsTokensUniformly) {
  std::vector<float> row(64, -3.0e38f);
  row[3] = -2.0e38f;
  row[7] = -2.0e38f;
  row[9] = -2.5e38f;
  const Sampler fast;
  const ReferenceSampler reference;
  for (const DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    const std::vector<uint8_t> bytes = dtype == DType::kFloat32
                                           ? testing::F32Bytes(row)
                                           : testing::Half16Bytes(row, DType::kBFloat16);
    auto view = LogitsView::Create(dtype, 1, 64, bytes);
    ASSERT_TRUE(view.ok());
    for (const int variant : {0, 1, 2, 3}) {
      std::set<int32_t> drawn;
      for (uint64_t seed = 0; seed < 100; ++seed) {
        SamplingParams p;
        p.temperature = 0.5f;
        if (variant == 1) {
          p.temperature = 0.45f;
          p.dynatemp_range = 0.05f;  // T in [0.4, 0.5]
        }
        if (variant == 2) p.typical_p = 0.9f;
        if (variant == 3) {
          p.top_k = 10;
          p.sampler_order = {Stage::kTopK, Stage::kTemperature};
        }
        p.seed = seed;
        p.logprobs = 0;
        p.logprobs_mode = LogprobsMode::kProcessedLogprobs;
        ASSERT_TRUE(ValidateParams(p, 64).ok());
        const RowRequest request{&p, {}, {}, std::nullopt};
        const std::string where =
            absl::StrCat("dtype ", static_cast<int>(dtype), " variant ", variant, " seed ", seed);
        const auto want = reference.Run(*view, {&request, 1});
        absl::StatusOr<std::vector<SampledToken>> got;
        tbb::task_arena arena(2);
        arena.execute([&] { got = fast.Run(*view, {&request, 1}); });
        ASSERT_TRUE(want.ok()) << where << ": " << want.status();
        ASSERT_TRUE(got.ok()) << where << ": " << got.status();
        ExpectSame(*got, *want, where);
        const SampledToken& token = (*got)[0];
        ASSERT_TRUE(token.token_id == 3 || token.token_id == 7) << where << ": " << token.token_id;
        EXPECT_FLOAT_EQ(token.logprob, std::log(0.5f)) << where;
        drawn.insert(token.token_id);
      }
      EXPECT_EQ(drawn, (std::set<int32_t>{3, 7})) << "100 seeds draw both tokens";
    }
  }
}

// Dynamic temperature's entropy has the same bits whatever the order or grouping of the tokens
// (the fast sampler sums it per block or over its short list, the reference over the whole row):
// a uniform row must give exactly log n, not one ulp either side (which moved the temperature by
// a float ulp once: the session fuzzer found it). Its sums are exact up to 2^-62 per term: it
// stays within 1e-13 of the same float terms summed in long double (and within float precision,
// 1e-6, of the exact entropy).
TEST(FastTest, DynamicTemperatureEntropyIsOrderFree) {
  std::mt19937_64 rng(5);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (const size_t n : {27u, 1000u, 50000u}) {
    std::vector<float> uniform(n, 1.0e30f);
    EXPECT_EQ(OrderFreeEntropy(uniform, 1.0e30f), std::log(static_cast<double>(n))) << n;
    std::vector<float> row(n);
    for (float& x : row) x = normal(rng);
    const float max = *std::max_element(row.begin(), row.end());
    const double h = OrderFreeEntropy(row, max);
    long double total = 0, weighted = 0, exact_total = 0, exact_weighted = 0;
    for (float x : row) {
      const float d = x - max;
      const long double w = kernels::ExpF(d);
      total += w;
      weighted += w * d;
      const long double e = std::exp(static_cast<long double>(x) - max);
      exact_total += e;
      exact_weighted += e * (static_cast<long double>(x) - max);
    }
    EXPECT_NEAR(h, static_cast<double>(std::log(total) - weighted / total), 1e-13 * h) << n;
    EXPECT_NEAR(h, static_cast<double>(std::log(exact_total) - exact_weighted / exact_total),
                1e-6 * h)
        << n;
    // Shuffled, with −inf tokens between, and summed in pieces: the same bits.
    std::vector<float> shuffled = row;
    std::shuffle(shuffled.begin(), shuffled.end(), rng);
    shuffled.insert(shuffled.begin() + static_cast<ptrdiff_t>(n / 2), 7, -kInf);
    EXPECT_EQ(OrderFreeEntropy(shuffled, max), h) << n;
    EntropySums pieces;
    for (size_t begin = 0; begin < shuffled.size(); begin += 333) {
      pieces.Add(EntropyTerms(shuffled.data(), nullptr, begin,
                              std::min(shuffled.size(), begin + 333), max));
    }
    EXPECT_EQ(pieces.Entropy(), h) << n;
  }
}

// Samples `row` as bf16 and as fp16 bytes and as float32 bytes of the values those decode to,
// each also as a row in shared memory (read twice when top_k is streamed, and checked), and
// expects the same results (or the same error).
void ExpectHalfMatchesFloat(const std::vector<float>& row, const SamplingParams& p,
                            const std::string& where) {
  const uint32_t vocab = static_cast<uint32_t>(row.size());
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    std::vector<float> rounded(row);
    for (float& x : rounded) {
      x = dtype == DType::kBFloat16 ? Bf16ToFloat(FloatToBf16(x)) : Fp16ToFloat(FloatToFp16(x));
    }
    const std::vector<uint8_t> half = testing::Half16Bytes(row, dtype);
    const std::vector<uint8_t> full = testing::F32Bytes(rounded);
    const RowRequest req{&p, {}, {}, std::nullopt};
    auto a = LogitsView::Create(dtype, 1, vocab, half);
    auto b = LogitsView::Create(DType::kFloat32, 1, vocab, full);
    ASSERT_TRUE(a.ok() && b.ok());
    auto a_shared = LogitsView::Create(dtype, 1, vocab, half, /*shared=*/true);
    auto b_shared = LogitsView::Create(DType::kFloat32, 1, vocab, full, /*shared=*/true);
    ASSERT_TRUE(a_shared.ok() && b_shared.ok());
    const Sampler sampler;
    const auto y = sampler.Run(*b, {&req, 1});
    for (const LogitsView* view : {&*a, &*a_shared, &*b_shared}) {
      const auto x = sampler.Run(*view, {&req, 1});
      ASSERT_EQ(x.ok(), y.ok()) << x.status() << " / " << y.status();
      if (!x.ok()) {
        EXPECT_EQ(x.status(), y.status());
        continue;
      }
      ExpectSame(*x, *y,
                 absl::StrCat(where, " dtype ", static_cast<int>(view->dtype()),
                              view->shared() ? " shared" : ""));
    }
  }
}

// A row in shared memory that reads differently the second time (its client wrote the region
// during the call; here the Dist is told a maximum the bytes do not have, or they hold a NaN):
// the row turns uniform at the maximum, every stage still runs safely, and the scratch says so
// (SampleRow then fails the row with ABORTED). A second read that agrees changes nothing.
TEST(FastTest, ASharedRowThatChangedBetweenReadsIsCaughtSafely) {
  std::mt19937_64 rng(71);
  constexpr size_t kVocab = 9000;
  std::vector<float> row = MakeRow(Shape::kRealistic, kVocab, rng);
  const float max = *std::max_element(row.begin(), row.end());
  std::vector<float> with_nan = row;
  with_nan[4321] = std::numeric_limits<float>::quiet_NaN();
  SamplingParams p;
  p.top_p = 0.9f;
  p.min_p = 0.01f;
  p.typical_p = 0.95f;
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    for (int variant = 0; variant < 3; ++variant) {
      const std::vector<float>& values = variant == 2 ? with_nan : row;
      const std::vector<uint8_t> bytes = dtype == DType::kFloat32
                                             ? testing::F32Bytes(values)
                                             : testing::Half16Bytes(values, dtype);
      auto view = LogitsView::Create(dtype, 1, kVocab, bytes, /*shared=*/true);
      ASSERT_TRUE(view.ok());
      float decoded_max = max;
      if (dtype != DType::kFloat32) decoded_max = Bf16ToFloat(FloatToBf16(max));
      // Variant 0: the maximum pass 1 saw; 1: a lower one (the bytes rose since); 2: a NaN.
      const float told = variant == 1 ? decoded_max - 1.0f : decoded_max;
      RowScratch scratch;
      scratch.Reserve(static_cast<int>(kVocab));
      scratch.source_changed = false;
      Dist dist(absl::MakeConstSpan(scratch.logits.data(), kVocab),
                absl::MakeSpan(scratch.logits.data(), kVocab), told, scratch, false);
      dist.Deferred(&*view, 0, 1.0f);
      dist.TopP(p.top_p);
      dist.MinP(p.min_p);
      dist.TypicalP(p.typical_p);
      const int32_t token = dist.Draw(0.37);
      const std::string where =
          absl::StrCat("dtype ", static_cast<int>(dtype), " variant ", variant);
      EXPECT_EQ(scratch.source_changed, variant != 0) << where;
      EXPECT_GE(token, 0) << where;
      EXPECT_LT(token, static_cast<int32_t>(kVocab)) << where;
      if (variant == 0) {
        // Agreeing reads: the same token as a Dist over the decoded row.
        auto local = LogitsView::Create(dtype, 1, kVocab, bytes);
        ASSERT_TRUE(local.ok());
        std::vector<float> decoded(kVocab);
        ASSERT_EQ(DecodeRow(*local, 0, absl::MakeSpan(decoded)), -1);
        RowScratch other;
        other.Reserve(static_cast<int>(kVocab));
        Dist plain(decoded, absl::MakeSpan(other.logits.data(), kVocab), decoded_max, other, false);
        plain.TopP(p.top_p);
        plain.MinP(p.min_p);
        plain.TypicalP(p.typical_p);
        EXPECT_EQ(plain.Draw(0.37), token) << where;
      }
    }
  }
}

TEST(FastTest, HalfPrecisionRowsDecodeInThePass) {
  // bf16 / fp16 rows (odd vocabulary: SIMD body and tail) sample like their float values.
  std::mt19937_64 rng(21);
  const std::vector<float> row = MakeRow(Shape::kRealistic, 50021, rng);
  SamplingParams p;
  p.seed = 5;
  p.top_p = 0.9f;
  p.temperature = 0.7f;
  p.logprobs = -1;
  p.logprobs_mode = LogprobsMode::kProcessedLogits;
  ExpectHalfMatchesFloat(row, p, "half vs float");
}

TEST(FastTest, HalfPrecisionRowsMatchTheirFloatValuesWithRandomParams) {
  // A bf16 / fp16 row whose top_k is streamed is not stored by pass 1; a stage that needs the
  // whole row decodes it again (Dist::Deferred). Against the float32 row of the same values (read
  // in place): random parameters, top_k first in half the rows (1 to 256, ties, n > 1,
  // temperatures that tie neighbours, vocabularies where top_k keeps everything).
  std::mt19937_64 rng(33);
  for (const auto& [shape, vocab] :
       {std::pair{Shape::kRealistic, size_t{20000}}, std::pair{Shape::kTies, size_t{3000}},
        std::pair{Shape::kFlat, size_t{5000}}, std::pair{Shape::kMasked, size_t{4000}},
        std::pair{Shape::kPeaked, size_t{9000}}, std::pair{Shape::kRealistic, size_t{37}}}) {
    for (int trial = 0; trial < 40; ++trial) {
      const std::vector<float> row = MakeRow(shape, vocab, rng);
      SamplingParams p = RandomParams(rng, static_cast<int32_t>(vocab));
      if (trial % 2 == 0) {
        p.sampler_order.clear();
        p.mirostat_mode = 0;
        p.dynatemp_range = 0.0f;
        p.top_k = std::vector<int32_t>{1, 3, 50, 256}[static_cast<size_t>(trial / 2) % 4];
        if (p.temperature == 0.0f) p.temperature = 0.7f;
      }
      ExpectHalfMatchesFloat(row, p,
                             absl::StrCat("vocab ", vocab, " trial ", trial, ": ", Describe(p)));
    }
  }
}

TEST(FastTest, NaNFoundInEveryDtypeAndPosition) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    for (size_t pos : {size_t{0}, size_t{17}, size_t{4095}, size_t{4096}, size_t{9998}}) {
      std::vector<float> row(9999, 1.0f);
      row[pos] = std::numeric_limits<float>::quiet_NaN();
      const std::vector<uint8_t> bytes =
          dtype == DType::kFloat32 ? testing::F32Bytes(row) : testing::Half16Bytes(row, dtype);
      auto view = LogitsView::Create(dtype, 1, 9999, bytes);
      SamplingParams p;
      const RowRequest req{&p, {}, {}, std::nullopt};
      const auto out = Sampler().Run(*view, {&req, 1});
      EXPECT_EQ(out.status().message(), absl::StrCat("logits.data is NaN at row 0, token ", pos));
    }
  }
}

TEST(FastTest, TopValuesOfManyEqualsRankingEveryToken) {
  // The sampled-pivot path of TopValues (n ≤ 1024 of ≥ 8192) against ranking every token, with
  // ties (values on a coarse grid) and a mapping that merges neighbouring values.
  std::mt19937_64 rng(8);
  RowScratch scratch;
  for (int trial = 0; trial < 40; ++trial) {
    std::vector<float> row = MakeRow(trial % 2 ? Shape::kTies : Shape::kRealistic, 20000, rng);
    scratch.Reserve(static_cast<int>(row.size()));
    const auto coarse = [](float l) { return std::floor(l * 4.0f) / 4.0f; };
    for (int32_t n : {1, 5, 20, 300, 1024}) {
      std::vector<TokenLogprob> got;
      TopValues(absl::MakeConstSpan(row), n, coarse, scratch, got);
      std::vector<std::pair<float, int32_t>> all;
      for (size_t i = 0; i < row.size(); ++i) {
        all.emplace_back(coarse(row[i]), static_cast<int32_t>(i));
      }
      std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
      });
      ASSERT_EQ(got.size(), static_cast<size_t>(n));
      for (int32_t j = 0; j < n; ++j) {
        ASSERT_EQ(got[static_cast<size_t>(j)].token_id, all[static_cast<size_t>(j)].second)
            << "trial " << trial << " n " << n << " #" << j;
        ASSERT_EQ(got[static_cast<size_t>(j)].logprob, all[static_cast<size_t>(j)].first);
      }
    }
  }
}

TEST(KernelsTest, ExpFIsAccurate) {
  // Within 1.07 ulp of e^x over the range weights use (1.062 at worst over every float of
  // [−87.3, 88]), exactly 1 at 0, and 0 below −87.3, for −inf and for NaN.
  EXPECT_EQ(kernels::ExpF(0.0f), 1.0f);
  EXPECT_EQ(kernels::ExpF(-kInf), 0.0f);
  EXPECT_EQ(kernels::ExpF(-100.0f), 0.0f);
  EXPECT_EQ(kernels::ExpF(std::nextafter(-87.3f, -kInf)), 0.0f);
  EXPECT_GE(kernels::ExpF(-87.3f), std::numeric_limits<float>::min());
  EXPECT_EQ(kernels::ExpF(std::numeric_limits<float>::quiet_NaN()), 0.0f);
  EXPECT_LT(kernels::ExpF(88.7f), kInf);
  double worst = 0.0;
  for (float x = -87.3f; x <= 0.0f; x += 0.00037f) {
    const double want = std::exp(static_cast<double>(x));
    const double ulp = std::ldexp(1.0, std::ilogb(want) - 23);
    worst = std::max(worst, std::abs(static_cast<double>(kernels::ExpF(x)) - want) / ulp);
  }
  EXPECT_LE(worst, 1.07) << "target " << kernels::TargetName();
}

TEST(KernelsTest, ExpFIsMonotone) {
  // min_p finds its threshold by bisection, which needs ExpF non-decreasing. Checked here on
  // every 61st float of [−88, 0] (18 million values); the whole range (1.1e9 floats) was checked
  // once the same way (docs/performance.md). (Above 0 the table's rounding makes two 1-ulp dips,
  // at 0.02166 and 0.1083; weights never take x > 0.)
  float start = -88.0f;
  uint32_t bits;
  std::memcpy(&bits, &start, sizeof(bits));
  float prev = 0.0f;
  for (uint32_t b = bits; b >= 0x80000000u + 61; b -= 61) {  // negative floats ascend as bits fall
    float x;
    std::memcpy(&x, &b, sizeof(x));
    const float y = kernels::ExpF(x);
    ASSERT_GE(y, prev) << "at x = " << x;
    prev = y;
  }
}

// Runs `check` with every instruction set the kernels were built for that this machine runs
// (AVX-512, AVX2, SSE4, SSSE3, plain x86-64 here), then restores the dispatch.
template <typename Check>
void OnEveryTarget(Check check) {
  const std::vector<int64_t> targets = kernels::AvailableTargets();
  ASSERT_FALSE(targets.empty());
  for (int64_t target : targets) {
    kernels::UseTargetForTest(target);
    SCOPED_TRACE(kernels::TargetName());
    check();
  }
  kernels::UseTargetForTest(0);
}

TEST(KernelsTest, SimdWeightsAreTheScalarBitsOnEveryFloatTheyTake) {
  // Every 61st float of [−90, 0] (where weights live: a value minus the row's maximum), the
  // floats around the cutoff kExpMin, −0 and −inf: the SIMD weights (with their scalar tail, an
  // odd length) are exactly the scalar ExpF's, and SumExp sums those same weights.
  std::vector<float> v;
  float start = -90.0f;
  uint32_t bits;
  std::memcpy(&bits, &start, sizeof(bits));
  for (uint32_t b = bits; b >= 0x80000000u + 61; b -= 61) {
    float x;
    std::memcpy(&x, &b, sizeof(x));
    v.push_back(x);
  }
  for (float x = -87.3f, i = 0; i < 64; ++i) {
    v.push_back(x);
    v.push_back(std::nextafter(x, -kInf));
    x = std::nextafter(x, 0.0f);
  }
  v.push_back(-0.0f);
  v.push_back(0.0f);
  v.push_back(-kInf);
  if (v.size() % 2 == 0) v.push_back(-1.0f);
  double want_sum = 0.0;
  std::vector<float> want(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    want[i] = kernels::ExpF(v[i]);
    want_sum += static_cast<double>(want[i]);
  }
  OnEveryTarget([&] {
    std::vector<float> work = v, w(v.size());
    const double sum = kernels::Weights(work.data(), nullptr, w.data(), 0, v.size(), 1.0f, 0.0f);
    for (size_t i = 0; i < v.size(); ++i) ASSERT_EQ(w[i], want[i]) << "at x = " << v[i];
    EXPECT_NEAR(sum, want_sum, 1e-12 * want_sum);
    EXPECT_NEAR(kernels::SumExp(v.data(), 0, v.size(), 1.0f, 0.0f), want_sum, 1e-12 * want_sum);
  });
}

// n values σ·N(0,1) with one −inf; *max receives the largest value divided by `divisor`.
std::vector<float> NormalRow(uint64_t seed, size_t n, float sigma, float divisor, float* max) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, sigma);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  v[n / 2] = -kInf;
  *max = -kInf;
  for (float x : v) *max = std::max(*max, x / divisor);
  return v;
}

TEST(KernelsTest, KernelsThatChangeValuesWriteThemElsewhereOrInPlace) {
  // A sample reads a shared row and writes its own copy (Dist): every kernel that changes values
  // gives the same result into another buffer as in place, and leaves its input alone.
  float max = 0.0f;
  std::vector<float> v = NormalRow(5, 2049, 4.0f, 0.6f, &max);
  OnEveryTarget([&] {
    const std::vector<float> input = v;
    std::vector<float> in_place = v, out(v.size(), 9.0f), w1(v.size()), w2(v.size());
    const double s1 =
        kernels::Weights(in_place.data(), in_place.data(), w1.data(), 0, v.size(), 0.6f, max);
    const double s2 = kernels::Weights(v.data(), out.data(), w2.data(), 0, v.size(), 0.6f, max);
    EXPECT_EQ(v, input);
    EXPECT_EQ(out, in_place);
    EXPECT_EQ(w1, w2);
    EXPECT_EQ(s1, s2);
    EXPECT_NEAR(kernels::SumExp(v.data(), 0, v.size(), 0.6f, max), s1, 1e-12 * s1);
    std::vector<float> w3(v.size());
    EXPECT_EQ(kernels::Weights(v.data(), nullptr, w3.data(), 0, v.size(), 0.6f, max), s1);
    EXPECT_EQ(w3, w1);
    EXPECT_EQ(v, input);

    std::vector<float> scaled_in_place = v, scaled(v.size());
    kernels::Scale(scaled_in_place.data(), scaled_in_place.data(), 0, v.size(), 0.6f);
    kernels::Scale(v.data(), scaled.data(), 0, v.size(), 0.6f);
    EXPECT_EQ(scaled, scaled_in_place);
    EXPECT_EQ(v, input);

    for (bool by_weight : {false, true}) {
      std::vector<float> a = v, b(v.size(), 9.0f), wa = w1, wb = w1;
      const auto cut = by_weight ? kernels::CutWeightBelow : kernels::CutValueBelow;
      const float t = by_weight ? 0.01f : 0.5f;
      const kernels::SumCount ra = cut(a.data(), a.data(), wa.data(), 0, v.size(), t);
      const kernels::SumCount rb = cut(v.data(), b.data(), wb.data(), 0, v.size(), t);
      EXPECT_EQ(a, b);
      EXPECT_EQ(wa, wb);
      EXPECT_EQ(ra.sum, rb.sum);
      EXPECT_EQ(ra.count, rb.count);
      EXPECT_EQ(v, input);
    }
  });
}

TEST(KernelsTest, MassInRangesCountsExactlyAndSumsEveryRangeOnEveryTarget) {
  // 1 to 16 ranges (the SIMD kernel takes them four per pass), with −inf, ties at the ends and
  // a tail shorter than a vector: counts exact, sums within float rounding of the double sums.
  float max = 0.0f;
  const std::vector<float> v = [&] {
    std::vector<float> row = NormalRow(7, 1037, 3.0f, 1.0f, &max);
    row[5] = -kInf;
    row[6] = row[7];  // a tie
    return row;
  }();
  std::vector<float> w(v.size());
  kernels::Weights(v.data(), nullptr, w.data(), 0, v.size(), 1.0f, max);
  std::mt19937 rng(11);
  for (int test = 0; test < 32; ++test) {
    const int np = test % 16 + 1;
    const bool open = test >= 16;  // every range open to +inf (top_p's): one comparison
    std::vector<float> from(static_cast<size_t>(np)), to(static_cast<size_t>(np));
    for (int j = 0; j < np; ++j) {
      // Range ends on tokens' own values (ties at both ends), some open to +inf, one empty.
      const size_t k = static_cast<size_t>(j);
      from[k] = v[rng() % v.size()];
      to[k] = open || j % 3 == 0 ? kInf : v[rng() % v.size()];
      if (j == 5 && !open) from[k] = std::nextafter(to[k], kInf);  // empty
    }
    for (size_t begin : {size_t{0}, size_t{3}}) {
      std::vector<double> want_sums(16, 0.0);
      std::vector<int64_t> want_counts(16, 0);
      for (size_t i = begin; i < v.size(); ++i) {
        for (int j = 0; j < np; ++j) {
          const size_t k = static_cast<size_t>(j);
          if (v[i] >= from[k] && v[i] <= to[k]) {
            want_sums[k] += static_cast<double>(w[i]);
            ++want_counts[k];
          }
        }
      }
      OnEveryTarget([&] {
        SCOPED_TRACE(absl::StrCat("np=", np, " open=", open, " begin=", begin));
        std::vector<double> sums(16, 0.0);
        std::vector<int64_t> counts(16, 0);
        kernels::MassInRanges(v.data(), w.data(), begin, v.size(), from.data(), to.data(), np,
                              sums.data(), counts.data());
        EXPECT_EQ(counts, want_counts);
        for (size_t k = 0; k < 16; ++k) EXPECT_NEAR(sums[k], want_sums[k], 1e-5 * want_sums[k]);
      });
    }
  }
}

TEST(KernelsTest, NarrowBandKeepsOrderAndSumsWhatLeavesOnEveryTarget) {
  // Band sizes around the vector widths, ends on the band's own values (ties), a "gone" range
  // that is empty, open to −inf or inside the kept one: the kept entries in order, the rest
  // summed and counted, against a plain loop.
  std::mt19937 rng(13);
  for (size_t n :
       {size_t{0}, size_t{1}, size_t{15}, size_t{16}, size_t{17}, size_t{100}, size_t{1031}}) {
    for (int test = 0; test < 6; ++test) {
      float unused_max = 0.0f;
      std::vector<float> v = NormalRow(static_cast<uint64_t>(100 + test), std::max<size_t>(n, 2),
                                       2.0f, 1.0f, &unused_max);
      v.resize(n);
      std::vector<float> w(n);
      std::vector<int32_t> ids(n);
      for (size_t i = 0; i < n; ++i) {
        w[i] = static_cast<float>(rng() % 1000) / 997.0f;
        ids[i] = static_cast<int32_t>(3 * i + 1);
      }
      const auto pick = [&] { return n == 0 ? 0.0f : v[rng() % n]; };
      float keep_from = std::min(pick(), pick()), keep_to = test % 2 == 0 ? kInf : pick();
      float gone_from = -kInf, gone_to = pick();
      if (test == 3) gone_from = kInf;  // nothing leaves
      if (test == 4) std::tie(gone_from, gone_to) = std::pair(keep_from, keep_from);
      std::vector<float> want_v, want_w;
      std::vector<int32_t> want_ids;
      double want_sum = 0.0;
      int64_t want_count = 0;
      for (size_t i = 0; i < n; ++i) {
        if (v[i] >= gone_from && v[i] <= gone_to) {
          want_sum += static_cast<double>(w[i]);
          ++want_count;
        } else if (v[i] >= keep_from && v[i] <= keep_to) {
          want_v.push_back(v[i]);
          want_w.push_back(w[i]);
          want_ids.push_back(ids[i]);
        }
      }
      OnEveryTarget([&] {
        SCOPED_TRACE(absl::StrCat("n=", n, " test=", test));
        std::vector<float> gv = v, gw = w;
        std::vector<int32_t> gids = ids;
        size_t kept = 12345;
        const kernels::SumCount gone = kernels::NarrowBand(
            gv.data(), gw.data(), gids.data(), n, keep_from, keep_to, gone_from, gone_to, &kept);
        ASSERT_EQ(kept, want_v.size());
        gv.resize(kept);
        gw.resize(kept);
        gids.resize(kept);
        EXPECT_EQ(gv, want_v);
        EXPECT_EQ(gw, want_w);
        EXPECT_EQ(gids, want_ids);
        EXPECT_EQ(gone.count, want_count);
        EXPECT_NEAR(gone.sum, want_sum, 1e-12 * (1.0 + want_sum));
      });
    }
  }
}

TEST(KernelsTest, SelectRangesWritesTheIdsInOrderOnEveryTarget) {
  // In-ranges open to +inf or closed, with and without an out-range, selecting few or many,
  // ends on the row's own values (ties), a start inside a vector and a tail.
  float max = 0.0f;
  const std::vector<float> v = NormalRow(17, 2053, 3.0f, 1.0f, &max);
  std::mt19937 rng(19);
  for (int test = 0; test < 40; ++test) {
    const auto pick = [&] { return v[rng() % v.size()]; };
    const float a = pick(), b = pick();
    const float in_from = std::min(a, b);
    const float in_to = test % 2 == 0 ? kInf : std::max(a, b);
    float out_from = kInf, out_to = -kInf;  // none
    if (test % 4 >= 2) {
      const float c = pick(), d = pick();
      out_from = std::min(c, d);
      out_to = std::max(c, d);
    }
    const size_t begin = static_cast<size_t>(test % 3) * 5;
    std::vector<int32_t> want;
    for (size_t i = begin; i < v.size(); ++i) {
      if (v[i] >= in_from && v[i] <= in_to && !(v[i] >= out_from && v[i] <= out_to)) {
        want.push_back(static_cast<int32_t>(i));
      }
    }
    OnEveryTarget([&] {
      SCOPED_TRACE(absl::StrCat("test ", test));
      std::vector<int32_t> ids(v.size() - begin, -1);
      const size_t m = kernels::SelectRanges(v.data(), begin, v.size(), in_from, in_to, out_from,
                                             out_to, ids.data());
      ids.resize(m);
      EXPECT_EQ(ids, want);
    });
  }
}

TEST(KernelsTest, PassOneStreamHoldsEveryTokenTopKKeeps) {
  // The stream's threshold never passes the k-th largest value and it holds every token at or
  // above that value (ties too), in id order; a row of ties beyond its room gives up (overflow).
  std::mt19937_64 rng(17);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int trial = 0; trial < 24; ++trial) {
    const size_t n = 1000 + static_cast<size_t>(trial) * 1337;
    std::vector<float> row(n);
    for (float& x : row) x = normal(rng);
    if (trial % 3 == 1) {
      for (float& x : row) x = std::round(x);  // ties, within the stream's room
    }
    if (trial % 6 == 2) std::fill(row.begin(), row.end(), 1.0f);  // ties beyond it
    row[n / 3] = -kInf;
    const int32_t k = std::vector<int32_t>{1, 2, 7, 50, 200, 256}[static_cast<size_t>(trial) % 6];
    std::vector<float> sorted = row;
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    const float kth = sorted[static_cast<size_t>(k - 1)];
    const std::vector<uint8_t> bytes = testing::F32Bytes(row);
    OnEveryTarget([&] {
      SCOPED_TRACE(absl::StrCat("trial ", trial, " k ", k));
      std::vector<int32_t> ids(kernels::TopStream::kCapacity);
      std::vector<float> values(ids.size()), scratch(ids.size());
      kernels::TopStream top =
          kernels::TopStream::For(k, ids.data(), values.data(), scratch.data());
      // Two calls continue one stream, as pass 1's blocks do.
      kernels::DecodeMax(DType::kFloat32, bytes.data(), 0, n / 2, 1.0f, nullptr, &top);
      kernels::DecodeMax(DType::kFloat32, bytes.data(), n / 2, n, 1.0f, nullptr, &top);
      if (trial % 6 == 2) {
        EXPECT_TRUE(top.overflow);
        return;
      }
      ASSERT_FALSE(top.overflow);
      EXPECT_LE(top.threshold, kth);
      std::vector<int32_t> want;
      for (size_t i = 0; i < n; ++i) {
        if (row[i] >= kth) want.push_back(static_cast<int32_t>(i));
      }
      std::vector<int32_t> held(ids.begin(), ids.begin() + static_cast<ptrdiff_t>(top.count));
      ASSERT_TRUE(std::is_sorted(held.begin(), held.end()));
      for (size_t j = 0; j < top.count; ++j) {
        ASSERT_EQ(values[j], row[static_cast<size_t>(held[j])]);
        ASSERT_GE(values[j], top.threshold);
      }
      EXPECT_TRUE(std::includes(held.begin(), held.end(), want.begin(), want.end()));
    });
  }
}

TEST(KernelsTest, SimdWeightsDivideByTheTemperatureFirst) {
  float max = 0.0f;
  const std::vector<float> v = NormalRow(3, 1003, 10.0f, 0.7f, &max);
  OnEveryTarget([&] {
    std::vector<float> work = v, w(v.size());
    const double sum = kernels::Weights(work.data(), work.data(), w.data(), 3, v.size(), 0.7f, max);
    double want_sum = 0.0;
    for (size_t i = 3; i < v.size(); ++i) {
      const float x = v[i] / 0.7f;
      ASSERT_EQ(work[i], x);
      ASSERT_EQ(w[i], kernels::ExpF(x - max)) << i;
      want_sum += static_cast<double>(w[i]);
    }
    EXPECT_NEAR(sum, want_sum, 1e-12 * want_sum);
  });
}

TEST(KernelsTest, WeightsPassSumsTheEntropyTermsAsTheirOwnPassWould) {
  // typical_p and eta take Σ w·(v − max) from the weights pass (WeightsAndHead with `weighted`):
  // WeightedLogits over what the pass wrote, up to the order of double additions (the same order
  // on AVX-512 and AVX2; SSE4 and SSSE3 run the scalar weights), with and without a divisor,
  // with a −inf token (w = 0 there: its term is 0, not NaN), odd lengths and offsets, with and
  // without a head, and the weights, sum and head unchanged by asking for it.
  for (const float divisor : {1.0f, 0.7f}) {
    for (const size_t n : {size_t{5}, size_t{1003}, size_t{4096}}) {
      float max = 0.0f;
      const std::vector<float> v = NormalRow(11 + n, n, 6.0f, divisor, &max);
      OnEveryTarget([&] {
        for (const bool head : {false, true}) {
          std::vector<float> work = v, w(n), plain_work = v, plain_w(n);
          std::vector<int32_t> ids(n), plain_ids(n);
          size_t count = 0, plain_count = 0;
          double weighted = 0.0;
          const double sum = kernels::WeightsAndHead(
              v.data(), divisor == 1.0f ? nullptr : work.data(), w.data(), 1, n, divisor, max,
              1e-3f, head ? ids.data() : nullptr, &count, &weighted);
          const double plain = kernels::WeightsAndHead(
              v.data(), divisor == 1.0f ? nullptr : plain_work.data(), plain_w.data(), 1, n,
              divisor, max, 1e-3f, head ? plain_ids.data() : nullptr, &plain_count);
          const std::vector<float>& x = divisor == 1.0f ? v : work;
          const double want = kernels::WeightedLogits(x.data(), w.data(), 1, n, max);
          ASSERT_NEAR(weighted, want, 1e-12 * std::abs(want))
              << "n " << n << " divisor " << divisor << " head " << head;
          ASSERT_EQ(sum, plain);
          ASSERT_EQ(w, plain_w);
          ASSERT_EQ(work, plain_work);
          ASSERT_EQ(count, plain_count);
          ASSERT_EQ(ids, plain_ids);
          if (!head) {
            ASSERT_EQ(count, 0u);
          }
        }
      });
    }
  }
}

TEST(KernelsTest, PassOneFindsTheFirstMaximumAndTheFirstNaNOnEveryTarget) {
  // Pass 1 finds the maximum's first index from per-chunk maxima (kernels.cc): the maximum at
  // chunk edges, repeated later or earlier in its chunk, ±0 ties, all −inf, NaN anywhere, every
  // dtype, with and without a divisor and a copy (every pair), from offsets that are not
  // chunk-aligned.
  struct RowCase {
    size_t n;
    std::vector<std::pair<size_t, float>> set;  // (index, value) over a row of small values
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<RowCase> cases;
  for (size_t n : {1u, 15u, 17u, 1023u, 1024u, 1025u, 3000u, 4096u}) {
    for (size_t at : {size_t{0}, n / 2, n - 1, size_t{1023}, size_t{1024}, size_t{2047}}) {
      if (at >= n) continue;
      cases.push_back({n, {{at, 50.0f}}});
      cases.push_back({n, {{at, 50.0f}, {n - 1, 50.0f}}});         // repeated later
      cases.push_back({n, {{at, 50.0f}, {at / 2, 50.0f}}});        // repeated earlier
      cases.push_back({n, {{at, 50.0f}, {(at + n) / 2, 49.0f}}});  // a lower peak later
      cases.push_back({n, {{at, nan}}});
      cases.push_back({n, {{at, kInf}, {n - 1, nan}}});
    }
  }
  cases.push_back({2500, {{0, -kInf}}});  // all −inf: see below
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<float> small(-8.0f, -1.0f);
  for (DType dtype : {DType::kFloat32, DType::kBFloat16, DType::kFloat16}) {
    for (float divisor : {1.0f, 0.8f}) {
      for (bool copy : {true, false}) {
        // Without a copy every dtype and divisor: the maximum's chunk is decoded again.
        for (size_t c = 0; c < cases.size(); ++c) {
          const RowCase& k = cases[c];
          std::vector<float> row(k.n);
          for (float& x : row) x = small(rng);
          const bool all_neg_inf = k.set.size() == 1 && k.set[0].second == -kInf;
          if (all_neg_inf) std::fill(row.begin(), row.end(), -kInf);
          if (c % 7 == 3 && k.n > 2) row[1] = -0.0f;
          for (const auto& [i, x] : k.set) row[i] = x;
          // The row as the dtype's bytes, and the values decoding gives.
          const size_t size = DTypeSize(dtype);
          std::vector<uint8_t> bytes(k.n * size);
          std::vector<float> decoded(k.n);
          for (size_t i = 0; i < k.n; ++i) {
            if (dtype == DType::kFloat32) {
              std::memcpy(bytes.data() + 4 * i, &row[i], 4);
              decoded[i] = row[i];
            } else {
              const uint16_t h =
                  dtype == DType::kBFloat16 ? FloatToBf16(row[i]) : FloatToFp16(row[i]);
              std::memcpy(bytes.data() + 2 * i, &h, 2);
              decoded[i] = dtype == DType::kBFloat16 ? Bf16ToFloat(h) : Fp16ToFloat(h);
            }
            decoded[i] /= divisor;
          }
          for (size_t begin : {size_t{0}, size_t{3}}) {
            if (begin >= k.n) continue;
            kernels::MaxResult want{-kInf, -1, -1};
            for (size_t i = begin; i < k.n; ++i) {
              if (std::isnan(decoded[i])) {
                want.nan = static_cast<int64_t>(i);
                break;
              }
            }
            if (want.nan < 0) {
              for (size_t i = begin; i < k.n; ++i) {
                if (decoded[i] > want.max ||
                    (want.argmax < 0 && decoded[i] == want.max && decoded[i] != -kInf)) {
                  want.max = decoded[i];
                  want.argmax = static_cast<int64_t>(i);
                }
              }
            }
            OnEveryTarget([&] {
              SCOPED_TRACE(absl::StrCat("dtype ", DTypeName(dtype), " divisor ", divisor, " copy ",
                                        copy, " case ", c, " n ", k.n, " begin ", begin));
              std::vector<float> out(k.n, 123.0f);
              const kernels::MaxResult got = kernels::DecodeMax(
                  dtype, bytes.data(), begin, k.n, divisor, copy ? out.data() : nullptr);
              EXPECT_EQ(got.nan, want.nan);
              EXPECT_EQ(got.argmax, want.argmax);
              EXPECT_EQ(got.max, want.nan >= 0 ? -kInf : want.max);
              if (copy) {
                for (size_t i = begin; i < k.n; ++i) {
                  ASSERT_TRUE(out[i] == decoded[i] ||
                              (std::isnan(out[i]) && std::isnan(decoded[i])))
                      << i;
                }
              }
              if (want.nan < 0) {
                const kernels::MaxResult m = kernels::Max(decoded.data(), begin, k.n);
                EXPECT_EQ(m.argmax, want.argmax);
                EXPECT_EQ(m.max, want.max);
              }
            });
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace tokensampler
