#include "service/sampler_service.h"

#include <utility>
#include <vector>

#include "core/status_macros.h"
#include "service/convert.h"
#include "service/status.h"

namespace tokensampler::service {

SamplerService::SamplerService(tbb::task_arena& arena, SessionOptions session_options)
    : arena_(arena), session_options_(std::move(session_options)), sessions_(session_options_) {}

SamplerService::~SamplerService() {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](int* in_flight) { return *in_flight == 0; }, &tasks_in_flight_));
}

grpc::ServerUnaryReactor* SamplerService::Sample(grpc::CallbackServerContext* context,
                                                 const v1::SampleRequest* request,
                                                 v1::SampleResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  TaskStarted();
  // gRPC keeps `context`, `request` and `response` alive until the reactor is finished; nothing
  // of the call is touched after Finish().
  arena_.enqueue([this, context, request, response, reactor] {
    if (context->IsCancelled()) {
      reactor->Finish(grpc::Status(grpc::StatusCode::CANCELLED,
                                   "the call was cancelled before sampling started"));
    } else {
      reactor->Finish(ToGrpcStatus(SampleInArena(*request, *response)));
    }
    TaskDone();
  });
  return reactor;
}

grpc::ServerBidiReactor<v1::SessionRequest, v1::SessionResponse>* SamplerService::Session(
    grpc::CallbackServerContext* context) {
  return SessionStream::Start(context, SessionStream::Env{.arena = &arena_,
                                                          .sampler = &sampler_,
                                                          .options = &session_options_,
                                                          .registry = &sessions_});
}

absl::Status SamplerService::SampleInArena(const v1::SampleRequest& request,
                                           v1::SampleResponse& response) const {
  ASSIGN_OR_RETURN(const Batch batch, BatchFromProto(request));
  ASSIGN_OR_RETURN(const std::vector<SampledToken> tokens, sampler_.Run(batch.logits, batch.rows));
  response = ResponseToProto(tokens);
  return absl::OkStatus();
}

void SamplerService::TaskStarted() {
  absl::MutexLock lock(&mu_);
  ++tasks_in_flight_;
}

void SamplerService::TaskDone() {
  absl::MutexLock lock(&mu_);
  --tasks_in_flight_;
}

}  // namespace tokensampler::service
