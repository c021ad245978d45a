// The Sampler service end to end, in-process: a real Server, real generated stubs, the real core.
// Expected tokens and logprobs are computed here, independently of core.
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <ostream>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/server.h"
#include "tests/testing/service_testing.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::service {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::tokensampler::testing::LogSumExp;
using ::tokensampler::testing::MakeLogits;
using ::tokensampler::testing::MakeRequest;
using ::tokensampler::testing::SetDeadline;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr double kTol = 1e-5;

// A fresh in-process server per test.
class SamplerServiceTest : public ::testing::Test {
 protected:
  void SetUp() override { StartServer(/*max_message_bytes=*/256 * 1024 * 1024); }

  void StartServer(int max_message_bytes) {
    ServerOptions options;
    options.threads = 2;
    options.max_message_bytes = max_message_bytes;
    absl::StatusOr<std::unique_ptr<Server>> server = Server::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    channel_ = server_->InProcessChannel(args);
    stub_ = v1::Sampler::NewStub(channel_);
  }

  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown(absl::Now() + absl::Seconds(5));
  }

  grpc::Status Sample(const v1::SampleRequest& request, v1::SampleResponse* response) {
    grpc::ClientContext context;
    SetDeadline(context);
    return stub_->Sample(&context, request, response);
  }

  // Samples `request`, which must succeed.
  v1::SampleResponse SampleOk(const v1::SampleRequest& request) {
    v1::SampleResponse response;
    const grpc::Status status = Sample(request, &response);
    EXPECT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
    return response;
  }

  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Sampler::Stub> stub_;
};

std::vector<int32_t> TokenIds(const v1::SampleResponse& response) {
  std::vector<int32_t> ids;
  for (const v1::SampledToken& t : response.results()) ids.push_back(t.token_id());
  return ids;
}

int32_t Argmax(const std::vector<float>& values) {
  return static_cast<int32_t>(std::max_element(values.begin(), values.end()) - values.begin());
}

// ---------------------------------------------------------------------------------------------
// Errors: INVALID_ARGUMENT naming the field and the value; the server keeps serving.

// Two rows over a 4-token vocabulary with default parameters; every case breaks one thing.
v1::SampleRequest GoodRequest() { return MakeRequest({{1, 2, 3, 4}, {4, 3, 2, 1}}); }

void SetLogit(v1::SampleRequest& request, int row, int token, float value) {
  std::string& data = *request.mutable_logits()->mutable_data();
  std::memcpy(data.data() + (row * 4 + token) * 4, &value, 4);
}

struct ErrorCase {
  std::string name;
  std::function<void(v1::SampleRequest&)> mutate;
  std::vector<std::string> expected;  // substrings of the status message
};

void PrintTo(const ErrorCase& error_case, std::ostream* os) { *os << error_case.name; }

class SampleErrorTest : public SamplerServiceTest,
                        public ::testing::WithParamInterface<ErrorCase> {};

