// tokensampler::SessionClient: the C++ client of the Sampler.Session stream. The server keeps
// each sequence's parameters and history, so a model worker sends only this step's logits and
// the ids of the sequences they belong to.
//
// Design: one SessionClient is one stream. Every call (Add, Step, Release, Fork, Send) sends one
// SessionRequest at once and returns a std::future of its own outcome. The server answers in
// order; a reader thread fulfils the futures in that order. Blocking use is `.get()` on each
// future; a worker may also send the next request before the previous answer arrives. Sending
// blocks only while HTTP/2 flow control holds the request back.
//
// Errors: a per-request error (NOT_FOUND for an unknown or finished id, ALREADY_EXISTS,
// INVALID_ARGUMENT, RESOURCE_EXHAUSTED over a session limit) fails that future only, with the
// server's code and message; the stream goes on. When the stream ends (Close(), the server's
// idle timeout, server shutdown, a network failure) every pending and later future fails with
// the stream's final status (FAILED_PRECONDITION after a clean Close()), and Ended() becomes
// ready: open a new SessionClient to go on.
//
// Thread-safety: thread-safe. Calls from several threads are sent in the order they take an
// internal lock, and each gets its own answer.
#ifndef TOKENSAMPLER_CLIENT_SESSION_CLIENT_H_
#define TOKENSAMPLER_CLIENT_SESSION_CLIENT_H_

#include <grpcpp/client_context.h>
#include <grpcpp/support/sync_stream.h>

#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "client/client.h"
#include "tokensampler/v1/sampler.grpc.pb.h"
#include "tokensampler/v1/sampler.pb.h"

namespace tokensampler {

class SessionClient {
 public:
  // Opens a Session stream over `client`'s channel (its wait_for_ready option applies; the stream
  // has no deadline). Does no blocking I/O: an unreachable server shows up as UNAVAILABLE in the
  // first future and in Ended().
  static std::unique_ptr<SessionClient> Open(const Client& client);

  // Cancels the stream unless Close() ran, and waits for the reader thread. Pending futures fail
  // with CANCELLED.
  ~SessionClient();

  SessionClient(const SessionClient&) = delete;
  SessionClient& operator=(const SessionClient&) = delete;

  // Starts sequence `sequence_id` (params.n must stay unset: Fork for more samples).
  std::future<absl::Status> Add(uint64_t sequence_id, const v1::SamplingParams& params,
                                absl::Span<const int32_t> prompt_token_ids = {});

  // Starts a beam search `sequence_id` (see BeamSearchParams in the proto). Each Step then takes
  // one logits row per live beam of it (1 at its first step), and its result lists the new
  // beams (`beams`: parent_beam, token_id, cumulative_score) and, when the search is over, the
  // `hypotheses`, best first.
  std::future<absl::Status> AddBeamSearch(uint64_t sequence_id, const v1::SamplingParams& params,
                                          const v1::BeamSearchParams& beam,
                                          absl::Span<const int32_t> prompt_token_ids = {});

  // One step: the rows of `logits` (see MakeLogits in client/logits.h) are consumed in the order
  // of `sequence_ids`, one per plain sequence and one per live beam of a beam search. Returns
  // one result per sequence id, in that order; a result with a finish_reason ends its sequence
  // (the server releases it).
  std::future<absl::StatusOr<std::vector<v1::SequenceResult>>> Step(
      v1::Logits logits, absl::Span<const uint64_t> sequence_ids);

  // Drops sequences.
  std::future<absl::Status> Release(absl::Span<const uint64_t> sequence_ids);

  // Copies sequence `parent_id` into each of `child_ids` (new ids; each child draws from its own
  // random stream).
  std::future<absl::Status> Fork(uint64_t parent_id, absl::Span<const uint64_t> child_ids);

  // Sends any combination of release / add / fork / step in one request (the server applies
  // them in that order). `request.request_id` is set by the client. Returns the whole response;
  // a per-request error is returned as the status (the response is then not returned).
  std::future<absl::StatusOr<v1::SessionResponse>> Send(v1::SessionRequest request);

  // Half-closes the stream, waits until every request is answered and returns the stream's
  // final status: OK, or how it ended before (e.g. RESOURCE_EXHAUSTED after the server's idle
  // timeout, UNAVAILABLE when the server shut down or could not be reached).
  absl::Status Close();

  // Ready with the stream's final status once the stream has ended, for whatever reason.
  std::shared_future<absl::Status> Ended() const { return ended_future_; }

 private:
  using Deliver = std::function<void(absl::StatusOr<v1::SessionResponse>)>;

  SessionClient(std::shared_ptr<grpc::Channel> channel, const ClientOptions& options);

  // Add and AddBeamSearch (`beam` null for a plain sequence).
  std::future<absl::Status> AddSequence(uint64_t sequence_id, const v1::SamplingParams& params,
                                        const v1::BeamSearchParams* beam,
                                        absl::Span<const int32_t> prompt_token_ids);

  // Sends `request` and queues `deliver` for its answer (or calls it at once with the final
  // status when the stream has ended).
  void Enqueue(v1::SessionRequest request, Deliver deliver);
  // The reader thread: answers in order, then the final status.
  void ReadLoop();

  std::unique_ptr<v1::Sampler::Stub> stub_;
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<v1::SessionRequest, v1::SessionResponse>> stream_;

  // Held while writing, half-closing or finishing the stream: one write at a time, in the
  // order of pending_.
  absl::Mutex write_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  bool writes_done_ ABSL_GUARDED_BY(write_mu_) = false;

  absl::Mutex mu_;
  uint64_t next_request_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::deque<std::pair<uint64_t, Deliver>> pending_ ABSL_GUARDED_BY(mu_);
  std::optional<absl::Status> final_status_ ABSL_GUARDED_BY(mu_);  // set once the stream ended

  std::promise<absl::Status> ended_;
  std::shared_future<absl::Status> ended_future_;
  std::thread reader_;
};

}  // namespace tokensampler

#endif  // TOKENSAMPLER_CLIENT_SESSION_CLIENT_H_
