// The Session stream through the server's CallGuard, in-process: the bearer token is checked when
// a stream opens, the per-RPC metrics (rpc="Session") and the live_sessions / live_sequences
// gauges move with the streams (scraped over HTTP), and the drain ends open streams with
// UNAVAILABLE after answering their current request, refuses new ones and waits for them.
//
// Deterministic without timing: the server runs with one sampling thread, and a test that needs a
// request to stay in flight occupies that thread with its own task (ArenaBlocker).
#include <grpcpp/grpcpp.h>

#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/log.h"
#include "service/server.h"
#include "tests/testing/operations_testing.h"
#include "tests/testing/service_testing.h"
#include "tests/testing/session_testing.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::service {
namespace {

using ::testing::HasSubstr;
using ::testing::Optional;
using ::tokensampler::testing::AddSequence;
using ::tokensampler::testing::HttpGet;
using ::tokensampler::testing::MetricSample;
using ::tokensampler::testing::ParsePrometheusText;
using ::tokensampler::testing::SetStep;
using ::tokensampler::testing::TestSession;
using ::tokensampler::testing::WaitFor;

constexpr char kToken[] = "session-token-1";

// Occupies the only thread of a one-thread arena until Release() (or 60 s, so that a failing
// test cannot hang).
class ArenaBlocker {
 public:
  explicit ArenaBlocker(tbb::task_arena& arena) {
    arena.enqueue([this] {
      running_.Notify();
      release_.WaitForNotificationWithTimeout(absl::Seconds(60));
      done_.Notify();
    });
    running_.WaitForNotificationWithTimeout(absl::Seconds(60));
  }
  ~ArenaBlocker() { Release(); }

  void Release() {
    if (!release_.HasBeenNotified()) release_.Notify();
    done_.WaitForNotificationWithTimeout(absl::Seconds(60));
  }

 private:
  absl::Notification running_;
  absl::Notification release_;
  absl::Notification done_;
};

v1::SamplingParams Greedy() {
  v1::SamplingParams params;
  params.set_temperature(0.0f);
  return params;
}

// Adds sequences `ids` (greedy).
v1::SessionRequest AddRequest(const std::vector<uint64_t>& ids) {
  v1::SessionRequest request;
  for (const uint64_t id : ids) AddSequence(request, id, Greedy(), {1, 2});
  return request;
}

// One step of `ids`, row i peaked at token i + 1.
v1::SessionRequest StepRequest(const std::vector<uint64_t>& ids) {
  std::vector<std::vector<float>> rows;
  for (size_t i = 0; i < ids.size(); ++i) {
    std::vector<float> row(16, 0.0f);
    row[i + 1] = 5.0f;
    rows.push_back(row);
  }
  v1::SessionRequest request;
  SetStep(request, rows, ids);
  return request;
}

class SessionOperationsTest : public ::testing::Test {
 protected:
  // One sampling thread, metrics on a loopback port; `configure` adjusts the options.
  void StartServer(const std::function<void(ServerOptions&)>& configure = {}) {
    logger_ = std::make_unique<Logger>("test", LogLevel::kDebug, [this](absl::string_view line) {
      absl::MutexLock lock(&log_mu_);
      log_.append(line.data(), line.size());
    });
    ServerOptions options;
    options.threads = 1;
    options.metrics_listen_address = "127.0.0.1:0";
    options.logger = logger_.get();
    if (configure) configure(options);
    absl::StatusOr<std::unique_ptr<Server>> server = Server::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    stub_ = v1::Sampler::NewStub(server_->InProcessChannel(grpc::ChannelArguments()));
  }

  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown(absl::Now() + absl::Seconds(10));
  }

  // GET /metrics over HTTP, parsed.
  std::map<std::string, double> Scrape() {
    absl::StatusOr<std::string> text = HttpGet(server_->metrics_address());
    EXPECT_TRUE(text.ok()) << text.status();
    absl::StatusOr<std::map<std::string, double>> samples = ParsePrometheusText(text.value_or(""));
    EXPECT_TRUE(samples.ok()) << samples.status();
    return samples.value_or(std::map<std::string, double>{});
  }

