// The operational side of the Server, in-process: overload limits, deadlines and cancellation of
// queued work, drain and health transitions, bearer tokens, the health-only listener, the metrics
// endpoint, logs, Unix socket permissions and option checks.
//
// Deterministic without timing: the server runs with one sampling thread, and a test that needs
// calls to stay in flight occupies that thread with its own task (ArenaBlocker) until it lets go,
// so admitted calls wait in the arena's queue for exactly as long as the test wants.
#include <grpcpp/grpcpp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/log.h"
#include "service/server.h"
#include "tests/testing/operations_testing.h"
#include "tests/testing/service_testing.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::service {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Optional;
using ::tokensampler::testing::CreateTestChannel;
using ::tokensampler::testing::HealthCheck;
using ::tokensampler::testing::MakeRequest;
using ::tokensampler::testing::ParsePrometheusText;
using ::tokensampler::testing::ReflectionListServices;
using ::tokensampler::testing::SetDeadline;
using ::tokensampler::testing::WaitFor;

constexpr int kServing = 1;
constexpr int kNotServing = 2;

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

// An asynchronous Sample call; Wait() returns its status.
struct PendingCall {
  grpc::ClientContext context;
  v1::SampleRequest request;
  v1::SampleResponse response;
  grpc::Status status;
  absl::Notification done;

  grpc::Status Wait() {
    EXPECT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(60)));
    return status;
  }
};

v1::SampleRequest SmallRequest() {
  v1::SampleRequest request = MakeRequest({{1, 2, 3, 4}, {4, 3, 2, 1}});
  request.mutable_rows(0)->mutable_params()->set_temperature(0.0f);
  request.mutable_rows(1)->mutable_params()->set_temperature(0.0f);
  return request;
}

class ServerOperationsTest : public ::testing::Test {
 protected:
  // One sampling thread; `configure` adjusts the options. Logs go to log_lines().
  void StartServer(const std::function<void(ServerOptions&)>& configure = {}) {
    logger_ = std::make_unique<Logger>("test", LogLevel::kDebug, [this](absl::string_view line) {
      absl::MutexLock lock(&log_mu_);
      log_.append(line.data(), line.size());
    });
    ServerOptions options;
    options.threads = 1;
    options.logger = logger_.get();
    if (configure) configure(options);
    absl::StatusOr<std::unique_ptr<Server>> server = Server::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    channel_ = server_->InProcessChannel(args);
    stub_ = v1::Sampler::NewStub(channel_);
  }

  void TearDown() override {
    blocker_.reset();
    if (server_ != nullptr) server_->Shutdown(absl::Now() + absl::Seconds(10));
  }

