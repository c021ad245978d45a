// SamplerService: the tokensampler.v1.Sampler gRPC service (callback API).
//
// Thread-safe: gRPC calls the handlers from many threads at once. Handlers never block a gRPC
// thread: each call goes through the server's CallGuard (drain, token, limits, metrics) and is
// enqueued into the tbb::task_arena the service is handed (StartUnaryCall); the work runs there
// (core parallelises inside the same arena), and the call is finished from that task.
#ifndef TOKENSAMPLER_SERVICE_SAMPLER_SERVICE_H_
#define TOKENSAMPLER_SERVICE_SAMPLER_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <atomic>

#include "absl/status/status.h"
#include "core/sampler.h"
#include "oneapi/tbb/task_arena.h"
#include "service/call_guard.h"
#include "service/metrics.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::service {

class SamplerService final : public v1::Sampler::CallbackService {
 public:
  // `arena` runs every call's work; `guard` admits and accounts every call (and waits for the
  // tasks it enqueued); `metrics` holds the per-RPC metrics. All borrowed: they must outlive the
  // service, and the service must outlive the grpc::Server it is registered with.
  SamplerService(tbb::task_arena& arena, CallGuard& guard, Metrics& metrics);
  ~SamplerService() override = default;

  SamplerService(const SamplerService&) = delete;
  SamplerService& operator=(const SamplerService&) = delete;

  // Sample (see sampler.proto for the status codes).
  grpc::ServerUnaryReactor* Sample(grpc::CallbackServerContext* context,
                                   const v1::SampleRequest* request,
                                   v1::SampleResponse* response) override;

 private:
  // The body of Sample; runs in the arena. Returns OK with `response` filled, or the error
  // (CANCELLED once `cancelled` is set).
  absl::Status SampleInArena(const v1::SampleRequest& request, v1::SampleResponse& response,
                             const std::atomic<bool>& cancelled) const;

  tbb::task_arena& arena_;
  CallGuard& guard_;
  RpcMetrics& sample_metrics_;
  const Sampler sampler_;
};

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_SAMPLER_SERVICE_H_
