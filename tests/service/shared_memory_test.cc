// Shared-memory logits end to end, in-process: a real Server, real POSIX shared memory in
// /dev/shm written by the test (the client side), real gRPC calls. The expected results are the
// same requests with the logits sent as bytes.
#include "client/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cli/random_logits.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "service/server.h"
#include "tests/integration/daemon_process.h"
#include "tests/testing/service_testing.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::service {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;
using ::tokensampler::testing::MakeLogits;
using ::tokensampler::testing::SetDeadline;

constexpr uint32_t kVocab = 5000;
constexpr uint32_t kRows = 3;

// A unique POSIX shm key for this test process.
std::string UniqueKey(const std::string& stem) {
  static int counter = 0;
  return absl::StrCat("/ts_test_", getpid(), "_", ++counter, "_", stem);
}

std::vector<std::vector<float>> Rows(uint64_t seed) {
  const std::vector<float> flat = cli::RandomLogits(kRows, kVocab, seed);
  std::vector<std::vector<float>> rows(kRows);
  for (uint32_t r = 0; r < kRows; ++r) {
    rows[r].assign(flat.begin() + r * kVocab, flat.begin() + (r + 1) * kVocab);
  }
  return rows;
}

// Seeded, logprobs on: the same request through bytes and through shared memory must agree.
void AddRows(v1::SampleRequest& request, uint32_t rows) {
  for (uint32_t r = 0; r < rows; ++r) {
    v1::SamplingParams& p = *request.add_rows()->mutable_params();
    p.set_seed(100 + r);
    p.set_temperature(0.9f);
    p.set_top_p(0.95f);
    p.set_logprobs(3);
    p.set_n(2);
  }
}

class SharedMemoryTest : public ::testing::Test {
 protected:
  void SetUp() override { StartServer({}); }

