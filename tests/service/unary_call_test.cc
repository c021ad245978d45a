// StartUnaryCall with work that runs until it is told to stop: a call already running on a
// sampling thread sees its cancellation flag set when the client cancels or the deadline
// passes, and its work returns (core's Sampler::Run checks the same flag between rows; see
// tests/core). The service below is a test harness around the real StartUnaryCall, CallGuard,
// Metrics and arena, served by a real in-process gRPC server.
#include "service/unary_call.h"

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/call_guard.h"
#include "service/metrics.h"
#include "tests/testing/operations_testing.h"
#include "tests/testing/service_testing.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::service {
namespace {

using ::tokensampler::testing::SetDeadline;

// Sample's work: announces that it runs, then waits (≤ 60 s) for its cancellation flag.
class StopWhenToldService final : public v1::Sampler::CallbackService {
 public:
  StopWhenToldService(tbb::task_arena& arena, CallGuard& guard, Metrics& metrics)
      : arena_(arena), guard_(guard), rpc_(metrics.ForRpc("Sample")) {}

  grpc::ServerUnaryReactor* Sample(grpc::CallbackServerContext* context,
                                   const v1::SampleRequest* request,
                                   v1::SampleResponse* /*response*/) override {
    return StartUnaryCall(context, guard_, arena_, rpc_,
                          static_cast<int64_t>(request->ByteSizeLong()), request->rows_size(),
                          [this](const std::atomic<bool>& cancelled) {
                            running_.Notify();
                            const absl::Time give_up = absl::Now() + absl::Seconds(60);
                            while (!cancelled.load() && absl::Now() < give_up) {
                              absl::SleepFor(absl::Milliseconds(1));
                            }
                            saw_cancel_ = cancelled.load();
                            returned_.Notify();
                            return absl::CancelledError("stopped");
                          });
  }

  absl::Notification running_;
  absl::Notification returned_;
  std::atomic<bool> saw_cancel_{false};

 private:
  tbb::task_arena& arena_;
  CallGuard& guard_;
  RpcMetrics& rpc_;
};

class UnaryCallTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    stub_ = v1::Sampler::NewStub(server_->InProcessChannel(grpc::ChannelArguments()));
  }

  void TearDown() override { server_->Shutdown(absl::ToChronoTime(absl::Now())); }

  double Metric(absl::string_view code) {
    const auto samples = tokensampler::testing::ParsePrometheusText(metrics_.TextFormat());
    EXPECT_TRUE(samples.ok());
    return tokensampler::testing::MetricSample(*samples, "tokensampler_requests_handled_total",
                                               {{"rpc", "Sample"}, {"code", std::string(code)}})
        .value_or(0);
  }

  tbb::task_arena arena_{1, 0};
  Metrics metrics_{"test", 1};
  CallGuard guard_{CallGuardOptions{}, metrics_, nullptr};
  StopWhenToldService service_{arena_, guard_, metrics_};
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<v1::Sampler::Stub> stub_;
};

TEST_F(UnaryCallTest, RunningWorkStopsWhenTheDeadlinePasses) {
  grpc::ClientContext context;
  SetDeadline(context, absl::Milliseconds(300));
  v1::SampleResponse response;
  const grpc::Status status = stub_->Sample(&context, v1::SampleRequest(), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  ASSERT_TRUE(service_.returned_.WaitForNotificationWithTimeout(absl::Seconds(60)));
  EXPECT_TRUE(service_.saw_cancel_.load());
  ASSERT_TRUE(tokensampler::testing::WaitFor([&] { return guard_.open_calls() == 0; }));
  EXPECT_EQ(Metric("DEADLINE_EXCEEDED"), 1);
}

TEST_F(UnaryCallTest, RunningWorkStopsWhenTheClientCancels) {
  grpc::ClientContext context;
  SetDeadline(context);
  v1::SampleRequest request;
  v1::SampleResponse response;
  absl::Notification done;
  grpc::Status status;
  stub_->async()->Sample(&context, &request, &response, [&](grpc::Status s) {
    status = std::move(s);
    done.Notify();
  });
  ASSERT_TRUE(service_.running_.WaitForNotificationWithTimeout(absl::Seconds(60)));
  context.TryCancel();
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(60)));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
  ASSERT_TRUE(service_.returned_.WaitForNotificationWithTimeout(absl::Seconds(60)));
  EXPECT_TRUE(service_.saw_cancel_.load());
  ASSERT_TRUE(tokensampler::testing::WaitFor([&] { return guard_.open_calls() == 0; }));
  EXPECT_EQ(Metric("CANCELLED"), 1);
}

// A call refused before any work (here: draining) is answered at once; when the client cancels
// it before that answer is sent, gRPC still calls OnCancel. The refused call has nothing left to
// answer or account; tokensamplerd used to answer it again from an empty request (SIGSEGV, seen
// at shutdown in FaultTest). Many refused calls, each cancelled at once, race the two.
TEST_F(UnaryCallTest, RefusedCallsCancelledBeforeTheirAnswerIsSentAreAnsweredOnce) {
  guard_.StartDrain();
  constexpr int kCalls = 2000;
  struct Pending {
    grpc::ClientContext context;
    v1::SampleResponse response;
    grpc::Status status;
    absl::Notification done;
  };
  std::vector<std::unique_ptr<Pending>> pending;
  v1::SampleRequest request;
  for (int i = 0; i < kCalls; ++i) {
    auto& call = *pending.emplace_back(std::make_unique<Pending>());
    SetDeadline(call.context);
    stub_->async()->Sample(&call.context, &request, &call.response, [&call](grpc::Status s) {
      call.status = std::move(s);
      call.done.Notify();
    });
    call.context.TryCancel();
  }
  int unavailable = 0;
  for (auto& call : pending) {
    ASSERT_TRUE(call->done.WaitForNotificationWithTimeout(absl::Seconds(60)));
    const grpc::StatusCode code = call->status.error_code();
    EXPECT_TRUE(code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::CANCELLED)
        << code;
    unavailable += code == grpc::StatusCode::UNAVAILABLE;
  }
  ASSERT_TRUE(tokensampler::testing::WaitFor([&] { return guard_.open_calls() == 0; }));
  // Every call the server saw was answered and counted once, as UNAVAILABLE (gRPC aborts on a
  // second Finish; a second count would show as CANCELLED).
  EXPECT_GE(Metric("UNAVAILABLE"), unavailable);
  EXPECT_LE(Metric("UNAVAILABLE"), kCalls);
  EXPECT_EQ(Metric("CANCELLED"), 0);
  std::printf("refused calls cancelled: %d answered UNAVAILABLE, %d cancelled first\n", unavailable,
              kCalls - unavailable);
}

}  // namespace
}  // namespace tokensampler::service
