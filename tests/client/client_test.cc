// The client library without a tokensampler server: status mapping, target validation, local
// failures, and Health() against a plain gRPC server running gRPC's own health service (which
// proves our copy of the grpc.health.v1 messages is wire-compatible).
#include "client/client.h"

#include <grpc/grpc.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "client/logits.h"
#include "gmock/gmock.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"

namespace tokensampler {
namespace {

// gRPC stays initialised for the whole test process. Otherwise each test's last channel shuts it
// down, and after a request large enough to fill the socket gRPC 1.51's shutdown waits out the
// 10-second sleep of the poller that finished the write (a test then takes 10 s longer).
const bool kGrpcKept = [] {
  grpc_init();
  return true;
}();

using ::testing::HasSubstr;

TEST(FromGrpcStatusTest, OkIsOk) { EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok()); }

TEST(FromGrpcStatusTest, KeepsEveryCanonicalCodeAndMessage) {
  for (int code = 1; code <= 16; ++code) {
    const absl::Status status = FromGrpcStatus(
        grpc::Status(static_cast<grpc::StatusCode>(code), absl::StrCat("message ", code)));
    EXPECT_EQ(static_cast<int>(status.code()), code);
    EXPECT_EQ(status.message(), absl::StrCat("message ", code));
  }
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "x")).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "x")).code(),
            absl::StatusCode::kResourceExhausted);
}

TEST(FromGrpcStatusTest, UnknownCodeBecomesUnknown) {
  // A code from a newer peer (volatile: not a constant). 20, not e.g. 42: grpc::StatusCode's
  // values span -32..31 (it has DO_NOT_USE = -1), and casting a number outside that is
  // undefined behaviour (UBSan's -fsanitize=enum); gRPC itself maps larger wire codes to UNKNOWN.
  volatile int wire_code = 20;
  const absl::Status status =
      FromGrpcStatus(grpc::Status(static_cast<grpc::StatusCode>(wire_code), "m"));
  EXPECT_EQ(status.code(), absl::StatusCode::kUnknown);
  EXPECT_EQ(status.message(), "m");
}

TEST(ClientCreateTest, RejectsEmptyTargets) {
  for (const char* target : {"", "unix:", "unix://"}) {
    absl::StatusOr<Client> client = Client::Create(target);
    EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument) << target;
    EXPECT_THAT(client.status().message(), HasSubstr("host:port or unix:/path")) << target;
  }
}

TEST(ClientCreateTest, AcceptsTcpAndUnixTargetsWithoutConnecting) {
  for (const char* target : {"127.0.0.1:50051", "localhost:1", "[::1]:50051",
                             "unix:/nonexistent/ts.sock", "dns:///localhost:50051"}) {
    absl::StatusOr<Client> client = Client::Create(target);
    ASSERT_TRUE(client.ok()) << target << ": " << client.status();
    EXPECT_EQ(client->target(), target);
  }
}

TEST(ClientCreateTest, RejectsHalfAClientCertificateAndUnsendableTokens) {
  ClientOptions cert_only;
  cert_only.tls.emplace().cert_chain = "-----BEGIN CERTIFICATE-----";
  absl::StatusOr<Client> client = Client::Create("127.0.0.1:1", cert_only);
  EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(client.status().message(), HasSubstr("must be given together"));
  for (const char* token : {"two\nlines", "tab\there", "caf\xc3\xa9"}) {
    ClientOptions options;
    options.bearer_token = token;
    client = Client::Create("127.0.0.1:1", options);
    EXPECT_EQ(client.status().code(), absl::StatusCode::kInvalidArgument) << token;
    EXPECT_THAT(client.status().message(), HasSubstr("bearer_token must be printable ASCII"));
  }
  ClientOptions fine;
  fine.tls.emplace();  // the system's roots
  fine.bearer_token = "abc.DEF-123_~+/=";
  EXPECT_TRUE(Client::Create("127.0.0.1:1", fine).ok());
}

// A Unix socket path nobody listens on: connecting fails at once, no port races.
std::string DeadSocket() {
  return absl::StrCat("unix:", ::testing::TempDir(), "/tokensampler_client_test_dead.sock");
}

