// Integration: the real tokensamplerd binary, started as a child process on 127.0.0.1:0 and on a
// temporary Unix socket, called over the network, stopped with SIGTERM / SIGINT.
//
// Layout: DaemonTest starts a daemon per test and hands out its addresses; each client kind has
// its own section below (raw generated stubs here; the CLI and the C++ client library add theirs
// with their own TEST_Fs on the same fixture).
#include <signal.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_process.h"
#include "tests/testing/service_testing.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

#ifndef TOKENSAMPLERD_PATH
#error "TOKENSAMPLERD_PATH must name the tokensamplerd binary"
#endif

namespace tokensampler {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::StartsWith;
using ::tokensampler::testing::CreateTestChannel;
using ::tokensampler::testing::DaemonProcess;
using ::tokensampler::testing::MakeRequest;
using ::tokensampler::testing::SetDeadline;
using ::tokensampler::testing::UniqueTempPath;

class DaemonTest : public ::testing::Test {
 protected:
  // Starts tokensamplerd with `args`; fails the test if it does not serve.
  void StartDaemon(const std::vector<std::string>& args) {
    absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon =
        DaemonProcess::Start(TOKENSAMPLERD_PATH, args);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
  }

  // Starts tokensamplerd on 127.0.0.1:0 and a fresh Unix socket (in this order).
  void StartOnTcpAndUnix(std::vector<std::string> extra_args = {}) {
    socket_path_ = UniqueTempPath("d.sock");
    std::vector<std::string> args = {"--listen=127.0.0.1:0",
                                     absl::StrCat("--listen=unix:", socket_path_), "--threads=2"};
    args.insert(args.end(), extra_args.begin(), extra_args.end());
    StartDaemon(args);
    ASSERT_EQ(daemon_->addresses().size(), 2u);
  }

  const std::string& tcp_address() const { return daemon_->addresses()[0]; }
  const std::string& unix_address() const { return daemon_->addresses()[1]; }

  // SIGTERM (or `signal`), then expects a clean exit 0 and the lifecycle log lines.
  void StopAndExpectCleanExit(int signal = SIGTERM) {
    absl::StatusOr<int> exit = daemon_->Stop(signal);
    ASSERT_TRUE(exit.ok()) << exit.status();
    const std::string log = daemon_->Stderr();
    EXPECT_EQ(*exit, 0) << log;
    EXPECT_THAT(log, HasSubstr("event=start"));
    for (const std::string& address : daemon_->addresses()) {
      EXPECT_THAT(log, HasSubstr(absl::StrCat("event=listen address=", address)));
    }
    EXPECT_THAT(log, HasSubstr(absl::StrCat("event=shutdown signal=",
                                            signal == SIGTERM ? "SIGTERM" : "SIGINT")));
    EXPECT_THAT(log, HasSubstr("event=stop"));
  }

  // A daemon that failed or was killed leaves its socket file behind.
  void TearDown() override {
    daemon_.reset();
    if (!socket_path_.empty()) std::remove(socket_path_.c_str());
  }