TEST_P(SampleErrorTest, InvalidArgumentNamesFieldAndValueAndServerKeepsServing) {
  v1::SampleRequest request = GoodRequest();
  GetParam().mutate(request);
  v1::SampleResponse response;
  const grpc::Status status = Sample(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << status.error_message();
  for (const std::string& part : GetParam().expected) {
    EXPECT_THAT(status.error_message(), HasSubstr(part));
  }
  EXPECT_EQ(response.results_size(), 0);

  // The next good request is served.
  const v1::SampleResponse good = SampleOk(GoodRequest());
  EXPECT_EQ(good.results_size(), 2);
}

v1::SamplingParams& Params(v1::SampleRequest& request, int row) {
  return *request.mutable_rows(row)->mutable_params();
}

const ErrorCase kErrorCases[] = {
    // The tensor.
    {"DtypeUnspecified",
     [](v1::SampleRequest& r) { r.mutable_logits()->set_dtype(v1::DTYPE_UNSPECIFIED); },
     {"logits.dtype must be set, got DTYPE_UNSPECIFIED"}},
    {"DtypeUnknown",
     [](v1::SampleRequest& r) { r.mutable_logits()->set_dtype(static_cast<v1::DType>(9)); },
     {"logits.dtype", "got 9"}},
    {"DataShort",
     [](v1::SampleRequest& r) { r.mutable_logits()->mutable_data()->resize(28); },
     {"logits.data has 28 bytes", "= 32"}},
    {"DataLongForBfloat16",
     [](v1::SampleRequest& r) { r.mutable_logits()->set_dtype(v1::DTYPE_BFLOAT16); },
     {"logits.data has 32 bytes", "= 16"}},
    {"VocabSizeZero",
     [](v1::SampleRequest& r) {
       r.mutable_logits()->set_vocab_size(0);
       r.mutable_logits()->clear_data();
     },
     {"logits.vocab_size must be > 0, got 0"}},
    {"MoreRowsThanLogits",
     [](v1::SampleRequest& r) { r.add_rows(); },
     {"rows has 3 entries but logits.rows is 2"}},
    {"FewerRowsThanLogits",
     [](v1::SampleRequest& r) { r.mutable_rows()->RemoveLast(); },
     {"rows has 1 entries but logits.rows is 2"}},
    {"NaNLogit",
     [](v1::SampleRequest& r) { SetLogit(r, 1, 2, kNaN); },
     {"logits.data is NaN at row 1, token 2"}},
    {"NaNLogitBfloat16",
     [](v1::SampleRequest& r) {
       *r.mutable_logits() = MakeLogits({{1, 2, 3, 4}, {4, kNaN, 2, 1}}, v1::DTYPE_BFLOAT16);
     },
     {"logits.data is NaN at row 1, token 1"}},
    {"NaNLogitFloat16",
     [](v1::SampleRequest& r) {
       *r.mutable_logits() = MakeLogits({{1, 2, 3, kNaN}, {4, 3, 2, 1}}, v1::DTYPE_FLOAT16);
     },
     {"logits.data is NaN at row 0, token 3"}},
    // The parameters.
    {"TemperatureNegative",
     [](v1::SampleRequest& r) { Params(r, 1).set_temperature(-0.5f); },
     {"rows[1].params.temperature must be >= 0", "got -0.5"}},
    {"TemperatureNaN",
     [](v1::SampleRequest& r) { Params(r, 1).set_temperature(kNaN); },
     {"rows[1].params.temperature must be >= 0", "got nan"}},
    {"TopPZero",
     [](v1::SampleRequest& r) { Params(r, 1).set_top_p(0.0f); },
     {"rows[1].params.top_p must be in (0, 1], got 0"}},
    {"TopPAboveOne",
     [](v1::SampleRequest& r) { Params(r, 0).set_top_p(1.5f); },
     {"rows[0].params.top_p must be in (0, 1], got 1.5"}},
    {"MinPNegative",
     [](v1::SampleRequest& r) { Params(r, 1).set_min_p(-0.25f); },
     {"rows[1].params.min_p must be in [0, 1], got -0.25"}},
    {"MinPAboveOne",
     [](v1::SampleRequest& r) { Params(r, 1).set_min_p(1.5f); },
     {"rows[1].params.min_p must be in [0, 1], got 1.5"}},
    {"TopKBelowMinusOne",
     [](v1::SampleRequest& r) { Params(r, 1).set_top_k(-2); },
     {"rows[1].params.top_k must be >= -1", "got -2"}},
    {"RepetitionPenaltyZero",
     [](v1::SampleRequest& r) { Params(r, 1).set_repetition_penalty(0.0f); },
     {"rows[1].params.repetition_penalty must be > 0", "got 0"}},
    {"RepetitionPenaltyNegative",
     [](v1::SampleRequest& r) { Params(r, 1).set_repetition_penalty(-1.0f); },
     {"rows[1].params.repetition_penalty must be > 0", "got -1"}},
    {"PromptTokenOutOfRange",
     [](v1::SampleRequest& r) {
       r.mutable_rows(1)->add_prompt_token_ids(0);
       r.mutable_rows(1)->add_prompt_token_ids(4);
     },
     {"rows[1].prompt_token_ids[1] = 4 is out of range [0, 4)"}},
    {"OutputTokenNegative",
     [](v1::SampleRequest& r) { r.mutable_rows(1)->add_output_token_ids(-1); },
     {"rows[1].output_token_ids[0] = -1 is out of range [0, 4)"}},
    {"LogitBiasTokenOutOfRange",
     [](v1::SampleRequest& r) { (*Params(r, 1).mutable_logit_bias())[7] = 1.0f; },
     {"rows[1].params.logit_bias key = 7 is out of range [0, 4)"}},
    {"LogitBiasTokenNegative",
     [](v1::SampleRequest& r) { (*Params(r, 1).mutable_logit_bias())[-3] = 1.0f; },
     {"rows[1].params.logit_bias key = -3 is out of range [0, 4)"}},
    {"LogprobsBelowMinusOne",
     [](v1::SampleRequest& r) { Params(r, 1).set_logprobs(-2); },
     {"rows[1].params.logprobs must be >= -1", "got -2"}},
    {"LogprobsModeUnknown",
     [](v1::SampleRequest& r) { Params(r, 1).set_logprobs_mode(static_cast<v1::LogprobsMode>(9)); },
     {"rows[1].params.logprobs_mode", "got 9"}},
    {"SamplerStageUnspecified",
     [](v1::SampleRequest& r) {
       Params(r, 1).add_sampler_order(v1::SAMPLER_STAGE_TOP_K);
       Params(r, 1).add_sampler_order(v1::SAMPLER_STAGE_UNSPECIFIED);
     },
     {"rows[1].params.sampler_order[1]", "got SAMPLER_STAGE_UNSPECIFIED"}},
    {"UnknownPreset",
     [](v1::SampleRequest& r) { Params(r, 1).set_preset("nope"); },
     {"rows[1].params.preset must be one of", "got \"nope\""}},
    {"EveryTokenMaskedByLogits",
     [](v1::SampleRequest& r) {
       for (int t = 0; t < 4; ++t) SetLogit(r, 1, t, kNegInf);
     },
     {"rows[1]: every token is masked"}},
    {"EveryTokenMaskedByParams",
     [](v1::SampleRequest& r) {
       Params(r, 0).add_allowed_token_ids(2);
       (*Params(r, 0).mutable_logit_bias())[2] = kNegInf;
     },
     {"rows[0]: every token is masked"}},
};

INSTANTIATE_TEST_SUITE_P(AllErrors, SampleErrorTest, ::testing::ValuesIn(kErrorCases),
                         [](const ::testing::TestParamInfo<ErrorCase>& param) {
                           return param.param.name;
                         });

// Bytes that are not the method's message: INVALID_ARGUMENT naming the message type, for every
// unary method (gRPC's typed callback methods answer UNIMPLEMENTED with no message).
TEST_F(SamplerServiceTest, UnparsableRequestIsInvalidArgumentNamingItsTypeAndServerKeepsServing) {
  // Field 1, length-delimited, claiming far more bytes than follow.
  const std::string bad("\x0a\xff\xff\xff\x0f", 5);
  for (const std::string method :
       {"Sample", "Verify", "RegisterSharedMemory", "UnregisterSharedMemory", "ListSharedMemory"}) {
    std::string response;
    const grpc::Status status = tokensampler::testing::RawUnaryCall(
        channel_, "/tokensampler.v1.Sampler/" + method, bad, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << method;
    EXPECT_EQ(status.error_message(), "the request is not a tokensampler.v1." + method +
                                          "Request: protobuf cannot parse its 5 bytes");
  }
  EXPECT_EQ(SampleOk(GoodRequest()).results_size(), 2);
}

// The raw methods read and answer the same bytes as the generated stubs.
TEST_F(SamplerServiceTest, RawBytesOfAValidRequestGetTheSameAnswer) {
  v1::SampleRequest request = GoodRequest();
  for (v1::SampleRow& row : *request.mutable_rows()) row.mutable_params()->set_seed(11);
  std::string bytes;
  const grpc::Status status = tokensampler::testing::RawUnaryCall(
      channel_, "/tokensampler.v1.Sampler/Sample", request.SerializeAsString(), &bytes);
  ASSERT_TRUE(status.ok()) << status.error_message();
  v1::SampleResponse raw;
  ASSERT_TRUE(raw.ParseFromString(bytes));
  EXPECT_EQ(raw.SerializeAsString(), SampleOk(request).SerializeAsString());
}

TEST_F(SamplerServiceTest, InfiniteLogitsAreAllowed) {
  // -inf means "never this token"; the row samples among the rest.
  v1::SampleRequest request = MakeRequest({{kNegInf, 2, kNegInf, 1}});
  Params(request, 0).set_temperature(0.0f);
  EXPECT_THAT(TokenIds(SampleOk(request)), ElementsAre(1));
}

TEST_F(SamplerServiceTest, ExplicitOutOfRangeValueIsNotReplacedByTheDefault) {
  // Unset top_p is the default (1.0) and fine; an explicit 0 is an error, not "unset".
  v1::SampleRequest request = MakeRequest({{1, 2, 3, 4}});
  SampleOk(request);
  Params(request, 0).set_top_p(0.0f);
  v1::SampleResponse response;
  EXPECT_EQ(Sample(request, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

class SmallMessageLimitTest : public SamplerServiceTest {
 protected:
  void SetUp() override { StartServer(/*max_message_bytes=*/64 * 1024); }
};

TEST_F(SmallMessageLimitTest, OversizeRequestIsResourceExhaustedAndServerKeepsServing) {
  const v1::SampleRequest big = MakeRequest({std::vector<float>(32 * 1024, 0.5f)});  // 128 KiB
  ASSERT_GT(big.ByteSizeLong(), 64u * 1024u);
  v1::SampleResponse response;
  const grpc::Status status = Sample(big, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << status.error_message();

  const v1::SampleRequest small = MakeRequest({std::vector<float>(1024, 0.5f)});  // 4 KiB
  EXPECT_EQ(SampleOk(small).results_size(), 1);
}

// ---------------------------------------------------------------------------------------------
// A mixed batch of heterogeneous rows, each checked against an expectation computed here.

constexpr int kVocab = 64;

// Distinct, deterministic logits in about [-3, 3] for row `r`.
std::vector<float> TestRow(int r) {
  std::vector<float> row(kVocab);
  for (int i = 0; i < kVocab; ++i) {
    row[static_cast<size_t>(i)] =
        3.0f * std::sin(1.3f * static_cast<float>(i) + 0.7f * static_cast<float>(r));
  }
  return row;
}

// Softmax of `row` / t, in double.
std::vector<double> Softmax(const std::vector<float>& row, double t = 1.0) {
  double max = -INFINITY;
  for (float v : row) max = std::max(max, v / t);
  std::vector<double> p(row.size());
  double total = 0.0;
  for (size_t i = 0; i < row.size(); ++i) total += p[i] = std::exp(row[i] / t - max);
  for (double& x : p) x /= total;
  return p;
}

// Token ids by descending probability.
std::vector<int32_t> ByDescending(const std::vector<double>& p) {
  std::vector<int32_t> ids(p.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) {
    return p[static_cast<size_t>(a)] > p[static_cast<size_t>(b)];
  });
  return ids;
}

// Checks that `token` reports exactly the distribution `expected` (0 = removed) in
// PROCESSED_LOGPROBS with logprobs = -1, and that the drawn token is one of the kept ones.
void ExpectProcessedDistribution(const v1::SampledToken& token,
                                 const std::vector<double>& expected) {
  std::vector<double> got(expected.size(), 0.0);
  for (const v1::TokenLogprob& t : token.top_logprobs()) {
    got[static_cast<size_t>(t.token_id())] = std::exp(static_cast<double>(t.logprob()));
  }
  int kept = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_NEAR(got[i], expected[i], kTol) << "token " << i;
    kept += expected[i] > 0.0 ? 1 : 0;
  }
  EXPECT_EQ(token.top_logprobs_size(), kept);
  EXPECT_GT(expected[static_cast<size_t>(token.token_id())], 0.0);
}

// Renormalised `p` restricted to `keep`.
std::vector<double> Restrict(const std::vector<double>& p, const std::set<int32_t>& keep) {
  std::vector<double> out(p.size(), 0.0);
  double total = 0.0;
  for (int32_t id : keep) total += p[static_cast<size_t>(id)];
  for (int32_t id : keep) out[static_cast<size_t>(id)] = p[static_cast<size_t>(id)] / total;
  return out;
}

enum MixedRow {
  kGreedy,
  kSeededTemperature,
  kTopK,
  kTopP,
  kMinP,
  kRepetitionPenalty,
  kFrequencyPresence,
  kLogitBias,
  kSeveralSamples,
  kNumMixedRows,
};

// The batch, in the order of MixedRow, or reversed (row i of the reversed batch is row
// kNumMixedRows - 1 - i, with its own logits).
v1::SampleRequest MixedBatch(bool reversed) {
  std::vector<std::vector<float>> logits;
  for (int i = 0; i < kNumMixedRows; ++i) logits.push_back(TestRow(i));
  v1::SampleRequest request = MakeRequest(logits);
  for (int i = 0; i < kNumMixedRows; ++i) {
    v1::SampleRow& row = *request.mutable_rows(i);
    v1::SamplingParams& p = *row.mutable_params();
    const std::vector<float>& l = logits[static_cast<size_t>(i)];
    switch (i) {
      case kGreedy:
        p.set_temperature(0.0f);
        break;
      case kSeededTemperature:
        p.set_temperature(0.7f);
        p.set_seed(1234);
        p.set_logprobs(-1);
        p.set_logprobs_mode(v1::PROCESSED_LOGPROBS);
        break;
      case kTopK:
        p.set_top_k(5);
        p.set_seed(7);
        p.set_logprobs(-1);
        p.set_logprobs_mode(v1::PROCESSED_LOGPROBS);
        break;
      case kTopP:
        p.set_top_p(0.6f);
        p.set_seed(9);
        p.set_logprobs(-1);
        p.set_logprobs_mode(v1::PROCESSED_LOGPROBS);
        break;
      case kMinP:
        p.set_min_p(0.2f);
        p.set_seed(11);
        p.set_logprobs(-1);
        p.set_logprobs_mode(v1::PROCESSED_LOGPROBS);
        break;
      case kRepetitionPenalty:
        p.set_temperature(0.0f);
        p.set_repetition_penalty(1000.0f);
        row.add_prompt_token_ids(Argmax(l));
        break;
      case kFrequencyPresence:
        p.set_temperature(0.0f);
        p.set_frequency_penalty(2.0f);
        p.set_presence_penalty(2.0f);
        for (int k = 0; k < 3; ++k) row.add_output_token_ids(Argmax(l));
        break;
      case kLogitBias: {
        const int32_t lowest =
            static_cast<int32_t>(std::min_element(l.begin(), l.end()) - l.begin());
        (*p.mutable_logit_bias())[lowest] = 100.0f;  // no seed: fresh entropy, same answer
        break;
      }
      case kSeveralSamples:
        p.set_n(3);
        p.set_seed(99);
        break;
      default:
        break;
    }
  }
  if (!reversed) return request;
  v1::SampleRequest out;
  std::reverse(logits.begin(), logits.end());
  *out.mutable_logits() = MakeLogits(logits);
  for (int i = kNumMixedRows - 1; i >= 0; --i) *out.add_rows() = request.rows(i);
  return out;
}

// The results of each row (several for kSeveralSamples), keyed by MixedRow.
std::vector<std::vector<v1::SampledToken>> ByRow(const v1::SampleResponse& response,
                                                 bool reversed) {
  std::vector<std::vector<v1::SampledToken>> rows(kNumMixedRows);
  for (const v1::SampledToken& t : response.results()) {
    const int r = static_cast<int>(t.row_index());
    rows[static_cast<size_t>(reversed ? kNumMixedRows - 1 - r : r)].push_back(t);
  }
  return rows;
}

TEST_F(SamplerServiceTest, MixedBatchOfHeterogeneousRows) {
  const v1::SampleResponse response = SampleOk(MixedBatch(/*reversed=*/false));
  ASSERT_EQ(response.results_size(), kNumMixedRows - 1 + 3);
  // Row-major: row indices never decrease; sample indices count up within a row.
  for (int i = 1; i < response.results_size(); ++i) {
    EXPECT_LE(response.results(i - 1).row_index(), response.results(i).row_index());
  }
  const auto rows = ByRow(response, false);

  EXPECT_EQ(rows[kGreedy][0].token_id(), Argmax(TestRow(kGreedy)));

  ExpectProcessedDistribution(rows[kSeededTemperature][0],
                              Softmax(TestRow(kSeededTemperature), 0.7));

  {
    const std::vector<double> p = Softmax(TestRow(kTopK));
    const std::vector<int32_t> order = ByDescending(p);
    ExpectProcessedDistribution(rows[kTopK][0],
                                Restrict(p, std::set<int32_t>(order.begin(), order.begin() + 5)));
  }
  {
    // The smallest set of most likely tokens whose mass reaches 0.6.
    const std::vector<double> p = Softmax(TestRow(kTopP));
    std::set<int32_t> keep;
    double mass = 0.0;
    for (int32_t id : ByDescending(p)) {
      if (mass >= 0.6) break;
      keep.insert(id);
      mass += p[static_cast<size_t>(id)];
    }
    ASSERT_GT(keep.size(), 1u);
    ASSERT_LT(keep.size(), static_cast<size_t>(kVocab));
    ExpectProcessedDistribution(rows[kTopP][0], Restrict(p, keep));
  }
  {
    const std::vector<double> p = Softmax(TestRow(kMinP));
    const double p_max = *std::max_element(p.begin(), p.end());
    std::set<int32_t> keep;
    for (int32_t i = 0; i < kVocab; ++i) {
      if (p[static_cast<size_t>(i)] >= 0.2 * p_max) keep.insert(i);
    }
    ASSERT_GT(keep.size(), 1u);
    ExpectProcessedDistribution(rows[kMinP][0], Restrict(p, keep));
  }
  {
    // vLLM: a positive logit of a prompt token is divided by the penalty.
    std::vector<float> l = TestRow(kRepetitionPenalty);
    const int32_t top = Argmax(l);
    ASSERT_GT(l[static_cast<size_t>(top)], 0.0f);
    l[static_cast<size_t>(top)] /= 1000.0f;
    EXPECT_NE(Argmax(l), top);
    EXPECT_EQ(rows[kRepetitionPenalty][0].token_id(), Argmax(l));
  }
  {
    // Three earlier outputs of the top token: -= 2·3 (frequency) + 2 (presence).
    std::vector<float> l = TestRow(kFrequencyPresence);
    const int32_t top = Argmax(l);
    l[static_cast<size_t>(top)] -= 8.0f;
    EXPECT_NE(Argmax(l), top);
    EXPECT_EQ(rows[kFrequencyPresence][0].token_id(), Argmax(l));
  }
  {
    const std::vector<float> l = TestRow(kLogitBias);
    EXPECT_EQ(rows[kLogitBias][0].token_id(), std::min_element(l.begin(), l.end()) - l.begin());
  }
  ASSERT_EQ(rows[kSeveralSamples].size(), 3u);
  for (uint32_t s = 0; s < 3; ++s) {
    EXPECT_EQ(rows[kSeveralSamples][s].sample_index(), s);
    EXPECT_EQ(rows[kSeveralSamples][s].row_index(), static_cast<uint32_t>(kSeveralSamples));
  }
}

TEST_F(SamplerServiceTest, SeededRowsAreReproducibleAcrossCallsAndBatchPositions) {
  const auto first = ByRow(SampleOk(MixedBatch(false)), false);
  const auto again = ByRow(SampleOk(MixedBatch(false)), false);
  const auto reversed = ByRow(SampleOk(MixedBatch(true)), true);
  for (int r = 0; r < kNumMixedRows; ++r) {
    ASSERT_EQ(first[static_cast<size_t>(r)].size(), again[static_cast<size_t>(r)].size());
    ASSERT_EQ(first[static_cast<size_t>(r)].size(), reversed[static_cast<size_t>(r)].size());
    for (size_t s = 0; s < first[static_cast<size_t>(r)].size(); ++s) {
      EXPECT_EQ(first[static_cast<size_t>(r)][s].token_id(),
                again[static_cast<size_t>(r)][s].token_id())
          << "row " << r;
      EXPECT_EQ(first[static_cast<size_t>(r)][s].token_id(),
                reversed[static_cast<size_t>(r)][s].token_id())
          << "row " << r;
    }
  }
  // Alone in its own request, the seeded row still draws the same token.
  v1::SampleRequest alone = MakeRequest({TestRow(kSeededTemperature)});
  *alone.mutable_rows(0) = MixedBatch(false).rows(kSeededTemperature);
  EXPECT_EQ(SampleOk(alone).results(0).token_id(), first[kSeededTemperature][0].token_id());
}

TEST_F(SamplerServiceTest, DifferentSeedsDrawDifferentTokens) {
  // Over a flat distribution, 32 seeds must not all give the same token (P ≈ 64^-31).
  v1::SampleRequest request;
  std::vector<std::vector<float>> logits(32, std::vector<float>(kVocab, 0.0f));
  request = MakeRequest(logits);
  for (int i = 0; i < 32; ++i) Params(request, i).set_seed(static_cast<uint64_t>(i));
  const std::vector<int32_t> ids = TokenIds(SampleOk(request));
  EXPECT_GT(std::set<int32_t>(ids.begin(), ids.end()).size(), 1u);
}

// Values exactly representable in bf16 and fp16, so every dtype carries the same logits.
const std::vector<float> kExactRow = {0.5f, 2.0f, -1.0f, 3.25f, 1.5f, -4.0f, 3.0f, 0.0f};

TEST_F(SamplerServiceTest, HalfPrecisionDtypesDecodeExactly) {
  const double lse = LogSumExp(kExactRow);
  int32_t seeded_token = -1;
  for (v1::DType dtype : {v1::DTYPE_FLOAT32, v1::DTYPE_BFLOAT16, v1::DTYPE_FLOAT16}) {
    SCOPED_TRACE(v1::DType_Name(dtype));
    v1::SampleRequest request = MakeRequest({kExactRow, kExactRow}, dtype);
    Params(request, 0).set_temperature(0.0f);
    Params(request, 0).set_logprobs(2);
    Params(request, 1).set_seed(2024);
    const v1::SampleResponse response = SampleOk(request);
    ASSERT_EQ(response.results_size(), 2);
    const v1::SampledToken& greedy = response.results(0);
    EXPECT_EQ(greedy.token_id(), 3);
    EXPECT_NEAR(greedy.logprob(), 3.25 - lse, kTol);
    ASSERT_EQ(greedy.top_logprobs_size(), 2);
    EXPECT_EQ(greedy.top_logprobs(0).token_id(), 3);
    EXPECT_NEAR(greedy.top_logprobs(0).logprob(), 3.25 - lse, kTol);
    EXPECT_EQ(greedy.top_logprobs(1).token_id(), 6);
    EXPECT_NEAR(greedy.top_logprobs(1).logprob(), 3.0 - lse, kTol);
    // The same seeded row over the same values draws the same token whatever the dtype.
    if (seeded_token < 0) seeded_token = response.results(1).token_id();
    EXPECT_EQ(response.results(1).token_id(), seeded_token);
  }
}

// ---------------------------------------------------------------------------------------------
// Logprobs in all four modes over V = 4, logits [1, 2, 3, 4].

const std::vector<float> kFour = {1, 2, 3, 4};

struct Pair {
  int32_t id;
  double value;
};

void ExpectTop(const v1::SampledToken& token, const std::vector<Pair>& expected) {
  ASSERT_EQ(token.top_logprobs_size(), static_cast<int>(expected.size()));
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(token.top_logprobs(static_cast<int>(i)).token_id(), expected[i].id) << i;
    EXPECT_NEAR(token.top_logprobs(static_cast<int>(i)).logprob(), expected[i].value, kTol) << i;
  }
}

// The value reported for `token` in the top list (the sampled token is always in it here).
double ValueOf(const v1::SampledToken& token) {
  for (const v1::TokenLogprob& t : token.top_logprobs()) {
    if (t.token_id() == token.token_id()) return t.logprob();
  }
  ADD_FAILURE() << "sampled token " << token.token_id() << " not in top_logprobs";
  return 0.0;
}

class LogprobsTest : public SamplerServiceTest {
 protected:
  // Samples kFour with `params`; returns its one result.
  v1::SampledToken SampleFour(const v1::SamplingParams& params) {
    v1::SampleRequest request = MakeRequest({kFour});
    *request.mutable_rows(0)->mutable_params() = params;
    const v1::SampleResponse response = SampleOk(request);
    EXPECT_EQ(response.results_size(), 1);
    return response.results_size() == 1 ? response.results(0) : v1::SampledToken();
  }

  const double lse_ = LogSumExp(kFour);  // log(e + e² + e³ + e⁴)
};

TEST_F(LogprobsTest, RawLogprobsIsTheDefaultMode) {
  v1::SamplingParams params;
  params.set_temperature(0.0f);
  params.set_logprobs(2);
  const v1::SampledToken token = SampleFour(params);  // LOGPROBS_MODE_UNSPECIFIED
  EXPECT_EQ(token.token_id(), 3);
  EXPECT_NEAR(token.logprob(), 4.0 - lse_, kTol);
  ExpectTop(token, {{3, 4.0 - lse_}, {2, 3.0 - lse_}});
}

TEST_F(LogprobsTest, RawLogprobsAllTokens) {
  v1::SamplingParams params;
  params.set_temperature(0.0f);
  params.set_logprobs(-1);
  params.set_logprobs_mode(v1::RAW_LOGPROBS);
  const v1::SampledToken token = SampleFour(params);
  EXPECT_NEAR(token.logprob(), 4.0 - lse_, kTol);
  ExpectTop(token, {{3, 4.0 - lse_}, {2, 3.0 - lse_}, {1, 2.0 - lse_}, {0, 1.0 - lse_}});
}

TEST_F(LogprobsTest, RawLogprobsIgnoreTheStages) {
  // Raw = the logits as received, whatever temperature and top-k do to the draw.
  v1::SamplingParams params;
  params.set_temperature(0.5f);
  params.set_top_k(2);
  params.set_seed(5);
  params.set_logprobs(-1);
  params.set_logprobs_mode(v1::RAW_LOGPROBS);
  const v1::SampledToken token = SampleFour(params);
  ASSERT_TRUE(token.token_id() == 2 || token.token_id() == 3) << token.token_id();
  EXPECT_NEAR(token.logprob(), kFour[static_cast<size_t>(token.token_id())] - lse_, kTol);
  ExpectTop(token, {{3, 4.0 - lse_}, {2, 3.0 - lse_}, {1, 2.0 - lse_}, {0, 1.0 - lse_}});
}

TEST_F(LogprobsTest, NoLogprobsWhenUnset) {
  v1::SamplingParams params;
  params.set_temperature(0.0f);
  const v1::SampledToken token = SampleFour(params);
  EXPECT_EQ(token.token_id(), 3);
  EXPECT_EQ(token.top_logprobs_size(), 0);
}

TEST_F(LogprobsTest, ProcessedLogprobsAreTheDistributionSampledFrom) {
  // temperature 0.5 → logits [2, 4, 6, 8]; top_k 2 keeps {3, 2}: p3 = 1 / (1 + e⁻²).
  v1::SamplingParams params;
  params.set_temperature(0.5f);
  params.set_top_k(2);
  params.set_seed(5);
  params.set_logprobs(-1);  // every token with non-zero probability: two
  params.set_logprobs_mode(v1::PROCESSED_LOGPROBS);
  const v1::SampledToken token = SampleFour(params);
  const double log_p3 = -std::log1p(std::exp(-2.0));
  ExpectTop(token, {{3, log_p3}, {2, log_p3 - 2.0}});
  EXPECT_NEAR(token.logprob(), ValueOf(token), kTol);
}

TEST_F(LogprobsTest, RawLogits) {
  v1::SamplingParams params;
  params.set_temperature(0.0f);
  params.set_logprobs(-1);
  params.set_logprobs_mode(v1::RAW_LOGITS);
  const v1::SampledToken token = SampleFour(params);
  EXPECT_EQ(token.token_id(), 3);
  EXPECT_NEAR(token.logprob(), 4.0, kTol);
  ExpectTop(token, {{3, 4.0}, {2, 3.0}, {1, 2.0}, {0, 1.0}});
}

TEST_F(LogprobsTest, ProcessedLogitsAfterTemperatureAndTopK) {
  v1::SamplingParams params;
  params.set_temperature(0.5f);
  params.set_top_k(2);
  params.set_seed(5);
  params.set_logprobs(-1);  // removed tokens (-inf) are not listed
  params.set_logprobs_mode(v1::PROCESSED_LOGITS);
  const v1::SampledToken token = SampleFour(params);
  ExpectTop(token, {{3, 8.0}, {2, 6.0}});
  EXPECT_NEAR(token.logprob(), ValueOf(token), kTol);
}

TEST_F(LogprobsTest, TopListIsCutAtN) {
  v1::SamplingParams params;
  params.set_temperature(0.0f);
  params.set_logprobs(1);
  params.set_logprobs_mode(v1::PROCESSED_LOGPROBS);
  params.set_top_k(3);
  // Greedy: the processed row is the logits after masks and penalties (none here).
  const v1::SampledToken token = SampleFour(params);
  EXPECT_EQ(token.token_id(), 3);
  ASSERT_EQ(token.top_logprobs_size(), 1);
  EXPECT_EQ(token.top_logprobs(0).token_id(), 3);
}

// ---------------------------------------------------------------------------------------------
// Serving: many calls at once, expired deadlines, health and reflection.

TEST_F(SamplerServiceTest, ConcurrentCallsAllSucceed) {
  constexpr int kCalls = 32;
  v1::SampleRequest request = MakeRequest({TestRow(0), TestRow(1)});
  Params(request, 0).set_temperature(0.0f);
  Params(request, 1).set_seed(3);
  const std::vector<int32_t> expected = TokenIds(SampleOk(request));

  struct Call {
    grpc::ClientContext context;
    v1::SampleResponse response;
    grpc::Status status;
  };
  std::vector<std::unique_ptr<Call>> calls;
  absl::Mutex mu;
  int done = 0;
  for (int i = 0; i < kCalls; ++i) {
    calls.push_back(std::make_unique<Call>());
    Call& call = *calls.back();
    SetDeadline(call.context);
    stub_->async()->Sample(&call.context, &request, &call.response,
                           [&mu, &done, &call](grpc::Status status) {
                             absl::MutexLock lock(&mu);
                             call.status = std::move(status);
                             ++done;
                           });
  }
  {
    absl::MutexLock lock(&mu);
    ASSERT_TRUE(mu.AwaitWithTimeout(absl::Condition(
                                        +[](int* n) { return *n == kCalls; }, &done),
                                    absl::Seconds(60)));
  }
  for (const auto& call : calls) {
    EXPECT_TRUE(call->status.ok()) << call->status.error_message();
    EXPECT_EQ(TokenIds(call->response), expected);
  }
}

TEST_F(SamplerServiceTest, ExpiredDeadlineIsDeadlineExceededAndServerKeepsServing) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() - std::chrono::seconds(1));
  v1::SampleResponse response;
  const grpc::Status status = stub_->Sample(&context, GoodRequest(), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(SampleOk(GoodRequest()).results_size(), 2);
}

TEST_F(SamplerServiceTest, HealthReportsServingForServerAndSampler) {
  grpc::Status status;
  EXPECT_EQ(tokensampler::testing::HealthCheck(channel_, "", &status), 1) << status.error_message();
  EXPECT_EQ(tokensampler::testing::HealthCheck(channel_, "tokensampler.v1.Sampler", &status), 1)
      << status.error_message();
  EXPECT_EQ(tokensampler::testing::HealthCheck(channel_, "no.such.Service", &status), std::nullopt);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
}

TEST_F(SamplerServiceTest, ReflectionListsTheSamplerService) {
  const std::optional<std::string> services =
      tokensampler::testing::ReflectionListServices(channel_);
  ASSERT_TRUE(services.has_value());
  EXPECT_THAT(*services, HasSubstr("tokensampler.v1.Sampler"));
  EXPECT_THAT(*services, HasSubstr("grpc.health.v1.Health"));
}

TEST(ServerTest, RejectsBadOptions) {
  ServerOptions options;
  options.threads = -1;
  EXPECT_EQ(Server::Start(options).status().code(), absl::StatusCode::kInvalidArgument);
  options.threads = 1;
  options.max_message_bytes = 0;
  EXPECT_EQ(Server::Start(options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ServerTest, ReportsTheChosenPortAndUnixSocket) {
  ServerOptions options;
  options.threads = 1;
  const std::string socket =
      absl::StrCat(::testing::TempDir(), "/ts_server_test_", getpid(), ".sock");
  options.listen_addresses = {"127.0.0.1:0", absl::StrCat("unix:", socket)};
  absl::StatusOr<std::unique_ptr<Server>> server = Server::Start(options);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::vector<std::string>& bound = (*server)->bound_addresses();
  ASSERT_EQ(bound.size(), 2u);
  EXPECT_THAT(bound[0], ::testing::StartsWith("127.0.0.1:"));
  EXPECT_NE(bound[0], "127.0.0.1:0");
  EXPECT_EQ(bound[1], absl::StrCat("unix:", socket));

  // Both addresses serve.
  for (const std::string& address : bound) {
    auto stub = v1::Sampler::NewStub(tokensampler::testing::CreateTestChannel(address));
    grpc::ClientContext context;
    SetDeadline(context);
    v1::SampleResponse response;
    const grpc::Status status = stub->Sample(&context, GoodRequest(), &response);
    EXPECT_TRUE(status.ok()) << address << ": " << status.error_message();
    EXPECT_EQ(response.results_size(), 2);
  }

  // A second server cannot take the same TCP port.
  ServerOptions clash;
  clash.threads = 1;
  clash.listen_addresses = {bound[0]};
  EXPECT_EQ(Server::Start(clash).status().code(), absl::StatusCode::kUnavailable);

  (*server)->Shutdown(absl::Now() + absl::Seconds(5));
  (*server)->Shutdown(absl::Now());  // idempotent
}

}  // namespace
}  // namespace tokensampler::service
