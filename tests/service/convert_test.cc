// proto ↔ core conversion: presets and explicit fields, enums, borrowing (no copies), results.
#include "service/convert.h"

#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/service_testing.h"

namespace tokensampler::service {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Pair;

TEST(ParamsFromProtoTest, UnsetFieldsAreTheDefaults) {
  absl::StatusOr<SamplingParams> params = ParamsFromProto(v1::SamplingParams(), 10);
  ASSERT_TRUE(params.ok()) << params.status();
  const SamplingParams defaults;
  EXPECT_EQ(params->temperature, defaults.temperature);
  EXPECT_EQ(params->top_k, defaults.top_k);
  EXPECT_EQ(params->top_p, defaults.top_p);
  EXPECT_EQ(params->min_p, defaults.min_p);
  EXPECT_EQ(params->repetition_penalty, defaults.repetition_penalty);
  EXPECT_FALSE(params->seed.has_value());
  EXPECT_FALSE(params->logprobs.has_value());
  EXPECT_EQ(params->logprobs_mode, LogprobsMode::kRawLogprobs);
  EXPECT_FALSE(params->top_n_sigma.has_value());
  EXPECT_FALSE(params->max_tokens.has_value());
  EXPECT_EQ(params->n, 1);
  EXPECT_TRUE(params->sampler_order.empty());
}

TEST(ParamsFromProtoTest, CopiesEveryExplicitField) {
  v1::SamplingParams proto;
  proto.set_temperature(0.0f);  // explicit zero: greedy, not "unset"
  proto.set_top_k(-1);
  proto.set_top_p(0.5f);
  proto.set_min_p(0.0f);
  proto.set_repetition_penalty(1.2f);
  proto.set_frequency_penalty(-0.5f);
  proto.set_presence_penalty(0.25f);
  proto.set_seed(0);
  (*proto.mutable_logit_bias())[7] = -1.0f;
  (*proto.mutable_logit_bias())[2] = 3.0f;
  (*proto.mutable_logit_bias())[5] = -std::numeric_limits<float>::infinity();
  proto.set_logprobs(0);
  proto.set_logprobs_mode(v1::PROCESSED_LOGITS);
  proto.set_typical_p(0.9f);
  proto.set_epsilon_cutoff(0.001f);
  proto.set_eta_cutoff(0.002f);
  proto.set_top_n_sigma(1.5f);
  proto.set_xtc_threshold(0.2f);
  proto.set_xtc_probability(0.5f);
  proto.set_dynatemp_range(0.3f);
  proto.set_dynatemp_exponent(2.0f);
  proto.set_mirostat_tau(4.0f);
  proto.set_mirostat_eta(0.2f);
  proto.set_dry_multiplier(0.8f);
  proto.set_dry_base(2.0f);
  proto.set_dry_allowed_length(3);
  proto.set_dry_penalty_last_n(0);
  proto.add_dry_sequence_breakers()->add_token_ids(1);
  proto.set_no_repeat_ngram_size(2);
  proto.set_penalty_last_n(16);
  proto.add_allowed_token_ids(1);
  proto.add_allowed_token_ids(2);
  proto.add_bad_words()->add_token_ids(3);
  proto.add_eos_token_ids(9);
  proto.set_min_tokens(4);
  proto.set_ignore_eos(true);
  proto.set_token_bitmask(std::string("\xff\x03", 2));
  proto.set_max_tokens(100);
  proto.add_stop_token_ids(8);
  auto* stop = proto.add_stop_token_sequences();
  stop->add_token_ids(4);
  stop->add_token_ids(5);
  proto.set_n(2);
  for (v1::SamplerStage stage :
       {v1::SAMPLER_STAGE_TOP_N_SIGMA, v1::SAMPLER_STAGE_TOP_K, v1::SAMPLER_STAGE_TYPICAL_P,
        v1::SAMPLER_STAGE_TOP_P, v1::SAMPLER_STAGE_MIN_P, v1::SAMPLER_STAGE_EPSILON_CUTOFF,
        v1::SAMPLER_STAGE_ETA_CUTOFF, v1::SAMPLER_STAGE_XTC, v1::SAMPLER_STAGE_TEMPERATURE}) {
    proto.add_sampler_order(stage);
  }

  absl::StatusOr<SamplingParams> p = ParamsFromProto(proto, 10);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->temperature, 0.0f);
  EXPECT_TRUE(p->greedy());
  EXPECT_EQ(p->top_k, -1);
  EXPECT_EQ(p->top_p, 0.5f);
  EXPECT_EQ(p->repetition_penalty, 1.2f);
  EXPECT_EQ(p->frequency_penalty, -0.5f);
  EXPECT_EQ(p->presence_penalty, 0.25f);
  EXPECT_EQ(p->seed, std::optional<uint64_t>(0));
  // A map → sorted by token id.
  ASSERT_EQ(p->logit_bias.size(), 3u);
  EXPECT_EQ(p->logit_bias[0], std::make_pair(2, 3.0f));
  EXPECT_EQ(p->logit_bias[1].first, 5);
  EXPECT_EQ(p->logit_bias[2], std::make_pair(7, -1.0f));
  EXPECT_EQ(p->logprobs, std::optional<int32_t>(0));
  EXPECT_EQ(p->logprobs_mode, LogprobsMode::kProcessedLogits);
  EXPECT_EQ(p->typical_p, 0.9f);
  EXPECT_EQ(p->epsilon_cutoff, 0.001f);
  EXPECT_EQ(p->eta_cutoff, 0.002f);
  EXPECT_EQ(p->top_n_sigma, std::optional<float>(1.5f));
  EXPECT_EQ(p->xtc_threshold, 0.2f);
  EXPECT_EQ(p->xtc_probability, 0.5f);
  EXPECT_EQ(p->dynatemp_range, 0.3f);
  EXPECT_EQ(p->dynatemp_exponent, 2.0f);
  EXPECT_EQ(p->mirostat_tau, 4.0f);
  EXPECT_EQ(p->mirostat_eta, 0.2f);
  EXPECT_EQ(p->dry_multiplier, 0.8f);
  EXPECT_EQ(p->dry_base, 2.0f);
  EXPECT_EQ(p->dry_allowed_length, 3);
  EXPECT_EQ(p->dry_penalty_last_n, 0);
  EXPECT_THAT(p->dry_sequence_breakers, ElementsAre(ElementsAre(1)));
  EXPECT_EQ(p->no_repeat_ngram_size, 2);
  EXPECT_EQ(p->penalty_last_n, 16);
  EXPECT_THAT(p->allowed_token_ids, ElementsAre(1, 2));
  EXPECT_THAT(p->bad_words, ElementsAre(ElementsAre(3)));
  EXPECT_THAT(p->eos_token_ids, ElementsAre(9));
  EXPECT_EQ(p->min_tokens, 4);
  EXPECT_TRUE(p->ignore_eos);
  EXPECT_EQ(p->token_bitmask, std::string("\xff\x03", 2));
  EXPECT_EQ(p->max_tokens, std::optional<int32_t>(100));
  EXPECT_THAT(p->stop_token_ids, ElementsAre(8));
  EXPECT_THAT(p->stop_token_sequences, ElementsAre(ElementsAre(4, 5)));
  EXPECT_EQ(p->n, 2);
  EXPECT_THAT(p->sampler_order, ElementsAre(Stage::kTopNSigma, Stage::kTopK, Stage::kTypicalP,
                                            Stage::kTopP, Stage::kMinP, Stage::kEpsilonCutoff,
                                            Stage::kEtaCutoff, Stage::kXtc, Stage::kTemperature));
}