  std::unique_ptr<DaemonProcess> daemon_;
  std::string socket_path_;
};

// ---------------------------------------------------------------------------------------------
// Raw generated stubs.

// One greedy row over [1, 2, 3, 4] and one seeded row, with raw logprobs.
v1::SampleRequest SmallRequest() {
  v1::SampleRequest request = MakeRequest({{1, 2, 3, 4}, {4, 3, 2, 1}});
  request.mutable_rows(0)->mutable_params()->set_temperature(0.0f);
  request.mutable_rows(0)->mutable_params()->set_logprobs(1);
  request.mutable_rows(1)->mutable_params()->set_seed(42);
  return request;
}

grpc::Status CallSample(const std::string& address, const v1::SampleRequest& request,
                        v1::SampleResponse* response) {
  auto stub = v1::Sampler::NewStub(CreateTestChannel(address));
  grpc::ClientContext context;
  SetDeadline(context);
  return stub->Sample(&context, request, response);
}

void ExpectSmallResponse(const std::string& address) {
  v1::SampleResponse response;
  const grpc::Status status = CallSample(address, SmallRequest(), &response);
  ASSERT_TRUE(status.ok()) << address << ": " << status.error_message();
  ASSERT_EQ(response.results_size(), 2);
  EXPECT_EQ(response.results(0).token_id(), 3);
  EXPECT_NEAR(response.results(0).logprob(), 4.0 - tokensampler::testing::LogSumExp({1, 2, 3, 4}),
              1e-5);
  EXPECT_EQ(response.results(1).row_index(), 1u);
}

TEST_F(DaemonTest, ServesOnTcpPortZeroAndUnixSocketThenStopsOnSigterm) {
  StartOnTcpAndUnix();
  EXPECT_THAT(tcp_address(), StartsWith("127.0.0.1:"));
  EXPECT_NE(tcp_address(), "127.0.0.1:0");
  EXPECT_EQ(unix_address(), absl::StrCat("unix:", socket_path_));
  ExpectSmallResponse(tcp_address());
  ExpectSmallResponse(unix_address());

  // The same seeded row gives the same token over either transport.
  v1::SampleResponse over_tcp;
  v1::SampleResponse over_unix;
  ASSERT_TRUE(CallSample(tcp_address(), SmallRequest(), &over_tcp).ok());
  ASSERT_TRUE(CallSample(unix_address(), SmallRequest(), &over_unix).ok());
  EXPECT_EQ(over_tcp.results(1).token_id(), over_unix.results(1).token_id());

  StopAndExpectCleanExit(SIGTERM);
}

TEST_F(DaemonTest, CommaSeparatedListenIsTheSameAsRepeated) {
  socket_path_ = UniqueTempPath("c.sock");
  StartDaemon({absl::StrCat("--listen=127.0.0.1:0,unix:", socket_path_), "--threads=1"});
  ASSERT_EQ(daemon_->addresses().size(), 2u);
  ExpectSmallResponse(daemon_->addresses()[0]);
  ExpectSmallResponse(daemon_->addresses()[1]);
  StopAndExpectCleanExit(SIGTERM);
}

TEST_F(DaemonTest, SigintAlsoStopsGracefully) {
  StartDaemon({"--listen=127.0.0.1:0"});
  ExpectSmallResponse(daemon_->addresses()[0]);
  StopAndExpectCleanExit(SIGINT);
}

TEST_F(DaemonTest, InvalidArgumentOverTheNetworkAndServerKeepsServing) {
  StartOnTcpAndUnix();
  v1::SampleRequest bad = SmallRequest();
  bad.mutable_rows(1)->mutable_params()->set_top_p(1.5f);
  v1::SampleResponse response;
  const grpc::Status status = CallSample(tcp_address(), bad, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(status.error_message(), "rows[1].params.top_p must be in (0, 1], got 1.5");
  ExpectSmallResponse(tcp_address());
  StopAndExpectCleanExit();
}

TEST_F(DaemonTest, MaxMessageBytesFlagGivesResourceExhausted) {
  StartOnTcpAndUnix({"--max_message_bytes=65536"});
  const v1::SampleRequest big = MakeRequest({std::vector<float>(32 * 1024, 0.25f)});
  for (const std::string& address : daemon_->addresses()) {
    v1::SampleResponse response;
    const grpc::Status status = CallSample(address, big, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
        << address << ": " << status.error_message();
    ExpectSmallResponse(address);
  }
  StopAndExpectCleanExit();
}

TEST_F(DaemonTest, HealthAndReflectionAreServed) {
  StartOnTcpAndUnix();
  for (const std::string& address : daemon_->addresses()) {
    const auto channel = CreateTestChannel(address);
    grpc::Status status;
    EXPECT_EQ(tokensampler::testing::HealthCheck(channel, "", &status), 1)
        << address << ": " << status.error_message();
    EXPECT_EQ(tokensampler::testing::HealthCheck(channel, "tokensampler.v1.Sampler", &status), 1)
        << address << ": " << status.error_message();
    const std::optional<std::string> services =
        tokensampler::testing::ReflectionListServices(channel);
    ASSERT_TRUE(services.has_value()) << address;
    EXPECT_THAT(*services, HasSubstr("tokensampler.v1.Sampler"));
  }
  StopAndExpectCleanExit();
}

// ---------------------------------------------------------------------------------------------
// Start-up failures exit non-zero with a log line, without serving.

TEST(DaemonStartupTest, BadFlagValuesExitWithOne) {
  for (const std::vector<std::string>& args :
       std::vector<std::vector<std::string>>{{"--listen=127.0.0.1:0", "--max_message_bytes=0"},
                                             {"--listen=127.0.0.1:0", "--threads=-1"},
                                             {"--listen=127.0.0.1:0", "--drain_seconds=-1"},
                                             {"--listen="}}) {
    std::string log;
    absl::StatusOr<int> exit = DaemonProcess::RunToExit(TOKENSAMPLERD_PATH, args, &log);
    ASSERT_TRUE(exit.ok()) << exit.status();
    EXPECT_EQ(*exit, 1) << args.back() << "\n" << log;
    EXPECT_THAT(log, HasSubstr("event=error")) << args.back();
  }
}

TEST(DaemonStartupTest, BusyPortExitsWithOne) {
  absl::StatusOr<std::unique_ptr<DaemonProcess>> first =
      DaemonProcess::Start(TOKENSAMPLERD_PATH, {"--listen=127.0.0.1:0", "--threads=1"});
  ASSERT_TRUE(first.ok()) << first.status();
  std::string log;
  absl::StatusOr<int> exit = DaemonProcess::RunToExit(
      TOKENSAMPLERD_PATH, {absl::StrCat("--listen=", (*first)->addresses()[0])}, &log);
  ASSERT_TRUE(exit.ok()) << exit.status();
  EXPECT_EQ(*exit, 1) << log;
  EXPECT_THAT(log, AllOf(HasSubstr("event=error"), HasSubstr((*first)->addresses()[0])));
  absl::StatusOr<int> first_exit = (*first)->Stop();
  ASSERT_TRUE(first_exit.ok()) << first_exit.status();
  EXPECT_EQ(*first_exit, 0);
}

}  // namespace
}  // namespace tokensampler
