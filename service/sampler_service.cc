#include "service/sampler_service.h"

#include <utility>
#include <vector>

#include "core/status_macros.h"
#include "service/convert.h"
#include "service/status.h"
#include "service/unary_call.h"

namespace tokensampler::service {

SamplerService::SamplerService(tbb::task_arena& arena, CallGuard& guard, Metrics& metrics,
                               SessionOptions session_options)
    : arena_(arena),
      guard_(guard),
      sample_metrics_(metrics.ForRpc("Sample")),
      session_metrics_(metrics.ForRpc("Session")),
      verify_metrics_(metrics.ForRpc("Verify")),
      session_options_(std::move(session_options)),
      sessions_(session_options_, guard, metrics) {}

grpc::ServerUnaryReactor* SamplerService::Sample(grpc::CallbackServerContext* context,
                                                 const v1::SampleRequest* request,
                                                 v1::SampleResponse* response) {
  return StartUnaryCall(context, guard_, arena_, sample_metrics_,
                        static_cast<int64_t>(request->ByteSizeLong()), request->rows_size(),
                        [this, request, response](const std::atomic<bool>& cancelled) {
                          return SampleInArena(*request, *response, cancelled);
                        });
}

grpc::ServerUnaryReactor* SamplerService::Verify(grpc::CallbackServerContext* context,
                                                 const v1::VerifyRequest* request,
                                                 v1::VerifyResponse* response) {
  // Rows for the limits and metrics: the target rows (each is sampled at most once).
  return StartUnaryCall(context, guard_, arena_, verify_metrics_,
                        static_cast<int64_t>(request->ByteSizeLong()), request->logits().rows(),
                        [this, request, response](const std::atomic<bool>& cancelled) {
                          return VerifyInArena(*request, *response, cancelled);
                        });
}

grpc::ServerBidiReactor<v1::SessionRequest, v1::SessionResponse>* SamplerService::Session(
    grpc::CallbackServerContext* context) {
  // Admitted like every call (drain, token); the stream keeps the open call until its OnDone, so
  // a drain waits until its last answer has been sent.
  absl::StatusOr<CallGuard::Call> call = guard_.OpenCall(*context, session_metrics_);
  if (!call.ok()) return SessionStream::Refuse(ToGrpcStatus(call.status()));
  return SessionStream::Start(context, *std::move(call),
                              SessionStream::Env{.arena = &arena_,
                                                 .sampler = &sampler_,
                                                 .verifier = &verifier_,
                                                 .options = &session_options_,
                                                 .registry = &sessions_});
}

absl::Status SamplerService::SampleInArena(const v1::SampleRequest& request,
                                           v1::SampleResponse& response,
                                           const std::atomic<bool>& cancelled) const {
  ASSIGN_OR_RETURN(const Batch batch, BatchFromProto(request));
  ASSIGN_OR_RETURN(const std::vector<SampledToken> tokens,
                   sampler_.Run(batch.logits, batch.rows, &cancelled));
  response = ResponseToProto(tokens);
  return absl::OkStatus();
}

absl::Status SamplerService::VerifyInArena(const v1::VerifyRequest& request,
                                           v1::VerifyResponse& response,
                                           const std::atomic<bool>& cancelled) const {
  ASSIGN_OR_RETURN(const VerifyBatch batch, VerifyBatchFromProto(request));
  ASSIGN_OR_RETURN(const std::vector<VerifyResult> results,
                   verifier_.Run(batch.logits, batch.rows, &cancelled));
  response = VerifyResponseToProto(results);
  return absl::OkStatus();
}

}  // namespace tokensampler::service
