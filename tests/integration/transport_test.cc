// Integration: shared-memory logits and sparse candidates against the real tokensamplerd binary,
// over its Unix socket (shared memory on by default) and TCP (off by default), through the C++
// client library.
#include <fcntl.h>
#include <grpc/grpc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "client/cli/random_logits.h"
#include "client/client.h"
#include "client/logits.h"
#include "client/shared_memory.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/integration/daemon_process.h"
#include "tests/testing/service_testing.h"

#ifndef TOKENSAMPLERD_PATH
#error "TOKENSAMPLERD_PATH must name the tokensamplerd binary"
#endif

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
using ::tokensampler::testing::DaemonProcess;
using ::tokensampler::testing::UniqueTempPath;

constexpr uint32_t kRows = 4;
constexpr uint32_t kVocab = 32000;

class TransportDaemonTest : public ::testing::Test {
 protected:
  void Start(std::vector<std::string> extra = {}) {
    socket_path_ = UniqueTempPath("t.sock");
    std::vector<std::string> args = {"--listen=127.0.0.1:0",
                                     absl::StrCat("--listen=unix:", socket_path_), "--threads=2"};
    args.insert(args.end(), extra.begin(), extra.end());
    absl::StatusOr<std::unique_ptr<DaemonProcess>> daemon =
        DaemonProcess::Start(TOKENSAMPLERD_PATH, args);
    ASSERT_TRUE(daemon.ok()) << daemon.status();
    daemon_ = *std::move(daemon);
  }

  void TearDown() override {
    if (daemon_ != nullptr) {
      absl::StatusOr<int> exit = daemon_->Stop(SIGTERM);
      ASSERT_TRUE(exit.ok()) << exit.status();
      EXPECT_EQ(*exit, 0) << daemon_->Stderr();
    }
    std::remove(socket_path_.c_str());
  }

  Client Connect(int listener) {
    absl::StatusOr<Client> client =
        Client::Create(daemon_->addresses()[static_cast<size_t>(listener)]);
    EXPECT_TRUE(client.ok());
    return *std::move(client);
  }

  static v1::SampleRequest Request(v1::Logits logits) {
    v1::SampleRequest request;
    *request.mutable_logits() = std::move(logits);
    for (uint32_t r = 0; r < kRows; ++r) {
      v1::SamplingParams& p = *request.add_rows()->mutable_params();
      p.set_top_k(40);
      p.set_temperature(0.8f);
      p.set_seed(r);
      p.set_logprobs(2);
    }
    return request;
  }

  std::string socket_path_;
  std::unique_ptr<DaemonProcess> daemon_;
};

