// A gtest fixture with a real tokensampler Server started in-process and a stub on its
// in-process channel (real gRPC, no socket), for the service tests of Session, Verify and beam
// search. Needs tokensampler::service.
#ifndef TOKENSAMPLER_TESTS_TESTING_IN_PROCESS_SERVER_H_
#define TOKENSAMPLER_TESTS_TESTING_IN_PROCESS_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "service/server.h"
#include "tests/testing/service_testing.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::testing {

class InProcessServerTest : public ::testing::Test {
 protected:
  void SetUp() override { StartServer(service::ServerOptions{}); }

  void TearDown() override {
    if (server_ != nullptr) server_->Shutdown(absl::Now() + absl::Seconds(5));
  }

  // (Re)starts the server with `options` (2 threads) and points stub_ at it.
  void StartServer(service::ServerOptions options) {
    if (server_ != nullptr) server_->Shutdown(absl::Now() + absl::Seconds(5));
    options.threads = 2;
    absl::StatusOr<std::unique_ptr<service::Server>> server = service::Server::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    stub_ = v1::Sampler::NewStub(server_->InProcessChannel(args));
  }

  v1::SampleResponse SampleOk(const v1::SampleRequest& request) {
    grpc::ClientContext context;
    SetDeadline(context);
    v1::SampleResponse response;
    const grpc::Status status = stub_->Sample(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_code() << ": " << status.error_message();
    return response;
  }

  std::unique_ptr<service::Server> server_;
  std::unique_ptr<v1::Sampler::Stub> stub_;
};

}  // namespace tokensampler::testing

#endif  // TOKENSAMPLER_TESTS_TESTING_IN_PROCESS_SERVER_H_
