// Test helpers for the gRPC service: build SampleRequests from float rows, encode logits in any
// dtype, give RPCs a deadline, and talk to grpc.health.v1 / server reflection without their
// generated stubs. Thread-compatible.
#ifndef TOKENSAMPLER_TESTS_TESTING_SERVICE_TESTING_H_
#define TOKENSAMPLER_TESTS_TESTING_SERVICE_TESTING_H_

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/tensor.h"
#include "tokensampler/v1/sampler.pb.h"

namespace tokensampler::testing {

// A short path unique to this process and moment, in the temp dir: Unix socket paths must stay
// under 108 bytes, so this avoids gtest's (possibly long) TempDir().
inline std::string UniqueTempPath(const std::string& stem) {
  const char* tmp = std::getenv("TMPDIR");
  return absl::StrCat(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp", "/ts_", getpid(), "_",
                      absl::ToUnixNanos(absl::Now()), "_", stem);
}

// Every RPC in the tests gets this deadline: a hung server fails the test instead of hanging it.
inline constexpr absl::Duration kRpcTimeout = absl::Seconds(20);

inline void SetDeadline(grpc::ClientContext& context, absl::Duration timeout = kRpcTimeout) {
  context.set_deadline(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout));
}

// A plaintext channel to `address` ("host:port" or "unix:/path") for tests: never through an
// HTTP proxy from the environment, no client-side limit on response size.
inline std::shared_ptr<grpc::Channel> CreateTestChannel(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_ENABLE_HTTP_PROXY, 0);
  args.SetMaxReceiveMessageSize(-1);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

// `rows` encoded as a row-major little-endian tensor of `dtype` (bf16/fp16 rounded to nearest
// even). REQUIRES: every row has the same length.
inline v1::Logits MakeLogits(const std::vector<std::vector<float>>& rows,
                             v1::DType dtype = v1::DTYPE_FLOAT32) {
  v1::Logits logits;
  logits.set_dtype(dtype);
  logits.set_rows(static_cast<uint32_t>(rows.size()));
  logits.set_vocab_size(rows.empty() ? 0 : static_cast<uint32_t>(rows[0].size()));
  std::string& data = *logits.mutable_data();
  for (const std::vector<float>& row : rows) {
    for (float value : row) {
      if (dtype == v1::DTYPE_FLOAT32) {
        char bytes[4];
        std::memcpy(bytes, &value, 4);
        data.append(bytes, 4);
      } else {
        const uint16_t half = dtype == v1::DTYPE_BFLOAT16 ? FloatToBf16(value) : FloatToFp16(value);
        char bytes[2];
        std::memcpy(bytes, &half, 2);
        data.append(bytes, 2);
      }
    }
  }
  return logits;
}

// A request with one row per entry of `rows`, each with default (empty) parameters.
inline v1::SampleRequest MakeRequest(const std::vector<std::vector<float>>& rows,
                                     v1::DType dtype = v1::DTYPE_FLOAT32) {
  v1::SampleRequest request;
  *request.mutable_logits() = MakeLogits(rows, dtype);
  for (size_t i = 0; i < rows.size(); ++i) request.add_rows();
  return request;
}

// log(Σ exp(x)) over finite values, in double: the hand-computed reference.
inline double LogSumExp(const std::vector<float>& values) {
  double max = -INFINITY;
  for (float v : values) max = std::max(max, static_cast<double>(v));
  double sum = 0.0;
  for (float v : values) sum += std::exp(static_cast<double>(v) - max);
  return max + std::log(sum);
}

// A unary call with raw bytes (for services whose stubs the project does not generate).
inline grpc::Status RawUnaryCall(const std::shared_ptr<grpc::Channel>& channel,
                                 const std::string& method, const std::string& request,
                                 std::string* response) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  SetDeadline(context);
  grpc::CompletionQueue cq;
  grpc::Slice slice(request);
  grpc::ByteBuffer request_buffer(&slice, 1);
  grpc::ByteBuffer response_buffer;
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> call =
      stub.PrepareUnaryCall(&context, method, request_buffer, &cq);
  call->StartCall();
  grpc::Status status;
  call->Finish(&response_buffer, &status, reinterpret_cast<void*>(1));
  void* tag = nullptr;
  bool ok = false;
  if (!cq.Next(&tag, &ok) || !ok) return grpc::Status(grpc::StatusCode::INTERNAL, "cq failed");
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  if (status.ok()) {
    std::vector<grpc::Slice> slices;
    if (!response_buffer.Dump(&slices).ok()) {
      return grpc::Status(grpc::StatusCode::INTERNAL, "cannot read the response");
    }
    response->clear();
    for (const grpc::Slice& s : slices) {
      response->append(reinterpret_cast<const char*>(s.begin()), s.size());
    }
  }
  return status;
}

