// The server side of Sampler.Session: SessionStream, the reactor of one bidirectional stream that
// owns the stream's SequenceTable, and SessionRegistry, the live streams of one service with
// their counters, the idle-stream reaper and the drain.
//
// Every stream is a call of the server's CallGuard (service/call_guard.h): SamplerService opens
// it (drain → UNAVAILABLE, missing token → UNAUTHENTICATED; SessionStream::Refuse answers a
// refused one), the stream admits each request under the server's limits (RESOURCE_EXHAUSTED
// over them, answered in that request's response), and it keeps the call until its OnDone, so
// that the server's drain waits until the stream's last answer has been sent. The registry
// subscribes to the guard's drain: when it starts, every stream ends with UNAVAILABLE once its
// current request is answered.
//
// A SessionStream reads one request at a time, processes requests strictly in order in the
// service's tbb::task_arena (never on a gRPC thread), and writes one response per request in the
// same order. It reads the next request while the current one is processed, and stops reading
// while two responses wait to be written (flow control reaches the client). Several streams run
// in parallel: each has at most one task in the arena at a time.
//
// Thread-safety: SessionRegistry is thread-safe. A SessionStream is driven by gRPC reactions,
// its own arena task and the registry (drain, idle expiry), all serialised by its mutex; the
// SequenceTable is touched only by the one running task (task_running_ hands it over).
// Lock order: SessionRegistry::mu_ before SessionStream::mu_; no gRPC operation is started while
// holding a SessionStream's mutex (gRPC may run a reaction inline on the calling thread).
#ifndef TOKENSAMPLER_SERVICE_SESSION_STREAM_H_
#define TOKENSAMPLER_SERVICE_SESSION_STREAM_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/sampler.h"
#include "core/session.h"
#include "core/speculative.h"
#include "oneapi/tbb/task_arena.h"
#include "service/call_guard.h"
#include "service/metrics.h"
#include "service/request_logits.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::service {

struct SessionOptions {
  // Per stream: live sequences; per sequence: prompt + output tokens. RESOURCE_EXHAUSTED beyond.
  SessionLimits limits;
  // A stream with no request and nothing running for this long is ended with
  // RESOURCE_EXHAUSTED and its sequences are released. absl::InfiniteDuration() = never.
  absl::Duration idle_timeout = absl::Minutes(5);
  // Test seam (empty in production): called in the arena right before a step is sampled, with
  // the stream's cancellation flag. A test holds a step here to cancel the stream during it.
  std::function<void(const std::atomic<bool>& cancelled)> before_step_for_testing;
};

class SessionStream;

class SessionRegistry {
 public:
  // Starts the idle reaper thread unless `options.idle_timeout` is infinite, and subscribes to
  // the drain of `guard`. Keeps the live_sessions / live_sequences gauges of `metrics`. All
  // borrowed: they must outlive the registry.
  SessionRegistry(const SessionOptions& options, CallGuard& guard, Metrics& metrics);

  // Stops the reaper, waits until every stream has unregistered (OnDone) and every task a stream
  // enqueued has returned. REQUIRES: the grpc::Server serving the streams has shut down (so
  // every stream is finished or being finished).
  ~SessionRegistry();

  SessionRegistry(const SessionRegistry&) = delete;
  SessionRegistry& operator=(const SessionRegistry&) = delete;

  // Makes every live stream end with UNAVAILABLE once its current request is answered; streams
  // opened later end at once. Called when the guard's drain starts. Idempotent.
  void BeginShutdown();

  // Streams open now, sequences live in them now, and steps stopped by a cancellation so far.
  int64_t live_sessions() const { return live_sessions_.load(std::memory_order_relaxed); }
  int64_t live_sequences() const { return live_sequences_.load(std::memory_order_relaxed); }
  int64_t cancelled_steps() const { return cancelled_steps_.load(std::memory_order_relaxed); }

 private:
  friend class SessionStream;

  // Adds `stream`; returns false when shutting down (the stream must then end at once).
  bool Register(SessionStream* stream);
  void Unregister(SessionStream* stream);
  void AddLiveSequences(int64_t delta) {
    live_sequences_.fetch_add(delta, std::memory_order_relaxed);
    metrics_.live_sequences().Increment(static_cast<double>(delta));
  }
  void CountCancelledStep() { cancelled_steps_.fetch_add(1, std::memory_order_relaxed); }
  void TaskStarted();
  void TaskDone();

  // The reaper thread: every tick, asks each stream to end itself if it is idle.
  void ReapIdleStreams();

  const SessionOptions& options_;
  CallGuard& guard_;
  Metrics& metrics_;
  int64_t drain_subscription_ = 0;

  absl::Mutex mu_;
  absl::flat_hash_set<SessionStream*> streams_ ABSL_GUARDED_BY(mu_);
  bool shutting_down_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_reaper_ ABSL_GUARDED_BY(mu_) = false;

  // A leaf lock (streams take it from arena enqueues, possibly under mu_).
  absl::Mutex tasks_mu_;
  int tasks_in_flight_ ABSL_GUARDED_BY(tasks_mu_) = 0;

