// Test helpers for Sampler.Session: a blocking wrapper of one stream (raw generated stubs), request
// builders, a bounded wait, and a toy language model whose next-token logits are a deterministic
// function of a sequence's prefix — so a Session step and a Sample call with the full history
// see exactly the same logits. Thread-compatible (one TestSession per thread).
#ifndef TOKENSAMPLER_TESTS_TESTING_SESSION_TESTING_H_
#define TOKENSAMPLER_TESTS_TESTING_SESSION_TESTING_H_

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/cli/random_logits.h"
#include "gtest/gtest.h"
#include "tests/testing/service_testing.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::testing {

// Polls `done` every millisecond until it holds or `timeout` passes; returns whether it held.
// For waiting on an event (a counter dropping to 0), never for asserting a duration.
inline bool WaitUntil(const std::function<bool()>& done,
                      absl::Duration timeout = absl::Seconds(20)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!done()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

// One Session stream. Every request gets a fresh request_id (1, 2, ...) unless it has one.
class TestSession {
 public:
  // A non-empty `bearer_token` goes with the stream's headers ("authorization: Bearer ...").
  explicit TestSession(v1::Sampler::Stub& stub, absl::Duration timeout = absl::Seconds(120),
                       const std::string& bearer_token = "") {
    SetDeadline(context_, timeout);
    if (!bearer_token.empty()) context_.AddMetadata("authorization", "Bearer " + bearer_token);
    stream_ = stub.Session(&context_);
  }

  // Cancels a stream that was not closed (a failed test must not hang).
  ~TestSession() {
    if (finished_) return;
    context_.TryCancel();
    v1::SessionResponse ignored;
    while (stream_->Read(&ignored)) {
    }
    stream_->Finish().IgnoreError();
  }

  TestSession(const TestSession&) = delete;
  TestSession& operator=(const TestSession&) = delete;

  // Sends `request` (numbering it); returns false when the stream is broken.
  bool Write(v1::SessionRequest& request) {
    if (request.request_id() == 0) request.set_request_id(next_request_id_++);
    return stream_->Write(request);
  }

  // The next response, or nullopt when the stream has ended.
  std::optional<v1::SessionResponse> Read() {
    v1::SessionResponse response;
    if (!stream_->Read(&response)) return std::nullopt;
    return response;
  }

  // Sends `request` and returns its response (checking the echoed request_id); an empty
  // response with error code -1 when the stream ended instead.
  v1::SessionResponse Call(v1::SessionRequest request) {
    v1::SessionResponse failed;
    failed.mutable_error()->set_code(-1);
    if (!Write(request)) {
      ADD_FAILURE() << "the stream is broken";
      return failed;
    }
    std::optional<v1::SessionResponse> response = Read();
    if (!response.has_value()) {
      ADD_FAILURE() << "the stream ended before answering request " << request.request_id();
      return failed;
    }
    EXPECT_EQ(response->request_id(), request.request_id());
    return *std::move(response);
  }

  // Like Call, and the request must succeed.
  v1::SessionResponse CallOk(v1::SessionRequest request) {
    v1::SessionResponse response = Call(std::move(request));
    EXPECT_EQ(response.error().code(), 0) << response.error().message();
    return response;
  }

  // Half-closes, expects no further response, and returns the stream's status.
  grpc::Status Close() {
    stream_->WritesDone();
    return AwaitEnd();
  }

  // Reads until the server ends the stream (no response may come) and returns its status.
  grpc::Status AwaitEnd() {
    v1::SessionResponse extra;
    while (stream_->Read(&extra)) {
      ADD_FAILURE() << "unexpected response " << extra.ShortDebugString();
    }
    finished_ = true;
    return stream_->Finish();
  }

  // Cancels the stream from the client side and returns its status (CANCELLED).
  grpc::Status Cancel() {
    context_.TryCancel();
    v1::SessionResponse ignored;
    while (stream_->Read(&ignored)) {
    }
    finished_ = true;
    return stream_->Finish();
  }

 private:
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::SessionRequest, v1::SessionResponse>> stream_;
  uint64_t next_request_id_ = 1;
  bool finished_ = false;
};

inline void AddSequence(v1::SessionRequest& request, uint64_t id, const v1::SamplingParams& params,
                        const std::vector<int32_t>& prompt = {}) {
  v1::AddSequence& add = *request.add_add();
  add.set_sequence_id(id);
  *add.mutable_params() = params;
  add.mutable_prompt_token_ids()->Add(prompt.begin(), prompt.end());
}

// A step of `rows` (one per id) encoded as `dtype`.
inline void SetStep(v1::SessionRequest& request, const std::vector<std::vector<float>>& rows,
                    const std::vector<uint64_t>& ids, v1::DType dtype = v1::DTYPE_FLOAT32) {
  v1::Step& step = *request.mutable_step();
  *step.mutable_logits() = MakeLogits(rows, dtype);
  step.mutable_sequence_ids()->Add(ids.begin(), ids.end());
}

// SplitMix64: a hash step for the toy model's keys.
inline uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Special tokens of the toy model, which it pushes to the top now and then so that every finish
// reason occurs: kToyEos (use as an eos_token_ids entry), kToyStop (a stop_token_ids entry) and
// the stop sequence {kToyStopSeq0, kToyStopSeq1}.
inline constexpr int32_t kToyEos = 1;
inline constexpr int32_t kToyStop = 2;
inline constexpr int32_t kToyStopSeq0 = 3;
inline constexpr int32_t kToyStopSeq1 = 4;

// The next-token logits of a toy language model for a sequence whose history is prompt + output:
// DESIGN.md's realistic random logits (cli::RandomLogits) keyed by (model_seed, the last two
// tokens, the output length). With probability 1/16 each, a special token gets the top logit + 1;
// after kToyStopSeq0, kToyStopSeq1 does half of the time. REQUIRES: vocab > kToyStopSeq1.
inline std::vector<float> ToyModelLogits(uint64_t model_seed, absl::Span<const int32_t> prompt,
                                         absl::Span<const int32_t> output, uint32_t vocab) {
  const auto at_end = [&](size_t back) -> int64_t {  // history[-1 - back], or -1
    if (back < output.size()) return output[output.size() - 1 - back];
    back -= output.size();
    if (back < prompt.size()) return prompt[prompt.size() - 1 - back];
    return -1;
  };
  const uint64_t key = Mix(Mix(Mix(model_seed) ^ static_cast<uint64_t>(at_end(0) + 1)) ^
                           (static_cast<uint64_t>(at_end(1) + 1) << 20) ^ (output.size() << 40));
  std::vector<float> row = cli::RandomLogits(1, vocab, key);
  const float top = *std::max_element(row.begin(), row.end());
  switch (Mix(key) % 16) {
    case 0:
      row[kToyEos] = top + 1.0f;
      break;
    case 1:
      row[kToyStop] = top + 1.0f;
      break;
    case 2:
      row[kToyStopSeq0] = top + 1.0f;
      break;
    default:
      break;
  }
  if (at_end(0) == kToyStopSeq0 && Mix(key ^ 1) % 2 == 0) row[kToyStopSeq1] = top + 1.0f;
  return row;
}

}  // namespace tokensampler::testing

#endif  // TOKENSAMPLER_TESTS_TESTING_SESSION_TESTING_H_
