// Metrics: the Prometheus metrics of one Server (prometheus-cpp, served by its civetweb-based
// Exposer on --metrics_listen). Every metric is documented in README.md ("Metrics").
//
// Per RPC (label `rpc`, the method name: "Sample", and every RPC added later) through
// RpcMetrics; server-wide gauges for state that other parts own (live sessions and sequences,
// shared-memory regions) are plain hooks that their owner moves; thread-pool utilisation comes
// from a oneTBB observer on the sampling arena.
//
// Thread-safe: every method may be called from any thread.
#ifndef TOKENSAMPLER_SERVICE_METRICS_H_
#define TOKENSAMPLER_SERVICE_METRICS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "oneapi/tbb/task_arena.h"
#include "prometheus/collectable.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace tokensampler::service {

class Metrics;

// The metrics of one RPC. Obtained from Metrics::ForRpc; lives as long as the Metrics.
// A "call" is one gRPC call (a unary call, or a whole stream); a "request" is one unit of work
// admitted under the server's limits (a unary call's request, or one step of a stream).
class RpcMetrics {
 public:
  RpcMetrics(const RpcMetrics&) = delete;
  RpcMetrics& operator=(const RpcMetrics&) = delete;

  const std::string& name() const { return name_; }

  // A call arrived (before any check).
  void CallStarted() { started_.Increment(); }
  // A call was accepted / ended: the in-flight gauge.
  void CallOpened() { in_flight_.Increment(); }
  void CallClosed() { in_flight_.Decrement(); }
  // A call ended with `code` (refused ones included).
  void CallHandled(absl::StatusCode code);
  // A call or request was refused: reason is "draining", "unauthenticated", "concurrency" or
  // "bytes".
  void Rejected(absl::string_view reason);

  // A request of `bytes` bytes was received and admitted (queued for a thread).
  void RequestAdmitted(int64_t bytes);
  // It started running after waiting `queue_wait` in the arena's queue.
  void RequestStarted(absl::Duration queue_wait);
  // It ended with `code` covering `rows` rows; `sampling` = time running, `total` = time since
  // admission. `started` is false when it ended without running (cancelled while queued).
  void RequestDone(absl::StatusCode code, int64_t rows, bool started, absl::Duration sampling,
                   absl::Duration total);

 private:
  friend class Metrics;
  RpcMetrics(Metrics& metrics, std::string name);

  Metrics& metrics_;
  const std::string name_;
  prometheus::Counter& started_;
  prometheus::Gauge& in_flight_;
  prometheus::Gauge& queued_;
  prometheus::Counter& bytes_;
  prometheus::Histogram& queue_wait_;
  prometheus::Histogram& sampling_;
  prometheus::Histogram& duration_;
};

class Metrics {
 public:
  // `version` goes into tokensampler_build_info; `threads` is the arena size.
  Metrics(absl::string_view version, int threads);
  ~Metrics();

  Metrics(const Metrics&) = delete;
  Metrics& operator=(const Metrics&) = delete;

  // The metrics of RPC `rpc` (created on first use; the same object afterwards).
  RpcMetrics& ForRpc(absl::string_view rpc);

  // Hooks for state owned elsewhere: the Session RPC moves the first two (one session per open
  // stream, one sequence per live sequence in it), the shared-memory registry the third.
  prometheus::Gauge& live_sessions() { return live_sessions_; }
  prometheus::Gauge& live_sequences() { return live_sequences_; }
  prometheus::Gauge& shm_regions() { return shm_regions_; }

  // 1 while health reports SERVING, 0 while starting or draining.
  void SetServing(bool serving) { serving_.Set(serving ? 1.0 : 0.0); }

  // Bytes of the requests admitted and not yet finished (all RPCs).
  void AddInFlightBytes(int64_t delta) { in_flight_bytes_.Increment(static_cast<double>(delta)); }

  // Starts counting the threads working in `arena` (tokensampler_arena_threads_active,
  // tokensampler_arena_busy_thread_seconds_total). REQUIRES: called at most once, and `arena`
  // outlives this Metrics.
  void ObserveArena(tbb::task_arena& arena);

  // What an Exposer serves: the registry and the arena utilisation.
  std::vector<std::weak_ptr<prometheus::Collectable>> Collectables() const;

  // Every metric in the Prometheus text exposition format (what /metrics answers).
  std::string TextFormat() const;

 private:
  friend class RpcMetrics;
  class ArenaUtilisation;
  class ArenaObserver;

  std::shared_ptr<prometheus::Registry> registry_;
  prometheus::Family<prometheus::Counter>& requests_started_;
  prometheus::Family<prometheus::Counter>& requests_handled_;
  prometheus::Family<prometheus::Counter>& rows_;
  prometheus::Family<prometheus::Counter>& request_bytes_;
  prometheus::Family<prometheus::Counter>& rejected_;
  prometheus::Family<prometheus::Gauge>& requests_in_flight_;
  prometheus::Family<prometheus::Gauge>& requests_queued_;
  prometheus::Family<prometheus::Histogram>& queue_wait_;
  prometheus::Family<prometheus::Histogram>& sampling_;
  prometheus::Family<prometheus::Histogram>& duration_;
  prometheus::Gauge& in_flight_bytes_;
  prometheus::Gauge& serving_;
  prometheus::Gauge& live_sessions_;
  prometheus::Gauge& live_sequences_;
  prometheus::Gauge& shm_regions_;
  std::shared_ptr<ArenaUtilisation> arena_utilisation_;
  std::unique_ptr<ArenaObserver> arena_observer_;

  absl::Mutex mu_;
  std::map<std::string, std::unique_ptr<RpcMetrics>, std::less<>> rpcs_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_METRICS_H_
