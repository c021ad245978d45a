#include "service/sampler_service.h"

#include <utility>
#include <vector>

#include "core/status_macros.h"
#include "service/convert.h"
#include "service/unary_call.h"

namespace tokensampler::service {

SamplerService::SamplerService(tbb::task_arena& arena, CallGuard& guard, Metrics& metrics)
    : arena_(arena), guard_(guard), sample_metrics_(metrics.ForRpc("Sample")) {}

grpc::ServerUnaryReactor* SamplerService::Sample(grpc::CallbackServerContext* context,
                                                 const v1::SampleRequest* request,
                                                 v1::SampleResponse* response) {
  return StartUnaryCall(context, guard_, arena_, sample_metrics_,
                        static_cast<int64_t>(request->ByteSizeLong()), request->rows_size(),
                        [this, request, response](const std::atomic<bool>& cancelled) {
                          return SampleInArena(*request, *response, cancelled);
                        });
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

}  // namespace tokensampler::service