  void StartServer(ServerOptions options) {
    if (server_ != nullptr) server_->Shutdown(absl::Now());
    options.threads = 2;
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

  static void Token(grpc::ClientContext& context, const std::string& token) {
    if (!token.empty()) context.AddMetadata("authorization", absl::StrCat("Bearer ", token));
  }

  grpc::Status Register(const std::string& key, uint64_t offset, uint64_t size, std::string* handle,
                        const std::string& token = "", v1::Sampler::Stub* stub = nullptr) {
    grpc::ClientContext context;
    SetDeadline(context);
    Token(context, token);
    v1::RegisterSharedMemoryRequest request;
    request.set_name("logits");
    request.set_key(key);
    request.set_offset(offset);
    request.set_byte_size(size);
    v1::RegisterSharedMemoryResponse response;
    const grpc::Status status =
        (stub != nullptr ? stub : stub_.get())->RegisterSharedMemory(&context, request, &response);
    if (handle != nullptr) *handle = response.region();
    return status;
  }

  grpc::Status Unregister(const std::string& handle, const std::string& token = "") {
    grpc::ClientContext context;
    SetDeadline(context);
    Token(context, token);
    v1::UnregisterSharedMemoryRequest request;
    request.set_region(handle);
    v1::UnregisterSharedMemoryResponse response;
    return stub_->UnregisterSharedMemory(&context, request, &response);
  }

  v1::ListSharedMemoryResponse List(const std::vector<std::string>& handles,
                                    const std::string& token = "") {
    grpc::ClientContext context;
    SetDeadline(context);
    Token(context, token);
    v1::ListSharedMemoryRequest request;
    for (const std::string& h : handles) request.add_regions(h);
    v1::ListSharedMemoryResponse response;
    const grpc::Status status = stub_->ListSharedMemory(&context, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return response;
  }

  grpc::Status Sample(const v1::SampleRequest& request, v1::SampleResponse* response,
                      const std::string& token = "") {
    grpc::ClientContext context;
    SetDeadline(context);
    Token(context, token);
    return stub_->Sample(&context, request, response);
  }

  // A request for `rows` whose logits are the region at `offset`.
  static v1::SampleRequest ShmRequest(const std::string& handle, uint64_t offset, v1::DType dtype,
                                      uint32_t rows = kRows) {
    v1::SampleRequest request;
    *request.mutable_logits() = SharedMemoryLogits(handle, offset, rows, kVocab, dtype);
    AddRows(request, rows);
    return request;
  }

  // A buffer holding `rows` encoded as `dtype` at `offset`; the bytes request is returned too.
  SharedMemoryBuffer Fill(const std::vector<std::vector<float>>& rows, v1::DType dtype,
                          uint64_t offset, v1::SampleRequest* bytes_request) {
    const v1::Logits logits = MakeLogits(rows, dtype);
    absl::StatusOr<SharedMemoryBuffer> buffer =
        SharedMemoryBuffer::Create(UniqueKey("fill"), offset + logits.data().size() + 64);
    EXPECT_TRUE(buffer.ok()) << buffer.status();
    std::memcpy(buffer->data() + offset, logits.data().data(), logits.data().size());
    if (bytes_request != nullptr) {
      *bytes_request->mutable_logits() = logits;
      AddRows(*bytes_request, static_cast<uint32_t>(rows.size()));
    }
    return *std::move(buffer);
  }

  std::unique_ptr<Server> server_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Sampler::Stub> stub_;
};

void ExpectSameResults(const v1::SampleResponse& a, const v1::SampleResponse& b) {
  ASSERT_EQ(a.results_size(), b.results_size());
  for (int i = 0; i < a.results_size(); ++i) {
    EXPECT_EQ(a.results(i).token_id(), b.results(i).token_id()) << i;
    EXPECT_EQ(a.results(i).logprob(), b.results(i).logprob()) << i;
    ASSERT_EQ(a.results(i).top_logprobs_size(), b.results(i).top_logprobs_size());
    for (int j = 0; j < a.results(i).top_logprobs_size(); ++j) {
      EXPECT_EQ(a.results(i).top_logprobs(j).token_id(), b.results(i).top_logprobs(j).token_id());
    }
  }
}

class SharedMemoryDTypeTest : public SharedMemoryTest,
                              public ::testing::WithParamInterface<v1::DType> {};

TEST_P(SharedMemoryDTypeTest, RoundTripMatchesBytes) {
  const v1::DType dtype = GetParam();
  const uint64_t offset = 4096 + 12;  // not page-aligned: the server maps from the page below
  v1::SampleRequest bytes_request;
  SharedMemoryBuffer buffer = Fill(Rows(7), dtype, offset, &bytes_request);
  std::string handle;
  const grpc::Status registered = Register(buffer.key(), 0, buffer.size(), &handle);
  ASSERT_TRUE(registered.ok()) << registered.error_message();
  EXPECT_EQ(handle.size(), 32u);  // 128 random bits, hex

  v1::SampleResponse expected, actual;
  ASSERT_TRUE(Sample(bytes_request, &expected).ok());
  const grpc::Status status = Sample(ShmRequest(handle, offset, dtype), &actual);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ExpectSameResults(expected, actual);
  EXPECT_EQ(actual.results_size(), static_cast<int>(2 * kRows));

  // The region is read in place: new values written by the client are what the next call sees.
  v1::SampleRequest bytes_request2;
  const v1::Logits other = MakeLogits(Rows(8), dtype);
  std::memcpy(buffer.data() + offset, other.data().data(), other.data().size());
  *bytes_request2.mutable_logits() = other;
  AddRows(bytes_request2, kRows);
  ASSERT_TRUE(Sample(bytes_request2, &expected).ok());
  ASSERT_TRUE(Sample(ShmRequest(handle, offset, dtype), &actual).ok());
  ExpectSameResults(expected, actual);
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, SharedMemoryDTypeTest,
                         ::testing::Values(v1::DTYPE_FLOAT32, v1::DTYPE_BFLOAT16,
                                           v1::DTYPE_FLOAT16),
                         [](const ::testing::TestParamInfo<v1::DType>& param) {
                           return v1::DType_Name(param.param);
                         });

TEST_F(SharedMemoryTest, RegionAtAnOffsetOfTheObject) {
  v1::SampleRequest bytes_request;
  const uint64_t object_offset = 8192;
  SharedMemoryBuffer buffer =
      Fill(Rows(3), v1::DTYPE_BFLOAT16, object_offset + 100, &bytes_request);
  std::string handle;
  ASSERT_TRUE(Register(buffer.key(), object_offset, buffer.size() - object_offset, &handle).ok());
  v1::SampleResponse expected, actual;
  ASSERT_TRUE(Sample(bytes_request, &expected).ok());
  ASSERT_TRUE(Sample(ShmRequest(handle, 100, v1::DTYPE_BFLOAT16), &actual).ok());
  ExpectSameResults(expected, actual);
  // A path under /dev/shm names the same object.
  std::string by_path;
  ASSERT_TRUE(Register(absl::StrCat("/dev/shm", buffer.key()), object_offset,
                       buffer.size() - object_offset, &by_path)
                  .ok());
  ASSERT_TRUE(Sample(ShmRequest(by_path, 100, v1::DTYPE_BFLOAT16), &actual).ok());
  ExpectSameResults(expected, actual);
}

TEST_F(SharedMemoryTest, TruncatedRegionIsAnErrorAndTheServerKeepsServing) {
  v1::SampleRequest bytes_request;
  SharedMemoryBuffer buffer = Fill(Rows(1), v1::DTYPE_FLOAT32, 0, &bytes_request);
  std::string handle;
  ASSERT_TRUE(Register(buffer.key(), 0, buffer.size(), &handle).ok());
  v1::SampleResponse response;
  ASSERT_TRUE(Sample(ShmRequest(handle, 0, v1::DTYPE_FLOAT32), &response).ok());

  // The client shrinks its object while it is registered.
  const int fd = shm_open(buffer.key().c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 100), 0);
  const grpc::Status status = Sample(ShmRequest(handle, 0, v1::DTYPE_FLOAT32), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(),
              AllOf(HasSubstr("logits.shared_memory"), HasSubstr("region \"logits\""),
                    HasSubstr("truncated to 100 bytes"), Not(HasSubstr(handle))));
  // The server is alive.
  ASSERT_TRUE(Sample(bytes_request, &response).ok());
  close(fd);
}

TEST_F(SharedMemoryTest, ReadFaultingUnderTheServerIsCaughtAndReported) {
  // The race the size check cannot see: the object shrinks after the check, during the read.
  // Here the read is made to fault deterministically by touching the server's mapping while the
  // object is short; the SIGBUS handler swaps in zero pages and marks the region.
  v1::SampleRequest bytes_request;
  SharedMemoryBuffer buffer = Fill(Rows(2), v1::DTYPE_FLOAT32, 0, &bytes_request);
  std::string handle;
  ASSERT_TRUE(Register(buffer.key(), 0, buffer.size(), &handle).ok());
  const int fd = shm_open(buffer.key().c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 0), 0);
  {
    absl::StatusOr<SharedMemoryRegistry::Lease> lease =
        server_->shared_memory().Find(SharedMemoryCaller{"unknown", ""}, handle);
    ASSERT_TRUE(lease.ok()) << lease.status();
    volatile const uint8_t* bytes = lease->region->bytes().data();
    EXPECT_EQ(bytes[lease->region->bytes().size() - 1], 0);  // SIGBUS → zero pages, no crash
    EXPECT_TRUE(lease->region->faulted());
  }
  // Even with the object back at full size, the region stays faulted until re-registered.
  ASSERT_EQ(ftruncate(fd, static_cast<off_t>(buffer.size())), 0);
  v1::SampleResponse response;
  const grpc::Status status = Sample(ShmRequest(handle, 0, v1::DTYPE_FLOAT32), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(),
              AllOf(HasSubstr("region \"logits\""), HasSubstr("could not be read"),
                    HasSubstr("register it again")));
  const v1::ListSharedMemoryResponse list = List({handle});
  ASSERT_EQ(list.regions_size(), 1);
  EXPECT_TRUE(list.regions(0).faulted());
  // Registering it again works.
  ASSERT_TRUE(Unregister(handle).ok());
  ASSERT_TRUE(Register(buffer.key(), 0, buffer.size(), &handle).ok());
  std::memcpy(buffer.data(), bytes_request.logits().data().data(),
              bytes_request.logits().data().size());
  v1::SampleResponse expected;
  ASSERT_TRUE(Sample(bytes_request, &expected).ok());
  ASSERT_TRUE(Sample(ShmRequest(handle, 0, v1::DTYPE_FLOAT32), &response).ok());
  ExpectSameResults(expected, response);
  close(fd);
}

