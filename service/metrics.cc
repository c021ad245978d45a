#include "service/metrics.h"

#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "oneapi/tbb/task_scheduler_observer.h"
#include "prometheus/metric_family.h"
#include "prometheus/text_serializer.h"

namespace tokensampler::service {
namespace {

// Seconds, from 50 µs (a small greedy row) to 10 s (a huge batch, or a long wait in the queue).
const prometheus::Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* const kBuckets = new prometheus::Histogram::BucketBoundaries{
      0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
      0.05,    0.1,    0.25,    0.5,    1.0,   2.5,    5.0,   10.0};
  return *kBuckets;
}

std::string CodeName(absl::StatusCode code) { return absl::StatusCodeToString(code); }

}  // namespace

// Integrates the number of threads inside the arena over time, so that a scrape gets the
// thread-seconds spent there up to that moment (threads that stay in the arena under constant
// load are counted while they are in it, not only when they leave).
class Metrics::ArenaUtilisation final : public prometheus::Collectable {
 public:
  void Change(int delta) {
    absl::MutexLock lock(&mu_);
    Advance(absl::Now());
    active_ += delta;
  }

  std::vector<prometheus::MetricFamily> Collect() const override {
    int active = 0;
    double busy_seconds = 0.0;
    {
      absl::MutexLock lock(&mu_);
      Advance(absl::Now());
      active = active_;
      busy_seconds = busy_seconds_;
    }
    prometheus::MetricFamily active_family{
        "tokensampler_arena_threads_active",
        "Threads currently inside the sampling arena (working, or spinning briefly before they "
        "leave it).",
        prometheus::MetricType::Gauge,
        {}};
    active_family.metric.emplace_back().gauge.value = active;
    prometheus::MetricFamily busy_family{
        "tokensampler_arena_busy_thread_seconds_total",
        "Thread-seconds spent inside the sampling arena; rate() / tokensampler_threads is the "
        "thread-pool utilisation.",
        prometheus::MetricType::Counter,
        {}};
    busy_family.metric.emplace_back().counter.value = busy_seconds;
    return {std::move(active_family), std::move(busy_family)};
  }

 private:
  void Advance(absl::Time now) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    busy_seconds_ += active_ * absl::ToDoubleSeconds(now - last_change_);
    last_change_ = now;
  }

  mutable absl::Mutex mu_;
  int active_ ABSL_GUARDED_BY(mu_) = 0;
  mutable double busy_seconds_ ABSL_GUARDED_BY(mu_) = 0.0;
  mutable absl::Time last_change_ ABSL_GUARDED_BY(mu_) = absl::Now();
};

// oneTBB calls these on the thread that joins / leaves the observed arena.
class Metrics::ArenaObserver final : public tbb::task_scheduler_observer {
 public:
  ArenaObserver(tbb::task_arena& arena, ArenaUtilisation& utilisation)
      : tbb::task_scheduler_observer(arena), utilisation_(utilisation) {
    observe(true);
  }
  // Stop before the members go: oneTBB may otherwise still call in.
  ~ArenaObserver() override { observe(false); }

  void on_scheduler_entry(bool /*is_worker*/) override { utilisation_.Change(+1); }
  void on_scheduler_exit(bool /*is_worker*/) override { utilisation_.Change(-1); }

 private:
  ArenaUtilisation& utilisation_;
};

RpcMetrics::RpcMetrics(Metrics& metrics, std::string name)
    : metrics_(metrics),
      name_(std::move(name)),
      started_(metrics.requests_started_.Add({{"rpc", name_}})),
      in_flight_(metrics.requests_in_flight_.Add({{"rpc", name_}})),
      queued_(metrics.requests_queued_.Add({{"rpc", name_}})),
      bytes_(metrics.request_bytes_.Add({{"rpc", name_}})),
      queue_wait_(metrics.queue_wait_.Add({{"rpc", name_}}, LatencyBuckets())),
      sampling_(metrics.sampling_.Add({{"rpc", name_}}, LatencyBuckets())),
      duration_(metrics.duration_.Add({{"rpc", name_}}, LatencyBuckets())) {}

void RpcMetrics::CallHandled(absl::StatusCode code) {
  metrics_.requests_handled_.Add({{"rpc", name_}, {"code", CodeName(code)}}).Increment();
}

void RpcMetrics::Rejected(absl::string_view reason) {
  metrics_.rejected_.Add({{"rpc", name_}, {"reason", std::string(reason)}}).Increment();
}

void RpcMetrics::RequestAdmitted(int64_t bytes) {
  bytes_.Increment(static_cast<double>(bytes));
  queued_.Increment();
}

void RpcMetrics::RequestStarted(absl::Duration queue_wait) {
  queued_.Decrement();
  queue_wait_.Observe(absl::ToDoubleSeconds(queue_wait));
}

void RpcMetrics::RequestDone(absl::StatusCode code, int64_t rows, bool started,
                             absl::Duration sampling, absl::Duration total) {
  if (started) {
    sampling_.Observe(absl::ToDoubleSeconds(sampling));
  } else {
    queued_.Decrement();
  }
  duration_.Observe(absl::ToDoubleSeconds(total));
  metrics_.rows_.Add({{"rpc", name_}, {"code", CodeName(code)}})
      .Increment(static_cast<double>(rows));
}