  std::string log() {
    absl::MutexLock lock(&log_mu_);
    return log_;
  }

  std::unique_ptr<Logger> logger_;
  absl::Mutex log_mu_;
  std::string log_ ABSL_GUARDED_BY(log_mu_);
  std::unique_ptr<Server> server_;
  std::unique_ptr<v1::Sampler::Stub> stub_;
};

TEST_F(SessionOperationsTest, StreamNeedsTheBearerTokenWhenAuthIsOn) {
  StartServer([](ServerOptions& options) { options.auth_tokens = {"other-token", kToken}; });
  for (const std::string& token : {std::string(), std::string("wrong-token")}) {
    TestSession session(*stub_, absl::Seconds(60), token);
    v1::SessionRequest add = AddRequest({1});
    session.Write(add);  // may already fail: the server ends the stream at once
    const grpc::Status status = session.AwaitEnd();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED)
        << "token \"" << token << "\": " << status.error_message();
  }
  {
    TestSession session(*stub_, absl::Seconds(60), kToken);
    session.CallOk(AddRequest({1, 2}));
    EXPECT_EQ(session.CallOk(StepRequest({1, 2})).results_size(), 2);
    const grpc::Status status = session.Close();
    EXPECT_TRUE(status.ok()) << status.error_message();
  }
  EXPECT_TRUE(WaitFor([&] { return server_->service().live_sessions() == 0; }));
  const std::map<std::string, double> samples = Scrape();
  EXPECT_THAT(MetricSample(samples, "tokensampler_rejected_total",
                           {{"rpc", "Session"}, {"reason", "unauthenticated"}}),
              Optional(2.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_requests_handled_total",
                           {{"rpc", "Session"}, {"code", "UNAUTHENTICATED"}}),
              Optional(2.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_requests_handled_total",
                           {{"rpc", "Session"}, {"code", "OK"}}),
              Optional(1.0));
  EXPECT_THAT(log(), HasSubstr("event=rpc_error rpc=Session code=UNAUTHENTICATED"));
  EXPECT_THAT(log(), ::testing::Not(HasSubstr(kToken)));
}

// The rows metric counts a step's logits rows: one per live beam of a beam search and k + 1 for
// a sequence with k drafts, not one per stepped sequence.
TEST_F(SessionOperationsTest, RowsMetricCountsLogitsRowsOfBeamsAndDrafts) {
  StartServer();
  TestSession session(*stub_);
  v1::SessionRequest add = AddRequest({1, 2});
  add.mutable_add(0)->mutable_beam()->set_beam_width(3);
  session.CallOk(add);
  // Step 1: the beam search's prompt row + sequence 2's row.
  v1::SessionRequest first = StepRequest({1, 2});
  ASSERT_EQ(session.CallOk(first).results(0).beams_size(), 3);
  // Step 2: 3 live beams + sequence 2 with 2 drafts (3 rows).
  std::vector<std::vector<float>> rows(6, std::vector<float>(16, 0.0f));
  v1::SessionRequest second;
  SetStep(second, rows, {1, 2});
  v1::SequenceDrafts& drafts = *second.mutable_step()->add_drafts();
  drafts.set_sequence_id(2);
  drafts.add_draft_token_ids(3);
  drafts.add_draft_token_ids(4);
  EXPECT_TRUE(session.CallOk(second).results(1).has_verify());
  EXPECT_TRUE(session.Close().ok());
  const std::map<std::string, double> samples = Scrape();
  EXPECT_THAT(
      MetricSample(samples, "tokensampler_rows_total", {{"rpc", "Session"}, {"code", "OK"}}),
      Optional(8.0));
}