TEST_F(SharedMemoryTest, UnlinkedObject) {
  v1::SampleRequest bytes_request;
  SharedMemoryBuffer buffer = Fill(Rows(4), v1::DTYPE_FLOAT16, 0, &bytes_request);
  std::string handle;
  ASSERT_TRUE(Register(buffer.key(), 0, buffer.size(), &handle).ok());
  // Unlinked after registration: both sides keep their mapping of the same memory, so the region
  // keeps working (workers may unlink at once to leave nothing behind if they crash).
  ASSERT_EQ(shm_unlink(buffer.key().c_str()), 0);
  v1::SampleResponse expected, actual;
  ASSERT_TRUE(Sample(bytes_request, &expected).ok());
  ASSERT_TRUE(Sample(ShmRequest(handle, 0, v1::DTYPE_FLOAT16), &actual).ok());
  ExpectSameResults(expected, actual);
  // An unlinked key cannot be registered.
  const grpc::Status status = Register(buffer.key(), 0, buffer.size(), nullptr);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(status.error_message(), HasSubstr(buffer.key()));
}

TEST_F(SharedMemoryTest, OutOfBoundsReferencesAndRegistrations) {
  SharedMemoryBuffer buffer = Fill(Rows(1), v1::DTYPE_BFLOAT16, 0, nullptr);
  const uint64_t size = buffer.size();
  std::string handle;
  ASSERT_TRUE(Register(buffer.key(), 0, size, &handle).ok());
  v1::SampleResponse response;

  v1::SampleRequest request = ShmRequest(handle, 65, v1::DTYPE_BFLOAT16);  // 65 + bytes > size
  grpc::Status status = Sample(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::OUT_OF_RANGE);
  EXPECT_THAT(status.error_message(), HasSubstr("offset + byte_size = 65 + 30000"));

  request = ShmRequest(handle, std::numeric_limits<uint64_t>::max() - 10, v1::DTYPE_BFLOAT16);
  status = Sample(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::OUT_OF_RANGE);

  request = ShmRequest(handle, 0, v1::DTYPE_BFLOAT16);
  request.mutable_logits()->mutable_shared_memory()->set_byte_size(
      std::numeric_limits<uint64_t>::max());
  status = Sample(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::OUT_OF_RANGE);

  request = ShmRequest(handle, 0, v1::DTYPE_BFLOAT16);
  request.mutable_logits()->mutable_shared_memory()->set_byte_size(100);
  status = Sample(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(),
              HasSubstr("logits.shared_memory.byte_size is 100, expected rows × vocab_size × 2"));

  // A reference's dense size is bounded like a dense request's (--max_message_bytes).
  request = ShmRequest(handle, 0, v1::DTYPE_BFLOAT16);
  request.mutable_logits()->set_vocab_size(2000000000u);
  status = Sample(request, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(status.error_message(), HasSubstr("above the largest tensor this server samples"));

  request = ShmRequest(handle, 0, v1::DTYPE_BFLOAT16);
  request.mutable_logits()->set_dtype(v1::DTYPE_UNSPECIFIED);
  EXPECT_EQ(Sample(request, &response).error_code(), grpc::StatusCode::INVALID_ARGUMENT);

  // Registrations.
  status = Register(buffer.key(), 1, size, nullptr);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::OUT_OF_RANGE);
  EXPECT_THAT(status.error_message(), HasSubstr("is beyond the end of"));
  status = Register(buffer.key(), std::numeric_limits<uint64_t>::max(), 2, nullptr);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("overflows"));
  EXPECT_EQ(Register(buffer.key(), 0, 0, nullptr).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  status = Register("/etc/passwd", 0, 1, nullptr);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("not under /dev/shm"));
  const std::string link = absl::StrCat("/dev/shm/ts_test_link_", getpid());
  ASSERT_EQ(symlink("/etc/passwd", link.c_str()), 0);
  status = Register(link, 0, 1, nullptr);
  unlink(link.c_str());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("resolves to /etc/passwd"));
  EXPECT_EQ(Register("relative", 0, 1, nullptr).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Register("/ts_no_such_object_ever", 0, 1, nullptr).error_code(),
            grpc::StatusCode::NOT_FOUND);
  // The server keeps serving.
  ASSERT_TRUE(Sample(ShmRequest(handle, 0, v1::DTYPE_BFLOAT16), &response).ok());
}

