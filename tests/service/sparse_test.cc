// Sparse candidates end to end, in-process: the same realistic rows sent dense and as top-k
// candidates + the log-sum-exp of the rest must give the same tokens (seeded) and the same raw
// logprobs for the parameters documented as exact, and a clear INVALID_ARGUMENT for the others.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cli/random_logits.h"
#include "client/shared_memory.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/server.h"
#include "tests/testing/service_testing.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::service {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::tokensampler::testing::MakeLogits;
using ::tokensampler::testing::SetDeadline;

constexpr uint32_t kVocab = 6000;
constexpr uint32_t kRows = 8;
constexpr uint32_t kK = 1024;

class SparseTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ServerOptions options;
    options.threads = 2;
    absl::StatusOr<std::unique_ptr<Server>> server = Server::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    stub_ = v1::Sampler::NewStub(server_->InProcessChannel(grpc::ChannelArguments()));
    values_ = cli::RandomLogits(kRows, kVocab, 11);
  }

  void TearDown() override { server_->Shutdown(absl::Now() + absl::Seconds(5)); }

  grpc::Status Sample(const v1::SampleRequest& request, v1::SampleResponse* response) {
    grpc::ClientContext context;
    SetDeadline(context);
    return stub_->Sample(&context, request, response);
  }

  // The dense and the sparse request for the same rows and parameters.
  std::pair<v1::SampleRequest, v1::SampleRequest> Requests(const v1::SamplingParams& params,
                                                           v1::DType dtype = v1::DTYPE_FLOAT32,
                                                           uint32_t k = kK) {
    std::vector<std::vector<float>> rows(kRows);
    for (uint32_t r = 0; r < kRows; ++r) {
      rows[r].assign(values_.begin() + r * kVocab, values_.begin() + (r + 1) * kVocab);
    }
    v1::SampleRequest dense, sparse;
    *dense.mutable_logits() = MakeLogits(rows, dtype);
    // The candidates come from the values as the server sees them (bf16 / fp16 rounded).
    std::vector<float> seen(values_.size());
    for (size_t i = 0; i < values_.size(); ++i) {
      seen[i] = dtype == v1::DTYPE_FLOAT32    ? values_[i]
                : dtype == v1::DTYPE_BFLOAT16 ? Bf16ToFloat(FloatToBf16(values_[i]))
                                              : Fp16ToFloat(FloatToFp16(values_[i]));
    }
    absl::StatusOr<v1::Logits> logits = SparseLogitsFromDense(seen, kVocab, k, dtype);
    EXPECT_TRUE(logits.ok()) << logits.status();
    *sparse.mutable_logits() = *logits;
    for (uint32_t r = 0; r < kRows; ++r) {
      v1::SampleRow& a = *dense.add_rows();
      *a.mutable_params() = params;
      a.mutable_params()->set_seed(1000 + r);
      *sparse.add_rows() = a;
    }
    return {dense, sparse};
  }

  void ExpectEquivalent(const v1::SamplingParams& params, v1::DType dtype = v1::DTYPE_FLOAT32) {
    const auto [dense, sparse] = Requests(params, dtype);
    v1::SampleResponse expected, actual;
    const grpc::Status dense_status = Sample(dense, &expected);
    ASSERT_TRUE(dense_status.ok()) << dense_status.error_message();
    const grpc::Status status = Sample(sparse, &actual);
    ASSERT_TRUE(status.ok()) << status.error_message();
    ASSERT_EQ(expected.results_size(), actual.results_size());
    for (int i = 0; i < expected.results_size(); ++i) {
      const v1::SampledToken& e = expected.results(i);
      const v1::SampledToken& a = actual.results(i);
      EXPECT_EQ(e.token_id(), a.token_id()) << "result " << i;
      EXPECT_NEAR(e.logprob(), a.logprob(), 2e-4) << "result " << i;
      ASSERT_EQ(e.top_logprobs_size(), a.top_logprobs_size());
      for (int j = 0; j < e.top_logprobs_size(); ++j) {
        EXPECT_EQ(e.top_logprobs(j).token_id(), a.top_logprobs(j).token_id());
        EXPECT_NEAR(e.top_logprobs(j).logprob(), a.top_logprobs(j).logprob(), 2e-4);
      }
    }
  }

  void ExpectRejected(const v1::SamplingParams& params, const std::string& message,
                      uint32_t k = kK) {
    const auto [dense, sparse] = Requests(params, v1::DTYPE_FLOAT32, k);
    v1::SampleResponse response;
    const grpc::Status dense_status = Sample(dense, &response);
    ASSERT_TRUE(dense_status.ok()) << dense_status.error_message();  // only sparse is inexact
    const grpc::Status status = Sample(sparse, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr(message));
  }

  std::unique_ptr<Server> server_;
  std::unique_ptr<v1::Sampler::Stub> stub_;
  std::vector<float> values_;
};