TEST(ParamsFromProtoTest, MirostatFieldsAreCopied) {
  v1::SamplingParams proto;
  proto.set_mirostat_mode(2);
  absl::StatusOr<SamplingParams> p = ParamsFromProto(proto, 10);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->mirostat_mode, 2);
}

TEST(ParamsFromProtoTest, PresetThenExplicitFieldsOverrideIt) {
  v1::SamplingParams proto;
  proto.set_preset("balanced");
  absl::StatusOr<SamplingParams> preset = PresetParams("balanced");
  ASSERT_TRUE(preset.ok());
  absl::StatusOr<SamplingParams> p = ParamsFromProto(proto, 10);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->temperature, preset->temperature);
  EXPECT_EQ(p->top_p, preset->top_p);
  EXPECT_EQ(p->repetition_penalty, preset->repetition_penalty);

  proto.set_top_p(1.0f);  // explicit wins, even when it equals the default
  p = ParamsFromProto(proto, 10);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->temperature, preset->temperature);
  EXPECT_EQ(p->top_p, 1.0f);
}

TEST(ParamsFromProtoTest, LogprobsModeUnspecifiedIsRawLogprobs) {
  v1::SamplingParams proto;
  proto.set_logprobs_mode(v1::LOGPROBS_MODE_UNSPECIFIED);
  absl::StatusOr<SamplingParams> p = ParamsFromProto(proto, 10);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->logprobs_mode, LogprobsMode::kRawLogprobs);
  for (auto [mode, expected] : {std::pair{v1::RAW_LOGPROBS, LogprobsMode::kRawLogprobs},
                                std::pair{v1::PROCESSED_LOGPROBS, LogprobsMode::kProcessedLogprobs},
                                std::pair{v1::RAW_LOGITS, LogprobsMode::kRawLogits},
                                std::pair{v1::PROCESSED_LOGITS, LogprobsMode::kProcessedLogits}}) {
    proto.set_logprobs_mode(mode);
    p = ParamsFromProto(proto, 10);
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->logprobs_mode, expected);
  }
}