// A bidirectional stream with raw messages: writes `messages` in order (stopping at the first
// write the stream refuses) and half-closes, while reading every response into `responses`
// (reads run alongside the writes: the in-process transport holds a write until it is read);
// returns the stream's status.
inline grpc::Status RawStreamExchange(const std::shared_ptr<grpc::Channel>& channel,
                                      const std::string& method,
                                      const std::vector<std::string>& messages,
                                      std::vector<std::string>* responses) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  SetDeadline(context);
  grpc::CompletionQueue cq;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call =
      stub.PrepareCall(&context, method, &cq);
  enum Tag : intptr_t { kStart = 1, kWrite, kWritesDone, kRead, kFinish };
  responses->clear();
  call->StartCall(reinterpret_cast<void*>(kStart));
  grpc::ByteBuffer read_buffer;
  size_t next = 0;
  bool writing = true, reading = true;
  const auto write_next = [&] {
    if (next < messages.size()) {
      grpc::Slice slice(messages[next++]);
      grpc::ByteBuffer buffer(&slice, 1);
      call->Write(buffer, reinterpret_cast<void*>(kWrite));
    } else {
      call->WritesDone(reinterpret_cast<void*>(kWritesDone));
    }
  };
  void* tag = nullptr;
  bool ok = false;
  while ((writing || reading) && cq.Next(&tag, &ok)) {
    switch (reinterpret_cast<intptr_t>(tag)) {
      case kStart:
        if (!ok) {
          writing = reading = false;
          break;
        }
        write_next();
        call->Read(&read_buffer, reinterpret_cast<void*>(kRead));
        break;
      case kWrite:
        if (ok) {
          write_next();
        } else {
          writing = false;
        }
        break;
      case kWritesDone:
        writing = false;
        break;
      case kRead: {
        if (!ok) {
          reading = false;
          break;
        }
        std::vector<grpc::Slice> slices;
        std::string& out = responses->emplace_back();
        if (read_buffer.Dump(&slices).ok()) {
          for (const grpc::Slice& s : slices) {
            out.append(reinterpret_cast<const char*>(s.begin()), s.size());
          }
        }
        call->Read(&read_buffer, reinterpret_cast<void*>(kRead));
        break;
      }
      default:
        break;
    }
  }
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(kFinish));
  while (cq.Next(&tag, &ok) && reinterpret_cast<intptr_t>(tag) != kFinish) {
  }
  cq.Shutdown();
  while (cq.Next(&tag, &ok)) {
  }
  return status;
}

// grpc.health.v1.Health/Check for `service`. Returns the ServingStatus number (1 = SERVING,
// 2 = NOT_SERVING) or nullopt with the failure in `status_out`.
// HealthCheckRequest is `string service = 1`; HealthCheckResponse is `ServingStatus status = 1`.
inline std::optional<int> HealthCheck(const std::shared_ptr<grpc::Channel>& channel,
                                      const std::string& service,
                                      grpc::Status* status_out = nullptr) {
  std::string request;
  if (!service.empty()) {
    request.push_back(0x0a);                               // field 1, length-delimited
    request.push_back(static_cast<char>(service.size()));  // REQUIRES: < 128 bytes
    request += service;
  }
  std::string response;
  const grpc::Status status =
      RawUnaryCall(channel, "/grpc.health.v1.Health/Check", request, &response);
  if (status_out != nullptr) *status_out = status;
  if (!status.ok()) return std::nullopt;
  if (response.empty()) return 0;  // UNKNOWN is encoded as nothing
  if (response.size() != 2 || response[0] != 0x08) return std::nullopt;
  return static_cast<int>(response[1]);
}

// grpc.reflection.v1alpha.ServerReflection: one `list_services` exchange. Returns the raw
// ServerReflectionResponse bytes (they contain every service name as a string), or nullopt.
inline std::optional<std::string> ReflectionListServices(
    const std::shared_ptr<grpc::Channel>& channel) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  SetDeadline(context);
  grpc::CompletionQueue cq;
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call = stub.PrepareCall(
      &context, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  const auto wait = [&cq](intptr_t expected) {
    void* tag = nullptr;
    bool ok = false;
    return cq.Next(&tag, &ok) && ok && tag == reinterpret_cast<void*>(expected);
  };
  std::optional<std::string> result;
  call->StartCall(reinterpret_cast<void*>(1));
  if (wait(1)) {
    const std::string request = {0x3a, 0x00};  // field 7 `list_services`, ""
    grpc::Slice slice(request);
    grpc::ByteBuffer buffer(&slice, 1);
    call->Write(buffer, reinterpret_cast<void*>(2));
    grpc::ByteBuffer response;
    if (wait(2)) {
      call->Read(&response, reinterpret_cast<void*>(3));
      if (wait(3)) {
        std::vector<grpc::Slice> slices;
        if (response.Dump(&slices).ok()) {
          result.emplace();
          for (const grpc::Slice& s : slices) {
            result->append(reinterpret_cast<const char*>(s.begin()), s.size());
          }
        }
      }
    }
  }
  context.TryCancel();
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(4));
  cq.Shutdown();
  void* tag = nullptr;
  bool ok = false;
  while (cq.Next(&tag, &ok)) {
  }
  return result;
}

}  // namespace tokensampler::testing

#endif  // TOKENSAMPLER_TESTS_TESTING_SERVICE_TESTING_H_