TEST_F(TransportDaemonTest, SharedMemoryOverTheUnixSocketAndNotOverTcp) {
  Start();
  const Client uds = Connect(1);
  const Client tcp = Connect(0);
  const std::vector<float> values = cli::RandomLogits(kRows, kVocab, 3);
  const v1::Logits bytes = *MakeLogits(values, kVocab, v1::DTYPE_BFLOAT16);
  absl::StatusOr<SharedMemoryBuffer> buffer =
      SharedMemoryBuffer::Create(absl::StrCat("/ts_it_", getpid()), bytes.data().size());
  ASSERT_TRUE(buffer.ok()) << buffer.status();
  std::memcpy(buffer->data(), bytes.data().data(), bytes.data().size());

  absl::StatusOr<std::string> refused =
      tcp.RegisterSharedMemory("logits", buffer->key(), 0, buffer->size(), absl::Seconds(10));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(), HasSubstr("--shared_memory=unix"));

  absl::StatusOr<std::string> region =
      uds.RegisterSharedMemory("logits", buffer->key(), 0, buffer->size(), absl::Seconds(10));
  ASSERT_TRUE(region.ok()) << region.status();
  absl::StatusOr<v1::SampleResponse> expected = tcp.Sample(Request(bytes), absl::Seconds(10));
  ASSERT_TRUE(expected.ok()) << expected.status();
  absl::StatusOr<v1::SampleResponse> actual =
      uds.Sample(Request(SharedMemoryLogits(*region, 0, kRows, kVocab, v1::DTYPE_BFLOAT16)),
                 absl::Seconds(10));
  ASSERT_TRUE(actual.ok()) << actual.status();
  ASSERT_EQ(actual->results_size(), expected->results_size());
  for (int i = 0; i < actual->results_size(); ++i) {
    EXPECT_EQ(actual->results(i).token_id(), expected->results(i).token_id());
    EXPECT_EQ(actual->results(i).logprob(), expected->results(i).logprob());
  }
  absl::StatusOr<v1::ListSharedMemoryResponse> list =
      uds.ListSharedMemory({*region}, absl::Seconds(10));
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->regions_size(), 1);
  EXPECT_EQ(list->regions(0).key(), buffer->key());

  // Truncated under the daemon: an error naming the region, and the daemon keeps serving.
  const int fd = shm_open(buffer->key().c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 0), 0);
  close(fd);
  actual = uds.Sample(Request(SharedMemoryLogits(*region, 0, kRows, kVocab, v1::DTYPE_BFLOAT16)),
                      absl::Seconds(10));
  EXPECT_EQ(actual.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(actual.status().message(), HasSubstr("region \"logits\""));
  EXPECT_TRUE(tcp.Sample(Request(bytes), absl::Seconds(10)).ok());
  EXPECT_TRUE(uds.UnregisterSharedMemory(*region, absl::Seconds(10)).ok());
  EXPECT_THAT(daemon_->Stderr(), HasSubstr("shared_memory=unix"));
}

// The daemon samples logits sent as bytes without copying them out of gRPC's slices (64 KiB
// each: every row straddles several), row by row: the results must be those of the same tensor
// in shared memory, which it reads in place, for every dtype and a mix of stages per row.
TEST_F(TransportDaemonTest, BytesInSlicesSampleAsTheSameTensorInSharedMemory) {
  Start();
  const Client uds = Connect(1);
  const Client tcp = Connect(0);
  constexpr uint32_t kManyRows = 6;
  constexpr uint32_t kWideVocab = 50000;
  const std::vector<float> values = cli::RandomLogits(kManyRows, kWideVocab, 11);
  const auto with_params = [](v1::Logits logits) {
    v1::SampleRequest request;
    *request.mutable_logits() = std::move(logits);
    for (uint32_t r = 0; r < kManyRows; ++r) {
      v1::SampleRow& row = *request.add_rows();
      v1::SamplingParams& p = *row.mutable_params();
      p.set_seed(r + 7);
      p.set_logprobs(3);
      p.set_temperature(0.7f + 0.1f * static_cast<float>(r));
      switch (r % 3) {
        case 0:
          p.set_top_p(0.9f);
          break;
        case 1:
          p.set_min_p(0.05f);
          p.set_typical_p(0.95f);
          break;
        default:
          p.set_top_k(50);
          p.set_repetition_penalty(1.2f);
          for (int32_t t = 0; t < 30; ++t) row.add_output_token_ids(t * 997 % 50000);
      }
    }
    return request;
  };
  for (const v1::DType dtype : {v1::DTYPE_FLOAT32, v1::DTYPE_BFLOAT16, v1::DTYPE_FLOAT16}) {
    const v1::Logits bytes = *MakeLogits(values, kWideVocab, dtype);
    absl::StatusOr<SharedMemoryBuffer> buffer = SharedMemoryBuffer::Create(
        absl::StrCat("/ts_it_slices_", getpid(), "_", static_cast<int>(dtype)),
        bytes.data().size());
    ASSERT_TRUE(buffer.ok()) << buffer.status();
    std::memcpy(buffer->data(), bytes.data().data(), bytes.data().size());
    absl::StatusOr<std::string> region =
        uds.RegisterSharedMemory("slices", buffer->key(), 0, buffer->size(), absl::Seconds(10));
    ASSERT_TRUE(region.ok()) << region.status();
    absl::StatusOr<v1::SampleResponse> expected =
        uds.Sample(with_params(SharedMemoryLogits(*region, 0, kManyRows, kWideVocab, dtype)),
                   absl::Seconds(30));
    ASSERT_TRUE(expected.ok()) << expected.status();
    for (const Client* client : {&uds, &tcp}) {
      absl::StatusOr<v1::SampleResponse> actual =
          client->Sample(with_params(bytes), absl::Seconds(30));
      ASSERT_TRUE(actual.ok()) << actual.status();
      ASSERT_EQ(actual->results_size(), static_cast<int>(kManyRows));
      for (int i = 0; i < actual->results_size(); ++i) {
        const std::string where = absl::StrCat(v1::DType_Name(dtype), " row ", i, " over ",
                                               client == &uds ? "uds" : "tcp");
        EXPECT_EQ(actual->results(i).token_id(), expected->results(i).token_id()) << where;
        EXPECT_EQ(actual->results(i).logprob(), expected->results(i).logprob()) << where;
        ASSERT_EQ(actual->results(i).top_logprobs_size(), 3) << where;
        ASSERT_EQ(expected->results(i).top_logprobs_size(), 3) << where;
        for (int j = 0; j < 3; ++j) {
          EXPECT_EQ(actual->results(i).top_logprobs(j).SerializeAsString(),
                    expected->results(i).top_logprobs(j).SerializeAsString())
              << where << " #" << j;
        }
      }
    }
    EXPECT_TRUE(uds.UnregisterSharedMemory(*region, absl::Seconds(10)).ok());
  }
}