v1::SampleRequest SmallRequest(int vocab = 4) {
  v1::SampleRequest request;
  std::vector<float> values(static_cast<size_t>(vocab), 0.0f);
  *request.mutable_logits() = *MakeLogits(values, static_cast<uint32_t>(vocab), v1::DTYPE_FLOAT32);
  request.add_rows();
  return request;
}

TEST(ClientSampleTest, UnreachableServerIsUnavailable) {
  absl::StatusOr<Client> client = Client::Create(DeadSocket());
  ASSERT_TRUE(client.ok());
  absl::StatusOr<v1::SampleResponse> response = client->Sample(SmallRequest(), absl::Seconds(10));
  EXPECT_EQ(response.status().code(), absl::StatusCode::kUnavailable) << response.status();
}

TEST(ClientSampleTest, WaitForReadyWaitsUntilTheDeadline) {
  ClientOptions options;
  options.wait_for_ready = true;
  absl::StatusOr<Client> client = Client::Create(DeadSocket(), options);
  ASSERT_TRUE(client.ok());
  absl::StatusOr<v1::SampleResponse> response =
      client->Sample(SmallRequest(), absl::Milliseconds(200));
  EXPECT_EQ(response.status().code(), absl::StatusCode::kDeadlineExceeded) << response.status();
}

// A gRPC server on a Unix socket with gRPC's built-in health service and the generated Sampler
// base class, whose methods all answer UNIMPLEMENTED (no tokensampler code involved).
class GrpcOnlyServer {
 public:
  // `sampler` replaces the UNIMPLEMENTED Sampler; it must outlive the server.
  explicit GrpcOnlyServer(v1::Sampler::Service* sampler = nullptr) {
    address_ = absl::StrCat("unix:", ::testing::TempDir(), "/tokensampler_client_test_", ::getpid(),
                            ".sock");
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    builder.AddListeningPort(address_, grpc::InsecureServerCredentials());
    builder.RegisterService(sampler != nullptr ? sampler : &unimplemented_sampler_);
    builder.SetMaxReceiveMessageSize(64 << 20);
    server_ = builder.BuildAndStart();
    if (server_ == nullptr) ADD_FAILURE() << "cannot start a gRPC server on " << address_;
  }
  ~GrpcOnlyServer() {
    if (server_ != nullptr) server_->Shutdown();
  }

  bool started() const { return server_ != nullptr; }
  const std::string& address() const { return address_; }
  // REQUIRES: the server started (the constructor reports a failure).
  grpc::Server& server() { return *server_; }

 private:
  std::string address_;
  v1::Sampler::Service unimplemented_sampler_;
  std::unique_ptr<grpc::Server> server_;
};

TEST(ClientHealthTest, ReadsServingStatusFromGrpcHealthService) {
  GrpcOnlyServer server;
  ASSERT_TRUE(server.started());
  ASSERT_NE(server.server().GetHealthCheckService(), nullptr);
  server.server().GetHealthCheckService()->SetServingStatus("tokensampler.v1.Sampler", true);
  absl::StatusOr<Client> client = Client::Create(server.address());
  ASSERT_TRUE(client.ok());

  absl::StatusOr<bool> overall = client->Health("", absl::Seconds(10));
  ASSERT_TRUE(overall.ok()) << overall.status();
  EXPECT_TRUE(*overall);
  absl::StatusOr<bool> sampler = client->Health("tokensampler.v1.Sampler", absl::Seconds(10));
  ASSERT_TRUE(sampler.ok()) << sampler.status();
  EXPECT_TRUE(*sampler);

  server.server().GetHealthCheckService()->SetServingStatus("tokensampler.v1.Sampler", false);
  sampler = client->Health("tokensampler.v1.Sampler", absl::Seconds(10));
  ASSERT_TRUE(sampler.ok()) << sampler.status();
  EXPECT_FALSE(*sampler);

  server.server().GetHealthCheckService()->SetServingStatus(false);  // what shutdown does
  overall = client->Health("", absl::Seconds(10));
  ASSERT_TRUE(overall.ok()) << overall.status();
  EXPECT_FALSE(*overall);
}