TEST(ParamsFromProtoTest, ErrorsNameTheFieldAndTheValue) {
  v1::SamplingParams proto;
  proto.set_top_p(1.5f);
  EXPECT_EQ(ParamsFromProto(proto, 10).status(),
            absl::InvalidArgumentError("top_p must be in (0, 1], got 1.5"));

  proto.Clear();
  proto.add_sampler_order(v1::SAMPLER_STAGE_UNSPECIFIED);
  EXPECT_EQ(ParamsFromProto(proto, 10).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ParamsFromProto(proto, 10).status().message(), HasSubstr("sampler_order[0] must be"));

  proto.Clear();
  proto.set_preset("unknown");
  EXPECT_THAT(ParamsFromProto(proto, 10).status().message(), HasSubstr("got \"unknown\""));

  // The preset is validated like explicit fields: an explicit value breaks it here.
  proto.Clear();
  proto.set_preset("greedy");
  proto.set_temperature(-1.0f);
  EXPECT_THAT(ParamsFromProto(proto, 10).status().message(), HasSubstr("temperature must be >= 0"));
}

TEST(DTypeFromProtoTest, MapsEveryDType) {
  EXPECT_EQ(*DTypeFromProto(v1::DTYPE_FLOAT32), DType::kFloat32);
  EXPECT_EQ(*DTypeFromProto(v1::DTYPE_BFLOAT16), DType::kBFloat16);
  EXPECT_EQ(*DTypeFromProto(v1::DTYPE_FLOAT16), DType::kFloat16);
  EXPECT_EQ(DTypeFromProto(v1::DTYPE_UNSPECIFIED).status(),
            absl::InvalidArgumentError("logits.dtype must be set, got DTYPE_UNSPECIFIED"));
}