v1::SamplingParams Params(const std::function<void(v1::SamplingParams&)>& set) {
  v1::SamplingParams p;
  set(p);
  return p;
}

TEST_F(SparseTest, GreedyIsExactWithRawLogprobs) {
  ExpectEquivalent(Params([](auto& p) {
    p.set_temperature(0);
    p.set_logprobs(5);
  }));
}

TEST_F(SparseTest, TopKIsExactForEveryDType) {
  for (const v1::DType dtype : {v1::DTYPE_FLOAT32, v1::DTYPE_BFLOAT16, v1::DTYPE_FLOAT16}) {
    SCOPED_TRACE(v1::DType_Name(dtype));
    ExpectEquivalent(Params([](auto& p) {
                       p.set_top_k(50);
                       p.set_temperature(0.8f);
                       p.set_n(4);
                       p.set_logprobs(3);
                     }),
                     dtype);
  }
}

TEST_F(SparseTest, TopKThenOtherStagesIsExact) {
  ExpectEquivalent(Params([](auto& p) {
    p.set_top_k(kK);
    p.set_top_p(0.9f);
    p.set_min_p(0.01f);
    p.set_typical_p(0.95f);
    p.set_temperature(1.3f);
    p.set_n(3);
    p.set_logprobs(2);
    p.set_logprobs_mode(v1::PROCESSED_LOGPROBS);
  }));
}

TEST_F(SparseTest, TopPAtTemperatureOneIsExactWhenTheCandidatesHoldTheMass) {
  ExpectEquivalent(Params([](auto& p) {
    p.set_top_p(0.8f);
    p.set_n(4);
    p.set_logprobs(4);
  }));
  // Temperature after top_p (llama.cpp's order) is exact too.
  ExpectEquivalent(Params([](auto& p) {
    p.set_top_p(0.8f);
    p.set_temperature(0.7f);
    p.add_sampler_order(v1::SAMPLER_STAGE_TOP_P);
    p.add_sampler_order(v1::SAMPLER_STAGE_TEMPERATURE);
    p.set_n(4);
  }));
}

TEST_F(SparseTest, MinPIsExactWhenItsThresholdIsAboveTheRest) {
  ExpectEquivalent(Params([](auto& p) {
    p.set_min_p(0.05f);
    p.set_temperature(0.8f);
    p.set_n(4);
    p.set_logprobs(2);
    p.set_logprobs_mode(v1::PROCESSED_LOGITS);
  }));
}

TEST_F(SparseTest, BiasAndPenaltiesOnCandidatesAreExact) {
  auto [dense, sparse] = Requests(Params([](auto& p) {
    p.set_top_k(40);
    p.set_temperature(0.8f);
    p.set_repetition_penalty(1.3f);
    p.set_frequency_penalty(0.5f);
    p.set_presence_penalty(0.2f);
    p.set_n(3);
  }));
  // Each row's history and bias are among its own 20 best tokens (its candidates).
  for (uint32_t r = 0; r < kRows; ++r) {
    std::vector<int32_t> order(kVocab);
    std::iota(order.begin(), order.end(), 0);
    const float* row = values_.data() + r * kVocab;
    std::partial_sort(order.begin(), order.begin() + 20, order.end(),
                      [row](int32_t a, int32_t b) { return row[a] > row[b]; });
    for (v1::SampleRequest* request : {&dense, &sparse}) {
      v1::SampleRow& out = *request->mutable_rows(static_cast<int>(r));
      for (int i = 0; i < 6; ++i) out.add_output_token_ids(order[static_cast<size_t>(i)]);
      out.add_output_token_ids(order[0]);
      (*out.mutable_params()->mutable_logit_bias())[order[10]] = 3.0f;
      (*out.mutable_params()->mutable_logit_bias())[order[11]] = -2.0f;
    }
  }
  v1::SampleResponse expected, actual;
  ASSERT_TRUE(Sample(dense, &expected).ok());
  const grpc::Status status = Sample(sparse, &actual);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(expected.results_size(), actual.results_size());
  for (int i = 0; i < expected.results_size(); ++i) {
    EXPECT_EQ(expected.results(i).token_id(), actual.results(i).token_id()) << i;
  }
}

