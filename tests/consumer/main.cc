// A tiny model worker using the installed tokensampler client: `worker TARGET` connects to a
// running tokensamplerd, samples one greedy row with Sample, steps one sequence through a
// Session, checks a bad parameter comes back as INVALID_ARGUMENT, and prints one line per check.
// Exits 0 when every answer is the expected one, 1 otherwise (with the reason on stderr).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/client.h"
#include "client/logits.h"
#include "client/session_client.h"
#include "tokensampler/v1/sampler.pb.h"

namespace {

constexpr uint32_t kVocab = 16;

// A row of `kVocab` logits whose largest value is at `argmax`.
std::vector<float> PeakedRow(int argmax) {
  std::vector<float> row(kVocab, -1.0f);
  row[static_cast<size_t>(argmax)] = 4.0f;
  return row;
}

int Fail(const std::string& what) {
  std::fprintf(stderr, "worker: FAIL: %s\n", what.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s TARGET (host:port or unix:/path)\n", argv[0]);
    return 2;
  }
  tokensampler::ClientOptions options;
  options.wait_for_ready = true;  // the daemon has just started
  absl::StatusOr<tokensampler::Client> client = tokensampler::Client::Create(argv[1], options);
  if (!client.ok()) return Fail(client.status().ToString());

  absl::StatusOr<bool> serving = client->Health("tokensampler.v1.Sampler", absl::Seconds(10));
  if (!serving.ok()) return Fail("Health: " + serving.status().ToString());
  if (!*serving) return Fail("Health: not SERVING");
  std::printf("health SERVING\n");

  // Sample: one bf16 row, greedy, with the sampled token's logprob.
  const std::vector<float> row = PeakedRow(11);
  tokensampler::v1::SampleRequest request;
  absl::StatusOr<tokensampler::v1::Logits> logits =
      tokensampler::MakeLogits(row, kVocab, tokensampler::v1::DTYPE_BFLOAT16);
  if (!logits.ok()) return Fail("MakeLogits: " + logits.status().ToString());
  *request.mutable_logits() = *logits;
  tokensampler::v1::SamplingParams* params = request.add_rows()->mutable_params();
  params->set_temperature(0.0f);
  params->set_logprobs(0);
  absl::StatusOr<tokensampler::v1::SampleResponse> response =
      client->Sample(request, absl::Seconds(10));
  if (!response.ok()) return Fail("Sample: " + response.status().ToString());
  if (response->results_size() != 1 || response->results(0).token_id() != 11) {
    return Fail("Sample: expected token 11, got " + response->ShortDebugString());
  }
  // The raw logprob is the log-softmax of the row (bf16 holds 4 and -1 exactly).
  const double expected = 4.0 - std::log(std::exp(4.0) + (kVocab - 1) * std::exp(-1.0));
  const float logprob = response->results(0).logprob();
  if (std::abs(logprob - expected) > 1e-4) {
    return Fail("Sample: logprob " + std::to_string(logprob) + ", expected log-softmax " +
                std::to_string(expected));
  }
  std::printf("sample token 11 logprob %.4f\n", static_cast<double>(logprob));

  // A bad parameter: the server's INVALID_ARGUMENT, naming the field, comes back unchanged.
  tokensampler::v1::SampleRequest bad = request;
  bad.mutable_rows(0)->mutable_params()->set_temperature(-1.0f);
  absl::StatusOr<tokensampler::v1::SampleResponse> rejected =
      client->Sample(bad, absl::Seconds(10));
  if (rejected.ok() || !absl::IsInvalidArgument(rejected.status()) ||
      rejected.status().message().find("temperature") == absl::string_view::npos) {
    return Fail("Sample with temperature -1: expected INVALID_ARGUMENT naming temperature, got " +
                rejected.status().ToString());
  }
  std::printf("bad temperature INVALID_ARGUMENT\n");

  // Session: one sequence, one greedy step.
  std::unique_ptr<tokensampler::SessionClient> session = tokensampler::SessionClient::Open(*client);
  tokensampler::v1::SamplingParams greedy;
  greedy.set_temperature(0.0f);
  const uint64_t sequence_id = 7;
  absl::Status added = session->Add(sequence_id, greedy, {1, 2, 3}).get();
  if (!added.ok()) return Fail("Session Add: " + added.ToString());
  absl::StatusOr<tokensampler::v1::Logits> step_logits =
      tokensampler::MakeLogits(PeakedRow(5), kVocab, tokensampler::v1::DTYPE_FLOAT32);
  if (!step_logits.ok()) return Fail("MakeLogits: " + step_logits.status().ToString());
  const std::vector<uint64_t> ids = {sequence_id};
  absl::StatusOr<std::vector<tokensampler::v1::SequenceResult>> step =
      session->Step(*step_logits, ids).get();
  if (!step.ok()) return Fail("Session Step: " + step.status().ToString());
  if (step->size() != 1 || (*step)[0].sequence_id() != sequence_id || (*step)[0].token_id() != 5) {
    return Fail("Session Step: expected sequence 7 token 5");
  }
  absl::Status closed = session->Close();
  if (!closed.ok()) return Fail("Session Close: " + closed.ToString());
  std::printf("session step token 5\n");

  std::printf("worker: ok\n");
  return 0;
}