TEST_F(SessionOperationsTest, SessionMetricsAndGaugesMoveWithTheStreams) {
  StartServer();
  std::map<std::string, double> samples = Scrape();
  EXPECT_THAT(MetricSample(samples, "tokensampler_live_sessions"), Optional(0.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_live_sequences"), Optional(0.0));

  auto first = std::make_unique<TestSession>(*stub_);
  TestSession second(*stub_);
  first->CallOk(AddRequest({1, 2, 3}));
  second.CallOk(AddRequest({7}));
  EXPECT_EQ(first->CallOk(StepRequest({1, 2, 3})).results_size(), 3);
  EXPECT_EQ(second.CallOk(StepRequest({7})).results_size(), 1);

  samples = Scrape();
  EXPECT_THAT(MetricSample(samples, "tokensampler_live_sessions"), Optional(2.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_live_sequences"), Optional(4.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_requests_started_total", {{"rpc", "Session"}}),
              Optional(2.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_requests_in_flight", {{"rpc", "Session"}}),
              Optional(2.0));
  // Rows are the steps' rows: 3 + 1 (the adds have none).
  EXPECT_THAT(
      MetricSample(samples, "tokensampler_rows_total", {{"rpc", "Session"}, {"code", "OK"}}),
      Optional(4.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_request_bytes_total", {{"rpc", "Session"}}),
              Optional(::testing::Gt(0.0)));
  // Four requests (two adds, two steps) went through the sampling thread.
  EXPECT_THAT(MetricSample(samples, "tokensampler_sampling_seconds_count", {{"rpc", "Session"}}),
              Optional(4.0));
  // Sample's metrics are untouched.
  EXPECT_THAT(MetricSample(samples, "tokensampler_requests_started_total", {{"rpc", "Sample"}}),
              ::testing::AnyOf(std::optional<double>(), Optional(0.0)));

  // A release and a finished stream take their sequences with them.
  v1::SessionRequest release;
  release.add_release(2);
  first->CallOk(release);
  samples = Scrape();
  EXPECT_THAT(MetricSample(samples, "tokensampler_live_sequences"), Optional(3.0));

  EXPECT_TRUE(first->Close().ok());
  first.reset();
  ASSERT_TRUE(WaitFor([&] {
    samples = Scrape();
    return MetricSample(samples, "tokensampler_live_sessions") == 1.0;
  }));
  EXPECT_THAT(MetricSample(samples, "tokensampler_live_sequences"), Optional(1.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_requests_handled_total",
                           {{"rpc", "Session"}, {"code", "OK"}}),
              Optional(1.0));

  EXPECT_EQ(second.Cancel().error_code(), grpc::StatusCode::CANCELLED);
  ASSERT_TRUE(WaitFor([&] {
    samples = Scrape();
    return MetricSample(samples, "tokensampler_live_sessions") == 0.0;
  }));
  EXPECT_THAT(MetricSample(samples, "tokensampler_live_sequences"), Optional(0.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_requests_in_flight", {{"rpc", "Session"}}),
              Optional(0.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_requests_handled_total",
                           {{"rpc", "Session"}, {"code", "CANCELLED"}}),
              Optional(1.0))
      << [&] {
           std::string all;
           for (const auto& [key, value] : samples) absl::StrAppend(&all, key, " ", value, "\n");
           return all;
         }();
}

TEST_F(SessionOperationsTest, OverloadedStepIsAnsweredWithResourceExhaustedAndTheStreamGoesOn) {
  StartServer([](ServerOptions& options) { options.max_concurrent_requests = 1; });
  TestSession session(*stub_);
  session.CallOk(AddRequest({1}));
  {
    // A Sample call holds the only slot while the arena's thread is busy.
    ArenaBlocker blocker(server_->arena());
    grpc::ClientContext context;
    tokensampler::testing::SetDeadline(context);
    v1::SampleRequest request = tokensampler::testing::MakeRequest({{1, 2, 3, 4}});
    v1::SampleResponse response;
    absl::Notification sampled;
    grpc::Status sample_status;
    stub_->async()->Sample(&context, &request, &response, [&](grpc::Status status) {
      sample_status = std::move(status);
      sampled.Notify();
    });
    ASSERT_TRUE(WaitFor([&] {
      return MetricSample(Scrape(), "tokensampler_requests_queued", {{"rpc", "Sample"}}) == 1.0;
    }));
    const v1::SessionResponse over = session.Call(StepRequest({1}));
    EXPECT_EQ(over.error().code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
    EXPECT_THAT(over.error().message(), HasSubstr("max_concurrent_requests=1"));
    EXPECT_EQ(over.results_size(), 0);
    blocker.Release();
    ASSERT_TRUE(sampled.WaitForNotificationWithTimeout(absl::Seconds(60)));
    EXPECT_TRUE(sample_status.ok()) << sample_status.error_message();
  }
  // The refused step changed nothing: sequence 1 steps now.
  EXPECT_EQ(session.CallOk(StepRequest({1})).results_size(), 1);
  EXPECT_TRUE(session.Close().ok());
  EXPECT_THAT(MetricSample(Scrape(), "tokensampler_rejected_total",
                           {{"rpc", "Session"}, {"reason", "concurrency"}}),
              Optional(1.0));
}

TEST_F(SessionOperationsTest, DrainAnswersTheCurrentRequestEndsStreamsAndWaitsForThem) {
  // Over loopback TCP: the in-process transport closes with the server and could drop a status
  // the client has not read yet.
  StartServer([](ServerOptions& options) { options.listen_addresses = {"127.0.0.1:0"}; });
  stub_ =
      v1::Sampler::NewStub(tokensampler::testing::CreateTestChannel(server_->bound_addresses()[0]));
  TestSession open(*stub_);
  open.CallOk(AddRequest({1, 2}));
  auto blocker = std::make_unique<ArenaBlocker>(server_->arena());
  // A step waits for the busy thread while the drain starts.
  v1::SessionRequest step = StepRequest({1, 2});
  ASSERT_TRUE(open.Write(step));
  ASSERT_TRUE(WaitFor([&] {
    return MetricSample(Scrape(), "tokensampler_requests_queued", {{"rpc", "Session"}}) == 1.0;
  }));
  std::thread drain([this] { server_->Shutdown(absl::Now() + absl::Seconds(60)); });
  ASSERT_TRUE(WaitFor([&] { return MetricSample(Scrape(), "tokensampler_serving") == 0.0; }));

  // A stream opened during the drain is refused at once.
  {
    TestSession late(*stub_);
    v1::SessionRequest add = AddRequest({5});
    late.Write(add);
    const grpc::Status status = late.AwaitEnd();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE) << status.error_message();
    EXPECT_THAT(status.error_message(), HasSubstr("draining"));
  }

  // The open stream's step is answered, then the stream ends with UNAVAILABLE.
  blocker->Release();
  std::optional<v1::SessionResponse> answer = open.Read();
  ASSERT_TRUE(answer.has_value());
  EXPECT_EQ(answer->request_id(), step.request_id());
  EXPECT_EQ(answer->error().code(), 0) << answer->error().message();
  EXPECT_EQ(answer->results_size(), 2);
  const grpc::Status status = open.AwaitEnd();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(status.error_message(), HasSubstr("shutting down"));
  drain.join();

  // The drain waited for the stream (nothing was cancelled at the deadline) and freed its state.
  EXPECT_THAT(log(), HasSubstr("calls_cancelled=0"));
  EXPECT_THAT(log(), HasSubstr("event=rpc_error rpc=Session code=UNAVAILABLE"));
  EXPECT_EQ(server_->service().live_sessions(), 0);
  EXPECT_EQ(server_->service().live_sequences(), 0);
}

}  // namespace
}  // namespace tokensampler::service
