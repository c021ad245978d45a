// CallGuard: what every tokensampler RPC goes through around its work, whatever the RPC —
// refusal while draining, bearer-token authentication, the concurrency and in-flight-bytes
// limits — and the accounting around it: per-RPC metrics, one log line per failed call, sampled
// request logs, and the count of open calls that a drain waits for. One per Server, shared by
// every handler. grpc.health.v1 and reflection do not go through it (health is exempt from the
// token by design).
//
// A unary RPC uses StartUnaryCall (unary_call.h), which does all of this in one line. A
// streaming RPC (e.g. Session) plugs in with:
//   at stream start:  absl::StatusOr<CallGuard::Call> call = guard.OpenCall(*context, rpc);
//                     if refused, Finish(ToGrpcStatus(call.status())) at once;
//                     guard.SubscribeDrain(...) to end the stream with a clean status on drain;
//   per step:         absl::StatusOr<CallGuard::Request> request = call->Admit(bytes, rows);
//                     (RESOURCE_EXHAUSTED over the limits: answer that step with it),
//                     request->Started() when a sampling thread picks it up,
//                     request->Done(status) when it is answered;
//   at stream end:    call->Finish(status), then Finish() the stream; destroy the Call in
//                     OnDone (a drain waits until then).
//
// Thread-safe. Call and Request are thread-compatible handles (one owner at a time).
#ifndef TOKENSAMPLER_SERVICE_CALL_GUARD_H_
#define TOKENSAMPLER_SERVICE_CALL_GUARD_H_

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "oneapi/tbb/task_arena.h"
#include "service/log.h"
#include "service/metrics.h"

namespace tokensampler::service {

struct CallGuardOptions {
  // Requests admitted and not yet answered, over all RPCs; one more gets RESOURCE_EXHAUSTED.
  // 0 = no limit.
  int max_concurrent_requests = 256;
  // Bytes of the requests admitted and not yet answered; a request that would take the total
  // above it gets RESOURCE_EXHAUSTED, unless nothing else is in flight (the message-size limit
  // bounds a single request). 0 = no limit.
  int64_t max_inflight_bytes = int64_t{1} << 30;
  // Accepted bearer tokens (metadata "authorization: Bearer <token>"). Empty = no
  // authentication.
  std::vector<std::string> auth_tokens;
  // Log every Nth completed request at info level (event=request); 0 = none.
  int request_log_every = 0;
};

class CallGuard {
 public:
  class Call;
  class Request;

  // `metrics` and `logger` (nullable: no logs) are borrowed and must outlive the guard.
  CallGuard(CallGuardOptions options, Metrics& metrics, Logger* logger);

  // Waits until every task started with Enqueue() has returned.
  ~CallGuard();

  CallGuard(const CallGuard&) = delete;
  CallGuard& operator=(const CallGuard&) = delete;

  // Opens a call of `rpc` (counts it as started). Returns the open call, or
  //   UNAVAILABLE      the server is draining;
  //   UNAUTHENTICATED  tokens are configured and the call carries none of them.
  // A refused call is counted as handled with that code and logged.
  absl::StatusOr<Call> OpenCall(const grpc::CallbackServerContext& context, RpcMetrics& rpc);

  // Starts draining: OpenCall refuses from now on, and every drain subscriber is notified (once,
  // on this thread). Idempotent.
  void StartDrain();
  bool draining() const;

  // Waits until no call is open or `deadline` passes. Returns the number still open.
  int WaitForIdle(absl::Time deadline);
  int open_calls() const;

  // Calls `on_drain` when the drain starts (at once, on this thread, if it already has). For
  // streams, to finish with a clean status instead of being cancelled at the drain deadline.
  // `on_drain` must not block; it may call UnsubscribeDrain. Returns the id for
  // UnsubscribeDrain, which must run before whatever `on_drain` touches goes away; it waits for
  // a notification in progress on another thread.
  int64_t SubscribeDrain(std::function<void()> on_drain);
  void UnsubscribeDrain(int64_t id);

  // Runs `task` in `arena`; the guard's destructor waits for it to return.
  void Enqueue(tbb::task_arena& arena, std::function<void()> task);

  Logger* logger() const { return logger_; }

 private:
  // Takes a slot under the limits; RESOURCE_EXHAUSTED naming the limit otherwise (counted as a
  // rejection of `rpc`).
  absl::Status Reserve(RpcMetrics& rpc, int64_t bytes);
  void Release(int64_t bytes);
  void CloseCall();
  absl::Status Authenticate(const grpc::CallbackServerContext& context) const;
  void LogError(const RpcMetrics& rpc, const std::string& peer, const absl::Status& status) const;

  const CallGuardOptions options_;
  Metrics& metrics_;
  Logger* const logger_;
  std::atomic<uint64_t> requests_done_{0};  // for request_log_every

  mutable absl::Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  int open_calls_ ABSL_GUARDED_BY(mu_) = 0;
  int requests_in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  int tasks_in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_subscription_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<int64_t, std::function<void()>> drain_subscribers_ ABSL_GUARDED_BY(mu_);
  // The thread running drain notifications, while it does (UnsubscribeDrain waits for it).
  std::thread::id notifying_thread_ ABSL_GUARDED_BY(mu_);
  bool notifying_ ABSL_GUARDED_BY(mu_) = false;
};

// An open call. Finish() records its outcome; the call stays open (a drain waits for it) until
// the Call is destroyed — keep it until gRPC is done with the call (the reactor's OnDone), so
// that the answer is on its way before the listeners close. A Call destroyed unfinished counts
// as CANCELLED.
class CallGuard::Call {
 public:
  Call(Call&& other) noexcept;
  Call& operator=(Call&& other) noexcept;
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;
  ~Call();

  // Admits one request of `bytes` bytes covering `rows` rows under the server's limits.
  // Returns it, or RESOURCE_EXHAUSTED naming the limit (counted and logged by the caller's
  // Finish() if the call ends with it). REQUIRES: the call is not finished.
  absl::StatusOr<Request> Admit(int64_t bytes, int64_t rows);

  // Records the call's outcome: counts it by code, logs it when it failed. Idempotent.
  void Finish(const absl::Status& status);

  const std::string& peer() const { return peer_; }
  RpcMetrics& rpc() const { return *rpc_; }

 private:
  friend class CallGuard;
  Call(CallGuard& guard, RpcMetrics& rpc, std::string peer);
  // Finishes (as CANCELLED) if needed and closes the call.
  void Close();

  CallGuard* guard_ = nullptr;  // null once closed or moved from
  RpcMetrics* rpc_ = nullptr;
  std::string peer_;
  bool finished_ = false;
};

// An admitted request. Done() records it and releases its share of the limits; a Request
// destroyed before Done() counts as CANCELLED.
class CallGuard::Request {
 public:
  Request(Request&& other) noexcept;
  Request& operator=(Request&& other) noexcept;
  Request(const Request&) = delete;
  Request& operator=(const Request&) = delete;
  ~Request();

  // A sampling thread picked the request up (ends its queue wait).
  void Started();
  // The request was answered with `status`. Idempotent.
  void Done(const absl::Status& status);

 private:
  friend class Call;
  Request(CallGuard& guard, RpcMetrics& rpc, std::string peer, int64_t bytes, int64_t rows);

  CallGuard* guard_ = nullptr;  // null once done or moved from
  RpcMetrics* rpc_ = nullptr;
  std::string peer_;
  int64_t bytes_ = 0;
  int64_t rows_ = 0;
  absl::Time admitted_;
  absl::Time started_ = absl::InfinitePast();
};

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_CALL_GUARD_H_
