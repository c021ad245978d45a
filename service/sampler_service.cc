#include "service/sampler_service.h"

#include <memory>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "core/status_macros.h"
#include "service/convert.h"
#include "service/status.h"
#include "service/unary_call.h"

namespace tokensampler::service {
namespace {

// The bearer token a call carries ("" without one): its shared-memory namespace. When the
// server checks tokens, the CallGuard has verified it before any handler's work runs.
std::string BearerToken(const grpc::CallbackServerContext& context) {
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) return "";
  absl::string_view value(it->second.data(), it->second.size());
  constexpr absl::string_view kPrefix = "bearer ";
  if (value.size() <= kPrefix.size() ||
      !absl::EqualsIgnoreCase(value.substr(0, kPrefix.size()), kPrefix)) {
    return "";
  }
  return std::string(value.substr(kPrefix.size()));
}

// The size of a request that counts no rows.
int64_t NoRows(const google::protobuf::MessageLite& /*request*/) { return 0; }

}  // namespace

SamplerService::SamplerService(tbb::task_arena& arena, CallGuard& guard, Metrics& metrics,
                               SessionOptions session_options, SharedMemoryRegistry* shared_memory,
                               int64_t max_tensor_bytes)
    : arena_(arena),
      guard_(guard),
      sample_metrics_(metrics.ForRpc("Sample")),
      session_metrics_(metrics.ForRpc("Session")),
      verify_metrics_(metrics.ForRpc("Verify")),
      register_metrics_(metrics.ForRpc("RegisterSharedMemory")),
      unregister_metrics_(metrics.ForRpc("UnregisterSharedMemory")),
      list_metrics_(metrics.ForRpc("ListSharedMemory")),
      shared_memory_(shared_memory),
      max_tensor_bytes_(max_tensor_bytes),
      session_options_(std::move(session_options)),
      sessions_(session_options_, guard, metrics) {}

SharedMemoryAccess SamplerService::AccessOf(const grpc::CallbackServerContext& context) const {
  return SharedMemoryAccess{shared_memory_,
                            SharedMemoryCaller{context.peer(), BearerToken(context)}};
}

SharedMemoryAccess SamplerService::AccessFor(const grpc::CallbackServerContext& context,
                                             const v1::Logits& logits) const {
  // Only a shared-memory reference needs to know who is asking.
  return logits.has_shared_memory() ? AccessOf(context) : SharedMemoryAccess{shared_memory_, {}};
}