TEST_F(SparseTest, InexactCombinationsAreRejected) {
  ExpectRejected(Params([](auto& p) { p.set_temperature(0.8f); }),
                 "rows[0]: sparse logits: the row samples from the whole vocabulary");
  ExpectRejected(Params([](auto& p) { p.set_top_k(kK + 1); }),
                 "rows[0].params.top_k 1025 is larger than k = 1024");
  ExpectRejected(Params([](auto& p) {
                   p.set_top_p(0.9f);
                   p.set_temperature(0.8f);
                 }),
                 "rows[0].params.top_p as the first truncation stage after temperature 0.8");
  ExpectRejected(Params([](auto& p) { p.set_typical_p(0.9f); }), "rows[0].params.typical_p");
  ExpectRejected(Params([](auto& p) { p.set_mirostat_mode(2); }), "rows[0].params.mirostat_mode");
  ExpectRejected(Params([](auto& p) {
                   p.set_top_k(10);
                   p.set_dynatemp_range(0.5f);
                 }),
                 "rows[0].params.dynatemp_range");
  ExpectRejected(Params([](auto& p) {
                   p.set_temperature(0);
                   p.set_logprobs(-1);
                 }),
                 "rows[0].params.logprobs -1 must be in [0, k = 1024]");
  ExpectRejected(Params([](auto& p) {
                   p.set_temperature(0);
                   p.set_logprobs(2);
                   p.set_logprobs_mode(v1::PROCESSED_LOGPROBS);
                 }),
                 "rows[0].params.logprobs_mode");
  ExpectRejected(Params([](auto& p) {
                   p.set_top_k(5);
                   p.add_allowed_token_ids(1);
                   p.add_allowed_token_ids(2);
                 }),
                 "rows[0].params.allowed_token_ids");
  ExpectRejected(Params([](auto& p) {
                   p.set_top_k(5);
                   p.set_min_p(0.1f);
                   p.add_sampler_order(v1::SAMPLER_STAGE_MIN_P);
                   p.add_sampler_order(v1::SAMPLER_STAGE_TOP_K);
                   (*p.mutable_logit_bias())[0] = 1.0f;
                 }),
                 "rows[0].params.");
}

TEST_F(SparseTest, NonCandidateTokensTouchedByBiasOrPenaltiesAreRejected) {
  // A bias on a token that is not among row 0's candidates: the row's smallest logit.
  const std::vector<float> row0(values_.begin(), values_.begin() + kVocab);
  const int32_t lowest =
      static_cast<int32_t>(std::min_element(row0.begin(), row0.end()) - row0.begin());
  ExpectRejected(Params([&](auto& p) {
                   p.set_top_k(5);
                   (*p.mutable_logit_bias())[lowest] = 100.0f;
                 }),
                 absl::StrCat("rows[0].params.logit_bias touches token ", lowest,
                              ", which is not a candidate"));
  auto [dense, sparse] = Requests(Params([](auto& p) {
    p.set_top_k(5);
    p.set_repetition_penalty(1.2f);
  }));
  sparse.mutable_rows(0)->add_prompt_token_ids(lowest);
  v1::SampleResponse response;
  const grpc::Status status = Sample(sparse, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(),
              HasSubstr(absl::StrCat("rows[0].params.repetition_penalty touches token ", lowest)));
}

