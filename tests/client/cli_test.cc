// The CLI without a server: flag parsing, the request built from flags (only given flags are
// set), the random logits, and the output formats. Calls against the real daemon are in
// tests/integration/cli_test.cc.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <numeric>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/strings/str_cat.h"
#include "client/cli/commands.h"
#include "client/cli/random_logits.h"
#include "client/logits.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokensampler::cli {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;
using ::testing::UnorderedElementsAre;

// --- parsers ---

TEST(ParseDTypeTest, AcceptsShortAndLongNames) {
  for (const char* name : {"f32", "fp32", "float32"})
    EXPECT_EQ(*ParseDType(name), v1::DTYPE_FLOAT32);
  for (const char* name : {"bf16", "bfloat16"}) EXPECT_EQ(*ParseDType(name), v1::DTYPE_BFLOAT16);
  for (const char* name : {"f16", "fp16", "float16"})
    EXPECT_EQ(*ParseDType(name), v1::DTYPE_FLOAT16);
}

TEST(ParseDTypeTest, RejectsOthersNamingTheFlag) {
  absl::StatusOr<v1::DType> dtype = ParseDType("f64");
  EXPECT_EQ(dtype.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(dtype.status().message(), "--dtype must be f32, bf16 or f16, got \"f64\"");
}

TEST(ParseLogprobsModeTest, AcceptsTheFourModes) {
  EXPECT_EQ(*ParseLogprobsMode("raw_logprobs"), v1::RAW_LOGPROBS);
  EXPECT_EQ(*ParseLogprobsMode("processed_logprobs"), v1::PROCESSED_LOGPROBS);
  EXPECT_EQ(*ParseLogprobsMode("raw_logits"), v1::RAW_LOGITS);
  EXPECT_EQ(*ParseLogprobsMode("processed_logits"), v1::PROCESSED_LOGITS);
  EXPECT_EQ(ParseLogprobsMode("RAW_LOGPROBS").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ParseLogprobsMode("").status().message(), HasSubstr("--logprobs_mode"));
}

TEST(ParseTokenIdsTest, ParsesIntegersAndNamesBadItems) {
  EXPECT_THAT(*ParseTokenIds("stop_token_ids", {"2", "-1", "7"}), ElementsAre(2, -1, 7));
  EXPECT_TRUE(ParseTokenIds("stop_token_ids", {})->empty());
  absl::StatusOr<std::vector<int32_t>> ids = ParseTokenIds("stop_token_ids", {"2", "x"});
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ids.status().message(),
            "--stop_token_ids must be a list of int32 token ids, got \"x\"");
  EXPECT_FALSE(ParseTokenIds("f", {"4294967296"}).ok());
}

TEST(ParseLogitBiasTest, ParsesPairs) {
  EXPECT_THAT(*ParseLogitBias({"12:-100", "7:2.5"}), ElementsAre(Pair(12, -100.0f), Pair(7, 2.5f)));
  EXPECT_THAT(*ParseLogitBias({"3:-inf"}),
              ElementsAre(Pair(3, -std::numeric_limits<float>::infinity())));
}

TEST(ParseLogitBiasTest, RejectsMalformedItems) {
  for (const char* item : {"12", "x:1", "1:y", ":1", "1:"}) {
    absl::StatusOr<std::vector<std::pair<int32_t, float>>> bias = ParseLogitBias({item});
    EXPECT_EQ(bias.status().code(), absl::StatusCode::kInvalidArgument) << item;
    EXPECT_THAT(bias.status().message(), HasSubstr("--logit_bias")) << item;
  }
}

TEST(ParseSamplerOrderTest, ParsesStageNames) {
  EXPECT_THAT(*ParseSamplerOrder({"top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff",
                                  "eta_cutoff", "top_n_sigma", "xtc", "temperature"}),
              ElementsAre(v1::SAMPLER_STAGE_TOP_K, v1::SAMPLER_STAGE_TOP_P, v1::SAMPLER_STAGE_MIN_P,
                          v1::SAMPLER_STAGE_TYPICAL_P, v1::SAMPLER_STAGE_EPSILON_CUTOFF,
                          v1::SAMPLER_STAGE_ETA_CUTOFF, v1::SAMPLER_STAGE_TOP_N_SIGMA,
                          v1::SAMPLER_STAGE_XTC, v1::SAMPLER_STAGE_TEMPERATURE));
}