TEST(ClientHealthTest, UnknownServiceIsNotFound) {
  GrpcOnlyServer server;
  ASSERT_TRUE(server.started());
  absl::StatusOr<Client> client = Client::Create(server.address());
  ASSERT_TRUE(client.ok());
  absl::StatusOr<bool> serving = client->Health("no.such.Service", absl::Seconds(10));
  EXPECT_EQ(serving.status().code(), absl::StatusCode::kNotFound) << serving.status();
}

TEST(ClientHealthTest, SampleOnAServerWithoutTheSamplerIsUnimplemented) {
  GrpcOnlyServer server;
  ASSERT_TRUE(server.started());
  absl::StatusOr<Client> client = Client::Create(server.address());
  ASSERT_TRUE(client.ok());
  absl::StatusOr<v1::SampleResponse> response = client->Sample(SmallRequest(), absl::Seconds(10));
  EXPECT_EQ(response.status().code(), absl::StatusCode::kUnimplemented) << response.status();
}

TEST(ClientHealthTest, UnreachableServerIsUnavailable) {
  absl::StatusOr<Client> client = Client::Create(DeadSocket());
  ASSERT_TRUE(client.ok());
  absl::StatusOr<bool> serving = client->Health("", absl::Seconds(10));
  EXPECT_EQ(serving.status().code(), absl::StatusCode::kUnavailable) << serving.status();
}

TEST(ClientSampleTest, RequestOverTheClientLimitIsResourceExhaustedLocally) {
  GrpcOnlyServer server;  // would answer UNIMPLEMENTED if the request reached it
  ASSERT_TRUE(server.started());
  ClientOptions options;
  options.max_message_bytes = 1024;
  absl::StatusOr<Client> client = Client::Create(server.address(), options);
  ASSERT_TRUE(client.ok());
  absl::StatusOr<v1::SampleResponse> response =
      client->Sample(SmallRequest(/*vocab=*/1024), absl::Seconds(10));
  EXPECT_EQ(response.status().code(), absl::StatusCode::kResourceExhausted) << response.status();
}

// A Sampler whose Sample keeps the request it received (as gRPC's protobuf parser read it) and
// answers with one token.
class RecordingSampler final : public v1::Sampler::Service {
 public:
  grpc::Status Sample(grpc::ServerContext*, const v1::SampleRequest* request,
                      v1::SampleResponse* response) override {
    absl::MutexLock lock(&mu_);
    received_.push_back(*request);
    response->add_results()->set_token_id(static_cast<int32_t>(received_.size()));
    return grpc::Status::OK;
  }
  grpc::Status Verify(grpc::ServerContext*, const v1::VerifyRequest* request,
                      v1::VerifyResponse* response) override {
    absl::MutexLock lock(&mu_);
    verified_.push_back(*request);
    response->add_results()->set_num_accepted(static_cast<uint32_t>(verified_.size()));
    return grpc::Status::OK;
  }
  std::vector<v1::SampleRequest> received() {
    absl::MutexLock lock(&mu_);
    return received_;
  }
  std::vector<v1::VerifyRequest> verified() {
    absl::MutexLock lock(&mu_);
    return verified_;
  }

 private:
  absl::Mutex mu_;
  std::vector<v1::SampleRequest> received_ ABSL_GUARDED_BY(mu_);
  std::vector<v1::VerifyRequest> verified_ ABSL_GUARDED_BY(mu_);
};

// Rows with parameters set, over logits of `bytes` bytes (fp32) that differ token to token.
v1::SampleRequest RequestOfBytes(size_t bytes) {
  const size_t vocab = 1000;
  const size_t rows = bytes / (vocab * sizeof(float));
  std::vector<float> values(rows * vocab);
  for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i % 977) * 0.01f;
  v1::SampleRequest request;
  *request.mutable_logits() = *MakeLogits(values, static_cast<uint32_t>(vocab), v1::DTYPE_FLOAT32);
  for (size_t r = 0; r < rows; ++r) {
    v1::SamplingParams& params = *request.add_rows()->mutable_params();
    params.set_temperature(0.5f + static_cast<float>(r));
    params.set_top_k(static_cast<int32_t>(r + 1));
    params.set_seed(r);
  }
  return request;
}