TEST_F(SparseTest, DataDependentInexactnessIsReportedPerRow) {
  // Few candidates: top_p 0.999 needs mass outside 8 candidates.
  ExpectRejected(Params([](auto& p) { p.set_top_p(0.999f); }),
                 "top_p 0.999 needs tokens outside the 8 candidates (they hold ", 8);
  // A tiny min_p keeps logits far below the smallest candidate.
  ExpectRejected(Params([](auto& p) { p.set_min_p(1e-30f); }), "min_p 1e-30 keeps logits ≥", 8);
}

TEST_F(SparseTest, MalformedCandidatesAreRejected) {
  v1::SampleRequest request;
  request.add_rows()->mutable_params()->set_temperature(0);
  const auto expect = [&](const v1::Logits& logits, const std::string& message) {
    *request.mutable_logits() = logits;
    v1::SampleResponse response;
    const grpc::Status status = Sample(request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr(message));
  };
  const float inf = std::numeric_limits<float>::infinity();
  expect(*SparseLogits({1, 1}, {1.0f, 2.0f}, {0.0f}, 2, 10, v1::DTYPE_FLOAT32),
         "logits.sparse.token_ids[0] holds token 1 twice");
  expect(*SparseLogits({1, 10}, {1.0f, 2.0f}, {0.0f}, 2, 10, v1::DTYPE_FLOAT32),
         "logits.sparse.token_ids[0][1] must be in [0, 10), got 10");
  expect(*SparseLogits({1, 2}, {1.0f, NAN}, {0.0f}, 2, 10, v1::DTYPE_FLOAT32),
         "logits.sparse.values is NaN at row 0, candidate 1");
  expect(*SparseLogits({1, 2}, {1.0f, 2.0f}, {inf}, 2, 10, v1::DTYPE_FLOAT32),
         "logits.sparse.rest_logsumexp[0] must be finite or -inf");
  expect(*SparseLogits({0, 1}, {1.0f, 2.0f}, {0.0f}, 2, 2, v1::DTYPE_FLOAT32),
         "must be -inf when k == vocab_size");
  v1::Logits bad = *SparseLogits({1, 2}, {1.0f, 2.0f}, {0.0f}, 2, 10, v1::DTYPE_FLOAT32);
  bad.mutable_sparse()->set_k(11);
  expect(bad, "logits.sparse.k must be in [1, vocab_size = 10], got 11");
  bad.mutable_sparse()->set_k(2);
  bad.mutable_sparse()->mutable_values()->resize(7);
  expect(bad, "logits.sparse.values has 7 bytes, expected rows × k × 4 = 1 × 2 × 4 = 8");
  bad = *SparseLogits({1, 2}, {1.0f, 2.0f}, {0.0f}, 2, 10, v1::DTYPE_FLOAT32);
  bad.mutable_sparse()->add_rest_logsumexp(1.0f);
  expect(bad, "logits.sparse.rest_logsumexp has 2 entries, expected one per row (1)");
  // A few bytes may not make the server build a huge dense tensor: the dense size is bounded by
  // the server's --max_message_bytes, like a dense request's.
  {
    std::vector<int32_t> ids(1000, 5);
    std::vector<float> values(1000, 1.0f), rest(1000, 0.0f);
    v1::SampleRequest huge;
    *huge.mutable_logits() = *SparseLogits(ids, values, rest, 1, 2000000000u, v1::DTYPE_FLOAT32);
    for (int i = 0; i < 1000; ++i) huge.add_rows()->mutable_params()->set_temperature(0);
    v1::SampleResponse response;
    const grpc::Status status = Sample(huge, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(status.error_message(),
                HasSubstr("= 8000000000000 bytes is above the largest tensor this server samples"));
  }
  // A well-formed one works, and its raw logprob includes the rest's mass: log(e^2 / (e^1 +
  // e^2 + e^0)).
  *request.mutable_logits() = *SparseLogits({4, 7}, {1.0f, 2.0f}, {0.0f}, 2, 10, v1::DTYPE_FLOAT32);
  request.mutable_rows(0)->mutable_params()->set_logprobs(1);
  v1::SampleResponse response;
  ASSERT_TRUE(Sample(request, &response).ok());
  EXPECT_EQ(response.results(0).token_id(), 7);
  EXPECT_NEAR(response.results(0).logprob(), 2.0 - std::log(std::exp(1.0) + std::exp(2.0) + 1.0),
              1e-6);
}

}  // namespace
}  // namespace tokensampler::service