TEST_F(TransportDaemonTest, SparseCandidatesOverTcp) {
  Start();
  const Client tcp = Connect(0);
  const std::vector<float> values = cli::RandomLogits(kRows, kVocab, 4);
  absl::StatusOr<v1::SampleResponse> dense =
      tcp.Sample(Request(*MakeLogits(values, kVocab, v1::DTYPE_FLOAT32)), absl::Seconds(10));
  absl::StatusOr<v1::SampleResponse> sparse = tcp.Sample(
      Request(*SparseLogitsFromDense(values, kVocab, 1024, v1::DTYPE_FLOAT32)), absl::Seconds(10));
  ASSERT_TRUE(dense.ok()) << dense.status();
  ASSERT_TRUE(sparse.ok()) << sparse.status();
  for (int i = 0; i < dense->results_size(); ++i) {
    EXPECT_EQ(dense->results(i).token_id(), sparse->results(i).token_id());
    EXPECT_NEAR(dense->results(i).logprob(), sparse->results(i).logprob(), 2e-4);
  }
}

TEST_F(TransportDaemonTest, SharedMemoryFlag) {
  std::string stderr_text;
  absl::StatusOr<int> exit = DaemonProcess::RunToExit(
      TOKENSAMPLERD_PATH, {"--listen=127.0.0.1:0", "--shared_memory=sometimes"}, &stderr_text);
  ASSERT_TRUE(exit.ok());
  EXPECT_EQ(*exit, 1);
  EXPECT_THAT(stderr_text, HasSubstr("--shared_memory must be off, unix or all, got"));
  // --shared_memory=all serves it over TCP too.
  Start({"--shared_memory=all"});
  absl::StatusOr<SharedMemoryBuffer> buffer =
      SharedMemoryBuffer::Create(absl::StrCat("/ts_it_all_", getpid()), 4096);
  ASSERT_TRUE(buffer.ok());
  EXPECT_TRUE(Connect(0).RegisterSharedMemory("x", buffer->key(), 0, 4096, absl::Seconds(10)).ok());
}

}  // namespace
}  // namespace tokensampler