  std::atomic<int64_t> live_sessions_{0};
  std::atomic<int64_t> live_sequences_{0};
  std::atomic<int64_t> cancelled_steps_{0};

  std::thread reaper_;
};

// The stream's messages are raw (service/received_request.h): each SessionRequest is parsed here,
// so that one that does not parse ends the stream with INVALID_ARGUMENT (after the answers to the
// requests before it) instead of passing for the client's half-close.
class SessionStream final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  // What a stream borrows from its service; everything must outlive the stream.
  struct Env {
    tbb::task_arena* arena = nullptr;
    const Sampler* sampler = nullptr;
    const Verifier* verifier = nullptr;  // steps with drafts
    const SessionOptions* options = nullptr;
    SessionRegistry* registry = nullptr;
    // The stream's caller, for shared-memory step logits (the registry itself is borrowed).
    SharedMemoryAccess shared_memory;
    // Largest dense size of a shared-memory step tensor (see RequestLogits::Resolve).
    int64_t max_tensor_bytes = int64_t{256} << 20;
  };

  // Starts serving the stream of `context`, the open `call` of the CallGuard, and returns its
  // reactor, which deletes itself in OnDone.
  static SessionStream* Start(grpc::CallbackServerContext* context, CallGuard::Call call,
                              const Env& env);

  // A reactor that ends its stream at once with `status` (a call the CallGuard refused).
  static grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* Refuse(
      const grpc::Status& status);

  SessionStream(const SessionStream&) = delete;
  SessionStream& operator=(const SessionStream&) = delete;

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  friend class SessionRegistry;

  // What one turn of Pump() starts, decided under mu_ and done without it.
  struct Actions {
    bool read = false;
    const grpc::ByteBuffer* write = nullptr;
    bool task = false;
    bool try_cancel = false;
    std::optional<grpc::Status> finish;

    int starts() const {
      return (read ? 1 : 0) + (write ? 1 : 0) + (task ? 1 : 0) + (try_cancel ? 1 : 0);
    }
    bool none() const { return starts() == 0 && !finish.has_value(); }
  };

  SessionStream(grpc::CallbackServerContext* context, CallGuard::Call call, const Env& env);
  ~SessionStream() override = default;

  // Called by the registry with its mutex held.
  void Drain();                       // end with UNAVAILABLE after the current request
  void ExpireIfIdle(absl::Time now);  // end with RESOURCE_EXHAUSTED if idle too long

  // Runs `update` under mu_, then starts whatever the new state allows, until nothing is left.
  // Never touches the stream after Finish(). Call without holding mu_.
  void Pump(const std::function<void()>& update);
  Actions NextActions() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  // The arena task: processes current_ and hands the response back.
  void RunTask();
  // Applies one request to table_; fills `response` (results) or returns the error.
  absl::Status Apply(const v1::SessionRequest& request, v1::SessionResponse& response);

  const Env env_;
  grpc::CallbackServerContext* const context_;
  // The stream's call of the CallGuard: admits its requests; closed in OnDone (a drain waits for
  // it). Touched by Pump when it starts a task or finishes the stream (never both at once).
  CallGuard::Call call_;

  // Owned by the running task while task_running_ (set and cleared under mu_).
  SequenceTable table_;
  v1::SessionRequest current_;
  // current_'s admission under the server's limits (made when its task is enqueued).
  absl::StatusOr<CallGuard::Request> admission_;
  // Set when the stream is cancelled or broken; read by Sampler::Run between rows.
  std::atomic<bool> cancelled_{false};
  // Target of the read in flight (read_in_flight_), and the messages read so far.
  grpc::ByteBuffer read_buffer_;
  int64_t messages_read_ = 0;

  absl::Mutex mu_;
  bool read_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  bool reads_done_ ABSL_GUARDED_BY(mu_) = false;  // the client half-closed (or reads failed)
  // A message that did not parse: reads stopped there, and once the requests before it are
  // answered the stream ends with this (INVALID_ARGUMENT) instead of OK.
  std::optional<grpc::Status> read_error_ ABSL_GUARDED_BY(mu_);
  std::deque<v1::SessionRequest> pending_ ABSL_GUARDED_BY(mu_);  // read, not yet processed
  bool task_running_ ABSL_GUARDED_BY(mu_) = false;
  // Responses to write (serialised), in order; the front one is being written while
  // write_in_flight_.
  std::deque<grpc::ByteBuffer> writes_ ABSL_GUARDED_BY(mu_);
  bool write_in_flight_ ABSL_GUARDED_BY(mu_) = false;
  // Operations decided under mu_ but not yet started by Pump; Finish waits for them.
  int starting_ ABSL_GUARDED_BY(mu_) = 0;
  // Drain or idle expiry: stop reading and processing, end with this status once written out.
  std::optional<grpc::Status> end_status_ ABSL_GUARDED_BY(mu_);
  bool try_cancel_wanted_ ABSL_GUARDED_BY(mu_) = false;  // a write is stuck: cancel the call
  bool try_cancel_issued_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time last_activity_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_SESSION_STREAM_H_