TEST(ParseSamplerOrderTest, RejectsUnknownNames) {
  for (const char* item : {"unspecified", "TOP_K", "topk", ""}) {
    absl::StatusOr<std::vector<v1::SamplerStage>> order = ParseSamplerOrder({item});
    EXPECT_EQ(order.status().code(), absl::StatusCode::kInvalidArgument) << item;
    EXPECT_THAT(order.status().message(), HasSubstr("--sampler_order")) << item;
  }
}

// --- SamplingParams from flags ---

TEST(SamplingParamsFromFlagsTest, NoFlagsLeaveEveryFieldUnset) {
  absl::FlagSaver saver;
  absl::StatusOr<v1::SamplingParams> params = SamplingParamsFromFlags();
  ASSERT_TRUE(params.ok()) << params.status();
  EXPECT_EQ(params->ByteSizeLong(), 0u) << params->DebugString();
  EXPECT_FALSE(params->has_temperature());
  EXPECT_FALSE(params->has_seed());
  EXPECT_FALSE(params->has_logprobs());
}

TEST(SamplingParamsFromFlagsTest, ExplicitZeroIsSentNotDropped) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_temperature, 0.0f);
  absl::SetFlag(&FLAGS_top_p, 0.0f);  // out of range: the server, not the CLI, rejects it
  absl::SetFlag(&FLAGS_logprobs, 0);
  absl::StatusOr<v1::SamplingParams> params = SamplingParamsFromFlags();
  ASSERT_TRUE(params.ok()) << params.status();
  EXPECT_TRUE(params->has_temperature());
  EXPECT_EQ(params->temperature(), 0.0f);
  EXPECT_TRUE(params->has_top_p());
  EXPECT_EQ(params->top_p(), 0.0f);
  EXPECT_TRUE(params->has_logprobs());
  EXPECT_FALSE(params->has_top_k());
  EXPECT_FALSE(params->has_min_p());
}

TEST(SamplingParamsFromFlagsTest, SetsEveryGivenField) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_temperature, 0.7f);
  absl::SetFlag(&FLAGS_top_k, -1);
  absl::SetFlag(&FLAGS_top_p, 0.9f);
  absl::SetFlag(&FLAGS_min_p, 0.05f);
  absl::SetFlag(&FLAGS_repetition_penalty, 1.1f);
  absl::SetFlag(&FLAGS_frequency_penalty, 0.5f);
  absl::SetFlag(&FLAGS_presence_penalty, -0.5f);
  absl::SetFlag(&FLAGS_sample_seed, uint64_t{1234});
  absl::SetFlag(&FLAGS_logprobs, -1);
  absl::SetFlag(&FLAGS_logprobs_mode, std::string("processed_logits"));
  absl::SetFlag(&FLAGS_logit_bias, std::vector<std::string>{"12:-100", "7:2.5"});
  absl::SetFlag(&FLAGS_n, 3);
  absl::SetFlag(&FLAGS_max_tokens, 16);
  absl::SetFlag(&FLAGS_min_tokens, 2);
  absl::SetFlag(&FLAGS_ignore_eos, true);
  absl::SetFlag(&FLAGS_eos_token_ids, std::vector<std::string>{"2"});
  absl::SetFlag(&FLAGS_stop_token_ids, std::vector<std::string>{"5", "6"});
  absl::SetFlag(&FLAGS_allowed_token_ids, std::vector<std::string>{"1", "2", "5"});
  absl::SetFlag(&FLAGS_sampler_order, std::vector<std::string>{"top_k", "temperature"});
  absl::SetFlag(&FLAGS_preset, std::string("balanced"));
  absl::SetFlag(&FLAGS_typical_p, 0.95f);
  absl::SetFlag(&FLAGS_top_n_sigma, 1.5f);
  absl::SetFlag(&FLAGS_xtc_probability, 0.5f);
  absl::SetFlag(&FLAGS_mirostat_mode, 2);
  absl::SetFlag(&FLAGS_dry_multiplier, 0.8f);
  absl::SetFlag(&FLAGS_dry_penalty_last_n, -1);
  absl::SetFlag(&FLAGS_no_repeat_ngram_size, 3);
  absl::SetFlag(&FLAGS_penalty_last_n, 64);

  absl::StatusOr<v1::SamplingParams> p = SamplingParamsFromFlags();
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->temperature(), 0.7f);
  EXPECT_EQ(p->top_k(), -1);
  EXPECT_EQ(p->top_p(), 0.9f);
  EXPECT_EQ(p->min_p(), 0.05f);
  EXPECT_EQ(p->repetition_penalty(), 1.1f);
  EXPECT_EQ(p->frequency_penalty(), 0.5f);
  EXPECT_EQ(p->presence_penalty(), -0.5f);
  EXPECT_EQ(p->seed(), 1234u);
  EXPECT_EQ(p->logprobs(), -1);
  EXPECT_EQ(p->logprobs_mode(), v1::PROCESSED_LOGITS);
  EXPECT_THAT(p->logit_bias(), UnorderedElementsAre(Pair(12, -100.0f), Pair(7, 2.5f)));
  EXPECT_EQ(p->n(), 3);
  EXPECT_EQ(p->max_tokens(), 16);
  EXPECT_EQ(p->min_tokens(), 2);
  EXPECT_TRUE(p->has_ignore_eos());
  EXPECT_TRUE(p->ignore_eos());
  EXPECT_THAT(p->eos_token_ids(), ElementsAre(2));
  EXPECT_THAT(p->stop_token_ids(), ElementsAre(5, 6));
  EXPECT_THAT(p->allowed_token_ids(), ElementsAre(1, 2, 5));
  EXPECT_THAT(p->sampler_order(),
              ElementsAre(v1::SAMPLER_STAGE_TOP_K, v1::SAMPLER_STAGE_TEMPERATURE));
  EXPECT_EQ(p->preset(), "balanced");
  EXPECT_EQ(p->typical_p(), 0.95f);
  EXPECT_EQ(p->top_n_sigma(), 1.5f);
  EXPECT_EQ(p->xtc_probability(), 0.5f);
  EXPECT_FALSE(p->has_xtc_threshold());
  EXPECT_EQ(p->mirostat_mode(), 2);
  EXPECT_FALSE(p->has_mirostat_tau());
  EXPECT_EQ(p->dry_multiplier(), 0.8f);
  EXPECT_EQ(p->dry_penalty_last_n(), -1);
  EXPECT_FALSE(p->has_dry_base());
  EXPECT_EQ(p->no_repeat_ngram_size(), 3);
  EXPECT_EQ(p->penalty_last_n(), 64);
}