TEST_F(SharedMemoryTest, RegionsAreIsolatedBetweenClients) {
  v1::SampleRequest bytes_request;
  SharedMemoryBuffer buffer = Fill(Rows(5), v1::DTYPE_FLOAT32, 0, &bytes_request);
  std::string a_handle, anon_handle;
  ASSERT_TRUE(Register(buffer.key(), 0, buffer.size(), &a_handle, "token-a").ok());
  ASSERT_TRUE(Register(buffer.key(), 0, buffer.size(), &anon_handle, "").ok());
  EXPECT_NE(a_handle, anon_handle);
  v1::SampleResponse response;
  // A uses its region.
  ASSERT_TRUE(Sample(ShmRequest(a_handle, 0, v1::DTYPE_FLOAT32), &response, "token-a").ok());
  // B (another token) and an anonymous client cannot use it, even knowing the handle.
  for (const std::string& other : {std::string("token-b"), std::string("")}) {
    const grpc::Status status =
        Sample(ShmRequest(a_handle, 0, v1::DTYPE_FLOAT32), &response, other);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND) << other;
    EXPECT_THAT(status.error_message(), HasSubstr("no such shared-memory region"));
    EXPECT_EQ(Unregister(a_handle, other).error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_EQ(List({a_handle}, other).regions_size(), 0);
  }
  // Nor can A use the anonymous region.
  EXPECT_EQ(
      Sample(ShmRequest(anon_handle, 0, v1::DTYPE_FLOAT32), &response, "token-a").error_code(),
      grpc::StatusCode::NOT_FOUND);
  // Each sees only its own.
  v1::ListSharedMemoryResponse list = List({}, "token-a");
  ASSERT_EQ(list.regions_size(), 1);
  EXPECT_EQ(list.regions(0).region(), a_handle);
  EXPECT_EQ(list.regions(0).name(), "logits");
  EXPECT_EQ(list.regions(0).key(), buffer.key());
  EXPECT_EQ(list.regions(0).byte_size(), buffer.size());
  EXPECT_FALSE(list.regions(0).faulted());
  EXPECT_EQ(List({}, "token-b").regions_size(), 0);
  EXPECT_EQ(List({}, "").regions_size(), 0);  // anonymous callers list only what they name
  ASSERT_EQ(List({anon_handle}, "").regions_size(), 1);
  // A guessed handle finds nothing.
  EXPECT_EQ(Sample(ShmRequest(std::string(32, '0'), 0, v1::DTYPE_FLOAT32), &response, "token-a")
                .error_code(),
            grpc::StatusCode::NOT_FOUND);
  // Unregistered: gone for its owner too.
  ASSERT_TRUE(Unregister(a_handle, "token-a").ok());
  EXPECT_EQ(Sample(ShmRequest(a_handle, 0, v1::DTYPE_FLOAT32), &response, "token-a").error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(server_->shared_memory().size(), 1);
}

TEST_F(SharedMemoryTest, IsolationWithVerifiedTokens) {
  ServerOptions options;
  options.auth_tokens = {"token-a", "token-b"};
  StartServer(options);
  SharedMemoryBuffer buffer = Fill(Rows(5), v1::DTYPE_FLOAT32, 0, nullptr);
  std::string handle;
  ASSERT_TRUE(Register(buffer.key(), 0, buffer.size(), &handle, "token-a").ok());
  v1::SampleResponse response;
  ASSERT_TRUE(Sample(ShmRequest(handle, 0, v1::DTYPE_FLOAT32), &response, "token-a").ok());
  EXPECT_EQ(Sample(ShmRequest(handle, 0, v1::DTYPE_FLOAT32), &response, "token-b").error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Register(buffer.key(), 0, buffer.size(), nullptr, "").error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(List({}, "token-a").regions_size(), 1);
  EXPECT_EQ(List({}, "token-b").regions_size(), 0);
}

TEST_F(SharedMemoryTest, OffMeansOff) {
  ServerOptions options;
  options.shared_memory.mode = SharedMemoryMode::kOff;
  StartServer(options);
  SharedMemoryBuffer buffer = Fill(Rows(5), v1::DTYPE_FLOAT32, 0, nullptr);
  const grpc::Status status = Register(buffer.key(), 0, buffer.size(), nullptr);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("--shared_memory=off"));
  v1::SampleResponse response;
  EXPECT_EQ(Sample(ShmRequest("x", 0, v1::DTYPE_FLOAT32), &response).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
}

TEST_F(SharedMemoryTest, ListenersFollowTheMode) {
  const std::string socket = ::tokensampler::testing::UniqueTempPath("shm.sock");
  for (const SharedMemoryMode mode : {SharedMemoryMode::kUnix, SharedMemoryMode::kAll}) {
    ServerOptions options;
    options.shared_memory.mode = mode;
    options.listen_addresses = {"127.0.0.1:0", absl::StrCat("unix:", socket)};
    StartServer(options);
    SharedMemoryBuffer buffer = Fill(Rows(5), v1::DTYPE_FLOAT32, 0, nullptr);
    auto tcp = v1::Sampler::NewStub(
        ::tokensampler::testing::CreateTestChannel(server_->bound_addresses()[0]));
    auto unix_socket = v1::Sampler::NewStub(
        ::tokensampler::testing::CreateTestChannel(server_->bound_addresses()[1]));
    std::string handle;
    EXPECT_TRUE(Register(buffer.key(), 0, buffer.size(), &handle, "", unix_socket.get()).ok());
    const grpc::Status status = Register(buffer.key(), 0, buffer.size(), nullptr, "", tcp.get());
    if (mode == SharedMemoryMode::kUnix) {
      EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
      EXPECT_THAT(status.error_message(),
                  AllOf(HasSubstr("Unix sockets only"), HasSubstr("ipv4:127.0.0.1")));
      // A handle obtained over the socket is no use over TCP either.
      grpc::ClientContext context;
      SetDeadline(context);
      v1::SampleResponse response;
      EXPECT_EQ(
          tcp->Sample(&context, ShmRequest(handle, 0, v1::DTYPE_FLOAT32), &response).error_code(),
          grpc::StatusCode::FAILED_PRECONDITION);
    } else {
      EXPECT_TRUE(status.ok()) << status.error_message();
    }
    server_->Shutdown(absl::Now());
    server_.reset();
    std::remove(socket.c_str());
  }
}

TEST_F(SharedMemoryTest, RegionLimit) {
  ServerOptions options;
  options.shared_memory.max_regions = 2;
  StartServer(options);
  SharedMemoryBuffer buffer = Fill(Rows(5), v1::DTYPE_FLOAT32, 0, nullptr);
  std::string first;
  ASSERT_TRUE(Register(buffer.key(), 0, buffer.size(), &first).ok());
  ASSERT_TRUE(Register(buffer.key(), 0, buffer.size(), nullptr).ok());
  const grpc::Status status = Register(buffer.key(), 0, buffer.size(), nullptr);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(status.error_message(), HasSubstr("--shared_memory_max_regions=2"));
  ASSERT_TRUE(Unregister(first).ok());
  EXPECT_TRUE(Register(buffer.key(), 0, buffer.size(), nullptr).ok());
}

TEST_F(SharedMemoryTest, SessionStepsReadSharedMemory) {
  v1::SampleRequest bytes_request;
  SharedMemoryBuffer buffer = Fill(Rows(9), v1::DTYPE_BFLOAT16, 0, &bytes_request);
  std::string handle;
  ASSERT_TRUE(Register(buffer.key(), 0, buffer.size(), &handle).ok());
  grpc::ClientContext context;
  SetDeadline(context);
  auto stream = stub_->Session(&context);
  v1::SessionRequest request;
  request.set_request_id(1);
  for (uint32_t r = 0; r < kRows; ++r) {
    v1::AddSequence& add = *request.add_add();
    add.set_sequence_id(r);
    add.mutable_params()->set_seed(100 + r);
    add.mutable_params()->set_temperature(0);
    request.mutable_step()->add_sequence_ids(r);
  }
  *request.mutable_step()->mutable_logits() =
      SharedMemoryLogits(handle, 0, kRows, kVocab, v1::DTYPE_BFLOAT16);
  ASSERT_TRUE(stream->Write(request));
  v1::SessionResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.error().code(), 0) << response.error().message();
  ASSERT_EQ(response.results_size(), static_cast<int>(kRows));
  // Greedy over the same bytes.
  for (auto& row : *bytes_request.mutable_rows()) row.mutable_params()->set_temperature(0);
  v1::SampleResponse expected;
  ASSERT_TRUE(Sample(bytes_request, &expected).ok());
  for (uint32_t r = 0; r < kRows; ++r) {
    EXPECT_EQ(response.results(static_cast<int>(r)).token_id(),
              expected.results(static_cast<int>(2 * r)).token_id());
  }
  // Sparse candidates are for Sample only; an unknown region is NOT_FOUND in the response.
  v1::SessionRequest sparse;
  sparse.set_request_id(2);
  sparse.mutable_step()->add_sequence_ids(0);
  *sparse.mutable_step()->mutable_logits() =
      *SparseLogits({1}, {2.0f}, {0.0f}, 1, kVocab, v1::DTYPE_FLOAT32);
  ASSERT_TRUE(stream->Write(sparse));
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.error().code(), static_cast<int>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_THAT(response.error().message(),
              HasSubstr("step.logits.sparse is accepted by Sample only"));
  v1::SessionRequest unknown;
  unknown.set_request_id(3);
  unknown.mutable_step()->add_sequence_ids(0);
  *unknown.mutable_step()->mutable_logits() =
      SharedMemoryLogits("nope", 0, 1, kVocab, v1::DTYPE_BFLOAT16);
  ASSERT_TRUE(stream->Write(unknown));
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.error().code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
  EXPECT_THAT(response.error().message(), HasSubstr("step.logits.shared_memory.region"));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

// Verify reads its target logits through the same resolved view as Sample: a shared-memory
// reference gives exactly what the same bytes give. draft_probs stay bytes only, and sparse
// target logits are refused (not exact in general), each naming its field.
TEST_F(SharedMemoryTest, VerifyReadsTargetLogitsFromSharedMemory) {
  // kRows target rows: one sequence with two drafts (k + 1 = 3 rows).
  const std::vector<std::vector<float>> rows = Rows(11);
  SharedMemoryBuffer buffer = Fill(rows, v1::DTYPE_BFLOAT16, 64, nullptr);
  std::string handle;
  ASSERT_TRUE(Register(buffer.key(), 0, buffer.size(), &handle).ok());
  // The drafts are the rows' own argmax tokens, so that some are accepted.
  std::vector<int32_t> drafts;
  for (uint32_t r = 0; r + 1 < kRows; ++r) {
    drafts.push_back(
        static_cast<int32_t>(std::max_element(rows[r].begin(), rows[r].end()) - rows[r].begin()));
  }
  const std::vector<std::vector<float>> q(drafts.size(), std::vector<float>(kVocab, 1.0f / kVocab));
  const auto make_request = [&](v1::Logits logits, bool with_q) {
    v1::VerifyRequest request;
    *request.mutable_logits() = std::move(logits);
    v1::VerifyRow& row = *request.add_rows();
    row.mutable_params()->set_seed(5);
    row.mutable_params()->set_temperature(0.9f);
    row.mutable_params()->set_logprobs(2);
    for (const int32_t d : drafts) row.add_draft_token_ids(d);
    if (with_q) *row.mutable_draft_probs() = MakeLogits(q, v1::DTYPE_FLOAT32);
    return request;
  };
  const auto verify = [&](const v1::VerifyRequest& request, v1::VerifyResponse* response) {
    grpc::ClientContext context;
    SetDeadline(context);
    return stub_->Verify(&context, request, response);
  };
  for (const bool with_q : {false, true}) {
    SCOPED_TRACE(with_q ? "draft_probs as bytes" : "point masses");
    v1::VerifyResponse expected, actual;
    const grpc::Status bytes_status =
        verify(make_request(MakeLogits(rows, v1::DTYPE_BFLOAT16), with_q), &expected);
    ASSERT_TRUE(bytes_status.ok()) << bytes_status.error_message();
    const grpc::Status shm_status = verify(
        make_request(SharedMemoryLogits(handle, 64, kRows, kVocab, v1::DTYPE_BFLOAT16), with_q),
        &actual);
    ASSERT_TRUE(shm_status.ok()) << shm_status.error_message();
    ASSERT_EQ(actual.results_size(), 1);
    EXPECT_EQ(actual.results(0).DebugString(), expected.results(0).DebugString());
    EXPECT_FALSE(actual.results(0).token_ids().empty());
  }

  // Errors name the field: an unknown region, sparse target logits, draft_probs not as bytes.
  v1::VerifyResponse response;
  grpc::Status status =
      verify(make_request(SharedMemoryLogits("nope", 0, kRows, kVocab, v1::DTYPE_BFLOAT16), false),
             &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(status.error_message(), HasSubstr("logits.shared_memory.region"));
  std::vector<int32_t> ids(kRows);
  for (uint32_t r = 0; r < kRows; ++r) ids[r] = static_cast<int32_t>(r);
  const absl::StatusOr<v1::Logits> sparse =
      SparseLogits(ids, std::vector<float>(kRows, 1.0f), std::vector<float>(kRows, 0.0f), 1, kVocab,
                   v1::DTYPE_FLOAT32);
  ASSERT_TRUE(sparse.ok()) << sparse.status();
  status = verify(make_request(*sparse, false), &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("logits.sparse is not accepted by Verify"));
  v1::VerifyRequest shm_q = make_request(MakeLogits(rows, v1::DTYPE_BFLOAT16), false);
  *shm_q.mutable_rows(0)->mutable_draft_probs() =
      SharedMemoryLogits(handle, 64, 2, kVocab, v1::DTYPE_BFLOAT16);
  status = verify(shm_q, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("rows[0].draft_probs.shared_memory"));
  v1::VerifyRequest sparse_q = make_request(MakeLogits(rows, v1::DTYPE_BFLOAT16), false);
  *sparse_q.mutable_rows(0)->mutable_draft_probs() = *SparseLogits(
      {1, 2}, {0.5f, 0.5f},
      {-std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()}, 1, kVocab,
      v1::DTYPE_FLOAT32);
  status = verify(sparse_q, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(status.error_message(), HasSubstr("rows[0].draft_probs.sparse"));

  // A Session step with drafts reads the same region and gives Verify's answer.
  grpc::ClientContext context;
  SetDeadline(context);
  auto stream = stub_->Session(&context);
  v1::SessionRequest step;
  step.set_request_id(1);
  v1::AddSequence& add = *step.add_add();
  add.set_sequence_id(7);
  add.mutable_params()->set_seed(5);
  add.mutable_params()->set_temperature(0.9f);
  add.mutable_params()->set_logprobs(2);
  step.mutable_step()->add_sequence_ids(7);
  v1::SequenceDrafts& step_drafts = *step.mutable_step()->add_drafts();
  step_drafts.set_sequence_id(7);
  for (const int32_t d : drafts) step_drafts.add_draft_token_ids(d);
  *step.mutable_step()->mutable_logits() =
      SharedMemoryLogits(handle, 64, kRows, kVocab, v1::DTYPE_BFLOAT16);
  ASSERT_TRUE(stream->Write(step));
  v1::SessionResponse step_response;
  ASSERT_TRUE(stream->Read(&step_response));
  EXPECT_EQ(step_response.error().code(), 0) << step_response.error().message();
  ASSERT_EQ(step_response.results_size(), 1);
  v1::VerifyResponse expected;
  ASSERT_TRUE(verify(make_request(MakeLogits(rows, v1::DTYPE_BFLOAT16), false), &expected).ok());
  EXPECT_EQ(step_response.results(0).verify().DebugString(), expected.results(0).DebugString());
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

TEST_F(SharedMemoryTest, SessionStepWhoseRegionFaultsDuringTheReadReleasesItsSequences) {
  // The object is truncated after the step's size check, right before the sampler reads it (the
  // session's test seam runs there); the read faults, the step fails and releases its sequences.
  const std::string key = UniqueKey("session_fault");
  std::string handle;
  ServerOptions options;
  options.session.before_step_for_testing = [&](const std::atomic<bool>&) {
    const int fd = shm_open(key.c_str(), O_RDWR, 0);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(ftruncate(fd, 0), 0);
    close(fd);
  };
  StartServer(options);
  const v1::Logits logits = MakeLogits(Rows(6), v1::DTYPE_FLOAT32);
  absl::StatusOr<SharedMemoryBuffer> buffer = SharedMemoryBuffer::Create(key, logits.data().size());
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  std::memcpy(buffer->data(), logits.data().data(), logits.data().size());
  ASSERT_TRUE(Register(key, 0, buffer->size(), &handle).ok());
  grpc::ClientContext context;
  SetDeadline(context);
  auto stream = stub_->Session(&context);
  v1::SessionRequest request;
  request.set_request_id(1);
  for (uint32_t r = 0; r < kRows; ++r) {
    v1::AddSequence& add = *request.add_add();
    add.set_sequence_id(r);
    add.mutable_params()->set_temperature(0);
    request.mutable_step()->add_sequence_ids(r);
  }
  *request.mutable_step()->mutable_logits() =
      SharedMemoryLogits(handle, 0, kRows, kVocab, v1::DTYPE_FLOAT32);
  ASSERT_TRUE(stream->Write(request));
  v1::SessionResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.error().code(), static_cast<int>(grpc::StatusCode::FAILED_PRECONDITION));
  EXPECT_THAT(response.error().message(),
              AllOf(HasSubstr("step.logits.shared_memory"), HasSubstr("could not be read"),
                    HasSubstr("the step's sequences were released")));
  // The sequences are gone; the stream and the server go on.
  v1::SessionRequest release;
  release.set_request_id(2);
  release.add_release(0);
  ASSERT_TRUE(stream->Write(release));
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.error().code(), static_cast<int>(grpc::StatusCode::NOT_FOUND));
  stream->WritesDone();
  EXPECT_TRUE(stream->Finish().ok());
}

// Mappings of `key` in this process (/proc/self/maps names the object's /dev/shm file).
int MappingsOf(const std::string& key) {
  const std::string maps = ::tokensampler::testing::ReadWholeFile("/proc/self/maps");
  int count = 0;
  for (size_t at = maps.find(absl::StrCat("/dev/shm", key)); at != std::string::npos;
       at = maps.find(absl::StrCat("/dev/shm", key), at + 1)) {
    ++count;
  }
  return count;
}

TEST_F(SharedMemoryTest, UnregisterAndServerStopUnmapRegions) {
  SharedMemoryBuffer buffer = Fill(Rows(5), v1::DTYPE_FLOAT32, 0, nullptr);
  ASSERT_EQ(MappingsOf(buffer.key()), 1);  // the client's own
  std::string first;
  ASSERT_TRUE(Register(buffer.key(), 0, buffer.size(), &first).ok());
  ASSERT_TRUE(Register(buffer.key(), 0, buffer.size(), nullptr).ok());
  EXPECT_EQ(MappingsOf(buffer.key()), 3);
  EXPECT_EQ(server_->shared_memory().size(), 2);
  EXPECT_THAT(server_->metrics().TextFormat(), HasSubstr("tokensampler_shm_regions 2"));
  ASSERT_TRUE(Unregister(first).ok());
  EXPECT_EQ(MappingsOf(buffer.key()), 2);
  server_->Shutdown(absl::Now());
  server_.reset();
  EXPECT_EQ(MappingsOf(buffer.key()), 1);
}

}  // namespace
}  // namespace tokensampler::service
