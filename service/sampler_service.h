// SamplerService: the tokensampler.v1.Sampler gRPC service (callback API): the stateless Sample
// and the stateful Session stream (service/session_stream.h).
//
// Thread-safe: gRPC calls the handlers from many threads at once. Handlers never block a gRPC
// thread: each call (each Session request) is enqueued into the tbb::task_arena the service is
// handed, the work runs there (core parallelises inside the same arena), and the call is
// finished (the response written) from that task.
#ifndef TOKENSAMPLER_SERVICE_SAMPLER_SERVICE_H_
#define TOKENSAMPLER_SERVICE_SAMPLER_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/sampler.h"
#include "oneapi/tbb/task_arena.h"
#include "service/session_stream.h"
#include "tokensampler/v1/sampler.grpc.pb.h"

namespace tokensampler::service {

class SamplerService final : public v1::Sampler::CallbackService {
 public:
  // `arena` runs every call's work. It is borrowed and must outlive the service.
  explicit SamplerService(tbb::task_arena& arena, SessionOptions session_options = {});

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

  // Session (see sampler.proto): one SessionStream per stream.
  grpc::ServerBidiReactor<v1::SessionRequest, v1::SessionResponse>* Session(
      grpc::CallbackServerContext* context) override;

  // Makes every Session stream end with UNAVAILABLE once its current request is answered (and
  // later ones at once), then waits until they have ended or `deadline` passes. Call before
  // shutting the grpc::Server down, which would otherwise wait for open streams until its
  // deadline and then cut them off without their status. Idempotent.
  void DrainSessions(absl::Time deadline) {
    sessions_.BeginShutdown();
    sessions_.AwaitNoStreams(deadline);
  }

  // Session streams open now and the sequences live in them (for tests and metrics), and the
  // session steps stopped so far because their stream was cancelled.
  int64_t live_sessions() const { return sessions_.live_sessions(); }
  int64_t live_sequences() const { return sessions_.live_sequences(); }
  int64_t cancelled_session_steps() const { return sessions_.cancelled_steps(); }

 private:
  // The body of Sample; runs in the arena. Returns OK with `response` filled, or the error.
  absl::Status SampleInArena(const v1::SampleRequest& request, v1::SampleResponse& response) const;

  // Keep count of enqueued tasks so that the destructor can wait for them.
  void TaskStarted();
  void TaskDone();

  tbb::task_arena& arena_;
  const Sampler sampler_;
  const SessionOptions session_options_;

  absl::Mutex mu_;
  int tasks_in_flight_ ABSL_GUARDED_BY(mu_) = 0;

  // Destroyed first: waits for the session tasks, which use sampler_ and session_options_.
  SessionRegistry sessions_;
};

}  // namespace tokensampler::service

#endif  // TOKENSAMPLER_SERVICE_SAMPLER_SERVICE_H_