TEST(BatchFromProtoTest, BorrowsLogitsAndHistoriesWithoutCopies) {
  v1::SampleRequest request = tokensampler::testing::MakeRequest({{1, 2, 3}, {3, 2, 1}});
  request.mutable_rows(1)->add_prompt_token_ids(2);
  request.mutable_rows(1)->add_prompt_token_ids(0);
  request.mutable_rows(1)->add_output_token_ids(1);
  request.mutable_rows(1)->set_mirostat_mu(7.5f);
  request.mutable_rows(0)->mutable_params()->set_top_k(2);

  absl::StatusOr<Batch> batch = BatchFromProto(request);
  ASSERT_TRUE(batch.ok()) << batch.status();
  EXPECT_EQ(batch->logits.rows(), 2);
  EXPECT_EQ(batch->logits.vocab_size(), 3);
  EXPECT_EQ(batch->logits.RowBytes(0),
            reinterpret_cast<const uint8_t*>(request.logits().data().data()));
  EXPECT_EQ(batch->logits.At(1, 0), 3.0f);
  ASSERT_EQ(batch->rows.size(), 2u);
  EXPECT_EQ(batch->rows[0].params, &batch->params[0]);
  EXPECT_EQ(batch->rows[1].params, &batch->params[1]);
  EXPECT_EQ(batch->params[0].top_k, 2);
  EXPECT_EQ(batch->rows[1].prompt_token_ids.data(), request.rows(1).prompt_token_ids().data());
  EXPECT_THAT(batch->rows[1].prompt_token_ids, ElementsAre(2, 0));
  EXPECT_EQ(batch->rows[1].output_token_ids.data(), request.rows(1).output_token_ids().data());
  EXPECT_THAT(batch->rows[1].output_token_ids, ElementsAre(1));
  EXPECT_EQ(batch->rows[1].mirostat_mu, std::optional<float>(7.5f));
  EXPECT_FALSE(batch->rows[0].mirostat_mu.has_value());

  // Moving the batch keeps the row → params pointers valid.
  const Batch moved = *std::move(batch);
  EXPECT_EQ(moved.rows[1].params, &moved.params[1]);
}

TEST(BatchFromProtoTest, PrefixesTheRowOfAParameterError) {
  v1::SampleRequest request = tokensampler::testing::MakeRequest({{1, 2}, {2, 1}, {0, 0}});
  request.mutable_rows(2)->mutable_params()->set_min_p(2.0f);
  EXPECT_EQ(BatchFromProto(request).status(),
            absl::InvalidArgumentError("rows[2].params.min_p must be in [0, 1], got 2"));
}

TEST(ResponseToProtoTest, CopiesEveryField) {
  std::vector<SampledToken> tokens(3);
  tokens[0].token_id = 5;
  tokens[0].logprob = -0.25f;
  tokens[0].top_logprobs = {{5, -0.25f}, {1, -2.0f}};
  tokens[0].finish_reason = FinishReason::kStop;
  tokens[0].stop_token_id = 5;
  tokens[1].token_id = 2;
  tokens[1].finish_reason = FinishReason::kStop;
  tokens[1].stop_sequence_index = 1;
  tokens[1].row_index = 1;
  tokens[1].mirostat_mu = 9.5f;
  tokens[2].token_id = 3;
  tokens[2].finish_reason = FinishReason::kLength;
  tokens[2].row_index = 1;
  tokens[2].sample_index = 1;

  const v1::SampleResponse response = ResponseToProto(tokens);
  ASSERT_EQ(response.results_size(), 3);
  const v1::SampledToken& a = response.results(0);
  EXPECT_EQ(a.token_id(), 5);
  EXPECT_EQ(a.logprob(), -0.25f);
  ASSERT_EQ(a.top_logprobs_size(), 2);
  EXPECT_EQ(a.top_logprobs(1).token_id(), 1);
  EXPECT_EQ(a.top_logprobs(1).logprob(), -2.0f);
  EXPECT_EQ(a.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(a.matched_stop_case(), v1::SampledToken::kStopTokenId);
  EXPECT_EQ(a.stop_token_id(), 5);
  EXPECT_FALSE(a.has_mirostat_mu());
  const v1::SampledToken& b = response.results(1);
  EXPECT_EQ(b.matched_stop_case(), v1::SampledToken::kStopSequenceIndex);
  EXPECT_EQ(b.stop_sequence_index(), 1u);
  EXPECT_EQ(b.row_index(), 1u);
  EXPECT_TRUE(b.has_mirostat_mu());
  EXPECT_EQ(b.mirostat_mu(), 9.5f);
  const v1::SampledToken& c = response.results(2);
  EXPECT_EQ(c.finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(c.matched_stop_case(), v1::SampledToken::MATCHED_STOP_NOT_SET);
  EXPECT_EQ(c.sample_index(), 1u);
}

}  // namespace
}  // namespace tokensampler::service