TEST(SamplingParamsFromFlagsTest, BadValuesAreInvalidArgument) {
  {
    absl::FlagSaver saver;
    absl::SetFlag(&FLAGS_logprobs_mode, std::string("all"));
    EXPECT_THAT(SamplingParamsFromFlags().status().message(), HasSubstr("--logprobs_mode"));
  }
  {
    absl::FlagSaver saver;
    absl::SetFlag(&FLAGS_stop_token_ids, std::vector<std::string>{"eos"});
    EXPECT_THAT(SamplingParamsFromFlags().status().message(), HasSubstr("--stop_token_ids"));
  }
  {
    absl::FlagSaver saver;
    absl::SetFlag(&FLAGS_sampler_order, std::vector<std::string>{"top_q"});
    EXPECT_THAT(SamplingParamsFromFlags().status().message(), HasSubstr("--sampler_order"));
  }
}

TEST(CommandLineTest, ParsesSubcommandAndOnlyGivenFlags) {
  absl::FlagSaver saver;
  std::vector<std::string> args = {"tokensampler",       "sample",
                                   "--random",           "--vocab=16",
                                   "--rows=3",           "--temperature=0",
                                   "--top_k=-1",         "--logprobs=2",
                                   "--dtype=bf16",       "--stop_token_ids=3,4",
                                   "--ignore_eos=false", "--sample_seed=9"};
  std::vector<char*> argv;
  for (std::string& arg : args) argv.push_back(arg.data());
  const std::vector<char*> positional =
      absl::ParseCommandLine(static_cast<int>(argv.size()), argv.data());
  ASSERT_EQ(positional.size(), 2u);
  EXPECT_STREQ(positional[1], "sample");

  absl::StatusOr<v1::SampleRequest> request = SampleRequestFromFlags();
  ASSERT_TRUE(request.ok()) << request.status();
  EXPECT_EQ(request->logits().dtype(), v1::DTYPE_BFLOAT16);
  EXPECT_EQ(request->logits().rows(), 3u);
  EXPECT_EQ(request->logits().vocab_size(), 16u);
  EXPECT_EQ(request->logits().data().size(), 3u * 16u * 2u);
  ASSERT_EQ(request->rows_size(), 3);
  for (const v1::SampleRow& row : request->rows()) {
    const v1::SamplingParams& p = row.params();
    EXPECT_TRUE(p.has_temperature());
    EXPECT_EQ(p.temperature(), 0.0f);
    EXPECT_EQ(p.top_k(), -1);
    EXPECT_EQ(p.logprobs(), 2);
    EXPECT_THAT(p.stop_token_ids(), ElementsAre(3, 4));
    EXPECT_TRUE(p.has_ignore_eos());
    EXPECT_FALSE(p.ignore_eos());
    EXPECT_EQ(p.seed(), 9u);
    EXPECT_FALSE(p.has_top_p());
    EXPECT_FALSE(p.has_min_p());
    EXPECT_FALSE(p.has_n());
    EXPECT_FALSE(p.has_max_tokens());
    EXPECT_EQ(p.logprobs_mode(), v1::LOGPROBS_MODE_UNSPECIFIED);
    EXPECT_TRUE(p.preset().empty());
  }
}

