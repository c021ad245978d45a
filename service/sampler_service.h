// SamplerService: the tokensampler.v1.Sampler gRPC service (callback API).
//
// Thread-safe: gRPC calls the handlers from many threads at once. Handlers never block a gRPC
// thread: each call is enqueued into the tbb::task_arena the service is handed, the work runs
// there (core parallelises inside the same arena), and the call is finished from that task.
#ifndef TOKENSAMPLER_SERVICE_SAMPLER_SERVICE_H_
#define TOKENSAMPLER_SERVICE_SAMPLER_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "core/sampler.h"
#include "oneapi/tbb/task_arena.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::service {

class SamplerService final : public v1::Sampler::CallbackService {
 public:
  // `arena` runs every call's work. It is borrowed and must outlive the service.
  explicit SamplerService(tbb::task_arena& arena);

  // Waits until every task this service enqueued has returned. Register the service with a
  // grpc::Server that is shut down before this runs (grpc::Server::Shutdown waits for every call
  // to be finished).
  ~SamplerService() override;

  SamplerService(const SamplerService&) = delete;
  SamplerService& operator=(const SamplerService&) = delete;

  // Sample (see sampler.proto for the status codes).
  grpc::ServerUnaryReactor* Sample(grpc::CallbackServerContext* context,
                                   const v1::SampleRequest* request,
                                   v1::SampleResponse* response) override;

 private:
  // The body of Sample; runs in the arena. Returns OK with `response` filled, or the error.
  absl::Status SampleInArena(const v1::SampleRequest& request, v1::SampleResponse& response) const;

  // Keep count of enqueued tasks so that the destructor can wait for them.
  void TaskStarted();
  void TaskDone();

  tbb::task_arena& arena_;
  const Sampler sampler_;

  absl::Mutex mu_;
  int tasks_in_flight_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_SAMPLER_SERVICE_H_