grpc::ServerUnaryReactor* SamplerService::Sample(grpc::CallbackServerContext* context,
                                                 const grpc::ByteBuffer* request,
                                                 grpc::ByteBuffer* response) {
  // Parsing leaves the logits bytes in gRPC's slices: it copies only the few hundred other bytes.
  absl::StatusOr<ReceivedSampleRequest> received = ReceivedSampleRequest::Parse(*request);
  if (!received.ok()) {
    return StartUnaryCall(
        context, guard_, arena_, sample_metrics_, static_cast<int64_t>(request->Length()), 0,
        [status = received.status()](const std::atomic<bool>&) { return status; });
  }
  auto parsed = std::make_shared<const ReceivedSampleRequest>(*std::move(received));
  SharedMemoryAccess access = AccessFor(*context, parsed->message().logits());
  const int64_t rows = parsed->message().rows_size();
  return StartUnaryCall(
      context, guard_, arena_, sample_metrics_, static_cast<int64_t>(parsed->wire_bytes()), rows,
      [this, parsed, response, access = std::move(access)](const std::atomic<bool>& cancelled) {
        v1::SampleResponse proto;
        RETURN_IF_ERROR(SampleInArena(*parsed, proto, access, cancelled));
        *response = SerializeForWire(proto);
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* SamplerService::RegisterSharedMemory(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request_bytes,
    grpc::ByteBuffer* response_bytes) {
  return StartRawUnaryCall<v1::RegisterSharedMemoryRequest, v1::RegisterSharedMemoryResponse>(
      context, guard_, arena_, register_metrics_, *request_bytes, response_bytes, NoRows,
      [this, access = AccessOf(*context)](const v1::RegisterSharedMemoryRequest& request,
                                          v1::RegisterSharedMemoryResponse& response,
                                          const std::atomic<bool>&) -> absl::Status {
        if (access.registry == nullptr) {
          return absl::FailedPreconditionError("this server has no shared memory");
        }
        ASSIGN_OR_RETURN(std::string handle,
                         shared_memory_->Register(access.caller, request.name(), request.key(),
                                                  request.offset(), request.byte_size()));
        response.set_region(std::move(handle));
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* SamplerService::UnregisterSharedMemory(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request_bytes,
    grpc::ByteBuffer* response_bytes) {
  return StartRawUnaryCall<v1::UnregisterSharedMemoryRequest, v1::UnregisterSharedMemoryResponse>(
      context, guard_, arena_, unregister_metrics_, *request_bytes, response_bytes, NoRows,
      [this, access = AccessOf(*context)](const v1::UnregisterSharedMemoryRequest& request,
                                          v1::UnregisterSharedMemoryResponse& /*response*/,
                                          const std::atomic<bool>&) -> absl::Status {
        if (access.registry == nullptr) {
          return absl::FailedPreconditionError("this server has no shared memory");
        }
        return shared_memory_->Unregister(access.caller, request.region());
      });
}

grpc::ServerUnaryReactor* SamplerService::ListSharedMemory(grpc::CallbackServerContext* context,
                                                           const grpc::ByteBuffer* request_bytes,
                                                           grpc::ByteBuffer* response_bytes) {
  return StartRawUnaryCall<v1::ListSharedMemoryRequest, v1::ListSharedMemoryResponse>(
      context, guard_, arena_, list_metrics_, *request_bytes, response_bytes, NoRows,
      [this, access = AccessOf(*context)](const v1::ListSharedMemoryRequest& request,
                                          v1::ListSharedMemoryResponse& response,
                                          const std::atomic<bool>&) -> absl::Status {
        if (access.registry == nullptr) {
          return absl::FailedPreconditionError("this server has no shared memory");
        }
        const std::vector<std::string> handles(request.regions().begin(), request.regions().end());
        ASSIGN_OR_RETURN(const std::vector<SharedMemoryRegionInfo> regions,
                         shared_memory_->List(access.caller, handles));
        for (const SharedMemoryRegionInfo& info : regions) {
          v1::SharedMemoryRegionStatus& out = *response.add_regions();
          out.set_region(info.handle);
          out.set_name(info.name);
          out.set_key(info.key);
          out.set_offset(info.offset);
          out.set_byte_size(info.byte_size);
          out.set_faulted(info.faulted);
        }
        return absl::OkStatus();
      });
}

grpc::ServerUnaryReactor* SamplerService::Verify(grpc::CallbackServerContext* context,
                                                 const grpc::ByteBuffer* request_bytes,
                                                 grpc::ByteBuffer* response_bytes) {
  // Rows for the limits and metrics: the target rows (each is sampled at most once).
  return StartRawUnaryCall<v1::VerifyRequest, v1::VerifyResponse>(
      context, guard_, arena_, verify_metrics_, *request_bytes, response_bytes,
      [](const v1::VerifyRequest& request) { return request.logits().rows(); },
      [this, context](const v1::VerifyRequest& request, v1::VerifyResponse& response,
                      const std::atomic<bool>& cancelled) {
        // The context outlives the work: the call is finished only after it.
        return VerifyInArena(request, response, AccessFor(*context, request.logits()), cancelled);
      });
}

grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer>* SamplerService::Session(
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
                                                 .registry = &sessions_,
                                                 .shared_memory = AccessOf(*context),
                                                 .max_tensor_bytes = max_tensor_bytes_});
}

absl::Status SamplerService::SampleInArena(const ReceivedSampleRequest& received,
                                           v1::SampleResponse& response,
                                           const SharedMemoryAccess& access,
                                           const std::atomic<bool>& cancelled) const {
  const v1::SampleRequest& request = received.message();
  ASSIGN_OR_RETURN(const RequestLogits logits,
                   RequestLogits::Resolve(request.logits(), access, /*allow_sparse=*/true,
                                          max_tensor_bytes_, received.data_pieces()));
  ASSIGN_OR_RETURN(Batch batch, BatchFromProto(request, logits.view()));
  const SparseBatch* sparse = logits.sparse();
  if (sparse != nullptr) {
    for (size_t i = 0; i < batch.rows.size(); ++i) {
      RETURN_IF_ERROR(sparse->Prepare(static_cast<int>(i), batch.params[i],
                                      batch.rows[i].prompt_token_ids,
                                      batch.rows[i].output_token_ids));
    }
  }
  absl::StatusOr<std::vector<SampledToken>> sampled =
      sampler_.Run(batch.logits, batch.rows, &cancelled);
  // A region truncated during the read explains whatever the read made fail: its error first.
  RETURN_IF_ERROR(logits.CheckAfterRead());
  if (!sampled.ok()) return sampled.status();
  std::vector<SampledToken> tokens = *std::move(sampled);
  if (sparse != nullptr) {
    for (SampledToken& token : tokens) sparse->FixLogprobs(batch.params[token.row_index], token);
  }
  response = ResponseToProto(tokens);
  return absl::OkStatus();
}

absl::Status SamplerService::VerifyInArena(const v1::VerifyRequest& request,
                                           v1::VerifyResponse& response,
                                           const SharedMemoryAccess& access,
                                           const std::atomic<bool>& cancelled) const {
  // Sparse candidates would be exact only in trivial cases: the accept test needs p(draft) for
  // drafts outside the candidates and the residual max(0, p - q) spans the whole vocabulary.
  if (request.logits().has_sparse()) {
    return absl::InvalidArgumentError(
        "logits.sparse is not accepted by Verify: accepting a draft needs its target probability "
        "and a rejection draws from max(0, p - q) over the whole vocabulary, which top-k "
        "candidates do not give; send dense logits (data or shared_memory)");
  }
  ASSIGN_OR_RETURN(
      const RequestLogits logits,
      RequestLogits::Resolve(request.logits(), access, /*allow_sparse=*/false, max_tensor_bytes_));
  ASSIGN_OR_RETURN(const VerifyBatch batch, VerifyBatchFromProto(request, logits.view()));
  ASSIGN_OR_RETURN(const std::vector<VerifyResult> results,
                   verifier_.Run(batch.logits, batch.rows, &cancelled));
  RETURN_IF_ERROR(logits.CheckAfterRead());
  response = VerifyResponseToProto(results);
  return absl::OkStatus();
}

}  // namespace tokensampler::service
