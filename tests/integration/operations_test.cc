// Operating the real tokensamplerd binary: metrics scraped over HTTP, SIGTERM during load (drain,
// no lost responses, exit 0), TLS and mutual TLS with certificates made by openssl for this run,
// bearer tokens, the health-only TCP port next to a Unix-socket data listener, configuration
// from TOKENSAMPLER_* environment variables, socket permissions, and bad flag values. Clients
// are the C++ client library (tokensampler::Client) and raw generated stubs.
#include <signal.h>
#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "client/client.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_process.h"
#include "tests/testing/operations_testing.h"
#include "tests/testing/service_testing.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

#ifndef TOKENSAMPLERD_PATH
#error "TOKENSAMPLERD_PATH must name the tokensamplerd binary"
#endif

namespace tokensampler {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;
using ::testing::Optional;
using ::tokensampler::testing::DaemonProcess;
using ::tokensampler::testing::MakeRequest;
using ::tokensampler::testing::MetricSample;
using ::tokensampler::testing::ParsePrometheusText;
using ::tokensampler::testing::TestPki;
using ::tokensampler::testing::UniqueTempPath;
using ::tokensampler::testing::WaitFor;

v1::SampleRequest SmallRequest() {
  v1::SampleRequest request = MakeRequest({{1, 2, 3, 4}, {4, 3, 2, 1}});
  request.mutable_rows(0)->mutable_params()->set_temperature(0.0f);
  request.mutable_rows(1)->mutable_params()->set_temperature(0.0f);
  return request;
}

absl::Status SampleWith(const std::string& target, const ClientOptions& options) {
  absl::StatusOr<Client> client = Client::Create(target, options);
  if (!client.ok()) return client.status();
  absl::StatusOr<v1::SampleResponse> response = client->Sample(SmallRequest(), absl::Seconds(20));
  if (!response.ok()) return response.status();
  if (response->results_size() != 2 || response->results(0).token_id() != 3) {
    return absl::InternalError(absl::StrCat("unexpected response ", response->DebugString()));
  }
  return absl::OkStatus();
}

void ExpectServing(const Client& client, const std::string& service) {
  absl::StatusOr<bool> serving = client.Health(service, absl::Seconds(20));
  ASSERT_TRUE(serving.ok()) << client.target() << ": " << serving.status();
  EXPECT_TRUE(*serving) << client.target();
}

std::vector<std::string> LinesWith(const std::string& log, absl::string_view needle) {
  std::vector<std::string> lines;
  for (absl::string_view line : absl::StrSplit(log, '\n', absl::SkipEmpty())) {
    if (absl::StrContains(line, needle)) lines.emplace_back(line);
  }
  return lines;
}

class OperationsTest : public ::testing::Test {
 protected:
  void StartDaemon(const std::vector<std::string>& args, const std::vector<std::string>& env = {}) {
    absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon =
        DaemonProcess::Start(TOKENSAMPLERD_PATH, args, absl::Seconds(30), env);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
  }

  std::string SocketPath() {
    if (socket_path_.empty()) socket_path_ = UniqueTempPath("ops.sock");
    return socket_path_;
  }

  std::map<std::string, double> Scrape() {
    absl::StatusOr<std::string> text = tokensampler::testing::HttpGet(daemon_->metrics_address());
    EXPECT_TRUE(text.ok()) << text.status();
    absl::StatusOr<std::map<std::string, double>> samples = ParsePrometheusText(text.value_or(""));
    EXPECT_TRUE(samples.ok()) << samples.status();
    return samples.value_or(std::map<std::string, double>{});
  }

  void StopAndExpectExitZero() {
    absl::StatusOr<int> exit = daemon_->Stop(SIGTERM);
    ASSERT_TRUE(exit.ok()) << exit.status();
    EXPECT_EQ(*exit, 0) << daemon_->Stderr();
    EXPECT_THAT(daemon_->Stderr(), HasSubstr("event=stop"));
  }

  void TearDown() override {
    daemon_.reset();
    if (!socket_path_.empty()) std::remove(socket_path_.c_str());
  }