// --- logits and the request from flags ---

TEST(LogitsFromFlagsTest, RandomDefaultsToOneFloat32Row) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_random, true);
  absl::SetFlag(&FLAGS_vocab, 1000u);
  absl::StatusOr<v1::Logits> logits = LogitsFromFlags();
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_EQ(logits->dtype(), v1::DTYPE_FLOAT32);
  EXPECT_EQ(logits->rows(), 1u);
  EXPECT_EQ(logits->vocab_size(), 1000u);
  EXPECT_EQ(logits->data().size(), 4000u);
  EXPECT_EQ(logits->data(), MakeLogits(RandomLogits(1, 1000, 0), 1000, v1::DTYPE_FLOAT32)->data());
}

TEST(LogitsFromFlagsTest, RandomUsesSeedRowsAndDType) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_random, true);
  absl::SetFlag(&FLAGS_vocab, 64u);
  absl::SetFlag(&FLAGS_rows, 5u);
  absl::SetFlag(&FLAGS_seed, uint64_t{77});
  absl::SetFlag(&FLAGS_dtype, std::string("f16"));
  absl::StatusOr<v1::Logits> logits = LogitsFromFlags();
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_EQ(logits->dtype(), v1::DTYPE_FLOAT16);
  EXPECT_EQ(logits->rows(), 5u);
  EXPECT_EQ(logits->data(), MakeLogits(RandomLogits(5, 64, 77), 64, v1::DTYPE_FLOAT16)->data());
}

TEST(LogitsFromFlagsTest, RequiresExactlyOneSourceAndVocab) {
  {
    absl::FlagSaver saver;
    absl::SetFlag(&FLAGS_vocab, 8u);
    EXPECT_EQ(LogitsFromFlags().status().message(),
              "exactly one of --logits FILE or --random is required");
  }
  {
    absl::FlagSaver saver;
    absl::SetFlag(&FLAGS_vocab, 8u);
    absl::SetFlag(&FLAGS_random, true);
    absl::SetFlag(&FLAGS_logits, std::string("/dev/null"));
    EXPECT_EQ(LogitsFromFlags().status().code(), absl::StatusCode::kInvalidArgument);
  }
  {
    absl::FlagSaver saver;
    absl::SetFlag(&FLAGS_random, true);
    EXPECT_EQ(LogitsFromFlags().status().message(), "--vocab is required");
  }
  {
    absl::FlagSaver saver;
    absl::SetFlag(&FLAGS_random, true);
    absl::SetFlag(&FLAGS_vocab, 0u);
    EXPECT_EQ(LogitsFromFlags().status().message(), "--vocab must be > 0, got \"0\"");
  }
  {
    absl::FlagSaver saver;
    absl::SetFlag(&FLAGS_random, true);
    absl::SetFlag(&FLAGS_vocab, 8u);
    absl::SetFlag(&FLAGS_dtype, std::string("int8"));
    EXPECT_THAT(LogitsFromFlags().status().message(), HasSubstr("--dtype"));
  }
}

class LogitsFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = absl::StrCat(::testing::TempDir(), "/cli_test_logits_",
                         ::testing::UnitTest::GetInstance()->current_test_info()->name(), ".bin");
  }
  void TearDown() override { std::remove(path_.c_str()); }

  void Write(const std::string& bytes) {
    std::ofstream out(path_, std::ios::binary);
    out << bytes;
  }

  std::string path_;
};

TEST_F(LogitsFileTest, ReadsRawBytesAndDerivesRows) {
  const float values[] = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f};
  const std::string bytes = MakeLogits(values, 3, v1::DTYPE_FLOAT32)->data();
  Write(bytes);
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_logits, path_);
  absl::SetFlag(&FLAGS_vocab, 3u);
  absl::StatusOr<v1::Logits> logits = LogitsFromFlags();
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_EQ(logits->rows(), 2u);
  EXPECT_EQ(logits->dtype(), v1::DTYPE_FLOAT32);
  EXPECT_EQ(logits->data(), bytes);

  absl::SetFlag(&FLAGS_rows, 2u);
  EXPECT_TRUE(LogitsFromFlags().ok());
  absl::SetFlag(&FLAGS_rows, 3u);
  EXPECT_THAT(LogitsFromFlags().status().message(), HasSubstr("holds 2 rows of --vocab 3"));
}

TEST_F(LogitsFileTest, ReadsBf16Files) {
  Write(std::string("\x80\x3f\x00\x40", 4));
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_logits, path_);
  absl::SetFlag(&FLAGS_vocab, 2u);
  absl::SetFlag(&FLAGS_dtype, std::string("bf16"));
  absl::StatusOr<v1::Logits> logits = LogitsFromFlags();
  ASSERT_TRUE(logits.ok()) << logits.status();
  EXPECT_EQ(logits->dtype(), v1::DTYPE_BFLOAT16);
  EXPECT_EQ(logits->rows(), 1u);
}

TEST_F(LogitsFileTest, RejectsPartialRowsAndEmptyFiles) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_logits, path_);
  absl::SetFlag(&FLAGS_vocab, 4u);
  Write(std::string(12, '\0'));  // 3 floats, vocab 4
  absl::StatusOr<v1::Logits> logits = LogitsFromFlags();
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(logits.status().message(), HasSubstr("not a multiple of vocab_size 4"));
  Write("");
  EXPECT_THAT(LogitsFromFlags().status().message(), HasSubstr("is empty"));
}

TEST_F(LogitsFileTest, MissingFileIsNotFound) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_logits, path_ + ".missing");
  absl::SetFlag(&FLAGS_vocab, 4u);
  absl::StatusOr<v1::Logits> logits = LogitsFromFlags();
  EXPECT_EQ(logits.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(logits.status().message(), HasSubstr(".missing"));
}

TEST(SampleRequestFromFlagsTest, OneRowPerLogitsRowWithParamsAndHistory) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_random, true);
  absl::SetFlag(&FLAGS_vocab, 32u);
  absl::SetFlag(&FLAGS_rows, 2u);
  absl::SetFlag(&FLAGS_top_k, 5);
  absl::SetFlag(&FLAGS_prompt_token_ids, std::vector<std::string>{"1", "2", "3"});
  absl::SetFlag(&FLAGS_output_token_ids, std::vector<std::string>{"4"});
  absl::StatusOr<v1::SampleRequest> request = SampleRequestFromFlags();
  ASSERT_TRUE(request.ok()) << request.status();
  ASSERT_EQ(request->rows_size(), 2);
  for (const v1::SampleRow& row : request->rows()) {
    EXPECT_EQ(row.params().top_k(), 5);
    EXPECT_THAT(row.prompt_token_ids(), ElementsAre(1, 2, 3));
    EXPECT_THAT(row.output_token_ids(), ElementsAre(4));
  }
}

TEST(SampleRequestFromFlagsTest, BadHistoryIsInvalidArgument) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_random, true);
  absl::SetFlag(&FLAGS_vocab, 32u);
  absl::SetFlag(&FLAGS_prompt_token_ids, std::vector<std::string>{"1", "two"});
  EXPECT_THAT(SampleRequestFromFlags().status().message(),
              HasSubstr("--prompt_token_ids must be a list of int32 token ids, got \"two\""));
}

// --- random logits ---