  grpc::Status Sample(const v1::SampleRequest& request, v1::SampleResponse* response,
                      const std::string& token = "") {
    grpc::ClientContext context;
    SetDeadline(context);
    if (!token.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", token));
    return stub_->Sample(&context, request, response);
  }

  grpc::Status SampleSmall() {
    v1::SampleResponse response;
    return Sample(SmallRequest(), &response);
  }

  // Starts an asynchronous call of `request` with `timeout`.
  PendingCall& StartCall(const v1::SampleRequest& request,
                         absl::Duration timeout = tokensampler::testing::kRpcTimeout) {
    calls_.push_back(std::make_unique<PendingCall>());
    PendingCall& call = *calls_.back();
    call.request = request;
    SetDeadline(call.context, timeout);
    stub_->async()->Sample(&call.context, &call.request, &call.response,
                           [&call](grpc::Status status) {
                             call.status = std::move(status);
                             call.done.Notify();
                           });
    return call;
  }

  void BlockArena() { blocker_ = std::make_unique<ArenaBlocker>(server_->arena()); }
  void ReleaseArena() { blocker_->Release(); }

  // One sample of the server's metrics, or -1 when absent.
  double Metric(absl::string_view name, tokensampler::testing::Labels labels = {}) {
    absl::StatusOr<std::map<std::string, double>> samples =
        ParsePrometheusText(server_->metrics().TextFormat());
    EXPECT_TRUE(samples.ok()) << samples.status();
    if (!samples.ok()) return -1;
    return tokensampler::testing::MetricSample(*samples, name, std::move(labels)).value_or(-1);
  }
  double SampleMetric(absl::string_view name, absl::string_view code = "") {
    if (code.empty()) return Metric(name, {{"rpc", "Sample"}});
    return Metric(name, {{"rpc", "Sample"}, {"code", std::string(code)}});
  }

  // Waits until `n` Sample requests wait in the arena's queue.
  void WaitUntilQueued(int n) {
    ASSERT_TRUE(WaitFor([&] { return SampleMetric("tokensampler_requests_queued") == n; }))
        << server_->metrics().TextFormat();
  }

  std::string Log() {
    absl::MutexLock lock(&log_mu_);
    return log_;
  }
  std::vector<std::string> LogLinesWith(absl::string_view needle) {
    std::vector<std::string> lines;
    for (absl::string_view line : absl::StrSplit(Log(), '\n', absl::SkipEmpty())) {
      if (absl::StrContains(line, needle)) lines.emplace_back(line);
    }
    return lines;
  }

  std::unique_ptr<Logger> logger_;
  absl::Mutex log_mu_;
  std::string log_ ABSL_GUARDED_BY(log_mu_);
  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Sampler::Stub> stub_;
  std::vector<std::unique_ptr<PendingCall>> calls_;
  std::unique_ptr<ArenaBlocker> blocker_;
};

// ---------------------------------------------------------------------------------------------
// Overload: RESOURCE_EXHAUSTED at once beyond the limits, and recovery.

TEST_F(ServerOperationsTest, ConcurrencyLimitRefusesAtOnceAndRecovers) {
  StartServer([](ServerOptions& o) { o.max_concurrent_requests = 2; });
  BlockArena();
  PendingCall& first = StartCall(SmallRequest());
  PendingCall& second = StartCall(SmallRequest());
  WaitUntilQueued(2);

  // The third is answered while the first two still wait: nothing queues beyond the limit.
  v1::SampleResponse response;
  const grpc::Status refused = Sample(SmallRequest(), &response);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_EQ(refused.error_message(),
            "server overloaded: 2 requests in flight, max_concurrent_requests=2; retry with "
            "backoff");
  EXPECT_FALSE(first.done.HasBeenNotified());
  EXPECT_EQ(Metric("tokensampler_rejected_total", {{"rpc", "Sample"}, {"reason", "concurrency"}}),
            1);

  ReleaseArena();
  EXPECT_TRUE(first.Wait().ok()) << first.status.error_message();
  EXPECT_TRUE(second.Wait().ok()) << second.status.error_message();
  EXPECT_EQ(second.response.results(0).token_id(), 3);
  // Recovered: the limit is free again.
  EXPECT_TRUE(SampleSmall().ok());
  EXPECT_EQ(SampleMetric("tokensampler_requests_handled_total", "OK"), 3);
  EXPECT_EQ(SampleMetric("tokensampler_requests_handled_total", "RESOURCE_EXHAUSTED"), 1);
  EXPECT_THAT(LogLinesWith("event=rpc_error"),
              ::testing::ElementsAre(
                  AllOf(HasSubstr("level=warning"), HasSubstr("code=RESOURCE_EXHAUSTED"))));
}

TEST_F(ServerOperationsTest, InFlightBytesLimitRefusesAtOnceAndRecovers) {
  const v1::SampleRequest request = MakeRequest({std::vector<float>(1000, 0.5f)});
  const int64_t size = static_cast<int64_t>(request.ByteSizeLong());
  // One request fits, two do not.
  StartServer([size](ServerOptions& o) { o.max_inflight_bytes = size + size / 2; });
  BlockArena();
  PendingCall& first = StartCall(request);
  WaitUntilQueued(1);
  EXPECT_EQ(Metric("tokensampler_in_flight_bytes"), static_cast<double>(size));

  v1::SampleResponse response;
  const grpc::Status refused = Sample(request, &response);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(refused.error_message(),
              AllOf(HasSubstr(absl::StrCat(size, " bytes in flight + this request's ", size)),
                    HasSubstr(absl::StrCat("max_inflight_bytes=", size + size / 2))));
  EXPECT_EQ(Metric("tokensampler_rejected_total", {{"rpc", "Sample"}, {"reason", "bytes"}}), 1);

  ReleaseArena();
  EXPECT_TRUE(first.Wait().ok());
  EXPECT_TRUE(Sample(request, &response).ok());
  EXPECT_EQ(Metric("tokensampler_in_flight_bytes"), 0);
}

TEST_F(ServerOperationsTest, ARequestAloneIsAdmittedEvenAboveTheBytesLimit) {
  StartServer([](ServerOptions& o) { o.max_inflight_bytes = 10; });
  EXPECT_TRUE(SampleSmall().ok());
}

// ---------------------------------------------------------------------------------------------
// Deadlines and cancellation: queued work is dropped at once and never runs.

TEST_F(ServerOperationsTest, DeadlineExceededWhileQueuedFreesItsWork) {
  StartServer();
  BlockArena();
  PendingCall& call = StartCall(SmallRequest(), absl::Milliseconds(200));
  EXPECT_EQ(call.Wait().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  // The server lets go of the call while the thread is still busy: its slot, its bytes and its
  // place in the queue are free, and it is counted as timed out, not sampled.
  ASSERT_TRUE(WaitFor([&] { return SampleMetric("tokensampler_requests_in_flight") == 0; }));
  EXPECT_EQ(SampleMetric("tokensampler_requests_queued"), 0);
  EXPECT_EQ(Metric("tokensampler_in_flight_bytes"), 0);
  EXPECT_EQ(SampleMetric("tokensampler_requests_handled_total", "DEADLINE_EXCEEDED"), 1);
  EXPECT_EQ(SampleMetric("tokensampler_rows_total", "DEADLINE_EXCEEDED"), 2);
  EXPECT_EQ(SampleMetric("tokensampler_rows_total", "OK"), -1);  // nothing was sampled

  ReleaseArena();
  EXPECT_TRUE(SampleSmall().ok());
  // The dropped call's task found it answered and did no work.
  EXPECT_EQ(SampleMetric("tokensampler_rows_total", "OK"), 2);
  EXPECT_EQ(Metric("tokensampler_sampling_seconds_count", {{"rpc", "Sample"}}), 1);
}

TEST_F(ServerOperationsTest, ClientCancellationWhileQueuedFreesItsWork) {
  StartServer();
  BlockArena();
  PendingCall& call = StartCall(SmallRequest());
  WaitUntilQueued(1);
  call.context.TryCancel();
  EXPECT_EQ(call.Wait().error_code(), grpc::StatusCode::CANCELLED);
  ASSERT_TRUE(WaitFor([&] { return SampleMetric("tokensampler_requests_in_flight") == 0; }));
  EXPECT_EQ(SampleMetric("tokensampler_requests_handled_total", "CANCELLED"), 1);
  ReleaseArena();
  EXPECT_TRUE(SampleSmall().ok());
}

// ---------------------------------------------------------------------------------------------
// Drain: NOT_SERVING, new calls refused, calls in flight answered.

TEST_F(ServerOperationsTest, DrainReportsNotServingRefusesNewCallsAndFinishesInFlightOnes) {
  StartServer();
  EXPECT_EQ(HealthCheck(channel_, ""), kServing);
  EXPECT_EQ(HealthCheck(channel_, "tokensampler.v1.Sampler"), kServing);
  EXPECT_EQ(Metric("tokensampler_serving"), 1);

  BlockArena();
  PendingCall& first = StartCall(SmallRequest());
  PendingCall& second = StartCall(SmallRequest());
  WaitUntilQueued(2);

  std::thread drain([this] { server_->Shutdown(absl::Now() + absl::Seconds(30)); });
  // While the two calls wait, probes read NOT_SERVING and new calls are refused.
  ASSERT_TRUE(WaitFor([&] { return HealthCheck(channel_, "") == kNotServing; }));
  EXPECT_EQ(HealthCheck(channel_, "tokensampler.v1.Sampler"), kNotServing);
  EXPECT_EQ(Metric("tokensampler_serving"), 0);
  v1::SampleResponse response;
  const grpc::Status refused = Sample(SmallRequest(), &response);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(refused.error_message(), HasSubstr("draining"));
  EXPECT_FALSE(first.done.HasBeenNotified());

  ReleaseArena();
  drain.join();
  EXPECT_TRUE(first.Wait().ok()) << first.status.error_message();
  EXPECT_TRUE(second.Wait().ok()) << second.status.error_message();
  EXPECT_THAT(LogLinesWith("event=drain "), ::testing::ElementsAre(HasSubstr("calls_in_flight=2")));
  EXPECT_THAT(
      LogLinesWith("event=drained"),
      ::testing::ElementsAre(AllOf(HasSubstr("level=info"), HasSubstr("calls_cancelled=0"))));
}

TEST_F(ServerOperationsTest, DrainCancelsWhatIsLeftAtTheDeadline) {
  StartServer();
  BlockArena();
  PendingCall& stuck = StartCall(SmallRequest());
  WaitUntilQueued(1);
  server_->Shutdown(absl::Now() + absl::Milliseconds(300));
  EXPECT_FALSE(stuck.Wait().ok());
  EXPECT_THAT(
      LogLinesWith("event=drained"),
      ::testing::ElementsAre(AllOf(HasSubstr("level=warning"), HasSubstr("calls_cancelled=1"))));
}

TEST(DrainSubscriptionTest, StreamsAreToldWhenTheDrainStarts) {
  Metrics metrics("test", 1);
  CallGuard guard(CallGuardOptions{}, metrics, nullptr);
  int first = 0;
  int second = 0;
  const int64_t first_id = guard.SubscribeDrain([&first] { ++first; });
  const int64_t second_id = guard.SubscribeDrain([&second] { ++second; });
  guard.UnsubscribeDrain(second_id);
  EXPECT_FALSE(guard.draining());
  guard.StartDrain();
  guard.StartDrain();  // idempotent
  EXPECT_TRUE(guard.draining());
  EXPECT_EQ(first, 1);
  EXPECT_EQ(second, 0);
  guard.UnsubscribeDrain(first_id);
  // A stream opened during the drain is told at once.
  int late = 0;
  guard.UnsubscribeDrain(guard.SubscribeDrain([&late] { ++late; }));
  EXPECT_EQ(late, 1);
  EXPECT_EQ(guard.WaitForIdle(absl::Now()), 0);
}

// ---------------------------------------------------------------------------------------------
// Bearer tokens.

TEST_F(ServerOperationsTest, BearerTokenIsCheckedOnEveryCallAndHealthIsExempt) {
  StartServer([](ServerOptions& o) { o.auth_tokens = {"old-token", "s3cret"}; });
  v1::SampleResponse response;
  grpc::Status status = Sample(SmallRequest(), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(status.error_message(),
            "missing bearer token: send the metadata \"authorization: Bearer <token>\"");
  status = Sample(SmallRequest(), &response, "s3cre");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(status.error_message(), "invalid bearer token");
  {
    grpc::ClientContext context;
    SetDeadline(context);
    context.AddMetadata("authorization", "Basic czNjcmV0");
    status = stub_->Sample(&context, SmallRequest(), &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  // Either accepted token works (rotation).
  EXPECT_TRUE(Sample(SmallRequest(), &response, "s3cret").ok());
  EXPECT_TRUE(Sample(SmallRequest(), &response, "old-token").ok());
  // Health needs no token; reflection, which could not check one, is not served.
  EXPECT_EQ(HealthCheck(channel_, ""), kServing);
  EXPECT_EQ(ReflectionListServices(channel_), std::nullopt);

  EXPECT_EQ(
      Metric("tokensampler_rejected_total", {{"rpc", "Sample"}, {"reason", "unauthenticated"}}), 3);
  EXPECT_EQ(SampleMetric("tokensampler_requests_handled_total", "UNAUTHENTICATED"), 3);
  // The token itself is never logged.
  EXPECT_THAT(Log(), ::testing::Not(HasSubstr("s3cre")));
}

// ---------------------------------------------------------------------------------------------
// Listeners: health-only, metrics, Unix socket mode.

TEST_F(ServerOperationsTest, HealthListenerServesOnlyHealthWithTheSameStatus) {
  const std::string socket = tokensampler::testing::UniqueTempPath("ops.sock");
  StartServer([&socket](ServerOptions& o) {
    o.listen_addresses = {absl::StrCat("unix:", socket)};
    o.health_listen_addresses = {"127.0.0.1:0"};
  });
  ASSERT_EQ(server_->health_addresses().size(), 1u);
  const auto health = CreateTestChannel(server_->health_addresses()[0]);
  EXPECT_EQ(HealthCheck(health, ""), kServing);
  EXPECT_EQ(HealthCheck(health, "tokensampler.v1.Sampler"), kServing);
  EXPECT_EQ(ReflectionListServices(health), std::nullopt);

  auto stub = v1::Sampler::NewStub(health);
  grpc::ClientContext context;
  SetDeadline(context);
  v1::SampleResponse response;
  const grpc::Status status = stub->Sample(&context, SmallRequest(), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  EXPECT_THAT(status.error_message(), HasSubstr("serves only grpc.health.v1"));

  // Drain turns it NOT_SERVING too, while it keeps answering.
  BlockArena();
  PendingCall& call = StartCall(SmallRequest());
  WaitUntilQueued(1);
  std::thread drain([this] { server_->Shutdown(absl::Now() + absl::Seconds(30)); });
  EXPECT_TRUE(WaitFor([&] { return HealthCheck(health, "") == kNotServing; }));
  ReleaseArena();
  drain.join();
  EXPECT_TRUE(call.Wait().ok());
  std::remove(socket.c_str());
}

TEST_F(ServerOperationsTest, MetricsEndpointIsScrapedOverHttpAndMovesWithTraffic) {
  StartServer([](ServerOptions& o) { o.metrics_listen_address = "127.0.0.1:0"; });
  ASSERT_THAT(server_->metrics_address(), ::testing::StartsWith("127.0.0.1:"));
  const auto scrape = [this] {
    absl::StatusOr<std::string> text = tokensampler::testing::HttpGet(server_->metrics_address());
    EXPECT_TRUE(text.ok()) << text.status();
    absl::StatusOr<std::map<std::string, double>> samples = ParsePrometheusText(text.value_or(""));
    EXPECT_TRUE(samples.ok()) << samples.status();
    return samples.value_or(std::map<std::string, double>{});
  };
  using tokensampler::testing::MetricSample;
  const std::map<std::string, double> before = scrape();
  EXPECT_THAT(MetricSample(before, "tokensampler_serving"), Optional(1.0));
  EXPECT_THAT(MetricSample(before, "tokensampler_threads"), Optional(1.0));
  EXPECT_THAT(MetricSample(before, "tokensampler_build_info", {{"version", "0.1.0"}}),
              Optional(1.0));
  EXPECT_THAT(MetricSample(before, "tokensampler_live_sessions"), Optional(0.0));
  EXPECT_THAT(MetricSample(before, "tokensampler_live_sequences"), Optional(0.0));
  EXPECT_THAT(MetricSample(before, "tokensampler_shm_regions"), Optional(0.0));

  // Three good calls of two rows, one bad call of two rows.
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(SampleSmall().ok());
  v1::SampleRequest bad = SmallRequest();
  bad.mutable_rows(1)->mutable_params()->set_top_p(2.0f);
  v1::SampleResponse response;
  ASSERT_EQ(Sample(bad, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  const double bytes = static_cast<double>(3 * SmallRequest().ByteSizeLong() + bad.ByteSizeLong());

  const std::map<std::string, double> after = scrape();
  const tokensampler::testing::Labels sample = {{"rpc", "Sample"}};
  EXPECT_THAT(MetricSample(after, "tokensampler_requests_started_total", sample), Optional(4.0));
  EXPECT_THAT(MetricSample(after, "tokensampler_requests_handled_total",
                           {{"rpc", "Sample"}, {"code", "OK"}}),
              Optional(3.0));
  EXPECT_THAT(MetricSample(after, "tokensampler_requests_handled_total",
                           {{"rpc", "Sample"}, {"code", "INVALID_ARGUMENT"}}),
              Optional(1.0));
  EXPECT_THAT(MetricSample(after, "tokensampler_rows_total", {{"rpc", "Sample"}, {"code", "OK"}}),
              Optional(6.0));
  EXPECT_THAT(MetricSample(after, "tokensampler_rows_total",
                           {{"rpc", "Sample"}, {"code", "INVALID_ARGUMENT"}}),
              Optional(2.0));
  EXPECT_THAT(MetricSample(after, "tokensampler_request_bytes_total", sample), Optional(bytes));
  EXPECT_THAT(MetricSample(after, "tokensampler_requests_in_flight", sample), Optional(0.0));
  EXPECT_THAT(MetricSample(after, "tokensampler_in_flight_bytes"), Optional(0.0));
  for (const char* histogram : {"tokensampler_queue_wait_seconds", "tokensampler_sampling_seconds",
                                "tokensampler_request_duration_seconds"}) {
    EXPECT_THAT(MetricSample(after, absl::StrCat(histogram, "_count"), sample), Optional(4.0))
        << histogram;
    EXPECT_THAT(MetricSample(after, absl::StrCat(histogram, "_bucket"),
                             {{"rpc", "Sample"}, {"le", "+Inf"}}),
                Optional(4.0))
        << histogram;
    EXPECT_GT(MetricSample(after, absl::StrCat(histogram, "_sum"), sample).value_or(0), 0.0)
        << histogram;
  }
  // The arena's thread worked for the calls.
  EXPECT_GT(MetricSample(after, "tokensampler_arena_busy_thread_seconds_total").value_or(0),
            MetricSample(before, "tokensampler_arena_busy_thread_seconds_total").value_or(0));
  EXPECT_TRUE(MetricSample(after, "tokensampler_arena_threads_active").has_value());
}

TEST_F(ServerOperationsTest, UnixSocketModeIsApplied) {
  const std::string socket = tokensampler::testing::UniqueTempPath("mode.sock");
  StartServer([&socket](ServerOptions& o) {
    o.listen_addresses = {absl::StrCat("unix:", socket)};
    o.unix_socket_mode = 0600;
  });
  struct stat info {};
  ASSERT_EQ(stat(socket.c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0777, 0600u);
  server_->Shutdown(absl::Now());
  std::remove(socket.c_str());
}

// ---------------------------------------------------------------------------------------------
// Logs.

TEST_F(ServerOperationsTest, FailedCallsAreLoggedOnceAndRequestsAreSampled) {
  StartServer([](ServerOptions& o) { o.request_log_every = 2; });
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(SampleSmall().ok());
  v1::SampleRequest bad = SmallRequest();
  bad.mutable_rows(0)->mutable_params()->set_top_p(1.5f);
  v1::SampleResponse response;
  ASSERT_FALSE(Sample(bad, &response).ok());

  // Requests 1, 3 and 5 (the bad one) are logged; every line is logfmt.
  const std::vector<std::string> requests = LogLinesWith("event=request");
  ASSERT_EQ(requests.size(), 3u) << Log();
  EXPECT_THAT(requests[0],
              AllOf(HasSubstr("level=info"), HasSubstr("rpc=Sample"), HasSubstr("code=OK"),
                    HasSubstr("rows=2"), HasSubstr("queue_ms="), HasSubstr("sampling_ms="),
                    HasSubstr("total_ms="), HasSubstr("peer=")));
  EXPECT_THAT(LogLinesWith("event=rpc_error"),
              ::testing::ElementsAre(
                  AllOf(::testing::StartsWith("test "), HasSubstr("level=warning"),
                        HasSubstr("code=INVALID_ARGUMENT"),
                        HasSubstr("message=\"rows[0].params.top_p must be in (0, 1], got 1.5\""))));
}

// ---------------------------------------------------------------------------------------------
// Options.

TEST(ServerOptionsTest, RejectsBadOperationalOptions) {
  const std::vector<std::pair<std::string, std::function<void(ServerOptions&)>>> cases = {
      {"max_concurrent_requests must be >= 0",
       [](ServerOptions& o) { o.max_concurrent_requests = -1; }},
      {"max_inflight_bytes must be >= 0", [](ServerOptions& o) { o.max_inflight_bytes = -1; }},
      {"request_log_every must be >= 0", [](ServerOptions& o) { o.request_log_every = -1; }},
      {"must be given together", [](ServerOptions& o) { o.tls.private_key = "-----BEGIN x"; }},
      {"needs the server's certificate chain",
       [](ServerOptions& o) { o.tls.client_ca = "-----BEGIN x"; }},
      {"the certificate chain is not PEM",
       [](ServerOptions& o) {
         o.tls.cert_chain = "garbage";
         o.tls.private_key = "-----BEGIN x";
       }},
      {"auth tokens must not be empty", [](ServerOptions& o) { o.auth_tokens = {""}; }},
      {"unix_socket_mode must be at most 0777, got 01000",
       [](ServerOptions& o) { o.unix_socket_mode = 01000; }},
      {"metrics_listen_address must be host:port",
       [](ServerOptions& o) { o.metrics_listen_address = "unix:/tmp/m"; }},
      {"keepalive time must be in",
       [](ServerOptions& o) { o.keepalive.time = absl::ZeroDuration(); }},
      {"keepalive timeout must be in",
       [](ServerOptions& o) { o.keepalive.timeout = absl::Hours(24 * 365); }},
      {"listen address must not be empty",
       [](ServerOptions& o) { o.health_listen_addresses = {""}; }},
  };
  for (const auto& [message, configure] : cases) {
    ServerOptions options;
    options.threads = 1;
    configure(options);
    const absl::Status status = Server::Start(options).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << message;
    EXPECT_THAT(status.message(), HasSubstr(message));
  }
}

TEST(ServerOptionsTest, BusyMetricsPortIsUnavailable) {
  ServerOptions first;
  first.threads = 1;
  first.metrics_listen_address = "127.0.0.1:0";
  absl::StatusOr<std::unique_ptr<Server>> server = Server::Start(first);
  ASSERT_TRUE(server.ok()) << server.status();
  ServerOptions second;
  second.threads = 1;
  second.metrics_listen_address = (*server)->metrics_address();
  const absl::Status status = Server::Start(second).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(status.message(), HasSubstr("could not serve metrics on"));
}

}  // namespace
}  // namespace tokensampler::service