  std::unique_ptr<DaemonProcess> daemon_;
  std::string socket_path_;
};

// ---------------------------------------------------------------------------------------------
// Metrics and logs.

TEST_F(OperationsTest, MetricsEndpointIsScrapedAndParsedAfterTraffic) {
  StartDaemon({"--listen=127.0.0.1:0", "--threads=2", "--metrics_listen=127.0.0.1:0"});
  ASSERT_THAT(daemon_->metrics_address(), ::testing::StartsWith("127.0.0.1:"));
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(SampleWith(daemon_->addresses()[0], {}).ok());
  const std::map<std::string, double> samples = Scrape();
  const tokensampler::testing::Labels sample = {{"rpc", "Sample"}};
  EXPECT_THAT(MetricSample(samples, "tokensampler_requests_started_total", sample), Optional(5.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_requests_handled_total",
                           {{"rpc", "Sample"}, {"code", "OK"}}),
              Optional(5.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_rows_total", {{"rpc", "Sample"}, {"code", "OK"}}),
              Optional(10.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_request_bytes_total", sample),
              Optional(static_cast<double>(5 * SmallRequest().ByteSizeLong())));
  EXPECT_THAT(MetricSample(samples, "tokensampler_request_duration_seconds_count", sample),
              Optional(5.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_threads"), Optional(2.0));
  EXPECT_THAT(MetricSample(samples, "tokensampler_serving"), Optional(1.0));
  StopAndExpectExitZero();
  const std::string log = daemon_->Stderr();
  EXPECT_THAT(LinesWith(log, "event=listen"),
              ::testing::Contains(
                  AllOf(HasSubstr(daemon_->metrics_address()), HasSubstr("serves=metrics"))));
}

TEST_F(OperationsTest, ConfigIsLoggedOnceAtStartWithEveryFlag) {
  StartDaemon({"--listen=127.0.0.1:0", "--threads=1", "--drain_seconds=7"});
  StopAndExpectExitZero();
  const std::vector<std::string> config = LinesWith(daemon_->Stderr(), "event=config");
  ASSERT_EQ(config.size(), 1u) << daemon_->Stderr();
  for (const char* field :
       {"listen=127.0.0.1:0", "threads=1", "drain_seconds=7", "max_concurrent_requests=256",
        "max_inflight_bytes=1073741824", "metrics_listen=\"\"", "health_listen=\"\"",
        "tls_cert=\"\"", "auth_token_file=\"\"", "unix_socket_mode=0660", "log_level=info",
        "keepalive_time_seconds=60", "request_log_every=0", "from_env=\"\""}) {
    EXPECT_THAT(config[0], HasSubstr(field));
  }
  EXPECT_THAT(daemon_->Stderr(), HasSubstr("event=shutdown signal=SIGTERM drain_seconds=7"));
}

TEST_F(OperationsTest, LogLevelErrorHidesLifecycleAndClientErrors) {
  StartDaemon({"--listen=127.0.0.1:0", "--threads=1", "--log_level=error"});
  v1::SampleRequest bad = SmallRequest();
  bad.mutable_rows(0)->mutable_params()->set_top_p(3.0f);
  absl::StatusOr<Client> client = Client::Create(daemon_->addresses()[0]);
  ASSERT_TRUE(client.ok());
  EXPECT_EQ(client->Sample(bad, absl::Seconds(20)).status().code(),
            absl::StatusCode::kInvalidArgument);
  absl::StatusOr<int> exit = daemon_->Stop(SIGTERM);
  ASSERT_TRUE(exit.ok());
  EXPECT_EQ(*exit, 0);
  // Only errors would be logged; a client's bad request is a warning.
  const std::string log = daemon_->Stderr();
  EXPECT_THAT(log, AllOf(Not(HasSubstr("level=info")), Not(HasSubstr("level=warning"))));
}

// ---------------------------------------------------------------------------------------------
// Drain: SIGTERM during load.

TEST_F(OperationsTest, SigtermDuringLoadDrainsAndExitsZeroWithNoLostResponses) {
  StartDaemon({"--listen=127.0.0.1:0", "--threads=1", "--metrics_listen=127.0.0.1:0",
               "--health_listen=127.0.0.1:0", "--drain_seconds=60"});
  // Heavy calls (64 rows × 32000, typical_p: the slowest stage) on one thread.
  v1::SampleRequest heavy = MakeRequest(
      std::vector<std::vector<float>>(64, std::vector<float>(32000, 0.0f)), v1::DTYPE_BFLOAT16);
  for (int i = 0; i < 64; ++i) {
    v1::SamplingParams& params = *heavy.mutable_rows(i)->mutable_params();
    params.set_typical_p(0.9f);
    params.set_seed(static_cast<uint64_t>(i));
  }
  constexpr int kCalls = 6;
  struct Call {
    grpc::ClientContext context;
    v1::SampleResponse response;
    grpc::Status status;
    bool done = false;
  };
  auto stub =
      v1::Sampler::NewStub(tokensampler::testing::CreateTestChannel(daemon_->addresses()[0]));
  absl::Mutex mu;
  std::vector<std::unique_ptr<Call>> calls;
  for (int i = 0; i < kCalls; ++i) {
    calls.push_back(std::make_unique<Call>());
    Call& call = *calls.back();
    tokensampler::testing::SetDeadline(call.context, absl::Seconds(120));
    stub->async()->Sample(&call.context, &heavy, &call.response, [&mu, &call](grpc::Status s) {
      absl::MutexLock lock(&mu);
      call.status = std::move(s);
      call.done = true;
    });
  }
  // Every call has reached the server.
  ASSERT_TRUE(WaitFor([&] {
    return MetricSample(Scrape(), "tokensampler_requests_started_total", {{"rpc", "Sample"}}) ==
           kCalls;
  }));

  ASSERT_EQ(kill(daemon_->pid(), SIGTERM), 0);
  // Once the drain has begun, the health port never reports SERVING again (it answers
  // NOT_SERVING until the last call is answered, then closes).
  ASSERT_TRUE(WaitFor([&] { return absl::StrContains(daemon_->Stderr(), "event=drain "); }));
  const auto health_channel =
      tokensampler::testing::CreateTestChannel(daemon_->health_addresses()[0]);
  while (true) {
    {
      absl::MutexLock lock(&mu);
      bool all_done = true;
      for (const auto& call : calls) all_done &= call->done;
      if (all_done) break;
    }
    const std::optional<int> health = tokensampler::testing::HealthCheck(health_channel, "");
    EXPECT_NE(health, std::optional<int>(1));
    absl::SleepFor(absl::Milliseconds(5));
  }

  absl::StatusOr<int> exit = daemon_->Stop(SIGTERM, absl::Seconds(60));
  ASSERT_TRUE(exit.ok()) << exit.status();
  EXPECT_EQ(*exit, 0) << daemon_->Stderr();
  for (const auto& call : calls) {
    EXPECT_TRUE(call->status.ok()) << call->status.error_message();
    EXPECT_EQ(call->response.results_size(), 64);
  }
  const std::string log = daemon_->Stderr();
  EXPECT_THAT(LinesWith(log, "event=drained"),
              ::testing::ElementsAre(HasSubstr("calls_cancelled=0")));
  EXPECT_THAT(log, HasSubstr("event=stop"));
}

// ---------------------------------------------------------------------------------------------
// TLS, mutual TLS, bearer tokens.

class SecurityTest : public OperationsTest {
 protected:
  static void SetUpTestSuite() {
    absl::StatusOr<TestPki> pki = TestPki::Generate(UniqueTempPath("pki"));
    ASSERT_TRUE(pki.ok()) << pki.status();
    pki_ = new TestPki(*std::move(pki));
  }
  static void TearDownTestSuite() {
    pki_->Remove();
    delete pki_;
  }

  static ClientTlsOptions Tls(const std::string& ca, const std::string& cert = "",
                              const std::string& key = "") {
    ClientTlsOptions tls;
    tls.root_certs = TestPki::Pem(ca);
    if (!cert.empty()) tls.cert_chain = TestPki::Pem(cert);
    if (!key.empty()) tls.private_key = TestPki::Pem(key);
    return tls;
  }

  static TestPki* pki_;
};

TestPki* SecurityTest::pki_ = nullptr;

TEST_F(SecurityTest, TlsOnTcpWhileTheUnixSocketStaysPlaintext) {
  StartDaemon({"--listen=127.0.0.1:0", absl::StrCat("--listen=unix:", SocketPath()), "--threads=1",
               absl::StrCat("--tls_cert=", pki_->server_cert),
               absl::StrCat("--tls_key=", pki_->server_key)});
  const std::string& tcp = daemon_->addresses()[0];
  ClientOptions tls;
  tls.tls = Tls(pki_->ca_cert);
  EXPECT_TRUE(SampleWith(tcp, tls).ok());
  EXPECT_EQ(SampleWith(tcp, {}).code(), absl::StatusCode::kUnavailable);  // plaintext
  ClientOptions wrong_ca;
  wrong_ca.tls = Tls(pki_->other_ca_cert);
  EXPECT_EQ(SampleWith(tcp, wrong_ca).code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(SampleWith(daemon_->addresses()[1], {}).ok());
  StopAndExpectExitZero();
  EXPECT_THAT(LinesWith(daemon_->Stderr(), "event=listen"),
              ::testing::ElementsAre(AllOf(HasSubstr(tcp), HasSubstr("tls=true")),
                                     AllOf(HasSubstr("unix:"), HasSubstr("tls=false"))));
}

TEST_F(SecurityTest, MutualTlsRequiresAClientCertificateFromTheClientCa) {
  StartDaemon({"--listen=127.0.0.1:0", "--threads=1",
               absl::StrCat("--tls_cert=", pki_->server_cert),
               absl::StrCat("--tls_key=", pki_->server_key),
               absl::StrCat("--tls_client_ca=", pki_->ca_cert)});
  const std::string& tcp = daemon_->addresses()[0];
  ClientOptions with_cert;
  with_cert.tls = Tls(pki_->ca_cert, pki_->client_cert, pki_->client_key);
  EXPECT_TRUE(SampleWith(tcp, with_cert).ok());
  ClientOptions no_cert;
  no_cert.tls = Tls(pki_->ca_cert);
  EXPECT_EQ(SampleWith(tcp, no_cert).code(), absl::StatusCode::kUnavailable);
  ClientOptions foreign_cert;
  foreign_cert.tls = Tls(pki_->ca_cert, pki_->other_client_cert, pki_->other_client_key);
  EXPECT_EQ(SampleWith(tcp, foreign_cert).code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(SampleWith(tcp, with_cert).ok());  // still serving
  StopAndExpectExitZero();
  EXPECT_THAT(daemon_->Stderr(), HasSubstr("mutual_tls=true"));
}

TEST_F(SecurityTest, BearerTokenWrongOrMissingIsUnauthenticatedAndHealthIsExempt) {
  const std::string token_file = UniqueTempPath("tokens.txt");
  std::ofstream(token_file) << "\n  first-token  \nsecond-token\n";
  StartDaemon({"--listen=127.0.0.1:0", absl::StrCat("--listen=unix:", SocketPath()), "--threads=1",
               absl::StrCat("--tls_cert=", pki_->server_cert),
               absl::StrCat("--tls_key=", pki_->server_key),
               absl::StrCat("--auth_token_file=", token_file)});
  for (const std::string& target : daemon_->addresses()) {
    ClientOptions options;
    if (target == daemon_->addresses()[0]) options.tls = Tls(pki_->ca_cert);
    absl::Status missing = SampleWith(target, options);
    EXPECT_EQ(missing.code(), absl::StatusCode::kUnauthenticated) << target;
    EXPECT_THAT(missing.message(), HasSubstr("missing bearer token"));
    options.bearer_token = "third-token";
    absl::Status wrong = SampleWith(target, options);
    EXPECT_EQ(wrong.code(), absl::StatusCode::kUnauthenticated) << target;
    EXPECT_EQ(wrong.message(), "invalid bearer token");
    options.bearer_token = "second-token";
    EXPECT_TRUE(SampleWith(target, options).ok()) << target;
    options.bearer_token = "first-token";
    EXPECT_TRUE(SampleWith(target, options).ok()) << target;

    options.bearer_token.clear();
    absl::StatusOr<Client> client = Client::Create(target, options);
    ASSERT_TRUE(client.ok());
    ExpectServing(*client, "");
  }
  StopAndExpectExitZero();
  const std::string log = daemon_->Stderr();
  EXPECT_THAT(log, AllOf(HasSubstr("auth=true"), Not(HasSubstr("event=insecure_auth")),
                         Not(HasSubstr("first-token")), Not(HasSubstr("second-token"))));
  EXPECT_EQ(LinesWith(log, "code=UNAUTHENTICATED").size(), 4u);
  std::remove(token_file.c_str());
}

TEST_F(OperationsTest, TokensOverPlaintextTcpAreWarnedAbout) {
  const std::string token_file = UniqueTempPath("token.txt");
  std::ofstream(token_file) << "t0ken\n";
  StartDaemon(
      {"--listen=127.0.0.1:0", "--threads=1", absl::StrCat("--auth_token_file=", token_file)});
  ClientOptions options;
  options.bearer_token = "t0ken";
  EXPECT_TRUE(SampleWith(daemon_->addresses()[0], options).ok());
  StopAndExpectExitZero();
  EXPECT_THAT(LinesWith(daemon_->Stderr(), "event=insecure_auth"),
              ::testing::ElementsAre(HasSubstr("level=warning")));
  std::remove(token_file.c_str());
}

// ---------------------------------------------------------------------------------------------
// Listeners and configuration.

TEST_F(OperationsTest, HealthPortServesProbesNextToAUnixSocketDataListener) {
  StartDaemon(
      {absl::StrCat("--listen=unix:", SocketPath()), "--health_listen=127.0.0.1:0", "--threads=1"});
  ASSERT_EQ(daemon_->health_addresses().size(), 1u);
  const std::string& health = daemon_->health_addresses()[0];
  absl::StatusOr<Client> probe = Client::Create(health);
  ASSERT_TRUE(probe.ok());
  ExpectServing(*probe, "");
  ExpectServing(*probe, "tokensampler.v1.Sampler");
  const absl::Status on_health_port = SampleWith(health, {});
  EXPECT_EQ(on_health_port.code(), absl::StatusCode::kUnimplemented);
  EXPECT_TRUE(SampleWith(daemon_->addresses()[0], {}).ok());
  StopAndExpectExitZero();
  EXPECT_THAT(LinesWith(daemon_->Stderr(), "event=listen"),
              ::testing::Contains(AllOf(HasSubstr(health), HasSubstr("serves=health"))));
}

TEST_F(OperationsTest, UnixSocketModeDefaultsTo0660AndFollowsTheFlag) {
  for (const auto& [flag, mode] : {std::pair<std::string, unsigned>{"", 0660},
                                   {"--unix_socket_mode=0600", 0600},
                                   {"--unix_socket_mode=666", 0666}}) {
    std::vector<std::string> args = {absl::StrCat("--listen=unix:", SocketPath()), "--threads=1"};
    if (!flag.empty()) args.push_back(flag);
    StartDaemon(args);
    struct stat info {};
    ASSERT_EQ(stat(SocketPath().c_str(), &info), 0);
    EXPECT_EQ(info.st_mode & 0777, mode) << flag;
    StopAndExpectExitZero();
  }
}

TEST_F(OperationsTest, EveryFlagCanComeFromTheEnvironmentAndTheCommandLineWins) {
  StartDaemon({"--listen=127.0.0.1:0", "--threads=2"},
              {"TOKENSAMPLER_THREADS=3", "TOKENSAMPLER_METRICS_LISTEN=127.0.0.1:0",
               "TOKENSAMPLER_MAX_CONCURRENT_REQUESTS=7", "TOKENSAMPLER_DRAIN_SECONDS=4",
               "TOKENSAMPLER_KEEPALIVE_PERMIT_WITHOUT_CALLS=true"});
  ASSERT_FALSE(daemon_->metrics_address().empty());  // from the environment
  EXPECT_THAT(MetricSample(Scrape(), "tokensampler_threads"), Optional(2.0));  // the flag won
  StopAndExpectExitZero();
  const std::string log = daemon_->Stderr();
  const std::vector<std::string> config = LinesWith(log, "event=config");
  ASSERT_EQ(config.size(), 1u);
  EXPECT_THAT(config[0],
              AllOf(HasSubstr("threads=2"), HasSubstr("max_concurrent_requests=7"),
                    HasSubstr("drain_seconds=4"), HasSubstr("keepalive_permit_without_calls=true"),
                    HasSubstr("from_env=TOKENSAMPLER_DRAIN_SECONDS,"
                              "TOKENSAMPLER_KEEPALIVE_PERMIT_WITHOUT_CALLS,"
                              "TOKENSAMPLER_MAX_CONCURRENT_REQUESTS,"
                              "TOKENSAMPLER_METRICS_LISTEN")));
  EXPECT_THAT(log, AllOf(HasSubstr("threads=2 "), HasSubstr("max_concurrent_requests=7"),
                         HasSubstr("event=shutdown signal=SIGTERM drain_seconds=4")));
}

TEST(OperationsStartupTest, BadEnvironmentValueExitsWithOneNamingTheVariable) {
  std::string log;
  absl::StatusOr<int> exit =
      DaemonProcess::RunToExit(TOKENSAMPLERD_PATH, {"--listen=127.0.0.1:0"}, &log,
                               absl::Seconds(30), {"TOKENSAMPLER_THREADS=many"});
  ASSERT_TRUE(exit.ok()) << exit.status();
  EXPECT_EQ(*exit, 1) << log;
  EXPECT_THAT(
      log, AllOf(HasSubstr("event=error"), HasSubstr("TOKENSAMPLER_THREADS"), HasSubstr("many")));
}

TEST(OperationsStartupTest, BadOperationalFlagsExitWithOneNamingTheFlag) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--max_concurrent_requests=-1", "--max_concurrent_requests must be >= 0"},
      {"--max_inflight_bytes=-5", "--max_inflight_bytes must be >= 0"},
      {"--drain_seconds=-1", "--drain_seconds must be >= 0"},
      {"--request_log_every=-2", "--request_log_every must be >= 0"},
      {"--unix_socket_mode=0999", "--unix_socket_mode must be octal"},
      {"--unix_socket_mode=1777", "--unix_socket_mode must be octal"},
      {"--log_level=loud", "log level must be one of debug, info, warning, error"},
      {"--keepalive_time_seconds=0", "--keepalive_time_seconds must be in [1, "},
      {"--keepalive_min_time_seconds=-1", "--keepalive_min_time_seconds must be in [0, "},
      {"--tls_cert=/nonexistent/cert.pem", "--tls_cert and --tls_key must be given together"},
      {"--tls_client_ca=/nonexistent/ca.pem", "--tls_client_ca (mutual TLS) needs --tls_cert"},
      {"--auth_token_file=/nonexistent/tokens", "--auth_token_file: cannot read"},
      {"--metrics_listen=unix:/tmp/m.sock", "metrics_listen_address must be host:port"},
  };
  for (const auto& [flag, message] : cases) {
    std::string log;
    absl::StatusOr<int> exit =
        DaemonProcess::RunToExit(TOKENSAMPLERD_PATH, {"--listen=127.0.0.1:0", flag}, &log);
    ASSERT_TRUE(exit.ok()) << exit.status();
    EXPECT_EQ(*exit, 1) << flag << "\n" << log;
    EXPECT_THAT(log, AllOf(HasSubstr("event=error"), HasSubstr(message))) << flag;
  }
  // Unreadable or invalid certificate files.
  std::string log;
  absl::StatusOr<int> exit = DaemonProcess::RunToExit(
      TOKENSAMPLERD_PATH,
      {"--listen=127.0.0.1:0", "--tls_cert=/nonexistent/c.pem", "--tls_key=/nonexistent/k.pem"},
      &log);
  ASSERT_TRUE(exit.ok());
  EXPECT_EQ(*exit, 1);
  EXPECT_THAT(log, HasSubstr("--tls_cert: cannot read /nonexistent/c.pem"));
  const std::string not_pem = UniqueTempPath("not.pem");
  std::ofstream(not_pem) << "hello";
  exit = DaemonProcess::RunToExit(TOKENSAMPLERD_PATH,
                                  {"--listen=127.0.0.1:0", absl::StrCat("--tls_cert=", not_pem),
                                   absl::StrCat("--tls_key=", not_pem)},
                                  &log);
  ASSERT_TRUE(exit.ok());
  EXPECT_EQ(*exit, 1);
  EXPECT_THAT(log, HasSubstr("tls: the certificate chain is not PEM"));
  std::remove(not_pem.c_str());
}

}  // namespace
}  // namespace tokensampler