TEST(RandomLogitsTest, IsReproducibleAndSeedDependent) {
  EXPECT_EQ(RandomLogits(3, 500, 1), RandomLogits(3, 500, 1));
  EXPECT_NE(RandomLogits(3, 500, 1), RandomLogits(3, 500, 2));
}

TEST(RandomLogitsTest, RowDoesNotDependOnTheNumberOfRows) {
  const std::vector<float> two = RandomLogits(2, 300, 5);
  const std::vector<float> four = RandomLogits(4, 300, 5);
  EXPECT_TRUE(std::equal(two.begin(), two.end(), four.begin()));
  EXPECT_NE(std::vector<float>(four.begin(), four.begin() + 300),
            std::vector<float>(four.begin() + 300, four.begin() + 600));
}

TEST(RandomLogitsTest, HasTheBenchmarkShape) {
  constexpr uint32_t kVocab = 32000;
  constexpr uint32_t kRows = 16;
  const std::vector<float> logits = RandomLogits(kRows, kVocab, 42);
  ASSERT_EQ(logits.size(), size_t{kRows} * kVocab);
  for (uint32_t r = 0; r < kRows; ++r) {
    const float* row = logits.data() + size_t{r} * kVocab;
    double sum = 0, sum_sq = 0;
    for (uint32_t i = 0; i < kVocab; ++i) {
      ASSERT_TRUE(std::isfinite(row[i]));
      sum += row[i];
      sum_sq += double{row[i]} * row[i];
    }
    const double mean = sum / kVocab;
    const double sd = std::sqrt(sum_sq / kVocab - mean * mean);
    // Bulk σ ∈ [2, 3); ≤ 8 peaks barely move the moments of 32000 values.
    EXPECT_NEAR(mean, 0.0, 0.1) << "row " << r;
    EXPECT_GT(sd, 1.9) << "row " << r;
    EXPECT_LT(sd, 3.15) << "row " << r;
    // The top peak: ln V + σ²/2 + U[-1, 6) ≥ ln 32000 + 2 - 1 ≈ 11.4, ≤ ln V + 4.5 + 6 ≈ 20.9;
    // the bulk's maximum of 32000 normals stays below ~4.5σ.
    const float top = *std::max_element(row, row + kVocab);
    EXPECT_GE(top, std::log(float{kVocab}) + 1.0f) << "row " << r;
    EXPECT_LT(top, std::log(float{kVocab}) + 10.5f) << "row " << r;
  }
}

TEST(RandomLogitsTest, TinyVocabularyIsAllPeaks) {
  const std::vector<float> logits = RandomLogits(1, 1, 3);
  ASSERT_EQ(logits.size(), 1u);
  EXPECT_GE(logits[0], 1.0f);  // ln 1 + σ²/2 + U[-1, 6) ≥ 2 - 1
}

// --- output ---

TEST(FinishReasonNameTest, StripsThePrefix) {
  EXPECT_EQ(FinishReasonName(v1::FINISH_REASON_UNSPECIFIED), "none");
  EXPECT_EQ(FinishReasonName(v1::FINISH_REASON_EOS), "EOS");
  EXPECT_EQ(FinishReasonName(v1::FINISH_REASON_STOP), "STOP");
  EXPECT_EQ(FinishReasonName(v1::FINISH_REASON_LENGTH), "LENGTH");
}

v1::SampledToken Token(uint32_t row, uint32_t sample, int32_t id, float logprob) {
  v1::SampledToken token;
  token.set_row_index(row);
  token.set_sample_index(sample);
  token.set_token_id(id);
  token.set_logprob(logprob);
  return token;
}

TEST(FormatResultTest, PlainResult) {
  EXPECT_EQ(FormatResult(Token(0, 0, 1234, -0.53f), /*with_logprobs=*/true),
            "row 0 sample 0: token 1234 logprob -0.53 finish=none");
}

TEST(FormatResultTest, LogprobOnlyWhenRequested) {
  EXPECT_EQ(FormatResult(Token(3, 0, 17, 0.0f), /*with_logprobs=*/false),
            "row 3 sample 0: token 17 finish=none");
}