Metrics::Metrics(absl::string_view version, int threads)
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_started_(prometheus::BuildCounter()
                            .Name("tokensampler_requests_started_total")
                            .Help("Calls received, by RPC, before any check.")
                            .Register(*registry_)),
      requests_handled_(prometheus::BuildCounter()
                            .Name("tokensampler_requests_handled_total")
                            .Help("Calls completed, by RPC and gRPC status code.")
                            .Register(*registry_)),
      rows_(prometheus::BuildCounter()
                .Name("tokensampler_rows_total")
                .Help("Rows of the requests that ended, by RPC and status code.")
                .Register(*registry_)),
      request_bytes_(prometheus::BuildCounter()
                         .Name("tokensampler_request_bytes_total")
                         .Help("Serialized size of the requests admitted, by RPC.")
                         .Register(*registry_)),
      rejected_(prometheus::BuildCounter()
                    .Name("tokensampler_rejected_total")
                    .Help("Calls or requests refused before any work, by RPC and reason "
                          "(draining, unauthenticated, concurrency, bytes).")
                    .Register(*registry_)),
      requests_in_flight_(prometheus::BuildGauge()
                              .Name("tokensampler_requests_in_flight")
                              .Help("Calls accepted and not yet completed, by RPC.")
                              .Register(*registry_)),
      requests_queued_(prometheus::BuildGauge()
                           .Name("tokensampler_requests_queued")
                           .Help("Requests admitted and waiting for a sampling thread, by RPC.")
                           .Register(*registry_)),
      queue_wait_(prometheus::BuildHistogram()
                      .Name("tokensampler_queue_wait_seconds")
                      .Help("Time from admission until a sampling thread picked the request up.")
                      .Register(*registry_)),
      sampling_(prometheus::BuildHistogram()
                    .Name("tokensampler_sampling_seconds")
                    .Help("Time a request ran on a sampling thread (conversion and sampling).")
                    .Register(*registry_)),
      duration_(prometheus::BuildHistogram()
                    .Name("tokensampler_request_duration_seconds")
                    .Help("Time from admission until the response was handed to gRPC.")
                    .Register(*registry_)),
      in_flight_bytes_(prometheus::BuildGauge()
                           .Name("tokensampler_in_flight_bytes")
                           .Help("Bytes of the requests admitted and not yet completed.")
                           .Register(*registry_)
                           .Add({})),
      serving_(prometheus::BuildGauge()
                   .Name("tokensampler_serving")
                   .Help("1 while health reports SERVING, 0 while starting or draining.")
                   .Register(*registry_)
                   .Add({})),
      live_sessions_(prometheus::BuildGauge()
                         .Name("tokensampler_live_sessions")
                         .Help("Open Session streams.")
                         .Register(*registry_)
                         .Add({})),
      live_sequences_(prometheus::BuildGauge()
                          .Name("tokensampler_live_sequences")
                          .Help("Sequences alive in open Session streams.")
                          .Register(*registry_)
                          .Add({})),
      shm_regions_(prometheus::BuildGauge()
                       .Name("tokensampler_shm_regions")
                       .Help("Registered shared-memory regions.")
                       .Register(*registry_)
                       .Add({})),
      arena_utilisation_(std::make_shared<ArenaUtilisation>()) {
  prometheus::BuildGauge()
      .Name("tokensampler_build_info")
      .Help("Always 1; the label carries the tokensamplerd version.")
      .Register(*registry_)
      .Add({{"version", std::string(version)}})
      .Set(1.0);
  prometheus::BuildGauge()
      .Name("tokensampler_threads")
      .Help("Size of the sampling arena (--threads, or the CPU count it resolved to).")
      .Register(*registry_)
      .Add({})
      .Set(threads);
}

Metrics::~Metrics() = default;

RpcMetrics& Metrics::ForRpc(absl::string_view rpc) {
  absl::MutexLock lock(&mu_);
  auto it = rpcs_.find(rpc);
  if (it == rpcs_.end()) {
    it = rpcs_
             .emplace(std::string(rpc),
                      std::unique_ptr<RpcMetrics>(new RpcMetrics(*this, std::string(rpc))))
             .first;
  }
  return *it->second;
}

void Metrics::ObserveArena(tbb::task_arena& arena) {
  arena.initialize();
  arena_observer_ = std::make_unique<ArenaObserver>(arena, *arena_utilisation_);
}

std::vector<std::weak_ptr<prometheus::Collectable>> Metrics::Collectables() const {
  return {registry_, arena_utilisation_};
}

std::string Metrics::TextFormat() const {
  std::vector<prometheus::MetricFamily> families = registry_->Collect();
  for (prometheus::MetricFamily& family : arena_utilisation_->Collect()) {
    families.push_back(std::move(family));
  }
  std::ostringstream out;
  prometheus::TextSerializer().Serialize(out, families);
  return out.str();
}

}  // namespace tokensampler::service