TEST(ClientSampleTest, LargeLogitsArriveExactlyAsSent) {
  // From 1 MiB of logits bytes on, the client sends them without copying them into the message
  // (a second `logits` field that the parser merges into the first): what the server parses
  // must be the request itself, field for field, on either side of that size.
  RecordingSampler sampler;
  GrpcOnlyServer server(&sampler);
  ASSERT_TRUE(server.started());
  absl::StatusOr<Client> client = Client::Create(server.address());
  ASSERT_TRUE(client.ok());
  std::vector<v1::SampleRequest> sent;
  for (size_t bytes : {size_t{4000} * 200, size_t{1} << 20, size_t{3} << 20}) {
    v1::SampleRequest request = RequestOfBytes(bytes);
    const std::string before = request.SerializeAsString();
    absl::StatusOr<v1::SampleResponse> response = client->Sample(request, absl::Seconds(30));
    ASSERT_TRUE(response.ok()) << bytes << ": " << response.status();
    ASSERT_EQ(response->results_size(), 1);
    EXPECT_EQ(response->results(0).token_id(), static_cast<int32_t>(sent.size() + 1));
    EXPECT_EQ(request.SerializeAsString(), before) << "the caller's request changed";
    sent.push_back(std::move(request));
  }
  const std::vector<v1::SampleRequest> received = sampler.received();
  ASSERT_EQ(received.size(), sent.size());
  for (size_t i = 0; i < sent.size(); ++i) {
    EXPECT_EQ(received[i].logits().data().size(), sent[i].logits().data().size()) << i;
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(received[i], sent[i])) << i;
  }

  // Verify's request has the same shape (logits = 1, rows = 2) and goes the same way.
  v1::VerifyRequest verify;
  *verify.mutable_logits() = sent.back().logits();
  for (int r = 0; r < 3; ++r) {
    v1::VerifyRow& row = *verify.add_rows();
    row.add_draft_token_ids(r);
    row.mutable_params()->set_seed(static_cast<uint64_t>(r));
  }
  absl::StatusOr<v1::VerifyResponse> verified = client->Verify(verify, absl::Seconds(30));
  ASSERT_TRUE(verified.ok()) << verified.status();
  ASSERT_EQ(sampler.verified().size(), 1u);
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(sampler.verified()[0], verify));
}

TEST(ClientSampleTest, LargeLogitsFailLikeSmallOnes) {
  // The path that does not copy the bytes returns the same errors, and returns at all: it waits
  // until gRPC has released the caller's bytes, which a failed call must also do.
  const v1::SampleRequest large = RequestOfBytes(size_t{2} << 20);
  absl::StatusOr<Client> dead = Client::Create(DeadSocket());
  ASSERT_TRUE(dead.ok());
  EXPECT_EQ(dead->Sample(large, absl::Seconds(10)).status().code(), absl::StatusCode::kUnavailable);
  ClientOptions waiting;
  waiting.wait_for_ready = true;
  absl::StatusOr<Client> patient = Client::Create(DeadSocket(), waiting);
  ASSERT_TRUE(patient.ok());
  EXPECT_EQ(patient->Sample(large, absl::Milliseconds(200)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  GrpcOnlyServer unimplemented;
  ASSERT_TRUE(unimplemented.started());
  ClientOptions limited;
  limited.max_message_bytes = 1 << 20;
  absl::StatusOr<Client> client = Client::Create(unimplemented.address(), limited);
  ASSERT_TRUE(client.ok());
  EXPECT_EQ(client->Sample(large, absl::Seconds(10)).status().code(),
            absl::StatusCode::kResourceExhausted);
  absl::StatusOr<Client> unlimited = Client::Create(unimplemented.address());
  ASSERT_TRUE(unlimited.ok());
  EXPECT_EQ(unlimited->Sample(large, absl::Seconds(10)).status().code(),
            absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace tokensampler