TEST(FormatResultTest, TopLogprobsAndFinish) {
  v1::SampledToken token = Token(2, 1, 1234, -0.53f);
  v1::TokenLogprob* top = token.add_top_logprobs();
  top->set_token_id(1234);
  top->set_logprob(-0.53f);
  top = token.add_top_logprobs();
  top->set_token_id(77);
  top->set_logprob(-1.9f);
  token.set_finish_reason(v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(FormatResult(token, /*with_logprobs=*/true),
            "row 2 sample 1: token 1234 logprob -0.53 [top: 1234:-0.53 77:-1.9] finish=LENGTH");
}

TEST(FormatResultTest, StopMatchAndMirostat) {
  v1::SampledToken token = Token(0, 0, 7, -std::numeric_limits<float>::infinity());
  token.set_finish_reason(v1::FINISH_REASON_STOP);
  token.set_stop_token_id(7);
  token.set_mirostat_mu(9.5f);
  EXPECT_EQ(FormatResult(token, /*with_logprobs=*/true),
            "row 0 sample 0: token 7 logprob -inf finish=STOP stop_token_id=7 mirostat_mu=9.5");
  token.set_stop_sequence_index(1);
  EXPECT_THAT(FormatResult(token, /*with_logprobs=*/false),
              HasSubstr("finish=STOP stop_sequence_index=1 "));
}

TEST(FormatSequenceResultTest, StepAndSequenceThenTheTokenAsFormatResult) {
  v1::SequenceResult result;
  result.set_sequence_id(7);
  result.set_token_id(1234);
  result.set_logprob(-0.53f);
  v1::TokenLogprob* top = result.add_top_logprobs();
  top->set_token_id(1234);
  top->set_logprob(-0.53f);
  EXPECT_EQ(FormatSequenceResult(3, result, /*with_logprobs=*/true),
            "step 3 sequence 7: token 1234 logprob -0.53 [top: 1234:-0.53] finish=none");
  result.set_finish_reason(v1::FINISH_REASON_STOP);
  result.set_stop_sequence_index(2);
  result.set_mirostat_mu(4.5f);
  EXPECT_EQ(FormatSequenceResult(0, result, /*with_logprobs=*/false),
            "step 0 sequence 7: token 1234 [top: 1234:-0.53] finish=STOP stop_sequence_index=2 "
            "mirostat_mu=4.5");
}

TEST(FormatResponseTextTest, OneLinePerResult) {
  v1::SampleResponse response;
  *response.add_results() = Token(0, 0, 1, -0.5f);
  *response.add_results() = Token(1, 0, 2, -0.25f);
  EXPECT_EQ(FormatResponseText(response, /*with_logprobs=*/true),
            "row 0 sample 0: token 1 logprob -0.5 finish=none\n"
            "row 1 sample 0: token 2 logprob -0.25 finish=none\n");
}

TEST(FormatResponseJsonTest, OneLineWithProtoFieldNamesAndZeros) {
  v1::SampleResponse response;
  *response.add_results() = Token(0, 0, 0, -0.5f);
  absl::StatusOr<std::string> json = FormatResponseJson(response);
  ASSERT_TRUE(json.ok()) << json.status();
  EXPECT_EQ(json->back(), '\n');
  EXPECT_EQ(std::count(json->begin(), json->end(), '\n'), 1);
  EXPECT_THAT(*json, HasSubstr("\"results\":["));
  EXPECT_THAT(*json, HasSubstr("\"token_id\":0"));
  EXPECT_THAT(*json, HasSubstr("\"logprob\":-0.5"));
  EXPECT_THAT(*json, HasSubstr("\"finish_reason\":\"FINISH_REASON_UNSPECIFIED\""));
}

TEST(FormatErrorTest, CodeNameAndMessage) {
  EXPECT_EQ(
      FormatError(absl::InvalidArgumentError("rows[0].params.top_p must be in (0, 1], got 0")),
      "error: INVALID_ARGUMENT: rows[0].params.top_p must be in (0, 1], got 0");
  EXPECT_EQ(FormatError(absl::UnavailableError("down")), "error: UNAVAILABLE: down");
}

// --- subcommands without a server ---

TEST(RunSampleTest, LocalErrorsPrintErrorAndExitOne) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_random, true);  // no --vocab
  std::ostringstream out, err;
  EXPECT_EQ(RunSample(out, err), 1);
  EXPECT_EQ(out.str(), "");
  EXPECT_EQ(err.str(), "error: INVALID_ARGUMENT: --vocab is required\n");
}

