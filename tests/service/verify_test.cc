// Verify and Session steps with drafts, end to end in-process: a real Server, real gRPC, the real
// core. Statistical tests use fixed seeds and Pearson's chi-square at α = 0.001 against exact
// distributions computed here in double; the mean accepted count uses a z-test at α = 0.001.
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/server.h"
#include "tests/testing/core_testing.h"
#include "tests/testing/in_process_server.h"
#include "tests/testing/service_testing.h"
#include "tests/testing/session_testing.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::service {
namespace {

using ::testing::HasSubstr;
using ::tokensampler::testing::ChiSquareCritical001;
using ::tokensampler::testing::ChiSquareTest;
using ::tokensampler::testing::MakeLogits;
using ::tokensampler::testing::SetDeadline;
using ::tokensampler::testing::TestSession;

class VerifyServiceTest : public ::tokensampler::testing::InProcessServerTest {
 protected:
  void SetUp() override {
    ServerOptions options;
    options.max_message_bytes = 256 * 1024 * 1024;
    StartServer(options);
  }

  grpc::Status Verify(const v1::VerifyRequest& request, v1::VerifyResponse* response) {
    grpc::ClientContext context;
    SetDeadline(context);
    return stub_->Verify(&context, request, response);
  }
  v1::VerifyResponse VerifyOk(const v1::VerifyRequest& request) {
    v1::VerifyResponse response;
    const grpc::Status status = Verify(request, &response);
    EXPECT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
    return response;
  }
};

std::vector<double> Softmax(const std::vector<float>& l, double t = 1.0) {
  std::vector<double> p(l.size());
  const double max = *std::max_element(l.begin(), l.end());
  double total = 0.0;
  for (size_t i = 0; i < l.size(); ++i) total += p[i] = std::exp((l[i] - max) / t);
  for (double& x : p) x /= total;
  return p;
}

int32_t DrawFrom(const std::vector<double>& q, std::mt19937_64& gen) {
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  const double u = uniform(gen);
  double cum = 0.0;
  for (size_t i = 0; i < q.size(); ++i) {
    cum += q[i];
    if (u < cum) return static_cast<int32_t>(i);
  }
  return static_cast<int32_t>(q.size()) - 1;
}

// Chains of k = 3 drafts drawn from q_j, fixed target rows p_j per position (temperature and
// top_k only, so p_j does not depend on the drafts): the first emitted token follows p_0, and the
// mean accepted count is Σ_i Π_{j ≤ i} β_j with β_j = Σ_x min(p_j(x), q_j(x)). 20000 sequences
// in one request, target logits in bfloat16 and draft probabilities in float32.
TEST_F(VerifyServiceTest, ChainStatisticsThroughTheServer) {
  constexpr int kVocab = 6, kDrafts = 3, kReplicas = 20000;
  std::mt19937_64 gen(77);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  std::vector<std::vector<float>> target(kDrafts + 1, std::vector<float>(kVocab));
  std::vector<std::vector<double>> q(kDrafts);
  for (auto& row : target) {
    // Round to bfloat16 here, so that the exact reference sees the values the server decodes.
    for (float& l : row) l = Bf16ToFloat(FloatToBf16(normal(gen)));
  }
  for (auto& row : q) {
    std::vector<float> l(kVocab);
    for (float& x : l) x = normal(gen);
    row = Softmax(l);
  }
  const float temperature = 0.8f;
  std::vector<std::vector<double>> p(kDrafts + 1);
  for (int j = 0; j <= kDrafts; ++j) {
    // top_k = 5: the smallest logit of each row is removed.
    std::vector<float> l = target[static_cast<size_t>(j)];
    const auto min = std::min_element(l.begin(), l.end());
    *min = -INFINITY;
    p[static_cast<size_t>(j)] = Softmax(l, temperature);
  }
  v1::VerifyRequest request;
  std::vector<std::vector<float>> rows;
  for (int n = 0; n < kReplicas; ++n) {
    v1::VerifyRow& row = *request.add_rows();
    row.mutable_params()->set_seed(static_cast<uint64_t>(n));
    row.mutable_params()->set_temperature(temperature);
    row.mutable_params()->set_top_k(5);
    std::vector<std::vector<float>> probs;
    for (int j = 0; j < kDrafts; ++j) {
      row.add_draft_token_ids(DrawFrom(q[static_cast<size_t>(j)], gen));
      probs.emplace_back(q[static_cast<size_t>(j)].begin(), q[static_cast<size_t>(j)].end());
    }
    *row.mutable_draft_probs() = MakeLogits(probs);
    rows.insert(rows.end(), target.begin(), target.end());
  }
  *request.mutable_logits() = MakeLogits(rows, v1::DTYPE_BFLOAT16);
  const v1::VerifyResponse response = VerifyOk(request);
  ASSERT_EQ(response.results_size(), kReplicas);
  std::vector<int64_t> first(kVocab, 0);
  double sum = 0.0, sum_sq = 0.0;
  for (const v1::VerifyResult& result : response.results()) {
    ASSERT_EQ(result.token_ids_size(), static_cast<int>(result.num_accepted()) + 1);
    ++first[static_cast<size_t>(result.token_ids(0))];
    sum += result.num_accepted();
    sum_sq += static_cast<double>(result.num_accepted()) * result.num_accepted();
    for (uint32_t i = 0; i < result.num_accepted(); ++i) {
      EXPECT_EQ(result.accepted_draft_indices(static_cast<int>(i)), static_cast<int>(i));
    }
  }
  const auto chi = ChiSquareTest(first, p[0]);
  EXPECT_LT(chi.statistic, ChiSquareCritical001(chi.df)) << chi.statistic;
  double exact = 0.0, prefix = 1.0;
  for (int j = 0; j < kDrafts; ++j) {
    double beta = 0.0;
    for (int x = 0; x < kVocab; ++x) {
      beta += std::min(p[static_cast<size_t>(j)][static_cast<size_t>(x)],
                       q[static_cast<size_t>(j)][static_cast<size_t>(x)]);
    }
    prefix *= beta;
    exact += prefix;
  }
  const double mean = sum / kReplicas;
  const double var = sum_sq / kReplicas - mean * mean;
  EXPECT_LT(std::abs(mean - exact) / std::sqrt(var / kReplicas), 3.29)
      << "mean accepted " << mean << ", exact " << exact;
}

// With no drafts, Verify gives Sample's token, logprob and finish reason (seeded rows).
TEST_F(VerifyServiceTest, NoDraftsEqualsSample) {
  std::mt19937_64 gen(5);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  v1::SampleRequest sample;
  v1::VerifyRequest verify;
  std::vector<std::vector<float>> rows;
  for (int i = 0; i < 40; ++i) {
    std::vector<float> row(50);
    for (float& l : row) l = normal(gen);
    rows.push_back(row);
    v1::SamplingParams params;
    params.set_seed(static_cast<uint64_t>(i));
    params.set_temperature(i % 5 == 0 ? 0.0f : 0.9f);
    params.set_top_p(0.9f);
    params.set_logprobs(2);
    params.set_repetition_penalty(1.2f);
    params.add_eos_token_ids(7);
    v1::SampleRow& s = *sample.add_rows();
    *s.mutable_params() = params;
    s.add_output_token_ids(3);
    v1::VerifyRow& v = *verify.add_rows();
    *v.mutable_params() = params;
    v.add_output_token_ids(3);
  }
  *sample.mutable_logits() = MakeLogits(rows);
  *verify.mutable_logits() = MakeLogits(rows);
  const v1::SampleResponse sampled = SampleOk(sample);
  const v1::VerifyResponse verified = VerifyOk(verify);
  ASSERT_EQ(verified.results_size(), 40);
  for (int i = 0; i < 40; ++i) {
    const v1::VerifyResult& v = verified.results(i);
    ASSERT_EQ(v.token_ids_size(), 1);
    EXPECT_EQ(v.num_accepted(), 0u);
    EXPECT_EQ(v.token_ids(0), sampled.results(i).token_id());
    ASSERT_EQ(v.logprobs_size(), 1);
    EXPECT_EQ(v.logprobs(0), sampled.results(i).logprob());
    ASSERT_EQ(v.top_logprobs_size(), 1);
    EXPECT_EQ(v.top_logprobs(0).top_logprobs_size(), 2);
    EXPECT_EQ(v.finish_reason(), sampled.results(i).finish_reason());
  }
}

// A tree with bfloat16 draft probabilities; greedy rows accept the argmax path.
TEST_F(VerifyServiceTest, GreedyTreeReturnsTheAcceptedIndices) {
  v1::VerifyRequest request;
  v1::VerifyRow& row = *request.add_rows();
  row.mutable_params()->set_temperature(0.0f);
  row.mutable_params()->set_logprobs(0);
  for (int32_t t : {1, 2, 3, 0, 1}) row.add_draft_token_ids(t);
  for (int32_t parent : {-1, -1, 0, 1, 1}) row.add_draft_parents(parent);
  std::vector<std::vector<float>> probs(5, std::vector<float>{0.25f, 0.25f, 0.25f, 0.25f});
  *row.mutable_draft_probs() = MakeLogits(probs, v1::DTYPE_BFLOAT16);
  *request.mutable_logits() = MakeLogits(
      {{0, 0, 5, 0}, {0, 0, 0, 0}, {0, 5, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 5}});
  const v1::VerifyResponse response = VerifyOk(request);
  ASSERT_EQ(response.results_size(), 1);
  const v1::VerifyResult& result = response.results(0);
  EXPECT_EQ(result.num_accepted(), 2u);
  EXPECT_THAT(result.token_ids(), ::testing::ElementsAre(2, 1, 3));
  EXPECT_THAT(result.accepted_draft_indices(), ::testing::ElementsAre(1, 4));
  ASSERT_EQ(result.logprobs_size(), 3);
  EXPECT_NEAR(result.logprobs(0), 5.0 - std::log(std::exp(5.0) + 3.0), 1e-5);
}

TEST_F(VerifyServiceTest, StopInsideTheAcceptedRun) {
  v1::VerifyRequest request;
  v1::VerifyRow& row = *request.add_rows();
  row.mutable_params()->set_seed(3);
  row.mutable_params()->add_stop_token_ids(3);
  for (int32_t t : {1, 3, 2}) row.add_draft_token_ids(t);
  *request.mutable_logits() =
      MakeLogits({{0, 40, 0, 0}, {0, 0, 0, 40}, {0, 0, 40, 0}, {40, 0, 0, 0}});
  const v1::VerifyResponse response = VerifyOk(request);
  const v1::VerifyResult& result = response.results(0);
  EXPECT_THAT(result.token_ids(), ::testing::ElementsAre(1, 3));
  EXPECT_EQ(result.num_accepted(), 2u);
  EXPECT_EQ(result.finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(result.stop_token_id(), 3);
  EXPECT_EQ(result.logprobs_size(), 0);
}

struct ErrorCase {
  const char* name;
  std::function<void(v1::VerifyRequest&)> change;
  const char* message;
  friend void PrintTo(const ErrorCase& c, std::ostream* os) { *os << c.name; }
};

class VerifyErrorTest : public VerifyServiceTest,
                        public ::testing::WithParamInterface<ErrorCase> {};

// Every bad input is INVALID_ARGUMENT naming the field and the value, and the server keeps
// serving.
TEST_P(VerifyErrorTest, NamesTheFieldAndValue) {
  v1::VerifyRequest request;
  v1::VerifyRow& row = *request.add_rows();
  row.mutable_params()->set_seed(1);
  row.add_draft_token_ids(1);
  row.add_draft_token_ids(2);
  *row.mutable_draft_probs() = MakeLogits({{0.1f, 0.6f, 0.2f, 0.1f}, {0.25f, 0.25f, 0.25f, 0.25f}});
  *request.mutable_logits() = MakeLogits({{0, 1, 2, 3}, {1, 0, 1, 0}, {0, 0, 1, 1}});
  v1::VerifyRequest good = request;
  GetParam().change(request);
  v1::VerifyResponse response;
  const grpc::Status status = Verify(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr(GetParam().message));
  VerifyOk(good);
}

INSTANTIATE_TEST_SUITE_P(
    All, VerifyErrorTest,
    ::testing::Values(
        ErrorCase{"TargetRowMissing",
                  [](v1::VerifyRequest& r) {
                    *r.mutable_logits() = MakeLogits({{0, 1, 2, 3}, {1, 0, 1, 0}});
                  },
                  "logits.rows is 2 but the rows need 3"},
        ErrorCase{"DraftProbsRows",
                  [](v1::VerifyRequest& r) {
                    *r.mutable_rows(0)->mutable_draft_probs() =
                        MakeLogits({{0.25f, 0.25f, 0.25f, 0.25f}});
                  },
                  "rows[0].draft_probs.rows is 1 but draft_token_ids has 2 drafts"},
        ErrorCase{"DraftProbsDtype",
                  [](v1::VerifyRequest& r) {
                    r.mutable_rows(0)->mutable_draft_probs()->set_dtype(v1::DTYPE_UNSPECIFIED);
                  },
                  "rows[0].draft_probs.dtype must be set"},
        ErrorCase{"DraftIdOutOfRange",
                  [](v1::VerifyRequest& r) { r.mutable_rows(0)->set_draft_token_ids(1, 7); },
                  "rows[0].draft_token_ids[1] = 7 is out of range [0, 4)"},
        ErrorCase{"NegativeProbability",
                  [](v1::VerifyRequest& r) {
                    *r.mutable_rows(0)->mutable_draft_probs() =
                        MakeLogits({{-0.1f, 0.7f, 0.3f, 0.1f}, {0.25f, 0.25f, 0.25f, 0.25f}});
                  },
                  "rows[0].draft_probs row 0, token 0 is -0.1"},
        ErrorCase{"NotSummingToOne",
                  [](v1::VerifyRequest& r) {
                    *r.mutable_rows(0)->mutable_draft_probs() =
                        MakeLogits({{0.1f, 0.6f, 0.2f, 0.1f}, {2.0f, 1.0f, 0.5f, 0.5f}});
                  },
                  "rows[0].draft_probs row 1 sums to 4; it must sum to 1 within 0.001"},
        ErrorCase{"Cycle",
                  [](v1::VerifyRequest& r) {
                    r.mutable_rows(0)->add_draft_parents(1);
                    r.mutable_rows(0)->add_draft_parents(0);
                  },
                  "rows[0].draft_parents[0] = 1 makes a cycle (0 -> 1 -> 0)"},
        ErrorCase{"ForwardReference",
                  [](v1::VerifyRequest& r) {
                    r.mutable_rows(0)->add_draft_parents(-1);
                    r.mutable_rows(0)->add_draft_parents(5);
                  },
                  "rows[0].draft_parents[1] = 5 is out of range [-1, 2)"},
        ErrorCase{
            "BadParams",
            [](v1::VerifyRequest& r) { r.mutable_rows(0)->mutable_params()->set_top_p(0.0f); },
            "rows[0].params.top_p must be in (0, 1], got 0"},
        ErrorCase{"NMustBeOne",
                  [](v1::VerifyRequest& r) { r.mutable_rows(0)->mutable_params()->set_n(2); },
                  "rows[0].params.n must be 1 to verify drafts, got 2"}),
    [](const ::testing::TestParamInfo<ErrorCase>& param) { return std::string(param.param.name); });

// Verify goes through the same CallGuard as Sample: a server with bearer tokens refuses a call
// without one and serves a call with one.
TEST(VerifyGuardTest, BearerTokenApplies) {
  ServerOptions options;
  options.threads = 1;
  options.auth_tokens = {"s3cret"};
  absl::StatusOr<std::unique_ptr<Server>> server = Server::Start(options);
  ASSERT_TRUE(server.ok()) << server.status();
  std::unique_ptr<v1::Sampler::Stub> stub =
      v1::Sampler::NewStub((*server)->InProcessChannel(grpc::ChannelArguments()));
  v1::VerifyRequest request;
  request.add_rows()->add_draft_token_ids(1);
  *request.mutable_logits() = MakeLogits({{0, 1, 2}, {2, 1, 0}});
  {
    grpc::ClientContext context;
    SetDeadline(context);
    v1::VerifyResponse response;
    EXPECT_EQ(stub->Verify(&context, request, &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext context;
    SetDeadline(context);
    context.AddMetadata("authorization", "Bearer s3cret");
    v1::VerifyResponse response;
    const grpc::Status status = stub->Verify(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.results_size(), 1);
  }
  (*server)->Shutdown(absl::Now() + absl::Seconds(5));
}

// --- Session steps with drafts -------------------------------------------------------------

// A sequence stepped with drafts gives exactly Verify's tokens for the same history and seed,
// its history advances by all of them (the next step equals Verify on the longer history), and
// a plain sequence in the same step gives Sample's token.
TEST_F(VerifyServiceTest, SessionStepWithDraftsEqualsVerify) {
  constexpr uint32_t kVocab = 40;
  v1::SamplingParams params;
  params.set_seed(99);
  params.set_temperature(0.9f);
  params.set_repetition_penalty(1.3f);
  params.set_logprobs(1);
  const std::vector<int32_t> prompt = {5, 6};
  TestSession session(*stub_);
  v1::SessionRequest add;
  testing::AddSequence(add, 7, params, prompt);
  testing::AddSequence(add, 8, params, prompt);
  session.CallOk(add);

  std::vector<int32_t> output7, output8;
  for (int step = 0; step < 6; ++step) {
    // Drafts for sequence 7: the toy model's greedy continuation (often right), 3 tokens.
    std::vector<int32_t> drafts;
    std::vector<std::vector<float>> rows;
    std::vector<int32_t> context = output7;
    for (int j = 0; j <= 3; ++j) {
      rows.push_back(testing::ToyModelLogits(1, prompt, context, kVocab));
      if (j == 3) break;
      const auto& l = rows.back();
      const int32_t x = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
      drafts.push_back(x);
      context.push_back(x);
    }
    const std::vector<float> row8 = testing::ToyModelLogits(2, prompt, output8, kVocab);
    std::vector<std::vector<float>> step_rows = rows;
    step_rows.push_back(row8);

    v1::VerifyRequest verify;
    v1::VerifyRow& v = *verify.add_rows();
    *v.mutable_params() = params;
    v.mutable_prompt_token_ids()->Add(prompt.begin(), prompt.end());
    v.mutable_output_token_ids()->Add(output7.begin(), output7.end());
    v.mutable_draft_token_ids()->Add(drafts.begin(), drafts.end());
    *verify.mutable_logits() = MakeLogits(rows);
    const v1::VerifyResponse expected = VerifyOk(verify);

    v1::SampleRequest sample;
    v1::SampleRow& s = *sample.add_rows();
    *s.mutable_params() = params;
    s.mutable_prompt_token_ids()->Add(prompt.begin(), prompt.end());
    s.mutable_output_token_ids()->Add(output8.begin(), output8.end());
    *sample.mutable_logits() = MakeLogits({row8});
    const v1::SampleResponse sampled = SampleOk(sample);

    v1::SessionRequest request;
    testing::SetStep(request, step_rows, {7, 8});
    v1::SequenceDrafts& d = *request.mutable_step()->add_drafts();
    d.set_sequence_id(7);
    d.mutable_draft_token_ids()->Add(drafts.begin(), drafts.end());
    const v1::SessionResponse response = session.CallOk(request);
    ASSERT_EQ(response.results_size(), 2);
    const v1::SequenceResult& r7 = response.results(0);
    EXPECT_EQ(r7.sequence_id(), 7u);
    EXPECT_EQ(r7.verify().SerializeAsString(), expected.results(0).SerializeAsString());
    EXPECT_EQ(r7.token_id(),
              expected.results(0).token_ids(expected.results(0).token_ids_size() - 1));
    const v1::SequenceResult& r8 = response.results(1);
    EXPECT_EQ(r8.token_id(), sampled.results(0).token_id());
    EXPECT_EQ(r8.logprob(), sampled.results(0).logprob());
    EXPECT_EQ(r8.verify().token_ids_size(), 1);
    output7.insert(output7.end(), r7.verify().token_ids().begin(), r7.verify().token_ids().end());
    output8.push_back(r8.token_id());
    ASSERT_EQ(r7.finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
    ASSERT_EQ(r8.finish_reason(), v1::FINISH_REASON_UNSPECIFIED);
  }
  EXPECT_GT(output7.size(), 6u);  // drafts were accepted
  EXPECT_TRUE(session.Close().ok());
}

TEST_F(VerifyServiceTest, SessionStepWithDraftsErrors) {
  TestSession session(*stub_);
  v1::SessionRequest add;
  testing::AddSequence(add, 12, v1::SamplingParams());
  testing::AddSequence(add, 13, v1::SamplingParams());
  session.CallOk(add);
  const std::vector<float> row = {0, 1, 2, 3};
  {
    v1::SessionRequest request;
    testing::SetStep(request, {row, row, row}, {12, 13});
    v1::SequenceDrafts& d = *request.mutable_step()->add_drafts();
    d.set_sequence_id(12);
    for (int32_t t : {1, 2, 3}) d.add_draft_token_ids(t);
    const v1::SessionResponse response = session.Call(request);
    EXPECT_EQ(response.error().code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(response.error().message(),
              "step: logits.rows is 3 but the stepped sequences need 5 (sequence 12: 3 drafts)");
  }
  {
    v1::SessionRequest request;
    testing::SetStep(request, {row}, {12});
    request.mutable_step()->add_drafts()->set_sequence_id(13);
    const v1::SessionResponse response = session.Call(request);
    EXPECT_EQ(response.error().code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(response.error().message(),
              "step: drafts[0].sequence_id 13 is not stepped (not in step.sequence_ids)");
  }
  {
    v1::SessionRequest request;
    testing::SetStep(request, {row, row}, {12});
    v1::SequenceDrafts& d = *request.mutable_step()->add_drafts();
    d.set_sequence_id(12);
    d.add_draft_token_ids(9);
    const v1::SessionResponse response = session.Call(request);
    EXPECT_EQ(response.error().code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(response.error().message(),
              "step: drafts[0].draft_token_ids[0] = 9 is out of range [0, 4)");
  }
  // The failed steps changed nothing: a plain step of both still works.
  v1::SessionRequest request;
  testing::SetStep(request, {row, row}, {12, 13});
  EXPECT_EQ(session.CallOk(request).results_size(), 2);
  EXPECT_TRUE(session.Close().ok());
}

}  // namespace
}  // namespace tokensampler::service