TEST(RunSampleTest, NonPositiveTimeoutIsRejected) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_random, true);
  absl::SetFlag(&FLAGS_vocab, 8u);
  absl::SetFlag(&FLAGS_timeout_ms, int64_t{0});
  std::ostringstream out, err;
  EXPECT_EQ(RunSample(out, err), 1);
  EXPECT_EQ(err.str(), "error: INVALID_ARGUMENT: --timeout_ms must be > 0, got \"0\"\n");
}

TEST(RunSampleTest, UnreachableServerIsUnavailable) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_random, true);
  absl::SetFlag(&FLAGS_vocab, 8u);
  absl::SetFlag(&FLAGS_target, absl::StrCat("unix:", ::testing::TempDir(), "/cli_test_none.sock"));
  std::ostringstream out, err;
  EXPECT_EQ(RunSample(out, err), 1);
  EXPECT_THAT(err.str(), ::testing::StartsWith("error: UNAVAILABLE: "));
}

TEST(RunDecodeTest, LocalErrorsPrintErrorAndExitOne) {
  const std::pair<std::function<void()>, std::string> cases[] = {
      {[] {}, "error: INVALID_ARGUMENT: --vocab is required\n"},
      {[] {
         absl::SetFlag(&FLAGS_vocab, 8u);
         absl::SetFlag(&FLAGS_steps, 0u);
       },
       "error: INVALID_ARGUMENT: --steps must be > 0, got \"0\"\n"},
      {[] {
         absl::SetFlag(&FLAGS_vocab, 8u);
         absl::SetFlag(&FLAGS_sequences, 0u);
       },
       "error: INVALID_ARGUMENT: --sequences must be > 0, got \"0\"\n"},
      {[] {
         absl::SetFlag(&FLAGS_vocab, 8u);
         absl::SetFlag(&FLAGS_n, 0);
       },
       "error: INVALID_ARGUMENT: --n must be >= 1, got \"0\"\n"},
      {[] {
         absl::SetFlag(&FLAGS_vocab, 8u);
         absl::SetFlag(&FLAGS_random, true);
       },
       "error: INVALID_ARGUMENT: decode takes no --logits, --random, --rows or "
       "--output_token_ids: the toy model makes the logits and the server keeps the history\n"},
      {[] {
         absl::SetFlag(&FLAGS_vocab, 8u);
         absl::SetFlag(&FLAGS_dtype, "f64");
       },
       "error: INVALID_ARGUMENT: --dtype must be f32, bf16 or f16, got \"f64\"\n"},
  };
  for (const auto& [set_flags, expected] : cases) {
    absl::FlagSaver saver;
    set_flags();
    std::ostringstream out, err;
    EXPECT_EQ(RunDecode(out, err), 1) << expected;
    EXPECT_EQ(out.str(), "");
    EXPECT_EQ(err.str(), expected);
  }
}

TEST(RunDecodeTest, UnreachableServerIsUnavailable) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_vocab, 8u);
  absl::SetFlag(&FLAGS_target, absl::StrCat("unix:", ::testing::TempDir(), "/cli_test_none.sock"));
  std::ostringstream out, err;
  EXPECT_EQ(RunDecode(out, err), 1);
  EXPECT_EQ(out.str(), "");
  EXPECT_THAT(err.str(), ::testing::StartsWith("error: UNAVAILABLE: "));
}

TEST(ToyModelLogitsTest, DependsOnTheSeedAndTheLastTwoTokensOnly) {
  const std::vector<float> row = ToyModelLogits(1, 5, 6, 100);
  ASSERT_EQ(row.size(), 100u);
  EXPECT_EQ(ToyModelLogits(1, 5, 6, 100), row);
  EXPECT_NE(ToyModelLogits(2, 5, 6, 100), row);
  EXPECT_NE(ToyModelLogits(1, 4, 6, 100), row);
  EXPECT_NE(ToyModelLogits(1, 5, 7, 100), row);
  EXPECT_NE(ToyModelLogits(1, -1, 6, 100), row);
}

TEST(RunHealthTest, UnreachableServerIsUnavailable) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_target, absl::StrCat("unix:", ::testing::TempDir(), "/cli_test_none.sock"));
  std::ostringstream out, err;
  EXPECT_EQ(RunHealth(out, err), 1);
  EXPECT_EQ(out.str(), "");
  EXPECT_THAT(err.str(), ::testing::StartsWith("error: UNAVAILABLE: "));
}

}  // namespace
}  // namespace tokensampler::cli
